"""Settings: the ones every run takes (`run.RunSettings`), how `key=value` arguments are read (`parse`) and
checked (`checks`). Each training method declares its own settings beside the cookbook Config it drives
(`pipeline.methods.*`); `pipeline.settings.TrainConfig` is all of them, for the command line."""
