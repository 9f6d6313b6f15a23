"""Language-model maths shared by every LM task: the chunked output head and what it computes.

Pretraining, SFT, DPO and distillation all end in the same place: the last hidden states
times the (V, C) output matrix. That product is the largest tensor of a step, (B·T, V), so it is
never held whole: the functions here take it a chunk of rows at a time.

- `linear_cross_entropy`: summed cross-entropy (pretraining, SFT). The gradient is taken in the
  forward pass chunk by chunk, so backward only scales it: no second pass over the logits.
- `linear_log_probs`: log p(target) per position (DPO's sequence log-probs, evaluation). The
  gradient of an arbitrary function of those is recomputed chunk by chunk in backward.
- `lm_loss`: the model's trunk + norm + chunked head, with the supervisor's statistics.

Distillation's head (the teacher's top k, the student's divergence from them) lives in
`keel.tasks.distill`, chunked by `loss_chunk_rows` the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

from keel.config import RunConfig
from keel.errors import UserError
from keel.models.gpt import GPT
from keel.tasks.base import ACT_NORM, LOGIT_NORM, LossOutput, Task, mean_square
from keel.train.precision import autocast

IGNORE_INDEX = -100  # target value of positions that carry no loss (prompt tokens in SFT, padding)

# Logits the loss computes at a time: 4M (16 MB in float32) bound its memory, while the (N, V)
# logits never exist whole.
LOSS_CHUNK_LOGITS = 1 << 22


def loss_chunk_rows(vocab_size: int, d_model: int) -> int:
    """Rows of logits per chunk: about LOSS_CHUNK_LOGITS values, and at least 2 * d_model rows so that
    adding each chunk's (V, C) weight gradient costs less than the chunk's logits do."""
    return max(LOSS_CHUNK_LOGITS // vocab_size, 2 * d_model, 1)


class HeadLoss(NamedTuple):
    loss: torch.Tensor  # mean cross-entropy in float32 over the counted positions
    logit_mean_square: torch.Tensor  # over every position and vocabulary entry (the supervisor's logit statistic)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> HeadLoss:
    """Cross-entropy of the logits hidden @ weight.T against targets, without materialising the logits.

    hidden (..., C), weight (V, C), targets (...) aligned already: targets[t] is the token that
    follows input t; positions whose target is IGNORE_INDEX count for nothing, and a batch without
    a counted position gives 0 rather than nan (a fully masked SFT batch is not a divergence). The
    logits are taken in the autocast dtype when autocast is on and reduced in float32.
    """
    hidden, targets = hidden.flatten(0, -2), targets.flatten()
    with_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    loss_sum, square_sum = _LinearCrossEntropy.apply(hidden, weight, targets, with_grad)
    counted = (targets != IGNORE_INDEX).sum()
    return HeadLoss(loss_sum / counted.clamp(min=1), square_sum / (hidden.shape[0] * weight.shape[0]))


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy and summed squared logits, a chunk of rows at a time.

    The gradients are taken in the forward pass, chunk by chunk, straight after the chunk's logits:
    neither the logits, their float32 copy nor their gradient is ever held whole (for a
    (8 x 1024) x 32k batch that is 3 GB less), and backward only scales the two saved gradients.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, with_grad):
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        h, w = hidden.to(dtype), weight.to(dtype)
        ctx.weight_dtype = weight.dtype
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        square_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if with_grad else None
        grad_weight = None  # float32 (V, C), summed over the chunks
        rows = loss_chunk_rows(*weight.shape)
        columns = torch.arange(weight.shape[0], device=hidden.device)  # (V,)
        for start in range(0, h.shape[0], rows):
            x, t = h[start : start + rows], targets[start : start + rows]
            logits = (x @ w.t()).float()  # (rows, V)
            # Per-row reductions first: compiled, the squares, the row max and the sum of exponentials
            # share the passes over the logits (a whole-chunk sum would be a pass of its own).
            square_sum = square_sum + torch.linalg.vector_norm(logits, dim=-1).square().sum()
            log_norm = torch.logsumexp(logits, dim=-1, keepdim=True)  # (rows, 1)
            counted = t != IGNORE_INDEX
            t = torch.where(counted, t, 0)[:, None]
            loss_sum = loss_sum - torch.where(counted, (logits.gather(1, t) - log_norm).squeeze(1), 0.0).sum()
            if with_grad:
                # d loss_sum / d logits = softmax - one_hot(target), written once in the autocast dtype;
                # ignored rows are zeroed on the narrow side
                probs = logits.sub_(log_norm).exp_()  # in place: the logits are not needed any more
                grad = torch.where(columns == t, probs - 1, probs).to(dtype)
                keep = counted[:, None].to(dtype)
                grad_hidden[start : start + rows] = (grad @ w) * keep
                chunk_grad = (grad.t() @ (x * keep)).float()
                grad_weight = chunk_grad if grad_weight is None else grad_weight + chunk_grad
        if with_grad:
            ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.mark_non_differentiable(square_sum)
        return loss_sum, square_sum

    @staticmethod
    def backward(ctx, grad_loss, grad_square):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss.to(grad_hidden.dtype), (grad_weight * grad_loss).to(ctx.weight_dtype), None, None


def linear_log_probs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(hidden @ weight.T)[target] per position, float32, 0 where the target is IGNORE_INDEX.

    hidden (..., C), weight (V, C), targets (...) -> (...). Neither the logits nor their gradient
    is ever held whole: backward recomputes each chunk's logits (one more matmul per chunk) to turn
    the incoming per-position gradient into the gradients of hidden and weight.
    """
    shape = targets.shape
    log_probs = _LinearLogProbs.apply(hidden.flatten(0, -2), weight, targets.flatten())
    return log_probs.view(shape)


class _LinearLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets):
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        h, w = hidden.to(dtype), weight.to(dtype)
        rows = loss_chunk_rows(*weight.shape)
        counted = targets != IGNORE_INDEX
        safe_targets = torch.where(counted, targets, 0)[:, None]  # (N, 1)
        out = torch.empty(h.shape[0], dtype=torch.float32, device=hidden.device)
        log_norms = torch.empty(h.shape[0], 1, dtype=torch.float32, device=hidden.device)
        for start in range(0, h.shape[0], rows):
            logits = (h[start : start + rows] @ w.t()).float()  # (rows, V)
            log_norms[start : start + rows] = torch.logsumexp(logits, dim=-1, keepdim=True)
            picked = logits.gather(1, safe_targets[start : start + rows]) - log_norms[start : start + rows]
            out[start : start + rows] = picked.squeeze(1)
        out = torch.where(counted, out, 0.0)
        ctx.save_for_backward(h, w, safe_targets, counted, log_norms)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        h, w, safe_targets, counted, log_norms = ctx.saved_tensors
        rows = loss_chunk_rows(*w.shape)
        grad_scale = torch.where(counted, grad_out, 0.0)[:, None]  # (N, 1)
        grad_hidden = torch.empty_like(h)
        grad_weight = None
        columns = torch.arange(w.shape[0], device=h.device)  # (V,)
        for start in range(0, h.shape[0], rows):
            x = h[start : start + rows]
            probs = ((x @ w.t()).float() - log_norms[start : start + rows]).exp_()  # (rows, V)
            # d log p(t) / d logits = one_hot(t) - softmax, times the incoming gradient of each row
            t = safe_targets[start : start + rows]
            grad = (torch.where(columns == t, 1 - probs, -probs) * grad_scale[start : start + rows]).to(h.dtype)
            grad_hidden[start : start + rows] = grad @ w
            chunk = (grad.t() @ x).float()
            grad_weight = chunk if grad_weight is None else grad_weight + chunk
        hidden_dtype, weight_dtype = ctx.dtypes
        return grad_hidden.to(hidden_dtype), grad_weight.to(weight_dtype), None


class LMOutput(NamedTuple):
    hidden: torch.Tensor  # (B, T, C) normed last hidden states, the head's input
    act_mean_square: torch.Tensor  # of the last block's output, detached (the supervisor's activation statistic)


def lm_hidden(
    model, idx: torch.Tensor, positions: torch.Tensor | None = None, segments: torch.Tensor | None = None
) -> LMOutput:
    """The trunk and final norm of a GPT, with the activation statistic every LM task reports."""
    hidden = model.hidden_states(idx, positions, segments)  # (B, T, C)
    return LMOutput(model.norm_f(hidden), mean_square(hidden.detach()))


def token_loss(model, tensors: dict[str, torch.Tensor]) -> LossOutput:
    """Mean next-token cross-entropy over the counted targets of a batch of `inputs`, `targets`
    (B, T) and, for packed rows, `positions` and `segments` (B, T)."""
    out = lm_hidden(model, tensors["inputs"], tensors.get("positions"), tensors.get("segments"))
    head = linear_cross_entropy(out.hidden, model.lm_head.weight, tensors["targets"])
    return LossOutput(head.loss, {ACT_NORM: out.act_mean_square, LOGIT_NORM: head.logit_mean_square.detach()})


def mean_token_loss(model, batches, device: torch.device, dtype: torch.dtype) -> float:
    """Mean loss per counted target over evaluation batches (dicts of CPU tensors), in eval mode."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for tensors in batches:
            with autocast(device, dtype):
                loss = token_loss(model, {k: t.to(device) for k, t in tensors.items()}).loss
            counted = int((tensors["targets"] != IGNORE_INDEX).sum())
            total += loss.item() * counted
            count += counted
    model.train()
    return total / max(count, 1)


def sequence_log_probs(model, idx: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, LMOutput]:
    """Summed log p of the counted targets of each row: idx, targets (B, T) -> (B,) float32."""
    out = lm_hidden(model, idx)
    return linear_log_probs(out.hidden, model.lm_head.weight, targets).sum(-1), out


class LMTask(Task):
    """What the language-model tasks share: a GPT built from the run's config, started from random
    weights or from the init.from run's best checkpoint (its vocabulary extended when the data's
    tokenizer added tokens, such as the chat markers)."""

    def __init__(self, config: RunConfig, device: torch.device, dtype: torch.dtype):
        self.config, self.device, self.dtype = config, device, dtype

    def build_model(self) -> GPT:
        torch.manual_seed(self.config.train.seed)
        model = GPT(self.config.model).to(self.device)
        if self.config.init.from_:
            load_init_weights(model, Path(self.config.init.from_))
        return model

    def init_weights(self, model: GPT) -> None:
        torch.manual_seed(self.config.train.seed)
        model.init_weights()
        if self.config.init.from_:
            load_init_weights(model, Path(self.config.init.from_))


def load_init_weights(model: GPT, init_run: Path) -> None:
    """Load the best checkpoint of `init_run` into `model`; rows of tokens the run's vocabulary lacks
    (added at its end by `keel prepare --tokenizer`) start at the mean of the existing embeddings."""
    from keel.train import checkpoint as ckpt

    path = ckpt.find_best(init_run)
    state = ckpt.read_weights(path, next(model.parameters()).device)
    if model.config.tie_embeddings:  # stored once under either name
        state.setdefault("embed.weight", state.get("lm_head.weight"))
        state.setdefault("lm_head.weight", state["embed.weight"])
    for name in ("embed.weight", "lm_head.weight"):
        weight, wanted = state[name], model.state_dict()[name].shape[0]
        if weight.shape[0] < wanted:
            extra = weight.mean(dim=0, keepdim=True).expand(wanted - weight.shape[0], -1)
            state[name] = torch.cat((weight, extra))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        detail = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
        raise UserError(
            f"the weights of init.from={init_run} do not fit this run's model ({detail[:200]}); "
            "leave the model.* settings to the init run."
        ) from None
