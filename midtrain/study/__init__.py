"""``midtrain experiment``: a whole midtraining study from one config.

Stages, each a ``midtrain fit`` run in its own directory with its saved, reproducible config:

1. (optional) ``midtrain prepare`` for every listed prepare config (reused when unchanged);
2. the shared pretraining prefix, once: the **baseline** branch, saving a checkpoint at every
   start step a branch needs;
3. every other branch, forked from the prefix at its switch step (``--fork``): a grid of start
   steps costs one shared prefix;
4. SFT of every branch x target x learning rate x seed (``model.init_from`` the branch);
5. the report: best LR per branch and target by in-domain validation loss; mean ± std over
   seeds of in-domain loss and forgetting (general-corpus validation loss after SFT); relative
   improvement vs baseline and a Welch t-test p-value; the proximity advantage of the branch's
   mixture over the pretraining mixture for the target; any ``eval/*`` downstream scores.
   Written as results.csv, summary.csv, results.md and TensorBoard HParams; for every grid
   of more than one point, figures (``figures``: in-domain loss and forgetting against start
   step, one line per weight; against ramp length when it varies) as PNG and CSV.

Modules: ``config`` (the YAML, the resolved pretraining config, branches), ``plan`` (stages and
token plan), ``run`` (subprocess stages, fingerprints), ``stats`` (Welch, Spearman, Kendall),
``report``, ``figures`` (the ablation's PNG + CSV); ``similarity`` (the proximity measure),
``advisor`` (``midtrain advise``: ranks candidate mixtures per SFT target before training),
``calibration`` (``advise --check``: the advisor against a finished study), ``regression``
(``advise --fit``: a mixture regression on any table of runs), ``proxy`` (microanneals from a
run's checkpoints, the measured predictors) and ``sweep`` (``advise --proxy``: proxies, the
regression on them, the predicted best mixture).
"""

from __future__ import annotations

import time
from pathlib import Path

from midtrain.study.advisor import Advice, Candidate, Prediction, advise
from midtrain.study.calibration import Calibration, CalibrationRow, calibrate
from midtrain.study.config import ExperimentConfig, PretrainConfig, SFTConfig, expand_branches
from midtrain.study.figures import write_figures
from midtrain.study.plan import Stage, Study, describe_plan, plan_study
from midtrain.study.report import (
    collect,
    hparams_dir,
    proximity,
    sft_target_counts,
    summarize,
    write_report,
)
from midtrain.study.run import check_stages, run_stage

__all__ = [
    "Advice",
    "Calibration",
    "CalibrationRow",
    "Candidate",
    "Prediction",
    "advise",
    "calibrate",
    "ExperimentConfig",
    "PretrainConfig",
    "SFTConfig",
    "Stage",
    "Study",
    "describe_plan",
    "expand_branches",
    "plan_study",
    "run_experiment",
]


def run_experiment(
    cfg: ExperimentConfig, dry_run: bool = False, rerun_changed: bool = False
) -> str:
    """Plan, print the plan, run every stage not done with its current config, report."""
    study = plan_study(cfg)
    print(describe_plan(study))
    if dry_run:
        return ""
    inputs, stale = check_stages(study.stages, rerun_changed)  # refuses before touching disk
    stale_names = {s.name for s in stale}
    Path(cfg.output).mkdir(parents=True, exist_ok=True)
    n = len(study.stages)
    for i, stage in enumerate(study.stages, 1):
        t0 = time.perf_counter()
        print(f"[stage {i}/{n}] {stage.name} ...", flush=True)
        what = run_stage(stage, inputs.get(stage.name), stage.name in stale_names)
        print(f"[stage {i}/{n}] {stage.name}: {what} ({time.perf_counter() - t0:.0f}s)", flush=True)
    if study.data is None:  # the prepare stages have built the store since planning
        study = plan_study(cfg)
    rows = collect(study.stages, cfg.general)
    advantage = proximity(study, sft_target_counts(study))
    summary = summarize(rows, advantage, study.branches)
    figures, hint = write_figures(cfg.output, summary)
    table = write_report(cfg.output, cfg.general, rows, summary, figures)
    print("\n" + table)
    print(
        f"\nwritten {Path(cfg.output) / 'results.csv'}, summary.csv, results.md"
        + "".join(f", {f}" for f in figures)
        + f"; HParams table: tensorboard --logdir {hparams_dir(cfg.output)}"
    )
    if hint:
        print(hint)
    return table
