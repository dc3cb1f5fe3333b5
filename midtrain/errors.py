"""User-facing errors: one line naming the key or file and what to do."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

# MidtrainErrors raised inside `recording_errors()` (None outside one)
_raised: ContextVar[list[MidtrainError] | None] = ContextVar("midtrain_raised", default=None)


class MidtrainError(Exception):
    """Bad input from the user. The CLI prints it as one line and exits non-zero.

    Raise it *before* anything on disk is touched, so a bad invocation never modifies an
    existing store, checkpoint or result.
    """

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        raised = _raised.get()
        if raised is not None:
            raised.append(self)


@contextmanager
def recording_errors() -> Iterator[list[MidtrainError]]:
    """The ``MidtrainError``s raised inside the block, in order: for a caller that receives
    them wrapped by a library without the exception chain (jsonargparse < 4.50 reports an error
    of one of a Union's subtypes only in its own message)."""
    recorded: list[MidtrainError] = []
    token = _raised.set(recorded)
    try:
        yield recorded
    finally:
        _raised.reset(token)


def find_midtrain_error(error: BaseException) -> MidtrainError | None:
    """The ``MidtrainError`` behind ``error`` in its exception chain, if any."""
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, MidtrainError):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None
