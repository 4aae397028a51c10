"""``mctool plane``: loss and error surfaces on the plane through three points (docs/method.md#plane).

u = (w2 - w0) / ||w2 - w0||, v = the part of w1 - w0 orthogonal to u, normalised; dx = ||w2 - w0||,
dy = ||v'||. Grid point (alpha, beta) has weights w0 + alpha dx u + beta dy v and plot coordinates
(alpha dx, beta dy), so w0 sits at (0, 0), w2 at (dx, 0) and w1 at (<w1 - w0, u>, dy).
"""

from __future__ import annotations

import json
import numbers
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import distributed
from .checkpoint import load_model
from .curve_eval import metric_set
from .bn import bn_data_setting, bn_pass_setting, check_bn_batch_size, check_bn_data
from .curves import Curve, coefficients, line_between, load_curve
from .data import check_fits, load_data
from .errors import ConfigError, MetricsFileError
from .batched import DEFAULT_POINTS_PER_PASS, ManyEvaluator, Span, check_points_per_pass
from .fileio import holds_output_locks
from .h5io import kept_attrs, open_outputs, provenance, record_data, write_h5
from .loop import evaluation_split
from .options import MAX_GRID_POINTS, MAX_POINTS, MAX_RATE, check_count, check_real, file_list
from .results import FileRef, Metrics, PlaneResult, PlaneSummary, file_refs
from .calls import library_call
from .runtime import resolve_device
from .points import PointRun, check_shard, finishing, from_the_first_write, shard_tasks, shard_text

_REL_EPS = 1e-6  # w1 closer than this (relative to ||w1 - w0||) to the line through w0 and w2 is degenerate


@dataclass
class PlaneBasis:
    w0: torch.Tensor
    u: torch.Tensor
    v: torch.Tensor
    dx: float
    dy: float
    w1_x: float  # <w1 - w0, u>

    @classmethod
    def through(cls, w0: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                names: tuple[str, str, str] = ("w0", "w1", "w2")) -> "PlaneBasis":
        """The orthonormal basis of the plane through three points; degenerate inputs are refused (naming the
        points by ``names``)."""
        d2 = w2.double() - w0.double()  # (the differences in float64: float32's would round them)
        dx = float(d2.norm())
        if dx == 0.0:
            raise ConfigError(f"the first and third points coincide ({names[0]} and {names[2]} are the same "
                              "network); a plane needs three distinct points.")
        u = d2 / dx
        d1 = w1.double() - w0.double()
        x = float(d1 @ u)
        vp = d1 - x * u
        dy = float(vp.norm())
        if dy <= _REL_EPS * max(float(d1.norm()), dx):
            raise ConfigError(f"the three points lie on one line ({names[1]} is on the line through {names[0]} and "
                              f"{names[2]}), so they span no plane; pick another bend or checkpoint.")
        return cls(w0.float(), u.float(), (vp / dy).float(), dx, dy, x)

    def weights(self, alpha: float, beta: float) -> torch.Tensor:
        return self.w0 + (alpha * self.dx) * self.u + (beta * self.dy) * self.v

    def project(self, w: torch.Tensor) -> tuple[float, float, float]:
        """Plot coordinates of ``w`` and its distance from the plane."""
        d = w.double() - self.w0.double()
        u, v = self.u.double(), self.v.double()
        x, y = float(d @ u), float(d @ v)
        # the residual's norm: sqrt(|d|^2 - x^2 - y^2) would cancel catastrophically near the plane
        return x, y, float((d - x * u - y * v).norm())


_CHUNK = 1 << 22  # parameters per float64 block of ``curve_projection``


def curve_projection(curve: Curve, basis: PlaneBasis, w0: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                     ts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Plot coordinates ``[n, 2]`` of the curve at ``ts`` and its distances ``[n]`` from the plane through w0, w1,
    w2, to float64 rounding. A curve's weights are w(t) = sum_k c_k(t) theta_k with sum_k c_k(t) = 1, so its
    coordinates are c(t) times those of the control points theta_k, and its distance from the plane is
    sqrt(c(t)^T G c(t)), G the Gram matrix of the control points' residuals (their parts off the plane). All is
    computed in float64 from the float32 points, a block of parameters at a time (the basis vectors too, which
    ``basis`` holds only in float32): a one-bend curve, whose control points span the plane, is then off it by
    ~1e-15 of its size instead of float32's ~1e-7."""
    pts = curve.points

    def blocks():
        for lo in range(0, pts.shape[1], _CHUNK):
            part = slice(lo, lo + _CHUNK)
            a = w0[part].double()
            u = (w2[part].double() - a) / basis.dx
            v = (w1[part].double() - a - basis.w1_x * u) / basis.dy
            yield pts[:, part].double() - a, u, v

    xs = torch.zeros(len(pts), dtype=torch.float64)
    ys = torch.zeros(len(pts), dtype=torch.float64)
    for d, u, v in blocks():
        xs += d @ u
        ys += d @ v
    gram = torch.zeros(len(pts), len(pts), dtype=torch.float64)
    for d, u, v in blocks():
        r = d - xs[:, None] * u - ys[:, None] * v
        gram += r @ r.T
    c = torch.stack([coefficients(curve.curve, curve.num_bends, torch.tensor(float(t), dtype=torch.float64))
                     for t in ts])  # [n, K]
    xy = torch.stack([c @ xs, c @ ys], 1)
    off = torch.einsum("nk,kl,nl->n", c, gram, c).clamp_min(0).sqrt()
    return xy.numpy(), off.numpy()


def default_bend(num_bends: int) -> int:
    """The bend of a curve that spans its plane when --bend is not given: the middle one (the first of two)."""
    return (num_bends + 1) // 2


def _points(paths: list[str], bend: int | None) -> tuple[Curve | None, list[torch.Tensor], Any, dict[str, str],
                                                         tuple[str, str, str], int | None]:
    """(curve or None, [w0, w1, w2], base curve for building the network, inputs' sha256, the points' names,
    the bend used: None for three checkpoints)."""
    if len(paths) == 1:
        curve = load_curve(paths[0])[0]
        n = curve.num_bends
        if n == 0:
            raise ConfigError("a line has no bend to span a plane; give a bezier/polychain curve or three checkpoints.")
        i = default_bend(n) if bend is None else bend
        if not 1 <= i <= n:
            raise ConfigError(f"--bend must be between 1 and {n} for this curve, got {i}.")
        names = (f"A of '{curve.path}'", f"bend {i} of '{curve.path}'", f"B of '{curve.path}'")
        return (curve, [curve.points[0], curve.points[i], curve.points[-1]], curve, {str(curve.path): curve.sha256},
                names, i)
    if len(paths) == 3:
        if bend is not None:
            raise ConfigError("--bend applies to a curve file, not to three checkpoints.")
        models = [load_model(p) for p in paths]
        base = line_between(models[0], models[2])
        line_between(models[0], models[1])  # checks compatibility of the middle point too
        w = [base.layout.flatten(m.model.state_dict()) for m in models]
        return None, w, base, {str(m.path): m.sha256 for m in models}, tuple(f"'{p}'" for p in paths), None
    raise ConfigError(f"give one curve file or three model checkpoints (w0 w1 w2), not {len(paths)} files.")


def grid_fractions(points: np.ndarray, curve: np.ndarray | None, dx: float, dy: float,
                   margins: tuple[float, float, float, float], grid_points: int) -> tuple[np.ndarray, np.ndarray]:
    """The grid's alpha and beta, in units of dx and dy: the box that holds the three points and the projected
    curve (usually [0, 1] x [0, 1]: the bend of a one-bend curve projects above the segment, the curve inside the
    triangle) widened by ``margins`` (left, right, bottom, top) times its width and height."""
    pts = points if curve is None else np.vstack([points, curve])
    xs, ys = pts[:, 0] / dx, pts[:, 1] / dy

    def box(v: np.ndarray) -> tuple[float, float]:
        # [0, 1], widened where a point lies outside by more than the float32 rounding of the curve's points
        lo, hi = float(v.min()), float(v.max())
        return (lo if lo < -1e-5 else 0.0), (hi if hi > 1 + 1e-5 else 1.0)

    (x0, x1), (y0, y1) = box(xs), box(ys)
    left, right, bottom, top = margins
    return (np.linspace(x0 - left * (x1 - x0), x1 + right * (x1 - x0), grid_points),
            np.linspace(y0 - bottom * (y1 - y0), y1 + top * (y1 - y0), grid_points))


def plane_metric_names(split: str) -> list[str]:
    """The metrics of a plane file: each a (G, G) dataset, and ``at_points/NAME`` of shape (3,)."""
    return ["train/loss", "train/err", f"{split}/nll", f"{split}/err"]


def plane_tasks(grid_points: int) -> list[list[int]]:
    """Every point of a plane run, in order: ``[k]`` for the three points, then ``[i, j]`` for the grid cells."""
    return [[k] for k in range(3)] + [[i, j] for i in range(grid_points) for j in range(grid_points)]


def _nan_extreme(fn: Any, values: np.ndarray) -> float:
    """min or max over the values computed (NaN if none is: a shard may hold no grid cell)."""
    values = values[~np.isnan(values)]
    return float(fn(values)) if values.size else float("nan")


def grid_summary(grid: dict[str, np.ndarray], at_points: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """``{"train": {metric: {"min", "max", "at_points"}}, "eval": {...}}`` of a plane or surface: min and max
    over the grid cells computed (NaN ones are left out), and the values at the marked points (a plane's
    three, a surface's network; NaN where not computed)."""
    summary: dict[str, dict[str, Any]] = {"train": {}, "eval": {}}
    for n in grid:
        group, metric = metric_set(n)
        summary[group][metric] = {"min": _nan_extreme(np.min, grid[n]), "max": _nan_extreme(np.max, grid[n]),
                                  "at_points": at_points[n].tolist()}
    return summary


def grid_metrics(summary: dict[str, dict[str, Any]]) -> dict[str, Metrics]:
    """``metrics`` of a ``PlaneResult`` or ``SurfaceResult`` from ``grid_summary``'s dict."""
    return {g: Metrics.of({k: PlaneSummary(**v) for k, v in summary[g].items()}) for g in ("train", "eval")}


def write_plane_file(path: str | Path, attrs: dict[str, Any], *, alpha: np.ndarray, beta: np.ndarray,
                     grid: dict[str, np.ndarray], at_points: dict[str, np.ndarray], points: np.ndarray,
                     curve: np.ndarray | None = None, curve_offplane: np.ndarray | None = None,
                     summary: dict[str, Any] | None = None) -> None:
    """Write a plane metrics file (atomically): ``alpha`` and ``beta`` are the scales in plot units; with
    ``summary`` (``grid_summary``) also the root attribute ``summary``. ``plane`` and ``merge`` both write
    through here."""
    if summary is not None:
        attrs["summary"] = json.dumps(summary)
    datasets: dict[str, tuple[np.ndarray, tuple[str, ...]]] = {n: (grid[n], ("alpha", "beta")) for n in grid}
    datasets.update({f"at_points/{n}": (at_points[n], ()) for n in grid})
    datasets["points"] = (points, ())
    if curve is not None:
        datasets["curve"] = (curve, ())
        datasets["curve_offplane"] = (curve_offplane, ())
    write_h5(path, scales={"alpha": alpha, "beta": beta}, datasets=datasets, attrs=attrs)


def evaluate_cells(base: Curve, todo: list, weights_of: Callable[[Any, torch.device], torch.Tensor],
                   store: Callable[[Any, dict[str, float]], None], *, label: str, total: int, metrics: Path,
                   source: str | Path, dataset: str, device: str, data_root: str | Path | None, download: bool,
                   split: str, batch_size: int, bn_batches: int | None, train_subset: int | None, wd: float,
                   precision: str, channels_last: bool, num_workers: int, quiet: bool, points_per_pass: int = 1,
                   compile: bool = False, bn_data: str = "augmented",
                   on_start: Callable[[], None] | None = None, flush: Callable[[], None] | None = None,
                   started: str | None = None, replaced_figure: str | Path | None = None,
                   attrs: dict[str, Any] | None = None, resume: bool = False,
                   span_of: Callable[[list, torch.device], Span | None] | None = None) -> None:
    """Evaluate the networks ``weights_of(cell, device)`` (flat parameters of ``base``'s network) for every cell
    of ``todo``, with BN recomputed for each (``evaluate_weights``), and ``store(cell, metrics)`` each as soon as it
    is done, then ``flush()`` (the caller's write of its file) once per pass; ``total`` cells in the run,
    ``len(todo)`` of them missing. One process goes in order; under
    torchrun the ranks take cells as they become free and rank 0 stores them. Ctrl-C: ``Interrupted`` with the
    number saved. ``points_per_pass`` networks are evaluated together (``batched.ManyEvaluator``), each stored
    when its pass is done. ``on_start()`` runs once the data set has loaded and fits the network, before the
    first pass (the caller writes its first files there: a refused run writes none; ``started``, the start time
    they record, tells its file on Ctrl-C: ``from_the_first_write``; ``replaced_figure``, an earlier run's --plot
    this run draws again, is deleted there; ``attrs``, the metrics file's attributes, get the data set's
    fingerprint, checked on ``resume`` against the file's: ``h5io.record_data``). ``span_of(cells, device)``:
    a pass's networks as combinations of a few vectors (``batched.Span``), or None. The grid runner of ``plane``
    and ``surface``."""
    dev = resolve_device(device)
    data = load_data(dataset, root=data_root, split=split, download=download, device=dev,
                     augment=base.meta.train_augment(), channels_last=channels_last, **base.meta.data_options(),
                     num_workers=num_workers)
    check_fits(base.meta, data.info, source)
    if attrs is not None:
        record_data(attrs, data, dataset, metrics if resume else None)
    train_split = data.train.subset(train_subset) if train_subset else None
    model = base.build_model().to(dev)
    if channels_last:
        model.to(memory_format=torch.channels_last)

    many = ManyEvaluator(model, base.layout, data, points_per_pass=points_per_pass, wd=wd, batch_size=batch_size,
                         bn_batches=bn_batches, precision=precision, train_split=train_split,
                         channels_last=channels_last, compile=compile, bn_data=bn_data)
    check_bn_batch_size(model, batch_size)
    distributed.sync("the checks before the first write")  # a run refused on any rank writes no file
    counted = ("train/loss", "at_points/train/loss")

    def measure(cells: list) -> list[dict[str, float]]:
        return many.evaluate(torch.stack([weights_of(cell, dev) for cell in cells]),
                             None if span_of is None else span_of(cells, dev))

    with from_the_first_write(metrics, total, started, counted, replaced_figure):
        if on_start is not None:
            on_start()
        PointRun(label, total=total, metrics=metrics, quiet=quiet, counted=counted).run(
            todo, measure, store,
            lambda _, m: f"train loss {m['train/loss']:.3g} {split} err {m[f'{split}/err']:.1%}",
            points_per_pass=points_per_pass, flush=flush)


@library_call
@holds_output_locks
def plane(paths: Sequence[str | Path], metrics: str | Path, *, grid_points: int = 21,
          margins: tuple[float, float, float, float] = (0.2, 0.2, 0.2, 0.2), bend: int | None = None,
          curve_points: int = 61, plot: str | Path | None = None, resume: bool = False, force: bool = False,
          device: str = "auto", dataset: str | None = None, data_root: str | Path | None = None, download: bool = False,
          split: str | None = None, batch_size: int = 512, bn_batches: int | None = None,
          train_subset: int | None = None, wd: float | None = None, precision: str = "fp32",
          channels_last: bool = False, num_workers: int = 4, shard: tuple[int, int] | None = None,
          points_per_pass: int = DEFAULT_POINTS_PER_PASS, compile: bool = False, bn_data: str = "augmented",
          quiet: bool = False) -> PlaneResult:
    """Evaluate train loss/error and test NLL/error on a G x G grid over the plane, plus at the three points
    themselves. The grid holds the three points and the projected curve, with ``margins`` (left, right, bottom,
    top) as fractions of their extent: of dx and dy when the bend projects between w0 and w2 (``grid_fractions``).

    ``shard=(I, N)`` evaluates only the points whose index in ``plane_tasks`` is I modulo N (the others stay
    NaN; the summary covers the points computed); ``mctool.merge`` combines the N shard files into the file of
    the whole run."""
    t0 = time.time()
    paths = file_list(paths, "paths")
    check_points_per_pass(points_per_pass)
    shard = check_shard(shard, plot, "plane")
    check_count("--grid-points", grid_points, 2, MAX_GRID_POINTS)
    check_count("--curve-points", curve_points, 2, MAX_POINTS)
    if isinstance(margins, numbers.Real) and not isinstance(margins, bool):  # one margin for all four sides
        margins = (margins,) * 4
    if not isinstance(margins, (list, tuple, np.ndarray)):
        raise ConfigError(f"margins must be four numbers (left, right, bottom, top) or one for all, got {margins!r}.")
    if len(margins) != 4:
        raise ConfigError(f"give four margins (left, right, bottom, top), got {len(margins)}.")
    for side, value in zip(("left", "right", "bottom", "top"), margins):
        check_real(f"--margin-{side}", value, 0, 10)  # as surface's --margin (the CLI checks --margin itself)
    for opt, value in (("--bn-batches", bn_batches), ("--batch-size", batch_size), ("--bend", bend)):
        check_count(opt, value)
    check_count("--train-subset", train_subset, 0)  # 0: all training images (as hessian's)
    train_subset = train_subset or None
    check_real("--wd", wd, 0, MAX_RATE)
    check_bn_data(bn_data)
    metrics = Path(metrics)
    curve, (w0, w1, w2), base, inputs, names, bend = _points(paths, bend)  # (the bend used, given or not)
    split = evaluation_split(split, inputs, metrics if resume else None)
    basis = PlaneBasis.through(w0, w1, w2, names)
    wd = float(base.meta.config.get("wd", 0.0)) if wd is None else wd
    name = base.meta.dataset_or(dataset, paths[0])
    coords = np.array([[0.0, 0.0], [basis.w1_x, basis.dy], [basis.dx, 0.0]])
    curve_xy = curve_off = None
    if curve is not None:
        curve_xy, curve_off = curve_projection(curve, basis, w0, w1, w2, np.linspace(0, 1, curve_points))
    alphas, betas = grid_fractions(coords, curve_xy, basis.dx, basis.dy, margins, grid_points)
    names = plane_metric_names(split)
    grid = {n: np.full((grid_points, grid_points), np.nan) for n in names}
    at_points = {n: np.full(3, np.nan) for n in names}
    config = {"grid_points": grid_points, "margins": list(margins), "bend": bend, "dataset": name, "split": split,
              "wd": wd, "bn_batches": bn_batches, "bn_batch_size": bn_pass_setting(base.buffers, batch_size),
              "bn_data": bn_data_setting(base.buffers, bn_data, bn_batches), "train_subset": train_subset,
              "precision": precision}
    # A shard file records its shard in its config; resuming compares it, also when --shard is not given.
    old, started, finished, draw = open_outputs(metrics, inputs, {**config, "shard": shard_text(shard)},
                                                resume=resume, force=force, plot=plot,
                                                shapes={**{n: grid[n].shape for n in names},
                                                        **{f"at_points/{n}": (3,) for n in names}},
                                                # (earlier versions recorded --bend as given)
                                                recorded_none={"bend": bend})
    if shard is not None:
        config["shard"] = shard_text(shard)
    if old:
        for scale, values in (("alpha", alphas * basis.dx), ("beta", betas * basis.dy)):
            if scale in old and (np.shape(old[scale]) != values.shape
                                 or not np.allclose(old[scale], values, rtol=1e-9, atol=0)):
                raise MetricsFileError(f"'{metrics}' was computed on another grid (an earlier mctool that did not "
                                       "widen the grid to hold every point of interest); start over with --force.")
        for n in names:
            grid[n] = np.asarray(old[n], dtype=np.float64)
            at_points[n] = np.asarray(old[f"at_points/{n}"], dtype=np.float64)

    attrs = {**provenance(inputs, config, "plane"), "dx": basis.dx, "dy": basis.dy, "w1_x": basis.w1_x,
             "u_norm": float(basis.u.double().norm()), "v_norm": float(basis.v.double().norm()),
             "u_dot_v": float(basis.u.double() @ basis.v.double()), "split": split,
             "alpha_fractions": json.dumps(alphas.tolist()), "beta_fractions": json.dumps(betas.tolist())}
    if shard is not None:
        attrs["shard"] = shard_text(shard)
    if started:
        attrs["started"] = started
    if resume:  # (kept when no point is left to compute: no data set is loaded then)
        attrs |= kept_attrs(metrics)

    def write(summary: dict | None = None) -> None:
        write_plane_file(metrics, attrs, alpha=alphas * basis.dx, beta=betas * basis.dy, grid=grid,
                         at_points=at_points, points=coords, curve=curve_xy, curve_offplane=curve_off,
                         summary=summary)

    def missing(cell: list[int]) -> bool:
        return any(np.isnan(at_points[n][cell[0]] if len(cell) == 1 else grid[n][cell[0], cell[1]]) for n in names)

    # The three points first, then the grid cells; with --shard only this shard's. Rank 0's list (another rank
    # may read the file after rank 0 wrote more into it).
    mine = shard_tasks(plane_tasks(grid_points), shard)
    todo = distributed.broadcast_object([cell for cell in mine if missing(cell)])
    point_weights = [w0, w1, w2]

    on_device: dict[torch.device, PlaneBasis] = {}  # the basis, moved to the compute device once

    def basis_on(dev: torch.device) -> PlaneBasis:
        if dev not in on_device:
            on_device[dev] = PlaneBasis(basis.w0.to(dev), basis.u.to(dev), basis.v.to(dev), basis.dx, basis.dy,
                                        basis.w1_x)
        return on_device[dev]

    def weights_of(cell: list[int], dev: torch.device) -> torch.Tensor:
        if len(cell) == 1:
            return point_weights[cell[0]].to(dev)
        return basis_on(dev).weights(float(alphas[cell[0]]), float(betas[cell[1]]))

    def span_of(cells: list[list[int]], dev: torch.device) -> Span | None:
        """Grid cells as w0 + (alpha dx) u + (beta dy) v. A pass that holds one of the three points goes without
        (they are evaluated as themselves, so that their values are exactly the networks' own)."""
        if any(len(cell) == 1 for cell in cells):
            return None
        b = basis_on(dev)
        return Span((b.w0[None], b.u[None], b.v[None]), torch.tensor(
            [[1.0, float(alphas[a]) * b.dx, float(betas[c]) * b.dy] for a, c in cells], dtype=torch.float64))

    def store(cell: list[int], m: dict[str, float]) -> None:
        for n in names:
            if len(cell) == 1:
                at_points[n][cell[0]] = m[n]
            else:
                grid[n][cell[0], cell[1]] = m[n]

    if todo:
        evaluate_cells(base, todo, weights_of, store, label="plane", total=len(mine), metrics=metrics,
                       source=paths[0], dataset=name, device=device, data_root=data_root, download=download,
                       split=split, batch_size=batch_size, bn_batches=bn_batches, train_subset=train_subset, wd=wd,
                       precision=precision, channels_last=channels_last, num_workers=num_workers, quiet=quiet,
                       points_per_pass=points_per_pass, compile=compile, bn_data=bn_data, on_start=write,
                       flush=write, span_of=span_of, started=attrs["started"],
                       replaced_figure=plot if draw else None, attrs=attrs, resume=resume)
    with finishing(metrics, len(mine)):
        summary = grid_summary(grid, at_points)
        if todo or not finished:  # (a resume with nothing to compute leaves a finished file as it is)
            write(summary)
        result = PlaneResult(command="plane", inputs=file_refs(inputs), split=split, metrics=grid_metrics(summary),
                             grid_points=grid_points, dx=basis.dx, dy=basis.dy, points=coords.tolist(),
                             curve_max_offplane=float(curve_off.max()) if curve_off is not None else None)
        if draw and distributed.is_main():
            from .plots import plot_grid

            plot_grid(metrics, plot)
    result.outputs = {"metrics": FileRef.of(metrics), "plot": FileRef.of(plot) if plot is not None else None}
    result.seconds = time.time() - t0
    return result
