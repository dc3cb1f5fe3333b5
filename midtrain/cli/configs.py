"""``midtrain configs list | show | copy``: the shipped configs, by name."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass
from collections.abc import Sequence

from midtrain.configs import packaged_configs
from midtrain.errors import MidtrainError


def _shipped(name: str | Path) -> Path:
    """A shipped config file or folder by name (``pretrain/demo.yaml``, ``configs/pretrain``,
    ``all``); a one-line error naming what exists otherwise."""
    from midtrain.errors import MidtrainError

    root = packaged_configs()
    parts = Path(name).parts
    relative = Path(*parts[1:]) if parts and parts[0] == "configs" else Path(name)
    target = root if str(name) in ("all", "configs", "configs/") else root / relative
    if Path(name).is_absolute() or ".." in parts or not target.exists():
        kinds = ", ".join(sorted(p.name for p in root.iterdir() if p.is_dir()))
        raise MidtrainError(
            f"configs: no shipped config {str(name)!r}; see `midtrain configs "
            f"list` (kinds: {kinds}, or all)"
        )
    return target


def _summary(path: Path) -> str:
    """What a config is: its header comment's first paragraph, whole (it often continues on the
    next comment lines), up to an indented example command or a blank comment line."""
    text: list[str] = []
    for line in path.read_text().splitlines():
        body = line[1:] if line.startswith("#") else None
        if body is None or not body.strip() or body.startswith("   "):
            break
        text.append(body.strip())
    return " ".join(text)


def list_configs(width: int = 100) -> str:
    """Every shipped config by name, with its whole description, wrapped under itself."""
    import textwrap

    root = packaged_configs()
    names = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.yaml"))
    name_width = max(len(n) for n in names)
    indent = " " * (name_width + 4)
    lines = [f"ready-made configs in {root} (use as --config configs/<name> from any directory):"]
    for n in names:
        first = f"  {n:<{name_width}}  "
        wrapped = textwrap.wrap(  # a path in a description is never cut at its hyphens
            _summary(root / n), width, initial_indent=first, subsequent_indent=indent,
            break_on_hyphens=False,
        )  # fmt: skip
        lines += wrapped or [first.rstrip()]
    return "\n".join(lines)


def show_config(name: str) -> str:
    from midtrain.errors import MidtrainError

    path = _shipped(name)
    if not path.is_file():
        raise MidtrainError(f"configs: {name!r} is a folder; show takes one config file")
    return path.read_text()


def copy_configs(name: str, dest: str | Path) -> list[Path]:
    """Copy a shipped config (or a folder of them, or ``all``) out of the package. A file goes
    to ``dest`` (or into it, when it is a folder); a folder's files keep their names under
    ``dest``. Refuses to overwrite anything, before writing anything."""
    import shutil

    from midtrain.errors import MidtrainError

    source, into_dir = _shipped(name), str(dest).endswith(("/", "\\"))
    dest = Path(dest)
    if source.is_file():
        into_dir = into_dir or dest.is_dir()
        pairs = [(source, dest / source.name if into_dir else dest)]
    else:
        pairs = [(f, dest / f.relative_to(source)) for f in sorted(source.rglob("*.yaml"))]
    existing = [str(to) for _, to in pairs if to.exists()]
    if existing:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise MidtrainError(
            f"configs: {existing[0]} exists{more}; copy to a new place or remove it first"
        )
    for src, to in pairs:
        to.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, to)
    return [to for _, to in pairs]


CONFIGS_USAGE = """usage: midtrain configs list                 the ready-made configs, by name
       midtrain configs show <name>          print one
       midtrain configs copy <name> <dest>   copy a config (or a kind, e.g. pretrain, or all)
                                             out of the package, to edit it

A name is a path inside the shipped configs (pretrain/demo.yaml, configs/pretrain/demo.yaml).
Any --config takes such a name directly when no local file of that name exists."""


def configs_main(args: Sequence[str]) -> None:
    from midtrain.cli.configs import copy_configs, list_configs, show_config

    action, rest = (args[0], list(args[1:])) if args else ("", [])
    if action in ("-h", "--help", ""):
        print(CONFIGS_USAGE)
        if not action:
            raise MidtrainError("configs: give an action: list, show or copy")
    elif action == "list" and not rest:
        print(list_configs())
    elif action == "show" and len(rest) == 1:
        print(show_config(rest[0]), end="")
    elif action == "copy" and len(rest) == 2:
        for written in copy_configs(rest[0], rest[1]):  # dest as typed: a trailing / = folder
            print(f"written {written}")
    else:
        raise MidtrainError(
            f"configs: unknown or incomplete action {' '.join(args)!r}; see midtrain configs --help"
        )
