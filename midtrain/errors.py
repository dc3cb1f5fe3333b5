"""User-facing errors: one line naming the key or file and what to do."""

from __future__ import annotations

from typing import ClassVar


class MidtrainError(Exception):
    """Bad input from the user. The CLI prints it as one line and exits non-zero.

    Raise it *before* anything on disk is touched, so a bad invocation never modifies an
    existing store, checkpoint or result.
    """

    # The most recent error, for the CLI: libraries that construct our classes (jsonargparse
    # instantiating a config) may wrap it, some versions without keeping the exception chain.
    last: ClassVar[MidtrainError | None] = None

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        MidtrainError.last = self
