"""`keel train`: resolve the run directory, then run the trainer process under the watchdog."""

from __future__ import annotations

import sys
from pathlib import Path

from keel.config import RunConfig
from keel.runs.registry import Registry
from keel.runs.rundir import LOGBOOK_FILE, init_run_dir
from keel.supervisor.logbook import Logbook
from keel.supervisor.watchdog import run_watchdog


def launch(config: RunConfig, run_dir: Path) -> int:
    """Train or resume the run in run_dir; returns the process exit code."""
    config = init_run_dir(config, run_dir)

    def record(entry: dict) -> None:
        print(f"watchdog: {entry['message']}", file=sys.stderr)
        logbook.write(entry.get("step") or 0, entry["kind"], entry["name"], entry["message"], entry.get("evidence", {}))

    def mirror(entry: dict) -> None:
        registry.log_event(config.name, entry.get("step"), entry["kind"], entry["message"], entry)

    # The registry's writes never raise (an unusable registry holds them back and says so once), and
    # the watchdog only writes to it: a broken registry cannot take the watchdog down.
    with Registry() as registry:
        logbook = Logbook(run_dir / LOGBOOK_FILE, mirror=mirror)
        argv = [sys.executable, "-m", "keel.train.worker", str(run_dir)]
        code = run_watchdog(argv, run_dir, config.watchdog, on_event=record)
        if code != 0:
            registry.fail_if_running(config.name)  # unless the trainer said how it ended
    return code
