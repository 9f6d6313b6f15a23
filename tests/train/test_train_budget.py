"""Time-budgeted runs: train.max_minutes ends the run, counts across restarts, and the lr schedule is
planned to end with the budget however the machine's speed changes."""

from pathlib import Path

import pytest
from conftest import TINY

from keel import config as config_lib
from keel.runs.rundir import init_run_dir
from keel.train.loop import Trainer, TrainResult, train
from keel.train.optim import lr_at

SLOW_STEPS = 40  # the machine is busy for the first 40 steps: 1 s each; then 0.25 s each


class ClockedTrainer(Trainer):
    """A real Trainer whose clock is the work it has done, at a speed that quadruples after SLOW_STEPS."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lrs: dict[int, float] = {}

    def train_seconds(self) -> float:
        done = self.state.cursor
        return min(done, SLOW_STEPS) * 1.0 + max(done - SLOW_STEPS, 0) * 0.25

    def _set_lr(self) -> float:
        lr = super()._set_lr()
        self.lrs[self.state.step] = lr
        return lr


def clocked_run(data: Path, run_dir: Path, *limits: str) -> tuple[ClockedTrainer, TrainResult]:
    config = config_lib.load(None, [f"data.path={data}", *TINY, *limits, "supervisor.enabled=false"])
    trainer = ClockedTrainer(init_run_dir(config, run_dir), run_dir, registry=None, progress=False)
    return trainer, trainer.run()


def test_the_lr_schedule_spans_the_time_budget_at_the_speed_the_machine_actually_ran(tiny_data, tmp_path):
    run_dir = tmp_path / "budget"
    trainer, result = clocked_run(tiny_data, run_dir, "train.max_steps=0", "train.max_minutes=1")
    config = trainer.config

    # 40 s bought 40 steps and the last 20 s bought 80: a plan made from the early speed would have
    # ended its schedule at step 60 and trained the other 60 steps at the floor.
    assert result.status == "time_limit" and result.steps == 120
    peak = config.optim.lr
    floor = peak * config.optim.min_lr_ratio
    lrs = [trainer.lrs[step] for step in range(120)]
    decay_start = next(step for step, lr in enumerate(lrs) if step >= config.optim.warmup_steps and lr < peak)
    # wsd holds the peak for 70% of the time (42 s: step 48 at the faster speed), then decays to the floor
    assert 48 <= decay_start <= 51
    assert all(lr == pytest.approx(peak) for lr in lrs[config.optim.warmup_steps : decay_start])
    assert all(later < earlier for earlier, later in zip(lrs[decay_start:], lrs[decay_start + 1 :]))
    assert lrs[-1] - floor < 0.05 * (peak - floor)
    # the budget's end is evaluated and saved like a finished run's
    assert result.val_loss is not None
    assert max(p.name for p in (run_dir / "checkpoints").glob("step_*")) == "step_00000120"


def test_a_resumed_run_keeps_the_time_it_already_trained(tiny_data, tmp_path):
    run_dir = tmp_path / "resumed"
    config = init_run_dir(
        config_lib.load(None, [f"data.path={tiny_data}", *TINY, "train.max_steps=0", "train.max_minutes=0.03"]), run_dir
    )
    first = train(config, run_dir, registry=None, progress=False)
    assert first.status == "time_limit" and first.steps > 0
    # a restart (the watchdog's, or the user's) finds the budget spent and trains no further
    again = train(config, run_dir, registry=None, progress=False)
    assert again.status == "time_limit" and again.steps == first.steps


def test_a_step_limit_shorter_than_the_budget_still_ends_the_schedule(tiny_data, tmp_path):
    trainer, result = clocked_run(tiny_data, tmp_path / "steps", "train.max_steps=30", "train.max_minutes=60")
    assert result.status == "finished" and result.steps == 30
    # the 30-step schedule, exactly as without the budget
    assert [trainer.lrs[step] for step in range(30)] == [lr_at(step, trainer.config.optim, 30) for step in range(30)]
