"""An honest quality score for generated images, without Inception weights (they cannot be downloaded here).

keel trains its own small convnet classifier on the training split of a prepared image directory, once per
dataset, and caches it beside the data (`DATA_DIR/quality/`). Samples (uint8, (N, C, H, W) like the data)
are then scored on four things:

- **Fréchet distance** (FD) between the classifier's features of the samples and of every training image:
  |μ₁ − μ₂|² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁^½ Σ₂ Σ₁^½)^½, in float64. The matrix square root goes through the
  symmetric PSD matrix Σ₁^½ Σ₂ Σ₁^½ and `eigh` rather than `scipy.linalg.sqrtm(Σ₁ Σ₂)`: the product Σ₁Σ₂ is
  not symmetric, sqrtm's Schur method returns complex parts and blows up when a covariance is singular (a
  set of identical images, ReLU features that are always 0), while eigenvalues of a symmetric matrix are
  stable; the tiny negative ones rounding leaves are clipped to 0.
- **KID**: the unbiased MMD² with the cubic kernel k(x, y) = (xᵀy/d + 1)³, averaged over random subsets
  of both sets, with its standard deviation over the subsets. Unbiased, so it is ≈ 0 (and may be
  slightly negative) for two draws of one distribution, at any sample count; FD is biased upwards at small
  N, which is why every row of a table is computed on the same number of images.
- **class accuracy**: the share of class-conditional samples the classifier puts in their class.
- **memorisation**: each sample's distance to its nearest training image in *pixel* space (RMS over
  pixels on the 0..1 scale), against the same for held-out real images. Pixel space because copying is
  a pixel-level fact: a copy is at distance 0 whatever the features say, while in feature space every
  well-drawn "7" lies near some training "7". `copied_fraction` is the share of samples nearer to a
  training image than the closest 1% of held-out real images are (≈ 0.01 for honest new images,
  ≈ 1 for copies).

`reference_rows` scores, the same way and on the same number of images, what brackets a generator:
held-out real images (the floor), blurred real images, each class's mean training image, and
Gaussian noise with the data's pixel mean and std, plus the training images themselves (FD cannot see
copying; the memorisation columns can). `format_table` prints them beside the samples.

The numbers live in the feature space of keel's own classifier, not Inception's, so they are not
comparable with published FIDs; they are comparable across runs on the same dataset (same cached
classifier, same N).

An unlabelled dataset (num_classes 0) is refused: the feature space *is* a classifier trained on the
labels, and an unsupervised stand-in (an autoencoder's code, say) would be another yardstick whose
rankings nobody has checked here. A score that ranks blur above real images is worse than none.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from keel.data.images import open_images
from keel.data.shards import sha256_file
from keel.errors import UserError
from keel.train.checkpoint import fsync

QUALITY_DIR = "quality"  # inside DATA_DIR, beside the data the classifier was trained on
WEIGHTS_FILE, INFO_FILE = "classifier.safetensors", "classifier.json"
CACHE_FORMAT = 1
MIN_SAMPLES = 20  # below this a 128-d covariance is mostly noise and KID subsets are tiny
CAVEAT = "feature space of keel's own classifier, not Inception: not comparable with published FIDs"


# -- the prepared image directory ------------------------------------------------------------------------------


@dataclass
class ImageData:
    """A prepared image directory: uint8 (N, C, H, W) arrays, int64 labels (−1 unlabelled), its manifest."""

    path: Path
    manifest: dict
    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray

    @property
    def num_classes(self) -> int:
        return int(self.manifest.get("num_classes", 0))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (int(self.manifest["channels"]), int(self.manifest["height"]), int(self.manifest["width"]))

    @property
    def identity(self) -> str:
        """sha256 of manifest.json, which lists every array's sha256 (as `runs.rundir.data_identity`)."""
        return hashlib.sha256((self.path / "manifest.json").read_bytes()).hexdigest()


def read_image_data(data_dir: str | Path) -> ImageData:
    """The image DATA_DIR `keel prepare` wrote, its files verified against their sha256 (`open_images`)."""
    data = open_images(Path(data_dir))
    return ImageData(
        data.path, data.manifest, data.images("train"), data.labels("train"), data.images("val"), data.labels("val")
    )


# -- the classifier whose features are the yardstick -------------------------------------------------------------


@dataclass(frozen=True)
class ClassifierSettings:
    """How the quality classifier is built and trained; a cache made with other settings is retrained."""

    width: int = 16  # channels of the first conv; the next two have 2x and 4x
    feature_dim: int = 128  # the feature vector FD and KID are computed on
    epochs: int = 8  # passes over the train split
    batch_size: int = 64
    lr: float = 3e-3  # AdamW peak, cosine to 0 after 5% warmup
    weight_decay: float = 1e-4
    max_shift: float = 0.08  # random translation, as a fraction of the image side (rounded down to pixels)
    blurred_share: float = 0.5  # of each batch, blurred with a sigma from 0.3x to 1x the blurred-real row's
    seed: int = 0


class FeatureClassifier(nn.Module):
    """Three 3×3 conv + batch-norm + ReLU blocks with two max-pools, a 4×4 average pool, a ReLU feature
    layer, then class logits. Batch norm is there for speed of training (without it the same epochs left
    MNIST underfitted); in eval mode it is a fixed affine map, so an image's features do not depend on the
    batch it is scored in."""

    def __init__(self, channels: int, num_classes: int, width: int = 16, feature_dim: int = 128) -> None:
        super().__init__()
        # Pixel statistics of the train split, set before training; stored with the weights.
        self.register_buffer("pixel_mean", torch.zeros(()))
        self.register_buffer("pixel_std", torch.ones(()))

        def block(num_in: int, num_out: int) -> list[nn.Module]:
            return [nn.Conv2d(num_in, num_out, 3, padding=1), nn.BatchNorm2d(num_out), nn.ReLU()]

        self.convs = nn.Sequential(
            *block(channels, width), nn.MaxPool2d(2),  # (B, w, H/2, W/2)
            *block(width, 2 * width), nn.MaxPool2d(2),  # (B, 2w, H/4, W/4)
            *block(2 * width, 4 * width),
            # A 4×4 grid rather than one global average keeps where the strokes are, which blur and noise
            # change; smaller maps (8×8 images) are repeated up to it.
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),  # (B, 64w)
        )  # fmt: skip
        self.to_features = nn.Sequential(nn.Linear(64 * width, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) uint8 → (B, feature_dim) float32."""
        x = (images.float() / 255 - self.pixel_mean) / self.pixel_std
        return self.to_features(self.convs(x))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))  # (B, num_classes)


@dataclass
class Classifier:
    model: FeatureClassifier  # in eval mode, on the CPU
    val_accuracy: float  # on the labelled val images
    info: dict  # what classifier.json holds: data identity, weights sha256, settings, accuracy, seconds
    trained: bool  # trained in this call (False: loaded from a cache that verified)


def load_classifier(
    data: str | Path | ImageData, settings: ClassifierSettings | None = None, cache_dir: str | Path | None = None
) -> Classifier:
    """The dataset's quality classifier: from the cache when it is for this data and these settings and its
    weights' sha256 verifies; otherwise trained (seeded: bit-exact on one machine at one thread count) and
    cached atomically."""
    data = data if isinstance(data, ImageData) else read_image_data(data)
    settings = settings or ClassifierSettings()
    if data.num_classes < 2:
        raise UserError(
            f"{data.path} has no class labels (num_classes {data.num_classes}), and keel's quality score is "
            "measured in the features of a classifier trained on them; score a labelled dataset instead."
        )
    cache = Path(cache_dir) if cache_dir is not None else data.path / QUALITY_DIR
    expected = {"format": CACHE_FORMAT, "data_identity": data.identity, "settings": dataclasses.asdict(settings)}
    if (cached := _load_cached(cache, expected, data)) is not None:
        return cached
    start = time.perf_counter()
    model = train_classifier(data, settings)
    seconds = time.perf_counter() - start
    accuracy = classifier_accuracy(model, data.val_images, data.val_labels)
    info = {**expected, "val_accuracy": accuracy, "train_seconds": round(seconds, 2), "torch": torch.__version__}
    info = _write_cache(cache, model, info)
    return Classifier(model, accuracy, info, trained=True)


def train_classifier(data: ImageData, settings: ClassifierSettings) -> FeatureClassifier:
    """AdamW with cross-entropy for a fixed number of epochs over the labelled train images; every random
    choice (init, order, shifts) comes from `settings.seed`."""
    labelled = np.flatnonzero(np.asarray(data.train_labels) >= 0)
    images = torch.from_numpy(np.asarray(data.train_images)[labelled])  # (N, C, H, W) uint8
    labels = torch.from_numpy(np.asarray(data.train_labels)[labelled]).long()
    channels, height, width = data.image_shape
    generator = torch.Generator().manual_seed(settings.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        model = FeatureClassifier(channels, data.num_classes, settings.width, settings.feature_dim)
    pixels = images.float() / 255
    model.pixel_mean.fill_(pixels.mean().item())
    model.pixel_std.fill_(pixels.std().item() + 1e-6)
    steps_per_epoch = math.ceil(len(images) / settings.batch_size)
    total = settings.epochs * steps_per_epoch
    warmup = max(1, total // 20)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * s / total)))
    )
    shift = int(settings.max_shift * min(height, width))
    max_blur = default_blur_sigma(height, width)
    model.train()
    for _ in range(settings.epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), settings.batch_size):
            index = order[start : start + settings.batch_size]
            batch = augment(images[index], shift, max_blur, settings.blurred_share, generator)
            loss = F.cross_entropy(model(batch), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def augment(
    images: torch.Tensor, shift: int, max_blur: float, blurred_share: float, generator: torch.Generator
) -> torch.Tensor:
    """Each image moved by up to `shift` pixels each way (the edge filled with zeros, the background), and a
    random `blurred_share` of them blurred with one sigma in [0.3, 1] × `max_blur`.

    The blur is there so that class accuracy asks "is this a 7?" and not "is this a crisp 7?": trained on
    crisp digits only, the classifier got many mildly blurred real MNIST digits wrong (docs/benchmarks.md),
    which counts softness twice: FD sees it anyway, blurred real images stay far above the floor in FD.
    """
    batch, _, height, width = images.shape
    if shift > 0:
        padded = F.pad(images, (shift, shift, shift, shift))
        offsets = torch.randint(0, 2 * shift + 1, (batch, 2), generator=generator).tolist()
        images = torch.stack([padded[i, :, dy : dy + height, dx : dx + width] for i, (dy, dx) in enumerate(offsets)])
    blurred = torch.rand(batch, generator=generator) < blurred_share
    sigma = max_blur * (0.3 + 0.7 * torch.rand((), generator=generator).item())
    if blurred.any():
        images = images.clone()
        images[blurred] = torch.from_numpy(gaussian_blur(images[blurred].numpy(), sigma))
    return images


@torch.no_grad()
def features_of(model: FeatureClassifier, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """(N, C, H, W) uint8 → (N, feature_dim) float64."""
    out = [
        model.features(torch.from_numpy(np.array(images[i : i + batch_size])))
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(out).double().numpy()


@torch.no_grad()
def predict(model: FeatureClassifier, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """(N, C, H, W) uint8 → (N,) predicted class."""
    out = [
        model(torch.from_numpy(np.array(images[i : i + batch_size]))).argmax(-1)
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(out).numpy()


def classifier_accuracy(model: FeatureClassifier, images: np.ndarray, labels: np.ndarray) -> float:
    labelled = np.flatnonzero(np.asarray(labels) >= 0)
    if len(labelled) == 0:
        return float("nan")
    return float((predict(model, np.asarray(images)[labelled]) == np.asarray(labels)[labelled]).mean())


def _load_cached(cache: Path, expected: dict, data: ImageData) -> Classifier | None:
    """The cached classifier if its info matches `expected` and its weights verify, else None (retrain)."""
    try:
        info = json.loads((cache / INFO_FILE).read_text())
        if any(info.get(key) != value for key, value in expected.items()):
            return None
        if sha256_file(cache / WEIGHTS_FILE) != info["weights_sha256"]:
            return None
        settings = ClassifierSettings(**info["settings"])
        model = FeatureClassifier(*data.image_shape[:1], data.num_classes, settings.width, settings.feature_dim)
        model.load_state_dict(load_file(cache / WEIGHTS_FILE))
    except (OSError, ValueError, KeyError, TypeError, RuntimeError):
        return None  # missing, unreadable or inconsistent: never trusted, retrained
    return Classifier(model.eval(), float(info["val_accuracy"]), info, trained=False)


def _write_cache(cache: Path, model: FeatureClassifier, info: dict) -> dict:
    """Weights then info, each to a temporary name, fsynced and renamed; the info names the weights' sha256,
    so a crash between the two renames leaves a cache that fails verification and is retrained."""
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp_weights = cache / f".{WEIGHTS_FILE}.{os.getpid()}.tmp"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_weights)
        fsync(tmp_weights)
        info = {**info, "weights_sha256": sha256_file(tmp_weights)}
        tmp_info = cache / f".{INFO_FILE}.{os.getpid()}.tmp"
        tmp_info.write_text(json.dumps(info, indent=1) + "\n")
        fsync(tmp_info)
        os.replace(tmp_weights, cache / WEIGHTS_FILE)
        os.replace(tmp_info, cache / INFO_FILE)
        fsync(cache)
    except OSError as e:
        raise UserError(f"cannot cache the quality classifier in {cache} ({e}); make it writable or pass cache_dir.")
    return info


# -- the distances ---------------------------------------------------------------------------------------------


def frechet_distance(x: np.ndarray, y: np.ndarray) -> float:
    """FD between Gaussians fitted to two feature sets (N, d) and (M, d); see the module docstring."""
    return frechet_from_stats(*gaussian_stats(x), *gaussian_stats(y))


def gaussian_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64)
    return x.mean(0), np.cov(x, rowvar=False)


def frechet_from_stats(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    root1 = _symmetric_sqrt(sigma1)
    inner = root1 @ sigma2 @ root1  # symmetric PSD, with the eigenvalues of Σ₁Σ₂
    eigenvalues = np.linalg.eigvalsh((inner + inner.T) / 2).clip(min=0)
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.sqrt(eigenvalues).sum()
    return max(float(value), 0.0)  # rounding can leave −1e-12 for identical sets


def _symmetric_sqrt(sigma: np.ndarray) -> np.ndarray:
    eigenvalues, vectors = np.linalg.eigh((sigma + sigma.T) / 2)
    return (vectors * np.sqrt(eigenvalues.clip(min=0))) @ vectors.T


def kernel_distance(
    x: np.ndarray, y: np.ndarray, num_subsets: int = 50, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """KID: mean and std over subsets of the unbiased MMD² with k(a, b) = (aᵀb/d + 1)³."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    m = min(subset_size, len(x), len(y))
    assert m >= 2, "KID needs at least two images in each set"
    rng = np.random.default_rng(seed)
    d = x.shape[1]
    values = []
    for _ in range(num_subsets):
        a = x[rng.choice(len(x), m, replace=False)]
        b = y[rng.choice(len(y), m, replace=False)]
        k_aa, k_bb, k_ab = (a @ a.T / d + 1) ** 3, (b @ b.T / d + 1) ** 3, (a @ b.T / d + 1) ** 3
        within = (k_aa.sum() - np.trace(k_aa) + k_bb.sum() - np.trace(k_bb)) / (m * (m - 1))  # i ≠ j only
        values.append(within - 2 * k_ab.mean())
    return float(np.mean(values)), float(np.std(values))


def nearest_distances(images: np.ndarray, reference: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """(N,) RMS pixel distance (0..1 scale) from each image to its nearest image in `reference`."""
    a = np.asarray(images).reshape(len(images), -1).astype(np.float64) / 255  # (N, D)
    best = np.full(len(a), np.inf)
    for start in range(0, len(reference), chunk):
        b = np.asarray(reference[start : start + chunk]).reshape(-1, a.shape[1]).astype(np.float64) / 255
        squared = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T  # (N, chunk)
        best = np.minimum(best, squared.min(1))
    return np.sqrt(best.clip(min=0) / a.shape[1])


def default_blur_sigma(height: int, width: int) -> float:
    """The blurred-real row's sigma in pixels: 1 px (a mild blur on MNIST's 28 px, where the issue's target is
    set), less on images under 20 px, where a pixel is a large share of the image: 0.4 px on 8×8 digits,
    which at 1 px are a smear the classifier scores as worse than noise."""
    return min(1.0, min(height, width) / 20)


def gaussian_blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """uint8 (N, C, H, W) blurred with a separable Gaussian of `sigma` pixels (radius 3σ, reflected edges)."""
    radius = max(1, math.ceil(3 * sigma))
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float64) / sigma) ** 2)
    taps = (taps / taps.sum()).float()
    x = torch.from_numpy(np.asarray(images)).float()
    channels = x.shape[1]
    x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, taps.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    x = F.conv2d(x, taps.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)
    return x.round().clamp(0, 255).to(torch.uint8).numpy()


# -- scores ----------------------------------------------------------------------------------------------------


class QualityScorer:
    """Everything a score compares against, computed once: the classifier, the training images' features
    and Gaussian statistics, and the held-out real images' nearest-training-image distances."""

    def __init__(
        self, data_dir: str | Path, settings: ClassifierSettings | None = None, cache_dir: str | Path | None = None
    ) -> None:
        self.data = read_image_data(data_dir)
        self.classifier = load_classifier(self.data, settings, cache_dir)
        self.train_features = features_of(self.classifier.model, self.data.train_images)  # (M, feature_dim)
        self.train_stats = gaussian_stats(self.train_features)
        self.heldout_nearest = nearest_distances(self.data.val_images, self.data.train_images)  # (V,)
        self.copy_threshold = float(np.percentile(self.heldout_nearest, 1))

    def score(self, samples, sample_labels=None, seed: int = 0) -> dict:
        """The scores of uint8 samples (N, C, H, W) against the training images; `sample_labels` (N,), the
        classes they were conditioned on, adds the class accuracy."""
        samples = self._check_samples(samples)
        labels = self._check_labels(sample_labels, len(samples))
        sample_features = features_of(self.classifier.model, samples)
        kid, kid_std = kernel_distance(sample_features, self.train_features, seed=seed)
        nearest = nearest_distances(samples, self.data.train_images)
        heldout_median = float(np.median(self.heldout_nearest))
        return {
            "num": len(samples),
            "frechet_distance": frechet_from_stats(*gaussian_stats(sample_features), *self.train_stats),
            "kid": kid,
            "kid_std": kid_std,
            "class_accuracy": None
            if labels is None
            else float((predict(self.classifier.model, samples) == labels).mean()),
            "nearest_train_median": float(np.median(nearest)),
            "nearest_train_median_heldout": heldout_median,
            "nearest_train_ratio": float(np.median(nearest)) / heldout_median if heldout_median > 0 else float("nan"),
            "copied_fraction": float((nearest <= self.copy_threshold).mean()),
        }

    def reference_rows(self, num: int, seed: int = 0, blur_sigma: float | None = None) -> dict[str, dict]:
        """The same scores, on `num` images each, for what brackets a generator (module docstring); a pure
        function of (data, num, seed). The blur defaults to `default_blur_sigma`."""
        data = self.data
        blur_sigma = default_blur_sigma(*data.image_shape[1:]) if blur_sigma is None else blur_sigma
        if not MIN_SAMPLES <= num <= len(data.val_images):
            raise UserError(
                f"reference rows need between {MIN_SAMPLES} and {len(data.val_images)} images (the val split of "
                f"{data.path}), not {num}; score that many samples."
            )
        rng = np.random.default_rng(seed)
        picked = np.sort(rng.choice(len(data.val_images), num, replace=False))
        real, labels = np.asarray(data.val_images)[picked], np.asarray(data.val_labels)[picked]
        train, train_labels = np.asarray(data.train_images), np.asarray(data.train_labels)
        class_means = np.stack([train[train_labels == c].mean(0) for c in range(data.num_classes)])
        class_means = class_means.round().astype(np.uint8)  # (K, C, H, W)
        pixels = train.astype(np.float64)
        noise = rng.normal(pixels.mean(), pixels.std(), size=real.shape).round().clip(0, 255).astype(np.uint8)
        copies = np.sort(rng.choice(len(train), num, replace=False))
        return {
            "real held-out (floor)": self.score(real, labels, seed),
            f"blurred real (sigma {blur_sigma:g} px)": self.score(gaussian_blur(real, blur_sigma), labels, seed),
            "class mean images": self.score(class_means[labels], labels, seed),
            "gaussian noise": self.score(noise, rng.integers(0, data.num_classes, num), seed),
            "training images (copies)": self.score(train[copies], train_labels[copies], seed),
        }

    def _check_samples(self, samples) -> np.ndarray:
        if isinstance(samples, torch.Tensor):
            samples = samples.detach().cpu().numpy()
        samples = np.asarray(samples)
        shape = self.data.image_shape
        if samples.dtype != np.uint8:
            raise UserError(
                f"samples have dtype {samples.dtype}; pass uint8 images in 0..255 like the data, "
                "e.g. (x.clamp(0, 1) * 255).round().to(torch.uint8)."
            )
        if samples.ndim != 4 or samples.shape[1:] != shape:
            raise UserError(
                f"samples have shape {samples.shape}; pass (N, {', '.join(map(str, shape))}) images, "
                f"the shape of {self.data.path}."
            )
        if len(samples) < MIN_SAMPLES:
            raise UserError(f"{len(samples)} samples are too few to score; pass at least {MIN_SAMPLES}.")
        return samples

    def _check_labels(self, labels, num: int) -> np.ndarray | None:
        if labels is None:
            return None
        if isinstance(labels, torch.Tensor):
            labels = labels.detach().cpu().numpy()
        labels = np.asarray(labels)
        if labels.shape != (num,) or not np.issubdtype(labels.dtype, np.integer):
            raise UserError(
                f"sample_labels have shape {labels.shape} and dtype {labels.dtype}; pass ({num},) integer classes, "
                "one per sample, or None for unconditional samples."
            )
        if labels.min() < 0 or labels.max() >= self.data.num_classes:
            raise UserError(
                f"sample_labels hold classes {labels.min()}..{labels.max()}; {self.data.path} has classes "
                f"0..{self.data.num_classes - 1}."
            )
        return labels


def score(samples, sample_labels, data_dir: str | Path, seed: int = 0) -> dict:
    """`QualityScorer(data_dir).score(samples, sample_labels, seed)`; build the scorer once to score often."""
    return QualityScorer(data_dir).score(samples, sample_labels, seed)


def reference_rows(data_dir: str | Path, num: int, seed: int = 0) -> dict[str, dict]:
    """`QualityScorer(data_dir).reference_rows(num, seed)`."""
    return QualityScorer(data_dir).reference_rows(num, seed)


# (heading, key in a score, format) of the table's columns
COLUMNS = [
    ("N", "num", "{:d}"),
    ("FD", "frechet_distance", "{:.2f}"),
    ("KID", "kid", "{:.2f}"),
    ("± std", "kid_std", "{:.2f}"),
    ("class acc", "class_accuracy", "{:.1%}"),
    ("NN-train", "nearest_train_median", "{:.3f}"),
    ("ratio", "nearest_train_ratio", "{:.2f}"),
    ("copied", "copied_fraction", "{:.1%}"),
]


def format_table(rows: dict[str, dict], classifier_accuracy: float | None = None) -> str:
    """The rows (samples first, then the references) as a text table, with the caveat on top."""
    lines = [f"image quality: {CAVEAT}"]
    if classifier_accuracy is not None:
        lines.append(f"classifier: {classifier_accuracy:.1%} of held-out real images in their class")
    name_width = max(len(name) for name in rows)
    cells = [[form.format(r[key]) if r[key] is not None else "-" for _, key, form in COLUMNS] for r in rows.values()]
    widths = [max(len(heading), *(len(row[i]) for row in cells)) for i, (heading, _, _) in enumerate(COLUMNS)]
    header = " ".join([" " * name_width, *(h.rjust(w) for (h, _, _), w in zip(COLUMNS, widths))])
    lines += [header, "-" * len(header)]
    for name, row in zip(rows, cells):
        lines.append(" ".join([name.ljust(name_width), *(cell.rjust(w) for cell, w in zip(row, widths))]))
    lines.append(
        "FD, KID: against the training images' features. NN-train: median RMS pixel distance (0..1) to the "
        "nearest training image; ratio: that over held-out real images' median; copied: share of images nearer "
        "to a training image than the closest 1% of held-out real images."
    )
    return "\n".join(lines)
