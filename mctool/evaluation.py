"""Predictions and metrics: loss, NLL, error, ECE, for single networks and ensembles."""

from __future__ import annotations

import weakref
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .bn import recalibrate_bn
from .data import Split
from .errors import ConfigError
from .models import evaluating
from .options import check_count
from .runtime import autocast


def l2_term(params: nn.Module | Iterable[torch.Tensor], wd: float) -> float:
    """0.5 * wd * ||w||^2 over all parameters (of a network, or given as tensors): the regularisation part of the
    training objective. Summed in float64, so weights far out on a plane (||w||^2 beyond float32's range) still
    give a finite value."""
    if wd == 0:
        return 0.0
    tensors = params.parameters() if isinstance(params, nn.Module) else params
    with torch.no_grad():
        return 0.5 * wd * float(sum(p.detach().double().pow(2).sum() for p in tensors))


#: On the CPU, evaluation-mode forwards of convolutional networks (``has_convolutions``) run in pieces of at most
#: this many images: activations of a small piece stay in the caches, which makes such a forward 1.6-2.4x faster
#: than at batch 512 (docs/performance.md#cpu-evaluation-in-pieces). Each image's logits are computed on their own
#: (bit for bit the same as in whole batches, measured for cifar_preresnet20 and mlp).
CPU_EVAL_PIECE = 64
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_CONVOLUTIONAL: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


def has_convolutions(model: nn.Module) -> bool:
    """Whether ``model`` has convolutions (``batched``'s wide ones included; remembered per module): on the CPU
    such a network's evaluation forwards go in pieces, whose activations stay in the caches (a network without
    them, an MLP, goes in whole batches, faster there: each piece would read its weight matrices again, measured
    for ``mlp``: 1.4x), and it goes one network per pass (``batched.pays_off``)."""
    known = _CONVOLUTIONAL.get(model)
    if known is None:
        known = any(isinstance(m, _CONV_TYPES) or getattr(m, "is_convolution", False) for m in model.modules())
        _CONVOLUTIONAL[model] = known
    return known


def forward_in_pieces(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` for an evaluation-mode forward; on the CPU in pieces of ``CPU_EVAL_PIECE`` images for a
    convolutional network (``has_convolutions``)."""
    if x.device.type != "cpu" or x.shape[0] <= CPU_EVAL_PIECE or not has_convolutions(model):
        return model(x)
    return torch.cat([model(piece) for piece in x.split(CPU_EVAL_PIECE)])


@torch.no_grad()
def predict_logits(model: nn.Module, split: Split, *, batch_size: int = 512, precision: str = "fp32",
                   device: torch.device | None = None, sharded: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``[N, C]`` (float32; ``[N, P, C]`` for a ``batched.WideNetwork``) and labels ``[N]`` of a network
    over a split, in eval mode.

    ``sharded``, in a distributed run: the ranks share the batches (dealt round-robin) and every rank gets
    all N rows, each computed by one rank exactly as one process computes it (docs/distributed.md).
    ``device`` is where the model (and the split's batches) already are, by default the model's: nothing is
    moved.
    """
    if not callable(getattr(split, "batches", None)):
        raise ConfigError(f"give a split of the data (data.eval or data.train), got {type(split).__name__}.")
    if not isinstance(model, nn.Module) or next(model.parameters(), None) is None:
        raise ConfigError(f"give a network (a torch.nn.Module with parameters), got {type(model).__name__}.")
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    if device.type != home.type:
        raise ConfigError(f"device {str(device)!r}, but the model is on {home}; move the model there (model.to(...)) "
                          "and load the data there (load_data(..., device=...)), or leave device out.")
    d = distributed.current() if sharded else None
    with evaluating(model), autocast(device, precision):
        if d is None:
            logits, labels = [], []
            for x, y in split.batches(batch_size):
                logits.append(forward_in_pieces(model, x).float())
                labels.append(y)
            out = torch.cat(logits), torch.cat(labels)
        else:
            out = _predict_dealt(model, split, batch_size, device, d)
    return out


def _predict_dealt(model: nn.Module, split: Split, batch_size: int, device: torch.device,
                   d: distributed.Dist) -> tuple[torch.Tensor, torch.Tensor]:
    # Each rank fills the rows of its batches into zeros; the sum over ranks adds only zeros to each value,
    # so every rank ends with exactly the logits one process computes.
    n = len(split)
    rows: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    for j, (x, y) in enumerate(split.batches(batch_size, deal=d.part)):
        rows.append(((d.rank + j * d.world) * batch_size, forward_in_pieces(model, x).float(), y))
    # the shape of a row ([C], or [P, C] for P networks side by side): max over ranks (a rank may have none)
    tail = torch.zeros(3, dtype=torch.long, device=device)
    if rows:
        shape = rows[0][1].shape[1:]
        tail[:len(shape)] = torch.tensor(shape)
        tail[2] = len(shape)
    distributed.all_reduce_max(tail)
    logits = torch.zeros(n, *tail[:int(tail[2])].tolist(), device=device)
    labels = torch.zeros(n, dtype=torch.long, device=device)
    for lo, z, y in rows:
        logits[lo:lo + z.shape[0]] = z
        labels[lo:lo + y.shape[0]] = y
    distributed.all_reduce_sum(logits)
    distributed.all_reduce_sum(labels)
    return logits, labels


#: Every NLL is computed with the true label's probability clamped at this: one image adds at most
#: -log(1e-300) = 690.8 to a sum of NLLs. Probabilities are float64, so a true label's probability is held
#: exactly down to here (the NLL of an image whose logits put the true label up to ~700 below the top).
MIN_PROB = 1e-300


def probabilities(logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax of ``logits`` along ``dim``, in float64, so that the NLL of a confidently wrong image stays exact
    far out on a plane or surface (float32 probabilities underflow below about 1e-38: an NLL of 87).

    An image whose logits are not all finite (an overflow, e.g. far from trained weights) gets all-zero
    probabilities: no prediction, so ``error`` counts it wrong and ``nll`` gives it the largest NLL,
    -log(MIN_PROB); in an ensemble's mean it adds nothing. So a computed metric is never NaN, and NaN in a
    metrics file always means "not computed yet" (docs/method.md)."""
    probs = F.softmax(logits.double(), dim=dim)
    bad = ~torch.isfinite(logits).all(dim, keepdim=True)
    return probs.masked_fill(bad, 0.0)


def predict_probs(model: nn.Module, split: Split, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities ``[N, C]`` (float64, ``probabilities``) and labels ``[N]``; options as ``predict_logits``."""
    logits, labels = predict_logits(model, split, **kwargs)
    return probabilities(logits), labels


_NOT_LABELS = (torch.bool, torch.complex64, torch.complex128)
ArrayLike = torch.Tensor | np.ndarray  # what the metric functions take (a tensor, or a NumPy array)


def _checked(probs: Any, labels: Any, who: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``probs`` [N, C] (floating point) and ``labels`` [N] (whole numbers in [0, C)), N >= 1, as tensors (NumPy
    arrays are taken too): what the metric functions need, refused with a ``ConfigError`` otherwise."""
    try:
        probs, labels = torch.as_tensor(probs), torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ConfigError(f"{who}() takes probabilities [N, C] and labels [N] as tensors or arrays ({e}).") from None
    if probs.ndim != 2 or not probs.is_floating_point():
        raise ConfigError(f"{who}(): probabilities must be a floating point [N, C] tensor, got "
                          f"{str(probs.dtype).replace('torch.', '')} {list(probs.shape)}.")
    if labels.shape != probs.shape[:1] or labels.dtype in _NOT_LABELS or labels.is_floating_point():
        raise ConfigError(f"{who}(): labels must be whole numbers, one per row of probabilities ({probs.shape[0]}), "
                          f"got {str(labels.dtype).replace('torch.', '')} {list(labels.shape)}.")
    if probs.shape[0] == 0:
        raise ConfigError(f"{who}(): no images (0 rows of probabilities): nothing to measure.")
    labels = labels.long()  # (unsigned NumPy labels: torch has no min of uint16 and wider)
    if int(labels.min()) < 0 or int(labels.max()) >= probs.shape[1]:
        raise ConfigError(f"{who}(): labels must be in [0, {probs.shape[1]}) for {probs.shape[1]} classes, got "
                          f"{int(labels.min())}..{int(labels.max())}.")
    return probs, labels


def nll(probs: ArrayLike, labels: ArrayLike) -> float:
    """Mean negative log-likelihood of the true labels (probabilities clamped at ``MIN_PROB``)."""
    probs, labels = _checked(probs, labels, "nll")
    return float(-probs.gather(1, labels[:, None]).clamp_min(MIN_PROB).log().mean())


def _wrong(probs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 confidence and whether it is wrong; a row of zeros (no prediction, ``probabilities``) is wrong."""
    conf, pred = probs.max(1)
    return conf, (pred != labels) | (conf <= 0)


def error(probs: ArrayLike, labels: ArrayLike) -> float:
    """Fraction of wrong top-1 predictions, in [0, 1] (an image with no prediction is wrong)."""
    probs, labels = _checked(probs, labels, "error")
    return float(_wrong(probs, labels)[1].float().mean())


def ece(probs: ArrayLike, labels: ArrayLike, bins: int = 15) -> float:
    """Expected calibration error with equal-width confidence bins: sum_b |B|/N * |acc(B) - conf(B)|."""
    probs, labels = _checked(probs, labels, "ece")
    check_count("bins", bins)
    conf, wrong = _wrong(probs, labels)
    correct = (~wrong).to(conf.dtype)
    # Bins are (lo, hi]; confidence 0 (no prediction) goes to the first bin.
    idx = (conf * bins).ceil().long().clamp(1, bins) - 1
    conf_sum = torch.zeros(bins, device=probs.device, dtype=conf.dtype).scatter_add_(0, idx, conf)
    acc_sum = torch.zeros(bins, device=probs.device, dtype=conf.dtype).scatter_add_(0, idx, correct)
    return float((conf_sum - acc_sum).abs().sum() / probs.shape[0])


def brier(probs: ArrayLike, labels: ArrayLike) -> float:
    """Brier score: mean over samples of sum_c (p_c - [c = label])^2."""
    probs, labels = _checked(probs, labels, "brier")
    onehot = torch.zeros_like(probs).scatter_(1, labels[:, None], 1.0)
    return float((probs - onehot).pow(2).sum(1).mean())


def summarize(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """NLL, error, ECE and Brier score of predicted probabilities."""
    return {"nll": nll(probs, labels), "err": error(probs, labels), "ece": ece(probs, labels),
            "brier": brier(probs, labels)}


def evaluate_weights(model: nn.Module, data, *, wd: float, batch_size: int = 512, bn_batches: int | None = None,
                     precision: str = "fp32", train_split: Split | None = None,
                     sharded: bool = False, bn_data: str = "augmented") -> dict[str, float]:
    """Metrics of a network at its current weights, after recomputing BN statistics for them.

    Train metrics use the un-augmented training data (or ``train_split``, e.g. a fixed subset):
    ``train/loss`` (NLL + 0.5 * wd * ||w||^2, the training objective), ``train/nll``, ``train/err``;
    then ``<split>/nll`` and ``<split>/err``. ``sharded``: all ranks of a distributed run share the work.
    """
    recalibrate_bn(model, data.train, batch_size=batch_size, max_batches=bn_batches, precision=precision,
                   sharded=sharded, bn_data=bn_data)
    train = predict_probs(model, train_split or data.train, batch_size=batch_size, precision=precision,
                          sharded=sharded)
    held = predict_probs(model, data.eval, batch_size=batch_size, precision=precision, sharded=sharded)
    return point_metrics(train, held, l2_term(model, wd), data.eval_split)


def point_metrics(train: tuple[torch.Tensor, torch.Tensor], held: tuple[torch.Tensor, torch.Tensor], l2: float,
                  split: str) -> dict[str, float]:
    """The metrics of one network at one point (a curve point, a grid cell) from its probabilities and labels
    on the training and evaluation images: ``train/loss`` (NLL + the L2 term), ``train/nll``, ``train/err``,
    ``<split>/nll``, ``<split>/err``. One place for every evaluation path (one network, or many in a pass)."""
    train_nll = nll(*train)
    return {"train/loss": train_nll + l2, "train/nll": train_nll, "train/err": error(*train),
            f"{split}/nll": nll(*held), f"{split}/err": error(*held)}
