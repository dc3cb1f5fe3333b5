"""YAML as the ``midtrain`` command reads it: a duplicated key is an error (not "last wins"), a
syntax error names the file and line, and the usual command-line dict slip gets one line.

``install()`` puts the duplicate check into jsonargparse's loader (its public ``set_loader``
hook), so it applies to every YAML the command reads: ``--config`` files, files given for
nested keys, and YAML values on the command line."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from midtrain.configs import _duplicate_error, check_yaml
from midtrain.errors import MidtrainError


def check_args(args: Sequence[str]) -> None:
    """Check the command line before jsonargparse reads it: YAML files given as option values
    (``--config x.yaml``, ``--data data.yaml``), and dicts written without a space after the
    colon, which YAML reads as one key (``{a:1}`` is ``{"a:1": null}``)."""
    for i, arg in enumerate(args):
        if arg.startswith("--") and "=" in arg:
            option, value = arg.split("=", 1)
        elif i > 0 and args[i - 1].startswith("--") and "=" not in args[i - 1]:
            option, value = args[i - 1], arg
        else:
            continue
        if value.endswith((".yaml", ".yml")) and os.path.isfile(value):
            check_yaml(Path(value).read_text(), value)
        elif value.startswith("{") and value.endswith("}"):
            try:
                loaded = yaml.safe_load(value)
            except yaml.YAMLError:
                loaded = None
            if isinstance(loaded, dict) and any(
                v is None and ":" in str(k) for k, v in loaded.items()
            ):
                fixed = (
                    "{"
                    + ", ".join(
                        str(k).replace(":", ": ", 1) if v is None else f"{k}: {v}"
                        for k, v in loaded.items()
                    )
                    + "}"
                )
                raise MidtrainError(
                    f"{option}: {value} is not a dict (YAML needs a space after each colon); "
                    f"write {option} '{fixed}' (quoted, for the shell)"
                )


def explain_dict_error(message: str) -> str | None:
    """One line for jsonargparse's Union dump when a dict-typed key got a string: the shell
    or YAML took ``{a:1}`` / ``{a:1,b:2}`` apart (braces expand, no space after a colon)."""
    if "Expected a <class 'dict'>" not in message:
        return None
    keys = re.findall(r'Parser key "([^"]+)"', message)
    given = re.search(r"Given value: (.*?)(?: - |$)", message)
    key = ".".join(k for k in keys if not k.startswith("--")) or "value"
    got = f" got {given.group(1).strip()!r};" if given else ""
    return (
        f"--{key}: expected a dict,{got} write it as YAML in quotes with a space after each "
        f"colon, e.g. --{key} '{{a: 1, b: 2}}'"
    )


_installed = False


def install() -> None:
    """Refuse duplicated keys in every YAML jsonargparse loads (idempotent)."""
    global _installed
    if _installed:
        return
    from jsonargparse import get_loader, set_loader

    previous = get_loader("yaml")

    def strict_yaml_load(text: str) -> Any:
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.YAMLError:
            return previous(text)  # not YAML: jsonargparse decides (e.g. a plain string)
        error = _duplicate_error(node, "YAML")
        if error is not None:
            raise error
        return previous(text)

    set_loader("yaml", strict_yaml_load, exceptions=(yaml.YAMLError,))
    _installed = True
