"""The run's logbook: an append-only JSONL record of everything that happened to the run.

One line per entry in `RUN_DIR/logbook.jsonl`:

    {"time": "2025-06-01T14:03:07+00:00", "step": 1234, "kind": "signal", "name": "loss_spike",
     "message": "loss spike: 5.91 vs mean 3.10 ± 0.05 (56σ)", "evidence": {"loss": 5.91, ...}}

`kind` is one of KINDS. Entries are rare (a handful per run), so each is flushed and fsynced on its
own: a crash loses at most the line being written, and `read_logbook` skips such a torn line.
Non-finite numbers are written as the strings "nan", "inf", "-inf" so every line is strict JSON.

Evidence the summary of `render_chronicle` adds up (writers: keep these names):
- action "rollback" (supervisor): from_step, to_step, steps_lost, tokens_lost, skip_batches;
- outcome (supervisor): recovered = 1 when the repair worked, 0 when it did not hold;
- fault and restart (watchdog): downtime_seconds, summed as the wall time faults cost; a fault's
  lost_steps = the steps redone since the checkpoint the trainer restarts from;
- info "run_start" (loop): one per trainer process, so their count numbers a process segment when
  the registry cannot (keel.runs.importer);
- info "run_end" (loop): status = "finished" | "stopped" (a string), the message says why;
  info "gave_up" (watchdog) and action "stop" (supervisor) end a run too.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

KINDS = ("signal", "action", "outcome", "fault", "restart", "info")


def _plain(value: Any) -> Any:
    """Evidence value as strict JSON: non-finite floats become strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "nan", "inf", "-inf"
    return value


class Logbook:
    """Appends entries to a JSONL file; `mirror` (e.g. the registry's events table) sees each one too."""

    def __init__(self, path: Path, mirror: Callable[[dict], None] | None = None, rank: int = 0):
        self.path = Path(path)
        self.mirror = mirror
        # Ranks other than 0 of a multi-process run write only their own faults, marked with their rank:
        # everything else rank 0 writes for the run (all ranks take the same actions).
        self.rank = rank

    def write(self, step: int, kind: str, name: str, message: str, evidence: dict[str, Any] | None = None) -> dict:
        assert kind in KINDS, kind
        entry = {
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "step": int(step),
            "kind": kind,
            "name": name,
            "message": message,
            "evidence": {key: _plain(value) for key, value in (evidence or {}).items()},
        }
        if self.rank:
            if kind != "fault":
                return entry
            entry["evidence"]["rank"] = self.rank
        line = (json.dumps(entry, ensure_ascii=False) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # O_APPEND with one write() per line: the trainer and the watchdog may both append to this file.
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)  # read: to spot a torn last line
        try:
            if _ends_mid_line(fd):
                line = b"\n" + line  # a crash tore the last line; keep ours whole on a line of its own
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        if self.mirror is not None:
            self.mirror(entry)
        return entry


def _ends_mid_line(fd: int) -> bool:
    size = os.fstat(fd).st_size
    return size > 0 and os.pread(fd, 1, size - 1) != b"\n"


def read_logbook(path: Path) -> list[dict]:
    """All whole entries in file order; a line torn by a crash mid-write is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    entries = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and entry.get("kind") in KINDS:
            # Entries from other writers may leave fields out; the chronicle needs them all.
            entries.append(
                {
                    "time": "",
                    "name": "",
                    "message": "",
                    **entry,
                    "step": entry.get("step") or 0,
                    "evidence": entry.get("evidence") or {},
                }
            )
    return entries


# ---------------------------------------------------------------------------------------------
# the chronicle


def _number(value: Any) -> float:
    """Evidence value as a float (strings like "nan" included); 0 when missing or not a number."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


def _human(count: float) -> str:
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(count) >= size:
            return f"{count / size:.1f}{suffix}"
    return f"{count:.0f}"


def _when(entry: dict) -> str:
    return entry.get("time", "")[:19].replace("T", " ")


def _segments(entries: list[dict]) -> list[list[dict]]:
    """Split at each restart entry: one segment per run of the trainer process."""
    segments: list[list[dict]] = [[]]
    for entry in entries:
        if entry["kind"] == "restart" and segments[-1]:
            segments.append([])
        segments[-1].append(entry)
    return [segment for segment in segments if segment]


def _chronicle_lines(segment: list[dict]) -> list[str]:
    """One line per event; the actions taken at a signal's step follow that signal after an arrow."""
    lines: list[str] = []
    signal_step, signal_line, answered = None, -1, False
    for entry in segment:
        if entry["kind"] == "action" and entry["step"] == signal_step:
            lines[signal_line] += ("; " if answered else " → ") + entry["message"]
            answered = True
            continue
        if entry["kind"] == "signal":
            signal_step, signal_line, answered = entry["step"], len(lines), False
        elif (
            entry["kind"] != "outcome" or entry["step"] != signal_step
        ):  # an outcome at the signal's step belongs to it
            signal_step = None
        tag = "" if entry["kind"] in ("signal", "action") else f"{entry['kind']}: "
        lines.append(f"{_when(entry)}  step {entry['step']:>7} — {tag}{entry['message']}")
    return lines


def summarize(entries: list[dict]) -> dict[str, Any]:
    """The figures of the chronicle's summary, as data."""
    actions = Counter(e["name"] for e in entries if e["kind"] == "action")
    signals = Counter(e["name"] for e in entries if e["kind"] == "signal")
    outcomes = [e for e in entries if e["kind"] == "outcome"]
    rollbacks = [e for e in entries if e["kind"] == "action" and e["name"] == "rollback"]
    faults = [e for e in entries if e["kind"] in ("fault", "restart")]
    ends = [
        e for e in entries if (e["kind"], e["name"]) in (("info", "run_end"), ("action", "stop"), ("info", "gave_up"))
    ]
    if not ends:
        status = "no end recorded (still running, or the process died without a word)"
    elif ends[-1]["name"] == "run_end":
        status = f"{ends[-1]['evidence'].get('status', 'ended')} at step {ends[-1]['step']}: {ends[-1]['message']}"
    elif ends[-1]["name"] == "stop":
        status = f"stopped by the supervisor at step {ends[-1]['step']}: {ends[-1]['message']}"
    else:
        status = f"failed at step {ends[-1]['step']}: the watchdog {ends[-1]['message']}"
    return {
        "interventions": dict(actions),
        "signals": dict(signals),
        "repairs_worked": sum(_number(e["evidence"].get("recovered")) == 1 for e in outcomes),
        "repairs_failed": sum(_number(e["evidence"].get("recovered")) != 1 for e in outcomes),
        "rollbacks": len(rollbacks),
        "steps_lost_to_rollbacks": int(sum(_number(e["evidence"].get("steps_lost")) for e in rollbacks)),
        "tokens_lost_to_rollbacks": int(sum(_number(e["evidence"].get("tokens_lost")) for e in rollbacks)),
        "faults": sum(e["kind"] == "fault" for e in entries),
        "restarts": sum(e["kind"] == "restart" for e in entries),
        "seconds_lost_to_faults": sum(_number(e["evidence"].get("downtime_seconds")) for e in faults),
        "steps_redone_after_faults": int(sum(_number(e["evidence"].get("lost_steps")) for e in faults)),
        "status": status,
    }


def render_chronicle(entries: list[dict]) -> str:
    """A readable chronicle, one block per trainer process (restart segment), then a summary."""
    out: list[str] = []
    for number, segment in enumerate(_segments(entries), start=1):
        first = segment[0]
        out.append(f"── segment {number}: from {_when(first)} at step {first['step']} " + "─" * 20)
        out += _chronicle_lines(segment)
        out.append("")
    s = summarize(entries)

    def counts(counter: dict[str, int]) -> str:
        return ", ".join(f"{n} {name}" for name, n in sorted(counter.items(), key=lambda kv: -kv[1])) or "none"

    out += [
        "summary",
        f"  interventions: {counts(s['interventions'])}",
        f"  signals:       {counts(s['signals'])}",
        f"  outcomes:      {s['repairs_worked']} worked, {s['repairs_failed']} did not hold",
        f"  rollbacks:     {s['rollbacks']}, {s['steps_lost_to_rollbacks']} steps and "
        f"{_human(s['tokens_lost_to_rollbacks'])} tokens lost",
        f"  faults:        {s['faults']}, restarts: {s['restarts']}, "
        f"{s['seconds_lost_to_faults']:.0f} s of wall time lost, "
        f"{s['steps_redone_after_faults']} steps redone",
        f"  final status:  {s['status']}",
    ]
    return "\n".join(out) + "\n"
