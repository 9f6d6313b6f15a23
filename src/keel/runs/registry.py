"""The run registry: one SQLite file listing every run with its metrics, checkpoints and events.

It lives at `$KEEL_HOME/registry.sqlite` (KEEL_HOME defaults to ~/.keel). WAL mode lets a trainer,
its watchdog and readers use it at once. A run directory stays the source of truth (config,
checkpoints, logbook); the registry is what `keel runs` and reports read, and the only place
per-step metrics are kept.

The registry must never be the reason a run dies, so writers (trainer, watchdog) never see a
registry error. Every write joins an in-memory queue that goes to the file in order, in one
transaction, whenever the registry is usable. When it is not (locked by another process beyond a
short busy timeout, missing and impossible to create, read-only, corrupt), the queue waits and is
retried with backoff. stderr hears once when an outage begins and once when it ends, not per write.
Metrics that cannot wait in memory (the queue passed MAX_QUEUED_ROWS, or the process ends during
the outage) are appended to `RUN_DIR/registry-backlog.jsonl`; other writes are dropped then, since
the run directory holds them already (config, checkpoints, logbook). `keel runs --import RUN_DIR`
rebuilds the run from its directory, backlog included. A registry file moved aside under a running
writer (to repair it) is noticed: a fresh one is created and the run's row re-created in it.

Readers are people at a terminal: an unusable registry raises a UserError naming the file and the fix.

Each process opens its own `Registry`; a connection must not cross a fork.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from keel.errors import UserError

STATUSES = ("running", "finished", "stopped", "failed", "crashed")
_RUN_FIELDS = ("run_dir", "status", "config", "step", "tokens", "best_val_loss", "tokens_per_s")
# A healthy writer holds the lock for milliseconds; a lock held longer is an outage, and a training
# step must not stall for it: wait this long, then queue the write and go on.
_WRITE_BUSY_TIMEOUT_S = 1.0
# When a process ends its queue has no later chance, so the last attempt may wait a little longer.
_CLOSE_BUSY_TIMEOUT_S = 5.0
# A person at a terminal can wait a few seconds for a reader to get through.
_READ_BUSY_TIMEOUT_S = 5.0
# During an outage each attempt may cost a writer one busy timeout, so attempts thin out from 1 s
# apart to 30 s apart: a long outage costs a trainer at most ~3% of its time, and the backlog still
# lands within 30 s of the registry coming back.
_RETRY_FIRST_S, _RETRY_MAX_S = 1.0, 30.0
# Rows held in memory while the registry is unusable (a metric value, a checkpoint, an event or a
# run update is one row; each takes ~150 bytes, so ~15 MB): about an hour of a CPU run logging a
# dozen metrics every step. Past it the oldest half moves to the run directory: memory stays
# bounded, and the writes to the run directory (one fsynced append) come once per half-queue.
MAX_QUEUED_ROWS = 100_000
BACKLOG_FILE = "registry-backlog.jsonl"  # in the run directory: {"step", "segment", "metrics"} per line
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS runs (
    name TEXT PRIMARY KEY,
    run_dir TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN {STATUSES}),
    created REAL NOT NULL,            -- unix seconds
    updated REAL NOT NULL,
    config TEXT NOT NULL,             -- JSON of the resolved config
    segment INTEGER NOT NULL DEFAULT 0,  -- 0 for the first start, +1 for every resume
    step INTEGER NOT NULL DEFAULT 0,
    tokens INTEGER NOT NULL DEFAULT 0,
    best_val_loss REAL,
    tokens_per_s REAL
);
CREATE TABLE IF NOT EXISTS metrics (
    run TEXT NOT NULL,
    step INTEGER NOT NULL,
    key TEXT NOT NULL,
    value REAL,                       -- NULL stands for NaN, which SQLite cannot store
    segment INTEGER NOT NULL,
    PRIMARY KEY (run, step, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS checkpoints (
    run TEXT NOT NULL,
    step INTEGER NOT NULL,
    path TEXT NOT NULL,
    val_loss REAL,
    created REAL NOT NULL,
    PRIMARY KEY (run, step)
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run TEXT NOT NULL,
    time REAL NOT NULL,
    step INTEGER,
    kind TEXT NOT NULL,
    message TEXT NOT NULL,
    data TEXT                         -- JSON or NULL
);
CREATE INDEX IF NOT EXISTS events_by_run ON events (run, id);
"""


def registry_path() -> Path:
    """$KEEL_HOME/registry.sqlite, with KEEL_HOME defaulting to ~/.keel."""
    home = os.environ.get("KEEL_HOME") or Path.home() / ".keel"
    return Path(home) / "registry.sqlite"


@dataclass
class RunRecord:
    """What a run directory says about its run, in the registry's terms (`keel runs --import`).

    checkpoints and events are dicts shaped as `Registry.checkpoints()` and `Registry.events()` return
    them (events without id); metrics are {step, key, value, segment} dicts.
    """

    name: str
    run_dir: str
    config: dict[str, Any]
    status: str
    segment: int  # of the newest trainer process
    step: int
    tokens: int
    best_val_loss: float | None
    created: float  # unix seconds
    updated: float
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    metrics: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _Write:
    rows: int  # what it counts against MAX_QUEUED_ROWS
    apply: Callable[[sqlite3.Connection], None]
    metrics: list[tuple] | None = None  # a metrics write's (run, step, key, value, segment) rows: they can wait on disk


@dataclass
class _Start:
    """A start_run call, kept so that a registry which lost the run's row (replaced, or the start
    dropped from a full queue) gets it back before the run's later writes."""

    name: str
    run_dir: str
    config: str  # JSON
    time: float
    segment: int | None = None  # None until the registry numbers it (or the logbook, when it cannot)

    def write(self, db: sqlite3.Connection) -> None:
        values = (self.name, self.run_dir, self.time, self.time, self.config)
        if self.segment is None:  # a resume keeps the run's history and counts one more segment
            db.execute(
                """INSERT INTO runs (name, run_dir, status, created, updated, config) VALUES (?, ?, 'running', ?, ?, ?)
                   ON CONFLICT (name) DO UPDATE SET run_dir = excluded.run_dir, status = 'running',
                   updated = excluded.updated, config = excluded.config, segment = segment + 1""",
                values,
            )
            self.segment = db.execute("SELECT segment FROM runs WHERE name = ?", (self.name,)).fetchone()[0]
        else:
            db.execute(
                """INSERT INTO runs (name, run_dir, status, created, updated, config, segment)
                   VALUES (?, ?, 'running', ?, ?, ?, ?)
                   ON CONFLICT (name) DO UPDATE SET run_dir = excluded.run_dir, status = 'running',
                   updated = excluded.updated, config = excluded.config, segment = excluded.segment""",
                (*values, self.segment),
            )

    def ensure_row(self, db: sqlite3.Connection) -> None:
        db.execute(
            """INSERT INTO runs (name, run_dir, status, created, updated, config, segment)
               VALUES (?, ?, 'running', ?, ?, ?, ?) ON CONFLICT (name) DO NOTHING""",
            (self.name, self.run_dir, self.time, self.time, self.config, self.segment),
        )


class Registry:
    """A connection to the registry; use as a context manager or call close(), which saves queued writes.

    Opening connects lazily: a registry that cannot be opened is an outage for writers and a
    UserError for readers, at their first use. Reads see what reached the file, not the queue.
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = Path(path) if path is not None else registry_path()
        self._db: sqlite3.Connection | None = None
        self._file_id: tuple[int, int] | None = None  # the file the connection has open
        self._queue: deque[_Write] = deque()
        self._queued_rows = 0
        self._backlog_rows = 0  # metric rows moved to run directories during the current outage
        self._lost_rows = 0  # metric rows that had no run directory to go to
        self._outage: str | None = None  # why the registry is unusable, None while it works
        self._retry_s = _RETRY_FIRST_S
        self._next_try = 0.0  # time.monotonic() of the next attempt during an outage
        self._started: dict[str, _Start] = {}

    # -- the connection --------------------------------------------------------------------------

    def _connect(self, busy_timeout_s: float) -> sqlite3.Connection:
        """The open connection, or a new one when there is none or the file was replaced or removed."""
        if self._db is not None and self._file_id == _file_id(self.path):
            self._db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            return self._db
        self._disconnect()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we open transactions ourselves, with BEGIN IMMEDIATE for writes.
        db = sqlite3.connect(self.path, timeout=busy_timeout_s, isolation_level=None)
        try:
            db.row_factory = sqlite3.Row
            db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            _enable_wal(db, busy_timeout_s)
            db.execute("PRAGMA synchronous = NORMAL")  # durable at each checkpoint of the WAL; safe in WAL mode
            # Creating the schema takes the write lock; a reader must not wait for it when it exists.
            if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'events_by_run'").fetchone():
                with _transaction(db):  # executescript would commit early; one transaction for all of it
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            db.execute(statement)
        except BaseException:
            db.close()
            raise
        self._db, self._file_id = db, _file_id(self.path)
        return db

    def _disconnect(self) -> None:
        if self._db is not None:
            try:
                self._db.close()
            except sqlite3.Error:
                pass  # a broken file may fail even this; the connection is gone either way
        self._db, self._file_id = None, None

    def close(self) -> None:
        """Save what is queued (waiting a few seconds for a lock), say what could not be saved, disconnect."""
        if self._queue:
            self._flush(_CLOSE_BUSY_TIMEOUT_S)
        if self._queue:
            self._move_to_backlog(len(self._queue))
            run_dirs = " ".join(start.run_dir for start in self._started.values()) or "RUN_DIR"
            lost = f"; {self._lost_rows:,} metric rows had no run directory to go to" if self._lost_rows else ""
            _warn(
                f"the run registry {self.path} is still unusable ({self._outage}): what it missed is in the run "
                f"directory (metrics in {BACKLOG_FILE}){lost}; once it is usable (a corrupt one moved aside), "
                f"`keel runs --import {run_dirs}` brings it up to date."
            )
        self._disconnect()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing (never raises for the registry's sake) -------------------------------------------

    def _submit(self, write: _Write) -> bool:
        """Queue a write and save the queue unless an outage's backoff says not yet; True if saved."""
        self._queue.append(write)
        self._queued_rows += write.rows
        if self._queued_rows > MAX_QUEUED_ROWS:
            oldest, rows = 0, 0
            while rows < self._queued_rows // 2 and oldest < len(self._queue) - 1:
                rows += self._queue[oldest].rows
                oldest += 1
            self._move_to_backlog(oldest)
        if self._outage is not None and time.monotonic() < self._next_try:
            return False
        return self._flush(_WRITE_BUSY_TIMEOUT_S)

    def _move_to_backlog(self, count: int) -> None:
        """Take the oldest `count` writes off the queue; their metrics go to their runs' backlog files.

        The rest (run updates, checkpoints, events) is dropped: the run directory has it already.
        """
        lines: dict[str, list[str]] = {}  # run directory -> JSON lines
        for _ in range(count):
            write = self._queue.popleft()
            self._queued_rows -= write.rows
            by_step: dict[tuple[str, int, int], dict[str, float | None]] = {}
            for run, step, key, value, segment in write.metrics or []:
                start = self._started.get(run)
                if start is None:  # metrics of a run this process did not start: nowhere to put them
                    self._lost_rows += 1
                    continue
                by_step.setdefault((start.run_dir, step, segment), {})[key] = value
            for (run_dir, step, segment), values in by_step.items():
                lines.setdefault(run_dir, []).append(json.dumps({"step": step, "segment": segment, "metrics": values}))
                self._backlog_rows += len(values)
        for run_dir, run_lines in lines.items():
            try:
                _append(Path(run_dir) / BACKLOG_FILE, "".join(line + "\n" for line in run_lines))
            except OSError:
                self._lost_rows += sum(len(json.loads(line)["metrics"]) for line in run_lines)

    def flush(self) -> bool:
        """Try to save the queued writes now, whatever the backoff; True when none is left waiting."""
        return self._flush(_WRITE_BUSY_TIMEOUT_S) if self._queue else True

    def _flush(self, busy_timeout_s: float) -> bool:
        # All queued writes in one transaction: an attempt that fails leaves nothing half-written,
        # so the next attempt repeats none of it (events have no key that would catch a duplicate).
        try:
            db = self._connect(busy_timeout_s)
            with _transaction(db):
                for start in self._started.values():
                    start.ensure_row(db)
                for write in self._queue:
                    write.apply(db)
        except (sqlite3.Error, OSError) as err:
            self._disconnect()  # a corrupt or replaced file needs a fresh connection on the next try
            self._next_try = time.monotonic() + self._retry_s
            self._retry_s = min(2 * self._retry_s, _RETRY_MAX_S)
            if self._outage is None:
                self._outage = str(err) or type(err).__name__
                _warn(
                    f"the run registry {self.path} cannot be written ({self._outage}); training goes on, the "
                    f"registry's writes wait in memory (up to {MAX_QUEUED_ROWS:,} rows) and are retried, "
                    "and the run directory keeps the record."
                )
            return False
        saved = len(self._queue)
        self._queue.clear()
        self._queued_rows = 0
        if self._outage is not None:
            moved = ""
            if self._backlog_rows:
                run_dirs = " ".join(start.run_dir for start in self._started.values())
                moved = (
                    f"; {self._backlog_rows:,} older metric rows did not fit in memory and wait in {BACKLOG_FILE}: "
                    f"`keel runs --import {run_dirs}` loads them"
                )
            _warn(f"the run registry {self.path} is usable again: {saved} delayed writes saved{moved}.")
            self._outage, self._backlog_rows, self._retry_s = None, 0, _RETRY_FIRST_S
        return True

    def start_run(self, name: str, run_dir: Path, config: dict[str, Any]) -> int:
        """Register a run as running, or mark an existing one running again (a resume keeps its
        history). Returns the segment number: 0 on the first start, then 1, 2... per resume.

        While the registry is unusable the run's logbook numbers the segment (the trainer processes
        it saw start), and the registry takes that number when it catches up.
        """
        start = _Start(name, str(run_dir), json.dumps(config), time.time())
        if not self._submit(_Write(1, start.write)):
            from keel.runs.importer import trainer_starts  # it reads run directories, and imports this module

            start.segment = len(trainer_starts(Path(run_dir)))
        self._started[name] = start
        return start.segment

    def update_run(self, name: str, **fields: Any) -> None:
        """Set some of run_dir, status, config, step, tokens, best_val_loss, tokens_per_s."""
        assert fields and set(fields) <= set(_RUN_FIELDS), fields
        assert fields.get("status", "running") in STATUSES, fields["status"]
        if "config" in fields:
            fields["config"] = json.dumps(fields["config"])
        if "run_dir" in fields:
            fields["run_dir"] = str(fields["run_dir"])
        assignments = ", ".join(f"{key} = ?" for key in fields)
        values = (*fields.values(), time.time(), name)

        def write(db: sqlite3.Connection) -> None:
            cursor = db.execute(f"UPDATE runs SET {assignments}, updated = ? WHERE name = ?", values)
            assert cursor.rowcount == 1, f"run {name} is not in the registry; call start_run first"

        self._submit(_Write(1, write))

    def fail_if_running(self, name: str) -> None:
        """Mark the run failed if it is still marked running: its trainer died without saying how it ended."""
        now = time.time()
        self._submit(
            _Write(
                1,
                lambda db: db.execute(
                    "UPDATE runs SET status = 'failed', updated = ? WHERE name = ? AND status = 'running'", (now, name)
                ),
            )
        )

    def log_metrics(self, name: str, step: int, values: dict[str, float], segment: int = 0) -> None:
        self.log_metrics_many(name, [(step, values)], segment)

    def log_metrics_many(self, name: str, rows: Iterable[tuple[int, dict[str, float]]], segment: int = 0) -> None:
        """Store (step, {key: value}) rows in one transaction. A step logged again (a resumed run
        redoing steps after a rollback) overwrites the old values."""
        records = [(name, step, key, _to_sql(value), segment) for step, values in rows for key, value in values.items()]
        self._submit(
            _Write(
                len(records),
                lambda db: db.executemany(
                    "INSERT OR REPLACE INTO metrics (run, step, key, value, segment) VALUES (?, ?, ?, ?, ?)", records
                ),
                metrics=records,
            )
        )

    def log_checkpoint(self, name: str, step: int, path: Path, val_loss: float | None = None) -> None:
        row = (name, step, str(path), _to_sql(val_loss), time.time())
        self._submit(
            _Write(
                1,
                lambda db: db.execute(
                    "INSERT OR REPLACE INTO checkpoints (run, step, path, val_loss, created) VALUES (?, ?, ?, ?, ?)",
                    row,
                ),
            )
        )

    def log_event(
        self, name: str, step: int | None, kind: str, message: str, data: dict[str, Any] | None = None
    ) -> None:
        row = (name, time.time(), step, kind, message, None if data is None else json.dumps(data))
        self._submit(
            _Write(
                1,
                lambda db: db.execute(
                    "INSERT INTO events (run, time, step, kind, message, data) VALUES (?, ?, ?, ?, ?, ?)", row
                ),
            )
        )

    # -- importing a run directory (a person waits for it: errors are UserErrors) -----------------

    def import_run(self, run: RunRecord) -> None:
        """Make the registry's record of a run match its directory: the run's row and events are
        replaced, its checkpoints on disk written. Metrics (from the checkpoints, then the backlog) are
        applied in order, each replacing the registry's value of its step unless that came from a
        later trainer process, whose redo of the step is the one that stands. Importing twice
        changes nothing."""
        events = [
            (
                run.name,
                e["time"],
                e["step"],
                e["kind"],
                e["message"],
                None if e["data"] is None else json.dumps(e["data"]),
            )
            for e in run.events
        ]

        def write(db: sqlite3.Connection) -> None:
            db.execute(
                """INSERT INTO runs (name, run_dir, status, created, updated, config, segment, step, tokens,
                   best_val_loss) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT (name) DO UPDATE SET run_dir = excluded.run_dir, status = excluded.status,
                   created = MIN(created, excluded.created), updated = MAX(updated, excluded.updated),
                   config = excluded.config, segment = MAX(segment, excluded.segment), step = excluded.step,
                   tokens = excluded.tokens, best_val_loss = excluded.best_val_loss""",
                (
                    run.name,
                    run.run_dir,
                    run.status,
                    run.created,
                    run.updated,
                    json.dumps(run.config),
                    run.segment,
                    run.step,
                    run.tokens,
                    _to_sql(run.best_val_loss),
                ),
            )
            # The logbook holds every event the registry was sent (they are its mirror), so it replaces them.
            db.execute("DELETE FROM events WHERE run = ?", (run.name,))
            db.executemany(
                "INSERT INTO events (run, time, step, kind, message, data) VALUES (?, ?, ?, ?, ?, ?)", events
            )
            db.executemany(
                "INSERT OR REPLACE INTO checkpoints (run, step, path, val_loss, created) VALUES (?, ?, ?, ?, ?)",
                [(run.name, c["step"], c["path"], _to_sql(c["val_loss"]), c["created"]) for c in run.checkpoints],
            )
            db.executemany(
                """INSERT INTO metrics (run, step, key, value, segment) VALUES (?, ?, ?, ?, ?)
                   ON CONFLICT (run, step, key) DO UPDATE SET value = excluded.value, segment = excluded.segment
                   WHERE excluded.segment >= metrics.segment""",
                [(run.name, m["step"], m["key"], _to_sql(m["value"]), m["segment"]) for m in run.metrics],
            )

        try:
            with _transaction(self._connect(_READ_BUSY_TIMEOUT_S)) as db:
                write(db)
        except (sqlite3.Error, OSError) as err:
            self._disconnect()
            raise UserError(_unusable(self.path, err)) from None

    # -- reading (an unusable registry is a UserError) ---------------------------------------------

    def _read(self, query: str, params: tuple = ()) -> list[sqlite3.Row]:
        try:
            return self._connect(_READ_BUSY_TIMEOUT_S).execute(query, params).fetchall()
        except (sqlite3.Error, OSError) as err:
            self._disconnect()
            raise UserError(_unusable(self.path, err)) from None

    def runs(self) -> list[dict[str, Any]]:
        """Every run, most recently updated first."""
        return [_run_dict(row) for row in self._read("SELECT * FROM runs ORDER BY updated DESC, name")]

    def get_run(self, name: str) -> dict[str, Any] | None:
        rows = self._read("SELECT * FROM runs WHERE name = ?", (name,))
        return _run_dict(rows[0]) if rows else None

    def metrics(self, name: str, key: str | None = None) -> dict[str, list[tuple[int, float]]]:
        """{key: [(step, value), ...]} sorted by step; only `key` when given. NaN comes back as NaN."""
        query = (
            "SELECT key, step, value FROM metrics WHERE run = ?"
            + (" AND key = ?" if key else "")
            + " ORDER BY key, step"
        )
        series: dict[str, list[tuple[int, float]]] = {}
        for row_key, step, value in self._read(query, (name, key) if key else (name,)):
            series.setdefault(row_key, []).append((step, math.nan if value is None else value))
        return series

    def segments(self, name: str) -> list[tuple[int, int, int]]:
        """(segment, first step, last step) of the metrics each restart segment left, in order."""
        query = "SELECT segment, MIN(step), MAX(step) FROM metrics WHERE run = ? GROUP BY segment ORDER BY segment"
        return [tuple(row) for row in self._read(query, (name,))]

    def checkpoints(self, name: str) -> list[dict[str, Any]]:
        """Checkpoints the run has written (some may since have been pruned from disk), by step."""
        query = "SELECT step, path, val_loss, created FROM checkpoints WHERE run = ? ORDER BY step"
        return [dict(row) for row in self._read(query, (name,))]

    def events(self, name: str) -> list[dict[str, Any]]:
        """The run's events in the order they were logged, `data` decoded from JSON."""
        rows = self._read("SELECT id, time, step, kind, message, data FROM events WHERE run = ? ORDER BY id", (name,))
        return [{**row, "data": None if row["data"] is None else json.loads(row["data"])} for row in map(dict, rows)]


@contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    # IMMEDIATE takes the write lock up front, so a busy writer makes us wait (busy_timeout)
    # instead of failing when a read transaction tries to upgrade to a write.
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        try:
            db.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # a broken file can fail the rollback too; closing the connection discards the transaction
        raise
    db.execute("COMMIT")


def _enable_wal(db: sqlite3.Connection, wait_s: float) -> None:
    # Switching a new file to WAL needs an exclusive lock, and SQLite reports "database is
    # locked" at once rather than waiting out busy_timeout when another process (a trainer and
    # its watchdog starting together) holds it; wait here instead.
    deadline = time.monotonic() + wait_s
    while True:
        try:
            db.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _file_id(path: Path) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def _unusable(path: Path, err: Exception) -> str:
    """One sentence for a person: what is wrong with the registry file and what to do about it."""
    code = getattr(err, "sqlite_errorname", "")
    if code.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        return (
            f"the run registry {path} is locked by another process ({err}); "
            "try again once that process lets go of it (`fuser` names it)."
        )
    if isinstance(err, OSError) or code.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM")):
        return (
            f"the run registry {path} cannot be opened for writing ({err}); "
            f"make {path.parent} writable, or set KEEL_HOME to a writable directory."
        )
    return (
        f"the run registry {path} is damaged ({err}); move it aside with its -wal and -shm files (keel starts a "
        "fresh one; run directories are untouched) and rebuild each run with `keel runs --import RUN_DIR`."
    )


def _append(path: Path, text: str) -> None:
    # One write() with O_APPEND, fsynced: the trainer and its successor may append to the same file.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def _warn(message: str) -> None:
    # tqdm.write lifts this process's progress bar off the line first (the trainer's), so the message
    # starts a line of its own instead of trailing the bar.
    tqdm.write(f"registry: {message}", file=sys.stderr)
    sys.stderr.flush()


def _to_sql(value: float | None) -> float | None:
    # SQLite turns NaN into NULL anyway; doing it here makes the convention explicit.
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def _run_dict(row: sqlite3.Row) -> dict[str, Any]:
    run = dict(row)
    run["config"] = json.loads(run["config"])
    return run


def format_runs_table(rows: list[dict[str, Any]]) -> str:
    """The `keel runs` table: one aligned line per run, numbers right-aligned."""
    if not rows:
        return "no runs yet"
    header = ("name", "status", "step", "tokens", "best val loss", "tokens/s", "updated")
    lines = [
        (
            run["name"],
            run["status"],
            str(run["step"]),
            _human_count(run["tokens"]),
            "-" if run["best_val_loss"] is None else f"{run['best_val_loss']:.4f}",
            "-" if run["tokens_per_s"] is None else f"{run['tokens_per_s']:,.0f}",
            time.strftime("%Y-%m-%d %H:%M", time.localtime(run["updated"])),
        )
        for run in rows
    ]
    widths = [max(len(line[i]) for line in (header, *lines)) for i in range(len(header))]
    right = {2, 3, 4, 5}

    def render(cells: tuple[str, ...]) -> str:
        return "  ".join(
            cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(cells, widths))
        ).rstrip()

    return "\n".join(render(line) for line in (header, *lines))


def _human_count(n: int) -> str:
    """1234 -> 1.2k, 5_600_000 -> 5.6M: token counts span many orders of magnitude."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)
