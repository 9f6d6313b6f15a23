"""The demo sizes its run to the time budget, timing steps the way the real run will take them."""

import time

from keel import config as config_lib
from keel import demo
from keel.train.loop import COMPILE_MIN_STEPS, Trainer

from conftest import TINY


def test_calibration_times_real_steps(tiny_data):
    config = config_lib.load(None, [f"data.path={tiny_data}", *TINY, "train.compile=false"])
    seconds = demo._seconds_per_step(config, compiled=False)
    assert 0 < seconds < 5
    assert demo.steps_for_budget(config, minutes=1e-4) == 20  # the floor
    assert demo.steps_for_budget(config, minutes=5) > 20


def test_calibration_ignores_a_step_something_else_slowed_down(tiny_data, monkeypatch):
    config = config_lib.load(None, [f"data.path={tiny_data}", *TINY, "train.compile=false"])
    real_launch = Trainer.launch

    def launch(trainer, cursor):
        if cursor == demo.WARMUP_STEPS + 2:
            time.sleep(3.0)  # a neighbour takes the CPU for one step
        return real_launch(trainer, cursor)

    monkeypatch.setattr(Trainer, "launch", launch)
    # the mean of the five timed intervals would be over 0.6 s
    assert demo._seconds_per_step(config, compiled=False) < 0.5


def test_calibration_compiles_only_when_the_run_will(monkeypatch):
    probes = []

    def fake_seconds(config, compiled):
        probes.append(compiled)
        return 0.1 if compiled else 0.2

    monkeypatch.setattr(demo, "_seconds_per_step", fake_seconds)
    monkeypatch.setattr("keel.train.loop.can_compile", lambda device: True)
    config = config_lib.load(None)
    long_minutes = 2 * COMPILE_MIN_STEPS * 0.1 / (demo.STEP_SHARE * 60)
    assert demo.steps_for_budget(config, long_minutes) == int(2 * COMPILE_MIN_STEPS) and probes == [True]
    probes.clear()
    # compiled, it would fit 300 steps: too few to compile, so the run is eager and timed eager
    assert demo.steps_for_budget(config, 300 * 0.1 / (demo.STEP_SHARE * 60)) == 150 and probes == [True, False]
    probes.clear()
    eager = config_lib.load(None, ["train.compile=false"])
    assert demo.steps_for_budget(eager, 1.0) == int(demo.STEP_SHARE * 60 / 0.2) and probes == [False]
