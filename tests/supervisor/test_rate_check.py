"""The supervisor's rate check: the run so far replayed at half the rate, the better branch kept."""

import json
from pathlib import Path

import torch
from conftest import TINY

from keel import config as config_lib
from keel.runs.rundir import init_run_dir
from keel.train import checkpoint as ckpt
from keel.train.loop import train

CHECK = [
    "train.max_steps=48",
    "supervisor.rate_check_steps=7",
    "train.eval_every=12",
    "train.checkpoint_every=12",
    "train.keep_checkpoints=9",
]


def run(data: Path, run_dir: Path, *extra: str):
    config = init_run_dir(config_lib.load(None, [f"data.path={data}", *TINY, *CHECK, *extra]), run_dir)
    return train(config, run_dir, registry=None, progress=False)


def rate_checks(run_dir: Path) -> list[dict]:
    lines = (run_dir / "logbook.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["name"] == "rate_check"]


def loop_state(run_dir: Path, step: int) -> dict:
    path = next(p for p in ckpt.list_checkpoints(run_dir) if ckpt.checkpoint_step(p) == step)
    return torch.load(path / ckpt.STATE, weights_only=True)["loop"]


def test_a_far_too_high_rate_is_halved_until_halving_stops_helping(tiny_data, tmp_path):
    result = run(tiny_data, tmp_path / "high", "optim.optimizer=adamw", "optim.lr=0.3")
    assert result.status == "finished"
    [check] = rate_checks(tmp_path / "high")
    assert check["kind"] == "action" and check["step"] == 12, check  # warmup 5 + 7 steps
    losses, kept = check["evidence"]["val_loss_by_lr_multiplier"], check["evidence"]["lr_multiplier"]
    assert kept <= 0.5, check
    assert all(loss > losses[f"{kept:g}"] for m, loss in losses.items() if float(m) > kept), check
    assert min(map(float, losses)) == kept / 2  # halving went on until it stopped helping
    # The checkpoint of the check's step holds the kept branch, and the rest of the run keeps its rate.
    assert loop_state(tmp_path / "high", 12)["lr_scale"] == kept and loop_state(tmp_path / "high", 12)["rate_checked"]
    assert loop_state(tmp_path / "high", 48)["lr_scale"] == kept


def test_a_good_rate_is_kept_and_a_short_run_is_not_checked(tiny_data, tmp_path):
    run(tiny_data, tmp_path / "good", "optim.optimizer=adamw")
    [check] = rate_checks(tmp_path / "good")
    assert check["kind"] == "info" and check["evidence"]["lr_multiplier"] == 1.0, check
    assert loop_state(tmp_path / "good", 48)["lr_scale"] == 1.0
    run(tiny_data, tmp_path / "short", "train.max_steps=40")  # under 4x the check's 12 steps
    assert not rate_checks(tmp_path / "short")
