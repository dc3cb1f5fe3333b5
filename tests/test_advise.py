"""The mixture advisor: rankings with known answers, the calibration statistics against an
independent count, bad input, and the command end to end."""

from __future__ import annotations

import csv
import itertools
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import yaml

from midtrain.cli import main
from midtrain.errors import MidtrainError
from midtrain.study import advise, calibrate
from midtrain.study.advisor import PREDICTORS
from midtrain.study.stats import kendall, spearman
from tests.conftest import prepare_store
from tests.test_experiment import study  # noqa: F401  (the micro study, for the slow test)

BRANCHES = {
    "mid": {"grid": {"domain": "same", "start": [1], "weight": [0.5]}},
    "far": {"grid": {"domain": "disjoint", "start": [1], "weight": [0.5]}},
    "late": {"grid": {"domain": "same", "start": [80], "weight": [0.5]}},
}


def _words(rng: random.Random, letters: str, n: int) -> str:
    return " ".join(
        "".join(rng.choice(letters) for _ in range(rng.randint(2, 6))) for _ in range(n)
    )


@pytest.fixture(scope="module")
def constructed_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``general`` and ``target`` words from overlapping parts of the alphabet, ``same`` a copy
    of ``target``, ``disjoint`` digit strings with no spaces (no token in common with the rest)."""
    root = tmp_path_factory.mktemp("advise")
    rng = random.Random(0)
    texts = {
        "general": [_words(rng, "abcdefghijklmnopq", 60) for _ in range(120)],
        "target": [_words(rng, "ijklmnopqrstuvwxyz", 60) for _ in range(120)],
        "disjoint": ["".join(rng.choice("0123456789") for _ in range(300)) for _ in range(120)],
    }
    texts["same"] = texts["target"]
    domains = {}
    for name, docs in texts.items():
        path = root / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
        domains[name] = {"source": {"path": str(path)}, "val_fraction": 0.1}
    return prepare_store(root / "store", domains, 512)


def _advise(store: Path, **kwargs: object) -> object:
    args = {
        "store": str(store),
        "pretraining": {"general": 1.0},
        "branches": BRANCHES,
        "targets": {"t": {"target": "target"}},
        "max_steps": 100,
        "num_docs": 60,
        "top_k": 200,
        "bootstrap": 20,
    }
    return advise(**{**args, **kwargs})


@pytest.mark.parametrize("rank_by", ["proximity", "proximity_seen", "unigram_gain"])
def test_identical_candidate_ranks_first_and_disjoint_last(
    constructed_store: Path, rank_by: str
) -> None:
    advice = _advise(constructed_store, rank_by=rank_by)
    names = [p.candidate.name for p in advice.for_target("t")]
    assert names[0] == "mid-s1-w0.5" and names[-1] == "far-s1-w0.5"
    assert [p.rank for p in advice.for_target("t")] == [1, 2, 3, 4]
    assert advice.for_target("t")[-1].predicted < 0  # worse than the baseline, not tied
    for p in advice.predictions:
        assert p.features[rank_by] == p.predicted
        assert set(p.features) == set(PREDICTORS)
        assert p.low <= p.high


def test_seen_mixture_counts_the_start_step(constructed_store: Path) -> None:
    advice = _advise(constructed_store)
    f = {p.candidate.name: p.features for p in advice.predictions}
    # the same mixture after the switch, so the paper's measure cannot tell them apart ...
    assert f["late-s80-w0.5"]["proximity"] == pytest.approx(f["mid-s1-w0.5"]["proximity"])
    # ... but 20% of the run seen with it is less than 99% (a branch forks after step 1 at the
    # earliest: there is no checkpoint to fork from at step 0)
    assert 0 < f["late-s80-w0.5"]["proximity_seen"] < f["mid-s1-w0.5"]["proximity_seen"]
    assert 0 < f["late-s80-w0.5"]["unigram_gain"] < f["mid-s1-w0.5"]["unigram_gain"]
    assert f["baseline"] == {k: pytest.approx(0.0, abs=1e-12) for k in PREDICTORS}
    assert f["far-s1-w0.5"]["retention"] < f["late-s80-w0.5"]["retention"] < 0


def test_file_target_equals_the_same_documents_from_the_store(
    constructed_store: Path, tmp_path: Path
) -> None:
    from midtrain.data.store import Store

    split = Store(constructed_store).domain("target").train
    path = tmp_path / "t.txt"
    # paragraphs: one document each, in the store's order, so the same seeded sample is taken
    from midtrain.data.tokenizer import load_tokenizer

    tok = load_tokenizer(str(Store(constructed_store).tokenizer_path))
    docs = [tok.decode(split.document(i).tolist()) for i in range(split.num_docs)]
    path.write_text("\n\n".join(docs))
    from_file = _advise(constructed_store, targets={"t": {"file": str(path)}})
    from_store = _advise(constructed_store)
    assert [p.features for p in from_file.predictions] == [
        p.features for p in from_store.predictions
    ]


def _pair_count(x: list[float], y: list[float]) -> float:
    """Kendall's tau-b by counting pairs one at a time."""
    concordant = discordant = tied_x = tied_y = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        dx, dy = x[i] - x[j], y[i] - y[j]
        if dx == 0 and dy == 0:
            tied_x += 1
            tied_y += 1
        elif dx == 0:
            tied_x += 1
        elif dy == 0:
            tied_y += 1
        elif dx * dy > 0:
            concordant += 1
        else:
            discordant += 1
    n = len(x) * (len(x) - 1) // 2
    return (concordant - discordant) / math.sqrt((n - tied_x) * (n - tied_y))


def _spearman_by_hand(x: list[float], y: list[float]) -> float:
    def ranks(v: list[float]) -> list[float]:
        # a value's rank: 1 + how many are smaller + half of the others equal to it
        return [1 + sum(w < a for w in v) + (sum(w == a for w in v) - 1) / 2 for a in v]

    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    var = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return cov / var


@pytest.mark.parametrize("seed", range(5))
def test_rank_correlations_equal_an_independent_count(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randint(3, 12)
    x = [float(rng.randint(0, 4)) for _ in range(n)]  # ties on purpose
    y = [float(rng.randint(0, 4)) for _ in range(n)]
    if len(set(x)) < 2 or len(set(y)) < 2:
        x[0], y[0] = 9.0, 9.0
    assert kendall(np.array(x), np.array(y)) == pytest.approx(_pair_count(x, y), abs=1e-12)
    assert spearman(np.array(x), np.array(y)) == pytest.approx(_spearman_by_hand(x, y), abs=1e-12)
    try:
        from scipy import stats
    except ImportError:  # scipy is not a dependency: the pair count above is the check
        return
    assert kendall(np.array(x), np.array(y)) == pytest.approx(stats.kendalltau(x, y)[0])
    assert spearman(np.array(x), np.array(y)) == pytest.approx(stats.spearmanr(x, y)[0])


def test_rank_correlations_of_known_orders() -> None:
    x = np.arange(6.0)
    assert spearman(x, x * 3) == pytest.approx(1.0) and kendall(x, x * 3) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0) and kendall(x, -x) == pytest.approx(-1.0)
    assert math.isnan(kendall(x, np.zeros(6))) and math.isnan(spearman(x[:1], x[:1]))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"min_tokens": 10**9}, "targets.t: "),
        ({"targets": {"t": {"target": "nope"}}}, "targets.t.target: unknown domain 'nope'"),
        ({"targets": {"t": {"file": "missing.jsonl"}}}, "targets.t.file: file not found"),
        ({"targets": {"t": {"target": "target", "extra": 1}}}, "targets.t: give `target`"),
        ({"targets": {"t": {"file": __file__}}}, "targets.t.file: "),
        (
            {"branches": {"x": {"grid": {"domain": "poetry", "start": [1], "weight": [0.5]}}}},
            "branches.x: candidate domain 'poetry' is not in the store",
        ),
        (
            {"branches": {"x": {"switch": {"step": 100, "weights": {"same": 1.0}}}}},
            "branches.x: start step 100 is not in [0, max_steps=100)",
        ),
        ({"rank_by": "vibes"}, "rank_by: 'vibes' is not one of"),
        ({"pretraining": {"c4": 1.0}}, "pretraining: domain 'c4' is not in the store"),
    ],
)
def test_bad_input_is_one_line_naming_it(
    constructed_store: Path, kwargs: dict, message: str
) -> None:
    with pytest.raises(MidtrainError) as e:
        _advise(constructed_store, **kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_too_small_target_names_the_measure(constructed_store: Path) -> None:
    with pytest.raises(MidtrainError, match=r"needs at least 1000000 tokens \(min_tokens\)"):
        _advise(constructed_store, min_tokens=1_000_000)


def test_command_end_to_end_on_the_builtin_store(
    builtin_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    sft = tmp_path / "sft.jsonl"
    sft.write_text(
        "".join(
            json.dumps({"q": f"What is {i} + {i}?", "a": f"{2 * i}"}) + "\n" for i in range(300)
        )
    )
    config = {
        "store": str(builtin_store),
        "pretraining": {"prose": 1.0},
        "max_steps": 100,
        "branches": {
            "mid": {"grid": {"domain": "code", "start": [10], "weight": [0.2]}},
            "math": {"grid": {"domain": "math", "start": [10], "weight": [0.2]}},
        },
        "targets": {
            "code": {"target": "code"},
            "qa": {"file": str(sft), "text": "Question: {q}\nAnswer: {a}"},
        },
        "num_docs": 40,
        "top_k": 300,
        "bootstrap": 10,
    }
    (tmp_path / "advise.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    assert main(["advise", "--config", str(tmp_path / "advise.yaml"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| code | 1 | mid-s10-w0.2 |" in printed and "| qa | 1 | math-s10-w0.2 |" in printed
    with (out / "advice.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and {r["target"] for r in rows} == {"code", "qa"}
    assert {"predicted", "low", "high", *PREDICTORS} <= set(rows[0])
    # bad input: one line, exit 2, nothing written
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**config, "targets": {"code": {"target": "poetry"}}}))
    assert main(["advise", "--config", str(bad), "--out", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("midtrain advise: error: targets.code.target:") and "\n" not in err
    assert not (tmp_path / "none").exists()


def _study_dir(root: Path, store: Path) -> Path:
    """The files ``advise --check`` reads of a finished study, as its stages write them: the
    baseline's and each branch's saved fit config, an SFT run's config, and summary.csv."""
    data = {"store": str(store), "weights": {"general": 1.0}, "seq_len": 16, "micro_batch_size": 4}

    def fit_config(callbacks: list) -> dict:
        return {"data": {"init_args": data}, "trainer": {"max_steps": 100, "callbacks": callbacks}}

    def write(path: Path, cfg: dict) -> None:
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.yaml").write_text(yaml.safe_dump(cfg))

    write(root / "pretrain" / "baseline", fit_config([]))
    branches = {
        "mid": (0, {"general": 0.5, "same": 0.5}),
        "far": (0, {"general": 0.5, "disjoint": 0.5}),
        "late": (80, {"general": 0.5, "same": 0.5}),
    }
    for name, (step, weights) in branches.items():
        switch = {
            "class_path": "midtrain.callbacks.MixtureSwitch",
            "init_args": {"step": step, "weights": weights},
        }
        write(root / "pretrain" / name, fit_config([switch]))
    sft = {"data": {"init_args": {"store": str(store), "target": "target"}}}
    write(root / "sft" / "baseline" / "t" / "lr0.001-seed0", sft)
    measured = {
        "baseline": ("", ""),
        "mid": (0.05, -0.01),
        "late": (0.02, -0.002),
        "far": (-0.01, -0.03),
    }
    with (root / "summary.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["target", "branch", "in_domain_rel_improvement", "forgetting_rel_improvement"])
        for name, (ind, forg) in measured.items():
            w.writerow(["t", name, ind, forg])
    return root


def test_check_equals_an_independent_recomputation(constructed_store: Path, tmp_path: Path) -> None:
    cal = calibrate(str(_study_dir(tmp_path / "study", constructed_store)), num_docs=60, top_k=200)
    preds = cal.advice.for_target("t")
    assert {p.candidate.name: p.candidate.start for p in preds} == {
        "baseline": None,
        "mid": 0,
        "late": 80,
        "far": 0,
    }
    assert len(cal.rows) == 2 * len(PREDICTORS)
    for row in cal.rows:
        x = [p.features[row.predictor] for p in preds]
        y = [cal.measured[("t", p.candidate.name)][row.measure] for p in preds]
        assert (row.n, row.pairs) == (4, 6)
        assert row.kendall == pytest.approx(_pair_count(x, y), abs=1e-12)
        assert row.spearman == pytest.approx(_spearman_by_hand(x, y), abs=1e-12)
    by = {(r.measure, r.predictor): r for r in cal.rows}
    # mid > late > baseline > far, measured and predicted alike (see _study_dir)
    assert by[("in_domain", "proximity_seen")].kendall == pytest.approx(1.0)
    assert by[("in_domain", "unigram_gain")].spearman == pytest.approx(1.0)


def test_check_command_writes_the_table_and_figure(
    constructed_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    study_dir = _study_dir(tmp_path / "study", constructed_store)
    args = ["--num_docs", "60", "--top_k", "200", "--bootstrap", "5"]
    assert main(["advise", "--check", str(study_dir), *args]) == 0
    printed = capsys.readouterr().out
    assert "| t | in_domain | proximity_seen | 4 | 6 | +1.000 | +1.000 |" in printed
    out = study_dir / "advise"
    with (out / "calibration.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 2 * len(PREDICTORS)
    with (out / "advice.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {r["candidate"]: r["measured_in_domain"] for r in rows}["mid"] == "0.05"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "no figure: matplotlib is not installed" in printed
    else:
        assert (out / "calibration.png").read_bytes()[:4] == b"\x89PNG"


def test_check_refuses_a_study_without_a_summary(
    constructed_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    study_dir = _study_dir(tmp_path / "study", constructed_store)
    (study_dir / "summary.csv").unlink()
    assert main(["advise", "--check", str(study_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"midtrain advise: error: advise --check: {study_dir} has no finished study (no "
        "summary.csv); run `midtrain experiment --config <study.yaml>` to the end first"
    )
    assert not (study_dir / "advise").exists()


@pytest.mark.slow
def test_check_reads_a_real_study_and_its_paper_measure_is_the_studys(
    study: Path,  # noqa: F811  (the fixture imported above)
    capsys: pytest.CaptureFixture,
) -> None:
    """On test_experiment's micro study (run here): the advisor's ``proximity`` of each branch
    equals the study's own proximity advantage (same samples, same measure, one place)."""
    out = study / "out"
    args = ["--num_docs", "20", "--top_k", "200", "--min_tokens", "50", "--bootstrap", "5"]
    assert main(["advise", "--check", str(out), *args]) == 0
    assert "| qa | in_domain | proximity_seen | 2 | 1 |" in capsys.readouterr().out
    with (out / "summary.csv").open() as f:
        summary = {r["branch"]: r for r in csv.DictReader(f)}
    with (out / "advise" / "advice.csv").open() as f:
        advice = {r["candidate"]: r for r in csv.DictReader(f)}
    assert advice.keys() == summary.keys() == {"baseline", "mid-s4-w0.5"}
    assert advice["mid-s4-w0.5"]["start"] == "4"
    assert float(advice["mid-s4-w0.5"]["proximity"]) == pytest.approx(
        float(summary["mid-s4-w0.5"]["proximity_advantage"]), abs=1e-12
    )
    assert float(advice["mid-s4-w0.5"]["measured_in_domain"]) == pytest.approx(
        float(summary["mid-s4-w0.5"]["in_domain_rel_improvement"])
    )


def test_check_refuses_proxy_steps_past_the_run(
    constructed_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The branch starting at step 80 of 100 has room for 20 proxy steps, not 30; refused
    before any proxy runs, nothing written."""
    study_dir = _study_dir(tmp_path / "study", constructed_store)
    args = ["--num_docs", "60", "--top_k", "200", "--bootstrap", "0", "--proxy_steps", "30"]
    assert main(["advise", "--check", str(study_dir), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "midtrain advise: error: --proxy_steps: 30 proxy steps from late's start step 80 run "
        "past the run's trainer.max_steps=100; give at most 20"
    )
    assert not (study_dir / "advise").exists()
