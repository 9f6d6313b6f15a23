"""Every command once end to end, and the bad inputs a user can make, through the real CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_user_error, keel, kill_at_checkpoint, tiny_train_args

from keel.runs.registry import Registry
from keel.supervisor.logbook import read_logbook
from keel.train.loop import can_compile


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    result = keel(*tiny_train_args(tiny_data, run_dir), env={"KEEL_HOME": str(home)})
    assert result.returncode == 0, result.stderr
    return run_dir, home


def test_train_writes_a_complete_run_dir(trained):
    run_dir, home = trained
    assert (run_dir / "config.yaml").is_file() and (run_dir / "tokenizer.json").is_file()
    steps = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert steps[-1] == "step_00000030"
    with Registry(home / "registry.sqlite") as registry:
        run = registry.get_run("tiny")
        losses = registry.metrics("tiny", "loss")["loss"]
    assert run["status"] == "finished" and run["step"] == 30 and run["best_val_loss"] is not None
    assert [s for s, _ in losses] == list(range(30))
    first, last = sum(v for _, v in losses[:5]) / 5, sum(v for _, v in losses[-5:]) / 5
    assert last < first - 0.5  # it learns


def test_sample_eval_and_runs(trained):
    run_dir, home = trained
    env = {"KEEL_HOME": str(home)}
    sample = keel("sample", str(run_dir), "--prompt", "def ", "--max-new-tokens", "20", "--seed", "1", env=env)
    assert sample.returncode == 0, sample.stderr
    assert sample.stdout.startswith("def ") and len(sample.stdout) > 10
    again = keel("sample", str(run_dir), "--prompt", "def ", "--max-new-tokens", "20", "--seed", "1", env=env)
    assert again.stdout == sample.stdout  # the seed fixes the sample
    evaluation = keel("eval", str(run_dir), env=env)
    assert evaluation.returncode == 0, evaluation.stderr
    assert "val loss" in evaluation.stdout and "bits/byte" in evaluation.stdout
    # the diffusion-only flags are refused on a language model, never silently ignored
    assert_user_error(keel("sample", str(run_dir), "--columns", "3", env=env), "--columns", "diffusion runs")
    assert_user_error(keel("sample", str(run_dir), "--guidance", "2", env=env), "--guidance")
    assert_user_error(keel("eval", str(run_dir), "--samples", "10", env=env), "--samples", "diffusion runs")
    runs = keel("runs", env=env)
    assert runs.returncode == 0 and "tiny" in runs.stdout and "finished" in runs.stdout
    logbook = keel("logbook", str(run_dir), env=env)
    assert logbook.returncode == 0 and "reached train.max_steps=30" in logbook.stdout and "summary" in logbook.stdout
    report = keel("report", str(run_dir), env=env)
    assert report.returncode == 0, report.stderr
    page = (run_dir / "report" / "index.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "Logbook" in page
    assert "optim.lr" in keel("config").stdout


def test_prepare_prints_a_summary(corpus_dir, tmp_path):
    result = keel(
        "prepare", str(corpus_dir), "--out", str(tmp_path / "d"), "--vocab-size", "300", "--val-fraction", "0.2"
    )
    assert result.returncode == 0, result.stderr
    assert "train:" in result.stdout and "tokens" in result.stdout
    assert json.loads((tmp_path / "d" / "manifest.json").read_text())["tokenizer"]["vocab_size"] == 300


def test_bad_prepare_inputs(corpus_dir, tmp_path):
    assert_user_error(keel("prepare", str(tmp_path / "missing"), "--out", str(tmp_path / "o")), "missing")
    binary = tmp_path / "binary"
    binary.mkdir()
    (binary / "blob.txt").write_bytes(bytes(range(256)) * 10)
    assert_user_error(keel("prepare", str(binary), "--out", str(tmp_path / "o")))
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"text": "fine line of text that is long enough to keep"}\n{oops\n')
    assert_user_error(keel("prepare", str(bad_jsonl), "--out", str(tmp_path / "o")), "bad.jsonl:2")
    assert not (tmp_path / "o").exists()  # nothing half-written
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    assert_user_error(keel("prepare", str(corpus_dir), "--out", str(existing)), "--force")
    assert (existing / "keep.txt").read_text() == "mine"


def test_bad_train_inputs(tiny_data, trained, tmp_path):
    run_dir, home = trained
    env = {"KEEL_HOME": str(home)}
    assert_user_error(keel(*tiny_train_args(tiny_data, tmp_path / "r", "optim.lrr=1")), "optim.lr")
    assert_user_error(keel(*tiny_train_args(tiny_data, tmp_path / "r", "optim.lr=-1")), "optim.lr")
    assert_user_error(keel(*tiny_train_args(tiny_data, tmp_path / "r", "model.n_head=3")), "model.n_head")
    assert_user_error(keel(*tiny_train_args(tiny_data, tmp_path / "r", "model.n_kv_head=3")), "model.n_kv_head")
    assert_user_error(keel(*tiny_train_args(tmp_path / "nodata", tmp_path / "r")), "nodata")
    assert_user_error(
        keel(*tiny_train_args(tiny_data, tmp_path / "r", "model.context_length=100000")), "context_length"
    )
    assert_user_error(keel("train", "--config", str(tmp_path / "nope.yaml")), "nope.yaml")
    # Resuming with another model shape is refused and the run is left as it was.
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    config_before = (run_dir / "config.yaml").read_text()
    assert_user_error(keel(*tiny_train_args(tiny_data, run_dir, "model.d_model=128"), env=env), "model.d_model")
    assert_user_error(
        keel(*tiny_train_args(tiny_data, run_dir, "optim.optimizer=adamw"), env=env), "optim.optimizer=muon"
    )
    assert_user_error(keel(*tiny_train_args(tiny_data, tmp_path / "r", "train.compile=maybe")), "train.compile")
    assert_user_error(keel(*tiny_train_args(tiny_data, tmp_path / "r", "model.attention=flash")), "model.attention")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before
    assert (run_dir / "config.yaml").read_text() == config_before
    assert_user_error(keel("sample", str(tmp_path / "norun")), "not a keel run directory")
    assert_user_error(keel("sample", str(run_dir), "--temperature", "nan"), "--temperature")
    assert_user_error(keel("sample", str(run_dir), "--top-p", "1.5"), "--top-p")


def _final_weights(run_dir: Path) -> bytes:
    return (run_dir / "checkpoints" / "step_00000030" / "model.safetensors").read_bytes()


def test_the_watchdog_side_of_keel_train_does_not_import_torch(tiny_data, tmp_path):
    """The watchdog lives as long as the run beside its trainer: torch would cost it 2 s to start and
    ~200 MB for nothing. --write-only goes through every check and write before the watchdog starts."""
    args = tiny_train_args(tiny_data, tmp_path / "run")
    code = (
        "import sys; from keel.cli import main; import keel.supervisor.watchdog; "
        f"assert main({[*args, '--write-only']!r}) == 0; assert 'torch' not in sys.modules, 'torch imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "run" / "config.yaml").is_file()


def test_exact_resume_after_sigkill(tiny_data, trained, tmp_path):
    """Kill the whole process tree mid-run, run the same command again: same losses, same weights."""
    reference_dir, reference_home = trained
    home = tmp_path / "home"
    run_dir = tmp_path / "killed"
    args = [sys.executable, "-m", "keel.cli", *tiny_train_args(tiny_data, run_dir, "train.max_steps=30")]
    env = {**os.environ, "KEEL_HOME": str(home)}
    kill_at_checkpoint(args, run_dir, 10, env)
    assert not (run_dir / "checkpoints" / "step_00000030").exists()

    resumed = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert _final_weights(run_dir) == _final_weights(reference_dir)
    with Registry(home / "registry.sqlite") as a, Registry(reference_home / "registry.sqlite") as b:
        assert a.metrics("killed", "loss") == b.metrics("tiny", "loss")
        assert len(a.segments("killed")) == 2  # the run really was resumed


@pytest.mark.skipif(not can_compile(torch.device("cpu")), reason="torch.compile needs a C++ compiler on a CPU")
def test_compiled_run_killed_and_resumed_ends_with_the_uninterrupted_weights(tiny_data, tmp_path):
    """Compiled CPU kernels are deterministic (train.deterministic): a resumed process compiling from
    the warm cache computes what the uninterrupted one compiled cold."""
    # One block: the compile (cold, ~30 s of a 1-thread process) is most of the test, and the kernel that
    # needed deterministic mode (the embedding's backward) is there with any depth.
    sets = ("model.n_layer=1", "train.compile=true", "train.max_steps=40", "train.checkpoint_every=10")
    reference = tmp_path / "reference"
    result = keel(*tiny_train_args(tiny_data, reference, *sets))
    assert result.returncode == 0, result.stderr
    # The trainer dies by SIGKILL after step 25, as the out-of-memory killer would end it; the watchdog
    # starts another, which compiles again and resumes from step 20's checkpoint.
    killed = tmp_path / "killed"
    result = keel(*tiny_train_args(tiny_data, killed, *sets, "watchdog.backoff_s=0.5"), env={"KEEL_FAULTS": "kill@25"})
    assert result.returncode == 0, result.stderr
    assert [e["name"] for e in read_logbook(killed / "logbook.jsonl") if e["kind"] == "restart"] == ["restart"]
    final = "checkpoints/step_00000040/model.safetensors"
    assert (killed / final).read_bytes() == (reference / final).read_bytes()


def test_eval_refuses_data_from_another_tokenizer(trained, corpus_dir, tmp_path):
    run_dir, home = trained
    other = tmp_path / "other"
    assert (
        keel("prepare", str(corpus_dir), "--out", str(other), "--vocab-size", "300", "--val-fraction", "0.2").returncode
        == 0
    )
    assert_user_error(
        keel("eval", str(run_dir), "--data", str(other), env={"KEEL_HOME": str(home)}), "another tokenizer"
    )
