"""A wall-clock budget for training: ``python -m minidsv3.train --time-budget SECONDS``.

The budget counts the seconds of the training steps -- drawing the batch, forward,
backward, optimizer, bias update -- and nothing else: periodic evaluations and
checkpoint writes are not training (and their cost differs between recipes), and the
final whole-split evaluation, the samples and the plots run after the budget.

The cosine schedule needs the total number of steps, so the run plans it from the steps
of the linear warm-up, whose lr does not depend on the total (nor does the lr of the
step after it: the cosine starts at its peak). The first ``CALIBRATION_SKIP`` steps of a
process are slow (memory allocation, thread start-up, ``torch.compile``) and are left
out; the others are timed, and at the end of the warm-up

    total = steps done + floor(budget left / mean seconds of a timed step)

becomes ``args.steps``, which the lr schedule reads. So a run planned to N steps
computes exactly what ``--steps N`` computes, and its plan rests on a long sample of
steps (97 of the default 100), not on a few that a busy machine may have slowed down.
If later steps are slower than the timed ones, the run ends earlier, at the step that
spends the budget.

Checkpoints keep the seconds spent and the plan: ``--resume`` continues the planned
schedule with what is left of the budget. Under torchrun rank 0's clock decides, so
every rank plans and stops at the same step.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from time import perf_counter
from typing import Any

import torch
import torch.distributed as dist

CALIBRATION_SKIP = 3  # the first steps of a process, too slow to predict the others
CALIBRATION_STEPS = 10  # the fewest steps a plan may be timed on


class BudgetTooShort(ValueError):
    """The budget is spent within the warm-up, before the schedule could be planned."""


def plan_steps(done: int, spent: float, budget: float, seconds_per_step: float) -> int:
    """The total: the steps done, and as many more as the budget left holds."""
    return done + max(0, math.floor((budget - spent) / seconds_per_step))


class TimeBudget:
    """The training seconds a run has spent of its budget, and its plan."""

    def __init__(self, seconds: float, step: int, warmup: int, world: int,
                 device: torch.device, spent: float = 0.0, planned: int | None = None):
        self.seconds = seconds  # --time-budget
        self.spent = spent  # seconds of the steps taken, over every process of the run
        self.planned = planned  # the planned total, None until planned
        self.world, self.device = world, device
        self.warmup = warmup  # the step after which the schedule is planned
        # Each process times its own steps (a resumed one starts slow, too).
        self.timed_after = step + CALIBRATION_SKIP
        self._timed_from: float | None = None  # ``spent`` when the timed steps began
        if planned is None and warmup - self.timed_after < CALIBRATION_STEPS:
            raise BudgetTooShort(
                f"--time-budget plans the schedule at the end of the linear warm-up (its lr "
                f"does not depend on the total) from the time of at least {CALIBRATION_STEPS} "
                f"of its steps after the first {CALIBRATION_SKIP}: need --warmup >= "
                f"{self.timed_after + CALIBRATION_STEPS}, got {warmup}"
                + (f"; this run stopped at step {step} before it was planned, so start it "
                   "again in a new --out" if step else ""))

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps (the keyword arguments that restore it)."""
        return {"spent": self.spent, "planned": self.planned}

    @contextmanager
    def step(self) -> Iterator[None]:
        """Count the wall-clock of the block (one training step) as spent."""
        began = perf_counter()
        yield
        if self.device.type == "cuda":  # kernels run asynchronously: wait for this step's
            torch.cuda.synchronize(self.device)  # (or whatever syncs next would count them)
        self.spent = self._agree(self.spent + perf_counter() - began)

    def after_step(self, step: int, args) -> None:
        """Plan at the end of the warm-up; end the run here if the budget is spent.

        Both set ``args.steps``, the total that the loop and the lr schedule read.
        """
        if step == self.timed_after:
            self._timed_from = self.spent
        if self.planned is None and step == self.warmup:
            per_step = (self.spent - self._timed_from) / (step - self.timed_after)
            self.planned = args.steps = plan_steps(step, self.spent, self.seconds, per_step)
        elif self.planned is None and self.spent >= self.seconds:
            shortest = self.timed_after + CALIBRATION_STEPS  # the shortest warm-up to plan in
            raise BudgetTooShort(
                f"--time-budget {self.seconds:g} was spent by step {step}, within the linear "
                f"warm-up of {self.warmup} steps, at whose end the schedule is planned; in a "
                f"new --out, give a --time-budget of at least about "
                f"{math.ceil(self.spent / step * self.warmup)}"
                + (f" or a --warmup from {shortest} to {step - 1}" if step > shortest else ""))
        elif self.planned is not None and self.spent >= self.seconds and step < args.steps:
            args.steps = step  # steps slower than the timed ones: the budget ends the run here

    def record(self, step: int, tokens_per_step: int, last: bool) -> dict[str, Any]:
        """Fields of a metrics record; the last one says what the budget allowed."""
        fields: dict[str, Any] = {"train_seconds": self.spent}
        if last:
            fields.update(time_budget_s=self.seconds, planned_steps=self.planned,
                          train_tokens_per_s=step * tokens_per_step / self.spent)
        return fields

    def _agree(self, value: float) -> float:
        """Rank 0's ``value`` on every rank: their clocks differ, their decisions must not."""
        if self.world == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.broadcast(tensor, src=0)
        return tensor.item()
