"""Tasks: what a run trains for (see keel.tasks.base for the contract); `task.kind` picks one."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from keel.config import RunConfig
from keel.tasks.base import Batch, LossOutput, Task


def build_task(
    config: RunConfig,
    device: torch.device,
    dtype: torch.dtype,
    heartbeat: Callable[[], None] = lambda: None,
    run_dir: Path | None = None,
) -> Task:
    """The task of config.task.kind; `heartbeat` is called during long work (the distillation teacher's
    cache, diffusion's sample grids); `run_dir` receives what a task writes beside the checkpoints (the grids)."""
    kind = config.task.kind
    if kind == "pretrain":
        from keel.tasks.pretrain import PretrainTask

        return PretrainTask(config, device, dtype)
    if kind == "sft":
        from keel.tasks.sft import SFTTask

        return SFTTask(config, device, dtype)
    if kind == "dpo":
        from keel.tasks.dpo import DPOTask

        return DPOTask(config, device, dtype)
    if kind == "distill":
        from keel.tasks.distill import DistillTask

        return DistillTask(config, device, dtype, heartbeat)
    if kind == "diffusion":
        from keel.tasks.diffusion import DiffusionTask

        return DiffusionTask(config, device, dtype, run_dir, heartbeat)
    raise AssertionError(f"config validation lets no other task.kind through: {kind}")


__all__ = ["Batch", "LossOutput", "Task", "build_task"]
