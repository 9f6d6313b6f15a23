"""The image quality score on real data (sklearn's 8×8 digits): the classifier and its cache, FD and KID against
reference formulas, the reference rows' ordering, the memorisation check, and bad inputs."""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from keel.data.images import VERSION
from keel.data.shards import FORMAT
from keel.errors import UserError
from keel.tasks import image_quality as iq

QUICK = iq.ClassifierSettings(epochs=1)  # for the cache tests: they count retrainings, not accuracy


def write_image_dir(out: Path, train_images, train_labels, val_images, val_labels, num_classes: int) -> Path:
    """A prepared image directory in the agreed format (what `keel prepare` writes for images)."""
    out.mkdir(parents=True, exist_ok=True)
    arrays = {"train_images": train_images, "train_labels": train_labels, "val_images": val_images}
    arrays["val_labels"] = val_labels
    files = {}
    for name, array in arrays.items():
        np.save(out / f"{name}.npy", np.ascontiguousarray(array), allow_pickle=False)
        files[f"{name}.npy"] = hashlib.sha256((out / f"{name}.npy").read_bytes()).hexdigest()
    channels, height, width = train_images.shape[1:]
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "kind": "images",
        "channels": channels,
        "height": height,
        "width": width,
        "num_classes": num_classes,
        "class_names": [str(c) for c in range(num_classes)],
        "splits": {"train": {"images": len(train_images)}, "val": {"images": len(val_images)}},
        "files": files,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return out


def digits_arrays():
    """sklearn's 1,797 digits (values 0..16) as uint8 (N, 1, 8, 8) in 0..255, 20% held out at random."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images * 255 / 16).round().astype(np.uint8)[:, None]
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(images))
    val, train = order[:360], order[360:]
    return images[train], labels[train], images[val], labels[val]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # other agents share the machine; and one thread count keeps training bit-exact
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    return write_image_dir(tmp_path_factory.mktemp("digits") / "data", *digits_arrays(), num_classes=10)


@pytest.fixture(scope="module")
def scorer(digits) -> iq.QualityScorer:
    return iq.QualityScorer(digits)


@pytest.fixture(scope="module")
def rows(scorer) -> dict:
    return scorer.reference_rows(300, seed=0)


def test_classifier_is_accurate_and_cached_with_its_checksum(digits, scorer):
    classifier = scorer.classifier
    assert classifier.trained
    assert classifier.val_accuracy >= 0.97  # 99% when written (on this split, seed 0)
    info = json.loads((digits / "quality" / iq.INFO_FILE).read_text())
    assert info["weights_sha256"] == hashlib.sha256((digits / "quality" / iq.WEIGHTS_FILE).read_bytes()).hexdigest()
    assert info["data_identity"] == hashlib.sha256((digits / "manifest.json").read_bytes()).hexdigest()
    assert info["val_accuracy"] == classifier.val_accuracy
    assert info["settings"] == {**vars(iq.ClassifierSettings())}


def test_cache_is_reused_without_retraining(digits, scorer):
    weights = digits / "quality" / iq.WEIGHTS_FILE
    before = (weights.stat().st_mtime_ns, weights.read_bytes())
    again = iq.load_classifier(digits)
    assert not again.trained
    assert (weights.stat().st_mtime_ns, weights.read_bytes()) == before
    assert again.val_accuracy == scorer.classifier.val_accuracy
    for name, tensor in scorer.classifier.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[name], tensor), name


def test_damaged_or_foreign_cache_is_retrained_the_same(digits, tmp_path):
    first = iq.load_classifier(digits, QUICK, cache_dir=tmp_path / "a")
    assert first.trained and not iq.load_classifier(digits, QUICK, cache_dir=tmp_path / "a").trained
    sha = first.info["weights_sha256"]

    damaged = tmp_path / "damaged"
    shutil.copytree(tmp_path / "a", damaged)
    raw = bytearray((damaged / iq.WEIGHTS_FILE).read_bytes())
    raw[-5] ^= 0xFF  # a flipped bit in the last tensor: still loads, fails its checksum
    (damaged / iq.WEIGHTS_FILE).write_bytes(bytes(raw))
    retrained = iq.load_classifier(digits, QUICK, cache_dir=damaged)
    assert retrained.trained
    assert retrained.info["weights_sha256"] == sha  # seeded: the same weights again, bit for bit

    garbled = tmp_path / "garbled"
    shutil.copytree(tmp_path / "a", garbled)
    (garbled / iq.INFO_FILE).write_text("{not json")
    assert iq.load_classifier(digits, QUICK, cache_dir=garbled).trained

    other_settings = iq.ClassifierSettings(epochs=1, seed=1)
    assert iq.load_classifier(digits, other_settings, cache_dir=tmp_path / "a").trained


def test_changed_dataset_invalidates_the_cache(digits, tmp_path):
    iq.load_classifier(digits, QUICK, cache_dir=tmp_path / "cache")
    train_images, train_labels, val_images, val_labels = digits_arrays()
    train_images[0] = 255 - train_images[0]  # one image changed
    changed = write_image_dir(tmp_path / "changed", train_images, train_labels, val_images, val_labels, 10)
    assert iq.load_classifier(changed, QUICK, cache_dir=tmp_path / "cache").trained


def test_frechet_distance_matches_the_scipy_formula_and_closed_forms():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6))
    y = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6)) + 0.5
    mu1, s1 = x.mean(0), np.cov(x, rowvar=False)
    mu2, s2 = y.mean(0), np.cov(y, rowvar=False)
    reference = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert iq.frechet_distance(x, y) == pytest.approx(reference, rel=1e-9)
    assert iq.frechet_distance(y, x) == pytest.approx(reference, rel=1e-9)
    assert iq.frechet_distance(x[rng.permutation(len(x))], y) == pytest.approx(reference, rel=1e-9)
    assert iq.frechet_distance(x, x) == pytest.approx(0, abs=1e-9)
    # Diagonal Gaussians: |μ₁ − μ₂|² + Σ (√a − √b)².
    a, b = np.array([1.0, 4.0, 0.0]), np.array([9.0, 1.0, 2.0])
    exact = 1 + 1 + 0 + (1 - 3) ** 2 + (2 - 1) ** 2 + (0 - np.sqrt(2)) ** 2
    assert iq.frechet_from_stats(np.zeros(3), np.diag(a), np.array([1.0, 1.0, 0]), np.diag(b)) == pytest.approx(exact)
    # Singular covariances (one image repeated, a feature always 0) stay finite and non-negative.
    assert (
        np.isfinite(iq.frechet_distance(np.repeat(x[:1], 50, 0), x)) and iq.frechet_distance(x[:1].repeat(50, 0), x) > 0
    )


def test_kid_is_the_unbiased_mmd():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(30, 4)), rng.normal(size=(30, 4)) + 0.3
    kernel = lambda a, b: (a @ b / 4 + 1) ** 3  # noqa: E731
    m = len(x)
    naive = sum(kernel(x[i], x[j]) + kernel(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    naive -= 2 * sum(kernel(x[i], y[j]) for i in range(m) for j in range(m)) / m**2
    kid, std = iq.kernel_distance(x, y, num_subsets=1, subset_size=m)
    assert kid == pytest.approx(naive, rel=1e-9) and std == 0
    # Two draws of one distribution: ≈ 0 on average (unbiased), far below a shifted one.
    same = [iq.kernel_distance(rng.normal(size=(200, 4)), rng.normal(size=(200, 4)), 10, seed=s)[0] for s in range(5)]
    shifted = iq.kernel_distance(rng.normal(size=(200, 4)), rng.normal(size=(200, 4)) + 0.3, 10)[0]
    assert abs(np.mean(same)) < 0.1 * shifted


def test_reference_rows_rank_real_blur_means_noise(rows):
    fd = [rows[name]["frechet_distance"] for name in rows if not name.startswith("training")]
    assert list(rows)[:4] == [
        "real held-out (floor)",
        "blurred real (sigma 0.4 px)",
        "class mean images",
        "gaussian noise",
    ]
    assert fd == sorted(fd) and fd[0] < 0.5 * fd[1], fd
    floor, noise = rows["real held-out (floor)"], rows["gaussian noise"]
    assert abs(floor["kid"]) < 3 * floor["kid_std"]  # unbiased: real vs real is 0 within its noise
    assert noise["kid"] > 10 * noise["kid_std"]
    assert floor["class_accuracy"] >= 0.97 and noise["class_accuracy"] < 0.3
    assert rows["class mean images"]["class_accuracy"] == 1.0


def test_reference_rows_are_a_function_of_the_seed(scorer):
    a, b, c = scorer.reference_rows(40, seed=3), scorer.reference_rows(40, seed=3), scorer.reference_rows(40, seed=4)
    assert a == b and a != c


def test_memorisation_flags_copies_of_training_images_only(scorer, rows):
    assert rows["training images (copies)"]["copied_fraction"] == 1.0
    assert rows["training images (copies)"]["nearest_train_median"] == 0.0
    assert rows["real held-out (floor)"]["copied_fraction"] <= 0.05
    assert rows["gaussian noise"]["copied_fraction"] == 0.0
    train = np.asarray(scorer.data.train_images)
    jitter = np.random.default_rng(0).integers(-3, 4, size=train[:100].shape)
    near_copies = (train[:100] + jitter).clip(0, 255).astype(np.uint8)  # copies with invisible noise
    assert scorer.score(near_copies)["copied_fraction"] >= 0.95
    held_out = scorer.score(np.asarray(scorer.data.val_images)[:200])
    assert held_out["copied_fraction"] <= 0.05 and 0.8 < held_out["nearest_train_ratio"] < 1.25


def test_score_by_data_dir_reuses_the_cache_and_table_carries_the_caveat(digits, scorer, rows):
    samples, labels = np.array(scorer.data.val_images[:50]), np.array(scorer.data.val_labels[:50])
    result = iq.score(torch.from_numpy(samples), torch.from_numpy(labels), digits)
    assert result == scorer.score(samples, labels)
    assert set(result) >= {"frechet_distance", "kid", "kid_std", "class_accuracy", "copied_fraction"}
    table = iq.format_table({"samples": result, **rows}, scorer.classifier.val_accuracy)
    assert iq.CAVEAT in table and "gaussian noise" in table and "not comparable with published FIDs" in table


def test_bad_inputs_name_the_input_and_the_fix(scorer, tiny_data, tmp_path):
    val = np.asarray(scorer.data.val_images)[:50]
    cases = [
        (val.astype(np.float32) / 255, None, "samples have dtype float32; pass uint8"),
        (val[:, :, :7, :7], None, r"samples have shape \(50, 1, 7, 7\); pass \(N, 1, 8, 8\)"),
        (val[:, 0], None, "samples have shape"),
        (val[:5], None, "5 samples are too few to score; pass at least"),
        (val, np.zeros(49, dtype=np.int64), r"sample_labels have shape \(49,\)"),
        (val, np.zeros(50), "sample_labels .* dtype float64"),
        (val, np.full(50, 10), r"sample_labels hold classes 10..10; .* has classes 0..9"),
    ]
    for samples, labels, message in cases:
        with pytest.raises(UserError, match=message):
            scorer.score(samples, labels)
    with pytest.raises(UserError, match="reference rows need between"):
        scorer.reference_rows(361)
    train_images, _, val_images, _ = digits_arrays()
    unlabelled = write_image_dir(
        tmp_path / "unlabelled",
        train_images,
        np.full(len(train_images), -1),
        val_images,
        np.full(len(val_images), -1),
        0,
    )
    with pytest.raises(UserError, match="has no class labels"):
        iq.load_classifier(unlabelled)
    with pytest.raises(UserError, match="holds text data, not images"):
        iq.QualityScorer(tiny_data)
    with pytest.raises(UserError, match="is not a keel data directory; create it with keel prepare"):
        iq.QualityScorer(tmp_path / "missing")
