"""The ready-made configs shipped inside the package (``configs/`` in a checkout links here),
found by name from any directory, and strict YAML reading (duplicate keys are errors)."""

from __future__ import annotations

import os
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from midtrain.errors import MidtrainError


def packaged_configs() -> Path:
    """The configs shipped with the package (``configs/`` in a checkout links here)."""
    return Path(str(resources.files("midtrain") / "configs"))


def resolve_config(path: str | Path) -> Path:
    """A config path as given, or, when no such file exists, the shipped config of that name:
    ``configs/pretrain/demo.yaml`` and ``pretrain/demo.yaml`` both work from any directory."""
    given = Path(path)
    if given.exists():
        return given
    parts = given.parts
    relative = Path(*parts[1:]) if parts and parts[0] == "configs" else given
    shipped = packaged_configs() / relative
    return shipped if not given.is_absolute() and shipped.is_file() else given


def _duplicate(node: yaml.Node | None) -> tuple[str, int, int] | None:
    """(key, line, first line) of the first key given twice in one mapping, 1-based lines."""
    stack = [node] if node is not None else []
    while stack:
        node = stack.pop()
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                    line = key.start_mark.line + 1
                    if key.value in seen:
                        return key.value, line, seen[key.value]
                    seen[key.value] = line
                stack += [key, value]
        elif isinstance(node, yaml.SequenceNode):
            stack += node.value
    return None


def _duplicate_error(node: yaml.Node | None, where: str) -> MidtrainError | None:
    dup = _duplicate(node)
    if dup is None:
        return None
    key, line, first = dup
    return MidtrainError(
        f"{where}:{line}: key {key!r} is given twice (first at line {first}); "
        "a YAML mapping takes each key once: remove one"
    )


def load_yaml(
    text: str,
    where: str = "YAML",
    construct: Callable[[str], Any] = yaml.safe_load,
    *,
    not_yaml_to_construct: bool = False,
) -> Any:
    """midtrain's one strict YAML reader: a key given twice in a mapping is an error (not "the
    last one wins"), and a syntax error names ``where``, the line and the column, each as a
    one-line ``MidtrainError``. ``construct`` builds the value from the checked text (the
    ``midtrain`` command passes jsonargparse's loader, which reads ``1e-3`` as a float);
    ``not_yaml_to_construct``: text that is not YAML goes to ``construct`` unchecked (a
    command-line value: jsonargparse keeps it as a string)."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        if not_yaml_to_construct:
            return construct(text)
        raise _syntax_error(e, where) from None
    error = _duplicate_error(node, where)
    if error is not None:
        raise error
    return construct(text)


def _syntax_error(e: yaml.YAMLError, where: str) -> MidtrainError:
    if not isinstance(e, yaml.MarkedYAMLError):
        return MidtrainError(f"{where}: YAML error: {e}")
    mark = e.problem_mark or e.context_mark
    at = f"{where}:{mark.line + 1}:{mark.column + 1}" if mark else where
    context = (
        f" ({e.context} at line {e.context_mark.line + 1})"
        if (e.context and e.context_mark and e.context_mark is not mark)
        else ""
    )
    return MidtrainError(f"{at}: YAML syntax error: {e.problem}{context}")


def load_yaml_file(path: str | os.PathLike) -> Any:
    """``load_yaml`` of a file, its errors naming the file."""
    return load_yaml(Path(path).read_text(), str(path))
