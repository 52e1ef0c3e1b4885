"""The one exception type a user can cause: bad config, bad file, bad checkpoint."""


class UserError(Exception):
    """A mistake in the user's input, reported as one line naming the field or file and the fix.

    The command-line entry point prints the message and exits non-zero without a
    traceback; everything else (a bug) keeps its traceback.
    """


def describe(exc: BaseException) -> str:
    """``Type: first line of its message``: what a one-line error can quote of an exception
    raised by code the tool does not own (a plug-in, torch reading a foreign file)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


class FailedElsewhere(UserError):
    """The error of another MPI rank, which rank 0 reports: this rank exits quietly."""
