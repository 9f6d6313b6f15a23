"""`keel runs --import RUN_DIR`: rebuild a run's registry record from its run directory.

For a registry that missed writes (it was locked, read-only or corrupt while the run trained) or
was replaced by a fresh one. The run directory is the source of truth for what it holds:

- the run's row: config from `config.yaml`; step and tokens from the newest checkpoint's
  `meta.json`; best validation loss from the checkpoints' metas (pruning keeps the best one) and
  the logbook's run_end; status from the logbook's last start or end; the segment from the count
  of trainer starts (`info run_start`, one per trainer process);
- checkpoints: every `checkpoints/step_*/meta.json` on disk;
- events: every logbook entry (the registry's events are the logbook's mirror, so they are replaced);
- metrics: the validation loss at each checkpoint kept on disk, and the per-step metrics a registry
  outage sent to `registry-backlog.jsonl` (those the trainer could not keep in memory, or still
  held when it ended). Otherwise per-step metrics (loss, gradient norm, lr, ...) live only in the
  registry, which keeps what it has.
"""

from __future__ import annotations

import bisect
import json
import math
import os
from datetime import datetime
from pathlib import Path

from keel.runs.registry import BACKLOG_FILE, Registry, RunRecord
from keel.runs.rundir import CONFIG_FILE, LOGBOOK_FILE, load_run_config
from keel.supervisor.logbook import read_logbook
from keel.supervisor.watchdog import HEARTBEAT_FILE
from keel.train import checkpoint as ckpt

_ENDS = {("info", "run_end"), ("action", "stop"), ("info", "gave_up")}


def import_run(run_dir: Path, registry: Registry) -> RunRecord:
    """Write what run_dir says about its run into the registry; returns what was written."""
    run = read_run(run_dir)
    registry.import_run(run)
    return run


def trainer_starts(run_dir: Path) -> list[float]:
    """Unix times of the run's trainer process starts in its logbook, oldest first."""
    entries = read_logbook(Path(run_dir) / LOGBOOK_FILE)
    return [_seconds(e) for e in entries if (e["kind"], e["name"]) == ("info", "run_start")]


def read_run(run_dir: Path) -> RunRecord:
    """The run as its directory records it (see the module docstring)."""
    run_dir = Path(run_dir)
    config = load_run_config(run_dir)  # a clear error for a directory that is not a run
    entries = read_logbook(run_dir / LOGBOOK_FILE)
    starts = [_seconds(e) for e in entries if (e["kind"], e["name"]) == ("info", "run_start")]

    checkpoints, metas = [], []
    for path in ckpt.list_checkpoints(run_dir):
        try:
            meta = json.loads((path / ckpt.META).read_text())
        except (OSError, ValueError):
            continue  # a torn checkpoint; the trainer's loader skips it as well
        created = meta.get("saved_at") or meta.get("time") or path.stat().st_mtime
        checkpoints.append(
            {
                "step": ckpt.checkpoint_step(path),
                "path": str(path),
                "val_loss": meta.get("val_loss"),
                "created": created,
            }
        )
        metas.append(meta)
    # A checkpoint belongs to the trainer process that started last before it was written (the very
    # first one is written just before its process logs its start).
    metrics = [
        {
            "step": c["step"],
            "key": "val_loss",
            "value": c["val_loss"],
            "segment": max(bisect.bisect_right(starts, c["created"]) - 1, 0),
        }
        for c in checkpoints
        if c["val_loss"] is not None
    ]
    metrics += [
        {"step": line["step"], "key": key, "value": value, "segment": line["segment"]}
        for line in _read_backlog(run_dir / BACKLOG_FILE)
        for key, value in line["metrics"].items()
    ]
    val_losses = [c["val_loss"] for c in checkpoints] + [
        e["evidence"].get("val_loss") for e in entries if (e["kind"], e["name"]) == ("info", "run_end")
    ]
    finite = [v for v in val_losses if isinstance(v, (int, float)) and math.isfinite(v)]

    newest = metas[-1] if metas else {}
    config_time = (run_dir / CONFIG_FILE).stat().st_mtime
    times = [_seconds(e) for e in entries if e["time"]]
    return RunRecord(
        name=config.name,
        run_dir=str(run_dir),
        config=config.to_dict(),
        status=_status(run_dir, entries),
        segment=max(len(starts) - 1, 0),
        step=int(newest.get("step", 0)),
        tokens=int(newest.get("tokens", 0)),
        best_val_loss=min(finite, default=None),
        created=min(times, default=config_time),
        updated=max([*times, *(c["created"] for c in checkpoints)], default=config_time),
        checkpoints=checkpoints,
        events=[
            {"time": _seconds(e), "step": e["step"], "kind": e["kind"], "message": e["message"], "data": e}
            for e in entries
        ],
        metrics=metrics,
    )


def _read_backlog(path: Path) -> list[dict]:
    """The backlog's lines in file order; a line torn by a crash mid-write is skipped."""
    if not path.is_file():
        return []
    lines = []
    for text in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            line = json.loads(text)
        except json.JSONDecodeError:
            continue
        if isinstance(line, dict) and isinstance(line.get("metrics"), dict) and isinstance(line.get("step"), int):
            lines.append({"segment": 0, **line})
    return lines


def _status(run_dir: Path, entries: list[dict]) -> str:
    """How the run ended, by the last start or end in its logbook."""
    marks = [e for e in entries if (e["kind"], e["name"]) in _ENDS or (e["kind"], e["name"]) == ("info", "run_start")]
    last = marks[-1] if marks else None
    if last is None or last["name"] == "run_start":
        return "running" if _trainer_alive(run_dir) else "crashed"
    if last["name"] == "gave_up":
        return "failed"
    if last["name"] == "stop":
        return "stopped"
    return "stopped" if last["evidence"].get("status") == "stopped" else "finished"


def _trainer_alive(run_dir: Path) -> bool:
    """Whether the process that last wrote the run's heartbeat still exists."""
    try:
        pid = int(json.loads((run_dir / HEARTBEAT_FILE).read_text())["pid"])
        os.kill(pid, 0)
    except PermissionError:
        return True  # it exists, under another user
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


def _seconds(entry: dict) -> float:
    """A logbook entry's time as unix seconds (0 when it has none)."""
    try:
        return datetime.fromisoformat(entry["time"]).timestamp()
    except (KeyError, TypeError, ValueError):
        return 0.0
