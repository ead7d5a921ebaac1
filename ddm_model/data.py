"""Image datasets with stable sample ids and a content fingerprint.

Every dataset is held as float32 images (N, C, H, W) in [-1, 1], int64 sample ids that never
change for a given source, and optional int64 class labels. ``fingerprint`` is a sha256 over
the shape, the ids, the pixels and the labels, so two machines can prove they hold the same
copy before one trains on an index list the other sent.

Sources: ``digits`` (scikit-learn's handwritten digits, shipped inside the package),
``fashion-mnist`` and ``fashion-mnist-test`` (Zalando's idx files, as Debian's
``dataset-fashion-mnist`` package installs them; ``fashion-mnist:FOLDER`` reads another copy), a
folder of images (one sub-folder per class optional) and an ``.npz`` file with an ``images``
array (and optional ``labels`` and ``ids``).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import DDMError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


class DataError(DDMError, ValueError):
    """A dataset that cannot be read as asked; the message says why and what to do."""


@dataclass
class ImageDataset:
    images: torch.Tensor  # float32 (N, C, H, W) in [-1, 1]
    ids: torch.Tensor  # int64 (N,), unique, stable for the source
    labels: torch.Tensor | None = None  # int64 (N,) in [0, num_classes)
    num_classes: int = 0
    name: str = "dataset"

    def __post_init__(self):
        if self.images.dim() != 4:
            raise DataError(f"images must be (N, C, H, W), got shape {tuple(self.images.shape)}")
        if self.ids.shape != (self.images.shape[0],):
            raise DataError(f"{self.images.shape[0]} images but {self.ids.shape[0]} ids")
        if torch.unique(self.ids).numel() != self.ids.numel():
            raise DataError("sample ids are not unique")
        if self.labels is not None and self.labels.shape != self.ids.shape:
            raise DataError(f"{self.images.shape[0]} images but {self.labels.shape[0]} labels")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.images.shape[2]

    def fingerprint(self) -> str:
        """sha256 over shape, ids, pixels (float32 little-endian) and labels.

        Computed afresh on every call (a dataset is mutable); callers keep the value.
        """
        h = hashlib.sha256(b"ddm-dataset-v1\0")
        h.update(np.asarray(self.images.shape, dtype="<i8").tobytes())
        h.update(self.ids.numpy().astype("<i8").tobytes())
        h.update(np.ascontiguousarray(self.images.numpy().astype("<f4")).tobytes())
        if self.labels is not None:
            h.update(b"labels\0")
            h.update(self.labels.numpy().astype("<i8").tobytes())
        return h.hexdigest()

    def positions(self, ids: torch.Tensor | np.ndarray | list[int]) -> torch.Tensor:
        """Row positions of the given sample ids; an unknown id is an error."""
        wanted = torch.as_tensor(np.asarray(ids, dtype=np.int64))
        order = torch.argsort(self.ids)
        sorted_ids = self.ids[order]
        where = torch.searchsorted(sorted_ids, wanted).clamp(max=len(self) - 1)
        found = sorted_ids[where] == wanted
        if not bool(found.all()):
            missing = wanted[~found][:5].tolist()
            raise DataError(f"sample ids not in dataset {self.name!r}: {missing}")
        return order[where]

    def subset(self, ids, name: str | None = None) -> ImageDataset:
        """A new dataset holding copies of only the given samples (nothing else reachable)."""
        rows = self.positions(ids)
        return ImageDataset(
            images=self.images[rows].clone(),
            ids=self.ids[rows].clone(),
            labels=None if self.labels is None else self.labels[rows].clone(),
            num_classes=self.num_classes,
            name=name or f"{self.name}[subset]",
        )

    def without_labels(self) -> ImageDataset:
        return ImageDataset(self.images, self.ids, None, 0, self.name)


def to_unit_range(pixels: np.ndarray, max_value: float) -> torch.Tensor:
    """(N, C, H, W) pixels in [0, max_value] -> float32 in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)) / max_value * 2.0 - 1.0


def resize(images: torch.Tensor, size: int | None) -> torch.Tensor:
    """Square-resize (N, C, H, W) images with antialiased bilinear interpolation."""
    if size is None or images.shape[-2:] == (size, size):
        return images
    if size < 1:
        raise DataError(f"image size must be positive, got {size}")
    out = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out.clamp(-1.0, 1.0)


# ---------------------------------------------------------------------------------------------
# Sources


def load_digits(labels: bool = True, image_size: int | None = None) -> ImageDataset:
    """scikit-learn's 1,797 handwritten digits, 8x8 grey levels 0..16, ten classes."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = resize(to_unit_range(bunch.images[:, None, :, :], 16.0), image_size)
    n = images.shape[0]
    return ImageDataset(
        images=images,
        ids=torch.arange(n, dtype=torch.int64),
        labels=torch.as_tensor(bunch.target, dtype=torch.int64) if labels else None,
        num_classes=10 if labels else 0,
        name="digits",
    )


FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
FASHION_MNIST_ENV = "DDM_FASHION_MNIST"
FASHION_MNIST_SOURCES = {"fashion-mnist": "train", "fashion-mnist-test": "test"}
_FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_FASHION_MNIST_FIRST_ID = {"train": 0, "test": 60_000}  # test ids follow the 60,000 train ids


def load_fashion_mnist(
    root: str | Path | None = None, split: str = "train", image_size: int | None = None, labels: bool = True
) -> ImageDataset:
    """Zalando's Fashion-MNIST: 28x28 grey pictures of ten kinds of clothing
    (``FASHION_MNIST_CLASSES``), 60,000 train images (ids 0..59,999) and 10,000 test images
    (ids 60,000..69,999).

    The idx files, gzipped or not, are read from ``root``, else the folder in
    $DDM_FASHION_MNIST, else /usr/share/datasets/fashion-mnist (``apt-get install
    dataset-fashion-mnist``).
    """
    if split not in _FASHION_MNIST_FILES:
        raise DataError(f"unknown Fashion-MNIST split {split!r}: use 'train' or 'test'")
    folder = Path(root or os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DIR)
    image_stem, label_stem = _FASHION_MNIST_FILES[split]
    image_path, label_path = _find_fashion_mnist_file(folder, image_stem), _find_fashion_mnist_file(folder, label_stem)
    raw = _read_idx(image_path, ndim=3)
    raw_labels = _read_idx(label_path, ndim=1)
    n = raw.shape[0]
    if raw.shape[1:] != (28, 28):
        raise DataError(f"{image_path} holds {raw.shape[1]}x{raw.shape[2]} images; Fashion-MNIST's are 28x28")
    if raw_labels.shape[0] != n:
        raise DataError(f"{image_path} holds {n} images but {label_path} holds {raw_labels.shape[0]} labels")
    if n and int(raw_labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise DataError(f"{label_path} holds label {int(raw_labels.max())}; Fashion-MNIST's labels are 0..9")
    first = _FASHION_MNIST_FIRST_ID[split]
    return ImageDataset(
        images=resize(to_unit_range(raw[:, None], 255.0), image_size),
        ids=torch.arange(first, first + n, dtype=torch.int64),
        labels=torch.from_numpy(raw_labels.astype(np.int64)) if labels else None,
        num_classes=len(FASHION_MNIST_CLASSES) if labels else 0,
        name="fashion-mnist" if split == "train" else "fashion-mnist-test",
    )


def _find_fashion_mnist_file(folder: Path, stem: str) -> Path:
    for path in (folder / stem, folder / f"{stem}.gz"):
        if path.is_file():
            return path
    files = ", ".join(f"{name}[.gz]" for pair in _FASHION_MNIST_FILES.values() for name in pair)
    raise DataError(
        f"Fashion-MNIST not found in {folder} (no {stem}[.gz]): install it with"
        f" 'apt-get install dataset-fashion-mnist' or point {FASHION_MNIST_ENV} (or fashion-mnist:FOLDER)"
        f" at a folder holding {files}"
    )


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """An idx file of unsigned bytes: a big-endian header (magic number 0x0800 + ndim, then one
    uint32 per dimension) and the bytes. ``.gz`` files are decompressed first."""
    try:
        data = path.read_bytes()
        if path.suffix == ".gz":
            data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read {path} ({exc}): the file is corrupt or truncated; fetch a fresh copy") from None
    magic = 0x0800 + ndim  # 2051 for images, 2049 for labels
    header = 4 * (1 + ndim)
    found = int.from_bytes(data[:4], "big") if len(data) >= 4 else None
    if found != magic:
        raise DataError(
            f"{path} is not an idx file of {ndim}-dimensional bytes (magic number {found}, expected {magic});"
            " fetch a fresh copy"
        )
    if len(data) < header:
        raise DataError(f"{path} is truncated inside its header; fetch a fresh copy")
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", ndim, 4))
    size = int(np.prod(dims))
    if len(data) - header != size:
        shape = "x".join(map(str, dims))
        raise DataError(
            f"{path} holds {len(data) - header} bytes after its header, but its {shape} header needs {size}:"
            " the file is truncated or corrupt; fetch a fresh copy"
        )
    return np.frombuffer(data, np.uint8, size, header).reshape(dims)


def load_image_folder(
    path: str | Path, image_size: int | None = None, channels: int | None = None, labels: bool = True
) -> ImageDataset:
    """Every image under ``path``, sorted by relative path (which fixes the ids).

    If the folder holds only sub-folders of images, each sub-folder is a class (sorted by
    name). ``channels`` forces 1 (grey) or 3 (RGB); by default RGB unless every image is
    grey. Images of different sizes need ``image_size``.
    """
    from PIL import Image, UnidentifiedImageError

    root = Path(path)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist or is not a folder")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"image folder {root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    if channels not in (None, 1, 3):
        raise DataError(f"channels must be 1 or 3, got {channels}")

    loaded = []
    for file in files:
        try:
            with Image.open(file) as img:
                img.load()
                loaded.append(img.copy())
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"cannot read image {file}: {exc}") from None
    if channels is None:
        channels = 1 if all(img.mode in ("L", "1", "I", "I;16", "F") for img in loaded) else 3
    mode = "L" if channels == 1 else "RGB"

    arrays = []
    for file, img in zip(files, loaded, strict=True):
        img = img.convert(mode)
        if image_size is not None:
            img = img.resize((image_size, image_size), Image.Resampling.BICUBIC)
        elif img.size != loaded[0].size:
            raise DataError(
                f"images have different sizes ({files[0].relative_to(root)} is {loaded[0].size[0]}x{loaded[0].size[1]},"
                f" {file.relative_to(root)} is {img.size[0]}x{img.size[1]}); pass an image size to resize them"
            )
        if img.size[0] != img.size[1]:
            raise DataError(f"image {file.relative_to(root)} is not square; pass an image size to resize it")
        array = np.asarray(img, dtype=np.uint8)
        arrays.append(array[None] if channels == 1 else array.transpose(2, 0, 1))
    images = to_unit_range(np.stack(arrays), 255.0)

    class_labels = None
    num_classes = 0
    parents = [f.relative_to(root).parent for f in files]
    if labels and all(len(p.parts) == 1 for p in parents):
        classes = sorted({p.parts[0] for p in parents})
        index = {c: i for i, c in enumerate(classes)}
        class_labels = torch.tensor([index[p.parts[0]] for p in parents], dtype=torch.int64)
        num_classes = len(classes)
    return ImageDataset(images, torch.arange(len(files), dtype=torch.int64), class_labels, num_classes, root.name)


def load_npz(path: str | Path, image_size: int | None = None, labels: bool = True) -> ImageDataset:
    """Arrays from an .npz: ``images`` (N, H, W), (N, H, W, C) or (N, C, H, W) with C in {1, 3},
    uint8 in [0, 255] or float in [0, 1] or [-1, 1]; optional ``labels`` (N,) and ``ids`` (N,).
    Nothing in the file is unpickled."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist")
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise DataError(f"{path} is not a readable .npz archive: {exc}") from None
    if not hasattr(archive, "files"):
        raise DataError(f"{path} is a single .npy array, not an .npz archive with an 'images' array")
    with archive:
        if "images" not in archive.files:
            raise DataError(f"{path} has no 'images' array (it holds: {', '.join(archive.files) or 'nothing'})")
        try:
            raw = archive["images"]
            raw_labels = archive["labels"] if labels and "labels" in archive.files else None
            raw_ids = archive["ids"] if "ids" in archive.files else None
        except ValueError as exc:
            raise DataError(f"{path} holds an array that needs pickle to read; refusing it ({exc})") from None

    images = _npz_images(raw, path)
    n = images.shape[0]
    ids = torch.arange(n, dtype=torch.int64)
    if raw_ids is not None:
        if raw_ids.shape != (n,) or not np.issubdtype(raw_ids.dtype, np.integer):
            raise DataError(f"{path}: 'ids' must be {n} integers, got {raw_ids.dtype} {raw_ids.shape}")
        ids = torch.as_tensor(raw_ids.astype(np.int64))
    class_labels, num_classes = None, 0
    if raw_labels is not None:
        if raw_labels.shape != (n,) or not np.issubdtype(raw_labels.dtype, np.integer) or (raw_labels < 0).any():
            raise DataError(
                f"{path}: 'labels' must be {n} non-negative integers, got {raw_labels.dtype} {raw_labels.shape}"
            )
        class_labels = torch.as_tensor(raw_labels.astype(np.int64))
        num_classes = int(class_labels.max()) + 1 if n else 0
    return ImageDataset(resize(images, image_size), ids, class_labels, num_classes, path.stem)


def _npz_images(raw: np.ndarray, path: Path) -> torch.Tensor:
    if raw.ndim == 3:
        raw = raw[:, None]
    elif raw.ndim == 4 and raw.shape[1] not in (1, 3) and raw.shape[3] in (1, 3):
        raw = raw.transpose(0, 3, 1, 2)
    if raw.ndim != 4 or raw.shape[1] not in (1, 3) or raw.shape[0] == 0:
        raise DataError(
            f"{path}: 'images' must be (N, H, W), (N, H, W, C) or (N, C, H, W) with C 1 or 3 and N > 0,"
            f" got shape {raw.shape}"
        )
    if raw.shape[2] != raw.shape[3]:
        raise DataError(f"{path}: images are {raw.shape[2]}x{raw.shape[3]}; only square images are supported")
    if raw.dtype == np.uint8:
        return to_unit_range(raw, 255.0)
    if not np.issubdtype(raw.dtype, np.floating):
        raise DataError(f"{path}: 'images' must be uint8 or floating point, got {raw.dtype}")
    if not np.isfinite(raw).all():
        raise DataError(f"{path}: 'images' holds NaN or infinite values")
    low, high = float(raw.min()), float(raw.max())
    if low >= 0.0 and high <= 1.0:
        return to_unit_range(raw, 1.0)
    if low >= -1.0 and high <= 1.0:
        return torch.from_numpy(np.ascontiguousarray(raw, dtype=np.float32))
    raise DataError(f"{path}: float 'images' must lie in [0, 1] or [-1, 1], found [{low:g}, {high:g}]")


def load_dataset(source: str, image_size: int | None = None, labels: bool = True) -> ImageDataset:
    """``digits``, ``fashion-mnist`` or ``fashion-mnist-test`` (each optionally ``:FOLDER``, a
    folder holding the four idx files), a path to an ``.npz`` file, or a path to an image folder.

    The source string alone names the data, so a coordinator can store it and load it again."""
    if source == "digits":
        return load_digits(labels=labels, image_size=image_size)
    name, colon, folder = source.partition(":")
    if name in FASHION_MNIST_SOURCES:
        if colon and not folder:
            raise DataError(f"{source!r} names no folder: use {name} or {name}:FOLDER")
        return load_fashion_mnist(folder or None, FASHION_MNIST_SOURCES[name], image_size, labels)
    path = Path(source)
    if path.suffix.lower() == ".npz":
        return load_npz(path, image_size=image_size, labels=labels)
    if path.is_dir():
        return load_image_folder(path, image_size=image_size, labels=labels)
    raise DataError(
        f"unknown dataset {source!r}: use 'digits', 'fashion-mnist', 'fashion-mnist-test'"
        " (either one as NAME:FOLDER for another copy), an .npz file or an image folder"
    )


# ---------------------------------------------------------------------------------------------
# Dataset files: how a cluster's samples travel to an island (a "shard").

SHARD_FORMAT = "ddm.dataset/1"


def save_dataset_file(dataset: ImageDataset, path: str | Path) -> str:
    """Write images, ids and labels as safetensors with a JSON description; the bytes depend
    only on the dataset, so the file can be content-addressed. Returns the fingerprint."""
    from .tensorfile import write_tensor_file

    fingerprint = dataset.fingerprint()
    tensors = {"images": dataset.images.contiguous(), "ids": dataset.ids.contiguous()}
    if dataset.labels is not None:
        tensors["labels"] = dataset.labels.contiguous()
    meta = {
        "format": SHARD_FORMAT,
        "name": dataset.name,
        "num_classes": dataset.num_classes,
        "fingerprint": fingerprint,
    }
    write_tensor_file(path, tensors, meta)
    return fingerprint


def load_dataset_file(path: str | Path, expect_fingerprint: str | None = None) -> ImageDataset:
    """Read a dataset file, refusing one whose content does not match its own fingerprint
    (or the expected one)."""
    from .tensorfile import read_tensor_file

    meta, tensors = read_tensor_file(path, SHARD_FORMAT, "dataset", DataError)
    if not {"images", "ids"} <= set(tensors) <= {"images", "ids", "labels"}:
        raise DataError(f"{path} holds arrays {sorted(tensors)}, expected images, ids and optional labels")
    if tensors["images"].dtype != torch.float32 or tensors["ids"].dtype != torch.int64:
        raise DataError(f"{path}: images must be float32 and ids int64")
    if "labels" in tensors and tensors["labels"].dtype != torch.int64:
        raise DataError(f"{path}: labels must be int64")
    num_classes = meta.get("num_classes", 0)
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 0:
        raise DataError(f"{path}: num_classes must be a non-negative integer")
    dataset = ImageDataset(
        tensors["images"], tensors["ids"], tensors.get("labels"), num_classes, str(meta.get("name", "dataset"))
    )
    actual = dataset.fingerprint()
    if actual != meta.get("fingerprint"):
        raise DataError(f"{path}: content does not match the fingerprint in its header")
    if expect_fingerprint is not None and actual != expect_fingerprint:
        raise DataError(f"{path}: dataset fingerprint {actual} differs from the expected {expect_fingerprint}")
    return dataset
