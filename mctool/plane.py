"""``mctool plane``: loss and error surfaces on the plane through three points (docs/method.md#plane).

u = (w2 - w0) / ||w2 - w0||, v = the part of w1 - w0 orthogonal to u, normalised; dx = ||w2 - w0||,
dy = ||v'||. Grid point (alpha, beta) has weights w0 + alpha dx u + beta dy v and plot coordinates
(alpha dx, beta dy), so w0 sits at (0, 0), w2 at (dx, 0) and w1 at (<w1 - w0, u>, dy).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import load_model
from .curve_eval import interrupted, metric_set
from .curves import Curve, coefficients, line_between, load_curve
from .data import check_fits, load_data
from .errors import ConfigError
from .evaluation import evaluate_weights
from .fileio import holds_output_locks
from .h5io import open_outputs, provenance, write_h5
from .options import check_count, check_real
from .results import FileRef, Metrics, PlaneResult, PlaneSummary, file_refs
from .runtime import progress_bar, resolve_device

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
    def through(cls, w0: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> "PlaneBasis":
        """The orthonormal basis of the plane through three points; degenerate inputs are refused."""
        d2 = (w2 - w0).double()
        dx = float(d2.norm())
        if dx == 0.0:
            raise ConfigError("the first and third points coincide; a plane needs three distinct points.")
        u = d2 / dx
        d1 = (w1 - w0).double()
        x = float(d1 @ u)
        vp = d1 - x * u
        dy = float(vp.norm())
        if dy <= _REL_EPS * max(float(d1.norm()), dx):
            raise ConfigError("the three points lie on one line (the middle point is on the segment through the "
                              "other two), so they span no plane; pick another bend or checkpoint.")
        return cls(w0.float(), u.float(), (vp / dy).float(), dx, dy, x)

    def weights(self, alpha: float, beta: float) -> torch.Tensor:
        return self.w0 + (alpha * self.dx) * self.u + (beta * self.dy) * self.v

    def project(self, w: torch.Tensor) -> tuple[float, float, float]:
        """Plot coordinates of ``w`` and its distance from the plane."""
        d = (w - self.w0).double()
        x, y = float(d @ self.u.double()), float(d @ self.v.double())
        return x, y, float(max(float(d @ d) - x * x - y * y, 0.0) ** 0.5)


def _points(paths: list[str], bend: int | None) -> tuple[Curve | None, list[torch.Tensor], Any, dict[str, str]]:
    """(curve or None, [w0, w1, w2], base curve for building the network, inputs' sha256)."""
    if len(paths) == 1:
        curve = load_curve(paths[0])[0]
        n = curve.num_bends
        if n == 0:
            raise ConfigError("a line has no bend to span a plane; give a bezier/polychain curve or three checkpoints.")
        i = (n + 1) // 2 if bend is None else bend
        if not 1 <= i <= n:
            raise ConfigError(f"--bend must be between 1 and {n} for this curve, got {i}.")
        return curve, [curve.points[0], curve.points[i], curve.points[-1]], curve, {str(curve.path): curve.sha256}
    if len(paths) == 3:
        if bend is not None:
            raise ConfigError("--bend applies to a curve file, not to three checkpoints.")
        models = [load_model(p) for p in paths]
        base = line_between(models[0], models[2])
        line_between(models[0], models[1])  # checks compatibility of the middle point too
        w = [base.layout.flatten(m.model.state_dict()) for m in models]
        return None, w, base, {str(m.path): m.sha256 for m in models}
    raise ConfigError(f"give one curve file or three model checkpoints (w0 w1 w2), not {len(paths)} files.")


@holds_output_locks
def plane(paths: list[str], metrics: str | Path, *, grid_points: int = 21, margins: tuple[float, float, float, float]
          = (0.2, 0.2, 0.2, 0.2), bend: int | None = None, curve_points: int = 61, plot: str | Path | None = None,
          resume: bool = False, force: bool = False, device: str = "auto", dataset: str | None = None,
          data_root: str | None = None, download: bool = False, split: str = "test", batch_size: int = 512,
          bn_batches: int | None = None, train_subset: int | None = None, wd: float | None = None,
          precision: str = "fp32", channels_last: bool = False, num_workers: int = 4,
          quiet: bool = False) -> PlaneResult:
    """Evaluate train loss/error and test NLL/error on a G x G grid over the plane (``margins`` = left, right,
    bottom, top, as fractions of dx and dy), plus at the three points themselves."""
    t0 = time.time()
    check_count("--grid-points", grid_points, 2)
    check_count("--curve-points", curve_points, 2)
    if len(margins) != 4:
        raise ConfigError(f"give four margins (left, right, bottom, top), got {len(margins)}.")
    for side, value in zip(("left", "right", "bottom", "top"), margins):
        check_real(f"--margin-{side} (or --margin)", value, 0)
    for opt, value in (("--bn-batches", bn_batches), ("--train-subset", train_subset), ("--batch-size", batch_size),
                       ("--bend", bend)):
        check_count(opt, value)
    check_real("--wd", wd, 0)
    metrics = Path(metrics)
    curve, (w0, w1, w2), base, inputs = _points(paths, bend)
    basis = PlaneBasis.through(w0, w1, w2)
    wd = float(base.meta.config.get("wd", 0.0)) if wd is None else wd
    name = dataset or base.meta.dataset
    if name is None:
        raise ConfigError("the network does not record its data set; pass --dataset.")
    left, right, bottom, top = margins
    alphas = np.linspace(-left, 1 + right, grid_points)
    betas = np.linspace(-bottom, 1 + top, grid_points)
    names = ["train/loss", "train/err", f"{split}/nll", f"{split}/err"]
    grid = {n: np.full((grid_points, grid_points), np.nan) for n in names}
    at_points = {n: np.full(3, np.nan) for n in names}
    config = {"grid_points": grid_points, "margins": list(margins), "bend": bend, "dataset": name, "split": split,
              "wd": wd, "bn_batches": bn_batches, "train_subset": train_subset, "precision": precision}
    old, started = open_outputs(metrics, inputs, config, resume=resume, force=force, plot=plot,
                                shapes={**{n: grid[n].shape for n in names}, **{f"at_points/{n}": (3,) for n in names}})
    if old:
        for n in names:
            grid[n] = np.asarray(old[n], dtype=np.float64)
            at_points[n] = np.asarray(old[f"at_points/{n}"], dtype=np.float64)

    coords = np.array([[0.0, 0.0], [basis.w1_x, basis.dy], [basis.dx, 0.0]])
    curve_xy = curve_off = None
    if curve is not None:
        ts = torch.linspace(0, 1, curve_points, dtype=torch.float64)
        proj = [basis.project(c.float() @ curve.points) for c in coefficients(curve.curve, curve.num_bends, ts)]
        curve_xy = np.array([[x, y] for x, y, _ in proj])
        curve_off = np.array([d for _, _, d in proj])
    attrs = {**provenance(inputs, config, "plane"), "dx": basis.dx, "dy": basis.dy, "w1_x": basis.w1_x,
             "u_norm": float(basis.u.double().norm()), "v_norm": float(basis.v.double().norm()),
             "u_dot_v": float(basis.u.double() @ basis.v.double()), "split": split,
             "alpha_fractions": json.dumps(alphas.tolist()), "beta_fractions": json.dumps(betas.tolist())}
    if started:
        attrs["started"] = started

    def write(summary: dict | None = None) -> None:
        if summary is not None:
            attrs["summary"] = json.dumps(summary)
        datasets: dict[str, tuple[np.ndarray, tuple[str, ...]]] = {n: (grid[n], ("alpha", "beta")) for n in names}
        datasets.update({f"at_points/{n}": (at_points[n], ()) for n in names})
        datasets["points"] = (coords, ())
        if curve_xy is not None:
            datasets["curve"] = (curve_xy, ())
            datasets["curve_offplane"] = (curve_off, ())
        write_h5(metrics, scales={"alpha": alphas * basis.dx, "beta": betas * basis.dy}, datasets=datasets,
                 attrs=attrs)

    todo = [(i, j) for i in range(grid_points) for j in range(grid_points)
            if any(np.isnan(grid[n][i, j]) for n in names)]
    todo_points = [k for k in range(3) if any(np.isnan(at_points[n][k]) for n in names)]
    if todo or todo_points:
        dev = resolve_device(device)
        data = load_data(name, root=data_root, split=split, download=download, device=dev,
                         channels_last=channels_last, normalization=base.meta.normalization, num_workers=num_workers)
        check_fits(base.meta.num_classes, base.meta.in_chans, data.info, paths[0])
        train_split = data.train.subset(train_subset) if train_subset else None
        model = base.build_model().to(dev)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        dbasis = PlaneBasis(basis.w0.to(dev), basis.u.to(dev), basis.v.to(dev), basis.dx, basis.dy, basis.w1_x)
        point_weights = [w0, w1, w2]

        def measure(w: torch.Tensor) -> dict[str, float]:
            base.layout.assign(model, w)
            return evaluate_weights(model, data, wd=wd, batch_size=batch_size, bn_batches=bn_batches,
                                    precision=precision, train_split=train_split)

        write()
        total = grid_points * grid_points + 3
        saved = total - len(todo) - len(todo_points)
        try:
            with progress_bar(quiet) as bar:
                task = bar.add_task("plane", total=total, completed=saved, info="")
                for k in todo_points:
                    m = measure(point_weights[k].to(dev))
                    for n in names:
                        at_points[n][k] = m[n]
                    write()
                    saved += 1
                    bar.advance(task)
                for i, j in todo:
                    m = measure(dbasis.weights(float(alphas[i]), float(betas[j])))
                    for n in names:
                        grid[n][i, j] = m[n]
                    write()
                    saved += 1
                    bar.update(task, advance=1,
                               info=f"train loss {m['train/loss']:.3g} {split} err {m[f'{split}/err']:.1%}")
        except KeyboardInterrupt:
            raise interrupted(saved, total, metrics) from None
    summary: dict[str, dict[str, Any]] = {"train": {}, "eval": {}}
    for n in names:
        group, metric = metric_set(n)
        summary[group][metric] = {"min": float(np.nanmin(grid[n])), "max": float(np.nanmax(grid[n])),
                                  "at_points": at_points[n].tolist()}
    write(summary)
    result = PlaneResult(command="plane", inputs=file_refs(inputs), split=split,
                         metrics={g: Metrics.of({k: PlaneSummary(**v) for k, v in summary[g].items()})
                                  for g in ("train", "eval")},
                         grid_points=grid_points, dx=basis.dx, dy=basis.dy, points=coords.tolist(),
                         curve_max_offplane=float(curve_off.max()) if curve_off is not None else None)
    if plot is not None:
        from .plots import plot_plane

        plot_plane(metrics, plot)
    result.outputs = {"metrics": FileRef.of(metrics), "plot": FileRef.of(plot) if plot is not None else None}
    result.seconds = time.time() - t0
    return result
