"""Curves in weight space between two networks: their mathematics and their file format (training one,
``mctool connect``, is ``curve_training.py``).

A curve is w(t) = sum_k c_k(t) W_k over control points W_0 = A, W_1..W_n (the bends), W_{n+1} = B
(docs/method.md#curves). The K = n + 2 control points are stored as one ``[K, P]`` tensor of flat
parameter vectors, so w(t) is a single weighted sum; per-parameter views of it are applied to the
unchanged base network with ``torch.func.functional_call``. No layer needs a "curve version".
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import (MOMENTUM_PREFIX, LoadedModel, ModelMeta, bad_field, check_finite, metadata_int,
                         meta_differences, read_checkpoint, save_checkpoint)
from .choices import BEND_INITS, CURVES
from .data import Data, Split
from .errors import CheckpointError, ConfigError
from .fileio import sha256_file
from .options import check_real
from .flat import ParamLayout, build_network, check_network
from .calls import library_call

_BUFFER_PREFIX = "buffers/"
#: Most bends a curve file may have (the paper's curves have 1).
MAX_BENDS = 100


def coefficients(curve: str, num_bends: int, t: torch.Tensor | float) -> torch.Tensor:
    """Weights c_k(t) of the K = num_bends + 2 control points; shape ``t.shape + (K,)``.

    line: (1 - t, t). bezier: Bernstein basis of degree n + 1. polychain: piecewise linear through
    equally spaced knots t_k = k / (n + 1). They sum to 1 for every t in [0, 1]. Computed on t's device
    and dtype (no host sync).
    """
    t = torch.as_tensor(t, dtype=torch.float64 if not torch.is_tensor(t) else None)
    if curve not in CURVES:
        raise ConfigError(f"--curve must be one of {', '.join(CURVES)}, got '{curve}'.")
    if curve == "line" and num_bends != 0:
        raise ConfigError("a line has no bends; use --num-bends 0 (or a bezier/polychain curve).")
    if curve != "line" and num_bends < 1:
        raise ConfigError(f"--num-bends must be >= 1 for a {curve} curve, got {num_bends}.")
    degree = num_bends + 1
    k, rest, binom = _constants(degree, t.device, t.dtype)
    tt = t.unsqueeze(-1)
    if curve == "polychain":
        return (1 - (tt * degree - k).abs()).clamp_min(0)
    return binom * tt ** k * (1 - tt) ** rest


@functools.cache
def _constants(degree: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """k = 0..degree, degree - k and the binomial coefficients C(degree, k), made once per device (a graph
    being captured may use them but could not copy them from the host)."""
    k = torch.arange(degree + 1, dtype=dtype)
    binom = torch.tensor([math.comb(degree, i) for i in range(degree + 1)], dtype=dtype)
    return k.to(device), (degree - k).to(device), binom.to(device)


@dataclass
class Curve:
    """Control points ``[K, P]`` of a curve, with what is needed to build its network."""

    curve: str
    num_bends: int
    points: torch.Tensor
    layout: ParamLayout
    meta: ModelMeta  # the base network's metadata (kind 'curve' when read from a curve file)
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)  # start network's buffers (BN statistics...)
    path: Path | None = None
    sha256: str | None = None

    @property
    def num_points(self) -> int:
        return self.points.shape[0]

    def weights(self, t: float, points: torch.Tensor | None = None) -> torch.Tensor:
        """Flat parameters at t: the coefficients c(t) (float64 on the CPU, then in the points' dtype) times the
        control points, or times ``points`` (a copy of them, e.g. on the compute device)."""
        points = self.points if points is None else points
        c = coefficients(self.curve, self.num_bends, torch.tensor(float(t), dtype=torch.float64))
        return c.to(points.dtype).to(points.device) @ points

    def gram(self) -> torch.Tensor:
        """G = W W^T in float64, so ||sum_k d_k W_k|| = sqrt(d^T G d) for any coefficient difference d."""
        g = torch.zeros(self.num_points, self.num_points, dtype=torch.float64, device=self.points.device)
        for chunk in torch.split(self.points, 1 << 22, dim=1):
            c = chunk.double()
            g += c @ c.T
        return g

    def build_model(self) -> nn.Module:
        """The base network at the start point, with its buffers, in eval mode."""
        model = build_network(self.meta, self.layout, self.buffers)
        self.layout.assign(model, self.points[0])
        return model

    @library_call
    def network(self, t: float, data: Data | Split | None = None, *, batch_size: int = 512,
                bn_batches: int | None = None, bn_data: str = "augmented") -> nn.Module:
        """The network at ``t``, in memory, in eval mode: on the CPU, or on ``data``'s device when given. With
        ``data`` (the ``Data`` of ``load_data`` or one of its splits; its training images are used) the BatchNorm
        statistics are recomputed for these weights as ``evaluate_curve`` does (``bn_batches``, ``bn_data`` as
        there); without it the network keeps the start network's, which fit ``t = 0`` only."""
        if t is None:  # (check_real lets None, an option left out, pass)
            raise ConfigError("t must be a number in [0, 1], got None.")
        check_real("t", t, 0, 1)
        model = self.build_model()
        self.layout.assign(model, self.weights(t))
        if data is not None:
            from .bn import check_bn_data, recalibrate_bn

            check_bn_data(bn_data)
            split = getattr(data, "train", data)
            if not callable(getattr(split, "batches", None)):
                raise ConfigError(f"data must be the Data of mctool.load_data (or a split of it), got "
                                  f"{type(data).__name__}.")
            model.to(split.device)
            recalibrate_bn(model, split, batch_size=batch_size, max_batches=bn_batches, bn_data=bn_data)
        return model


def _describe_incompatibility(a: LoadedModel, b: LoadedModel) -> list[str]:
    out = [f"{key}: {va!r} vs {vb!r}" for key, va, vb in meta_differences(
        a.meta, b.meta, ("arch", "arch_kwargs", "num_classes", "in_chans", "dataset", "normalization"))]
    if not out:
        out += ParamLayout.of(a.model).differences(ParamLayout.of(b.model))
    return out


def check_two_networks(a: LoadedModel, b: LoadedModel, why: str) -> None:
    """Refuse the same network (the same bytes, under any names) as both ends of a segment or curve."""
    if a.sha256 == b.sha256:
        same = f"'{a.path}' is given twice" if str(a.path) == str(b.path) else f"'{a.path}' and '{b.path}' are the " \
                                                                                "same file (the same sha256)"
        raise ConfigError(f"{same}: {why}. Give two different networks.")


def line_between(a: LoadedModel, b: LoadedModel) -> Curve:
    """The straight segment between two compatible networks (checked; differences listed)."""
    diff = _describe_incompatibility(a, b)
    if diff:
        raise ConfigError(f"'{a.path}' and '{b.path}' cannot be connected; they differ in: {'; '.join(diff)}.")
    layout = ParamLayout.of(a.model)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    points = torch.stack([layout.flatten(sa), layout.flatten(sb)])
    buffers = {n: v for n, v in sa.items() if n not in set(layout.names)}
    meta = ModelMeta(**{**asdict(a.meta), "inputs": {str(a.path): a.sha256, str(b.path): b.sha256}})
    return Curve("line", 0, points, layout, meta, buffers)


def initial_points(line: Curve, curve: str, num_bends: int, bend_init: str) -> torch.Tensor:
    """Control points ``[K, P]`` with the bends on the segment (``linear``) or at A (``start``) or B (``end``)."""
    if bend_init not in BEND_INITS:
        raise ConfigError(f"--bend-init must be one of {', '.join(BEND_INITS)}, got '{bend_init}'.")
    coefficients(curve, num_bends, 0.0)  # validates curve and num_bends
    a, b = line.points
    alphas = {"linear": [j / (num_bends + 1) for j in range(num_bends + 2)],
              "start": [0.0] * (num_bends + 1) + [1.0], "end": [0.0] + [1.0] * (num_bends + 1)}[bend_init]
    return torch.stack([a + s * (b - a) if 0 < s < 1 else (a if s == 0 else b).clone() for s in alphas])


def save_curve(path: str | Path, curve: Curve, config: dict[str, Any],
               extra_tensors: dict[str, torch.Tensor] | None = None, extra_meta: dict[str, str] | None = None,
               kind: str = "curve") -> None:
    """A curve file: all control points (endpoints included), the base metadata and the endpoints' hashes."""
    md = ModelMeta(**{**asdict(curve.meta), "kind": kind, "config": config,
                      "extra": {"curve": curve.curve, "num_bends": str(curve.num_bends),
                                "param_layout": curve.layout.to_json(), **(extra_meta or {})}}).to_metadata()
    tensors = {"control_points": curve.points, **{_BUFFER_PREFIX + k: v for k, v in curve.buffers.items()},
               **(extra_tensors or {})}
    save_checkpoint(path, tensors, md)


@library_call
def load_curve(path: str | Path, kinds: tuple[str, ...] = ("curve", "curve-state")
               ) -> tuple[Curve, dict[str, torch.Tensor], dict[str, str]]:
    """Read a curve file (or a connect state); returns the curve, its other tensors and raw metadata."""
    path = Path(path)
    tensors, md = read_checkpoint(path)
    if md.get("kind") not in kinds:
        kind = md.get("kind", "plain safetensors")
        if kind in ("model", "train-state"):
            hint = ("a single network, not a curve (write a curve with 'mctool connect A B -o curve.safetensors'; "
                    "evaluate-curve, plane and ensemble also take the checkpoints themselves)")
        elif kind == "ensemble":
            hint = ("an ensemble file, not a curve: 'mctool point FILE --index I' exports a member, and "
                    "'mctool evaluate FILE' evaluates them")
        else:
            hint = f"a '{kind}' file, not a curve (write one with 'mctool connect')"
        raise CheckpointError(f"'{path}' is {hint}.")
    meta = ModelMeta.from_metadata(md, path)
    missing = [k for k in ("curve", "num_bends", "param_layout") if k not in meta.extra]
    missing += [] if "control_points" in tensors else ["the tensor control_points"]
    if missing:
        raise CheckpointError(f"'{path}' is not a complete curve file (missing {', '.join(missing)}).")
    check_finite(path, {k: v for k, v in tensors.items() if not k.startswith("optimizer/")})
    curve = meta.extra.pop("curve")
    if curve not in CURVES:
        raise bad_field(path, "curve", f"expected one of {', '.join(CURVES)}")
    num_bends = metadata_int(meta.extra, "num_bends", path, 0, MAX_BENDS)
    meta.extra.pop("num_bends")
    if (curve == "line") != (num_bends == 0):
        raise bad_field(path, "num_bends", f"a {curve} has {'no' if curve == 'line' else 'at least one'} bend")
    layout = ParamLayout.from_record(meta, path)
    points = tensors.pop("control_points")
    if points.ndim != 2 or points.shape != (num_bends + 2, layout.size) or not points.is_floating_point():
        raise CheckpointError(f"'{path}': control points of shape {tuple(points.shape)} ({points.dtype}) do not "
                              f"match {num_bends} bends and {layout.size} parameters (floating point).")
    buffers = {k[len(_BUFFER_PREFIX):]: tensors.pop(k) for k in list(tensors) if k.startswith(_BUFFER_PREFIX)}
    stray = [k for k in tensors if k != MOMENTUM_PREFIX + "free"]  # (a connect state's momentum of its free points)
    if stray:
        raise CheckpointError(f"'{path}' has tensors a curve file does not hold: {', '.join(stray[:5])}.")
    check_network(meta, layout, [buffers], path)
    c = Curve(curve, num_bends, points.float(), layout, meta, buffers, path, sha256_file(path))
    return c, tensors, md


