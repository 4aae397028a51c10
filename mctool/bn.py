"""BatchNorm recalibration: the one function every command uses before evaluating new weights.

Running statistics belong to one set of weights. For any other point (a curve at t, a plane grid point,
an FGE snapshot) they are reset and recomputed with one pass over the un-augmented training data.
"""

from __future__ import annotations

import torch
from torch import nn

from .data import Split
from .errors import DataError
from .options import check_count
from .runtime import autocast

_BN = nn.modules.batchnorm._BatchNorm


def bn_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, _BN)]


@torch.no_grad()
def recalibrate_bn(model: nn.Module, split: Split, *, batch_size: int = 512, max_batches: int | None = None,
                   precision: str = "fp32") -> bool:
    """Recompute BN running statistics of ``model`` at its current weights (docs/method.md#bn); returns False
    without BN layers.

    Only the BN layers run in train mode (dropout stays off); each batch contributes in proportion to its
    size, so the result is the exact mean and (unbiased, per batch) variance average over the pass.
    ``max_batches`` limits the pass (faster, noisier statistics).
    """
    check_count("--batch-size", batch_size)
    check_count("--bn-batches", max_batches)
    bns = bn_modules(model)
    if not bns:
        return False
    was_training = model.training
    momenta = [m.momentum for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.train()
    device = next(model.parameters()).device
    seen = 0
    with autocast(device, precision):
        for i, (x, _) in enumerate(split.batches(batch_size)):
            if max_batches is not None and i >= max_batches:
                break
            b = x.shape[0]
            for m in bns:  # cumulative average weighted by batch size
                m.momentum = b / (seen + b)
            model(x)
            seen += b
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    model.train(was_training)
    if seen == 0:  # reset statistics (mean 0, variance 1) must never pass for recomputed ones
        raise DataError("the BatchNorm recalibration pass saw no training images; the training set is empty.")
    return True
