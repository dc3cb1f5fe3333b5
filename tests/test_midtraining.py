"""The midtraining engine: switches exact at the step, runtime changes, forks, the plan."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from midtrain import CausalLM, MixtureDataModule
from midtrain.cli import main
from midtrain.data.mixture import largest_remainder
from midtrain.errors import MidtrainError
from midtrain.train.callbacks.checkpoints import ModelCheckpoint
from midtrain.train.callbacks.mixture import MixtureSwitch
from midtrain.train.trainer import Trainer
from tests.helpers import ChangeWeightsAt, RecordDomains, fit_or_fork
from tests.test_training import fit_config, scalars, weights

DOMAINS = ["prose", "code", "math"]
TINY = {"n_layer": 1, "n_embd": 32, "n_head": 2, "block_size": 64}


def run(
    store: Path,
    root: Path,
    callbacks: list,
    max_steps: int = 8,
    accumulation: int = 1,
    num_workers: int = 0,
    weights: dict | None = None,
    ckpt_path: str | None = None,
    fork_step: int | None = None,
    **dm_kwargs,
) -> tuple[Trainer, MixtureDataModule]:
    dm = MixtureDataModule(
        str(store),
        weights=weights or {"prose": 1.0},
        seq_len=16,
        micro_batch_size=3,
        num_workers=num_workers,
        prefetch_factor=2,
        val_max_blocks=2,
        **dm_kwargs,
    )
    torch.manual_seed(0)
    model = CausalLM(arch="tiny", model_config=TINY, vocab_size=dm.vocab_size, lr=1e-3, warmup=0)
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        accumulate_grad_batches=accumulation,
        default_root_dir=str(root),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[
            ModelCheckpoint(
                dirpath=str(root / "checkpoints"),
                save_last=True,
                save_top_k=-1,
                every_n_train_steps=2,
            ),
            *callbacks,
        ],
    )
    fit_or_fork(trainer, model, dm, ckpt_path, fork_step)
    return trainer, dm


def per_step_counts(rows: list, n_domains: int = 3) -> dict[int, np.ndarray]:
    out: dict[int, np.ndarray] = {}
    for step, domains in rows:
        out.setdefault(step, np.zeros(n_domains, dtype=int))
        out[step] += np.bincount(domains, minlength=n_domains)
    return out


def expected(weights: dict, batch: int) -> np.ndarray:
    return largest_remainder(np.array([weights.get(d, 0.0) for d in DOMAINS]), batch, seed=0)


def test_switch_is_exact_at_the_step_with_workers_and_accumulation(
    builtin_store: Path, tmp_path: Path
) -> None:
    rec = RecordDomains()
    new = {"code": 0.7, "math": 0.3}
    run(
        builtin_store,
        tmp_path,
        [rec, MixtureSwitch(new, step=3)],
        max_steps=6,
        accumulation=2,
        num_workers=2,
        weights={"prose": 0.5, "code": 0.5},
    )
    counts = per_step_counts(rec.rows)
    assert sorted(counts) == list(range(6))
    for step, c in counts.items():  # global batch 3 x 2 = 6 sequences
        w = {"prose": 0.5, "code": 0.5} if step < 3 else new
        assert c.tolist() == expected(w, 6).tolist(), step
    ckpt = torch.load(tmp_path / "checkpoints" / "switch-step=3.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3


def test_fraction_switch_and_mixture_weight_curve(builtin_store: Path, tmp_path: Path) -> None:
    # log_every_n_steps=50 would miss step 7; the weight curve still steps exactly there
    cfg = fit_config(
        tmp_path, builtin_store, "frac", max_steps=10, log_every_n_steps=50, limit_val_batches=0
    )
    assert (
        main(
            [
                "fit",
                "--config",
                str(cfg),
                "--data.init_args.weights",
                "{prose: 1}",
                "--trainer.callbacks+=midtrain.callbacks.MixtureSwitch",
                "--trainer.callbacks.weights={math: 1}",
                "--trainer.callbacks.fraction=0.7",
            ]
        )
        == 0
    )
    tags = scalars(tmp_path / "frac")
    math_w = dict(tags["mixture/weight/math"])
    prose_w = dict(tags["mixture/weight/prose"])
    assert math_w[6] == 0.0 and math_w[7] == 1.0 and prose_w[6] == 1.0 and prose_w[7] == 0.0
    assert (tmp_path / "frac" / "checkpoints" / "switch-step=7.ckpt").is_file()
    assert "val/prose/bpb" not in tags  # no validation ran (limit 0)


def test_runtime_change_takes_effect_at_returned_step_and_survives_resume(
    builtin_store: Path, tmp_path: Path
) -> None:
    new = {"math": 1.0}
    rec = RecordDomains()
    change = ChangeWeightsAt(step=2, weights=new)
    run(builtin_store, tmp_path / "a", [rec, change], max_steps=8, accumulation=2, num_workers=2)
    step = change.effective
    # ran ahead by 1 + 2 workers x prefetch 2 micro-batches: 5 micro-batches, 3 steps at acc 2
    assert step is not None and 3 <= step <= 6
    for s, c in per_step_counts(rec.rows).items():
        assert c.tolist() == expected(new if s >= step else {"prose": 1}, 6).tolist(), s

    # resume from the checkpoint after the change: the change is restored, not re-decided
    after = tmp_path / "a" / "checkpoints" / "epoch=0-step=6.ckpt"
    rec2 = RecordDomains()
    run(
        builtin_store,
        tmp_path / "b",
        [rec2, ChangeWeightsAt(step=99, weights={"code": 1})],
        max_steps=8,
        accumulation=2,
        num_workers=2,
        ckpt_path=str(after),
    )
    assert [r for r in rec.rows if r[0] >= 6] == rec2.rows
    a = weights(tmp_path / "a" / "checkpoints" / "last.ckpt")
    b = weights(tmp_path / "b" / "checkpoints" / "last.ckpt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fork_reproduces_its_parent_and_can_change_the_future(
    builtin_store: Path, tmp_path: Path
) -> None:
    switch = {"code": 1.0}
    run(builtin_store, tmp_path / "parent", [MixtureSwitch(switch, step=4)], max_steps=8)
    point = str(tmp_path / "parent" / "checkpoints" / "switch-step=4.ckpt")
    # the parent's own schedule from its switch checkpoint: its remaining steps, bit for bit
    run(
        builtin_store,
        tmp_path / "same",
        [MixtureSwitch(switch, step=4)],
        max_steps=8,
        ckpt_path=point,
        fork_step=4,
    )
    parent = weights(tmp_path / "parent" / "checkpoints" / "last.ckpt")
    same = weights(tmp_path / "same" / "checkpoints" / "last.ckpt")
    assert all(torch.equal(parent[k], same[k]) for k in parent)
    # a branch: a different mixture from step 4 on
    rec = RecordDomains()
    run(
        builtin_store,
        tmp_path / "branch",
        [rec, MixtureSwitch({"math": 1.0}, step=4)],
        max_steps=8,
        ckpt_path=point,
        fork_step=4,
    )
    assert {s for s, _ in rec.rows} == set(range(4, 8))
    assert all(set(d) == {2} for _, d in rec.rows)  # all math
    branch = weights(tmp_path / "branch" / "checkpoints" / "last.ckpt")
    assert not all(torch.equal(parent[k], branch[k]) for k in parent)


def test_resume_with_another_schedule_is_refused_unless_forking(
    builtin_store: Path, tmp_path: Path
) -> None:
    run(builtin_store, tmp_path / "a", [MixtureSwitch({"code": 1.0}, step=4)], max_steps=6)
    ckpt = str(tmp_path / "a" / "checkpoints" / "epoch=0-step=2.ckpt")
    # the phases as shares, not the raw weights a checkpoint records
    said = r"checkpoint's: step 0: .* then step 4: code 1; this run's: .* then step 4: math 1\)"
    with pytest.raises(MidtrainError, match=f"different mixture schedule.*{said}.*--fork"):
        run(
            builtin_store,
            tmp_path / "b",
            [MixtureSwitch({"math": 1.0}, step=4)],
            max_steps=6,
            ckpt_path=ckpt,
        )
    with pytest.raises(MidtrainError, match="before the fork point"):
        run(
            builtin_store,
            tmp_path / "c",
            [MixtureSwitch({"math": 1.0}, step=1)],
            max_steps=6,
            ckpt_path=ckpt,
            fork_step=2,
        )
    with pytest.raises(MidtrainError, match="data.seed"):
        run(
            builtin_store,
            tmp_path / "d",
            [MixtureSwitch({"code": 1.0}, step=4)],
            max_steps=6,
            ckpt_path=ckpt,
            seed=1,
        )


def test_fork_from_the_command_line(builtin_store: Path, tmp_path: Path) -> None:
    parent = fit_config(tmp_path, builtin_store, "p", max_steps=6, limit_val_batches=0)
    switch = [
        "--trainer.callbacks+=midtrain.callbacks.MixtureSwitch",
        "--trainer.callbacks.weights={code: 1}",
        "--trainer.callbacks.step=3",
    ]
    assert main(["fit", "--config", str(parent), *switch]) == 0
    point = tmp_path / "p" / "checkpoints" / "switch-step=3.ckpt"
    child = fit_config(tmp_path, builtin_store, "c", max_steps=6, limit_val_batches=0)
    assert main(["fit", "--config", str(child), *switch, "--fork", str(point)]) == 0
    a = weights(tmp_path / "p" / "checkpoints" / "last.ckpt")
    b = weights(tmp_path / "c" / "checkpoints" / "last.ckpt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    tokens = dict(scalars(tmp_path / "c")["train/tokens/code"])
    assert min(tokens) == 3  # the branch logs from the fork step on


def test_plan_is_printed_and_repetition_is_refused(
    builtin_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run(builtin_store, tmp_path / "a", [MixtureSwitch({"code": 1.0}, step=2)], max_steps=3)
    out = capsys.readouterr().out
    assert "mixture plan" in out and "0-2" in out and "2-3" in out and "code" in out
    with pytest.raises(MidtrainError, match="data.max_repeat: domain 'prose' would be read"):
        run(builtin_store, tmp_path / "b", [], max_steps=3, max_repeat=0.0001)


def test_max_repeat_names_every_offending_domain(builtin_store: Path, tmp_path: Path) -> None:
    with pytest.raises(MidtrainError) as err:
        run(
            builtin_store,
            tmp_path,
            [],
            max_steps=3,
            weights={"prose": 0.5, "code": 0.5},
            max_repeat=0.0001,
        )
    message = str(err.value)
    assert message.startswith("data.max_repeat: domain 'prose' would be read ")
    assert ", domain 'code' would be read " in message and "lower their weights" in message
    assert "\n" not in message and not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize(
    "switch,match",
    [
        (lambda: MixtureSwitch({"poetry": 1}, step=2), "unknown domain 'poetry'"),
        (lambda: MixtureSwitch({"code": -1}, step=2), "weight must be a finite number >= 0"),
        (lambda: MixtureSwitch({"code": 0}, step=2), "weights are all zero"),
        (lambda: MixtureSwitch({"code": 1}, step=5), "outside the run"),
        (lambda: MixtureSwitch({"code": 1}, step=9), "outside the run"),
        (lambda: MixtureSwitch({"code": 1}, step=2, fraction=0.5), "exactly one of"),
        (lambda: MixtureSwitch({"code": 1}, fraction=1.5), "fraction"),
    ],
)
def test_bad_schedules_are_refused(builtin_store: Path, tmp_path: Path, switch, match) -> None:
    with pytest.raises(MidtrainError, match=match):
        run(builtin_store, tmp_path, [switch()], max_steps=5)


def test_two_switches_at_one_step_are_refused(builtin_store: Path, tmp_path: Path) -> None:
    with pytest.raises(MidtrainError, match="two switches at step 2"):
        run(
            builtin_store,
            tmp_path,
            [MixtureSwitch({"code": 1}, step=2), MixtureSwitch({"math": 1}, step=2)],
            max_steps=5,
        )
    assert not (tmp_path / "checkpoints").exists()


def test_the_documented_adaptive_callback_runs(builtin_store: Path, tmp_path: Path) -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "midtraining.md").read_text()
    code = doc.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(code, namespace)
    callback = namespace["MoreCodeWhenLossPlateaus"](patience=1)
    rec = RecordDomains()
    # prose and code both drawn, so train/loss/code exists from the first step
    run(
        builtin_store,
        tmp_path,
        [callback, rec],
        max_steps=12,
        accumulation=4,
        weights={"prose": 0.7, "code": 0.3},
    )
    assert callback.done
    counts = per_step_counts(rec.rows)
    old, new = expected({"prose": 0.7, "code": 0.3}, 12), expected({"prose": 0.6, "code": 0.4}, 12)
    assert old.tolist() != new.tolist()
    assert counts[0].tolist() == old.tolist() and counts[11].tolist() == new.tolist()
