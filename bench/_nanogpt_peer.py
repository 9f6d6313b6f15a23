"""The peers of bench/quality.py: nanoGPT's recipe trained for a wall-clock budget on a stream of ids.

One trainer, `train_and_evaluate`, takes any stream of ids and its vocabulary size; two streams
are built from keel's own DATA_DIR, so every trainer sees exactly the same train and val files:

- `token_stream`: keel's BPE token shards as they are (`open_data(DATA_DIR).tokens(split)`, each
  document starting with the end-of-text id), with keel's tokenizer's vocabulary: the same tokens
  keel trains and is evaluated on. The headline peer.
- `byte_stream`: the same documents decoded to UTF-8 bytes, with a separator id (256) before each
  document where keel puts its end-of-text token: a byte-level model, as nanoGPT's char recipe.

The model is bench/_peers.py's `NanoGPT` (GPT-2 block: learned positions, LayerNorm, GELU MLP 4x,
tied embeddings) computing in `peer_dtype()`, keel's own dtype rule for this CPU (bf16 autocast
with native bf16, else float32), trained with nanoGPT's recipe for a model of this size
(config/train_shakespeare_char.py: AdamW lr 1e-3 with cosine decay to 1e-4, 100 warm-up steps,
beta2 0.99, weight decay 0.1), without its dropout: the runs here see less than one epoch of bytes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _peers import CPU, NanoGPT, Shape, peer_dtype

from keel.data import eval_batches, open_data
from keel.train.precision import autocast

SEPARATOR = 256  # the id before each document of a byte stream; the other 256 ids are the bytes themselves
BYTE_VOCAB_SIZE = 257


@dataclass
class Stream:
    """One split as the ids a peer trains or is evaluated on."""

    ids: np.ndarray  # (N,) integer ids, each < vocab_size
    vocab_size: int
    num_bytes: int  # UTF-8 bytes of the split's document text, as keel's manifest counts them


@dataclass
class PeerRecipe:
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    beta1: float = 0.9
    beta2: float = 0.99
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 1337


@dataclass
class PeerResult:
    steps: int
    tokens: int  # ids trained on (tokens or bytes)
    seconds: float
    final_loss: float
    val_loss: float  # nats per predicted id over the val windows
    bits_per_byte: float  # per byte of document text, as keel counts bytes
    params: int
    dtype: torch.dtype  # what the forward pass computed in


def token_stream(data_dir: Path, split: str) -> Stream:
    """The split's BPE tokens exactly as keel reads them, with its tokenizer's vocabulary size."""
    data = open_data(data_dir)
    tokens = data.tokens(split)
    assert len(tokens) == data.manifest["splits"][split]["tokens"], "keel's bits per byte counts these tokens"
    return Stream(tokens, data.vocab_size, data.manifest["splits"][split]["bytes"])


def byte_stream(data_dir: Path, split: str) -> Stream:
    """The split as [SEPARATOR] + UTF-8 bytes per document, uint16."""
    data = open_data(data_dir)
    tokens = np.asarray(data.tokens(split))
    starts = np.flatnonzero(tokens == data.eot_id)  # every document begins with the end-of-text id
    assert len(starts) and starts[0] == 0, "keel writes each document as [eot] + ids"
    documents = [tokens[a + 1 : b].tolist() for a, b in zip(starts, [*starts[1:], len(tokens)])]
    texts = data.tokenizer.decode_batch(documents, skip_special_tokens=False)
    pieces, num_bytes = [], 0
    for text in texts:
        raw = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
        pieces += [np.array([SEPARATOR], dtype=np.uint16), raw.astype(np.uint16)]
        num_bytes += len(raw)
    # The decode is exact (byte-level BPE), so the bytes are those keel counted when preparing.
    assert num_bytes == data.manifest["splits"][split]["bytes"], (num_bytes, data.manifest["splits"][split]["bytes"])
    return Stream(np.concatenate(pieces), BYTE_VOCAB_SIZE, num_bytes)


def lr_at(step: int, recipe: PeerRecipe, max_steps: int) -> float:
    """nanoGPT's get_lr: linear warmup, cosine to min_lr at max_steps."""
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / (recipe.warmup_steps + 1)
    progress = min(1.0, (step - recipe.warmup_steps) / max(1, max_steps - recipe.warmup_steps))
    return recipe.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (recipe.lr - recipe.min_lr)


def train_and_evaluate(
    train: Stream,
    val: Stream,
    minutes: float,
    shape: Shape,
    recipe: PeerRecipe = PeerRecipe(),
    log=print,
    dtype: torch.dtype | None = None,
) -> PeerResult:
    """Train on `train` for `minutes` of wall clock (the cosine ends when the budget does), then evaluate on `val`.

    The forward pass computes in `dtype`, by default `peer_dtype()` (keel's rule for this CPU).
    """
    assert shape.vocab_size == train.vocab_size == val.vocab_size, (shape.vocab_size, train.vocab_size)
    T, B = shape.context_length, shape.batch_size
    dtype = dtype or peer_dtype()
    torch.manual_seed(recipe.seed)
    model = NanoGPT(shape)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    # nanoGPT asks for fused AdamW only on CUDA, so on a CPU it runs the default (foreach) one.
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr,
        betas=(recipe.beta1, recipe.beta2),
    )
    budget = 60 * minutes
    # The schedule's length is re-estimated from the measured step time (first 2 steps excluded)
    # until warm-up ends, so the cosine reaches its floor when the budget runs out.
    max_steps, step, loss = recipe.warmup_steps + 1, 0, torch.tensor(float("nan"))
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < budget and step < max_steps:
        if step == 2:
            clock_step, clock_time = step, elapsed
        if 2 < step <= recipe.warmup_steps:
            seconds_per_step = (elapsed - clock_time) / (step - clock_step)
            max_steps = max(recipe.warmup_steps + 1, step + int((budget - elapsed) / seconds_per_step))
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, recipe, max_steps)
        # nanoGPT's get_batch: windows at random offsets, with replacement.
        offsets = torch.randint(len(train.ids) - T - 1, (B,)).tolist()
        window = torch.from_numpy(np.stack([train.ids[i : i + T + 1] for i in offsets]).astype(np.int64))  # (B, T+1)
        x, y = window[:, :-1], window[:, 1:]
        with autocast(CPU, dtype):
            logits = model(x)  # (B, T, vocab)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if step % 100 == 0:
            log(f"  peer step {step}/{max_steps}  loss {loss.item():.3f}  {time.perf_counter() - start:.0f} s")
    seconds = time.perf_counter() - start
    val_loss, bits_per_byte = evaluate(model, val, T, B, dtype)
    return PeerResult(
        step,
        step * B * T,
        seconds,
        loss.item(),
        val_loss,
        bits_per_byte,
        sum(p.numel() for p in model.parameters()),
        dtype,
    )


def evaluate(model: NanoGPT, val: Stream, T: int, B: int, dtype: torch.dtype) -> tuple[float, float]:
    """(nats per predicted id, bits per byte) over the whole val split, counted as keel.inference.evaluate_run does.

    The same windowing: every whole window of T+1 ids at stride T from the start of the split
    (keel.data.eval_batches), the last batch possibly short, so the unscored tail is under T ids;
    the mean over those targets, divided by ln 2 and by the split's bytes per id. On the token
    stream these are the very windows and targets keel scores (same T and B, read from keel's
    config), so the two figures differ only by the model. What is not identical: keel's loss goes
    through its own token_loss (the same cross entropy, summed in another order); and on the byte
    stream the windows are of bytes, so each scores a different stretch of text than keel's.
    """
    num_windows = (len(val.ids) - 1) // T
    num_batches = max(1, -(-num_windows // B))
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in eval_batches(val.ids, T, B, num_batches, split_name="peer val"):
            with autocast(CPU, dtype):
                logits = model(x)  # (B, T, vocab)
            total += F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1), reduction="sum").item()
            count += y.numel()
    assert count == num_windows * T
    val_loss = total / count
    return val_loss, val_loss / math.log(2) / (val.num_bytes / len(val.ids))
