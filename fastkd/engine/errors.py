"""Errors the CLI turns into a message and an exit status (importable without torch)."""


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN/inf; the message names the step and the term."""
