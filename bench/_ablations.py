"""Recipe changes tried against keel's default in bench/quality.py (`--ablate NAME`), issue #18.

Each is a patch applied to keel's model or loss in the bench's own process, so a change can be
measured without becoming a config flag first; what wins moves into keel itself (ReLU² did:
model.mlp=relu2), what loses stays here with its figures in docs/benchmarks.md. The ideas are
modded-nanogpt's (zero-init projections, logit soft-capping) and PaLM's (z-loss).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn


def zero_init() -> None:
    """The two projections that write into the residual stream (o_proj, down_proj) start at zero."""
    from keel.models.gpt import GPT

    original = GPT.init_weights

    def init_weights(self) -> None:
        original(self)
        for block in self.blocks:
            nn.init.zeros_(block.attn.o_proj.weight)
            nn.init.zeros_(block.mlp.down_proj.weight)

    GPT.init_weights = init_weights


def _patch_head(
    transform: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]],
    extra: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> None:
    """Replace the chunked head's forward: logits -> transform(logits) = (z, dz/dlogits or None), plus
    an optional extra loss term of log Z: extra(log_norm) = (summed term, d term / d log_norm per row)."""
    from keel.tasks import lm

    def forward(ctx, hidden, weight, targets, with_grad):
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        h, w = hidden.to(dtype), weight.to(dtype)
        ctx.weight_dtype = weight.dtype
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        square_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if with_grad else None
        grad_weight = None
        rows = lm.loss_chunk_rows(*weight.shape)
        columns = torch.arange(weight.shape[0], device=hidden.device)
        for start in range(0, h.shape[0], rows):
            x, t = h[start : start + rows], targets[start : start + rows]
            logits, dlogits = transform((x @ w.t()).float())
            square_sum = square_sum + torch.linalg.vector_norm(logits, dim=-1).square().sum()
            log_norm = torch.logsumexp(logits, dim=-1, keepdim=True)
            counted = t != lm.IGNORE_INDEX
            t = torch.where(counted, t, 0)[:, None]
            loss_sum = loss_sum - torch.where(counted, (logits.gather(1, t) - log_norm).squeeze(1), 0.0).sum()
            scale = 1.0
            if extra is not None and with_grad:  # a training term: evaluation reports plain cross-entropy
                term, dterm = extra(log_norm)
                loss_sum = loss_sum + torch.where(counted, term.squeeze(1), 0.0).sum()
                scale = 1.0 + dterm  # d(-log p + term)/dlogits = softmax (1 + dterm) - one_hot
            if with_grad:
                probs = (logits - log_norm).exp()
                grad = torch.where(columns == t, probs * scale - 1, probs * scale)
                if dlogits is not None:
                    grad = grad * dlogits
                grad = grad.to(dtype)
                keep = counted[:, None].to(dtype)
                grad_hidden[start : start + rows] = (grad @ w) * keep
                chunk_grad = (grad.t() @ (x * keep)).float()
                grad_weight = chunk_grad if grad_weight is None else grad_weight + chunk_grad
        if with_grad:
            ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.mark_non_differentiable(square_sum)
        return loss_sum, square_sum

    lm._LinearCrossEntropy.forward = staticmethod(forward)


SOFTCAP = 15.0  # modded-nanogpt's final value (it began at 30)


def softcap() -> None:
    """Logits soft-capped at ±15: 15 tanh(logits / 15), in training and evaluation alike."""

    def transform(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        capped = SOFTCAP * torch.tanh(logits / SOFTCAP)
        return capped, 1 - (capped / SOFTCAP).square()

    _patch_head(transform)


Z_LOSS = 1e-4  # PaLM's coefficient


def zloss() -> None:
    """PaLM's z-loss: 1e-4 (log Z)² per token added to the training loss (evaluation stays plain
    cross-entropy, so the val figures compare with the other rows)."""
    _patch_head(lambda logits: (logits, None), lambda log_norm: (Z_LOSS * log_norm.square(), 2 * Z_LOSS * log_norm))


# Sequence-length warmup: (first batch index at which it applies, context), the same tokens per batch.
SEQ_STAGES = ((0, 64), (400, 128), (800, 256))


def seq_warmup() -> None:
    """Short contexts first, a curriculum: each batch of B windows of 256 tokens is cut into 4B windows
    of 64 for the first 400 batches, then 2B of 128 until batch 800, then trained whole. Every step sees
    the same tokens as before; the model first learns from local context, at a lower cost per token
    (the attention scores shrink with the window). torch.compile gets one static graph per length."""
    import torch._dynamo

    from keel.tasks.base import Batch
    from keel.tasks.pretrain import PretrainTask

    torch._dynamo.config.automatic_dynamic_shapes = False
    original = PretrainTask.batch

    def batch(self, index: int) -> Batch:
        full = original(self, index)
        context = next(length for start, length in reversed(SEQ_STAGES) if index >= start)
        tensors = {k: t.reshape(-1, context) for k, t in full.tensors.items()}
        return Batch(tensors, units=full.units, tokens=full.tokens)

    PretrainTask.batch = batch


# Batch-size warmup: (first batch index at which it applies, windows kept of train.batch_size).
BATCH_STAGES = ((0, 2), (200, 4), (400, 8))


def batch_warmup() -> None:
    """Small batches first: of each batch of B windows only the first 2 are trained for the first 200
    batches, then 4 until batch 400, then all 8 (the default B). Early updates need less averaging
    (the gradient noise is small next to the signal while the loss falls fast), so more of them per
    token; the windows left out are not seen in that pass over the corpus. One compiled graph per size."""
    import torch._dynamo

    from keel.tasks.base import Batch
    from keel.tasks.pretrain import PretrainTask

    torch._dynamo.config.automatic_dynamic_shapes = False
    original = PretrainTask.batch

    def batch(self, index: int) -> Batch:
        full = original(self, index)
        rows = next(kept for start, kept in reversed(BATCH_STAGES) if index >= start)
        B = next(iter(full.tensors.values())).shape[0]
        if rows >= B:
            return full
        tensors = {k: t[:rows] for k, t in full.tensors.items()}
        return Batch(tensors, units=full.units * rows // B, tokens=full.tokens * rows // B)

    PretrainTask.batch = batch


def _patch_trunk(extra_parameters: Callable[[nn.Module], None], trunk: Callable) -> None:
    """Give GPT more parameters (extra_parameters(model), before init_weights runs) and a new block loop:
    trunk(model, x, cos, sin) -> the last block's output, for whole rows (training and evaluation)."""
    from keel.models.gpt import GPT

    original_init, original_weights = GPT.__init__, GPT.init_weights

    def __init__(self, config) -> None:
        original_init(self, config)
        extra_parameters(self)
        self.init_weights()

    def init_weights(self) -> None:
        original_weights(self)
        if hasattr(self, "skip_weights"):
            nn.init.ones_(self.skip_weights)

    def hidden_states(self, idx, positions=None, segments=None, kv_caches=None):
        assert positions is None and segments is None and not kv_caches, "whole rows only"
        T = idx.shape[1]
        return trunk(self, idx, self.embed(idx), self.rope_cos[:T], self.rope_sin[:T])

    GPT.__init__, GPT.init_weights, GPT.hidden_states = __init__, init_weights, hidden_states


def unet_skips() -> None:
    """modded-nanogpt's U-net: the outputs of the first half of the blocks, last in first out, are added
    (times a learned scalar, 1 at the start) to the inputs of the second half's blocks."""

    def add(model) -> None:
        model.skip_weights = nn.Parameter(torch.ones(len(model.blocks) // 2))

    def trunk(model, idx, x, cos, sin):
        n, half, skips = len(model.blocks), len(model.blocks) // 2, []
        for i, block in enumerate(model.blocks):
            if i >= n - half:
                x = x + model.skip_weights[i - (n - half)] * skips.pop()
            x = block(x, cos, sin)
            if i < half:
                skips.append(x)
        return x

    _patch_trunk(add, trunk)


def value_embeds() -> None:
    """modded-nanogpt's value embeddings: a second token embedding, one vector of the k/v width per
    token, added to the values of the first and the last block's attention."""
    import torch.nn.functional as F

    from keel.models.gpt import apply_rotary, matmul_attention

    def add(model) -> None:
        attn = model.blocks[0].attn
        model.value_embed = nn.Embedding(model.config.vocab_size, attn.n_kv_head * attn.head_dim)

    def attend(attn, x, cos, sin, ve):  # keel's Attention.forward for whole causal rows, with v + ve
        B, T, C = x.shape
        q = attn.q_proj(x).view(B, T, attn.n_head, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(B, T, attn.n_kv_head, attn.head_dim).transpose(1, 2)
        v = attn.v_proj(x)
        v = (v + ve.to(v.dtype)).view(B, T, attn.n_kv_head, attn.head_dim).transpose(1, 2)
        q, k = attn.q_norm(q.float()), attn.k_norm(k.float())
        q, k = apply_rotary(q, cos, sin).to(v.dtype), apply_rotary(k, cos, sin).to(v.dtype)
        if attn._use_matmul(x.device, T):
            if attn.n_kv_head != attn.n_head:
                k, v = (t.repeat_interleave(attn.n_head // attn.n_kv_head, dim=1) for t in (k, v))
            y = matmul_attention(q, k, v, True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=attn.n_kv_head != attn.n_head)
        return attn.o_proj(y.transpose(1, 2).reshape(B, T, C))

    def trunk(model, idx, x, cos, sin):
        ve, last = model.value_embed(idx), len(model.blocks) - 1
        for i, block in enumerate(model.blocks):
            if i in (0, last):
                x = x + attend(block.attn, block.attn_norm(x), cos, sin, ve)
                x = x + block.mlp(block.mlp_norm(x))
            else:
                x = block(x, cos, sin)
        return x

    _patch_trunk(add, trunk)


ABLATIONS = {f.__name__: f for f in (zero_init, softcap, zloss, seq_warmup, batch_warmup, unet_skips, value_embeds)}
