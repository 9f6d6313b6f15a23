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


class Muon(torch.optim.Muon):
    """torch.optim.Muon whose step a device-side flag can drop, as fused AdamW's can: the host never
    waits for the supervisor's verdict, so on a GPU the next step's kernels queue behind this one.

    The flag is `found_inf` (a 0-d float tensor, 1 = drop), set for one step by `step_unless`. The
    step is torch's algorithm (its hyperparameters, state and checkpoints too): momentum lerp,
    Nesterov, Newton–Schulz orthogonalisation in bf16, decoupled decay, the shape-adjusted rate. On
    an accelerator each matrix's new momentum and weights are computed aside and kept only where the
    flag is 0 (torch.where, so a NaN gradient leaves no trace): one select per matrix and one
    matrix-sized temporary at a time more than the in-place step, the same numbers. A flag in CPU
    memory is read directly (nothing to wait for) and the step runs in place, as torch's does.
    """

    @torch.no_grad()
    def step(self) -> None:
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and _free_to_read(found_inf):
            if found_inf.item():
                return
            found_inf = None
        keep = None if found_inf is None else found_inf == 0
        for group in self.param_groups:
            lr, decay, momentum = group["lr"], group["weight_decay"], group["momentum"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad, state = param.grad, self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                new_buf = buf.lerp_(grad, 1 - momentum) if keep is None else buf.lerp(grad, 1 - momentum)
                update = grad.lerp(new_buf, momentum) if group["nesterov"] else new_buf
                update = newton_schulz(update, group["ns_coefficients"], group["ns_steps"], group["eps"])
                new_param = param.mul_(1 - lr * decay) if keep is None else param.mul(1 - lr * decay)
                new_param.add_(update, alpha=-lr * _lr_scale(group, param.shape))
                if keep is not None:
                    buf.copy_(new_buf.where(keep, buf))
                    param.copy_(new_param.where(keep, param))


def _free_to_read(flag: torch.Tensor) -> bool:
    """A flag in CPU memory costs nothing to read on the host: there is no device to wait for."""
    return flag.device.type == "cpu"


def newton_schulz(
    matrix: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float
) -> torch.Tensor:
    """The orthogonalised direction of `matrix` (about U V^T of its SVD), by the quintic Newton–Schulz
    iteration Muon uses, in bf16, on the wide orientation (fewer rows than columns)."""
    a, b, c = coefficients
    x = matrix.bfloat16()
    tall = matrix.size(0) > matrix.size(1)
    if tall:
        x = x.T
    x = x.div(x.norm().clamp(min=eps))  # spectral norm at most 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def _lr_scale(group: dict, shape: torch.Size) -> float:
    """Muon's per-matrix rate factor: "match_rms_adamw" sizes the update like AdamW's (Liu et al.,
    2025), the original (None or "original") corrects for the aspect ratio."""
    rows, cols = shape[:2]
    if group["adjust_lr_fn"] == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(max(1.0, rows / cols))


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
    muon = Muon(
        hidden, lr=config.lr, weight_decay=config.weight_decay, momentum=MUON_MOMENTUM, adjust_lr_fn="match_rms_adamw"
    )
    return MuonAdamW(muon, adamw)


def step_unless(optimizer: torch.optim.Optimizer | MuonAdamW, skip: torch.Tensor | None) -> None:
    """optimizer.step(), dropped when `skip` (a 0-d float32 tensor on the parameters' device) is 1.

    Fused AdamW reads the flag inside its kernel and leaves weights, moments and step counts as they
    were (the mechanism GradScaler uses for fp16 overflows); keel's Muon selects on it. So the host
    never waits for the verdict. Any other optimizer waits for it (one device sync).
    """
    if skip is None:
        optimizer.step()
        return
    for part in getattr(optimizer, "optimizers", (optimizer,)):
        if part.defaults.get("fused") or isinstance(part, Muon):
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
