"""mctool.data: bundled and synthetic data sets, splits, batching, augmentation and missing-data errors."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import image_folder
from mctool import data as mdata
from mctool.data import augment_batch, load_data
from mctool.errors import ConfigError, DataError, MctoolWarning


@pytest.fixture(scope="module")
def digits():
    return load_data("digits")


# --- digits ---------------------------------------------------------------------------------------------------


def test_digits_sizes_and_info(digits):
    assert len(digits.train) == 1437 and len(digits.eval) == 360
    assert digits.eval_split == "test"
    info = digits.info
    assert (info.num_classes, info.in_chans, info.image_size) == (10, 1, 8)
    assert info.augment == "crop" and info.crop_padding == 1
    for split in (digits.train, digits.eval):
        assert split.images.dtype == torch.uint8
        assert tuple(split.images.shape[1:]) == (1, 8, 8)
        assert split.labels.dtype == torch.long
    # Digits pixels are 0..16 scaled to 0..255: both ends are reached.
    assert int(digits.train.images.min()) == 0 and int(digits.train.images.max()) == 255
    assert set(digits.train.labels.tolist()) == set(range(10))


def test_digits_is_deterministic(digits):
    again = load_data("digits")
    assert torch.equal(again.train.images, digits.train.images)
    assert torch.equal(again.train.labels, digits.train.labels)
    assert torch.equal(again.eval.images, digits.eval.images)
    assert torch.equal(again.eval.labels, digits.eval.labels)


def test_digits_split_is_stratified(digits):
    ytr, yte = digits.train.labels, digits.eval.labels
    overall = torch.bincount(torch.cat([ytr, yte]), minlength=10).double() / (len(ytr) + len(yte))
    test_share = torch.bincount(yte, minlength=10).double() / len(yte)
    assert (test_share - overall).abs().max() < 0.01


def test_digits_rejects_options():
    with pytest.raises(ConfigError, match="takes no options"):
        load_data("digits:size=3")


# --- validation split -----------------------------------------------------------------------------------------


def test_val_split_holds_out_the_tail_of_train(digits):
    val = load_data("digits", split="val")
    nv = mdata._val_size(1437)
    assert nv == 144  # 10% of 1,437, rounded to nearest
    assert val.eval_split == "val"
    assert len(val.eval) == nv and len(val.train) == 1437 - nv
    assert torch.equal(val.eval.images, digits.train.images[-nv:])
    assert torch.equal(val.eval.labels, digits.train.labels[-nv:])
    assert torch.equal(val.train.images, digits.train.images[:-nv])
    # the real test set is not used at all
    assert not any(torch.equal(val.eval.images[:10], digits.eval.images[i:i + 10]) for i in range(0, 350))


def test_val_size_rule():
    assert mdata._val_size(50_000) == 5000
    assert mdata._val_size(60_000) == 5000
    assert mdata._val_size(49_999) == 5000  # 10%, rounded
    assert mdata._val_size(40_000) == 4000
    assert mdata._val_size(1000) == 100
    assert mdata._val_size(5) == 1


# --- synthetic ------------------------------------------------------------------------------------------------


def test_synthetic_options_shape_the_data():
    d = load_data("synthetic:size=16,channels=1,classes=4,train=100,test=40,seed=3")
    assert tuple(d.train.images.shape) == (100, 1, 16, 16)
    assert tuple(d.eval.images.shape) == (40, 1, 16, 16)
    assert (d.info.num_classes, d.info.in_chans, d.info.image_size) == (4, 1, 16)
    assert d.info.crop_padding == 2  # size // 8
    assert d.info.augment == "crop-flip"
    assert int(d.train.labels.min()) >= 0 and int(d.train.labels.max()) == 3
    assert d.train.images.dtype == torch.uint8


def test_a_single_class_is_warned_about(tmp_path):
    with pytest.warns(MctoolWarning, match="has a single class: every network predicts it"):
        load_data("synthetic:size=4,classes=1,train=8,test=4")
    from PIL import Image

    for part in ("train", "val"):
        (tmp_path / part / "only").mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / part / "only" / "0.png")
    with pytest.warns(MctoolWarning, match="single class"):
        load_data(f"imagefolder:{tmp_path}", num_workers=0, image_size=8)


def test_synthetic_defaults():
    d = load_data("synthetic")
    assert tuple(d.train.images.shape) == (1024, 3, 32, 32) and len(d.eval) == 256
    assert d.info.num_classes == 10 and d.info.crop_padding == 4


def test_synthetic_is_deterministic_per_seed():
    spec = "synthetic:size=8,classes=3,train=50,test=20,seed={}"
    a, b, c = (load_data(spec.format(s)) for s in (1, 1, 2))
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.eval.labels, b.eval.labels)
    assert not torch.equal(a.train.images, c.train.images)


@pytest.mark.parametrize("name", ["synthetic:size=0", "synthetic:foo=1", "synthetic:size=abc", "synthetic:classes=-2",
                                  "digits:size=3", "cifar10:size=3", "nosuchdata", "imagenet",
                                  f"synthetic:seed={2**64}", "synthetic:size=16,size=8", "synthetic:size=\uff18"])
def test_bad_data_set_names_raise_config_error(name, tmp_path):
    with pytest.raises(ConfigError):
        load_data(name, root=tmp_path)


def test_bad_option_message_lists_allowed_options():
    with pytest.raises(ConfigError, match="size=N"):
        load_data("synthetic:foo=1")


def test_bad_split_and_augment_raise_config_error():
    with pytest.raises(ConfigError, match="--split"):
        load_data("digits", split="train")
    with pytest.raises(ConfigError, match="--augment"):
        load_data("digits", augment="rotate")


def test_explicit_augment_overrides_default():
    assert load_data("digits", augment="none").info.augment == "none"
    assert load_data("digits", augment="crop-flip").info.augment == "crop-flip"


# --- batches --------------------------------------------------------------------------------------------------


def _raw(split, x: torch.Tensor) -> torch.Tensor:
    """Undo normalisation back to pixel values."""
    mean = torch.tensor(split.info.mean).view(1, -1, 1, 1)
    std = torch.tensor(split.info.std).view(1, -1, 1, 1)
    return (x * std + mean) * 255.0


def test_batches_in_order_cover_everything_and_keep_last(digits):
    split = digits.eval  # 360 images
    batches = list(split.batches(100))
    assert [len(y) for _, y in batches] == [100, 100, 100, 60]
    assert split.num_batches(100) == 4 and split.num_batches(100, drop_last=True) == 3
    ys = torch.cat([y for _, y in batches])
    assert torch.equal(ys, split.labels)
    xs = torch.cat([x for x, _ in batches])
    assert xs.shape == (360, 1, 8, 8) and xs.dtype == torch.float32
    assert torch.allclose(_raw(split, xs), split.images.float(), atol=1e-3)


def test_batches_drop_last(digits):
    split = digits.eval
    sizes = [len(y) for _, y in split.batches(100, drop_last=True)]
    assert sizes == [100, 100, 100]
    assert list(split.batches(400, drop_last=True)) == []
    assert [len(y) for _, y in split.batches(400)] == [360]


def test_batches_values_are_normalised(digits):
    split = digits.eval
    x, _ = next(split.batches(50))
    mean = torch.tensor(split.info.mean).view(1, -1, 1, 1)
    std = torch.tensor(split.info.std).view(1, -1, 1, 1)
    expected = (split.images[:50].float() / 255 - mean) / std
    assert torch.allclose(x, expected, atol=1e-5)
    # digits statistics come from its training images: a normalised training set has mean ~0 and std ~1
    xt = torch.cat([b for b, _ in digits.train.batches(500)])
    assert abs(float(xt.mean())) < 1e-3 and abs(float(xt.std()) - 1) < 1e-2


def test_normalization_override(tmp_path):
    d = load_data("digits", normalization={"mean": [0.5], "std": [0.25]})
    x, _ = next(d.eval.batches(10))
    assert torch.allclose(x, (d.eval.images[:10].float() / 255 - 0.5) / 0.25, atol=1e-5)


def test_shuffled_batches_are_a_seeded_permutation(digits):
    split = digits.eval

    def order(seed):
        xs, ys = zip(*split.batches(64, shuffle=True, seed=seed))
        return torch.cat(xs), torch.cat(ys)

    x0, y0 = order(0)
    x0b, y0b = order(0)
    x1, y1 = order(1)
    assert torch.equal(x0, x0b) and torch.equal(y0, y0b)
    assert not torch.equal(y0, y1)
    assert not torch.equal(y0, split.labels)
    # every sample exactly once: same multiset of labels and of images
    assert torch.equal(y0.sort().values, split.labels.sort().values)
    # (compared as sorted lists of rows, which is exact for a permutation; sums of rows would be exact only
    # if every row were summed in the same order)
    rows = lambda t: sorted(t.flatten(1).tolist())  # noqa: E731
    assert rows(x0) == rows(split.normalize(split.images))


def test_augmented_batches_are_seeded_and_change_images(digits):
    split = digits.train
    a = next(split.batches(64, shuffle=True, augment=True, seed=5))[0]
    b = next(split.batches(64, shuffle=True, augment=True, seed=5))[0]
    plain = next(split.batches(64, shuffle=True, augment=False, seed=5))[0]
    assert torch.equal(a, b)
    assert not torch.equal(a, plain)
    assert a.shape == plain.shape
    # augment="none" turns augmentation off even when asked for
    none = load_data("digits", augment="none").train
    assert torch.equal(next(none.batches(64, shuffle=True, augment=True, seed=5))[0], plain)


# --- augment_batch --------------------------------------------------------------------------------------------


def _small_batch(b=16, c=2, h=6, w=5):
    torch.manual_seed(0)
    return torch.randint(1, 256, (b, c, h, w), dtype=torch.uint8)  # no zeros: padding is recognisable


def test_augment_crop_is_a_shifted_window_of_the_padded_image():
    x = _small_batch()
    p = 2
    out = augment_batch(x, p, False, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(x, (p,) * 4)
    h, w = x.shape[2:]
    offsets = []
    for i in range(len(x)):
        found = [(oy, ox) for oy in range(2 * p + 1) for ox in range(2 * p + 1)
                 if torch.equal(out[i], padded[i, :, oy:oy + h, ox:ox + w])]
        assert found, f"image {i} is not a crop of its padded input"
        offsets.append(found[0])
    assert len(set(offsets)) > 1  # the offsets really are random
    assert torch.equal(out, augment_batch(x, p, False, torch.Generator().manual_seed(0)))


def test_augment_flip_only_mirrors():
    x = _small_batch(b=64)
    out = augment_batch(x, 0, True, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == torch.uint8
    same = [torch.equal(out[i], x[i]) for i in range(64)]
    mirrored = [torch.equal(out[i], x[i].flip(-1)) for i in range(64)]
    assert all(s or m for s, m in zip(same, mirrored))
    assert any(same) and any(mirrored)


def test_augment_with_no_padding_no_flip_is_identity():
    x = _small_batch()
    assert torch.equal(augment_batch(x, 0, False, torch.Generator().manual_seed(0)), x)


def test_default_augment_per_data_set():
    assert mdata._DEFAULT_AUGMENT["digits"] == "crop"
    assert mdata._DEFAULT_AUGMENT["cifar10"] == "crop-flip"
    assert mdata._DEFAULT_AUGMENT["svhn"] == "crop"  # house numbers are not mirror-symmetric
    assert set(mdata._DEFAULT_AUGMENT) >= {n.split(":")[0] for n in mdata.DATASETS}
    assert load_data("synthetic:size=24,train=4,test=2").info.crop_padding == 3
    assert load_data("synthetic:size=4,train=4,test=2").info.crop_padding == 1


# --- torchvision / IDX data sets ------------------------------------------------------------------------------


def test_missing_mnist_says_where_it_looked_and_how_to_get_it(tmp_path):
    with pytest.raises(DataError) as e:
        load_data("mnist", root=tmp_path)
    assert str(tmp_path) in str(e.value)
    assert "--download" in str(e.value)


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_from_idx_files_in_root(tmp_path):
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    rng = np.random.default_rng(0)
    xtr, xte = rng.integers(0, 256, (6, 4, 5)), rng.integers(0, 256, (3, 4, 5))
    ytr, yte = np.array([0, 1, 2, 3, 4, 9]), np.array([7, 8, 5])
    _write_idx(folder / "train-images-idx3-ubyte.gz", xtr)
    _write_idx(folder / "train-labels-idx1-ubyte.gz", ytr)
    _write_idx(folder / "t10k-images-idx3-ubyte.gz", xte)
    _write_idx(folder / "t10k-labels-idx1-ubyte.gz", yte)
    d = load_data("fashion-mnist", root=tmp_path)
    assert tuple(d.train.images.shape) == (6, 1, 4, 5) and tuple(d.eval.images.shape) == (3, 1, 4, 5)
    assert torch.equal(d.train.images[:, 0], torch.from_numpy(xtr.astype(np.uint8)))
    assert torch.equal(d.eval.images[:, 0], torch.from_numpy(xte.astype(np.uint8)))
    assert d.train.labels.tolist() == ytr.tolist() and d.eval.labels.tolist() == yte.tolist()
    assert d.info.num_classes == 10 and d.info.in_chans == 1
    assert d.info.mean == mdata._STATS["fashion-mnist"][0]


def test_damaged_idx_files_raise_data_error(tmp_path):
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    for n in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
              "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (folder / n).write_bytes(b"not gzip")
    with pytest.raises(DataError, match="damaged"):
        load_data("fashion-mnist", root=tmp_path)


def _fashion_folder(root: Path, n_train: int = 6, n_test: int = 3, labels: np.ndarray | None = None) -> Path:
    """Valid fashion-mnist IDX files of 4x5 images under ``root/fashion-mnist``; returns that folder."""
    folder = root / "fashion-mnist"
    folder.mkdir()
    rng = np.random.default_rng(0)
    _write_idx(folder / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (n_train, 4, 5)))
    _write_idx(folder / "train-labels-idx1-ubyte.gz", labels if labels is not None else np.arange(n_train) % 10)
    _write_idx(folder / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (n_test, 4, 5)))
    _write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.arange(n_test) % 10)
    return folder


@pytest.mark.parametrize("content, why", [
    (b"", "header missing"),  # gzip of nothing
    (b"\x00\x00", "header 00 00, expected 00 00 08 03"),
    (b"\x00\x00\x09\x03" + bytes(12), "header 00 00 09 03"),  # not unsigned bytes
    (b"\x00\x00\x08\x01" + bytes(4), "header 00 00 08 01, expected 00 00 08 03"),  # a labels file
    (b"\x00\x00\x08\x03" + struct.pack(">III", 6, 4, 5) + bytes(100), "116 bytes, but its header (6 x 4 x 5) says 136"),
    (b"\x00\x00\x08\x03" + struct.pack(">III", 6, 4, 5) + bytes(121), "137 bytes"),
], ids=["empty", "short-header", "not-unsigned-bytes", "a-labels-file", "too-short", "too-long"])
def test_idx_files_with_a_wrong_header_or_length_raise_data_error(tmp_path, content, why):
    """gzip-valid but damaged files: once an IndexError (shorter than a header) or a reshape error."""
    folder = _fashion_folder(tmp_path)
    with gzip.open(folder / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(content)
    with pytest.raises(DataError) as e:
        load_data("fashion-mnist", root=tmp_path)
    message = str(e.value)
    assert message.startswith(f"the data set files in '{folder}' are damaged (train-images-idx3-ubyte.gz: ")
    assert why in message and message.endswith("; re-install or re-download them.")


@pytest.mark.parametrize("kwargs, why", [
    ({"labels": np.arange(5)}, "train-images holds 6 images but train-labels 5 labels"),
    ({"labels": np.array([0, 1, 2, 3, 4, 10])}, "train-labels holds label 10; fashion-mnist's labels are 0 to 9"),
])
def test_idx_images_and_labels_that_disagree_raise_data_error(tmp_path, kwargs, why):
    """Both loaded fine before and crashed in the first batch (an index out of range, or a target >= 10)."""
    folder = _fashion_folder(tmp_path, **kwargs)
    with pytest.raises(DataError) as e:
        load_data("fashion-mnist", root=tmp_path)
    assert str(e.value) == f"the data set files in '{folder}' are damaged ({why}); re-install or re-download them."


def test_idx_files_of_different_image_sizes_raise_data_error(tmp_path):
    folder = _fashion_folder(tmp_path)
    _write_idx(folder / "t10k-images-idx3-ubyte.gz", np.zeros((3, 5, 4)))
    with pytest.raises(DataError, match="damaged .train-images are 4x5 pixels but t10k-images 5x4."):
        load_data("fashion-mnist", root=tmp_path)


def test_cli_reports_empty_idx_files_in_one_line(tmp_path, cli):
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    for n in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
              "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        with gzip.open(folder / n, "wb"):
            pass
    out = tmp_path / "fm.safetensors"
    err = cli.error("train", "-d", "fashion-mnist", "--data-root", tmp_path, "-a", "mlp", "--epochs", "1", "-o", out,
                    "-q", "--device", "cpu")
    assert err == (f"Error: the data set files in '{folder}' are damaged (train-images-idx3-ubyte.gz: not an IDX file "
                   "of 3-D unsigned bytes: header missing, expected 00 00 08 03); re-install or re-download them.")
    assert not out.exists()


FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


@pytest.mark.fashion_mnist
@pytest.mark.skipif(not FASHION.is_file(),
                    reason=f"{FASHION} absent (apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist(tmp_path):
    d = load_data("fashion-mnist", root=tmp_path)  # empty root: falls back to the Debian folder
    assert len(d.train) == 60_000 and len(d.eval) == 10_000
    assert tuple(d.train.images.shape[1:]) == (1, 28, 28)
    assert d.info.num_classes == 10 and d.info.image_size == 28
    assert torch.equal(torch.bincount(d.train.labels), torch.full((10,), 6000))
    assert torch.equal(torch.bincount(d.eval.labels), torch.full((10,), 1000))
    assert len(load_data("fashion-mnist", root=tmp_path, split="val").eval) == 5000


# --- imagefolder ----------------------------------------------------------------------------------------------


def test_imagefolder_missing_folder(tmp_path):
    with pytest.raises(DataError, match="train/"):
        load_data(f"imagefolder:{tmp_path / 'nope'}")
    with pytest.raises(DataError):
        load_data("imagefolder")


def test_imagefolder_loads_and_batches(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    counts = {"train": 3, "val": 2}
    for part, n in counts.items():
        for cls in ("cat", "dog"):
            (tmp_path / part / cls).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / part / cls / f"{i}.png")
    d = load_data(f"imagefolder:{tmp_path}", num_workers=0, image_size=8)
    assert (d.info.num_classes, d.info.in_chans, d.info.image_size) == (2, 3, 8)
    assert len(d.train) == 6 and len(d.eval) == 4
    batches = list(d.eval.batches(3))
    assert [tuple(x.shape) for x, _ in batches] == [(3, 3, 8, 8), (1, 3, 8, 8)]
    assert torch.cat([y for _, y in batches]).tolist() == [0, 0, 1, 1]
    xa, ya = next(d.train.batches(4, shuffle=True, augment=True, seed=0))
    assert tuple(xa.shape) == (4, 3, 8, 8) and xa.dtype == torch.float32
    assert len(ya) == 4


def test_imagefolder_val_split_holds_out_every_class(tmp_path):
    from PIL import Image

    for cls in ("a", "b", "c", "d"):
        for part, n in (("train", 25), ("val", 1)):
            (tmp_path / part / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(np.full((8, 8, 3), i, dtype=np.uint8)).save(tmp_path / part / cls / f"{i}.png")
    d = load_data(f"imagefolder:{tmp_path}", split="val", num_workers=0, image_size=8)
    assert len(d.eval) == 10 and len(d.train) == 90
    held = torch.cat([y for _, y in d.eval.batches(100)])
    # a random hold-out, not the last class of the class-ordered listing
    assert len(set(held.tolist())) >= 3


def test_synthetic_seed_zero_is_accepted():
    a = load_data("synthetic:size=8,seed=0,train=20,test=5")
    b = load_data("synthetic:size=8,train=20,test=5")
    assert torch.equal(a.train.images, b.train.images)


def test_one_data_set_spelled_two_ways_is_one_data_set(cli, tmp_path, monkeypatch):
    """Networks of the same images connect whatever the spelling: synthetic options in another order or with
    a default written out, an image folder given relative or absolute (with a trailing /). An image folder is
    recorded with its absolute path, so later commands find it from any folder."""
    from mctool.checkpoint import read_metadata
    from mctool.data import canonical_dataset

    assert canonical_dataset("synthetic:train=20,size=8,test=5,seed=0") == "synthetic:size=8,train=20,test=5"
    assert canonical_dataset("synthetic:seed=0") == canonical_dataset("synthetic") == "synthetic"
    assert canonical_dataset("synthetic:size=0") == "synthetic:size=0"  # a bad spec is left as it is
    tiny = ["-a", "mlp", "--arch-kwargs", '{"hidden": 8}', "--epochs", "1", "-q", "--device", "cpu"]
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    cli("train", "-d", "synthetic:size=4,channels=1,train=16,test=8", *tiny, "-o", a, "--seed", "1")
    cli("train", "-d", "synthetic:train=16,size=4,test=8,channels=1,seed=0", *tiny, "-o", b, "--seed", "2")
    cli("connect", a, b, "-o", tmp_path / "c.safetensors", "--epochs", "1", "-q", "--device", "cpu")

    image_folder(tmp_path / "imgs")
    monkeypatch.chdir(tmp_path)
    flags = [*tiny, "--num-workers", "0", "--arch-kwargs", '{"hidden": 4, "img_size": 224}']  # (224: its size)
    cli("train", "-d", "imagefolder:imgs", *flags, "-o", "ia.safetensors", "--seed", "1")
    cli("train", "-d", f"imagefolder:{tmp_path}/imgs/", *flags, "-o", "ib.safetensors", "--seed", "2")
    assert read_metadata(tmp_path / "ia.safetensors")["dataset"] == f"imagefolder:{tmp_path / 'imgs'}"
    cli("connect", "ia.safetensors", "ib.safetensors", "-o", "ic.safetensors", "--epochs", "1", "-q", "--device",
        "cpu", "--num-workers", "0")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert cli.json("evaluate", "../ia.safetensors", "--device", "cpu", "--num-workers", "0")["samples"] == 8


@pytest.mark.parametrize("drop_last", [False, True])
def test_batches_prepared_in_groups_equal_batches_prepared_one_by_one(digits, monkeypatch, drop_last):
    """Batches are augmented and normalised several at a time; the values must not depend on the grouping."""
    import mctool.data as data_module

    split = digits.train  # 1437 images: groups of 3 batches of 100 leave a partial group and a partial batch

    def epoch(group_bytes):
        monkeypatch.setattr(data_module, "_GROUP_BYTES", group_bytes)
        return list(split.batches(100, shuffle=True, augment=True, seed=3, drop_last=drop_last))

    one_by_one, grouped, whole = epoch(1), epoch(3 * 100 * 64 * 4), epoch(1 << 30)
    assert len(one_by_one) == len(grouped) == len(whole) == (14 if drop_last else 15)
    for (x1, y1), (x3, y3), (xa, ya) in zip(one_by_one, grouped, whole):
        assert torch.equal(x1, x3) and torch.equal(x1, xa)
        assert torch.equal(y1, y3) and torch.equal(y1, ya)


# --- imagefolder: batches for many processes (chunk, deal) and timm's transforms ------------------------------


def _image_folder(root: Path, per_class: int = 10) -> Path:
    """2 classes of constant 8x8 images, each of its own grey level (so a batch shows which images it holds)."""
    from PIL import Image

    for part in ("train", "val"):
        for c, cls in enumerate(("a", "b")):
            (root / part / cls).mkdir(parents=True)
            for i in range(per_class):
                value = 10 * (c * per_class + i) + 5
                Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(root / part / cls / f"{i}.png")
    return root


@pytest.mark.parametrize("world", [2, 3])
def test_imagefolder_chunks_of_all_ranks_make_the_global_batch(tmp_path, world):
    d = load_data(f"imagefolder:{_image_folder(tmp_path)}", num_workers=0, image_size=8)
    whole = list(d.train.batches(7, shuffle=True, seed=4))  # 20 images: 7, 7, 6
    ranks = [list(d.train.batches(7, shuffle=True, seed=4, chunk=(r, world))) for r in range(world)]
    assert [len(y) for _, y in whole] == [7, 7, 6] and all(len(batches) == 3 for batches in ranks)
    for i, (x, y) in enumerate(whole):
        pieces = [batches[i] for batches in ranks]
        assert [len(py) for _, py in pieces] == [len(t) for t in torch.tensor_split(torch.arange(len(y)), world)]
        assert torch.equal(torch.cat([px for px, _ in pieces]), x)
        assert torch.equal(torch.cat([py for _, py in pieces]), y)


def test_imagefolder_deal_gives_each_global_batch_to_one_rank(tmp_path):
    d = load_data(f"imagefolder:{_image_folder(tmp_path)}", num_workers=0, image_size=8)
    whole = list(d.train.batches(3, shuffle=True, seed=1))  # 7 batches
    dealt = [list(d.train.batches(3, shuffle=True, seed=1, deal=(r, 3))) for r in range(3)]
    assert [len(batches) for batches in dealt] == [3, 2, 2]
    for r, batches in enumerate(dealt):
        for (x, y), (xw, yw) in zip(batches, whole[r::3]):
            assert torch.equal(x, xw) and torch.equal(y, yw)


def test_imagefolder_order_follows_the_seed(tmp_path):
    d = load_data(f"imagefolder:{_image_folder(tmp_path)}", num_workers=0, image_size=8)

    def levels(**kw):  # the grey level of each image, in the order the batches hold them
        return torch.cat([x[:, 0, 0, 0] for x, _ in d.train.batches(6, **kw)])

    plain = levels()
    assert torch.equal(plain, plain.sort().values)  # ImageFolder's listing order
    a, b, c = levels(shuffle=True, seed=3), levels(shuffle=True, seed=3), levels(shuffle=True, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c) and torch.equal(a.sort().values, plain)
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, plain[perm])  # the order TensorSplit draws for the same seed


def test_imagefolder_workers_load_only_their_ranks_images(tmp_path):
    class Recording(torch.utils.data.Dataset):
        def __init__(self):
            self.seen = []

        def __len__(self):
            return 10

        def __getitem__(self, i):
            self.seen.append(i)
            return torch.full((3, 2, 2), float(i)), i % 2

    info = mdata.DatasetInfo("x", 2, 3, 2, (0.0,) * 3, (1.0,) * 3, "none", 0)
    ds = Recording()
    split = mdata.LoaderSplit(ds, ds, info, torch.device("cpu"), num_workers=0)
    order = torch.randperm(10, generator=torch.Generator().manual_seed(2)).tolist()
    # batches of 4, 4, 2; rank 1 of 3 gets piece [2:3] of the full ones, [1:2] of the last
    got = [x[:, 0, 0, 0].long().tolist() for x, _ in split.batches(4, shuffle=True, seed=2, chunk=(1, 3))]
    assert got == [order[2:3], order[6:7], order[9:10]] and sorted(ds.seen) == sorted(order[i] for i in (2, 6, 9))
    last = list(split.batches(4, shuffle=True, seed=2, chunk=(2, 3)))[-1]  # rank 2's piece of 2 images: empty
    assert tuple(last[0].shape) == (0, 3, 2, 2) and len(last[1]) == 0
    with pytest.raises(ValueError, match="chunk"):
        next(split.batches(4, chunk=(3, 3)))


def test_imagefolder_chunks_with_worker_processes(tmp_path):
    folder = _image_folder(tmp_path)
    one = load_data(f"imagefolder:{folder}", num_workers=0, image_size=8)
    two = load_data(f"imagefolder:{folder}", num_workers=2, image_size=8)
    for kw in ({"chunk": (1, 2)}, {"deal": (0, 2)}):
        a = list(one.train.batches(5, shuffle=True, seed=7, **kw))
        b = list(two.train.batches(5, shuffle=True, seed=7, **kw))
        assert len(a) == len(b) and all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))


def test_imagefolder_augmentation_is_the_same_for_any_workers_and_world_size(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for part in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / part / cls).mkdir(parents=True)
            for i in range(6):
                pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / part / cls / f"{i}.png")
    name = f"imagefolder:{tmp_path}"
    one, two = (load_data(name, num_workers=w, image_size=8, augment="crop-flip") for w in (0, 2))

    def images(d, seed=5, **kw):
        return torch.cat([x for x, _ in d.train.batches(5, shuffle=True, augment=True, seed=seed, **kw)])

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    whole = images(one)
    assert torch.equal(torch.rand(3), expected)  # the caller's own draws are untouched
    assert torch.equal(images(two), whole)  # worker processes draw what the main process draws
    ranks = [list(one.train.batches(5, shuffle=True, augment=True, seed=5, chunk=(r, 2))) for r in range(2)]
    assert torch.equal(torch.cat([torch.cat([a[0], b[0]]) for a, b in zip(*ranks)]), whole)  # 2 ranks: the same
    assert not torch.equal(images(one, seed=6).sort(0).values, whole.sort(0).values)  # another epoch: other crops
    plain = torch.cat([x for x, _ in one.train.batches(5, shuffle=True, seed=5)])
    assert not torch.equal(plain, whole)  # the augmentation did something
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()  # (Linux only)
    assert mdata.usable_workers(10**6) == cores and mdata.usable_workers(0) == 0


def test_imagefolder_uses_timms_transforms_for_a_model_config(tmp_path):
    from timm.data import create_transform

    cfg = {"input_size": [3, 12, 12], "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.25] * 3,
           "crop_pct": 0.75, "crop_mode": "center"}
    d = load_data(f"imagefolder:{_image_folder(tmp_path)}", num_workers=0, data_config=cfg)
    assert (d.info.image_size, d.info.mean, d.info.std) == (12, (0.5,) * 3, (0.25,) * 3)
    timm_cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
    assert repr(d.eval.eval_dataset.transform) == repr(create_transform(**timm_cfg, is_training=False))
    assert "RandomResizedCrop" in repr(d.train.train_dataset.transform)
    x, _ = next(d.eval.batches(4))
    assert tuple(x.shape) == (4, 3, 12, 12)
    torch.testing.assert_close(x[0], torch.full((3, 12, 12), (5 / 255 - 0.5) / 0.25))  # constant grey level 5
    xa, _ = next(d.train.batches(4, shuffle=True, augment=True, seed=0))
    assert tuple(xa.shape) == (4, 3, 12, 12)
    # a checkpoint's recorded normalisation still wins
    d2 = load_data(f"imagefolder:{tmp_path}", num_workers=0, data_config=cfg,
                   normalization={"mean": [0.1] * 3, "std": [0.2] * 3})
    assert d2.info.mean == (0.1,) * 3 and d2.info.std == (0.2,) * 3


def test_statistics_passes_read_class_sorted_data_in_a_random_order(tmp_path):
    """ImageFolder stores its images class by class; the BN pass (and REPAIR's) must not see single-class
    batches, whose variances miss the spread between the classes."""
    from mctool.bn import pass_batches, recalibrate_bn

    d = load_data(f"imagefolder:{_image_folder(tmp_path)}", num_workers=0, image_size=8)  # 2 x 10 grey levels
    x = torch.cat([x for x, _ in d.train.batches(20)])  # stored order: class a, then class b
    assert torch.cat([y for _, y in d.train.batches(20)]).tolist() == [0] * 10 + [1] * 10
    values = x.transpose(0, 1).reshape(3, -1)
    ordered = [y.tolist() for _, y in pass_batches(d.train, 5)]
    assert sorted(sum(ordered, [])) == [0] * 10 + [1] * 10  # every image once...
    assert all(0 < sum(b) < 5 for b in ordered[:2])  # ...in a fixed random order (PASS_SEED): mixed batches
    bn = torch.nn.BatchNorm2d(3)
    assert recalibrate_bn(bn, d.train, batch_size=5)
    # Batches of 5 drawn from 20 have unbiased variances averaging the whole set's (x 20/19, sampling without
    # replacement); the stored order's single-class batches would give under a tenth of it (measured: 0.06).
    ratio = bn.running_var / values.var(1)
    assert bool((ratio > 0.5).all()), ratio
    # --bn-batches 1: the first batch of the random order; the stored order's would be class a's darkest
    recalibrate_bn(bn, d.train, batch_size=5, max_batches=1)
    gap = (bn.running_mean - values.mean(1)).abs() / values.std(1)
    first_class = (x[:5].transpose(0, 1).reshape(3, -1).mean(1) - values.mean(1)).abs() / values.std(1)
    assert bool((gap < 0.6).all()) and bool((first_class > 1.2).all()), (gap, first_class)


def test_statistics_of_the_training_images_do_not_depend_on_threads():
    """digits and synthetic normalise with their own training images' statistics, which every checkpoint
    records and connect/ensemble compare: exact integer sums give the same digits on any machine."""
    images = torch.randint(0, 256, (300, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = mdata.pixel_stats(images)
        torch.set_num_threads(max(2, threads))
        assert mdata.pixel_stats(images) == one
    finally:
        torch.set_num_threads(threads)
    f = images.double() / 255
    np.testing.assert_allclose(one[0], f.mean(dim=(0, 2, 3)).numpy(), rtol=1e-15)
    np.testing.assert_allclose(one[1], f.std(dim=(0, 2, 3)).numpy(), rtol=1e-14)
    from mctool.checkpoint import same_normalization

    a = {"mean": list(one[0]), "std": list(one[1])}
    assert same_normalization(a, {"mean": [m * (1 + 1e-15) for m in one[0]], "std": list(one[1])})
    assert not same_normalization(a, {"mean": [m * (1 + 1e-6) for m in one[0]], "std": list(one[1])})
    assert not same_normalization(a, None) and same_normalization(None, None)


def test_imagefolder_train_and_val_must_hold_the_same_classes(tmp_path):
    """ImageFolder numbers classes in sorted order in each folder: a class missing from val/ would shift every
    later label (a perfect classifier scored 50% error)."""
    import shutil

    root = _image_folder(tmp_path)
    shutil.rmtree(root / "val" / "a")
    with pytest.raises(DataError, match="same class folders.*only one of them has: a"):
        load_data(f"imagefolder:{root}", num_workers=0, image_size=8)


# --- imagefolder: files PIL cannot read -------------------------------------------------------------------------


def _break_image(root: Path, kind: str) -> Path:
    """Spoil one training image of an ``_image_folder``: not an image at all, or a PNG cut short."""
    path = root / "train" / "b" / "3.png"
    if kind == "not-an-image":
        path.write_bytes(b"not really a png")
    else:
        path.write_bytes(path.read_bytes()[:50])  # the header and part of the pixel data (IDAT)
    return path


@pytest.mark.parametrize("kind", ["not-an-image", "truncated"])
@pytest.mark.parametrize("workers", [0, 2])
def test_imagefolder_unreadable_image_names_the_file(tmp_path, kind, workers):
    """PIL's UnidentifiedImageError or truncated-image OSError (re-raised by a DataLoader worker, with the
    worker's traceback in its text) becomes a DataError that names the file."""
    broken = _break_image(_image_folder(tmp_path), kind)
    name = f"imagefolder:{tmp_path}"
    import multiprocessing

    d = load_data(name, num_workers=workers, image_size=8)
    before = set(multiprocessing.active_children())
    with pytest.raises(DataError) as e:
        for _ in d.train.batches(4, shuffle=True, augment=True, seed=0):
            pass
    # the workers stop at once, not when the garbage collector finds them (seconds each)
    assert set(multiprocessing.active_children()) <= before
    message = str(e.value)
    assert message.startswith(f"cannot read image file '{broken}' of data set '{name}' (")
    assert message.endswith("); remove or replace that file.") and "Traceback" not in message
    assert ("cannot identify image file" if kind == "not-an-image" else "image file is truncated") in message


def test_imagefolder_unreadable_image_without_a_file_list_still_names_the_data_set():
    class Broken(torch.utils.data.Dataset):  # no ``samples``: the file cannot be looked up
        def __len__(self):
            return 4

        def __getitem__(self, i):
            raise OSError("image file is truncated (3 bytes not processed)")

    info = mdata.DatasetInfo("imagefolder:/x", 2, 3, 2, (0.0,) * 3, (1.0,) * 3, "none", 0)
    split = mdata.LoaderSplit(Broken(), Broken(), info, torch.device("cpu"), num_workers=0)
    with pytest.raises(DataError, match=r"^cannot read an image of data set 'imagefolder:/x' \(image file is "
                                        r"truncated \(3 bytes not processed\)\); remove or replace that file\.$"):
        next(split.batches(2))


def test_imagefolder_oserror_with_readable_files_keeps_its_traceback(tmp_path):
    """An OSError that no file of the batch explains (here, every file reads fine) is not the user's data:
    it propagates as it is."""
    import torchvision.datasets as tvd

    class OutOfFiles(tvd.ImageFolder):
        def __getitem__(self, i):
            raise OSError(24, "Too many open files")

    ds = OutOfFiles(_image_folder(tmp_path) / "train")
    info = mdata.DatasetInfo(f"imagefolder:{tmp_path}", 2, 3, 8, (0.0,) * 3, (1.0,) * 3, "none", 0)
    split = mdata.LoaderSplit(ds, ds, info, torch.device("cpu"), num_workers=0)
    with pytest.raises(OSError, match="Too many open files"):
        next(split.batches(4))


@pytest.mark.parametrize("workers", [[], ["--num-workers", "0"]])  # the default (4 worker processes), and none
def test_cli_reports_an_unreadable_image_in_one_line(tmp_path, cli, workers):
    broken = _break_image(_image_folder(tmp_path / "imf"), "not-an-image")
    out = tmp_path / "imf.safetensors"
    err = cli.error("train", "-d", f"imagefolder:{tmp_path / 'imf'}", "-a", "mlp", "--arch-kwargs", '{"hidden": 4}',
                    "--epochs", "1", *workers, "-o", out, "-q", "--device", "cpu")
    assert err.startswith(f"Error: cannot read image file '{broken}' of data set 'imagefolder:{tmp_path / 'imf'}'")
    assert err.endswith("remove or replace that file.")
    assert not out.exists()


# --- empty splits -----------------------------------------------------------------------------------------------


def test_val_split_that_leaves_no_training_images_is_refused():
    """--split val holds out max(1, round(n / 10)) images: a training set of one image has none left."""
    assert len(load_data("synthetic:size=4,channels=1,train=2,test=1", split="val").train) == 1  # still allowed
    with pytest.raises(DataError) as e:
        load_data("synthetic:size=4,channels=1,train=1,test=1", split="val")
    assert str(e.value) == ("data set 'synthetic:size=4,channels=1,train=1,test=1' has no training images left with "
                            "--split val: it holds out 1 of its 1 training image(s) for validation. Use --split test, "
                            "or a data set with more training images (a larger train=N).")


@pytest.mark.filterwarnings("ignore:data set .* has a single class")  # one class folder: warned, as it should
def test_imagefolder_val_split_that_leaves_no_training_images_is_refused(tmp_path):
    from PIL import Image

    for part in ("train", "val"):
        (tmp_path / part / "a").mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / part / "a" / "0.png")
    assert len(load_data(f"imagefolder:{tmp_path}", num_workers=0, image_size=8).train) == 1
    with pytest.raises(DataError, match=r"^data set 'imagefolder:.*' has no training images left with --split val: "
                                        r"it holds out 1 of its 1 .*Use --split test, or a data set with more "
                                        r"training images\.$"):
        load_data(f"imagefolder:{tmp_path}", split="val", num_workers=0, image_size=8)


@pytest.mark.parametrize("n_train, n_test, why", [(0, 3, "has no training images; use a data set with a training set."),
                                                  (6, 0, "has no test images (--split test); use --split val")])
def test_idx_data_set_with_an_empty_split_is_refused(tmp_path, n_train, n_test, why):
    _fashion_folder(tmp_path, n_train, n_test)
    with pytest.raises(DataError) as e:
        load_data("fashion-mnist", root=tmp_path)
    assert str(e.value).startswith(f"data set 'fashion-mnist' {why}")


def test_cli_refuses_an_empty_training_split_before_any_work(tmp_path, cli):
    """train once gave --batch-size advice; evaluate-curve crashed in torch.cat after writing its metrics file."""
    spec = "synthetic:size=4,channels=1,train=1"
    refusal = (f"Error: data set '{spec}' has no training images left with --split val: it holds out 1 of its 1 "
               "training image(s) for validation. Use --split test, or a data set with more training images (a larger "
               "train=N).")
    ends = []
    for seed in (0, 1):
        ends.append(tmp_path / f"m{seed}.safetensors")
        cli("train", "-d", "synthetic:size=4,channels=1,train=16,test=4", "-a", "mlp", "--arch-kwargs",
            '{"hidden": 4}', "--epochs", "1", "--seed", seed, "-o", ends[-1], "-q", "--device", "cpu")
    out = tmp_path / "t.safetensors"
    assert cli.error("train", "-d", spec, "--split", "val", "--epochs", "1", "-o", out, "-q", "--device",
                     "cpu") == refusal
    metrics = tmp_path / "seg.h5"
    assert cli.error("evaluate-curve", *ends, "-m", metrics, "-d", spec, "--split", "val", "--num-points", "3", "-q",
                     "--device", "cpu") == refusal
    assert not out.exists() and not metrics.exists()


def test_bn_recalibration_on_a_single_training_image_names_the_data_set():
    """A pass leaves out a batch of one image; with nothing else to see it refuses, naming the data set."""
    from mctool.bn import recalibrate_bn

    d = load_data("synthetic:size=4,channels=1,train=2,test=1", split="val")  # one training image left
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3), torch.nn.BatchNorm1d(3))
    with pytest.raises(DataError) as e:
        recalibrate_bn(model, d.train, batch_size=4)
    assert str(e.value) == ("the BatchNorm recalibration pass saw no training images: data set "
                            "'synthetic:size=4,channels=1,train=2,test=1' has 1 training image(s), and the pass needs "
                            "a batch of at least 2. Use a data set with more training images, or --split test if "
                            "--split val held some out.")


def test_data_fingerprints_tell_copies_from_other_data(tmp_path):
    """What ranks compare (distributed.check_same_data): equal for copies of a data set wherever they lie, not
    for one changed pixel or label, nor for an image folder with an image added or moved to another class."""
    x, y = torch.arange(24, dtype=torch.uint8).reshape(2, 1, 3, 4), torch.tensor([0, 1])
    fp = mdata._tensors_fingerprint(x, y)
    assert fp == mdata._tensors_fingerprint(x.clone(), y.clone())
    changed = x.clone()
    changed[1, 0, 2, 3] += 1
    assert len({fp, mdata._tensors_fingerprint(changed, y), mdata._tensors_fingerprint(x, y.flip(0)),
                mdata._tensors_fingerprint(x.reshape(2, 1, 4, 3), y)}) == 4
    import torchvision.datasets as tvd

    def fingerprint(root: Path) -> str:
        return mdata._folder_fingerprint(tvd.ImageFolder(root / "train"), tvd.ImageFolder(root / "val"))

    one, two = _image_folder(tmp_path / "one", per_class=3), _image_folder(tmp_path / "two", per_class=3)
    assert fingerprint(one) == fingerprint(two)
    (two / "train" / "a" / "3.png").write_bytes((two / "train" / "a" / "0.png").read_bytes())
    extra = fingerprint(two)
    (two / "train" / "a" / "3.png").rename(two / "train" / "b" / "3.png")
    assert len({fingerprint(one), extra, fingerprint(two)}) == 3


def test_a_data_root_with_a_tilde_is_the_home_folder(tmp_path, monkeypatch):
    """bash leaves `--data-root=~/data` (and MCTOOL_DATA="~/data" in an env file) as it is."""
    folder = tmp_path / "data" / "fashion-mnist"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    _write_idx(folder / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (6, 4, 5)))
    _write_idx(folder / "train-labels-idx1-ubyte.gz", np.arange(6))
    _write_idx(folder / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (3, 4, 5)))
    _write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.arange(3))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert len(load_data("fashion-mnist", root="~/data").train) == 6
    monkeypatch.setenv("MCTOOL_DATA", "~/data")
    assert mdata.default_data_root() == tmp_path / "data" and len(load_data("fashion-mnist").train) == 6
