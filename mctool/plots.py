"""PNG figures drawn from mctool's HDF5 files (so any file can be redrawn without recomputing)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .errors import MetricsFileError
from .fileio import atomic_path, check_outputs, holds_output_locks, writes_files
from .h5io import json_attr, metrics_file, read_h5
from .results import FileRef, PlotResult, file_refs


def _split(attrs: dict) -> str:
    """The evaluation split of a metrics file (root attribute ``split``; ``eval_split`` before schema 2)."""
    return attrs.get("split", attrs.get("eval_split", "test"))


def _checked_split(attrs: dict, path: str | Path) -> str:
    split = _split(attrs)
    if split not in ("test", "val"):
        raise MetricsFileError(f"'{path}': attribute 'split' must be 'test' or 'val', got {str(split)[:40]!r}.")
    return split


def _check_shapes(path: str | Path, data: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]],
                  min_size: int) -> None:
    """The datasets a figure draws exist, are numbers and have the shapes that go together."""
    for name, shape in shapes.items():
        if name not in data:
            raise MetricsFileError(f"'{path}' is not a complete metrics file: it has no dataset '{name}'.")
        arr = data[name]
        if np.shape(arr) != shape or arr.dtype.kind not in "fiu" or min(shape, default=0) < min_size:
            raise MetricsFileError(f"'{path}': dataset '{name}' must be numbers of shape {shape} (each side at "
                                   f"least {min_size}), got {np.shape(arr)} of {arr.dtype}.")


def _get(obj: object, *keys: str) -> object:
    """obj[k1][k2]... or None where any level is missing or not a JSON object."""
    for k in keys:
        obj = obj.get(k) if isinstance(obj, dict) else None
    return obj


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(files: list[str | Path], output: str | Path) -> None:
    """Train loss and error against t for one or more ``evaluate-curve`` files (like the paper's Figure 2)."""
    plt = _pyplot()
    fig, (ax_loss, ax_err) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for f in files:
        data, attrs = metrics_file(f, ("evaluate-curve",), {"t": 1, "train/loss": 1})
        split = _checked_split(attrs, f)
        t = data["t"]
        _check_shapes(f, data, {"train/loss": t.shape, f"{split}/err": t.shape}, min_size=1)
        summary = json_attr(attrs, "summary", f) if "summary" in attrs else {}
        barrier = _get(summary, "barrier", "eval", "err")
        curve = attrs.get("curve") if attrs.get("curve") in ("bezier", "polychain", "line") else "curve"
        bends = attrs.get("num_bends") if isinstance(attrs.get("num_bends"), int) else "?"
        label = curve + (f" ({bends} bend)" if curve != "line" else " (segment)")
        if not isinstance(barrier, (int, float)) or not np.isfinite(barrier):
            barrier = None
        if barrier is not None:
            label += f", {split} err barrier {100 * barrier:.1f} pts"
        for ax, y in ((ax_loss, data["train/loss"]), (ax_err, 100 * data[f"{split}/err"])):
            (line,) = ax.plot(t, y, marker=".", markersize=3, label=label)
            ends = [i for i in (0, len(t) - 1) if np.isfinite(y[i])]
            ax.plot(t[ends], y[ends], "o", color=line.get_color(), markersize=8)
    ax_loss.set(xlabel="t (position along the curve)", ylabel="train loss (CE + L2 term)", title="Train loss")
    ax_err.set(xlabel="t (position along the curve)", ylabel=f"{split} error (%)", title=f"{split.capitalize()} error")
    for ax in (ax_loss, ax_err):
        ax.grid(alpha=0.3)
        ax.set_xlim(0, 1)
        ax.annotate("A", (0, 0), xytext=(2, 4), textcoords="offset points", xycoords=("data", "axes fraction"))
        ax.annotate("B", (1, 0), xytext=(-10, 4), textcoords="offset points", xycoords=("data", "axes fraction"))
    ax_err.legend(fontsize=8)
    _save(fig, output)



def _save(fig, output: str | Path) -> None:
    """Write a figure as PNG atomically (on the rank that writes files), then free it."""
    import matplotlib.pyplot as plt

    if writes_files():
        with atomic_path(Path(output)) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)

def _log_levels(values: np.ndarray, n: int = 24, sharpness: float = 4.0) -> np.ndarray:
    """Contour levels spaced roughly logarithmically above the minimum (dense where the surface is low)."""
    finite = values[np.isfinite(values)]
    lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        hi = lo + 1e-6
    s = np.linspace(0.0, 1.0, n)
    return lo + (hi - lo) * np.expm1(sharpness * s) / np.expm1(sharpness)


def plot_plane(file: str | Path, output: str | Path) -> None:
    """Train loss and error surfaces of a ``plane`` file as filled contours, like the paper's Figure 1."""
    plt = _pyplot()
    data, attrs = metrics_file(file, ("plane",), {"alpha": 1, "beta": 1, "train/loss": 2, "points": 2})
    split = _checked_split(attrs, file)
    x, y = data["alpha"], data["beta"]
    grid = (len(x), len(y))
    _check_shapes(file, data, {"train/loss": grid, f"{split}/err": grid, "points": (3, 2)}, min_size=2)
    if "curve" in data and (np.ndim(data["curve"]) != 2 or np.shape(data["curve"])[1:] != (2,)):
        raise MetricsFileError(f"'{file}': dataset 'curve' must have shape (n, 2), got {np.shape(data['curve'])}.")
    coordinates = ("alpha", "beta", "points", "curve") if "curve" in data else ("alpha", "beta", "points")
    if not all(np.isfinite(data[k]).all() for k in coordinates):
        raise MetricsFileError(f"'{file}': the coordinates (alpha, beta, points, curve) must be finite numbers.")
    labels = ("A", "bend", "B") if "curve" in data else ("w0", "w1", "w2")
    from matplotlib import patheffects

    fig, axes = plt.subplots(1, 2, figsize=(13, 5), layout="constrained")
    panels = ((axes[0], data["train/loss"], "train loss (CE + L2 term)", "Train loss"),
              (axes[1], 100 * data[f"{split}/err"], f"{split} error (%)", f"{split.capitalize()} error"))
    for ax, z, unit, title in panels:
        if np.isfinite(z).any():
            cs = ax.contourf(x, y, z.T, levels=_log_levels(z), cmap="viridis", extend="both")
            ax.contour(x, y, z.T, levels=cs.levels, colors="k", linewidths=0.3, alpha=0.5)
            fig.colorbar(cs, ax=ax, label=unit, format="%.3g")
        if "curve" in data:
            c = data["curve"]
            ax.plot(c[:, 0], c[:, 1], color="white", linewidth=3)
            ax.plot(c[:, 0], c[:, 1], color="crimson", linewidth=1.5, label="curve (projected)")
        p = data["points"]
        ax.plot([p[0, 0], p[2, 0]], [p[0, 1], p[2, 1]], "--", color="white", linewidth=1.2,
                path_effects=[patheffects.withStroke(linewidth=2.5, foreground="black")],
                label=f"segment {labels[0]}-{labels[2]}")
        ax.scatter(p[:, 0], p[:, 1], s=60, c="white", edgecolors="black", zorder=5)
        for (px, py), label in zip(p, labels):
            ax.annotate(label, (px, py), xytext=(6, -14), textcoords="offset points", fontsize=11, color="black",
                        fontweight="bold", path_effects=[patheffects.withStroke(linewidth=3, foreground="white")])
        # Not equal aspect: dy is often much smaller than dx, and an equal-aspect panel would be a thin strip.
        ax.set(title=title, xlabel="along u = (w2 - w0) / |w2 - w0|  (weight-space units)",
               ylabel="along v (orthogonal, towards w1)")
    fig.legend(*axes[1].get_legend_handles_labels(), loc="outside lower center", ncol=2, fontsize=9)
    _save(fig, output)


def plot_surface(file: str | Path, output: str | Path) -> None:
    """A ``surface`` file: train loss and test error along one direction (lines) or over two (filled contours),
    the network itself at the origin."""
    plt = _pyplot()
    data, attrs = metrics_file(file, ("surface",), {"alpha": 1})
    split = _checked_split(attrs, file)
    x = data["alpha"]
    dims = 2 if "beta" in data else 1
    if dims == 2 and np.shape(data["beta"]) != np.shape(x):
        raise MetricsFileError(f"'{file}': datasets 'alpha' and 'beta' must have the same length.")
    shape = (len(x),) * dims
    _check_shapes(file, data, {"train/loss": shape, f"{split}/err": shape}, min_size=2)
    if not np.isfinite(x).all() or (dims == 2 and not np.isfinite(data["beta"]).all()):
        raise MetricsFileError(f"'{file}': the coordinates (alpha, beta) must be finite numbers.")
    config = json_attr(attrs, "config", file)
    method = config.get("directions", "random") if isinstance(config, dict) else "random"
    unit = "filter-normalised direction" if method == "random" else "towards the other network"
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), layout="constrained")
    panels = ((axes[0], data["train/loss"], "train loss (CE + L2 term)", "Train loss"),
              (axes[1], 100 * data[f"{split}/err"], f"{split} error (%)", f"{split.capitalize()} error"))
    for ax, z, label, title in panels:
        if dims == 1:
            ax.plot(x, z, marker="o", markersize=3)
            ax.axvline(0, color="grey", linestyle=":", linewidth=1)
            ax.set(title=title, xlabel=f"a ({unit} d1)", ylabel=label)
            continue
        if np.isfinite(z).any():
            cs = ax.contourf(x, data["beta"], z.T, levels=_log_levels(z), cmap="viridis", extend="both")
            ax.contour(x, data["beta"], z.T, levels=cs.levels, colors="k", linewidths=0.3, alpha=0.5)
            fig.colorbar(cs, ax=ax, label=label, format="%.3g")
        ax.scatter([0], [0], s=60, c="white", edgecolors="black", zorder=5)
        ax.set(title=title, xlabel=f"a ({unit} d1)", ylabel=f"b ({unit} d2)", aspect="equal")
    _save(fig, output)


@holds_output_locks
def plot_files(files: list[str | Path], output: str | Path, *, force: bool = False) -> PlotResult:
    """Draw whatever the files hold: one plane file, or one or more evaluate-curve files."""
    t0 = time.time()
    check_outputs({"--output": output}, files, force=force)
    kinds = {k if isinstance(k := read_h5(f)[1].get("kind"), str) else None for f in files}

    def done(kind: str) -> PlotResult:
        return PlotResult(command="plot", inputs=file_refs(list(files)), outputs={"plot": FileRef.of(output)},
                          metrics={"train": None, "eval": None}, seconds=time.time() - t0, kind=kind)

    if kinds == {"plane"}:
        if len(files) != 1:
            raise MetricsFileError("give one plane file at a time.")
        plot_plane(files[0], output)
        return done("plane")
    if kinds == {"surface"}:
        if len(files) != 1:
            raise MetricsFileError("give one surface file at a time.")
        plot_surface(files[0], output)
        return done("surface")
    if kinds == {"evaluate-curve"}:
        plot_curves(files, output)
        return done("evaluate-curve")
    raise MetricsFileError(f"cannot draw files of kind {sorted(str(k) for k in kinds)}; give evaluate-curve files, "
                           "one plane file or one surface file.")
