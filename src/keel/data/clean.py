"""Turn raw documents into clean, unique text and keep count of everything dropped, and why.

A document is dropped when it is binary (NUL bytes), not UTF-8, unreadable (a dangling or
looping symlink, a file keel may not open), shorter than `min_chars` (after stripping
whitespace), an exact copy of an earlier document, or -- with `dedup="minhash"` -- a near copy
of one. The counts and a few example origins per reason go into the data manifest so
`keel prepare` can tell the user what it skipped.

Memory does not grow with the length of a document: a file is read `READ_BYTES` at a time and
the text comes out in pieces of at most `PIECE_CHARS` characters, cut before a whitespace
character that precedes a non-space one. The byte-level pre-tokenizer splits text there anyway,
so the tokenizer learns and encodes exactly what it would from the whole document (only a run
of more than half a piece without such a boundary is cut where the piece is full). The exact
and near-duplicate checks are computed piece by piece and give the digests of the whole text.
"""

from __future__ import annotations

import codecs
import hashlib
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

DEDUP_MODES = ("exact", "minhash", "none")
SKIP_REASONS = ("binary", "not_utf8", "unreadable", "too_short", "duplicate", "near_duplicate")
NUM_EXAMPLES = 5

# Near-duplicate settings, as in the BigCode near-dedup of The Stack: Jaccard similarity of
# word 5-gram sets >= 0.85 means "the same document with small edits" (a changed line or
# header, a different licence year) while files that merely share boilerplate stay below it.
# 128 permutations estimate a Jaccard of 0.85 within about +-0.03 (standard error
# sqrt(J(1-J)/128)), precise enough for a 0.85 cut, at half the hashing cost of 256.
MINHASH_THRESHOLD = 0.85
MINHASH_NUM_PERM = 128
SHINGLE_WORDS = 5
# Hash shingles in slices so one huge document never builds a (shingles x num_perm) matrix at once.
MINHASH_SLICE = 4096
# 64 Ki characters: the tokenizer trainer buffers a few hundred texts at once, so pieces this
# size keep it within tens of MB; bigger pieces would not make the tokenizer faster.
PIECE_CHARS = 1 << 16
READ_BYTES = 1 << 20
# Where a piece may end: before a space, tab or newline that is followed by a non-space.
_LAST_BOUNDARY = re.compile(r"(?s).*[ \t\n](?=\S)")


@dataclass
class Skipped:
    """How many documents were dropped for one reason, with the first few origins as examples."""

    count: int = 0
    examples: list[str] = field(default_factory=list)


class Cleaner:
    """Cleans documents one at a time; remembers what it has seen to drop duplicates."""

    def __init__(self, min_chars: int, dedup: str):
        assert dedup in DEDUP_MODES
        self.min_chars = min_chars
        self.dedup = dedup
        self.skipped = {reason: Skipped() for reason in SKIP_REASONS}
        self.num_kept = 0
        self.kept = False  # whether the last document given to `pieces` was kept
        # 16-byte digests: collisions are out of reach and the set stays small (one per kept document).
        self._digests: set[bytes] = set()
        self._near = NearDuplicateIndex() if dedup == "minhash" else None

    def clean(self, origin: str, content: str | bytes | Path) -> str | None:
        """The cleaned text of one document held in memory, or None if it is dropped (and counted)."""
        text = "".join(self.pieces(origin, content))
        return text if self.kept else None

    def pieces(self, origin: str, content: str | bytes | Path) -> Iterator[str]:
        """The cleaned text of one document in pieces of at most PIECE_CHARS characters.

        `content` is a str, the raw bytes of a file, or a file's path (read in chunks). Whether
        the document is kept is known only at the end: once the iterator is exhausted,
        `self.kept` says so, and the pieces of a dropped document must be thrown away.
        """
        self.kept = False
        digest = hashlib.blake2b(digest_size=16)
        signature = self._near.signature() if self._near is not None else None
        stripped = _StrippedLength()
        try:
            for piece in _cut(_normalised(_decoded(content))):
                try:
                    encoded = piece.encode("utf-8")
                except UnicodeEncodeError:  # lone surrogates from a JSON "\ud800" escape
                    raise _Dropped("not_utf8") from None
                digest.update(encoded)
                stripped.update(piece)
                if signature is not None:
                    signature.update(piece)
                yield piece
        except _Dropped as dropped:
            self._skip(dropped.reason, origin)
            return
        if stripped.length < self.min_chars:
            self._skip("too_short", origin)
            return
        if self.dedup != "none":
            if digest.digest() in self._digests:
                self._skip("duplicate", origin)
                return
            self._digests.add(digest.digest())
        if self._near is not None and self._near.seen(signature):
            self._skip("near_duplicate", origin)
            return
        self.num_kept += 1
        self.kept = True

    @property
    def num_unreadable(self) -> int:
        """Documents dropped because they are not text at all."""
        return self.skipped["binary"].count + self.skipped["not_utf8"].count + self.skipped["unreadable"].count

    def report(self) -> dict:
        """Kept and skipped counts, as stored in the manifest."""
        return {
            "kept": self.num_kept,
            "skipped": {reason: asdict(skipped) for reason, skipped in self.skipped.items()},
        }

    def _skip(self, reason: str, origin: str) -> None:
        skipped = self.skipped[reason]
        skipped.count += 1
        if len(skipped.examples) < NUM_EXAMPLES:
            skipped.examples.append(origin)


class _Dropped(Exception):
    def __init__(self, reason: str):
        self.reason = reason


def _decoded(content: str | bytes | Path) -> Iterator[str]:
    """The text of `content` in chunks; _Dropped("binary" | "not_utf8" | "unreadable") if it is not text."""
    if isinstance(content, str):
        for start in range(0, len(content), READ_BYTES):
            yield content[start : start + READ_BYTES]
        return
    decoder = codecs.getincrementaldecoder("utf-8-sig")()  # -sig drops a byte-order mark, which is not text
    try:
        with _chunks(content) as chunks:
            for chunk in chunks:
                if b"\0" in chunk:
                    raise _Dropped("binary")
                try:
                    yield decoder.decode(chunk)
                except UnicodeDecodeError:
                    # A NUL byte further on still makes it binary, as for a file read whole.
                    raise _Dropped("binary" if any(b"\0" in rest for rest in chunks) else "not_utf8") from None
            try:
                yield decoder.decode(b"", final=True)
            except UnicodeDecodeError:
                raise _Dropped("not_utf8") from None
    except OSError:  # a dangling or looping symlink, no permission, a file gone since it was listed
        raise _Dropped("unreadable") from None


class _chunks:
    """Chunks of READ_BYTES of a file (or the one chunk of bytes in memory), as a context manager."""

    def __init__(self, content: bytes | Path):
        self._content = content
        self._file = None

    def __enter__(self) -> Iterator[bytes]:
        if isinstance(self._content, bytes):
            return iter([self._content])
        if not self._content.is_file():  # a FIFO would block the open, a device (/dev/zero) never end
            raise FileNotFoundError(f"{self._content} is not a regular file")
        self._file = open(self._content, "rb")
        return iter(lambda: self._file.read(READ_BYTES), b"")

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.close()


def _normalised(chunks: Iterator[str]) -> Iterator[str]:
    """Chunks with \\r\\n and lone \\r turned into \\n; a \\r at a chunk's end waits for the next chunk."""
    held = ""
    for chunk in chunks:
        chunk = held + chunk
        held = "\r" if chunk.endswith("\r") else ""
        chunk = chunk[:-1] if held else chunk
        yield chunk.replace("\r\n", "\n").replace("\r", "\n")
    if held:
        yield "\n"


def _cut(chunks: Iterator[str]) -> Iterator[str]:
    """Text in pieces of at most PIECE_CHARS, cut where the pre-tokenizer splits anyway (see the module docstring).

    Where a piece ends depends only on the text since the previous cut, not on the chunks it came in.
    An empty text gives one empty piece, so an empty document that is kept still has one.
    """
    buffer, num_pieces = "", 0
    for chunk in chunks:
        buffer += chunk
        while len(buffer) > PIECE_CHARS:
            boundary = _LAST_BOUNDARY.match(buffer, PIECE_CHARS // 2, PIECE_CHARS + 1)
            end = boundary.end() - 1 if boundary else PIECE_CHARS
            yield buffer[:end]
            buffer, num_pieces = buffer[end:], num_pieces + 1
    if buffer or num_pieces == 0:
        yield buffer


class _StrippedLength:
    """len(text.strip()) of a text seen piece by piece."""

    def __init__(self):
        self.length = 0
        self._seen = 0  # characters so far
        self._first = None  # index of the first non-space character

    def update(self, piece: str) -> None:
        start = len(piece) - len(piece.lstrip())
        if start < len(piece):
            self._first = self._seen + start if self._first is None else self._first
            last = self._seen + len(piece.rstrip())
            self.length = last - self._first
        self._seen += len(piece)


class NearDuplicateIndex:
    """MinHash LSH over word 5-gram shingles: answers "have I seen a near copy of this text?"."""

    def __init__(self):
        from datasketch import MinHashLSH  # imported here: only minhash dedup needs it

        self._lsh = MinHashLSH(threshold=MINHASH_THRESHOLD, num_perm=MINHASH_NUM_PERM)
        self._num_inserted = 0

    def signature(self) -> _Signature:
        """An empty signature, to update with a document's pieces."""
        return _Signature()

    def seen(self, signature: _Signature) -> bool:
        """True if a near copy was seen before; otherwise remember this document and return False."""
        minhash = signature.finish()
        if self._lsh.query(minhash):
            return True
        self._lsh.insert(str(self._num_inserted), minhash)
        self._num_inserted += 1
        return False


class _Signature:
    """The MinHash of a text's set of word 5-grams (all its words as one shingle if it has fewer), piece by piece."""

    def __init__(self):
        from datasketch import MinHash

        self._minhash = MinHash(num_perm=MINHASH_NUM_PERM)
        self._words: list[str] = []  # the last words seen, which start shingles that end in the next piece
        self._num_shingles = 0

    def update(self, piece: str) -> None:
        # Pieces end before whitespace, so no word is split between two of them (but for hard cuts).
        words = self._words + piece.split()
        starts = range(len(words) - SHINGLE_WORDS + 1)
        shingles = list({" ".join(words[i : i + SHINGLE_WORDS]).encode() for i in starts})
        for start in range(0, len(shingles), MINHASH_SLICE):
            self._minhash.update_batch(shingles[start : start + MINHASH_SLICE])
        self._num_shingles += len(shingles)
        self._words = words[-(SHINGLE_WORDS - 1) :] if len(words) >= SHINGLE_WORDS else words

    def finish(self):
        if self._num_shingles == 0:  # fewer than SHINGLE_WORDS words in all: one shingle of all of them
            self._minhash.update(" ".join(self._words).encode())
        return self._minhash
