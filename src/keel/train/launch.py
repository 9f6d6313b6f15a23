"""`keel train`: claim the run directory, then run the trainer process under the watchdog."""

from __future__ import annotations

import sys
from pathlib import Path

from keel.config import RunConfig
from keel.errors import UserError
from keel.runs.registry import Registry
from keel.runs.rundir import LOGBOOK_FILE, RunClaim, resolve_run, write_run_dir
from keel.supervisor.logbook import Logbook
from keel.supervisor.watchdog import run_watchdog


def launch(config: RunConfig, run_dir: Path, new_data: bool = False, nproc: int = 1, write_only: bool = False) -> int:
    """Train or resume the run in run_dir; returns the process exit code.

    Everything is checked before anything is written; the directory is then this process's (and its
    trainer's) until both have exited. new_data: resume on other data or another tokenizer on purpose.
    nproc: trainer processes (ranks) on this machine, each on its own device when they are GPUs.
    write_only: check and write the run directory, train nothing (for torchrun or SLURM to start
    `python -m keel.train.worker RUN_DIR` on every rank; docs/distributed.md).
    """
    check_nproc(nproc, config)
    config = resolve_run(config, run_dir, new_data)
    run_dir.mkdir(parents=True, exist_ok=True)
    claim = RunClaim(run_dir)
    if write_only:
        try:
            write_run_dir(config, run_dir)
        finally:
            claim.release()
        print(
            f"wrote {run_dir}; start its ranks: torchrun --standalone --nproc-per-node N -m keel.train.worker {run_dir}"
        )
        return 0

    def record(entry: dict) -> None:
        print(f"watchdog: {entry['message']}", file=sys.stderr)
        logbook.write(entry.get("step") or 0, entry["kind"], entry["name"], entry["message"], entry.get("evidence", {}))

    def mirror(entry: dict) -> None:
        registry.log_event(config.name, entry.get("step"), entry["kind"], entry["message"], entry)

    def note(name: str, message: str, evidence: dict) -> None:
        record({"kind": "info", "name": name, "message": message, "evidence": evidence})

    # The registry's writes never raise (an unusable registry holds them back and says so once), and
    # the watchdog only writes to it: a broken registry cannot take the watchdog down.
    try:
        with Registry() as registry:
            logbook = Logbook(run_dir / LOGBOOK_FILE, mirror=mirror)
            if claim.previous_owner is not None:
                note(
                    "took_over",
                    f"took over {run_dir} from PID {claim.previous_owner}, which ended without releasing it.",
                    {"previous_pid": claim.previous_owner},
                )
            if new_data:
                note(
                    "new_data",
                    f"resumed on {config.data.path} as asked (--new-data), whatever the run trained on before.",
                    {"data": str(config.data.path)},
                )
            write_run_dir(config, run_dir)
            argv = [sys.executable, "-m", "keel.train.worker", str(run_dir)]
            code = run_watchdog(argv, run_dir, config.watchdog, on_event=record, pass_fds=(claim.fd,), nproc=nproc)
            if code != 0:
                registry.fail_if_running(config.name)  # unless the trainer said how it ended
    finally:
        claim.release()
    return code


def check_nproc(nproc: int, config: RunConfig) -> None:
    """--nproc must fit the machine: one core per rank on CPUs, one GPU per rank on CUDA."""
    if nproc < 1:
        raise UserError(f"--nproc must be at least 1, got {nproc}.")
    if nproc == 1:
        return  # the watchdog of one trainer never imports torch (2 s and ~190 MB less)
    import os

    import torch

    from keel.train.parallel import World, check_layout
    from keel.train.precision import pick_device

    if pick_device(config.train.device).type == "cuda":
        have, what = torch.cuda.device_count(), "GPUs"
    else:
        have, what = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, "cores"
    if nproc > have:
        raise UserError(
            f"--nproc {nproc} is more processes than this machine's {have} {what}; use --nproc {have} or fewer."
        )
    check_layout(config.train.grad_accum, World(0, nproc, 0), config.train.parallel, config)
