"""Data parallelism on PyTorch's own engine: DDP or FSDP2, applied to a finished model from outside.

A run with several processes (`keel train --nproc N`, or `torchrun` starting keel's worker) has one
rank per process; torch.distributed's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT) says which. The backend is gloo on CPUs and NCCL on GPUs (one GPU per rank).

- **The global batch does not depend on the world size.** A step is train.grad_accum micro-batches
  whatever the world size; rank r takes micro-batches r, r + N, r + 2N, ... of it, so a 2-rank run
  is a 1-rank run with its micro-batches spread over two processes (grad_accum must be a multiple
  of N). Losses are weighted by the step's units summed over all ranks and the gradients are
  *summed* across ranks (not averaged): the result is the single-process step, up to the order of
  float32 additions.
- **One verdict.** Before the supervisor sees a step, its loss and metrics are summed over the ranks
  (each rank holds its share of the step mean), so every rank builds the same StepRecord; a NaN on
  one rank is a NaN for all. Gradients are reduced before the norm, so the norm and the skip
  decision are the same everywhere too, and every rank's supervisor takes the same actions.
- The task's loss runs inside `LossModule.forward`, so DDP's and FSDP2's hooks see one forward per
  micro-batch however the task reaches into the model (trunk, norm, head weight).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from keel.errors import UserError

# How long a rank waits inside a collective for the others before it gives up (a hung or dead rank).
COLLECTIVE_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def world_from_env() -> World:
    """This process's place in the job, from torch.distributed's environment (one process: rank 0 of 1)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    return World(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")))


def init_process_group(world: World, device: torch.device, timeout_s: float = COLLECTIVE_TIMEOUT_S) -> None:
    if not world.distributed or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)


def barrier() -> None:
    """Wait here until every rank arrives (nothing to wait for in a single process)."""
    if dist.is_initialized():
        dist.barrier()


def destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def my_micro_batches(grad_accum: int, world: World) -> list[int]:
    """The micro-batches of each step this rank trains on (indices into the step's grad_accum)."""
    return list(range(world.rank, grad_accum, world.size))


def check_layout(grad_accum: int, world: World, parallel: str, config) -> None:
    """Refuse what cannot run at this world size, with one sentence each."""
    if not world.distributed:
        return
    if grad_accum % world.size:
        raise UserError(
            f"train.grad_accum={grad_accum} is not a multiple of the {world.size} processes: each step's "
            f"micro-batches are shared out among them; set train.grad_accum to a multiple of {world.size}."
        )
    if parallel == "fsdp":
        if config.train.compile is True:
            raise UserError(
                "train.compile=true is not supported with train.parallel=fsdp yet (FSDP2's hooks inside the "
                "compiled loss); use train.compile=auto or false, or train.parallel=ddp."
            )
        if config.optim.optimizer == "muon":
            raise UserError(
                "optim.optimizer=muon needs whole matrices, which train.parallel=fsdp shards; "
                "use train.parallel=ddp or optim.optimizer=adamw."
            )
        if config.lora.rank:
            raise UserError("LoRA runs are small enough to replicate: use train.parallel=ddp with lora.rank.")


class LossModule(nn.Module):
    """The task's loss as the forward of a module that owns the model, for DDP and FSDP2 to wrap."""

    def __init__(self, model: nn.Module, loss: Callable):
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, tensors: dict[str, torch.Tensor]):
        return self.loss(self.model, tensors)


class Parallel:
    """How the loop runs forward/backward, reduces and checkpoints at this world size.

    With one process every method is the plain single-process path (no wrapper, no collective).
    """

    def __init__(self, model: nn.Module, loss: Callable, world: World, kind: str, device: torch.device):
        self.world, self.kind, self.device = world, kind if world.distributed else "none", device
        self.model = model
        # Host numbers (clock, stop requests, unit counts) go over gloo: on GPUs the device numbers then
        # reduce on NCCL's stream without the host waiting for them.
        self.host_group = dist.new_group(backend="gloo") if self.kind != "none" and device.type == "cuda" else None
        if self.kind == "none":
            self.module = None
            self.forward = lambda tensors: loss(model, tensors)
            return
        wrapper = LossModule(model, loss)
        if self.kind == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index] if device.type == "cuda" else None
            self.module = DistributedDataParallel(wrapper, device_ids=ids, forward_sync_buffers=False)
            self.module.register_comm_hook(None, _sum_gradients)
        else:
            from torch.distributed.fsdp import fully_shard

            for block in model.blocks:
                fully_shard(block)
            self.module = fully_shard(wrapper)
            for module in self.module.modules():  # sum, not average: the loss carries the weights
                if hasattr(module, "set_gradient_divide_factor"):
                    module.set_gradient_divide_factor(1.0)
                    module.set_force_sum_reduction_for_comms(True)
        self.forward = self.module

    @contextmanager
    def accumulating(self, last: bool) -> Iterator[None]:
        """Backward of a micro-batch that is not the rank's last of the step: gradients stay local."""
        if self.kind == "ddp" and not last:
            with self.module.no_sync():
                yield
        elif self.kind == "fsdp":
            self.module.set_requires_gradient_sync(last)
            yield
        else:
            yield

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Device values summed over the ranks, queued without waiting (the same tensor with one process)."""
        if self.kind == "none":
            return values
        out = values.clone()
        dist.all_reduce(out)
        return out

    def sum_host(self, values: torch.Tensor) -> torch.Tensor:
        """Host (CPU) values summed over the ranks."""
        if self.kind == "none":
            return values
        out = values.clone()
        dist.all_reduce(out, group=self.host_group)
        return out

    def total_norm(self, grads: list[torch.Tensor]) -> torch.Tensor:
        norm = torch.nn.utils.get_total_norm(grads)
        if hasattr(norm, "full_tensor"):  # FSDP2: the shards' norms, combined over the ranks
            norm = norm.full_tensor()
        return norm

    def full_weights(self):
        """For evaluation: FSDP2's root parameters gathered whole while the task reaches into the model
        outside a forward (the blocks gather their own in their forward)."""
        if self.kind != "fsdp":
            return nullcontext()
        return _unsharded(self.module)

    def replicas_agree(self) -> bool:
        """DDP: whether every rank holds the same weights (compared by a float64 fingerprint per tensor).
        A difference means a rank went its own way (a skipped or extra update, a flipped bit)."""
        if self.kind != "ddp":
            return True
        with torch.no_grad():
            prints = torch.stack(
                [torch.stack((p.double().sum(), p.double().square().sum())) for p in self.model.parameters()]
            ).flatten()
        bounds = torch.cat((prints, -prints)).to(self.device)
        dist.all_reduce(bounds, op=dist.ReduceOp.MAX)  # the largest and (negated) smallest of each across ranks
        return torch.equal(bounds[: len(prints)], -bounds[len(prints) :])


@contextmanager
def _unsharded(module) -> Iterator[None]:
    module.unshard()
    try:
        yield
    finally:
        module.reshard()


def _sum_gradients(state, bucket):
    """DDP communication hook: all-reduce SUM of the gradient bucket (DDP's default divides by N)."""
    return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda fut: fut.value()[0])
