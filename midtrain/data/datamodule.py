"""``MixtureDataModule``: prepared domains mixed by weight into a deterministic stream."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import IterableDataset

from midtrain.data.contract import ScheduleSource, StepDataModule, require_max_steps
from midtrain.data.mixture import (
    RAMP_CODES,
    MixtureSchedule,
    Phase,
    WeightPath,
    check_ramp,
    check_repeat,
    check_weights,
    format_plan,
    plan_rows,
    shift_phases,
)
from midtrain.data.store import Store, num_items
from midtrain.data.streams import BatchLayout, MixtureStream, validation_blocks
from midtrain.errors import MidtrainError
from midtrain.run_state import Fork, Rule, RunPlan, Setting, plan_of

MAX_PHASES = 1024  # rows of the phase table shared with loader workers


class MixtureDataModule(StepDataModule):
    """Mixes the domains of a token store (built by ``midtrain prepare``).

    Args:
        store: the store root directory.
        weights: domain -> weight (token-weighted: every sequence has seq_len tokens). Default:
            every domain with training data, in proportion to its training tokens.
        seq_len: tokens per training sequence (blocks of seq_len + 1, never mixing domains).
        micro_batch_size: sequences per device per forward pass; the global batch is
            micro_batch_size x accumulate_grad_batches x world size.
        seed: the mixture seed: sample order is a pure function of (seed, schedule, index).
        num_workers, prefetch_factor: DataLoader workers; the stream is identical for any value.
        val_sets: domains whose validation split is evaluated, logged as ``val/<name>/loss``.
            Default: every domain that has validation data.
        val_max_blocks: cap on validation sequences per set (the first ones, always the same).
        val_batch_size: default micro_batch_size.
        max_repeat: refuse a schedule that would read any domain more than this many times
            (epochs); None disables the check. The plan is printed at the start of fit.
        start_items: domain -> item n, for domains prepared with ``order: sequential``: the
            run (or a ``--fork_data fresh`` fork) reads them from their item n on (item i is
            tokens [i(seq_len+1), (i+1)(seq_len+1)) of the domain; default 0). Their
            sequences are then items n, n+1, ... in step order and, within a step, in slot
            order (accumulation micro-step, rank, row), whatever the weights, switches,
            ramps, runtime changes, resumes and ``--fork_data keep`` forks (which continue at
            the next unread item).

    Phases come from three places: ``weights`` (from step 0), switches registered with
    ``add_switch`` before training (``MixtureSwitch`` callbacks do so in their ``setup``; a
    switch may ramp), and ``change_weights`` at runtime (kept in checkpoints, so a resumed run
    reproduces them).
    The data module owns the schedule; it implements ``midtrain.data.contract.DataContract``.

    A fork (the plan of ``midtrain fit --fork``, ``midtrain.run_state.Fork``) keeps the
    checkpoint's data position by default; with ``data="fresh"`` its stream restarts at the
    fork step: optimizer step S + k draws what step k of a new run with the schedule from S on
    (``shift_phases``) would draw. That step origin (``data_origin``) is part of the
    checkpoint state.
    """

    fresh_data = True

    def __init__(
        self,
        store: str,
        weights: dict[str, float] | None = None,
        seq_len: int = 512,
        micro_batch_size: int = 8,
        seed: int = 0,
        num_workers: int = 0,
        prefetch_factor: int = 2,
        val_sets: list[str] | None = None,
        val_max_blocks: int | None = 64,
        val_batch_size: int | None = None,
        max_repeat: float | None = 10.0,
        start_items: dict[str, int] | None = None,
    ) -> None:
        super().__init__(micro_batch_size, seed, num_workers, prefetch_factor)
        self.store = Store(store)
        if seq_len <= 0:
            raise MidtrainError(f"data.seq_len: must be positive, got {seq_len}")
        self.seq_len = seq_len
        self.start_items = self._check_start_items(dict(start_items or {}))
        self.val_max_blocks = val_max_blocks
        self.val_batch_size = val_batch_size or micro_batch_size
        names = self.store.domain_names
        if weights is None:
            weights = {n: float(self.store.domain(n).train.num_tokens) for n in names}
            weights = {n: w for n, w in weights.items() if w > 0}
        check_weights(weights, names, "data.weights")
        self.weights = dict(weights)
        self.max_repeat = max_repeat
        self._switches: dict[object, Phase] = {}  # registered by add_switch, keyed by owner
        self.runtime_phases: list[Phase] = []  # from change_weights(); part of checkpoint state
        self._resolved_for: tuple | None = None
        self._path: tuple[tuple, WeightPath] | None = None  # weights per step, by phase keys
        self._table: torch.Tensor | None = None  # phases shared with loader workers
        self._table_len: torch.Tensor | None = None
        self.data_origin = 0  # the optimizer step that is the stream's step 0 (fork_data fresh)
        if val_sets is None:
            val_sets = [n for n in names if self.store.domain(n).val.num_blocks(seq_len) > 0]
        for v in val_sets:
            if v not in names:
                raise MidtrainError(
                    f"data.val_sets: unknown domain {v!r}; known: {', '.join(names)}"
                )
            if self.store.domain(v).val.num_blocks(seq_len) == 0:
                raise MidtrainError(
                    f"data.val_sets: domain {v!r} has no validation sequence of seq_len "
                    f"{seq_len} ({self.store.domain(v).val.num_tokens} val tokens); "
                    "lower seq_len or raise its val_fraction in the prepare config"
                )
        self.val_set_names = list(val_sets)
        self._check_domains(self.weights, "data.weights")

    def _check_start_items(self, start_items: dict[str, int]) -> dict[str, int]:
        """One line for a start item the store cannot honour."""
        names = self.store.domain_names
        for name, n in start_items.items():
            where = f"data.start_items.{name}"
            if name not in names:
                raise MidtrainError(f"{where}: unknown domain {name!r}; known: {', '.join(names)}")
            if self.store.domain(name).order != "sequential":
                raise MidtrainError(
                    f"{where}: domain {name!r} is read in a shuffled order, so it has no item "
                    "to start at; prepare it with `order: sequential`"
                )
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise MidtrainError(f"{where}: an item number >= 0, got {n!r}")
            items = self.units(name)
            if n >= items:
                raise MidtrainError(
                    f"{where}: item {n:,} is past the end of the domain ({items:,} items of "
                    f"seq_len {self.seq_len} + 1 tokens)"
                )
        return start_items

    def sequential(self, name: str) -> bool:
        return self.store.domain(name).order == "sequential"

    def units(self, name: str) -> int:
        """What the schedule draws from a domain's training split: blocks (shuffled) or
        items (sequential)."""
        split = self.store.domain(name).train
        return (
            num_items(split, self.seq_len)
            if self.sequential(name)
            else split.num_blocks(self.seq_len)
        )

    def _check_domains(self, weights: Mapping[str, float], where: str) -> None:
        for name, w in weights.items():
            split = self.store.domain(name).train
            if w > 0 and self.units(name) == 0:
                raise MidtrainError(
                    f"{where}.{name}: empty domain: {split.num_tokens} training tokens, fewer "
                    f"than one sequence of seq_len {self.seq_len} + 1"
                )

    # -- what other components read (the data contract) ------------------------------------
    @property
    def switch_phases(self) -> list[Phase]:
        """Phases registered with ``add_switch``, by start step."""
        return sorted(self._switches.values(), key=lambda p: p.start_step)

    @property
    def phases(self) -> list[Phase]:
        """All phases by start step; a runtime change replaces a phase at the same step."""
        by_step = {0: Phase(0, self.weights)}
        for p in [*self.switch_phases, *self.runtime_phases]:
            by_step[p.start_step] = p
        return [by_step[k] for k in sorted(by_step)]

    @property
    def domains(self) -> list[str]:
        """Domains a schedule may draw from (every domain with training data), in store order.
        Fixed for a store, so runtime changes and forks keep domain ids stable."""
        return [n for n in self.store.domain_names if self.units(n) > 0]

    @property
    def active_domains(self) -> list[str]:
        """Domains with weight in some phase."""
        used = {n for p in self.phases for n, w in p.weights.items() if w > 0}
        return [n for n in self.domains if n in used]

    def weight_path(self) -> WeightPath:
        """The schedule's weights per step (ramps interpolated), rebuilt when phases change."""
        phases = self.phases
        key = tuple(p.key() for p in phases)
        if self._path is None or self._path[0] != key:
            self._path = (key, WeightPath(self.domains, phases))
        return self._path[1]

    def weights_at(self, step: int) -> dict[str, float]:
        """Normalised weights in force at optimizer step ``step`` (inside a ramp: that step's
        interpolated weights)."""
        return self.weight_path().weights_at(step)

    def phase_starts(self) -> list[int]:
        """Steps where the mixture changes course: phase starts and ramp ends (logged on both
        sides, so curves bend exactly there)."""
        return self.weight_path().boundaries()

    def val_bytes_per_token(self, name: str) -> float:
        """UTF-8 bytes per token of a validation split, for bits-per-byte."""
        split = self.store.domain(name).val
        return split.num_bytes / max(split.num_tokens, 1)

    def schedule(self, global_batch_size: int) -> MixtureSchedule:
        return MixtureSchedule(self.domains, self.phases, global_batch_size, self.seed)

    def stream_schedule(self, global_batch_size: int, origin: int | None = None) -> MixtureSchedule:
        """The schedule the training stream draws from: the run's, with step 0 at ``origin``
        (default: ``data_origin``, which a fresh fork sets to its fork step)."""
        origin = self.data_origin if origin is None else origin
        phases = shift_phases(self.phases, origin)
        return MixtureSchedule(self.domains, phases, global_batch_size, self.seed)

    def _plan_origin(self, trainer: L.Trainer | None) -> int:
        """The stream origin the plan shows: a fresh fork's step before its checkpoint is read."""
        fork = plan_of(trainer).fork
        if fork is not None and fork.data == "fresh":
            return fork.step
        return self.data_origin

    def global_batch_size(self, trainer: L.Trainer) -> int:
        return self.micro_batch_size * trainer.accumulate_grad_batches * trainer.world_size

    # -- the schedule of a run ------------------------------------------------------------
    def add_switch(
        self,
        step: int,
        weights: Mapping[str, float],
        max_steps: int,
        owner: object = None,
        ramp_steps: int = 0,
        ramp: str = "linear",
    ) -> None:
        """Register a mixture switch: ``weights`` from optimizer step ``step`` on (reached over
        ``ramp_steps`` steps), for a run of ``max_steps``. Called before training (by
        ``MixtureSwitch.setup``); registering again with the same ``owner`` replaces its
        switch."""
        where = f"MixtureSwitch(step={step})"
        others = [p for o, p in self._switches.items() if o is not owner]
        if any(p.start_step == step for p in others):
            raise MidtrainError(f"MixtureSwitch: two switches at step {step}")
        if not 0 < step < max_steps:
            raise MidtrainError(
                f"MixtureSwitch: a switch at step {step} is outside the run "
                f"(0 < step < max_steps={max_steps})"
            )
        check_ramp(ramp_steps, ramp, where)
        if step + ramp_steps > max_steps:
            raise MidtrainError(
                f"{where}.ramp_steps: a ramp of {ramp_steps} steps from step {step} runs past "
                f"trainer.max_steps={max_steps}; shorten it to at most {max_steps - step}"
            )
        # a fork's switches before the fork point must equal the checkpoint's past:
        # load_state_dict compares the schedule up to the fork step
        check_weights(weights, self.store.domain_names, f"{where}.weights")
        self._check_domains(weights, f"{where}.weights")
        phase = Phase(step, dict(weights), ramp_steps, ramp)
        check_overlaps([*others, phase])
        self._switches[owner] = phase

    def resolve_schedule(self, trainer: L.Trainer) -> None:
        """Validate the whole schedule before training and print the plan. Idempotent: the
        plan is printed once per distinct schedule."""
        max_steps = require_max_steps(trainer, "midtrain schedules data by steps")
        key = (
            max_steps,
            self.global_batch_size(trainer),
            tuple(repr(p.key()) for p in self.phases),
            self._plan_origin(trainer),
        )
        if self._resolved_for == key:
            return
        self._resolved_for = key
        rows = self.plan(self.global_batch_size(trainer), max_steps, key[-1])
        if trainer.is_global_zero:
            print(format_plan(rows, self.seq_len))
        check_repeat(rows, self.max_repeat)

    def plan(
        self, global_batch_size: int, max_steps: int, origin: int | None = None
    ) -> list[dict[str, Any]]:
        """Per phase and domain: sequences and tokens drawn, realized share, tokens available,
        and how many times the domain has been read by the end of the phase (``plan_rows``),
        for a stream starting at ``origin`` (default: ``data_origin``)."""
        blocks = {n: self.units(n) for n in self.domains}
        origin = self.data_origin if origin is None else origin
        schedule = self.stream_schedule(global_batch_size, origin)
        rows = plan_rows(schedule, max_steps - origin, self.seq_len, blocks, self.start_items)
        for row in rows:  # a fresh stream's steps, shown as the run's optimizer steps
            row["start"] += origin
            row["end"] += origin
        return rows

    def change_weights(
        self, weights: dict[str, float], ramp_steps: int = 0, ramp: str = "linear"
    ) -> int:
        """Change the mixture during ``fit``: from the first optimizer step whose batches the
        loader cannot have produced yet (those it handed out, plus num_workers x
        prefetch_factor asked of its workers in advance), and never the running step; over
        ``ramp_steps`` steps from the weights in force then (a later change cuts a ramp short).
        Returns that step. The change is kept in checkpoints."""
        trainer, loader = self.trainer, self.train_loader
        if trainer is None or self._table is None or loader is None:
            raise MidtrainError("change_weights: only during fit, once training has started")
        check_weights(weights, self.store.domain_names, "change_weights")
        check_ramp(ramp_steps, ramp, "change_weights")
        self._check_domains(weights, "change_weights")
        # The stream's own accounting: the first micro-batch index (counted from step 0) that
        # its loader cannot have produced yet.
        stream = loader.dataset
        assert isinstance(stream, MixtureStream)  # train_stream made it
        first_free = stream.start_step * stream.accumulation + loader.produced()
        step = max(-(-first_free // stream.accumulation), trainer.global_step + 1)
        self.runtime_phases = [p for p in self.runtime_phases if p.start_step != step]
        self.runtime_phases.append(Phase(step, dict(weights), ramp_steps, ramp))
        self.runtime_phases.sort(key=lambda p: p.start_step)
        self._write_table()
        rank_zero_info(f"mixture change at runtime, from step {step}: {dict(weights)}")
        return step

    def _write_table(self) -> None:
        table, count = self._table, self._table_len
        assert table is not None and count is not None  # made by train_dataloader
        phases = self.phases
        if len(phases) > table.shape[0]:
            raise MidtrainError(f"change_weights: at most {table.shape[0]} phases")
        for i, p in enumerate(phases):
            table[i, :3] = torch.tensor(
                [p.start_step, p.ramp_steps, RAMP_CODES[p.ramp]], dtype=torch.float64
            )
            table[i, 3:] = torch.tensor([float(p.weights.get(n, 0.0)) for n in self.domains])
        count[0] = len(phases)
        count[1] += 1  # last: a worker that sees the new version sees the whole table

    def fingerprint(self) -> dict[str, Any]:
        """What the stream depends on. With sequential or pretokenized domains also: each
        sequential domain (``order``), where it starts (``start_items``) and the content hash
        of each pretokenized domain's files (``corpora``; all three are part of ``store`` too).
        Runs without them keep the three-key form."""
        out: dict[str, Any] = {
            "store": self.store.fingerprint(self.domains),
            "seq_len": self.seq_len,
            "seed": self.seed,
        }
        order = {n: "sequential" for n in self.domains if self.sequential(n)}
        corpora = {
            n: self.store.domain(n).manifest["content_hash"]
            for n in self.domains
            if self.store.domain(n).corpus is not None
        }
        if order or self.start_items:
            out["order"] = order
            out["start_items"] = dict(sorted(self.start_items.items()))
        if corpora:
            out["corpora"] = corpora
        return out

    def run_settings(self, trainer: L.Trainer) -> dict[str, Setting]:
        """``StepDataModule``'s, and the configured schedule (``weights`` and the switches;
        runtime changes are checkpoint state): a resume keeps it, a fork keeps the phases
        before its step."""
        settings = super().run_settings(trainer)
        if "data.start_items" in settings:
            # a resume keeps it; a fork may change it where load_state_dict allows (a domain
            # not read yet, or --fork_data fresh)
            settings["data.start_items"] = Setting(self.start_items, Rule.RESUME)
        configured = {0: Phase(0, self.weights), **{p.start_step: p for p in self.switch_phases}}
        schedule = [configured[k].key() for k in sorted(configured)]
        settings["data.schedule"] = Setting(schedule, Rule.SCHEDULE)
        return settings

    def check_plan(self, plan: RunPlan, trainer: L.Trainer) -> None:
        """Before anything is written, for fit: the schedule is registered (every
        ``MixtureSwitch``), checked and planned, and a fresh fork can restart it."""
        super().check_plan(plan, trainer)
        if plan.command != "fit":
            return
        max_steps = require_max_steps(trainer, "midtrain schedules data by steps")
        for cb in getattr(trainer, "callbacks", []):
            if isinstance(cb, ScheduleSource):
                cb.register(self, max_steps)
        self.resolve_schedule(trainer)
        if plan.fork is not None and plan.fork.data == "fresh":
            shift_phases(self.phases, plan.fork.step)

    # -- streams (StepDataModule makes the loaders) -----------------------------------------
    def train_stream(self, trainer: L.Trainer) -> IterableDataset:
        self.resolve_schedule(trainer)
        self._table = torch.zeros(MAX_PHASES, 3 + len(self.domains), dtype=torch.float64)
        self._table_len = torch.zeros(2, dtype=torch.int64)  # phase count, version
        self._table.share_memory_()
        self._table_len.share_memory_()
        self._write_table()
        schedule = self.stream_schedule(self.global_batch_size(trainer))
        sequential = [
            self.start_items.get(n, 0) if self.sequential(n) else None for n in schedule.domains
        ]
        return MixtureStream(
            [self.store.domain(n).train for n in schedule.domains],
            schedule,
            self.seq_len,
            BatchLayout.of(trainer, self.micro_batch_size),
            start_step=trainer.global_step,
            max_steps=trainer.max_steps,
            phase_table=(self._table, self._table_len),
            origin=self.data_origin,
            sequential=sequential,
        )

    def val_datasets(self, rank: int, world_size: int) -> list[IterableDataset]:
        return list(
            validation_blocks(
                self.store,
                self.val_set_names,
                self.seq_len,
                self.val_batch_size,
                self.val_max_blocks,
                rank,
                world_size,
            )  # fmt: skip
        )

    def state_dict(self) -> dict[str, Any]:
        step = self.trainer.global_step if self.trainer is not None else None
        return {
            "fingerprint": self.fingerprint(),
            "step": step,
            "runtime_phases": [p.key() for p in self.runtime_phases],
            "phases": [p.key() for p in self.phases],  # all of them: which domains were read
            "origin": self.data_origin,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what the command needs (``midtrain.checkpoint.plan`` checked the rest): a
        resume, the runtime changes and the stream origin; a fork, the changes before its step
        and the origin its ``data`` option gives; an evaluation, nothing (it reads no
        schedule)."""
        plan = plan_of(self.trainer)
        if plan.mode not in ("resume", "fork"):
            return
        step = state_dict.get("step") or 0
        self._check_start_items_agree(plan, state_dict, step)
        runtime = [Phase.from_key(k) for k in state_dict.get("runtime_phases", [])]
        saved_origin = state_dict.get("origin", 0)
        if plan.fork is None:
            self.runtime_phases, self.data_origin = runtime, saved_origin
            return
        # A fork keeps the past (so the data position) and may change what comes after.
        self.runtime_phases = [p for p in runtime if p.start_step < step]
        self.data_origin = self._fork_origin(plan.fork, step, saved_origin)

    def _check_start_items_agree(self, plan: RunPlan, state: dict[str, Any], step: int) -> None:
        """A resume reads on from the checkpoint's items, so its ``start_items`` must be the
        checkpoint's; a ``keep`` fork too for every domain read before the fork step (one not
        read yet may start anywhere); a ``fresh`` fork starts at its own."""
        if plan.fork is not None and plan.fork.data == "fresh":
            return
        saved = state.get("fingerprint") or {}
        was, now = saved.get("start_items", {}), self.start_items
        phases = state.get("phases", saved.get("phases", []))
        read = {
            name for key in phases if key[0] < step for name, w in dict(key[1]).items() if w > 0
        }
        for name in sorted(set(was) | set(now)):
            if was.get(name, 0) == now.get(name, 0):
                continue
            if plan.fork is None or name in read:
                raise MidtrainError(
                    f"data.start_items.{name}: the checkpoint read domain {name!r} from item "
                    f"{was.get(name, 0):,}, this run says {now.get(name, 0):,}; it continues at "
                    "the checkpoint's next unread item: drop the change, or fork with "
                    "--fork_data fresh to start the stream at start_items"
                )

    def _fork_origin(self, fork: Fork, step: int, saved_origin: int) -> int:
        """A fork's stream origin: the checkpoint's (keep), or the fork step (fresh), whose
        shifted schedule is checked now (a ramp across the fork step has no fresh start)."""
        if fork.data == "keep":
            return saved_origin
        shift_phases(self.phases, step)
        return step


def check_overlaps(phases: list[Phase]) -> None:
    """One line for a switch that starts inside another switch's ramp."""
    phases = sorted(phases, key=lambda p: p.start_step)
    for a, b in zip(phases, phases[1:], strict=False):
        if a.start_step + a.ramp_steps > b.start_step:
            raise MidtrainError(
                f"MixtureSwitch(step={a.start_step}).ramp_steps: its ramp of {a.ramp_steps} "
                f"steps runs to step {a.start_step + a.ramp_steps}, past the switch at step "
                f"{b.start_step}; ramps may not overlap: shorten it to at most "
                f"{b.start_step - a.start_step} or move the later switch"
            )
