"""Reading a DATA_DIR and the batch sampler's determinism contract."""

import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from keel.data import eval_batches, get_batch, open_data, prepare
from keel.errors import UserError

STDLIB = Path(sysconfig.get_paths()["stdlib"])
MODULES = [
    "bisect.py",
    "colorsys.py",
    "copy.py",
    "fnmatch.py",
    "glob.py",
    "heapq.py",
    "numbers.py",
    "queue.py",
    "sched.py",
    "shlex.py",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    corpus = tmp_path_factory.mktemp("corpus")
    for name in MODULES:
        shutil.copy(STDLIB / name, corpus / name)
    out = tmp_path_factory.mktemp("data") / "stdlib"
    prepare([str(corpus)], out, vocab_size=400, val_fraction=0.3, progress=False)
    return out


def test_open_data_exposes_manifest_tokens_and_tokenizer(data_dir):
    data = open_data(data_dir)
    assert data.vocab_size == data.manifest["tokenizer"]["vocab_size"] == 400
    assert data.eot_id == 0
    for split in ("train", "val"):
        tokens = data.tokens(split)
        assert isinstance(tokens, np.memmap) and tokens.shape == (data.manifest["splits"][split]["tokens"],)
        assert tokens[0] == data.eot_id and tokens.max() < data.vocab_size
    assert data.tokenizer.decode(data.tokens("train")[1:40].tolist()) in "".join(
        (STDLIB / m).read_text() for m in MODULES
    )
    data.verify()


def test_open_data_on_a_folder_that_is_not_data(tmp_path):
    with pytest.raises(UserError, match=f"{tmp_path} is not a keel data directory; create it with keel prepare"):
        open_data(tmp_path)


def test_verify_names_a_corrupted_file(data_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(data_dir, copy)
    tokens = bytearray((copy / "val.bin").read_bytes())
    tokens[10] ^= 1  # one flipped bit
    (copy / "val.bin").write_bytes(tokens)
    with pytest.raises(UserError, match=f"{copy / 'val.bin'} is missing or corrupted"):
        open_data(copy).verify()


def test_get_batch_is_a_pure_function_of_its_arguments(data_dir):
    tokens = open_data(data_dir).tokens("train")
    x, y = get_batch(tokens, 32, 4, seed=1, index=3)
    assert x.shape == y.shape == (4, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
    get_batch(tokens, 32, 4, seed=1, index=500)  # other epochs in between must not change the answer
    again = get_batch(tokens, 32, 4, seed=1, index=3)
    assert torch.equal(again[0], x) and torch.equal(again[1], y)
    assert not torch.equal(get_batch(tokens, 32, 4, seed=1, index=4)[0], x)
    assert not torch.equal(get_batch(tokens, 32, 4, seed=2, index=3)[0], x)


def test_windows_do_not_repeat_within_an_epoch():
    # Token value = its position, so each batch row tells where its window starts.
    num_tokens, context_length, batch_size = 1003, 10, 7
    positions = np.arange(num_tokens, dtype=np.int64)
    num_windows = (num_tokens - context_length) // context_length  # 99: not a multiple of the batch size
    starts = []
    for index in range(3 * num_windows // batch_size + 1):
        x, y = get_batch(positions, context_length, batch_size, seed=0, index=index)
        assert torch.equal(y, x + 1)
        assert int(x.max()) + 1 < num_tokens  # every target exists
        starts += x[:, 0].tolist()
    for epoch in range(3):
        epoch_starts = starts[epoch * num_windows : (epoch + 1) * num_windows]
        assert len(set(epoch_starts)) == num_windows  # every window once
        assert len({s % context_length for s in epoch_starts}) == 1  # one offset per epoch, stride T
    offsets = {starts[e * num_windows] % context_length for e in range(3)}
    orders = [starts[e * num_windows : e * num_windows + 5] for e in range(3)]
    assert len(offsets) > 1 or orders[0] != orders[1]  # epochs are shuffled differently


def test_context_too_long_for_the_split(data_dir):
    data = open_data(data_dir)
    tokens = data.tokens("val")
    name = data.split_name("val")
    with pytest.raises(
        UserError, match=f"context_length {len(tokens)} is too long for {data_dir}'s val split \\({len(tokens)} tokens"
    ):
        get_batch(tokens, len(tokens), 1, seed=0, index=0, split_name=name)
    context_length = len(tokens) // 4
    with pytest.raises(UserError, match="lower model.context_length or train.batch_size, or prepare more data"):
        get_batch(tokens, context_length, 8, seed=0, index=0, split_name=name)
    with pytest.raises(UserError, match=f"context_length {context_length} is too long"):
        eval_batches(tokens, context_length, 8, num_batches=2, split_name=name)


def test_eval_batches_walk_the_split_from_the_start():
    positions = np.arange(105, dtype=np.int64)
    batches = list(eval_batches(positions, 10, 3, num_batches=5))
    assert len(batches) == 3  # (105 - 1) // 10 = 10 windows make 3 full batches of 3
    starts = [row for x, _ in batches for row in x[:, 0].tolist()]
    assert starts == list(range(0, 90, 10))
    assert all(torch.equal(y, x + 1) for x, y in batches)
    assert len(list(eval_batches(positions, 10, 3, num_batches=2))) == 2
    again = list(eval_batches(positions, 10, 3, num_batches=2))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(again, batches))
