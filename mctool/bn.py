"""BatchNorm recalibration: the one function every command uses before evaluating new weights.

Running statistics belong to one set of weights. For any other point (a curve at t, a plane grid point,
an FGE snapshot) they are reset and recomputed with one pass over the training data, augmented as the
network was trained (``--bn-data augmented``, the default) or not (``--bn-data plain``).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable

import torch
from torch import nn

from . import distributed
from .choices import BN_DATA
from .data import Split
from .errors import ConfigError, DataError
from .models import evaluating
from .console import warn
from .options import check_count, show_setting
from .runtime import autocast

_BN = nn.modules.batchnorm._BatchNorm

# The order of every statistics pass (BN recalibration, REPAIR): one fixed random permutation of the training
# set, the same for every network and run. Data stored class by class (``imagefolder:``) would otherwise give
# single-class batches, whose variances miss the between-class spread, and ``--bn-batches N`` the first classes.
PASS_SEED = 0


def check_bn_data(value: Any) -> None:
    if not isinstance(value, str) or value not in BN_DATA:
        raise ConfigError(f"--bn-data must be one of {', '.join(BN_DATA)}, got '{show_setting(value)}'.")


def pass_batches(split: Split, batch_size: int, *, augment: bool = False, deal: tuple[int, int] | None = None):
    """The training batches of a statistics pass, in the fixed order ``PASS_SEED`` draws; ``augment``: with the
    split's training augmentation, drawn from the same seed (the same images for every network and run)."""
    return split.batches(batch_size, shuffle=True, augment=augment, seed=PASS_SEED, deal=deal)


#: timm's layers (``timm.layers.evo_norm``) that keep a running variance, updated as BatchNorm updates its own
#: (``(1 - momentum) * running + momentum * batch``) and used in eval mode.
_TIMM_RUNNING_VAR = {"EvoNorm2dB0", "EvoNorm2dB1", "EvoNorm2dB2"}


def _has_running_stats(m: nn.Module) -> bool:
    """A normalisation layer whose evaluation depends on running statistics of the data: BatchNorm (timm's
    ``BatchNormAct2d`` included, and without ``track_running_stats`` too: it normalises by batch while training),
    ``InstanceNorm`` with ``track_running_stats``, and timm's EvoNorm B layers. Named, not guessed from a
    ``running_var`` buffer: a layer whose momentum means something else would get wrong statistics."""
    if isinstance(m, _BN):
        return True
    if isinstance(m, nn.modules.instancenorm._InstanceNorm):
        return bool(m.track_running_stats)
    cls = type(m)
    return (cls.__module__.startswith("timm.") and cls.__name__ in _TIMM_RUNNING_VAR
            and isinstance(m._buffers.get("running_var"), torch.Tensor))


def bn_modules(model: nn.Module) -> list[nn.Module]:
    """The layers whose running statistics a BN pass recomputes (``_has_running_stats``)."""
    return [m for m in model.modules() if _has_running_stats(m)]


def _reset_running_stats(m: nn.Module) -> None:
    if hasattr(m, "reset_running_stats"):
        m.reset_running_stats()
        return
    for name, fill in (("running_mean", 0.0), ("running_var", 1.0), ("num_batches_tracked", 0)):
        t = m._buffers.get(name)
        if isinstance(t, torch.Tensor):
            t.fill_(fill)


def _has_bn_statistics(buffers: Iterable[str]) -> bool:
    """Whether buffers of these names include BatchNorm running statistics (which a BN pass recomputes)."""
    return any(n.rsplit(".", 1)[-1] == "running_var" for n in buffers)


def bn_data_setting(buffers: Iterable[str], bn_data: str, bn_batches: int | None = None) -> str | None:
    """What a run records as ``bn_data``: ``bn_data`` for a network with BatchNorm statistics to recompute, else
    None (the setting changes nothing there: a warning names the BN pass's options given other than their
    defaults, ``bn_data`` and ``bn_batches``)."""
    if _has_bn_statistics(buffers):
        return bn_data
    unused_bn_options(bn_batches, bn_data, "to a network without BatchNorm statistics: no BatchNorm pass is run")
    return None


def unused_bn_options(bn_batches: int | None, bn_data: str, why: str) -> None:
    """Warn that the BN pass's options given other than their defaults (``bn_batches``, ``bn_data``) do not
    apply, ``why``."""
    given = [name for name, off in (("--bn-batches", bn_batches is not None), ("--bn-data", bn_data != "augmented"))
             if off]
    if given:
        warn(f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply {why}; ignored.")


def bn_pass_setting(buffers: Iterable[str], batch_size: int) -> int | None:
    """What a run records as ``bn_batch_size`` for a network with these buffer names: ``batch_size`` when it has
    BatchNorm statistics to recompute, else None. The batch size decides which images each batch of the BN pass
    holds (and, with ``--bn-batches``, which images it reads), so the statistics depend on it and ``--resume``
    compares it; without BatchNorm it changes nothing but float rounding."""
    return batch_size if _has_bn_statistics(buffers) else None


def check_bn_batch_size(model: nn.Module, batch_size: Any) -> None:
    """``--batch-size`` of a BatchNorm pass: >= 1, and >= 2 when ``model`` has BatchNorm (a batch of one image
    has no variance). Commands call it before they write their first file."""
    check_count("--batch-size", batch_size)
    if batch_size < 2 and bn_modules(model):
        raise ConfigError("--batch-size must be >= 2 to recompute BatchNorm statistics (a batch of one image has "
                          "no variance), got 1.")


class _LocalBatchNorm(_BN):
    """BatchNorm of any input rank with this process's statistics only: what a ``SyncBatchNorm`` computes
    as during a recalibration pass (whose ranks see different numbers of batches and add their sums at
    the end instead)."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {input.dim()}-D")


def use_sync_bn(model: nn.Module, enabled: bool, device: torch.device) -> nn.Module:
    """``--sync-bn``: BatchNorm layers that compute batch statistics over the whole global batch (all ranks)
    while training, as ``torch.nn.SyncBatchNorm``; the state dict is unchanged. A single process has nothing
    to synchronise (the model is returned as it is); NCCL's SyncBatchNorm needs CUDA tensors."""
    d = distributed.current()
    if not enabled or d is None or not bn_modules(model):
        return model
    if device.type != "cuda":
        raise ConfigError("--sync-bn needs CUDA GPUs (PyTorch's SyncBatchNorm does not run on the CPU); leave it "
                          "out, and each rank uses its own piece of the batch for BN statistics.")
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, split: Split, *, batch_size: int = 512, max_batches: int | None = None,
                   precision: str = "fp32", sharded: bool = False, bn_data: str = "augmented",
                   on_batch: Callable[[], None] | None = None) -> bool:
    """Recompute BN running statistics of ``model`` at its current weights (docs/method.md#bn); returns False
    without BN layers.

    The batches come in one fixed random order (``pass_batches``), with the training augmentation of ``split``
    for ``bn_data="augmented"`` (docs/method.md#bn). Only the BN layers run in train mode
    (dropout stays off) with momentum 1, so that each batch's mean and (unbiased) variance land in the
    running buffers; they are added up weighted by the batch's size, so the result is the exact mean and the
    per-batch variance average over the pass, and every batch is the same call (which a compiled forward
    needs). A last batch of a single image is left out: it has no variance (BatchNorm1d refuses it).
    ``max_batches`` limits the pass to its first batches (faster, noisier statistics). ``sharded``, in a
    distributed run: the ranks share the batches (dealt round-robin) and add their weighted sums, which gives
    every rank the statistics of the whole pass (docs/distributed.md). ``on_batch()`` is called after each
    of this process's batches (a progress bar).
    """
    check_count("--bn-batches", max_batches)
    check_bn_data(bn_data)
    check_bn_batch_size(model, batch_size)
    bns = _tracking(model)
    if not bns:
        return False
    with _pass_mode(model, bns):
        for m in bns:
            _reset_running_stats(m)
        seen = _pass(model, bns, split, batch_size, max_batches, precision, sharded, bn_data, on_batch)
    d = distributed.current() if sharded else None
    if d is not None:
        seen = _add_over_ranks(bns, seen, next(model.parameters()).device)
    if seen == 0:  # reset statistics (mean 0, variance 1) must never pass for recomputed ones
        # Reached with a single training image: the pass leaves out a batch of one (it has no variance).
        info = getattr(split, "info", None)
        data = f"data set '{info.name}'" if info is not None else "the data set"
        count = f"{len(split)} training image(s)" if hasattr(split, "__len__") else "too few training images"
        raise DataError(f"the BatchNorm recalibration pass saw no training images: {data} has {count}, and the "
                        "pass needs a batch of at least 2. Use a data set with more training images, or --split "
                        "test if --split val held some out.")
    return True


def _pass(model: nn.Module, bns: list[nn.Module], split: Split, batch_size: int, max_batches: int | None,
          precision: str, sharded: bool, bn_data: str, on_batch: Callable[[], None] | None) -> int:
    """The statistics pass of ``recalibrate_bn`` (its layers ``bns`` set up): the running statistics become the
    batches' averages, weighted by batch size; returns the number of images seen."""
    stats = [t for m in bns for t in (m._buffers.get("running_mean"), m.running_var) if t is not None]
    sums = [torch.zeros_like(t) for t in stats]
    device = next(model.parameters()).device
    seen = 0
    d = distributed.current() if sharded else None
    rank, world = d.part if d is not None else (0, 1)
    with autocast(device, precision):
        for j, (x, _) in enumerate(pass_batches(split, batch_size, augment=bn_data == "augmented",
                                                deal=d.part if d is not None else None)):
            i = rank + j * world  # the batch's number in the whole pass
            if max_batches is not None and i >= max_batches:
                break
            if x.shape[0] >= 2:  # (not the last batch, of a single image)
                model(x)  # the same call for every batch (a compiled or graphed forward is reused)
                torch._foreach_add_(sums, stats, alpha=x.shape[0])  # weighted by batch size
                seen += x.shape[0]
            if on_batch is not None:
                on_batch()
    for t, s in zip(stats, sums):  # the average over the pass
        t.copy_(s / max(seen, 1))
    return seen


def _tracking(model: nn.Module) -> list[nn.Module]:
    """The layers of ``model`` whose running statistics a BN pass recomputes (``bn_modules`` but a BatchNorm layer
    with ``track_running_stats=False``, which has none)."""
    return [m for m in bn_modules(model) if isinstance(m._buffers.get("running_var"), torch.Tensor)]


@contextlib.contextmanager
def _pass_mode(model: nn.Module, bns: list[nn.Module]):
    """``model`` set up for a statistics pass over its layers ``bns``: everything in eval mode (dropout off) but
    ``bns``, in train mode with momentum 1 (each batch's statistics replace the running ones, which the pass adds
    up), SyncBatchNorm as this process's own BatchNorm (no collective per batch; ranks add up at the end). All of
    it is restored afterwards, also after an error or a Ctrl-C (the statistics stay as the pass left them)."""
    momenta = [m.momentum for m in bns]
    synced = [(m, m.__class__) for m in bns if isinstance(m, nn.SyncBatchNorm)]
    try:
        with evaluating(model):
            for m, _ in synced:
                m.__class__ = _LocalBatchNorm
            for m in bns:
                m.train()
                m.momentum = 1.0
            yield
    finally:
        for m, momentum in zip(bns, momenta):
            m.momentum = momentum
        for m, cls in synced:
            m.__class__ = cls


@torch.no_grad()
def one_batch_statistics(model: nn.Module, x: torch.Tensor) -> list[tuple[torch.Tensor | None, torch.Tensor]]:
    """The running statistics (mean or None, variance) of each layer that a BN pass (``recalibrate_bn``) over the
    one batch ``x`` gives ``model``; the model is left as it was, its statistics too."""
    bns = _tracking(model)
    saved = [{n: b.clone() for n, b in m._buffers.items() if b is not None} for m in bns]
    try:
        with _pass_mode(model, bns):
            model(x)
        return [(None if (mean := m._buffers.get("running_mean")) is None else mean.clone(), m.running_var.clone())
                for m in bns]
    finally:
        for m, buffers in zip(bns, saved):
            for n, b in buffers.items():
                m._buffers[n].copy_(b)


def _add_over_ranks(bns: list[nn.Module], seen: int, device: torch.device) -> int:
    """Every rank's statistics become those of all ranks' batches together: the averages weighted by the
    images each rank saw, summed over ranks in one buffer (and the batch counts added)."""
    stats = [t for m in bns for t in (m._buffers.get("running_mean"), m.running_var) if t is not None]
    counts = [c for m in bns if (c := m._buffers.get("num_batches_tracked")) is not None]
    flat = torch.cat([*(t.double().flatten() * seen for t in stats), *(c.double().flatten() for c in counts),
                      torch.tensor([float(seen)], dtype=torch.float64, device=device)])
    distributed.all_reduce_sum(flat)
    total = float(flat[-1])
    at = 0
    for t in stats:
        t.copy_((flat[at:at + t.numel()] / max(total, 1.0)).view_as(t))
        at += t.numel()
    for c in counts:
        c.copy_(flat[at:at + c.numel()].round().view_as(c))
        at += c.numel()
    return int(total)
