"""Diffusion: a DiT learns to turn noise into images of the data's classes (task.kind=diffusion).

Objectives (diffusion.objective), both a mean squared error over every pixel of the batch:
- `flow`, rectified flow / flow matching (the default): x_t = (1 - t) x + t noise on a straight
  line from the image (t = 0) to Gaussian noise (t = 1); the model predicts the velocity
  noise - x; t is logit-normal (SD3's choice: the middle of the path, where the target is least
  obvious, is trained most);
- `ddpm`: noise prediction on Nichol & Dhariwal's cosine schedule of 1000 steps, t uniform.
The t of a micro-batch are stratified: one uniform offset spaced over the batch's B quantiles, so
every batch sees the whole range of noise levels. Each t is still drawn from the same distribution,
so the loss is unbiased, but a batch's loss varies far less from one step to the next than with
independent t, which is what the supervisor's spike test needs from a loss.

Batch i is a pure function of (data, seed, i): the images of positions [iB, (i+1)B) of an endless
stream of seeded epoch permutations, and their noise, t and class dropout from a generator seeded
with (seed, i). Evaluation is the same loss on a fixed subset of val with fixed noise and t, computed
with the EMA weights, so it is deterministic and comparable between steps and runs.

The EMA of the weights (diffusion.ema_decay, warmed up as (1 + n) / (10 + n) over the first updates)
is this task's state: it is updated on the device after each step (not when the update was dropped),
saved in every checkpoint and restored by a resume or a rollback with the weights it belongs to.

`sample_images` is the one entry point for sampling a model: the evaluation's grid, `keel sample`,
the quality score and the benches all call it.
"""

from __future__ import annotations

import copy
import functools
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from keel.config import OBJECTIVES, RunConfig
from keel.data.images import ImageData, open_images
from keel.errors import UserError
from keel.models.dit import DiT, DiTConfig
from keel.tasks.base import ACT_NORM, Batch, LossOutput, Task, mean_square
from keel.train.precision import autocast

DDPM_STEPS = 1000  # training steps of the cosine schedule
EVAL_SEED = 0  # the evaluation's images, noise and t do not depend on the run's seed: runs compare
GRID_SEED = 0  # nor do the sample grids' starting noise
SAMPLES_DIR = "samples"
OUTPUT_NORM = "output_mean_square"  # a metric of the prediction's size (see diffusion_loss)


def dit_config(config: RunConfig, images: dict) -> DiTConfig:
    """The DiT of the run for images described by `images` (an image manifest, or a run's images.json)."""
    return DiTConfig(
        config.model,
        images["channels"],
        images["height"],
        images["width"],
        config.diffusion.patch_size,
        images["num_classes"],
    )


def check_data(config: RunConfig, data: ImageData) -> None:
    """One sentence for a config that cannot train on these images."""
    channels, height, width = data.shape
    p, d = config.diffusion.patch_size, config.model.d_model
    if height % p or width % p:
        divisors = [n for n in range(1, min(height, width) + 1) if height % n == 0 and width % n == 0]
        raise UserError(
            f"diffusion.patch_size={p} does not divide the {height}x{width} images of {data.path}; "
            f"use one of {', '.join(map(str, divisors))}, or prepare the images again with another --image-size."
        )
    if d % 4:
        raise UserError(f"model.d_model={d} must be divisible by 4 for the DiT's 2D position embedding.")
    if not data.num_classes and config.diffusion.guidance != 1:
        raise UserError(
            f"diffusion.guidance={config.diffusion.guidance} needs classes, but {data.path} is unlabelled; "
            "set diffusion.guidance=1 or prepare images in one subfolder per class."
        )


# ---------------------------------------------------------------------------------------------
# the two objectives


@functools.lru_cache(maxsize=1)
def cosine_alpha_bar() -> torch.Tensor:
    """(DDPM_STEPS,) float64: the share of the image left in x_t at step t (Nichol & Dhariwal, s = 0.008)."""
    s = 0.008
    f = torch.cos((torch.arange(DDPM_STEPS + 1, dtype=torch.float64) / DDPM_STEPS + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)  # the cap keeps the last steps from being pure noise
    return torch.cumprod(1 - betas, dim=0)


def noisy_inputs(objective: str, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor):
    """(x_t, the model's time on a 0..1000 scale, the target) for images x0 and noise (B, C, H, W) at t (B,):
    t in (0, 1) for flow, a step in [0, DDPM_STEPS) for ddpm."""
    if objective == "flow":
        tt = t.view(-1, 1, 1, 1)
        return (1 - tt) * x0 + tt * noise, t * 1000, noise - x0
    alpha_bar = cosine_alpha_bar().to(x0.device)[t.long()].float().view(-1, 1, 1, 1)
    return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise, t, noise


def draw_noise(objective: str, shape: tuple[int, ...], class_dropout: float, seed: int, index: int):
    """Noise (B, C, H, W), t (B,) and the class-dropout mask (B,) bool of batch `index`, from (seed, index)."""
    rng = np.random.default_rng([seed, index])
    noise = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))
    batch = shape[0]
    # stratified: B evenly spaced quantiles moved by one uniform offset (see the module docstring)
    quantiles = torch.from_numpy((np.arange(batch) + rng.random()) / batch)  # (B,) in (0, 1), float64
    if objective == "flow":
        t = torch.sigmoid(torch.special.ndtri(quantiles)).float()  # logit-normal(0, 1)
    else:
        t = (quantiles * DDPM_STEPS).floor().clamp(max=DDPM_STEPS - 1).float()
    t = t[torch.from_numpy(rng.permutation(batch))]  # not in the order of the images' positions
    dropped = torch.from_numpy(rng.random(batch) < class_dropout)
    return noise, t, dropped


@functools.lru_cache(maxsize=4)
def _epoch_order(num_images: int, seed: int, epoch: int) -> np.ndarray:
    order = np.random.default_rng([seed, epoch, 1]).permutation(num_images)
    order.flags.writeable = False  # shared through the cache
    return order


def image_indices(num_images: int, batch_size: int, seed: int, index: int) -> np.ndarray:
    """The images of batch `index`: stream positions [iB, (i+1)B) of seeded epoch permutations, (B,) int64."""
    positions = np.arange(index * batch_size, (index + 1) * batch_size)
    epochs = positions // num_images
    out = np.empty(batch_size, dtype=np.int64)
    for epoch in np.unique(epochs):
        mask = epochs == epoch
        out[mask] = _epoch_order(num_images, seed, int(epoch))[positions[mask] % num_images]
    return out


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels 0..255 -> float32 in [-1, 1]."""
    return images.float() / 127.5 - 1


def diffusion_loss(objective: str, model: DiT, tensors: dict[str, torch.Tensor]) -> LossOutput:
    """Mean squared error of the model's prediction over every pixel of `images` (B, C, H, W) uint8 noised
    with `noise` at `time` (B,), conditioned on `labels` (B,)."""
    x0 = to_unit_range(tensors["images"])
    x_t, model_time, target = noisy_inputs(objective, x0, tensors["noise"], tensors["time"])
    hidden, c = model.hidden_states(x_t, model_time, tensors["labels"])
    prediction = model.output(hidden, c)  # (B, C, H, W)
    loss = F.mse_loss(prediction.float(), target)
    # The output is not the supervisor's LOGIT_NORM: adaLN-Zero starts it at exactly zero, so its first
    # steps "grow" a hundredfold while the loss barely moves, which the norm-growth test takes for a
    # blow-up (it rolled back a healthy run at step 14). Its size is pinned by a target of fixed scale,
    # so an output that blows up shows in the loss. It is still recorded, under its own name.
    metrics = {ACT_NORM: mean_square(hidden.detach()), OUTPUT_NORM: mean_square(prediction.detach())}
    return LossOutput(loss, metrics)


# ---------------------------------------------------------------------------------------------
# the EMA of the weights


class EMA:
    """An exponential moving average of a model's parameters, updated on the device without a sync."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).requires_grad_(False).eval()
        device = next(model.parameters()).device
        self.updates = torch.zeros((), dtype=torch.float64, device=device)  # updates applied so far

    @torch.no_grad()
    def reset(self, model: torch.nn.Module) -> None:
        """Start again from `model`'s weights, as at step 0."""
        for ema, param in zip(self.model.parameters(), model.parameters()):
            ema.copy_(param)
        self.updates.zero_()

    @torch.no_grad()
    def update(self, model: torch.nn.Module, skipped: torch.Tensor | None) -> None:
        applied = 1.0 if skipped is None else 1.0 - skipped.double()
        self.updates += applied
        # The warm-up lets the average follow the fast early weights instead of dragging their initial values
        # along for ~1 / (1 - decay) steps (TensorFlow's ExponentialMovingAverage with num_updates).
        decay = torch.clamp((1 + self.updates) / (10 + self.updates), max=self.decay)
        weight = ((1 - decay) * applied).float()
        for ema, param in zip(self.model.parameters(), model.parameters()):
            ema.lerp_(param.detach(), weight)

    def state_dict(self) -> dict[str, Any]:
        weights = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        return {"weights": weights, "updates": self.updates.clone()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        params = dict(self.model.named_parameters())
        assert set(params) == set(state["weights"]), "the EMA belongs to another model"
        for name, value in state["weights"].items():
            params[name].copy_(value)
        self.updates.copy_(state["updates"])

    @property
    def step(self) -> int:
        """Updates applied so far: the step of the weights it follows (reads the device)."""
        return int(self.updates.item())


# ---------------------------------------------------------------------------------------------
# the task


class DiffusionTask(Task):
    kind = "diffusion"

    def __init__(
        self,
        config: RunConfig,
        device: torch.device,
        dtype: torch.dtype,
        run_dir: Path | None = None,
        heartbeat: Callable[[], None] = lambda: None,
    ):
        self.config, self.device, self.dtype, self.run_dir = config, device, dtype, run_dir
        self.heartbeat = heartbeat  # sampling a grid takes long enough for the watchdog to think the run hung
        self.data = open_images(Path(config.data.path))
        check_data(config, self.data)
        self.objective = config.diffusion.objective
        self.train_images, self.train_labels = self.data.images("train"), self.data.labels("train")
        self.null_class = self.data.num_classes  # the label of a dropped class (unused without classes)
        self.num_patches = dit_config(config, self.data.manifest).num_patches
        self.ema: EMA | None = None
        if len(self.train_images) < config.train.batch_size:
            raise UserError(
                f"train.batch_size={config.train.batch_size} is more than the {len(self.train_images)} training "
                f"images of {self.data.path}; lower train.batch_size or prepare more images."
            )

    def build_model(self) -> DiT:
        torch.manual_seed(self.config.train.seed)
        model = DiT(dit_config(self.config, self.data.manifest)).to(self.device)
        self.ema = EMA(model, self.config.diffusion.ema_decay)
        return model

    def init_weights(self, model: DiT) -> None:
        torch.manual_seed(self.config.train.seed)
        model.init_weights()
        self.ema.reset(model)

    def after_step(self, model: DiT, skipped: torch.Tensor | None) -> None:
        self.ema.update(model, skipped)

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "ema" in state:
            self.ema.load_state_dict(state["ema"])

    def batch(self, index: int) -> Batch:
        t = self.config.train
        rows = np.sort(image_indices(len(self.train_images), t.batch_size, t.seed, index))  # sorted: faster reads
        images = torch.from_numpy(np.ascontiguousarray(self.train_images[rows]))  # (B, C, H, W) uint8
        noise, time, dropped = draw_noise(
            self.objective, tuple(images.shape), self.config.diffusion.class_dropout, t.seed, index
        )
        labels = torch.from_numpy(self.train_labels[rows].astype(np.int64))
        labels = torch.where(dropped | (labels < 0), self.null_class, labels)
        tensors = {"images": images, "noise": noise, "time": time, "labels": labels}
        return Batch(tensors, units=len(rows), tokens=len(rows) * self.num_patches)  # a token is a patch

    def loss(self, model: DiT, tensors: dict[str, torch.Tensor]) -> LossOutput:
        return diffusion_loss(self.objective, model, tensors)

    def evaluate(self, model: DiT) -> dict[str, float]:
        """The loss of the EMA weights on the fixed validation batches, and a sample grid for the report."""
        numbers = {"val_loss": self.held_out_loss(model)}
        if self.config.diffusion.grid_columns and self.run_dir is not None:
            write_eval_grid(
                self.ema.model, self.config, Path(self.run_dir) / SAMPLES_DIR, self.ema.step, self.heartbeat
            )
        return numbers

    def held_out_loss(self, model: DiT) -> float:
        """The EMA's validation loss without the sample grid, which costs a sampler run."""
        return validation_loss(self.ema.model, self.data, self.config, self.device, self.dtype)


def validation_batches(data: ImageData, config: RunConfig) -> list[dict[str, torch.Tensor]]:
    """train.eval_batches batches of train.batch_size images of val (all of them if fewer), in a fixed random
    order so a few batches still cover every class, with noise and t from EVAL_SEED."""
    images, labels = data.images("val"), data.labels("val")
    batch_size = config.train.batch_size
    order = np.random.default_rng(EVAL_SEED).permutation(len(images))[: batch_size * config.train.eval_batches]
    batches = []
    for i, start in enumerate(range(0, len(order), batch_size)):
        rows = np.sort(order[start : start + batch_size])
        x = torch.from_numpy(np.ascontiguousarray(images[rows]))
        noise, time, _ = draw_noise(config.diffusion.objective, tuple(x.shape), 0.0, EVAL_SEED, i)
        y = torch.from_numpy(labels[rows].astype(np.int64))
        y = torch.where(y < 0, data.num_classes, y)
        batches.append({"images": x, "noise": noise, "time": time, "labels": y})
    return batches


def validation_loss(model: DiT, data: ImageData, config: RunConfig, device: torch.device, dtype: torch.dtype) -> float:
    """Mean loss per image over the validation batches, in eval mode."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for tensors in validation_batches(data, config):
            with autocast(device, dtype):
                loss = diffusion_loss(config.diffusion.objective, model, {k: v.to(device) for k, v in tensors.items()})
            n = len(tensors["images"])
            total += loss.loss.item() * n
            count += n
    model.train(was_training)
    return total / max(count, 1)


# ---------------------------------------------------------------------------------------------
# sampling


def resolve_sampler(objective: str, sampler: str) -> str:
    if sampler == "auto":
        return "heun" if objective == "flow" else "ddim"
    if sampler not in OBJECTIVES[objective]:
        raise UserError(
            f"sampler {sampler} does not fit a {objective} model; use {' or '.join(OBJECTIVES[objective])} (or auto)."
        )
    return sampler


@torch.no_grad()
def sample_images(
    model: DiT,
    objective: str,
    num: int,
    labels: list[int] | torch.Tensor | None = None,
    sampler: str = "auto",
    steps: int = 16,
    guidance: float = 1.0,
    seed: int = 0,
    batch_size: int = 250,
    on_step: Callable[[], None] = lambda: None,
) -> np.ndarray:
    """`num` images from `model` (pass the EMA weights), as uint8 (num, C, H, W).

    labels: the class of each image ((num,) ints); None gives a conditional model's classes in turn
    (0, 1, ..., K-1, 0, ...) and an unlabelled model's its only kind. sampler: euler or heun for a flow
    model, ddpm (ancestral) or ddim for a ddpm one, auto for heun / ddim. guidance: the classifier-free
    guidance scale (1: the conditional model alone). The same seed gives the same images whatever the
    device; images are made `batch_size` at a time (a different batch_size gives other ddpm samples).
    on_step is called after every sampler step (the trainer's heartbeat).
    """
    cfg = model.config
    sampler = resolve_sampler(objective, sampler)
    if steps < 1:
        raise UserError(f"the sampler needs at least one step, got {steps}.")
    if not (math.isfinite(guidance) and guidance >= 0):
        raise UserError(f"guidance must be a finite number >= 0 (1 is no guidance), got {guidance}.")
    if guidance != 1 and not cfg.num_classes:
        raise UserError(
            f"guidance {guidance} needs a class-conditional model, and this one was trained on unlabelled images; "
            "use guidance 1."
        )
    if labels is None:
        labels = [i % cfg.num_classes for i in range(num)] if cfg.num_classes else [0] * num
    labels = torch.as_tensor(labels, dtype=torch.int64).flatten()
    if len(labels) != num:
        raise UserError(f"{len(labels)} labels were given for {num} images; give one per image.")
    if cfg.num_classes and ((labels < 0) | (labels >= cfg.num_classes)).any():
        raise UserError(f"a label is outside the model's classes 0..{cfg.num_classes - 1}.")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)  # on the CPU: the same numbers on every device
    out = []
    for start in range(0, num, batch_size):
        y = labels[start : start + batch_size].to(device)
        x = torch.randn((len(y), cfg.channels, cfg.height, cfg.width), generator=generator).to(device)
        predict = functools.partial(_guided, model, y, guidance, cfg.num_classes, on_step)
        if objective == "flow":
            x = _flow_sample(predict, x, sampler, steps)
        else:
            x = _ddpm_sample(predict, x, sampler, steps, generator)
        out.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu())
    model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros((0, cfg.channels, cfg.height, cfg.width), np.uint8)


def _guided(
    model: DiT, y: torch.Tensor, guidance: float, null_class: int, on_step: Callable, x: torch.Tensor, t: float
) -> torch.Tensor:
    """The model's prediction at x (B, C, H, W) and time t (0..1000 scale), with classifier-free guidance:
    unconditional + guidance * (conditional - unconditional), one batch of 2B."""
    on_step()
    time = torch.full((len(x),), float(t), device=x.device)
    if guidance == 1:
        return model(x, time, y).float()
    both = model(torch.cat((x, x)), torch.cat((time, time)), torch.cat((y, torch.full_like(y, null_class)))).float()
    conditional, unconditional = both.chunk(2)
    return unconditional + guidance * (conditional - unconditional)


def _flow_sample(predict, x: torch.Tensor, sampler: str, steps: int) -> torch.Tensor:
    """Integrate dx/dt = v from t = 1 (noise) to t = 0 (image) in `steps` equal steps: Euler, or Heun (the
    trapezoid rule; its last step, which ends at t = 0, is Euler's)."""
    times = torch.linspace(1.0, 0.0, steps + 1).tolist()
    for t, t_next in zip(times[:-1], times[1:]):
        velocity = predict(x, t * 1000)
        x_euler = x + (t_next - t) * velocity
        if sampler == "euler" or t_next == 0:
            x = x_euler
        else:
            x = x + (t_next - t) * (velocity + predict(x_euler, t_next * 1000)) / 2
    return x


def _ddpm_sample(predict, x: torch.Tensor, sampler: str, steps: int, generator: torch.Generator) -> torch.Tensor:
    """Denoise from step DDPM_STEPS - 1 to 0 over `steps` evenly spaced steps of the schedule: DDIM (eta 0,
    deterministic) or ancestral DDPM on the respaced schedule, the predicted image clipped to [-1, 1]."""
    alpha_bar = cosine_alpha_bar()
    schedule = torch.linspace(DDPM_STEPS - 1, 0, min(steps, DDPM_STEPS)).round().long().unique_consecutive().tolist()
    for i, t in enumerate(schedule):
        t_prev = schedule[i + 1] if i + 1 < len(schedule) else -1
        ab, ab_prev = alpha_bar[t].item(), (alpha_bar[t_prev].item() if t_prev >= 0 else 1.0)
        eps = predict(x, t)
        x0 = ((x - math.sqrt(1 - ab) * eps) / math.sqrt(ab)).clamp(-1, 1)
        eps = (x - math.sqrt(ab) * x0) / math.sqrt(1 - ab)  # the noise consistent with the clipped image
        if sampler == "ddim":
            x = math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev) * eps
            continue
        beta = 1 - ab / ab_prev  # of the respaced step t -> t_prev
        mean = (math.sqrt(ab_prev) * beta * x0 + math.sqrt(1 - beta) * (1 - ab_prev) * x) / (1 - ab)
        if t_prev < 0:
            x = mean
        else:
            variance = beta * (1 - ab_prev) / (1 - ab)
            x = mean + math.sqrt(variance) * torch.randn(x.shape, generator=generator).to(x.device)
    return x


# ---------------------------------------------------------------------------------------------
# grids


def grid_labels(num_classes: int, columns: int) -> tuple[list[int], int]:
    """The labels of a grid with one row per class (four rows of an unlabelled model), and its row count."""
    rows = num_classes or 4
    return [row if num_classes else 0 for row in range(rows) for _ in range(columns)], rows


def save_grid(images: np.ndarray, rows: int, path: Path) -> Path:
    """Tile images (N, C, H, W) uint8 into `rows` rows with a 2-pixel gap, enlarged so each cell is at least
    56 pixels high, and write it as a PNG atomically (a unique temporary name: every rank may write it)."""
    from PIL import Image

    n, channels, height, width = images.shape
    columns = -(-n // rows)
    gap = 2
    canvas = np.full((rows * (height + gap) + gap, columns * (width + gap) + gap, channels), 255 // 2, dtype=np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        top, left = gap + r * (height + gap), gap + c * (width + gap)
        canvas[top : top + height, left : left + width] = image.transpose(1, 2, 0)
    picture = Image.fromarray(canvas[..., 0] if channels == 1 else canvas)
    scale = max(1, -(-56 // height))
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    picture.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def write_eval_grid(
    model: DiT, config: RunConfig, samples_dir: Path, step: int, heartbeat: Callable[[], None] = lambda: None
) -> Path:
    """The evaluation's grid of the configured sampler, RUN_DIR/samples/step_{step:08d}.png, from GRID_SEED."""
    f = config.diffusion
    labels, rows = grid_labels(model.config.num_classes, f.grid_columns)
    images = sample_images(
        model, f.objective, len(labels), labels, f.sampler, f.sample_steps, f.guidance, GRID_SEED, on_step=heartbeat
    )
    return save_grid(images, rows, samples_dir / f"step_{step:08d}.png")
