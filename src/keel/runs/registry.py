"""The run registry: one SQLite file listing every run with its metrics, checkpoints and events.

It lives at `$KEEL_HOME/registry.sqlite` (KEEL_HOME defaults to ~/.keel). WAL mode and a busy
timeout let the trainer and a watchdog process write at the same time. A run directory stays
the source of truth for resuming; the registry is what `keel runs` and reports read.

Each process opens its own `Registry`; a connection must not cross a fork.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from keel.errors import UserError

STATUSES = ("running", "finished", "stopped", "failed", "crashed")
_RUN_FIELDS = ("run_dir", "status", "config", "step", "tokens", "best_val_loss", "tokens_per_s")
_BUSY_TIMEOUT_S = 30.0

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


class Registry:
    """A connection to the registry; use as a context manager or call close()."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = Path(path) if path is not None else registry_path()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: we open transactions ourselves, with BEGIN IMMEDIATE for writes.
            self._db = sqlite3.connect(self.path, timeout=_BUSY_TIMEOUT_S, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            self._db.execute(f"PRAGMA busy_timeout = {int(_BUSY_TIMEOUT_S * 1000)}")
            self._enable_wal()
            self._db.execute("PRAGMA synchronous = NORMAL")  # durable at each checkpoint of the WAL; safe in WAL mode
            with self._write() as db:  # executescript would commit early; run the statements in one transaction
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
        except (sqlite3.DatabaseError, OSError) as err:
            raise UserError(
                f"the run registry {self.path} cannot be opened ({err}); if it is corrupt, move it aside "
                "(keel starts a fresh one and run directories are untouched), or set KEEL_HOME to a writable directory."
            ) from None

    def _enable_wal(self) -> None:
        # Switching a new file to WAL needs an exclusive lock, and SQLite reports "database is
        # locked" at once rather than waiting out busy_timeout when another process (a trainer and
        # its watchdog starting together) holds it; wait here instead.
        deadline = time.monotonic() + _BUSY_TIMEOUT_S
        while True:
            try:
                self._db.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as err:
                if "locked" not in str(err) or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        # IMMEDIATE takes the write lock up front, so a busy writer makes us wait (busy_timeout)
        # instead of failing when a read transaction tries to upgrade to a write.
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- writing -------------------------------------------------------------------------------

    def start_run(self, name: str, run_dir: Path, config: dict[str, Any]) -> int:
        """Register a run as running, or mark an existing one running again (a resume keeps its
        history). Returns the segment number: 0 on the first start, then 1, 2... per resume."""
        now = time.time()
        with self._write() as db:
            db.execute(
                """INSERT INTO runs (name, run_dir, status, created, updated, config) VALUES (?, ?, 'running', ?, ?, ?)
                   ON CONFLICT (name) DO UPDATE SET run_dir = excluded.run_dir, status = 'running',
                   updated = excluded.updated, config = excluded.config, segment = segment + 1""",
                (name, str(run_dir), now, now, json.dumps(config)),
            )
            return db.execute("SELECT segment FROM runs WHERE name = ?", (name,)).fetchone()[0]

    def update_run(self, name: str, **fields: Any) -> None:
        """Set some of run_dir, status, config, step, tokens, best_val_loss, tokens_per_s."""
        assert fields and set(fields) <= set(_RUN_FIELDS), fields
        assert fields.get("status", "running") in STATUSES, fields["status"]
        if "config" in fields:
            fields["config"] = json.dumps(fields["config"])
        if "run_dir" in fields:
            fields["run_dir"] = str(fields["run_dir"])
        assignments = ", ".join(f"{key} = ?" for key in fields)
        with self._write() as db:
            cursor = db.execute(
                f"UPDATE runs SET {assignments}, updated = ? WHERE name = ?", (*fields.values(), time.time(), name)
            )
        assert cursor.rowcount == 1, f"run {name} is not in the registry; call start_run first"

    def log_metrics(self, name: str, step: int, values: dict[str, float], segment: int = 0) -> None:
        self.log_metrics_many(name, [(step, values)], segment)

    def log_metrics_many(self, name: str, rows: Iterable[tuple[int, dict[str, float]]], segment: int = 0) -> None:
        """Store (step, {key: value}) rows in one transaction. A step logged again (a resumed run
        redoing steps after a rollback) overwrites the old values."""
        records = [(name, step, key, _to_sql(value), segment) for step, values in rows for key, value in values.items()]
        with self._write() as db:
            db.executemany(
                "INSERT OR REPLACE INTO metrics (run, step, key, value, segment) VALUES (?, ?, ?, ?, ?)", records
            )

    def log_checkpoint(self, name: str, step: int, path: Path, val_loss: float | None = None) -> None:
        with self._write() as db:
            db.execute(
                "INSERT OR REPLACE INTO checkpoints (run, step, path, val_loss, created) VALUES (?, ?, ?, ?, ?)",
                (name, step, str(path), _to_sql(val_loss), time.time()),
            )

    def log_event(
        self, name: str, step: int | None, kind: str, message: str, data: dict[str, Any] | None = None
    ) -> None:
        with self._write() as db:
            db.execute(
                "INSERT INTO events (run, time, step, kind, message, data) VALUES (?, ?, ?, ?, ?, ?)",
                (name, time.time(), step, kind, message, None if data is None else json.dumps(data)),
            )

    # -- reading -------------------------------------------------------------------------------

    def runs(self) -> list[dict[str, Any]]:
        """Every run, most recently updated first."""
        return [_run_dict(row) for row in self._db.execute("SELECT * FROM runs ORDER BY updated DESC, name")]

    def get_run(self, name: str) -> dict[str, Any] | None:
        row = self._db.execute("SELECT * FROM runs WHERE name = ?", (name,)).fetchone()
        return None if row is None else _run_dict(row)

    def metrics(self, name: str, key: str | None = None) -> dict[str, list[tuple[int, float]]]:
        """{key: [(step, value), ...]} sorted by step; only `key` when given. NaN comes back as NaN."""
        query = (
            "SELECT key, step, value FROM metrics WHERE run = ?"
            + (" AND key = ?" if key else "")
            + " ORDER BY key, step"
        )
        series: dict[str, list[tuple[int, float]]] = {}
        for row_key, step, value in self._db.execute(query, (name, key) if key else (name,)):
            series.setdefault(row_key, []).append((step, math.nan if value is None else value))
        return series

    def segments(self, name: str) -> list[tuple[int, int, int]]:
        """(segment, first step, last step) of the metrics each restart segment left, in order."""
        query = "SELECT segment, MIN(step), MAX(step) FROM metrics WHERE run = ? GROUP BY segment ORDER BY segment"
        return [tuple(row) for row in self._db.execute(query, (name,))]

    def checkpoints(self, name: str) -> list[dict[str, Any]]:
        """Checkpoints the run has written (some may since have been pruned from disk), by step."""
        query = "SELECT step, path, val_loss, created FROM checkpoints WHERE run = ? ORDER BY step"
        return [dict(row) for row in self._db.execute(query, (name,))]

    def events(self, name: str) -> list[dict[str, Any]]:
        """The run's events in the order they were logged, `data` decoded from JSON."""
        rows = self._db.execute(
            "SELECT id, time, step, kind, message, data FROM events WHERE run = ? ORDER BY id", (name,)
        )
        return [{**row, "data": None if row["data"] is None else json.loads(row["data"])} for row in map(dict, rows)]


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
