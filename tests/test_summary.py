"""The end-of-run summary: pure formatting here; tests/test_console.py reads it from real runs."""

from __future__ import annotations

import math

from midtrain.train.callbacks.summary import (
    Summary,
    format_duration,
    format_value,
    next_commands,
    summary_file,
    summary_lines,
)


def _fit(**kw: object) -> Summary:
    base: dict = dict(
        command="fit",
        status="finished",
        step=300,
        max_steps=300,
        wall_seconds=125.0,
        run_dir="runs/demo",
        log_dir="runs/demo",
        metrics={"train/loss": 3.21, "val/prose/loss": 3.5, "val/code/loss": 2.5, "train/lr": 1e-4},
        tokens={"prose": 2_949_120, "code": 1_474_560},
        tokens_this_process=4_423_680,
        train_seconds=100.0,
        last_checkpoint="runs/demo/checkpoints/last.ckpt",
        config="runs/demo/config.yaml",
    )
    return Summary(**(base | kw))


def test_finished_fit_names_losses_tokens_paths_and_next_commands() -> None:
    text = "\n".join(summary_lines(_fit()))
    assert text.splitlines()[0] == "fit: finished at step 300/300 in 2m 05s, 44,237 tokens/s"
    assert "train/loss 3.2100  val/code/loss 2.5000  val/prose/loss 3.5000" in text
    assert "train/lr" not in text
    assert "prose 2.9M  code 1.5M  (total 4.4M)" in text
    assert "tensorboard --logdir runs/demo" in text
    assert (
        "midtrain validate --config runs/demo/config.yaml --trainer.logger true "
        "--ckpt_path runs/demo/checkpoints/last.ckpt" in text
    )
    assert "midtrain export --ckpt runs/demo/checkpoints/last.ckpt --out runs/demo/hf" in text
    assert "runs/demo/summary.json" in text


def test_nan_is_never_shown_as_a_number() -> None:
    assert format_value(math.nan) == "nan (diverged)"
    assert format_value(math.inf) == "inf (diverged)"
    text = "\n".join(summary_lines(_fit(metrics={"train/loss": math.nan})))
    assert "train/loss nan (diverged)" in text


def test_preempted_run_says_how_to_resume() -> None:
    lines = summary_lines(_fit(status="preempted", step=120))
    assert lines[0].startswith("fit: preempted at step 120/300")
    assert next_commands(_fit(status="preempted")) == [
        ("resume", "midtrain fit --config runs/demo/config.yaml --ckpt_path last")
    ]
    # a forked run resumes as itself: the saved config's --fork is switched off
    assert (
        "--fork null --ckpt_path last" in next_commands(_fit(status="preempted", forked=True))[0][1]
    )


def test_diverged_run_points_at_the_last_good_checkpoint() -> None:
    s = _fit(status="diverged", step=57, reason="non-finite loss nan at optimizer step 57")
    lines = summary_lines(s)
    assert lines[0] == (
        "fit: stopped (diverged) at step 57/300 in 2m 05s, 44,237 tokens/s: "
        "non-finite loss nan at optimizer step 57"
    )
    assert "--fork runs/demo/checkpoints/last.ckpt" in "\n".join(lines)
    assert (
        "no checkpoint was kept"
        in next_commands(_fit(status="diverged", last_checkpoint=None))[0][1]
    )


def test_validate_summary_has_its_own_file() -> None:
    s = _fit(command="validate", log_dir="runs/demo/validate", tokens={}, config=None)
    text = "\n".join(summary_lines(s))
    assert text.startswith("validate: done in 2m 05s")
    assert "runs/demo/validate/validate-summary.json" in text
    assert "tokens:" not in text
    assert summary_file("fit") == "summary.json"
    assert format_duration(3.21) == "3.2s"
    assert format_duration(7300) == "2h 01m"


def test_model_summary_shows_flops_per_token_not_zeros() -> None:
    from lightning.pytorch.utilities.model_summary import get_human_readable_count

    from midtrain.train.module import CausalLM
    from midtrain.train.summary_table import _flops_per_token, summary_table

    m = CausalLM(
        arch="pythia-14m",
        model_config={"n_layer": 2, "n_embd": 64, "n_head": 2, "block_size": 32},
        vocab_size=512,
    )
    m.configure_model()
    flops = _flops_per_token(m)
    assert flops == (m.model.flops_per_token(32), 32) and flops[0] > 0
    data = [("Name", ["model"]), ("Type", ["GPT"]), ("Params", ["165 K"]), ("FLOPs", ["0"])]
    text = summary_table(data, 165_000, 165_000, 0.66, flops)
    assert "FLOPs" not in text.splitlines()[0]
    assert text.splitlines()[-1].startswith(get_human_readable_count(int(flops[0])) + " ")
    assert "Training FLOPs per token (forward + backward, sequences of 32)" in text
    assert "Total Flops" not in text and "| 0" not in text
