"""``CausalLM``: the Lightning module around the plain ``GPT`` model."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from torchmetrics.aggregation import SumMetric

from midtrain.checkpoint.files import load_weights
from midtrain.data.contract import (
    DataContract,
    StepDataModule,
    require_contract,
    require_max_steps,
)
from midtrain.errors import MidtrainError
from midtrain.model.config import ModelConfig
from midtrain.model.gpt import GPT
from midtrain.model.loss import chunked_cross_entropy
from midtrain.train._lightning import publish_callback_metrics
from midtrain.train.metrics import DomainSums, add_per_domain, is_logging_step
from midtrain.train.optim import (
    ANNEALS,
    anneal_without_checkpoint,
    check_schedule,
    fused_adamw_supported,
    lr_at,
    lr_scheduler,
    param_groups,
    reschedule,
    warmup_steps,
)

FORK_OPTIMIZER = ("keep", "reset")

if TYPE_CHECKING:
    from lightning.fabric.utilities.data import AttributeDict
    from tokenizers import Tokenizer


class CausalLM(L.LightningModule):
    """Next-token prediction with a per-token loss mask.

    Args:
        arch: a preset name from ``midtrain.model.PRESETS`` (e.g. ``pythia-70m``, ``tiny``).
        model_config: overrides of the preset's fields (any custom shape).
        vocab_size: tokenizer vocabulary; the CLI links it from the data.
        lr, min_lr: peak and final learning rate (min_lr default: lr / 10).
        warmup: linear warmup in optimizer steps, or a fraction of max_steps if < 1.
        lr_schedule: a name in ``midtrain.train.optim.SCHEDULES``: ``cosine``, ``wsd``
            (warmup-stable-decay), ``constant``, or, for a run started with ``--fork``,
            ``anneal`` (linear from the checkpoint's LR at the fork step to min_lr at the
            last step) or ``anneal_wsd`` (hold the checkpoint's LR, then WSD's linear decay).
        decay_fraction: with ``wsd`` and ``anneal_wsd``, the final fraction of steps that
            decays (of the steps after the fork for ``anneal_wsd``).
        rewarm: with an anneal, warm up again from the fork step, to the checkpoint's LR over
            ``warmup`` steps (a fraction < 1: of the steps after the fork); without it an
            anneal has no warmup.
        weight_decay, decay_1d_params: AdamW decay, on matrices only unless decay_1d_params.
        betas, eps: AdamW.
        init_from: a checkpoint whose weights (only) initialise the model: fresh optimizer
            and schedule, for SFT and branches. Or ``hf:<local dir or hub id>[@revision]``: a
            Hugging Face GPTNeoX/Llama model, whose config also gives the shape (``arch`` is
            then unused; ``model_config`` may only agree with it, or change ``block_size``).
        activation_checkpointing: recompute each block's activations in backward (memory).
        compile: ``torch.compile`` the model: the whole trunk (embedding, blocks, final norm)
            on one device or under DDP, each transformer block under FSDP2.
        document_masking: in packed pretraining blocks, attend only within each document
            (split at EOS) with positions restarting per document; off by default, as Pythia.
        loss_chunk_size: compute the cross-entropy this many tokens at a time from the final
            features and the lm_head weight, never building the full logits
            (``midtrain.model.loss``); 0 builds the full fp32 logits. Under FSDP2 the full logits are
            always built.

    Under Lightning's ``ModelParallelStrategy`` the model is built on the meta device, sharded
    per block with FSDP2 and then initialised shard by shard (``midtrain.model.parallelize``); under
    any other strategy (single device, DDP) it is built directly.
    """

    if TYPE_CHECKING:
        # save_hyperparameters stores them as an AttributeDict (Lightning types the property
        # as any MutableMapping): `self.hparams.lr` type-checks.
        @property
        def hparams(self) -> AttributeDict: ...

    def __init__(
        self,
        arch: str = "pythia-70m",
        model_config: dict[str, Any] | None = None,
        vocab_size: int | None = None,
        lr: float = 3e-4,
        min_lr: float | None = None,
        warmup: float = 0.01,
        lr_schedule: str = "cosine",
        decay_fraction: float = 0.2,
        weight_decay: float = 0.1,
        decay_1d_params: bool = False,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        init_from: str | None = None,
        activation_checkpointing: bool = False,
        compile: bool = False,
        document_masking: bool = False,
        loss_chunk_size: int = 1024,
        rewarm: bool = False,
    ) -> None:
        super().__init__()
        self.config = _model_config(arch, model_config, vocab_size, init_from)
        _check_training_arguments(lr, lr_schedule, rewarm, loss_chunk_size, init_from)
        self.save_hyperparameters()
        if init_from is not None and init_from.startswith("hf:"):
            # the resolved shape, so a checkpoint of this run describes its model by itself
            self.hparams["model_config"] = dataclasses.asdict(self.config)
        self.hparams["betas"] = list(betas)  # a tuple would not read back with yaml.safe_load
        self.model: GPT | None = None
        # from the data module (the data contract), set by connect()
        self.data: DataContract | None = None
        self.domains: list[str] = []
        self.eos_id: int | None = None
        self.val_bytes_per_token: dict[str, float] = {}
        # training metrics: on the device between logging steps (midtrain.train.metrics)
        self.tokens_seen: dict[str, int] = {}  # global, up to the last flush; in checkpoints
        self._step_sums: DomainSums | None = None  # this step, this rank
        self._sums_step: int | None = None  # the optimizer step _step_sums belong to
        # train/* values published to trainer.callback_metrics, and those of a logging step
        # computed early for a checkpoint (step, metrics): a resume publishes them again
        self._published: dict[str, float] = {}
        self._early: tuple[int, dict[str, float]] | None = None
        self._restored: dict[str, float] | None = None
        self._tokens_pending: torch.Tensor | None = None  # since the last flush, this rank
        self._grad_norm: torch.Tensor | None = None  # on logging steps only
        self.val_metrics = torch.nn.ModuleDict()
        # the model's training FLOPs per micro-batch, for the shape last seen
        self._flops_shape: tuple[int, int] | None = None
        self._flops_per_batch: float | None = None
        # the chunked loss reads lm_head's weight outside the model's forward (set in configure_model)
        self._chunked_loss = False
        # `--fork_optimizer`: keep the checkpoint's AdamW state, or reset it (set by the CLI)
        self.fork_optimizer = "keep"
        # what started this run from a checkpoint (`fork` in the run record), and where an
        # anneal starts: {"step": fork step, "lr": the checkpoint's LR}; both in checkpoints
        self.fork_record: dict[str, Any] | None = None
        self.anneal_from: dict[str, Any] | None = None
        # which weights of a checkpoint validate/test load: "live", or "ema" (the average kept
        # by midtrain.callbacks.EMA); set by `midtrain validate --weights`, not a hyperparameter
        self.checkpoint_weights = "live"

    # -- construction ---------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:
            return
        from midtrain.model import parallelize as parallel

        trainer = self._attached_trainer()
        strategy = trainer.strategy if trainer is not None else None
        mesh = None
        if isinstance(strategy, ModelParallelStrategy):
            mesh = strategy.device_mesh["data_parallel"]
        with torch.device("meta") if mesh is not None else contextlib.nullcontext():
            model = GPT(self.config)
        if self.hparams.activation_checkpointing:
            parallel.apply_activation_checkpointing(model)
        if self.hparams.compile:
            parallel.apply_compile(model, per_block=mesh is not None)
        if mesh is not None:
            assert isinstance(strategy, ModelParallelStrategy)  # the mesh is its
            parallel.apply_fsdp(model, mesh)
            parallel.materialize(model, strategy.root_device)
        if self.hparams.init_from:
            self._load_init_weights(model, sharded=mesh is not None)
        # An FSDP2-sharded lm_head is gathered only inside the root module's forward: the
        # chunked loss, which reads the head weight outside it, stays off there.
        self._chunked_loss = bool(self.hparams.get("loss_chunk_size", 0)) and mesh is None
        self.model = model

    def _load_init_weights(self, model: GPT, sharded: bool) -> None:
        if self.hparams.init_from.startswith("hf:"):
            from midtrain.model import hf

            hf.load_into(model, self.hparams.init_from, sharded)
            return
        state = load_weights(self.hparams.init_from)
        try:
            if sharded:
                from torch.distributed.checkpoint.state_dict import (
                    StateDictOptions,
                    set_model_state_dict,
                )

                set_model_state_dict(
                    model,
                    state,  # type: ignore[arg-type]  # torch types it dict[str, ValueType]: invariant
                    options=StateDictOptions(full_state_dict=True),
                )
            else:
                model.load_state_dict(state)
        except (RuntimeError, KeyError, ValueError) as e:
            first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
            raise MidtrainError(
                f"model.init_from: {self.hparams.init_from} does not fit arch "
                f"{self.hparams.arch!r}: {first}"
            ) from None

    def _built(self) -> GPT:
        """The model ``configure_model`` built."""
        if self.model is None:
            raise RuntimeError("CausalLM: the model is not built yet (configure_model builds it)")
        return self.model

    def _attached_trainer(self) -> L.Trainer | None:
        try:
            return self.trainer
        except RuntimeError:  # not attached: built outside a Trainer
            return None

    def connect(self, datamodule: object) -> None:
        """Take what the model needs from a data module implementing ``DataContract`` (a
        one-line error names what is missing), and refuse data the model cannot take: a larger
        vocabulary or longer rows than its context. The one place these are checked; the CLI
        calls it before anything is written, ``setup`` again for plain ``Trainer.fit``."""
        data = require_contract(datamodule)
        if data.vocab_size > self.config.padded_vocab_size:
            raise MidtrainError(
                f"model.vocab_size: the tokenizer has {data.vocab_size} tokens but the model's "
                f"vocabulary is {self.config.padded_vocab_size}; raise model_config.vocab_size"
            )
        store = getattr(datamodule, "store", None)
        if (self.hparams.init_from or "").startswith("hf:") and store is not None:
            from midtrain.model import hf

            hf.check_store(self.hparams.init_from, store)  # same tokenizer and EOS as the model
        if data.seq_len > self.config.block_size:
            raise MidtrainError(
                f"data.seq_len: {data.seq_len} is beyond the model context "
                f"{self.config.block_size}; lower data.seq_len or raise model_config.block_size"
            )
        self.data = data
        self.eos_id = data.eos_id
        self.domains = list(data.domains)
        for d in self.domains:
            self.tokens_seen.setdefault(d, 0)
        self.val_bytes_per_token = {n: data.val_bytes_per_token(n) for n in data.val_set_names}
        for name in data.val_set_names:
            if name not in self.val_metrics:
                self.val_metrics[name] = torch.nn.ModuleDict(
                    # nan_strategy="disable": a NaN loss stays NaN (the default drops it, and a
                    # diverged model would report loss 0)
                    {k: SumMetric(nan_strategy="disable") for k in ("loss", "tokens", "bytes")}
                )

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule  # type: ignore[attr-defined]  # set by Lightning, undeclared
        if dm is not None:  # plain dataloaders work too, without per-domain metrics
            self.connect(dm)

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        hp = self.hparams
        opt = torch.optim.AdamW(
            param_groups(self._built(), hp.weight_decay, hp.decay_1d_params),
            lr=hp.lr,
            betas=tuple(hp.betas),
            eps=hp.eps,
            fused=fused_adamw_supported(self._built()),  # one kernel for all params
        )
        max_steps = require_max_steps(self.trainer, "the LR schedule is in optimizer steps")
        if hp.lr_schedule in ANNEALS and self.anneal_from is None and not self.trainer.ckpt_path:
            raise anneal_without_checkpoint(hp.lr_schedule)
        sched = lr_scheduler(opt, **self._schedule(max_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- steps ----------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._built()(input_ids)

    def _doc_ids(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        if "doc_ids" in batch:
            return batch["doc_ids"]
        eos = self.eos_id
        if not self.hparams.document_masking or eos is None:
            return None
        ends = (batch["input_ids"] == eos).long()
        return torch.cumsum(ends, dim=1) - ends  # an EOS still belongs to the document it ends

    def _token_losses(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        model = self._built()
        if getattr(self, "_chunked_loss", False):
            features = model.features(batch["input_ids"], doc_ids=self._doc_ids(batch))
            losses = chunked_cross_entropy(
                features,
                model.lm_head.weight,
                batch["targets"],
                batch["loss_mask"],
                self.hparams.loss_chunk_size,
            )
            return losses, batch["loss_mask"].to(losses.dtype)
        logits = model(batch["input_ids"], doc_ids=self._doc_ids(batch))
        ce = F.cross_entropy(
            logits.flatten(0, 1).float(), batch["targets"].flatten(), reduction="none"
        ).view_as(batch["targets"])
        mask = batch["loss_mask"].to(ce.dtype)
        return ce * mask, mask

    @property
    def flops_per_batch(self) -> float | None:
        """Training FLOPs of the last micro-batch on this device (for ThroughputMonitor's MFU)."""
        return self._flops_per_batch

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        b, t = batch["input_ids"].shape
        if self._flops_shape != (b, t):  # the model's FLOPs per token, cached
            self._flops_shape = (b, t)
            self._flops_per_batch = self._built().flops_per_token(t) * b * t
        losses, mask = self._token_losses(batch)
        loss = losses.sum() / mask.sum().clamp_min(1)
        self._accumulate(batch, losses.detach(), mask)
        return loss

    # -- training metrics: device-side every step, reduced and logged on logging steps ------
    def _accumulate(
        self, batch: dict[str, torch.Tensor], losses: torch.Tensor, mask: torch.Tensor
    ) -> None:
        n = len(self.domains)
        if self._step_sums is None:
            self._step_sums = DomainSums.zeros(n, losses.device)
            self._sums_step = self.global_step
        if self._tokens_pending is None:
            self._tokens_pending = torch.zeros(n + 1, dtype=torch.float64, device=losses.device)
        # real (non-padding) input tokens per sequence; every token for pretraining blocks
        real = batch["tokens"] if "tokens" in batch else torch.full_like(mask[:, 0], mask.shape[1])
        domain = batch["domain"] if n else None
        self._step_sums.add(losses, mask, real, domain)
        add_per_domain(self._tokens_pending, real, domain)

    def is_logging_step(self, step: int) -> bool:
        """Whether optimizer step ``step`` logs training metrics (``midtrain.train.metrics``)."""
        trainer = self.trainer
        starts = self.data.phase_starts() if self.data is not None else [0]
        every = trainer.log_every_n_steps  # type: ignore[attr-defined]  # set by Lightning, undeclared
        return is_logging_step(step, every, trainer.max_steps or 0, starts)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if not self.is_logging_step(self.global_step):
            return  # the norm costs a pass over every gradient: only when it is logged
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads:
            self._grad_norm = torch.nn.utils.get_total_norm(grads)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if (batch_idx + 1) % self.trainer.accumulate_grad_batches:
            return  # mid-accumulation: the step's sums keep growing
        step = self.global_step - 1  # the optimizer step just taken
        if self.is_logging_step(step):
            self._log_train_step(step)
        self._step_sums = None

    def _flush_tokens(self) -> None:
        """Add this step's pending token counts of every rank to ``tokens_seen`` (a collective
        and one transfer: on logging steps and before a checkpoint is written)."""
        if self._tokens_pending is None:
            return
        pending = self.trainer.strategy.reduce(self._tokens_pending, reduce_op="sum")
        self._tokens_pending = None
        for d, n in zip(self.domains, pending[1:].tolist(), strict=True):
            self.tokens_seen[d] += int(n)

    def _step_metrics(self, step: int) -> dict[str, float]:
        """The metrics of logging step ``step``: ``train/loss``, and per domain
        ``train/loss/<d>`` and ``train/tokens/<d>`` only if the domain had tokens in this step
        (no stale values: a domain without tokens has no point at that step). Collectives and
        one transfer; computed once (a checkpoint written before the step is logged asks
        first, ``on_save_checkpoint``)."""
        if self._early is not None and self._early[0] == step:
            return self._early[1]
        assert self._step_sums is not None  # this step's training_step set them
        sums = DomainSums.from_stacked(
            self.trainer.strategy.reduce(self._step_sums.stacked(), reduce_op="sum").cpu()
        )
        self._flush_tokens()
        metrics = {"train/loss": float(sums.loss[0] / sums.loss_tokens[0].clamp_min(1))}
        for i, d in enumerate(self.domains, start=1):
            if sums.tokens[i] > 0:
                metrics[f"train/tokens/{d}"] = float(self.tokens_seen[d])
            if sums.loss_tokens[i] > 0:
                metrics[f"train/loss/{d}"] = float(sums.loss[i] / sums.loss_tokens[i])
        metrics["train/tokens"] = float(sum(self.tokens_seen.values()))
        metrics["train/lr"] = self.trainer.optimizers[0].param_groups[0]["lr"]
        if self._grad_norm is not None:
            norm = self._grad_norm
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2 DTensor
            metrics["train/grad_norm"] = float(norm)
            self._grad_norm = None
        self._early = (step, metrics)
        return metrics

    def _log_train_step(self, step: int) -> None:
        """Log step ``step`` (``_step_metrics``) and publish it to ``callback_metrics``."""
        metrics = self._step_metrics(step)
        self._early = None
        self._published.update(metrics)
        for logger in self.loggers:
            logger.log_metrics(metrics, step=step)
        # Also in trainer.callback_metrics (for callbacks and ModelCheckpoint(monitor=...)),
        # updated on logging steps, as host tensors. Not through self.log: its result collection
        # costs ~0.8 ms a key on every logging step. train/loss goes through it only to reach
        # the progress bar.
        publish_callback_metrics(self.trainer, metrics)
        if self.trainer.progress_bar_callback is not None:
            self.log(
                "train/loss",
                torch.tensor(metrics["train/loss"]),
                logger=False,
                prog_bar=True,
                on_step=True,
                on_epoch=False,
                batch_size=1,
            )

    def validation_step(
        self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        losses, mask = self._token_losses(batch)
        name = list(self.val_metrics)[dataloader_idx]
        metrics = _sums(self.val_metrics[name])
        metrics["loss"].update(losses.sum().double())
        metrics["tokens"].update(mask.sum().double())
        if name in self.val_bytes_per_token:
            # estimated from the split's average UTF-8 bytes per token
            metrics["bytes"].update(mask.sum().double() * self.val_bytes_per_token[name])

    test_step = validation_step

    def evaluation_results(self, prefix: str = "val") -> dict[str, float]:
        """``<prefix>/<set>/{loss,ppl,bpb}`` of what the validation steps since the last call
        added up (reduced over ranks), and reset the sums. A NaN loss stays NaN (never a
        number: torchmetrics would make it 0)."""
        results: dict[str, float] = {}
        for name, module in self.val_metrics.items():
            metrics = _sums(module)
            tokens = metrics["tokens"].compute()
            if tokens > 0:
                loss = (metrics["loss"].compute() / tokens).item()
                results[f"{prefix}/{name}/loss"] = loss
                ppl = math.exp(min(loss, 50.0)) if math.isfinite(loss) else math.nan
                results[f"{prefix}/{name}/ppl"] = ppl
                nbytes = metrics["bytes"].compute()
                if nbytes > 0:  # bits per UTF-8 byte: comparable across tokenizers
                    bpb = (metrics["loss"].compute() / math.log(2) / nbytes).item()
                    results[f"{prefix}/{name}/bpb"] = bpb
            for m in metrics.values():
                m.reset()
        return results

    def on_validation_epoch_end(self, prefix: str = "val") -> None:
        for key, value in self.evaluation_results(prefix).items():
            self.log(key, value, add_dataloader_idx=False)

    def on_test_epoch_end(self) -> None:
        self.on_validation_epoch_end(prefix="test")

    def predict_step(
        self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> dict[str, torch.Tensor]:
        """Per-sequence mean loss (nats per loss token) of each sequence in the batch."""
        losses, mask = self._token_losses(batch)
        return {"loss": losses.sum(1) / mask.sum(1).clamp_min(1), "domain": batch["domain"]}

    def on_train_start(self) -> None:
        # A resumed run starts with the callback metrics the interrupted run held after the
        # checkpoint's step: callbacks that decide from them (AdaptiveMixture) decide alike.
        if self._restored:
            publish_callback_metrics(self.trainer, self._restored)
            self._published = dict(self._restored)
        self._restored = None

    def on_fit_start(self) -> None:
        # One chart per family in TensorBoard's "Custom Scalars" tab: curves of every domain
        # (or validation set) together.
        from lightning.pytorch.loggers import TensorBoardLogger

        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger) and self.trainer.is_global_zero:
                logger.experiment.add_custom_scalars(
                    {
                        "train": {
                            "loss per domain": ["Multiline", [r"train/loss/.*"]],
                            "tokens per domain": ["Multiline", [r"train/tokens/.*"]],
                        },
                        "mixture": {"weight per domain": ["Multiline", [r"mixture/weight/.*"]]},
                        "val": {
                            "loss per set": ["Multiline", [r"val/.*/loss"]],
                            "bits per byte per set": ["Multiline", [r"val/.*/bpb"]],
                        },
                        "val_ema": {  # midtrain.callbacks.EMA's averaged weights
                            "loss per set": ["Multiline", [r"val_ema/.*/loss"]],
                            "bits per byte per set": ["Multiline", [r"val_ema/.*/bpb"]],
                        },
                    }
                )

    # -- generation -----------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        prompts: str | list[str],
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: list[str] | None = None,
        tokenizer: Tokenizer | str | Path | None = None,
        stop_at_eos: bool = True,
    ) -> str | list[str]:
        """Completions of ``prompts`` (one string or a batch), greedy by default, with a KV
        cache. ``tokenizer``: a ``tokenizers.Tokenizer`` or tokenizer.json path; by default
        the training store's, or the HF model's this module was initialised from."""
        from tokenizers import Tokenizer

        from midtrain.model.generation import Sampling, generate_text

        if tokenizer is None:
            trainer = self._attached_trainer()
            store = getattr(getattr(trainer, "datamodule", None), "store", None)
            if store is not None:
                tokenizer = str(store.tokenizer_path)
            elif (self.hparams.init_from or "").startswith("hf:"):
                from midtrain.data.hub import tokenizer_file

                tokenizer = str(tokenizer_file(self.hparams.init_from))
            else:
                raise MidtrainError(
                    "generate: give tokenizer= (no data module or HF model to take it from)"
                )
        if not isinstance(tokenizer, Tokenizer):
            tokenizer = Tokenizer.from_file(str(tokenizer))
        eos = getattr(self, "eos_id", None)
        if eos is None:
            from midtrain.data.tokenizer import DEFAULT_EOS

            eos = tokenizer.token_to_id(DEFAULT_EOS)
        sampling = Sampling(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            stop=list(stop or []),
            stop_ids=[eos] if stop_at_eos and eos is not None else [],
        )
        if self.model is None:
            self.configure_model()
        batch = [prompts] if isinstance(prompts, str) else list(prompts)
        out = generate_text(
            self._built(),
            tokenizer,
            batch,
            sampling,
            vocab_size=min(
                self.config.padded_vocab_size, tokenizer.get_vocab_size(with_added_tokens=True)
            ),
        )
        return out[0] if isinstance(prompts, str) else out

    # -- checkpoint state -----------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from midtrain.checkpoint.resume import run_record

        self._flush_tokens()  # every rank saves: the counts include the last step
        checkpoint["midtrain"] = {
            "tokens_seen": dict(self.tokens_seen),
            "callback_metrics": self._metrics_after_step(),
        }
        if self.anneal_from is not None:  # a resumed anneal continues from the same start
            checkpoint["midtrain"]["anneal"] = dict(self.anneal_from)
        trainer = self._attached_trainer()
        if trainer is not None:  # what a resume must agree with (midtrain.checkpoint.resume)
            dm = trainer.datamodule  # type: ignore[attr-defined]  # set by Lightning, undeclared
            checkpoint["midtrain"]["run"] = run_record(self, dm, trainer)

    def _metrics_after_step(self) -> dict[str, float]:
        """The train/* values ``callback_metrics`` holds once the step just taken is done.
        A checkpoint is written (in a callback's ``on_train_batch_end``) before this module
        logs that step: a logging step's metrics are computed now, on every rank (every rank
        saves), and logged from the same values afterwards."""
        metrics = dict(self._published)
        trainer = self._attached_trainer()
        step = self.global_step - 1
        complete = self._step_sums is not None and self._sums_step == step
        if trainer is not None and trainer.training and complete and self.is_logging_step(step):
            metrics.update(self._step_metrics(step))
        return metrics

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from midtrain.checkpoint.resume import fork_optimizer_state, refuse_differences, run_record

        saved = checkpoint.get("midtrain", {})
        self.tokens_seen.update(saved.get("tokens_seen", {}))
        self._restored = dict(saved.get("callback_metrics", {}))
        trainer = self._attached_trainer()
        if self.checkpoint_weights == "ema" and trainer is not None and trainer.state.fn != "fit":
            from midtrain.checkpoint.files import averaged_state

            # Lightning loads checkpoint["state_dict"] right after this hook
            checkpoint["state_dict"] = averaged_state(
                checkpoint, trainer.ckpt_path or "--ckpt_path"
            )["state_dict"]
        if trainer is None or trainer.state.fn != "fit" or "run" not in saved:
            return
        dm = trainer.datamodule  # type: ignore[attr-defined]  # set by Lightning, undeclared
        fork = isinstance(dm, StepDataModule) and dm.fork_step is not None
        where = f"{'--fork' if fork else '--ckpt_path'} {trainer.ckpt_path}"
        refuse_differences(saved["run"], run_record(self, dm, trainer), fork, where)
        if fork:
            self._start_branch(checkpoint, dm, where)
            fork_optimizer_state(
                checkpoint,
                self._lr_at(checkpoint.get("global_step", 0)),
                lr=self.hparams.lr,
                betas=tuple(self.hparams.betas),
                eps=self.hparams.eps,
                weight_decay=self.hparams.weight_decay,
                reset=self.fork_optimizer == "reset",
            )
        else:  # a resume continues the run as it was started
            self.fork_record = saved["run"].get("fork")
            self.anneal_from = saved.get("anneal")
        # already built where the strategy restores after configure_optimizers (FSDP2)
        for config in trainer.lr_scheduler_configs:
            reschedule(config.scheduler, self.hparams.lr, **self._schedule(trainer.max_steps))

    def _start_branch(self, checkpoint: dict[str, Any], dm: Any, where: str) -> None:
        """A fork's record (what it kept, what it reset) and, for an anneal, its start: the
        fork step and the learning rate the checkpoint was running at."""
        from midtrain.checkpoint.resume import checkpoint_lr

        if self.fork_optimizer not in FORK_OPTIMIZER:
            raise MidtrainError(
                f"fork_optimizer: {self.fork_optimizer!r}; use one of {', '.join(FORK_OPTIMIZER)}"
            )
        step = int(checkpoint.get("global_step", 0))
        self.fork_record = {
            "step": step,
            "optimizer": self.fork_optimizer,
            "data": getattr(dm, "fork_data", "keep"),
        }
        self.anneal_from = None
        if self.hparams.lr_schedule in ANNEALS:
            self.anneal_from = {"step": step, "lr": checkpoint_lr(checkpoint, where)}

    def _schedule(self, max_steps: int) -> dict[str, Any]:
        """``lr_at``'s settings for this run: an anneal starts at ``anneal_from`` (before a
        checkpoint is read under late-restoring strategies: at lr, rescheduled on load)."""
        hp = self.hparams
        anneal = hp.lr_schedule in ANNEALS
        start: dict[str, Any] = {"step": 0, "lr": hp.lr if anneal else None}
        if anneal and self.anneal_from is not None:
            start = self.anneal_from
        warmup = hp.warmup if not anneal or hp.get("rewarm") else 0
        return {
            "min_lr": hp.min_lr if hp.min_lr is not None else hp.lr / 10,
            "warmup": warmup_steps(warmup, max_steps - start["step"]),
            "max_steps": max_steps,
            "schedule": hp.lr_schedule,
            "decay_fraction": hp.decay_fraction,
            "origin": start["step"],
            "start_lr": start["lr"] if anneal else None,
        }

    def _lr_at(self, step: int) -> float:
        """This run's learning rate at optimizer ``step`` (its own schedule)."""
        return lr_at(step, lr=self.hparams.lr, **self._schedule(self.trainer.max_steps))


def _sums(metrics: torch.nn.Module) -> Mapping[str, SumMetric]:
    """A validation set's ``loss``/``tokens``/``bytes`` sums (a ModuleDict, which types its
    items as plain modules)."""
    return cast("Mapping[str, SumMetric]", metrics)


def _model_config(
    arch: str, model_config: dict[str, Any] | None, vocab_size: int | None, init_from: str | None
) -> ModelConfig:
    """The model's shape: a preset with overrides, or an HF model's own config."""
    if init_from is not None and init_from.startswith("hf:"):
        from midtrain.model import hf

        # the shape comes from the HF config; the weights load in configure_model
        return hf.config_for_init(init_from, model_config)
    overrides = dict(model_config or {})
    if vocab_size is not None:  # linked from the data; an explicit model_config wins
        overrides.setdefault("vocab_size", vocab_size)
    try:
        return ModelConfig.from_name(arch, **overrides)
    except ValueError as e:
        raise MidtrainError(f"model: {e}") from None


def _check_training_arguments(
    lr: float, lr_schedule: str, rewarm: bool, loss_chunk_size: int, init_from: str | None
) -> None:
    """Refuse, in one line naming the key, what CausalLM cannot train with."""
    if lr <= 0:
        raise MidtrainError(f"model.lr: must be positive, got {lr}")
    check_schedule(lr_schedule)
    if rewarm and lr_schedule not in ANNEALS:
        raise MidtrainError(
            f"model.rewarm: re-warms an anneal from its fork step; with lr_schedule "
            f"{lr_schedule!r} warmup already runs from step 0: set model.lr_schedule: "
            "anneal (or anneal_wsd), or drop model.rewarm"
        )
    if not isinstance(loss_chunk_size, int) or loss_chunk_size < 0:
        raise MidtrainError(f"model.loss_chunk_size: must be an int >= 0, got {loss_chunk_size!r}")
    if init_from is not None and not init_from.startswith("hf:") and not Path(init_from).exists():
        raise MidtrainError(f"model.init_from: checkpoint not found: {init_from}")
