"""``CausalLM``: the Lightning module around the plain ``GPT`` model. It keeps the language-model
step (build, data contract, loss, optimizer) and hands the rest to their own homes: metrics to
``midtrain.train.metrics``, the TensorBoard layout to ``midtrain.train.dashboards``, fork and
anneal mechanics to ``midtrain.train.branch``, decoding to ``midtrain.model.generation``, and
what a command does with a checkpoint to ``midtrain.checkpoint.plan``."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig

from midtrain.checkpoint.files import averaged_state, load_weights, read_metadata
from midtrain.checkpoint.load import check_init_from
from midtrain.checkpoint.plan import Rule, RunPlan, Setting, check_restore, plan_of, record_of
from midtrain.data.contract import DataContract, require_contract, require_max_steps
from midtrain.data.hub import is_hf
from midtrain.errors import MidtrainError
from midtrain.model.config import build_config
from midtrain.model.gpt import GPT
from midtrain.model.loss import chunked_cross_entropy
from midtrain.train._lightning import set_evaluation_step
from midtrain.train.branch import Branch
from midtrain.train.dashboards import write_layout
from midtrain.train.metrics import (
    TrainingMetrics,
    add_validation,
    evaluation_results,
    is_logging_step,
    validation_sums,
)
from midtrain.train.optim import (
    ANNEALS,
    anneal_without_checkpoint,
    build_adamw,
    check_schedule,
    lr_scheduler,
    reschedule,
)

if TYPE_CHECKING:
    from lightning.fabric.utilities.data import AttributeDict
    from tokenizers import Tokenizer

# Hyperparameters that do not shape a run's state: a resume may change them (the shape is
# compared as ``model.shape``; how the model is computed is free). Every other hyperparameter,
# including one added later, must match on resume (``midtrain.checkpoint.plan``).
FREE_HPARAMS = (
    "arch",
    "model_config",
    "vocab_size",
    "init_from",
    "activation_checkpointing",
    "compile",
    "loss_chunk_size",
)
# Hyperparameters that shaped the checkpoint's optimizer state: a fork keeps them too.
PAST_HPARAMS = ("decay_1d_params",)


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
        schedule_offset: continue another run's learning-rate schedule: step k of this run
            takes the schedule's step ``schedule_offset + k``, of a schedule of
            ``schedule_offset + trainer.max_steps`` steps (``warmup`` < 1 is a fraction of
            that whole schedule). For a released checkpoint of step N continued on its own
            schedule (Pythia's: ``schedule_offset: 100000``); not with an anneal.
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
        schedule_offset: int = 0,
    ) -> None:
        super().__init__()
        self.config = build_config(arch, model_config, vocab_size, init_from)
        _check_training_arguments(lr, lr_schedule, rewarm, loss_chunk_size, init_from)
        _check_schedule_offset(schedule_offset, lr_schedule)
        self.save_hyperparameters()
        if is_hf(init_from):
            # the resolved shape, so a checkpoint of this run describes its model by itself
            self.hparams["model_config"] = dataclasses.asdict(self.config)
        self.hparams["betas"] = list(betas)  # a tuple would not read back with yaml.safe_load
        self.model: GPT | None = None
        # from the data module (the data contract), set by connect()
        self.data: DataContract | None = None
        self.domains: list[str] = []
        self.eos_id: int | None = None
        self.val_bytes_per_token: dict[str, float] = {}
        self.metrics = TrainingMetrics()  # train/*: on the device between logging steps
        self.val_metrics = torch.nn.ModuleDict()  # per validation set (torchmetrics sums)
        self.branch = Branch()  # how this run started from a checkpoint (forks, anneals)
        # the model's training FLOPs per micro-batch, for the shape last seen
        self._flops_shape: tuple[int, int] | None = None
        self._flops_per_batch: float | None = None
        # the chunked loss reads lm_head's weight outside the model's forward (set in configure_model)
        self._chunked_loss = False

    @property
    def tokens_seen(self) -> dict[str, int]:
        """Training tokens per domain, all ranks, up to the last logging step or checkpoint."""
        return self.metrics.tokens_seen

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
        if is_hf(self.hparams.init_from):
            from midtrain.model import hf

            hf.load_into(model, self.hparams.init_from, sharded)
            return
        state = load_weights(self.hparams.init_from, plan_of(self._attached_trainer()).weights)
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
        if is_hf(self.hparams.init_from) and store is not None:
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
        self.metrics.connect(self.domains)
        self.val_bytes_per_token = {n: data.val_bytes_per_token(n) for n in data.val_set_names}
        for name in data.val_set_names:
            if name not in self.val_metrics:
                self.val_metrics[name] = validation_sums()

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule  # type: ignore[attr-defined]  # set by Lightning, undeclared
        if dm is not None:  # plain dataloaders work too, without per-domain metrics
            self.connect(dm)

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        opt = build_adamw(self._built(), self.hparams)
        max_steps = require_max_steps(self.trainer, "the LR schedule is in optimizer steps")
        self.check_plan(plan_of(self.trainer), self.trainer)
        sched = lr_scheduler(opt, **self.branch.schedule(self.hparams, max_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- run state (midtrain.checkpoint.plan) -----------------------------------------------
    def run_settings(self, trainer: L.Trainer) -> dict[str, Setting]:
        """The model's shape, its optimizer and schedule settings (every hyperparameter but
        ``FREE_HPARAMS``), and how the run started from a checkpoint (``fork``)."""
        settings = {"model.shape": Setting(self.config.shape(), Rule.PAST, weights=True)}
        for key, value in self.hparams.items():
            if key not in FREE_HPARAMS:
                rule = Rule.PAST if key in PAST_HPARAMS else Rule.RESUME
                settings[f"model.{key}"] = Setting(value, rule)
        if self.branch.fork is not None:
            settings["fork"] = Setting(dict(self.branch.fork), Rule.RECORD)
        return settings

    def check_plan(self, plan: RunPlan, trainer: L.Trainer) -> None:
        """An anneal starts from a checkpoint's LR; ``model.init_from``'s weights fit this
        model; ``--weights ema`` for fit reads the averaged weights of ``model.init_from``."""
        schedule = self.hparams.lr_schedule
        if plan.mode == "new" and schedule in ANNEALS and self.branch.anneal is None:
            raise anneal_without_checkpoint(schedule)
        init_from = self.hparams.init_from
        if init_from and not is_hf(init_from):
            check_init_from(init_from, self.config)
        if plan.command != "fit" or plan.weights == "live":
            return
        if not init_from or is_hf(init_from):
            raise MidtrainError(
                f"--weights: {plan.weights} for fit reads the averaged weights of the "
                "model.init_from checkpoint, and this run has none; otherwise --weights is for "
                "validate and test only"
            )
        averaged_state(read_metadata(init_from), init_from)

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
        self.metrics.add(self.global_step, batch, losses.detach(), mask)
        return loss

    def is_logging_step(self, step: int) -> bool:
        """Whether optimizer step ``step`` logs training metrics (``midtrain.train.metrics``)."""
        trainer = self.trainer
        starts = self.data.phase_starts() if self.data is not None else [0]
        every = trainer.log_every_n_steps  # type: ignore[attr-defined]  # set by Lightning, undeclared
        return is_logging_step(step, every, trainer.max_steps or 0, starts)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.is_logging_step(self.global_step):
            self.metrics.before_optimizer_step(optimizer, self.parameters())

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        from midtrain.train.callbacks.base import optimizer_step_ended

        if not optimizer_step_ended(self.trainer, batch_idx):
            return  # mid-accumulation: the step's sums keep growing
        step = self.global_step - 1  # the optimizer step just taken
        if self.is_logging_step(step):
            metrics = self.metrics.log_step(self.trainer, step)
            if self.trainer.progress_bar_callback is not None:  # the bar reads self.log only
                loss = torch.tensor(metrics["train/loss"])
                self.log(
                    "train/loss", loss, logger=False, prog_bar=True, on_step=True,
                    on_epoch=False, batch_size=1,
                )  # fmt: skip
        self.metrics.step_done()

    def validation_step(
        self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        losses, mask = self._token_losses(batch)
        name = list(self.val_metrics)[dataloader_idx]
        add_validation(self.val_metrics[name], losses, mask, self.val_bytes_per_token.get(name))

    test_step = validation_step

    def evaluation_results(self, prefix: str = "val") -> dict[str, float]:
        """``<prefix>/<set>/{loss,ppl,bpb}`` of what the validation steps since the last call
        added up (reduced over ranks), and reset the sums."""
        return evaluation_results(self.val_metrics, prefix)

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
        self.metrics.publish_restored(self.trainer)

    def on_fit_start(self) -> None:
        write_layout(self.trainer)

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

        from midtrain.model.generation import complete

        if tokenizer is None:
            tokenizer = self._own_tokenizer()
        if not isinstance(tokenizer, Tokenizer):
            tokenizer = Tokenizer.from_file(str(tokenizer))
        if self.model is None:
            self.configure_model()
        batch = [prompts] if isinstance(prompts, str) else list(prompts)
        out = complete(
            self._built(), tokenizer, batch, self.eos_id, max_new_tokens, temperature, top_k,
            top_p, seed, stop, stop_at_eos,
        )  # fmt: skip
        return out[0] if isinstance(prompts, str) else out

    def _own_tokenizer(self) -> Path:
        from midtrain.checkpoint.load import model_tokenizer

        trainer = self._attached_trainer()
        store = getattr(getattr(trainer, "datamodule", None), "store", None)
        found = model_tokenizer(store.root if store is not None else None, self.hparams.init_from)
        if found is None:
            raise MidtrainError(
                "generate: give tokenizer= (no data module or HF model to take it from)"
            )
        return found.path

    # -- checkpoint state -----------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainer = self._attached_trainer()
        step = self.global_step - 1
        logging = trainer is not None and trainer.training and self.is_logging_step(step)
        checkpoint["midtrain"] = self.metrics.state(trainer, step, logging)
        if self.branch.anneal is not None:  # a resumed anneal continues from the same start
            checkpoint["midtrain"]["anneal"] = dict(self.branch.anneal)
        if trainer is not None:  # what a resume must agree with (midtrain.checkpoint.plan)
            checkpoint["midtrain"]["run"] = record_of(trainer)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore what the running command needs (its plan): evaluation, the weights asked
        for; a fit, the metrics, and a fork's or a resumed branch's start."""
        self.metrics.restore(checkpoint.get("midtrain", {}))
        trainer = self._attached_trainer()
        if trainer is None:
            return
        plan = check_restore(trainer, checkpoint)
        if plan.mode == "evaluate":
            set_evaluation_step(trainer, int(checkpoint.get("global_step", 0)))
            if plan.weights == "ema":  # Lightning loads checkpoint["state_dict"] right after
                where = plan.checkpoint or "--ckpt_path"
                checkpoint["state_dict"] = averaged_state(checkpoint, where)["state_dict"]
            return
        # FSDP2 (ModelParallelStrategy) restores the optimizer in place, before this hook: a
        # fork reads and rewrites the live state as it would the checkpoint's
        in_place = plan.fork is not None and not trainer.strategy.lightning_restore_optimizer
        if in_place:
            checkpoint["optimizer_states"] = [opt.state_dict() for opt in trainer.optimizers]
        self.branch.restore(plan, checkpoint, self.hparams)
        self.branch.start_optimizer(plan, checkpoint, self.hparams, trainer.max_steps)
        if in_place:
            states = checkpoint.pop("optimizer_states")
            for opt, state in zip(trainer.optimizers, states, strict=True):
                opt.load_state_dict(state)
        # already built where the strategy restores after configure_optimizers (FSDP2)
        for config in trainer.lr_scheduler_configs:
            reschedule(
                config.scheduler,
                self.hparams.lr,
                **self.branch.schedule(self.hparams, trainer.max_steps),
            )


def _check_schedule_offset(offset: int, lr_schedule: str) -> None:
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise MidtrainError(f"model.schedule_offset: must be an int >= 0, got {offset!r}")
    if offset and lr_schedule in ANNEALS:
        raise MidtrainError(
            f"model.schedule_offset: an {lr_schedule} starts at its fork step's LR and has no "
            "schedule to continue; drop model.schedule_offset"
        )


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
    if init_from is not None and not is_hf(init_from) and not Path(init_from).exists():
        raise MidtrainError(f"model.init_from: checkpoint not found: {init_from}")
