"""Data: sources -> clean/dedup -> byte-level BPE -> token shards + manifest, and batches from them.

`prepare` builds a DATA_DIR in two streaming passes, so memory stays flat however large the
corpus is and however long its documents or lines are (see MEMORY_BOUND):

1. read every source, clean and dedup each document, and append it, cut into pieces, to a
   temporary JSONL of its split (chosen by content hash);
2. train the tokenizer from the train JSONL, then encode both JSONLs in batches and append
   the ids to train.bin / val.bin.

With `tokenizer=DIR` the tokenizer of a data or run directory is reused instead of trained.
JSONL sources of SFT examples or preference pairs (and builtin:stdlib-sft / -pref) make a
DATA_DIR of token sequences with loss masks instead: see `keel.data.examples`; a folder of images
(or builtin:digits, builtin:mnist-5k) one of image arrays: see `keel.data.images`.

Everything is built in a hidden sibling directory that is moved into place only when
complete; on any failure it is deleted, and an existing DATA_DIR is left untouched. `force`
replaces only what keel wrote in an existing data directory (its manifest, the files the
manifest lists, the verification stamp) and refuses any other non-empty folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from tokenizers import Tokenizer
from tqdm import tqdm

from keel.data.clean import DEDUP_MODES, PIECE_CHARS, READ_BYTES, Cleaner
from keel.data.examples import (
    DEFAULT_VAL_FRACTION,
    ExampleData,
    Sequences,
    build_examples,
    kind_of_sources,
    open_examples,
    plan_examples,
    resolve_base,
)
from keel.data.images import build_images, is_image_source
from keel.data.shards import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_FILE,
    SPLITS,
    TokenData,
    eval_batches,
    get_batch,
    keel_files,
    open_data,
    sha256_file,
    split_of_digest,
    token_dtype,
    write_shard,
)
from keel.data.sources import Document, read_source
from keel.data.tokenizer import EOT, MIN_VOCAB_SIZE, TOKENIZER_FILE, load_tokenizer, train_tokenizer
from keel.errors import UserError

__all__ = [
    "prepare",
    "open_data",
    "TokenData",
    "get_batch",
    "eval_batches",
    "load_tokenizer",
    "open_examples",
    "ExampleData",
    "Sequences",
]
DEFAULT_VOCAB_SIZE = 8192
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
MEMORY_BOUND = (
    f"text files are read {READ_BYTES // 2**20} MiB at a time and cut into pieces of at most {PIECE_CHARS // 1024} Ki "
    "characters before the tokenizer sees them, so peak memory does not depend on the length of a line or document; "
    "it grows only with the number of documents (the dedup index, ~16 bytes each, more with minhash) and of distinct "
    "words (the BPE trainer's counts). A JSONL, parquet or HF record is held whole while it is read."
)


def prepare(
    sources: list[str],
    out_dir: Path,
    vocab_size: int | None = None,
    val_fraction: float | None = None,
    dedup: str = "exact",
    force: bool = False,
    min_chars: int = 32,
    progress: bool = True,
    *,
    tokenizer: Path | str | None = None,
    context_length: int | None = None,
    too_long: str | None = None,
    image_size: int | None = None,
    include: list[str] | None = None,
) -> dict:
    """Build DATA_DIR `out_dir` from `sources` and return its manifest.

    Memory is bounded by design: text files are read 1 MiB at a time and every document reaches
    the tokenizer in pieces of at most 64 Ki characters, so peak memory does not depend on the
    length of a line or a document (MEMORY_BOUND says what it does grow with).

    For text, the manifest holds what a summary needs: documents read, kept and skipped (count
    and example origins per reason), and documents / tokens / UTF-8 bytes per split. Defaults:
    vocab_size 8192 (or the size of the reused `tokenizer`), val_fraction 0.02.

    SFT examples and preference pairs need `tokenizer` (a data or run directory) and take
    `context_length` and `too_long`; see `keel.data.examples` for their options and manifest.
    Images take `image_size` (resize every image to that square); see `keel.data.images`.
    `include` (text only): read only the files of folder sources whose names match one of these globs.
    """
    out_dir = Path(out_dir)
    _check_options(sources, out_dir, vocab_size, val_fraction, dedup, force, min_chars)
    if image_size is not None or any(is_image_source(source) for source in sources):
        unused = [
            name
            for name, value in (
                ("--vocab-size", vocab_size),
                ("--tokenizer", tokenizer),
                ("--context-length", context_length),
                ("--too-long", too_long),
            )
            if value is not None
        ] + (["--include"] if include else [])
        if unused:
            raise UserError(f"{unused[0]} applies to text, not to images; drop it")
        return _build_in_place(out_dir, lambda build_dir: build_images(build_dir, sources, val_fraction, image_size))
    kind = kind_of_sources(sources)
    if kind != "text" and include:
        raise UserError("--include picks files of text folders; name SFT or preference files themselves instead")
    if kind != "text":
        plan = plan_examples(sources, kind, tokenizer, val_fraction, context_length, too_long, min_chars, dedup)
    else:
        if context_length is not None or too_long is not None:
            raise UserError(
                "--context-length and --too-long apply to SFT examples and preference pairs, not to text; drop them"
            )
        documents = [read_source(source, include) for source in sources]  # checks every source before any work
        base_tokenizer = _reused_tokenizer(Path(tokenizer), vocab_size) if tokenizer is not None else None
    if kind != "text":
        return _build_in_place(out_dir, lambda build_dir: build_examples(build_dir, plan, progress))
    vocab_size, val_fraction = vocab_size or DEFAULT_VOCAB_SIZE, val_fraction or DEFAULT_VAL_FRACTION
    return _build_in_place(
        out_dir,
        lambda build_dir: _build(
            build_dir,
            sources,
            documents,
            vocab_size,
            val_fraction,
            dedup,
            min_chars,
            progress,
            base_tokenizer,
            tokenizer,
            include,
        ),
    )


def _build_in_place(out_dir: Path, build: Callable[[Path], dict]) -> dict:
    """Run `build(build_dir)` in a hidden sibling of out_dir, fsync what it wrote and move it into place;
    on any failure the build directory is deleted and out_dir is left as it was."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _sweep_abandoned_builds(out_dir)
    # Named first and created inside the try: a Ctrl-C just after the mkdir still removes it.
    build_dir = out_dir.parent / f".{out_dir.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        build_dir.mkdir()
        manifest = build(build_dir)
        for name in [*manifest["files"], MANIFEST_FILE]:
            fsync(build_dir / name)
        _move_into_place(build_dir, out_dir)
    except BaseException:
        shutil.rmtree(build_dir, ignore_errors=True)
        raise
    return manifest


def _sweep_abandoned_builds(out_dir: Path) -> None:
    """Delete the build directories of out_dir left by processes that no longer exist (killed by SIGKILL,
    or by a signal in a program that called prepare() without keel's handlers)."""
    for build_dir in out_dir.parent.glob(f".{out_dir.name}.*.tmp"):
        pid = build_dir.name.removeprefix(f".{out_dir.name}.").split(".")[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(build_dir, ignore_errors=True)
        except PermissionError:
            pass  # alive, another user's


def _reused_tokenizer(tokenizer_dir: Path, vocab_size: int | None) -> Tokenizer:
    """The tokenizer of a data or run directory, for text; a UserError if it cannot serve."""
    tokenizer = resolve_base(tokenizer_dir).tokenizer()
    if tokenizer.token_to_id(EOT) is None:
        raise UserError(f"{tokenizer_dir / TOKENIZER_FILE} has no {EOT} token; use a tokenizer written by keel prepare")
    if vocab_size is not None and vocab_size != tokenizer.get_vocab_size():
        raise UserError(
            f"--vocab-size {vocab_size} differs from the {tokenizer.get_vocab_size()} tokens of {tokenizer_dir}'s "
            "tokenizer; drop --vocab-size when reusing a tokenizer"
        )
    return tokenizer


def _check_options(
    sources: list[str],
    out_dir: Path,
    vocab_size: int | None,
    val_fraction: float | None,
    dedup: str,
    force: bool,
    min_chars: int,
) -> None:
    if not sources:
        raise UserError("no sources given; name at least one file, folder, builtin:python-stdlib or hf:NAME")
    if vocab_size is not None and vocab_size < MIN_VOCAB_SIZE:
        raise UserError(f"vocab size {vocab_size} is too small; use at least {MIN_VOCAB_SIZE} (256 bytes + {EOT})")
    if val_fraction is not None and not 0 < val_fraction < 1:
        raise UserError(f"val fraction {val_fraction} must lie strictly between 0 and 1; 0.02 is a good start")
    if dedup not in DEDUP_MODES:
        raise UserError(f"unknown dedup mode {dedup!r}; use one of {', '.join(DEDUP_MODES)}")
    if min_chars < 0:
        raise UserError(f"min_chars {min_chars} must not be negative")
    if out_dir.exists() and not force:
        raise UserError(f"{out_dir} already exists; pass --force to replace it")
    _replaceable_files(out_dir)


def _replaceable_files(out_dir: Path) -> set[str]:
    """The files of `out_dir` that --force may replace: none if it does not exist or is empty, those keel
    wrote if it is a keel data directory; a UserError for anything else, which keel must not touch."""
    if not out_dir.exists():
        return set()
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        return set()
    names = keel_files(out_dir) if out_dir.is_dir() else None
    if names is None:
        raise UserError(
            f"{out_dir} exists and is not a keel data directory (it has no manifest.json written by keel prepare), "
            "so --force will not replace it; choose another --out"
        )
    return names


def _build(
    build_dir: Path,
    sources: list[str],
    documents: list[Iterator[Document]],
    vocab_size: int,
    val_fraction: float,
    dedup: str,
    min_chars: int,
    progress: bool,
    base_tokenizer: Tokenizer | None = None,
    tokenizer_from: Path | str | None = None,
    include: list[str] | None = None,
) -> dict:
    work_dir = build_dir / "work"
    work_dir.mkdir()
    texts_path = {split: work_dir / f"{split}.jsonl" for split in SPLITS}
    splits = {split: {"file": f"{split}.bin", "documents": 0, "tokens": 0, "bytes": 0} for split in SPLITS}
    num_pieces = dict.fromkeys(SPLITS, 0)
    cleaner = Cleaner(min_chars, dedup)
    source_counts = []

    # Pass 1: clean, dedup and split into two JSONL files of [starts_a_document, text] pieces.
    with (
        open(texts_path["train"], "w", encoding="utf-8") as train_out,
        open(texts_path["val"], "w", encoding="utf-8") as val_out,
        tqdm(desc="reading", unit=" docs", disable=not progress) as bar,
    ):
        outs = {"train": train_out, "val": val_out}
        document = _PendingDocument(work_dir / "document.jsonl")
        for source, source_documents in zip(sources, documents):
            num_read, num_kept, num_unreadable = 0, cleaner.num_kept, cleaner.num_unreadable
            for origin, content in source_documents:
                num_read += 1
                bar.update()
                document.start()
                for piece in cleaner.pieces(origin, content):
                    document.add(piece)
                if not cleaner.kept:
                    continue
                split = split_of_digest(document.sha256.digest(), val_fraction)
                splits[split]["documents"] += 1
                splits[split]["bytes"] += document.num_bytes
                num_pieces[split] += document.num_pieces
                document.move_to(outs[split])
            if num_read == 0:
                raise UserError(f"{source} contains no documents; check that it is the corpus you meant")
            if cleaner.num_unreadable - num_unreadable == num_read:
                raise UserError(
                    f"{source} has no text: all {num_read} of its files are binary, not UTF-8 or unreadable; "
                    "point it at UTF-8 text files you may read"
                )
            source_counts.append({"source": source, "documents": num_read, "kept": cleaner.num_kept - num_kept})
        document.close()

    report = cleaner.report()
    if cleaner.num_kept == 0:
        dropped = ", ".join(f"{s['count']} {reason}" for reason, s in report["skipped"].items() if s["count"])
        raise UserError(
            f"nothing is left of {' '.join(sources)} after cleaning ({dropped}); add more text or lower min_chars"
        )
    if not all(splits[split]["documents"] for split in SPLITS):
        raise UserError(
            f"the corpus is too small to split: its {cleaner.num_kept} documents gave "
            f"{splits['train']['documents']} train and {splits['val']['documents']} validation documents "
            f"at val fraction {val_fraction}; add more text or change --val-fraction"
        )

    # Pass 2: tokenizer from the train split only (validation text stays unseen, as it is for
    # the model), then both splits encoded to .bin.
    # A reused tokenizer (--tokenizer) replaces the trained one.
    tokenizer = base_tokenizer
    if tokenizer is None:
        texts = (text for _, text in _read_pieces(texts_path["train"]))
        tokenizer = _in_thread(train_tokenizer, texts, vocab_size, num_pieces["train"], progress)
    eot_id = tokenizer.token_to_id(EOT)
    for split in SPLITS:
        pieces = _read_pieces(texts_path[split])
        splits[split]["tokens"] = write_shard(
            tokenizer, pieces, build_dir / splits[split]["file"], eot_id, num_pieces[split], progress
        )
    tokenizer.save(str(build_dir / TOKENIZER_FILE))
    shutil.rmtree(work_dir)

    files = [TOKENIZER_FILE] + [splits[split]["file"] for split in SPLITS]
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "sources": source_counts,
        "options": {
            "vocab_size": vocab_size if base_tokenizer is None else tokenizer.get_vocab_size(),
            "val_fraction": val_fraction,
            "dedup": dedup,
            "min_chars": min_chars,
            **({"tokenizer_from": str(tokenizer_from)} if tokenizer_from is not None else {}),
            **({"include": list(include)} if include else {}),
        },
        "documents": {"read": sum(s["documents"] for s in source_counts), **report},
        "splits": splits,
        "tokenizer": {"file": TOKENIZER_FILE, "vocab_size": tokenizer.get_vocab_size(), "eot": EOT, "eot_id": eot_id},
        "dtype": token_dtype(tokenizer.get_vocab_size()).name,
        "files": {name: sha256_file(build_dir / name) for name in files},
        "sizes": {name: (build_dir / name).stat().st_size for name in files},
    }
    (build_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


class _PendingDocument:
    """The pieces of the document being cleaned, held until the cleaner keeps or drops it: in memory while
    it is one piece (nearly every document), in a spool file beyond that, so a long one costs no memory."""

    def __init__(self, spool_path: Path):
        self._spool_path = spool_path
        self._spool = None
        self.start()

    def start(self) -> None:
        """Forget the pieces held so far and wait for the next document's."""
        self.close()
        self._first = ""
        self.sha256 = hashlib.sha256()  # of the whole text, for its split
        self.num_bytes = self.num_pieces = 0

    def add(self, piece: str) -> None:
        self.sha256.update(encoded := piece.encode("utf-8"))
        self.num_bytes += len(encoded)
        self.num_pieces += 1
        line = json.dumps([self.num_pieces == 1, piece], ensure_ascii=False) + "\n"
        if self.num_pieces == 1:
            self._first = line
            return
        if self._spool is None:
            self._spool = open(self._spool_path, "w+", encoding="utf-8")
            self._spool.write(self._first)
        self._spool.write(line)

    def close(self) -> None:
        if self._spool is not None:
            self._spool.close()
            self._spool = None

    def move_to(self, out) -> None:
        """Append the document's lines to `out`."""
        if self._spool is None:
            out.write(self._first)
        else:
            self._spool.seek(0)
            shutil.copyfileobj(self._spool, out)
        self.start()


def _in_thread(function: Callable, *args):
    """function(*args), run in a daemon thread while this one waits, so that a stop signal is handled at once.

    Python runs signal handlers in the main thread between bytecodes only, and the BPE trainer's
    Rust code does not come back for tens of seconds on a large corpus. After a signal the
    exception propagates here (prepare deletes its temporary folder) and the trainer is left to
    die with the process.
    """
    outcome = {}

    def run() -> None:
        try:
            outcome["value"] = function(*args)
        except BaseException as err:  # handed to the waiting thread, which raises it
            outcome["error"] = err

    thread = threading.Thread(target=run, name=f"keel-{function.__name__}", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.1)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _read_pieces(path: Path) -> Iterator[tuple[bool, str]]:
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            starts_document, text = json.loads(line)
            yield starts_document, text


def fsync(path: Path) -> None:
    """Flush a file, or a folder's entries, to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _move_into_place(build_dir: Path, out_dir: Path) -> None:
    """Move the finished build to `out_dir`; in an existing keel data directory replace only the files keel wrote.

    Other files there stay. The new manifest is moved last and the old files it no longer lists
    are removed before it, so a half-done replacement still has the old manifest, whose sha256
    sums refuse the new files at the next open, and a second `--force` can finish the job.
    Stop signals wait for the few renames.
    """
    if not out_dir.exists():
        build_dir.rename(out_dir)
        return
    with _signals_held():
        old_names = _replaceable_files(out_dir)  # again: the folder may have changed while prepare ran
        new_names = {path.name for path in build_dir.iterdir()}
        taken = sorted(name for name in new_names - old_names if os.path.lexists(out_dir / name))
        if taken:
            raise UserError(
                f"{out_dir / taken[0]} was not written by keel prepare and would be overwritten; "
                "move it away or choose another --out"
            )
        for name in new_names - {MANIFEST_FILE}:
            os.replace(build_dir / name, out_dir / name)
        for name in old_names - new_names:
            (out_dir / name).unlink(missing_ok=True)
        os.replace(build_dir / MANIFEST_FILE, out_dir / MANIFEST_FILE)
        fsync(out_dir)
        build_dir.rmdir()


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block is done, then raise them again for their usual handlers.

    Blocking them with pthread_sigmask would not do: a signal delivered to another thread (tqdm's
    monitor) still runs its Python handler in this one.
    """
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    received = []
    previous = {signum: signal.signal(signum, lambda signum, _: received.append(signum)) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in received:
            signal.raise_signal(signum)
