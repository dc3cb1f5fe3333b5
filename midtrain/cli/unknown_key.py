"""An unknown key, as the user reads it: which key, in which file and line (when a ``--config``
file holds it), and the closest valid key (``difflib`` over the keys the class accepts).

jsonargparse says ``Subcommand 'fit' does not accept option 'model.warmpu'`` or, inside a
``class_path`` (a Union), a many-line dump; ``unknown_key_error`` turns either into
``unknown key model.warmpu in x.yaml line 3; did you mean model.warmup?``."""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
from collections.abc import Sequence
from pathlib import Path

import yaml

_TOP = re.compile(r"does not accept option '([^']+)'")
_NESTED = re.compile(
    r'Parser key "([^"]+)".*?Problem with given class_path \'([^\']+)\': '
    r"Option '([^']+)' is not accepted"
)
_UNRECOGNIZED = re.compile(r"unrecognized arguments: --([\w.]+)")
_NESTED_ARG = re.compile(r"NestedArg\(key='([^']+)'")

# The sections MidtrainCLI adds (module:class), for the keys they accept.
SECTIONS = {
    "model": "midtrain.train.module:CausalLM",
    "trainer": "lightning.pytorch:Trainer",
    "checkpoint": "midtrain.train.callbacks.checkpoints:ModelCheckpoint",
    "throughput": "midtrain.train.callbacks.throughput:Throughput",
    "mixture_logging": "midtrain.train.callbacks.mixture:MixtureLogging",
    "preemption": "midtrain.train.callbacks.preemption:Preemption",
    "divergence": "midtrain.train.callbacks.divergence:DivergenceGuard",
    "summary": "midtrain.train.callbacks.summary:RunSummary",
}
TOP_KEYS = ["model", "data", "trainer", "ckpt_path", "fork", "fork_optimizer", "fork_data"]
TOP_KEYS += ["seed_everything", "config"]
TOP_KEYS += [k for k in SECTIONS if k not in TOP_KEYS]


def _parameters(target: str) -> list[str]:
    """The keyword arguments of a class, by ``module:Class`` or ``module.Class``."""
    module, _, name = target.replace(":", ".").rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return []
    names: list[str] = []
    for klass in inspect.getmro(cls):  # a subclass's **kwargs go to its bases (Trainer)
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        names += [p.name for p in params if p.name != "self" and p.kind == p.KEYWORD_ONLY]
        names += [p.name for p in params if p.name != "self" and p.kind == p.POSITIONAL_OR_KEYWORD]
    return list(dict.fromkeys(names))


def closest_key(key: str, class_path: str | None = None) -> str | None:
    """The valid key most like ``key`` (``model.warmpu`` -> ``model.warmup``), or None."""
    prefix, _, last = key.rpartition(".")
    head = prefix.split(".")[0] if prefix else ""
    target = class_path or SECTIONS.get(head)
    if not prefix:
        candidates = TOP_KEYS
    elif target is not None and "." not in prefix:
        candidates = _parameters(target)
    else:
        return None
    match = difflib.get_close_matches(last, candidates, n=1, cutoff=0.6)
    return f"{prefix}.{match[0]}" if match and prefix else (match[0] if match else None)


def _line_of(path: Path, key: str) -> int | None:
    """The 1-based line of a dotted key in a YAML file (through ``init_args``), or None."""
    try:
        node = yaml.compose(path.read_text(), Loader=yaml.SafeLoader)
    except (OSError, yaml.YAMLError):
        return None
    line = None
    for part in key.split("."):
        if not isinstance(node, yaml.MappingNode):
            return None
        items = {k.value: (k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode)}
        if part not in items and "init_args" in items:
            node = items["init_args"][1]
            items = (
                {k.value: (k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode)}
                if isinstance(node, yaml.MappingNode)
                else {}
            )
        if part not in items:
            return None
        key_node, node = items[part]
        line = key_node.start_mark.line + 1
    return line


def _where(key: str, argv: Sequence[str]) -> str:
    """`` in FILE line N`` for the last ``--config`` file holding the key (it wins), else
    `` (command line)`` when the command line gave it."""
    configs = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("--config", "-c")]
    configs += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    for config in reversed(configs):
        line = _line_of(Path(config), key)
        if line is not None:
            return f" in {config} line {line}"
    if any(a == f"--{key}" or a.startswith(f"--{key}=") or a.startswith(f"--{key}.") for a in argv):
        return " (command line)"
    return ""


def unknown_key_error(message: str, argv: Sequence[str] = ()) -> str | None:
    """One line for jsonargparse's unknown-key errors, or None for any other message."""
    class_path = None
    top = _TOP.search(message) or _UNRECOGNIZED.search(message)
    nested = _NESTED.search(message)
    if top:
        key = top.group(1)
    elif nested:
        parent, class_path, option = nested.groups()
        named = _NESTED_ARG.search(message)
        key = f"{parent}.{named.group(1) if named else option.split('.')[0]}"
    else:
        return None
    guess = closest_key(key, class_path)
    hint = f"; did you mean {guess}?" if guess and guess != key else "; see --help for the keys"
    return f"unknown key {key}{_where(key, argv)}{hint}"
