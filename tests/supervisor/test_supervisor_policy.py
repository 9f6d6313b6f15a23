"""The supervisor end to end on synthetic-but-realistic step streams, through a loop that applies its
actions the way keel's training loop does (skips hold the step, rollbacks restore a good checkpoint
and move the cursor, lr cuts persist)."""

import math
import pickle
import random
from collections.abc import Callable

import pytest
import torch

from keel.errors import UserError
from keel.supervisor.logbook import Logbook, read_logbook
from keel.supervisor.monitors import StepRecord
from keel.supervisor.policy import Supervisor, SupervisorConfig
from keel.train.loop import skip_update

TOKENS_PER_STEP = 4096


def healthy(step: int, rng: random.Random, lr_scale: float = 1.0) -> dict:
    """One step of a healthy run: a decaying loss with 4% batch noise, a log-normal grad norm, norms that
    grow ~80x from initialisation in the first 100 steps and then stay (as measured on small GPTs)."""
    return {
        "loss": (2.2 + 5.3 * math.exp(-step / 250)) * (1 + rng.gauss(0, 0.04)),
        "grad_norm": (0.5 + 0.8 * math.exp(-step / 80)) * math.exp(rng.gauss(0, 0.12)),
        "lr": 3e-3 * min(1.0, (step + 1) / 50) * lr_scale,
        "step_seconds": 0.1 * (1 + abs(rng.gauss(0, 0.05))),
        "act_norm": (0.03 + 2.5 * (1 - math.exp(-step / 30))) * (1 + rng.gauss(0, 0.01)),
        "logit_norm": (0.25 + 3.5 * (1 - math.exp(-step / 60))) * (1 + rng.gauss(0, 0.01)),
    }


class Loop:
    """Applies actions like keel.train.loop.Trainer does, on a synthetic run."""

    def __init__(
        self,
        supervisor: Supervisor,
        shape: Callable[["Loop", dict], dict] = lambda loop, values: values,
        checkpoint_every: int = 50,
        seed: int = 0,
        fp16: bool = False,
        val: Callable[["Loop"], float] | None = None,
        eval_every: int = 200,
    ):
        """`val`, when given, is the held-out loss of the weights now: evaluated every `eval_every` steps
        and asked by the supervisor, as keel's loop does."""
        self.supervisor, self.shape, self.checkpoint_every = supervisor, shape, checkpoint_every
        self.eval_every, self.val = eval_every, val
        if val is not None:
            supervisor.held_out = lambda: val(self)
        self.rng = random.Random(seed)
        self.step = self.cursor = 0
        self.lr_scale, self.reset_moments = 1.0, 0
        self.loss_scale = 65536.0 if fp16 else None
        self.clean_steps = 0
        self.checkpoints = {0: supervisor.checkpoint_is_good(0)}
        self.saved_scaler = {0: (self.loss_scale, 0)}
        self.actions: list[tuple[int, str]] = []
        self.rollbacks: list[tuple[int, int, int]] = []  # (from_step, to_step, skip_batches)
        self.diagnosis = ""

    def record(self) -> StepRecord:
        values = self.shape(self, healthy(self.step, self.rng, self.lr_scale))
        return StepRecord(
            step=self.step, tokens=(self.step + 1) * TOKENS_PER_STEP, loss_scale=self.loss_scale, **values
        )

    def run(self, max_steps: int, max_records: int = 50_000) -> str:
        for _ in range(max_records):
            if self.step >= max_steps:
                return "finished"
            record = self.record()
            limits = torch.tensor(self.supervisor.skip_limits(), dtype=torch.float64)
            dropped = skip_update(
                torch.tensor(record.loss, dtype=torch.float64),
                torch.tensor(record.grad_norm, dtype=torch.float64),
                limits,
            )
            actions = self.supervisor.observe(record)
            # keel's loop queues the update before the supervisor reads the record: the device's verdict
            # from the limits must be the supervisor's, in every scenario below
            assert bool(dropped) == any(a.kind == "skip_update" for a in actions), (record, actions)
            self.actions += [(record.step, a.kind) for a in actions]
            skip = any(a.kind in ("skip_update", "rollback") for a in actions)
            self._scaler_update(record)
            self.cursor += 1
            if not skip:
                self.step += 1
            for action in actions:
                if action.kind == "scale_lr":
                    self.lr_scale *= action.params["factor"]
                elif action.kind == "reset_optimizer":
                    self.reset_moments += 1
                elif action.kind == "rollback":
                    # none before step 0: keel's loop then restores the initial weights, the checkpoint of step 0
                    restored = max(
                        (s for s, good in self.checkpoints.items() if good and s < action.params["before_step"]),
                        default=0,
                    )
                    self.rollbacks.append((record.step, restored, action.params["skip_batches"]))
                    self.step, self.cursor = restored, self.cursor + action.params["skip_batches"]
                    self.loss_scale, self.clean_steps = self.saved_scaler[restored]
                    self.supervisor.after_rollback(restored)
                elif action.kind == "stop":
                    self.diagnosis = action.params["diagnosis"]
                    return "stopped"
            if not skip and self.val is not None and self.step % self.eval_every == 0:
                self.supervisor.evaluated(self.step, self.val(self))
            if not skip and self.step % self.checkpoint_every == 0:
                self.checkpoints[self.step] = self.supervisor.checkpoint_is_good(self.step)
                self.saved_scaler[self.step] = (self.loss_scale, self.clean_steps)
        raise AssertionError("the run never ended")

    def _scaler_update(self, record: StepRecord) -> None:
        """torch's GradScaler: halve on overflow, double after 2000 clean steps."""
        if self.loss_scale is None:
            return
        if math.isfinite(record.grad_norm):
            self.clean_steps += 1
            if self.clean_steps == 2000:
                self.loss_scale, self.clean_steps = self.loss_scale * 2, 0
        else:
            self.loss_scale, self.clean_steps = self.loss_scale / 2, 0

    def kinds(self, kind: str) -> list[int]:
        return [step for step, k in self.actions if k == kind]

    def kinds_seen(self) -> set[str]:
        return {k for _, k in self.actions}


def supervise(tmp_path, max_steps: int = 3000, **config) -> Supervisor:
    return Supervisor(
        SupervisorConfig(**config), Logbook(tmp_path / "logbook.jsonl"), max_steps=max_steps, grad_clip=1.0
    )


def entries(tmp_path, kind: str | None = None, name: str | None = None) -> list[dict]:
    return [
        e
        for e in read_logbook(tmp_path / "logbook.jsonl")
        if (kind is None or e["kind"] == kind) and (name is None or e["name"] == name)
    ]


# -- healthy runs --------------------------------------------------------------------------------


def test_a_healthy_noisy_run_of_3000_steps_draws_no_signal_and_no_action(tmp_path):
    loop = Loop(supervise(tmp_path))
    assert loop.run(3000) == "finished"
    assert loop.actions == []
    assert [e for e in entries(tmp_path) if e["kind"] != "info"] == []
    assert all(loop.checkpoints.values())


def test_isolated_grad_norm_outliers_are_skipped_but_never_repaired(tmp_path):
    """Real small-batch runs have grad norms 5x their mean now and then, three within 90 steps at times."""
    outliers = {400, 700, 1440, 1475, 1527, 2100}

    def shape(loop, values):
        if loop.step in outliers and loop.step not in loop.kinds("skip_update"):
            values["grad_norm"] *= 5
        return values

    loop = Loop(supervise(tmp_path), shape)
    assert loop.run(3000) == "finished"
    assert sorted(loop.kinds("skip_update")) == sorted(outliers)
    assert {k for _, k in loop.actions} == {"skip_update"}
    assert all(loop.checkpoints.values())  # no incident was opened


# -- update trouble: non-finite values and spikes ----------------------------------------------


def test_a_nan_step_is_skipped_logged_and_judged(tmp_path):
    def shape(loop, values):
        if loop.step == 500 and not loop.kinds("skip_update"):
            values["loss"] = values["grad_norm"] = math.nan
        return values

    loop = Loop(supervise(tmp_path), shape)
    assert loop.run(1000) == "finished"
    assert loop.actions == [(500, "skip_update")]
    (signal,) = entries(tmp_path, "signal")
    assert (signal["name"], signal["step"], signal["evidence"]["loss"]) == ("nonfinite", 500, "nan")
    assert [e["name"] for e in entries(tmp_path, "action")] == ["skip_update"]
    (outcome,) = entries(tmp_path, "outcome")
    assert outcome["name"] == "skip_update" and outcome["evidence"]["recovered"] == 1 and outcome["step"] == 600
    # Checkpoints written while the incident was open are no place to roll back to.
    assert (loop.checkpoints[550], loop.checkpoints[600], loop.checkpoints[650]) == (False, False, True)


def test_spike_values_stay_out_of_the_rolling_statistics(tmp_path):
    supervisor = supervise(tmp_path)
    rng = random.Random(0)
    for step in range(300):
        supervisor.observe(StepRecord(step=step, tokens=step, **healthy(step, rng)))
    mean, ewm = supervisor.loss_spike.window.mean, supervisor.divergence.level
    actions = supervisor.observe(StepRecord(step=300, tokens=300, **{**healthy(300, rng), "loss": 40.0}))
    assert [a.kind for a in actions] == ["skip_update"]
    assert (supervisor.loss_spike.window.mean, supervisor.divergence.level) == (mean, ewm)


def test_isolated_loss_spikes_are_skipped_and_do_not_escalate(tmp_path):
    def shape(loop, values):
        if loop.step % 300 == 150 and loop.step not in loop.kinds("skip_update"):
            values["loss"] *= 3
            values["grad_norm"] *= 8
        return values

    loop = Loop(supervise(tmp_path), shape)
    assert loop.run(3000) == "finished"
    assert loop.kinds("skip_update") == list(range(150, 3000, 300))
    assert {k for _, k in loop.actions} == {"skip_update"}
    outcomes = entries(tmp_path, "outcome")
    assert len(outcomes) == 10 and all(o["evidence"]["recovered"] == 1 for o in outcomes)


def test_a_cluster_of_spikes_rolls_back_before_it_and_skips_batches(tmp_path):
    supervisor = supervise(tmp_path, max_steps=3000)

    def shape(loop, values):
        if 1030 <= loop.cursor < 1040:  # ten bad batches in a row
            values["loss"] *= 4
        return values

    loop = Loop(supervisor, shape)
    assert loop.run(3000) == "finished"
    assert loop.kinds("skip_update") == [1030, 1030, 1030]  # the step holds while the batches are dropped
    assert loop.rollbacks == [(1030, 1000, 10)]  # skip_min=10 > 0.2% of 3000
    (rollback,) = entries(tmp_path, "action", "rollback")
    assert rollback["evidence"] == {
        "from_step": 1030,
        "to_step": 1000,
        "steps_lost": 30,
        "tokens_lost": 30 * TOKENS_PER_STEP,
        "skip_batches": 10,
    }
    failed, worked = entries(tmp_path, "outcome")
    assert (failed["name"], failed["evidence"]["recovered"]) == ("skip_update", 0)
    assert (worked["name"], worked["evidence"]["recovered"]) == ("rollback", 1)
    assert loop.cursor > loop.step + 10  # the bad stretch was skipped, not replayed


def test_skip_batches_scale_with_the_run_and_are_clamped(tmp_path):
    def first_rollback(max_steps):
        supervisor = supervise(tmp_path, max_steps=max_steps)
        loop = Loop(supervisor, lambda loop, v: {**v, "loss": math.nan} if loop.step == 100 else v)
        loop.run(200)
        return loop.rollbacks[0][2]

    assert first_rollback(1000) == 10  # 0.2% of 1000 = 2, raised to skip_min
    assert first_rollback(100_000) == 200
    assert first_rollback(10_000_000) == 500  # PaLM's largest skip


# -- state trouble and the escalation ladder ---------------------------------------------------


def too_high_lr(threshold: float):
    """A learning rate above `threshold`× blows the activations up and makes the loss climb, the sooner
    the higher it is: each cut lets the run learn further before the blow-up."""

    def shape(loop, values):
        if loop.lr_scale > threshold:
            start = 20 / loop.lr_scale
            if loop.step > start:
                values["act_norm"] *= math.exp((loop.step - start) / 4)
                values["loss"] *= 1 + (loop.step - start) / 20
        return values

    return shape


def test_a_too_high_learning_rate_is_cut_for_as_long_as_each_cut_makes_progress(tmp_path):
    loop = Loop(supervise(tmp_path), too_high_lr(0.1), checkpoint_every=25)
    assert loop.run(1500) == "finished"
    assert loop.lr_scale == 0.0625  # four cuts: more than any fixed number of cuts would have allowed
    assert "reset_optimizer" not in loop.kinds_seen() and "stop" not in loop.kinds_seen()
    assert len(loop.kinds("scale_lr")) == len(loop.kinds("set_clip")) == 4
    assert "act_growth" in {e["name"] for e in entries(tmp_path, "signal")}
    outcomes = entries(tmp_path, "outcome")
    assert [(e["name"], e["evidence"]["recovered"]) for e in outcomes][-4:] == [
        ("lower_lr", 0),
        ("lower_lr", 0),
        ("lower_lr", 0),
        ("lower_lr", 1),
    ]
    assert all(e["evidence"]["progress"] == 1 and "made progress" in e["message"] for e in outcomes[-4:-1])
    assert entries(tmp_path, "action", "set_clip")[-1]["evidence"]["value"] == 1 / 16


def test_an_lr_cut_that_makes_no_progress_ends_the_cuts(tmp_path):
    """The activations blow up at step 300 whatever the learning rate: the first cut learns no further
    than the run before it, so the ladder moves on to the optimizer reset, and then stops."""

    def shape(loop, values):
        if loop.step > 300:
            values["act_norm"] *= math.exp((loop.step - 300) / 4)
            values["loss"] *= 1 + (loop.step - 300) / 20
        return values

    loop = Loop(supervise(tmp_path), shape, checkpoint_every=25)
    assert loop.run(1500) == "stopped"
    repairs = [k for _, k in loop.actions if k not in ("skip_update", "set_clip")]
    assert repairs == ["rollback", "rollback", "scale_lr", "rollback", "reset_optimizer", "stop"]
    (cut,) = [e for e in entries(tmp_path, "outcome") if e["name"] == "lower_lr"]
    assert cut["evidence"]["progress"] == 0 and "made no progress" in cut["message"]


def test_slow_divergence_rolls_back_before_the_climb_and_a_failed_rollback_means_an_lr_cut_next_time(tmp_path):
    supervisor = supervise(tmp_path)

    def shape(loop, values):
        for start, stopped_by in ((1200, 0.6), (2200, 0.3)):  # two bouts; only a lower lr ends each
            if loop.step >= start and loop.lr_scale > stopped_by:
                values["loss"] *= 1 + min(loop.step - start, 600) / 400
        return values

    loop = Loop(supervisor, shape)
    assert loop.run(3000) == "finished"
    signals = entries(tmp_path, "signal", "divergence")
    assert len(signals) == 3 and 1200 < signals[0]["step"] < 1350
    first, second, third = loop.rollbacks
    assert first[1] <= 1200 and second[1] <= 1200  # landed before the climb began
    repairs = [k for _, k in loop.actions if k not in ("skip_update",)]
    assert repairs[:5] == ["rollback", "rollback", "scale_lr", "set_clip", "rollback"]
    # The second bout: the rollback alone had failed before, so the lr cut comes first.
    assert repairs[5:] == ["scale_lr", "set_clip"] and third[0] > 2200
    assert supervisor.first_rung == "lower_lr" and loop.lr_scale == 0.25


def climb(start: int, until: int):
    """The slow climb above: the training loss rises from `start` for as long as loop.step < until."""

    def factor(loop) -> float:
        return 1 + min(max(loop.step - start, 0), 600) / 400 if loop.step < until else 1.0

    return factor


def healthy_val(loop) -> float:
    """A held-out loss that keeps falling, a little above the training loss, without batch noise."""
    return 2.5 + 5.3 * math.exp(-loop.step / 250) - 1e-5 * loop.step


def test_a_training_loss_climb_the_held_out_loss_does_not_share_is_not_repaired(tmp_path):
    """A model that memorises its corpus: batch losses swing up for a while, the held-out loss falls."""
    up = climb(1200, 1500)
    loop = Loop(supervise(tmp_path), lambda loop, v: {**v, "loss": v["loss"] * up(loop)}, val=healthy_val)
    assert loop.run(3000) == "finished"
    assert loop.rollbacks == [] and not entries(tmp_path, "signal") and not entries(tmp_path, "action")
    unconfirmed = entries(tmp_path, "info", "divergence_unconfirmed")
    assert unconfirmed and 1250 < unconfirmed[0]["step"] < 1500
    first = unconfirmed[0]["evidence"]
    assert first["reference_step"] <= first["calm_step"] and first["val_loss"] < first["reference_val_loss"]
    assert "did not rise" in unconfirmed[0]["message"]


def test_an_overfitting_run_is_judged_against_its_last_evaluation_before_the_climb_not_its_best(tmp_path):
    """From step ~1000 on the held-out loss rises slowly (2% per 200 steps), ~8% above its best by step
    2000: that is overfitting, not the climb, which is judged against the evaluation just before it."""
    up = climb(2000, 2300)
    loop = Loop(
        supervise(tmp_path),
        lambda loop, v: {**v, "loss": v["loss"] * up(loop)},
        val=lambda loop: healthy_val(loop) + 3e-4 * max(loop.step - 400, 0),
    )
    assert loop.run(3000) == "finished"
    assert loop.rollbacks == [] and not entries(tmp_path, "signal", "divergence")
    unconfirmed = [e["evidence"] for e in entries(tmp_path, "info", "divergence_unconfirmed")]
    assert unconfirmed and all(e["reference_step"] == 2000 and 0 < e["val_rise"] < 0.05 for e in unconfirmed)


def test_a_climb_the_held_out_loss_shares_is_repaired_and_says_so(tmp_path):
    up = climb(1200, 3000)

    def shape(loop, v):
        return {**v, "loss": v["loss"] * up(loop)} if loop.lr_scale == 1 else v

    loop = Loop(
        supervise(tmp_path), shape, val=lambda loop: healthy_val(loop) * up(loop) if loop.lr_scale == 1 else 2.6
    )
    assert loop.run(3000) == "finished"
    (first, *_) = entries(tmp_path, "signal", "divergence")
    assert 1250 < first["step"] < 1400 and "held-out loss rose" in first["message"]
    assert first["evidence"]["val_rise"] > 0.05 and loop.rollbacks and loop.rollbacks[0][1] <= 1200
    assert loop.lr_scale == 0.5 and not entries(tmp_path, "info", "divergence_unconfirmed")


def test_a_repair_whose_held_out_loss_came_back_worked_though_the_training_average_did_not(tmp_path):
    """After the rollback the batches run 15% higher (other data), the held-out loss is back: no second repair."""
    up = climb(1200, 3000)

    def shape(loop, v):
        return {**v, "loss": v["loss"] * (1.15 if loop.rollbacks else up(loop))}

    loop = Loop(supervise(tmp_path), shape, val=lambda loop: healthy_val(loop) * (1 if loop.rollbacks else up(loop)))
    assert loop.run(3000) == "finished"
    assert len(loop.rollbacks) == 1 and loop.lr_scale == 1
    (outcome,) = entries(tmp_path, "outcome", "rollback")
    assert outcome["evidence"]["recovered"] == 1 and "held-out loss" in outcome["message"]


def test_persistent_trouble_climbs_every_rung_then_stops_with_a_diagnosis(tmp_path):
    """NaN at step 300 whatever the repair (a broken batch range or kernel): nothing helps."""
    loop = Loop(supervise(tmp_path), lambda loop, v: {**v, "loss": math.nan} if loop.step >= 300 else v)
    assert loop.run(3000) == "stopped"
    repairs = [k for _, k in loop.actions if k not in ("skip_update", "set_clip")]
    # The lr cut changed nothing before the NaN (no progress), so no second cut: rung 4, then the stop.
    assert repairs == ["rollback", "rollback", "scale_lr", "rollback", "reset_optimizer", "stop"]
    assert loop.reset_moments == 1 and loop.lr_scale == 0.5
    assert "every repair failed" in loop.diagnosis and "optim.lr" in loop.diagnosis
    (stop,) = entries(tmp_path, "action", "stop")
    assert stop["evidence"]["repairs_used"] == 3


def test_the_repair_budget_ends_the_run_when_spent(tmp_path):
    loop = Loop(supervise(tmp_path, max_repairs=2), lambda loop, v: {**v, "loss": math.nan} if loop.step >= 300 else v)
    assert loop.run(3000) == "stopped"
    assert len(loop.rollbacks) == 2
    assert "budget of 2 repairs is spent" in loop.diagnosis


def test_without_the_stop_rung_the_supervisor_gives_up_and_carries_on(tmp_path):
    loop = Loop(
        supervise(tmp_path, stop_on_failure=False, lower_lr=False, reset_optimizer=False),
        lambda loop, v: {**v, "loss": math.nan} if 300 <= loop.cursor < 340 else v,
    )
    assert loop.run(1000) == "finished"
    assert "stop" not in {k for _, k in loop.actions}
    assert entries(tmp_path, "info", "unrepaired")


def test_rungs_turned_off_are_not_used(tmp_path):
    loop = Loop(
        supervise(tmp_path, rollback=False),
        lambda loop, v: {**v, "loss": math.nan} if loop.step >= 300 else v,
    )
    assert loop.run(3000) == "stopped"
    assert loop.rollbacks == [] and loop.kinds("scale_lr") and loop.reset_moments == 1


# -- fp16 and throughput ---------------------------------------------------------------------


def test_fp16_routine_overflows_are_skipped_quietly_and_a_loss_scale_collapse_is_repaired(tmp_path):
    def shape(loop, values):
        overflow = loop.loss_scale > 4096 or (loop.step >= 1500 and loop.lr_scale == 1.0)
        if overflow:  # the first steps find the scale from 2^16; from step 1500 every step overflows
            values["grad_norm"] = math.inf
        return values

    loop = Loop(supervise(tmp_path), shape, fp16=True)
    assert loop.run(3000) == "finished"
    assert loop.kinds("skip_update")[:4] == [0, 0, 0, 0]
    signals = entries(tmp_path, "signal")
    assert [s["name"] for s in signals] == ["loss_scale_collapse", "loss_scale_collapse"]
    assert signals[0]["evidence"]["halvings"] == 10
    assert loop.rollbacks[0][1] == 1450 and loop.lr_scale == 0.5
    assert len(entries(tmp_path, "action", "skip_update")) == 0  # overflows are the scaler's business


def test_a_throughput_collapse_is_logged_once_and_not_repaired(tmp_path):
    loop = Loop(supervise(tmp_path), lambda loop, v: {**v, "step_seconds": 1.0} if 800 <= loop.step < 900 else v)
    assert loop.run(1500) == "finished"
    assert loop.actions == []
    (signal,) = entries(tmp_path, "signal")
    assert signal["name"] == "slow_steps" and signal["step"] == 819
    assert all(loop.checkpoints.values())


# -- state, config, cost -----------------------------------------------------------------------


def test_state_dict_survives_torch_save_and_weights_only_load_and_resumes_identically(tmp_path):
    rng = random.Random(7)
    records = []
    for step in range(1400):
        values = healthy(step, rng)
        if step in (650, 660):
            values["loss"] *= 5  # an incident is open at the save point
        records.append(StepRecord(step=step, tokens=step * TOKENS_PER_STEP, **values))
    original = supervise(tmp_path / "a")
    for record in records[:700]:
        original.observe(record)
    original.checkpoint_is_good(700)
    torch.save({"supervisor": original.state_dict()}, tmp_path / "state.pt")
    resumed = supervise(tmp_path / "b")
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True)["supervisor"])
    assert resumed.state_dict() == original.state_dict()
    for record in records[700:]:
        assert resumed.observe(record) == original.observe(record)
    assert resumed.state_dict() == original.state_dict()
    assert entries(tmp_path / "b", "outcome") and entries(tmp_path / "b", "outcome")[0]["step"] == 760


def test_checkpoints_written_during_an_incident_are_not_good(tmp_path):
    supervisor = supervise(tmp_path)
    rng = random.Random(0)
    for step in range(200):
        supervisor.observe(StepRecord(step=step, tokens=step, **healthy(step, rng)))
    assert supervisor.checkpoint_is_good(200)
    supervisor.observe(StepRecord(step=200, tokens=200, **{**healthy(200, rng), "loss": math.nan}))
    assert not supervisor.checkpoint_is_good(200)


def test_a_disabled_supervisor_does_nothing(tmp_path):
    supervisor = supervise(tmp_path, enabled=False)
    record = StepRecord(
        step=0, loss=math.nan, grad_norm=math.nan, lr=1e-3, tokens=1, step_seconds=0.1, act_norm=1.0, logit_norm=1.0
    )
    assert supervisor.observe(record) == [] and supervisor.checkpoint_is_good(0)
    assert not (tmp_path / "logbook.jsonl").exists()


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("reset_moments", "exp_avg,momentum", "exp_avg_sq"),
        ("lr_factor", 0.0, "(0, 1]"),
        ("spike_warmup", 500, "spike_window"),
        ("loss_spike_ratio", 1.0, "above 1"),
        ("judge_steps", 0, "positive"),
        ("skip_min", 600, "skip_max"),
    ],
)
def test_bad_supervisor_settings_are_user_errors_naming_the_key(tmp_path, key, value, words):
    with pytest.raises(UserError) as error:
        supervise(tmp_path, **{key: value})
    assert f"supervisor.{key}" in str(error.value) and words in str(error.value)


def test_observe_keeps_bounded_state_so_each_step_costs_the_same(tmp_path):
    """No history grows with the run: the state after 20k steps is no bigger than after 5k."""
    sizes = []
    for steps in (5_000, 20_000):
        supervisor = supervise(tmp_path, max_steps=steps)
        rng = random.Random(0)
        for step in range(steps):
            supervisor.observe(StepRecord(step=step, tokens=step, **healthy(step, rng)))
            if step % 50 == 0:
                supervisor.checkpoint_is_good(step)
        sizes.append(len(pickle.dumps(supervisor.state_dict())))
    assert sizes[1] <= sizes[0] * 1.05


@pytest.mark.parametrize("monitor", ["loss_spike", "grad_spike"])
def test_the_device_skips_exactly_at_the_supervisors_thresholds(tmp_path, monitor):
    supervisor = supervise(tmp_path)
    loop = Loop(supervisor)
    loop.run(max_steps=300)
    spike = getattr(supervisor, monitor)
    mean, std, ratio_limit = spike.limits()
    assert std > 0 and math.isfinite(ratio_limit)
    sigma_limit = mean + supervisor.config.spike_sigma * std
    typical = {"loss": supervisor.loss_spike.level, "grad_norm": supervisor.grad_spike.level}
    field = "loss" if monitor == "loss_spike" else "grad_norm"
    for threshold in (sigma_limit, ratio_limit):
        for value in (math.nextafter(threshold, 0), threshold, math.nextafter(threshold, math.inf)):
            limits = torch.tensor(supervisor.skip_limits(), dtype=torch.float64)
            values = typical | {field: value}
            dropped = skip_update(
                torch.tensor(values["loss"], dtype=torch.float64),
                torch.tensor(values["grad_norm"], dtype=torch.float64),
                limits,
            )
            assert bool(dropped) == (spike.check(value, 300) is not None), (threshold, value)
