"""User-facing errors.

An :class:`AnybitError` is bad input, not a bug: the CLI prints its message on one
line and exits non-zero without a traceback. The message says what to do.
"""


class AnybitError(Exception):
    """Bad input or an unusable environment; the message tells the user what to do."""
