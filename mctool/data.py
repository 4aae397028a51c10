"""Data sets as device tensors with batched, on-device normalisation and augmentation.

Small data sets (everything except ``imagefolder:PATH``) are held as uint8 image tensors on the compute
device; each batch is gathered, augmented and normalised there, so training never waits on per-sample
Python transforms. ``imagefolder:PATH`` streams through torchvision's ImageFolder and a DataLoader.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol

import numpy as np
import torch

from . import distributed
from .choices import AUGMENTS, SPLITS
from .errors import ConfigError, DataError
from .options import check_count
from .calls import library_call
from .runtime import resolve_device

DATASETS = ("digits", "fashion-mnist", "mnist", "cifar10", "cifar100", "svhn", "synthetic", "imagefolder:PATH")
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

# Per-channel mean and std of the training images (pixel values in [0, 1]).
_STATS = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
# Flips suit natural images; digits (including SVHN's house numbers) are not mirror-symmetric.
_DEFAULT_AUGMENT = {"digits": "crop", "mnist": "crop", "fashion-mnist": "crop", "cifar10": "crop-flip",
                    "cifar100": "crop-flip", "svhn": "crop", "synthetic": "crop-flip", "imagefolder": "crop-flip"}
#: Default architecture per data set (see docs/datasets.md).
DEFAULT_ARCH = {"digits": "mlp", "mnist": "cifar_preresnet20", "fashion-mnist": "cifar_preresnet20",
                "cifar10": "cifar_preresnet20", "cifar100": "cifar_preresnet20", "svhn": "cifar_preresnet20",
                "synthetic": "cifar_convfc", "imagefolder": "resnet18"}
_GROUP_BYTES = 64 << 20  # float32 images prepared at once by TensorSplit.batches
_MAX_SYNTHETIC = 1 << 28  # values of a synthetic data set (1 GiB as float32 while it is made)
_VAL_SIZE = 5000  # held out from the end of the training set for --split val (10% for small sets)


def default_data_root() -> Path:
    return Path(os.environ.get("MCTOOL_DATA") or Path.home() / ".cache" / "mctool" / "datasets").expanduser()


@dataclass
class DatasetInfo:
    """What a model needs to know about its data; recorded in every checkpoint."""

    name: str  # the --dataset string, e.g. "cifar10" or "synthetic:size=16,classes=4"
    num_classes: int
    in_chans: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str  # "none", "crop" or "crop-flip"
    crop_padding: int

    @property
    def base(self) -> str:
        return self.name.split(":", 1)[0]

    @property
    def normalization(self) -> dict[str, list[float]]:
        return {"mean": list(self.mean), "std": list(self.std)}


class Split(Protocol):
    """One split of a data set: a sized source of (images, labels) batches on the compute device."""

    device: torch.device

    def __len__(self) -> int: ...

    def batches(self, batch_size: int, *, shuffle: bool = False, augment: bool = False, seed: int = 0,
                drop_last: bool = False, chunk: tuple[int, int] | None = None,
                deal: tuple[int, int] | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of ``batch_size`` (the last one smaller unless ``drop_last``); ``seed`` fixes order and
        augmentation. For distributed runs, as (rank, world): ``chunk`` yields only this rank's contiguous
        piece of every batch (sizes as ``torch.tensor_split``), ``deal`` only the batches i with
        i % world == rank; either way the global batches are the ones formed without it."""
        ...

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int: ...

    def subset(self, n: int) -> "Split": ...


class TensorSplit:
    """uint8 images ``[N, C, H, W]`` and int64 labels held on one device."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, info: DatasetInfo, device: torch.device,
                 channels_last: bool = False):
        self.images = images.to(device)
        self.labels = labels.to(device=device, dtype=torch.long)
        self.info = info
        self.device = device
        self.channels_last = channels_last
        self._mean = torch.tensor(info.mean, device=device).view(1, -1, 1, 1) * 255.0
        self._std = torch.tensor(info.std, device=device).view(1, -1, 1, 1) * 255.0

    def __len__(self) -> int:
        return self.images.shape[0]

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        n = len(self)
        return n // batch_size if drop_last else -(-n // batch_size)

    def batches(self, batch_size: int, *, shuffle: bool = False, augment: bool = False, seed: int = 0,
                drop_last: bool = False, chunk: tuple[int, int] | None = None,
                deal: tuple[int, int] | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield normalised float batches; ``seed`` fixes the order and the augmentation exactly (``Split``
        explains ``chunk`` and ``deal``: a rank gets the same images and augmentation as in one process)."""
        n = len(self)
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(n, generator=g).to(self.device) if shuffle else None
        starts = range(0, n - batch_size + 1 if drop_last else n, batch_size)
        pieces = batch_pieces(starts, batch_size, n, chunk=chunk, deal=deal)
        augment = augment and self.info.augment != "none" and len(starts) > 0
        if augment:
            # The whole epoch's random numbers, drawn in batch order (as augment_batch would draw them) and
            # sent to the device in one copy instead of three small blocking copies per batch.
            pad, flip = self.info.crop_padding, self.info.augment == "crop-flip"
            draws = [_draw_augment(min(batch_size, n - s), pad, flip, g) for s in starts]
            rand = torch.stack([torch.cat(r) for r in zip(*draws)]).to(self.device)  # [3, covered images]
        # Several batches are gathered, augmented and normalised together (each image on its own, so the
        # values are the same as batch by batch) and handed out as slices: a handful of kernel launches per
        # group instead of per batch, which is what a CUDA-graph step would otherwise wait on.
        group = max(1, _GROUP_BYTES // (batch_size * math.prod(self.images.shape[1:]) * 4))
        for i in range(0, len(pieces), group):
            part = pieces[i:i + group]
            first, end = part[0][0], part[-1][1]
            if end - first == sum(hi - lo for lo, hi in part):  # contiguous (always, without chunk or deal)
                pos: slice | torch.Tensor = slice(first, end)
            else:
                pos = torch.cat([torch.arange(lo, hi) for lo, hi in part]).to(self.device)
            idx = order[pos] if order is not None else pos
            x = self.images[idx]
            if augment:
                x = _apply_augment(x, pad, *rand[:, pos])
            x, y = self.normalize(x), self.labels[idx]
            at = 0
            for lo, hi in part:
                yield x[at:at + hi - lo], y[at:at + hi - lo]
                at += hi - lo

    def subset(self, n: int) -> "TensorSplit":
        """A fixed random subset of ``n`` samples (the same for every call), e.g. for cheaper train metrics."""
        if n >= len(self):
            return self
        idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(0))[:n].to(self.device)
        return TensorSplit(self.images[idx], self.labels[idx], self.info, self.device, self.channels_last)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32, copy=True).sub_(self._mean).div_(self._std)  # (in place: one new tensor, not three)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def chunk_bounds(size: int, rank: int, world: int) -> tuple[int, int]:
    """Rows [lo, hi) of rank ``rank``'s piece of a batch of ``size``: ``torch.tensor_split``'s sizes (the
    first size % world pieces one row longer)."""
    q, rem = divmod(size, world)
    lo = rank * q + min(rank, rem)
    return lo, lo + q + (rank < rem)


def batch_pieces(starts: range, batch_size: int, n: int, *, chunk: tuple[int, int] | None = None,
                 deal: tuple[int, int] | None = None) -> list[tuple[int, int]]:
    """Positions [lo, hi) in the epoch's order of what a rank gets of each batch (see ``Split.batches``)."""
    for name, part in (("chunk", chunk), ("deal", deal)):
        if part is not None and not (isinstance(part, tuple) and len(part) == 2 and 0 <= part[0] < part[1]):
            raise ValueError(f"{name} must be (rank, world) with 0 <= rank < world, got {part!r}")
    pieces = []
    for k, s in enumerate(starts):
        if deal is not None and k % deal[1] != deal[0]:
            continue
        b = min(batch_size, n - s)
        lo, hi = chunk_bounds(b, *chunk) if chunk is not None else (0, b)
        pieces.append((s + lo, s + hi))
    return pieces


def augment_batch(x: torch.Tensor, padding: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding (and optional horizontal flip) of a whole uint8 batch at once."""
    draws = _draw_augment(x.shape[0], padding, flip, generator)
    return _apply_augment(x, padding, *(r.to(x.device) for r in draws))


def _draw_augment(b: int, padding: int, flip: bool, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """The random numbers of one batch's augmentation, drawn on the CPU (the same on every device):
    crop offsets (y, x) and flip flags, as int64 ``[b]`` each (unused ones are zeros)."""
    zeros = torch.zeros(b, dtype=torch.long)
    oy = torch.randint(0, 2 * padding + 1, (b,), generator=generator) if padding > 0 else zeros
    ox = torch.randint(0, 2 * padding + 1, (b,), generator=generator) if padding > 0 else zeros
    flips = (torch.rand(b, generator=generator) < 0.5).long() if flip else zeros
    return oy, ox, flips


def _apply_augment(x: torch.Tensor, padding: int, oy: torch.Tensor, ox: torch.Tensor,
                   flips: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    dev = x.device
    if padding > 0:
        padded = torch.nn.functional.pad(x, (padding,) * 4)
        rows = (oy[:, None] + torch.arange(h, device=dev))[:, None, :, None]
        cols = (ox[:, None] + torch.arange(w, device=dev))[:, None, None, :]
        x = padded[torch.arange(b, device=dev)[:, None, None, None], torch.arange(c, device=dev)[None, :, None, None],
                   rows, cols]
    return torch.where(flips.bool()[:, None, None, None], x.flip(3), x)


class LoaderSplit:
    """An ImageFolder split streamed through a multi-worker DataLoader (for data too big for memory)."""

    def __init__(self, train_dataset, eval_dataset, info: DatasetInfo, device: torch.device,
                 num_workers: int, channels_last: bool = False):
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.info, self.device, self.num_workers, self.channels_last = info, device, num_workers, channels_last

    def __len__(self) -> int:
        return len(self.eval_dataset)

    def subset(self, n: int) -> "LoaderSplit":
        if n >= len(self):
            return self
        idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(0))[:n].tolist()
        sub = torch.utils.data.Subset
        return LoaderSplit(sub(self.train_dataset, idx), sub(self.eval_dataset, idx), self.info, self.device,
                           self.num_workers, self.channels_last)

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        return len(self) // batch_size if drop_last else -(-len(self) // batch_size)

    def batches(self, batch_size: int, *, shuffle: bool = False, augment: bool = False, seed: int = 0,
                drop_last: bool = False, chunk: tuple[int, int] | None = None,
                deal: tuple[int, int] | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield batches loaded by DataLoader workers; ``seed`` fixes the order (``torch.randperm``, as
        ``TensorSplit`` draws it) and the workers' seeds.

        ``chunk=(rank, world)``: the same global batches, but only rank's contiguous piece of each (sizes as
        ``torch.tensor_split`` cuts them; an empty piece is an empty batch, so that every rank yields as many
        batches). ``deal=(rank, world)``: only the whole global batches ``i`` with ``i % world == rank``.
        Either way the workers load only this rank's images.
        """
        n = len(self)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist() if shuffle else range(n)
        starts = range(0, n - batch_size + 1 if drop_last else n, batch_size)
        index = [list(order[lo:hi]) for lo, hi in batch_pieces(starts, batch_size, n, chunk=chunk, deal=deal)]
        ds = _SeededImages(self.train_dataset, seed) if augment else self.eval_dataset
        loader = iter(torch.utils.data.DataLoader(
            ds, batch_sampler=[b for b in index if b], num_workers=usable_workers(self.num_workers),
            pin_memory=self.device.type == "cuda", generator=torch.Generator().manual_seed(seed),
            persistent_workers=False))
        size = self.info.image_size
        for b in index:
            try:
                x, y = next(loader) if b else (torch.empty(0, self.info.in_chans, size, size),
                                               torch.empty(0, dtype=torch.long))
            except OSError as e:  # PIL's UnidentifiedImageError, "image file is truncated", a vanished file
                error = self._unreadable(ds, b, e)
                if error is None:  # every image of the batch reads fine: not a damaged file, keep the traceback
                    raise
                # A worker's re-raised exception holds the loader in a reference cycle through its traceback; left
                # to the garbage collector, its worker processes take seconds each to stop. Let them go now.
                e.__traceback__ = None
                del loader
                raise error from None
            x = x.to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y.to(self.device, non_blocking=True)

    def _unreadable(self, ds, batch: list[int], e: OSError) -> DataError | None:
        """The error for an image of ``batch`` that could not be loaded, naming the first file of the batch
        that PIL cannot open and decode; None if the data set lists its files and all of them can be read."""
        from PIL import Image

        for i in batch:
            path = _sample_path(ds, i)
            if path is None:
                break
            try:
                with Image.open(path) as im:
                    im.load()
            except OSError as err:
                return DataError(f"cannot read image file '{path}' of data set '{self.info.name}' ({err}); remove "
                                 "or replace that file.")
        else:
            return None
        # A worker's exception comes back with the worker's traceback in its text: keep its last line only.
        lines = str(e).strip().splitlines()
        detail = lines[-1] if lines else type(e).__name__
        return DataError(f"cannot read an image of data set '{self.info.name}' ({detail}); remove or replace that "
                         "file.")


def usable_workers(requested: int) -> int:
    """``--num-workers``, at most the CPU cores this process may use (more only compete for them, and PyTorch
    warns); the count changes no value (``_SeededImages``)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return min(requested, cores)


class _SeededImages(torch.utils.data.Dataset):
    """A data set whose random transforms draw image ``i``'s augmentation from ``(seed, i)`` alone, so that it is
    the same for any number of DataLoader workers, any world size and any batch the image lands in (a worker's
    own random state would depend on all three). The CPU random states of torch, ``random`` and NumPy (timm's
    and torchvision's transforms use them) are restored afterwards, so the loading process's own draws are
    untouched when it loads the images itself (``--num-workers 0``)."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        state = np.random.SeedSequence([self.seed % 2**64, i]).generate_state(2, np.uint64)
        saved = torch.random.default_generator.get_state(), random.getstate(), np.random.get_state()
        try:
            torch.random.default_generator.manual_seed(int(state[0] >> np.uint64(1)))
            random.seed(int(state[1]))
            np.random.seed(int(state[1] % 2**32))
            return self.dataset[i]
        finally:
            torch.random.default_generator.set_state(saved[0])
            random.setstate(saved[1])
            np.random.set_state(saved[2])


def _sample_path(ds, i: int) -> str | None:
    """The file of sample ``i`` of an ImageFolder (or a Subset of one), or None for other data sets."""
    while isinstance(ds, (torch.utils.data.Subset, _SeededImages)):
        if isinstance(ds, torch.utils.data.Subset):
            i = ds.indices[i]
        ds = ds.dataset
    samples = getattr(ds, "samples", None)
    return samples[i][0] if samples is not None else None


@dataclass
class Data:
    """A data set ready for training and evaluation; ``eval`` is the test set or the held-out validation set."""

    info: DatasetInfo
    train: Split
    eval: Split
    eval_split: str  # "test" or "val"
    sources: list[str] = field(default_factory=list)
    #: sha256 of the whole data set before any split: its images' and labels' bytes, or for ``imagefolder:``
    #: its class folders and image names (``_folder_fingerprint``). Recorded as ``data_fingerprint``.
    fingerprint: str = ""


def pixel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (unbiased) standard deviation of uint8 images ``[N, C, H, W]`` as fractions of
    255, from exact integer sums: the same digits on every machine and thread count (a float reduction's
    last digits depend on how it is split, and checkpoints from two machines must compare equal)."""
    n = images.numel() // images.shape[1]
    sums = images.sum(dim=(0, 2, 3), dtype=torch.int64)
    squares = torch.zeros_like(sums)
    for part in images.split(4096):  # squares in pieces: never a wide copy of the whole set
        x = part.to(torch.int32)
        squares += (x * x).sum(dim=(0, 2, 3), dtype=torch.int64)
    sums, squares = sums.tolist(), squares.tolist()
    mean = tuple(s / (255 * n) for s in sums)  # int / int: correctly rounded
    var = [(n * q - s * s) / (n * max(n - 1, 1) * 255 * 255) for s, q in zip(sums, squares)]
    return mean, tuple(max(math.sqrt(v), 1e-3) for v in var)


def check_fits(meta: Any, info: DatasetInfo, what: str | os.PathLike) -> None:
    """Refuse a data set whose classes, channels or image size do not match a network (``meta``: its
    ``checkpoint.ModelMeta``; a network that records no image size takes any)."""
    if meta.num_classes != info.num_classes:
        raise DataError(f"'{what}' predicts {meta.num_classes} classes but data set '{info.name}' has "
                        f"{info.num_classes}; give a data set of {meta.num_classes} classes with --dataset.")
    if meta.in_chans != info.in_chans:
        raise DataError(f"'{what}' takes {meta.in_chans}-channel images but data set '{info.name}' has "
                        f"{info.in_chans} channels; give a data set of {meta.in_chans}-channel images (a plain "
                        "state dict: --in-chans says how many it takes).")
    size = getattr(meta, "image_size", None)
    if size is not None and size != info.image_size:
        raise DataError(f"'{what}' was trained on {size}x{size} images but data set '{info.name}' has "
                        f"{info.image_size}x{info.image_size}; evaluate it on data of its size.")


def _parse_options(spec: str, allowed: dict[str, int]) -> dict[str, int]:
    opts, seen = dict(allowed), set()
    if ":" in spec:
        for item in filter(None, spec.split(":", 1)[1].split(",")):
            key, _, value = item.partition("=")
            if (key not in allowed or not (value.isascii() and value.isdecimal())
                    or not (0 if key == "seed" else 1) <= int(value) < 2**63):
                raise ConfigError(f"bad data set option '{item}' in '{spec}'; allowed: "
                                  + ", ".join(f"{k}=N" for k in allowed) + " (positive integers; seed may be 0; "
                                  "below 2^63).")
            if key in seen:
                raise ConfigError(f"data set option '{key}' is given twice in '{spec}'.")
            seen.add(key)
            opts[key] = int(value)
    return opts


_SYNTHETIC_DEFAULTS = {"size": 32, "channels": 3, "classes": 10, "train": 1024, "test": 256, "seed": 0}


def canonical_dataset(name: str) -> str:
    """One spelling per data set, for comparing the data sets networks record: ``synthetic:`` options in their
    fixed order, defaults left out (the same images, however the spec was written); ``imagefolder:`` the
    folder's absolute, normalised path (a relative one taken from the current folder); other names as they
    are. A spec that does not parse is returned as it is."""
    base, _, rest = name.partition(":")
    if base == "synthetic":
        try:
            opts = _parse_options(name, _SYNTHETIC_DEFAULTS)
        except ConfigError:
            return name
        given = [f"{k}={v}" for k, v in opts.items() if v != _SYNTHETIC_DEFAULTS[k]]
        return "synthetic" + (":" + ",".join(given) if given else "")
    if base == "imagefolder" and rest:
        return "imagefolder:" + os.path.abspath(os.path.expanduser(rest))
    return name


def _synthetic(spec: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """Seeded, learnable random images: a smooth prototype per class plus per-image noise."""
    o = _parse_options(spec, _SYNTHETIC_DEFAULTS)
    pixels = o["size"] ** 2 * o["channels"]
    if pixels * (o["train"] + o["test"] + o["classes"]) > _MAX_SYNTHETIC or o["classes"] > 100_000:
        raise ConfigError(f"'{spec}' is too large: (train + test + classes) x size^2 x channels must be at most "
                          f"{_MAX_SYNTHETIC:,} values (and classes at most 100,000).")
    g = torch.Generator().manual_seed(o["seed"])
    low = max(2, o["size"] // 4)
    protos = torch.rand(o["classes"], o["channels"], low, low, generator=g)
    protos = torch.nn.functional.interpolate(protos, size=(o["size"], o["size"]), mode="bilinear", align_corners=False)

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = torch.randint(0, o["classes"], (n,), generator=g)
        x = protos[y] + 0.35 * torch.randn(n, o["channels"], o["size"], o["size"], generator=g)
        return (x.clamp(0, 1) * 255).round().to(torch.uint8).numpy(), y.numpy()

    return (*sample(o["train"]), *sample(o["test"]), o["classes"])


def _digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits, read from its CSV without importing scikit-learn (seconds faster)."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the 'digits' data set comes with scikit-learn; install it: pip install scikit-learn")
    csv = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "digits.csv.gz"
    raw = np.loadtxt(csv, delimiter=",", dtype=np.int64)
    x = np.round(raw[:, :64].reshape(-1, 1, 8, 8) * (255.0 / 16.0)).astype(np.uint8)
    y = raw[:, 64]
    # A fixed seed: the split is part of the data set's definition, not of a run. Stratified: each
    # class gives its share of the 20% test set (largest remainders settle the rounding).
    rng = np.random.default_rng(0)
    classes, counts = np.unique(y, return_counts=True)
    n_test = int(np.ceil(0.2 * len(y)))
    exact = counts * n_test / len(y)
    take = np.floor(exact).astype(int)
    take[np.argsort(-(exact - take), kind="stable")[: n_test - take.sum()]] += 1
    test = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:k] for c, k in zip(classes, take)])
    is_test = np.zeros(len(y), dtype=bool)
    is_test[test] = True
    train_idx, test_idx = rng.permutation(np.flatnonzero(~is_test)), rng.permutation(test)
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx]


def _read_idx_gz(path: Path, ndim: int) -> np.ndarray:
    """An IDX array of ``ndim`` dimensions from a gzip file; ValueError if its header or length is wrong."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08" or raw[3] != ndim:
        raise ValueError(f"not an IDX file of {ndim}-D unsigned bytes: header {raw[:4].hex(' ') or 'missing'}, "
                         f"expected 00 00 08 {ndim:02x}")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expected = 4 + 4 * ndim + math.prod(dims)
    if len(raw) != expected:
        raise ValueError(f"{len(raw):,} bytes, but its header ({' x '.join(map(str, dims))}) says {expected:,}")
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims).copy()


def _idx_folder(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    names = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
    if not all((folder / n).is_file() for n in names):
        return None

    def damaged(why: str) -> DataError:
        return DataError(f"the data set files in '{folder}' are damaged ({why}); re-install or re-download them.")

    arrays = []
    for n, ndim in zip(names, (3, 1, 3, 1)):
        try:
            arrays.append(_read_idx_gz(folder / n, ndim))
        except (OSError, EOFError, ValueError) as e:
            raise damaged(f"{n}: {e}") from None
    xtr, ytr, xte, yte = arrays
    for part, x, y in (("train", xtr, ytr), ("t10k", xte, yte)):
        if len(x) != len(y):
            raise damaged(f"{part}-images holds {len(x):,} images but {part}-labels {len(y):,} labels")
        if y.size and y.max() >= 10:
            raise damaged(f"{part}-labels holds label {int(y.max())}; fashion-mnist's labels are 0 to 9")
    if xtr.shape[1:] != xte.shape[1:]:
        raise damaged(f"train-images are {'x'.join(map(str, xtr.shape[1:]))} pixels but t10k-images "
                      f"{'x'.join(map(str, xte.shape[1:]))}")
    return xtr[:, None], ytr, xte[:, None], yte


def _torchvision(base: str, root: Path, download: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    import torchvision.datasets as tvd

    looked = [root]
    if base == "fashion-mnist":
        for folder in (root / "fashion-mnist", DEBIAN_FASHION_MNIST):
            found = _idx_folder(folder)
            if found is not None:
                return found
            looked.append(folder)
    cls = {"mnist": tvd.MNIST, "fashion-mnist": tvd.FashionMNIST, "cifar10": tvd.CIFAR10,
           "cifar100": tvd.CIFAR100, "svhn": tvd.SVHN}[base]
    try:
        if base == "svhn":
            tr, te = cls(str(root), split="train", download=download), cls(str(root), split="test", download=download)
            return tr.data, tr.labels, te.data, te.labels
        tr, te = cls(str(root), train=True, download=download), cls(str(root), train=False, download=download)
    except (RuntimeError, OSError) as e:
        if download:
            raise DataError(f"could not download '{base}' into '{root}': {e}") from None
        hint = " or install Debian's package: apt-get install dataset-fashion-mnist" if base == "fashion-mnist" else ""
        raise DataError(
            f"data set '{base}' not found; looked in: {', '.join(str(p) for p in looked)}. "
            f"Get it with --download (needs internet; stores it under --data-root), or put the files there "
            f"yourself in torchvision's layout{hint}.") from None
    xtr, xte = np.asarray(tr.data), np.asarray(te.data)
    if xtr.ndim == 3:
        xtr, xte = xtr[:, None], xte[:, None]
    else:  # CIFAR stores NHWC
        xtr, xte = xtr.transpose(0, 3, 1, 2), xte.transpose(0, 3, 1, 2)
    return xtr, np.asarray(tr.targets), xte, np.asarray(te.targets)


def _val_size(n_train: int) -> int:
    return _VAL_SIZE if n_train >= 10 * _VAL_SIZE else max(1, round(n_train / 10))


def _warn_one_class(name: str, num_classes: int) -> None:
    if num_classes < 2:
        from .console import warn

        warn(f"data set '{name}' has a single class: every network predicts it with zero loss and error, so "
             "curves, planes and ensembles show nothing; give a data set of two classes or more.")


def _check_not_empty(name: str, split: str, n_train: int, n_eval: int, n_total: int) -> None:
    """Refuse a data set whose training or evaluation split is empty (``n_total``: training images before
    --split val held some out), before any command starts work on it."""
    more = " (a larger train=N)" if name.split(":", 1)[0] == "synthetic" else ""
    if n_train == 0 and n_total > 0:
        raise DataError(f"data set '{name}' has no training images left with --split val: it holds out "
                        f"{n_total - n_train} of its {n_total} training image(s) for validation. Use --split test, "
                        f"or a data set with more training images{more}.")
    if n_train == 0:
        raise DataError(f"data set '{name}' has no training images; use a data set with a training set{more}.")
    if n_eval == 0:
        raise DataError(f"data set '{name}' has no test images (--split test); use --split val, which holds out part "
                        "of the training images for evaluation.")


def _check_augment(augment: str) -> None:
    if augment not in AUGMENTS:
        raise ConfigError(f"--augment must be one of {', '.join(AUGMENTS)}, got '{augment}'.")


#: The data sets read from their original files (torchvision's downloads, or Debian's Fashion-MNIST).
_FILE_SETS = ("mnist", "fashion-mnist", "cifar10", "cifar100", "svhn")


def check_dataset_name(name: Any) -> None:
    """A data set name ``load_data`` knows (``DATASETS``), with the options it takes, checked without reading
    anything (``load_data`` starts with it; ``point`` checks its --dataset with it, which it reads only for a
    network with BatchNorm)."""
    if not isinstance(name, str):
        raise ConfigError(f"the data set must be named by a string (--dataset), got {name!r}.")
    base = name.split(":", 1)[0]
    if base in ("digits", *_FILE_SETS):
        if ":" in name:
            raise ConfigError(f"'{base}' takes no options.")
    elif base == "synthetic":
        _parse_options(name, _SYNTHETIC_DEFAULTS)
    elif base == "imagefolder":
        if not name.partition(":")[2]:  # (whether the folder holds train/ and val/ is seen when it is read)
            raise DataError(f"'{name}' needs a folder: imagefolder:PATH, with 'train/' and 'val/' inside (e.g. "
                            "imagefolder:/data/imagenet).")
    else:
        raise ConfigError(f"unknown data set '{name}'; choose one of: {', '.join(DATASETS)}.")


@library_call
def load_data(name: str, *, root: str | os.PathLike | None = None, split: str = "test", download: bool = False,
              device: torch.device | str = "cpu", augment: str = "auto", channels_last: bool = False,
              normalization: dict[str, list[float]] | None = None, num_workers: int = 4,
              image_size: int = 224, data_config: dict | None = None) -> Data:
    """Load a data set by name (see ``DATASETS``) onto ``device``.

    ``split="val"`` holds out the last 5,000 training images (10% for sets under 50,000; for ``imagefolder:``
    as many drawn at random with a fixed seed) as the evaluation set. ``normalization`` overrides the data
    set's mean/std (use a checkpoint's).
    ``data_config`` (timm's ``resolve_data_config`` of a pretrained model) makes ``imagefolder:PATH`` use
    timm's transforms for that model; the other data sets keep their own size and normalisation.
    """
    check_dataset_name(name)
    if split not in SPLITS:
        raise ConfigError(f"--split must be one of {', '.join(SPLITS)}, got '{split}'.")
    check_count("--num-workers", num_workers, 0)
    _check_augment(augment)
    if not isinstance(device, torch.device):  # (a command passes the device it resolved)
        device = resolve_device(device)
    root = Path(root).expanduser() if root is not None else default_data_root()
    base = name.split(":", 1)[0]
    if base == "imagefolder":
        return _load_imagefolder(name, split, device, augment, channels_last, normalization, num_workers, image_size,
                                 data_config)
    if base == "digits":
        xtr, ytr, xte, yte = _digits()
        num_classes = 10
    elif base == "synthetic":
        xtr, ytr, xte, yte, num_classes = _synthetic(name)
    else:  # (one of _FILE_SETS: check_dataset_name let nothing else through)
        xtr, ytr, xte, yte = _torchvision(base, root, download)
        num_classes = 100 if base == "cifar100" else 10
    xtr, xte = torch.from_numpy(np.ascontiguousarray(xtr)), torch.from_numpy(np.ascontiguousarray(xte))
    ytr, yte = torch.as_tensor(np.asarray(ytr), dtype=torch.long), torch.as_tensor(np.asarray(yte), dtype=torch.long)
    in_chans, size = xtr.shape[1], xtr.shape[2]
    if normalization is not None:
        mean, std = tuple(normalization["mean"]), tuple(normalization["std"])
    elif base in _STATS:
        mean, std = _STATS[base]
    else:  # digits and synthetic: statistics of the training images themselves
        mean, std = pixel_stats(xtr)
    info = DatasetInfo(name=name, num_classes=num_classes, in_chans=in_chans,
                       image_size=size, mean=mean, std=std,
                       augment=_DEFAULT_AUGMENT[base] if augment == "auto" else augment,
                       crop_padding=max(1, size // 8))
    n_total = len(xtr)
    fingerprint = _tensors_fingerprint(xtr, ytr, xte, yte)
    if split == "val":
        nv = _val_size(n_total)
        xtr, ytr, xte, yte = xtr[:-nv], ytr[:-nv], xtr[-nv:], ytr[-nv:]
    _check_not_empty(name, split, len(xtr), len(xte), n_total)
    _warn_one_class(name, num_classes)
    if distributed.current() is not None:  # every rank has the same images and labels, or none starts
        distributed.check_same_data(name, fingerprint)
    return Data(info=info, train=TensorSplit(xtr, ytr, info, device, channels_last),
                eval=TensorSplit(xte, yte, info, device, channels_last), eval_split=split, fingerprint=fingerprint)


def _load_imagefolder(name, split, device, augment, channels_last, normalization, num_workers, image_size,
                      data_config=None) -> Data:
    """``data_config`` given: timm's eval and train transforms for it (``timm.data.create_transform``);
    otherwise torchvision's resize, center crop and RandomResizedCrop at ``image_size``."""
    import torchvision.datasets as tvd
    import torchvision.transforms as T

    folder = Path(name.split(":", 1)[1]) if ":" in name else None
    if folder is None or not (folder / "train").is_dir() or not (folder / "val").is_dir():
        raise DataError(f"'{name}' needs a folder with 'train/' and 'val/' inside, one sub-folder per class "
                        "(e.g. imagefolder:/data/imagenet).")
    stats = normalization or data_config or dict(zip(("mean", "std"), _STATS["imagefolder"]))
    mean, std = tuple(stats["mean"]), tuple(stats["std"])
    aug = _DEFAULT_AUGMENT["imagefolder"] if augment == "auto" else augment
    if data_config:
        from timm.data import create_transform

        tf = {**{k: tuple(v) if isinstance(v, list) else v for k, v in data_config.items()}, "mean": mean, "std": std}
        image_size = tf["input_size"][-1]
        eval_tf = create_transform(**tf, is_training=False)
        # timm's standard training transform: RandomResizedCrop, flip (crop-flip only) and colour jitter
        train_tf = eval_tf if aug == "none" else create_transform(**tf, is_training=True,
                                                                  hflip=0.5 if aug == "crop-flip" else 0.0)
    else:
        norm = [T.ToTensor(), T.Normalize(mean, std)]
        eval_tf = T.Compose([T.Resize(int(image_size / 0.875)), T.CenterCrop(image_size), *norm])
        train_tf = eval_tf if aug == "none" else T.Compose(
            [T.RandomResizedCrop(image_size), *([T.RandomHorizontalFlip()] if aug == "crop-flip" else []), *norm])
    try:
        train_aug, train_plain = tvd.ImageFolder(folder / "train", train_tf), tvd.ImageFolder(folder / "train", eval_tf)
        val = tvd.ImageFolder(folder / "val", eval_tf)
    except (FileNotFoundError, OSError) as e:
        raise DataError(f"cannot read image folder '{folder}': {e}") from None
    if val.classes != train_plain.classes:  # labels are class indices in sorted order: they must mean the same
        missing = sorted(set(train_plain.classes) ^ set(val.classes))
        raise DataError(f"'{folder}': 'train/' and 'val/' must hold the same class folders, so that a label means "
                        f"the same class in both; only one of them has: {', '.join(missing[:5])}.")
    # (recorded with its absolute path: later commands, run from any folder, find the same images)
    info = DatasetInfo(name=canonical_dataset(name), num_classes=len(train_plain.classes), in_chans=3,
                       image_size=image_size, mean=mean, std=std, augment=aug, crop_padding=0)
    if split == "val":
        n = len(train_plain)
        nv = _val_size(n)
        # ImageFolder lists images class by class: hold out a fixed random subset, not the last classes.
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
        keep, held = perm[: n - nv], perm[n - nv:]
        sub = torch.utils.data.Subset
        train = LoaderSplit(sub(train_aug, keep), sub(train_plain, keep), info, device, num_workers, channels_last)
        ev = LoaderSplit(sub(train_plain, held), sub(train_plain, held), info, device, num_workers, channels_last)
    else:
        train = LoaderSplit(train_aug, train_plain, info, device, num_workers, channels_last)
        ev = LoaderSplit(val, val, info, device, num_workers, channels_last)
    _check_not_empty(name, split, len(train), len(ev), len(train_plain))
    _warn_one_class(name, info.num_classes)
    fingerprint = _folder_fingerprint(train_plain, val)
    if distributed.current() is not None:  # every rank lists the same images (names, not contents) in each class
        distributed.check_same_data(name, fingerprint)
    return Data(info=info, train=train, eval=ev, eval_split=split, fingerprint=fingerprint)


def check_same_data_as(recorded: Any, data: Data, name: str, source: str | os.PathLike) -> None:
    """On --resume: refuse a data set other than the one the interrupted run recorded (``data_fingerprint`` in
    ``source``, its metrics file or training state): a run resumed on other images would mix two experiments.
    A file that records none (an earlier mctool) passes."""
    if isinstance(recorded, str) and recorded and recorded != data.fingerprint:
        what, where = (("its class folders or image names", "the folder as it was") if name.startswith("imagefolder:")
                       else ("its images or labels", "the same data (another copy: --data-root)"))
        raise DataError(f"the data set '{name}' is not the one the interrupted run in '{source}' used ({what} "
                        f"differ: fingerprint {data.fingerprint[:12]}... here, {recorded[:12]}... recorded); resume "
                        f"with {where}, or start over with --force.")


def _tensors_fingerprint(*tensors: torch.Tensor) -> str:
    """sha256 of the tensors' shapes, dtypes and bytes (CPU, contiguous): equal for equal data."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(f"{tuple(t.shape)} {t.dtype};".encode())
        if t.numel():  # (an empty one: its shape says all; memoryview cannot cast it)
            h.update(memoryview(t.contiguous().numpy()).cast("B"))
    return h.hexdigest()


def _folder_fingerprint(*sets: Any) -> str:
    """sha256 of each ImageFolder's classes and image names (relative to its folder) with their labels: reading
    every image's bytes would cost a pass over the data set; a missing, extra or renamed image differs."""
    h = hashlib.sha256()
    for ds in sets:
        prefix = len(os.path.expanduser(os.fspath(ds.root))) + 1  # (as torchvision lists the images)
        h.update(("\0".join(ds.classes) + "\1").encode())
        for path, label in ds.samples:
            h.update(f"{path[prefix:]}\0{label}\1".encode())
    return h.hexdigest()
