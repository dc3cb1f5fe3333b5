"""The timing x weight ablation: grids of start step x weight x ramp length in `midtrain
experiment`, and the report's figures, whose plotted values equal the summary."""

from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from midtrain.cli import main
from midtrain.errors import MidtrainError
from midtrain.study import ExperimentConfig, PretrainConfig, SFTConfig, expand_branches
from midtrain.study.figures import PLOT_HINT, draw, figure_specs, read_summary, write_figures
from midtrain.study.report import SUMMARY_COLUMNS
from tests.helpers import MODEL, QUIET

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def study_cfg(tmp_path: Path, branches: dict[str, Any], pretrain: list[str] | None = None) -> Any:
    return ExperimentConfig(
        output=str(tmp_path / "o"),
        general="c4",
        pretrain=PretrainConfig(config=pretrain or []),
        sft=SFTConfig(config=pretrain or [], targets={"t": {"target": "t"}}, lrs=[1e-3]),
        branches=branches,
    )


def grid(**extra: Any) -> dict[str, Any]:
    return {"mid": {"grid": {"domain": "code", "start": [10, 30], "weight": [0.2, 0.5], **extra}}}


def test_grid_expands_every_point_with_its_schedule(tmp_path: Path) -> None:
    cfg = study_cfg(tmp_path, grid(ramp_steps=[0, 5], ramp="cosine"))
    b = expand_branches(cfg, {"c4": 1.0, "books": 3.0}, max_steps=60)
    assert list(b) == [
        "baseline",
        "mid-s10-w0.2",
        "mid-s10-w0.2-r5",
        "mid-s10-w0.5",
        "mid-s10-w0.5-r5",
        "mid-s30-w0.2",
        "mid-s30-w0.2-r5",
        "mid-s30-w0.5",
        "mid-s30-w0.5-r5",
    ]
    assert b["mid-s10-w0.2"] == {
        "step": 10,
        "weights": {"c4": 0.2, "books": 0.6, "code": 0.2},
        "domain": "code",
        "grid": "mid",
        "weight": 0.2,
    }
    assert b["mid-s30-w0.5-r5"] == {
        "step": 30,
        "weights": {"c4": 0.125, "books": 0.375, "code": 0.5},
        "domain": "code",
        "grid": "mid",
        "weight": 0.5,
        "ramp_steps": 5,
        "ramp": "cosine",
    }
    assert expand_branches(cfg, {"c4": 1.0, "books": 3.0}, max_steps=60) == b  # deterministic


def write_pretrain(path: Path, store: Path, max_steps: int = 8) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "seed_everything": 0,
                "model": {**MODEL, "lr": 3e-3},
                "data": {
                    "class_path": "midtrain.MixtureDataModule",
                    "init_args": {
                        "store": str(store),
                        "weights": {"prose": 1.0},
                        "seq_len": 32,
                        "micro_batch_size": 4,
                    },
                },
                "trainer": {**QUIET, "max_steps": max_steps, "limit_val_batches": 0},
            }
        )
    )
    return path


def test_plan_gives_each_point_its_switch_and_ramp(tmp_path: Path) -> None:
    from midtrain.study import plan_study

    pre = write_pretrain(tmp_path / "pre.yaml", tmp_path / "no-store", max_steps=60)
    study = plan_study(study_cfg(tmp_path, grid(ramp_steps=[0, 4]), [str(pre)]))
    branches = {s.meta["branch"]: s for s in study.stages if s.kind == "branch"}
    assert len(branches) == 8
    jump, ramped = branches["mid-s30-w0.5"], branches["mid-s30-w0.5-r4"]
    assert jump.fork is not None and jump.fork.name == "step=30.ckpt"
    assert "--trainer.callbacks.step=30" in ramped.args
    assert "--trainer.callbacks.ramp_steps=4" in ramped.args
    assert "--trainer.callbacks.ramp=linear" in ramped.args
    assert not any("ramp" in a for a in jump.args)  # a jump's argv is as before ramps
    rows = study.mixture_rows()["mid-s30-w0.5-r4"]
    code = [(r["start"], r["end"], r["ramp"], r["weight"]) for r in rows if r["domain"] == "code"]
    assert code == [(30, 34, "linear", 0.5), (34, 60, None, 0.5)]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"start": []}, "branches.mid.grid.start: give a non-empty list"),
        ({"weight": []}, "branches.mid.grid.weight: give a non-empty list"),
        ({"ramp_steps": []}, "branches.mid.grid.ramp_steps: give a non-empty list"),
        ({"start": [10, 60]}, "branches.mid.grid.start: step 60 is not before"),
        ({"start": [0]}, "branches.mid.grid.start: 0 is not an optimizer step > 0"),
        ({"weight": [0.2, 0.0]}, "branches.mid.grid.weight: 0.0 is not in (0, 1]"),
        ({"weight": [1.5]}, "branches.mid.grid.weight: 1.5 is not in (0, 1]"),
        ({"weight": [0.2, 0.2]}, "branches.mid.grid.weight: [0.2, 0.2] repeats a value"),
        ({"ramp_steps": [0, 31]}, "branches.mid.grid.ramp_steps: a ramp of 31 steps"),
        ({"ramp_steps": [-1]}, "branches.mid.grid.ramp_steps: must be a whole number"),
        ({"ramp": "step"}, "branches.mid.grid.ramp: must be one of"),
        ({"starts": [1]}, "branches.mid.grid: give `domain`, `start` (steps), `weight`"),
    ],
)
def test_bad_grids_are_refused_naming_the_key(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    g = {"domain": "code", "start": [10, 30], "weight": [0.2, 0.5], **change}
    with pytest.raises(MidtrainError, match="^" + re.escape(message)):
        expand_branches(study_cfg(tmp_path, {"mid": {"grid": g}}), {"c4": 1.0}, max_steps=60)


def test_bad_grid_exits_with_one_line_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    pre = write_pretrain(tmp_path / "pre.yaml", tmp_path / "no-store", max_steps=20)
    study = {
        "output": str(tmp_path / "o"),
        "general": "prose",
        "pretrain": {"config": [str(pre)]},
        "branches": {"mid": {"grid": {"domain": "code", "start": [10, 20], "weight": [0.5]}}},
        "sft": {"config": [str(pre)], "targets": {"t": {"target": "t"}}, "lrs": [1e-3]},
    }
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    assert main(["experiment", "--config", str(tmp_path / "study.yaml")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "branches.mid.grid.start: step 20" in err[0]
    assert "trainer.max_steps=20" in err[0]
    assert not (tmp_path / "o").exists()


def constructed_summary(path: Path) -> list[dict[str, Any]]:
    """A summary.csv as the report writes it: a 2 x 2 timing grid with two ramp lengths."""
    rng = np.random.default_rng(0)
    rows = [{"target": "code", "branch": "baseline", "best_lr": 1e-3, "seeds": 2}]
    for s in (10, 30):
        for w in (0.2, 0.5):
            for r in (0, 5):
                name = f"mid-s{s}-w{w:g}" + (f"-r{r}" if r else "")
                rows.append(
                    {
                        "target": "code",
                        "branch": name,
                        "grid": "mid",
                        "start_step": s,
                        "weight": w,
                        "ramp_steps": r,
                        "ramp": "linear" if r else "",
                        "best_lr": 1e-3,
                        "seeds": 2,
                    }
                )
    for row in rows:
        row["in_domain_mean"], row["forgetting_mean"] = rng.uniform(2, 4, size=2).tolist()
        row["in_domain_std"], row["forgetting_std"] = rng.uniform(0, 0.1, size=2).tolist()
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS, restval="")
        w.writeheader()
        w.writerows(rows)
    return read_summary(path)


def drawn_series(fig: Any) -> dict[tuple[str, str], dict[str, list[float]]]:
    """(panel, series label) -> x, y and error bar half-heights, read from the Figure."""
    out = {}
    for ax, panel in zip(fig.axes, ["in_domain", "forgetting"], strict=True):
        for c in ax.containers:  # an ErrorbarContainer per series
            line, _, bars = c.lines
            segments = bars[0].get_segments()
            out[(panel, c.get_label())] = {
                "x": [float(v) for v in line.get_xdata()],
                "y": [float(v) for v in line.get_ydata()],
                "yerr": [float(seg[1][1] - seg[0][1]) / 2 for seg in segments],
            }
    return out


def check_figures_equal_summary(out: Path, summary: list[dict[str, Any]]) -> list[str]:
    """Every figure's Line2D values equal its CSV, and its CSV equals summary.csv."""
    by_branch = {(r["target"], r["branch"]): r for r in summary}
    specs = figure_specs(summary)
    assert specs
    for spec in specs:
        assert (out / f"figure-{spec.name}.png").read_bytes()[:8] == PNG_MAGIC
        table = list(csv.DictReader((out / f"figure-{spec.name}.csv").open()))
        for p in table:
            s = by_branch[(spec.target, p["branch"])]
            assert float(p["y"]) == pytest.approx(s[p["panel"] + "_mean"], rel=1e-12)
            assert float(p["yerr"]) == pytest.approx(s[p["panel"] + "_std"], rel=1e-12)
            if p["series"] != "baseline":
                axis = "ramp_steps" if spec.name.endswith("-ramp") else "start_step"
                assert float(p["x"]) == s[axis]
        drawn = drawn_series(draw(spec))
        csv_series: dict[tuple[str, str], dict[str, list[float]]] = {}
        for p in table:
            d = csv_series.setdefault((p["panel"], p["series"]), {"x": [], "y": [], "yerr": []})
            for k in d:
                d[k].append(float(p[k]))
        assert drawn.keys() == csv_series.keys()
        for key, d in csv_series.items():
            for k in ("x", "y", "yerr"):
                assert drawn[key][k] == pytest.approx(d[k], rel=1e-9, abs=1e-12), (spec.name, key)
    return [s.name for s in specs]


def test_figures_plot_the_summary(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    summary = constructed_summary(tmp_path / "summary.csv")
    names, hint = write_figures(tmp_path, summary)
    assert hint is None
    assert names == [
        "figure-mid-code-timing-r0.png",
        "figure-mid-code-timing-r5.png",
        "figure-mid-code-ramp.png",
    ]
    assert check_figures_equal_summary(tmp_path, summary) == [n[7:-4] for n in names]
    timing = list(csv.DictReader((tmp_path / "figure-mid-code-timing-r0.csv").open()))
    labels = [p["series"] for p in timing if p["panel"] == "in_domain"]
    assert labels == ["weight 0.2"] * 2 + ["weight 0.5"] * 2 + ["baseline"] * 2
    assert [p["branch"] for p in timing][:4] == [
        "mid-s10-w0.2",
        "mid-s30-w0.2",
        "mid-s10-w0.5",
        "mid-s30-w0.5",
    ]


def test_without_matplotlib_the_report_says_how_to_get_figures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    summary = constructed_summary(tmp_path / "summary.csv")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` fails
    names, hint = write_figures(tmp_path, summary)
    assert names == [] and hint == PLOT_HINT
    assert "pip install 'midtrain[plot]'" in hint and "\n" not in hint
    assert (tmp_path / "figure-mid-code-ramp.csv").is_file()  # the values, as a table
    assert not list(tmp_path.glob("*.png"))


@pytest.mark.slow
def test_ablation_study_end_to_end(
    tmp_path: Path, builtin_store: Path, capsys: pytest.CaptureFixture
) -> None:
    """A real 2 x 2 grid (plus a ramped point), 2 seeds: the figures equal the summary and a
    re-run does nothing."""
    pytest.importorskip("matplotlib")
    from midtrain.data.prepare import DomainConfig, PrepareConfig, TokenizerConfig, prepare

    src = tmp_path / "qa.jsonl"
    src.write_text(
        "".join(json.dumps({"q": f"{i}+{i}?", "a": f"{2 * i}."}) + "\n" for i in range(60))
    )
    qa = DomainConfig(
        source={"path": str(src)}, prompt="Q: {q}\nA: ", response="{a}", val_fraction=0.2
    )
    tok = TokenizerConfig(path=str(builtin_store / "tokenizer.json"))
    sft_store = prepare(
        PrepareConfig(output=str(tmp_path / "sft"), domains={"qa": qa}, tokenizer=tok)
    )
    pre = write_pretrain(tmp_path / "pre.yaml", builtin_store, max_steps=8)
    sft = {
        "model": {**MODEL, "warmup": 0},
        "data": {
            "class_path": "midtrain.SFTDataModule",
            "init_args": {
                "store": str(sft_store),
                "target": "qa",
                "general_store": str(builtin_store),
                "max_length": 32,
                "micro_batch_size": 4,
                "val_max_examples": 8,
                "general_val_max_blocks": 8,
            },
        },
        "trainer": {**QUIET, "max_steps": 2, "val_check_interval": 2},
    }
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(sft))
    study = {
        "output": str(tmp_path / "out"),
        "general": "prose",
        "pretrain": {"config": [str(pre)]},
        "branches": {
            "mid": {"grid": {"domain": "code", "start": [3, 5], "weight": [0.25, 0.5]}},
            "ramped": {
                "grid": {"domain": "code", "start": [3], "weight": [0.5], "ramp_steps": [0, 3]}
            },
        },
        "sft": {
            "config": [str(tmp_path / "sft.yaml")],
            "targets": {"qa": {"target": "qa"}},
            "lrs": [1e-3],
            "seeds": [0, 1],
        },
        "similarity_docs": 10,
        "similarity_top_k": 100,
    }
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    assert main(["experiment", "--config", str(tmp_path / "study.yaml")]) == 0
    out = tmp_path / "out"
    summary = read_summary(out / "summary.csv")
    assert list(summary[0]) == SUMMARY_COLUMNS  # no eval/* tags here
    assert {r["branch"] for r in summary} == {
        "baseline",
        "mid-s3-w0.25",
        "mid-s3-w0.5",
        "mid-s5-w0.25",
        "mid-s5-w0.5",
        "ramped-s3-w0.5",
        "ramped-s3-w0.5-r3",
    }
    ramped = next(r for r in summary if r["branch"] == "ramped-s3-w0.5-r3")
    assert (ramped["start_step"], ramped["weight"], ramped["ramp_steps"]) == (3, 0.5, 3)
    assert check_figures_equal_summary(out, summary) == ["mid-qa-timing", "ramped-qa-ramp"]
    assert "![figure-mid-qa-timing](figure-mid-qa-timing.png)" in (out / "results.md").read_text()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = out / "pretrain" / "ramped-s3-w0.5-r3"
    assert "--trainer.callbacks.ramp_steps=3" in (run / "stage.log").read_text()
    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    code = {e.step: e.value for e in events.Scalars("mixture/weight/code")}
    assert [code[k] for k in (3, 4, 5, 6)] == pytest.approx([0.5 / 3, 1 / 3, 0.5, 0.5], abs=1e-6)
    capsys.readouterr()
    assert main(["experiment", "--config", str(tmp_path / "study.yaml")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sum("done already" in x for x in lines) == 1 + 6 + 14  # every stage: resumable
