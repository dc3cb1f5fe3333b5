"""User-facing errors: one line naming the key or file and what to do."""

from __future__ import annotations


class MidtrainError(Exception):
    """Bad input from the user. The CLI prints it as one line and exits non-zero.

    Raise it *before* anything on disk is touched, so a bad invocation never modifies an
    existing store, checkpoint or result.
    """


def find_midtrain_error(error: BaseException) -> MidtrainError | None:
    """The ``MidtrainError`` behind ``error``: libraries that construct our classes (jsonargparse
    instantiating a config) raise their own exception ``from`` ours."""
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, MidtrainError):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None
