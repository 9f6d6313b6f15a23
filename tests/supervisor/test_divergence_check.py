"""The training loop's held-out evidence for the supervisor's divergence test, in a real run."""

import json

from conftest import TINY

from keel import config as config_lib
from keel.runs.rundir import init_run_dir
from keel.train import checkpoint as ckpt
from keel.train.loop import train

# A divergence test set on a hair trigger: any two-step rise of 0.2% over the best is a signal. Early
# in training the held-out loss falls, so the loop's evaluation must talk the supervisor out of each.
TRIGGER = [
    "train.max_steps=48",
    "train.eval_every=6",
    "train.checkpoint_every=6",
    "train.keep_checkpoints=9",
    "supervisor.rate_check_steps=0",
    "supervisor.divergence_span=2",
    "supervisor.divergence_patience=1",
    "supervisor.divergence_margin=0.002",
]


def test_divergence_signals_are_checked_against_the_loops_own_evaluations(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    config = init_run_dir(config_lib.load(None, [f"data.path={tiny_data}", *TINY, *TRIGGER]), run_dir)
    assert train(config, run_dir, registry=None, progress=False).status == "finished"
    logbook = [json.loads(line) for line in (run_dir / "logbook.jsonl").read_text().splitlines()]
    checks = [e for e in logbook if e["name"] in ("divergence", "divergence_unconfirmed")]
    assert any(e["name"] == "divergence_unconfirmed" for e in checks), checks
    scheduled = {ckpt.checkpoint_step(p): ckpt.read_meta(p)["val_loss"] for p in ckpt.list_checkpoints(run_dir)}
    for entry in checks:
        evidence = entry["evidence"]
        if "reference_step" not in evidence:  # no evaluation before the climb yet: repaired as without held-out data
            assert entry["name"] == "divergence" and evidence["calm_step"] < 6, entry
            continue
        # The reference is the last scheduled evaluation before the climb, with the value the loop saved.
        assert evidence["reference_step"] <= evidence["calm_step"] and evidence["reference_step"] % 6 == 0
        if evidence["reference_step"] in scheduled:
            assert evidence["reference_val_loss"] == scheduled[evidence["reference_step"]]
        unconfirmed = entry["name"] == "divergence_unconfirmed"
        assert unconfirmed == (evidence["val_loss"] <= evidence["reference_val_loss"] * 1.001), entry
    rollbacks = [e for e in logbook if e["name"] == "rollback"]
    assert len(rollbacks) == sum(e["name"] == "divergence" for e in checks)  # nothing unconfirmed is repaired
