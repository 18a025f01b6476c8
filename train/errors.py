"""Errors a user can cause and fix (bad paths, labels, checkpoints, overrides).

Command-line entry points turn these into one line on stderr and exit code 2; anything else is a bug and keeps
its traceback. Every message names the offending file/key/value and, where it helps, what to do.
"""


class UserError(Exception):
    """Base class for problems in the user's input, as opposed to bugs in this project."""


class DataError(UserError):
    """A dataset problem: missing root or image, malformed label line, invalid polygon, empty split."""


class CheckpointError(UserError):
    """Weights that do not fit the model: missing, unexpected or mis-shaped keys, unreadable files."""


class ConfigError(UserError):
    """A configuration value that cannot work (unknown model, bad range, missing required path)."""
