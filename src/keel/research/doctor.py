"""`keel doctor`: the checks to run before trusting a setup with a long run.

Researchers' first debugging step (Karpathy's "recipe for training neural networks", and every
course since) is to make a fresh model pass trivial tests: its first loss is what chance predicts,
every weight gets a gradient, the loss falls at once, it can memorise one batch, it can learn a
task a correct model finds easy. Each is cheap and each catches a class of bug that a long run
only shows as "the loss is a bit worse than expected".

The doctor builds fresh models of the config's shape (model.*) and trains them with the config's
optimizer settings (optim.*: optimizer, lr, betas, weight decay, clipping; the schedule over the
check's own step budget, warmup capped at a tenth of it), batch size, dtype and device. It never
loads init.from and adds no LoRA: it checks the architecture and the optimisation, not a run.

1. initial loss: within INIT_TOLERANCE of ln(vocab) on a batch of data (a fresh model predicts
   nearly uniformly; far above it means saturated logits, i.e. a broken initialisation);
2. gradients: after one backward pass every trainable parameter tensor has a finite, non-zero
   gradient (a detached or unused weight, a frozen layer, a NaN show up here);
3. the loss falls: after EARLY_STEPS steps on that batch it is below 98% of its first value;
4. overfitting one batch: the same batch, at most OVERFIT_ROWS rows of OVERFIT_CONTEXT tokens, is
   driven under OVERFIT_LOSS nats per token within the step budget;
5. the copy task: trained on builtin:copy (keel.data.toy), teacher-forced predictions of held-out
   answers reach COPY_ACCURACY, measured every COPY_EVAL_EVERY steps until they do.

The batch of checks 1-4 is batch 0 of data.path when that holds text or SFT examples (prepared
for that config), else of builtin:copy, prepared into a temporary directory (the copy check's
data too). The checks stop as soon as they pass, so a sound setup finishes early.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from keel.config import DataConfig, InitConfig, LoRAConfig, RunConfig, SFTConfig, TaskConfig, resolve_optimizer
from keel.errors import UserError

INIT_TOLERANCE = 0.1  # relative to ln(vocab)
EARLY_STEPS = 10
EARLY_DROP = 0.98
OVERFIT_ROWS, OVERFIT_CONTEXT = 4, 128
OVERFIT_LOSS = 0.1
COPY_ACCURACY = 0.95
COPY_CONTEXT = 64  # two or three examples of 19 tokens per row
COPY_EVAL_EVERY = 25


@dataclass
class Check:
    name: str
    passed: bool
    evidence: str


@dataclass
class DoctorReport:
    setup: str  # what was checked: model, optimizer, device
    checks: list[Check]
    seconds: float

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)


def format_check(check: Check) -> str:
    return f"  {'PASS' if check.passed else 'FAIL'}  {check.name}: {check.evidence}"


def verdict(report: DoctorReport) -> str:
    failed = [c.name for c in report.checks if not c.passed]
    outcome = f"{len(failed)} of {len(report.checks)} checks failed" if failed else "all checks passed"
    return f"{outcome} ({report.seconds:.0f} s)"


def format_report(report: DoctorReport) -> str:
    return "\n".join([f"keel doctor: {report.setup}", *map(format_check, report.checks), verdict(report)])


def run_doctor(
    config: RunConfig,
    overfit_steps: int = 300,
    copy_steps: int = 400,
    report: Callable[[str], None] = lambda line: None,
) -> DoctorReport:
    """Run the checks of the module docstring on `config`; `report` receives the lines of format_report as they
    become known (the setup first, then each check as it ends)."""
    from keel.train.precision import pick_device, pick_dtype

    if config.task.kind == "diffusion":
        raise UserError("keel doctor checks language models; task.kind=diffusion trains a DiT, drop it.")
    for flag, steps in (("--overfit-steps", overfit_steps), ("--copy-steps", copy_steps)):
        if steps < EARLY_STEPS:
            raise UserError(f"{flag} must be at least {EARLY_STEPS}, got {steps}.")
    started = time.perf_counter()
    device = pick_device(config.train.device)
    dtype = pick_dtype(config.train.dtype, device)
    # A fresh model of the config's shape, trained from scratch: no init run, no adapters.
    config = dataclasses.replace(config, init=InitConfig(), lora=LoRAConfig())
    m, o = config.model, resolve_optimizer(config)
    setup = (
        f"fresh {m.n_layer}-layer, {m.d_model}-wide model ({m.n_head} heads), {o.optimizer} lr {o.lr:g}, "
        f"{str(dtype).removeprefix('torch.')} on {device.type}"
    )
    report(f"keel doctor: {setup}")
    checks: list[Check] = []

    def add(check: Check) -> None:
        checks.append(check)
        report(format_check(check))

    with tempfile.TemporaryDirectory(prefix="keel-doctor-") as tmp:
        copy_dir = _prepare_copy(Path(tmp))
        task, what = _overfit_task(config, copy_dir, device, dtype)
        model = task.build_model()
        batch = task.batch(0).to(device)
        for check in _batch_checks(model, task, batch, what, overfit_steps, device, dtype):
            add(check)
        add(_copy_check(config, copy_dir, copy_steps, device, dtype))
    return DoctorReport(setup, checks, time.perf_counter() - started)


def _prepare_copy(folder: Path) -> Path:
    from keel.data import prepare

    out = folder / "copy"
    prepare(["builtin:copy"], out, progress=False)
    return out


def _task_config(config: RunConfig, data_dir: Path, kind: str, context: int, rows: int) -> RunConfig:
    """config for `kind` on data_dir with the data's vocabulary, `context` tokens and `rows` rows per batch."""
    from keel.data.shards import read_manifest

    vocab = read_manifest(data_dir)["tokenizer"]["vocab_size"]
    return dataclasses.replace(
        config,
        task=TaskConfig(kind=kind),
        data=DataConfig(path=str(data_dir)),
        sft=SFTConfig(),
        model=dataclasses.replace(config.model, vocab_size=vocab, context_length=context),
        train=dataclasses.replace(config.train, batch_size=rows, grad_accum=1),
    )


def _overfit_task(config: RunConfig, copy_dir: Path, device: torch.device, dtype: torch.dtype):
    """The task whose batch 0 checks 1-4 use, and words for where that batch comes from."""
    from keel.data.shards import read_manifest
    from keel.tasks import build_task

    rows = min(config.train.batch_size, OVERFIT_ROWS)
    context = min(config.model.context_length, OVERFIT_CONTEXT)
    data_dir = Path(config.data.path)
    manifest = read_manifest(data_dir) if (data_dir / "manifest.json").is_file() else None
    kind = {"text": "pretrain", "sft": "sft"}.get(manifest.get("kind", "text")) if manifest else None
    if kind is not None:
        try:
            task = build_task(_task_config(config, data_dir, kind, context, rows), device, dtype)
            return task, f"batch 0 of {data_dir}, {rows} x {context} tokens"
        except UserError:
            pass  # data too short for this batch: builtin:copy always fits
    task = build_task(_task_config(config, copy_dir, "sft", COPY_CONTEXT, rows), device, dtype)
    reason = "no text or SFT data at data.path" if kind is None else f"{data_dir} is too short for it"
    return task, f"batch 0 of builtin:copy, {rows} x {COPY_CONTEXT} tokens: {reason}"


def _batch_checks(model, task, batch, what: str, budget: int, device, dtype) -> list[Check]:
    """Checks 1-4 on one batch of one fresh model."""
    from keel.train.precision import autocast

    vocab = task.config.model.vocab_size
    with autocast(device, dtype):
        first = task.loss(model, batch.tensors).loss
    first.backward()
    chance = math.log(vocab)
    initial = Check(
        "initial loss",
        abs(first.item() - chance) <= INIT_TOLERANCE * chance,
        f"{first.item():.3f} against ln({vocab}) = {chance:.3f}; passes within {INIT_TOLERANCE:.0%} ({what})",
    )
    gradients = _gradient_check(model)
    model.zero_grad(set_to_none=True)
    losses = train_steps(model, task, lambda step: batch, budget, device, dtype, stop=lambda ls: ls[-1] < OVERFIT_LOSS)
    early = losses[min(EARLY_STEPS, len(losses) - 1)]
    falls = Check(
        "loss falls",
        early < EARLY_DROP * losses[0],
        f"{losses[0]:.3f} at step 0, {early:.3f} after {min(EARLY_STEPS, len(losses) - 1)} steps; "
        f"passes under {EARLY_DROP:.0%} of the first",
    )
    best = int(np.argmin(losses))
    overfit = Check(
        "overfits one batch",
        losses[best] < OVERFIT_LOSS,
        f"loss {losses[0]:.3f} -> {losses[-1]:.4f} in {len(losses)} of {budget} steps (best {losses[best]:.4f} at step "
        f"{best}); passes under {OVERFIT_LOSS}",
    )
    return [initial, gradients, falls, overfit]


def _gradient_check(model: torch.nn.Module) -> Check:
    """Every trainable parameter tensor has a finite, non-zero gradient (after a backward pass)."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    missing = [name for name, p in trainable if p.grad is None or not bool(p.grad.any())]
    broken = [name for name, p in trainable if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
    problems = []
    if frozen:
        problems.append(f"{len(frozen)} frozen ({', '.join(frozen[:4])})")
    if missing:
        problems.append(f"{len(missing)} without gradient ({', '.join(missing[:4])})")
    if broken:
        problems.append(f"{len(broken)} with non-finite gradient ({', '.join(broken[:4])})")
    if problems:
        return Check("gradients", False, f"of {len(frozen) + len(trainable)} parameter tensors: {'; '.join(problems)}")
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for _, p in trainable])).item()
    evidence = f"all {len(trainable)} parameter tensors have a finite, non-zero gradient (norm {norm:.3g})"
    return Check("gradients", True, evidence)


def train_steps(
    model: torch.nn.Module,
    task,
    batch_at: Callable[[int], object],
    steps: int,
    device: torch.device,
    dtype: torch.dtype,
    stop: Callable[[list[float]], bool] = lambda losses: False,
) -> list[float]:
    """Train `model` on `task`'s loss for up to `steps` steps with the task config's optimizer settings;
    returns the loss of every step taken (before its update). `stop(losses)` ends the training early."""
    from keel.train.optim import build_optimizer, lr_at
    from keel.train.precision import autocast

    o = resolve_optimizer(task.config)
    # The schedule spans the check's budget; a warmup longer than a tenth of it would leave no training.
    schedule = dataclasses.replace(o, warmup_steps=min(o.warmup_steps, steps // 10))
    optimizer = build_optimizer(model, o)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    losses: list[float] = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, schedule, steps)
        batch = batch_at(step).to(device)
        with autocast(device, dtype):
            loss = task.loss(model, batch.tensors).loss
        loss.backward()
        if o.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, o.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if not math.isfinite(losses[-1]) or stop(losses):
            break
    return losses


def copy_accuracy(model: torch.nn.Module, task, device: torch.device, dtype: torch.dtype) -> float:
    """Share of the answer tokens of the val split (end token included) that the model predicts right,
    each given the true tokens before it (teacher forcing)."""
    from keel.tasks.dpo import pad_rows
    from keel.tasks.lm import IGNORE_INDEX
    from keel.train.precision import autocast

    val = task.data.sequences("val")
    right = total = 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(val), 64):
            ids = np.arange(start, min(start + 64, len(val)))
            inputs, targets, _ = pad_rows(val, ids, task.config.model.context_length, task.data.eot_id)
            with autocast(device, dtype):
                predicted = model(inputs.to(device)).argmax(-1).cpu()  # (B, T)
            counted = targets != IGNORE_INDEX
            right += int((predicted == targets)[counted].sum())
            total += int(counted.sum())
    model.train()
    return right / total


def _copy_check(config: RunConfig, copy_dir: Path, budget: int, device, dtype) -> Check:
    from keel.tasks import build_task

    task = build_task(_task_config(config, copy_dir, "sft", COPY_CONTEXT, config.train.batch_size), device, dtype)
    model = task.build_model()
    accuracy = [0.0]  # the latest measurement
    steps_at = [0]

    def learnt(losses: list[float]) -> bool:
        if len(losses) % COPY_EVAL_EVERY and len(losses) < budget:
            return False
        accuracy[0], steps_at[0] = copy_accuracy(model, task, device, dtype), len(losses)
        return accuracy[0] >= COPY_ACCURACY

    losses = train_steps(model, task, task.batch, budget, device, dtype, stop=learnt)
    if steps_at[0] != len(losses):  # stopped on a non-finite loss
        accuracy[0], steps_at[0] = copy_accuracy(model, task, device, dtype), len(losses)
    return Check(
        "learns builtin:copy",
        accuracy[0] >= COPY_ACCURACY,
        f"{accuracy[0]:.1%} of held-out answer tokens right after {steps_at[0]} of {budget} steps "
        f"(loss {losses[0]:.3f} -> {losses[-1]:.3f}); passes at {COPY_ACCURACY:.0%}",
    )
