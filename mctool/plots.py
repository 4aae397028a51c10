"""Figures (PNG, PDF or SVG) drawn from mctool's HDF5 files (so any file can be redrawn without recomputing)."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ConfigError, MetricsFileError
from .fileio import atomic_path, being_written, check_outputs, figure_format, holds_output_locks, writes_files
from .h5io import json_attr, metrics_file, read_h5
from .plane import plane_metric_names
from .results import FileRef, PlotResult, file_refs
from .options import check_count, file_list
from .console import warn
from .calls import library_call

#: Dots per inch of PNG figures (``plot --dpi``); PDF and SVG are vector figures.
DEFAULT_DPI = 120
#: The most ``--dpi`` accepted (a 13-inch-wide figure at 1200 dpi is 15,600 pixels across).
MAX_DPI = 1200


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
        if np.shape(arr) == shape and arr.dtype.kind in "fiu" and min(shape, default=0) < min_size:
            raise MetricsFileError(f"'{path}': nothing to draw yet (dataset '{name}' holds {min(shape, default=0)} "
                                   f"values; a figure needs at least {min_size}).")
        if np.shape(arr) != shape or arr.dtype.kind not in "fiu" or min(shape, default=0) < min_size:
            raise MetricsFileError(f"'{path}': dataset '{name}' must be numbers of shape {shape} (each side at "
                                   f"least {min_size}), got {np.shape(arr)} of {arr.dtype}.")


def _check_computed(file: str | Path, attrs: dict, values: np.ndarray, what: str, points: str = "points") -> None:
    """A curve, plane or surface file's train losses (``values``) against what the run is: none finite is
    refused (an interrupted run with nothing computed yet, or a finished one whose every point diverged); some
    NaN in an interrupted run's (no summary yet; a finished run writes one, also with NaN points) are drawn
    with a warning, as are infinite ones (diverged networks: drawn as above every level, not as gaps)."""
    finished = "summary" in attrs
    done = np.isfinite(values)
    running = not finished and being_written(file)
    if not done.any():
        why = (f"the run finished, but no point of the {what} has a finite train loss (NaN or infinite: the "
               "networks diverged?)." if finished else f"no point of the {what} is computed yet (NaN). " +
               ("A running mctool command is writing it: draw it again later." if running else
                "An interrupted run: finish it with the same command plus --resume."))
        raise MetricsFileError(f"'{file}': nothing to draw: {why}")
    missing = np.isnan(values)
    if running and missing.any():
        warn(f"'{file}' is being written by a running mctool command: {int((~missing).sum()):,} of {done.size:,} "
             f"{points} are computed so far, and the figure shows only those.")
    elif not finished and missing.any():
        warn(f"'{file}' is an interrupted run's: {int((~missing).sum()):,} of {done.size:,} {points} are computed, "
             "and the figure shows only those. Finish it with the same command plus --resume.")
    elif finished and missing.any():
        warn(f"'{file}': {int(missing.sum()):,} of {done.size:,} {points} have no value (NaN).")
    diverged = int(np.isinf(values).sum())
    if diverged:
        warn(f"'{file}': {diverged:,} of {done.size:,} {points} have an infinite train loss (the network diverged); "
             "they are drawn above every other value.")


def _log_axis(ax, values: list[np.ndarray]) -> None:
    """``--log-loss``: the loss panel on a log axis. Losses <= 0 (a loss of exactly 0, say) have no place on it:
    left out, with a warning; none positive is an error (matplotlib drew an empty panel and said so in a
    warning of its own)."""
    finite = np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in values])
    finite = finite[np.isfinite(finite)]
    if finite.size and not (finite > 0).any():
        raise ConfigError("--log-loss: no loss to draw is above 0, and a log axis shows only positive values; "
                          "draw it without --log-loss.")
    if (finite <= 0).any():
        warn(f"--log-loss: {int((finite <= 0).sum()):,} loss value(s) <= 0 are left out of the log axis.")
    ax.set_yscale("log", nonpositive="mask")


def _get(obj: object, *keys: str) -> object:
    """obj[k1][k2]... or None where any level is missing or not a JSON object."""
    for k in keys:
        obj = obj.get(k) if isinstance(obj, dict) else None
    return obj


def _figure(**kwargs):
    """A new matplotlib figure, outside pyplot: drawing one changes neither the caller's backend (a notebook's
    inline figures) nor pyplot's list of open figures, and ``_save`` needs no display."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)  # (a canvas that draws: the layout is computed where a figure needs its panels' sizes)
    return fig


def _curve_kind(attrs: dict) -> str:
    """How a curve file's path is named in a legend: ``segment``, ``bezier (1 bend)``, ``polychain (3 bends)``."""
    curve = attrs.get("curve") if attrs.get("curve") in ("bezier", "polychain", "line") else "curve"
    if curve == "line":
        return "segment"
    bends = attrs.get("num_bends")
    if isinstance(bends, (int, np.integer)) and not isinstance(bends, bool):
        return f"{curve} ({bends} bend{'' if bends == 1 else 's'})"
    return curve


def plot_curves(files: list[str | Path], output: str | Path, *, dpi: int = DEFAULT_DPI, log_loss: bool = False) -> None:
    """Train loss and error against t for one or more ``evaluate-curve`` files (like the paper's Figure 2).
    Points whose value is infinite (a diverged network) are marked at the top of the panel; files whose ends
    are different networks (``ends_sha256``) are drawn with a warning, each labelled by its file's name."""
    fig = _figure(figsize=(10, 4.4), layout="constrained")
    ax_loss, ax_err = fig.subplots(1, 2)
    series = []  # (file, kind of path, t, train loss, error in %, label's tail)
    ends: dict[str, tuple[str, str]] = {}  # file -> (sha256 of A, of B), where recorded
    for f in files:
        data, attrs = metrics_file(f, ("evaluate-curve",), {"t": 1, "train/loss": 1})
        split = _checked_split(attrs, f)
        t = data["t"]
        _check_shapes(f, data, {"train/loss": t.shape, f"{split}/err": t.shape}, min_size=1)
        if "shard" in attrs:  # every N-th point: dots, not a curve
            raise MetricsFileError(f"'{f}' is shard {str(attrs['shard'])[:20]} of an evaluate-curve run: it holds only "
                                   "that shard's points. Merge the shards first (mctool merge SHARDS... -o FILE), then "
                                   "draw the merged file.")
        _check_computed(f, attrs, np.asarray(data["train/loss"], dtype=np.float64), "curve")
        recorded = json_attr(attrs, "ends_sha256", f) if isinstance(attrs.get("ends_sha256"), str) else None
        if isinstance(recorded, list) and len(recorded) == 2 and all(isinstance(h, str) for h in recorded):
            ends[str(f)] = tuple(recorded)
        kind = _curve_kind(attrs)
        # --compare-unaligned files hold the segment to the unaligned B too: drawn beside the aligned one
        groups = [("", "summary", kind + (" to aligned B" if "unaligned/train/loss" in data else ""))]
        if "unaligned/train/loss" in data:
            _check_shapes(f, data, {"unaligned/train/loss": t.shape, f"unaligned/{split}/err": t.shape}, min_size=1)
            groups.append(("unaligned/", "summary_unaligned", "segment to unaligned B"))
        for prefix, key, name in groups:
            summary = json_attr(attrs, key, f) if key in attrs else {}
            barrier = _get(summary, "barrier", "eval", "err")
            tail = (f", {split} err barrier {100 * barrier:.1f} pts"
                    if isinstance(barrier, (int, float)) and np.isfinite(barrier) else "")
            series.append((Path(f).name, name, t, data[prefix + "train/loss"], 100 * data[f"{prefix}{split}/err"],
                           tail))
    pairs = len({frozenset(e) for e in ends.values()})
    if pairs > 1:
        warn(f"the files connect {pairs} different pairs of networks (their ends differ), so their A and B are not "
             "the same networks; each line is labelled by its file.")
    elif len(set(ends.values())) > 1:  # one pair, from A to B in some files and from B to A in others
        first = next(iter(ends.values()))
        swapped = [Path(f).name for f, e in ends.items() if e != first]
        warn(f"{', '.join(swapped)} run{'s' if len(swapped) == 1 else ''} between the same two networks as the "
             "other files, from their B to their A (t = 0 there is t = 1 here); each line is labelled by its file.")
        pairs = 2  # (named by file, as for different pairs)
    kinds = [s[1] for s in series]
    diverged_shown = False
    for name, kind, t, loss, err, tail in series:
        # two lines of one kind (two segments, two Bezier curves), or of different pairs of networks, are told
        # apart by their files' names
        label = (f"{name}: " if kinds.count(kind) > 1 or pairs > 1 else "") + kind + tail
        for ax, y in ((ax_loss, loss), (ax_err, err)):
            y = np.asarray(y, dtype=np.float64)
            (line,) = ax.plot(t, np.where(np.isfinite(y), y, np.nan), marker=".", markersize=3, label=label)
            ends_at = [i for i in (0, len(t) - 1) if np.isfinite(y[i])]
            ax.plot(t[ends_at], y[ends_at], "o", color=line.get_color(), markersize=8)
            diverged_shown |= _mark_diverged(ax, t, y, line.get_color(), labelled=not diverged_shown)
    ax_loss.set(xlabel="t (position along the curve)", ylabel="train loss (CE + L2 term)", title="Train loss")
    if log_loss:  # ends near 1e-3 and a barrier of 2: a linear axis shows only the barrier
        _log_axis(ax_loss, [loss for _, _, _, loss, _, _ in series])
    ax_err.set(xlabel="t (position along the curve)", ylabel=f"{split} error (%)", title=f"{split.capitalize()} error")
    for ax in (ax_loss, ax_err):
        ax.grid(alpha=0.3)
        ax.set_xlim(-0.03, 1.03)  # the ends' markers whole, not cut by the frame
        ax.set_xticks([0, 0.2, 0.4, 0.6, 0.8, 1.0], ["0\nA", "0.2", "0.4", "0.6", "0.8", "1\nB"])
    # below the panels, where it covers no line (inside, it sat on the curve wherever the error dips)
    handles, labels = ax_loss.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(series), 2), fontsize=8)
    _save(fig, output, dpi, files)


def _mark_diverged(ax, x: np.ndarray, y: np.ndarray, color, labelled: bool = True) -> bool:
    """Mark the infinite values of the line ``y`` over ``x`` (diverged networks) at the top of the panel, where a
    gap would hide the peak; ``labelled``: named in the legend. Returns whether there were any."""
    up = np.isposinf(y)
    if up.any():
        ax.plot(x[up], np.full(int(up.sum()), 0.97), "^", color=color, markersize=8, transform=ax.get_xaxis_transform(),
                clip_on=False, label="diverged (infinite)" if labelled else None)
    return bool(up.any())


def _save(fig, output: str | Path, dpi: int = DEFAULT_DPI, sources: Sequence[str | Path] = ()) -> None:
    """Write a figure atomically (on the rank that writes files) as PNG, PDF or SVG by its name's ending, then
    free it. The figure says where it came from: mctool's version and the metrics files drawn (``sources``),
    each with its sha256."""
    import matplotlib

    from ._version import __version__
    from .fileio import sha256_file
    from .h5io import _printable

    if writes_files():
        fmt = figure_format(output)
        made = f"mctool {__version__}"
        drawn = "; ".join(f"{_printable(os.fspath(f))} (sha256 {sha256_file(f)})" for f in sources)  # (any name)
        # No creation date in PDF and SVG, and fixed SVG ids: the same file draws to the same bytes. TrueType
        # (Type 42) fonts in PDF: the Type 3 fonts matplotlib embeds by default fail journals' PDF checks.
        metadata = {"png": {"Software": made, "Source": drawn}, "pdf": {"CreationDate": None, "Creator": made,
                                                                      "Subject": drawn},
                    "svg": {"Date": None, "Creator": made, "Source": drawn}}.get(fmt)
        with atomic_path(Path(output)) as tmp, matplotlib.rc_context({"svg.hashsalt": "mctool", "pdf.fonttype": 42,
                                                                "ps.fonttype": 42}):
            fig.savefig(tmp, dpi=dpi, format=fmt, metadata=metadata)

#: A filled contour plot's levels reach at most this many times the grid's median (see ``_log_levels``).
LEVELS_CAP = 10.0


def _log_levels(values: np.ndarray, n: int = 24, sharpness: float = 4.0,
                keep: float = -np.inf) -> tuple[np.ndarray, str]:
    """Contour levels spaced roughly logarithmically above the minimum (dense where the surface is low), and
    how ``contourf`` extends them. A grid whose far cells are many times higher than most of it (a plane's
    margins can reach a loss of 100 where the networks sit below 1) has its levels end at ``LEVELS_CAP`` times
    its median, or at ``keep`` if that is higher (``_kept``: what lies between the marked points, a barrier
    among them), the cells above drawn in the top colour (``extend="max"``), so that the levels stay where the
    valley and the barrier are; the reference code clips its planes' losses at a fixed value for this."""
    finite = values[np.isfinite(values)]
    lo, hi = float(finite.min()), float(finite.max())
    cap, extend = max(LEVELS_CAP * float(np.median(finite)), keep), "neither"
    if lo < cap < hi:
        hi, extend = cap, "max"
    if hi <= lo:
        hi = lo + max(1e-6, 1e-3 * abs(lo))  # one value (or all equal): a narrow band above it
    s = np.linspace(0.0, 1.0, n)
    levels = lo + (hi - lo) * np.expm1(sharpness * s) / np.expm1(sharpness)
    # the ends exactly: lo + (hi - lo) can round below hi, and contourf leaves values above the top level blank
    # (a plateau at the maximum, 90% error at chance, was a white hole in the panel)
    levels[0], levels[-1] = lo, hi
    return levels, extend


@dataclass
class GridView:
    """What the figures and exports draw from a ``plane`` or ``surface`` file, validated: the grid's coordinates
    (``y`` None for a 1-D surface), each metric over it (``z``: name -> array of the grid's shape; train loss and
    the evaluation split's error always, the other metrics where the file has them), the marked points with
    their labels, the projected curve or trajectory (``path``) and the axes' labels."""

    kind: str
    split: str
    x: np.ndarray
    y: np.ndarray | None
    z: dict[str, np.ndarray]
    points: np.ndarray  # [k, 2] (or [k, 1] in 1-D)
    point_labels: list[str]
    path: np.ndarray | None
    path_label: str
    xlabel: str
    ylabel: str
    note: str
    equal_aspect: bool
    at_points: dict[str, np.ndarray] | None = None  # name -> the value at each marked point (NaN: not computed)
    # the axes' names when both are in the same units (weight space) but drawn to fill the panel: the figure then
    # says how much one is stretched against the other (a plane's u and v, a PCA surface's PC1 and PC2)
    same_units: tuple[str, str] | None = None


def grid_view(file: str | Path) -> GridView:
    """Read a ``plane`` or ``surface`` file for drawing; MetricsFileError for anything missing or malformed."""
    data, attrs = metrics_file(file, ("plane", "surface"), {"alpha": 1})
    split = _checked_split(attrs, file)
    kind = attrs["kind"]
    x = data["alpha"]
    for name in ("beta", "train/loss", "points") if kind == "plane" else ():
        if name not in data:
            raise MetricsFileError(f"'{file}' is not a complete plane file: it has no dataset '{name}'.")
    y = data.get("beta")
    if y is not None and (np.ndim(y) != 1 or y.dtype.kind not in "fiu"):
        raise MetricsFileError(f"'{file}': dataset 'beta' must be a 1-D array of numbers.")
    dims = 1 if y is None else 2
    shape = (len(x),) if y is None else (len(x), len(y))
    names = plane_metric_names(split)  # a surface file's are the same
    _check_shapes(file, data, {n: shape for n in names[::3]}, min_size=2)
    z = {n: np.asarray(data[n], dtype=np.float64) for n in names
         if n in data and np.shape(data[n]) == shape and data[n].dtype.kind in "fiu"}
    if not np.isfinite(x).all() or (y is not None and not np.isfinite(y).all()):
        raise MetricsFileError(f"'{file}': the coordinates (alpha, beta) must be finite numbers.")
    if "shard" in attrs:  # every N-th cell: nothing a contour can be drawn from
        raise MetricsFileError(f"'{file}' is shard {str(attrs['shard'])[:20]} of a {kind}: it holds only that "
                               f"shard's points. Merge the shards first (mctool merge SHARDS... -o FILE), then draw "
                               "the merged file.")
    _check_computed(file, attrs, z[names[0]], kind, "grid points")
    config = json_attr(attrs, "config", file)
    if kind == "plane":
        _check_shapes(file, data, {"points": (3, 2)}, min_size=2)
        path = data.get("curve")
        if path is not None and (np.ndim(path) != 2 or np.shape(path)[1:] != (2,)):
            raise MetricsFileError(f"'{file}': dataset 'curve' must have shape (n, 2), got {np.shape(path)}.")
        if not np.isfinite(data["points"]).all() or (path is not None and not np.isfinite(path).all()):
            raise MetricsFileError(f"'{file}': the coordinates (alpha, beta, points, curve) must be finite numbers.")
        a, bend, b = ["A", "bend", "B"] if path is not None else ["w0", "w1", "w2"]
        note = ""
        off = data.get("curve_offplane")
        if path is not None and off is not None and np.shape(off) == (len(path),) and off.dtype.kind in "fiu":
            off = np.asarray(off, dtype=np.float64)
            scale = float(np.hypot(*(data["points"][2] - data["points"][0])))  # |B - A|
            if np.isfinite(off).all() and scale > 0 and off.max() > 1e-6 * scale:
                # the plane's value under the curve is not the curve's own (its loss is in evaluate-curve's file)
                note = (f"curve projected onto the plane: largest distance from it {off.max():.3g} "
                        f"({off.max() / scale:.1%} of |{b} - {a}|); the surface under it is not the curve's loss")
        return GridView(kind, split, x, y, z, data["points"], [a, bend, b], path, "curve (projected)",
                        f"along u = ({b} - {a}) / |{b} - {a}|  (weight-space units)",
                        f"along v (orthogonal, towards {'the ' if bend == 'bend' else ''}{bend})", note, False,
                        same_units=("u", "v"))
    path, note = data.get("trajectory"), ""
    if path is not None:
        if np.ndim(path) != 2 or np.shape(path)[1] != dims or not np.isfinite(path).all():
            raise MetricsFileError(f"'{file}': dataset 'trajectory' must be finite numbers of shape (n, {dims}).")
        err = data.get("trajectory_error")
        if err is None or np.shape(err) != (len(path),) or err.dtype.kind not in "fiu" or not np.isfinite(err).all():
            raise MetricsFileError(f"'{file}': dataset 'trajectory_error' must be finite numbers of shape "
                                   f"({len(path)},).")
        path = np.vstack([path, np.zeros((1, dims))])  # the trajectory ends at the network itself
        note = (f"trajectory projected: largest distance from the {'plane' if dims == 2 else 'line'} "
                f"{100 * float(err.max()):.1f}% (mean {100 * float(err.mean()):.1f}%) of the distance to the network")
    method = config.get("directions", "random") if isinstance(config, dict) else "random"
    explained = json_attr(attrs, "explained_variance_ratio", file) if "explained_variance_ratio" in attrs else None
    if (method == "pca" and isinstance(explained, list) and len(explained) == dims
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in explained)):
        labels = [f"PC{k + 1} ({v:.1%} of the trajectory's variance)" for k, v in enumerate(explained)]
    else:
        if method in ("random", "pca"):
            unit = {"random": "filter-normalised direction", "pca": "principal direction"}[method]
            labels = [f"a (along {unit} d1)", f"b (along {unit} d2)"]
        else:  # files: d_k = (network k) - (the centre), so a = 1 is network k
            names = _input_names(attrs, file)
            towards = [names[k + 1] if len(names) > k + 1 else f"network {k + 1}" for k in range(2)]
            labels = [f"a (towards {towards[0]}: 1 is that network)", f"b (towards {towards[1]}: 1 is that network)"]
    at = {n: np.asarray(data[f"at_points/{n}"], dtype=np.float64) for n in z
          if np.shape(data.get(f"at_points/{n}")) == (1,) and data[f"at_points/{n}"].dtype.kind in "fiu"}
    names = _input_names(attrs, file)
    points, point_labels = np.zeros((1, dims)), [names[0] if names else "network"]
    if method == "files":  # the direction files' networks, at coefficient 1, where the grid reaches them
        others = names[1:]
        low = np.array([x.min()] if y is None else [x.min(), y.min()]) - 1e-9
        high = np.array([x.max()] if y is None else [x.max(), y.max()]) + 1e-9
        for k, name in enumerate(others[:dims]):
            unit_point = np.eye(dims)[k]
            if ((unit_point >= low) & (unit_point <= high)).all():
                points, point_labels = np.vstack([points, unit_point]), [*point_labels, name]
    # equal aspect for random directions (both of the network's scale); PCA and files' axes differ in length
    return GridView(kind, split, x, y, z, points, point_labels, path, "trajectory (projected)",
                    labels[0], labels[1], note, method == "random", at,
                    same_units=("PC1", "PC2") if method == "pca" and y is not None else None)


def _input_names(attrs: dict, file: str | Path) -> list[str]:
    """The file names of a surface file's networks, in the order given: the centre, then the direction files'
    networks (empty where the file does not record them)."""
    inputs = json_attr(attrs, "inputs", file) if "inputs" in attrs else None
    order = json_attr(attrs, "input_order", file) if "input_order" in attrs else None
    if not isinstance(inputs, dict) or not isinstance(order, list):
        return []
    by_hash = {sha: Path(str(path)).name for path, sha in inputs.items() if isinstance(sha, str)}
    return [by_hash.get(sha, "network") if isinstance(sha, str) else "network" for sha in order]


def _panels(view: GridView) -> list[tuple[np.ndarray, str, str, np.ndarray | None]]:
    """(values, unit, title, values at the marked points or None) of the two panels: train loss and the
    evaluation error in percent."""
    split, at = view.split, view.at_points or {}
    err = f"{split}/err"
    return [(view.z["train/loss"], "train loss (CE + L2 term)", "Train loss", at.get("train/loss")),
            (100 * view.z[err], f"{split} error (%)", f"{split.capitalize()} error",
             100 * at[err] if err in at else None)]


def _on_grid(x: np.ndarray, y: np.ndarray, z: np.ndarray, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """z at the points (px, py), interpolated bilinearly between the grid's cells (NaN outside or next to NaN)."""
    i = np.clip(np.searchsorted(x, px) - 1, 0, len(x) - 2)
    j = np.clip(np.searchsorted(y, py) - 1, 0, len(y) - 2)
    with np.errstate(divide="ignore", invalid="ignore"):  # (cells of zero width, in a crafted file: NaN)
        fx = (px - x[i]) / (x[i + 1] - x[i])
        fy = (py - y[j]) / (y[j + 1] - y[j])
    out = ((1 - fx) * (1 - fy) * z[i, j] + fx * (1 - fy) * z[i + 1, j] + (1 - fx) * fy * z[i, j + 1]
           + fx * fy * z[i + 1, j + 1])
    inside = (fx >= -1e-9) & (fx <= 1 + 1e-9) & (fy >= -1e-9) & (fy <= 1 + 1e-9)
    return np.where(inside, out, np.nan)


#: The contour levels reach the highest value along the segment and the curve (``_kept``), but at most this
#: many times the grid's median: one diverged cell would otherwise leave every other value in the lowest band.
KEEP_CAP = 100.0


def _cell_floor(x: np.ndarray, y: np.ndarray, z: np.ndarray, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """The lowest of the four grid values around each point (px, py) (NaN outside the grid or where all four
    are NaN): what the surface surely reaches there, which one extreme cell beside it does not raise."""
    i = np.clip(np.searchsorted(x, px) - 1, 0, len(x) - 2)
    j = np.clip(np.searchsorted(y, py) - 1, 0, len(y) - 2)
    corners = np.stack([z[i, j], z[i + 1, j], z[i, j + 1], z[i + 1, j + 1]])
    inside = (px >= x[0] - 1e-9) & (px <= x[-1] + 1e-9) & (py >= y[0] - 1e-9) & (py <= y[-1] + 1e-9)
    with np.errstate(invalid="ignore"):
        low = np.where(np.isnan(corners), np.inf, corners).min(axis=0)
    return np.where(inside & np.isfinite(low), low, np.nan)


def _kept(view: GridView, z: np.ndarray) -> float:
    """The highest value of ``z`` along the lines the figure is about (the segment between the first and last
    marked points, the path through the marked points or the projected curve or trajectory), each point's the
    lowest of the four grid values around it (``_cell_floor``: a barrier's ridge is wider than a cell, one
    diverged cell is not): the contour levels reach it whatever their cap (``_log_levels``), up to
    ``KEEP_CAP`` times the grid's median."""
    if view.y is None or len(view.points) < 2:
        return -np.inf
    lines = [view.points[[0, -1]], view.points if view.path is None else view.path]
    along = np.concatenate([_cell_floor(view.x, view.y, z, p[:, 0], p[:, 1]) for p in map(_densified, lines)])
    along = along[np.isfinite(along)]
    finite = z[np.isfinite(z)]
    if not along.size or not finite.size:
        return -np.inf
    return min(float(along.max()), KEEP_CAP * float(np.median(finite)))


def _densified(path: np.ndarray, per_segment: int = 16) -> np.ndarray:
    """The polyline ``path`` [n, 2] with ``per_segment`` evenly spaced points on each of its segments (its
    vertices among them), so that, lifted onto a surface, it follows the surface between its vertices."""
    if len(path) < 2:
        return path
    s = np.linspace(0.0, 1.0, per_segment, endpoint=False)[:, None]
    return np.concatenate([*(a + s * (b - a) for a, b in zip(path[:-1], path[1:])), path[-1:]])


def _surface_3d(fig, position: int, view: GridView, z: np.ndarray, unit: str, title: str):
    """One 3-D panel: the surface z over the grid (NaN cells left out), with the path and the points drawn on
    it where it is drawn; points off it (outside the grid, or over cells not computed yet) as hollow circles on
    the floor of the box (the surface's minimum), the path outside the grid on the floor and over cells not
    computed yet not at all."""
    ax = fig.add_subplot(1, 2, position, projection="3d")
    xx, yy = np.meshgrid(view.x, view.y, indexing="ij")
    if np.isfinite(z).any():
        shown, top, over = capped(view, z)
        lo, hi = float(np.nanmin(shown)), float(np.nanmax(shown))
        # the colours span the values themselves (faces are coloured by their corners' mean otherwise)
        surf = ax.plot_surface(xx, yy, np.ma.masked_invalid(shown), cmap="viridis", linewidth=0, antialiased=True,
                               rcount=len(view.x), ccount=len(view.y), vmin=lo, vmax=hi, alpha=0.9)
        fig.colorbar(surf, ax=ax, shrink=0.6, pad=0.08, label=unit, format=_level_format(np.linspace(lo, hi, 6)))
        alone = lone_cells(shown, corners=4)  # a face needs its four corners: lone cells drawn as squares
        if alone.any():
            ax.scatter(xx[alone], yy[alone], shown[alone], c=shown[alone], cmap="viridis", vmin=lo, vmax=hi,
                       marker="s", s=40, edgecolors="black", linewidths=0.5, depthshade=False)
        if over:
            title = f"{title}\n({over:,} {'cell' if over == 1 else 'cells'} above {top:.4g} drawn at {top:.4g})"
        floor = lo
        lift = 0.01 * (hi - floor) or 0.01 * max(abs(floor), 1e-6)  # just above the surface, not hidden in it
        if hi == lo:  # a flat surface: matplotlib's own limits hugged it and put the points at the box's top
            ax.set_zlim(lo - 20 * lift, lo + 20 * lift)

        def height(pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            """Heights just above the surface, the floor where it is not drawn; and which are on it."""
            h = _on_grid(view.x, view.y, shown, pts[:, 0], pts[:, 1]) + lift
            return np.where(np.isfinite(h), h, floor), np.isfinite(h)

        if view.path is not None:  # (between its vertices too: a straight chord would cut through the surface)
            path = _densified(view.path)
            h, on = height(path)
            inside = ((path[:, 0] >= view.x[0]) & (path[:, 0] <= view.x[-1]) & (path[:, 1] >= view.y[0])
                      & (path[:, 1] <= view.y[-1]))
            # over cells not computed yet (a partial run) a gap: the floor there would look like a valley
            ax.plot(path[:, 0], path[:, 1], np.where(on | ~inside, h, np.nan), color="crimson", linewidth=2,
                    zorder=10)
        heights, on = height(view.points)
        for kept, fill in ((on, "black"), (~on, "none")):  # off the drawn surface: hollow, on the floor
            if kept.any():
                ax.plot(view.points[kept, 0], view.points[kept, 1], heights[kept], "o", color="black",
                        markerfacecolor=fill, zorder=11)
        if len(view.points) > 1:  # A, the bend and B (w0, w1, w2; a surface's networks), named as in 2-D
            for (px, py), h, label in zip(view.points, heights, view.point_labels):
                ax.text(px, py, h + 2 * lift, label, fontsize=9, fontweight="bold", zorder=12)
    ax.set_xlabel(view.xlabel, labelpad=10)
    ax.set_ylabel(view.ylabel, labelpad=10)
    ax.set_zlabel(unit, labelpad=8)
    ax.set_title(title)
    ax.set_box_aspect(None, zoom=0.82)  # room for the axes' labels inside the panel
    ax.view_init(elev=35, azim=-60)
    return ax


def plot_grid(file: str | Path, output: str | Path, *, three_d: bool = False, dpi: int = DEFAULT_DPI,
              view: GridView | None = None, log_loss: bool = False) -> None:
    """A ``plane`` or ``surface`` file as a figure: train loss and the evaluation error as filled contours (like the
    paper's Figure 1), or as 3-D surfaces with ``three_d``, or as lines for a 1-D surface (its loss on a log axis
    with ``log_loss``; infinite values marked at the top, as on curves); the points, and the projected curve or
    trajectory, drawn on them."""
    view = view if view is not None else grid_view(file)  # (plot_files reads it once for figure and exports)
    from matplotlib import patheffects
    from matplotlib.lines import Line2D

    if three_d:
        if view.y is None:
            raise MetricsFileError(f"'{file}' is a 1-D surface; --3d draws 2-D grids.")
        fig = _figure(figsize=(14, 6), layout="constrained")
        for k, (z, unit, title, _) in enumerate(_panels(view)):
            _surface_3d(fig, k + 1, view, z, unit, title)
        if view.note:
            fig.suptitle(view.note, fontsize=9)
        _save(fig, output, dpi, [file])
        return
    fig = _figure(figsize=(13, 5), layout="constrained")
    axes = fig.subplots(1, 2)
    outline = [patheffects.withStroke(linewidth=3, foreground="white")]
    missing_shown = False
    for ax, (z, unit, title, at) in zip(axes, _panels(view)):
        if view.y is None:
            (line,) = ax.plot(view.x, np.where(np.isfinite(z), z, np.nan), marker="o", markersize=3)
            _mark_diverged(ax, view.x, z, line.get_color())
            pad = 0.03 * (view.x[-1] - view.x[0])
            ax.set_xlim(view.x[0] - pad, view.x[-1] + pad)  # the whole grid, computed or not
            if log_loss and ax is axes[0]:
                _log_axis(ax, [z])
            ax.axvline(0, color="grey", linestyle=":", linewidth=1)
            for (px,), label in zip(view.points[1:], view.point_labels[1:]):  # direction files' networks
                ax.axvline(px, color="black", linestyle="--", linewidth=1, label=label)
            if at is not None and np.isfinite(at[0]):  # the network's own value: 0 need not be a grid point
                value = f"{float(at[0]):.4g}" + ("%" if unit.endswith("(%)") else "")
                ax.plot([0.0], at, "o", markersize=8, markerfacecolor="white", markeredgecolor="black", zorder=5,
                        label=f"{view.point_labels[0]} ({value})")
            if view.path is not None:
                ax.plot(view.path[:-1, 0], np.zeros(len(view.path) - 1), "|", color="crimson", markersize=12,
                        transform=ax.get_xaxis_transform(), label=view.path_label)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
            ax.set(title=title, xlabel=view.xlabel, ylabel=unit)
            continue
        if np.isfinite(z).any():
            levels, extend = _log_levels(z, keep=_kept(view, z))
            shown = z
            if np.isposinf(z).any():  # diverged cells: above every level (the top colour), not holes like NaN
                shown, extend = np.where(np.isposinf(z), 2 * levels[-1] - levels[0], z), "max"
            cs = ax.contourf(view.x, view.y, shown.T, levels=levels, cmap="viridis", extend=extend)
            ax.contour(view.x, view.y, shown.T, levels=cs.levels, colors="k", linewidths=0.3, alpha=0.5)
            alone = lone_cells(shown)  # computed cells with no computed neighbours to fill between: drawn as squares
            if alone.any():
                gx, gy = np.meshgrid(view.x, view.y, indexing="ij")
                ax.scatter(gx[alone], gy[alone], c=shown[alone], cmap="viridis", norm=cs.norm, marker="s", s=70,
                           edgecolors="black", linewidths=0.5, zorder=4, clip_on=False)
            # (its triangle: the cells above the top level)
            fig.colorbar(cs, ax=ax, label=unit, format=_level_format(cs.levels))
        if np.isnan(z).any():  # not computed (or NaN): hatched grey, told apart from any value
            ax.contourf(view.x, view.y, np.isnan(z).T.astype(float), levels=[0.5, 1.5], colors="none",
                        hatches=["////"])
            ax.contour(view.x, view.y, np.isnan(z).T.astype(float), levels=[0.5], colors="grey", linewidths=0.5)
            missing_shown = True
        if view.path is not None:
            ax.plot(view.path[:, 0], view.path[:, 1], color="white", linewidth=3)
            ax.plot(view.path[:, 0], view.path[:, 1], color="crimson", linewidth=1.5, label=view.path_label,
                    **({"marker": ".", "markersize": 5} if view.kind == "surface" else {}))
            if view.kind == "surface":  # a trajectory runs from its first checkpoint to the network
                ax.annotate("first checkpoint", view.path[0], xytext=(6, 6), textcoords="offset points",
                            fontsize=9, color="crimson", fontweight="bold", path_effects=outline)
        p = view.points
        if view.kind == "plane":
            ax.plot([p[0, 0], p[2, 0]], [p[0, 1], p[2, 1]], "--", color="white", linewidth=1.2,
                    path_effects=[patheffects.withStroke(linewidth=2.5, foreground="black")],
                    label=f"segment {view.point_labels[0]}-{view.point_labels[2]}")
        if len(p) > 1:  # a plane's A, bend, B; a surface's network and its direction files' networks
            for (px, py), label in zip(p, view.point_labels):
                ax.annotate(label, (px, py), xytext=(6, -14), textcoords="offset points", fontsize=11,
                            color="black", fontweight="bold", path_effects=outline)
        # a plane's bend (w1 of three networks) as a diamond, its ends as circles (as the paper draws them)
        marker = ["o", "D", "o"] if view.kind == "plane" else ["o"] * len(p)
        for k, ((px, py), m) in enumerate(zip(p, marker)):
            # a surface's centre, named in the legend (the others are named beside their markers)
            label = f"{view.point_labels[0]} (the centre)" if view.kind == "surface" and k == 0 else None
            ax.scatter([px], [py], s=60 if m == "o" else 50, c="white", edgecolors="black", marker=m, zorder=5,
                       label=label)
        # A plane's dy is often much smaller than its dx: an equal-aspect panel would be a thin strip.
        ax.set(title=title, xlabel=view.xlabel, ylabel=view.ylabel, aspect="equal" if view.equal_aspect else "auto")
    if view.y is not None:
        handles, labels = axes[1].get_legend_handles_labels()
        # the segment's white dash with its black outline reads as "===" at legend size: a plain black dash
        handles = [Line2D([], [], color="black", linestyle="--", linewidth=1.2) if lab.startswith("segment ") else h
                   for h, lab in zip(handles, labels)]
        if missing_shown:
            from matplotlib.patches import Patch

            handles.append(Patch(facecolor="white", edgecolor="grey", hatch="////"))
            labels.append("not computed (NaN)")
        fig.legend(handles, labels, loc="outside lower center", ncol=len(handles), fontsize=9)
    if view.same_units is not None:
        _note_stretch(fig, axes, *view.same_units)
    if view.note:
        fig.suptitle(view.note, fontsize=9)
    _save(fig, output, dpi, [file])


def capped(view: GridView, z: np.ndarray) -> tuple[np.ndarray, float | None, int]:
    """For a 3-D surface, whose height cannot show an infinite loss and which one diverged cell of 1e6 would
    flatten: ``z`` with the cells above the contour figure's top level (``_log_levels``), infinite ones among
    them, lowered to it, as the contours draw them in the top colour; that level; how many cells were lowered."""
    if not np.isfinite(z).any():
        return z, None, 0
    top = float(_log_levels(z, keep=_kept(view, z))[0][-1])
    over = np.isposinf(z) | (np.isfinite(z) & (z > top))
    return np.where(over, top, z), top, int(over.sum())


def lone_cells(z: np.ndarray, corners: int = 3) -> np.ndarray:
    """The finite cells of a grid that ``contourf`` leaves blank: it fills each quad of four neighbouring cells
    with at least three finite corners (a 3-D surface: four, ``corners``), so a cell that is a corner of no such
    quad (one computed cell of an interrupted plane, say) would not be drawn at all."""
    ok = np.isfinite(z)
    if z.ndim != 2 or min(z.shape) < 2:
        return ok
    quad = (ok[:-1, :-1].astype(int) + ok[1:, :-1] + ok[:-1, 1:] + ok[1:, 1:]) >= corners
    filled = np.zeros_like(ok)
    for di in (0, 1):
        for dj in (0, 1):
            filled[di:di + quad.shape[0], dj:dj + quad.shape[1]] |= quad
    return ok & ~filled


def _level_format(levels: np.ndarray) -> str:
    """The colorbar's number format: the fewest significant digits (3 to 8) that tell every level apart."""
    for digits in range(3, 9):
        if len({f"{v:.{digits}g}" for v in levels}) == len(levels):
            break
    return f"%.{digits}g"


def _times(x: float) -> str:
    """A ratio for a label, to two significant digits: ``3.7``, ``0.25``, ``110``, ``1,200`` (an exponent only
    below 1e-4, where ``:g`` writes one)."""
    x = float(f"{x:.2g}")
    return f"{x:,.0f}" if x >= 10 else f"{x:g}"


def _note_stretch(fig, axes, u: str = "u", v: str = "v") -> None:
    """A plane (or a PCA surface) is drawn to fill its panels, so the unit of its second axis ``v`` is usually
    drawn longer (or shorter) than that of its first, ``u``, though both are weight-space units: say by how much
    in the second axis's label, so that a reader does not take a stretched curve for a detour."""
    fig.canvas.draw()  # (the panels' final sizes, after the layout)
    ax = axes[0]
    box = ax.get_window_extent()
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    if box.width <= 0 or box.height <= 0 or x1 == x0 or y1 == y0:
        return
    stretch = (box.height / abs(y1 - y0)) / (box.width / abs(x1 - x0))  # v's unit over u's, on the page
    if not 1 / 1.25 <= stretch <= 1.25:
        for a in axes:
            a.set_ylabel(f"{a.get_ylabel()}\n(a unit of {v} drawn {_times(stretch)}x as long as a unit of {u})")


#: The per-epoch metrics files ``plot_history`` draws.
HISTORY_KINDS = ("train", "connect", "fge")


def _ensemble_series(data: dict, split: str | None) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """An fge file's (members, the ensemble's error, each member's error), in percent, where it has them."""
    if split is None:
        return None
    ens, mem = data.get(f"ensemble/{split}/err"), data.get(f"members/{split}/err")
    if ens is None or mem is None or np.ndim(ens) != 1 or np.shape(ens) != np.shape(mem) or not len(ens):
        return None
    return (np.arange(1, len(ens) + 1), 100 * np.asarray(ens, dtype=np.float64),
            100 * np.asarray(mem, dtype=np.float64))


def plot_history(files: list[str | Path], output: str | Path, *, dpi: int = DEFAULT_DPI,
                 log_loss: bool = False) -> None:
    """Training curves of one or more ``train``, ``connect`` or ``fge`` metrics files (of any of these kinds
    together): the loss and the error per epoch, on the training images (solid) and on the evaluation split
    where the file has it (dashed); for fge files, a third panel: the ensemble's error against its number of
    members, beside each member's own."""
    from matplotlib.ticker import MaxNLocator

    loaded = []
    for f in files:
        data, attrs = metrics_file(f, HISTORY_KINDS, {"epoch": 1, "train/loss": 1, "train/err": 1})
        epoch = data["epoch"]
        _check_shapes(f, data, {"train/loss": epoch.shape, "train/err": epoch.shape}, min_size=1)
        if not np.isfinite(np.asarray(data["train/loss"], dtype=np.float64)).any():
            raise MetricsFileError(f"'{f}': nothing to draw: no epoch has a finite train loss (NaN or infinite).")
        split = next((s for s in ("test", "val") if np.shape(data.get(f"{s}/err", ())) == epoch.shape), None)
        if split is None and attrs.get("kind") == "fge":  # (fge evaluates its members and ensemble, not the run)
            split = next((s for s in ("test", "val") if f"ensemble/{s}/err" in data), None)
        loaded.append((f, data, split))
    ensembles = [(f, e) for f, data, split in loaded if (e := _ensemble_series(data, split)) is not None]
    panels = 3 if ensembles else 2
    fig = _figure(figsize=(5 * panels, 4), layout="constrained")
    axes = fig.subplots(1, panels)
    ax_loss, ax_err = axes[0], axes[1]
    colours: dict[str, str] = {}  # file -> the colour of its lines (the same in every panel)
    for f, data, split in loaded:
        epoch = data["epoch"]
        prefix = f"{Path(f).name}: " if len(files) > 1 else ""
        for ax, train, held, held_name, scale in ((ax_loss, "loss", "nll", "NLL", 1.0),
                                                  (ax_err, "err", "err", "error", 100.0)):
            (line,) = ax.plot(epoch, scale * data[f"train/{train}"], marker=".", markersize=3,
                              label=f"{prefix}train {'loss' if train == 'loss' else 'error'}",
                              **({"color": colours[str(f)]} if str(f) in colours else {}))
            colours[str(f)] = line.get_color()
            if split is not None and np.shape(data.get(f"{split}/{held}", ())) == epoch.shape:
                ax.plot(epoch, scale * data[f"{split}/{held}"], "--", marker=".", markersize=3,
                        color=line.get_color(), label=f"{prefix}{split} {held_name}")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    if log_loss:
        _log_axis(ax_loss, [line.get_ydata() for line in ax_loss.get_lines()])
    ax_err.set(xlabel="epoch", ylabel="error (%)", title="Error")
    if ensembles:
        ax_ens = axes[2]
        for f, (members, ens, mem) in ensembles:
            prefix = f"{Path(f).name}: " if len(files) > 1 else ""
            split = next(s for g, _, s in loaded if g == f)
            ax_ens.plot(members, ens, marker="o", markersize=4, color=colours[str(f)],
                        label=f"{prefix}ensemble {split} error")
            ax_ens.plot(members, mem, "x", color=colours[str(f)], label=f"{prefix}each member's {split} error")
        ax_ens.set(xlabel="members in the ensemble (snapshots, in order)", ylabel="error (%)",
                   title="Fast Geometric Ensemble")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs and members are whole numbers
    _save(fig, output, dpi, files)


def plot_hessian(file: str | Path, output: str | Path, *, dpi: int = DEFAULT_DPI) -> None:
    """The top Hessian eigenvalues of a ``hessian`` metrics file: along t for a curve or segment, per point
    (network or ensemble member) otherwise; with ``--trace`` runs, the trace estimate beside them."""
    import matplotlib

    data, attrs = metrics_file(file, ("hessian",), {"eigenvalues": 2})
    values = np.asarray(data["eigenvalues"], dtype=np.float64)
    if 0 in values.shape:
        raise MetricsFileError(f"'{file}': dataset 'eigenvalues' holds no values (shape {values.shape}).")
    n = values.shape[0]
    along = "t" if np.shape(data.get("t", ())) == (n,) else None
    x = np.asarray(data["t"], dtype=np.float64) if along else np.arange(n, dtype=np.float64)
    has_trace = np.shape(data.get("trace", ())) == (n,)
    if not np.isfinite(values).any() and not (has_trace and np.isfinite(np.asarray(data["trace"], float)).any()):
        raise MetricsFileError(f"'{file}': nothing to draw yet: no eigenvalue is computed (NaN). " +
                               ("A running mctool command is writing it: draw it again later." if being_written(file)
                                else "An interrupted run: finish it with the same hessian command plus --resume."))
    # the points computed: their count of Hessian-vector products, NaN until then (an eigenvalue ARPACK did not
    # converge on is NaN in a computed point)
    hvps = data.get("hvps")
    done = (np.isfinite(np.asarray(hvps, dtype=np.float64)) if np.shape(hvps) == (n,)
            else np.isfinite(values).any(axis=1))
    if not done.all():
        if being_written(file):
            warn(f"'{file}' is being written by a running mctool command: {int(done.sum()):,} of {n:,} points are "
                 "computed so far, and the figure shows only those.")
        else:
            warn(f"'{file}' is an interrupted run's: {int(done.sum()):,} of {n:,} points are computed, and the "
                 "figure shows only those. Finish it with the same hessian command plus --resume.")
    fig = _figure(figsize=(10 if has_trace else 6, 4), layout="constrained")
    axes = fig.subplots(1, 2 if has_trace else 1, squeeze=False)
    ax = axes[0, 0]
    top_k = values.shape[1]
    # Up to 10 eigenvalues: one colour and legend entry each; more: shades of one colour map, keyed by a colour
    # bar (a legend of 20 or more entries would overflow the axes, and the default colours repeat after 10).
    cmap = matplotlib.colormaps["viridis"] if top_k > 10 else None
    for k in range(top_k):
        # separate networks or members: markers only (a line between them would suggest a path)
        ax.plot(x, values[:, k], marker="o", markersize=3 if cmap else 4, label=f"$\\lambda_{{{k + 1}}}$",
                linestyle="-" if along else "none", **({"color": cmap(k / (top_k - 1))} if cmap else {}))
    xlabel = "t (position along the curve)" if along else "point (network or member)"
    ax.set(xlabel=xlabel, ylabel="eigenvalue", title="Top Hessian eigenvalues of the training loss")
    # points that are not along a curve: one tick each, named by the file's labels (a network, PATH#i members)
    labels = attrs.get("labels").split("\n") if isinstance(attrs.get("labels"), str) else []
    ticks = {"ticks": x, "labels": [_short_label(s) for s in labels] if len(labels) == n else None}
    ax.grid(alpha=0.3)
    if cmap:
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize

        fig.colorbar(ScalarMappable(Normalize(1, top_k), cmap), ax=ax, label="k ($\\lambda_k$, largest first)")
    else:
        ax.legend(fontsize=8)
    if has_trace:
        tr = np.asarray(data["trace"], dtype=np.float64)
        se = np.asarray(data["trace_stderr"], dtype=np.float64) if np.shape(data.get("trace_stderr", ())) == (n,) \
            else np.zeros(n)
        axes[0, 1].errorbar(x, tr, yerr=se, marker="o", markersize=4, capsize=3, linestyle="-" if along else "none")
        axes[0, 1].set(xlabel=xlabel, ylabel="trace", title="Hessian trace (Hutchinson, \u00b1 1 standard error)")
        axes[0, 1].grid(alpha=0.3)
    if along:  # the whole curve, however few of its points are computed
        for a in axes[0]:
            a.set_xlim(-0.03, 1.03)
    else:
        for a in axes[0]:
            a.set_xticks(**ticks)
            if n > 3:  # names side by side would run into each other
                a.tick_params(axis="x", labelrotation=30)
    _save(fig, output, dpi, [file])


def _short_label(label: str, width: int = 24) -> str:
    """A point's label as a tick: the file's name (its folder left out), cut to ``width`` characters."""
    name = label.replace("\\", "/").rsplit("/", 1)[-1]
    return name if len(name) <= width else "..." + name[-(width - 3):]


def _once_each(files: list) -> list:
    """The files without repeats (the same file under any name, a shell glob and a name given again): a file given
    twice would be drawn twice, as two series with one label."""
    seen, kept, again = set(), [], []
    for f in files:
        key = os.path.realpath(f)
        (again if key in seen else kept).append(f)
        seen.add(key)
    if again:
        warn(f"{', '.join(repr(str(f)) for f in again)} {'is' if len(again) == 1 else 'are'} given again (the same "
             "file as an earlier one); each file is drawn once.")
    return kept


@library_call
@holds_output_locks
def plot_files(files: Sequence[str | Path], output: str | Path | None = None, *, three_d: bool = False,
               html: str | Path | None = None, vtk: str | Path | None = None, force: bool = False,
               dpi: int = DEFAULT_DPI, log_loss: bool = False) -> PlotResult:
    """Draw whatever the files hold: one plane or surface file (``three_d``: as 3-D surfaces; ``html``: also an
    interactive figure; ``vtk``: also VTK files for ParaView), one or more evaluate-curve files, or per-epoch
    files of train, connect and fge. ``output`` is the figure (PNG, PDF or SVG; a PNG at ``dpi`` dots per
    inch); at least one of ``output``, ``html`` and ``vtk`` is needed. ``log_loss``: the loss panels of curve
    and per-epoch figures on a log axis."""
    t0 = time.time()
    files = _once_each(file_list(files, "files"))
    check_count("--dpi", dpi, 10, MAX_DPI)
    if output is None and html is None and vtk is None:
        raise ConfigError("give an output: -o FIGURE (.png, .pdf or .svg), --html HTML and/or --vtk VTS.")
    from .export import vtk_points_path

    named = check_outputs({"--output": output, "--html": html, "--vtk": vtk,
                           "--vtk points file": vtk_points_path(vtk) if vtk is not None else None}, files,
                          force=force, formats={"--output": "figure", "--html": "html", "--vtk": "vtk-grid"})
    of = {str(f): read_h5(f)[1].get("kind") for f in files}  # (any attribute: a crafted file's is named as it is)
    kinds = {k if isinstance(k, str) else None for k in of.values()}
    kind = next(iter(kinds)) if len(kinds) == 1 else None
    if kinds and kinds <= set(HISTORY_KINDS):  # a training run and its fge continuation, on one figure
        kind = "history" if len(kinds) > 1 else kind
    no_log = ConfigError("--log-loss draws the loss of curve, 1-D surface and per-epoch figures on a log axis; a "
                         "plane's or 2-D surface's contour levels are spaced logarithmically already, and a hessian "
                         "file holds no loss.")
    if log_loss and kind not in ("evaluate-curve", "history", "surface", *HISTORY_KINDS):
        raise no_log
    if kind in ("plane", "surface"):
        if len(files) != 1:
            raise MetricsFileError(f"give one {kind} file at a time.")
        view = grid_view(files[0])  # (once: its warnings are said once)
        if log_loss and view.y is not None:
            raise no_log
        if html is not None:  # before the figure is written: a missing plotly would leave it behind, half done
            from .export import check_html

            check_html(view)
        if output is not None:
            plot_grid(files[0], output, three_d=three_d, dpi=dpi, view=view, log_loss=log_loss)
        if html is not None or vtk is not None:
            from .export import export_grid

            export_grid(files[0], html=html, vtk=vtk, view=view)
    elif kind == "evaluate-curve":
        if three_d or html is not None or vtk is not None:
            raise MetricsFileError("--3d, --html and --vtk draw plane and surface files; curves are drawn as lines "
                                   "(-o FIGURE).")
        if output is None:
            raise ConfigError("give the figure to write: -o FIGURE (.png, .pdf or .svg).")
        plot_curves(files, output, dpi=dpi, log_loss=log_loss)
    elif kind in HISTORY_KINDS + ("history", "hessian"):
        if three_d or html is not None or vtk is not None:
            named = "train, connect and fge" if kind == "history" else kind
            raise MetricsFileError(f"--3d, --html and --vtk draw plane and surface files; {named} files are drawn as "
                                   "lines (-o FIGURE).")
        if output is None:
            raise ConfigError("give the figure to write: -o FIGURE (.png, .pdf or .svg).")
        if kind == "hessian":
            if len(files) != 1:
                raise MetricsFileError("give one hessian file at a time.")
            plot_hessian(files[0], output, dpi=dpi)
        else:
            plot_history(files, output, dpi=dpi, log_loss=log_loss)
    else:
        listed = ", ".join(f"'{f}' ({'kind ' + repr(k)[:40] if k is not None else 'no kind'})" for f, k in of.items())
        what = ("files of different kinds together" if len(kinds) > 1 else "this file" if len(of) == 1
                else "these files")
        raise MetricsFileError(f"cannot draw {what}: {listed}. plot draws the metrics files of evaluate-curve "
                               "(several overlaid), the per-epoch files of train, connect and fge (several "
                               "overlaid), and plane, surface and hessian files (one at a time; merged shards "
                               "too); those of evaluate and ensemble are read with 'mctool info'.")
    refs = {key: FileRef.of(named[opt]) if opt in named else None for key, opt in
            (("plot", "--output"), ("html", "--html"), ("vtk", "--vtk"), ("vtk_points", "--vtk points file"))}
    return PlotResult(command="plot", inputs=file_refs(list(files)), outputs=refs,
                      metrics={"train": None, "eval": None}, seconds=time.time() - t0, kind=kind)
