"""Monitors: turn the per-step record stream into signals.

Each monitor is a small object with its own state, fed plain Python floats once per step; the loop
reads a step's record after it has queued the next step, so reading it stalls no device. Every update is O(1) amortised:
windows are fixed-size, means are running sums, the throughput median keeps a sorted copy of its
fixed window. The thresholds are arguments; their defaults, and where they come from, live in
`SupervisorConfig` (policy.py).

A signal says what kind of trouble it is, because that decides the repair:
- "update": this step's update is bad (non-finite, spike); skipping it is the first repair;
- "state": the weights or the optimizer drifted somewhere bad (divergence, norm growth, loss-scale
  collapse); skipping one update cannot help, the policy repairs the state;
- "warning": worth a line in the logbook, but no repair inside the run can fix it (slow steps).
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any


@dataclass
class StepRecord:
    """What the loop reports once per optimizer step, before applying the update."""

    step: int  # the optimizer step being attempted (0-based count of steps already applied)
    loss: float  # mean training loss of this step (may be nan/inf)
    grad_norm: float  # global grad norm before clipping (may be nan/inf)
    lr: float
    tokens: int  # cumulative training tokens including this step
    step_seconds: float  # wall time of this step
    act_norm: float  # RMS of the last block's output (input of the final norm)
    logit_norm: float  # RMS of the output logits
    loss_scale: float | None = None  # fp16 GradScaler scale, None when not using fp16
    metrics: dict[str, float] = field(default_factory=dict)  # the task's own, e.g. DPO's margin, by name


@dataclass
class Signal:
    """One detected problem, ready for the logbook and the policy."""

    # nonfinite | loss_spike | grad_spike | divergence | act_growth | logit_growth | loss_scale_collapse | slow_steps
    name: str
    trouble: str  # update | state | warning (see the module docstring)
    step: int
    message: str  # one human line with the numbers, e.g. "loss spike: 5.91 vs mean 3.10 ± 0.05 (56σ)"
    evidence: dict[str, float] = field(default_factory=dict)
    began_step: int = -1  # where the trouble began, for choosing the checkpoint to roll back to


# ---------------------------------------------------------------------------------------------
# running statistics


class Ewm:
    """Exponentially weighted mean with the start-up bias corrected (the first value is the mean)."""

    def __init__(self, span: int):
        self.span = span
        self.alpha = 2.0 / (span + 1)  # pandas' span convention: the centre of mass is (span-1)/2 steps back
        self.total = 0.0
        self.weight = 0.0
        self.count = 0

    def add(self, value: float) -> None:
        self.total = (1 - self.alpha) * self.total + self.alpha * value
        self.weight = (1 - self.alpha) * self.weight + self.alpha
        self.count += 1

    @property
    def mean(self) -> float:
        return self.total / self.weight if self.weight else math.nan

    def state_dict(self) -> dict:
        return {"total": self.total, "weight": self.weight, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.total, self.weight, self.count = state["total"], state["weight"], state["count"]


class Window:
    """The last `size` values with their mean and standard deviation kept up to date in O(1)."""

    def __init__(self, size: int):
        self.values: deque[float] = deque(maxlen=size)
        self.total = 0.0
        self.total_sq = 0.0
        self.adds_since_exact = 0

    def add(self, value: float) -> None:
        if len(self.values) == self.values.maxlen:
            old = self.values[0]
            self.total -= old
            self.total_sq -= old * old
        self.values.append(value)
        self.total += value
        self.total_sq += value * value
        self.adds_since_exact += 1
        # Running sums drift by rounding; recomputing once per window keeps them exact at O(1) amortised.
        if self.adds_since_exact >= len(self.values):
            self.total = math.fsum(self.values)
            self.total_sq = math.fsum(v * v for v in self.values)
            self.adds_since_exact = 0

    def __len__(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return self.total / len(self.values)

    @property
    def std(self) -> float:
        n = len(self.values)
        if n < 2:
            return 0.0
        variance = (self.total_sq - self.total * self.total / n) / (n - 1)  # unbiased, like torch.std
        return math.sqrt(max(variance, 0.0))

    def state_dict(self) -> dict:
        return {"values": list(self.values)}

    def load_state_dict(self, state: dict) -> None:
        self.values.clear()
        self.total = self.total_sq = 0.0
        self.adds_since_exact = 0
        for value in state["values"]:
            self.add(value)


class RollingMedian:
    """Median of the last `size` values; a sorted copy of the window makes each add O(size), not O(history)."""

    def __init__(self, size: int):
        self.values: deque[float] = deque(maxlen=size)
        self.ordered: list[float] = []

    def add(self, value: float) -> None:
        if len(self.values) == self.values.maxlen:
            del self.ordered[bisect.bisect_left(self.ordered, self.values[0])]
        self.values.append(value)
        bisect.insort(self.ordered, value)

    def __len__(self) -> int:
        return len(self.values)

    @property
    def median(self) -> float:
        n = len(self.ordered)
        return (self.ordered[(n - 1) // 2] + self.ordered[n // 2]) / 2

    def state_dict(self) -> dict:
        return {"values": list(self.values)}

    def load_state_dict(self, state: dict) -> None:
        self.values.clear()
        self.ordered.clear()
        for value in state["values"]:
            self.add(value)


class Monitor:
    """State (named in `state_fields`) saved to and loaded from plain Python types for checkpoints."""

    state_fields: tuple[str, ...] = ()

    def state_dict(self) -> dict[str, Any]:
        return {name: _save(getattr(self, name)) for name in self.state_fields}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in self.state_fields:
            if name not in state:  # saved by an older keel, before this field existed: it starts fresh
                continue
            current = getattr(self, name)
            if hasattr(current, "load_state_dict"):
                current.load_state_dict(state[name])
            else:
                setattr(self, name, state[name])


def _save(value: Any) -> Any:
    return value.state_dict() if hasattr(value, "state_dict") else value


# ---------------------------------------------------------------------------------------------
# the monitors


def nonfinite_signal(record: StepRecord) -> Signal | None:
    """A non-finite loss or gradient: the update must never reach the weights.

    With fp16 a non-finite gradient next to a finite loss is the GradScaler's normal overflow (it
    lowers its scale and skips the step itself); that is the loss-scale monitor's business, not a signal.
    """
    loss_ok, grad_ok = math.isfinite(record.loss), math.isfinite(record.grad_norm)
    if loss_ok and grad_ok:
        return None
    if loss_ok and record.loss_scale is not None:
        return None
    what = " and ".join(n for n, ok in (("loss", loss_ok), ("gradient norm", grad_ok)) if not ok)
    return Signal(
        "nonfinite",
        "update",
        record.step,
        f"non-finite {what}: loss {record.loss:.4g}, grad norm {record.grad_norm:.4g}",
        {"loss": record.loss, "grad_norm": record.grad_norm},
        began_step=record.step,
    )


class SpikeMonitor(Monitor):
    """A value far above its recent level: mean + sigma·std over a window, or ratio × its EWM.

    The two tests cover each other's blind spots: the σ test adapts to how noisy the value is but
    needs a warm window; the ratio test works after a few steps and is immune to a window whose σ
    was inflated by a fast-falling early curve. Values flagged as spikes never enter the statistics.
    """

    state_fields = ("window", "ewm")

    def __init__(
        self,
        name: str,
        label: str,
        window: int,
        sigma: float,
        warmup: int,
        ratio: float,
        ewm_span: int,
        ewm_warmup: int,
    ):
        self.name, self.label = name, label
        self.sigma, self.warmup, self.ratio, self.ewm_warmup = sigma, warmup, ratio, ewm_warmup
        self.window = Window(window)
        self.ewm = Ewm(ewm_span)

    def check(self, value: float, step: int) -> Signal | None:
        mean, std, ratio_limit = self.limits()
        evidence: dict[str, float] = {"value": value}
        by_sigma = std > 0 and (value - mean) / std > self.sigma
        if std > 0:
            evidence.update(mean=mean, std=std, sigmas=(value - mean) / std)
        by_ratio = value > ratio_limit
        if math.isfinite(ratio_limit):
            evidence.update(ewm=self.ewm.mean, ratio=value / self.ewm.mean)
        if not (by_sigma or by_ratio):
            return None
        if by_sigma:
            detail = f"{value:.4g} vs mean {evidence['mean']:.4g} ± {evidence['std']:.2g} ({evidence['sigmas']:.1f}σ)"
        else:
            detail = f"{value:.4g} = {evidence['ratio']:.1f}× its moving average {evidence['ewm']:.4g}"
        return Signal(self.name, "update", step, f"{self.label} spike: {detail}", evidence, began_step=step)

    def add(self, value: float) -> None:
        self.window.add(value)
        self.ewm.add(value)

    def limits(self) -> tuple[float, float, float]:
        """(mean, std, ratio_limit): `check` flags a value v exactly when std > 0 and (v - mean) / std > sigma,
        or v > ratio_limit. std is 0 while the window is cold, ratio_limit inf while the EWM is."""
        mean = std = 0.0
        if len(self.window) >= self.warmup:
            mean, std = self.window.mean, self.window.std
        warm_ewm = self.ewm.count >= self.ewm_warmup and self.ewm.mean > 0
        return mean, std, self.ratio * self.ewm.mean if warm_ewm else math.inf

    @property
    def level(self) -> float:
        """The recent typical value (nan before any)."""
        return self.ewm.mean


class DivergenceMonitor(Monitor):
    """Loss trending well above its best: the EWM stays above best·(1 + margin) for `patience` steps.

    Catches the slow climb no single step makes look like a spike. The best is the lowest EWM since
    the monitor (re)started, taken once the EWM has settled (after `span` values). The climb is
    taken to have begun at the last step the EWM was within half the margin of its best: on a flat
    noisy curve the best itself can be hundreds of steps older than the trouble.

    A signal the policy `dismiss`es (the held-out loss did not rise) fires again only once the EWM
    climbs another `margin` above where it was dismissed, with the climb still dated from its start.
    """

    state_fields = ("ewm", "best", "best_step", "calm_step", "steps_above", "fired", "dismissed_at")

    def __init__(self, span: int, margin: float, patience: int):
        self.span, self.margin, self.patience = span, margin, patience
        self.ewm = Ewm(span)
        self.best = math.inf
        self.best_step = self.calm_step = -1
        self.steps_above = 0
        self.fired = False
        self.dismissed_at = 0.0  # the level of the last dismissed signal (0: none in this climb)

    def observe(self, loss: float, step: int) -> Signal | None:
        self.ewm.add(loss)
        if self.ewm.count < self.span:
            return None
        level = self.ewm.mean
        if level < self.best:
            self.best, self.best_step = level, step
        if level <= self.best * (1 + self.margin / 2):
            self.calm_step = step
        if level <= self.best * (1 + self.margin):
            self.steps_above, self.fired, self.dismissed_at = 0, False, 0.0
            return None
        self.steps_above += 1
        if self.steps_above < self.patience or self.fired or level <= self.dismissed_at * (1 + self.margin):
            return None
        self.fired = True
        rise = level / self.best - 1
        return Signal(
            "divergence",
            "state",
            step,
            f"loss diverging: its moving average {level:.4g} has been {rise:.0%} above its best {self.best:.4g} "
            f"for {self.steps_above} steps (climbing since step {self.calm_step})",
            {
                "loss_ewm": level,
                "best": self.best,
                "best_step": self.best_step,
                "rise": rise,
                "steps_above": self.steps_above,
                "calm_step": self.calm_step,
            },
            began_step=self.calm_step,
        )

    def dismiss(self) -> float:
        """The last signal was no divergence: fire again only `margin` higher. Returns that level."""
        self.fired, self.dismissed_at = False, self.ewm.mean
        return self.dismissed_at * (1 + self.margin)

    @property
    def level(self) -> float:
        return self.ewm.mean


class NormGrowthMonitor(Monitor):
    """A norm (last-block activation RMS, logit RMS) growing out of bounds, by two tests:

    - growth without progress: the recent average grew `stall_growth`× from an earlier level while
      the loss average fell less than `min_progress` (a fraction of it) over the same stretch. Norms
      grow by orders of magnitude in every run, healthy or not, and how far depends on the learning
      rate, the width and the data, so no bound tied to the initial scale separates the two (runs
      that trained well grew past any bound that caught the bad ones). What differs is what the
      growth buys: healthy growth comes with a falling loss, the residual stream of a too-high
      learning rate blows up while the loss stalls or climbs. The stretch tested is the shortest one
      over which the norm grew `stall_growth`×: from the last step it was that much lower (to within
      the few percent of `_STALL_RESOLUTION`, the granularity of the record kept).
    - against its own long-run average: the recent average above `ratio` × the slow EWM, once
      `warmup` values are in, and again only while the loss average fell less than `min_progress`
      since the ratio was last under its square root. This is the later-run drift OPT-175B's
      logbook shows before divergences.

    For the first test the trouble is taken to have begun where the stretch began; for the second,
    at the last step where the ratio was under its square root (halfway, in log terms).
    """

    state_fields = ("fast", "loss", "slow", "rising", "calm_vs_average", "calm_loss", "fired")

    def __init__(
        self,
        name: str,
        label: str,
        stall_growth: float,
        min_progress: float,
        ratio: float,
        fast_span: int,
        slow_span: int,
        warmup: int,
    ):
        self.name, self.label = name, label
        self.stall_growth, self.min_progress, self.ratio, self.warmup = stall_growth, min_progress, ratio, warmup
        self.fast, self.loss, self.slow = Ewm(fast_span), Ewm(fast_span), Ewm(slow_span)
        # [step, recent, loss average] of the last step the recent average was at each of its levels:
        # a stack whose norms rise by at least _STALL_RESOLUTION from one entry to the next, its top is
        # now. "The last step the norm was at most x" is a binary search; entries are popped as the norm
        # falls back, so the stack is bounded by the span of norms over the resolution (a few hundred
        # entries at most) and each step costs O(1) amortised.
        self.rising: list[list[float]] = []
        self.calm_vs_average, self.calm_loss = -1, math.inf  # the last step under √ratio, and its loss average
        self.fired = False

    def observe(self, value: float, loss: float, step: int) -> Signal | None:
        """Take one step's norm and its (finite) training loss."""
        self.fast.add(value)
        self.loss.add(loss)
        self.slow.add(value)
        recent, loss_level = self.fast.mean, self.loss.mean
        if recent > 0:
            while self.rising and self.rising[-1][1] >= recent:
                self.rising.pop()
            if self.rising and recent < self.rising[-1][1] * _STALL_RESOLUTION:
                self.rising[-1] = [step, recent, loss_level]
            else:
                self.rising.append([step, recent, loss_level])
        vs_average = recent / self.slow.mean if self.slow.mean > 0 else 1.0
        if vs_average <= math.sqrt(self.ratio):
            self.calm_vs_average, self.calm_loss = step, loss_level
        stalled_since_calm = loss_level > self.calm_loss * (1 - self.min_progress)
        stall = self._stall(recent, loss_level)
        if stall is not None:
            began, then, loss_then = stall
            progress = 1 - loss_level / loss_then
            detail = (
                f"{recent / then:,.0f}× its {then:.3g} at step {began:.0f} while the loss average went "
                f"{loss_then:.4g} → {loss_level:.4g} ({-progress:+.1%}, under the {self.min_progress:.0%} "
                "progress that healthy growth comes with)"
            )
            evidence = {"growth": recent / then, "loss_then": loss_then, "progress": progress}
        elif self.slow.count >= self.warmup and vs_average > self.ratio and stalled_since_calm:
            detail = f"{vs_average:.1f}× its long-run average {self.slow.mean:.4g}"
            began, evidence = self.calm_vs_average, {"vs_long_run": vs_average}
        else:
            self.fired = False
            return None
        if self.fired:
            return None
        self.fired = True
        return Signal(
            self.name,
            "state",
            step,
            f"{self.label} growing: {recent:.4g} is {detail}",
            {"recent": recent, "long_run": self.slow.mean, "loss_ewm": loss_level, **evidence},
            began_step=int(began),
        )

    def _stall(self, recent: float, loss_level: float) -> tuple[float, float, float] | None:
        """(step, norm, loss average) where the shortest stretch that grew stall_growth× began, when the
        loss fell less than min_progress over it; else None."""
        # the latest step with a norm at most recent / stall_growth starts the shortest such stretch
        index = bisect.bisect_right(self.rising, recent / self.stall_growth, key=lambda entry: entry[1]) - 1
        if index < 0:
            return None
        began, then, loss_then = self.rising[index]
        if loss_level > loss_then * (1 - self.min_progress):
            return began, then, loss_then
        return None


_STALL_RESOLUTION = 2 ** (1 / 16)  # norms closer than this share an entry of NormGrowthMonitor.rising


class LossScaleMonitor(Monitor):
    """fp16 loss-scale collapse: the scale under a floor, or halved many times in a row.

    The GradScaler halves its scale at every overflowing step. From its large initial value it
    halves a few times in a row by design, so runs of halvings count only after the first clean step.
    """

    state_fields = ("previous", "halvings", "run_began", "seen_clean", "fired")

    def __init__(self, floor: float, max_halvings: int):
        self.floor, self.max_halvings = floor, max_halvings
        self.previous: float | None = None
        self.halvings = 0
        self.run_began = -1
        self.seen_clean = False
        self.fired = False

    def observe(self, scale: float, step: int) -> Signal | None:
        if self.previous is not None:
            if scale < self.previous:
                if self.halvings == 0:
                    self.run_began = step
                self.halvings += 1
            else:
                self.halvings, self.seen_clean = 0, True
        self.previous = scale
        collapsed = scale < self.floor or (self.seen_clean and self.halvings >= self.max_halvings)
        if not collapsed:
            self.fired = False
            return None
        if self.fired:
            return None
        self.fired = True
        return Signal(
            "loss_scale_collapse",
            "state",
            step,
            f"fp16 loss scale collapsed to {scale:.3g}, "
            + (
                f"{self.halvings} halvings in a row (gradients overflow step after step)"
                if self.halvings
                else f"under its floor {self.floor:g} (the unscaled gradients overflow fp16)"
            ),
            {"loss_scale": scale, "halvings": self.halvings, "floor": self.floor},
            began_step=self.run_began if self.halvings else step,
        )


class ThroughputMonitor(Monitor):
    """Steps much slower than usual (step_seconds > factor × the median) for `patience` steps in a row.

    Single slow steps (a checkpoint write, a garbage collection) are normal; a sustained slowdown is
    a sick machine or a straggler. Slow steps stay out of the median so it keeps describing normal.
    """

    state_fields = ("median", "slow_steps", "fired")

    def __init__(self, window: int, factor: float, patience: int, warmup: int):
        self.factor, self.patience, self.warmup = factor, patience, warmup
        self.median = RollingMedian(window)
        self.slow_steps = 0
        self.fired = False

    def observe(self, seconds: float, step: int) -> Signal | None:
        if len(self.median) < self.warmup or seconds <= self.factor * self.median.median:
            self.median.add(seconds)
            self.slow_steps, self.fired = 0, False
            return None
        self.slow_steps += 1
        if self.slow_steps < self.patience or self.fired:
            return None
        self.fired = True
        usual = self.median.median
        return Signal(
            "slow_steps",
            "warning",
            step,
            f"throughput collapse: {self.slow_steps} steps in a row took {seconds:.3g} s vs the usual {usual:.3g} s",
            {"step_seconds": seconds, "median_seconds": usual, "slow_steps": self.slow_steps},
            began_step=step - self.slow_steps + 1,
        )
