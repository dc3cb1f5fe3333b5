"""Running a study's stages as subprocesses, each once: a finished stage records its config
fingerprint in ``done.json`` and is skipped on a re-run only while that fingerprint still holds.

Fingerprint of a stage = sha256 of (its ``midtrain`` argv, the parsed contents of every config
file the argv stacks, the fingerprint of its parent stage). A changed stage is refused with one
line naming the changed keys (``--rerun_changed`` re-runs it and the stages that start from it);
nothing is run or removed before every stage has been checked.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from midtrain.checkpoint.layout import LAST, run_checkpoints
from midtrain.configs import load_yaml_file, packaged_configs
from midtrain.errors import MidtrainError
from midtrain.study.plan import Stage

DONE = "done.json"  # a finished stage: its fingerprint and metadata
STARTED = "fingerprint.json"  # a started stage: the fingerprint it was started with
LOG = "stage.log"


def stage_inputs(stage: Stage, parent_fingerprint: str | None) -> dict[str, Any]:
    """What a stage's result depends on: its argv, the contents of the config files it stacks
    (parsed, so comments and layout do not count) and its parent stage's fingerprint."""
    configs, argv = {}, []
    for prev, arg in zip(["", *stage.args], stage.args, strict=False):
        if prev == "--config":  # named as the user names it: stable across installs
            configs[_short(arg)] = load_yaml_file(arg) or {}
            arg = _short(arg)
        argv.append(arg)
    return {"argv": argv, "configs": configs, "parent": parent_fingerprint}


def fingerprint(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, dict):
        return {prefix: node}
    out: dict[str, Any] = {}
    for k, v in node.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _short(path: str) -> str:
    """A config path as a user would name it: ``configs/...`` for a shipped config, relative
    to the working directory when below it, else as it is."""
    p = Path(path).resolve()
    for base, prefix in ((packaged_configs().resolve(), Path("configs")), (Path.cwd(), Path())):
        if p.is_relative_to(base):
            return str(prefix / p.relative_to(base))
    return path


def changed_keys(old: dict[str, Any], new: dict[str, Any], parent: str | None) -> list[str]:
    """Human names of what differs between two ``stage_inputs``."""
    if not old:
        return ["nothing recorded: finished by an older midtrain"]
    out = []
    if old.get("parent") != new.get("parent"):
        out.append(f"its parent stage '{parent}'")

    def options(argv: list[str]) -> dict[str, str]:
        opts: dict[str, str] = {}
        for a in argv:
            if a.startswith("--") and a != "--config":
                key, _, value = a[2:].partition("=")
                opts[key] = opts.get(key, "") + "|" + value  # a key may repeat (callbacks)
        return opts

    a, b = options(old.get("argv", [])), options(new.get("argv", []))
    out += [f"--{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    old_files, new_files = old.get("configs", {}), new.get("configs", {})
    if list(old_files) != list(new_files):
        out.append("the --config files")
    for path in new_files:
        if path in old_files:
            fa, fb = _flat(old_files[path]), _flat(new_files[path])
            out += [f"{path}: {k}" for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]
    return out or ["its inputs"]


def _recorded(stage: Stage) -> dict[str, Any] | None:
    """The inputs a stage was finished (or, interrupted after a checkpoint, started) with."""
    done, started = stage.directory / DONE, stage.directory / STARTED
    for path in (done, started):
        if path == started and not (run_checkpoints(stage.directory) / LAST).is_file():
            continue
        if path.is_file():
            return json.loads(path.read_text()).get("inputs", {})
    return None


def check_stages(
    stages: list[Stage], rerun_changed: bool
) -> tuple[dict[str, dict[str, Any]], list[Stage]]:
    """Every stage's inputs now, and the stages whose recorded inputs differ. Refuses (one
    line, nothing touched) unless ``rerun_changed``."""
    inputs: dict[str, dict[str, Any]] = {}
    stale = []
    for stage in stages:
        if stage.kind == "prepare":
            continue  # prepare itself reuses unchanged domains
        parent = fingerprint(inputs[stage.parent]) if stage.parent else None
        inputs[stage.name] = now = stage_inputs(stage, parent)
        old = _recorded(stage)
        if old is not None and fingerprint(old) != fingerprint(now):
            stale.append(stage)
            if not rerun_changed:
                keys = changed_keys(old, now, stage.parent)
                raise MidtrainError(
                    f"stage '{stage.name}' in {stage.directory} was run with another "
                    f"config (changed: {', '.join(keys)}); pass --rerun_changed to re-run it and "
                    "the stages that start from it, or restore the config"
                )
    return inputs, stale


def _run(argv: list[str], log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as f:
        f.write(f"\n$ midtrain {shlex.join(argv)}\n")
        f.flush()
        proc = subprocess.run(
            [sys.executable, "-m", "midtrain", *argv],
            stdout=f,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    if proc.returncode != 0:
        tail = log.read_text().strip().splitlines()[-1:] or [""]
        raise MidtrainError(f"stage failed (exit {proc.returncode}): {tail[0]} (log: {log})")


def run_stage(stage: Stage, inputs: dict[str, Any] | None, stale: bool = False) -> str:
    """Run one stage unless done with these inputs; returns what happened. A stale stage's
    directory is removed first (``--rerun_changed``)."""
    if stage.kind == "prepare":
        _run(["prepare", *stage.args], stage.directory / "prepare.log")
        return "ran"
    assert inputs is not None
    done = stage.directory / DONE
    if stale:
        shutil.rmtree(stage.directory)
    elif done.is_file():
        return "done already"
    if stage.kind == "score":  # an evaluation (``midtrain validate``): nothing to resume
        what = "re-ran (config changed)" if stale else "ran"
        return _finish(stage, inputs, ["validate", *stage.args], what)
    args = ["fit", *stage.args]
    if any(run_checkpoints(stage.directory).glob("*.ckpt")):
        # interrupted: continue from its newest loadable checkpoint (last.ckpt, or a
        # switch/fork-point checkpoint saved before the first last.ckpt)
        args += ["--ckpt_path", "last"]
        what = "resumed"
    else:
        if stage.fork is not None:
            if not stage.fork.is_file():
                raise MidtrainError(f"{stage.name}: fork point {stage.fork} is missing")
            args += ["--fork", str(stage.fork)]
        what = "re-ran (config changed)" if stale else "ran"
    return _finish(stage, inputs, args, what)


def _finish(stage: Stage, inputs: dict[str, Any], argv: list[str], what: str) -> str:
    """Run the stage's command, recording what it was started with and, once done, done.json."""
    record = {"stage": stage.name, "fingerprint": fingerprint(inputs), "inputs": inputs}
    stage.directory.mkdir(parents=True, exist_ok=True)
    (stage.directory / STARTED).write_text(json.dumps(record, default=str))
    _run(argv, stage.directory / LOG)
    (stage.directory / DONE).write_text(
        json.dumps({**record, "finished": time.time(), "meta": stage.meta}, default=str)
    )
    return what
