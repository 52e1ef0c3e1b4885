"""The exceptions a user can cause: bad input (config, file, checkpoint), and interrupts."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager


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


class Interrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C) or SIGTERM (what SLURM sends before a kill) stopped the command.

    A KeyboardInterrupt, so no ``except Exception`` can mistake it for a failure and carry
    on. ``saved`` says what the command left on disk (``"37 of 120 loss points saved
    in x.h5"``); the command line adds how to go on.
    """

    def __init__(self, signal_number: int = signal.SIGINT, saved: str = ""):
        super().__init__(signal_number, saved)
        self.signal_number = signal_number
        self.saved = saved

    def __str__(self) -> str:
        """``signal 15``: what a wrapper that keeps only the text (TorchScript) shows."""
        return f"signal {int(self.signal_number)}"


@contextmanager
def reporting_interrupt(saved: Callable[[], str]) -> Iterator[None]:
    """An interrupt inside leaves as :class:`Interrupted` saying ``saved()``, which is called
    once the block has unwound (files closed, temporary files removed)."""
    try:
        yield
    except KeyboardInterrupt as interrupt:
        number = getattr(interrupt, "signal_number", signal.SIGINT)
        raise Interrupted(number, saved()) from None
