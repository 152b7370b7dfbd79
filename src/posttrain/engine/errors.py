"""The engine's one error type for a request it cannot serve (every module below the routes raises it)."""


class WireError(ValueError):
    """A request the engine cannot decode or serve; becomes a failed future or a 400 with the message."""
