"""PNG figures drawn from mctool's HDF5 files (so any file can be redrawn without recomputing)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .errors import MetricsFileError
from .fileio import atomic_path
from .h5io import read_h5


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
        data, attrs = read_h5(f)
        if attrs.get("kind") != "evaluate-curve":
            raise MetricsFileError(f"'{f}' is a '{attrs.get('kind', 'unknown')}' file, not an evaluate-curve file.")
        split = attrs.get("eval_split", "test")
        t = data["t"]
        summary = json.loads(attrs["summary"]) if "summary" in attrs else {}
        barrier = summary.get("barrier", {}).get(f"{split}_err")
        label = attrs.get("curve", "curve") + (f" ({attrs.get('num_bends')} bend)" if attrs.get("curve") != "line" else
                                               " (segment)")
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
    output = Path(output)
    with atomic_path(output) as tmp:
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
    data, attrs = read_h5(file)
    if attrs.get("kind") != "plane":
        raise MetricsFileError(f"'{file}' is a '{attrs.get('kind', 'unknown')}' file, not a plane file.")
    split = attrs.get("eval_split", "test")
    x, y = data["alpha"], data["beta"]
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
    output = Path(output)
    with atomic_path(output) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def plot_files(files: list[str | Path], output: str | Path) -> str:
    """Draw whatever the files hold: one plane file, or one or more evaluate-curve files. Returns the kind."""
    kinds = {read_h5(f)[1].get("kind") for f in files}
    if kinds == {"plane"}:
        if len(files) != 1:
            raise MetricsFileError("give one plane file at a time.")
        plot_plane(files[0], output)
        return "plane"
    if kinds == {"evaluate-curve"}:
        plot_curves(files, output)
        return "evaluate-curve"
    raise MetricsFileError(f"cannot draw files of kind {sorted(str(k) for k in kinds)}; give evaluate-curve files "
                           "or one plane file.")
