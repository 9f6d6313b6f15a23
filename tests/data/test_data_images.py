"""keel prepare on images: the agreed on-disk format, checksums, the stratified split and every bad input."""

import json

import numpy as np
import pytest
from conftest import assert_user_error, keel
from PIL import Image

from keel.data import prepare
from keel.data.images import open_images
from keel.data.shards import sha256_file
from keel.errors import UserError


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("images") / "digits"
    return out, prepare(["builtin:digits"], out, progress=False)


def test_builtin_digits_are_written_in_the_agreed_format(digits):
    out, manifest = digits
    assert manifest["kind"] == "images" and manifest["format"] == "keel-data"
    assert (manifest["channels"], manifest["height"], manifest["width"]) == (1, 8, 8)
    assert manifest["num_classes"] == 10 and manifest["class_names"] == [str(i) for i in range(10)]
    assert manifest["images"]["read"] == 1797 and manifest["images"]["skipped"] == {}
    sizes = {split: manifest["splits"][split]["images"] for split in ("train", "val")}
    assert sizes["train"] + sizes["val"] == 1797
    for split in ("train", "val"):
        images = np.load(out / f"{split}_images.npy", mmap_mode="r", allow_pickle=False)
        labels = np.load(out / f"{split}_labels.npy", mmap_mode="r", allow_pickle=False)
        assert images.dtype == np.uint8 and images.shape == (sizes[split], 1, 8, 8)
        assert labels.dtype == np.int64 and labels.shape == (sizes[split],)
        assert images.max() == 255 and images.min() == 0  # digits' 0..16 ink scaled to the full range
    for name, digest in manifest["files"].items():
        assert sha256_file(out / name) == digest
    assert json.loads((out / "manifest.json").read_text()) == manifest
    # stratified: every class gives about a tenth of its images to val
    val_per_class = manifest["splits"]["val"]["per_class"]
    assert all(17 <= n <= 19 for n in val_per_class), val_per_class


def test_the_split_is_deterministic_and_the_data_verified(digits, tmp_path):
    out, manifest = digits
    again = prepare(["builtin:digits"], tmp_path / "again", progress=False)
    assert again["files"] == manifest["files"]  # the same images always split the same way
    data = open_images(tmp_path / "again")
    assert data.shape == (1, 8, 8) and data.num_classes == 10
    images = np.load(tmp_path / "again" / "train_images.npy")
    images[0, 0, 0, 0] ^= 1
    np.save(tmp_path / "again" / "train_images.npy", images)
    with pytest.raises(UserError, match="train_images.npy is corrupted"):
        open_images(tmp_path / "again")


def _png(path, size=(6, 6), mode="L", value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, 0, 255 - value)).save(path)


def test_an_image_folder_takes_classes_from_subfolders_and_counts_corrupt_files(tmp_path):
    folder = tmp_path / "pictures"
    for i in range(6):
        _png(folder / "cats" / f"{i}.png", value=10 * i)
        _png(folder / "dogs" / f"{i}.jpg" if i % 2 else folder / "dogs" / f"{i}.png", value=200, mode="RGB")
    (folder / "dogs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "notes.txt").write_text("not an image, not counted")
    manifest = prepare([str(folder)], tmp_path / "data", val_fraction=0.34, progress=False)
    assert manifest["class_names"] == ["cats", "dogs"] and manifest["channels"] == 3  # a colour image makes RGB
    assert manifest["images"]["skipped"]["corrupt"]["count"] == 1
    assert manifest["images"]["skipped"]["corrupt"]["examples"] == [str(folder / "dogs" / "broken.png")]
    assert manifest["splits"]["val"]["per_class"] == [2, 2] and manifest["splits"]["train"]["per_class"] == [4, 4]
    data = open_images(tmp_path / "data")
    assert data.images("train").shape == (8, 3, 6, 6)
    assert sorted(set(data.labels("train").tolist())) == [0, 1]


def test_a_text_corpus_with_a_figure_stays_text(tmp_path):
    from keel.data.images import is_image_source

    assert is_image_source("builtin:mnist-5k")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "notes.md").write_text("some text")
    _png(corpus / "figure.png")
    assert not is_image_source(str(corpus))
    (corpus / "notes.md").unlink()
    assert is_image_source(str(corpus))


def test_an_unlabelled_folder_and_resizing(tmp_path):
    folder = tmp_path / "flat"
    for i in range(5):
        _png(folder / f"{i}.png", size=(6 + i, 4))
    manifest = prepare([str(folder)], tmp_path / "data", image_size=4, val_fraction=0.2, progress=False)
    assert manifest["num_classes"] == 0 and manifest["class_names"] == []
    assert (manifest["height"], manifest["width"]) == (4, 4)
    assert set(open_images(tmp_path / "data").labels("train").tolist()) == {-1}


def test_bad_image_inputs_are_one_sentence_and_leave_nothing_behind(tmp_path):
    empty = tmp_path / "empty"
    (empty / "cats").mkdir(parents=True)
    out = tmp_path / "out"
    # --image-size says the folder is meant to hold images
    assert_user_error(keel("prepare", str(empty), "--out", str(out), "--image-size", "8"), "no PNG or JPEG")
    mixed = tmp_path / "mixed"
    _png(mixed / "a" / "1.png", size=(8, 8))
    _png(mixed / "a" / "2.png", size=(8, 8))
    _png(mixed / "b" / "3.png", size=(10, 8))
    assert_user_error(keel("prepare", str(mixed), "--out", str(out)), "--image-size")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.png").write_bytes(b"garbage")
    assert_user_error(keel("prepare", str(broken), "--out", str(out)), "corrupt")
    assert_user_error(keel("prepare", "builtin:digits", "--out", str(out), "--vocab-size", "300"), "--vocab-size")
    assert not out.exists() and not list(tmp_path.glob(".out.*"))  # nothing half-written
    result = keel("prepare", str(mixed), "--out", str(out), "--image-size", "8", "--val-fraction", "0.4")
    assert result.returncode == 0, result.stderr
    assert "images 1x8x8" in result.stdout and "2 classes" in result.stdout
