"""Monitors: running statistics, each signal's trigger, and plain-type state."""

import json
import math
import random
import statistics

from keel.supervisor.monitors import (
    DivergenceMonitor,
    Ewm,
    LossScaleMonitor,
    NormGrowthMonitor,
    RollingMedian,
    SpikeMonitor,
    StepRecord,
    ThroughputMonitor,
    Window,
    nonfinite_signal,
)


def test_window_mean_and_std_match_a_recomputation_over_its_last_values():
    rng = random.Random(0)
    window, values = Window(128), []
    for _ in range(5000):  # many times the size, so the running sums have had time to drift
        value = 3.0 + rng.gauss(0, 0.05)
        window.add(value)
        values.append(value)
    assert len(window) == 128
    assert math.isclose(window.mean, statistics.mean(values[-128:]), rel_tol=1e-12)
    assert math.isclose(window.std, statistics.stdev(values[-128:]), rel_tol=1e-9)


def test_rolling_median_is_the_median_of_its_window():
    rng = random.Random(1)
    median, values = RollingMedian(51), []
    for _ in range(500):
        value = rng.expovariate(10)
        median.add(value)
        values.append(value)
        assert median.median == statistics.median(values[-51:])


def test_ewm_starts_at_the_first_value_and_follows_a_level_shift():
    ewm = Ewm(span=20)
    ewm.add(5.0)
    assert ewm.mean == 5.0
    for _ in range(200):
        ewm.add(1.0)
    assert math.isclose(ewm.mean, 1.0, abs_tol=1e-6)


def record(step=0, loss=3.0, grad_norm=0.5, loss_scale=None):
    return StepRecord(
        step=step,
        loss=loss,
        grad_norm=grad_norm,
        lr=1e-3,
        tokens=1000 * (step + 1),
        step_seconds=0.1,
        act_norm=1.0,
        logit_norm=2.0,
        loss_scale=loss_scale,
    )


def test_nonfinite_loss_or_gradient_is_a_signal_but_an_fp16_overflow_is_not():
    assert nonfinite_signal(record()) is None
    nan_loss = nonfinite_signal(record(step=7, loss=math.nan))
    assert nan_loss.name == "nonfinite" and nan_loss.trouble == "update" and nan_loss.began_step == 7
    assert "loss" in nan_loss.message
    assert nonfinite_signal(record(grad_norm=math.inf)).name == "nonfinite"  # bf16/fp32: a real problem
    # fp16: the GradScaler overflowed, lowers its scale and the step is dropped; routine.
    assert nonfinite_signal(record(grad_norm=math.inf, loss_scale=65536.0)) is None
    assert nonfinite_signal(record(loss=math.inf, grad_norm=math.inf, loss_scale=65536.0)).name == "nonfinite"


def spike_monitor(**overrides):
    args = dict(
        name="loss_spike", label="loss", window=128, sigma=6.0, warmup=64, ratio=2.0, ewm_span=20, ewm_warmup=10
    )
    return SpikeMonitor(**{**args, **overrides})


def test_spike_sigma_test_waits_for_its_warmup_then_flags_six_sigma():
    rng = random.Random(2)
    monitor = spike_monitor()
    for step in range(63):
        monitor.add(3.0 + rng.gauss(0, 0.05))
    assert monitor.check(3.6, 63) is None  # 12σ, but only 63 values: the σ test is not warm, and 3.6 < 2 × 3.0
    monitor.add(3.0)
    signal = monitor.check(3.6, 64)
    assert signal is not None and signal.evidence["sigmas"] > 6
    assert "σ" in signal.message and signal.trouble == "update"
    assert monitor.check(3.0 + 4 * monitor.window.std, 65) is None  # 4σ is noise


def test_spike_ratio_test_catches_a_spike_before_the_sigma_test_is_warm():
    monitor = spike_monitor()
    for loss in (7.5, 7.4, 7.3, 7.2, 7.1, 7.0, 6.9, 6.8, 6.7, 6.6):
        monitor.add(loss)
    signal = monitor.check(20.0, 10)
    assert signal is not None and "moving average" in signal.message
    assert monitor.check(9.0, 10) is None  # 1.3x: within what healthy batches do


def test_divergence_needs_a_sustained_rise_and_dates_it_from_the_best_step():
    monitor = DivergenceMonitor(span=50, margin=0.1, patience=50)
    rng = random.Random(3)
    signals = []
    for step in range(1200):
        level = 3.0 if step < 600 else 3.0 * (1 + (step - 600) / 300)  # flat, then climbing 1/300 per step
        signal = monitor.observe(level * (1 + rng.gauss(0, 0.03)), step)
        if signal:
            signals.append(signal)
    assert len(signals) == 1  # latched: one signal per episode, not one per step
    signal = signals[0]
    assert signal.name == "divergence" and signal.trouble == "state"
    assert 600 + 30 + 50 <= signal.step <= 600 + 150  # a 10% rise takes 30 steps, then 50 of patience
    assert 600 <= signal.began_step <= 640  # where the climb left the noise, not the oldest best
    assert signal.evidence["rise"] > 0.1


def norm_monitor(**overrides):
    args = dict(
        name="act_growth",
        label="activation RMS",
        stall_growth=100.0,
        min_progress=0.02,
        ratio=2.0,
        fast_span=10,
        slow_span=500,
        warmup=500,
    )
    return NormGrowthMonitor(**{**args, **overrides})


def falling_loss(step: int) -> float:
    return 2.2 + 4.0 * math.exp(-step / 100)


def test_norm_growth_with_a_falling_loss_is_healthy_however_far_it_goes():
    """A good but high learning rate grows the residual stream 20,000x past its initial value and keeps
    training well (docs/benchmarks.md): no bound on growth since initialisation can tell that from trouble."""
    for final in (2.5, 500.0):  # a good lr, and a few times higher: 80x and 20,000x the initial value
        monitor = norm_monitor()
        for step in range(3000):
            norm = 0.025 * (final / 0.025) ** (1 - math.exp(-step / 40))
            assert monitor.observe(norm, falling_loss(step), step) is None, (final, step)


def test_norm_growth_while_the_loss_stalls_or_climbs_is_a_signal():
    for loss in (lambda step: 6.2, lambda step: 6.2 * (1 + step / 20)):  # flat, and climbing with the blow-up
        monitor = norm_monitor()
        signals = [s for step in range(200) if (s := monitor.observe(0.025 * math.exp(step / 2), loss(step), step))]
        assert len(signals) == 1  # latched while the condition holds
        (signal,) = signals
        assert signal.name == "act_growth" and signal.trouble == "state"
        assert signal.evidence["growth"] >= 100 and signal.evidence["progress"] < 0.02
        assert signal.step < 20 and 0 <= signal.began_step < signal.step


def test_norm_growth_is_judged_against_the_loss_over_the_same_stretch():
    """Healthy early growth with a falling loss, then a late blow-up while the loss stalls: only the
    blow-up is a signal, dated from where its stretch began."""
    monitor = norm_monitor()
    signals = []
    for step in range(600):
        if step < 400:
            norm, loss = 0.025 * 400 ** (1 - math.exp(-step / 40)), falling_loss(step)
        else:
            norm, loss = 10.0 * 2 ** ((step - 400) / 3), falling_loss(400)
        if signal := monitor.observe(norm, loss, step):
            signals.append(signal)
    assert len(signals) == 1 and 400 < signals[0].step < 440 and signals[0].began_step >= 399


def test_norm_growth_against_the_long_run_average_after_warmup_while_the_loss_stalls():
    def signals(loss):
        monitor = norm_monitor()
        found = []
        for step in range(2000):
            value = 2.0 if step < 1000 else 2.0 * 2 ** ((step - 1000) / 50)  # doubles every 50 steps from step 1000
            if signal := monitor.observe(value, loss(step), step):
                found.append(signal)
        return found

    stalled = signals(falling_loss)  # flat by step 1000
    assert len(stalled) == 1 and "long-run average" in stalled[0].message
    assert 1000 < stalled[0].step < 1150 and stalled[0].began_step >= 999
    assert signals(lambda step: 6.0 * math.exp(-step / 1000)) == []  # the same drift with the loss still falling


def test_loss_scale_start_up_halvings_are_normal_but_a_later_run_of_halvings_is_a_collapse():
    monitor = LossScaleMonitor(floor=1.0, max_halvings=10)
    scale, step = 65536.0, 0
    for _ in range(6):  # the scaler finds its level from 2^16: overflow after overflow, by design
        assert monitor.observe(scale, step) is None
        scale /= 2
    for step in range(1, 500):
        assert monitor.observe(scale, step) is None
    signals = []
    for _ in range(12):  # every step overflows
        scale /= 2
        if signal := monitor.observe(scale, step):
            signals.append(signal)
    assert len(signals) == 1 and signals[0].evidence["halvings"] == 10
    assert signals[0].began_step == 499  # the first halving of the run


def test_loss_scale_below_the_floor_is_a_collapse():
    monitor = LossScaleMonitor(floor=1.0, max_halvings=10)
    assert monitor.observe(4.0, 0) is None
    assert monitor.observe(4.0, 1) is None
    assert monitor.observe(0.5, 2).name == "loss_scale_collapse"


def test_throughput_collapse_needs_a_run_of_slow_steps_and_is_a_warning():
    monitor = ThroughputMonitor(window=128, factor=3.0, patience=20, warmup=20)
    rng = random.Random(4)
    step = 0
    for step in range(300):
        seconds = 0.1 * (1 + abs(rng.gauss(0, 0.1)))
        if step % 50 == 0:
            seconds = 1.0  # a checkpoint write now and then
        assert monitor.observe(seconds, step) is None
    signals = [s for step in range(300, 340) if (s := monitor.observe(0.5, step))]
    assert len(signals) == 1 and signals[0].trouble == "warning" and signals[0].step == 319
    assert math.isclose(signals[0].evidence["median_seconds"], 0.1, rel_tol=0.1)  # slow steps stay out of the median


def test_monitor_state_is_plain_json_and_restores_exactly():
    builders = [
        spike_monitor,
        lambda: DivergenceMonitor(50, 0.1, 50),
        norm_monitor,
        lambda: LossScaleMonitor(1.0, 10),
        lambda: ThroughputMonitor(128, 3.0, 20, 20),
    ]
    spike, divergence, norm, loss_scale, throughput = monitors = [build() for build in builders]
    rng = random.Random(5)
    for step in range(300):
        value = 3.0 + rng.gauss(0, 0.05)
        spike.add(value)
        divergence.observe(value, step)
        norm.observe(value, value, step)
        loss_scale.observe(1024.0, step)
        throughput.observe(value / 30, step)
    for monitor, build in zip(monitors, builders):
        clone = build()
        clone.load_state_dict(json.loads(json.dumps(monitor.state_dict())))
        assert clone.state_dict() == monitor.state_dict()


def test_norm_monitor_state_of_an_older_keel_loads_with_the_new_fields_fresh():
    """Checkpoints written before growth was judged against the loss hold `initial` and no `rising`."""
    old = {"initial": 0.02, "fast": Ewm(10).state_dict(), "slow": Ewm(500).state_dict(), "fired": False}
    monitor = norm_monitor()
    monitor.load_state_dict(old)
    assert monitor.rising == [] and monitor.observe(1.0, 6.0, 0) is None
