"""Datasets: digits, Fashion-MNIST, image folders and .npz archives, stable ids, fingerprints, subsets.

Every error a user can cause must be a ``DataError`` whose message is one line.
"""

from __future__ import annotations

import gzip
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from ddm_model.data import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_ENV,
    DataError,
    ImageDataset,
    load_dataset,
    load_digits,
    load_fashion_mnist,
    load_image_folder,
    load_npz,
)
from ddm_model.errors import DDMError
from tests.helpers import one_line_error

# sha256 fingerprint of load_digits() as shipped today. Two machines compare this value before one
# trains on an index list the other sent, so it must not drift between releases.
DIGITS_FINGERPRINT = "ee3998968ce44677fa9afec33ac045c575348768dae9dce73a8ddc079a80e2f8"


def unit(value: float, max_value: float) -> float:
    """What the loaders map a pixel value to, computed the same way in float32."""
    return float(torch.tensor(value, dtype=torch.float32) / max_value * 2.0 - 1.0)


def small_dataset() -> ImageDataset:
    images = torch.linspace(-1, 1, 4 * 1 * 2 * 2).reshape(4, 1, 2, 2)
    return ImageDataset(images, torch.tensor([30, 10, 20, 40]), torch.tensor([0, 1, 2, 1]), 3, "small")


def save_png(path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


# ---------------------------------------------------------------------------------------------
# digits


def test_load_digits_shape_range_labels_and_ids(digits):
    from sklearn.datasets import load_digits as sklearn_digits

    assert digits.images.shape == (1797, 1, 8, 8)
    assert digits.images.dtype == torch.float32
    assert float(digits.images.min()) == -1.0  # grey level 0
    assert float(digits.images.max()) == 1.0  # grey level 16
    assert digits.ids.dtype == torch.int64
    assert torch.equal(digits.ids, torch.arange(1797))
    assert digits.labels.dtype == torch.int64
    assert sorted(set(digits.labels.tolist())) == list(range(10))
    assert digits.num_classes == 10
    assert (len(digits), digits.channels, digits.image_size, digits.name) == (1797, 1, 8, "digits")

    raw = sklearn_digits()
    expected = torch.from_numpy(raw.images.astype(np.float32))[:, None] / 16.0 * 2.0 - 1.0
    assert torch.equal(digits.images, expected)
    assert torch.equal(digits.labels, torch.from_numpy(raw.target).long())


def test_load_digits_without_labels_and_resized():
    unlabelled = load_digits(labels=False)
    assert unlabelled.labels is None
    assert unlabelled.num_classes == 0
    big = load_digits(image_size=16)
    assert big.images.shape == (1797, 1, 16, 16)
    assert float(big.images.min()) >= -1.0 and float(big.images.max()) <= 1.0


# ---------------------------------------------------------------------------------------------
# fingerprint


def test_fingerprint_is_stable_across_loads_and_pinned(digits):
    again = load_digits()
    assert digits is not again
    assert digits.fingerprint() == again.fingerprint() == DIGITS_FINGERPRINT
    assert len(DIGITS_FINGERPRINT) == 64


def test_fingerprint_changes_with_one_pixel(digits):
    images = digits.images.clone()
    images[1000, 0, 3, 4] += 0.25
    changed = ImageDataset(images, digits.ids.clone(), digits.labels.clone(), 10, "digits")
    assert changed.fingerprint() != DIGITS_FINGERPRINT
    # The same content built a second time gives the same fingerprint again.
    same = ImageDataset(digits.images.clone(), digits.ids.clone(), digits.labels.clone(), 10, "other-name")
    assert same.fingerprint() == DIGITS_FINGERPRINT


def test_fingerprint_changes_when_ids_are_permuted(digits):
    ids = digits.ids.clone()
    ids[[0, 1]] = ids[[1, 0]]
    swapped = ImageDataset(digits.images, ids, digits.labels, 10, "digits")
    assert swapped.fingerprint() != DIGITS_FINGERPRINT
    reversed_ids = ImageDataset(digits.images, digits.ids.flip(0), digits.labels, 10, "digits")
    assert reversed_ids.fingerprint() not in (DIGITS_FINGERPRINT, swapped.fingerprint())


def test_fingerprint_changes_when_labels_change(digits):
    labels = digits.labels.clone()
    labels[5] = (labels[5] + 1) % 10
    relabelled = ImageDataset(digits.images, digits.ids, labels, 10, "digits")
    assert relabelled.fingerprint() != DIGITS_FINGERPRINT
    unlabelled = digits.without_labels()
    assert unlabelled.labels is None
    assert unlabelled.fingerprint() not in (DIGITS_FINGERPRINT, relabelled.fingerprint())
    assert unlabelled.fingerprint() == load_digits(labels=False).fingerprint()


# ---------------------------------------------------------------------------------------------
# ImageDataset validation, positions and subset


def test_dataset_rejects_inconsistent_arrays():
    images = torch.zeros(3, 1, 2, 2)
    with pytest.raises(DataError) as err:
        ImageDataset(torch.zeros(3, 2, 2), torch.arange(3))
    one_line_error(err)
    with pytest.raises(DataError) as err:
        ImageDataset(images, torch.arange(2))
    one_line_error(err)
    with pytest.raises(DataError, match="not unique") as err:
        ImageDataset(images, torch.tensor([0, 1, 1]))
    one_line_error(err)
    with pytest.raises(DataError) as err:
        ImageDataset(images, torch.arange(3), torch.tensor([0, 1]))
    one_line_error(err)
    assert issubclass(DataError, DDMError) and issubclass(DataError, ValueError)


def test_subset_keeps_requested_ids_in_order(digits):
    wanted = [5, 3, 1796, 0, 100]
    sub = digits.subset(wanted)
    assert sub.ids.tolist() == wanted
    assert torch.equal(sub.images, digits.images[wanted])
    assert sub.labels.tolist() == digits.labels[wanted].tolist()
    assert sub.num_classes == 10
    assert sub.name == "digits[subset]"
    assert digits.subset([7], name="seven").name == "seven"
    assert torch.equal(digits.subset(torch.tensor([8, 9])).ids, torch.tensor([8, 9]))
    assert torch.equal(digits.subset(np.array([8, 9])).ids, torch.tensor([8, 9]))


def test_subset_returns_copies(digits):
    before_images = digits.images[[10, 11]].clone()
    before_labels = digits.labels[[10, 11]].clone()
    sub = digits.subset([10, 11])
    sub.images.fill_(0.5)
    sub.labels.fill_(9 if int(before_labels[0]) != 9 else 8)
    sub.ids.fill_(-7)
    assert torch.equal(digits.images[[10, 11]], before_images)
    assert torch.equal(digits.labels[[10, 11]], before_labels)
    assert torch.equal(digits.ids, torch.arange(1797))
    assert digits.fingerprint() == DIGITS_FINGERPRINT
    assert sub.images.data_ptr() != digits.images.data_ptr()


def test_subset_with_non_contiguous_unsorted_ids():
    data = small_dataset()  # ids 30, 10, 20, 40
    sub = data.subset([20, 40, 30])
    assert sub.ids.tolist() == [20, 40, 30]
    assert torch.equal(sub.images, data.images[[2, 3, 0]])
    assert sub.labels.tolist() == [2, 1, 0]
    assert data.positions([10, 30]).tolist() == [1, 0]


@pytest.mark.parametrize("unknown", [-1, 1797, 10**9])
def test_subset_unknown_id_raises(digits, unknown):
    with pytest.raises(DataError) as err:
        digits.subset([3, unknown])
    assert str(unknown) in one_line_error(err)


@pytest.mark.parametrize("unknown", [5, 15, 25, 35, 45])
def test_subset_unknown_id_between_or_outside_sparse_ids(unknown):
    data = small_dataset()  # ids 10, 20, 30, 40
    with pytest.raises(DataError) as err:
        data.subset([unknown])
    assert str(unknown) in one_line_error(err)


# ---------------------------------------------------------------------------------------------
# image folders


def test_image_folder_with_class_subfolders(tmp_path):
    root = tmp_path / "animals"
    # Written out of order; classes are sorted by name: ant=0, bee=1, cat=2.
    for cls, value in (("cat", 30), ("ant", 10), ("bee", 20)):
        for i in range(2):
            save_png(root / cls / f"img{i}.png", np.full((4, 4), value + i))
    data = load_image_folder(root)
    assert data.images.shape == (6, 1, 4, 4)
    assert data.num_classes == 3
    assert data.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert data.ids.tolist() == list(range(6))
    assert data.name == "animals"
    for row, value in enumerate([10, 11, 20, 21, 30, 31]):
        assert torch.all(data.images[row] == unit(value, 255.0)), row
    # Ids are fixed by the sorted relative paths: a second load gives the same dataset.
    assert load_image_folder(root).fingerprint() == data.fingerprint()
    assert load_image_folder(root, labels=False).labels is None


def test_flat_image_folder_has_no_labels(tmp_path):
    save_png(tmp_path / "b.png", np.full((4, 4), 255))
    save_png(tmp_path / "a.png", np.zeros((4, 4)))
    data = load_image_folder(tmp_path)
    assert data.labels is None
    assert data.num_classes == 0
    # Sorted by path: a.png (black) is id 0, b.png (white) is id 1.
    assert torch.all(data.images[0] == -1.0)
    assert torch.all(data.images[1] == 1.0)


def test_folder_mixing_files_and_subfolders_has_no_labels(tmp_path):
    save_png(tmp_path / "top.png", np.zeros((4, 4)))
    save_png(tmp_path / "cls" / "x.png", np.zeros((4, 4)))
    data = load_image_folder(tmp_path)
    assert len(data) == 2
    assert data.labels is None


def test_grey_pngs_give_one_channel_rgb_give_three(tmp_path):
    grey = tmp_path / "grey"
    save_png(grey / "a.png", np.full((4, 4), 0))
    save_png(grey / "b.png", np.full((4, 4), 255))
    assert load_image_folder(grey).channels == 1

    rgb = tmp_path / "rgb"
    red = np.zeros((4, 4, 3), np.uint8)
    red[..., 0] = 255
    save_png(rgb / "red.png", red)
    data = load_image_folder(rgb)
    assert data.images.shape == (1, 3, 4, 4)
    assert torch.all(data.images[0, 0] == 1.0)  # channel order is R, G, B
    assert torch.all(data.images[0, 1:] == -1.0)

    # A grey image next to a colour one makes the whole dataset RGB; the grey one is replicated.
    save_png(rgb / "white.png", np.full((4, 4), 255))
    mixed = load_image_folder(rgb)
    assert mixed.images.shape == (2, 3, 4, 4)
    assert torch.all(mixed.images[1] == 1.0)
    # channels= forces the mode.
    assert load_image_folder(rgb, channels=1).images.shape == (2, 1, 4, 4)
    assert load_image_folder(grey, channels=3).images.shape == (2, 3, 4, 4)


def test_empty_folder_raises(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="no images") as err:
        load_image_folder(tmp_path)
    one_line_error(err)


def test_unreadable_image_raises(tmp_path):
    save_png(tmp_path / "good.png", np.zeros((4, 4)))
    (tmp_path / "broken.png").write_bytes(b"this is not a png at all")
    with pytest.raises(DataError) as err:
        load_image_folder(tmp_path)
    assert "broken.png" in one_line_error(err)


def test_mixed_sizes_need_an_image_size(tmp_path):
    save_png(tmp_path / "a.png", np.zeros((4, 4)))
    save_png(tmp_path / "b.png", np.full((6, 6), 255))
    with pytest.raises(DataError) as err:
        load_image_folder(tmp_path)
    message = one_line_error(err)
    assert "4x4" in message and "6x6" in message and "b.png" in message
    data = load_image_folder(tmp_path, image_size=8)
    assert data.images.shape == (2, 1, 8, 8)
    assert torch.all(data.images[0] == -1.0)
    assert torch.all(data.images[1] == 1.0)


def test_non_square_images_need_an_image_size(tmp_path):
    save_png(tmp_path / "wide.png", np.zeros((4, 6)))
    with pytest.raises(DataError, match="not square") as err:
        load_image_folder(tmp_path)
    one_line_error(err)
    assert load_image_folder(tmp_path, image_size=4).images.shape == (1, 1, 4, 4)


def test_missing_folder_and_bad_channels_raise(tmp_path):
    with pytest.raises(DataError) as err:
        load_image_folder(tmp_path / "nowhere")
    assert "nowhere" in one_line_error(err)
    save_png(tmp_path / "a.png", np.zeros((4, 4)))
    with pytest.raises(DataError) as err:
        load_image_folder(tmp_path / "a.png")  # a file, not a folder
    one_line_error(err)
    with pytest.raises(DataError) as err:
        load_image_folder(tmp_path, channels=2)
    one_line_error(err)


# ---------------------------------------------------------------------------------------------
# .npz archives


def test_npz_uint8_nhw(tmp_path):
    images = np.zeros((3, 4, 4), np.uint8)
    images[1] = 255
    images[2] = 51
    path = tmp_path / "grey.npz"
    np.savez(path, images=images)
    data = load_npz(path)
    assert data.images.shape == (3, 1, 4, 4)
    assert data.images.dtype == torch.float32
    assert torch.all(data.images[0] == -1.0)
    assert torch.all(data.images[1] == 1.0)
    assert torch.all(data.images[2] == unit(51, 255.0))
    assert data.ids.tolist() == [0, 1, 2]
    assert data.labels is None and data.num_classes == 0
    assert data.name == "grey"


def test_npz_uint8_nhwc(tmp_path):
    images = np.zeros((2, 4, 4, 3), np.uint8)
    images[0, ..., 0] = 255  # red
    images[1, ..., 2] = 255  # blue
    path = tmp_path / "rgb.npz"
    np.savez(path, images=images)
    data = load_npz(path)
    assert data.images.shape == (2, 3, 4, 4)
    assert torch.all(data.images[0, 0] == 1.0) and torch.all(data.images[0, 1:] == -1.0)
    assert torch.all(data.images[1, 2] == 1.0) and torch.all(data.images[1, :2] == -1.0)


def test_npz_float_nchw_unit_range(tmp_path):
    images = np.zeros((3, 3, 4, 4), np.float32)
    images[1] = 1.0
    images[2] = 0.5
    path = tmp_path / "float.npz"
    np.savez(path, images=images)
    data = load_npz(path)
    assert data.images.shape == (3, 3, 4, 4)
    assert torch.all(data.images[0] == -1.0)
    assert torch.all(data.images[1] == 1.0)
    assert torch.all(data.images[2] == 0.0)


def test_npz_float_already_in_minus_one_one_is_kept(tmp_path):
    images = np.linspace(-1, 1, 2 * 1 * 4 * 4).reshape(2, 1, 4, 4)  # float64
    path = tmp_path / "signed.npz"
    np.savez(path, images=images)
    data = load_npz(path)
    assert data.images.dtype == torch.float32
    assert torch.equal(data.images, torch.from_numpy(images.astype(np.float32)))


def test_npz_labels_and_ids_are_read(tmp_path):
    path = tmp_path / "labelled.npz"
    np.savez(
        path,
        images=np.zeros((3, 4, 4), np.uint8),
        labels=np.array([2, 0, 4], np.int32),
        ids=np.array([70, 5, 12], np.int16),
    )
    data = load_npz(path)
    assert data.labels.dtype == torch.int64 and data.labels.tolist() == [2, 0, 4]
    assert data.ids.dtype == torch.int64 and data.ids.tolist() == [70, 5, 12]
    assert data.num_classes == 5
    assert data.subset([12]).ids.tolist() == [12]
    unlabelled = load_npz(path, labels=False)
    assert unlabelled.labels is None and unlabelled.ids.tolist() == [70, 5, 12]
    assert load_npz(path, image_size=8).images.shape == (3, 1, 8, 8)


def test_npz_without_images_names_what_it_holds(tmp_path):
    path = tmp_path / "wrong.npz"
    np.savez(path, pixels=np.zeros((2, 4, 4)), targets=np.zeros(2))
    with pytest.raises(DataError) as err:
        load_npz(path)
    message = one_line_error(err)
    assert "'images'" in message and "pixels" in message and "targets" in message


class WriteMarker:
    """Unpickling this object would create the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("field", ["images", "labels", "ids"])
def test_npz_object_array_is_refused_without_unpickling(tmp_path, field):
    marker = tmp_path / "pwned"
    arrays = {"images": np.zeros((2, 4, 4), np.uint8)}
    arrays[field] = np.array([WriteMarker(marker), WriteMarker(marker)], dtype=object)
    path = tmp_path / "evil.npz"
    np.savez(path, **arrays)  # numpy pickles object arrays when saving
    with pytest.raises(DataError, match="pickle") as err:
        load_npz(path)
    one_line_error(err)
    assert not marker.exists()


def test_npz_payload_would_really_write_the_marker(tmp_path):
    """Control for the test above: the payload is live, so its absence of effect means something."""
    marker = tmp_path / "control"
    pickle.loads(pickle.dumps(WriteMarker(marker))).close()
    assert marker.exists()


@pytest.mark.parametrize(
    "arrays, needle",
    [
        ({"images": np.zeros((3, 4, 4), np.uint8), "labels": np.array([0, 1])}, "labels"),
        ({"images": np.zeros((3, 4, 4), np.uint8), "labels": np.array([0, -1, 2])}, "labels"),
        ({"images": np.zeros((3, 4, 4), np.uint8), "labels": np.array([0.0, 1.0, 2.0])}, "labels"),
        ({"images": np.zeros((3, 4, 4), np.uint8), "ids": np.array([1, 2])}, "ids"),
        ({"images": np.zeros((3, 4, 4), np.uint8), "ids": np.array([1.0, 2.0, 3.0])}, "ids"),
        ({"images": np.zeros((3, 4, 4), np.uint8), "ids": np.array([1, 2, 1])}, "unique"),
        ({"images": np.full((2, 1, 4, 4), 1.5, np.float32)}, "1.5"),
        ({"images": np.full((2, 1, 4, 4), -2.0, np.float32)}, "-2"),
        ({"images": np.array([[[[0.0, np.nan], [0.0, 0.0]]]], np.float32)}, "NaN"),
        ({"images": np.zeros((2, 4, 4), np.int32)}, "int32"),
        ({"images": np.zeros((2, 4, 6), np.uint8)}, "square"),
        ({"images": np.zeros((2, 4), np.uint8)}, "shape"),
        ({"images": np.zeros((2, 2, 4, 4), np.uint8)}, "shape"),
        ({"images": np.zeros((0, 4, 4), np.uint8)}, "N > 0"),
    ],
)
def test_npz_bad_contents_raise(tmp_path, arrays, needle):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError) as err:
        load_npz(path)
    assert needle in one_line_error(err)


def test_npz_missing_or_not_an_archive(tmp_path):
    with pytest.raises(DataError, match="does not exist") as err:
        load_npz(tmp_path / "missing.npz")
    one_line_error(err)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(np.random.default_rng(0).bytes(256))
    with pytest.raises(DataError) as err:
        load_npz(garbage)
    one_line_error(err)


def test_npz_that_is_a_single_npy_array_raises_data_error(tmp_path):
    """A bare .npy saved under an .npz name: np.load returns an ndarray, not an archive."""
    npy = tmp_path / "single.npy"
    np.save(npy, np.zeros((2, 4, 4), np.uint8))
    path = tmp_path / "single.npz"
    shutil.copy(npy, path)
    with pytest.raises(DataError, match=r"single \.npy") as err:
        load_npz(path)
    one_line_error(err)


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST: idx files written here, and the copy Debian's dataset-fashion-mnist installs


def write_idx(path, array: np.ndarray, magic: int | None = None) -> None:
    """Zalando's idx format: big-endian magic (0x0800 + ndim) and dimensions, then the bytes."""
    magic = 0x0800 + array.ndim if magic is None else magic
    data = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    data += np.asarray(array, dtype=np.uint8).tobytes()
    path.write_bytes(gzip.compress(data, mtime=0) if path.suffix == ".gz" else data)


def fashion_folder(folder, gz: bool = True, n_train: int = 3, n_test: int = 2) -> dict[str, np.ndarray]:
    """The four Fashion-MNIST files with random pixels and labels; returns what was written."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, array in arrays.items():
        write_idx(folder / (f"{name}.gz" if gz else name), array)
    return arrays


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "plain"])
def test_fashion_mnist_idx_files_parse_to_images_labels_and_ids(tmp_path, gz):
    written = fashion_folder(tmp_path, gz=gz)
    train = load_fashion_mnist(tmp_path)
    pixels = written["train-images-idx3-ubyte"]
    assert train.images.shape == (3, 1, 28, 28) and train.images.dtype == torch.float32
    assert torch.equal(train.images, torch.from_numpy(pixels.astype(np.float32))[:, None] / 255.0 * 2.0 - 1.0)
    assert float(train.images[0, 0, 0, 0]) == unit(int(pixels[0, 0, 0]), 255.0)
    assert train.labels.tolist() == written["train-labels-idx1-ubyte"].tolist()
    assert train.ids.tolist() == [0, 1, 2]
    assert (train.num_classes, train.name) == (10, "fashion-mnist")

    test = load_fashion_mnist(tmp_path, split="test")
    assert test.images.shape == (2, 1, 28, 28)
    assert test.labels.tolist() == written["t10k-labels-idx1-ubyte"].tolist()
    assert test.ids.tolist() == [60_000, 60_001]
    assert test.name == "fashion-mnist-test"

    unlabelled = load_fashion_mnist(tmp_path, labels=False, image_size=14)
    assert unlabelled.labels is None and unlabelled.num_classes == 0
    assert unlabelled.images.shape == (3, 1, 14, 14)


def test_fashion_mnist_class_names():
    assert len(FASHION_MNIST_CLASSES) == 10
    assert FASHION_MNIST_CLASSES[0] == "T-shirt/top" and FASHION_MNIST_CLASSES[9] == "Ankle boot"


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "plain"])
def test_truncated_idx_file_is_a_one_line_error_naming_it(tmp_path, gz):
    fashion_folder(tmp_path, gz=gz)
    path = tmp_path / ("train-images-idx3-ubyte.gz" if gz else "train-images-idx3-ubyte")
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError) as err:
        load_fashion_mnist(tmp_path)
    message = one_line_error(err)
    assert str(path) in message and "truncated" in message


def test_wrong_magic_number_is_a_one_line_error_naming_the_file(tmp_path):
    fashion_folder(tmp_path)
    labels = tmp_path / "train-labels-idx1-ubyte.gz"
    write_idx(labels, np.zeros(3, np.uint8), magic=2051)
    with pytest.raises(DataError) as err:
        load_fashion_mnist(tmp_path)
    message = one_line_error(err)
    assert str(labels) in message and "2051" in message and "2049" in message


def test_images_and_labels_must_agree(tmp_path):
    fashion_folder(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(2, np.uint8))
    with pytest.raises(DataError, match="3 images but") as err:
        load_fashion_mnist(tmp_path)
    one_line_error(err)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.array([0, 10, 1], np.uint8))
    with pytest.raises(DataError, match="label 10") as err:
        load_fashion_mnist(tmp_path)
    one_line_error(err)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(DataError, match="28x28") as err:
        load_fashion_mnist(tmp_path)
    one_line_error(err)


def test_absent_fashion_mnist_says_how_to_install_it(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as err:
        load_fashion_mnist(missing)
    message = one_line_error(err)
    assert str(missing) in message and "apt-get install dataset-fashion-mnist" in message
    assert FASHION_MNIST_ENV in message and "fashion-mnist:FOLDER" in message
    with pytest.raises(DataError, match="'train' or 'test'") as err:
        load_fashion_mnist(tmp_path, split="validation")
    one_line_error(err)


def test_environment_and_source_folder_point_elsewhere(tmp_path, monkeypatch):
    fashion_folder(tmp_path / "env", n_train=4)
    fashion_folder(tmp_path / "arg", gz=False, n_train=5, n_test=6)
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path / "env"))
    assert len(load_dataset("fashion-mnist")) == 4
    # the folder in the source string wins over the environment; the string alone names the data
    source = f"fashion-mnist:{tmp_path / 'arg'}"
    first = load_dataset(source)
    assert len(first) == 5 and first.name == "fashion-mnist"
    assert load_dataset(source).fingerprint() == first.fingerprint()
    test = load_dataset(f"fashion-mnist-test:{tmp_path / 'arg'}", labels=False)
    assert len(test) == 6 and test.labels is None and test.ids[0] == 60_000

    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path / "empty"))
    with pytest.raises(DataError) as err:
        load_dataset("fashion-mnist-test")
    assert str(tmp_path / "empty") in one_line_error(err)
    with pytest.raises(DataError, match="names no folder") as err:
        load_dataset("fashion-mnist:")
    one_line_error(err)


def test_installed_fashion_mnist_package(monkeypatch):
    """The copy Debian's dataset-fashion-mnist installs (CI installs it; no skip)."""
    monkeypatch.delenv(FASHION_MNIST_ENV, raising=False)
    train = load_dataset("fashion-mnist")
    assert train.images.shape == (60_000, 1, 28, 28) and train.num_classes == 10
    assert torch.equal(train.ids, torch.arange(60_000))
    assert torch.bincount(train.labels).tolist() == [6_000] * 10
    assert FASHION_MNIST_CLASSES[int(train.labels[0])] == "Ankle boot"  # Zalando's first training image
    assert float(train.images.min()) == -1.0 and float(train.images.max()) == 1.0
    test = load_dataset("fashion-mnist-test")
    assert test.images.shape == (10_000, 1, 28, 28) and test.num_classes == 10
    assert torch.equal(test.ids, torch.arange(60_000, 70_000))
    assert torch.bincount(test.labels).tolist() == [1_000] * 10


# ---------------------------------------------------------------------------------------------
# load_dataset dispatch


def test_load_dataset_dispatch(tmp_path, digits):
    assert load_dataset("digits").fingerprint() == DIGITS_FINGERPRINT
    assert load_dataset("digits", labels=False).labels is None
    assert load_dataset("digits", image_size=16).images.shape == (1797, 1, 16, 16)

    npz = tmp_path / "set.NPZ"  # the suffix is matched case-insensitively
    np.savez(tmp_path / "set.npz", images=np.full((2, 4, 4), 255, np.uint8), labels=np.array([1, 0]))
    (tmp_path / "set.npz").rename(npz)
    from_npz = load_dataset(str(npz))
    assert from_npz.images.shape == (2, 1, 4, 4) and torch.all(from_npz.images == 1.0)
    assert from_npz.labels.tolist() == [1, 0]
    assert load_dataset(str(npz), labels=False).labels is None

    folder = tmp_path / "folder"
    save_png(folder / "x" / "a.png", np.zeros((4, 4)))
    save_png(folder / "y" / "b.png", np.zeros((4, 4)))
    from_folder = load_dataset(str(folder))
    assert from_folder.labels.tolist() == [0, 1]
    assert load_dataset(str(folder), image_size=2).images.shape == (2, 1, 2, 2)


@pytest.mark.parametrize(
    "source", ["cifar10", "Digits", "/definitely/not/here", "fashion-mnist-train", "Fashion-MNIST"]
)
def test_load_dataset_unknown_source(source):
    with pytest.raises(DataError) as err:
        load_dataset(source)
    message = one_line_error(err)
    assert repr(source) in message and "'fashion-mnist'" in message


def test_load_dataset_missing_npz_and_plain_image_file(tmp_path):
    with pytest.raises(DataError, match="does not exist") as err:
        load_dataset(str(tmp_path / "missing.npz"))
    one_line_error(err)
    save_png(tmp_path / "a.png", np.zeros((4, 4)))
    with pytest.raises(DataError) as err:
        load_dataset(str(tmp_path / "a.png"))
    one_line_error(err)
