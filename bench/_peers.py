"""The two peer trainers that bench/throughput.py runs beside keel, and the GEMM peak they are measured against.

- `NanoGPT`: a minimal nanoGPT-style model (learned absolute positions, LayerNorm, GELU MLP 4x,
  causal attention through SDPA, tied embeddings), trained with a non-fused AdamW, which is what
  nanoGPT does on a CPU (it asks for fused AdamW only on CUDA).
- `llama_peer`: Hugging Face `LlamaForCausalLM` with keel's architecture, trained by a plain
  PyTorch loop with torch's AdamW (fused where it exists).

Every peer computes in `peer_dtype()`, the dtype keel's own `train.dtype=auto` picks on this CPU:
bf16 autocast where the CPU computes bf16 natively, float32 where bf16 would be emulated (many
times slower than float32 there). A peer is measured at its best, never handicapped by a dtype
its machine lacks. nanoGPT itself would stay in float32 on any CPU (its dtype switch acts only
on CUDA); the bench gives it the better dtype all the same.

Both loops time the same phases keel reports (data, forward_backward, optimizer, logging) and
exclude warm-up steps from tokens/s.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from keel.train.precision import autocast, pick_dtype

CPU = torch.device("cpu")


def peer_dtype() -> torch.dtype:
    """The dtype every peer computes in: keel's own rule for `train.dtype=auto` on this CPU."""
    return pick_dtype("auto", CPU)


def gemm_gflops(dtype: torch.dtype, n: int = 2048, seconds: float = 2.0, window: float = 0.25) -> float:
    """Peak GFLOP/s of an n x n matmul in `dtype` on the CPU: the best `window`-second stretch of `seconds`.

    The best stretch rather than the mean, because other processes on a shared machine can only
    slow a stretch down: the best one is the closest to what the hardware does.
    """
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=generator).to(dtype)
    b = torch.randn(n, n, generator=generator).to(dtype)
    for _ in range(3):
        a @ b
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        count, window_start = 0, time.perf_counter()
        while time.perf_counter() - window_start < window:
            a @ b
            count += 1
        best = max(best, 2 * n**3 * count / (time.perf_counter() - window_start) / 1e9)
    return best


class GemmProbe:
    """The n x n GEMM rate in `dtype` right now: the best of `repeats` matmuls (~65 ms in bf16 at 2048).

    Called just before each timed training step, it pairs every step with what the hardware did at
    that moment, so a slow stretch of a shared machine slows both sides of the ratio.
    """

    def __init__(self, dtype: torch.dtype, n: int = 2048, repeats: int = 3):
        generator = torch.Generator().manual_seed(0)
        self.a = torch.randn(n, n, generator=generator).to(dtype)
        self.b = torch.randn(n, n, generator=generator).to(dtype)
        self.flops, self.repeats = 2 * n**3, repeats
        self.rates: list[float] = []  # GFLOP/s, one per call
        self.seconds = 0.0  # spent probing, to be left out of the training time

    def __call__(self) -> None:
        start, best = time.perf_counter(), float("inf")
        for _ in range(self.repeats):
            t0 = time.perf_counter()
            self.a @ self.b
            best = min(best, time.perf_counter() - t0)
        self.rates.append(self.flops / best / 1e9)
        self.seconds += time.perf_counter() - start


@dataclass
class Shape:
    """The architecture and batch shared by keel and both peers."""

    n_layer: int
    d_model: int
    n_head: int
    n_kv_head: int
    mlp_hidden: int
    vocab_size: int
    context_length: int
    batch_size: int


def attention_flops_per_token(shape: Shape) -> int:
    """12 * L * d * T: the QK^T and AV matmuls, forward and backward, as nanoGPT's estimate_mfu counts them."""
    return 12 * shape.n_layer * shape.d_model * shape.context_length


# ---------------------------------------------------------------------------------------------
# peer 2: nanoGPT-style model


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        return self.proj(y.transpose(1, 2).contiguous().view(B, T, C))


class Block(nn.Module):
    def __init__(self, d_model: int, n_head: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model, bias=False)
        self.attn = CausalSelfAttention(d_model, n_head)
        self.ln_2 = nn.LayerNorm(d_model, bias=False)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model, bias=False), nn.GELU(), nn.Linear(4 * d_model, d_model, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    """nanoGPT's architecture with its train.py defaults (no biases, no dropout, tied embeddings)."""

    def __init__(self, shape: Shape) -> None:
        super().__init__()
        self.wte = nn.Embedding(shape.vocab_size, shape.d_model)
        self.wpe = nn.Embedding(shape.context_length, shape.d_model)
        self.blocks = nn.ModuleList(Block(shape.d_model, shape.n_head) for _ in range(shape.n_layer))
        self.ln_f = nn.LayerNorm(shape.d_model, bias=False)
        self.lm_head = nn.Linear(shape.d_model, shape.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * shape.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))  # (B, T, vocab)

    def flops_per_token(self, shape: Shape) -> int:
        # nanoGPT's estimate_mfu: 6N with N excluding the position table, plus attention.
        num_params = sum(p.numel() for p in self.parameters()) - self.wpe.weight.numel()
        return 6 * num_params + attention_flops_per_token(shape)


def nanogpt_peer(shape: Shape) -> tuple[nn.Module, torch.optim.Optimizer, torch.dtype, int]:
    """(model, optimizer, compute dtype, flops per token) for the nanoGPT-style peer."""
    model = NanoGPT(shape)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    # nanoGPT only asks for fused AdamW on CUDA, so on a CPU it runs the default (foreach) one.
    optimizer = torch.optim.AdamW(groups, lr=3e-4, betas=(0.9, 0.95))
    return model, optimizer, peer_dtype(), model.flops_per_token(shape)


# ---------------------------------------------------------------------------------------------
# peer 1: Hugging Face Llama


class _LlamaLogits(nn.Module):
    """LlamaForCausalLM returning bare logits, so every peer computes the loss the same way."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=idx, use_cache=False).logits


def llama_peer(
    shape: Shape, rope_theta: float, norm_eps: float, tie_embeddings: bool
) -> tuple[nn.Module, torch.optim.Optimizer, torch.dtype, int]:
    """(model, optimizer, compute dtype, flops per token) for HF LlamaForCausalLM."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.d_model,
        intermediate_size=shape.mlp_hidden,
        num_hidden_layers=shape.n_layer,
        num_attention_heads=shape.n_head,
        num_key_value_heads=shape.n_kv_head,
        max_position_embeddings=shape.context_length,
        rms_norm_eps=norm_eps,
        rope_theta=rope_theta,
        tie_word_embeddings=tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    try:
        optimizer = torch.optim.AdamW(groups, lr=3e-4, betas=(0.9, 0.95), fused=True)
    except (RuntimeError, ValueError):  # builds of torch without a fused CPU AdamW
        optimizer = torch.optim.AdamW(groups, lr=3e-4, betas=(0.9, 0.95))
    num_params = sum(p.numel() for p in model.parameters())  # parameters() lists a tied matrix once
    flops = 6 * num_params + attention_flops_per_token(shape)
    return _LlamaLogits(model), optimizer, peer_dtype(), flops


# ---------------------------------------------------------------------------------------------
# the loop both peers share


def train_peer(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    dtype: torch.dtype,
    next_batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    warmup: int,
    log_every: int = 10,
    grad_clip: float = 1.0,
    probe: GemmProbe | None = None,
) -> dict[str, object]:
    """Train for warmup + steps steps; tokens/s and the phase split cover only the last `steps`.

    The forward pass runs under autocast to `dtype` (weights and optimizer state stay float32, as
    in keel); `probe`, if given, is called before each timed step, off the clock.
    """
    model.train()
    timings = dict.fromkeys(("data", "forward_backward", "optimizer", "logging"), 0.0)
    tokens, loss, step_seconds = 0, None, []
    for step in range(warmup + steps):
        if step == warmup:  # the clock starts after warm-up
            timings = dict.fromkeys(timings, 0.0)
            tokens, start = 0, time.perf_counter()
        if probe is not None and step >= warmup:
            probe()
        t0 = time.perf_counter()
        x, y = next_batch(step)  # (B, T) each
        t1 = time.perf_counter()
        with autocast(CPU, dtype):
            logits = model(x)  # (B, T, vocab)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1))
        loss.backward()
        t2 = time.perf_counter()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        if step % log_every == 0:
            loss.item()  # what a progress line costs: one host read of the loss
        t4 = time.perf_counter()
        tokens += x.numel()
        if step >= warmup:
            step_seconds.append(t4 - t0)
        for key, seconds in zip(timings, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            timings[key] += seconds
    seconds = time.perf_counter() - start - (probe.seconds if probe is not None else 0.0)
    return {
        "tokens_per_s": tokens / seconds,
        "tokens_per_step": x.numel(),
        "step_seconds": step_seconds,
        "seconds": seconds,
        "steps": steps,
        "final_loss": loss.item(),
        "timings": timings,
    }
