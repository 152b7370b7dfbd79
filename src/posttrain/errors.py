"""Errors a user can act on.

Anything raised as a `UserError` is printed by the CLI as one line (no traceback) and exits non-zero. The
message must name what is wrong: the file and line, the column or field, the option.
"""


class UserError(Exception):
    """Bad input or settings: printed as one line, exit code 2."""

    exit_code = 2


class DataError(UserError):
    """A dataset problem: the message names the file (or dataset), the line/row and the field."""


class ConfigError(UserError):
    """A setting that is unknown, unsupported or inconsistent."""


class PreflightError(UserError):
    """Something missing before any compute is spent (keys, model availability)."""


class NoSpaceError(UserError):
    """A write failed for lack of disk space: the message names the path and the space left."""
