"""Supervised fine-tuning: next-token loss on the completions (or assistant turns) of examples.

Examples are packed: each row of a batch holds as many whole examples as fit in the context, side
by side, each with positions restarting at 0 and attention that never crosses into another
example (a block-diagonal causal mask, not just separators), so an example's loss is what it would
be alone. What is left of a row is padding that carries no loss.

Which examples share a row is a pure function of (data, seed, epoch): epoch e visits the train
examples in a permutation seeded by (seed, e) and fills rows in that order, starting a new row
when the next example does not fit ("next fit"). The rows of all epochs form one endless stream
and micro-batch i is rows [i·B, (i+1)·B) of it, so resuming and skipping batches work as in
pretraining.

The loss is the mean over the loss-carrying tokens of the whole optimizer step (the loop weights
each micro-batch by its share of them), so gradient accumulation does not reweight short examples.
Every example ends with its end token (`<|end|>` or `<|endoftext|>`) inside the loss: a model that
never sees that token as a target never learns to stop.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from keel.config import RunConfig
from keel.data.examples import Sequences, open_examples
from keel.errors import UserError
from keel.tasks.base import Batch, LossOutput
from keel.tasks.lm import IGNORE_INDEX, LMTask, mean_token_loss, token_loss


class SFTTask(LMTask):
    kind = "sft"

    def __init__(self, config: RunConfig, device: torch.device, dtype: torch.dtype):
        super().__init__(config, device, dtype)
        self.data = open_examples(Path(config.data.path), kind="sft")
        self.train, self.val = self.data.sequences("train"), self.data.sequences("val")
        check_lengths(self.data.path, (self.train, self.val), config.model.context_length)
        self.loss_on_all = config.sft.loss_on == "all"
        self.pad_id = self.data.eot_id
        self.epoch_rows: list[list[np.ndarray]] = []  # packing plan of each epoch computed so far
        self.rows_before: list[int] = [0]  # rows in the epochs before each one

    def batch(self, index: int) -> Batch:
        B = self.config.train.batch_size
        rows = [self._row(r) for r in range(index * B, (index + 1) * B)]
        return self._pack(self.train, rows)

    def loss(self, model, tensors: dict[str, torch.Tensor]) -> LossOutput:
        return token_loss(model, tensors)

    def evaluate(self, model) -> dict[str, float]:
        """Mean loss per completion token over the val split (its first train.eval_batches batches)."""
        t = self.config.train
        rows = pack_in_order(np.arange(len(self.val)), self.val.lengths() - 1, self.config.model.context_length)
        batches = [
            self._pack(self.val, rows[i : i + t.batch_size]).tensors
            for i in range(0, min(len(rows), t.eval_batches * t.batch_size), t.batch_size)
        ]
        return {"val_loss": mean_token_loss(model, batches, self.device, self.dtype)}

    # -- packing ------------------------------------------------------------------------------

    def _row(self, global_row: int) -> np.ndarray:
        """The example ids of row `global_row` of the endless stream."""
        while self.rows_before[-1] <= global_row:
            epoch = len(self.epoch_rows)
            order = np.random.default_rng([self.config.train.seed, epoch]).permutation(len(self.train))
            rows = pack_in_order(order, self.train.lengths() - 1, self.config.model.context_length)
            self.epoch_rows.append(rows)
            self.rows_before.append(self.rows_before[-1] + len(rows))
        epoch = int(np.searchsorted(self.rows_before, global_row, side="right")) - 1
        return self.epoch_rows[epoch][global_row - self.rows_before[epoch]]

    def _pack(self, split: Sequences, rows: list[np.ndarray]) -> Batch:
        T = self.config.model.context_length
        inputs = np.full((len(rows), T), self.pad_id, dtype=np.int64)  # (B, T)
        targets = np.full((len(rows), T), IGNORE_INDEX, dtype=np.int64)
        positions = np.zeros((len(rows), T), dtype=np.int64)
        segments = np.full((len(rows), T), -1, dtype=np.int64)  # padding: a segment of its own
        for r, example_ids in enumerate(rows):
            start = 0
            for segment, example in enumerate(example_ids):
                ids, mask = split.get(int(example))
                ids = ids.astype(np.int64)  # the IGNORE_INDEX targets are negative
                n = len(ids) - 1  # positions: input ids[:-1] predicts ids[1:]
                end = start + n
                inputs[r, start:end] = ids[:-1]
                carries_loss = np.ones(n, dtype=bool) if self.loss_on_all else mask[1:].astype(bool)
                targets[r, start:end] = np.where(carries_loss, ids[1:], IGNORE_INDEX)
                positions[r, start:end] = np.arange(n)
                segments[r, start:end] = segment
                start = end
        tensors = {
            name: torch.from_numpy(a)
            for name, a in (("inputs", inputs), ("targets", targets), ("positions", positions), ("segments", segments))
        }
        return Batch(tensors, units=int((targets != IGNORE_INDEX).sum()), tokens=int((segments >= 0).sum()))


def pack_in_order(order: np.ndarray, sizes: np.ndarray, capacity: int) -> list[np.ndarray]:
    """Next-fit packing: the items of `order` in that order, a new row when the next does not fit."""
    rows, current, used = [], [], 0
    for item in order.tolist():
        size = int(sizes[item])
        if current and used + size > capacity:
            rows.append(np.array(current))
            current, used = [], 0
        current.append(item)
        used += size
    if current:
        rows.append(np.array(current))
    return rows


def check_lengths(path: Path, splits: tuple[Sequences, ...], context_length: int) -> None:
    """Refuse data with a sequence longer than the context: it was prepared for a longer one."""
    longest = max(int(s.lengths().max()) for s in splits if len(s))
    if longest - 1 > context_length:
        raise UserError(
            f"{path} holds sequences of up to {longest} tokens, longer than model.context_length "
            f"{context_length} + 1; prepare it again with --context-length {context_length}."
        )
