"""The policy: signals in, repairs out, every decision and its outcome written to the logbook.

The escalation ladder (each rung can be turned off in `SupervisorConfig`):
  1. skip the offending update ("update" trouble: a non-finite value or a spike);
  2. roll back to the last good checkpoint before the trouble began and skip the next K batches;
  3. the same rollback plus a lower learning rate and tighter clipping, kept for the rest of the
     run; this rung is climbed again for as long as each cut makes progress (below), because a
     learning rate that is far too high needs more than one halving (OPT-175B lowered its lr
     several times), and how many it needs is not known in advance;
  4. the same rollback plus zeroed AdamW moments;
  5. stop with a diagnosis, when a repair is needed and the budget is spent or no rung is left.

Trouble opens an *incident*. A lone spike is skipped; the incident closes once `judge_steps` steps
pass without trouble and the loss is back at its pre-trouble level, and nothing escalates. Within
an incident, `repair_after_skips` loss spikes or non-finite steps, or any "state" trouble
(divergence, norm growth, loss-scale collapse), call for a repair (rungs 2-4).

Divergence is confirmed on held-out data when the task has some (`held_out`): the training loss
average's best is the lowest of thousands of noisy values, biased low, and a model that has seen its
corpus several times swings from batch to batch more than its held-out loss moves (a healthy 30-minute
run climbed 13% above that best for 50 steps while its held-out loss fell). On the signal, the weights
now are evaluated and compared with the last evaluation before the climb began (not the best: a
run that overfits has a held-out loss above its best for good reasons); the signal stands
when the held-out loss rose by half the divergence margin, else it is logged as unconfirmed and asked
again only if the average climbs another margin (the climb still dated from where it began, so a
repair then rolls back before it). Likewise a judge step that finds the training average
still high asks the held-out loss before calling the repair a failure.

A grad-norm spike next to a normal loss is skipped but does not count: healthy small-batch runs
have such steps in clusters (three within 90 steps in a measured healthy run) and their loss
shows no harm. Only a run of them counts, from its `repair_after_skips`-th step in a row on: that
is a level shift the window, which leaves flagged values out, would otherwise never follow.

Each repair is judged: did the run get `judge_steps` past the trouble without new trouble, with
the loss EWM back under best·(1 + recovery_tolerance)? A success closes the incident and makes the
rung that worked the first one tried in the next incident, so a rollback that failed is not retried
before an lr cut next time. A failure (new trouble, or the loss still high at the judge step) climbs
a rung at once, except that a failed lr cut which made progress is followed by another cut.

Progress, precisely: a failed repair made progress when its failure is new trouble (a signal, or
the spikes that call for a repair) at a later step than every earlier failure of the incident, the
trouble that opened it included: the run got further than before. A learning rate that is still
too high but less so blows up later; a cut that fails at the same step (the trouble is tied to
the data or the weights, not to the rate) or that fails only at the judge step (the run was calm,
yet the loss did not come back: a lower rate is not what is missing) made none. A cut that made
progress earns another cut; one that did not moves on to rung 4, and the ladder stops when that
fails too. Step counts are used rather than loss levels: a too-high rate fails within a few steps,
before any rate has moved the loss by more than its batch noise. The repair budget
(`max_repairs`) still bounds the whole run.

How the loop applies actions (in list order):
- skip_update: drop the gradients, no optimizer step, the step counter stays, the data cursor advances
  (the loop queues each update before the record reaches observe(); the device drops it by itself,
  from `skip_limits()`, exactly when observe() asks for skip_update);
- rollback: load the newest good checkpoint with step < before_step (the initial weights count as
  a good checkpoint of step 0), move the data cursor to (cursor at the trouble + skip_batches),
  keep the *current* lr multiplier and clip value (repairs stay in force) and this live
  Supervisor's state, then call `after_rollback(restored_step)`;
- scale_lr: multiply the persistent lr multiplier; set_clip: set the clip value;
- reset_optimizer: zero the named AdamW moments of every parameter (keeping AdamW's step count, so
  the first updates come out about (1-β1)/√(1-β2) of a normal one, 1 at β2 0.99, rather than larger);
- stop: end the run with status "stopped" and the diagnosis.
Good checkpoints: call `checkpoint_is_good(step)` when writing each checkpoint and keep the answer
in it; a checkpoint is good when no incident is open (no unresolved trouble, no repair on trial).
Process restarts: `load_state_dict` the state saved in the checkpoint resumed from.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from keel.config import SupervisorConfig
from keel.errors import UserError
from keel.supervisor.logbook import Logbook
from keel.supervisor.monitors import (
    DivergenceMonitor,
    LossScaleMonitor,
    NormGrowthMonitor,
    Signal,
    SpikeMonitor,
    StepRecord,
    ThroughputMonitor,
    nonfinite_signal,
)

ACTION_KINDS = ("skip_update", "rollback", "scale_lr", "set_clip", "reset_optimizer", "stop")
REPAIR_RUNGS = ("rollback", "lower_lr", "reset_optimizer")  # rungs 2-4, in escalation order
MOMENTS = ("exp_avg", "exp_avg_sq")


def validate_config(config: SupervisorConfig) -> None:
    """Raise UserError for supervisor settings that cannot work, naming the key and the fix."""

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise UserError(message)

    for f in fields(SupervisorConfig):
        value = getattr(config, f.name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            need(value >= 0, f"supervisor.{f.name} must be >= 0, got {value}.")
    for key in (
        "spike_window",
        "spike_ewm_span",
        "divergence_span",
        "divergence_patience",
        "norm_fast_span",
        "norm_slow_span",
        "slow_step_patience",
        "loss_scale_halvings",
        "repair_after_skips",
        "judge_steps",
    ):
        need(getattr(config, key) > 0, f"supervisor.{key} must be a positive integer, got {getattr(config, key)}.")
    for key in (
        "spike_sigma",
        "loss_spike_ratio",
        "grad_spike_ratio",
        "norm_stall_growth",
        "norm_growth_ratio",
        "slow_step_factor",
    ):
        need(getattr(config, key) > 1, f"supervisor.{key} must be above 1, got {getattr(config, key)}.")
    need(
        2 <= config.spike_warmup <= config.spike_window,
        f"supervisor.spike_warmup must be within [2, spike_window={config.spike_window}], got {config.spike_warmup}.",
    )
    need(config.norm_min_progress < 1, f"supervisor.norm_min_progress must be below 1, got {config.norm_min_progress}.")
    need(config.rate_check_margin < 1, f"supervisor.rate_check_margin must be below 1, got {config.rate_check_margin}.")
    need(0 < config.lr_factor <= 1, f"supervisor.lr_factor must be within (0, 1], got {config.lr_factor}.")
    need(0 < config.clip_factor <= 1, f"supervisor.clip_factor must be within (0, 1], got {config.clip_factor}.")
    need(
        config.skip_min <= config.skip_max,
        f"supervisor.skip_min ({config.skip_min}) must not exceed supervisor.skip_max ({config.skip_max}).",
    )
    moments = _moments(config)
    need(
        bool(moments) and all(m in MOMENTS for m in moments),
        "supervisor.reset_moments must list exp_avg and/or exp_avg_sq separated by commas, "
        f"got {config.reset_moments!r}.",
    )


def _moments(config: SupervisorConfig) -> list[str]:
    return [m.strip() for m in config.reset_moments.split(",") if m.strip()]


@dataclass
class Action:
    """One thing the loop must do."""

    kind: str  # one of ACTION_KINDS
    reason: str  # one human sentence
    params: dict = field(default_factory=dict)
    # rollback: {"before_step": int, "skip_batches": int}; scale_lr: {"factor": float};
    # set_clip: {"value": float}; reset_optimizer: {"moments": [str, ...]}; stop: {"diagnosis": str}


class Supervisor:
    """Watches the step records, repairs trouble through the loop's actions, and keeps the logbook."""

    def __init__(
        self,
        config: SupervisorConfig,
        logbook: Logbook,
        max_steps: int,
        grad_clip: float,
        task_monitors: list | None = None,
        held_out: Callable[[], float] | None = None,
    ):
        """`held_out`, when the task has held-out data, evaluates the weights now and returns their loss;
        the loop must also report its scheduled evaluations through `evaluated`."""
        validate_config(config)
        self.held_out = held_out
        # The task's monitors of its own metrics: their signals are logged; repairs act on the standard ones.
        self.task_monitors = list(task_monitors or [])
        self.config, self.logbook, self.max_steps = config, logbook, max_steps
        self.ladder = [rung for rung in REPAIR_RUNGS if getattr(config, rung)]
        # Saved in checkpoints (state_dict):
        self.clip = grad_clip  # current clip value (0 = off); set_clip keeps it up to date
        self.lr_multiplier = 1.0  # product of the scale_lr factors handed out
        self.first_rung = self.ladder[0] if self.ladder else ""  # where the next incident's repairs begin
        self.repairs_used = 0
        self.incident: dict[str, Any] | None = None
        self.grad_spikes_in_a_row = 0
        self.good_checkpoints: list[list[int]] = []  # [step, tokens] of checkpoints called good, oldest first
        self.last_tokens = 0  # tokens trained into the weights so far
        self.evaluations: list[list[float]] = []  # [step, held-out loss] of the loop's evaluations, oldest first
        # Not saved: a rollback in flight, logged once the loop reports where it landed.
        self.pending_rollback: dict[str, Any] | None = None
        self._build_monitors()

    def _build_monitors(self) -> None:
        c = self.config
        self.loss_spike = SpikeMonitor(
            "loss_spike",
            "loss",
            c.spike_window,
            c.spike_sigma,
            c.spike_warmup,
            c.loss_spike_ratio,
            c.spike_ewm_span,
            _RATIO_WARMUP,
        )
        self.grad_spike = SpikeMonitor(
            "grad_spike",
            "grad norm",
            c.spike_window,
            c.spike_sigma,
            c.spike_warmup,
            c.grad_spike_ratio,
            c.spike_ewm_span,
            _RATIO_WARMUP,
        )
        self.divergence = DivergenceMonitor(c.divergence_span, c.divergence_margin, c.divergence_patience)
        self.act_growth = NormGrowthMonitor(
            "act_growth",
            "last-block activation RMS",
            c.norm_stall_growth,
            c.norm_min_progress,
            c.norm_growth_ratio,
            c.norm_fast_span,
            c.norm_slow_span,
            c.norm_warmup,
        )
        self.logit_growth = NormGrowthMonitor(
            "logit_growth",
            "logit RMS",
            c.norm_stall_growth,
            c.norm_min_progress,
            c.norm_growth_ratio,
            c.norm_fast_span,
            c.norm_slow_span,
            c.norm_warmup,
        )
        self.loss_scale = LossScaleMonitor(c.loss_scale_floor, c.loss_scale_halvings)
        self.throughput = ThroughputMonitor(
            c.spike_window, c.slow_step_factor, c.slow_step_patience, _THROUGHPUT_WARMUP
        )

    @property
    def monitors(self) -> dict[str, Any]:
        return {
            "loss_spike": self.loss_spike,
            "grad_spike": self.grad_spike,
            "divergence": self.divergence,
            "act_growth": self.act_growth,
            "logit_growth": self.logit_growth,
            "loss_scale": self.loss_scale,
            "throughput": self.throughput,
            **{m.name: m for m in self.task_monitors},
        }

    # -- every step -----------------------------------------------------------------------------

    def observe(self, record: StepRecord) -> list[Action]:
        """Judge one step before its update is applied; returns the actions in the order to apply them."""
        if not self.config.enabled:
            return []
        signals = self._signals(record)
        for signal in signals:
            self.logbook.write(record.step, "signal", signal.name, signal.message, signal.evidence)
        actions: list[Action] = []
        spikes = [s for s in signals if s.trouble == "update"]
        if not (math.isfinite(record.loss) and math.isfinite(record.grad_norm)):
            reason = spikes[0].message if spikes else "fp16 overflow, the loss scaler lowers its scale"
            actions.append(Action("skip_update", f"{reason}; the update is dropped."))
        elif spikes and self.config.skip_spikes:
            actions.append(Action("skip_update", f"{spikes[0].message}; the update is dropped."))
        if actions and spikes:  # routine fp16 overflows are the scaler's business, not the logbook's
            self.logbook.write(record.step, "action", "skip_update", "skipped the update")

        only_grad = bool(spikes) and all(s.name == "grad_spike" for s in spikes)
        self.grad_spikes_in_a_row = self.grad_spikes_in_a_row + 1 if only_grad else 0
        counted = bool(spikes) and (not only_grad or self.grad_spikes_in_a_row >= self.config.repair_after_skips)
        state = [s for s in signals if s.trouble == "state"]
        if counted or state:
            actions += self._on_trouble(record, [s for s in signals if s.trouble != "warning"], counted, state)
        elif self.incident is not None and record.step >= self.incident["judge_step"]:
            actions += self._judge(record)
        if not any(a.kind in ("skip_update", "rollback") for a in actions):
            self.last_tokens = record.tokens  # this step's tokens reach the weights
        return actions

    def _signals(self, record: StepRecord) -> list[Signal]:
        """Run the monitors; spiking and non-finite steps stay out of every running statistic."""
        signals = [self.throughput.observe(record.step_seconds, record.step), nonfinite_signal(record)]
        if record.loss_scale is not None:
            signals.append(self.loss_scale.observe(record.loss_scale, record.step))
        if math.isfinite(record.loss) and math.isfinite(record.grad_norm):
            spikes = [
                self.loss_spike.check(record.loss, record.step),
                self.grad_spike.check(record.grad_norm, record.step),
            ]
            signals += spikes
            if not any(spikes):
                self.loss_spike.add(record.loss)
                self.grad_spike.add(record.grad_norm)
                divergence = self.divergence.observe(record.loss, record.step)
                signals.append(self._confirmed(divergence) if divergence else None)
                for monitor, value in ((self.act_growth, record.act_norm), (self.logit_growth, record.logit_norm)):
                    if math.isfinite(value):
                        signals.append(monitor.observe(value, record.loss, record.step))
                signals += [monitor.observe(record) for monitor in self.task_monitors]
        return [s for s in signals if s is not None]

    def _held_out_rise(self, before_step: int) -> dict[str, float] | None:
        """Evaluate the weights now against the last evaluation at or before `before_step`; None without one."""
        earlier = [e for e in self.evaluations if e[0] <= before_step]
        if self.held_out is None or not earlier:
            return None
        reference_step, reference = earlier[-1]
        now = self.held_out()
        return {
            "val_loss": now,
            "reference_val_loss": reference,
            "reference_step": reference_step,
            "val_rise": now / reference - 1,
        }

    def _confirmed(self, signal: Signal) -> Signal | None:
        """The divergence signal when the held-out loss rose with the training loss (or cannot be asked)."""
        rise = self._held_out_rise(signal.began_step)
        if rise is None:
            return signal
        then = f"{rise['reference_val_loss']:.4g} at step {rise['reference_step']:.0f}, {rise['val_loss']:.4g} now"
        evidence = {**signal.evidence, **rise}
        if not rise["val_rise"] <= self.config.divergence_margin / 2:  # a NaN counts as a rise
            signal.message += f"; the held-out loss rose {rise['val_rise']:.0%} with it ({then})"
            signal.evidence = evidence
            return signal
        again = self.divergence.dismiss()
        self.logbook.write(
            signal.step,
            "info",
            "divergence_unconfirmed",
            f"{signal.message}, but the held-out loss did not rise with it ({then}): no repair, "
            f"asked again if the average passes {again:.4g}",
            evidence,
        )
        return None

    def evaluated(self, step: int, val_loss: float) -> None:
        """The loop evaluated the weights of `step` on the held-out data (on its schedule)."""
        if math.isfinite(val_loss):
            kept = [e for e in self.evaluations if e[0] < step]
            self.evaluations = [*kept[-(_EVALUATIONS_KEPT - 1) :], [step, val_loss]]

    def skip_limits(self) -> list[float]:
        """What `observe` will judge the next record's update by, for the device to apply it alone:
        [loss mean, std, ratio limit, grad-norm mean, std, ratio limit, spike_sigma, skip_spikes].

        The next update is skipped exactly when its loss or grad norm is non-finite, or when skip_spikes
        is 1 and either value spikes by SpikeMonitor.limits() (see `keel.train.loop.skip_update`).
        Rollbacks also drop the update, but they restore the weights and the optimizer anyway.
        """
        return [
            *self.loss_spike.limits(),
            *self.grad_spike.limits(),
            self.config.spike_sigma,
            float(self.config.skip_spikes),
        ]

    # -- incidents ------------------------------------------------------------------------------

    def _on_trouble(
        self, record: StepRecord, trouble: list[Signal], counted: bool, state: list[Signal]
    ) -> list[Action]:
        began = min(s.began_step for s in trouble)
        if self.incident is None:
            best = self.divergence.best
            self.incident = {
                "began_step": began,
                "reference_loss": best if math.isfinite(best) else self.divergence.level,  # the pre-trouble level
                "counted": 0,  # loss spikes / non-finite steps since the incident began or the last repair
                "rung": "",  # the repair on trial ("" = only skips so far)
                "furthest": -1,  # the latest step at which the incident's trouble came back so far
                "tried": [],  # one line per repair, for the diagnosis
                "judge_step": 0,
            }
        incident = self.incident
        incident["began_step"] = min(incident["began_step"], began)
        incident["judge_step"] = max(incident["judge_step"], record.step + self.config.judge_steps)
        incident["counted"] += counted
        if state:
            short = f"new trouble ({state[0].name.replace('_', ' ')}) at step {record.step}"
            return self._repair(record, state[0].message, short)
        if incident["counted"] >= self.config.repair_after_skips:
            return self._repair(
                record, f"{incident['counted']} spiking or non-finite steps since step {incident['began_step']}"
            )
        return []

    def _judge(self, record: StepRecord) -> list[Action]:
        """The incident's judge step is reached without new trouble: did the loss come back?"""
        incident = self.incident
        assert incident is not None
        tolerance = self.config.recovery_tolerance
        target = incident["reference_loss"] * (1 + tolerance)
        level = self.divergence.level
        high = math.isfinite(target) and math.isfinite(level) and level > target
        rise = self._held_out_rise(incident["began_step"]) if high else None
        back = rise is not None and rise["val_rise"] <= tolerance  # the held-out loss has the last word
        if high and not back:
            return self._repair(
                record,
                f"the loss average {level:.4g} is still above {target:.4g}, "
                f"{self.config.judge_steps} steps after the trouble",
                trouble=False,
            )
        repair = incident["rung"] or "skip_update"
        self.logbook.write(
            record.step,
            "outcome",
            repair,
            f"{_DOING[repair]} worked: no trouble for {self.config.judge_steps} steps"
            + (
                f", and the held-out loss {rise['val_loss']:.4g} is back within {tolerance:.0%} of its "
                f"{rise['reference_val_loss']:.4g} before the trouble (the loss average {level:.4g} is not)"
                if back
                else f" and the loss average {level:.4g} is under {target:.4g}"
            ),
            {"loss_ewm": level, "target": target, "began_step": incident["began_step"], "recovered": 1},
        )
        if incident["rung"]:
            self.first_rung = incident["rung"]  # what worked is tried first next time
        self.incident = None
        return []

    def _repair(self, record: StepRecord, cause: str, short_cause: str = "", trouble: bool = True) -> list[Action]:
        """Judge the repair on trial a failure and climb to the next rung, or stop when none is left.

        `cause` is the sentence for actions and the diagnosis; `short_cause`, when the cause is a signal
        already in the logbook, keeps the outcome line from repeating it. `trouble` is False when the
        failure is the judge's verdict on a calm run rather than new trouble.
        """
        incident = self.incident
        assert incident is not None
        failed = incident["rung"] or ("skip_update" if incident["counted"] else "")
        furthest = incident.get("furthest", -1)
        progress = trouble and record.step > furthest
        if trouble:
            incident["furthest"] = max(furthest, record.step)
        if failed:
            made = ""
            if failed == "lower_lr" and trouble:
                verdict = "progress" if progress else "no progress"
                made = f"; it made {verdict} (trouble came back at step {record.step}, the furthest before: {furthest})"
            elif failed == "lower_lr":
                made = "; it made no progress (the run was calm, a lower rate is not what is missing)"
            self.logbook.write(
                record.step,
                "outcome",
                failed,
                f"{_DOING[failed]} did not hold: {short_cause or cause}{made}",
                {
                    "loss": record.loss,
                    "began_step": incident["began_step"],
                    "recovered": 0,
                    "progress": int(progress),
                },
            )
        rung = self._next_rung(incident, progress)
        if not rung:
            tried = "; ".join(incident["tried"])
            return self._give_up(
                record, cause, f"every repair failed ({tried})" if tried else "no repair rung is enabled"
            )
        if self.repairs_used >= self.config.max_repairs:
            return self._give_up(record, cause, f"the budget of {self.config.max_repairs} repairs is spent")
        self.repairs_used += 1
        incident.update(rung=rung, counted=0, judge_step=record.step + self.config.judge_steps)
        return self._rung_actions(rung, record, cause)

    def _next_rung(self, incident: dict[str, Any], progress: bool) -> str:
        """The rung after the failed one on trial: the same cut again while cuts make progress, else the next."""
        rung = incident["rung"]
        if not rung:
            return self.first_rung
        if rung == "lower_lr" and progress:
            return rung
        later = self.ladder[self.ladder.index(rung) + 1 :]
        return later[0] if later else ""

    def _rung_actions(self, rung: str, record: StepRecord, cause: str) -> list[Action]:
        c, incident = self.config, self.incident
        assert incident is not None
        actions: list[Action] = []
        entries: list[tuple[str, str, dict]] = []  # logbook lines for the actions after the rollback
        if c.rollback:
            skip = min(max(round(c.skip_fraction * self.max_steps), c.skip_min), c.skip_max)
            before = max(incident["began_step"], 0)
            actions.append(
                Action(
                    "rollback",
                    f"{cause}: roll back before step {before} and skip {skip} batches.",
                    {"before_step": before, "skip_batches": skip},
                )
            )
        if rung == "lower_lr" and c.lr_factor < 1:
            self.lr_multiplier *= c.lr_factor
            actions.append(
                Action("scale_lr", f"{cause}: lower the learning rate ×{c.lr_factor:g}.", {"factor": c.lr_factor})
            )
            entries.append(
                (
                    "scale_lr",
                    f"lowered the learning rate ×{c.lr_factor:g} (now ×{self.lr_multiplier:.3g} of the schedule)",
                    {"factor": c.lr_factor, "lr_multiplier": self.lr_multiplier, "lr": record.lr * c.lr_factor},
                )
            )
        base = self.clip if self.clip > 0 else self.grad_spike.level  # with clipping off: the typical grad norm
        if rung == "lower_lr" and c.clip_factor < 1 and math.isfinite(base):
            old, self.clip = self.clip, base * c.clip_factor
            actions.append(
                Action("set_clip", f"{cause}: tighten gradient clipping to {self.clip:.3g}.", {"value": self.clip})
            )
            entries.append(
                (
                    "set_clip",
                    f"tightened gradient clipping to {self.clip:.3g} (was {old:.3g})",
                    {"value": self.clip, "was": old},
                )
            )
        if rung == "reset_optimizer":
            moments = _moments(c)
            actions.append(
                Action(
                    "reset_optimizer", f"{cause}: zero the AdamW moments {', '.join(moments)}.", {"moments": moments}
                )
            )
            entries.append(("reset_optimizer", f"zeroed the AdamW moments {', '.join(moments)}", {}))
        incident["tried"].append(f"step {record.step}: " + " + ".join(a.kind for a in actions))
        if c.rollback:
            self.pending_rollback = {
                "from_step": record.step,
                "from_tokens": self.last_tokens,
                "skip_batches": actions[0].params["skip_batches"],
                "entries": entries,
            }
        else:
            for name, message, evidence in entries:
                self.logbook.write(record.step, "action", name, message, evidence)
        return actions

    def _give_up(self, record: StepRecord, cause: str, why: str) -> list[Action]:
        incident = self.incident
        assert incident is not None
        diagnosis = (
            f"{cause}; {why}. Training is unstable here: lower optim.lr (the supervisor had cut it to "
            f"×{self.lr_multiplier:.3g}), lengthen optim.warmup_steps, or inspect the data from step "
            f"{incident['began_step']} on."
        )
        self.incident = None
        evidence = {
            "repairs_used": self.repairs_used,
            "lr_multiplier": self.lr_multiplier,
            "began_step": incident["began_step"],
        }
        if self.config.stop_on_failure:
            self.logbook.write(record.step, "action", "stop", f"stopped the run: {diagnosis}", evidence)
            return [Action("stop", diagnosis, {"diagnosis": diagnosis})]
        self.logbook.write(
            record.step, "info", "unrepaired", f"gave up repairing and carries on: {diagnosis}", evidence
        )
        return []

    # -- calls from the loop outside observe() --------------------------------------------------

    def after_rollback(self, restored_step: int) -> None:
        """The loop restored the checkpoint of `restored_step`: log the repair and restart the monitors."""
        pending, self.pending_rollback = self.pending_rollback, None
        if pending is not None:
            from_step = pending["from_step"]
            self.last_tokens = self._tokens_at(restored_step, from_step, pending["from_tokens"])
            tokens_lost = max(pending["from_tokens"] - self.last_tokens, 0)
            self.logbook.write(
                from_step,
                "action",
                "rollback",
                f"rolled back from step {from_step} to step {restored_step} "
                f"and skipped {pending['skip_batches']} batches "
                f"({from_step - restored_step} steps and {tokens_lost:,} tokens lost)",
                {
                    "from_step": from_step,
                    "to_step": restored_step,
                    "steps_lost": from_step - restored_step,
                    "tokens_lost": tokens_lost,
                    "skip_batches": pending["skip_batches"],
                },
            )
            for name, message, evidence in pending["entries"]:
                self.logbook.write(from_step, "action", name, message, evidence)
        self.good_checkpoints = [pair for pair in self.good_checkpoints if pair[0] <= restored_step]
        self.evaluations = [e for e in self.evaluations if e[0] <= restored_step]  # of weights that are gone
        self._build_monitors()
        self.grad_spikes_in_a_row = 0

    def _tokens_at(self, step: int, from_step: int, from_tokens: int) -> int:
        for good_step, tokens in self.good_checkpoints:
            if good_step == step:
                return tokens
        return round(from_tokens * step / max(from_step, 1))  # a checkpoint this Supervisor never saw

    def checkpoint_is_good(self, step: int) -> bool:
        """Call when writing the checkpoint of `step`: True when no incident is open, so a rollback may land there.

        The answer is remembered with the tokens trained so far, to count the tokens a rollback loses.
        """
        good = not self.config.enabled or self.incident is None
        if good:
            self.good_checkpoints = [pair for pair in self.good_checkpoints if pair[0] != step]
            self.good_checkpoints = (self.good_checkpoints + [[step, self.last_tokens]])[-_GOOD_CHECKPOINTS_KEPT:]
        return good

    def state_dict(self) -> dict:
        """Plain Python types only, so `torch.load(weights_only=True)` reads it back."""
        return {
            "monitors": {name: monitor.state_dict() for name, monitor in self.monitors.items()},
            "clip": self.clip,
            "lr_multiplier": self.lr_multiplier,
            "first_rung": self.first_rung,
            "repairs_used": self.repairs_used,
            "incident": copy.deepcopy(self.incident),
            "grad_spikes_in_a_row": self.grad_spikes_in_a_row,
            "good_checkpoints": [list(pair) for pair in self.good_checkpoints],
            "last_tokens": self.last_tokens,
            "evaluations": [list(e) for e in self.evaluations],
        }

    def load_state_dict(self, state: dict) -> None:
        for name, monitor in self.monitors.items():
            monitor.load_state_dict(state["monitors"][name])
        self.clip, self.lr_multiplier, self.repairs_used = state["clip"], state["lr_multiplier"], state["repairs_used"]
        # A rung turned off since the checkpoint was written is not tried.
        self.first_rung = (
            state["first_rung"] if state["first_rung"] in self.ladder else (self.ladder[0] if self.ladder else "")
        )
        self.incident = copy.deepcopy(state["incident"])
        self.grad_spikes_in_a_row, self.last_tokens = state["grad_spikes_in_a_row"], state["last_tokens"]
        self.good_checkpoints = [list(pair) for pair in state["good_checkpoints"]]
        self.evaluations = [list(e) for e in state.get("evaluations", [])]  # absent before 2026-12-03


_DOING = {
    "skip_update": "skipping the update",
    "rollback": "the rollback",
    "lower_lr": "the lower learning rate",
    "reset_optimizer": "resetting the optimizer moments",
}
_RATIO_WARMUP = 10  # values before a ratio test may fire: a 20-step EWM of fewer is still jumpy
_THROUGHPUT_WARMUP = 20  # step times before the median is trusted (OLMo-core's minimum of 20 values, reused)
_GOOD_CHECKPOINTS_KEPT = 64  # far more than any keep_checkpoints; bounds the state
_EVALUATIONS_KEPT = 64  # at the default eval_every, 12800 steps back
