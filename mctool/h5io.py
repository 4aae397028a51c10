"""HDF5 metrics files: self-describing, with provenance, rewritten atomically at every flush.

Coordinates (``epoch``, later ``t``, ``alpha``/``beta``, ``member``) are HDF5 dimension scales attached
to the metric arrays; NaN marks a value not yet computed. Each flush writes the whole (small) file to a
temporary file in the same folder and renames it into place, so a crash at any moment leaves the last
complete version under the real name.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np

from ._version import __version__
from .errors import MetricsFileError
from .fileio import atomic_path


def utc_now() -> str:
    """The current time as ISO 8601 in UTC (every timestamp mctool writes)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def provenance(inputs: dict[str, str] | None = None, config: dict[str, Any] | None = None,
               kind: str = "train") -> dict[str, str]:
    """Root attributes every mctool HDF5 file carries."""
    return {
        "kind": kind,
        "mctool_version": __version__,
        "command": shlex.join(["mctool", *sys.argv[1:]]) if sys.argv else "mctool",
        "started": utc_now(),
        "inputs": json.dumps(inputs or {}, sort_keys=True),
        "config": json.dumps(config or {}, sort_keys=True),
    }


def write_h5(path: str | os.PathLike, *, scales: dict[str, np.ndarray],
             datasets: dict[str, tuple[np.ndarray, tuple[str, ...]]], attrs: dict[str, Any],
             dataset_attrs: dict[str, dict[str, Any]] | None = None) -> None:
    """Write a complete metrics file atomically.

    ``scales`` are coordinate arrays (made dimension scales); ``datasets`` maps a path such as
    ``train/loss`` to its array and the names of the scales along each of its axes.
    """
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            for k, v in attrs.items():
                f.attrs[k] = v
            for name, values in scales.items():
                ds = f.create_dataset(name, data=np.asarray(values), maxshape=(None,) * np.ndim(values), chunks=True)
                ds.make_scale(name)
            for name, (values, dims) in datasets.items():
                values = np.asarray(values, dtype=np.float64)
                ds = f.create_dataset(name, data=values, maxshape=(None,) * values.ndim, chunks=True)
                for axis, scale in enumerate(dims):
                    ds.dims[axis].attach_scale(f[scale])
                    ds.dims[axis].label = scale
                for k, v in (dataset_attrs or {}).get(name, {}).items():
                    ds.attrs[k] = v


def read_h5(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """All datasets (by path) and the root attributes of an HDF5 file."""
    path = Path(path)
    if not path.is_file():
        raise MetricsFileError(f"metrics file '{path}' does not exist.")
    data: dict[str, np.ndarray] = {}
    try:
        with h5py.File(path, "r") as f:
            f.visititems(lambda name, obj: data.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
            attrs = {k: _attr(v) for k, v in f.attrs.items()}
    except OSError as e:
        raise MetricsFileError(f"'{path}' is not a readable HDF5 file ({e}).") from None
    return data, attrs


def open_outputs(metrics: str | os.PathLike, inputs: dict[str, str], config: dict[str, Any], *, resume: bool,
                 force: bool, plot: str | os.PathLike | None = None) -> tuple[dict[str, np.ndarray], str | None]:
    """Check a grid-like run's outputs before any work: with ``resume``, the existing metrics file's values
    (for the cells to keep) and start time; otherwise refuse existing outputs without ``force``."""
    from .fileio import check_output

    data, started = {}, None
    if resume:
        data, attrs = check_resumable(metrics, inputs, config)
        started = attrs.get("started")
    else:
        check_output(metrics, force, "metrics file")
    if plot is not None:
        check_output(plot, force or resume, "plot")
    return data, started


def check_resumable(path: str | os.PathLike, inputs: dict[str, str], config: dict[str, Any]) -> tuple[
        dict[str, np.ndarray], dict[str, Any]]:
    """Read a metrics file to resume, refusing one made from other inputs or with other settings."""
    data, attrs = read_h5(path)
    old_inputs, old_config = json.loads(attrs.get("inputs", "{}")), json.loads(attrs.get("config", "{}"))
    if old_inputs != inputs:
        raise MetricsFileError(f"'{path}' was computed from other input files; --resume needs the same inputs.")
    diff = {k: (old_config.get(k), v) for k, v in config.items() if old_config.get(k) != v}
    if diff:
        shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
        raise MetricsFileError(f"'{path}' was computed with other settings; --resume needs the same options "
                               f"(differences: {shown}).")
    return data, attrs


def _attr(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


class MetricsLog:
    """Rows of metrics along one coordinate (e.g. one row per epoch), flushed atomically."""

    def __init__(self, path: str | os.PathLike, coord: str, columns: list[str], attrs: dict[str, Any],
                 extra: Callable[[], tuple[dict[str, np.ndarray], dict[str, tuple[np.ndarray, tuple[str, ...]]]]]
                 | None = None):
        """``extra()`` may add more scales and datasets (e.g. ensemble members) at every flush."""
        self.path, self.coord, self.columns, self.attrs = Path(path), coord, list(columns), dict(attrs)
        self.rows: list[dict[str, float]] = []
        self.extra = extra

    def append(self, coord_value: float, **values: float) -> None:
        unknown = set(values) - set(self.columns)
        if unknown:
            raise ValueError(f"unknown metric columns {sorted(unknown)}")
        self.rows.append({self.coord: coord_value, **values})

    def column(self, name: str) -> np.ndarray:
        return np.array([r.get(name, np.nan) for r in self.rows], dtype=np.float64)

    def flush(self) -> None:
        scales = {self.coord: self.column(self.coord)}
        datasets = {c: (self.column(c), (self.coord,)) for c in self.columns}
        if self.extra is not None:
            more_scales, more = self.extra()
            scales.update(more_scales)
            datasets.update(more)
        write_h5(self.path, scales=scales, datasets=datasets, attrs=self.attrs)
