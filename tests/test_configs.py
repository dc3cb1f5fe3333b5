"""Every shipped config parses, and the stacked overlays carry the study's switches."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from midtrain.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

STACKS = [
    ("pretrain/demo.yaml", None, None),
    # the README's main job: a fraction, so a shorter try switches at 70% of it too
    ("pretrain/demo.yaml", "midtrain/demo.yaml", (None, {"prose": 0.4, "code": 0.3, "math": 0.3})),
    ("pretrain/cpu.yaml", None, None),
    ("pretrain/cpu.yaml", "midtrain/cpu-code.yaml", (40, {"prose": 0.8, "code": 0.2})),
    ("pretrain/cpu.yaml", "midtrain/cpu-math.yaml", (131, {"prose": 0.88, "math": 0.12})),
    ("pretrain/cpu.yaml", "cpt/cpu-code.yaml", (262, {"code": 1.0})),
    ("pretrain/cpu.yaml", "cpt/cpu-math.yaml", (367, {"math": 1.0})),
    ("pretrain/paper.yaml", None, None),
    ("pretrain/paper.yaml", "midtrain/paper-code.yaml", (6000, {"c4": 0.8, "starcoder": 0.2})),
    ("pretrain/paper.yaml", "midtrain/paper-code-70m.yaml", (10000, {"c4": 0.8, "starcoder": 0.2})),
    ("pretrain/paper.yaml", "midtrain/paper-math.yaml", (20000, {"c4": 0.88, "math": 0.12})),
    ("pretrain/paper.yaml", "midtrain/paper-flan.yaml", (40000, {"c4": 0.95, "flan": 0.05})),
    (
        "pretrain/paper.yaml",
        "midtrain/paper-knowledge_qa.yaml",
        (40000, {"c4": 0.8, "knowledge_qa": 0.2}),
    ),
    ("pretrain/paper.yaml", "midtrain/paper-dclm.yaml", (40000, {"c4": 0.8, "dclm": 0.2})),
    ("pretrain/paper.yaml", "cpt/paper-code.yaml", (40000, {"starcoder": 1.0})),
    ("pretrain/paper.yaml", "cpt/paper-math.yaml", (56000, {"math": 1.0})),
    ("midtrain/paper-pythia-pile.yaml", None, (2000, {"pile": 0.8, "code": 0.2})),
    ("midtrain/cpu-pythia-pile.yaml", None, (8, {"pile": 0.8, "code": 0.2})),
    ("pretrain/paper.yaml", "strategy/fsdp2.yaml", None),
    ("pretrain/paper.yaml", "strategy/ddp.yaml", None),
]


@pytest.mark.parametrize(
    "base,overlay,switch", STACKS, ids=[f"{b}+{o}" if o else b for b, o, _ in STACKS]
)
def test_config_parses(
    base: str, overlay: str | None, switch: tuple | None, capsys: pytest.CaptureFixture
) -> None:
    args = ["fit", "--config", str(CONFIGS / base)]
    if overlay:
        args += ["--config", str(CONFIGS / overlay)]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--print_config"])
    assert exit_info.value.code in (0, None)
    cfg = yaml.safe_load(capsys.readouterr().out)
    callbacks = cfg["trainer"].get("callbacks") or []
    switches = [c["init_args"] for c in callbacks if c["class_path"].endswith("MixtureSwitch")]
    if switch is None:
        assert switches == []
    else:
        assert [(s["step"], s["weights"]) for s in switches] == [switch]
    if base.endswith(("paper.yaml", "paper-pythia-pile.yaml")):
        steps, micro = cfg["trainer"]["max_steps"], cfg["data"]["init_args"]["micro_batch_size"]
        assert steps == (43000 if "pythia" in base else 61035)
        assert cfg["data"]["init_args"]["seq_len"] == 2048
        assert micro * cfg["trainer"]["accumulate_grad_batches"] * cfg["trainer"]["devices"] == 1024


def test_prepare_configs_parse(capsys: pytest.CaptureFixture) -> None:
    names = ("demo", "paper", "pythia-pile", "cpu-pythia-pile")
    for name in (f"prepare/{n}.yaml" for n in names):
        with pytest.raises(SystemExit):
            main(["prepare", "--config", str(CONFIGS / name), "--print_config"])
        cfg = yaml.safe_load(capsys.readouterr().out)
        assert cfg["domains"]
