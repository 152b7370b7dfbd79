"""Data: reading files and Hub datasets (`load`), row formats (`formats`), chat datasets for the cookbook (`chat`)."""

from posttrain.pipeline.data.load import DataRequest, LoadedData, default_train_on_what, load_data

__all__ = ["DataRequest", "LoadedData", "default_train_on_what", "load_data"]
