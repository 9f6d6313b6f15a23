"""Shared fixtures: a small real corpus (stdlib modules) prepared once, and a private registry."""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

STDLIB = Path(sysconfig.get_paths()["stdlib"])
CORPUS_MODULES = ["argparse.py", "textwrap.py", "string.py", "shlex.py", "csv.py", "difflib.py", "json/decoder.py",
                  "json/encoder.py", "calendar.py", "fractions.py", "heapq.py", "bisect.py", "queue.py", "pprint.py",
                  "glob.py", "fnmatch.py", "tokenize.py", "ast.py", "dataclasses.py", "enum.py", "functools.py",
                  "contextlib.py", "abc.py", "operator.py", "copy.py", "shutil.py", "tempfile.py", "configparser.py"]

# A tiny model that trains in seconds on two CPU cores; float32 keeps it fast at this size.
TINY = ["model.n_layer=2", "model.d_model=64", "model.n_head=4", "model.n_kv_head=2", "model.context_length=64",
        "train.batch_size=4", "train.max_steps=30", "train.eval_every=10", "train.eval_batches=2",
        "train.checkpoint_every=10", "train.log_every=5", "train.dtype=float32", "optim.warmup_steps=5",
        "optim.lr=3e-3"]


@pytest.fixture(autouse=True)
def keel_home(tmp_path, monkeypatch):
    """Every test gets its own registry."""
    monkeypatch.setenv("KEEL_HOME", str(tmp_path / "keel-home"))
    return tmp_path / "keel-home"


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    for name in CORPUS_MODULES:
        shutil.copyfile(STDLIB / name, folder / name.replace("/", "_"))
    return folder


@pytest.fixture(scope="session")
def tiny_data(corpus_dir, tmp_path_factory) -> Path:
    from keel.data import prepare

    out = tmp_path_factory.mktemp("data") / "tiny"
    prepare([str(corpus_dir)], out, vocab_size=512, val_fraction=0.1, progress=False)
    return out


def keel(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the real `keel` command in a subprocess."""
    return subprocess.run([sys.executable, "-m", "keel.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def tiny_train_args(data: Path, run_dir: Path, *extra: str) -> list[str]:
    sets = [f"data.path={data}", *TINY, *extra]
    return ["train", "--run-dir", str(run_dir), *[arg for s in sets for arg in ("--set", s)]]


def assert_user_error(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: "), result.stderr
    for word in words:
        assert word in message, (word, message)
