"""The LitGPT side of the anchor benchmark (`tox -e bench-anchor`): `litgpt pretrain`'s own
setup/fit loop (whole-model torch.compile by default, chunked CE, AdamW, clip 1.0), fully
offline: the documents of a local jsonl file, tokenized with a locally trained tokenizer.json,
packed into seq_len + 1 blocks. Runs in an environment with litgpt and WITHOUT midtrain (their
jsonargparse pins conflict), so it imports nothing from midtrain.

    python litgpt_side.py DOCS.jsonl TOKENIZER_DIR EOS_ID OUT_DIR SHAPE_JSON

Prints three lines: ``step_seconds <json list>`` and ``step_faults <json list>``, the durations
of optimizer steps warmup + 1 .. steps (steady state) and the minor page faults taken in each;
``peak_rss_kb <int>``, the process's peak resident memory.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from litgpt import Tokenizer
from litgpt.args import EvalArgs, TrainArgs
from litgpt.config import Config
from litgpt.data import DataModule
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.data import DataLoader


@dataclass
class JsonlBlocks(DataModule):
    """Documents of a local jsonl, each followed by EOS, concatenated and cut into blocks."""

    path: str = ""
    eos_id: int = 0
    seed: int = 0
    batch_size: int = field(default=1, init=False)
    seq_length: int = field(default=256, init=False)
    tokenizer: Tokenizer | None = field(default=None, init=False)

    def connect(
        self,
        tokenizer: Tokenizer | None = None,
        batch_size: int = 1,
        max_seq_length: int | None = None,
    ) -> None:
        self.tokenizer, self.batch_size = tokenizer, batch_size
        self.seq_length = max_seq_length + 1  # inputs and the shifted targets

    def setup(self, stage: str = "") -> None:
        ids: list[int] = []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                ids += self.tokenizer.encode(json.loads(line)["text"]).tolist() + [self.eos_id]
        n = len(ids) // self.seq_length
        self.blocks = torch.tensor(ids[: n * self.seq_length]).view(n, self.seq_length)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.blocks, batch_size=self.batch_size, shuffle=True, generator=g, drop_last=True
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.blocks[: 2 * self.batch_size], batch_size=self.batch_size)


def main() -> None:
    docs, tokenizer_dir, eos_id, out_dir, shape = sys.argv[1:6]
    s = json.loads(shape)
    step_times: list[float] = []
    step_faults: list[int] = []
    register_optimizer_step_post_hook(
        lambda *_: (
            step_times.append(time.perf_counter()),
            step_faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt),
        )
    )
    config = Config(
        name="anchor",
        block_size=s["seq_len"],
        vocab_size=s["vocab_size"],
        padded_vocab_size=s["vocab_size"],
        n_layer=s["n_layer"],
        n_embd=s["n_embd"],
        n_head=s["n_head"],
        rotary_percentage=0.25,
        parallel_residual=True,
        bias=True,
        norm_class_name="LayerNorm",
        mlp_class_name="GptNeoxMLP",
        intermediate_size=4 * s["n_embd"],
    )
    from litgpt import pretrain

    # The final checkpoint is written after the timed window; skip it (it also needs
    # `requests` through jsonargparse, which a plain litgpt install lacks).
    pretrain.save_checkpoint = lambda *args, **kwargs: None
    if not s.get("compile", True):  # litgpt pretrain compiles unconditionally: eager twin
        torch.compile = lambda model, *a, **k: model
    steps, micro = s["steps"], s["micro_batch_size"]
    pretrain.setup(
        model_name="anchor",
        model_config=config,
        out_dir=Path(out_dir),
        precision="32-true",
        data=JsonlBlocks(path=docs, eos_id=int(eos_id)),
        tokenizer_dir=Path(tokenizer_dir),
        train=TrainArgs(
            save_interval=None,
            log_interval=1,
            global_batch_size=micro,
            micro_batch_size=micro,
            max_tokens=steps * micro * s["seq_len"],
            max_seq_length=s["seq_len"],
            max_norm=1.0,
            min_lr=3e-5,
            lr_warmup_steps=0,
            tie_embeddings=False,
        ),
        eval=EvalArgs(
            interval=10**9, max_iters=1, initial_validation=False, final_validation=False
        ),
        optimizer={
            "class_path": "torch.optim.AdamW",
            "init_args": {"lr": 3e-4, "weight_decay": 0.1, "betas": [0.9, 0.95]},
        },
        devices=1,
        logger_name="csv",
        seed=1234,
    )
    w = s["warmup"]  # optimizer steps w + 1 .. steps: durations, and minor page faults in each
    for name, marks in (("step_seconds", step_times), ("step_faults", step_faults)):
        print(
            name,
            json.dumps(
                [b - a for a, b in zip(marks[w - 1 : steps - 1], marks[w:steps], strict=True)]
            ),
            flush=True,
        )
    with open("/proc/self/status") as status:
        print("peak_rss_kb", next(int(x.split()[1]) for x in status if x.startswith("VmHWM")))


if __name__ == "__main__":
    main()
