"""TensorBoard event files for a run (`train.tensorboard=true`), in RUN_DIR/tensorboard, written by rank 0.

The registry stays the store keel's own commands read; this copies the same numbers to where many people
already look (`tensorboard --logdir runs/`). Scalars carry the registry's names (loss, val_loss, lr,
grad_norm, the task's own metrics) plus tokens_per_s, the step's tokens over its time. Every logbook
entry the trainer writes becomes a text event under the tag `logbook`, and each supervisor action also
steps the scalar `interventions` (their running count over the run), so an intervention is visible as
a step in that curve, at its training step.

The event files are a copy: a write that fails (a full disk) is said once on stderr and ends the copy
for this process, never the training.

A resumed process appends a new event file with TensorBoard's purge step set to its first logged step:
TensorBoard then drops what the earlier process logged from that step on, the steps it is redoing.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path

from keel.runs.rundir import LOGBOOK_FILE
from keel.supervisor.logbook import read_logbook

TENSORBOARD_DIR = "tensorboard"
LOGBOOK_TAG = "logbook"
INTERVENTIONS_TAG = "interventions"
TOKENS_PER_S_TAG = "tokens_per_s"


class TensorBoardWriter:
    """Writes one trainer process's metrics and logbook entries; opens its event file at the first write."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self._writer = None
        self._last_tokens: float | None = None
        self._failed = False
        # The running count goes on from the actions earlier processes of the run took.
        entries = read_logbook(self.run_dir / LOGBOOK_FILE)
        self._actions = sum(e["kind"] == "action" for e in entries)

    def _open(self, first_step: int):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when asked for

            self._writer = SummaryWriter(log_dir=str(self.run_dir / TENSORBOARD_DIR), purge_step=first_step)
        return self._writer

    def add_metrics(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        """(step, {name: value}) rows as the loop sends them to the registry; written to disk at once."""
        if not rows or self._failed:
            return
        with self._guard():
            self._add_metrics(rows)

    def _add_metrics(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        writer = self._open(rows[0][0])
        for step, values in rows:
            for name, value in values.items():
                writer.add_scalar(name, float(value), step)
            tokens, seconds = values.get("tokens"), values.get("step_seconds")
            if tokens is not None and seconds and self._last_tokens is not None and tokens > self._last_tokens:
                writer.add_scalar(TOKENS_PER_S_TAG, (tokens - self._last_tokens) / seconds, step)
            if tokens is not None:
                self._last_tokens = tokens
        writer.flush()

    def add_entry(self, entry: dict) -> None:
        """One logbook entry (as keel.supervisor.logbook writes it) as a text event, actions also counted."""
        if self._failed:
            return
        with self._guard():
            self._add_entry(entry)

    def _add_entry(self, entry: dict) -> None:
        step = int(entry.get("step") or 0)
        writer = self._open(step)
        writer.add_text(LOGBOOK_TAG, f"**{entry['kind']} {entry['name']}**: {entry['message']}", step)
        if entry["kind"] == "action":
            self._actions += 1
            writer.add_scalar(INTERVENTIONS_TAG, self._actions, step)
        writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            with self._guard():
                self._writer.close()
            self._writer = None

    @contextmanager
    def _guard(self):
        try:
            yield
        except OSError as err:
            self._failed = True
            print(
                f"trainer: TensorBoard files in {self.run_dir / TENSORBOARD_DIR} could not be written "
                f"({err.strerror or err}); training goes on, the registry still has every metric.",
                file=sys.stderr,
            )
