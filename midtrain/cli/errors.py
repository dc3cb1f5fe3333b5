"""Errors as the user reads them: one line, naming the key or file. The one place where
exceptions from jsonargparse, LightningCLI and our own classes become a ``MidtrainError``."""

from __future__ import annotations

from collections.abc import Sequence

from midtrain.cli.unknown_key import unknown_key_error
from midtrain.cli.yaml_input import explain_dict_error
from midtrain.errors import MidtrainError, find_midtrain_error


def one_line(message: object) -> str:
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def config_error(error: BaseException, what: str) -> MidtrainError:
    """A parser's error (argparse's or jsonargparse's) as one line prefixed by ``what``."""
    return MidtrainError(explain_dict_error(one_line(error)) or f"{what}: {one_line(error)}")


def translate_cli_error(
    error: Exception, raised: list[MidtrainError], argv: Sequence[str] = ()
) -> BaseException:
    """What LightningCLI raised, as the error to show: jsonargparse wraps errors raised while
    instantiating our classes, in the exception chain or (older versions, a Union's subtype)
    only in its message, where ``raised`` (``midtrain.errors.recording_errors``) has them."""
    cause = find_midtrain_error(error) or (raised[-1] if raised else None)
    if cause is not None:
        return cause
    if type(error).__name__ == "ArgumentError" or "jsonargparse" in type(error).__module__:
        # an unknown key names its file and line and the closest valid key
        unknown = unknown_key_error(one_line(error), argv)
        return MidtrainError(unknown) if unknown else config_error(error, "config")
    return error
