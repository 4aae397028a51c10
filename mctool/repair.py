"""REPAIR (Jordan et al. 2023, "REPAIR: REnormalizing Permuted Activations for Interpolation Repair").

Between two networks without BatchNorm, the hidden units of an interpolated network w(t) have smaller
variance than the endpoints' units (their inputs are averages of partly uncorrelated units), and the
network's output collapses. REPAIR rescales each output channel of every hidden Conv/Linear layer at w(t)
so that its mean and standard deviation on training batches equal (1 - t) * stat_A + t * stat_B, the
interpolation of the endpoints' statistics (``channel_stats``), and folds the correction into the layer's
weight and bias (``repair``). Networks with BatchNorm need no REPAIR: recomputing their BN statistics at
every point (``bn.recalibrate_bn``) already renormalises their units.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .bn import bn_modules, pass_batches
from .data import Split
from .errors import ConfigError
from .models import evaluating
from .runtime import autocast

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_EPS = 1e-5  # as BatchNorm's


def repair_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers REPAIR corrects: every Conv/Linear layer but the last one (the classifier, whose outputs are
    the logits), in module order."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, _LAYERS)]
    return dict(layers[:-1])


def check_repairable(model: nn.Module, what: str) -> None:
    """Refuse --repair for a network with BatchNorm, without hidden Conv/Linear layers, or with a hidden layer
    that has no bias (the correction is folded into each layer's weight and bias)."""
    if bn_modules(model):
        raise ConfigError(f"--repair is for networks without BatchNorm; '{what}' has BatchNorm layers, whose "
                          "statistics evaluate-curve already recomputes at every point (which renormalises the "
                          "units as REPAIR would). Leave --repair out.")
    layers = repair_layers(model)
    if not layers:
        raise ConfigError(f"--repair found no hidden Conv/Linear layer to correct in '{what}'.")
    no_bias = [n for n, m in layers.items() if m.bias is None]
    if no_bias:
        raise ConfigError(f"--repair folds its correction into each layer's bias; layer '{no_bias[0]}' of '{what}' "
                          "has none.")


def _axis(layer: nn.Module) -> int:
    return -1 if isinstance(layer, nn.Linear) else 1


def _batches(split: Split, batches: int, batch_size: int) -> Iterator[torch.Tensor]:
    """The first ``batches`` un-augmented training batches of the statistics passes' fixed random order
    (``bn.pass_batches``): the same images for every network. A trailing batch of one image is left out, as
    the BN passes leave it (one image has no spread to normalise by)."""
    for _, (x, _) in zip(range(batches), pass_batches(split, batch_size)):
        if x.shape[0] > 1:
            yield x


@torch.no_grad()
def channel_stats(model: nn.Module, split: Split, *, batches: int = 8, batch_size: int = 512,
                  precision: str = "fp32") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Mean and standard deviation (over samples and positions) of each output channel of every layer REPAIR
    corrects, on the first ``batches`` training batches, in eval mode: ``{layer: (mean, std)}`` in float64."""
    layers = repair_layers(model)
    sums: dict[str, list] = {}

    def hook(name: str, layer: nn.Module):
        def record(_m: nn.Module, _inp: tuple, out: torch.Tensor) -> None:
            rows = out.detach().movedim(_axis(layer), -1).reshape(-1, out.shape[_axis(layer)]).double()
            s = [rows.shape[0], rows.sum(0), (rows * rows).sum(0)]
            sums[name] = s if name not in sums else [u + v for u, v in zip(sums[name], s)]
        return record

    handles = [m.register_forward_hook(hook(n, m)) for n, m in layers.items()]
    device = next(model.parameters()).device
    try:
        with evaluating(model), autocast(device, precision):
            for x in _batches(split, batches, batch_size):
                model(x)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, (n, s, ss) in sums.items():
        mean = s / n
        out[name] = mean, (ss / n - mean * mean).clamp_min(0).sqrt()
    return out


def interpolate_stats(stats_a: dict[str, tuple[torch.Tensor, torch.Tensor]],
                      stats_b: dict[str, tuple[torch.Tensor, torch.Tensor]],
                      t: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """REPAIR's targets at t: (1 - t) * stat_A + t * stat_B for each layer's channel means and stds."""
    return {n: ((1 - t) * ma + t * stats_b[n][0], (1 - t) * sa + t * stats_b[n][1])
            for n, (ma, sa) in stats_a.items()}


@torch.no_grad()
def repair(model: nn.Module, split: Split, targets: dict[str, tuple[torch.Tensor, torch.Tensor]], *,
           batches: int = 8, batch_size: int = 512, precision: str = "fp32") -> None:
    """Give each output channel of every layer REPAIR corrects the mean and std of ``targets``, in place.

    A temporary BatchNorm follows each layer (weight: the target std, bias: the target mean); one pass over the
    first ``batches`` training batches collects their running statistics (cumulative average weighted by
    batch size, each BN seeing the already-corrected outputs upstream); then each BN is folded into its
    layer: W' = s W, b' = s (b - mean) + target mean with s = target std / sqrt(var + eps)."""
    layers = repair_layers(model)
    device = next(model.parameters()).device
    state: dict[str, dict[str, torch.Tensor]] = {}
    for name, layer in layers.items():
        c = layer.weight.shape[0]
        mean, std = targets[name]
        state[name] = {"mean": torch.zeros(c, device=device), "var": torch.ones(c, device=device),
                       "weight": std.float().to(device), "bias": mean.float().to(device)}
    seen = [0]

    def hook(name: str, layer: nn.Module):
        def normalise(_m: nn.Module, _inp: tuple, out: torch.Tensor) -> torch.Tensor:
            s, b = state[name], out.shape[0]
            y = out.movedim(_axis(layer), 1) if _axis(layer) != 1 else out
            y = F.batch_norm(y.float(), s["mean"], s["var"], s["weight"], s["bias"], training=True,
                             momentum=b / (seen[0] + b), eps=_EPS)
            return (y.movedim(1, _axis(layer)) if _axis(layer) != 1 else y).to(out.dtype)
        return normalise

    handles = [m.register_forward_hook(hook(n, m)) for n, m in layers.items()]
    try:  # (eval mode: dropout off; the temporary BNs use batch statistics anyway)
        with evaluating(model), autocast(device, precision):
            for x in _batches(split, batches, batch_size):
                model(x)
                seen[0] += x.shape[0]
    finally:
        for h in handles:
            h.remove()
    if seen[0] == 0:
        raise ConfigError("the REPAIR pass saw no training images; the training set is empty.")
    for name, layer in layers.items():
        s = state[name]
        scale = s["weight"] / (s["var"] + _EPS).sqrt()
        layer.weight.mul_(scale.view(-1, *([1] * (layer.weight.ndim - 1))).to(layer.weight.dtype))
        layer.bias.copy_(((layer.bias.float() - s["mean"]) * scale + s["bias"]).to(layer.bias.dtype))
