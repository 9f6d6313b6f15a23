"""Toy sanity tasks: `builtin:copy` and `builtin:reverse`, SFT examples of random symbols.

A model that cannot learn to copy a string it has just read has a broken setup, whatever its loss on
real text says; these tasks make that question cheap to ask (`keel doctor` asks it). Each example is
a plain prompt/completion pair:

    copy:     prompt "fbkhp>"   completion "fbkhp"
    reverse:  prompt "fbkhp<"   completion "phkbf"

8 symbols drawn uniformly from the 16 letters a-p; the separator (`>` or `<`) names the task, so
both sources can share one data directory. The length is fixed on purpose: a sanity task must be
easy, and with lengths varying from 4 to 12 a tiny model needed many times the steps
(docs/inspect.md has the figures). The prompt is masked (SFT's usual template), so the
loss is only on the answer, which is fully determined by the prompt: a model that learns the task
drives it to zero. Random symbols are the point here: they are the task, not a stand-in for a corpus.

NUM_EXAMPLES examples per source, drawn from a generator seeded with SEED (and the task), so a
source is the same data on every machine; a symbol string drawn twice is kept once. The split
goes by the symbol string's hash (`split_of`), so a string held out for validation is held out
from both tasks.

Without `--tokenizer`, `keel prepare` gives the data its own tokenizer: a byte-level BPE with no
merges (each symbol one token: the 256 bytes, `<|endoftext|>`, then the chat markers), so a
model is scored symbol by symbol. With `--tokenizer DIR` the examples use that tokenizer instead
(to fine-tune a pretrained model on them).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from keel.data.chat import Template, plain_pieces
from keel.data.shards import split_of
from keel.data.tokenizer import MIN_VOCAB_SIZE, train_tokenizer

ALPHABET = "abcdefghijklmnop"
SEPARATORS = {"copy": ">", "reverse": "<"}
TOY_SOURCES = {"builtin:copy": "copy", "builtin:reverse": "reverse"}
NUM_SYMBOLS = 8
NUM_EXAMPLES = 10_000
SEED = 0


def toy_pair(task: str, symbols: str) -> tuple[str, str]:
    """(prompt, completion) of one example of `task` ("copy" or "reverse") on a string of symbols."""
    answer = symbols if task == "copy" else symbols[::-1]
    return symbols + SEPARATORS[task], answer


def symbol_strings(task: str, num: int = NUM_EXAMPLES, seed: int = SEED) -> list[str]:
    """`num` random symbol strings of `task`'s source, a pure function of (task, num, seed)."""
    task_id = list(SEPARATORS).index(task)
    draws = np.random.default_rng([seed, task_id]).integers(len(ALPHABET), size=(num, NUM_SYMBOLS))
    letters = np.array(list(ALPHABET))
    return ["".join(row) for row in letters[draws]]


def toy_examples(
    source: str, template: Template, val_fraction: float, skipped: Counter | None = None, seed: int = SEED
) -> Iterator:
    """The keel.data.examples.Example of builtin:copy or builtin:reverse; repeats are counted in `skipped`."""
    from keel.data.examples import Example  # imported here: examples imports this module

    skipped = Counter() if skipped is None else skipped
    task = TOY_SOURCES[source]
    seen = set()
    for number, symbols in enumerate(symbol_strings(task, seed=seed), start=1):
        if symbols in seen:
            skipped["duplicate"] += 1
            continue
        seen.add(symbols)
        prompt, completion = toy_pair(task, symbols)
        pieces = plain_pieces(template, prompt, completion)
        yield Example(f"{source}#{number}", split_of(symbols, val_fraction), [pieces])


def toy_tokenizer() -> Tokenizer:
    """A byte-level BPE without merges: every symbol is one token, and any text still encodes."""
    return train_tokenizer([ALPHABET + "".join(SEPARATORS.values())], MIN_VOCAB_SIZE, progress=False)


def toy_base(sources: list[str]):
    """The keel.data.examples.Base of toy sources prepared without --tokenizer: toy_tokenizer, default options."""
    from keel.data.examples import Base

    class ToyBase(Base):
        def tokenizer(self) -> Tokenizer:
            return toy_tokenizer()

    return ToyBase(Path(sources[0]), {}, None)
