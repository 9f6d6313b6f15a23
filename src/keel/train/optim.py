"""AdamW with decay only where it belongs, and the learning-rate schedules."""

from __future__ import annotations

import math

import torch
from torch import nn

from keel.config import OptimConfig


def build_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.AdamW:
    """Weight decay on matrices only: decaying norms and embeddings hurts and buys nothing."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for param in model.parameters():  # parameters() yields a tied weight once
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 and id(param) not in embedding_ids else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # The fused kernel does the whole update in one pass over memory (CPU and CUDA since torch 2.4).
    return torch.optim.AdamW(
        groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps, fused=True
    )


def lr_at(step: int, config: OptimConfig, max_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then the chosen shape."""
    peak, floor = config.lr, config.lr * config.min_lr_ratio
    if step < config.warmup_steps:
        return peak * (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return peak
    if config.schedule == "cosine":
        span = max(1, max_steps - config.warmup_steps)
        progress = min(1.0, (step - config.warmup_steps) / span)
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    # wsd: hold the peak, then decay linearly to the floor over the last decay_fraction of the run.
    # The stable phase lets a run be extended without restarting the schedule (MiniCPM, 2024).
    decay_steps = max(1, int(config.decay_fraction * max_steps))
    decay_start = max_steps - decay_steps
    if step < decay_start:
        return peak
    progress = min(1.0, (step - decay_start) / decay_steps)
    return peak + (floor - peak) * progress
