"""The registry is never the reason a run dies: locked, missing, read-only or corrupt, writes wait in
memory and land later; readers get one sentence; `keel runs --import` rebuilds a run from its directory."""

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import TINY, assert_user_error, keel, tiny_train_args

from keel import config as config_lib
from keel.errors import UserError
from keel.runs import registry as registry_lib
from keel.runs.importer import import_run
from keel.runs.registry import Registry, registry_path
from keel.runs.report import write_report
from keel.runs.rundir import LOGBOOK_FILE, init_run_dir
from keel.supervisor.logbook import read_logbook
from keel.supervisor.watchdog import HEARTBEAT_FILE
from keel.train import checkpoint as ckpt
from keel.train.loop import train

# Holds SQLite's write lock (BEGIN EXCLUSIVE) from another process until its stdin closes.
LOCKER = (
    "import sqlite3, sys\n"
    "db = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
    "db.execute('BEGIN EXCLUSIVE')\n"
    "print('locked', flush=True)\n"
    "sys.stdin.readline()\n"
)


@contextmanager
def locked(path: Path):
    locker = subprocess.Popen(
        [sys.executable, "-c", LOCKER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert locker.stdout.readline().strip() == "locked"
        yield
    finally:
        locker.stdin.close()
        assert locker.wait(timeout=60) == 0


def corrupt(path: Path, how: str) -> None:
    """Turn the registry at path into text, or truncate a real one to half its size."""
    if how == "text":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"this is not a SQLite database, just some text " * 100)
        return
    with Registry(path) as registry:
        registry.start_run("old", "/runs/old", {})
        registry.log_metrics_many("old", [(step, {"loss": 1.0, "lr": 0.1}) for step in range(3000)])
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def move_aside(path: Path) -> None:
    for file in path.parent.glob(path.name + "*"):  # with its -wal and -shm
        file.rename(file.with_name("broken-" + file.name))


def registry_messages(stderr: str, words: str) -> int:
    """How many registry messages say `words`, wherever they start: the watchdog's may trail the
    trainer's progress bar, which another process cannot lift off the line."""
    return sum(words in message for message in stderr.split("registry: ")[1:])


def test_writes_during_an_exclusive_lock_do_not_raise_and_land_in_order_after_it(capsys):
    registry = Registry()
    registry.start_run("r", "/runs/r", {})
    with locked(registry_path()):
        registry.log_metrics_many("r", [(1, {"loss": 3.0}), (2, {"loss": 2.5})])
        registry.log_event("r", 2, "signal", "first")
        registry.log_event("r", 2, "action", "second")
        registry.update_run("r", step=2, status="finished")
        with Registry() as reader:  # WAL: readers get through a writer's lock, and see none of this yet
            assert reader.get_run("r")["status"] == "running" and reader.events("r") == []
        assert not registry.flush()
    assert registry.flush()
    registry.close()

    with Registry() as reader:
        assert reader.metrics("r") == {"loss": [(1, 3.0), (2, 2.5)]}
        assert [e["message"] for e in reader.events("r")] == ["first", "second"]
        assert reader.get_run("r")["status"] == "finished" and reader.get_run("r")["step"] == 2
    stderr = capsys.readouterr().err
    assert registry_messages(stderr, "cannot be written (database is locked)") == 1  # once per outage, not per write
    assert registry_messages(stderr, "usable again: 4 delayed writes saved") == 1


def test_an_import_into_a_locked_registry_is_one_sentence(tmp_path, monkeypatch):
    monkeypatch.setattr(registry_lib, "_READ_BUSY_TIMEOUT_S", 0.1)  # a person would wait a few seconds
    Registry().runs()
    run = registry_lib.RunRecord("r", "/runs/r", {}, "finished", 0, 30, 100, None, 0.0, 0.0)
    with locked(registry_path()), Registry() as registry:
        with pytest.raises(UserError, match=f"run registry {registry_path()} is locked by another process"):
            registry.import_run(run)
    with Registry() as registry:
        registry.import_run(run)
        assert registry.get_run("r")["status"] == "finished"


@pytest.mark.parametrize("how", ["text", "truncated"])
def test_a_corrupt_registry_takes_writes_and_gets_them_once_moved_aside(how, capsys):
    corrupt(registry_path(), how)
    registry = Registry()
    assert registry.start_run("r", "/runs/r", {"seed": 1}) == 0  # the run has no logbook: its first process
    registry.log_metrics("r", 1, {"loss": 3.0})
    registry.log_event("r", 1, "info", "hello")
    with pytest.raises(UserError, match=f"run registry {registry_path()} is damaged .* move it aside"):
        registry.runs()

    move_aside(registry_path())
    assert registry.flush()  # a fresh registry, with the run's row re-created before its writes
    with Registry() as reader:
        assert reader.get_run("r")["config"] == {"seed": 1} and reader.get_run("r")["status"] == "running"
        assert reader.metrics("r") == {"loss": [(1, 3.0)]}
        assert [e["message"] for e in reader.events("r")] == ["hello"]
    registry.close()
    assert registry_messages(capsys.readouterr().err, "cannot be written") == 1


def test_a_registry_moved_aside_under_a_writer_is_recreated_with_the_run():
    registry = Registry()
    registry.start_run("r", "/runs/r", {})
    registry.log_metrics("r", 1, {"loss": 3.0})
    move_aside(registry_path())
    registry.log_metrics("r", 2, {"loss": 2.0})
    registry.update_run("r", step=2)
    registry.close()
    with Registry() as reader:
        assert reader.metrics("r") == {"loss": [(2, 2.0)]}  # step 1 went with the old file
        assert reader.get_run("r")["step"] == 2


def test_an_unwritable_registry_directory_stops_nothing(tmp_path, monkeypatch, capsys):
    home = tmp_path / "not-a-directory" / "keel-home"
    home.parent.write_text("a file where KEEL_HOME's parent should be")
    monkeypatch.setenv("KEEL_HOME", str(home))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with Registry() as registry:
        registry.start_run("r", run_dir, {})
        registry.log_metrics("r", 1, {"loss": 3.0})
        with pytest.raises(UserError, match="cannot be opened for writing .* set KEEL_HOME to a writable directory"):
            registry.runs()
    stderr = capsys.readouterr().err
    assert registry_messages(stderr, "cannot be written") == 1 and registry_messages(stderr, "still unusable") == 1
    backlog = (run_dir / registry_lib.BACKLOG_FILE).read_text()
    assert json.loads(backlog) == {"step": 1, "segment": 0, "metrics": {"loss": 3.0}}


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_registry_directory_stops_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KEEL_HOME", str(tmp_path / "home"))
    Registry().runs()
    registry_path().parent.chmod(0o555)
    registry_path().chmod(0o444)
    try:
        with Registry() as registry:
            registry.start_run("r", "/runs/r", {})
            registry.log_metrics("r", 1, {"loss": 3.0})
    finally:
        registry_path().parent.chmod(0o755)
    assert registry_messages(capsys.readouterr().err, "cannot be written") == 1


def test_the_queue_is_bounded_and_moves_its_oldest_metrics_to_the_run_dir(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(registry_lib, "MAX_QUEUED_ROWS", 10)
    run_dir = tmp_path / "tiny"
    run_dir.mkdir()
    (run_dir / LOGBOOK_FILE).write_text('{"kind": "info", "name": "run_start", "step": 0}\n')  # one earlier process
    corrupt(registry_path(), "text")
    registry = Registry()
    segment = registry.start_run("r", run_dir, {})
    assert segment == 1  # numbered by the logbook while the registry cannot
    for step in range(30):
        registry.log_metrics("r", step, {"loss": float(step)}, segment)
    backlog = [json.loads(line) for line in (run_dir / registry_lib.BACKLOG_FILE).read_text().splitlines()]
    assert len(backlog) >= 20 and all(line["segment"] == 1 for line in backlog)
    move_aside(registry_path())
    assert registry.flush()
    registry.close()
    with Registry() as reader:
        in_registry = reader.metrics("r")["loss"]
        assert reader.get_run("r")["segment"] == 1  # the start itself left the queue; its row was re-created
    # In order, nothing twice, nothing lost: the oldest in the backlog, the newest in the registry.
    backlog_losses = [(line["step"], line["metrics"]["loss"]) for line in backlog]
    assert backlog_losses + in_registry == [(step, float(step)) for step in range(30)]
    assert registry_messages(capsys.readouterr().err, f"{len(backlog)} older metric rows did not fit in memory") == 1


def test_the_watchdog_marks_failed_only_a_run_that_never_said_how_it_ended():
    with Registry() as registry:
        registry.start_run("died", "/runs/died", {})
        registry.start_run("ended", "/runs/ended", {})
        registry.update_run("ended", status="stopped")
        for name in ("died", "ended", "never-started"):
            registry.fail_if_running(name)
        assert {run["name"]: run["status"] for run in registry.runs()} == {"ended": "stopped", "died": "failed"}


# -- training on a broken registry ---------------------------------------------------------------------


def tiny_config(data: Path, run_dir: Path):
    return init_run_dir(config_lib.load(None, [f"data.path={data}", *TINY, "train.compile=false"]), run_dir)


def test_training_under_another_process_lock_loses_no_row(tiny_data, tmp_path, capsys):
    Registry().runs()  # the file the other process locks
    config = tiny_config(tiny_data, tmp_path / "tiny")
    registry = Registry()
    with locked(registry_path()):
        result = train(config, tmp_path / "tiny", registry, progress=False)
        assert result.status == "finished" and result.steps == 30
    registry.close()  # the lock is gone: the queue lands
    assert not (tmp_path / "tiny" / registry_lib.BACKLOG_FILE).exists()
    with Registry() as reader:
        assert [step for step, _ in reader.metrics("tiny", "loss")["loss"]] == list(range(30))
        run = reader.get_run("tiny")
        assert run["status"] == "finished" and run["step"] == 30 and run["segment"] == 0
        assert [e["data"] for e in reader.events("tiny")] == read_logbook(tmp_path / "tiny" / LOGBOOK_FILE)
    assert registry_messages(capsys.readouterr().err, "cannot be written") == 1


def test_training_finishes_on_a_corrupt_registry_and_import_rebuilds_the_run(tiny_data, tmp_path, capsys):
    corrupt(registry_path(), "text")
    run_dir = tmp_path / "tiny"
    with Registry() as registry:
        result = train(tiny_config(tiny_data, run_dir), run_dir, registry, progress=False)
    assert result.status == "finished" and result.steps == 30
    assert registry_messages(capsys.readouterr().err, "cannot be written (file is not a database)") == 1

    move_aside(registry_path())
    with Registry() as registry:
        for _ in range(2):  # importing twice changes nothing
            import_run(run_dir, registry)
            run = registry.get_run("tiny")
            assert run["status"] == "finished" and run["step"] == 30 and run["tokens"] == result.tokens
            val_losses = registry.metrics("tiny", "val_loss")["val_loss"]
            assert [step for step, _ in val_losses] == [10, 20, 30]  # from the checkpoints' meta.json
            assert run["best_val_loss"] == min(value for _, value in val_losses)
            assert [c["step"] for c in registry.checkpoints("tiny")] == [
                ckpt.checkpoint_step(path) for path in ckpt.list_checkpoints(run_dir)
            ]
            assert [e["data"] for e in registry.events("tiny")] == read_logbook(run_dir / LOGBOOK_FILE)
            # The trainer ended with every metric still queued: they waited in the run directory.
            assert [step for step, _ in registry.metrics("tiny", "loss")["loss"]] == list(range(30))
            assert registry.segments("tiny") == [(0, 0, 30)]
        assert write_report(run_dir, registry).is_file()


def test_import_keeps_the_metrics_the_registry_has_and_reads_a_crash(tiny_data, tmp_path):
    run_dir = tmp_path / "tiny"
    with Registry() as registry:
        train(tiny_config(tiny_data, run_dir), run_dir, registry, progress=False)
        losses = registry.metrics("tiny", "loss")
        lines = (run_dir / LOGBOOK_FILE).read_text().splitlines()
        (run_dir / LOGBOOK_FILE).write_text("\n".join(lines[:-1]) + "\n")  # as if it died before run_end
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        (run_dir / HEARTBEAT_FILE).write_text(json.dumps({"step": 30, "time": 0, "pid": int(dead.stdout)}))
        import_run(run_dir, registry)
        assert registry.metrics("tiny", "loss") == losses
        assert registry.get_run("tiny")["status"] == "crashed"
        assert len(registry.events("tiny")) == len(lines) - 1


def test_keel_train_and_its_watchdog_on_a_corrupt_registry_then_runs_import(tiny_data, tmp_path):
    corrupt(registry_path(), "text")
    run_dir = tmp_path / "tiny"
    args = [
        sys.executable,
        "-m",
        "keel.cli",
        *tiny_train_args(tiny_data, run_dir, "train.max_steps=2000", "train.compile=false"),
    ]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (run_dir / "checkpoints" / "step_00000010").exists():
        assert process.poll() is None and time.time() < deadline, process.communicate()[1]
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)  # the watchdog logs the stop request: a registry write of its own
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr
    # Once in the trainer and once in the watchdog: once per outage and process, not per write.
    assert registry_messages(stderr, "cannot be written (file is not a database)") == 2
    names = [e["name"] for e in read_logbook(run_dir / LOGBOOK_FILE)]
    assert "user_stop" in names and names[-1] == "run_end"

    assert_user_error(keel("runs"), str(registry_path()), "damaged", "move it aside", "--import")
    assert_user_error(keel("report", str(run_dir)), "damaged")
    move_aside(registry_path())
    imported = keel("runs", "--import", str(run_dir))
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.startswith("imported tiny from") and "stopped at step" in imported.stdout
    assert keel("report", str(run_dir)).returncode == 0  # the curves came back from the backlog
    assert keel("runs").stdout.splitlines()[1].split()[:2] == ["tiny", "stopped"]
    assert_user_error(keel("runs", "--import", str(tmp_path / "nowhere")), "not a keel run directory")
