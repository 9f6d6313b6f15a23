"""Knowledge distillation: a student learns the next-token distributions of a teacher run.

With z the student's logits, targets the data's next tokens, T the temperature and r the ratio,

    loss = (1 − r)·CE(softmax(z), targets) + r·T²·D(teacher_T, student_T)

averaged over the counted positions, where teacher_T and student_T are the two models' next-token
distributions at temperature T seen through the teacher's top k: k buckets, one per token of the
teacher's top k, and one "other" bucket holding the remaining mass (1 − the top k's probability),
so both stay normalised. The student's other-bucket mass is the logsumexp of its logits outside
the teacher's top k. With k = V there is no other bucket and D is the exact divergence. T² keeps
the gradient's scale independent of T (Hinton et al.). `distill.loss` picks D:

    forward (default, as torchtune):  KL(teacher ‖ student) = Σ q·(log q − log p)
    reverse:                          KL(student ‖ teacher) = Σ p·(log p − log q)
    jsd (TRL's GKD, with β):          β·KL(teacher ‖ m) + (1 − β)·KL(student ‖ m),  m = β·q + (1 − β)·p

Nothing holds either model's full logits (B·T × V): the teacher's top k are taken a chunk of rows at
a time when its cache is built, and the student's loss and its gradient are computed chunk by chunk
in the forward pass (as `lm.linear_cross_entropy` does), so backward only scales them.

The teacher runs once. Its top-k indices and log-probs (and the other bucket's) per position are
cached on disk, keyed by (teacher checkpoint weights hash, data hash, k, T, context length, dtype):
see `TeacherCache`. The student trains on the cached windows: window w is tokens
[w·T_ctx, w·T_ctx + T_ctx] of the train split (stride T_ctx from offset 0, a fixed grid so each cached
position has exactly the context the student sees), and the cache holds the windows in a fixed
order (`cache_order`, independent of the run's seed) so that a cache built for N windows serves any
student that needs N or fewer, and a student that needs more extends it. The student's pool is the
first `distill.max_windows` windows of that order (default: the whole split, or one epoch of the run,
train.max_steps × batch_size × grad_accum windows, if that is fewer); epoch e visits the pool in an
order seeded by (seed, e), so batch i stays a pure function of (data, seed, i).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from keel.config import RunConfig
from keel.data import open_data
from keel.data.shards import sha256_file
from keel.errors import UserError
from keel.models.gpt import GPT
from keel.tasks.base import ACT_NORM, LOGIT_NORM, Batch, LossOutput
from keel.tasks.lm import IGNORE_INDEX, LMTask, lm_hidden, loss_chunk_rows, mean_token_loss
from keel.train.precision import autocast

CACHE_DIR = "cache"
CACHE_FORMAT = "keel-distill-cache"
CACHE_VERSION = 1
MANIFEST = "manifest.json"
CHUNK_BYTES = 1 << 24  # each chunk file holds about this much: a SIGKILL loses at most one chunk's work
CACHE_ORDER_SEED = 0x6B65656C  # fixed, not the run's seed: every student of a teacher shares the cache
LOG_PROB_FLOOR = -1e4  # stored log-probs are clamped here (float16 holds it; exp of it is 0)


class DistillLoss(NamedTuple):
    kind: str  # forward | reverse | jsd
    temperature: float
    ratio: float  # r: the share of the loss that is the divergence
    beta: float  # the jsd's mixture weight of the teacher


# -- the maths --------------------------------------------------------------------------------------


def bucket_divergence(student: torch.Tensor, teacher: torch.Tensor, kind: str, beta: float = 0.5) -> torch.Tensor:
    """D(teacher, student) per row from the two distributions over the same buckets as log-probs (..., K) -> (...).

    Both must be normalised over the last dimension; see the module docstring for the three kinds.
    """
    if kind == "forward":
        return (teacher.exp() * (teacher - student)).sum(-1)
    if kind == "reverse":
        return (student.exp() * (student - teacher)).sum(-1)
    if kind == "jsd":
        mixture = torch.logaddexp(teacher + math.log(beta), student + math.log1p(-beta))
        to_teacher = (teacher.exp() * (teacher - mixture)).sum(-1)
        to_student = (student.exp() * (student - mixture)).sum(-1)
        return beta * to_teacher + (1 - beta) * to_student
    raise AssertionError(f"config validation lets no other distill.loss through: {kind}")


def bucket_log_probs(
    scaled: torch.Tensor, log_norm: torch.Tensor, indices: torch.Tensor, tail: bool, in_place: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of softmax(scaled) in the buckets of `indices`, and the logits of the other bucket.

    scaled (N, V) logits already divided by T, log_norm (N, 1) their logsumexp, indices (N, k) -> buckets
    (N, k [+ 1]) and rest (N, V): the scaled logits with the top k set to -inf (written into `scaled`
    when in_place), or None without a tail. The other bucket's log-mass is the logsumexp of rest, not
    log(1 − Σp), which cancels badly when the top k hold nearly everything.
    """
    top = scaled.gather(1, indices) - log_norm  # (N, k)
    if not tail:
        return top, None
    rest = scaled.scatter_(1, indices, -math.inf) if in_place else scaled.scatter(1, indices, -math.inf)  # (N, V)
    return torch.cat((top, torch.logsumexp(rest, dim=-1, keepdim=True) - log_norm), dim=1), rest


class DistillHeadLoss(NamedTuple):
    loss: torch.Tensor  # (1 − r)·ce + r·T²·kd, the mean over the counted positions
    ce: torch.Tensor  # mean cross-entropy against the data, detached
    kd: torch.Tensor  # mean divergence D at temperature T (without T²), detached
    logit_mean_square: torch.Tensor  # over every position and vocabulary entry (the supervisor's statistic)


def linear_distill_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    teacher_indices: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    settings: DistillLoss,
) -> DistillHeadLoss:
    """The distillation loss of the logits hidden @ weight.T, without materialising them.

    hidden (..., C), weight (V, C), targets (...) as for `lm.linear_cross_entropy`; teacher_indices
    (..., k) int64 and teacher_log_probs (..., k + 1) (the last column the other bucket) or (..., k)
    when k = V. The teacher's values are renormalised over the buckets (they are stored in float16).
    """
    k = teacher_indices.shape[-1]
    hidden, targets = hidden.flatten(0, -2), targets.flatten()
    indices, teacher = teacher_indices.reshape(-1, k), teacher_log_probs.reshape(targets.shape[0], -1)
    assert teacher.shape[1] in (k, k + 1) and (teacher.shape[1] == k + 1) == (k < weight.shape[0]), teacher.shape
    with_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    loss_sum, ce_sum, kd_sum, square_sum = _LinearDistill.apply(
        hidden, weight, targets, indices, teacher, settings, with_grad
    )
    counted = (targets != IGNORE_INDEX).sum().clamp(min=1)
    return DistillHeadLoss(
        loss_sum / counted, ce_sum / counted, kd_sum / counted, square_sum / (hidden.shape[0] * weight.shape[0])
    )


class _LinearDistill(torch.autograd.Function):
    """Summed loss, cross-entropy, divergence and squared logits, a chunk of rows at a time.

    As in `lm._LinearCrossEntropy`, the gradient is taken in the forward pass straight after each
    chunk's logits. The divergence's gradient with respect to the student's bucket log-probs a
    (N, K) is taken by autograd on those small tensors, g = dD/da, then carried to the logits in
    closed form: with π = softmax(z / T) and G = Σ_b g_b,

        dD/dz_v = (1/T)·(g_v − π_v·G)            v in the top k (a bucket of its own, π_v = p_b)
        dD/dz_v = (1/T)·(g_tail·ρ_v − π_v·G)     v in the other bucket, ρ = softmax of the logits there

    so one code path serves all three divergences.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, indices, teacher, settings, with_grad):
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        h, w = hidden.to(dtype), weight.to(dtype)
        ctx.weight_dtype = weight.dtype
        T, r = settings.temperature, settings.ratio
        tail = teacher.shape[1] == indices.shape[1] + 1
        k = indices.shape[1]
        zero = torch.zeros((), dtype=torch.float32, device=hidden.device)
        ce_sum, kd_sum, square_sum = zero, zero, zero
        grad_hidden = torch.empty_like(hidden) if with_grad else None
        grad_weight = None  # float32 (V, C), summed over the chunks
        rows = loss_chunk_rows(*weight.shape)
        # Every pass over a (rows, V) tensor costs as much as a small student's matmuls: the passes are
        # counted, done in place where a tensor is not needed again, and shared when T = 1.
        for start in range(0, h.shape[0], rows):
            end = start + rows
            x, t, idx = h[start:end], targets[start:end], indices[start:end]
            logits = (x @ w.t()).float()  # (rows, V)
            square_sum = square_sum + torch.linalg.vector_norm(logits, dim=-1).square().sum()
            counted = t != IGNORE_INDEX
            safe_t = torch.where(counted, t, 0)[:, None]  # (rows, 1)
            log_norm = torch.logsumexp(logits, dim=-1, keepdim=True)  # (rows, 1)
            ce = (log_norm - logits.gather(1, safe_t)).squeeze(1)  # (rows,)
            scaled, log_norm_t = (logits, log_norm) if T == 1 else (logits / T, None)
            if log_norm_t is None:
                log_norm_t = torch.logsumexp(scaled, dim=-1, keepdim=True)
            student, rest = bucket_log_probs(scaled, log_norm_t, idx, tail)  # (rows, K), (rows, V) or None
            with torch.enable_grad():
                a = student.detach().requires_grad_()
                kd = bucket_divergence(
                    a, torch.log_softmax(teacher[start:end].float(), -1), settings.kind, settings.beta
                )
                (g,) = torch.autograd.grad(kd.sum(), a) if with_grad else (None,)
            kd = kd.detach()
            ce_sum = ce_sum + torch.where(counted, ce, 0.0).sum()
            kd_sum = kd_sum + torch.where(counted, kd, 0.0).sum()
            if not with_grad:
                continue
            # d loss / d z = (1 − r)·(softmax(z) − one_hot) + r·T·(g_top at the top k + g_tail·ρ − G·π), with
            # π = softmax(z / T) and ρ the softmax of the other bucket's logits; every coefficient is per row
            # and zero on ignored rows.
            keep = counted[:, None].float()  # (rows, 1)
            kd_scale = (r * T) * keep
            pi = scaled.sub_(log_norm_t).exp_() if T != 1 else None  # (rows, V), in place: scaled is done
            probs = logits.sub_(log_norm).exp_()  # softmax(z), in place: the logits are done
            if pi is None:  # T = 1: π is softmax(z)
                grad = probs.mul_((1 - r) * keep - kd_scale * g.sum(1, keepdim=True))
            else:
                grad = probs.mul_((1 - r) * keep).sub_(pi.mul_(kd_scale * g.sum(1, keepdim=True)))
            if tail:
                rho = rest.sub_(torch.logsumexp(rest, dim=-1, keepdim=True)).exp_()  # 0 at the top k
                grad.addcmul_(rho, kd_scale * g[:, k:])
            grad.scatter_add_(1, idx, kd_scale * g[:, :k])
            grad.scatter_add_(1, safe_t, -(1 - r) * keep)
            grad = grad.to(dtype)
            grad_hidden[start:end] = grad @ w
            chunk_grad = (grad.t() @ x).float()
            grad_weight = chunk_grad if grad_weight is None else grad_weight + chunk_grad
        loss_sum = (1 - r) * ce_sum + r * T * T * kd_sum
        if with_grad:
            ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.mark_non_differentiable(ce_sum, kd_sum, square_sum)
        return loss_sum, ce_sum, kd_sum, square_sum

    @staticmethod
    def backward(ctx, grad_loss, grad_ce, grad_kd, grad_square):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (
            grad_hidden * grad_loss.to(grad_hidden.dtype),
            (grad_weight * grad_loss).to(ctx.weight_dtype),
            None,
            None,
            None,
            None,
            None,
        )


def linear_top_k(
    hidden: torch.Tensor, weight: torch.Tensor, k: int, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The top k of softmax(hidden @ weight.T / T) per row, a chunk of rows at a time (no gradient).

    hidden (N, C), weight (V, C) -> indices (N, k) int64 and log-probs (N, k + 1) float32, the last
    column the log of the mass outside the top k; (N, k) log-probs when k = V.
    """
    num_rows, vocab_size = hidden.shape[0], weight.shape[0]
    tail = k < vocab_size
    indices = torch.empty(num_rows, k, dtype=torch.int64, device=hidden.device)
    log_probs = torch.empty(num_rows, k + tail, dtype=torch.float32, device=hidden.device)
    rows = loss_chunk_rows(*weight.shape)
    with torch.no_grad():
        for start in range(0, num_rows, rows):
            scaled = (hidden[start : start + rows] @ weight.t()).float()  # (rows, V)
            if temperature != 1:
                scaled.div_(temperature)
            top = torch.topk(scaled, k, dim=-1, sorted=True).indices  # (rows, k)
            indices[start : start + rows] = top
            log_norm = torch.logsumexp(scaled, dim=-1, keepdim=True)
            log_probs[start : start + rows] = bucket_log_probs(scaled, log_norm, top, tail, in_place=True)[0]
    return indices, log_probs


# -- the teacher's cache ----------------------------------------------------------------------------


def cache_order(num_windows: int) -> np.ndarray:
    """Cache entry i holds window cache_order(W)[i]: a fixed shuffle, so any prefix is a fair sample of the split."""
    return np.random.default_rng(CACHE_ORDER_SEED).permutation(num_windows)


def record_dtype(context_length: int, k: int, vocab_size: int) -> np.dtype:
    """One cached window: the teacher's top-k indices and the buckets' log-probs (float16) at every position."""
    index_dtype = np.uint16 if vocab_size <= 1 << 16 else np.int32
    return np.dtype(
        [
            ("indices", index_dtype, (context_length, k)),
            ("log_probs", np.float16, (context_length, k + (k < vocab_size))),
        ]
    )


class Teacher(NamedTuple):
    run_dir: Path
    checkpoint: Path
    config: RunConfig
    weights_hash: str


def open_teacher(config: RunConfig) -> Teacher:
    """The teacher run of config.distill.teacher, checked against the student's data and shape: one sentence if
    it cannot teach this student."""
    from keel.runs.rundir import TOKENIZER_FILE, load_run_config
    from keel.train import checkpoint as ckpt

    run_dir = Path(config.distill.teacher)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(
            f"distill.teacher={run_dir} is not a keel run directory (no config.yaml); "
            "point it at a directory `keel train` wrote."
        )
    teacher_config = load_run_config(run_dir)
    if not ckpt.list_checkpoints(run_dir):
        raise UserError(
            f"distill.teacher={run_dir} has no checkpoint; train the teacher first (keel train --run-dir {run_dir})."
        )
    checkpoint = ckpt.find_best(run_dir)
    data_tokenizer = Path(config.data.path) / TOKENIZER_FILE
    ours = json.loads(data_tokenizer.read_text()) if data_tokenizer.is_file() else None
    if ours is not None and json.loads((run_dir / TOKENIZER_FILE).read_text()) != ours:
        raise UserError(
            f"{config.data.path} was tokenized with another tokenizer than the teacher {run_dir}, so their "
            f"vocabularies do not line up; prepare the data again with --tokenizer {run_dir}."
        )
    student_context, teacher_context = config.model.context_length, teacher_config.model.context_length
    if student_context > teacher_context:
        raise UserError(
            f"model.context_length={student_context} is longer than the teacher's ({teacher_context}), which was "
            f"never trained on positions that far; set model.context_length to at most {teacher_context}."
        )
    if config.model.vocab_size not in (0, teacher_config.model.vocab_size):
        raise UserError(
            f"model.vocab_size={config.model.vocab_size} differs from the teacher's "
            f"({teacher_config.model.vocab_size}); set model.vocab_size=0 to take it from the data."
        )
    weights_hash = ckpt.weights_sha256(checkpoint)
    return Teacher(run_dir, checkpoint, teacher_config, weights_hash)


def cache_key(weights_hash: str, data_hash: str, k: int, temperature: float, context_length: int, dtype: str) -> str:
    """What the cached values depend on; any change makes another cache."""
    return hashlib.sha256(
        json.dumps([CACHE_VERSION, weights_hash, data_hash, k, float(temperature), context_length, dtype]).encode()
    ).hexdigest()


def cache_root(teacher_dir: Path) -> Path:
    """TEACHER_RUN/cache, where every later student of the teacher finds the cache (it is the teacher's
    knowledge, and goes when the teacher's directory goes); $KEEL_HOME/cache when the teacher's directory is
    read-only."""
    root = Path(teacher_dir) / CACHE_DIR
    try:
        root.mkdir(exist_ok=True)
        if os.access(root, os.W_OK):
            return root
    except OSError:
        pass
    home = Path(os.environ.get("KEEL_HOME") or Path.home() / ".keel") / CACHE_DIR
    home.mkdir(parents=True, exist_ok=True)
    return home


class TeacherCache:
    """The teacher's top-k log-probs of the first `num_windows` windows of `cache_order`, on disk.

    A directory `distill-<key>/` holding chunk files `chunk-00000.npy`, ... (C windows each, records of
    `record_dtype`, memory-mapped when read) and `manifest.json` (the key, the shapes, and the sha256
    of every chunk written so far). A chunk is written to a temporary name, fsynced and renamed, then
    the manifest is rewritten the same way to list it: only chunks the manifest lists with a matching
    checksum are ever read. A build stopped at any point (SIGKILL included) resumes at the first chunk
    the manifest lacks; a damaged chunk is computed again; a later student needing more windows adds
    chunks. One builder at a time (flock on `.lock`).
    """

    def __init__(self, path: Path, key: str, record: np.dtype, chunk_windows: int, num_windows: int):
        self.path, self.key, self.record = path, key, record
        self.chunk_windows, self.num_windows = chunk_windows, num_windows
        self.chunks: list[np.ndarray] = []

    def chunk_path(self, chunk: int) -> Path:
        return self.path / f"chunk-{chunk:05d}.npy"

    def num_chunks(self) -> int:
        return -(-self.num_windows // self.chunk_windows)

    def read_manifest(self) -> dict:
        try:
            manifest = json.loads((self.path / MANIFEST).read_text())
        except (OSError, ValueError):
            return {}
        return manifest if isinstance(manifest, dict) and manifest.get("key") == self.key else {}

    def verified_chunks(self) -> dict[int, dict]:
        """{chunk: its manifest entry} of the chunks the manifest lists whose file still matches its checksum."""
        good = {}
        for name, entry in self.read_manifest().get("chunks", {}).items():
            path = self.chunk_path(int(name))
            if path.is_file() and path.stat().st_size == entry["size"] and sha256_file(path) == entry["sha256"]:
                good[int(name)] = entry
        return good

    def write_chunk(self, chunk: int, records: np.ndarray) -> dict:
        """Write a chunk whole or not at all; its manifest entry."""
        path = self.chunk_path(chunk)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, records)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return {"sha256": sha256_file(path), "size": path.stat().st_size}

    def write_manifest(self, chunks: dict[int, dict], extra: dict) -> None:
        """List the chunks written so far, atomically: what a reader (or a resumed build) may trust."""
        manifest = {
            "format": CACHE_FORMAT,
            "version": CACHE_VERSION,
            "key": self.key,
            "chunk_windows": self.chunk_windows,
            **extra,
            "chunks": {str(c): chunks[c] for c in sorted(chunks)},
        }
        tmp = self.path / f".{MANIFEST}.tmp"
        with open(tmp, "w") as f:
            f.write(json.dumps(manifest, indent=1))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path / MANIFEST)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)  # the renames are on disk before the next chunk starts
        finally:
            os.close(fd)

    def open(self) -> None:
        self.chunks = [np.load(self.chunk_path(c), mmap_mode="r") for c in range(self.num_chunks())]

    def entries(self, entries: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices (n, T, k) int64 and log-probs (n, T, K) float32 of cache entries `entries` (n,)."""
        rows = [self.chunks[e // self.chunk_windows][e % self.chunk_windows] for e in entries.tolist()]
        indices = np.stack([row["indices"] for row in rows]).astype(np.int64)
        log_probs = np.stack([row["log_probs"] for row in rows]).astype(np.float32)
        return torch.from_numpy(indices), torch.from_numpy(log_probs)


@contextlib.contextmanager
def _locked(path: Path, heartbeat: Callable[[], None]) -> Iterator[None]:
    """Hold path's flock; waiting for another builder keeps the watchdog's heartbeat going."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                heartbeat()
                time.sleep(1.0)
        yield
    finally:
        os.close(fd)  # releases the lock


def build_teacher_cache(
    teacher: Teacher,
    tokens: np.ndarray,
    data_hash: str,
    settings: DistillLoss,
    k: int,
    context_length: int,
    num_windows: int,
    device: torch.device,
    dtype: torch.dtype,
    heartbeat: Callable[[], None] = lambda: None,
    batch_size: int = 8,
) -> TeacherCache:
    """The teacher's cache of the first num_windows windows of `tokens` (the train split), built or
    completed now if needed, opened for reading."""
    vocab_size = teacher.config.model.vocab_size
    k = min(k, vocab_size)
    key = cache_key(teacher.weights_hash, data_hash, k, settings.temperature, context_length, str(dtype))
    record = record_dtype(context_length, k, vocab_size)
    cache = TeacherCache(
        cache_root(teacher.run_dir) / f"distill-{key[:16]}",
        key,
        record,
        max(1, CHUNK_BYTES // record.itemsize),
        num_windows,
    )
    cache.path.mkdir(parents=True, exist_ok=True)
    with _locked(cache.path / ".lock", heartbeat):
        done = cache.verified_chunks()
        needed = [c for c in range(cache.num_chunks()) if c not in done]
        if needed:
            extra = {
                "teacher": str(teacher.checkpoint.resolve()),
                "teacher_weights_sha256": teacher.weights_hash,
                "data": data_hash,
                "k": k,
                "temperature": settings.temperature,
                "context_length": context_length,
                "dtype": str(dtype),
            }
            order = cache_order((len(tokens) - 1) // context_length)
            total = sum(len(_chunk_entries(cache, c, len(order))) for c in needed)
            model = GPT(teacher.config.model).to(device)
            from keel.train import checkpoint as ckpt

            ckpt.load_checkpoint(teacher.checkpoint, model, device)
            model.eval()
            with tqdm(total=total, desc="teacher cache", unit=" windows", dynamic_ncols=True) as bar:
                for chunk in needed:
                    windows = order[_chunk_entries(cache, chunk, len(order))]
                    records = np.zeros(len(windows), dtype=record)
                    for start in range(0, len(windows), batch_size):
                        part = windows[start : start + batch_size]
                        idx = np.stack([tokens[w * context_length : (w + 1) * context_length] for w in part])
                        inputs = torch.from_numpy(idx.astype(np.int64)).to(device)
                        with torch.no_grad(), autocast(device, dtype):
                            hidden = lm_hidden(model, inputs).hidden  # (b, T, C)
                        top, log_probs = linear_top_k(
                            hidden.flatten(0, 1), model.lm_head.weight.to(hidden.dtype), k, settings.temperature
                        )
                        shape = (len(part), context_length, -1)
                        records["indices"][start : start + len(part)] = top.view(shape).cpu().numpy()
                        records["log_probs"][start : start + len(part)] = (
                            log_probs.clamp(min=LOG_PROB_FLOOR).view(shape).cpu().numpy()
                        )
                        bar.update(len(part))
                        heartbeat()
                    done[chunk] = cache.write_chunk(chunk, records)
                    cache.write_manifest(done, extra)
            del model
    cache.open()
    return cache


def _chunk_entries(cache: TeacherCache, chunk: int, total: int) -> np.ndarray:
    """The cache entries chunk `chunk` holds: C of them, fewer at the end of the split."""
    return np.arange(chunk * cache.chunk_windows, min((chunk + 1) * cache.chunk_windows, total))


# -- the task ----------------------------------------------------------------------------------------


class DistillTask(LMTask):
    """The student: any model config, trained on token shards against the teacher's cache."""

    kind = "distill"

    def __init__(
        self,
        config: RunConfig,
        device: torch.device,
        dtype: torch.dtype,
        heartbeat: Callable[[], None] = lambda: None,
    ):
        super().__init__(config, device, dtype)
        from keel.runs.rundir import data_identity

        d, m, t = config.distill, config.model, config.train
        self.settings = DistillLoss(d.loss, d.temperature, d.ratio, d.jsd_beta)
        self.teacher = open_teacher(config)
        data = open_data(Path(config.data.path))
        self.train_tokens, self.val_tokens = data.tokens("train"), data.tokens("val")
        self.val_name = data.split_name("val")
        self.context_length = m.context_length
        split_windows = (len(self.train_tokens) - 1) // m.context_length
        if split_windows < t.batch_size:
            raise UserError(
                f"context_length {m.context_length} is too long for {data.split_name('train')} ({split_windows} "
                f"windows, fewer than train.batch_size {t.batch_size}); lower model.context_length or "
                "train.batch_size, or prepare more data."
            )
        self.num_windows = pool_size(split_windows, config)
        self.order = cache_order(split_windows)
        self.cache = build_teacher_cache(
            self.teacher,
            self.train_tokens,
            data_identity(Path(config.data.path)),
            self.settings,
            d.top_k,
            m.context_length,
            self.num_windows,
            device,
            dtype,
            heartbeat,
            batch_size=t.batch_size,
        )
        next(iter(self._val_batches(1)))  # fail now, with a clear sentence, if the val split is too short

    def batch(self, index: int) -> Batch:
        """Stream positions [i·B, (i+1)·B): pool entry order_{seed, epoch}[position % pool] of each."""
        B, T, seed = self.config.train.batch_size, self.context_length, self.config.train.seed
        positions = np.arange(index * B, (index + 1) * B)
        entries = np.empty(B, dtype=np.int64)
        epochs = positions // self.num_windows
        for epoch in np.unique(epochs):
            visit = np.random.default_rng([seed, int(epoch)]).permutation(self.num_windows)
            entries[epochs == epoch] = visit[positions[epochs == epoch] % self.num_windows]
        starts = self.order[entries] * T
        window = np.stack([self.train_tokens[s : s + T + 1] for s in starts.tolist()]).astype(np.int64)  # (B, T+1)
        indices, log_probs = self.cache.entries(entries)
        tensors = {
            "inputs": torch.from_numpy(window[:, :-1]),
            "targets": torch.from_numpy(window[:, 1:]),
            "teacher_indices": indices,
            "teacher_log_probs": log_probs,
        }
        return Batch(tensors, units=B * T, tokens=B * T)

    def loss(self, model, tensors: dict[str, torch.Tensor]) -> LossOutput:
        out = lm_hidden(model, tensors["inputs"])
        head = linear_distill_loss(
            out.hidden,
            model.lm_head.weight,
            tensors["targets"],
            tensors["teacher_indices"],
            tensors["teacher_log_probs"],
            self.settings,
        )
        metrics = {
            ACT_NORM: out.act_mean_square,
            LOGIT_NORM: head.logit_mean_square.detach(),
            "kl": head.kd,
            "ce": head.ce,
        }
        return LossOutput(head.loss, metrics)

    def evaluate(self, model) -> dict[str, float]:
        """The student's next-token loss on the val split (as pretraining's: comparable across runs)."""
        batches = self._val_batches(self.config.train.eval_batches)
        return {"val_loss": mean_token_loss(model, batches, self.device, self.dtype)}

    def _val_batches(self, num_batches: int):
        from keel.data import eval_batches

        t = self.config.train
        batches = eval_batches(
            self.val_tokens, self.context_length, t.batch_size, num_batches, split_name=self.val_name
        )
        return ({"inputs": x, "targets": y} for x, y in batches)


def pool_size(split_windows: int, config: RunConfig) -> int:
    """Windows the student cycles through (and the teacher caches): distill.max_windows, else the whole split or
    one epoch of the run (train.max_steps × batch_size × grad_accum windows), whichever is fewer."""
    t = config.train
    limit = config.distill.max_windows or (t.max_steps * t.batch_size * t.grad_accum if t.max_steps else split_windows)
    return max(min(split_windows, limit), t.batch_size)
