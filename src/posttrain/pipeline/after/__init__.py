"""After training: a finished run's trained model, talked to (`posttrain chat`), served over OpenAI's API
(`posttrain serve-model`) or taken home (`posttrain export`)."""
