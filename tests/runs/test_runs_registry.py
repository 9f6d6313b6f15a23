import math
import multiprocessing
import subprocess
import sys
import textwrap

import pytest

from keel.errors import UserError
from keel.runs.registry import Registry, format_runs_table, registry_path


@pytest.fixture
def registry(tmp_path, monkeypatch):
    monkeypatch.setenv("KEEL_HOME", str(tmp_path / "home"))
    with Registry() as reg:
        yield reg


def test_registry_lives_under_keel_home(tmp_path, monkeypatch):
    monkeypatch.setenv("KEEL_HOME", str(tmp_path / "home"))
    assert registry_path() == tmp_path / "home" / "registry.sqlite"
    with Registry() as registry:
        assert registry.runs() == []  # connecting waits for the first use, which creates the file
    assert registry_path().is_file()


def test_run_metrics_checkpoints_and_events_round_trip(registry, tmp_path):
    config = {"model": {"d_model": 64}, "optim": {"lr": 0.003}}
    assert registry.start_run("tiny", tmp_path / "runs" / "tiny", config) == 0
    registry.log_metrics_many("tiny", [(10, {"loss": 5.5, "lr": 1e-3}), (20, {"loss": 4.25, "lr": 2e-3})])
    registry.log_metrics("tiny", 20, {"val_loss": 4.5, "grad_norm": float("nan")})
    registry.log_checkpoint("tiny", 20, tmp_path / "runs" / "tiny" / "checkpoints" / "step_00000020", 4.5)
    registry.log_event("tiny", 15, "spike", "loss spike of 6.1 sigma", {"loss": 9.0})
    registry.log_event("tiny", None, "note", "started")
    registry.update_run("tiny", step=20, tokens=20_480, best_val_loss=4.5, tokens_per_s=1234.5, status="finished")

    run = registry.get_run("tiny")
    assert run["status"] == "finished" and run["step"] == 20 and run["tokens"] == 20_480
    assert run["best_val_loss"] == 4.5 and run["tokens_per_s"] == 1234.5
    assert run["config"] == config and run["run_dir"] == str(tmp_path / "runs" / "tiny")
    assert [r["name"] for r in registry.runs()] == ["tiny"]

    series = registry.metrics("tiny")
    assert series["loss"] == [(10, 5.5), (20, 4.25)] and series["lr"] == [(10, 1e-3), (20, 2e-3)]
    assert series["val_loss"] == [(20, 4.5)]
    assert math.isnan(series["grad_norm"][0][1])  # a diverged step is recorded, not dropped
    assert registry.metrics("tiny", "loss") == {"loss": [(10, 5.5), (20, 4.25)]}

    assert [(c["step"], c["val_loss"]) for c in registry.checkpoints("tiny")] == [(20, 4.5)]
    events = registry.events("tiny")
    assert [(e["step"], e["kind"], e["message"], e["data"]) for e in events] == [
        (15, "spike", "loss spike of 6.1 sigma", {"loss": 9.0}),
        (None, "note", "started", None),
    ]
    assert registry.get_run("other") is None


def test_resume_keeps_history_and_redone_steps_overwrite(registry, tmp_path):
    assert registry.start_run("r", tmp_path, {"seed": 1}) == 0
    registry.log_metrics_many("r", [(s, {"loss": 10.0 - s}) for s in (1, 2, 3, 4)])
    registry.log_event("r", 4, "rollback", "roll back to step 2")
    registry.update_run("r", step=4, status="crashed")
    created = registry.get_run("r")["created"]

    segment = registry.start_run("r", tmp_path, {"seed": 1})
    assert segment == 1
    run = registry.get_run("r")
    assert run["status"] == "running" and run["created"] == created and run["step"] == 4
    registry.log_metrics_many("r", [(s, {"loss": 100.0 + s}) for s in (3, 4, 5)], segment=segment)

    assert registry.metrics("r")["loss"] == [(1, 9.0), (2, 8.0), (3, 103.0), (4, 104.0), (5, 105.0)]
    assert registry.segments("r") == [(0, 1, 2), (1, 3, 5)]
    assert [e["kind"] for e in registry.events("r")] == ["rollback"]
    assert registry.start_run("r", tmp_path, {"seed": 1}) == 2


WRITER = textwrap.dedent(
    """
    import sys
    from keel.runs.registry import Registry

    name = sys.argv[1]
    with Registry() as reg:
        reg.start_run(name, "/tmp/" + name, {"writer": name})
        for step in range(300):
            reg.log_metrics_many(name, [(step, {"loss": 1.0 / (step + 1), "lr": 0.001})])
            if step % 10 == 0:
                reg.log_event(name, step, "tick", "step " + str(step))
                reg.update_run(name, step=step)
        reg.update_run(name, status="finished")
    """
)


def test_two_processes_write_concurrently(tmp_path, monkeypatch):
    # A trainer and a watchdog share the registry; neither may fail with "database is locked",
    # including when both create the file at the same moment.
    monkeypatch.setenv("KEEL_HOME", str(tmp_path))
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, name], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for name in ("trainer", "watchdog")
    ]
    for writer in writers:
        _, stderr = writer.communicate(timeout=120)
        assert writer.returncode == 0, stderr
    with Registry() as reg:
        for name in ("trainer", "watchdog"):
            assert len(reg.metrics(name)["loss"]) == 300
            assert len(reg.events(name)) == 30
            assert reg.get_run(name)["status"] == "finished" and reg.get_run(name)["step"] == 290


def _open_together(path, barrier) -> str | None:
    barrier.wait()  # both processes create the same new registry file at the same moment
    try:
        with Registry(path) as registry:
            registry.runs()
    except UserError as err:
        return str(err)
    return None


def test_a_new_registry_opened_by_two_processes_at_once_never_reports_locked(tmp_path):
    # Switching a fresh file to WAL is where SQLite says "database is locked" without waiting.
    context = multiprocessing.get_context("fork")
    with context.Pool(2) as pool, context.Manager() as manager:
        for attempt in range(15):
            barrier = manager.Barrier(2)
            path = tmp_path / f"{attempt}" / "registry.sqlite"
            assert pool.starmap(_open_together, [(path, barrier)] * 2) == [None, None]


def test_runs_table_is_aligned_and_readable(registry, tmp_path):
    registry.start_run("baseline", tmp_path / "a", {})
    registry.update_run(
        "baseline", step=1000, tokens=2_048_000, best_val_loss=3.21, tokens_per_s=15234.4, status="finished"
    )
    registry.start_run("qk-norm-long-name", tmp_path / "b", {})
    table = format_runs_table(registry.runs())
    lines = table.splitlines()
    assert lines[0].split() == ["name", "status", "step", "tokens", "best", "val", "loss", "tokens/s", "updated"]
    newest, oldest = lines[1], lines[2]
    assert newest.split()[:6] == ["qk-norm-long-name", "running", "0", "0", "-", "-"]
    assert oldest.split()[:6] == ["baseline", "finished", "1000", "2.0M", "3.2100", "15,234"]
    # Columns line up: every row starts its status column where the header does.
    status_column = lines[0].index("status")
    assert all(line[status_column - 2 : status_column] == "  " and line[status_column] != " " for line in lines)
    assert format_runs_table([]) == "no runs yet"


def test_corrupt_registry_is_a_user_error_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("KEEL_HOME", str(tmp_path))
    registry_path().write_bytes(b"this is not a SQLite database, just some text " * 100)
    with pytest.raises(UserError, match=f"run registry {registry_path()} is damaged .*move it aside.*--import"):
        Registry().runs()
