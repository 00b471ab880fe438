"""LiandanError, which the CLI turns into a one-line message and exit code 2 (its subclasses too), and the exit codes."""

# Exit codes: 0 done, 1 warnings (`data check`), 2 a problem with the input or options, 3 a bug in liandan.
# 3 rather than Python's 1, so a crash can never pass for "warnings" in a CI job that accepts 1.
EXIT_WARNINGS, EXIT_INPUT, EXIT_INTERNAL = 1, 2, 3


class LiandanError(Exception):
    """A problem the user can fix: bad input, a missing file, an impossible option.

    The message must say what is wrong, where, and (when it helps) what to do.
    """


class ContextExceeded(LiandanError):
    """The prompt leaves no room in the model's context: `serve` answers it with its own error code."""
