"""Token shards on disk and the batches drawn from them.

DATA_DIR holds `tokenizer.json`, `train.bin`, `val.bin` and `manifest.json`. A .bin file is
the flat sequence of token ids of its split, each document written as `[eot] + ids(doc)`
(the end-of-text token doubles as a beginning-of-document marker), in the manifest's dtype
(uint16 when the vocabulary fits, else uint32), read back with `np.memmap`.

The batch sampler is the determinism contract of training: `get_batch(tokens, T, B, seed, i)`
depends on nothing but its arguments, so resuming at step i replays the same batches.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from keel.data.tokenizer import load_tokenizer
from keel.errors import UserError

if TYPE_CHECKING:
    import torch

FORMAT = "keel-data"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
SPLITS = ("train", "val")
ENCODE_BATCH_CHARS = 1 << 20  # ~1 MB of text per encode_batch call: parallel enough, small in memory


def split_of(text: str, val_fraction: float) -> str:
    """ "train" or "val", decided by the document's content hash.

    A hash, not a random draw, so a document lands in the same split whatever else is in the
    corpus and in whatever order the sources are read.
    """
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return "val" if int.from_bytes(digest[:8], "big") < val_fraction * 2**64 else "train"


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds every token id."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def write_shard(
    tokenizer: Tokenizer, texts: Iterable[str], path: Path, eot_id: int, num_texts: int, progress: bool
) -> int:
    """Encode `texts` in batches and write them as `[eot] + ids` each to `path`; returns the token count."""
    dtype = token_dtype(tokenizer.get_vocab_size())
    num_tokens = 0
    bar = tqdm(total=num_texts, desc=f"encoding {path.stem}", unit=" docs", disable=not progress)
    with open(path, "wb") as out, bar:
        for batch in _batches_of_chars(texts, ENCODE_BATCH_CHARS):
            ids = []
            for encoding in tokenizer.encode_batch_fast(batch, add_special_tokens=False):
                ids.append(eot_id)
                ids.extend(encoding.ids)
            np.asarray(ids, dtype=dtype).tofile(out)
            num_tokens += len(ids)
            bar.update(len(batch))
    return num_tokens


def _batches_of_chars(texts: Iterable[str], max_chars: int) -> Iterator[list[str]]:
    batch, num_chars = [], 0
    for text in texts:
        batch.append(text)
        num_chars += len(text)
        if num_chars >= max_chars:
            yield batch
            batch, num_chars = [], 0
    if batch:
        yield batch


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class TokenData:
    """A prepared DATA_DIR: its manifest, tokenizer and token arrays."""

    path: Path
    manifest: dict
    _arrays: dict[str, np.memmap] = field(default_factory=dict, repr=False)

    @property
    def vocab_size(self) -> int:
        return self.manifest["tokenizer"]["vocab_size"]

    @property
    def eot_id(self) -> int:
        return self.manifest["tokenizer"]["eot_id"]

    @functools.cached_property
    def tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.path)

    def tokens(self, split: str) -> np.memmap:
        """All token ids of `split` ("train" or "val"), 1-D, read from disk on demand."""
        assert split in SPLITS, split
        if split not in self._arrays:
            path = self.path / self.manifest["splits"][split]["file"]
            if not path.is_file():
                raise UserError(f"{path} is missing; re-create {self.path} with keel prepare --force")
            self._arrays[split] = np.memmap(path, dtype=self.manifest["dtype"], mode="r")
        return self._arrays[split]

    def split_name(self, split: str) -> str:
        """How error messages name a split, e.g. "data/python-stdlib's train split"."""
        return f"{self.path}'s {split} split"

    def verify(self) -> None:
        verify_files(self.path, self.manifest)


def verify_files(data_dir: Path, manifest: dict) -> None:
    """Recompute the sha256 of every file the manifest lists; raise UserError on a mismatch."""
    for name, expected in manifest["files"].items():
        path = data_dir / name
        if not path.is_file() or sha256_file(path) != expected:
            raise UserError(
                f"{path} is missing or corrupted (sha256 mismatch); re-create {data_dir} with keel prepare --force"
            )


def open_data(data_dir: Path) -> TokenData:
    """Open a DATA_DIR written by `keel prepare` (cheap: files are read lazily)."""
    data_dir = Path(data_dir)
    manifest_path = data_dir / MANIFEST_FILE
    if not manifest_path.is_file():
        raise UserError(f"{data_dir} is not a keel data directory; create it with keel prepare")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") == FORMAT and manifest.get("kind", "text") != "text":
        holds = {"sft": "SFT examples", "pref": "preference pairs"}.get(manifest["kind"], manifest["kind"])
        raise UserError(
            f"{data_dir} holds {holds}, not pretraining text; train on it with the task made for it, "
            "or point data.path at a data directory of text"
        )
    if manifest.get("format") != FORMAT or manifest.get("version", 0) > FORMAT_VERSION:
        raise UserError(
            f"{data_dir} was written by a newer or unknown keel data format; re-create it with keel prepare --force"
        )
    return TokenData(data_dir, manifest)


def get_batch(
    tokens: np.ndarray, context_length: int, batch_size: int, seed: int, index: int, *, split_name: str = "this split"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch `index` of an endless, shuffled stream of training windows: (x, y), each (B, T) int64.

    The stream walks epochs. Epoch e cuts the tokens into windows of T+1 tokens at stride T
    (consecutive windows share one token: the last target of one is the first input of the
    next), starting at a random offset in [0, T) so that window edges move between epochs,
    and visits them in a random order; (seed, e) seeds both. Within an epoch no window
    repeats. Every epoch has the same number of windows, (N - T) // T, the count that fits at
    any offset, so stream position p is window p % W of epoch p // W: no history to replay.
    Batch i is stream positions [i*B, (i+1)*B), which may straddle two epochs.
    """
    assert context_length >= 1 and batch_size >= 1 and index >= 0
    num_windows = _count_windows(len(tokens), context_length, batch_size, len(tokens) - context_length, split_name)
    positions = np.arange(index * batch_size, (index + 1) * batch_size)  # (B,)
    epochs = positions // num_windows
    starts = np.empty(batch_size, dtype=np.int64)  # (B,)
    for epoch in np.unique(epochs):
        offset, order = _epoch_order(num_windows, context_length, seed, int(epoch))
        in_epoch = epochs == epoch
        starts[in_epoch] = offset + order[positions[in_epoch] % num_windows] * context_length
    return _windows(tokens, starts, context_length)


def eval_batches(
    tokens: np.ndarray, context_length: int, batch_size: int, num_batches: int, *, split_name: str = "this split"
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Up to `num_batches` (x, y) batches of consecutive windows from the start of the split.

    Always the same windows, so evaluations at different steps (and in different runs on
    the same data) are comparable. A short split gives the windows it has: fewer batches, the
    last one possibly smaller than batch_size; one window is the least it must hold.
    """
    assert num_batches >= 1
    num_windows = _count_windows(len(tokens), context_length, 1, len(tokens) - 1, split_name)
    window_starts = np.arange(min(num_windows, num_batches * batch_size), dtype=np.int64) * context_length
    return (
        _windows(tokens, window_starts[i : i + batch_size], context_length)
        for i in range(0, len(window_starts), batch_size)
    )


def _count_windows(num_tokens: int, context_length: int, batch_size: int, usable: int, split_name: str) -> int:
    """How many (T+1)-token windows at stride T fit in `usable` + 1 tokens; at least batch_size or a UserError."""
    num_windows = max(usable, 0) // context_length
    if num_windows < batch_size:
        raise UserError(
            f"context_length {context_length} is too long for {split_name} ({num_tokens} tokens make {num_windows} "
            f"windows, fewer than {batch_size}); lower model.context_length or train.batch_size, "
            "or prepare more data"
        )
    return num_windows


@functools.lru_cache(maxsize=4)  # the current epoch and the next, for train (and a spare pair)
def _epoch_order(num_windows: int, context_length: int, seed: int, epoch: int) -> tuple[int, np.ndarray]:
    """(offset in [0, T), permutation of the window indices) of one epoch."""
    rng = np.random.default_rng([seed, epoch])
    offset = int(rng.integers(context_length))
    order = rng.permutation(num_windows)
    order.flags.writeable = False  # shared through the cache
    return offset, order


def _windows(tokens: np.ndarray, starts: np.ndarray, context_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    import torch  # imported here: `keel prepare` needs none of torch and importing it takes seconds

    window = torch.from_numpy(tokens[starts[:, None] + np.arange(context_length + 1)].astype(np.int64))  # (B, T+1)
    return window[:, :-1].contiguous(), window[:, 1:].contiguous()  # (B, T), (B, T)
