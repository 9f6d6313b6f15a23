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
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from stat import S_ISREG
from typing import TYPE_CHECKING

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from keel.data.tokenizer import TOKENIZER_FILE, load_tokenizer
from keel.errors import UserError

if TYPE_CHECKING:
    import torch

FORMAT = "keel-data"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
STAMP_FILE = ".verified.json"  # which files were already checked against the manifest: see verify_files
SPLITS = ("train", "val")
ENCODE_BATCH_CHARS = 1 << 20  # ~1 MB of text per encode_batch call: parallel enough, small in memory


def split_of(text: str, val_fraction: float) -> str:
    """ "train" or "val", decided by the document's content hash.

    A hash, not a random draw, so a document lands in the same split whatever else is in the
    corpus and in whatever order the sources are read.
    """
    return split_of_digest(hashlib.sha256(text.encode("utf-8")).digest(), val_fraction)


def split_of_digest(sha256: bytes, val_fraction: float) -> str:
    """`split_of` a text from the sha256 of its UTF-8 bytes (hashed piece by piece, for a long document)."""
    return "val" if int.from_bytes(sha256[:8], "big") < val_fraction * 2**64 else "train"


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds every token id."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def write_shard(
    tokenizer: Tokenizer,
    pieces: Iterable[tuple[bool, str]],
    path: Path,
    eot_id: int,
    num_pieces: int,
    progress: bool,
) -> int:
    """Encode the documents given as (starts_a_document, text) pieces in batches and write `[eot] + ids` of each
    to `path`; returns the token count. A long document comes in several pieces, cut where the
    pre-tokenizer splits anyway (see keel.data.clean), so its ids are those of the whole text."""
    dtype = token_dtype(tokenizer.get_vocab_size())
    num_tokens = 0
    bar = tqdm(total=num_pieces, desc=f"encoding {path.stem}", unit=" pieces", disable=not progress)
    with open(path, "wb") as out, bar:
        for batch in _batches_of_chars(pieces, ENCODE_BATCH_CHARS):
            ids = []
            encodings = tokenizer.encode_batch_fast([text for _, text in batch], add_special_tokens=False)
            for (starts_document, _), encoding in zip(batch, encodings):
                if starts_document:
                    ids.append(eot_id)
                ids.extend(encoding.ids)
            np.asarray(ids, dtype=dtype).tofile(out)
            num_tokens += len(ids)
            bar.update(len(batch))
    return num_tokens


def _batches_of_chars(pieces: Iterable[tuple[bool, str]], max_chars: int) -> Iterator[list[tuple[bool, str]]]:
    batch, num_chars = [], 0
    for piece in pieces:
        batch.append(piece)
        num_chars += len(piece[1])
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


def read_manifest(data_dir: Path) -> dict | None:
    """The parsed manifest.json of `data_dir`, None if it has none; a UserError if it is not a JSON object."""
    manifest_path = Path(data_dir) / MANIFEST_FILE
    if not manifest_path.is_file():
        return None
    try:
        manifest = json.loads(manifest_path.read_bytes())
    except OSError as err:
        raise UserError(f"{manifest_path} cannot be read ({err.strerror}); check its permissions") from err
    except ValueError:  # JSONDecodeError, or UnicodeDecodeError for bytes that are not UTF-8
        manifest = None
    if not isinstance(manifest, dict):
        raise UserError(
            f"{manifest_path} is damaged (not a JSON object); re-create {data_dir} with keel prepare --force"
        )
    return manifest


def is_file_name(name: object) -> bool:
    """True for a plain file name: keel writes DATA_DIR flat, so "../x", "/etc/x" or "a/b" in a manifest is refused."""
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name


def keel_files(data_dir: Path) -> set[str] | None:
    """The names of the files keel wrote in `data_dir`, or None if its manifest is missing or not keel's.

    This is what `keel prepare --force` may remove: the manifest, the files it lists and the
    verification stamp; nothing else, whatever else the folder holds.
    """
    try:
        manifest = read_manifest(data_dir)
    except UserError:
        return None
    files = manifest.get("files") if manifest is not None and manifest.get("format") == FORMAT else None
    if not isinstance(files, dict) or not all(is_file_name(name) for name in files):
        return None
    return {MANIFEST_FILE, STAMP_FILE, *files}


def check_manifest(data_dir: Path, manifest: dict, schema: dict, reads: Callable[[dict], list[str]]) -> None:
    """A UserError naming `data_dir` if the manifest lacks a field of `schema` or has one of another type, or if
    a file it names is outside `data_dir` or has no sha256 (so would be read unverified).

    `schema` maps keys to a type, a tuple of allowed values, or a nested schema; `reads(manifest)`
    lists the files the reader will open.
    """
    problem = _schema_problem(manifest, schema, "")
    if problem is None:
        files = manifest["files"]
        outside = [name for name in [*files, *reads(manifest)] if not is_file_name(name)]
        unlisted = [name for name in reads(manifest) if name not in files]
        if outside:
            problem = f"it names {outside[0]!r}, which is not a file of its own directory"
        elif unlisted:
            problem = f"files has no sha256 of {unlisted[0]}"
        elif not all(isinstance(digest, str) for digest in files.values()):
            problem = "files: a sha256 is not a string"
    if problem is not None:
        raise UserError(
            f"{data_dir / MANIFEST_FILE} is damaged ({problem}); re-create {data_dir} with keel prepare --force"
        )


def _schema_problem(value: object, schema: object, where: str) -> str | None:
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            return f"{where or 'the manifest'} is not an object"
        for key, inner in schema.items():
            if key not in value:
                return f"no {where}{key}"
            if (problem := _schema_problem(value[key], inner, f"{where}{key}.")) is not None:
                return problem
        return None
    where = where.rstrip(".")
    if isinstance(schema, tuple):
        return None if value in schema else f"{where} is {value!r}, not one of {', '.join(map(str, schema))}"
    is_int_for_bool = schema is int and isinstance(value, bool)
    return None if isinstance(value, schema) and not is_int_for_bool else f"{where} is not {schema.__name__}"


def _text_reads(manifest: dict) -> list[str]:
    return [TOKENIZER_FILE] + [manifest["splits"][split]["file"] for split in SPLITS]


def verify_files(data_dir: Path, manifest: dict) -> int:
    """Check every file the manifest lists against its sha256 before use; a UserError names the first bad one.

    Cheap enough for every start: sizes are compared always (a stat), and a file is hashed only
    when the verification stamp does not say that this exact file -- same size, mtime, ctime,
    inode and device -- already matched this sha256. So the first open of a data directory reads
    its files once at disk speed, and every later one (a restart after a crash, the frequent
    case) only stats them. Rewriting a file changes its ctime, which no user can set back (utime
    sets ctime to now), so an overwritten file is always hashed again, even with its mtime reset.

    The stamp is DATA_DIR/.verified.json, written atomically; when DATA_DIR is read-only it goes to
    $KEEL_HOME/verified/<hash of DATA_DIR's absolute path>.json. Returns the number of files hashed.
    """
    data_dir = Path(data_dir)
    stamp = {**_read_stamp(_home_stamp_path(data_dir)), **_read_stamp(data_dir / STAMP_FILE)}
    sizes = manifest.get("sizes") if isinstance(manifest.get("sizes"), dict) else {}  # absent before sizes were kept
    verified, num_hashed = {}, 0
    for name, expected in manifest["files"].items():
        path = data_dir / name
        try:
            stat = path.stat()
        except OSError:
            stat = None
        if stat is None or not S_ISREG(stat.st_mode):
            raise UserError(f"{path} is missing; re-create {data_dir} with keel prepare --force")
        if isinstance(sizes.get(name), int) and stat.st_size != sizes[name]:
            raise UserError(
                f"{path} is {stat.st_size:,} bytes where the manifest says {sizes[name]:,} (cut short or overwritten); "
                f"re-create {data_dir} with keel prepare --force"
            )
        # Stat before hashing: a write during the hash changes ctime, so the stamp will not match next time.
        key = {
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "ctime_ns": stat.st_ctime_ns,
            "inode": stat.st_ino,
            "device": stat.st_dev,
            "sha256": expected,
        }
        if stamp.get(name) != key:
            num_hashed += 1
            if sha256_file(path) != expected:
                raise UserError(
                    f"{path} is corrupted (its sha256 differs from the manifest's); "
                    f"re-create {data_dir} with keel prepare --force"
                )
        verified[name] = key
    if verified != stamp:
        _write_stamp(data_dir, verified)
    return num_hashed


def _home_stamp_path(data_dir: Path) -> Path:
    home = Path(os.environ.get("KEEL_HOME") or Path.home() / ".keel")
    key = hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:32]
    return home / "verified" / f"{key}.json"


def _read_stamp(path: Path) -> dict:
    try:
        stamp = json.loads(path.read_bytes())
    except (OSError, ValueError):  # none yet, unreadable, or torn: every file is hashed again, nothing worse
        return {}
    return stamp if isinstance(stamp, dict) else {}


def _write_stamp(data_dir: Path, stamp: dict) -> None:
    """Write the stamp next to the data, or under KEEL_HOME if the data is read-only; a stamp is only a cache."""
    text = json.dumps(stamp, indent=1) + "\n"
    for path in (data_dir / STAMP_FILE, _home_stamp_path(data_dir)):
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # one per process: DDP ranks write at once
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary.write_text(text)
            os.replace(temporary, path)
            return
        except OSError:
            try:
                temporary.unlink(missing_ok=True)
            except OSError:  # its folder could not be created
                pass
    # Neither place is writable: the next start hashes again, which is slower but still safe.


# The fields TokenData reads; check_manifest refuses a manifest without them.
TEXT_SCHEMA = {
    "format": str,
    "version": int,
    "splits": {split: {"file": str, "tokens": int} for split in SPLITS},
    "tokenizer": {"vocab_size": int, "eot_id": int},
    "dtype": ("uint16", "uint32"),
    "files": dict,
}


def open_data(data_dir: Path) -> TokenData:
    """Open a DATA_DIR written by `keel prepare`: check its manifest and verify its files (see `verify_files`).

    Token arrays are read lazily.
    """
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    if manifest is None:
        raise UserError(f"{data_dir} is not a keel data directory; create it with keel prepare")
    if manifest.get("format") == FORMAT and manifest.get("kind", "text") != "text":
        holds = {"sft": "SFT examples", "pref": "preference pairs"}.get(manifest["kind"], manifest["kind"])
        raise UserError(
            f"{data_dir} holds {holds}, not pretraining text; train on it with the task made for it, "
            "or point data.path at a data directory of text"
        )
    version = manifest.get("version", 0)
    if manifest.get("format") != FORMAT or not isinstance(version, int) or version > FORMAT_VERSION:
        raise UserError(
            f"{data_dir} was written by a newer or unknown keel data format; re-create it with keel prepare --force"
        )
    check_manifest(data_dir, manifest, TEXT_SCHEMA, _text_reads)
    verify_files(data_dir, manifest)
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
