"""Start-up work every posttrain process (the client and the engine) does once, before transformers loads."""

from __future__ import annotations


def skip_unused_sklearn() -> None:
    """Keep scikit-learn out of transformers' start-up.

    transformers imports scikit-learn whenever it is installed (1-2 s of CPU in each of a run's two processes), for
    assisted generation's `roc_curve` alone, which posttrain never calls; it is installed because
    sentence-transformers (`retriever=chroma`) needs it. Told that it is absent, transformers skips it; any module
    that imports scikit-learn itself still gets it. Run after the Hub check: transformers.utils imports
    huggingface_hub, which reads HF_HUB_OFFLINE when imported.
    """
    import transformers.utils as hf_utils
    from transformers.utils import import_utils

    def absent() -> bool:
        return False

    hf_utils.is_sklearn_available = absent
    import_utils.is_sklearn_available = absent
