"""Hugging Face export/import, generation with a KV cache, lm-evaluation-harness both ways and
in-loop downstream evaluation (needs the hf / eval extras: skipped cleanly without them)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from midtrain.checkpoint.load import load_checkpoint, load_model  # noqa: E402
from midtrain.cli import main  # noqa: E402
from midtrain.errors import MidtrainError  # noqa: E402
from midtrain.model import hf  # noqa: E402
from midtrain.model.generation import Sampling, generate_ids  # noqa: E402
from midtrain.model.gpt import GPT  # noqa: E402

ARCHS = {
    "pythia": {
        "arch": "tiny",
        "model_config": {"n_layer": 2, "n_embd": 64, "n_head": 4, "block_size": 64},
    },
    "llama": {
        "arch": "llama-tiny",
        "model_config": {"n_layer": 2, "n_embd": 64, "n_head": 4, "block_size": 64, "bias": True},
    },
}


def fit_config(
    tmp: Path, store: Path, run: str, model: dict, steps: int = 2, **extra: object
) -> Path:
    cfg = {
        "seed_everything": 0,
        "model": {**model, "lr": 3e-3, "warmup": 1},
        "data": {
            "class_path": "midtrain.MixtureDataModule",
            "init_args": {
                "store": str(store),
                "seq_len": 32,
                "micro_batch_size": 4,
                "val_max_blocks": 2,
            },
        },
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": steps,
            "log_every_n_steps": 1,
            "default_root_dir": str(tmp / run),
            "enable_progress_bar": False,
            "num_sanity_val_steps": 0,
            "limit_val_batches": 0,
            "enable_model_summary": False,
        },
        **extra,
    }
    path = tmp / f"{run}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def perturbed(ckpt: Path, seed: int = 0) -> Path:
    """The checkpoint with noise on every weight (biases and norm parameters too: a fresh
    model has zero biases and unit norms, which would hide mapping mistakes)."""
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    g = torch.Generator().manual_seed(seed)
    for k, v in state["state_dict"].items():
        state["state_dict"][k] = v + 0.2 * torch.randn(v.shape, generator=g)
    out = ckpt.with_name("perturbed.ckpt")
    torch.save(state, out)
    return out


@pytest.fixture(scope="module", params=list(ARCHS))
def run(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, builtin_store: Path
) -> Path:
    """A real 2-step run of a pythia- or llama-shaped model; returns a perturbed checkpoint
    inside the run's checkpoints/ (so the run's config.yaml names the store)."""
    tmp = tmp_path_factory.mktemp(request.param)
    assert (
        main(["fit", "--config", str(fit_config(tmp, builtin_store, "run", ARCHS[request.param]))])
        == 0
    )
    return perturbed(tmp / "run" / "checkpoints" / "last.ckpt")


def one_arch(run: Path, arch: str = "pythia") -> None:
    """Tests of plumbing that does not depend on the architecture run once (CPU time)."""
    if run.parents[2].name.rstrip("0123456789") != arch:
        pytest.skip(f"covered by the {arch} run")


def exported(ckpt: Path) -> Path:
    out = ckpt.parent.parent / "hf"
    if not out.exists():
        assert main(["export", "--ckpt", str(ckpt), "--out", str(out)]) == 0
    return out


# -- export -----------------------------------------------------------------------------------


def test_export_matches_transformers(run: Path, builtin_store: Path) -> None:
    out = exported(run)
    config, state, _ = load_checkpoint(run)
    ours = GPT(config)
    ours.load_state_dict(state)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    expected = "GPTNeoXForCausalLM" if config.mlp == "gelu" else "LlamaForCausalLM"
    assert type(theirs).__name__ == expected
    idx = torch.randint(0, 512, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ours(idx) - theirs(idx).logits).abs().max().item()
    assert diff <= 1e-5
    # the run's tokenizer, with EOS/BOS, loads with no extra code
    tok = transformers.AutoTokenizer.from_pretrained(out)
    store_tok = json.loads((builtin_store / "store.json").read_text())
    assert tok.eos_token == store_tok["eos"] == tok.bos_token
    assert tok.eos_token_id == store_tok["eos_id"] == theirs.generation_config.eos_token_id
    from tokenizers import Tokenizer

    text = "def f(x):\n    return x + 1  # Question: 12 + 30?"
    assert (
        tok(text)["input_ids"]
        == Tokenizer.from_file(str(builtin_store / "tokenizer.json")).encode(text).ids
    )
    assert not list(out.parent.glob(".hf.*"))  # no temporary directory left behind


@pytest.mark.parametrize(
    ("arch", "overrides"),
    [
        ("tiny", {"parallel_residual": False, "tie_embeddings": True, "rotary_pct": 0.5}),
        ("llama-tiny", {"tie_embeddings": True, "bias": True, "norm_eps": 1e-5}),
    ],
)
def test_mapping_variants_round_trip(arch: str, overrides: dict, tmp_path: Path) -> None:
    """Options beyond the presets (tied embeddings, sequential residual, rotary share, biases)
    survive GPT -> transformers -> GPT with the same logits."""
    from huggingface_hub import save_torch_state_dict

    from midtrain.model.config import ModelConfig

    config = ModelConfig.from_name(arch, **overrides)
    torch.manual_seed(0)
    ours = GPT(config)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.2 * torch.randn_like(p))
    hf.to_hf_config(config).save_pretrained(tmp_path)
    save_torch_state_dict(hf.to_hf_state_dict(ours.state_dict(), config), tmp_path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    back_config, back_state = hf.load(f"hf:{tmp_path}")
    back = GPT(back_config)
    back.load_state_dict(back_state)
    idx = torch.randint(0, 512, (2, 33), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = ours(idx)
        assert (theirs(idx).logits - expected).abs().max().item() <= 1e-5
        assert torch.equal(back(idx), expected)


@pytest.mark.parametrize(
    ("arch", "overrides", "message"),
    [
        ("tiny", {"bias": False}, "bias=False with a GELU MLP"),
        ("tiny", {"norm": "rmsnorm"}, "norm='rmsnorm' with a GELU MLP"),
        ("llama-tiny", {"norm": "layernorm"}, "norm='layernorm' with a SwiGLU MLP"),
        ("llama-tiny", {"parallel_residual": True}, "parallel_residual=True"),
        ("llama-tiny", {"rotary_pct": 0.5}, "rotary_pct=0.5"),
    ],
)
def test_export_refuses_what_transformers_cannot_express(
    arch: str, overrides: dict, message: str
) -> None:
    from midtrain.model.config import ModelConfig

    with pytest.raises(MidtrainError, match=message):
        hf.hf_architecture(ModelConfig.from_name(arch, **overrides))


def test_export_bf16_sharded(run: Path, tmp_path: Path) -> None:
    one_arch(run, "llama")
    out = tmp_path / "bf16"
    assert (
        main(
            [
                "export",
                "--ckpt",
                str(run),
                "--out",
                str(out),
                "--dtype",
                "bf16",
                "--max_shard_size",
                "20KB",
            ]
        )
        == 0
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    _, state, _ = load_checkpoint(run)
    assert torch.equal(model.get_input_embeddings().weight, state["embed.weight"].bfloat16())


def test_export_refuses_bad_input(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def fails(*args: str) -> str:
        capsys.readouterr()
        assert main(["export", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1
        return err

    out = tmp_path / "out"
    not_ckpt = tmp_path / "notes.txt"
    not_ckpt.write_text("hello")
    assert "not a checkpoint" in fails("--ckpt", str(not_ckpt), "--out", str(out))
    assert "not found" in fails("--ckpt", str(tmp_path / "nope.ckpt"), "--out", str(out))
    # an option transformers cannot express (a GELU MLP with RMSNorm)
    state = torch.load(run, map_location="cpu", weights_only=True)
    state["hyper_parameters"]["model_config"] = {
        **state["hyper_parameters"]["model_config"],
        "norm": "rmsnorm",
        "mlp": "gelu",
    }
    odd = run.with_name("odd.ckpt")
    torch.save(state, odd)
    assert "norm='rmsnorm'" in fails("--ckpt", str(odd), "--out", str(out))
    # a tokenizer with more tokens than the model's vocabulary
    from tokenizers import Tokenizer, models

    big = Tokenizer(models.WordLevel({f"w{i}": i for i in range(600)}, unk_token="w0"))
    big.save(str(tmp_path / "big.json"))
    assert "600 tokens" in fails(
        "--ckpt", str(run), "--out", str(out), "--tokenizer", str(tmp_path / "big.json")
    )
    existing = tmp_path / "existing"
    existing.mkdir()
    assert "exists" in fails("--ckpt", str(run), "--out", str(existing))
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


# -- import -----------------------------------------------------------------------------------


_SHAPE = dict(
    vocab_size=512,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=2,
    intermediate_size=96,
    max_position_embeddings=64,
)
_LLAMA3 = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
# Today's small bases in miniature: GQA everywhere, each architecture's own options.
NEW_KINDS = {
    "llama-gqa": lambda: transformers.LlamaConfig(
        **_SHAPE, tie_word_embeddings=True, rope_parameters=_LLAMA3
    ),
    "qwen2": lambda: transformers.Qwen2Config(**_SHAPE, tie_word_embeddings=False),
    "qwen3": lambda: transformers.Qwen3Config(**_SHAPE, head_dim=16, tie_word_embeddings=True),
    "olmo2": lambda: transformers.Olmo2Config(**_SHAPE, pad_token_id=None),
}


def random_hf_model(kind: str, directory: Path, store: Path) -> Path:
    """A random transformers model (non-trivial biases and norms) saved with save_pretrained,
    with the store's tokenizer: what a released checkpoint looks like, offline."""
    torch.manual_seed(0)
    if kind == "pythia":
        config = transformers.GPTNeoXConfig(
            vocab_size=512,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=256,
            max_position_embeddings=64,
            use_parallel_residual=True,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.25,
            },
            hidden_act="gelu",
        )
    elif kind in NEW_KINDS:
        config = NEW_KINDS[kind]()
    else:
        config = transformers.LlamaConfig(
            vocab_size=512,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            intermediate_size=172,
            max_position_embeddings=64,
            tie_word_embeddings=False,
        )
    eos = json.loads((store / "store.json").read_text())["eos_id"]
    config.bos_token_id = config.eos_token_id = eos  # as Pythia: <|endoftext|> is both
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(directory)
    transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(store / "tokenizer.json"), eos_token="<|endoftext|>"
    ).save_pretrained(directory)
    return directory


@pytest.mark.parametrize("kind", [*ARCHS, *NEW_KINDS])
def test_import_matches_transformers(kind: str, tmp_path: Path, builtin_store: Path) -> None:
    from midtrain.train.module import CausalLM

    directory = random_hf_model(kind, tmp_path / kind, builtin_store)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    lm = CausalLM(init_from=f"hf:{directory}")
    lm.configure_model()
    idx = torch.randint(0, 512, (2, 50), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (lm.model(idx) - theirs(idx).logits).abs().max().item() <= 1e-5
    assert lm.hparams.model_config["n_layer"] == 2  # the resolved shape is kept in hparams
    # consistent explicit settings pass; conflicting ones are one-line errors
    CausalLM(init_from=f"hf:{directory}", model_config={"n_layer": 2, "block_size": 32})
    with pytest.raises(MidtrainError, match=r"model_config.n_layer=3 conflicts"):
        CausalLM(init_from=f"hf:{directory}", model_config={"n_layer": 3})


@pytest.mark.parametrize("kind", list(NEW_KINDS))
def test_new_kinds_generate_and_export_like_transformers(
    kind: str, tmp_path: Path, builtin_store: Path
) -> None:
    """Greedy KV-cache generation equals transformers' generate; GPT -> transformers gives
    the same class and logits back."""
    from huggingface_hub import save_torch_state_dict

    directory = random_hf_model(kind, tmp_path / kind, builtin_store)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    config, state = hf.load(f"hf:{directory}")
    ours = GPT(config).eval()
    ours.load_state_dict(state)
    prompts = [[5, 17, 300, 2], [9, 8], [400]]
    got = generate_ids(ours, prompts, Sampling(max_new_tokens=12))
    for prompt, new in zip(prompts, got, strict=True):
        out = theirs.generate(
            torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None
        )
        assert out[0, len(prompt) :].tolist() == new
    hf.to_hf_config(config).save_pretrained(tmp_path / "out")
    save_torch_state_dict(hf.to_hf_state_dict(ours.state_dict(), config), tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(back) is type(theirs)
    idx = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (back(idx).logits - ours(idx)).abs().max().item() <= 1e-5


@pytest.mark.parametrize(
    ("kind", "change", "message"),
    [
        ("qwen2", {"use_sliding_window": True}, "use_sliding_window=true"),
        ("qwen3", {"layer_types": ["sliding_attention"] * 2}, "layer_types 'sliding_attention'"),
        ("qwen3", {"attention_bias": True}, "attention_bias=true is not supported for qwen3"),
        ("llama-gqa", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "'yarn'"),
        ("qwen2", {"model_type": "qwen2_moe"}, "model_type 'qwen2_moe' is not supported"),
        ("olmo2", {"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ],
)
def test_import_refuses_what_gpt_cannot_compute(
    kind: str, change: dict, message: str, tmp_path: Path, builtin_store: Path
) -> None:
    directory = random_hf_model(kind, tmp_path / kind, builtin_store)
    cfg = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(MidtrainError, match=message) as e:
        hf.load(f"hf:{directory}")
    assert "\n" not in str(e.value)


def test_import_refuses_bad_input(tmp_path: Path, builtin_store: Path) -> None:
    from midtrain.train.module import CausalLM

    gpt2 = tmp_path / "gpt2"
    transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64).save_pretrained(gpt2)
    with pytest.raises(MidtrainError, match="model_type 'gpt2' is not supported"):
        CausalLM(init_from=f"hf:{gpt2}")
    directory = random_hf_model("pythia", tmp_path / "p", builtin_store)
    with pytest.raises(MidtrainError, match="applies only to hub ids"):
        CausalLM(init_from=f"hf:{directory}@step1000")
    with pytest.raises(MidtrainError, match="could not fetch") as e:  # offline in tests
        CausalLM(init_from="hf:EleutherAI/pythia-14m@step1000")
    assert "\n" not in str(e.value)
    with pytest.raises(MidtrainError, match="directory not found"):
        CausalLM(init_from=f"hf:{tmp_path}/missing")


def test_import_refuses_another_tokenizer(tmp_path: Path, builtin_store: Path) -> None:
    from tokenizers import Tokenizer, models

    from midtrain.data.datamodule import MixtureDataModule
    from midtrain.train.module import CausalLM

    directory = random_hf_model("pythia", tmp_path / "hf", builtin_store)
    data = MixtureDataModule(str(builtin_store), seq_len=32)
    CausalLM(init_from=f"hf:{directory}").connect(data)  # the same tokenizer passes
    other = Tokenizer(models.WordLevel({f"w{i}": i for i in range(300)}, unk_token="w0"))
    other.save(str(directory / "tokenizer.json"))
    with pytest.raises(MidtrainError, match="tokenized with another tokenizer"):
        CausalLM(init_from=f"hf:{directory}").connect(data)


@pytest.mark.parametrize("kind", ["pythia", "llama-gqa"])
def test_continue_training_from_imported_model(
    kind: str, tmp_path: Path, builtin_store: Path
) -> None:
    """Loss at step 0 of `fit --model.init_from hf:<dir>` equals transformers' loss on the
    same batch (float32), for Pythia and a GQA Llama 3 (llama3 rope, tied embeddings)."""
    import torch.nn.functional as F
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    directory = random_hf_model(kind, tmp_path / "hf", builtin_store)
    batch_file = tmp_path / "batch.pt"
    cfg = fit_config(tmp_path, builtin_store, "cont", {"init_from": f"hf:{directory}"}, steps=1)
    assert (
        main(
            [
                "fit",
                "--config",
                str(cfg),
                "--trainer.callbacks+=tests.helpers.SaveBatches",
                f"--trainer.callbacks.path={batch_file}",
            ]
        )
        == 0
    )
    batch = torch.load(batch_file, weights_only=True)[0]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    with torch.no_grad():
        logits = theirs(batch["input_ids"]).logits
    ce = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), reduction="none")
    mask = batch["loss_mask"].flatten().float()
    expected = float((ce * mask).sum() / mask.sum())
    ea = EventAccumulator(str(tmp_path / "cont"))
    ea.Reload()
    logged = {e.step: e.value for e in ea.Scalars("train/loss")}
    assert logged[0] == pytest.approx(expected, abs=1e-5)


# -- generation -------------------------------------------------------------------------------


def test_generation_cache_matches_full_and_transformers(run: Path) -> None:
    model, tok, eos = load_model(str(run))
    prompts = [tok.encode(p).ids for p in ("def add(a, b):", "Question: 3 + 4 =", "The")]
    sampling = Sampling(max_new_tokens=15)
    cached = generate_ids(model, prompts, sampling)
    assert cached == generate_ids(model, prompts, sampling, use_cache=False)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(exported(run)).eval()
    for prompt, ours in zip(prompts, cached, strict=True):
        out = theirs.generate(
            torch.tensor([prompt]),
            max_new_tokens=15,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=eos,
        )
        assert out[0, len(prompt) :].tolist() == ours
    # sampling: reproducible with a seed, and top_k=1 is greedy
    sampled = Sampling(max_new_tokens=10, temperature=0.9, top_p=0.9, seed=7)
    assert generate_ids(model, prompts, sampled) == generate_ids(model, prompts, sampled)
    assert generate_ids(
        model, prompts, Sampling(max_new_tokens=10, temperature=1.0, top_k=1, seed=1)
    ) == [c[:10] for c in cached]


def test_generate_command_and_method(
    run: Path, builtin_store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    one_arch(run)
    capsys.readouterr()
    assert (
        main(
            [
                "generate",
                "--ckpt",
                str(run),
                "--prompt",
                "def add(a, b):",
                "--prompt",
                "Question:",
                "--max_new_tokens",
                "8",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.startswith("def add(a, b):") and "---\nQuestion:" in out
    from midtrain.train.module import CausalLM

    lm = CausalLM.load_from_checkpoint(run)
    text = lm.generate(
        "def add(a, b):", max_new_tokens=8, tokenizer=builtin_store / "tokenizer.json"
    )
    model, tok, eos = load_model(str(run))
    expected = tok.decode(
        generate_ids(
            model, [tok.encode("def add(a, b):").ids], Sampling(max_new_tokens=8, stop_ids=[eos])
        )[0]
    )
    assert text == expected
    assert main(["generate", "--ckpt", str(run), "--prompt", "x", "--max_new_tokens", "100"]) == 2


def test_generate_method_takes_the_tokenizer_of_an_hf_init(
    tmp_path: Path, builtin_store: Path
) -> None:
    """``CausalLM(init_from="hf:<dir>").generate`` with no tokenizer uses the HF model's own."""
    from midtrain.train.module import CausalLM

    directory = random_hf_model("pythia", tmp_path / "hf", builtin_store)
    lm = CausalLM(init_from=f"hf:{directory}")
    given = lm.generate("x", max_new_tokens=3, tokenizer=builtin_store / "tokenizer.json")
    assert lm.generate("x", max_new_tokens=3) == given


# -- lm-evaluation-harness ----------------------------------------------------------------------

MC_TASK = """task: mt_arith_mc
dataset_path: json
dataset_kwargs:
  data_files: {data}
test_split: train
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
"""
GEN_TASK = """task: mt_arith_gen
dataset_path: json
dataset_kwargs:
  data_files: {data}
test_split: train
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: " {{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
"""


def write_tasks(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    rows = []
    for a in range(8):
        b = (3 * a + 1) % 7
        right = str(a + b)
        choices = [right, str(a + b + 1), str(a * b + 3)]
        order = sorted(range(3), key=lambda i: (i * 5 + a) % 3)
        rows.append(
            {
                "question": f"{a} + {b} =",
                "answer": right,
                "choices": [choices[i] for i in order],
                "label": order.index(0),
            }
        )
    data = directory / "arith.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (directory / "mc.yaml").write_text(MC_TASK.format(data=data))
    (directory / "gen.yaml").write_text(GEN_TASK.format(data=data))
    return data


def test_lm_eval_midtrain_and_hf_agree(run: Path, tmp_path: Path) -> None:
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")  # lm-eval's hf model needs it (lm_eval[hf])
    import lm_eval
    from lm_eval.api.instance import Instance
    from lm_eval.tasks import TaskManager

    from midtrain.evaluation.harness import MidtrainLM

    write_tasks(tmp_path / "tasks")
    manager = TaskManager(include_path=str(tmp_path / "tasks"))
    ours = MidtrainLM(checkpoint=str(run), batch_size=4)
    results = {}
    for name, model, args in (
        ("midtrain", ours, None),
        ("hf", "hf", f"pretrained={exported(run)},dtype=float32"),
    ):
        out = lm_eval.simple_evaluate(
            model=model,
            model_args=args,
            tasks=["mt_arith_mc", "mt_arith_gen"],
            task_manager=manager,
            batch_size=4,
            device="cpu",
        )
        results[name] = {
            t: {k: v for k, v in r.items() if "stderr" not in k and k != "alias"}
            for t, r in out["results"].items()
        }
    assert results["midtrain"] == results["hf"]
    assert set(results["midtrain"]["mt_arith_mc"]) >= {"acc,none", "acc_norm,none"}

    # loglikelihoods are the model's own summed token log-probs (and equal the hf model's)
    from lm_eval.models.huggingface import HFLM

    theirs = HFLM(pretrained=str(exported(run)), dtype="float32", batch_size=4, device="cpu")
    requests = [
        Instance("loglikelihood", {}, (ctx, cont), i)
        for i, (ctx, cont) in enumerate(
            [("Question: 2 + 3 =", " 5"), ("def f(x):", "\n    return x"), ("", "The end")]
        )
    ]
    got, want = ours.loglikelihood(requests), theirs.loglikelihood(requests)
    for (a, ga), (b, gb) in zip(got, want, strict=True):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
    ctx = ours.tok_encode("Question: 2 + 3 =")
    whole = ours.tok_encode("Question: 2 + 3 = 5")
    with torch.no_grad():
        logp = torch.log_softmax(ours.model(torch.tensor([whole])).float(), -1)[0]
    direct = sum(float(logp[i - 1, whole[i]]) for i in range(len(ctx), len(whole)))
    assert got[0][0] == pytest.approx(direct, abs=1e-5)
    rolling = [Instance("loglikelihood_rolling", {}, ("def f(x):\n    return x * 2\n",), 0)]
    assert ours.loglikelihood_rolling(rolling)[0] == pytest.approx(
        theirs.loglikelihood_rolling(rolling)[0], abs=1e-4
    )


def llama3_model(directory: Path) -> Path:
    """A random GQA Llama with a Llama 3-style tokenizer: <|begin_of_text|> in front of every
    text, <|end_of_text|> its EOS (offline: a small BPE, see ``base_tokenizer``)."""
    base_tokenizer("llama3", directory)
    tok = transformers.AutoTokenizer.from_pretrained(directory)
    config = NEW_KINDS["llama-gqa"]()
    config.vocab_size = len(tok)
    config.bos_token_id, config.eos_token_id = tok.bos_token_id, tok.eos_token_id
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(directory)
    return directory


def assert_lm_eval_equal(ours: Any, theirs: Any, bos: str | None = None) -> None:
    """loglikelihood (an empty context too, and one that starts with the BOS text),
    loglikelihood_rolling over several windows and generate_until, as lm-eval calls them."""
    from lm_eval.api.instance import Instance

    pairs = [("Question: 2 + 3 =", " 5"), ("def f(x):", "\n    return x"), ("", "The end")]
    pairs += [(f"{bos}Question: 2 + 3 =", " 5")] if bos else []
    ll = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    for (a, ga), (b, gb) in zip(ours.loglikelihood(ll), theirs.loglikelihood(ll), strict=True):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
    text = "def f(x):\n    return x * 2\n" * 8  # longer than the 64-token context: windows
    rolling = [Instance("loglikelihood_rolling", {}, (text,), 0)]
    assert ours.loglikelihood_rolling(rolling)[0] == pytest.approx(
        theirs.loglikelihood_rolling(rolling)[0], abs=1e-3
    )
    gen = [
        Instance("generate_until", {}, (p, {"until": ["\n\n"], "max_gen_toks": 12}), i)
        for i, p in enumerate(["Question: 2 + 3 =", "def add(a, b):"])
    ]
    assert ours.generate_until(gen) == theirs.generate_until(gen)


@pytest.mark.parametrize("kind", ["llama-gqa", "qwen3", "llama3-bos"])
def test_lm_eval_on_imported_gqa_model_equals_hf(
    kind: str, tmp_path: Path, builtin_store: Path
) -> None:
    """The `midtrain` lm-eval model on hf:<dir> of a GQA model gives lm-eval's own `hf`
    model's loglikelihood, loglikelihood_rolling and generate_until on the same directory;
    with a Llama 3-style tokenizer both put its BOS in front of every text."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    from lm_eval.models.huggingface import HFLM

    from midtrain.evaluation.harness import MidtrainLM

    if kind == "llama3-bos":
        directory = llama3_model(tmp_path / kind)
    else:
        directory = random_hf_model(kind, tmp_path / kind, builtin_store)
    ours = MidtrainLM(checkpoint=f"hf:{directory}", batch_size=2)
    theirs = HFLM(pretrained=str(directory), dtype="float32", batch_size=2, device="cpu")
    bos = theirs.tokenizer.bos_token
    for text in ("The end", f"{bos}The end"):
        assert ours.tok_encode(text) == theirs.tok_encode(text)
    assert (ours.tok_encode("x")[0] == theirs.tokenizer.bos_token_id) == (kind == "llama3-bos")
    assert ours.prefix_token_id == theirs.prefix_token_id
    assert_lm_eval_equal(ours, theirs, bos)
    if kind == "llama3-bos":  # lm-eval's add_bos_token=False: no BOS for either
        ours = MidtrainLM(checkpoint=f"hf:{directory}", batch_size=2, add_bos_token=False)
        theirs = HFLM(
            pretrained=str(directory),
            dtype="float32",
            batch_size=2,
            device="cpu",
            add_bos_token=False,
        )
        assert ours.tok_encode("x") == theirs.tok_encode("x")
        assert theirs.tok_encode("x")[0] != theirs.tokenizer.bos_token_id
        assert_lm_eval_equal(ours, theirs, bos)


def test_lm_eval_command(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    one_arch(run)
    pytest.importorskip("lm_eval")
    write_tasks(tmp_path / "tasks")
    assert (
        main(
            [
                "lm-eval",
                "run",
                "--model",
                "midtrain",
                "--model_args",
                f"checkpoint={run},batch_size=4",
                "--tasks",
                "mt_arith_mc",
                "--include_path",
                str(tmp_path / "tasks"),
                "--output_path",
                str(tmp_path / "results"),
            ]
        )
        == 0
    )
    files = list((tmp_path / "results").rglob("results_*.json"))
    assert files and "mt_arith_mc" in json.loads(files[0].read_text())["results"]
    # an unknown task, a path that is not a checkpoint: one line each, exit 2
    capsys.readouterr()
    assert (
        main(
            [
                "lm-eval",
                "run",
                "--model",
                "midtrain",
                "--model_args",
                f"checkpoint={run}",
                "--tasks",
                "no_such_task_xyz",
                "--device",
                "cpu",
            ]
        )
        == 2
    )
    assert "Tasks not found: no_such_task_xyz" in capsys.readouterr().err
    assert (
        main(
            [
                "lm-eval",
                "run",
                "--model",
                "midtrain",
                "--model_args",
                f"checkpoint={tmp_path / 'nope.ckpt'}",
                "--tasks",
                "mt_arith_mc",
                "--include_path",
                str(tmp_path / "tasks"),
                "--device",
                "cpu",
            ]
        )
        == 2
    )
    assert "checkpoint not found" in capsys.readouterr().err.splitlines()[-1]


# -- in-loop downstream evaluation --------------------------------------------------------------


def test_downstream_eval_callback_logs_tags(tmp_path: Path, builtin_store: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = write_tasks(tmp_path / "tasks")
    tasks = [
        {
            "name": "arith",
            "path": str(data),
            "kind": "multiple_choice",
            "context": "Question: {question}\nAnswer:",
            "choices": "choices",
            "answer": "label",
        },
        {
            "name": "arith_gen",
            "path": str(data),
            "kind": "exact_match",
            "context": "Question: {question}\nAnswer:",
            "answer": "answer",
            "max_new_tokens": 4,
        },
    ]
    cfg = fit_config(tmp_path, builtin_store, "ds", ARCHS["pythia"], steps=5)
    config = yaml.safe_load(cfg.read_text())
    config["trainer"]["log_every_n_steps"] = 50  # eval tags do not depend on it
    init_args = {"tasks": tasks, "every_n_steps": 2, "limit": 5}
    expected = ["eval/arith/acc", "eval/arith/acc_norm", "eval/arith_gen/exact_match"]
    try:
        import lm_eval  # noqa: F401

        # an lm-eval task by name, from a directory of task YAMLs
        init_args.update(include_path=str(tmp_path / "tasks"))
        tasks.append("mt_arith_mc")
        expected.append("eval/mt_arith_mc/acc")
    except ImportError:
        pass
    config["trainer"]["callbacks"] = [
        {"class_path": "midtrain.callbacks.DownstreamEval", "init_args": init_args}
    ]
    cfg.write_text(yaml.safe_dump(config))
    assert main(["fit", "--config", str(cfg)]) == 0
    ea = EventAccumulator(str(tmp_path / "ds"))
    ea.Reload()
    tags = ea.Tags()["scalars"]
    for tag in expected:
        assert tag in tags
        steps = [e.step for e in ea.Scalars(tag)]
        assert steps == [2, 4, 5]  # every 2 optimizer steps, and the end
        assert all(0.0 <= e.value <= 1.0 for e in ea.Scalars(tag))


def test_downstream_eval_refuses_bad_tasks(tmp_path: Path) -> None:
    from midtrain.evaluation.callback import DownstreamEval

    with pytest.raises(MidtrainError, match="file not found"):
        DownstreamEval(
            tasks=[
                {
                    "name": "x",
                    "path": str(tmp_path / "no.jsonl"),
                    "kind": "exact_match",
                    "context": "{q}",
                    "answer": "a",
                }
            ]
        )
    pytest.importorskip("lm_eval")
    with pytest.raises(MidtrainError, match="no lm-eval task 'no_such_task_xyz'"):
        DownstreamEval(tasks=["no_such_task_xyz"])


def test_paper_from_pythia_config_parses(capsys: pytest.CaptureFixture[str]) -> None:
    from midtrain.configs import resolve_config

    path = resolve_config("configs/midtrain/paper-from-pythia.yaml")
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(path), "--print_config"])
    assert e.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["init_from"] == "hf:EleutherAI/pythia-160m@step100000"


def test_prepare_takes_tokenizer_from_hf_model(tmp_path: Path, builtin_store: Path) -> None:
    from midtrain.data.prepare import DomainConfig, PrepareConfig, TokenizerConfig, prepare

    directory = random_hf_model("pythia", tmp_path / "hf", builtin_store)
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"line {i} of text"}) + "\n" for i in range(20)))
    store = prepare(
        PrepareConfig(
            output=str(tmp_path / "store"),
            domains={"d": DomainConfig(source={"path": str(docs)})},
            tokenizer=TokenizerConfig(hub=f"hf:{directory}"),
        )
    )
    from tokenizers import Tokenizer

    text = "Question: 12 + 30 =\ndef f(x): return x"
    ids = Tokenizer.from_file(str(Path(store) / "tokenizer.json")).encode(text).ids
    assert ids == Tokenizer.from_file(str(builtin_store / "tokenizer.json")).encode(text).ids
    with pytest.raises(MidtrainError, match="applies only to hub ids"):
        prepare(
            PrepareConfig(
                output=str(tmp_path / "store2"),
                domains={"d": DomainConfig(source={"path": str(docs)})},
                tokenizer=TokenizerConfig(hub=f"hf:{directory}@main"),
            )
        )
    assert not (tmp_path / "store2").exists()


@pytest.mark.slow
def test_fsdp2_import_and_distributed_export(tmp_path: Path, builtin_store: Path) -> None:
    """init_from hf: under FSDP2 (2 gloo processes, rank 0 reads, shards broadcast) starts
    from the same loss as one process; its sharded checkpoint exports like a file."""
    from tests.test_distributed import FSDP2, fit, losses

    directory = random_hf_model("pythia", tmp_path / "hf", builtin_store)
    init = ("--model.init_from", f"hf:{directory}", "--model.arch", "tiny")
    one = fit(tmp_path, builtin_store, "one", 1, None, 2, *init)
    fsdp = fit(tmp_path, builtin_store, "fsdp", 2, FSDP2, 2, *init)
    assert losses(fsdp)[0] == pytest.approx(losses(one)[0], rel=1e-5)
    sharded = fsdp / "checkpoints" / "last.ckpt"
    assert (sharded / "meta.pt").is_file()
    out = tmp_path / "exported"
    assert main(["export", "--ckpt", str(sharded), "--out", str(out)]) == 0
    config, state, _ = load_checkpoint(sharded)
    ours = GPT(config)
    ours.load_state_dict(state)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    idx = torch.randint(0, 512, (2, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (ours(idx) - theirs(idx).logits).abs().max().item() <= 1e-5


# -- released bases' tokenizers: EOS/BOS conventions and chat templates -------------------------

_LLAMA3_CHAT = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>"
    "{{ '\\n\\n' }}{{ m.content | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>{{ '\\n\\n' }}"
    "{% endif %}"
)
# Qwen's layout, with the {% generation %} markers return_assistant_tokens_mask needs
_QWEN_CHAT = (
    "{% for m in messages %}<|im_start|>{{ m.role }}{{ '\\n' }}"
    "{% if m.role == 'assistant' %}{% generation %}{{ m.content }}<|im_end|>{% endgeneration %}"
    "{% else %}{{ m.content }}<|im_end|>{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant{{ '\\n' }}{% endif %}"
)
# (special tokens, bos, eos, whether the post-processor adds BOS, chat template)
BASE_TOKENIZERS = {
    "llama3": (
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"]
        + ["<|eot_id|>"],
        "<|begin_of_text|>",
        "<|end_of_text|>",
        True,
        _LLAMA3_CHAT,
    ),
    "qwen": (
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        None,
        "<|endoftext|>",
        False,
        _QWEN_CHAT,
    ),
}
CHATS = [
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "It is 5."},
        {"role": "user", "content": "And 4 + 4?"},
        {"role": "assistant", "content": " 8, the sum."},
    ],
    [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi there"}],
]


def base_tokenizer(kind: str, directory: Path, chat_template: bool = True) -> Path:
    """A small BPE saved by transformers as a released base saves its tokenizer (offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    special, bos, eos, adds_bos, template = BASE_TOKENIZERS[kind]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = [f"{m['role']} {m['content']} the cat sat on the mat" for c in CHATS for m in c]
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text * 5, trainer=trainer)
    if adds_bos:  # as Llama 3's tokenizer.json: <|begin_of_text|> in front of every text
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos)
    if chat_template:
        fast.chat_template = template
    fast.save_pretrained(directory)
    return directory


def _prepare(tmp_path: Path, name: str, records: list[dict], hub: str, **template: object) -> Path:
    from midtrain.data.prepare import DomainConfig, PrepareConfig, TokenizerConfig, prepare

    data = tmp_path / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    domain = DomainConfig(source={"path": str(data)}, val_fraction=0.0, **template)
    config = PrepareConfig(
        output=str(tmp_path / name), domains={"d": domain}, tokenizer=TokenizerConfig(hub=hub)
    )
    return Path(prepare(config))


@pytest.mark.parametrize("kind", list(BASE_TOKENIZERS))
def test_prepare_uses_the_models_eos_and_bos(kind: str, tmp_path: Path) -> None:
    """Documents are what the model's own tokenizer makes of them (BOS where it adds one),
    each followed by the model's EOS, read from its directory."""
    from midtrain.data.store import Store

    directory = base_tokenizer(kind, tmp_path / "tok")
    texts = ["the cat sat", "on the mat, the end", "hello world"]
    store = Store(_prepare(tmp_path, "store", [{"text": t} for t in texts], f"hf:{directory}"))
    theirs = transformers.AutoTokenizer.from_pretrained(directory)
    eos = BASE_TOKENIZERS[kind][2]
    assert store.index.eos == eos and store.eos_id == theirs.convert_tokens_to_ids(eos)
    split = store.domain("d").train
    for i, text in enumerate(texts):
        doc = split.tokens[split.doc_offsets[i] : split.doc_offsets[i + 1]].tolist()
        assert doc == theirs(text).input_ids + [store.eos_id]
    assert (split.tokens[0] == theirs.bos_token_id) == (kind == "llama3")
    # the EOS can also come from generation_config.json / config.json alone
    from midtrain.data.tokenizer import model_tokens

    cfg = json.loads((directory / "tokenizer_config.json").read_text())
    cfg.pop("eos_token")
    (directory / "tokenizer_config.json").write_text(json.dumps(cfg))
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [store.eos_id]}))
    from tokenizers import Tokenizer

    found = model_tokens(directory, Tokenizer.from_file(str(directory / "tokenizer.json")))
    assert found.eos == eos


@pytest.mark.parametrize("kind", list(BASE_TOKENIZERS))
def test_chat_template_sft_masks_exactly_the_assistant_tokens(kind: str, tmp_path: Path) -> None:
    """`chat_template: tokenizer` gives apply_chat_template's tokens; the loss mask is on
    the assistant turns only: transformers' assistant mask where the template has generation
    markers (qwen), the hand-checked assistant text where spans come from prefixes (llama3)."""
    from midtrain.data.store import Store

    directory = base_tokenizer(kind, tmp_path / "tok")
    records = [{"messages": c} for c in CHATS]
    root = _prepare(
        tmp_path, "sft", records, f"hf:{directory}", chat="messages", chat_template="tokenizer"
    )
    store = Store(root)
    theirs = transformers.AutoTokenizer.from_pretrained(directory)
    split = store.domain("d").train
    for i, chat in enumerate(CHATS):
        lo, hi = int(split.doc_offsets[i]), int(split.doc_offsets[i + 1])
        tokens, mask = split.tokens[lo:hi].tolist(), split.loss_mask[lo:hi].tolist()
        want = theirs.apply_chat_template(
            chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        assert tokens == want["input_ids"] + [store.eos_id]  # no second BOS: the template's
        assert mask[-1] == 1  # the EOS closing the example is learned
        if kind == "qwen":
            assert mask[:-1] == want["assistant_masks"]
        else:
            trained = [t for t, m in zip(tokens[:-1], mask[:-1], strict=True) if m]
            replies = [m["content"].strip() for m in chat if m["role"] == "assistant"]
            assert theirs.decode(trained) == "".join(r + "<|eot_id|>" for r in replies)


def test_chat_template_refusals(tmp_path: Path, builtin_store: Path) -> None:
    from midtrain.data.prepare import DomainConfig, PrepareConfig, TokenizerConfig, prepare

    records = [{"messages": c} for c in CHATS]
    bare = base_tokenizer("qwen", tmp_path / "bare", chat_template=False)
    with pytest.raises(MidtrainError, match=f"chat_template: {bare} has no chat template") as e:
        _prepare(tmp_path, "a", records, f"hf:{bare}", chat="messages", chat_template="tokenizer")
    assert "\n" not in str(e.value) and not (tmp_path / "a").exists()
    data = tmp_path / "b.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    domain = DomainConfig(source={"path": str(data)}, chat="messages", chat_template="tokenizer")
    tok = TokenizerConfig(path=str(builtin_store / "tokenizer.json"))
    with pytest.raises(MidtrainError, match="model directory named by tokenizer.hub"):
        prepare(PrepareConfig(output=str(tmp_path / "b"), domains={"d": domain}, tokenizer=tok))
    # a template that cannot render the example's roles: the file and the record
    strict = tmp_path / "strict.jinja"
    strict.write_text(
        "{% for m in messages %}{% if m.role == 'system' %}"
        "{{ raise_exception('no system role') }}{% endif %}{{ m.content }}{% endfor %}"
    )
    with pytest.raises(MidtrainError, match=rf"{strict} cannot render .*no system role") as e:
        _prepare(tmp_path, "c", records, f"hf:{bare}", chat="messages", chat_template=str(strict))
    assert "domains.d.chat_template" in str(e.value) and not (tmp_path / "c").exists()
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m.content }}")
    with pytest.raises(MidtrainError, match=rf"{broken}:1: not a valid chat template"):
        _prepare(tmp_path, "d", records, f"hf:{bare}", chat="messages", chat_template=str(broken))
    with pytest.raises(MidtrainError, match="name its field with `chat`"):
        DomainConfig(source={"path": str(data)}, chat_template="tokenizer")


def test_export_and_lm_eval_follow_the_stores_bos(tmp_path: Path) -> None:
    """A run on a Llama 3-style store exports the tokenizer's BOS and EOS (not EOS as both),
    a tokenizer that adds the BOS as the documents had it, and scores in lm-eval as the
    exported model does in lm-eval's `hf` model. A store whose model says not to add a BOS,
    and a store made before the BOS was recorded, export what their documents are."""
    from midtrain.data.prepare import DomainConfig, PrepareConfig, TokenizerConfig, prepare
    from midtrain.data.store import Store, StoreIndex

    directory = base_tokenizer("llama3", tmp_path / "tok")
    theirs_tok = transformers.AutoTokenizer.from_pretrained(directory)
    bos, eos = theirs_tok.bos_token_id, theirs_tok.convert_tokens_to_ids("<|end_of_text|>")
    code = DomainConfig(source={"builtin": "python-stdlib"}, max_docs=30, val_fraction=0.2)
    store = prepare(
        PrepareConfig(
            output=str(tmp_path / "store"),
            domains={"code": code},
            tokenizer=TokenizerConfig(hub=f"hf:{directory}"),
        )
    )
    index = StoreIndex.read(store)
    assert (index.bos_id, index.add_bos, index.eos_id) == (bos, True, eos)
    # no padded vocabulary rows: lm-eval's hf model would generate them, ours never does
    llama = ARCHS["llama"]
    model = {**llama, "model_config": {**llama["model_config"], "pad_vocab_multiple": 64}}
    assert main(["fit", "--config", str(fit_config(tmp_path, store, "run", model))]) == 0
    ckpt = perturbed(tmp_path / "run" / "checkpoints" / "last.ckpt")

    def exported_ids(out: Path) -> tuple[int, int, list[int]]:
        config = json.loads((out / "config.json").read_text())
        generation = json.loads((out / "generation_config.json").read_text())
        assert generation["bos_token_id"] == config["bos_token_id"]
        assert generation["eos_token_id"] == config["eos_token_id"] == eos
        ids = transformers.AutoTokenizer.from_pretrained(out)("def f(x):").input_ids
        return config["bos_token_id"], config["eos_token_id"], ids

    text_ids = theirs_tok("def f(x):", add_special_tokens=False).input_ids
    assert exported_ids(exported(ckpt)) == (bos, eos, [bos, *text_ids])
    split = Store(store).domain("code").train
    assert split.tokens[0] == bos and split.tokens[split.doc_offsets[1]] == bos

    # the same model directory saying add_bos_token: false: documents without a BOS
    config_file = directory / "tokenizer_config.json"
    config_file.write_text(
        json.dumps({**json.loads(config_file.read_text()), "add_bos_token": False})
    )
    plain = _prepare(tmp_path, "plain", [{"text": "def f(x): return x"}], f"hf:{directory}")
    assert (StoreIndex.read(plain).bos_id, StoreIndex.read(plain).add_bos) == (bos, False)
    out = tmp_path / "hf-plain"
    assert main(["export", "--ckpt", str(ckpt), "--out", str(out), "--tokenizer", str(plain)]) == 0
    assert exported_ids(out) == (bos, eos, text_ids)
    # a store made before the BOS was recorded: what its tokenizer's post-processor does
    old = tmp_path / "old"
    old.mkdir()
    (old / "tokenizer.json").write_bytes((Path(store) / "tokenizer.json").read_bytes())
    record = json.loads((Path(store) / "store.json").read_text())
    (old / "store.json").write_text(
        json.dumps({k: v for k, v in record.items() if k not in ("bos_id", "add_bos")})
    )
    assert StoreIndex.read(old).add_bos is None
    out = tmp_path / "hf-old"
    assert main(["export", "--ckpt", str(ckpt), "--out", str(out), "--tokenizer", str(old)]) == 0
    assert exported_ids(out) == (bos, eos, [bos, *text_ids])

    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    from lm_eval.models.huggingface import HFLM

    from midtrain.evaluation.harness import MidtrainLM

    ours = MidtrainLM(checkpoint=str(ckpt), batch_size=2)
    theirs = HFLM(pretrained=str(exported(ckpt)), dtype="float32", batch_size=2, device="cpu")
    assert ours.tok_encode("x")[0] == bos and ours.prefix_token_id == theirs.prefix_token_id
    assert_lm_eval_equal(ours, theirs, "<|begin_of_text|>")


def test_generate_and_lm_eval_read_the_ema_weights(
    run: Path, tmp_path: Path, builtin_store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`midtrain generate --weights ema` and lm-eval's `weights=ema` use the average kept by
    midtrain.callbacks.EMA; a checkpoint without one, an HF model or another choice is
    refused in one line naming it."""
    one_arch(run)
    from tokenizers import Tokenizer

    from midtrain.model.generation import generate_text

    cfg = fit_config(tmp_path, builtin_store, "ema", ARCHS["pythia"], steps=4)
    data = yaml.safe_load(cfg.read_text())
    data["model"]["lr"] = 3e-2  # the average visibly behind the live weights in 4 steps
    data["trainer"]["callbacks"] = [
        {"class_path": "midtrain.callbacks.EMA", "init_args": {"decay": 0.5}}
    ]
    cfg.write_text(yaml.safe_dump(data))
    assert main(["fit", "--config", str(cfg)]) == 0
    ckpt = tmp_path / "ema" / "checkpoints" / "last.ckpt"
    tok = Tokenizer.from_file(str(builtin_store / "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")
    prompt = "def add(a, b):"
    printed, expected = {}, {}
    for weights in ("live", "ema"):
        capsys.readouterr()
        argv = ["generate", "--ckpt", str(ckpt), "--prompt", prompt, "--max_new_tokens", "12"]
        assert main([*argv, "--weights", weights]) == 0
        printed[weights] = capsys.readouterr().out
        config, state, _ = load_checkpoint(ckpt, weights=weights)
        model = GPT(config).eval()
        model.load_state_dict(state)
        sampling = Sampling(max_new_tokens=12, stop_ids=[eos])
        vocab = min(config.padded_vocab_size, tok.get_vocab_size(with_added_tokens=True))
        expected[weights] = prompt + generate_text(model, tok, [prompt], sampling, vocab)[0] + "\n"
    assert printed == expected and printed["live"] != printed["ema"]

    bad = [
        (str(run), "ema", f"--weights ema: {run} has no averaged weights"),
        (str(ckpt), "average", "--weights: 'average' is not one of live, ema"),
        (f"hf:{exported(run)}", "ema", f"--weights ema: hf:{exported(run)} is a Hugging Face"),
    ]
    for source, weights, message in bad:
        assert main(["generate", "--ckpt", source, "--prompt", "x", "--weights", weights]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err

    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from midtrain.evaluation.harness import MidtrainLM

    request = [Instance("loglikelihood", {}, ("def f(x):", "\n    return x"), 0)]
    scores = {
        w: MidtrainLM(checkpoint=str(ckpt), weights=w).loglikelihood(request)[0][0]
        for w in ("live", "ema")
    }
    config, state, _ = load_checkpoint(ckpt, weights="ema")
    model = GPT(config).eval()
    model.load_state_dict(state)
    context, whole = tok.encode("def f(x):").ids, tok.encode("def f(x):\n    return x").ids
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole])).float(), -1)[0]
    direct = sum(float(logp[i - 1, whole[i]]) for i in range(len(context), len(whole)))
    assert scores["ema"] == pytest.approx(direct, abs=1e-5) and scores["live"] != scores["ema"]
    with pytest.raises(MidtrainError, match=f"{run} has no averaged weights"):
        MidtrainLM(checkpoint=str(run), weights="ema")
