"""YAML as the ``midtrain`` command reads it: a duplicated key is an error (not "last wins"), a
syntax error names the file and line, a quoted string stays a string, and the usual
command-line dict slip gets one line.

``install()`` makes midtrain's one strict YAML reader (``midtrain.configs.load_yaml``)
jsonargparse's loader (its public ``set_loader`` hook), so it applies to every YAML the command
reads: ``--config`` files, files given for nested keys, and YAML values on the command line."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import yaml

from midtrain.configs import load_yaml, load_yaml_file
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
            load_yaml_file(value)
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
    # the first value given; jsonargparse < 4.50 runs the next "Given value type:" on without " - "
    given = re.search(r"Given value: (.*?)(?: - | Given value|$)", message)
    key = ".".join(k for k in keys if not k.startswith("--")) or "value"
    got = f" got {given.group(1).strip()!r};" if given else ""
    return (
        f"--{key}: expected a dict,{got} write it as YAML in quotes with a space after each "
        f"colon, e.g. --{key} '{{a: 1, b: 2}}'"
    )


_installed = False

# The strings read from YAML that a second reading would change ("Question: {q}" is a mapping
# when read again), by id. jsonargparse reads a string that an ``Any``-typed key holds (``Any``,
# ``dict[str, Any]``: a callback's init_args, model.model_config, the study's sft.targets) as
# YAML again each time it checks, instantiates or dumps the config; the loader hands these back
# as they are. By identity, not by value: the same text typed on the command line as a value
# of its own has not been read yet, and is read as YAML, as every command-line value is.
_already_read: dict[int, str] = {}


def _remember_strings(value: Any, reread: Callable[[str], Any]) -> Any:
    if isinstance(value, dict):
        for item in value.values():
            _remember_strings(item, reread)
    elif isinstance(value, list):
        for item in value:
            _remember_strings(item, reread)
    elif type(value) is str:
        try:
            changes = reread(value) != value
        except yaml.YAMLError:
            changes = False  # not YAML: jsonargparse keeps it as it is
        if changes:
            _already_read[id(value)] = value
    return value


def install() -> None:
    """Make ``load_yaml`` the loader of every YAML jsonargparse reads (idempotent)."""
    global _installed
    if _installed:
        return
    from jsonargparse import get_loader, set_loader

    previous = get_loader("yaml")  # jsonargparse's own: its number and date rules

    def strict_yaml_load(text: str) -> Any:
        if _already_read.get(id(text)) is text:
            return text  # a string of a document read before: it stays a string
        value = load_yaml(text, "YAML", previous, not_yaml_to_construct=True)
        return _remember_strings(value, previous)

    set_loader("yaml", strict_yaml_load, exceptions=(yaml.YAMLError,))
    _installed = True
