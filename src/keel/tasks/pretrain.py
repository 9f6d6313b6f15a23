"""Pretraining: next-token prediction on the token shards `keel prepare` writes from text."""

from __future__ import annotations

from pathlib import Path

import torch

from keel.config import RunConfig
from keel.data import eval_batches, get_batch, open_data
from keel.tasks.base import Batch, LossOutput
from keel.tasks.lm import LMTask, mean_token_loss, token_loss


class PretrainTask(LMTask):
    kind = "pretrain"

    def __init__(self, config: RunConfig, device: torch.device, dtype: torch.dtype):
        super().__init__(config, device, dtype)
        data = open_data(Path(config.data.path))
        self.train_tokens, self.val_tokens = data.tokens("train"), data.tokens("val")
        self.train_name, self.val_name = data.split_name("train"), data.split_name("val")
        # Fail now, with a clear sentence, if the context does not fit the data.
        self.batch(0)
        next(iter(self._val_batches(1)))

    def batch(self, index: int) -> Batch:
        m, t = self.config.model, self.config.train
        x, y = get_batch(self.train_tokens, m.context_length, t.batch_size, t.seed, index, split_name=self.train_name)
        return Batch({"inputs": x, "targets": y}, units=y.numel(), tokens=y.numel())

    def loss(self, model, tensors: dict[str, torch.Tensor]) -> LossOutput:
        return token_loss(model, tensors)

    def evaluate(self, model) -> dict[str, float]:
        batches = self._val_batches(self.config.train.eval_batches)
        return {"val_loss": mean_token_loss(model, batches, self.device, self.dtype)}

    def _val_batches(self, num_batches: int):
        m, t = self.config.model, self.config.train
        batches = eval_batches(self.val_tokens, m.context_length, t.batch_size, num_batches, split_name=self.val_name)
        return ({"inputs": x, "targets": y} for x, y in batches)
