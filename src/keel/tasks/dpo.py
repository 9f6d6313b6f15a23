"""Preference optimisation (DPO and relatives), with rater disagreement as a per-pair soft target.

Each pair is a prompt with a chosen and a rejected response. With π the policy being trained and
π_ref the reference (the init.from run, frozen), the pair's implied reward margin is

    h = [log π(chosen) − log π_ref(chosen)] − [log π(rejected) − log π_ref(rejected)]

(log-probs summed over the response tokens), and the policy's implied preference is σ(β·h). A pair
may carry p = the share of raters who preferred `chosen` (p_chosen, or votes a : b → a / (a + b));
pairs without one have p = 1. The losses take p per pair:

    sigmoid (DPO):  −[p·log σ(β·h) + (1 − p)·log σ(−β·h)]   binary cross-entropy of σ(β·h) against p
    ipo:            (h − (p − ½) / β)²                       IPO's regression target, scaled by p − ½
    hinge:          p·max(0, 1 − β·h) + (1 − p)·max(0, 1 + β·h)

With p = 1 each is exactly its standard form (DPO, IPO, SLiC's hinge). The sigmoid loss is
minimised at σ(β·h) = p: a 50/50 pair pulls nowhere, a 90/10 pair pulls towards 0.9 and no further,
while a hard label keeps pushing σ(β·h) towards 1. (TRL's label smoothing is one global constant;
here each pair has its own.)

The reference log-probs of a sequence are computed the first time a batch holds it, by the init
run's weights (a frozen copy; with LoRA, the policy itself with its adapters off, so no second copy
of the model is held), and kept: a pair seen again costs nothing, and the values travel in the
checkpoints (the task's state), so a resumed run computes each one exactly where an uninterrupted run
did (each sequence is computed alone, so its value is the same whatever batch, rank or process
segment first meets it). Training starts at once, however many pairs the data holds; the first
epoch's steps pay one forward pass more (about a third of a step).

Metrics per step: reward accuracy (share of pairs with h > 0), the mean margin β·h, the chosen and
rejected log-probs, and `kl`, the mean log π/π_ref of the responses (an estimate of the KL to the
reference on the data's responses). The likelihood-displacement monitor watches the chosen log-prob
fall while the margin grows: both responses losing probability, the rejected one faster.
"""

from __future__ import annotations

import math
from collections import deque
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from keel.config import RunConfig
from keel.data.examples import Sequences, open_examples
from keel.models.lora import adapters_off, is_lora
from keel.supervisor.monitors import Signal, StepRecord
from keel.tasks.base import ACT_NORM, Batch, LossOutput
from keel.tasks.lm import IGNORE_INDEX, LMTask, sequence_log_probs
from keel.tasks.sft import check_lengths
from keel.train.precision import autocast


def preference_loss(margin: torch.Tensor, p: torch.Tensor, beta: float, kind: str) -> torch.Tensor:
    """Per-pair loss from the implied reward margins h (B,) and soft targets p (B,); see the module docstring."""
    z = beta * margin
    if kind == "sigmoid":
        return -(p * F.logsigmoid(z) + (1 - p) * F.logsigmoid(-z))
    if kind == "ipo":
        return (margin - (p - 0.5) / beta) ** 2
    if kind == "hinge":
        return p * F.relu(1 - z) + (1 - p) * F.relu(1 + z)
    raise AssertionError(f"config validation lets no other dpo.loss through: {kind}")


class DPOTask(LMTask):
    kind = "dpo"

    def __init__(self, config: RunConfig, device: torch.device, dtype: torch.dtype):
        super().__init__(config, device, dtype)
        self.data = open_examples(Path(config.data.path), kind="pref")
        self.splits = {split: self.data.sequences(split) for split in ("train", "val")}
        check_lengths(self.data.path, tuple(self.splits.values()), config.model.context_length)
        self.p_chosen = {
            split: self.data.p_chosen(split) if config.dpo.soft_labels else np.ones(len(s) // 2, dtype=np.float32)
            for split, s in self.splits.items()
        }
        # {split: (num_sequences,)} summed response log-probs under the reference; NaN until computed
        self.reference = {split: np.full(len(s), np.nan, dtype=np.float32) for split, s in self.splits.items()}
        self.policy: torch.nn.Module | None = None  # a LoRA policy, whose base is the reference
        self.frozen: torch.nn.Module | None = None  # else a frozen copy of the init weights, built when needed

    def bind(self, model: torch.nn.Module) -> None:
        self.policy = model if is_lora(model) else None

    # -- the stream of pairs ------------------------------------------------------------------

    def batch(self, index: int) -> Batch:
        """Pairs [i·B, (i+1)·B) of an endless stream that visits all pairs once per epoch, in an
        order seeded by (seed, epoch)."""
        B, seed = self.config.train.batch_size, self.config.train.seed
        num_pairs = len(self.splits["train"]) // 2
        return self._rows("train", _pairs_at(np.arange(index * B, (index + 1) * B), num_pairs, seed))

    def _rows(self, split: str, pairs: np.ndarray) -> Batch:
        """Chosen rows then rejected rows, (2B, T), right-padded; targets only on the responses."""
        sequences = self.splits[split]
        ids = np.concatenate((2 * pairs, 2 * pairs + 1))  # (2B,)
        inputs, targets, tokens = pad_rows(sequences, ids, self.config.model.context_length, self.data.eot_id)
        tensors = {
            "inputs": inputs,
            "targets": targets,
            "reference": torch.from_numpy(self._reference(split, ids)),
            "p_chosen": torch.from_numpy(self.p_chosen[split][pairs]),
        }
        return Batch(tensors, units=len(pairs), tokens=tokens)

    # -- loss and evaluation --------------------------------------------------------------------

    def loss(self, model, tensors: dict[str, torch.Tensor]) -> LossOutput:
        log_probs, out = sequence_log_probs(model, tensors["inputs"], tensors["targets"])  # (2B,)
        stats = pair_statistics(log_probs, tensors["reference"], self.config.dpo.beta)
        losses = preference_loss(stats["h"], tensors["p_chosen"], self.config.dpo.beta, self.config.dpo.loss)
        metrics = {name: value.detach().mean() for name, value in stats.items() if name != "h"}
        metrics[ACT_NORM] = out.act_mean_square
        return LossOutput(losses.mean(), metrics)

    def evaluate(self, model) -> dict[str, float]:
        """Held-out preference loss, reward accuracy, margin, log-probs and KL estimate over the val pairs
        (the first train.eval_batches batches of them)."""
        t = self.config.train
        num_pairs = min(len(self.splits["val"]) // 2, t.eval_batches * t.batch_size)
        totals: dict[str, float] = {}
        model.eval()
        with torch.no_grad():
            for start in range(0, num_pairs, t.batch_size):
                batch = self._rows("val", np.arange(start, min(start + t.batch_size, num_pairs))).to(self.device)
                with autocast(self.device, self.dtype):
                    out = self.loss(model, batch.tensors)
                for name, value in (("loss", out.loss), *out.metrics.items()):
                    if name != ACT_NORM:
                        totals[name] = totals.get(name, 0.0) + value.item() * batch.units
        model.train()
        return {f"val_{name}": total / num_pairs for name, total in totals.items()}

    def monitors(self) -> list:
        return [LikelihoodDisplacementMonitor(self.config.dpo.displacement_patience)]

    def state_dict(self) -> dict[str, Any]:
        return {"reference": {split: torch.from_numpy(values.copy()) for split, values in self.reference.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for split, values in state.get("reference", {}).items():
            if split in self.reference and len(values) == len(self.reference[split]):
                self.reference[split] = values.numpy().copy()

    # -- the reference ------------------------------------------------------------------------

    def _reference(self, split: str, ids: np.ndarray) -> np.ndarray:
        """The reference log-probs of sequences `ids`, computing those not known yet."""
        values = self.reference[split]
        missing = np.unique(ids[np.isnan(values[ids])])
        if len(missing):
            values[missing] = self._reference_log_probs(split, missing)
        return values[ids]

    def _reference_log_probs(self, split: str, ids: np.ndarray) -> np.ndarray:
        if self.policy is not None:
            model, base = self.policy, adapters_off(self.policy)
        else:
            if self.frozen is None:
                self.frozen = self.build_model().requires_grad_(False)  # the init run's weights
            model, base = self.frozen, nullcontext()
        inputs, targets, _ = pad_rows(self.splits[split], ids, self.config.model.context_length, self.data.eot_id)
        training = model.training
        model.eval()
        values = []
        try:
            with torch.no_grad(), base, autocast(self.device, self.dtype):
                # One sequence at a time: its value then never depends on the batch it first came in,
                # which differs between ranks and after a resume (the task state is rank 0's).
                for row in range(len(ids)):
                    x, y = inputs[row : row + 1].to(self.device), targets[row : row + 1].to(self.device)
                    values.append(sequence_log_probs(model, x, y)[0])
        finally:
            model.train(training)
        return torch.cat(values).float().cpu().numpy()


def _pairs_at(positions: np.ndarray, num_pairs: int, seed: int) -> np.ndarray:
    epochs = positions // num_pairs
    pairs = np.empty(len(positions), dtype=np.int64)
    for epoch in np.unique(epochs):
        order = np.random.default_rng([seed, int(epoch)]).permutation(num_pairs)
        pairs[epochs == epoch] = order[positions[epochs == epoch] % num_pairs]
    return pairs


# Rows are padded to a multiple of this, so a compiled model sees few distinct shapes.
PAD_MULTIPLE = 16


def pad_rows(
    sequences: Sequences, ids: np.ndarray, context_length: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """inputs, targets (len(ids), T) of whole sequences, right-padded; targets only where the mask is 1.

    T is the longest of these sequences rounded up to a multiple of PAD_MULTIPLE (at most
    context_length), not the context: preference pairs are often far shorter than it, and every
    padded position would cost as much as a real one. Causal attention keeps a row's log-probs
    independent of the padding after it."""
    rows = [sequences.get(i) for i in ids.tolist()]
    longest = max((len(seq) - 1 for seq, _ in rows), default=1)
    width = min(context_length, -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE)
    inputs = np.full((len(ids), width), pad_id, dtype=np.int64)
    targets = np.full((len(ids), width), IGNORE_INDEX, dtype=np.int64)
    tokens = 0
    for row, (seq, mask) in enumerate(rows):
        seq = seq.astype(np.int64)  # the IGNORE_INDEX targets are negative
        n = len(seq) - 1
        inputs[row, :n] = seq[:-1]
        targets[row, :n] = np.where(mask[1:].astype(bool), seq[1:], IGNORE_INDEX)
        tokens += n
    return torch.from_numpy(inputs), torch.from_numpy(targets), tokens


def pair_statistics(log_probs: torch.Tensor, reference: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
    """Per pair, from the summed log-probs of chosen rows then rejected rows (2B,) of policy and reference."""
    chosen, rejected = log_probs.chunk(2)
    ratio_chosen, ratio_rejected = (log_probs - reference).chunk(2)  # log π/π_ref of each response
    h = ratio_chosen - ratio_rejected
    return {
        "h": h,
        "reward_accuracy": (h > 0).float(),
        "margin": beta * h,
        "chosen_logp": chosen,
        "rejected_logp": rejected,
        "kl": (ratio_chosen + ratio_rejected) / 2,
    }


# -- likelihood displacement -----------------------------------------------------------------------


class LikelihoodDisplacementMonitor:
    """The chosen responses' log-prob falling steadily while the margin grows.

    DPO can raise the margin by pushing both responses down, the rejected one faster: the
    preferred answer then becomes less likely than before training ("likelihood displacement").
    Compared over `patience` steps on 20-step moving averages (batch noise in the summed
    log-probs is large): the chosen log-prob down by more than 1 nat while the margin rose. A
    warning for the logbook with the numbers; no repair inside the run undoes it.
    """

    name = "likelihood_displacement"
    SPAN = 20
    MIN_FALL = 1.0  # nats: a fall smaller than this is within the noise of 20-step averages

    def __init__(self, patience: int):
        self.patience = patience
        self.alpha = 2.0 / (self.SPAN + 1)
        self.chosen = self.margin = math.nan  # moving averages
        self.history: deque[tuple[int, float, float]] = deque(maxlen=patience + 1)
        self.fired = False

    def observe(self, record: StepRecord) -> Signal | None:
        chosen, margin = record.metrics.get("chosen_logp"), record.metrics.get("margin")
        if chosen is None or margin is None or not (math.isfinite(chosen) and math.isfinite(margin)):
            return None
        first = math.isnan(self.chosen)
        self.chosen = chosen if first else self.chosen + self.alpha * (chosen - self.chosen)
        self.margin = margin if first else self.margin + self.alpha * (margin - self.margin)
        self.history.append((record.step, self.chosen, self.margin))
        if len(self.history) <= self.patience:
            return None
        step0, chosen0, margin0 = self.history[0]
        displaced = self.chosen < chosen0 - self.MIN_FALL and self.margin > margin0
        if not displaced:
            self.fired = False
            return None
        if self.fired:
            return None
        self.fired = True
        return Signal(
            self.name,
            "warning",
            record.step,
            f"likelihood displacement: the chosen log-prob fell from {chosen0:.2f} to {self.chosen:.2f} "
            f"over {record.step - step0} steps while the margin grew from {margin0:.3f} to {self.margin:.3f}",
            {
                "chosen_logp_before": chosen0,
                "chosen_logp": self.chosen,
                "margin_before": margin0,
                "margin": self.margin,
                "steps": record.step - step0,
            },
            began_step=step0,
        )

    def state_dict(self) -> dict:
        return {
            "chosen": self.chosen,
            "margin": self.margin,
            "fired": self.fired,
            "history": [list(entry) for entry in self.history],
        }

    def load_state_dict(self, state: dict) -> None:
        self.chosen, self.margin, self.fired = state["chosen"], state["margin"], state["fired"]
        self.history = deque((tuple(entry) for entry in state["history"]), maxlen=self.patience + 1)
