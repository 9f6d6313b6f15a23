"""The trainer process the watchdog starts: `python -m keel.train.worker RUN_DIR`.

It trains the run whose resolved config `keel train` wrote into RUN_DIR. Exit codes tell the
watchdog what to do: 0 finished or cleanly stopped, 2 a user error, 3 stopped by the
supervisor (neither is worth a restart); anything else is a crash.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from keel.errors import UserError
from keel.supervisor.watchdog import EXIT_STOPPED_BY_SUPERVISOR, EXIT_USER_ERROR, HEARTBEAT_FILE


def main(argv: list[str]) -> int:
    run_dir = Path(argv[0])
    # A first sign of life before the slow imports (torch takes seconds to load on a busy machine).
    (run_dir / HEARTBEAT_FILE).write_text(json.dumps({"step": None, "time": time.time(), "pid": os.getpid()}))
    from keel.runs.registry import Registry
    from keel.runs.rundir import load_run_config
    from keel.train.loop import train

    try:
        config = load_run_config(run_dir)
        with Registry() as registry:  # closing saves the writes a registry outage held back
            result = train(config, run_dir, registry)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    if result.status == "stopped_by_supervisor":
        print(f"stopped by the supervisor: {result.diagnosis}", file=sys.stderr)
        return EXIT_STOPPED_BY_SUPERVISOR
    print(
        f"{result.status} at step {result.steps} ({result.tokens:,} tokens, {result.tokens_per_s:,.0f} tokens/s); "
        f"val loss {result.val_loss if result.val_loss is not None else float('nan'):.4f}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
