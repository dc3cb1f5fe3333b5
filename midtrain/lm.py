"""``CausalLM``: the Lightning module around the plain ``GPT`` model."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.aggregation import SumMetric

from midtrain.checkpoint import load_weights
from midtrain.errors import MidtrainError
from midtrain.loss import chunked_cross_entropy
from midtrain.model import GPT, ModelConfig
from midtrain.optim import (
    Schedule,
    fused_adamw_supported,
    lr_scheduler,
    param_groups,
    warmup_steps,
)
from midtrain.trainer import require_max_steps


class CausalLM(L.LightningModule):
    """Next-token prediction with a per-token loss mask.

    Args:
        arch: a preset name from ``midtrain.model.PRESETS`` (e.g. ``pythia-70m``, ``tiny``).
        model_config: overrides of the preset's fields (any custom shape).
        vocab_size: tokenizer vocabulary; the CLI links it from the data.
        lr, min_lr: peak and final learning rate (min_lr default: lr / 10).
        warmup: linear warmup in optimizer steps, or a fraction of max_steps if < 1.
        lr_schedule: ``cosine``, ``wsd`` (warmup-stable-decay) or ``constant``.
        decay_fraction: with ``wsd``, the final fraction of steps that decays.
        weight_decay, decay_1d_params: AdamW decay, on matrices only unless decay_1d_params.
        betas, eps: AdamW.
        init_from: a checkpoint whose weights (only) initialise the model: fresh optimizer
            and schedule, for SFT and branches.
        activation_checkpointing: recompute each block's activations in backward (memory).
        compile: ``torch.compile`` the model: the whole trunk (embedding, blocks, final norm)
            on one device or under DDP, each transformer block under FSDP2.
        document_masking: in packed pretraining blocks, attend only within each document
            (split at EOS) with positions restarting per document; off by default, as Pythia.
        loss_chunk_size: compute the cross-entropy this many tokens at a time from the final
            features and the lm_head weight, never building the full logits
            (``midtrain.loss``); 0 builds the full fp32 logits. Under FSDP2 the full logits are
            always built.

    Under Lightning's ``ModelParallelStrategy`` the model is built on the meta device, sharded
    per block with FSDP2 and then initialised shard by shard (``midtrain.parallel``); under
    any other strategy (single device, DDP) it is built directly.
    """

    def __init__(self, arch: str = "pythia-70m", model_config: dict[str, Any] | None = None,
                 vocab_size: int | None = None, lr: float = 3e-4, min_lr: float | None = None,
                 warmup: float = 0.01, lr_schedule: Schedule = "cosine",
                 decay_fraction: float = 0.2, weight_decay: float = 0.1,
                 decay_1d_params: bool = False, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, init_from: str | None = None,
                 activation_checkpointing: bool = False, compile: bool = False,
                 document_masking: bool = False, loss_chunk_size: int = 1024) -> None:
        super().__init__()
        overrides = dict(model_config or {})
        if vocab_size is not None:  # linked from the data; an explicit model_config wins
            overrides.setdefault("vocab_size", vocab_size)
        try:
            self.config = ModelConfig.from_name(arch, **overrides)
        except ValueError as e:
            raise MidtrainError(f"model: {e}") from None
        if lr <= 0:
            raise MidtrainError(f"model.lr: must be positive, got {lr}")
        if lr_schedule not in ("cosine", "wsd", "constant"):
            raise MidtrainError(f"model.lr_schedule: unknown {lr_schedule!r}; use cosine, wsd or constant")
        if not isinstance(loss_chunk_size, int) or loss_chunk_size < 0:
            raise MidtrainError(f"model.loss_chunk_size: must be an int >= 0, got {loss_chunk_size!r}")
        if init_from is not None and not Path(init_from).exists():
            raise MidtrainError(f"model.init_from: checkpoint not found: {init_from}")
        self.save_hyperparameters()
        self.hparams["betas"] = list(betas)  # a tuple would not read back with yaml.safe_load
        self.model: GPT | None = None
        self.domains: list[str] = []
        self.tokens_seen: dict[str, int] = {}
        self._step_sums: torch.Tensor | None = None
        self.val_metrics = torch.nn.ModuleDict()

    # -- construction ---------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:
            return
        from midtrain import parallel

        strategy = self._trainer.strategy if self._trainer is not None else None
        mesh = None
        if type(strategy).__name__ == "ModelParallelStrategy":
            mesh = strategy.device_mesh["data_parallel"]
        with torch.device("meta") if mesh is not None else contextlib.nullcontext():
            model = GPT(self.config)
        if self.hparams.activation_checkpointing:
            parallel.apply_activation_checkpointing(model)
        if self.hparams.compile:
            parallel.apply_compile(model, per_block=mesh is not None)
        if mesh is not None:
            parallel.apply_fsdp(model, mesh)
            parallel.materialize(model, strategy.root_device)
        if self.hparams.init_from:
            self._load_init_weights(model, sharded=mesh is not None)
        # An FSDP2-sharded lm_head is gathered only inside the root module's forward: the
        # chunked loss, which reads the head weight outside it, stays off there.
        self._chunked_loss = bool(self.hparams.get("loss_chunk_size", 0)) and mesh is None
        self.model = model

    def _load_init_weights(self, model: GPT, sharded: bool) -> None:
        state = load_weights(self.hparams.init_from)
        try:
            if sharded:
                from torch.distributed.checkpoint.state_dict import (
                    StateDictOptions,
                    set_model_state_dict,
                )

                set_model_state_dict(model, state,
                                     options=StateDictOptions(full_state_dict=True))
            else:
                model.load_state_dict(state)
        except (RuntimeError, KeyError, ValueError) as e:
            first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
            raise MidtrainError(
                f"model.init_from: {self.hparams.init_from} does not fit arch "
                f"{self.hparams.arch!r}: {first}"
            ) from None

    def check_data(self, datamodule: Any) -> None:
        """Refuse data the model cannot take: a larger vocabulary or longer sequences."""
        vocab = getattr(datamodule, "vocab_size", None)
        if vocab is not None and vocab > self.config.padded_vocab_size:
            raise MidtrainError(
                f"model.vocab_size: the tokenizer has {vocab} tokens but the model's vocabulary "
                f"is {self.config.padded_vocab_size}; raise model_config.vocab_size"
            )
        seq_len = getattr(datamodule, "seq_len", None)
        if seq_len is not None and seq_len > self.config.block_size:
            raise MidtrainError(
                f"data.seq_len: {seq_len} is beyond the model context "
                f"{self.config.block_size}; lower data.seq_len or raise model_config.block_size"
            )

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule if self.trainer is not None else None
        if dm is None:
            return
        self.check_data(dm)
        store = getattr(dm, "store", None)
        self.eos_id = getattr(store, "eos_id", None)
        self.domains = list(getattr(dm, "domains", []))
        for d in self.domains:
            self.tokens_seen.setdefault(d, 0)
        for name in getattr(dm, "val_set_names", []):
            if name not in self.val_metrics:
                self.val_metrics[name] = torch.nn.ModuleDict(
                    {"loss": SumMetric(), "tokens": SumMetric(), "bytes": SumMetric()}
                )

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        opt = torch.optim.AdamW(
            param_groups(self.model, hp.weight_decay, hp.decay_1d_params),
            lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps,
            fused=fused_adamw_supported(self.model),  # one kernel for all params
        )
        max_steps = require_max_steps(self.trainer, "the LR schedule is in optimizer steps")
        sched = lr_scheduler(
            opt, min_lr=hp.min_lr if hp.min_lr is not None else hp.lr / 10,
            warmup=warmup_steps(hp.warmup, max_steps), max_steps=max_steps,
            schedule=hp.lr_schedule, decay_fraction=hp.decay_fraction,
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- steps ----------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)

    def _doc_ids(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        if "doc_ids" in batch:
            return batch["doc_ids"]
        eos = getattr(self, "eos_id", None)
        if not self.hparams.document_masking or eos is None:
            return None
        ends = (batch["input_ids"] == eos).long()
        return torch.cumsum(ends, dim=1) - ends  # an EOS still belongs to the document it ends

    def _token_losses(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if getattr(self, "_chunked_loss", False):
            features = self.model.features(batch["input_ids"], doc_ids=self._doc_ids(batch))
            losses = chunked_cross_entropy(features, self.model.lm_head.weight, batch["targets"],
                                           batch["loss_mask"], self.hparams.loss_chunk_size)
            return losses, batch["loss_mask"].to(losses.dtype)
        logits = self.model(batch["input_ids"], doc_ids=self._doc_ids(batch))
        ce = F.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten(),
                             reduction="none").view_as(batch["targets"])
        mask = batch["loss_mask"].to(ce.dtype)
        return ce * mask, mask

    @property
    def flops_per_batch(self) -> float | None:
        """Training FLOPs of the last micro-batch on this device (for ThroughputMonitor's MFU)."""
        return getattr(self, "_flops_per_batch", None)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        b, t = batch["input_ids"].shape
        if getattr(self, "_flops_shape", None) != (b, t):  # the model's FLOPs per token, cached
            self._flops_shape = (b, t)
            self._flops_per_batch = self.model.flops_per_token(t) * b * t
        losses, mask = self._token_losses(batch)
        loss = losses.sum() / mask.sum().clamp_min(1)
        self._accumulate(batch, losses.detach(), mask)
        if (batch_idx + 1) % self.trainer.accumulate_grad_batches == 0:
            self._log_step()
        return loss

    def _accumulate(self, batch: dict[str, torch.Tensor], losses: torch.Tensor,
                    mask: torch.Tensor) -> None:
        # rows: loss sum, loss tokens, input tokens; columns: all, then each domain
        n = len(self.domains)
        if self._step_sums is None:
            self._step_sums = torch.zeros(3, n + 1, dtype=torch.float64, device=losses.device)
        # real (non-padding) input tokens per sequence; every token for pretraining blocks
        real = batch["tokens"].to(mask.dtype) if "tokens" in batch else torch.full_like(
            mask[:, 0], mask.shape[1])
        per_seq = torch.stack([losses.sum(1), mask.sum(1), real]).double()
        self._step_sums[:, 0] += per_seq.sum(1)
        if n:
            self._step_sums[:, 1:].index_add_(1, batch["domain"], per_seq)

    def _log_step(self) -> None:
        sums = self.trainer.strategy.reduce(self._step_sums, reduce_op="sum")
        self._step_sums = None
        loss_sum, loss_tokens, tokens = sums.cpu().tolist()
        dm = self.trainer.datamodule
        active = set(getattr(dm, "active_domains", self.domains))
        metrics = {"train/loss": loss_sum[0] / max(loss_tokens[0], 1)}
        for i, d in enumerate(self.domains, start=1):
            self.tokens_seen[d] += int(tokens[i])
            if d in active or self.tokens_seen[d]:
                metrics[f"train/tokens/{d}"] = float(self.tokens_seen[d])
            if loss_tokens[i] > 0:
                metrics[f"train/loss/{d}"] = loss_sum[i] / loss_tokens[i]
        metrics["train/tokens"] = float(sum(self.tokens_seen.values()))
        metrics["train/lr"] = self.trainer.optimizers[0].param_groups[0]["lr"]
        self.log("train/loss", metrics.pop("train/loss"), prog_bar=True, on_step=True,
                 on_epoch=False, batch_size=1)
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)
        if hasattr(dm, "weights_at"):
            self._log_mixture(dm, active)

    def _log_mixture(self, dm: Any, active: set[str]) -> None:
        """mixture/weight/<domain> on every logging step, and always on both sides of a phase
        start, so the curve steps exactly at the switch whatever log_every_n_steps is."""
        step = self.global_step  # the optimizer step these batches belong to (not yet stepped)
        starts = dm.phase_starts()
        edge = step == 0 or any(step in (s - 1, s) for s in starts)
        if not edge and (step + 1) % self.trainer.log_every_n_steps:
            return
        weights = {f"mixture/weight/{d}": w for d, w in dm.weights_at(step).items() if d in active}
        for logger in self.loggers:
            logger.log_metrics(weights, step=step)
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads:
            norm = torch.nn.utils.get_total_norm(grads)
            self.log("train/grad_norm", norm, on_step=True, on_epoch=False, batch_size=1)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int,
                        dataloader_idx: int = 0) -> None:
        losses, mask = self._token_losses(batch)
        name = list(self.val_metrics)[dataloader_idx]
        metrics = self.val_metrics[name]
        metrics["loss"].update(losses.sum().double())
        metrics["tokens"].update(mask.sum().double())
        bytes_per_token = getattr(self.trainer.datamodule, "val_bytes_per_token", None)
        if bytes_per_token is not None:
            # estimated from the split's average UTF-8 bytes per token
            metrics["bytes"].update(mask.sum().double() * bytes_per_token(name))

    test_step = validation_step

    def on_validation_epoch_end(self, prefix: str = "val") -> None:
        for name, metrics in self.val_metrics.items():
            tokens = metrics["tokens"].compute()
            if tokens > 0:
                loss = (metrics["loss"].compute() / tokens).item()
                self.log(f"{prefix}/{name}/loss", loss, add_dataloader_idx=False)
                self.log(f"{prefix}/{name}/ppl", math.exp(min(loss, 50.0)),
                         add_dataloader_idx=False)
                nbytes = metrics["bytes"].compute()
                if nbytes > 0:  # bits per UTF-8 byte: comparable across tokenizers
                    bpb = (metrics["loss"].compute() / math.log(2) / nbytes).item()
                    self.log(f"{prefix}/{name}/bpb", bpb, add_dataloader_idx=False)
            for m in metrics.values():
                m.reset()

    def on_test_epoch_end(self) -> None:
        self.on_validation_epoch_end(prefix="test")

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int,
                     dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        """Per-sequence mean loss (nats per loss token) of each sequence in the batch."""
        losses, mask = self._token_losses(batch)
        return {"loss": losses.sum(1) / mask.sum(1).clamp_min(1), "domain": batch["domain"]}

    def on_fit_start(self) -> None:
        # One chart per family in TensorBoard's "Custom Scalars" tab: curves of every domain
        # (or validation set) together.
        from lightning.pytorch.loggers import TensorBoardLogger

        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger) and self.trainer.is_global_zero:
                logger.experiment.add_custom_scalars({
                    "train": {"loss per domain": ["Multiline", [r"train/loss/.*"]],
                              "tokens per domain": ["Multiline", [r"train/tokens/.*"]]},
                    "mixture": {"weight per domain": ["Multiline", [r"mixture/weight/.*"]]},
                    "val": {"loss per set": ["Multiline", [r"val/.*/loss"]],
                            "bits per byte per set": ["Multiline", [r"val/.*/bpb"]]},
                })

    # -- checkpoint state -----------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["midtrain"] = {"tokens_seen": dict(self.tokens_seen)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.tokens_seen.update(checkpoint.get("midtrain", {}).get("tokens_seen", {}))
