"""The trainer process the watchdog starts: `python -m keel.train.worker RUN_DIR`.

Under torchrun (`torchrun --nproc-per-node N -m keel.train.worker RUN_DIR`) each rank is one of
these; RUN_DIR must have been written by `keel train` first (see docs/distributed.md).

It trains the run whose resolved config `keel train` wrote into RUN_DIR. Exit codes tell the
watchdog what to do: 0 finished or cleanly stopped, 2 a user error, 3 stopped by the
supervisor (neither is worth a restart); anything else is a crash.
"""

from __future__ import annotations

import ctypes
import faulthandler
import json
import os
import signal
import sys
import time
from pathlib import Path

from keel.errors import UserError
from keel.supervisor.watchdog import (
    EXIT_STOPPED_BY_SUPERVISOR,
    EXIT_USER_ERROR,
    WATCHDOG_PID_ENV,
    heartbeat_file,
)


def stop_with_watchdog() -> None:
    """Ask the kernel for SIGTERM when the watchdog dies (Linux), so the trainer never outlives it.

    SIGTERM makes the trainer checkpoint and exit. Elsewhere the trainer is stopped only by its own
    signals; the run directory's lock still keeps a second `keel train` out while it lives.
    """
    parent = os.environ.get(WATCHDOG_PID_ENV)
    if parent is None or not sys.platform.startswith("linux"):
        return
    PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != int(parent):  # the watchdog died before the request was in place
        os.kill(os.getpid(), signal.SIGTERM)


def main(argv: list[str]) -> int:
    run_dir = Path(argv[0])
    faulthandler.enable()  # a trainer killed by SIGSEGV or SIGABRT leaves its Python stacks on stderr
    stop_with_watchdog()
    from keel.runs.rundir import load_run_config

    try:  # a mistyped RUN_DIR given to torchrun is one sentence, not a traceback per rank
        config = load_run_config(run_dir)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    rank = int(os.environ.get("RANK", "0"))
    # A first sign of life before the slow imports (torch takes seconds to load on a busy machine).
    beat = heartbeat_file(rank)
    (run_dir / beat).write_text(json.dumps({"step": None, "time": time.time(), "pid": os.getpid()}))
    from keel.runs.registry import Registry
    from keel.train.loop import train

    try:
        if rank != 0:  # rank 0 keeps the registry for the run
            result = train(config, run_dir, None, progress=False)
        else:
            with Registry() as registry:  # closing saves the writes a registry outage held back
                result = train(config, run_dir, registry)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    if result.status == "stopped_by_supervisor":
        print(f"stopped by the supervisor: {result.diagnosis}", file=sys.stderr)
        return EXIT_STOPPED_BY_SUPERVISOR
    if rank == 0:  # one summary for the run, as rank 0 keeps its registry and logbook
        print(
            f"{result.status} at step {result.steps} ({result.tokens:,} tokens, {result.tokens_per_s:,.0f} "
            f"tokens/s); val loss {result.val_loss if result.val_loss is not None else float('nan'):.4f}",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
