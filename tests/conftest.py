"""Shared fixtures: a small real corpus (stdlib modules) prepared once, and a private registry."""

import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import pytest

STDLIB = Path(sysconfig.get_paths()["stdlib"])
CORPUS_MODULES = [
    "argparse.py",
    "textwrap.py",
    "string.py",
    "shlex.py",
    "csv.py",
    "difflib.py",
    "json/decoder.py",
    "json/encoder.py",
    "calendar.py",
    "fractions.py",
    "heapq.py",
    "bisect.py",
    "queue.py",
    "pprint.py",
    "glob.py",
    "fnmatch.py",
    "tokenize.py",
    "ast.py",
    "dataclasses.py",
    "enum.py",
    "functools.py",
    "contextlib.py",
    "abc.py",
    "operator.py",
    "copy.py",
    "shutil.py",
    "tempfile.py",
    "configparser.py",
]

# A tiny model that trains in seconds on two CPU cores; float32 keeps it fast at this size.
TINY = [
    "model.n_layer=2",
    "model.d_model=64",
    "model.n_head=4",
    "model.n_kv_head=2",
    "model.context_length=64",
    "train.batch_size=4",
    "train.max_steps=30",
    "train.eval_every=10",
    "train.eval_batches=2",
    "train.checkpoint_every=10",
    "train.log_every=5",
    "train.dtype=float32",
    "optim.warmup_steps=5",
    "optim.lr=3e-3",
]
TINY_TRAIN = [s for s in TINY if not s.startswith("model.")]  # fine-tuning takes the shape from its init run


def pytest_configure(config):
    """Under pytest-xdist the cores are shared out among the workers, and so among the trainers they start
    (which read OMP_NUM_THREADS): torch's default of one thread per core in every worker oversubscribes."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


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


def keel(*args: str, env: dict | None = None, timeout: float | None = None) -> subprocess.CompletedProcess:
    """Run the real `keel` command and return its exit code and output.

    In this process by default (importing torch in a fresh interpreter costs seconds, and most
    calls are refusals that take milliseconds): the same `main()` the console script calls, with
    fds 1 and 2 captured so the output of processes it starts (the trainer) is caught too.
    With a timeout, in a subprocess, for commands that may hang.
    """
    if timeout is not None:
        return subprocess.run(
            [sys.executable, "-m", "keel.cli", *args],
            capture_output=True,
            text=True,
            env={**os.environ, **(env or {})},
            timeout=timeout,
        )
    import torch

    from keel.cli import main

    saved_env, threads = dict(os.environ), torch.get_num_threads()
    os.environ.update(env or {})
    try:
        with _captured_fds() as (out, err):
            try:
                code = main(list(args))
            except SystemExit as exit:  # argparse's own errors
                code = exit.code if isinstance(exit.code, int) else 2
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        torch.set_num_threads(threads)
    return subprocess.CompletedProcess(["keel", *args], code, out.getvalue(), err.getvalue())


@contextlib.contextmanager
def _captured_fds():
    """Point fds 1 and 2 (and sys.stdout/stderr) at temporary files; yield buffers filled on exit."""
    out, err = io.StringIO(), io.StringIO()
    sys.stdout.flush()
    sys.stderr.flush()
    saved_streams, saved_fds = (sys.stdout, sys.stderr), (os.dup(1), os.dup(2))
    files = [tempfile.TemporaryFile(), tempfile.TemporaryFile()]
    try:
        for fd, file in zip((1, 2), files):
            os.dup2(file.fileno(), fd)
        sys.stdout = open(1, "w", closefd=False, buffering=1)  # noqa: SIM115 (closed below)
        sys.stderr = open(2, "w", closefd=False, buffering=1)  # noqa: SIM115
        yield out, err
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
            stream.close()
        sys.stdout, sys.stderr = saved_streams
        for fd, saved in zip((1, 2), saved_fds):
            os.dup2(saved, fd)
            os.close(saved)
        for buffer, file in zip((out, err), files):
            file.seek(0)
            buffer.write(file.read().decode(errors="replace"))
            file.close()


def kill_at_checkpoint(args: list[str], run_dir: Path, step: int, env: dict | None = None) -> None:
    """Start `args` in its own process group, wait for the checkpoint of `step` in run_dir, then SIGKILL
    the whole group (the machine dies: watchdog and trainer together)."""
    process = subprocess.Popen(
        args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 300
    while not (run_dir / "checkpoints" / f"step_{step:08d}").exists():
        assert process.poll() is None and time.time() < deadline, f"the run ended before step {step}'s checkpoint"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def tiny_train_args(data: Path, run_dir: Path, *extra: str) -> list[str]:
    finetune = any(s.startswith("init.from=") for s in extra)
    sets = [f"data.path={data}", *(TINY_TRAIN if finetune else TINY), *extra]
    return ["train", "--run-dir", str(run_dir), *[arg for s in sets for arg in ("--set", s)]]


def assert_user_error(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: "), result.stderr
    for word in words:
        assert word in message, (word, message)


# -- fine-tuning: a tiny pretrained base run and data prepared with its tokenizer ----------------------


def run(run_dir: Path, *sets: str):
    """Train in this process (no watchdog, no registry); returns the TrainResult."""
    config = _rundir().init_run_dir(_config_lib().load(None, [*TINY_TRAIN, "train.compile=false", *sets]), run_dir)
    from keel.train.loop import train

    return train(config, run_dir, registry=None, progress=False)


@pytest.fixture(scope="session")
def base_run(tiny_data, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("base") / "run"
    model = [s for s in TINY if s.startswith("model.") and "context_length" not in s]
    assert run(run_dir, f"data.path={tiny_data}", *model, "model.context_length=128").status == "finished"
    return run_dir


@pytest.fixture(scope="session")
def sft_data(base_run, tmp_path_factory) -> Path:
    """Short documented stdlib functions as SFT examples (signature + docstring -> body), every third one
    as a chat turn, so packed rows hold several examples at context 128."""
    import json

    from keel.data import prepare

    folder = tmp_path_factory.mktemp("sft")
    lines = []
    for function in short_functions(160):
        plain = {"prompt": function.prompt, "completion": function.body}
        chat = {
            "messages": [{"role": "user", "content": function.prompt}, {"role": "assistant", "content": function.body}]
        }
        lines.append(json.dumps(chat if len(lines) % 3 == 2 else plain))
    (folder / "sft.jsonl").write_text("\n".join(lines) + "\n")
    prepare([str(folder / "sft.jsonl")], folder / "data", tokenizer=str(base_run), val_fraction=0.2, progress=False)
    return folder / "data"


def short_functions(max_chars: int):
    """Documented functions of the stdlib whose signature, docstring and body are short."""
    from keel.data.examples import documented_functions
    from keel.data.sources import python_stdlib_files

    for path in python_stdlib_files()[:300]:
        for function in documented_functions(path.read_text(errors="replace")):
            if len(function.prompt) + len(function.body) < max_chars:
                yield function


def write_pref_data(base_run: Path, folder: Path, max_pairs: int) -> Path:
    """Preference pairs made as builtin:stdlib-pref makes them (real body vs its mechanical corruption)."""
    import json

    from keel.data import prepare
    from keel.data.examples import corrupt

    lines = []
    for function in short_functions(200):
        if (rejected := corrupt(function)) is not None and len(lines) < max_pairs:
            lines.append(json.dumps({"prompt": function.prompt, "chosen": function.body, "rejected": rejected}))
    (folder / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    prepare([str(folder / "pairs.jsonl")], folder / "data", tokenizer=str(base_run), val_fraction=0.2, progress=False)
    return folder / "data"


@pytest.fixture(scope="session")
def pref_data(base_run, tmp_path_factory) -> Path:
    return write_pref_data(base_run, tmp_path_factory.mktemp("pref"), max_pairs=200)


def _config_lib():
    from keel import config

    return config


def _rundir():
    from keel.runs import rundir

    return rundir
