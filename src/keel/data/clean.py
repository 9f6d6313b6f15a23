"""Turn raw documents into clean, unique text and keep count of everything dropped, and why.

A document is dropped when it is binary (NUL bytes), not UTF-8, shorter than `min_chars`
(after stripping whitespace), an exact copy of an earlier document, or — with
`dedup="minhash"` — a near copy of one. The counts and a few example origins per reason go
into the data manifest so `keel prepare` can tell the user what it skipped.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field

DEDUP_MODES = ("exact", "minhash", "none")
SKIP_REASONS = ("binary", "not_utf8", "too_short", "duplicate", "near_duplicate")
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
        # 16-byte digests: collisions are out of reach and the set stays small (one per kept document).
        self._digests: set[bytes] = set()
        self._near = NearDuplicateIndex() if dedup == "minhash" else None

    def clean(self, origin: str, content: str | bytes) -> str | None:
        """The cleaned text of one document, or None if it is dropped (and counted)."""
        if isinstance(content, bytes):
            if b"\0" in content:
                return self._skip("binary", origin)
            try:
                content = content.decode("utf-8-sig")  # -sig drops a byte-order mark, which is not text
            except UnicodeDecodeError:
                return self._skip("not_utf8", origin)
        text = content.replace("\r\n", "\n").replace("\r", "\n")
        if len(text.strip()) < self.min_chars:
            return self._skip("too_short", origin)
        try:
            encoded = text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates from a JSON "\ud800" escape
            return self._skip("not_utf8", origin)
        if self.dedup != "none":
            digest = hashlib.blake2b(encoded, digest_size=16).digest()
            if digest in self._digests:
                return self._skip("duplicate", origin)
            self._digests.add(digest)
        if self._near is not None and self._near.seen(text):
            return self._skip("near_duplicate", origin)
        self.num_kept += 1
        return text

    @property
    def num_unreadable(self) -> int:
        """Documents dropped because they are not text at all."""
        return self.skipped["binary"].count + self.skipped["not_utf8"].count

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


class NearDuplicateIndex:
    """MinHash LSH over word 5-gram shingles: answers "have I seen a near copy of this text?"."""

    def __init__(self):
        from datasketch import MinHashLSH  # imported here: only minhash dedup needs it

        self._lsh = MinHashLSH(threshold=MINHASH_THRESHOLD, num_perm=MINHASH_NUM_PERM)
        self._num_inserted = 0

    def seen(self, text: str) -> bool:
        """True if a near copy was seen before; otherwise remember this text and return False."""
        from datasketch import MinHash

        words = text.split()
        n = min(SHINGLE_WORDS, len(words))
        shingles = list({" ".join(words[i : i + n]).encode() for i in range(len(words) - n + 1)})
        signature = MinHash(num_perm=MINHASH_NUM_PERM)
        for start in range(0, len(shingles), MINHASH_SLICE):
            signature.update_batch(shingles[start : start + MINHASH_SLICE])
        if self._lsh.query(signature):
            return True
        self._lsh.insert(str(self._num_inserted), signature)
        self._num_inserted += 1
        return False
