"""Test-only fault injection, off unless KEEL_FAULTS is set.

`KEEL_FAULTS="nan@120,spike@150,hang@200"` makes the trainer process
- `nan@S`: turn the loss of the step that trains on batch S into NaN (so its gradients are NaN
  too), once per process; batch S is step S's until an update is skipped or rolled back;
- `spike@S`: multiply the loss of the step on batch S (and so its gradients) by 100, once per process;
- `hang@S`: stop making progress (sleep forever) after step S, only in the first process of a
  run (KEEL_RESTART unset or 0), so the watchdog's restart can get past it.
- `kill@S`: die by SIGKILL after step S, only in the first process of a run (as the
  out-of-memory killer would end it);
- `diskfull@S`: from step S on, the process cannot write a file past 64 KiB (RLIMIT_FSIZE: the
  kernel fails the write with EFBIG, as a full disk fails it with ENOSPC), only in the first process
  of a run, so a restart finds room again; checkpoints fail, small files (heartbeat) still work.
An entry may end in `:R` to strike rank R only in a multi-process run (`nan@120:1`); without it, every
rank. `keel chaos` and the tests use it to prove the supervisor and watchdog repair these faults.
"""

from __future__ import annotations

import os
import resource
import signal
import time

import torch

from keel.errors import UserError

DISK_FULL_BYTES = 64 * 1024


class Faults:
    def __init__(self, spec: str = "", segment: int = 0, rank: int = 0):
        self.nan_batches: set[int] = set()
        self.spike_batches: set[int] = set()
        self.hang_steps: set[int] = set()
        self.kill_steps: set[int] = set()
        self.disk_full_step: int | None = None
        self.segment = segment
        for item in filter(None, (part.strip() for part in spec.split(","))):
            kind, _, step = item.partition("@")
            step, _, only_rank = step.partition(":")
            if only_rank.isdigit() and int(only_rank) != rank:
                continue
            steps = {
                "nan": self.nan_batches,
                "spike": self.spike_batches,
                "hang": self.hang_steps,
                "kill": self.kill_steps,
                "diskfull": None,
            }
            if kind not in steps or not step.isdigit() or (only_rank and not only_rank.isdigit()):
                raise UserError(
                    f"KEEL_FAULTS entry {item!r} is not nan@STEP, spike@STEP, hang@STEP, kill@STEP or diskfull@STEP "
                    "(each optionally :RANK); "
                    "fix or unset KEEL_FAULTS."
                )
            if kind == "diskfull":
                self.disk_full_step = int(step)
            else:
                steps[kind].add(int(step))

    @classmethod
    def from_env(cls) -> "Faults":
        env = os.environ
        return cls(env.get("KEEL_FAULTS", ""), int(env.get("KEEL_RESTART", "0")), int(env.get("RANK", "0")))

    def corrupt_loss(self, loss: torch.Tensor, batch: int) -> torch.Tensor:
        # By batch, not step: the loop queues a step's forward before it knows whether the one
        # before was skipped, i.e. before it knows the step's number.
        if batch in self.nan_batches:
            self.nan_batches.discard(batch)
            return loss * float("nan")
        if batch in self.spike_batches:
            self.spike_batches.discard(batch)
            return loss * 100.0
        return loss

    def maybe_hang(self, step: int) -> None:
        if self.segment == 0 and step in self.hang_steps:
            while True:
                time.sleep(3600)
        if self.segment == 0 and step in self.kill_steps:
            os.kill(os.getpid(), signal.SIGKILL)

    def maybe_fill_disk(self, step: int) -> None:
        if self.segment == 0 and self.disk_full_step is not None and step >= self.disk_full_step:
            self.disk_full_step = None
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not death by signal
            resource.setrlimit(resource.RLIMIT_FSIZE, (DISK_FULL_BYTES, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
