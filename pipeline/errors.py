"""The one exception type a user can cause: bad config, bad file, bad checkpoint."""


class UserError(Exception):
    """A mistake in the user's input, reported as one line naming the field or file and the fix.

    The command-line entry point prints the message and exits non-zero without a
    traceback; everything else (a bug) keeps its traceback.
    """


class FailedElsewhere(UserError):
    """The error of another MPI rank, which rank 0 reports: this rank exits quietly."""
