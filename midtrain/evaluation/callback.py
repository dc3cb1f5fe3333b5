"""``DownstreamEval``: downstream tasks during ``fit``, logged as ``eval/<task>/<metric>``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch

from midtrain.errors import MidtrainError
from midtrain.evaluation.local import LocalTask
from midtrain.model.gpt import GPT
from midtrain.train._lightning import publish_callback_metrics
from midtrain.train.callbacks.base import StepCallback

if TYPE_CHECKING:
    from tokenizers import Tokenizer


class DownstreamEval(StepCallback):
    """Run downstream tasks every ``every_n_steps`` optimizer steps (and at the end of fit).

    Args:
        tasks: each a local JSONL task (a dict, see ``midtrain.evaluation.local``) or an
            lm-evaluation-harness task name (needs ``midtrain[eval]``; ``include_path`` adds
            task YAMLs of your own).
        every_n_steps: evaluate after every this many optimizer steps.
        limit: examples per task (the first ones, always the same); None = all.
        batch_size: sequences per forward pass.
        at_end: also evaluate after the last step (if it is not a multiple of every_n_steps).
        num_fewshot: lm-eval tasks only.

    Every rank runs the same examples (a sharded model needs all ranks in each forward), so
    every rank holds the same numbers: in ``trainer.callback_metrics`` (usable as a checkpoint
    ``monitor``) and in ``results``; the loggers (rank 0) get ``eval/<task>/<metric>`` at the
    optimizer step just completed.
    """

    def __init__(
        self,
        tasks: list[str | dict[str, int | str | list[str]]],
        every_n_steps: int = 1000,
        limit: int | None = None,
        batch_size: int = 8,
        at_end: bool = True,
        include_path: str | None = None,
        num_fewshot: int | None = None,
    ) -> None:
        if every_n_steps <= 0:
            raise MidtrainError(
                f"DownstreamEval.every_n_steps: must be positive, got {every_n_steps}"
            )
        if not tasks:
            raise MidtrainError("DownstreamEval.tasks: name at least one task")
        self.local = [
            LocalTask.from_dict(dict(t), f"DownstreamEval.tasks[{i}]")
            for i, t in enumerate(tasks)
            if isinstance(t, dict)
        ]
        self.harness = [t for t in tasks if isinstance(t, str)]
        self.every_n_steps, self.limit, self.batch_size = every_n_steps, limit, batch_size
        self.at_end, self.include_path, self.num_fewshot = at_end, include_path, num_fewshot
        self.results: dict[int, dict[str, float]] = {}
        if self.harness:
            self._task_manager()  # refuse an unknown task name now, before training

    def _task_manager(self) -> Any:
        try:
            from lm_eval.tasks import TaskManager
        except ImportError:
            raise MidtrainError(
                "DownstreamEval: lm-eval task names need `pip install midtrain[eval]`"
            ) from None
        manager = TaskManager(include_path=self.include_path)
        unknown = [t for t in self.harness if t not in manager.all_tasks]
        if unknown:
            raise MidtrainError(
                f"DownstreamEval.tasks: no lm-eval task {unknown[0]!r}; list "
                "them with `lm_eval ls tasks` (or set include_path)"
            )
        return manager

    def on_optimizer_step_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int
    ) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self.run(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_end and trainer.global_step not in self.results and not trainer.interrupted:
            self.run(trainer, pl_module)

    @torch.no_grad()
    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        from tokenizers import Tokenizer

        store = getattr(trainer.datamodule, "store", None)  # type: ignore[attr-defined]  # set by Lightning, undeclared
        if store is None:
            raise MidtrainError(
                "DownstreamEval: the data module has no token store to take the tokenizer from"
            )
        tokenizer = Tokenizer.from_file(str(store.tokenizer_path))
        model, eos_id = getattr(pl_module, "model", None), store.eos_id
        if not isinstance(model, GPT):
            raise MidtrainError(
                f"DownstreamEval: {type(pl_module).__name__} has no midtrain GPT in `.model`; "
                "use it with midtrain.CausalLM"
            )
        metrics: dict[str, float] = {}
        for task in self.local:
            for k, v in task.evaluate(
                model, tokenizer, eos_id, self.limit, self.batch_size
            ).items():
                metrics[f"eval/{task.name}/{k}"] = v
        if self.harness:
            metrics.update(self._run_harness(model, tokenizer, eos_id))
        step = trainer.global_step
        self.results[step] = metrics
        publish_callback_metrics(trainer, metrics)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        return metrics

    def _run_harness(self, model: GPT, tokenizer: Tokenizer, eos_id: int) -> dict[str, float]:
        import lm_eval

        from midtrain.evaluation.harness import MidtrainLM

        lm = MidtrainLM(
            model=model, tokenizer_object=tokenizer, eos_id=eos_id, batch_size=self.batch_size
        )
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(self.harness),
            limit=self.limit,
            num_fewshot=self.num_fewshot,
            task_manager=self._manager(),
            log_samples=False,
            verbosity="WARNING",
        )
        metrics = {}
        for task, values in (out or {}).get("results", {}).items():
            for key, value in values.items():
                name, _, _filter = key.partition(",")
                if (
                    isinstance(value, int | float)
                    and not name.endswith("_stderr")
                    and name != "alias"
                ):
                    metrics[f"eval/{task}/{name}"] = float(value)
        return metrics

    def _manager(self) -> Any:
        if not hasattr(self, "_tm"):
            self._tm = self._task_manager()
        return self._tm
