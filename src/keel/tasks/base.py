"""The task seam: what differs between pretraining, SFT, DPO (and distillation, diffusion) lives here.

A task supplies
- the model it trains (`build_model`), and any frozen model it needs to set itself up;
- `batch(index)`: micro-batch `index` of the endless training stream, a pure function of
  (data, seed, index), so a resumed run replays the same batches and "skip k batches" is just
  moving the cursor;
- `loss(model, tensors)`: the mean loss over the batch's units plus named metrics, all tensors on
  the device (nothing is read back to the host here);
- `evaluate(model)`: held-out numbers, `val_loss` among them (it picks the best checkpoint);
- `monitors()`: monitors of its own metrics for the supervisor, beside the loop's standard ones;
- `bind(model)`: the model being trained, for a task that also computes with it outside the loss;
- `after_step(model, skipped)`: called once the optimizer has stepped (or, on the device, dropped the
  update), for state that follows the weights (diffusion's EMA copy);
- `state_dict()` / `load_state_dict()`: anything resumable it holds beyond the data cursor.

The loop does the rest once: schedule, precision, compile, gradient accumulation, clipping,
supervision, checkpoints, registry, time budget.

Loss normalisation over a whole optimizer step: each batch counts its `units` on the host (the
tokens that carry loss, or the pairs), the loop sums them over the step's micro-batches and
weights each micro-batch's mean loss by units / step units, so a step's loss is the mean over all
of its units, however they fall into micro-batches (`step_weights`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

# Metrics every task reports for the supervisor's norm monitors; `loss` is reported separately.
ACT_NORM, LOGIT_NORM = "act_mean_square", "logit_mean_square"


def mean_square(x: torch.Tensor) -> torch.Tensor:
    """The mean of x², the statistic behind ACT_NORM and LOGIT_NORM, as a float32 scalar."""
    # vector_norm accumulates in float32 without materialising a float32 copy of the tensor.
    return torch.linalg.vector_norm(x, dtype=torch.float32).square() / x.numel()


@dataclass
class Batch:
    """One micro-batch: tensors for `Task.loss`, counted on the host without touching the device."""

    tensors: dict[str, torch.Tensor]
    units: int  # what the loss is a mean over: loss-carrying tokens, or preference pairs
    tokens: int  # tokens that went through the model (throughput and train.max_tokens)

    def to(self, device: torch.device) -> Batch:
        moved = {name: t.to(device, non_blocking=True) for name, t in self.tensors.items()}
        return Batch(moved, self.units, self.tokens)


class LossOutput(NamedTuple):
    loss: torch.Tensor  # scalar, mean over the batch's units, differentiable
    metrics: dict[str, torch.Tensor]  # detached scalars, means over the batch's units (ACT_NORM, LOGIT_NORM, ...)


def step_weights(batches: list[Batch], total: float | None = None) -> list[float]:
    """Divisors that turn each micro-batch's mean loss into its share of the step's mean: U / u, with U
    the step's units (`total`: over every rank's micro-batches; by default these batches' own).

    Dividing (rather than multiplying by u / U) keeps pretraining bit for bit what it was: with
    equal micro-batches the divisor is exactly grad_accum.
    """
    total = sum(b.units for b in batches) if total is None else total
    return [total / b.units if b.units else float("inf") for b in batches]


class Task:
    """Base class of the tasks; see the module docstring for the contract."""

    kind = "task"

    def build_model(self) -> torch.nn.Module:
        """The model this task trains, on the task's device, with its initial weights."""
        raise NotImplementedError

    def init_weights(self, model: torch.nn.Module) -> None:
        """Put the weights of step 0 into `model` (also after a rollback to before every checkpoint)."""
        raise NotImplementedError

    def bind(self, model: torch.nn.Module) -> None:
        """The model the loop trains, once built and wrapped (LoRA, activation checkpointing), for a task
        that computes with it outside its loss (DPO's reference: a LoRA policy with its adapters off)."""

    def after_step(self, model: torch.nn.Module, skipped: torch.Tensor | None) -> None:
        """The optimizer step is queued; skipped (a device scalar, 1.0 when the update was dropped, None when
        no update is ever dropped) says whether the weights moved. Must not read anything back to the host."""

    def batch(self, index: int) -> Batch:
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> LossOutput:
        raise NotImplementedError

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        raise NotImplementedError

    def held_out_loss(self, model: torch.nn.Module) -> float:
        """The validation loss alone, for the supervisor's check of a divergence: no other work, no files."""
        return self.evaluate(model)["val_loss"]

    def monitors(self) -> list:
        """Monitors of this task's own metrics: objects with `name`, `observe(record) -> Signal | None`,
        `state_dict()` and `load_state_dict()`."""
        return []

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
