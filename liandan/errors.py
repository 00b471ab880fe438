"""The one exception type the CLI turns into a one-line message and exit code 2."""


class LiandanError(Exception):
    """A problem the user can fix: bad input, a missing file, an impossible option.

    The message must say what is wrong, where, and (when it helps) what to do.
    """


class ContextExceeded(LiandanError):
    """The prompt leaves no room in the model's context: `serve` answers it with its own error code."""
