"""The errors a user sees as one message, and the exit status of each (importable without torch).

``fastkd`` (``cli.main``) and the demos turn them into one line on stderr and a status:

    ConfigError          2  a configuration or input a user can fix (also: a missing file)
    NonFiniteLossError   3  a loss term, or the weights after a step, became NaN/inf
    PeerFailure          4  the process group did not form, or another rank stopped answering

This module imports nothing of fastkd, so every layer (config, data, engine, cli, demos) can raise and
catch them without importing the layers above it.
"""

EXIT_USER_ERROR = 2
EXIT_NONFINITE = 3
EXIT_PEER_FAILED = 4


class ConfigError(ValueError):
    """A configuration problem a user can fix; the message says where and how."""


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN/inf; the message names the step and the term."""


class PeerFailure(RuntimeError):
    """The process group failed (did not form, or another rank stopped answering); the message is the one
    line to print, and the process exits with status 4."""
