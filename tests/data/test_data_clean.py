"""The cleaner reads files in chunks and hands out bounded pieces; what it decides must not depend on either."""

import sysconfig
from pathlib import Path

import numpy as np
import pytest

from keel.data import clean
from keel.data.clean import Cleaner, NearDuplicateIndex

STDLIB = Path(sysconfig.get_paths()["stdlib"])
TEXT = (STDLIB / "textwrap.py").read_text()


@pytest.fixture
def small_pieces(monkeypatch):
    monkeypatch.setattr(clean, "PIECE_CHARS", 300)
    monkeypatch.setattr(clean, "READ_BYTES", 97)


def test_pieces_are_bounded_and_join_to_the_cleaned_text(tmp_path, small_pieces):
    path = tmp_path / "notes.txt"
    path.write_bytes(("\ufeff" + TEXT.replace("\n", "\r\n") + "é" * 700).encode())
    cleaner = Cleaner(32, "exact")
    pieces = list(cleaner.pieces(str(path), path))
    assert cleaner.kept and max(map(len, pieces)) <= 300
    assert "".join(pieces) == TEXT + "é" * 700  # BOM dropped, CRLF split across chunks made \n
    # Each piece ends before whitespace, where the pre-tokenizer splits anyway, or is full (inside the run of é).
    assert all(len(p) == 300 or q[0] in " \t\n" for p, q in zip(pieces, pieces[1:]))


@pytest.mark.parametrize(
    ("tail", "reason"),
    [(b"\xff\xfe ok", "not_utf8"), (b"\xff then a NUL \0", "binary"), (b" \0", "binary")],
)
def test_a_bad_byte_far_into_a_file_drops_it(tmp_path, small_pieces, tail, reason):
    path = tmp_path / "data.txt"
    path.write_bytes(TEXT.encode() + tail)
    cleaner = Cleaner(32, "exact")
    assert cleaner.clean(str(path), path) is None
    assert cleaner.skipped[reason].count == 1 and not cleaner.kept


def test_too_short_counts_the_whole_text_not_one_piece(small_pieces):
    cleaner = Cleaner(min_chars=250, dedup="exact")
    text = " " * 1000 + "x" * 100 + " " * 1000 + "y" * 100 + " " * 1000
    assert cleaner.clean("a", text) == text  # 100 + 1000 + 100 characters between the ends
    assert cleaner.clean("b", " " * 1000 + "x" * 200 + " " * 1000) is None
    assert cleaner.skipped["too_short"].count == 1


def test_dedup_digests_do_not_depend_on_the_pieces(monkeypatch):
    whole = NearDuplicateIndex().signature()
    whole.update(TEXT)
    cleaner = Cleaner(32, "exact")
    assert cleaner.clean("whole", TEXT) == TEXT
    monkeypatch.setattr(clean, "PIECE_CHARS", 300)
    signature = NearDuplicateIndex().signature()
    for piece in clean._cut(iter([TEXT])):
        signature.update(piece)
    assert np.array_equal(signature.finish().hashvalues, whole.finish().hashvalues)
    assert cleaner.clean("cut", TEXT) is None and cleaner.skipped["duplicate"].examples == ["cut"]
