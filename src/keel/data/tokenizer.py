"""Byte-level BPE: trained on the corpus with Hugging Face `tokenizers`, saved as tokenizer.json.

Byte-level means every string maps to tokens and back exactly (decode(encode(x)) == x),
including the tabs, runs of spaces and blank lines that carry meaning in Python source.
The one special token, `<|endoftext|>`, separates documents in the shards; it is only ever
inserted by id, so a document that happens to contain that literal string is encoded as
ordinary text.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from keel.errors import UserError

EOT = "<|endoftext|>"
SPECIAL_TOKENS = [EOT]
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # every byte, plus the special tokens
TOKENIZER_FILE = "tokenizer.json"


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, num_texts: int | None = None, progress: bool = True
) -> Tokenizer:
    """Train a byte-level BPE with `vocab_size` entries (fewer if the corpus runs out of merges)."""
    assert vocab_size >= MIN_VOCAB_SIZE, "prepare checks vocab_size before reading the corpus"
    tokenizer = Tokenizer(models.BPE())
    # add_prefix_space=False: a leading space would change the text and break the exact round trip.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,  # listed first, so <|endoftext|> gets id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen in the corpus or not
        show_progress=progress,
    )
    tokenizer.train_from_iterator(texts, trainer, length=num_texts)
    tokenizer.encode_special_tokens = True
    return tokenizer


def load_tokenizer(data_dir: Path) -> Tokenizer:
    """The tokenizer saved in DATA_DIR by `keel prepare`."""
    path = Path(data_dir) / TOKENIZER_FILE
    if not path.is_file():
        raise UserError(f"{data_dir} has no {TOKENIZER_FILE}; create the data directory with keel prepare")
    tokenizer = Tokenizer.from_file(str(path))
    # Not stored in tokenizer.json: without it a literal "<|endoftext|>" in text would become the separator id.
    tokenizer.encode_special_tokens = True
    return tokenizer
