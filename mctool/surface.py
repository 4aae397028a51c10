"""``mctool surface``: loss and error around one network, along one or two directions (docs/surface.md).

Directions are random and filter-normalised (Li et al. 2018: each filter of a direction, a slice along
dim 0 of a weight, is scaled to the norm of the same filter of the network; BatchNorm parameters and
biases are zeroed unless kept), the principal directions of a training trajectory (``pca``: unit vectors
through the network that the trajectory's points lie closest to), or the differences from the network to
other networks. Grid point (a, b) has weights w + a d1 + b d2. The grid and the network itself are
evaluated by ``plane``'s runner (BN recomputed at every point, resumable, NaN for what is not computed yet,
points dealt to the ranks under torchrun, ``--shard`` for ``merge``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import distributed
from .checkpoint import load_model, read_vectors, save_vectors
from .curves import line_between
from .errors import ConfigError
from .fileio import check_output, check_outputs, holds_output_locks
from .flat import ParamLayout
from .h5io import kept_attrs, open_outputs, provenance, write_h5
from .loop import evaluation_split
from .options import (MAX_GRID_POINTS, MAX_RATE, MAX_SPAN, check_count, check_real, check_seed, expand_patterns,
                      file_list)
from .batched import DEFAULT_POINTS_PER_PASS, Span, check_points_per_pass
from .bn import bn_data_setting, bn_pass_setting, check_bn_data
from .plane import evaluate_cells, grid_metrics, grid_summary, plane_metric_names
from .points import check_shard, finishing, shard_tasks, shard_text
from .results import FileRef, SurfaceResult, file_refs
from .calls import library_call

#: What ``--ignore`` can name: parameters zeroed in random directions.
IGNORABLE = ("bn", "bias")
#: How directions are chosen.
METHODS = ("random", "pca", "files")
_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)
_MAX_TRAJECTORY = 1000


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


@dataclass
class Trajectory:
    """The principal directions of a trajectory relative to a network w, and the trajectory seen in them."""

    directions: torch.Tensor  # [dims, P] float32, orthonormal (in float64 before rounding)
    explained: list[float]  # per direction: the share of sum_i ||w_i - w||^2 along it
    coords: np.ndarray  # [T, dims]: <w_i - w, d_k>
    error: np.ndarray  # [T]: ||(w_i - w) - sum_k coords_ik d_k|| / ||w_i - w|| (0 where w_i = w)


def pca_directions(w: torch.Tensor, points: list[torch.Tensor], dims: int) -> torch.Tensor:
    """``[dims, P]``: the unit directions through ``w`` that the ``points`` (flat networks of a trajectory) lie
    closest to in the least-squares sense: the top right singular vectors of the matrix of differences w_i - w
    (not centred on their mean, so that the plane passes through w). Each direction's sign puts the
    trajectory's first point at a coordinate <= 0 (training runs towards +, ending at w, the origin)."""
    diffs = torch.stack([(p - w).double() for p in points])  # [T, P]
    gram = diffs @ diffs.T  # [T, T]: the SVD of a short, wide matrix through its Gram matrix
    total = float(gram.trace())
    eigval, eigvec = torch.linalg.eigh(gram)
    eigval, eigvec = eigval.flip(0), eigvec.flip(1)
    if total <= 0 or len(points) < dims or float(eigval[dims - 1]) <= 1e-12 * total:
        raise ConfigError(f"the trajectory spans fewer than {dims} direction{'s' if dims > 1 else ''} away from the "
                          f"network (its points coincide with it{' or lie on one line through it' if dims > 1 else ''}"
                          f"); give more distinct checkpoints{', or use --dims 1' if dims > 1 else ''}.")
    dirs = (eigvec[:, :dims].T @ diffs) / eigval[:dims].sqrt()[:, None]  # [dims, P], unit norm
    first = diffs[0] @ dirs.T
    return (dirs * torch.where(first > 0, -1.0, 1.0).to(torch.float64)[:, None]).float()


def project_trajectory(w: torch.Tensor, points: list[torch.Tensor], directions: torch.Tensor) -> Trajectory:
    """The trajectory ``points`` in the coordinates of orthonormal ``directions`` through ``w`` (float64)."""
    diffs = torch.stack([(p - w).double() for p in points])
    dirs = directions.double()
    coords = diffs @ dirs.T  # [T, dims]
    total = float((diffs * diffs).sum())
    resid = (diffs - coords @ dirs).norm(dim=1)
    norms = diffs.norm(dim=1)
    error = torch.where(norms > 0, resid / norms.clamp_min(1e-300), torch.zeros_like(norms))
    explained = ((coords ** 2).sum(dim=0) / max(total, 1e-300)).tolist()
    return Trajectory(directions, explained, coords.numpy(), error.numpy())


def grid_ranges(method: str, dims: int, span: float | None, margin: float,
                trajectory: np.ndarray | None = None) -> list[tuple[float, float]]:
    """The coefficients' range along each direction. ``span`` given: [-span, span]. Otherwise the points of
    interest plus ``margin`` times their extent on each side: ``random``: [-1, 1]; ``files``: the network (0)
    and the file's network (1); ``pca``: the network (0) and the trajectory's coordinates."""
    if span is not None:
        return [(-span, span)] * dims
    if method == "random":
        return [(-1.0, 1.0)] * dims
    out = []
    for k in range(dims):
        pts = [0.0, 1.0] if method == "files" else [0.0, *trajectory[:, k].tolist()]
        lo, hi = min(pts), max(pts)
        extent = hi - lo
        out.append((lo - margin * extent, hi + margin * extent))
    return out


def directions_path(metrics: Path) -> Path:
    """Where a surface run keeps its directions: ``NAME-directions.safetensors`` beside the metrics file."""
    return metrics.with_name(metrics.stem + "-directions.safetensors")


def surface_tasks(grid_points: int, dims: int) -> list[list[int]]:
    """Every point of a surface run, in order: ``[]`` for the network itself, then ``[i]`` or ``[i, j]`` for the
    grid cells."""
    cells = ([[i] for i in range(grid_points)] if dims == 1
             else [[i, j] for i in range(grid_points) for j in range(grid_points)])
    return [[], *cells]


def write_surface_file(path: str | Path, attrs: dict[str, Any], *, scales: dict[str, np.ndarray],
                       grid: dict[str, np.ndarray], center: dict[str, np.ndarray],
                       trajectory: np.ndarray | None = None, trajectory_error: np.ndarray | None = None,
                       summary: dict[str, Any] | None = None) -> None:
    """Write a surface metrics file (atomically); ``surface`` and ``merge`` both write through here."""
    if summary is not None:
        attrs["summary"] = json.dumps(summary)
    axes = tuple(scales)
    datasets: dict[str, tuple[np.ndarray, tuple[str, ...]]] = {n: (grid[n], axes) for n in grid}
    datasets.update({f"at_points/{n}": (center[n], ()) for n in grid})
    if trajectory is not None:
        datasets["trajectory"] = (trajectory, ())
        datasets["trajectory_error"] = (trajectory_error, ())
    write_h5(path, scales=scales, datasets=datasets, attrs=attrs)


def _method(directions: str | Sequence[str | Path] | None,
            trajectory: Sequence[str | Path] | None) -> tuple[str, list[str]]:
    """(method, direction files) from ``directions`` ('random', 'pca' or checkpoint files), checked."""
    if directions is None or directions == "random" or directions == ["random"]:
        method, files = "random", []
    elif directions == "pca" or directions == ["pca"]:
        method, files = "pca", []
    elif isinstance(directions, (list, tuple, str, os.PathLike)):  # (one file given as a str or path: that file)
        files = [str(d) for d in file_list(directions, "directions")]
        if any(f in METHODS for f in files):
            raise ConfigError("--directions is 'random', 'pca', or one or two checkpoint files, not a mix.")
        if not 1 <= len(files) <= 2:
            raise ConfigError(f"give one or two direction files, got {len(files)}.")
        for f in files:  # a mistyped method ('rnadom', 'PCA') is not a missing checkpoint
            if not os.path.lexists(f) and (f.lower() in METHODS or (os.sep not in f and "." not in f)):
                raise ConfigError(f"--directions '{f}' is neither a method (random, pca) nor an existing checkpoint "
                                  "file.")
        method = "files"
    else:
        raise ConfigError(f"--directions is 'random', 'pca', or one or two checkpoint files, got {directions!r}.")
    if method == "pca" and not trajectory:
        raise ConfigError("--directions pca needs the training trajectory: --trajectory FILES (e.g. the "
                          "checkpoints of train --save-every, in training order).")
    if method != "pca" and trajectory:
        raise ConfigError("--trajectory goes with --directions pca.")
    if trajectory and len(trajectory) > _MAX_TRAJECTORY:
        raise ConfigError(f"--trajectory takes at most {_MAX_TRAJECTORY} checkpoints, got {len(trajectory)}.")
    return method, files


def _check_file_directions(files: list[Path], directions: list[torch.Tensor], center: Path) -> None:
    """Refuse direction files that give no direction (the network itself) or, two of them, no plane."""
    for f, d in zip(files, directions):
        if not bool(d.any()):
            raise ConfigError(f"--directions '{f}' holds the same weights as '{center}': the direction towards it "
                              "is zero. Give another network.")
    if len(directions) == 2:
        d1, d2 = (d.double() for d in directions)
        cos = float(d1 @ d2 / (d1.norm() * d2.norm()))
        if abs(cos) > 1 - 1e-9:
            raise ConfigError(f"--directions '{files[0]}' and '{files[1]}' lie on one line through '{center}' "
                              f"(cosine {cos:.6f}): they span no plane. Give one of them (a 1-D surface) or another "
                              "network.")


@library_call
@holds_output_locks
def surface(path: str | Path, metrics: str | Path, *, dims: int | None = None,
            directions: str | Sequence[str | Path] | None = "random", trajectory: Sequence[str | Path] | None = None,
            ignore: str | tuple[str, ...] = IGNORABLE, seed: int = 0, span: float | None = None, margin: float = 0.2,
            grid_points: int = 21, plot: str | Path | None = None, resume: bool = False, force: bool = False,
            device: str = "auto", dataset: str | None = None, data_root: str | Path | None = None,
            download: bool = False, split: str | None = None, batch_size: int = 512, bn_batches: int | None = None,
            train_subset: int | None = None, wd: float | None = None, precision: str = "fp32",
            channels_last: bool = False, num_workers: int = 4, shard: tuple[int, int] | None = None,
            points_per_pass: int = DEFAULT_POINTS_PER_PASS, compile: bool = False, bn_data: str = "augmented",
            quiet: bool = False) -> SurfaceResult:
    """Train loss/error and test NLL/error of the network at ``path`` and of the networks around it along ``dims``
    directions, on a grid of ``grid_points`` coefficients per direction.

    ``directions``: ``"random"`` (Gaussian, filter-normalised, ``ignore`` zeroed, ``seed``), ``"pca"`` (the
    principal directions of the checkpoints ``trajectory`` relative to the network), or a list of model
    checkpoints (direction i is file i's weights minus the network's; ``dims``, if given, must be their
    number). ``dims`` None: 2, or the number of direction files.
    ``span``: coefficients in [-span, span]; None chooses the range from the points of interest plus ``margin``
    times their extent (``grid_ranges``). ``shard=(I, N)`` evaluates only the points whose index in
    ``surface_tasks`` is I modulo N; ``mctool.merge`` combines the shard files."""
    t0 = time.time()
    if isinstance(ignore, str):  # as the command line writes it: "bn,bias" (or "none")
        ignore = () if ignore.strip() in ("", "none") else tuple(x.strip() for x in ignore.split(","))
    if trajectory is not None:  # checkpoints, or glob patterns of them (expanded in training order)
        trajectory = expand_patterns(file_list(trajectory, "trajectory"), "--trajectory")
    check_points_per_pass(points_per_pass)
    shard = check_shard(shard, plot, "surface")
    check_count("--dims", dims)
    if dims is not None and dims > 2:
        raise ConfigError(f"--dims must be 1 or 2, got {dims}.")
    check_count("--grid-points", grid_points, 2, MAX_GRID_POINTS)
    check_real("--range", span, 0, MAX_SPAN, low_open=True)
    check_real("--margin", margin, 0, 10)
    for opt, value in (("--bn-batches", bn_batches), ("--batch-size", batch_size)):
        check_count(opt, value)
    check_count("--train-subset", train_subset, 0)  # 0: all training images (as hessian's)
    train_subset = train_subset or None
    check_real("--wd", wd, 0, MAX_RATE)
    check_bn_data(bn_data)
    bad = [i for i in ignore if i not in IGNORABLE]
    if bad:
        raise ConfigError(f"--ignore takes {', '.join(IGNORABLE)} (comma-separated) or none, got {bad[0]!r}.")
    seed = check_seed(seed)
    method, files = _method(directions, trajectory)
    if method == "files":
        if dims not in (None, len(files)):
            raise ConfigError(f"--dims {dims} with {len(files)} direction file(s): each file is one direction; "
                              f"leave --dims out (or give --dims {len(files)}).")
        dims = len(files)
    dims = dims or 2
    metrics = Path(metrics)
    vec_path = directions_path(metrics)
    center = load_model(path)
    base = line_between(center, center)
    layout = base.layout
    w = base.points[0]
    others = [load_model(f) for f in files + list(trajectory or [])]
    for o in others:
        line_between(center, o)  # the same architecture, or a clear error
    inputs = {str(center.path): center.sha256, **{str(o.path): o.sha256 for o in others}}
    split = evaluation_split(split, inputs, metrics if resume else None)
    flat_others = [layout.flatten(dict(o.model.named_parameters())) for o in others]
    if method == "files":
        _check_file_directions([o.path for o in others], [o - w for o in flat_others], center.path)
    wd = float(center.meta.config.get("wd", 0.0)) if wd is None else wd
    name = center.meta.dataset_or(dataset, path)
    names = plane_metric_names(split)
    shape = (grid_points,) * dims
    config = {"dims": dims, "directions": method, "ignore": list(ignore) if method == "random" else None,
              "seed": seed if method == "random" else None, "range": span, "margin": None if span else margin,
              "grid_points": grid_points, "dataset": name, "split": split, "wd": wd, "bn_batches": bn_batches,
              "bn_batch_size": bn_pass_setting(base.buffers, batch_size), "train_subset": train_subset,
              "bn_data": bn_data_setting(base.buffers, bn_data, bn_batches), "precision": precision}
    vec_config = {k: config[k] for k in ("dims", "directions", "ignore", "seed")}
    check_outputs({"--metrics": metrics, "--plot": plot, "directions file": vec_path}, list(inputs), force=True,
                  formats={"--metrics": "hdf5", "--plot": "figure"})
    old, started, finished, draw = open_outputs(metrics, inputs, {**config, "shard": shard_text(shard)},
                                                resume=resume, force=force, plot=plot,
                                                shapes={**{n: shape for n in names},
                                                        **{f"at_points/{n}": (1,) for n in names}})
    if shard is not None:
        config["shard"] = shard_text(shard)
    grid = {n: np.asarray(old[n], dtype=np.float64) if n in old else np.full(shape, np.nan) for n in names}
    at_center = {n: np.asarray(old[f"at_points/{n}"], dtype=np.float64) if n in old else np.full(1, np.nan)
                 for n in names}

    vectors = (read_vectors(vec_path, "directions", kind="surface-directions", layout=layout, inputs=inputs,
                            config=vec_config, shape=(dims, layout.size), what="directions", finite=True)
               if resume and vec_path.exists() else None)
    new_vectors = vectors is None
    if new_vectors:
        if method == "random":
            vectors = random_directions(center.model, w, layout, dims, seed, tuple(ignore))
        elif method == "pca":
            vectors = pca_directions(w, flat_others, dims)
        else:
            vectors = torch.stack([o - w for o in flat_others])
        if distributed.is_main():
            check_output(vec_path, force or resume, "directions file (beside --metrics)")

    def save_directions() -> None:  # written with the first metrics file, once the data set has loaded
        if new_vectors and distributed.is_main():
            save_vectors(vec_path, "directions", vectors, kind="surface-directions", layout=layout, inputs=inputs,
                         config=vec_config)

    path_seen = project_trajectory(w, flat_others, vectors) if method == "pca" else None
    ranges = grid_ranges(method, dims, span, margin, path_seen.coords if path_seen else None)
    coords = [np.linspace(lo, hi, grid_points) for lo, hi in ranges]
    norms = vectors.double().norm(dim=1).tolist()
    scales = dict(zip(("alpha", "beta"), coords))
    attrs = {**provenance(inputs, config, "surface"), "split": split, "dims": dims,
             "direction_norms": json.dumps(norms), "directions_file": vec_path.name, "w_norm": float(w.double().norm()),
             "ranges": json.dumps([list(r) for r in ranges])}
    if dims == 2:
        attrs["directions_cosine"] = float(vectors[0].double() @ vectors[1].double() / max(norms[0] * norms[1],
                                                                                               1e-300))
    if path_seen is not None:
        attrs["explained_variance_ratio"] = json.dumps(path_seen.explained)
    if shard is not None:
        attrs["shard"] = shard_text(shard)
    if started:
        attrs["started"] = started
    if resume:  # (kept when no point is left to compute: no data set is loaded then)
        attrs |= kept_attrs(metrics)

    def write(summary: dict | None = None) -> None:
        write_surface_file(metrics, attrs, scales=scales, grid=grid, center=at_center, summary=summary,
                           trajectory=path_seen.coords if path_seen else None,
                           trajectory_error=path_seen.error if path_seen else None)

    def missing(cell: list[int]) -> bool:
        return any(np.isnan(grid[n][tuple(cell)] if cell else at_center[n][0]) for n in names)

    mine = shard_tasks(surface_tasks(grid_points, dims), shard)
    todo = distributed.broadcast_object([c for c in mine if missing(c)])
    if todo:
        on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

        def on(dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:  # the network and directions there, once
            if dev not in on_device:
                on_device[dev] = (w.to(dev), vectors.to(dev))
            return on_device[dev]

        def weights_of(cell: list[int], dev: torch.device) -> torch.Tensor:
            w_dev, d_dev = on(dev)
            return w_dev + sum(float(coords[a][k]) * d_dev[a] for a, k in enumerate(cell))

        def span_of(cells: list[list[int]], dev: torch.device) -> Span:  # w + sum of coordinate x direction
            w_dev, d_dev = on(dev)
            rows = [[1.0] + [float(coords[a][cell[a]]) if cell else 0.0 for a in range(dims)] for cell in cells]
            return Span((w_dev[None], d_dev), torch.tensor(rows, dtype=torch.float64))

        def store(cell: list[int], m: dict[str, float]) -> None:
            for n in names:
                if cell:
                    grid[n][tuple(cell)] = m[n]
                else:
                    at_center[n][0] = m[n]

        def start() -> None:
            # The metrics file first: stopped between the two (kill -9), --resume finds the run and draws the
            # same directions again (they come from the options); a directions file alone would block both a
            # rerun (it exists) and --resume (no metrics file).
            write()
            save_directions()

        evaluate_cells(base, todo, weights_of, store, label="surface", total=len(mine), metrics=metrics,
                       source=path, dataset=name, device=device, data_root=data_root, download=download,
                       split=split, batch_size=batch_size, bn_batches=bn_batches, train_subset=train_subset, wd=wd,
                       precision=precision, channels_last=channels_last, num_workers=num_workers, quiet=quiet,
                       points_per_pass=points_per_pass, compile=compile, bn_data=bn_data, on_start=start,
                       flush=write, span_of=span_of, started=attrs["started"],
                       replaced_figure=plot if draw else None, attrs=attrs, resume=resume)
    else:
        save_directions()
    with finishing(metrics, len(mine)):
        summary = grid_summary(grid, at_center)
        if todo or not finished:  # (a resume with nothing to compute leaves a finished file as it is)
            write(summary)
        result = SurfaceResult(command="surface", inputs=file_refs(inputs), split=split, metrics=grid_metrics(summary),
                               dims=dims, directions=method, grid_points=grid_points, ranges=[list(r) for r in ranges],
                               direction_norms=norms,
                               explained_variance_ratio=path_seen.explained if path_seen else None,
                               trajectory_max_error=float(path_seen.error.max()) if path_seen else None)
        if draw and distributed.is_main():
            from .plots import plot_grid

            plot_grid(metrics, plot)
    result.outputs = {"metrics": FileRef.of(metrics), "directions": FileRef.of(vec_path),
                      "plot": FileRef.of(plot) if plot is not None else None}
    result.seconds = time.time() - t0
    return result
