"""The watchdog against real child processes: small Python scripts that beat, checkpoint, crash, hang."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import keel.supervisor.watchdog as watchdog
from keel.supervisor.watchdog import WatchdogConfig, newest_checkpoint_step, run_watchdog

# What every fake trainer starts with: its segment number, a heartbeat and checkpoint writer, and
# a line in starts.txt so a test can count the segments and see the KEEL_RESTART each one got.
PRELUDE = """\
import json, os, signal, sys, time
from pathlib import Path
RUN = Path(sys.argv[1])
RESTART = int(os.environ["KEEL_RESTART"])
RANK = int(os.environ.get("RANK", "0"))
def beat(step, started=True, ended=False):
    name = "heartbeat.json" if RANK == 0 else f"heartbeat.rank{RANK}.json"
    tmp = RUN / f".{name}.tmp"
    beat = {"step": step, "time": time.time(), "pid": os.getpid(), "started": started, "ended": ended}
    tmp.write_text(json.dumps(beat))
    os.replace(tmp, RUN / name)
def checkpoint(step):
    (RUN / "checkpoints" / f"step_{step:08d}").mkdir(parents=True, exist_ok=True)
with open(RUN / "starts.txt", "a") as f:
    f.write(f"{RESTART}\\n")
"""

FAST = dict(backoff_s=0.01, backoff_max_s=0.01, hang_timeout_s=10.0, startup_timeout_s=10.0)


def trainer(tmp_path: Path, body: str) -> list[str]:
    script = tmp_path / "fake_trainer.py"
    script.write_text(PRELUDE + textwrap.dedent(body))
    run_dir = tmp_path / "run"
    run_dir.mkdir(exist_ok=True)
    return [sys.executable, str(script), str(run_dir)]


def starts(tmp_path: Path) -> list[int]:
    path = tmp_path / "run" / "starts.txt"
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def watch(tmp_path: Path, body: str, nproc: int = 1, **config) -> tuple[int, list[dict]]:
    events: list[dict] = []
    argv, config = trainer(tmp_path, body), WatchdogConfig(**{**FAST, **config})
    code = run_watchdog(argv, tmp_path / "run", config, events.append, nproc=nproc)
    return code, events


def test_crashes_twice_then_finishes(tmp_path):
    previous_handler = signal.getsignal(signal.SIGINT)
    code, events = watch(
        tmp_path,
        """
        beat(10 * RESTART + 5)
        checkpoint(10 * RESTART + 10)
        sys.exit(1 if RESTART < 2 else 0)
    """,
    )
    assert code == 0
    assert starts(tmp_path) == [0, 1, 2]  # each segment was told its number
    assert [(e["kind"], e["name"]) for e in events] == [("fault", "crash"), ("restart", "restart")] * 2
    first_fault, first_restart, second_fault, _ = events
    assert first_fault["step"] == 5 and second_fault["step"] == 15
    assert first_fault["evidence"]["exit_code"] == 1
    assert first_fault["evidence"]["checkpoint_step"] == 10
    assert "exited with code 1 at step ~5" in first_fault["message"]
    assert first_restart["evidence"]["restart"] == 1 and first_restart["step"] == 10
    assert all(e["evidence"]["downtime_seconds"] >= 0 for e in events)
    assert signal.getsignal(signal.SIGINT) is previous_handler  # the watchdog put the handlers back


def test_killed_by_sigkill_is_restarted(tmp_path):
    code, events = watch(
        tmp_path,
        """
        checkpoint(10)
        beat(12)
        if RESTART == 0:
            os.kill(os.getpid(), signal.SIGKILL)
    """,
    )
    assert code == 0
    assert starts(tmp_path) == [0, 1]
    fault = events[0]
    assert fault["evidence"]["signal"] == "SIGKILL" and fault["evidence"]["lost_steps"] == 2
    assert "killed by SIGKILL" in fault["message"] and "step ~12" in fault["message"]


def test_hang_is_killed_and_restarted(tmp_path):
    # Segment 0 beats, then stops; segment 1 never beats at all (a stuck start-up), and the
    # heartbeat file segment 0 left behind must not pass for a sign of its life; segment 2 finishes.
    code, events = watch(
        tmp_path,
        """
        (RUN / f"pid_{RESTART}").write_text(str(os.getpid()))
        if RESTART == 0:
            beat(3)
        if RESTART < 2:
            time.sleep(60)
    """,
        hang_timeout_s=1.5,
        startup_timeout_s=2.5,
    )
    assert code == 0
    assert starts(tmp_path) == [0, 1, 2]
    faults = [e for e in events if e["kind"] == "fault"]
    assert [f["name"] for f in faults] == ["hang", "hang"]
    assert faults[0]["step"] == 3 and faults[0]["evidence"]["signal"] == "SIGKILL"
    assert "no heartbeat for 1.5 s" in faults[0]["message"]
    assert "before its first heartbeat" in faults[1]["message"] and "no heartbeat for 2.5 s" in faults[1]["message"]
    for segment in (0, 1):  # the hung processes are gone, not left running beside the new one
        with pytest.raises(ProcessLookupError):
            os.kill(int((tmp_path / "run" / f"pid_{segment}").read_text()), 0)


def test_a_beating_trainer_outlives_the_hang_timeout(tmp_path):
    code, events = watch(
        tmp_path,
        """
        for step in range(30):
            beat(step)
            time.sleep(0.1)
    """,
        hang_timeout_s=2.0,
    )
    assert (code, events, starts(tmp_path)) == (0, [], [0])


def test_start_up_may_be_silent_longer_than_a_running_trainer(tmp_path):
    # Importing torch and compiling the first step pause the heartbeat for longer than a step ever
    # should: until a beat says the first step is done, startup_timeout_s applies, not hang_timeout_s.
    code, events = watch(
        tmp_path,
        """
        beat(None, started=False)
        time.sleep(2.5)
        for step in range(5):
            beat(step)
            time.sleep(0.1)
    """,
        hang_timeout_s=1.0,
        startup_timeout_s=10.0,
    )
    assert (code, events, starts(tmp_path)) == (0, [], [0])


def test_gives_up_when_restarts_make_no_checkpoint_progress(tmp_path):
    # Three segments each write a new checkpoint (so the watchdog keeps going), then the run stalls.
    code, events = watch(
        tmp_path,
        """
        beat(10 * RESTART + 7)
        if RESTART < 3:
            checkpoint(10 * RESTART + 5)
        sys.exit(4)
    """,
        max_restarts_without_progress=2,
        backoff_s=0.01,
        backoff_max_s=1.0,
    )
    assert code == 4
    assert starts(tmp_path) == [0, 1, 2, 3, 4]
    assert [e["evidence"]["backoff_seconds"] for e in events if e["kind"] == "restart"] == [0.01, 0.01, 0.01, 0.02]
    gave_up = events[-1]
    assert (gave_up["kind"], gave_up["name"]) == ("info", "gave_up")
    assert gave_up["message"] == (
        "gave up after 2 restarts without a new checkpoint; last failure: "
        "exited with code 4 at step ~47 (newest checkpoint: step 25)."
    )


def test_gives_up_when_the_restart_budget_is_spent(tmp_path):
    code, events = watch(
        tmp_path,
        """
        checkpoint(RESTART + 1)
        os.kill(os.getpid(), signal.SIGKILL)
    """,
        max_restarts=2,
    )
    assert code == 128 + signal.SIGKILL
    assert starts(tmp_path) == [0, 1, 2]
    assert events[-1]["name"] == "gave_up" and "the whole budget (max_restarts=2)" in events[-1]["message"]


def test_backoff_doubles_up_to_its_cap(tmp_path):
    code, events = watch(tmp_path, "sys.exit(1)\n", max_restarts_without_progress=4, backoff_s=0.05, backoff_max_s=0.15)
    assert code == 1
    assert [e["evidence"]["backoff_seconds"] for e in events if e["kind"] == "restart"] == [0.05, 0.1, 0.15, 0.15]


@pytest.mark.parametrize(
    "ending, expected_code",
    [
        ("sys.exit(0)", 0),
        (f"sys.exit({watchdog.EXIT_USER_ERROR})", watchdog.EXIT_USER_ERROR),
        (f"sys.exit({watchdog.EXIT_STOPPED_BY_SUPERVISOR})", watchdog.EXIT_STOPPED_BY_SUPERVISOR),
        ("os.kill(os.getpid(), signal.SIGTERM)", 128 + signal.SIGTERM),  # someone stopped it on purpose
    ],
)
def test_endings_a_restart_cannot_help_are_not_restarted(tmp_path, ending, expected_code):
    code, events = watch(tmp_path, ending + "\n")
    assert (code, events, starts(tmp_path)) == (expected_code, [], [0])


@pytest.mark.parametrize(
    "ending, code_meant",
    [("os.abort()", 0), ("time.sleep(60)", 0), ("os.abort()", watchdog.EXIT_STOPPED_BY_SUPERVISOR)],
)
def test_a_rank_that_dies_or_hangs_after_the_run_ended_is_not_a_crash(tmp_path, ending, code_meant):
    # Every rank beats "ended" after the end-of-run barrier; gloo can then abort a rank whose peer closed
    # its connections first. The run is whole on disk: a line in the logbook, no restart, exit 0.
    code, events = watch(
        tmp_path,
        f"""
        import resource
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        checkpoint(20)
        beat(20, ended=True)
        if RANK == 1:
            {ending}
        sys.exit({code_meant})  # finished, or stopped by the supervisor: what `keel train` must exit with
    """,
        nproc=2,
        hang_timeout_s=1.5,
    )
    assert code == code_meant and starts(tmp_path) == [0, 0]
    assert [(e["kind"], e["name"]) for e in events] == [("info", "teardown")]
    signal_name = "SIGABRT" if ending == "os.abort()" else "SIGKILL"
    assert f"the trainer (rank 1) was killed by {signal_name}" in events[0]["message"]
    assert events[0]["step"] == 20


def test_a_rank_that_dies_before_the_run_ended_restarts_the_group(tmp_path):
    code, events = watch(
        tmp_path,
        """
        import resource
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        checkpoint(20)
        beat(20)
        if RESTART == 0:
            if RANK == 1:
                os.abort()
            time.sleep(60)  # rank 0 waits in a collective for the rank that died
        beat(20, ended=True)
    """,
        nproc=2,
    )
    assert code == 0 and sorted(starts(tmp_path)) == [0, 0, 1, 1]
    assert [(e["kind"], e["name"]) for e in events] == [("fault", "crash"), ("restart", "restart")]
    assert "(rank 1) was killed by SIGABRT" in events[0]["message"]


# The stop tests run the watchdog in its own process, in a new session standing in for the
# terminal: the trainer shares its process group, as it would under `keel train`.
DRIVER = """\
import json, sys
from pathlib import Path
from keel.supervisor.watchdog import WatchdogConfig, run_watchdog
run_dir = Path(sys.argv[1])
def record(entry):
    with open(run_dir / "events.jsonl", "a") as f:
        f.write(json.dumps(entry) + "\\n")
sys.exit(run_watchdog(sys.argv[2:], run_dir, WatchdogConfig(hang_timeout_s=10.0, backoff_s=0.01), record))
"""

# Like the real loop: the first SIGINT/SIGTERM means "checkpoint and exit 0"; a repeat within 2 s is
# the same request arriving twice, a later one "stop now".
STOPPABLE = """
signals = []
signal.signal(signal.SIGINT, lambda signum, frame: signals.append(time.monotonic()))
signal.signal(signal.SIGTERM, lambda signum, frame: signals.append(time.monotonic()))
step = 0
beat(step)
while not signals:
    step += 1
    beat(step)
    time.sleep(0.05)
time.sleep(0.5)  # "writing the checkpoint"; a duplicate signal would arrive meanwhile
if signals[-1] - signals[0] > 2.0:
    sys.exit(1)
(RUN / "signals.txt").write_text(str(len(signals)))
checkpoint(step)
"""


def start_driver(tmp_path: Path, body: str) -> subprocess.Popen:
    argv = trainer(tmp_path, body)
    (tmp_path / "driver.py").write_text(DRIVER)
    src = Path(watchdog.__file__).parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(src), os.environ.get("PYTHONPATH")]))}
    driver = subprocess.Popen(
        [sys.executable, str(tmp_path / "driver.py"), argv[-1], *argv], env=env, start_new_session=True
    )
    deadline = time.monotonic() + 20
    while not (tmp_path / "run" / "heartbeat.json").exists():  # the trainer is up and has its handlers
        assert time.monotonic() < deadline and driver.poll() is None, "the fake trainer never started"
        time.sleep(0.05)
    return driver


def events_of(tmp_path: Path) -> list[dict]:
    path = tmp_path / "run" / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.parametrize("how", ["ctrl_c_on_the_terminal", "sigterm_to_the_watchdog", "sigint_to_the_watchdog"])
def test_user_stop_lets_the_trainer_checkpoint_and_is_never_restarted(tmp_path, how):
    driver = start_driver(tmp_path, STOPPABLE)
    try:
        if how == "ctrl_c_on_the_terminal":
            os.killpg(driver.pid, signal.SIGINT)  # the whole foreground group, as a terminal does
        else:  # `kill PID` or `kill -INT PID`: only the watchdog's forwarding reaches the trainer
            driver.send_signal(signal.SIGTERM if how == "sigterm_to_the_watchdog" else signal.SIGINT)
        assert driver.wait(timeout=20) == 0
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert starts(tmp_path) == [0]
    assert newest_checkpoint_step(tmp_path / "run") is not None
    assert [(e["kind"], e["name"]) for e in events_of(tmp_path)] == [("info", "user_stop")]


def test_a_trainer_that_crashes_during_a_user_stop_is_not_restarted(tmp_path):
    driver = start_driver(
        tmp_path,
        """
        signal.signal(signal.SIGINT, lambda signum, frame: sys.exit(1))
        beat(1)
        time.sleep(60)
    """,
    )
    try:
        os.killpg(driver.pid, signal.SIGINT)
        assert driver.wait(timeout=20) == 1
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert starts(tmp_path) == [0]
    assert [e["name"] for e in events_of(tmp_path)] == ["user_stop"]


def test_newest_checkpoint_ignores_unfinished_directories(tmp_path):
    assert newest_checkpoint_step(tmp_path) is None
    for name in ("step_00000100", "step_00000200", ".tmp-step_00000300"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_00000400").write_text("a file, not a checkpoint")
    assert newest_checkpoint_step(tmp_path) == 200
