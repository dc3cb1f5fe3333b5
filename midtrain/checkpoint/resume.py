"""Which checkpoint a resume starts from: what ``--ckpt_path last`` (and ``last_or_new``) means
for a run directory, read before anything is checked or written. What the command then does
with the checkpoint, and what it refuses, is ``midtrain.checkpoint.plan``'s."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from midtrain.checkpoint.files import check_checkpoint, loadable, run_checkpoints_in
from midtrain.checkpoint.layout import LAST


def resume_checkpoint(directory: Path, say: Callable[[str], None]) -> Path | None:
    """The newest loadable checkpoint of a run (by optimizer step; ``last.ckpt`` wins a tie),
    saying which and why; corrupt ones are reported and skipped. None when there is none."""
    found: list[tuple[int, bool, float, Path]] = []
    for path in run_checkpoints_in(directory):
        meta, why = loadable(path)
        if meta is None:
            say(f"midtrain: skipping {path}: not loadable ({why})")
            continue
        found.append((int(meta["global_step"]), path.name == LAST, path.stat().st_mtime, path))
    if not found:
        return None
    step, _, _, path = max(found)
    say(
        f"midtrain: resuming from {path} (optimizer step {step}), the newest loadable checkpoint "
        f"of {directory}"
    )
    return path


@dataclass
class ResumePlan:
    """What ``--ckpt_path`` resolves to, read before anything is checked or written.

    ``error`` and ``lines`` are held back until the config's own checks have passed: the error
    is raised then, the lines (which checkpoint, which ones were skipped) said once training
    may write."""

    ckpt_path: str | None
    step: int | None = None  # the optimizer step of the checkpoint resumed from
    error: str | None = None
    lines: list[str] = field(default_factory=list)
    metadata: dict[str, dict[str, Any]] = field(default_factory=dict)  # per path, read once

    def checkpoint_metadata(self, path: str, what: str) -> dict[str, Any]:
        """A checkpoint's metadata (read once per path), or a one-line error naming it."""
        if str(path) not in self.metadata:
            self.metadata[str(path)] = check_checkpoint(path, what)
        return self.metadata[str(path)]


def plan_resume(ckpt_path: str | None, directory: Path, subcommand: str | None) -> ResumePlan:
    """Resolve ``last`` (the newest loadable checkpoint in ``directory``; an error when there is
    none) and ``last_or_new`` (the same, or a new run for ``fit``) to a file; read its metadata."""
    plan = ResumePlan(ckpt_path)
    if ckpt_path in ("last", "last_or_new"):
        found = resume_checkpoint(directory, plan.lines.append)
        if found is not None:
            plan.ckpt_path = str(found)
        elif ckpt_path == "last":
            plan.error = (
                f"ckpt_path: last: no checkpoint in {directory}; start without "
                "--ckpt_path, or use --ckpt_path last_or_new"
            )
        elif subcommand != "fit":
            plan.error = "ckpt_path: last_or_new is for fit only"
        else:
            plan.ckpt_path = None
            plan.lines.append(
                f"midtrain: NO CHECKPOINT in {directory}: starting a new run "
                "(--ckpt_path last_or_new)"
            )
    if plan.ckpt_path and Path(str(plan.ckpt_path)).exists():
        meta, _ = loadable(Path(str(plan.ckpt_path)))
        if meta is not None:
            plan.metadata[str(plan.ckpt_path)] = meta
            plan.step = int(meta["global_step"])
    return plan
