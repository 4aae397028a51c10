"""HDF5 metrics files: self-describing, with provenance, rewritten atomically at every flush.

Coordinates (``epoch``, later ``t``, ``alpha``/``beta``, ``member``) are HDF5 dimension scales attached
to the metric arrays; NaN marks a value not yet computed. Each flush writes the whole (small) file to a
temporary file in the same folder and renames it into place, so a crash at any moment leaves the last
complete version under the real name.
"""

from __future__ import annotations

import contextlib
import contextvars
import io
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
from .errors import ConfigError, MctoolError, MetricsFileError, OutputError
from .fileio import atomic_path, did_you_mean, same_inputs, writes_files
from .options import plain, setting_name, show_setting
from .calls import library_call

#: Most values (all datasets together) mctool reads from one HDF5 file: 512 MiB as float64.
MAX_H5_VALUES = 1 << 26


#: The latest SOURCE_DATE_EPOCH accepted: 9999-12-31T23:59:59Z.
MAX_SOURCE_DATE_EPOCH = 253402300799


def source_date_epoch() -> int | None:
    """The environment's ``SOURCE_DATE_EPOCH`` (whole seconds since 1970-01-01 UTC, the reproducible-builds
    convention), or None when it is unset or empty; anything else is a ConfigError naming the variable."""
    raw = os.environ.get("SOURCE_DATE_EPOCH", "")
    if not raw:
        return None
    if not (raw.isascii() and raw.isdigit()) or int(raw) > MAX_SOURCE_DATE_EPOCH:
        raise ConfigError(f"SOURCE_DATE_EPOCH={raw[:40]!r} must be a whole number of seconds since "
                          f"1970-01-01 UTC, from 0 to {MAX_SOURCE_DATE_EPOCH}.")
    return int(raw)


def utc_now() -> str:
    """The current time as ISO 8601 in UTC (every timestamp mctool writes), or the time ``SOURCE_DATE_EPOCH``
    names when it is set, so that reruns with the same seed write the same files (docs/file-formats.md)."""
    epoch = source_date_epoch()
    now = datetime.now(timezone.utc) if epoch is None else datetime.fromtimestamp(epoch, timezone.utc)
    return now.isoformat(timespec="seconds")


def _printable(text: str) -> str:
    """``text`` as valid UTF-8: undecodable bytes (surrogate escapes) become ``\\xNN``."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


#: The mctool command line being run, set by the CLI; a library call records its Python program instead.
COMMAND_LINE: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("mctool_command_line",
                                                                               default=None)


def command_line() -> str:
    """What produced a file: ``mctool ARGS`` under the CLI, else ``python PROGRAM ARGS`` (a script or notebook
    calling the library), never a made-up mctool command."""
    args = COMMAND_LINE.get()
    line = shlex.join(["mctool", *args]) if args is not None else shlex.join(["python", *sys.argv]) if sys.argv \
        else "python"
    return _printable(line)  # file names that are not UTF-8 come as surrogate escapes, which HDF5 text cannot hold


def _torch_build() -> dict[str, str]:
    """The PyTorch version (with its build, e.g. 2.14.1+cu130) and CPU thread count, as checkpoints record them:
    float results may differ between versions, and a CPU's between thread counts, in the last bits."""
    import torch

    return {"torch_version": str(torch.__version__), "torch_threads": str(torch.get_num_threads())}


def provenance(inputs: dict[str, str] | None = None, config: dict[str, Any] | None = None,
               kind: str = "train", order: list[str] | None = None) -> dict[str, str]:
    """Root attributes every mctool HDF5 file carries. ``inputs`` (path -> sha256) is stored sorted by path;
    ``input_order`` keeps the sha256 in the order the inputs were given (A B is not B A): ``order``, where a
    file may be given twice (an ensemble's members), else ``inputs``' own order."""
    return {
        "kind": kind,
        "mctool_version": __version__,
        **_torch_build(),
        "command": command_line(),
        "started": utc_now(),
        "inputs": json.dumps(plain(inputs or {}), sort_keys=True),
        "input_order": json.dumps(plain(list((inputs or {}).values()) if order is None else order)),
        "config": json.dumps(plain(config or {}), sort_keys=True),
    }


def write_h5(path: str | os.PathLike, *, scales: dict[str, np.ndarray],
             datasets: dict[str, tuple[np.ndarray, tuple[str, ...]]], attrs: dict[str, Any],
             dataset_attrs: dict[str, dict[str, Any]] | None = None) -> None:
    """Write a complete metrics file atomically.

    ``scales`` are coordinate arrays (made dimension scales); ``datasets`` maps a path such as
    ``train/loss`` to its array and the names of the scales along each of its axes. Nothing is written on
    the ranks that do not write files (``fileio.writes_files``).
    """
    if not writes_files():
        return
    # Built in memory and written with plain file I/O: a full disk is then an OSError like any other write's
    # (h5py writing to disk raised RuntimeError and could crash the interpreter while cleaning up).
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
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
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())


@library_call
def read_h5(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """All datasets (by path) and the root attributes of an HDF5 file."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise MetricsFileError(f"metrics file '{path}' is not a file (a folder, pipe or device).")
    if not path.is_file():
        raise MetricsFileError(f"metrics file '{path}' does not exist.{did_you_mean(path)}")
    data: dict[str, np.ndarray] = {}
    try:
        with h5py.File(path, "r") as f:
            found: list[tuple[str, h5py.Dataset]] = []
            f.visititems(lambda name, obj: found.append((name, obj)) if isinstance(obj, h5py.Dataset) else None)
            total = 0
            for name, ds in found:
                # Only numbers stored in the file itself: external raw storage and virtual datasets read
                # other files, and a compressed dataset may expand to any size.
                if ds.shape is None or ds.dtype.kind not in "fiub" or ds.is_virtual or ds.external:
                    raise MetricsFileError(f"'{path}': dataset '{name}' is not an array of numbers stored in the "
                                           "file; mctool's metrics files hold only such arrays.")
                total += ds.size
                if total > MAX_H5_VALUES:
                    raise MetricsFileError(f"'{path}' holds more than {MAX_H5_VALUES:,} values; mctool's metrics "
                                           "files are far smaller.")
                data[name] = ds[()]
            attrs = {k: _attr(path, f.attrs, k) for k in f.attrs}
    except (OSError, RuntimeError, KeyError, TypeError, ValueError) as e:
        hint = ""
        with contextlib.suppress(OSError):
            with open(path, "rb") as f:
                head = f.read(9)  # a safetensors file: its header's length (8 bytes), then the JSON header
            if len(head) == 9 and head[8:] == b"{" and 0 < int.from_bytes(head[:8], "little") < path.stat().st_size:
                hint = (" It looks like a safetensors checkpoint; this takes the HDF5 metrics files written with "
                        "-m/--metrics.")
        raise MetricsFileError(f"'{path}' is not a readable HDF5 file ({type(e).__name__}: {e}).{hint}") from None
    return data, attrs


def metrics_file(path: str | os.PathLike, kinds: tuple[str, ...],
                 datasets: dict[str, int] | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``read_h5`` for a file that must be of one of ``kinds`` and hold ``datasets`` (path -> number of
    dimensions) of floating-point or integer values; MetricsFileError names what is missing."""
    data, attrs = read_h5(path)
    kind = attrs.get("kind")
    if kind not in kinds:
        shown = kind if isinstance(kind, str) else "unknown"
        raise MetricsFileError(f"'{path}' is a '{shown[:64]}' file; this needs kind {' or '.join(kinds)}.")
    for name, ndim in (datasets or {}).items():
        if name not in data:
            raise MetricsFileError(f"'{path}' is not a complete {kind} file: it has no dataset '{name}'.")
        if np.ndim(data[name]) != ndim or data[name].dtype.kind not in "fiu":
            raise MetricsFileError(f"'{path}': dataset '{name}' must be a {ndim}-D array of numbers, got shape "
                                   f"{np.shape(data[name])} of {data[name].dtype}.")
    return data, attrs


def json_attr(attrs: dict[str, Any], key: str, path: str | os.PathLike, default: str = "{}") -> Any:
    """A root attribute holding JSON (``inputs``, ``config``, ``summary``...), with an error naming it."""
    value = attrs.get(key, default)
    try:
        if not isinstance(value, str):
            raise TypeError(key)
        return json.loads(value)
    except (json.JSONDecodeError, RecursionError, TypeError):
        raise MetricsFileError(f"'{path}': attribute '{key}' is not valid JSON text.") from None


def recorded_setting(path: str | os.PathLike, key: str) -> Any:
    """A setting of an existing metrics file's recorded config; None when the file, its config or the setting
    is missing or unreadable (``check_resumable`` reports those). ``--resume`` takes the interrupted run's
    choice for an option left to its default, as the training commands do."""
    try:
        config = json.loads(read_h5(path)[1].get("config"))
    except (MctoolError, OSError, ValueError, TypeError, RecursionError):
        return None
    return config.get(key) if isinstance(config, dict) else None


def record_data(attrs: dict[str, Any], data: Any, name: str, resumed: str | os.PathLike | None) -> None:
    """Record the data set a grid-like run evaluates on (``data_fingerprint``, ``data.Data.fingerprint``) in its
    metrics file's ``attrs``; on ``--resume`` (``resumed``: the metrics file), refuse data other than the
    interrupted run's (``data.check_same_data_as``)."""
    from .data import check_same_data_as

    if resumed is not None:
        check_same_data_as(read_h5(resumed)[1].get("data_fingerprint"), data, name, resumed)
    attrs["data_fingerprint"] = data.fingerprint


def kept_attrs(path: str | os.PathLike) -> dict[str, Any]:
    """Attributes of an interrupted run's metrics file that a resumed run keeps when it has no work to do (it
    loads no data): ``data_fingerprint``."""
    recorded = read_h5(path)[1].get("data_fingerprint")
    return {"data_fingerprint": recorded} if isinstance(recorded, str) else {}


def open_outputs(metrics: str | os.PathLike, inputs: dict[str, str], config: dict[str, Any], *, resume: bool,
                 force: bool, plot: str | os.PathLike | None = None,
                 shapes: dict[str, tuple[int, ...]] | None = None, recorded_none: dict[str, Any] | None = None
                 ) -> tuple[dict[str, np.ndarray], str | None, bool, bool]:
    """Check a grid-like run's outputs before any work: with ``resume``, the existing metrics file's values
    (for the cells to keep; ``shapes`` says which datasets it must hold, and their shapes), start time and
    whether it is finished (it holds its ``summary``: a resume that computes nothing leaves it as it is, with
    its provenance, e.g. a merged file's ``merged_from``); otherwise refuse existing outputs without ``force``.
    The metrics file and the plot must be two files and neither may be one of ``inputs`` (paths -> sha256).
    Last, whether to draw ``plot``: an existing figure is refused without ``force``, resumed or not (a run draws
    its figure once every point is computed, so an unfinished run's is not there), except beside a finished
    file on ``--resume``, where it is left as it is, like the file (a warning says so: a requeued job whose run
    had finished goes through)."""
    from .fileio import check_output, check_outputs

    # Name clashes and locks first (force=True); whether existing files may be replaced depends on resume.
    check_outputs({"--metrics": metrics, "--plot": plot}, list(inputs), force=True,
                  formats={"--metrics": "hdf5", "--plot": "figure"})
    data, started, finished = {}, None, False
    if resume:
        data, attrs = check_resumable(metrics, inputs, config, recorded_none)
        started = attrs.get("started") if isinstance(attrs.get("started"), str) else None
        finished = "summary" in attrs
        for name, shape in (shapes or {}).items():
            if name not in data or np.shape(data[name]) != shape or data[name].dtype.kind not in "fiu":
                got = "nothing" if name not in data else f"{np.shape(data[name])} of {data[name].dtype}"
                raise MetricsFileError(f"'{metrics}' cannot be resumed: dataset '{name}' should be numbers of shape "
                                       f"{shape}, got {got}. Start over with --force.")
    else:
        if not force and _unfinished(metrics):
            raise OutputError(f"--metrics '{metrics}' holds an interrupted run; pass --resume (with the same "
                              "options) to continue it, or --force to start over.")
        if not force and plot is not None and not os.path.lexists(plot) and _unfinished(metrics, finished=True):
            # (a run stopped while drawing its figure: every point is computed)
            raise OutputError(f"--metrics '{metrics}' holds a finished run but --plot '{plot}' is not there; pass "
                              "--resume (with the same options) to draw it without computing any point again, or "
                              "--force to start over.")
        check_output(metrics, force, "--metrics")
    draw = plot is not None
    if draw and resume and not force and os.path.lexists(plot) and _unfinished(metrics, finished=True):
        from .console import warn

        warn(f"--plot '{plot}' exists and '{metrics}' holds a finished run: both are left as they are ('mctool "
             "plot' draws the figure again, or --force with --resume).")
        draw = False
    elif draw:
        check_output(plot, force, "--plot")
    return data, started, finished, draw


def _unfinished(path: str | os.PathLike, finished: bool = False) -> bool:
    """Whether ``path`` is an mctool metrics file of a grid-like run that has no summary yet (interrupted);
    ``finished``: whether it is one that has its summary (every point computed)."""
    try:
        if not os.path.isfile(path):
            return False
        with h5py.File(path, "r") as f:
            kind = f.attrs.get("kind")
            if kind == "hessian":  # (no summary: its points are NaN until computed)
                hvps = f.get("hvps")
                return (isinstance(hvps, h5py.Dataset) and hvps.size <= MAX_H5_VALUES
                        and bool(np.isnan(hvps[()]).any()) != finished)
            return kind in ("evaluate-curve", "plane", "surface") and ("summary" in f.attrs) == finished
    except (OSError, ValueError, TypeError):
        return False


def unfinished_training(path: str | os.PathLike) -> bool:
    """Whether ``path`` is the metrics file of a ``train``, ``connect`` or ``fge`` run that did not finish
    (no ``finished`` time) and holds no epoch: a run stopped (``kill -9``, a power cut) before its first epoch
    was saved (an fge or sse run writes its file at a snapshot during epoch 1; every run writes an epoch's row after
    its training state). A file with epochs had a state: an interrupted run's, maybe another output's."""
    try:
        if not os.path.isfile(path):
            return False
        with h5py.File(path, "r") as f:
            epochs = f.get("epoch")
            return (f.attrs.get("kind") in ("train", "connect", "fge") and "finished" not in f.attrs
                    and (epochs is None or (isinstance(epochs, h5py.Dataset) and epochs.size == 0)))
    except (OSError, ValueError, TypeError):
        return False


def training_run_of(path: str | os.PathLike, kind: str, started: Any) -> bool:
    """Whether ``path`` is the metrics file of the training run whose state records ``started`` (a ``train``,
    ``connect`` or ``fge`` file, ``kind``, with that start time): the file a ``--resume`` of it may rewrite."""
    try:
        with h5py.File(path, "r") as f:
            return f.attrs.get("kind") == kind and isinstance(started, str) and f.attrs.get("started") == started
    except (OSError, ValueError, TypeError):
        return False


#: Settings that metrics files of mctool 0.2.0 do not record: such a file resumes whatever they are now.
NOT_RECORDED_BEFORE_0_3 = frozenset({"bn_batch_size", "trace"})
#: Settings that metrics files of mctool 0.2.0 do not record, and the value they were computed with (for a
#: network where the setting applies: where it does not, the run records None).
RECORDED_VALUE_BEFORE_0_3 = {"bn_data": "plain"}


def check_resumable(path: str | os.PathLike, inputs: dict[str, str], config: dict[str, Any],
                    recorded_none: dict[str, Any] | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read a metrics file to resume, refusing one made from other inputs or with other settings.
    ``recorded_none``: settings an earlier version recorded as given, ``null`` for left to its default, and the
    value that default is here (``plane``'s ``bend``, now recorded as used)."""
    if not os.path.lexists(path):
        raise MetricsFileError(f"nothing to resume: metrics file '{path}' does not exist.{did_you_mean(path)} "
                               "Run without --resume to start.")
    data, attrs = read_h5(path)
    old_inputs, old_config = json_attr(attrs, "inputs", path), json_attr(attrs, "config", path)
    if not isinstance(old_inputs, dict) or not isinstance(old_config, dict):
        raise MetricsFileError(f"'{path}': attributes 'inputs' and 'config' must be JSON objects.")
    if not same_inputs(old_inputs, inputs):
        raise MetricsFileError(f"'{path}' was computed from other input files (or they changed since); --resume "
                               "needs the same inputs.")
    if "input_order" in attrs and json_attr(attrs, "input_order", path, "[]") != list(inputs.values()):
        raise MetricsFileError(f"'{path}' was computed from the same files given in another order; --resume needs "
                               "them in the interrupted run's order.")
    def recorded(k: str, v: Any) -> Any:
        if k in old_config:
            return (recorded_none or {}).get(k) if old_config[k] is None else old_config[k]
        return RECORDED_VALUE_BEFORE_0_3.get(k) if v is not None else None

    diff = {k: (recorded(k, v), v) for k, v in config.items()
            if recorded(k, v) != v and (k in old_config or k not in NOT_RECORDED_BEFORE_0_3)}
    if diff:
        shown = ", ".join(f"{setting_name(k)}: {show_setting(a)} -> {show_setting(b)}" for k, (a, b) in diff.items())
        raise MetricsFileError(f"'{path}' was computed with other settings; --resume needs the same options as the "
                               f"run that wrote it; these differ: {shown}.")
    return data, attrs


def _attr(path: str | os.PathLike, attrs: h5py.AttributeManager, key: str) -> Any:
    """One root attribute as JSON-ready Python: text (UTF-8), numbers, or short lists of them."""
    def bad(why: str) -> MetricsFileError:
        return MetricsFileError(f"'{path}': attribute '{key}' {why}; mctool's files hold text and real numbers only.")

    try:
        v = attrs[key]
    except (OSError, TypeError, ValueError, KeyError) as e:
        raise bad(f"cannot be read ({type(e).__name__})") from None
    if isinstance(v, np.ndarray):
        if v.size > 10_000:
            raise bad(f"has {v.size:,} values")
        v = v.tolist()
    return _attr_value(v, bad)


def _attr_value(v: Any, bad: Callable[[str], MetricsFileError]) -> Any:
    if isinstance(v, list):
        return [_attr_value(x, bad) for x in v]
    if isinstance(v, (bytes, np.bytes_)):
        try:
            v = bytes(v).decode()
        except UnicodeDecodeError:
            raise bad("is not UTF-8 text") from None
    if isinstance(v, str):
        try:
            v.encode()  # h5py keeps undecodable bytes as lone surrogates
        except UnicodeEncodeError:
            raise bad("is not UTF-8 text") from None
        return v
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, float, np.integer, np.floating)):
        return v.item() if isinstance(v, np.generic) else v
    raise bad(f"is of type {type(v).__name__}")


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
