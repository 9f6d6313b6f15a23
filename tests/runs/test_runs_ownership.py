"""A run directory has one owner, holds nothing of the user's, and trains on the data it started with."""

import json
from pathlib import Path

from conftest import TINY, assert_user_error, keel, run, tiny_train_args

from keel.data.shards import sha256_file
from keel.supervisor.logbook import read_logbook
from keel.train import checkpoint as ckpt


def _names(run_dir: Path) -> list[str]:
    return [entry["name"] for entry in read_logbook(run_dir / "logbook.jsonl")]


def test_a_directory_keel_did_not_write_is_never_trained_into(tiny_data, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("my own notes\n")
    (mine / "tokenizer.json").write_text("{}")
    assert_user_error(keel(*tiny_train_args(tiny_data, mine)), "did not write", "config.yaml")
    assert sorted(p.name for p in mine.iterdir()) == ["config.yaml", "tokenizer.json"]
    assert (mine / "config.yaml").read_text() == "my own notes\n" and (mine / "tokenizer.json").read_text() == "{}"

    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    assert_user_error(keel(*tiny_train_args(tiny_data, a_file)), "is a file")
    assert_user_error(keel(*tiny_train_args(tiny_data, tiny_data)), "is the data directory")
    # A refused command leaves no half-written run directory behind.
    for bad in ("optim.lr=inf", "train.max_minutes=.inf", "optim.lr=nan"):
        assert_user_error(keel(*tiny_train_args(tiny_data, tmp_path / "new", bad)), "finite")
    assert not (tmp_path / "new").exists()


def test_resuming_on_other_data_or_tokenizer_is_refused_unless_asked(tiny_data, corpus_dir, tmp_path):
    run_dir = tmp_path / "run"
    assert run(run_dir, f"data.path={tiny_data}", *TINY, "train.max_steps=10").status == "finished"
    tokenizer_before = (run_dir / "tokenizer.json").read_bytes()
    other_tokenizer = tmp_path / "other-tokenizer"
    same_tokenizer = tmp_path / "same-tokenizer"
    some = [str(p) for p in sorted(corpus_dir.iterdir())[:12]]
    for out, extra in ((other_tokenizer, ["--vocab-size", "512"]), (same_tokenizer, ["--tokenizer", str(run_dir)])):
        assert keel("prepare", *some, "--out", str(out), "--val-fraction", "0.3", *extra).returncode == 0

    more = "train.max_steps=15"
    assert_user_error(keel(*tiny_train_args(other_tokenizer, run_dir, more)), "another tokenizer", "--new-data")
    assert_user_error(keel(*tiny_train_args(same_tokenizer, run_dir, more)), "not the data", "--new-data")
    assert (run_dir / "tokenizer.json").read_bytes() == tokenizer_before
    assert ckpt.checkpoint_step(ckpt.list_checkpoints(run_dir)[-1]) == 10

    switched = keel(*tiny_train_args(same_tokenizer, run_dir, more), "--new-data")
    assert switched.returncode == 0, switched.stderr
    assert ckpt.checkpoint_step(ckpt.list_checkpoints(run_dir)[-1]) == 15 and "new_data" in _names(run_dir)
    # ... and from then on the run's data is the new one.
    assert keel(*tiny_train_args(same_tokenizer, run_dir, "train.max_steps=16")).returncode == 0


def test_a_checkpoint_that_verifies_but_does_not_load_is_passed_over(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    assert run(run_dir, f"data.path={tiny_data}", *TINY, "train.max_steps=20").status == "finished"
    newest = ckpt.list_checkpoints(run_dir)[-1]
    # Damaged before it was checksummed: the manifest agrees with the broken file.
    (newest / ckpt.STATE).write_bytes(b"not a torch file")
    manifest = json.loads((newest / ckpt.MANIFEST).read_text())
    manifest["files"][ckpt.STATE] = {"sha256": sha256_file(newest / ckpt.STATE), "size": 16}
    (newest / ckpt.MANIFEST).write_text(json.dumps(manifest))

    result = run(run_dir, f"data.path={tiny_data}", *TINY, "train.max_steps=25")
    assert result.status == "finished" and result.steps == 25
    bad = [e for e in read_logbook(run_dir / "logbook.jsonl") if e["name"] == "corrupt_checkpoint"]
    assert len(bad) == 1 and "does not load" in bad[0]["message"] and newest.name in bad[0]["message"]
    start = [e for e in read_logbook(run_dir / "logbook.jsonl") if e["name"] == "run_start"][-1]
    assert start["step"] == 10  # resumed from the checkpoint before it


def test_no_checkpoint_that_loads_is_an_error_not_a_fresh_start(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    assert run(run_dir, f"data.path={tiny_data}", *TINY, "train.max_steps=10").status == "finished"
    for path in ckpt.list_checkpoints(run_dir):
        (path / ckpt.WEIGHTS).write_bytes(b"x")
    assert_user_error(keel(*tiny_train_args(tiny_data, run_dir, "train.max_steps=12")), "no checkpoint", "loads")
