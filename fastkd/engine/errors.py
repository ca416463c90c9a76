"""Errors the CLI turns into a message and an exit status (importable without torch)."""


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN/inf; the message names the step and the term."""


class PeerFailure(RuntimeError):
    """The process group failed (did not form, or another rank stopped answering); the message is the one
    line to print, and the process exits with status 4."""
