"""The byte-level BPE: exact round trip on Python source, the end-of-text token, save and load."""

import sysconfig
from pathlib import Path

import pytest

from keel.data.tokenizer import EOT, load_tokenizer, train_tokenizer
from keel.errors import UserError

STDLIB = Path(sysconfig.get_paths()["stdlib"])
TRAIN_FILES = ["textwrap.py", "shlex.py", "heapq.py", "string.py"]
# Text the tokenizer has not seen, with everything that must survive exactly: indentation by
# spaces and tabs, trailing spaces, blank lines, CRLF, non-ASCII, emoji, a literal "<|endoftext|>".
TRICKY = 'def f(x):\n\tif x:\n        return "Grüße, 東京 🐍"   \n\n\n\r\n    pass  # <|endoftext|> in a comment\n'


@pytest.fixture(scope="module")
def tokenizer():
    texts = [(STDLIB / name).read_text() for name in TRAIN_FILES]
    return train_tokenizer(texts, vocab_size=600, num_texts=len(texts), progress=False)


def test_vocab_and_eot(tokenizer):
    assert tokenizer.get_vocab_size() == 600
    assert tokenizer.token_to_id(EOT) == 0


@pytest.mark.parametrize("name", ["bisect.py", "colorsys.py", "tty.py", "textwrap.py"])
def test_round_trip_on_python_source(tokenizer, name):
    text = (STDLIB / name).read_text()
    ids = tokenizer.encode(text).ids
    assert tokenizer.decode(ids) == text
    assert len(ids) < 0.8 * len(text.encode())  # merges learned from code compress unseen code too


def test_round_trip_on_whitespace_and_unicode(tokenizer):
    ids = tokenizer.encode(TRICKY).ids
    assert tokenizer.decode(ids) == TRICKY
    assert tokenizer.token_to_id(EOT) not in ids  # the literal is text, not the separator


def test_save_and_load(tokenizer, tmp_path):
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(tmp_path)
    assert loaded.encode(TRICKY).ids == tokenizer.encode(TRICKY).ids
    assert loaded.decode(loaded.encode(TRICKY).ids) == TRICKY


def test_load_from_folder_without_tokenizer(tmp_path):
    with pytest.raises(
        UserError, match=f"{tmp_path} has no tokenizer.json; create the data directory with keel prepare"
    ):
        load_tokenizer(tmp_path)
