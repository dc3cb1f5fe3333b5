"""Fault tolerance: preemption signals, atomic checkpoints, the divergence guard, strict resume,
forks after a switch, TensorBoard purge on resume, and one-line errors for bad resumes."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.plugins.environments import SLURMEnvironment

from midtrain.checkpoint.atomic import TEMP_MARK, AtomicCheckpointIO, remove_stale_temps
from midtrain.checkpoint.resume import resume_checkpoint
from midtrain.cli import main
from midtrain.data import contract
from midtrain.train._lightning import slurm_requeue_signal
from midtrain.train.callbacks.mixture import MixtureSwitch
from midtrain.train.callbacks.preemption import EXIT_PREEMPTED, slurm_job_id
from tests.conftest import needs_non_root, read_only_directory
from tests.helpers import RecordDomains
from tests.test_bad_input import Run, error_line, run_bad
from tests.test_bad_input import run as run  # noqa: F401  (the fixture: a finished 2-step run)
from tests.test_kill_resume import MAX_STEPS, SWITCH, config, finish, midtrain, weights
from tests.test_midtraining import run as train
from tests.test_training import fit_config, scalars

REPO = Path(__file__).resolve().parents[1]


def assert_equal_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def no_temps(*dirs: Path) -> None:
    for d in dirs:
        assert not [p for p in d.rglob("*") if TEMP_MARK in p.name], d


# -- preemption signals ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory, builtin_store: Path) -> Any:
    """Uninterrupted reference runs, one per (num_workers, accumulation), made on demand."""
    made: dict[tuple[int, int], Path] = {}
    root = tmp_path_factory.mktemp("refs")

    def get(num_workers: int, accumulation: int) -> Path:
        if (num_workers, accumulation) not in made:
            cfg = config(
                root,
                builtin_store,
                f"ref-{num_workers}-{accumulation}",
                num_workers,
                accumulation,
                1,
                0.0,
            )
            finish(midtrain("fit", "--config", str(cfg)))
            made[num_workers, accumulation] = root / f"ref-{num_workers}-{accumulation}"
        return made[num_workers, accumulation]

    return get


@pytest.mark.parametrize(
    "sig,group,num_workers,accumulation,after",
    [
        pytest.param("SIGTERM", True, 2, 2, 6, id="SIGTERM-group-workers2-acc2-after-switch"),
        pytest.param("SIGUSR1", False, 0, 1, 3, id="SIGUSR1-main-workers0-before-switch"),
        pytest.param(
            "SIGTERM",
            False,
            0,
            1,
            6,
            id="SIGTERM-main-workers0-after-switch",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            "SIGTERM",
            True,
            2,
            1,
            3,
            id="SIGTERM-group-workers2-before-switch",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            "SIGUSR1",
            True,
            2,
            2,
            6,
            id="SIGUSR1-group-workers2-after-switch",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            "SIGTERM",
            False,
            2,
            2,
            3,
            id="SIGTERM-main-workers2-acc2-before",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_signal_checkpoints_the_step_and_resumes_bitwise(
    tmp_path: Path,
    builtin_store: Path,
    references: Any,
    sig: str,
    group: bool,
    num_workers: int,
    accumulation: int,
    after: int,
) -> None:
    ref = references(num_workers, accumulation)
    cfg = config(tmp_path, builtin_store, "run", num_workers, accumulation, 1, 0.3)
    ckpts = tmp_path / "run" / "checkpoints"
    # checkpoints every 3 steps: the preemption checkpoint is told apart by its step
    proc = midtrain("fit", "--config", str(cfg), "--checkpoint.every_n_train_steps", "3")
    marker = ckpts / f"epoch=0-step={after}.ckpt"
    deadline = time.monotonic() + 300
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    number = getattr(signal, sig)
    (os.killpg if group else os.kill)(proc.pid, number)
    time.sleep(0.1)
    (os.killpg if group else os.kill)(proc.pid, number)  # a second signal changes nothing
    _, err = proc.communicate(timeout=300)
    err = err.decode()
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    line = next(ln for ln in err.splitlines() if "preempted by" in ln)
    step = int(line.split("after optimizer step ")[1].split(":")[0])
    assert after <= step < MAX_STEPS and f"preempted by {sig}" in line
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == step
    assert "Traceback" not in err
    assert f"fit: preempted at step {step}/{MAX_STEPS}" in err  # the run summary
    assert (
        f"resume:     midtrain fit --config {tmp_path / 'run' / 'config.yaml'} --ckpt_path last"
        in err
    )
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "preempted"
    no_temps(ckpts)

    finish(midtrain("fit", "--config", str(cfg), "--ckpt_path", "last"))
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == MAX_STEPS
    assert_equal_weights(ref / "checkpoints" / "last.ckpt", ckpts / "last.ckpt")


START_STEPS = SWITCH + 1  # short runs: a start, then the switch and one step after it


@pytest.mark.parametrize(
    "sig,at,devices,rank",
    [
        # external, right after launch: Python and torch are still being imported
        pytest.param("SIGUSR1", "launch", 1, None, id="USR1-right-after-launch"),
        # while the command builds its objects from the config (a callback's __init__)
        pytest.param("SIGTERM", "init", 1, None, id="TERM-reading-the-config"),
        # in Lightning's setup: Trainer.fit runs, the run directory is not written yet
        pytest.param("SIGUSR1", "setup", 1, None, id="USR1-during-setup"),
        # config.yaml, hparams.yaml and events written, training not started
        pytest.param("SIGTERM", "on_fit_start", 1, None, id="TERM-run-dir-written"),
        # in the sanity check (validation before training), where Lightning's handler was
        pytest.param("SIGTERM", "sanity_check", 1, None, id="TERM-sanity-check"),
        # DDP x2, only rank 1 signalled: both ranks stop together, none waits in a collective
        pytest.param("SIGUSR1", "setup", 2, 1, id="USR1-during-setup-ddp2-rank1-only"),
    ],
)
def test_signal_while_starting_exits_143_and_the_run_then_completes(
    tmp_path: Path, builtin_store: Path, sig: str, at: str, devices: int, rank: int | None
) -> None:
    cfg = config(tmp_path, builtin_store, "run", 0, 1, devices, 0.0)
    run_dir, steps = tmp_path / "run", ["--trainer.max_steps", str(START_STEPS)]
    signal_self = ["--trainer.callbacks+=tests.helpers.SignalSelf"]
    signal_self += [f"--trainer.callbacks.signal={sig}", f"--trainer.callbacks.at={at}"]
    signal_self += [] if rank is None else [f"--trainer.callbacks.rank={rank}"]
    if at == "sanity_check":
        steps += ["--trainer.num_sanity_val_steps", "1", "--trainer.limit_val_batches", "1.0"]
    args = ["fit", "--config", str(cfg), *steps, "--ckpt_path", "last_or_new"]
    proc = midtrain(*args, *([] if at == "launch" else signal_self))
    if at == "launch":
        time.sleep(0.3)
        os.kill(proc.pid, getattr(signal, sig))
    _, err = proc.communicate(timeout=300)  # a rank left in a collective would hang here
    err = err.decode()
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    if at in ("launch", "init"):  # alone, nothing written yet: exits at once
        assert f"midtrain: received {sig} while starting; nothing trained yet: exiting" in err
        assert not run_dir.exists()
    else:  # stopped where every rank agrees, nothing trained: no checkpoint, no summary
        name = sig if rank in (None, 0) else "a preemption signal (another rank)"
        assert f"preempted by {name} before training: nothing to save" in err, err[-3000:]
        assert not (run_dir / "checkpoints").exists() and not (run_dir / "summary.json").exists()
        assert (run_dir / "config.yaml").exists() == (at in ("on_fit_start", "sanity_check"))
        for written in ("config.yaml", "hparams.yaml"):  # whole, where written
            if (run_dir / written).exists():
                assert yaml.safe_load((run_dir / written).read_text())
    if at in ("init", "sanity_check") or devices > 1:
        return  # left as after "launch", "setup" or "on_fit_start", whose runs are completed
    # the requeued job's command: a new run (no checkpoint), to its end
    proc = midtrain(*args)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-3000:]
    assert "NO CHECKPOINT in" in err.decode()
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == START_STEPS
    no_temps(run_dir)


def test_workers_ignore_preemption_signals() -> None:
    # what a DataLoader worker runs first: the signals are left to the main process
    before = {s: signal.getsignal(getattr(signal, s)) for s in contract.WORKER_IGNORED_SIGNALS}
    try:
        contract.ignore_preemption_signals(0)
        for s in contract.WORKER_IGNORED_SIGNALS:
            assert signal.getsignal(getattr(signal, s)) is signal.SIG_IGN
    finally:
        for s, h in before.items():
            signal.signal(getattr(signal, s), h)


SLURM_TASK = {  # what `srun` sets for one task (tests/test_slurm.py runs the real thing)
    "SLURM_JOB_ID": "42",
    "SLURM_JOB_NAME": "pretrain",
    "SLURM_NTASKS": "1",
    "SLURM_NTASKS_PER_NODE": "1",
    "SLURM_NNODES": "1",
    "SLURM_NODELIST": "localhost",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
}


def test_preemption_requeues_where_lightning_sees_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    def requeue_signal(**kwargs: Any) -> signal.Signals | None:
        trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, **kwargs)
        return slurm_requeue_signal(trainer)

    assert requeue_signal() is None  # not under SLURM
    for k, v in SLURM_TASK.items():
        monkeypatch.setenv(k, v)
    assert requeue_signal() == signal.SIGUSR1 and slurm_job_id() == "42"
    assert requeue_signal(plugins=[SLURMEnvironment(auto_requeue=False)]) is None
    monkeypatch.setenv("SLURM_JOB_NAME", "interactive")  # salloc, srun --pty bash: SLURM hidden
    assert requeue_signal() is None
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "41")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert slurm_job_id() == "41_3"  # an array task is requeued by its own id


@pytest.mark.parametrize(
    "env,devices,says",
    [
        ({"SLURM_NTASKS": "2"}, "2", "use --ntasks-per-node=2"),  # srun -n 2
        ({"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2"}, "1", "set --trainer.devices 2"),
    ],
)
def test_slurm_task_layout_lightning_refuses_is_one_line(
    run: Run,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    env: dict[str, str],
    devices: str,
    says: str,
) -> None:
    for k, v in {**SLURM_TASK, **env}.items():
        monkeypatch.setenv(k, v)
    if "SLURM_NTASKS_PER_NODE" not in env:
        monkeypatch.delenv("SLURM_NTASKS_PER_NODE")
    args = ["fit", "--config", str(run.config), "--trainer.devices", devices]
    line = run_bad(capsys, [*args, "--trainer.default_root_dir", str(tmp_path / "r")], [tmp_path])
    assert says in line, line


# -- atomic checkpoints ------------------------------------------------------------------------


def test_atomic_save_ignores_tmpdir_and_never_leaves_a_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other_fs = Path("/dev/shm") / f"midtrain-test-{os.getpid()}"
    other_fs.mkdir(exist_ok=True)
    monkeypatch.setenv("TMPDIR", str(other_fs))
    try:
        io = AtomicCheckpointIO()
        path = tmp_path / "checkpoints" / "last.ckpt"
        io.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, path)
        good = path.read_bytes()

        class Unpicklable:
            def __reduce__(self) -> Any:
                raise RuntimeError("disk full")  # a save that dies half-way

        with pytest.raises(RuntimeError, match="disk full"):
            io.save_checkpoint({"global_step": 2, "w": torch.ones(1000), "x": Unpicklable()}, path)
        assert path.read_bytes() == good  # the previous checkpoint is intact
        # nothing of ours staged in TMPDIR (a killed worker pool leaves multiprocessing's pymp-*)
        assert [
            p for p in other_fs.iterdir() if not p.name.startswith("pymp-")
        ] == []  # nothing staged in TMPDIR
        no_temps(tmp_path)
        # a temp file a SIGKILL left behind is removed at the next start
        (path.parent / f".last.ckpt{TEMP_MARK}123").write_bytes(b"partial")
        assert [p.name for p in remove_stale_temps(path.parent)] == [f".last.ckpt{TEMP_MARK}123"]
        no_temps(tmp_path)
    finally:
        shutil.rmtree(other_fs, ignore_errors=True)


def test_resume_picks_the_newest_loadable_checkpoint(run: Run, tmp_path: Path) -> None:
    d = tmp_path / "checkpoints"
    d.mkdir()
    last = run.dir / "checkpoints" / "last.ckpt"
    shutil.copy(last, d / "switch-step=1.ckpt")
    ckpt = torch.load(last, weights_only=True)
    ckpt["global_step"] = 1
    torch.save(ckpt, d / "epoch=0-step=1.ckpt")
    (d / "last.ckpt").write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # truncated
    lines: list[str] = []
    assert resume_checkpoint(d, lines.append) == d / "switch-step=1.ckpt"
    assert "skipping" in lines[0] and "last.ckpt" in lines[0] and "not loadable" in lines[0]
    assert "resuming from" in lines[1] and "switch-step=1.ckpt (optimizer step 2)" in lines[1]
    assert resume_checkpoint(tmp_path / "none", lines.append) is None


# -- divergence guard --------------------------------------------------------------------------


def nan_init(tmp_path: Path, run_dir: Path) -> Path:
    state = weights(run_dir / "checkpoints" / "last.ckpt")
    state = {k: v.clone() for k, v in state.items()}
    next(v for k, v in state.items() if k.endswith("weight")).fill_(float("nan"))
    path = tmp_path / "nan-init.ckpt"
    torch.save({"state_dict": state}, path)
    return path


def finite(ckpt: Path) -> bool:
    return all(torch.isfinite(v).all() for v in weights(ckpt).values() if v.is_floating_point())


@pytest.mark.parametrize("case", ["lr-1e6", "nan-init-weights"])
def test_divergence_stops_with_one_line_and_keeps_a_finite_last(
    case: str, run: Run, tmp_path: Path, builtin_store: Path, capsys: pytest.CaptureFixture
) -> None:
    cfg = fit_config(tmp_path, builtin_store, "div", max_steps=8, limit_val_batches=0)
    extra = (
        ["--model.lr", "1e6"]
        if case == "lr-1e6"
        else [
            "--model.init_from",
            str(nan_init(tmp_path, run.dir)),
            "--model.model_config",
            "{n_layer: 1, n_embd: 32, n_head: 2, block_size: 64}",
        ]
    )
    capsys.readouterr()
    rc = main(
        [
            "fit",
            "--config",
            str(cfg),
            "--checkpoint.every_n_train_steps",
            "1",
            "--trainer.log_every_n_steps",
            "4",
            *extra,
        ]
    )
    err = capsys.readouterr().err
    assert rc == 3, err
    line = error_line(err, "fit")
    assert "divergence: non-finite" in line and "at optimizer step" in line
    last = tmp_path / "div" / "checkpoints" / "last.ckpt"
    if case == "nan-init-weights":
        assert "at optimizer step 0" in line and not last.exists()
    else:
        assert last.exists() and finite(last)
        assert "the last good checkpoint is" in line
        # the run summary says so, and how to continue from the last good checkpoint
        assert "fit: stopped (diverged) at step" in err
        assert (
            f"continue:   midtrain fit --config {tmp_path / 'div' / 'config.yaml'} --fork {last}"
            in err
        )
    summary = json.loads((tmp_path / "div" / "summary.json").read_text())
    assert summary["status"] == "diverged" and "non-finite" in summary["reason"]
    for ckpt in (tmp_path / "div" / "checkpoints").glob("*.ckpt"):
        assert finite(ckpt), ckpt


def test_skip_mode_skips_counts_and_continues(tmp_path: Path, builtin_store: Path) -> None:
    cfg = fit_config(tmp_path, builtin_store, "skip", max_steps=6, limit_val_batches=0)
    hook = ["--trainer.callbacks+=tests.helpers.NaNGradientAt", "--trainer.callbacks.steps=[2]"]
    assert (
        main(
            [
                "fit",
                "--config",
                str(cfg),
                "--divergence.on_nonfinite",
                "skip",
                "--checkpoint.every_n_train_steps",
                "1",
                "--checkpoint.save_top_k",
                "-1",
                *hook,
            ]
        )
        == 0
    )
    ckpts = tmp_path / "skip" / "checkpoints"
    assert finite(ckpts / "last.ckpt")
    # step 2 was skipped: the weights after it equal the weights before it
    assert_equal_weights(ckpts / "epoch=0-step=2.ckpt", ckpts / "epoch=0-step=3.ckpt")
    skipped = dict(scalars(tmp_path / "skip")["train/skipped_steps"])
    assert skipped[1] == 0 and skipped[2] == 1 and skipped[5] == 1


def test_skip_mode_stops_after_max_skips_in_a_row(
    tmp_path: Path, builtin_store: Path, capsys: pytest.CaptureFixture
) -> None:
    cfg = fit_config(tmp_path, builtin_store, "skips", max_steps=8, limit_val_batches=0)
    capsys.readouterr()
    rc = main(
        [
            "fit",
            "--config",
            str(cfg),
            "--divergence.on_nonfinite",
            "skip",
            "--divergence.max_skips",
            "3",
            "--trainer.callbacks+=tests.helpers.NaNGradientAt",
            "--trainer.callbacks.steps=[2, 3, 4, 5]",
        ]
    )
    assert rc == 3
    line = error_line(capsys.readouterr().err, "fit")
    assert "3 optimizer steps in a row had a non-finite gradient norm" in line


def test_validation_reports_nan_as_nan(
    run: Run, tmp_path: Path, builtin_store: Path, capsys: pytest.CaptureFixture
) -> None:
    from midtrain import CausalLM, MixtureDataModule
    from midtrain.train.trainer import Trainer

    dm = MixtureDataModule(str(builtin_store), seq_len=32, micro_batch_size=2, val_max_blocks=2)
    model = CausalLM(
        arch="tiny",
        model_config={"n_layer": 1, "n_embd": 32, "n_head": 2, "block_size": 64},
        vocab_size=dm.vocab_size,
        init_from=str(nan_init(tmp_path, run.dir)),
    )
    trainer = Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    metrics = trainer.validate(model, dm, verbose=False)
    values = {k: v for m in metrics for k, v in m.items() if k.startswith("val/")}
    assert values and all(math.isnan(v) for v in values.values()), values


# -- forks after a switch ----------------------------------------------------------------------


def test_fork_after_a_switch_reproduces_and_branches(builtin_store: Path, tmp_path: Path) -> None:
    parent_rec = RecordDomains()
    train(
        builtin_store,
        tmp_path / "parent",
        [parent_rec, MixtureSwitch({"code": 1.0}, step=3)],
        max_steps=8,
    )
    after = str(tmp_path / "parent" / "checkpoints" / "epoch=0-step=4.ckpt")  # after the switch
    # the run's own config from a checkpoint after its switch: the rest of the run, bit for bit
    train(
        builtin_store,
        tmp_path / "same",
        [MixtureSwitch({"code": 1.0}, step=3)],
        max_steps=8,
        ckpt_path=after,
        fork_step=4,
    )
    assert_equal_weights(
        tmp_path / "parent" / "checkpoints" / "last.ckpt",
        tmp_path / "same" / "checkpoints" / "last.ckpt",
    )
    # a new, later switch: the same batches up to step 6, then the new mixture
    rec = RecordDomains()
    train(
        builtin_store,
        tmp_path / "branch",
        [rec, MixtureSwitch({"code": 1.0}, step=3), MixtureSwitch({"math": 1.0}, step=6)],
        max_steps=8,
        ckpt_path=after,
        fork_step=4,
    )
    assert [r for r in rec.rows if r[0] < 6] == [r for r in parent_rec.rows if 4 <= r[0] < 6]
    assert all(set(d) == {2} for s, d in rec.rows if s >= 6)
    # a branch of the branch: its past (both switches) is kept, a third switch added at 7
    rec2 = RecordDomains()
    train(
        builtin_store,
        tmp_path / "twig",
        [
            rec2,
            MixtureSwitch({"code": 1.0}, step=3),
            MixtureSwitch({"math": 1.0}, step=6),
            MixtureSwitch({"prose": 1.0}, step=7),
        ],
        max_steps=8,
        ckpt_path=str(tmp_path / "branch" / "checkpoints" / "epoch=0-step=6.ckpt"),
        fork_step=6,
    )
    assert [r for r in rec2.rows if r[0] < 7] == [r for r in rec.rows if r[0] == 6]
    assert all(set(d) == {0} for s, d in rec2.rows if s >= 7)


def test_fork_after_a_switch_from_the_command_line(builtin_store: Path, tmp_path: Path) -> None:
    switch = [
        "--trainer.callbacks+=midtrain.callbacks.MixtureSwitch",
        "--trainer.callbacks.weights={code: 1}",
        "--trainer.callbacks.step=2",
    ]
    parent = fit_config(tmp_path, builtin_store, "p", max_steps=6, limit_val_batches=0)
    assert (
        main(
            [
                "fit",
                "--config",
                str(parent),
                *switch,
                "--checkpoint.every_n_train_steps",
                "4",
                "--checkpoint.save_top_k",
                "-1",
            ]
        )
        == 0
    )
    point = tmp_path / "p" / "checkpoints" / "epoch=0-step=4.ckpt"
    child = fit_config(tmp_path, builtin_store, "c", max_steps=6, limit_val_batches=0)
    assert main(["fit", "--config", str(child), *switch, "--fork", str(point)]) == 0
    assert_equal_weights(
        tmp_path / "p" / "checkpoints" / "last.ckpt", tmp_path / "c" / "checkpoints" / "last.ckpt"
    )


# -- TensorBoard on resume ---------------------------------------------------------------------


def test_resume_purges_replayed_tensorboard_steps(tmp_path: Path, builtin_store: Path) -> None:
    cfg = fit_config(tmp_path, builtin_store, "tb", max_steps=6, limit_val_batches=0)
    assert (
        main(
            [
                "fit",
                "--config",
                str(cfg),
                "--checkpoint.every_n_train_steps",
                "2",
                "--checkpoint.save_top_k",
                "-1",
            ]
        )
        == 0
    )
    # as after a kill at step 5: continue the same run dir from its step-2 checkpoint
    step2 = tmp_path / "tb" / "checkpoints" / "epoch=0-step=2.ckpt"
    assert main(["fit", "--config", str(cfg), "--ckpt_path", str(step2)]) == 0
    steps = [s for s, _ in scalars(tmp_path / "tb")["train/loss"]]
    assert steps == list(range(6))  # every step once, not steps 2-5 twice


# -- strict resume and one-line errors ---------------------------------------------------------


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MIDTRAIN_TRACEBACK", raising=False)


def _text_file(tmp: Path, run_dir: Path) -> str:
    (tmp / "notes.txt").write_text("not a checkpoint\n")
    return str(tmp / "notes.txt")


def _truncated(tmp: Path, run_dir: Path) -> str:
    data = (run_dir / "checkpoints" / "last.ckpt").read_bytes()
    (tmp / "cut.ckpt").write_bytes(data[: len(data) // 3])
    return str(tmp / "cut.ckpt")


def _a_file(tmp: Path, run_dir: Path) -> str:
    (tmp / "afile").write_text("x")
    return str(tmp / "afile")


RESUME_CASES = [
    # id, extra arguments ({last}: the run's last.ckpt; {tmp}), expected text
    (
        "micro-batch",
        ["--ckpt_path", "last", "--data.init_args.micro_batch_size", "1"],
        "data.global_batch_size 2 -> 1; resume with",
    ),
    ("lr", ["--ckpt_path", "last", "--model.lr", "0.01"], "model.lr 0.0003 -> 0.01"),
    (
        "model-shape",
        [
            "--ckpt_path",
            "last",
            "--model.model_config",
            "{n_layer: 2, n_embd: 32, n_head: 2, block_size: 64}",
        ],
        "model.shape.n_layer 1 -> 2",
    ),
    (
        "max-steps",
        ["--ckpt_path", "last", "--trainer.max_steps", "4"],
        "trainer.max_steps 2 -> 4; resume with the checkpoint's settings, or start a new run from "
        "it with --fork",
    ),
    (
        "fork-changes-the-past",
        [
            "--fork",
            "{last}",
            "--data.init_args.seq_len",
            "16",
            "--trainer.default_root_dir",
            "{tmp}/fork",
        ],
        "data.seq_len 32 -> 16; a fork may change",
    ),
    ("fork-into-a-used-dir", ["--fork", "{last}"], "already holds another run's checkpoints"),
    ("fresh-fit-into-a-used-dir", [], "already holds another run's checkpoints (epoch=0-step="),
    (
        "last-without-checkpoint",
        ["--ckpt_path", "last", "--trainer.default_root_dir", "{tmp}/new"],
        "ckpt_path: last: no checkpoint in {tmp}/new",
    ),
    ("ckpt-text-file", ["--ckpt_path", _text_file], "notes.txt is not a readable checkpoint"),
    ("ckpt-truncated", ["--ckpt_path", _truncated], "cut.ckpt is not a readable checkpoint"),
    (
        "fork-truncated",
        ["--fork", _truncated, "--trainer.default_root_dir", "{tmp}/f"],
        "fork: {tmp}/cut.ckpt is not a readable checkpoint",
    ),
    (
        "root-dir-is-a-file",
        ["--trainer.default_root_dir", _a_file],
        "trainer.default_root_dir: {tmp}/afile is a file",
    ),
    ("max-steps-null", ["--trainer.max_steps", "null"], "trainer.max_steps"),
]


@pytest.mark.parametrize(
    ("extra", "expected"), [c[1:] for c in RESUME_CASES], ids=[c[0] for c in RESUME_CASES]
)
def test_bad_resume_is_one_line_and_touches_nothing(
    extra: list[Any],
    expected: str,
    run: Run,
    builtin_store: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    last = run.dir / "checkpoints" / "last.ckpt"
    args = [
        a(tmp_path, run.dir)
        if callable(a)
        else a.replace("{last}", str(last)).replace("{tmp}", str(tmp_path))
        for a in extra
    ]
    line = run_bad(
        capsys, ["fit", "--config", str(run.config), *args], [run.dir, builtin_store, tmp_path]
    )
    assert expected.replace("{tmp}", str(tmp_path)) in line


@needs_non_root
def test_read_only_run_dir(
    run: Run, builtin_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    with read_only_directory(tmp_path / "ro") as ro:
        line = run_bad(
            capsys,
            ["fit", "--config", str(run.config), "--trainer.default_root_dir", str(ro / "run")],
            [run.dir, tmp_path],
        )
        assert f"{ro} is not writable" in line


def test_last_or_new_starts_fresh_loudly_then_resumes(
    run: Run, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    args = [
        "fit",
        "--config",
        str(run.config),
        "--ckpt_path",
        "last_or_new",
        "--trainer.default_root_dir",
        str(tmp_path / "req"),
        "--trainer.max_steps",
        "2",
    ]
    capsys.readouterr()
    assert main(args) == 0
    assert "NO CHECKPOINT in" in capsys.readouterr().err
    assert main(args) == 0  # the requeued job: continues (here: nothing left to do)
    assert "resuming from" in capsys.readouterr().err


# -- randomized kill matrix (slow) -------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(20))
def test_random_sigkill_resumes_bitwise(
    trial: int, tmp_path: Path, builtin_store: Path, references: Any
) -> None:
    rng = random.Random(trial)
    num_workers = rng.choice([0, 2])
    ref = references(num_workers, 2)
    other_fs = Path("/dev/shm") / f"midtrain-kill-{os.getpid()}-{trial}"
    other_fs.mkdir()
    try:
        cfg = config(tmp_path, builtin_store, "run", num_workers, 2, 1, rng.choice([0.0, 0.05]))
        env = {**os.environ, "TMPDIR": str(other_fs)}
        args = [sys.executable, "-m", "midtrain", "fit", "--config", str(cfg)]
        proc = subprocess.Popen(
            args,
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        ckpts = tmp_path / "run" / "checkpoints"
        deadline = time.monotonic() + 300
        while not ckpts.is_dir() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 4))  # anywhere in the run, often inside a checkpoint write
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        resume = subprocess.run(
            [*args, "--ckpt_path", "last_or_new"],
            cwd=REPO,
            env=env,
            capture_output=True,
            timeout=600,
        )
        assert resume.returncode == 0, resume.stderr.decode()[-3000:]
        assert_equal_weights(ref / "checkpoints" / "last.ckpt", ckpts / "last.ckpt")
        no_temps(ckpts)
        # nothing of ours staged in TMPDIR (a killed worker pool leaves multiprocessing's pymp-*)
        assert [p for p in other_fs.iterdir() if not p.name.startswith("pymp-")] == []
    finally:
        shutil.rmtree(other_fs, ignore_errors=True)
