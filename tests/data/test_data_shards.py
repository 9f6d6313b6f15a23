"""Reading a DATA_DIR and the batch sampler's determinism contract."""

import json
import os
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from keel.data import eval_batches, get_batch, open_data, prepare, shards
from keel.data.shards import sha256_file
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


@pytest.fixture
def copy(data_dir, tmp_path) -> Path:
    """A private copy of the data dir, without the stamp of earlier opens."""
    copy = tmp_path / "copy"
    shutil.copytree(data_dir, copy, ignore=shutil.ignore_patterns(".verified.json"))
    return copy


@pytest.fixture
def hashes(monkeypatch) -> list[str]:
    """Names of the files verify_files hashes, in order."""
    hashed = []

    def counting_sha256_file(path):
        hashed.append(Path(path).name)
        return sha256_file(path)

    monkeypatch.setattr(shards, "sha256_file", counting_sha256_file)
    return hashed


def test_a_flipped_bit_is_refused_at_open(copy):
    tokens = bytearray((copy / "val.bin").read_bytes())
    tokens[10] ^= 1  # one flipped bit
    (copy / "val.bin").write_bytes(tokens)
    with pytest.raises(UserError, match=f"{copy / 'val.bin'} is corrupted .*; re-create {copy} with keel prepare"):
        open_data(copy)


def test_a_file_cut_by_one_byte_is_refused(copy):
    open_data(copy)  # verified once, so the stamp has an entry for it
    with open(copy / "train.bin", "r+b") as f:
        f.truncate((copy / "train.bin").stat().st_size - 1)
    with pytest.raises(UserError, match=f"{copy / 'train.bin'} is .* bytes where the manifest says .*cut short"):
        open_data(copy)


def test_an_overwrite_of_the_same_size_is_refused_even_with_its_mtime_put_back(copy, hashes):
    open_data(copy)
    path = copy / "train.bin"
    before = path.stat()
    tokens = bytearray(path.read_bytes())
    tokens[-1] ^= 1
    path.write_bytes(tokens)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size and path.stat().st_mtime_ns == before.st_mtime_ns
    with pytest.raises(UserError, match=f"{path} is corrupted"):
        open_data(copy)


def test_a_second_open_only_stats(copy, hashes):
    open_data(copy)
    assert sorted(hashes) == ["tokenizer.json", "train.bin", "val.bin"]
    stamp = json.loads((copy / ".verified.json").read_text())
    assert sorted(stamp) == sorted(hashes) and stamp["train.bin"]["size"] == (copy / "train.bin").stat().st_size
    hashes.clear()
    assert open_data(copy).vocab_size == 400
    assert hashes == []
    (copy / "val.bin").write_bytes((copy / "val.bin").read_bytes())  # same bytes, new ctime: hashed again
    open_data(copy)
    assert hashes == ["val.bin"]


def test_a_data_dir_that_cannot_hold_the_stamp_keeps_it_under_keel_home(copy, hashes, keel_home):
    # A folder where the stamp should be stands for a read-only data dir (root can write anywhere).
    (copy / ".verified.json").mkdir()
    open_data(copy)
    [stamp] = (keel_home / "verified").iterdir()
    assert sorted(json.loads(stamp.read_text())) == ["tokenizer.json", "train.bin", "val.bin"]
    hashes.clear()
    open_data(copy)
    assert hashes == []


def test_a_missing_tokenizer_is_refused(copy):
    (copy / "tokenizer.json").unlink()
    with pytest.raises(UserError, match=f"{copy / 'tokenizer.json'} is missing; re-create {copy} with keel prepare"):
        open_data(copy)


OUTSIDE = ", which is not a file of its own directory"


def edit_manifest(data_dir: Path, edit) -> None:
    manifest = json.loads((data_dir / "manifest.json").read_text())
    edit(manifest)
    (data_dir / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda m: m.pop("splits"), "no splits"),
        (lambda m: m["splits"]["val"].pop("file"), "no splits.val.file"),
        (lambda m: m["tokenizer"].update(vocab_size="400"), "tokenizer.vocab_size is not int"),
        (lambda m: m.update(dtype="float64"), "dtype is 'float64', not one of uint16, uint32"),
        (lambda m: m.update(files=["train.bin"]), "files is not dict"),
        (lambda m: m["files"].pop("tokenizer.json"), "files has no sha256 of tokenizer.json"),
        (lambda m: m["splits"]["train"].update(file="../train.bin"), f"it names '../train.bin'{OUTSIDE}"),
        (lambda m: m["files"].update({"/etc/passwd": "0" * 64}), f"it names '/etc/passwd'{OUTSIDE}"),
    ],
)
def test_a_damaged_manifest_is_refused_with_one_sentence(copy, edit, problem):
    edit_manifest(copy, edit)
    with pytest.raises(UserError) as error:
        open_data(copy)
    assert str(error.value) == (
        f"{copy / 'manifest.json'} is damaged ({problem}); re-create {copy} with keel prepare --force"
    )


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "\xff\xfe"])
def test_a_manifest_that_is_not_a_json_object_is_refused(copy, text):
    (copy / "manifest.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(UserError, match=f"{copy / 'manifest.json'} is damaged \\(not a JSON object\\); re-create"):
        open_data(copy)


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
    # Evaluation takes the windows a short split has, in one batch smaller than batch_size.
    (x, y), *rest = eval_batches(tokens, context_length, 8, num_batches=2, split_name=name)
    assert not rest and x.shape == (((len(tokens) - 1) // context_length), context_length)
    with pytest.raises(UserError, match=f"context_length {len(tokens)} is too long"):
        eval_batches(tokens, len(tokens), 8, num_batches=2, split_name=name)


def test_eval_batches_walk_the_split_from_the_start():
    positions = np.arange(105, dtype=np.int64)
    batches = list(eval_batches(positions, 10, 3, num_batches=5))
    # (105 - 1) // 10 = 10 windows make 3 full batches of 3 and a last one of 1: every window counts
    assert [len(x) for x, _ in batches] == [3, 3, 3, 1]
    starts = [row for x, _ in batches for row in x[:, 0].tolist()]
    assert starts == list(range(0, 100, 10))
    assert all(torch.equal(y, x + 1) for x, y in batches)
    assert len(list(eval_batches(positions, 10, 3, num_batches=2))) == 2
    again = list(eval_batches(positions, 10, 3, num_batches=2))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(again, batches))
