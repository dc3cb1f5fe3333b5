"""Under a real SLURM scheduler: a `midtrain fit` job preempted by a signal writes `last.ckpt`,
is requeued (the same job id, `SLURM_RESTART_COUNT` 1), resumes by itself with
`--ckpt_path last_or_new` and ends bitwise equal to an uninterrupted run, with one task and
with two (`srun`, DDP over gloo on the CPU).

Needs a cluster: `tox -e slurm` starts a one-node one on localhost with `.ci/slurm-setup` (as
root) and runs this file; elsewhere it is skipped, saying why."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from tests.test_kill_resume import MAX_STEPS, config, finish, midtrain

REPO = Path(__file__).resolve().parents[1]
AFTER = 3  # the signal is sent once the step-3 checkpoint exists
JOB_TIMEOUT = 900  # seconds for a job with its requeue (this machine's two cores are shared)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("sbatch") is None,
        reason="sbatch not found: SLURM is not installed here (`tox -e slurm` installs and "
        "starts a one-node cluster with .ci/slurm-setup, as root)",
    ),
]

SCRIPT = """#!/bin/bash
#SBATCH --job-name=midtrain-test
#SBATCH --nodes=1
#SBATCH --ntasks-per-node={tasks}
#SBATCH --time=15
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output={log}
echo "job $SLURM_JOB_ID: start, SLURM_RESTART_COUNT=${{SLURM_RESTART_COUNT:-0}}"
srun {python} -m midtrain fit --config {config} --ckpt_path last_or_new
code=$?
echo "job $SLURM_JOB_ID: srun exit code $code"
if [ $code -eq 143 ]; then scontrol requeue "$SLURM_JOB_ID"; fi
exit $code
"""


@pytest.fixture(scope="module")
def cluster() -> None:
    """Skips, saying why, unless a SLURM controller answers with a node that can run jobs."""
    command = ["sinfo", "--noheader", "--format=%T"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"no SLURM cluster: `{' '.join(command)}`: {e}; run `bash .ci/slurm-setup`")
    states = done.stdout.split()
    if done.returncode or not any(s.rstrip("*~#").startswith(("idle", "mix")) for s in states):
        said = (done.stderr or done.stdout).strip() or "no nodes"
        pytest.skip(
            f"no SLURM node can run a job: `{' '.join(command)}` -> {said!r}; "
            "run `bash .ci/slurm-setup`"
        )


@pytest.fixture(scope="module")
def references(
    tmp_path_factory: pytest.TempPathFactory, builtin_store: Path
) -> Iterator[Callable[[int], Path]]:
    """Uninterrupted runs without SLURM, one per number of processes, made on demand."""
    made: dict[int, Path] = {}
    root = tmp_path_factory.mktemp("slurm-refs")

    def get(devices: int) -> Path:
        if devices not in made:
            cfg = config(root, builtin_store, f"ref-{devices}", 0, 1, devices, 0.0)
            finish(midtrain("fit", "--config", str(cfg)))
            made[devices] = root / f"ref-{devices}" / "checkpoints" / "last.ckpt"
        return made[devices]

    yield get


def job_fields(job: str) -> dict[str, str]:
    out = subprocess.run(
        ["scontrol", "show", "job", job, "--oneliner"], capture_output=True, text=True, timeout=30
    ).stdout
    return dict(f.split("=", 1) for f in out.split() if "=" in f)


def wait_for(what: str, ready: Callable[[], bool], job: str, log: Path, timeout: float) -> None:
    """Polls ``ready()`` until it is true; fails with the job's log if the job ends first."""
    deadline = time.monotonic() + timeout
    while not ready():
        state = job_fields(job).get("JobState", "?")
        if state not in ("PENDING", "RUNNING", "REQUEUED", "COMPLETING") or (
            time.monotonic() > deadline
        ):
            tail = log.read_text()[-4000:] if log.exists() else "(no log)"
            pytest.fail(f"job {job} is {state} while waiting for {what}:\n{tail}")
        time.sleep(0.2)


def tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """The weights and the optimizer state of a checkpoint, by name."""
    c = torch.load(ckpt, map_location="cpu", weights_only=True)
    out = {f"state_dict.{k}": v for k, v in c["state_dict"].items()}
    for i, opt in enumerate(c["optimizer_states"]):
        for p, s in opt["state"].items():
            out.update({f"optimizer.{i}.{p}.{k}": v for k, v in s.items()})
    return out


@pytest.mark.parametrize(
    "sig,tasks,requeued_by",
    [
        pytest.param("USR1", 1, "midtrain", id="USR1-1task"),
        pytest.param("USR1", 2, "midtrain", id="USR1-2tasks-ddp"),
        pytest.param("TERM", 1, "script", id="TERM-1task"),
    ],
)
def test_preempted_job_is_requeued_and_resumes_bitwise(
    cluster: None,
    references: Callable[[int], Path],
    tmp_path: Path,
    builtin_store: Path,
    sig: str,
    tasks: int,
    requeued_by: str,
) -> None:
    cfg = config(tmp_path, builtin_store, "run", 0, 1, tasks, 0.5)
    log, ckpts = tmp_path / "job.log", tmp_path / "run" / "checkpoints"
    script = tmp_path / "job.sh"
    script.write_text(SCRIPT.format(tasks=tasks, log=log, python=sys.executable, config=cfg))
    # the master port comes from the job id (Lightning's SLURMEnvironment), as for a user
    env = {k: v for k, v in os.environ.items() if k != "MASTER_PORT"}
    env["PYTHONPATH"] = str(REPO)  # the job imports this checkout and tests.helpers.SlowDown
    job = subprocess.run(
        ["sbatch", "--parsable", str(script)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()
    try:
        marker = ckpts / f"epoch=0-step={AFTER}.ckpt"
        wait_for(marker.name, marker.exists, job, log, JOB_TIMEOUT)
        subprocess.run(["scancel", f"--signal={sig}", job], check=True, timeout=60)
        wait_for(
            "the end of the requeued job",
            lambda: job_fields(job).get("JobState") == "COMPLETED",
            job,
            log,
            JOB_TIMEOUT,
        )
    finally:
        subprocess.run(["scancel", job], capture_output=True, timeout=60)  # a failed test's job
    fields, out = job_fields(job), log.read_text()

    # preempted: a checkpoint after step AFTER, exit code 143
    step = int(re.findall(rf"preempted by SIG{sig} after optimizer step (\d+)", out)[0])
    assert AFTER <= step < MAX_STEPS, out
    assert f"fit: preempted at step {step}/{MAX_STEPS}" in out, out  # the run summary
    # requeued: the same job ran its script again
    assert fields["Restarts"] == "1" and fields["ExitCode"] == "0:0", fields
    assert f"job {job}: start, SLURM_RESTART_COUNT=0" in out
    assert f"job {job}: start, SLURM_RESTART_COUNT=1" in out
    if requeued_by == "midtrain":  # SLURM auto-requeue: rank 0 requeues as it exits
        assert f"midtrain: requeued SLURM job {job};" in out, out
    else:  # the signal is not the requeue signal: the job script requeues on exit code 143
        assert "midtrain: requeued" not in out and f"job {job}: srun exit code 143" in out, out
    # resumed by itself from that checkpoint, to the end
    assert out.count("NO CHECKPOINT in") == tasks  # the first run only (every rank says it)
    assert f"resuming from {ckpts / 'last.ckpt'} (optimizer step {step})" in out, out
    assert f"job {job}: srun exit code 0" in out and "Traceback" not in out, out
    assert not list((tmp_path / "run").glob("hpc_ckpt_*")), "a second copy of the checkpoint"

    ref = tensors(references(tasks))
    got = tensors(ckpts / "last.ckpt")
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == MAX_STEPS
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k


def step_started(job: str) -> bool:
    """Whether the job's first step (``srun midtrain fit``) runs: its tasks are starting."""
    out = subprocess.run(
        ["squeue", "--steps", "--noheader", f"--jobs={job}", "--format=%i"],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    return f"{job}.0" in out.split()


@pytest.mark.parametrize("tasks", [1, 2], ids=["1task", "2tasks-ddp"])
def test_usr1_while_the_job_starts_requeues_and_the_job_finishes(
    cluster: None, tmp_path: Path, builtin_store: Path, tasks: int
) -> None:
    """SLURM's SIGUSR1 while `midtrain fit` is still starting (importing torch, reading its
    config): no kill (exit 138, FAILED), but exit 143 with nothing written, and the requeue of
    SLURM auto-requeue (rank 0 as it exits); the requeued job then runs to the end."""
    cfg = config(tmp_path, builtin_store, "run", 0, 1, tasks, 0.0)
    log, ckpts = tmp_path / "job.log", tmp_path / "run" / "checkpoints"
    script = tmp_path / "job.sh"
    script.write_text(SCRIPT.format(tasks=tasks, log=log, python=sys.executable, config=cfg))
    env = {k: v for k, v in os.environ.items() if k != "MASTER_PORT"}
    env["PYTHONPATH"] = str(REPO)
    job = subprocess.run(
        ["sbatch", "--parsable", str(script)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()
    try:
        wait_for("the job step", lambda: step_started(job), job, log, JOB_TIMEOUT)
        time.sleep(1.0)  # the tasks run Python by now, and import torch for seconds more
        subprocess.run(["scancel", "--signal=USR1", job], check=True, timeout=60)
        wait_for(
            "the end of the requeued job",
            lambda: job_fields(job).get("JobState") == "COMPLETED",
            job,
            log,
            JOB_TIMEOUT,
        )
    finally:
        subprocess.run(["scancel", job], capture_output=True, timeout=60)  # a failed test's job
    fields, out = job_fields(job), log.read_text()

    assert "midtrain: received SIGUSR1 while starting" in out, out  # hit during the start
    assert "after optimizer step" not in out, out  # not during training
    if tasks == 1:  # alone: exits at once, before anything is written
        assert "exiting with code 143 without writing anything" in out, out
    else:  # the ranks agree in Preemption.setup, before training
        assert "preempted by SIGUSR1 before training: nothing to save" in out, out
    assert fields["Restarts"] == "1" and fields["ExitCode"] == "0:0", fields
    assert f"midtrain: requeued SLURM job {job};" in out, out
    assert f"job {job}: start, SLURM_RESTART_COUNT=1" in out
    # the requeued job found no checkpoint (the first one wrote none), and ran to the end
    assert "resuming from" not in out and f"job {job}: srun exit code 0" in out, out
    assert "Traceback" not in out, out
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == MAX_STEPS
