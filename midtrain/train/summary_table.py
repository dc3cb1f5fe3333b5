"""The model summary at the start of fit, without Lightning's FLOPs column.

Lightning counts FLOPs by running ``example_input_array`` through the model; CausalLM has none
(a forward at summary time would cost a real step on a large model), so Lightning showed
``FLOPs 0`` for every layer. The model knows its training FLOPs per token
(``GPT.flops_per_token``); this summary shows that figure instead."""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelSummary as LightningModelSummary
from lightning.pytorch.utilities.model_summary import get_human_readable_count

log = logging.getLogger("lightning.pytorch.callbacks.model_summary")


class ModelSummary(LightningModelSummary):
    """Lightning's layer table (name, type, parameters, mode) and totals, with the training
    FLOPs per token of the model (forward + backward, at its ``block_size``) where it has them."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._summarize_kwargs["flops_per_token"] = _flops_per_token(pl_module)
        super().on_fit_start(trainer, pl_module)

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        log.info(
            "\n"
            + summary_table(
                summary_data,
                total_parameters,
                trainable_parameters,
                model_size,
                summarize_kwargs.get("flops_per_token"),
            )
        )


def _flops_per_token(pl_module: pl.LightningModule) -> tuple[float, int] | None:
    model = getattr(pl_module, "model", None)
    config = getattr(model, "config", None)
    if model is None or config is None or not hasattr(model, "flops_per_token"):
        return None
    return float(model.flops_per_token(config.block_size)), int(config.block_size)


def summary_table(
    summary_data: list[tuple[str, list[str]]],
    total_parameters: int,
    trainable_parameters: int,
    model_size: float,
    flops_per_token: tuple[float, int] | None,
) -> str:
    """The table as text: every column but FLOPs, then the totals."""
    cols = [(name, values) for name, values in summary_data if name != "FLOPs"]
    widths = [max([len(name), *map(len, map(str, values))]) for name, values in cols]
    rows = [[name for name, _ in cols]] + [
        list(map(str, r)) for r in zip(*(v for _, v in cols), strict=True)
    ]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines += [
        f"{get_human_readable_count(trainable_parameters):<10}Trainable params",
        f"{get_human_readable_count(total_parameters - trainable_parameters):<10}"
        "Non-trainable params",
        f"{get_human_readable_count(total_parameters):<10}Total params",
        f"{model_size:<10,.3f}Total estimated model params size (MB)",
    ]
    if flops_per_token is not None:
        flops, seq_len = flops_per_token
        lines.append(
            f"{get_human_readable_count(int(flops)):<10}Training FLOPs per token "
            f"(forward + backward, sequences of {seq_len})"
        )
    return "\n".join(lines)
