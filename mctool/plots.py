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
