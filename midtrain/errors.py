"""User-facing errors: one line naming the key or file and what to do."""

from __future__ import annotations


class MidtrainError(Exception):
    """Bad input from the user. The CLI prints it as one line and exits non-zero.

    Raise it *before* anything on disk is touched, so a bad invocation never modifies an
    existing store, checkpoint or result.
    """
