"""The process watchdog: run the trainer as a child process and restart it after a crash or a hang.

The child (`python -m keel.train.worker RUN_DIR`) owes the watchdog three things:

- a heartbeat: it rewrites `RUN_DIR/heartbeat.json` (`{"step", "time", "pid", "started"}`) at least
  every few seconds while healthy. Any change of the file counts as life; a file left by an earlier
  segment does not. The watchdog's own clock decides staleness, so clocks never need to agree.
  Until a beat says `"started": true` (the first training step of the process is done) the child
  is starting up (importing torch, opening the data, compiling the first step) and may stay
  silent for `startup_timeout_s`; after it, for `hang_timeout_s`.
- checkpoints in `RUN_DIR/checkpoints/step_XXXXXXXX/`; the newest one measures progress.
- an exit code: 0 finished or cleanly stopped, `EXIT_USER_ERROR` or `EXIT_STOPPED_BY_SUPERVISOR`
  (a restart cannot help); anything else, or death by a signal, is a crash worth a restart.

Stopping. Every SIGINT and SIGTERM the watchdog receives is forwarded to the child, which
checkpoints and exits; the watchdog notes that someone asked to stop and never restarts afterwards.
`kill -INT PID` or `kill PID` reach the watchdog alone, so forwarding is what stops the trainer.
Ctrl-C on the terminal reaches both processes (one process group) and the child gets it twice
within a moment: the trainer takes a repeat within 2 s as the same request, not as "stop now".
A child that dies of SIGINT or SIGTERM was asked to stop by someone and is not restarted either.

Ownership. `pass_fds` hands the child the descriptor of the run directory's lock, so the lock stays
held while either process lives. The child asks the kernel for SIGTERM when the watchdog dies
(Linux), so a SIGKILLed watchdog cannot leave a trainer training on in the background.

Events (logbook entries) carry `downtime_seconds`: on a fault, the time from the trainer's last
sign of life to the moment it was found dead or hung; on a restart, the backoff waited. Their sum
is the wall time faults cost, apart from redoing the `lost_steps` since the newest checkpoint.

The child must be the trainer itself, not a launcher with workers of its own: a hung child is
killed with SIGKILL, which a launcher cannot pass on to its workers.

Several ranks (`nproc` > 1). The watchdog is then the launcher itself, as torchrun would be: it
starts one child per rank with torch.distributed's environment (RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT on a free local port) and watches every rank's heartbeat
(`heartbeat.json` for rank 0, `heartbeat.rankR.json` for the others). When any rank dies or goes
silent, the whole group is killed and restarted together from the newest checkpoint, and the
logbook says which rank it was. A rank stuck in a collective is caught by its heartbeat or by the
collective's own timeout (keel.train.parallel), whichever comes first.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from keel.config import WatchdogConfig

EXIT_USER_ERROR = 2
EXIT_STOPPED_BY_SUPERVISOR = 3
HEARTBEAT_FILE = "heartbeat.json"


def heartbeat_file(rank: int) -> str:
    """Rank 0's heartbeat is the run's; the other ranks of a multi-process run beat in files of their own."""
    return HEARTBEAT_FILE if rank == 0 else f"heartbeat.rank{rank}.json"


RESTART_ENV = "KEEL_RESTART"
WATCHDOG_PID_ENV = "KEEL_WATCHDOG_PID"  # the child stops when its parent is no longer this process

_CHECKPOINT_DIR = re.compile(r"step_(\d+)")  # `.tmp-*` directories are unfinished and never match
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass
class _Segment:
    """How one run of the child process ended."""

    returncode: int  # negative: killed by that signal (Popen's convention)
    hung: bool
    heartbeat_step: int | None
    seconds_since_life: float  # from the last heartbeat (or the start) to the moment it ended
    timeout_s: float  # the silence allowed at that moment: start-up's or a running trainer's
    rank: int | None = None  # several ranks: the one that failed first
    # The run had ended (every rank said so) when these ranks died or hung: {rank: returncode}.
    teardown: dict[int, int] = field(default_factory=dict)


def newest_checkpoint_step(run_dir: Path) -> int | None:
    """Step of the newest finished checkpoint directory in run_dir, or None when there is none."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    steps = [int(m.group(1)) for p in root.iterdir() if (m := _CHECKPOINT_DIR.fullmatch(p.name)) and p.is_dir()]
    return max(steps, default=None)


def run_watchdog(
    argv: list[str],
    run_dir: Path,
    config: WatchdogConfig,
    on_event: Callable[[dict], None] | None = None,
    env: dict[str, str] | None = None,
    pass_fds: tuple[int, ...] = (),
    nproc: int = 1,
) -> int:
    """Run argv until it finishes, restarting it after crashes and hangs; returns the exit code.

    0 when the trainer finished or stopped cleanly; otherwise the child's code (128 + signal
    number for a death by signal) after a user stop, a no-restart code, or giving up. Every
    fault, restart and stop goes to on_event as a logbook entry. Call from the main thread.
    """
    assert argv, "argv names the trainer command"
    emit = on_event or (lambda entry: None)
    run_dir = Path(run_dir)
    poll_s = min(0.5, config.hang_timeout_s / 10)  # granularity of hang detection and forwarding
    stop = _StopRequests(emit)
    restart = 0
    failures_in_a_row = 0  # failed segments since the last one that wrote a checkpoint
    with stop:
        while True:
            checkpoint_before = newest_checkpoint_step(run_dir)
            segment = _run_segment(argv, run_dir, config, restart, env, stop, poll_s, pass_fds, nproc)
            code = segment.returncode if segment.returncode >= 0 else 128 - segment.returncode
            stop.report()
            if segment.teardown:
                emit(_teardown_entry(segment))
            if stop.requested or segment.returncode in (
                0,
                EXIT_USER_ERROR,
                EXIT_STOPPED_BY_SUPERVISOR,
                -signal.SIGINT,
                -signal.SIGTERM,
            ):
                return code

            checkpoint_step = newest_checkpoint_step(run_dir)
            progressed = checkpoint_step is not None and (
                checkpoint_before is None or checkpoint_step > checkpoint_before
            )
            failures_in_a_row = 1 if progressed else failures_in_a_row + 1
            failure = _describe(segment, checkpoint_step)
            step = segment.heartbeat_step if segment.heartbeat_step is not None else checkpoint_step
            evidence = (
                {"signal": _signal_name(-segment.returncode)}
                if segment.returncode < 0
                else {"exit_code": segment.returncode}
            )
            if segment.rank is not None:
                evidence["rank"] = segment.rank
            lost_steps = (
                None if segment.heartbeat_step is None else max(0, segment.heartbeat_step - (checkpoint_step or 0))
            )
            emit(
                _entry(
                    "fault",
                    "hang" if segment.hung else "crash",
                    f"the trainer {failure}.",
                    step,
                    {
                        **evidence,
                        "restart": restart,
                        "checkpoint_step": checkpoint_step,
                        "lost_steps": lost_steps,
                        "downtime_seconds": round(segment.seconds_since_life, 3),
                    },
                )
            )

            # Both counts include the first failure of the streak, which was no restart (or made progress).
            if failures_in_a_row - 1 >= config.max_restarts_without_progress:
                reason = f"{failures_in_a_row - 1} restarts without a new checkpoint"
            elif restart >= config.max_restarts:
                reason = f"{restart} restarts, the whole budget (max_restarts={config.max_restarts})"
            else:
                reason = None
            if reason:
                emit(
                    _entry(
                        "info",
                        "gave_up",
                        f"gave up after {reason}; last failure: {failure}.",
                        step,
                        {"restart": restart, "checkpoint_step": checkpoint_step},
                    )
                )
                return code

            backoff_s = min(config.backoff_s * 2 ** (failures_in_a_row - 1), config.backoff_max_s)
            waited_s = stop.sleep(backoff_s, poll_s)
            stop.report()
            if stop.requested:
                return code
            restart += 1
            where = f"checkpoint step {checkpoint_step}" if checkpoint_step is not None else "the start"
            emit(
                _entry(
                    "restart",
                    "restart",
                    f"restarted the trainer from {where} after {backoff_s:g} s of backoff "
                    f"(restart {restart} of at most {config.max_restarts}).",
                    checkpoint_step,
                    {
                        "restart": restart,
                        "checkpoint_step": checkpoint_step,
                        "backoff_seconds": backoff_s,
                        "downtime_seconds": round(waited_s, 3),
                    },
                )
            )


def _run_segment(
    argv: list[str],
    run_dir: Path,
    config: WatchdogConfig,
    restart: int,
    env: dict[str, str] | None,
    stop: _StopRequests,
    poll_s: float,
    pass_fds: tuple[int, ...],
    nproc: int = 1,
) -> _Segment:
    """Start the child (one per rank) once and watch until it exits, one fails or a heartbeat goes stale."""
    base_env = {**(os.environ if env is None else env), RESTART_ENV: str(restart), WATCHDOG_PID_ENV: str(os.getpid())}
    envs = [base_env] if nproc == 1 else _rank_envs(base_env, nproc)
    heartbeats = [_Heartbeat(run_dir / heartbeat_file(rank)) for rank in range(nproc)]
    forwarded = 0
    # Same process group as ours (no new session): Ctrl-C on the terminal reaches the children directly.
    children = [subprocess.Popen(argv, env=child_env, pass_fds=pass_fds) for child_env in envs]
    ranked = nproc > 1

    def timeout(hb: _Heartbeat) -> float:
        return config.hang_timeout_s if hb.started else max(config.hang_timeout_s, config.startup_timeout_s)

    def ended(rank: int, returncode: int, hung: bool, silent_s: float) -> _Segment:
        step = heartbeats[0].step if heartbeats[0].step is not None else heartbeats[rank].step
        return _Segment(returncode, hung, step, silent_s, timeout(heartbeats[rank]), rank if ranked else None)

    def after_the_end(codes: list[int]) -> _Segment:
        """The code the ranks meant to exit with (finished, or stopped by the supervisor); the others died."""
        meant = (0, EXIT_USER_ERROR, EXIT_STOPPED_BY_SUPERVISOR)
        intended = next((c for c in codes if c in meant), 0)
        teardown = {rank: c for rank, c in enumerate(codes) if c not in meant}
        return _Segment(intended, False, heartbeats[0].step, 0.0, 0.0, None, teardown)

    try:
        while True:
            time.sleep(poll_s) if ranked else _wait_quietly(children[0], poll_s)
            codes = [child.poll() for child in children]
            for hb in heartbeats:  # after the exit codes: a rank's end beat precedes anything its end causes
                hb.poll()
            the_end = any(hb.ended for hb in heartbeats)
            if the_end and all(code is not None for code in codes):
                return after_the_end(codes)
            failed = next((r for r, code in enumerate(codes) if code not in (None, 0)), None)
            if not the_end and (failed is not None or all(code is not None for code in codes)):
                rank = failed if failed is not None else 0
                silent_s = time.monotonic() - heartbeats[rank].last_life
                return ended(rank, codes[rank], False, silent_s)
            stop.report()
            for signum in stop.signals[forwarded:]:
                for child in children:
                    if child.poll() is None:
                        child.send_signal(signum)
            forwarded = len(stop.signals)
            over = [time.monotonic() - hb.last_life - timeout(hb) for hb in heartbeats]
            rank = max(range(nproc), key=lambda r: over[r])
            if over[rank] > 0:
                for child in children:
                    child.kill()
                codes = [child.wait() for child in children]
                if the_end:
                    return after_the_end(codes)
                return ended(rank, codes[rank], True, time.monotonic() - heartbeats[rank].last_life)
    finally:
        for child in children:
            if child.poll() is None:  # we are leaving on an exception or a failed rank: no orphan trainers
                child.kill()
                child.wait()


def _wait_quietly(child: subprocess.Popen, timeout: float) -> None:
    try:
        child.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass


def _rank_envs(env: dict[str, str], nproc: int) -> list[dict[str, str]]:
    """torch.distributed's environment for each of nproc local ranks, with a free port for the rendezvous;
    the cores are shared out (torchrun's default of one thread each would idle a many-core machine)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    threads = str(max(1, (os.cpu_count() or 1) // nproc))
    common = {
        "WORLD_SIZE": str(nproc),
        "LOCAL_WORLD_SIZE": str(nproc),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", threads),
    }
    return [{**env, **common, "RANK": str(rank), "LOCAL_RANK": str(rank)} for rank in range(nproc)]


class _Heartbeat:
    """Watches the heartbeat file; `last_life` is the monotonic time it last changed."""

    def __init__(self, path: Path):
        self.path = path
        self.seen = self._read()  # a file left by an earlier segment is no sign of this one's life
        self.last_life = time.monotonic()
        self.step: int | None = None
        self.started = False  # the child's first training step is done: start-up's grace is over
        self.ended = False  # every rank has finished the run (or stopped it cleanly): what follows is teardown

    def _read(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None

    def poll(self) -> None:
        data = self._read()
        if data is None or data == self.seen:
            return
        self.seen, self.last_life = data, time.monotonic()
        try:
            beat = json.loads(data)
            self.started = self.started or beat.get("started") is True
            self.ended = self.ended or beat.get("ended") is True
            self.step = int(beat["step"])
        except (ValueError, KeyError, TypeError, AttributeError):
            pass  # caught mid-write, or before the first step: still a sign of life


class _StopRequests:
    """Catches SIGINT/SIGTERM for the watchdog's lifetime; after one, nothing is restarted."""

    def __init__(self, emit: Callable[[dict], None]):
        self.emit = emit
        self.signals: list[int] = []
        self.reported = False

    def __enter__(self) -> _StopRequests:
        self.previous = {s: signal.signal(s, self._handle) for s in _STOP_SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, frame: object) -> None:
        # Only record: the handler may interrupt the main thread halfway through writing an event.
        self.signals.append(signum)

    @property
    def requested(self) -> bool:
        return bool(self.signals)

    def report(self) -> None:
        """Log the first stop request once."""
        if self.signals and not self.reported:
            self.reported = True
            name = _signal_name(self.signals[0])
            self.emit(
                _entry(
                    "info",
                    "user_stop",
                    f"{name} received: the trainer may checkpoint and exit, and the watchdog will not restart it.",
                    None,
                    {"signal": name},
                )
            )

    def sleep(self, seconds: float, poll_s: float) -> float:
        """Sleep up to seconds, waking early on a stop request; returns the time slept."""
        start = time.monotonic()
        while not self.requested and (left := seconds - (time.monotonic() - start)) > 0:
            time.sleep(min(left, poll_s))
        return time.monotonic() - start


def _describe(segment: _Segment, checkpoint_step: int | None) -> str:
    """'was killed by SIGKILL ... at step ~120 (newest checkpoint: step 100)' for the messages."""
    if segment.hung:
        what = f"hung (no heartbeat for {segment.timeout_s:g} s) and was killed with SIGKILL"
    elif segment.returncode < 0:
        name = _signal_name(-segment.returncode)
        what = f"was killed by {name}" + (" (often the out-of-memory killer)" if name == "SIGKILL" else "")
    else:
        what = f"exited with code {segment.returncode}"
    if segment.rank is not None:
        what = f"(rank {segment.rank}) {what}"
    where = "before its first heartbeat" if segment.heartbeat_step is None else f"at step ~{segment.heartbeat_step}"
    newest = "none" if checkpoint_step is None else f"step {checkpoint_step}"
    return f"{what} {where} (newest checkpoint: {newest})"


def _teardown_entry(segment: _Segment) -> dict:
    """After the run ended, a rank that dies (gloo may abort a rank whose peer closed its connections
    first) or hangs on its way out loses nothing: worth a line, not a restart."""
    how = ", ".join(
        f"the trainer (rank {rank}) " + (f"exited with code {c}" if c > 0 else f"was killed by {_signal_name(-c)}")
        for rank, c in segment.teardown.items()
    )
    return _entry(
        "info",
        "teardown",
        f"after the run had ended, {how} on its way out; nothing was lost.",
        segment.heartbeat_step,
        {"ranks": {str(rank): code for rank, code in segment.teardown.items()}},
    )


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _entry(kind: str, name: str, message: str, step: int | None, evidence: dict) -> dict:
    return {"kind": kind, "name": name, "message": message, "step": step, "evidence": evidence}
