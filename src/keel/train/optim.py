"""The optimizers and the learning-rate schedules.

`optim.optimizer=adamw`: one fused AdamW, weight decay on matrices only.
`optim.optimizer=muon`: Muon for the 2-D weight matrices inside the transformer blocks (q/k/v/o,
gate/up/down), fused AdamW exactly as above for everything else (token embedding, tied or untied
lm_head, norms). Muon orthogonalises each matrix's momentum, so every direction of the update gets
the same size; embeddings and the output layer are lookups and per-token outputs, not hidden maps,
and keep AdamW (Jordan, 2024; Liu et al., "Muon is Scalable for LLM Training", 2025). Both share
optim.lr, its schedule and optim.weight_decay: Muon's "match_rms_adamw" scaling sizes its update
like an AdamW one. The two are bundled in `MuonAdamW`, which the loop, the grad scaler and the
checkpoints use like a single torch optimizer.
`optim.optimizer=auto` (the default) is Muon where it was measured to win and AdamW elsewhere
(`keel.config.resolve_optimizer`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from keel.config import OptimConfig

# Muon's own momentum, not optim.beta1: its update is orthogonalised, so the momentum only averages
# directions and does not set the step size; 0.95 (with Nesterov) is the value Muon was tuned and
# published with, while beta1=0.9 is tuned for AdamW's unnormalised first moment.
MUON_MOMENTUM = 0.95
# Muon keeps one moment per matrix, its momentum buffer: it plays the part of AdamW's exp_avg.
MUON_MOMENTS = {"exp_avg": "momentum_buffer"}


class MuonAdamW:
    """Muon and AdamW stepped together, with the parts of the torch.optim.Optimizer API keel uses.

    param_groups lists Muon's groups, then AdamW's (the same dicts, so setting group["lr"] reaches
    both). It is deliberately not an Optimizer subclass: GradScaler then takes its generic path
    (unscale every group's gradients, call step() only when they are all finite), which is right
    for both parts; the fused AdamW inside just does a plain step.
    """

    def __init__(self, muon: torch.optim.Muon, adamw: torch.optim.AdamW):
        self.muon, self.adamw = muon, adamw
        self.optimizers = (muon, adamw)

    @property
    def param_groups(self) -> list[dict]:
        return self.muon.param_groups + self.adamw.param_groups

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])


def build_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.AdamW | MuonAdamW:
    """AdamW, or Muon for a GPT's block matrices plus AdamW for the rest (see the module docstring);
    config.optimizer is adamw or muon (`keel.config.resolve_optimizer` decides auto).

    AdamW decays matrices only: decaying norms and embeddings hurts and buys nothing.
    """
    # With muon, model is a keel GPT: its hidden matrices are the 2-D parameters of its blocks.
    hidden_ids = {id(p) for p in model.blocks.parameters() if p.ndim == 2} if config.optimizer == "muon" else set()
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    hidden, decay, no_decay = [], [], []
    for param in model.parameters():  # parameters() yields a tied weight once
        if not param.requires_grad:
            continue
        if id(param) in hidden_ids:
            hidden.append(param)
        elif param.ndim >= 2 and id(param) not in embedding_ids:
            decay.append(param)
        else:
            no_decay.append(param)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # The fused kernel does the whole update in one pass over memory (CPU and CUDA since torch 2.4).
    adamw = torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps, fused=True)
    if config.optimizer == "adamw":
        return adamw
    muon = torch.optim.Muon(
        hidden, lr=config.lr, weight_decay=config.weight_decay, momentum=MUON_MOMENTUM, adjust_lr_fn="match_rms_adamw"
    )
    return MuonAdamW(muon, adamw)


def step_unless(optimizer: torch.optim.Optimizer | MuonAdamW, skip: torch.Tensor | None) -> None:
    """optimizer.step(), dropped when `skip` (a 0-d float32 tensor on the parameters' device) is 1.

    Fused AdamW reads the flag inside its kernel and leaves weights, moments and step counts as they
    were (the mechanism GradScaler uses for fp16 overflows), so the host never waits for the verdict.
    Muon has no such flag: its part of MuonAdamW waits for the verdict, one device sync per step.
    """
    if skip is None:
        optimizer.step()
        return
    for part in getattr(optimizer, "optimizers", (optimizer,)):
        if part.defaults.get("fused"):
            part.found_inf = skip
            try:
                part.step()
            finally:
                del part.found_inf
        elif not bool(skip):
            part.step()


def reset_moments(optimizer: torch.optim.Optimizer | MuonAdamW, names: Sequence[str]) -> None:
    """Zero the named AdamW moments (exp_avg, exp_avg_sq) of every parameter, in place.

    Muon's momentum buffer counts as exp_avg. Step counts stay, so AdamW's bias correction does not
    restart and inflate the first updates.
    """
    keys = set(names) | {MUON_MOMENTS[name] for name in names if name in MUON_MOMENTS}
    for part in getattr(optimizer, "optimizers", (optimizer,)):
        for param_state in part.state.values():
            for key in keys & param_state.keys():
                param_state[key].zero_()


def lr_at(step: int, config: OptimConfig, max_steps: float) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then the chosen shape over a
    run of `max_steps` steps (a time-budgeted run passes the length it plans now, not an integer)."""
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
