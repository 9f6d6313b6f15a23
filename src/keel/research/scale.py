"""Scaling ladders that predict and are checked: `keel scale LADDER_DIR`.

A ladder trains one family of models, sized by one knob, at several compute budgets. Depth d gives
n_layer = d, d_model = aspect * d and n_head = d heads of `aspect` dimensions (nanochat's knob;
aspect 64 by default), everything else from the ladder's base config. Every rung (depth, budget)
is an ordinary supervised keel run started by `keel.train.launch` — its own run directory under
LADDER_DIR/runs/, logbook, checkpoints and registry row (`keel runs` lists it as
`<ladder>-d<depth>-<budget>`) — that trains floor(C / (F * tokens per step)) steps, F being its
model's training FLOPs per token (`GPT.flops_per_token`); the lr schedule ends at that step.

Counting conventions (also printed with every fit, and in docs/scale.md):
- C, a budget, counts training FLOPs: per token 6 * (non-embedding parameters + lm_head) for the
  matmuls forward and backward, plus 12 * n_layer * d_model * context for attention (the full T x T
  square, as PaLM counts it). Evaluation is not counted. A rung spends at most C (whole steps only).
- D is the number of tokens a run trains on; N is its non-embedding parameter count (Kaplan et al.)
  or all its parameters, embedding included (Hoffmann et al.): both fits are reported, since the
  choice moves the exponents when the embedding is a large share of a small model.

The fits are those of Hoffmann et al. (2022):
- approach 3: L(N, D) = E + A / N^alpha + B / D^beta over every finished rung, by variable projection:
  for given (alpha, beta) the model is linear in (E, A, B), which non-negative least squares solves
  exactly, so only two exponents are searched (a grid, then L-BFGS-B from its best points). The
  objective is the sum of squared relative residuals (L_fit / L - 1)^2, the squared log-loss
  residual to second order. Chosen over a Huber loss on log-loss with L-BFGS over all five
  parameters: two nonlinear parameters instead of five make the fit well conditioned and
  deterministic without a grid of thousands of starts, E, A, B >= 0 hold by construction, and a
  fit takes milliseconds, so hundreds of bootstrap refits are cheap. Outliers are not
  down-weighted: a diverged run is the supervisor's business, and the table shows each residual.
- approach 2: per budget, a parabola of the loss in log N through that budget's runs; its vertex is
  the compute-optimal N there. N_opt = k * C^a is then fitted through the vertices (log-log line).
Intervals are 90% bootstrap intervals: runs are resampled with replacement within each budget
and everything is refitted. A predicted loss's interval also draws a relative residual of the fit
for each resample, so it says where a measured val loss should fall, run-to-run noise included.

Data must not repeat: a ladder whose largest run needs more training windows than the data has is
refused, naming the token counts. The stdlib (~3M tokens) is too small for a measured ladder;
`keel prepare` the venv's site-packages instead (bench/scale.py, docs/scale.md).

LADDER_DIR/ladder.json, the ladder's record, rewritten atomically after each run:
  {"format": "keel-ladder", "version": 1, "name", "aspect", "depths", "budgets",
   "base_config": the resolved config every rung starts from (model.n_layer etc. set per rung),
   "rungs": {run name: {depth, budget, steps, tokens, flops, n_layer, d_model, non_embedding_params,
             params, flops_per_token, status, val_loss, seconds}},
   "fits": {"non_embedding" | "all": {"law": {E, A, alpha, B, beta}, "intervals": {...},
            "rms_residual", "optimal": [...], "isoflop": {...}}},
   "predictions": [{budget, depth, run, steps, tokens, non_embedding_params, params, made_at,
                    predicted: {kind: {loss, interval}}, optimal: {...}, measured, relative_error}]}
LADDER_DIR/ladder.png plots loss against N per budget with the fitted curves and the frontier.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from keel import config as config_lib
from keel.config import ModelConfig, RunConfig
from keel.errors import UserError

LADDER_FILE = "ladder.json"
PLOT_FILE = "ladder.png"
RUNS_DIR = "runs"
FORMAT, VERSION = "keel-ladder", 1
N_KINDS = ("non_embedding", "all")
N_KIND_NAMES = {"non_embedding": "non-embedding parameters", "all": "all parameters"}
# The knob owns these; a base config that sets them would fight it.
KNOB_KEYS = ("n_layer", "d_model", "n_head", "n_kv_head", "mlp_hidden")
# A prediction has to reach well past the ladder to test the fit rather than interpolate it: issue #17 asks 4x.
PREDICT_MIN_RATIO = 4.0
INTERVAL_PERCENTILES = (5.0, 95.0)  # a 90% interval
EXPONENT_BOUNDS = (0.02, 2.5)  # wide: power laws in loss have exponents around 0.05-1
# Warmup longer than a tenth of a short rung would leave it at the peak lr for no steps at all.
MAX_WARMUP_FRACTION = 0.1

CONVENTIONS = (
    "counting: C = training FLOPs = D x (6 x (non-embedding params + lm_head) + 12 x n_layer x d_model x context) "
    "per token (attention over the full T x T square; evaluation not counted); D = training tokens; "
    "N = non-embedding or all parameters."
)


# ---- sizes: one knob -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Size:
    """A model of the ladder's family, counted from its config."""

    depth: int
    n_layer: int
    d_model: int
    non_embedding_params: int
    params: int  # embedding included, a tied matrix counted once
    flops_per_token: int  # training FLOPs, forward + backward (GPT.flops_per_token)

    def n(self, kind: str) -> int:
        return self.non_embedding_params if kind == "non_embedding" else self.params


def model_for_depth(base: ModelConfig, depth: int, aspect: int) -> ModelConfig:
    """The knob: depth d -> n_layer d, d_model aspect * d, n_head = n_kv_head = d (heads of `aspect` dims)."""
    return dataclasses.replace(base, n_layer=depth, d_model=aspect * depth, n_head=depth, n_kv_head=depth, mlp_hidden=0)


def size_of(model: ModelConfig, depth: int) -> Size:
    """Parameters and FLOPs per token of GPT(model), by GPT's own counting (model.vocab_size resolved)."""
    from keel.models.gpt import GPT

    return Size(
        depth=depth,
        n_layer=model.n_layer,
        d_model=model.d_model,
        non_embedding_params=GPT.count_params(model, include_embedding=False),
        params=GPT.count_params(model, include_embedding=True),
        flops_per_token=GPT.count_flops_per_token(model),
    )


def budget_label(budget: float) -> str:
    """1e12 -> '1e12', 3.16e13 -> '3.16e13': short, exact enough, and safe in file names."""
    mantissa, exponent = f"{budget:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def human(n: float) -> str:
    """12345 -> '12.3k', 4.5e6 -> '4.50M': counts that span many orders of magnitude."""
    if not math.isfinite(n):
        return str(n)
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.3g}"


# ---- the ladder --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rung:
    """One run of the ladder: a model size trained on a budget."""

    depth: int
    budget: float
    steps: int
    size: Size
    tokens_per_step: int

    @property
    def name(self) -> str:  # the run directory's name
        return f"d{self.depth}-{budget_label(self.budget)}"

    @property
    def tokens(self) -> int:
        return self.steps * self.tokens_per_step

    @property
    def flops(self) -> int:
        return self.tokens * self.size.flops_per_token


@dataclass
class Ladder:
    """A ladder as its record describes it; `record` is what ladder.json holds."""

    directory: Path
    base: RunConfig  # resolved: the data's vocabulary; the knob's keys at their defaults
    record: dict[str, Any]
    train_windows: int  # training windows of context + 1 tokens the data has per epoch
    train_tokens: int
    sizes: dict[int, Size] = field(default_factory=dict, repr=False)  # by depth, computed once

    @property
    def name(self) -> str:
        return self.record["name"]

    @property
    def aspect(self) -> int:
        return self.record["aspect"]

    @property
    def tokens_per_step(self) -> int:
        t = self.base.train
        return t.batch_size * t.grad_accum * self.base.model.context_length

    def size(self, depth: int) -> Size:
        if depth not in self.sizes:
            self.sizes[depth] = size_of(model_for_depth(self.base.model, depth, self.aspect), depth)
        return self.sizes[depth]

    def rung(self, depth: int, budget: float) -> Rung:
        size = self.size(depth)
        return Rung(
            depth, budget, int(budget // (size.flops_per_token * self.tokens_per_step)), size, self.tokens_per_step
        )

    def rungs(self) -> list[Rung]:
        """Every rung with at least one step, cheapest budgets first (early fits come sooner)."""
        rungs = [self.rung(d, c) for c in self.record["budgets"] for d in self.record["depths"]]
        return [r for r in rungs if r.steps >= 1]

    def run_name(self, rung_name: str) -> str:
        return f"{self.name}-{rung_name}"

    def run_dir(self, rung_name: str) -> Path:
        return self.directory / RUNS_DIR / rung_name

    def config_for(self, rung: Rung, name: str | None = None) -> RunConfig:
        """The rung's run config: the base, the knob's model, the step count its budget buys."""
        config = dataclasses.replace(
            self.base,
            name=self.run_name(name or rung.name),
            model=model_for_depth(self.base.model, rung.depth, self.aspect),
            train=dataclasses.replace(self.base.train, max_steps=rung.steps),
            optim=dataclasses.replace(
                self.base.optim,
                warmup_steps=min(self.base.optim.warmup_steps, max(1, int(MAX_WARMUP_FRACTION * rung.steps))),
            ),
        )
        config_lib.validate(config)
        return config

    def needed_windows(self, rung: Rung) -> int:
        return rung.steps * self.base.train.batch_size * self.base.train.grad_accum

    def check_data(self, rung: Rung, what: str) -> None:
        """Refuse a run that would see a training window twice: a ladder must not repeat data."""
        needed = self.needed_windows(rung)
        if needed > self.train_windows:
            context = self.base.model.context_length
            raise UserError(
                f"{what} needs {human(rung.tokens)} training tokens ({needed:,} windows of {context}) but "
                f"{self.base.data.path} has {human(self.train_tokens)} ({self.train_windows:,} windows), and a "
                "ladder must not repeat data; prepare a bigger corpus (e.g. `keel prepare` the venv's "
                "site-packages, docs/scale.md) or lower the largest budget."
            )

    def save(self) -> None:
        """Write ladder.json atomically: a crash leaves the previous record, never half of one."""
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / f".{LADDER_FILE}.tmp"
        with open(tmp, "w") as f:
            f.write(json.dumps(self.record, indent=1) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.directory / LADDER_FILE)


def open_ladder(
    directory: Path,
    depths: list[int] | None = None,
    budgets: list[float] | None = None,
    aspect: int | None = None,
    config_path: str | None = None,
    overrides: list[str] | None = None,
) -> Ladder:
    """The ladder in `directory`, new or recorded, with `depths` and `budgets` added; writes nothing.

    A recorded ladder keeps its base config and aspect: settings that differ are refused (they would
    make its runs incomparable). Every check a ladder can fail is made here, before anything is written.
    """
    directory = Path(directory)
    path = directory / LADDER_FILE
    record = _read_record(path) if path.exists() else None
    if record is None and not (depths or budgets):
        raise UserError(
            f"there is no ladder at {directory} (no {LADDER_FILE}); create one with "
            f"`keel scale {directory} --depths 1 2 3 --budgets 1e12 3e12 --set data.path=DATA_DIR`."
        )
    if record is None and directory.exists() and any(directory.iterdir()):
        raise UserError(
            f"{directory} already holds files and no {LADDER_FILE}; pass a new or empty directory for the ladder."
        )
    for depth in depths or []:
        if depth < 1:
            raise UserError(f"--depths must be positive integers, got {depth}.")
    for budget in budgets or []:
        if not (math.isfinite(budget) and budget > 0):
            raise UserError(f"--budgets must be positive FLOP counts such as 1e12, got {budget}.")
    if aspect is not None and (aspect < 2 or aspect % 2):
        raise UserError(f"--aspect must be an even number of dimensions per head (e.g. 64), got {aspect}.")

    base = _base_config(config_path, overrides or [])
    if record is None:
        record = {
            "format": FORMAT,
            "version": VERSION,
            "name": directory.resolve().name,
            "aspect": aspect or 64,
            "depths": [],
            "budgets": [],
            "base_config": base.to_dict(),
            "rungs": {},
            "fits": {},
            "predictions": [],
        }
    else:
        if aspect is not None and aspect != record["aspect"]:
            raise UserError(
                f"the ladder at {directory} was built with --aspect {record['aspect']}, not {aspect}; "
                "drop --aspect or start a new ladder directory."
            )
        recorded = config_lib.from_dict(record["base_config"])
        if config_path or overrides:
            _check_same_base(directory, recorded, base)
        base = recorded
    record["depths"] = sorted(set(record["depths"]) | set(depths or []))
    record["budgets"] = sorted(set(record["budgets"]) | {float(c) for c in budgets or []})

    data = _open_data(base)
    if 0 < base.model.vocab_size < data.vocab_size:
        raise UserError(
            f"model.vocab_size={base.model.vocab_size} is smaller than the tokenizer of {base.data.path} "
            f"({data.vocab_size}); set model.vocab_size=0 to take it from the data."
        )
    vocab_size = base.model.vocab_size or data.vocab_size
    base = dataclasses.replace(base, model=dataclasses.replace(base.model, vocab_size=vocab_size))
    tokens = len(data.tokens("train"))
    context = base.model.context_length
    ladder = Ladder(directory, base, record, max(0, (tokens - context) // context), tokens)
    _check_shape(ladder)
    return ladder


def _read_record(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(
            f"{path} cannot be read as a ladder record ({err}); restore it or start a new ladder."
        ) from None
    if not isinstance(record, dict) or record.get("format") != FORMAT or record.get("version") != VERSION:
        raise UserError(
            f"{path} is not a keel ladder record of version {VERSION}; point keel scale at a ladder directory."
        )
    return record


def _base_config(config_path: str | None, overrides: list[str]) -> RunConfig:
    base = config_lib.load(config_path, overrides)
    # The model keys the user named, even at their default values (load() has validated both sources).
    named = set(config_lib.parse_overrides(overrides).get("model") or {})
    if config_path is not None:
        named |= set((yaml.safe_load(Path(config_path).read_text()) or {}).get("model") or {})
    for key in KNOB_KEYS:
        if key in named:
            raise UserError(
                f"model.{key} is set by the ladder's knob (depth d: n_layer d, d_model aspect x d, n_head d); "
                f"drop model.{key} and use --depths and --aspect."
            )
    if base.task.kind != "pretrain" or base.init.from_ or base.lora.rank:
        raise UserError(
            "a ladder pretrains its models from scratch; drop task.kind, init.from and lora.* from its config."
        )
    if base.train.max_minutes or base.train.max_tokens:
        raise UserError(
            "a ladder sizes each run by its FLOP budget; drop train.max_minutes and train.max_tokens "
            "(train.max_steps is set per run)."
        )
    return base


def _check_same_base(directory: Path, recorded: RunConfig, given: RunConfig) -> None:
    ours, theirs = recorded.to_flat_dict(), given.to_flat_dict()
    for key in ours:
        if ours[key] != theirs.get(key) and key != "model.vocab_size":
            raise UserError(
                f"the ladder at {directory} was built with {key}={ours[key]!r}, not {theirs.get(key)!r}; its runs "
                "must share every setting but size and budget, so drop --config/--set or start a new ladder directory."
            )


def _open_data(base: RunConfig):
    from keel.data import open_data

    return open_data(Path(base.data.path))


def _check_shape(ladder: Ladder) -> None:
    """Enough sizes and budgets to fit, a first step for the smallest model, no repeated data."""
    depths, budgets = ladder.record["depths"], ladder.record["budgets"]
    if len(depths) < 3:
        raise UserError(
            f"a ladder needs at least three model sizes (approach 2 fits a parabola per budget), got --depths "
            f"{' '.join(map(str, depths)) or '(none)'}; pass e.g. --depths 1 2 3 4."
        )
    if len(budgets) < 2:
        raise UserError(
            f"a ladder needs at least two budgets (one budget ties D to N, so L(N, D) cannot be fitted), got "
            f"--budgets {' '.join(map(budget_label, budgets)) or '(none)'}; pass e.g. --budgets 1e12 3e12."
        )
    labels = [budget_label(c) for c in budgets]
    if len(set(labels)) < len(labels):
        raise UserError(
            f"--budgets {' '.join(labels)} has budgets equal to three significant digits; make them distinct."
        )
    smallest = ladder.rung(depths[0], budgets[0])
    if smallest.steps < 1:
        one_step = smallest.size.flops_per_token * ladder.tokens_per_step
        raise UserError(
            f"budget {budget_label(budgets[0])} FLOPs buys no training step of the smallest model (depth "
            f"{depths[0]} costs {one_step:.3g} FLOPs per step of {ladder.tokens_per_step:,} tokens); raise the "
            "smallest --budgets value above that."
        )
    rungs = ladder.rungs()
    for rung in rungs:
        ladder.config_for(rung)  # a shape the config rejects is refused now, not at its turn
    largest = max(rungs, key=ladder.needed_windows)
    ladder.check_data(largest, f"the ladder's largest run ({largest.name})")


# ---- running --------------------------------------------------------------------------------------------


Trainer = Callable[[RunConfig, Path], int]  # (config, run dir) -> exit code, as keel.train.launch.launch


def _launch(config: RunConfig, run_dir: Path) -> int:
    from keel.train.launch import launch

    return launch(config, run_dir)


def finished_val_loss(run_dir: Path, steps: int) -> float | None:
    """The val loss of the run's final checkpoint when the run reached `steps`, else None."""
    from keel.train import checkpoint as ckpt

    for path in reversed(ckpt.list_checkpoints(run_dir)) if run_dir.is_dir() else []:
        if ckpt.checkpoint_step(path) == steps:
            loss = ckpt.read_meta(path).get("val_loss")
            return float(loss) if loss is not None else None
    return None


def train_rung(ladder: Ladder, rung: Rung, name: str, train: Trainer, say: Callable[[str], None]) -> dict[str, Any]:
    """Train (or resume) one run and return its entry for the record; a finished run is not touched.

    The entry's seconds add up the wall time of every invocation that trained the run.
    """
    run_dir = ladder.run_dir(name)
    entry = {
        "depth": rung.depth,
        "budget": rung.budget,
        "steps": rung.steps,
        "tokens": rung.tokens,
        "flops": rung.flops,
        "n_layer": rung.size.n_layer,
        "d_model": rung.size.d_model,
        "non_embedding_params": rung.size.non_embedding_params,
        "params": rung.size.params,
        "flops_per_token": rung.size.flops_per_token,
        "status": "planned",
        "val_loss": None,
        "seconds": ladder.record["rungs"].get(name, {}).get("seconds", 0.0),
    }
    loss = finished_val_loss(run_dir, rung.steps)
    if loss is not None:
        return {**entry, "status": "finished", "val_loss": loss}
    config = ladder.config_for(rung, name)
    started = time.perf_counter()
    code = train(config, run_dir)
    seconds = time.perf_counter() - started
    entry["seconds"] += seconds
    loss = finished_val_loss(run_dir, rung.steps)
    if loss is not None:
        say(f"  val loss {loss:.4f} ({seconds:.0f} s)")
        return {**entry, "status": "finished", "val_loss": loss}
    if code in (0, 130, 143):  # stopped on request (Ctrl-C, SIGTERM) before its last step: stop the ladder too
        ladder.record["rungs"][name] = {**entry, "status": "stopped"}
        ladder.save()
        raise KeyboardInterrupt
    from keel.supervisor.watchdog import EXIT_STOPPED_BY_SUPERVISOR

    status = "stopped_by_supervisor" if code == EXIT_STOPPED_BY_SUPERVISOR else "failed"
    say(f"  {name} did not finish ({status}, exit code {code}); see `keel logbook {run_dir}`")
    return {**entry, "status": status}


def run_ladder(ladder: Ladder, train: Trainer = _launch, say: Callable[[str], None] = print) -> list[str]:
    """Train every rung not finished yet, resuming those with checkpoints; returns the names trained now.

    The record is saved before the first run and after each one, and a run counts as finished only
    when its directory holds its final checkpoint, so the same command resumes an interrupted ladder.
    """
    ladder.save()
    trained = []
    rungs = ladder.rungs()
    for i, rung in enumerate(rungs, 1):
        if finished_val_loss(ladder.run_dir(rung.name), rung.steps) is None:
            say(
                f"[{i}/{len(rungs)}] {ladder.run_name(rung.name)}: depth {rung.depth} "
                f"({human(rung.size.non_embedding_params)} non-embedding params), {rung.steps:,} steps, "
                f"{human(rung.tokens)} tokens, {rung.flops:.3g} FLOPs"
            )
            trained.append(rung.name)
        ladder.record["rungs"][rung.name] = train_rung(ladder, rung, rung.name, train, say)
        ladder.save()
    return trained


# ---- fitting: approach 3 ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossLaw:
    """L(N, D) = E + A / N^alpha + B / D^beta."""

    E: float
    A: float
    alpha: float
    B: float
    beta: float

    def loss(self, n: Any, d: Any) -> Any:
        return self.E + self.A * np.power(n, -self.alpha) + self.B * np.power(d, -self.beta)


def _project(alpha: float, beta: float, log_n: np.ndarray, log_d: np.ndarray, loss: np.ndarray):
    """(E, A, B) >= 0 minimising the squared relative residuals for fixed exponents, and that sum."""
    from scipy.optimize import nnls

    columns = np.stack([np.ones_like(loss), np.exp(-alpha * log_n), np.exp(-beta * log_d)], axis=1) / loss[:, None]
    scale = np.linalg.norm(columns, axis=0)  # the columns differ by orders of magnitude: equilibrate them
    coef, residual_norm = nnls(columns / scale, np.ones_like(loss))
    return coef / scale, residual_norm**2


def fit_loss_law(n: Any, d: Any, loss: Any) -> LossLaw:
    """Approach 3 by variable projection (see the module docstring): a 12 x 12 grid of exponents,
    then L-BFGS-B from the two best grid points."""
    from scipy.optimize import minimize

    n, d, loss = (np.asarray(x, dtype=np.float64) for x in (n, d, loss))
    log_n, log_d = np.log(n), np.log(d)

    def objective(exponents: np.ndarray) -> float:
        return _project(exponents[0], exponents[1], log_n, log_d, loss)[1]

    grid = np.geomspace(*EXPONENT_BOUNDS, 12)
    starts = sorted((objective(np.array([a, b])), a, b) for a in grid for b in grid)[:2]
    best = min(
        (minimize(objective, np.array([a, b]), method="L-BFGS-B", bounds=[EXPONENT_BOUNDS] * 2) for _, a, b in starts),
        key=lambda result: result.fun,
    )
    alpha, beta = (float(x) for x in best.x)
    (E, A, B), _ = _project(alpha, beta, log_n, log_d, loss)
    return LossLaw(float(E), float(A), alpha, float(B), beta)


def optimal_allocation(law: LossLaw, budget: float, n_table: Any, flops_table: Any) -> tuple[float, float, float]:
    """(N, D, loss) minimising law.loss(N, D) under D * F(N) = budget; F, the FLOPs per token, is
    interpolated log-log between the family's sizes (n_table, flops_table, N increasing)."""
    log_n_table, log_f_table = np.log(np.asarray(n_table, float)), np.log(np.asarray(flops_table, float))
    log_n = np.linspace(log_n_table[0], log_n_table[-1], 4000)
    n = np.exp(log_n)
    d = budget / np.exp(np.interp(log_n, log_n_table, log_f_table))
    losses = law.loss(n, d)
    best = int(np.argmin(losses))
    return float(n[best]), float(d[best]), float(losses[best])


# ---- fitting: approach 2 ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class IsoFlopOptimum:
    """The vertex of one budget's parabola of loss in log N."""

    budget: float
    n: float  # NaN when the parabola opens downwards (no minimum)
    loss: float
    inside: bool  # the vertex lies within the sizes trained at this budget (otherwise it is extrapolated)


def isoflop_optima(budget: Any, n: Any, loss: Any) -> list[IsoFlopOptimum]:
    """One parabola per budget with at least three distinct sizes."""
    budget, n, loss = (np.asarray(x, dtype=np.float64) for x in (budget, n, loss))
    optima = []
    for c in np.unique(budget):
        at = budget == c
        x, y = np.log(n[at]), loss[at]
        if len(np.unique(x)) < 3:
            continue
        a2, a1, a0 = np.polyfit(x, y, 2)
        if a2 <= 0:
            optima.append(IsoFlopOptimum(float(c), math.nan, math.nan, False))
            continue
        vertex = -a1 / (2 * a2)
        optima.append(
            IsoFlopOptimum(
                float(c), float(np.exp(vertex)), float(a0 - a1**2 / (4 * a2)), bool(x.min() <= vertex <= x.max())
            )
        )
    return optima


def fit_power_law(optima: list[IsoFlopOptimum]) -> tuple[float, float] | None:
    """(a, k) of N_opt = k * C^a through the budgets whose parabola has a minimum; None with fewer than two."""
    good = [o for o in optima if math.isfinite(o.n)]
    if len(good) < 2:
        return None
    a, log_k = np.polyfit(np.log([o.budget for o in good]), np.log([o.n for o in good]), 1)
    return float(a), float(np.exp(log_k))


def power_law_at(power: tuple[float, float], budget: float) -> float:
    """k * C^a, inf rather than an overflow when a wild fit (a tiny ladder's) extrapolates it."""
    a, k = power
    with np.errstate(over="ignore"):
        return float(np.exp(np.log(k) + a * np.log(budget))) if k > 0 else 0.0


# ---- fitting: both, with bootstrap intervals -----------------------------------------------------------


@dataclass
class Fit:
    """Both approaches for one way of counting N, with the bootstrap refits behind the intervals."""

    kind: str
    law: LossLaw
    residuals: np.ndarray  # relative: law / measured - 1, per run
    optima: list[IsoFlopOptimum]
    power_law: tuple[float, float] | None
    boot_laws: list[LossLaw]
    boot_power_laws: list[tuple[float, float]]
    boot_optima: list[list[IsoFlopOptimum]]


def bootstrap_samples(groups: Any, num_resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Index arrays that resample runs with replacement within each group (budget)."""
    groups = np.asarray(groups)
    members = [np.flatnonzero(groups == g) for g in np.unique(groups)]
    rng = np.random.default_rng(seed)
    for _ in range(num_resamples):
        yield np.concatenate([rng.choice(idx, size=len(idx), replace=True) for idx in members])


def fit_runs(budget: Any, n: Any, d: Any, loss: Any, kind: str, num_resamples: int = 200, seed: int = 0) -> Fit:
    """Approach 3 and approach 2 on runs (budget, N, D, val loss), each refitted on bootstrap resamples."""
    budget, n, d, loss = (np.asarray(x, dtype=np.float64) for x in (budget, n, d, loss))
    law = fit_loss_law(n, d, loss)
    optima = isoflop_optima(budget, n, loss)
    fit = Fit(kind, law, law.loss(n, d) / loss - 1, optima, fit_power_law(optima), [], [], [])
    for idx in bootstrap_samples(budget, num_resamples, seed):
        if len(np.unique(n[idx])) >= 2 and len(np.unique(d[idx])) >= 2:  # else A or B would be unidentified
            fit.boot_laws.append(fit_loss_law(n[idx], d[idx], loss[idx]))
        boot_optima = isoflop_optima(budget[idx], n[idx], loss[idx])
        fit.boot_optima.append(boot_optima)
        if (power := fit_power_law(boot_optima)) is not None:
            fit.boot_power_laws.append(power)
    return fit


def interval(values: Any) -> list[float] | None:
    values = np.asarray([v for v in values if math.isfinite(v)], dtype=np.float64)
    if len(values) < 2:
        return None
    return [float(v) for v in np.percentile(values, INTERVAL_PERCENTILES)]


def predict_loss(fit: Fit, n: float, d: float, seed: int = 0) -> tuple[float, list[float] | None]:
    """The fitted loss at (N, D) and its 90% interval: each bootstrap law's loss there times
    (1 + a relative residual of the fit drawn at random), so run-to-run scatter is in the interval."""
    rng = np.random.default_rng(seed)
    draws = [law.loss(n, d) * (1 + rng.choice(fit.residuals)) for law in fit.boot_laws]
    return float(fit.law.loss(n, d)), interval(draws)


# ---- the ladder's fits -------------------------------------------------------------------------------------


def finished_runs(ladder: Ladder) -> list[dict[str, Any]]:
    return [r for r in ladder.record["rungs"].values() if r["status"] == "finished" and r["val_loss"] is not None]


def size_table(ladder: Ladder, up_to_depth: int) -> list[Size]:
    return [ladder.size(depth) for depth in range(1, up_to_depth + 1)]


def fit_ladder(ladder: Ladder, num_resamples: int = 200, seed: int = 0) -> dict[str, Fit]:
    """Both approaches for both counts of N over the finished runs; their summary goes into the record."""
    runs = finished_runs(ladder)
    budgets = {r["budget"] for r in runs}
    if len(runs) < 5 or len(budgets) < 2 or len({r["depth"] for r in runs}) < 2:
        raise UserError(
            f"the ladder at {ladder.directory} has {len(runs)} finished runs over {len(budgets)} budgets, too few "
            "to fit L(N, D) (five parameters: at least five runs, two budgets, two sizes); run `keel scale` on it "
            "until they finish."
        )
    table = size_table(ladder, 4 * max(ladder.record["depths"]))
    fits = {}
    for kind in N_KINDS:
        key = "non_embedding_params" if kind == "non_embedding" else "params"
        fit = fit_runs(
            [r["budget"] for r in runs],
            [r[key] for r in runs],
            [r["tokens"] for r in runs],
            [r["val_loss"] for r in runs],
            kind,
            num_resamples,
            seed,
        )
        fits[kind] = fit
        ladder.record["fits"][kind] = summarise(fit, sorted(budgets), table)
    return fits


def summarise(fit: Fit, budgets: list[float], table: list[Size]) -> dict[str, Any]:
    """The fit as the record keeps it: parameters, intervals, compute-optimal N and D per budget."""
    law = dataclasses.asdict(fit.law)
    n_table = [s.n(fit.kind) for s in table]
    flops_table = [s.flops_per_token for s in table]

    def flops_at(n: float) -> float:
        return float(np.exp(np.interp(np.log(n), np.log(n_table), np.log(flops_table))))

    optimal = []
    for c in budgets:
        n, d, loss = optimal_allocation(fit.law, c, n_table, flops_table)
        boot = [optimal_allocation(b, c, n_table, flops_table) for b in fit.boot_laws]
        optimal.append(
            {
                "budget": c,
                "n": n,
                "d": d,
                "loss": loss,
                "n_interval": interval([b[0] for b in boot]),
                "d_interval": interval([b[1] for b in boot]),
                "at_edge": n <= n_table[0] * 1.001 or n >= n_table[-1] * 0.999,
            }
        )
    isoflop = []
    for o in fit.optima:
        boot_n = [b.n for resample in fit.boot_optima for b in resample if b.budget == o.budget]
        isoflop.append(
            {
                "budget": o.budget,
                "n": o.n,
                "d": o.budget / flops_at(o.n) if math.isfinite(o.n) else math.nan,
                "loss": o.loss,
                "inside": o.inside,
                "n_interval": interval(boot_n),
            }
        )
    power = fit.power_law
    return {
        "law": law,
        "intervals": {
            name: interval([getattr(b, name) for b in fit.boot_laws]) for name in ("E", "A", "alpha", "B", "beta")
        },
        "rms_residual": float(np.sqrt(np.mean(fit.residuals**2))),
        "bootstrap_resamples": len(fit.boot_laws),
        "optimal": optimal,
        "isoflop": {
            "optima": isoflop,
            "exponent": power[0] if power else None,
            "coefficient": power[1] if power else None,
            "exponent_interval": interval([p[0] for p in fit.boot_power_laws]),
        },
    }


# ---- predicting, then checking --------------------------------------------------------------------------------


def make_prediction(ladder: Ladder, fits: dict[str, Fit], budget: float) -> tuple[dict[str, Any], Rung]:
    """The compute-optimal run at `budget` by the non-embedding fit, among whole depths, and the loss
    both fits predict for it; made from the fits alone, before anything trains."""
    largest = max(ladder.record["budgets"])
    primary = fits["non_embedding"]
    depth_limit = 4 * max(ladder.record["depths"])
    table = size_table(ladder, depth_limit)
    candidates = [ladder.rung(s.depth, budget) for s in table]
    candidates = [r for r in candidates if r.steps >= 1]
    best = min(candidates, key=lambda r: primary.law.loss(r.size.non_embedding_params, r.tokens))
    if best.depth == depth_limit:
        raise UserError(
            f"the fit puts the compute-optimal model at {budget_label(budget)} FLOPs beyond depth {depth_limit}, four "
            "times the ladder's largest; extend the ladder with larger --depths before predicting that far."
        )
    ladder.check_data(best, f"the prediction run at {budget_label(budget)} FLOPs (depth {best.depth})")
    predicted = {}
    for kind, fit in fits.items():
        loss, bounds = predict_loss(fit, best.size.n(kind), best.tokens)
        predicted[kind] = {"loss": loss, "interval": bounds}
    optimal = {}
    for kind, fit in fits.items():
        n_table = [s.n(kind) for s in table]
        n, d, _ = optimal_allocation(fit.law, budget, n_table, [s.flops_per_token for s in table])
        power = fit.power_law
        optimal[kind] = {
            "approach3": {
                "n": n,
                "d": d,
                "n_interval": interval(
                    [
                        optimal_allocation(b, budget, n_table, [s.flops_per_token for s in table])[0]
                        for b in fit.boot_laws
                    ]
                ),
            },
            "approach2": {
                "n": power_law_at(power, budget) if power else None,
                "n_interval": interval([power_law_at(p, budget) for p in fit.boot_power_laws]),
            },
        }
    prediction = {
        "budget": budget,
        "ratio": budget / largest,
        "depth": best.depth,
        "run": f"predict-{best.name}",
        "steps": best.steps,
        "tokens": best.tokens,
        "flops": best.flops,
        "n_layer": best.size.n_layer,
        "d_model": best.size.d_model,
        "non_embedding_params": best.size.non_embedding_params,
        "params": best.size.params,
        "made_at": time.time(),
        "finished_runs": len(finished_runs(ladder)),
        "predicted": predicted,
        "optimal": optimal,
        "measured": None,
        "relative_error": None,
        "seconds": 0.0,
    }
    return prediction, best


def check_prediction_budget(ladder: Ladder, budget: float) -> None:
    largest = max(ladder.record["budgets"])
    if not (math.isfinite(budget) and budget >= PREDICT_MIN_RATIO * largest):
        given = budget_label(budget) if math.isfinite(budget) and budget > 0 else budget
        raise UserError(
            f"--predict {given} is not an extrapolation of the ladder at {ladder.directory}: it must be at least "
            f"{PREDICT_MIN_RATIO:g}x its largest budget ({budget_label(largest)}), i.e. >= "
            f"{budget_label(PREDICT_MIN_RATIO * largest)} FLOPs."
        )


def predict_and_check(
    ladder: Ladder, fits: dict[str, Fit], budget: float, train: Trainer = _launch, say: Callable[[str], None] = print
) -> dict[str, Any]:
    """Predict the val loss of the compute-optimal run at `budget`, record it, then train that run and
    record what it measured. A prediction already recorded for this budget stands: it is never remade
    once its run may have started (a resume only finishes the run)."""
    previous = [p for p in ladder.record["predictions"] if p["budget"] == budget]
    if previous:
        prediction = previous[0]
        rung = ladder.rung(prediction["depth"], budget)
        say(f"the prediction for {budget_label(budget)} FLOPs was recorded before; its run is checked now")
    else:
        prediction, rung = make_prediction(ladder, fits, budget)
        ladder.record["predictions"].append(prediction)
        ladder.save()  # the prediction is on record before its run starts
    say(format_prediction(prediction))
    if prediction["measured"] is None:
        say(f"training {ladder.run_name(prediction['run'])} to check it ...")
        entry = train_rung(ladder, rung, prediction["run"], train, say)
        prediction["seconds"] = prediction.get("seconds", 0.0) + entry["seconds"]
        if entry["status"] == "finished":
            prediction["measured"] = entry["val_loss"]
            prediction["relative_error"] = {
                kind: p["loss"] / entry["val_loss"] - 1 for kind, p in prediction["predicted"].items()
            }
        ladder.save()
    if prediction["measured"] is not None:
        say(format_check(prediction))
    return prediction


# ---- the command ----------------------------------------------------------------------------------------------------


def scale(
    directory: Path,
    depths: list[int] | None = None,
    budgets: list[float] | None = None,
    aspect: int | None = None,
    config_path: str | None = None,
    overrides: list[str] | None = None,
    predict: float | None = None,
    num_resamples: int = 200,
    train: Trainer = _launch,
    say: Callable[[str], None] = print,
) -> int:
    """`keel scale`: train (or resume) the ladder, fit it, and with `predict` predict and check a larger
    run; returns the exit code (0 when every run finished, 1 otherwise)."""
    if predict is not None and not (depths or budgets) and not (Path(directory) / LADDER_FILE).exists():
        raise UserError(
            f"there is no ladder at {directory} (no {LADDER_FILE}) to predict from; build it first with "
            f"`keel scale {directory} --depths 1 2 3 --budgets 1e12 3e12 --set data.path=DATA_DIR`."
        )
    if num_resamples < 0:
        raise UserError(f"--bootstrap must be >= 0, got {num_resamples}.")
    ladder = open_ladder(Path(directory), depths, budgets, aspect, config_path, overrides)
    if predict is not None:
        check_prediction_budget(ladder, predict)
    say(describe(ladder))
    trained = run_ladder(ladder, train, say)
    say(f"trained {len(trained)} runs now, {len(ladder.rungs()) - len(trained)} were finished before")
    fits = fit_ladder(ladder, num_resamples)
    ladder.save()
    say(format_ladder(ladder))
    say(format_fits(ladder))
    plot = write_plot(ladder, fits)
    say(f"wrote {plot}")
    ok = all(r["status"] == "finished" for r in ladder.record["rungs"].values())
    if predict is not None:
        prediction = predict_and_check(ladder, fits, predict, train, say)
        write_plot(ladder, fits)
        ok = ok and prediction["measured"] is not None
    return 0 if ok else 1


# ---- output ----------------------------------------------------------------------------------------------------------


def describe(ladder: Ladder) -> str:
    r = ladder.record
    return (
        f"ladder {ladder.name} in {ladder.directory}: depths {' '.join(map(str, r['depths']))} (depth d: n_layer d, "
        f"d_model {ladder.aspect}d, n_head d) x budgets {' '.join(map(budget_label, r['budgets']))} FLOPs, "
        f"{len(ladder.rungs())} runs on {ladder.base.data.path} ({human(ladder.train_tokens)} training tokens)"
    )


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]], left: int = 1) -> str:
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    return "\n".join(
        "  " + "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
        for row in (header, *rows)
    )


def format_ladder(ladder: Ladder) -> str:
    runs = sorted(ladder.record["rungs"].items(), key=lambda item: (item[1]["budget"], item[1]["depth"]))
    rows = [
        (
            name,
            budget_label(r["budget"]),
            f"{r['n_layer']}x{r['d_model']}",
            human(r["non_embedding_params"]),
            human(r["params"]),
            human(r["flops_per_token"]),
            f"{r['steps']:,}",
            human(r["tokens"]),
            "-" if r["val_loss"] is None else f"{r['val_loss']:.4f}",
            f"{r['seconds']:.0f}",
            r["status"],
        )
        for name, r in runs
    ]
    header = (
        "run",
        "budget",
        "shape",
        "N non-emb",
        "N all",
        "FLOPs/tok",
        "steps",
        "D tokens",
        "val loss",
        "s",
        "status",
    )
    flops = sum(r["flops"] for _, r in runs)
    seconds = sum(r["seconds"] for _, r in runs)
    return f"{_table(header, rows)}\n  cost: {flops:.3g} training FLOPs, {seconds / 60:.1f} min of wall time"


def _with_interval(value: float, bounds: list[float] | None, fmt: Callable[[float], str]) -> str:
    return fmt(value) + (f" [{fmt(bounds[0])}, {fmt(bounds[1])}]" if bounds else "")


def format_fits(ladder: Ladder) -> str:
    lines = [CONVENTIONS]
    for kind in N_KINDS:
        f = ladder.record["fits"][kind]
        law, bounds = f["law"], f["intervals"]
        params = "  ".join(
            f"{name} {_with_interval(law[name], bounds[name], lambda v: f'{v:.4g}')}"
            for name in ("E", "A", "alpha", "B", "beta")
        )
        lines += [
            "",
            f"approach 3, L(N, D) = E + A/N^alpha + B/D^beta, N = {N_KIND_NAMES[kind]} (variable projection; "
            f"90% intervals from {f['bootstrap_resamples']} bootstrap refits):",
            f"  {params}",
            f"  rms relative residual {100 * f['rms_residual']:.2f}%",
        ]
        rows = [
            (
                budget_label(o["budget"]),
                _with_interval(o["n"], o["n_interval"], human),
                _with_interval(o["d"], o["d_interval"], human),
                f"{o['d'] / o['n']:.3g}",
                f"{o['loss']:.4f}" + ("  (at the edge of the sizes searched)" if o["at_edge"] else ""),
            )
            for o in f["optimal"]
        ]
        lines.append(_table(("budget", "N_opt [90%]", "D_opt [90%]", "D/N", "loss"), rows))
        iso = f["isoflop"]
        if iso["exponent"] is None:
            exponent = "fewer than two budgets have a minimum: no power law"
        else:
            a = _with_interval(iso["exponent"], iso["exponent_interval"], lambda v: f"{v:.3f}")
            exponent = f"N_opt = {iso['coefficient']:.3g} x C^a, a = {a}"
        lines.append(f"approach 2, a parabola in log N per budget, N = {N_KIND_NAMES[kind]}: {exponent}")
        rows = [
            (
                budget_label(o["budget"]),
                "no minimum" if not math.isfinite(o["n"]) else _with_interval(o["n"], o["n_interval"], human),
                "-" if not math.isfinite(o["d"]) else human(o["d"]),
                "-" if not math.isfinite(o["loss"]) else f"{o['loss']:.4f}",
                "" if not math.isfinite(o["n"]) else ("within the sizes" if o["inside"] else "extrapolated"),
            )
            for o in iso["optima"]
        ]
        lines.append(_table(("budget", "N_opt [90%]", "D_opt", "loss", "vertex"), rows))
    return "\n".join(lines)


def format_prediction(p: dict[str, Any]) -> str:
    lines = [
        f"prediction for {budget_label(p['budget'])} FLOPs ({p['ratio']:.3g}x the ladder's largest budget), "
        f"made from {p['finished_runs']} runs before training:"
    ]
    for kind, o in p["optimal"].items():
        a3, a2 = o["approach3"], o["approach2"]
        by2 = "-" if a2["n"] is None else _with_interval(a2["n"], a2["n_interval"], human)
        lines.append(
            f"  compute-optimal N ({N_KIND_NAMES[kind]}): approach 3 {_with_interval(a3['n'], a3['n_interval'], human)}"
            f" (D {human(a3['d'])}), approach 2 {by2}"
        )
    lines.append(
        f"  run: depth {p['depth']} ({p['n_layer']} layers x {p['d_model']}), {human(p['non_embedding_params'])} "
        f"non-embedding / {human(p['params'])} params, {p['steps']:,} steps, {human(p['tokens'])} tokens"
    )
    for kind, q in p["predicted"].items():
        lines.append(
            f"  predicted val loss {_with_interval(q['loss'], q['interval'], lambda v: f'{v:.4f}')} "
            f"(N = {N_KIND_NAMES[kind]})"
        )
    return "\n".join(lines)


def format_check(p: dict[str, Any]) -> str:
    parts = []
    for kind, q in p["predicted"].items():
        inside = q["interval"] is not None and q["interval"][0] <= p["measured"] <= q["interval"][1]
        parts.append(
            f"{100 * p['relative_error'][kind]:+.2f}% (N = {N_KIND_NAMES[kind]}, "
            f"{'inside' if inside else 'outside'} its interval)"
        )
    return f"measured val loss {p['measured']:.4f} after {p['seconds']:.0f} s; prediction error " + ", ".join(parts)


def write_plot(ladder: Ladder, fits: dict[str, Fit]) -> Path:
    """LADDER_DIR/ladder.png: loss against N per budget with the fitted curves and the compute-optimal frontier
    (left), compute-optimal N against C by both approaches, with any prediction (right)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    kind = "non_embedding"
    fit, summary = fits[kind], ladder.record["fits"][kind]
    key = "non_embedding_params"
    runs = finished_runs(ladder)
    table = size_table(ladder, 4 * max(ladder.record["depths"]))
    n_table = np.array([s.n(kind) for s in table], dtype=np.float64)
    f_table = np.array([s.flops_per_token for s in table], dtype=np.float64)
    budgets = sorted({r["budget"] for r in runs})
    colours = plt.cm.viridis(np.linspace(0, 0.9, len(budgets)))
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    for c, colour in zip(budgets, colours):
        at = [r for r in runs if r["budget"] == c]
        n = np.array([r[key] for r in at], dtype=np.float64)
        left.scatter(n, [r["val_loss"] for r in at], color=colour, zorder=3, label=f"C = {budget_label(c)}")
        grid = np.geomspace(max(n.min() / 2, n_table[0]), n.max() * 2, 200)  # the family has no depth below 1
        d = c / np.exp(np.interp(np.log(grid), np.log(n_table), np.log(f_table)))
        left.plot(grid, fit.law.loss(grid, d), color=colour, lw=1)
    frontier = summary["optimal"]
    left.plot(
        [o["n"] for o in frontier], [o["loss"] for o in frontier], "k*--", ms=10, label="compute-optimal (approach 3)"
    )
    for p in ladder.record["predictions"]:
        q = p["predicted"][kind]
        left.errorbar(
            p[key],
            q["loss"],
            yerr=None if q["interval"] is None else [[q["loss"] - q["interval"][0]], [q["interval"][1] - q["loss"]]],
            fmt="rD",
            label=f"predicted at {budget_label(p['budget'])}",
        )
        if p["measured"] is not None:
            left.plot(p[key], p["measured"], "kx", ms=10, mew=2, label="measured")
    left.set(xscale="log", xlabel=f"N ({N_KIND_NAMES[kind]})", ylabel="val loss", title=f"ladder {ladder.name}")
    left.legend(fontsize=8)

    all_budgets = sorted(budgets + [p["budget"] for p in ladder.record["predictions"]])
    c_grid = np.geomspace(all_budgets[0] / 2, all_budgets[-1] * 2, 50)
    right.plot(c_grid, [optimal_allocation(fit.law, c, n_table, f_table)[0] for c in c_grid], "k-", label="approach 3")
    iso = [o for o in summary["isoflop"]["optima"] if math.isfinite(o["n"])]
    right.scatter([o["budget"] for o in iso], [o["n"] for o in iso], color="C1", zorder=3, label="approach 2 vertices")
    if fit.power_law is not None:
        a, k = fit.power_law
        right.plot(c_grid, [power_law_at((a, k), c) for c in c_grid], "C1--", label=f"approach 2: N_opt ~ C^{a:.2f}")
    for p in ladder.record["predictions"]:
        right.scatter(
            [p["budget"]], [p[key]], color="red", marker="D", zorder=4, label=f"prediction run (depth {p['depth']})"
        )
    right.set_ylim(n_table[0] / 3, n_table[-1] * 3)  # the family's sizes: a wild power law stays off the scale
    right.set(
        xscale="log", yscale="log", xlabel="C (training FLOPs)", ylabel=f"compute-optimal N ({N_KIND_NAMES[kind]})"
    )
    right.legend(fontsize=8)
    fig.text(0.01, 0.01, CONVENTIONS, fontsize=7)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    path = ladder.directory / PLOT_FILE
    tmp = ladder.directory / f".{PLOT_FILE}.tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path
