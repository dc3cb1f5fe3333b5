"""Training metrics: per-domain tags only for steps in which the domain had tokens (identical for
an uninterrupted, a resumed and a forked run), no device->host syncs in non-logging steps, and
the extension points (data contract, schedule table)."""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from midtrain import CausalLM, MixtureDataModule
from midtrain.cli import main
from midtrain.errors import MidtrainError
from midtrain.train.optim import SCHEDULES, lr_at
from midtrain.train.trainer import Trainer
from tests.test_training import fit_config, scalars

SWITCH = [
    "--trainer.callbacks+=midtrain.callbacks.MixtureSwitch",
    "--trainer.callbacks.weights={prose: 1}",
    "--trainer.callbacks.step=5",
]


def test_per_domain_tags_only_where_the_domain_had_tokens(
    tmp_path: Path, builtin_store: Path
) -> None:
    """math is dropped to weight 0 at step 5: its loss and token curves end at step 4 (the
    step before the switch is always logged), in the uninterrupted run, a run resumed before
    the switch and a fork at the switch alike."""
    args = [
        "--data.init_args.weights",
        "{prose: 0.5, math: 0.5}",
        *SWITCH,
        "--checkpoint.every_n_train_steps",
        "1",
        "--checkpoint.save_top_k",
        "-1",
    ]
    full = fit_config(tmp_path, builtin_store, "full", log_every_n_steps=3, limit_val_batches=0)
    assert main(["fit", "--config", str(full), *args]) == 0
    tags = scalars(tmp_path / "full")
    # logging steps: every 3rd (2, 5, 8), the last (9), both sides of each phase start (0; 4, 5)
    logged = [0, 2, 4, 5, 8, 9]
    assert [s for s, _ in tags["train/loss"]] == logged
    assert [s for s, _ in tags["train/loss/prose"]] == logged
    assert [s for s, _ in tags["train/loss/math"]] == [0, 2, 4]  # none after the switch
    assert [s for s, _ in tags["train/tokens/math"]] == [0, 2, 4]
    # 2 of every 4 sequences (32 tokens) were math in steps 0-4: the curve ends at its total
    assert tags["train/tokens/math"][-1][1] == 5 * 2 * 32
    assert tags["train/tokens"][-1][1] == 10 * 4 * 32
    assert dict(tags["mixture/weight/math"])[5] == 0.0  # the schedule itself, 0 is a value

    ckpts = tmp_path / "full" / "checkpoints"
    resumed = fit_config(
        tmp_path, builtin_store, "resumed", log_every_n_steps=3, limit_val_batches=0
    )
    assert (
        main(
            [
                "fit",
                "--config",
                str(resumed),
                *args[:-4],
                "--ckpt_path",
                str(ckpts / "epoch=0-step=3.ckpt"),
            ]
        )
        == 0
    )
    fork = fit_config(tmp_path, builtin_store, "fork", log_every_n_steps=3, limit_val_batches=0)
    assert (
        main(
            ["fit", "--config", str(fork), *args[:-4], "--fork", str(ckpts / "switch-step=5.ckpt")]
        )
        == 0
    )
    for run, start in (("resumed", 3), ("fork", 5)):
        other = scalars(tmp_path / run)
        for tag in (
            "train/loss",
            "train/tokens",
            "train/loss/prose",
            "train/tokens/prose",
            "train/loss/math",
            "train/tokens/math",
        ):
            want = [(s, v) for s, v in tags[tag] if s >= start]
            assert other.get(tag, []) == want, (run, tag)


class CountHostSyncs(pl.Callback, TorchDispatchMode):
    """Counts device->host transfers per optimizer step, from the first micro-batch of a step
    to the first of the next (so Lightning's own end-of-step work, logging included, counts):
    ``aten._local_scalar_dense`` (``.item()``, ``bool()``, ``float()``, ``int()`` of a tensor,
    from Python or C++), ``aten.equal``/``aten.is_nonzero``, and Python calls of
    ``Tensor.tolist``/``.cpu``/``.numpy`` (no-ops on a CPU tensor, transfers on a GPU).
    Not counted: reads of AdamW's ``state["step"]`` counters, which torch keeps on the host on
    every device. Counting is on from ``on_train_start`` to ``on_train_end``."""

    OPS = ("_local_scalar_dense", "equal", "is_nonzero")
    METHODS = ("tolist", "cpu", "numpy")
    last: CountHostSyncs | None = None  # the instance the CLI built, for the test to read

    def __init__(self) -> None:
        super().__init__()
        self.step: int | None = None
        self.counts: dict[int, list[str]] = {}
        self._saved: dict[str, Any] = {}
        self._host_scalars: set[int] = set()
        CountHostSyncs.last = self

    def _count(self, what: str) -> None:
        if self.step is not None:  # where: the innermost frames outside this file
            stack = [
                f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno}"
                for f in traceback.extract_stack()[:-2]
                if __file__ != f.filename
            ]
            self.counts.setdefault(self.step, []).append(f"{what} at {' < '.join(stack[-3:])}")

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        if name in self.OPS and not (args and id(args[0]) in self._host_scalars):
            self._count(name)
        return func(*args, **(kwargs or {}))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for name in self.METHODS:
            original = self._saved[name] = getattr(torch.Tensor, name)

            def patched(
                tensor: torch.Tensor,
                *a: Any,
                _name: str = name,
                _original: Any = original,
                **k: Any,
            ) -> Any:
                self._count(_name)
                return _original(tensor, *a, **k)

            setattr(torch.Tensor, name, patched)
        self.__enter__()

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx % trainer.accumulate_grad_batches == 0:
            self.step = trainer.global_step
        # AdamW's step counters live on the host on every device (unless fused/capturable):
        # reading them is no device sync
        self._host_scalars = {
            id(s["step"]) for opt in trainer.optimizers for s in opt.state.values() if "step" in s
        }

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.step = None
        self.teardown(trainer, pl_module, "fit")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._saved:
            self.__exit__(None, None, None)
            for name, original in self._saved.items():
                setattr(torch.Tensor, name, original)
            self._saved = {}


def test_no_host_syncs_in_non_logging_steps(tmp_path: Path, builtin_store: Path) -> None:
    """With the CLI's default callbacks (checkpoint, throughput, mixture logging), a mixture
    switch, accumulation and gradient clipping, steps that do not log transfer nothing from
    the device; logging steps do (so the counter demonstrably sees transfers)."""
    cfg = fit_config(
        tmp_path,
        builtin_store,
        "sync",
        max_steps=12,
        log_every_n_steps=4,
        limit_val_batches=0,
        accumulate_grad_batches=2,
        gradient_clip_val=1.0,
    )
    assert (
        main(
            [
                "fit",
                "--config",
                str(cfg),
                "--data.init_args.weights",
                "{prose: 0.5, code: 0.5}",
                *SWITCH,
                "--trainer.callbacks+=tests.test_metrics.CountHostSyncs",
            ]
        )
        == 0
    )
    counter = CountHostSyncs.last
    assert counter is not None
    # logging steps: every 4th (3, 7, 11), the last (11), both sides of the phase starts 0, 5
    logging = {0, 3, 4, 5, 7, 11}
    syncs = {s: c for s, c in counter.counts.items() if s not in logging}
    assert syncs == {}, syncs
    assert all(counter.counts.get(s) for s in logging)
    assert [s for s, _ in scalars(tmp_path / "sync")["train/loss"]] == sorted(logging)


def _fit_prose(
    store: Path,
    tmp_path: Path,
    num_workers: int,
    accumulation: int,
    max_steps: int,
    callbacks: list[pl.Callback],
) -> MixtureDataModule:
    """A tiny fit on prose only (prefetch 2, micro-batches of 2) with the given callbacks; its
    data module, whose schedule the callbacks may have changed."""
    dm = MixtureDataModule(
        str(store),
        weights={"prose": 1.0},
        seq_len=16,
        micro_batch_size=2,
        num_workers=num_workers,
        prefetch_factor=2,
        val_max_blocks=2,
    )
    model = CausalLM(
        arch="tiny",
        model_config={"n_layer": 1, "n_embd": 32, "n_head": 2, "block_size": 64},
        vocab_size=dm.vocab_size,
    )
    trainer = Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        accumulate_grad_batches=accumulation,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=callbacks,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(model, dm)
    return dm


@pytest.mark.parametrize("num_workers,expected", [(0, 3), (2, 4)])
def test_change_weights_step_comes_from_the_loaders_own_count(
    builtin_store: Path, tmp_path: Path, num_workers: int, expected: int
) -> None:
    """Called after optimizer step 1 (accumulation 2): the loader has handed out micro-batches
    0-3 and, with 2 workers x prefetch 2, asked for 4-7 in advance, so the first micro-batch it
    cannot have produced is 4 (no workers: step 2, but step 2 has begun, so 3) or 8 (step 4)."""
    from tests.helpers import ChangeWeightsAt

    change = ChangeWeightsAt(step=2, weights={"math": 1.0})
    dm = _fit_prose(builtin_store, tmp_path, num_workers, 2, 6, [change])
    assert change.effective == expected
    assert dm.weights_at(expected) == {"prose": 0.0, "code": 0.0, "math": 1.0}


def test_a_change_that_replaces_a_pending_change_reaches_the_workers(
    builtin_store: Path, tmp_path: Path
) -> None:
    """Two changes after micro-batches 4 and 5 (accumulation 4, 2 workers x prefetch 2) both
    land on step 3, the second replacing the first. The workers have produced batches under the
    first change in between (the sleep), and must still feed step 3 from the second: the phase
    count did not move, only the table's version did."""
    from tests.helpers import ChangeWeightsAtBatches, RecordDomains, SlowDown

    change = ChangeWeightsAtBatches({4: {"math": 1.0}, 5: {"code": 1.0}})
    record = RecordDomains()
    dm = _fit_prose(builtin_store, tmp_path, 2, 4, 5, [change, SlowDown(0.3), record])
    assert change.effective == [3, 3]
    fed = {dm.domains[d] for step, ids in record.rows if step >= 3 for d in ids}
    assert fed == {"code"}


class ForeignData(pl.LightningDataModule):
    """A user's data module that does not implement midtrain's data contract."""

    vocab_size = 512


def test_a_data_module_without_the_contract_is_named(tmp_path: Path) -> None:
    model = CausalLM(arch="tiny", vocab_size=512)
    trainer = Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        default_root_dir=str(tmp_path),
        enable_progress_bar=False,
    )
    with pytest.raises(
        MidtrainError,
        match=r"ForeignData does not implement .*missing: "
        r"eos_id, seq_len, domains, val_set_names",
    ):
        trainer.fit(model, datamodule=ForeignData())


def test_a_new_lr_schedule_is_one_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    def linear(
        step: int, lr: float, min_lr: float, warmup: int, max_steps: int, decay_fraction: float
    ) -> float:
        return lr + (min_lr - lr) * (step - warmup) / (max_steps - warmup)

    monkeypatch.setitem(SCHEDULES, "linear", linear)
    CausalLM(arch="tiny", vocab_size=512, lr_schedule="linear")  # accepted by name
    assert lr_at(
        60, lr=1.0, min_lr=0.0, warmup=10, max_steps=110, schedule="linear"
    ) == pytest.approx(0.5)
    with pytest.raises(
        MidtrainError,
        match="unknown 'cubic'; use one of cosine, wsd, constant, anneal, anneal_wsd, linear",
    ):
        CausalLM(arch="tiny", vocab_size=512, lr_schedule="cubic")


class RecordCallbackMetrics(pl.Callback):
    """What a user's callback sees: ``trainer.callback_metrics`` and the progress bar's
    metrics at the start of every step (after the previous step logged)."""

    last: RecordCallbackMetrics | None = None

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[int, dict[str, torch.Tensor]] = {}
        self.progress_bar: dict[str, Any] = {}
        RecordCallbackMetrics.last = self

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.seen[trainer.global_step] = dict(trainer.callback_metrics)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seen[trainer.global_step] = dict(trainer.callback_metrics)
        self.progress_bar = dict(trainer.progress_bar_metrics)


def test_callbacks_and_checkpoints_see_the_logged_training_metrics(
    tmp_path: Path, builtin_store: Path
) -> None:
    """The values written to TensorBoard on a logging step are in ``trainer.callback_metrics``
    (as host tensors) until the next logging step, a checkpoint can monitor a per-domain loss,
    and train/loss reaches the progress bar."""
    cfg = fit_config(
        tmp_path,
        builtin_store,
        "cb",
        max_steps=6,
        log_every_n_steps=2,
        limit_val_batches=0,
        enable_progress_bar=True,
    )
    assert (
        main(
            [
                "fit",
                "--config",
                str(cfg),
                "--data.init_args.weights",
                "{prose: 0.5, code: 0.5}",
                "--checkpoint.monitor",
                "train/loss/code",
                "--checkpoint.every_n_train_steps",
                "2",
                "--checkpoint.save_top_k",
                "1",
                "--trainer.callbacks+=tests.test_metrics.RecordCallbackMetrics",
            ]
        )
        == 0
    )
    recorder = RecordCallbackMetrics.last
    assert recorder is not None
    tags = scalars(tmp_path / "cb")
    logged = dict(tags["train/loss/code"])
    assert sorted(logged) == [0, 1, 3, 5]  # every 2nd, and the phase start
    for step in range(1, 7):  # the values of the last logging step before it
        seen = recorder.seen[step]
        last = max(s for s in logged if s < step)
        for tag in (
            "train/loss",
            "train/loss/code",
            "train/tokens/prose",
            "train/grad_norm",
            "train/lr",
        ):
            assert tag in seen, (step, tag)
            assert seen[tag].device.type == "cpu"
            assert float(seen[tag]) == pytest.approx(dict(tags[tag])[last], rel=1e-6)
    assert "train/loss" not in recorder.seen[0]  # nothing before the first logging step
    assert float(recorder.progress_bar["train/loss"]) == pytest.approx(
        tags["train/loss"][-1][1], rel=1e-6
    )
    best = list((tmp_path / "cb" / "checkpoints").glob("epoch=*.ckpt"))
    assert len(best) == 1
    assert torch.load(best[0], map_location="cpu", weights_only=False)["callbacks"]
