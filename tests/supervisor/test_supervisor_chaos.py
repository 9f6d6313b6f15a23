"""The chaos scenarios at tiny scale, through the real `keel train` path (watchdog + trainer)."""

import math

import pytest
from conftest import TINY
from safetensors.numpy import load_file

from keel import config as config_lib
from keel.runs.registry import Registry
from keel.supervisor.chaos import Chaos, _entries, _final, format_scorecard

pytestmark = pytest.mark.filterwarnings("ignore")


STEPS = 60  # a scenario's fault lands at a third of the run (step 20), between checkpoints 10 apart


@pytest.fixture(scope="module")
def chaos(tiny_data, tmp_path_factory):
    """One per module (per pytest-xdist worker): the scenarios that compare with the undisturbed run
    share its reference, and each scenario trains in a directory of its own name."""
    base = config_lib.load(
        None,
        [
            f"data.path={tiny_data}",
            *TINY,
            f"train.max_steps={STEPS}",
            "train.checkpoint_every=10",
            "train.eval_every=30",
        ],
    )
    return Chaos(base, tmp_path_factory.mktemp("chaos"))


def test_nan_step_is_skipped_and_logged(chaos):
    result = chaos.nan()
    assert result.passed, result.evidence
    run_dir = chaos.out_dir / "nan"
    weights = load_file(str(_final(run_dir) / "model.safetensors"))
    assert all(math.isfinite(float(t.sum())) for t in weights.values())
    signals = [e for e in _entries(run_dir, "signal") if e["name"] == "nonfinite"]
    assert signals and signals[0]["step"] == STEPS // 3


def test_sigkilled_trainer_is_restarted_and_ends_bit_identical(chaos):
    result = chaos.sigkill(kills=2)
    assert result.passed, result.evidence
    assert "bit-identical" in result.evidence


def test_corrupt_latest_checkpoint_is_detected_and_skipped(chaos):
    result = chaos.corrupt_checkpoint()
    assert result.passed, result.evidence
    assert "sha256 mismatch" in result.evidence


def test_hung_trainer_is_detected_and_restarted(chaos):
    # Start-up (importing torch, opening the data: over 10 s on a loaded 2-core machine) has a grace
    # of its own, so the hang timeout only has to outlast a step, an evaluation and a checkpoint.
    result = chaos.hang(timeout_s=5)
    assert result.passed, result.evidence


def test_repeated_spikes_roll_back_and_skip_batches(chaos, monkeypatch):
    """Three spiking steps in one incident: skipped, then a rollback to a checkpoint before them."""
    monkeypatch.setenv("KEEL_FAULTS", "spike@30,spike@31,spike@32")
    run_dir = chaos._train("spikes")
    actions = _entries(run_dir, "action")
    kinds = [e["name"] for e in actions]
    assert kinds.count("skip_update") >= 2 and "rollback" in kinds, kinds
    rollback = next(e for e in actions if e["name"] == "rollback")
    assert rollback["evidence"]["to_step"] < 30 <= rollback["evidence"]["from_step"]
    with Registry() as registry:
        run = registry.get_run("chaos-spikes")
    assert run["status"] == "finished" and run["step"] == STEPS


def test_a_second_trainer_is_refused_while_the_owner_trains_on(chaos):
    result = chaos.second_trainer()
    assert result.passed, result.evidence
    assert "PID" in result.evidence  # the refusal names the owner


def test_a_killed_watchdog_leaves_no_orphan_and_the_run_is_taken_over(chaos):
    result = chaos.watchdog_sigkill()
    assert result.passed, result.evidence
    assert (chaos.out_dir / "watchdog_sigkill" / "keel.lock").read_text() == ""  # released at the end


def test_a_full_disk_stops_cleanly_and_the_run_resumes(chaos):
    result = chaos.disk_full()
    assert result.passed, result.evidence
    run_dir = chaos.out_dir / "disk_full"
    failed = [e for e in _entries(run_dir, "fault") if e["name"] == "checkpoint_failed"]
    assert [e["step"] for e in failed] == [20, 30, 40]  # from a third of the run, checkpoints 10 apart
    assert "File too large" in failed[0]["message"] and "intact (newest: step 10)" in failed[0]["message"]
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))


def test_a_locked_registry_does_not_stop_training(chaos):
    result = chaos.locked_registry(hold_s=5)
    assert result.passed, result.evidence


def test_a_damaged_shard_is_refused_before_training(chaos):
    result = chaos.damaged_shard()
    assert result.passed, result.evidence


def test_ten_and_twenty_times_the_lr_are_repaired_and_scored(tiny_data, tmp_path):
    """Both high-lr scenarios at tiny scale: the supervised runs finish, their lr cut, with a scorecard line each."""
    sets = [f"data.path={tiny_data}", *TINY, "model.d_model=128", "train.max_steps=60", "train.eval_every=60"]
    chaos = Chaos(config_lib.load(None, sets), tmp_path / "chaos")
    results = [chaos.high_lr("high_lr_10x"), chaos.high_lr("high_lr_20x")]
    scorecard = format_scorecard(results).splitlines()
    assert [line.split()[0] for line in scorecard[:2]] == ["high_lr_10x", "high_lr_20x"]
    for result in results:
        run_dir = chaos.out_dir / f"{result.name}_supervised"
        assert "finished" in result.evidence and "STOPPED" not in result.evidence, result.evidence
        assert _entries(run_dir, "action") and "scale_lr" in result.evidence, result.evidence
    assert results[1].passed, results[1].evidence
