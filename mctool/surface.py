"""``mctool surface``: loss and error around one network, along one or two directions (docs/surface.md).

Directions are random and filter-normalised (Li et al. 2018: each filter of a direction, a slice along
dim 0 of a weight, is scaled to the norm of the same filter of the network; BatchNorm parameters and
biases are zeroed unless kept), or the differences from the network to other networks. Grid point (a, b)
has weights w + a d1 + b d2. The grid is evaluated by ``plane``'s runner (BN recomputed at every point,
resumable, NaN for what is not computed yet, points dealt to the ranks under torchrun).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import distributed
from .checkpoint import load_model, read_checkpoint, save_checkpoint
from .curves import line_between
from .errors import ConfigError
from .fileio import check_output, check_outputs, holds_output_locks
from .flat import ParamLayout
from .h5io import open_outputs, provenance, utc_now, write_h5
from .options import check_count, check_real
from .curve_eval import metric_set
from .plane import _nan_extreme, evaluate_cells, plane_metric_names
from .results import FileRef, Metrics, PlaneSummary, SurfaceResult, file_refs

#: What ``--ignore`` can name: parameters zeroed in random directions.
IGNORABLE = ("bn", "bias")
_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


def parameter_kinds(model: nn.Module) -> dict[str, str]:
    """``bn`` for the parameters of normalisation layers, ``bias`` for other 1-D parameters named ``bias``,
    ``weight`` for the rest: what ``--ignore`` and filter normalisation go by."""
    kinds = {}
    for mod_name, mod in model.named_modules():
        for p_name, _ in mod.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            kinds[full] = "bn" if isinstance(mod, _NORM_TYPES) else "bias" if p_name == "bias" else "weight"
    return kinds


def filter_normalize(direction: torch.Tensor, w: torch.Tensor, layout: ParamLayout, kinds: dict[str, str],
                     ignore: tuple[str, ...]) -> torch.Tensor:
    """``direction`` (flat, like ``w``) with each filter scaled to the norm of the network's filter: for a
    parameter of 2 or more dims each slice along dim 0; a 1-D parameter not ignored is one filter. Ignored
    kinds (``bn``, ``bias``) become zero. A filter of the network that is zero stays zero."""
    out = torch.zeros_like(direction)
    d_views, w_views, o_views = layout.views(direction), layout.views(w), layout.views(out)
    for name in layout.names:
        if kinds.get(name, "weight") in ignore:
            continue
        d, ref = d_views[name], w_views[name]
        rows = d.reshape(d.shape[0], -1) if d.dim() >= 2 else d.reshape(1, -1)
        ref_rows = ref.reshape(rows.shape)
        scale = ref_rows.double().norm(dim=1) / rows.double().norm(dim=1).clamp_min(1e-30)
        o_views[name].copy_((rows.double() * scale[:, None]).reshape(d.shape).to(out.dtype))
    return out


def random_directions(model: nn.Module, w: torch.Tensor, layout: ParamLayout, dims: int, seed: int,
                      ignore: tuple[str, ...]) -> torch.Tensor:
    """``[dims, P]`` Gaussian directions (generator seeded with ``seed``), each filter-normalised to ``w``."""
    g = torch.Generator().manual_seed(seed)
    kinds = parameter_kinds(model)
    return torch.stack([filter_normalize(torch.randn(w.numel(), generator=g), w, layout, kinds, ignore)
                        for _ in range(dims)])


def directions_path(metrics: Path) -> Path:
    """Where a surface run keeps its directions: ``NAME-directions.safetensors`` beside the metrics file."""
    return metrics.with_name(metrics.stem + "-directions.safetensors")


def surface_summary(grid: dict[str, np.ndarray], center: dict[str, float]) -> dict[str, dict[str, Any]]:
    """``{"train": {metric: {"min", "max", "at_points": [center]}}, "eval": {...}}``."""
    out: dict[str, dict[str, Any]] = {"train": {}, "eval": {}}
    for n, values in grid.items():
        group, metric = metric_set(n)
        out[group][metric] = {"min": _nan_extreme(np.min, values), "max": _nan_extreme(np.max, values),
                              "at_points": [center[n]]}
    return out


@holds_output_locks
def surface(path: str | Path, metrics: str | Path, *, dims: int = 2, directions: list[str] | None = None,
            ignore: tuple[str, ...] = IGNORABLE, seed: int = 0, span: float = 1.0, grid_points: int = 21,
            plot: str | Path | None = None, resume: bool = False, force: bool = False, device: str = "auto",
            dataset: str | None = None, data_root: str | None = None, download: bool = False, split: str = "test",
            batch_size: int = 512, bn_batches: int | None = None, train_subset: int | None = None,
            wd: float | None = None, precision: str = "fp32", channels_last: bool = False, num_workers: int = 4,
            quiet: bool = False) -> SurfaceResult:
    """Train loss/error and test NLL/error of the network at ``path`` moved along ``dims`` directions, on a grid
    of ``grid_points`` coefficients per direction in [-span, span]. ``directions``: None for random
    filter-normalised ones (``ignore`` zeroed, ``seed``), or model checkpoints: direction i is file i's weights
    minus the network's (``dims`` is then their number; coefficient 1 reaches the file's network)."""
    t0 = time.time()
    check_count("--dims", dims)
    if dims > 2:
        raise ConfigError(f"--dims must be 1 or 2, got {dims}.")
    check_count("--grid-points", grid_points, 2)
    check_real("--range", span, 0, low_open=True)
    for opt, value in (("--bn-batches", bn_batches), ("--train-subset", train_subset), ("--batch-size", batch_size)):
        check_count(opt, value)
    check_real("--wd", wd, 0)
    bad = [i for i in ignore if i not in IGNORABLE]
    if bad:
        raise ConfigError(f"--ignore takes {', '.join(IGNORABLE)} (comma-separated) or nothing, got {bad[0]!r}.")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise ConfigError(f"--seed must be a whole number in [0, 2^63), got {seed!r}.")
    if directions is not None:
        if not 1 <= len(directions) <= 2:
            raise ConfigError(f"give one or two direction files, got {len(directions)}.")
        dims = len(directions)
    metrics = Path(metrics)
    vec_path = directions_path(metrics)
    center = load_model(path)
    base = line_between(center, center)
    layout = base.layout
    w = base.points[0]
    others = [load_model(f) for f in directions or []]
    for o in others:
        line_between(center, o)  # the same architecture, or a clear error
    inputs = {str(center.path): center.sha256, **{str(o.path): o.sha256 for o in others}}
    wd = float(center.meta.config.get("wd", 0.0)) if wd is None else wd
    name = dataset or center.meta.dataset
    if name is None:
        raise ConfigError(f"'{path}' does not record its data set; pass --dataset.")
    coords = np.linspace(-span, span, grid_points)
    shape = (grid_points,) * dims
    names = plane_metric_names(split)
    grid = {n: np.full(shape, np.nan) for n in names}
    method = "files" if directions is not None else "random"
    config = {"dims": dims, "directions": method, "ignore": list(ignore) if method == "random" else None,
              "seed": seed if method == "random" else None, "range": span, "grid_points": grid_points,
              "dataset": name, "split": split, "wd": wd, "bn_batches": bn_batches, "train_subset": train_subset,
              "precision": precision}
    check_outputs({"--metrics": metrics, "--plot": plot, "directions file": vec_path}, list(inputs), force=True)
    old, started = open_outputs(metrics, inputs, config, resume=resume, force=force, plot=plot,
                                shapes={n: shape for n in names})
    for n in names:
        if n in old:
            grid[n] = np.asarray(old[n], dtype=np.float64)

    if method == "random":
        vectors = random_directions(center.model, w, layout, dims, seed, tuple(ignore))
    else:
        vectors = torch.stack([layout.flatten(dict(o.model.named_parameters())) - w for o in others])
    if resume and vec_path.exists():
        tensors, md = read_checkpoint(vec_path)
        if md.get("kind") != "surface-directions" or not torch.equal(tensors.get("directions", torch.empty(0)),
                                                                      vectors):
            raise ConfigError(f"'{vec_path}' does not hold this run's directions; start over with --force.")
    elif distributed.is_main():
        check_output(vec_path, force or resume, "directions file")
        save_checkpoint(vec_path, {"directions": vectors.contiguous()},
                        {"format": "pt", "kind": "surface-directions", "param_layout": layout.to_json(),
                         "inputs": json.dumps(inputs, sort_keys=True), "config": json.dumps(config, sort_keys=True),
                         "created": utc_now()})
    norms = vectors.double().norm(dim=1).tolist()
    scales = {"alpha": coords} if dims == 1 else {"alpha": coords, "beta": coords}
    attrs = {**provenance(inputs, config, "surface"), "split": split, "dims": dims,
             "direction_norms": json.dumps(norms), "directions_file": vec_path.name, "w_norm": float(w.double().norm())}
    if dims == 2:
        attrs["directions_cosine"] = float(vectors[0].double() @ vectors[1].double() / max(norms[0] * norms[1],
                                                                                               1e-300))
    if started:
        attrs["started"] = started
    axes = ("alpha",) if dims == 1 else ("alpha", "beta")

    def write(summary: dict | None = None) -> None:
        if summary is not None:
            attrs["summary"] = json.dumps(summary)
        write_h5(metrics, scales=scales, datasets={n: (grid[n], axes) for n in names}, attrs=attrs)

    cells = [[i] for i in range(grid_points)] if dims == 1 else [[i, j] for i in range(grid_points)
                                                                 for j in range(grid_points)]
    todo = distributed.broadcast_object([c for c in cells if any(np.isnan(grid[n][tuple(c)]) for n in names)])
    if todo:
        on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

        def weights_of(cell: list[int], dev: torch.device) -> torch.Tensor:
            if dev not in on_device:
                on_device[dev] = (w.to(dev), vectors.to(dev))
            w_dev, d_dev = on_device[dev]
            return w_dev + sum(float(coords[k]) * d_dev[a] for a, k in enumerate(cell))

        def store(cell: list[int], m: dict[str, float]) -> None:
            for n in names:
                grid[n][tuple(cell)] = m[n]
            write()

        write()
        evaluate_cells(base, todo, weights_of, store, label="surface", total=len(cells), metrics=metrics,
                       source=path, dataset=name, device=device, data_root=data_root, download=download,
                       split=split, batch_size=batch_size, bn_batches=bn_batches, train_subset=train_subset, wd=wd,
                       precision=precision, channels_last=channels_last, num_workers=num_workers, quiet=quiet)
    middle = grid_points // 2 if grid_points % 2 else None  # the network itself is a grid point when G is odd
    at_center = {n: float(grid[n][(middle,) * dims]) if middle is not None else float("nan") for n in names}
    summary = surface_summary(grid, at_center)
    write(summary)
    result = SurfaceResult(command="surface", inputs=file_refs(inputs), split=split,
                           metrics={g: Metrics.of({k: PlaneSummary(**v) for k, v in summary[g].items()})
                                    for g in ("train", "eval")},
                           dims=dims, directions=method, grid_points=grid_points, range=span,
                           direction_norms=norms)
    if plot is not None and distributed.is_main():
        from .plots import plot_surface

        plot_surface(metrics, plot)
    result.outputs = {"metrics": FileRef.of(metrics), "directions": FileRef.of(vec_path),
                      "plot": FileRef.of(plot) if plot is not None else None}
    result.seconds = time.time() - t0
    return result
