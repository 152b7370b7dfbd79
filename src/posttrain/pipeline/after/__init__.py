"""After training: a finished run's trained model, talked to (`posttrain chat`) or taken home (`posttrain export`)."""
