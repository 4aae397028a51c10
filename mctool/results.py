"""Typed results of mctool's commands, and the one JSON shape they all print with ``--json``.

Every result has the same common fields (``command``, ``schema_version``, ``inputs``, ``outputs``,
``split``, ``metrics``, ``seconds``) followed by the command's own fields; ``to_dict()`` gives exactly
the documented shape (docs/cli.md#json-output; ``json_schemas()``: the JSON Schema files in mctool/schemas/,
installed with the package). Every key is
always present: a value that does not apply is ``None`` (``null``), never a missing key.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np

from .options import plain

SCHEMA_VERSION = 2  # the JSON shape; version 1 was the per-command output of mctool <= 0.x
METRIC_NAMES = ("loss", "nll", "err", "ece", "brier")
T = TypeVar("T")  # what each metric is in a result: a float, or a summary over a curve or grid


def json_schemas() -> dict[str, dict[str, Any]]:
    """The JSON Schemas (draft 2020-12) of every command's ``--json`` output, installed with the package: by
    command name (``"train"``, ``"evaluate-curve"``, ...), plus ``"common"``, the definitions the others refer
    to by ``$id`` (``urn:mctool:schema:<SCHEMA_VERSION>:<name>``): give all of them to a validator's registry."""
    import importlib.resources
    import json

    folder = importlib.resources.files(__package__) / "schemas"
    suffix = ".schema.json"
    return {f.name[:-len(suffix)]: json.loads(f.read_text(encoding="utf-8"))
            for f in sorted(folder.iterdir(), key=lambda f: f.name) if f.name.endswith(suffix)}


@dataclass
class FileRef:
    """A file a command read or wrote, with its sha256."""

    path: str
    sha256: str | None = None

    @classmethod
    def of(cls, path: str | os.PathLike, sha256: str | None = None) -> "FileRef":
        """The file and its sha256 (none on the ranks of a distributed run that write no files: they print
        nothing, and rank 0 may still be writing it)."""
        from .fileio import sha256_file, writes_files

        if sha256 is None and writes_files():
            sha256 = sha256_file(path)
        return cls(str(path), sha256)


def file_refs(files: dict[str, str] | list[str | os.PathLike]) -> list[FileRef]:
    """Input files, from a ``{path: sha256}`` map (as recorded in checkpoints) or a list of paths."""
    if isinstance(files, dict):
        return [FileRef(str(p), s) for p, s in files.items()]
    return [FileRef.of(p) for p in files]


@dataclass
class Metrics(Generic[T]):
    """One set of metrics under the same five names everywhere; ``None`` where not computed.

    ``loss`` is the training objective (NLL plus the L2 term; in ``train``'s per-epoch rows the mean
    cross-entropy of the augmented batches), ``nll`` the mean negative log-likelihood, ``err`` the
    top-1 error in [0, 1], ``ece`` the expected calibration error (15 bins), ``brier`` the Brier score.
    In ``evaluate-curve``, ``plane``, ``surface`` and ``merge`` each value is a summary over the curve or grid
    instead of a number (``Metrics[CurveSummary]``, ``Metrics[PlaneSummary]``; ``Metrics[float]`` elsewhere).
    """

    loss: T | None = None
    nll: T | None = None
    err: T | None = None
    ece: T | None = None
    brier: T | None = None

    @classmethod
    def of(cls, values: dict[str, Any] | None, prefix: str = "") -> Metrics[Any]:
        """The metrics in ``values`` (keys ``<prefix><name>``); other keys are ignored."""
        values = values or {}
        return cls(**{k: values.get(prefix + k) for k in METRIC_NAMES})


def _config() -> Any:
    """A result's ``config``: the effective configuration of the run as a dict (the caller's config object, which
    is left unchanged, with the defaults filled in). For Python callers only: not part of the JSON shape (the
    output files record it)."""
    return field(default=None, repr=False, metadata={"json": False})


def _plain(obj: Any) -> Any:
    """JSON-ready: dataclasses become dicts, non-finite floats become None."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if f.metadata.get("json", True)}
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (os.PathLike, np.ndarray, np.generic)):  # (what a Python caller may have given)
        return _plain(plain(obj))
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


@dataclass(kw_only=True)
class Result(Generic[T]):
    """What every command returns. ``outputs`` maps a role (``model``, ``metrics``, ``plot``, ...) to the
    file written, or ``None`` when that output was not asked for; ``metrics`` maps a set name (``train``,
    ``eval``, ...) to a ``Metrics`` or ``None``; ``split`` is the split the data was loaded with (``test``
    or ``val``: which images are evaluated and which are held out from training), ``None`` when no data
    was read."""

    command: str
    schema_version: int = SCHEMA_VERSION
    inputs: list[FileRef] = field(default_factory=list)
    outputs: dict[str, FileRef | None] = field(default_factory=dict)
    split: str | None = None
    metrics: dict[str, Metrics[T] | None] = field(default_factory=dict)
    seconds: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The documented JSON shape (NaN and infinity become ``None``)."""
        return _plain(self)

    def to_json(self) -> str:
        import json

        return json.dumps(self.to_dict(), allow_nan=False)


@dataclass(kw_only=True)
class TrainResult(Result[float]):
    """``train``: ``metrics.train`` (last epoch, on the augmented batches), ``metrics.eval`` (the final network,
    or with ``--schedule sse`` the ensemble of the snapshots, which is then the output)."""

    arch: str
    dataset: str
    epochs: int
    members: int | None = None  # snapshots in the output (--schedule sse), else None
    config: dict[str, Any] | None = _config()


@dataclass
class MemberMetrics:
    """One network of ``evaluate``/``ensemble``: ``label`` is the file, ``PATH#i`` for member i of an ensemble
    file or ``PATH@t=T`` for a point on a curve; ``path`` and ``sha256`` are those of the file."""

    label: str
    path: str
    sha256: str | None
    metrics: Metrics[float]


@dataclass
class Calibration:
    """Temperature scaling (``ensemble --temperature-scale``)."""

    temperature: float
    warning: str | None = None


@dataclass(kw_only=True)
class EvaluateResult(Result[float]):
    """``evaluate`` and ``ensemble``: ``metrics.eval`` is the ensemble of all networks (the network itself when
    there is one); ``metrics.calibrated`` the temperature-scaled ensemble, or None."""

    dataset: str
    samples: int
    members: int
    models: list[MemberMetrics] = field(default_factory=list)
    calibration: Calibration | None = None


@dataclass
class Document:
    """A page of the documentation: ``name`` as help texts cite it (``method`` for docs/method.md), its
    ``title`` (first heading) and the ``path`` of its Markdown file."""

    name: str
    title: str
    path: str


@dataclass(kw_only=True)
class DocsResult(Result[float]):
    """``docs``: the pages (all of them, or the one asked for); with a topic, its Markdown ``text`` (the whole
    page, or the ``section`` its anchor names), else None."""

    documents: list[Document]
    section: str | None = None
    text: str | None = None


@dataclass(kw_only=True)
class InfoResult(Result[float]):
    """``info``: ``type`` is ``safetensors`` or ``hdf5``; ``metadata`` the safetensors metadata or the HDF5 root
    attributes; ``tensors`` (safetensors) or ``datasets`` (HDF5), the other None."""

    type: str
    bytes: int
    metadata: dict[str, Any]
    tensors: dict[str, Any] | None = None
    datasets: dict[str, Any] | None = None


@dataclass(kw_only=True)
class ConnectResult(Result[float]):
    """``connect``: ``metrics.train`` of the last epoch (None for a line, which is not trained)."""

    curve: str
    num_bends: int
    trained: bool
    epochs: int | None = None
    config: dict[str, Any] | None = _config()


@dataclass
class CurveSummary:
    """One metric along a curve: at both ends, min, max, mean and the arc-length weighted mean ``int``."""

    start: float | None
    end: float | None
    min: float | None
    max: float | None
    mean: float | None
    int: float | None


@dataclass(kw_only=True)
class CurveResult(Result[CurveSummary]):
    """``evaluate-curve``: ``metrics.train``/``metrics.eval`` hold a ``CurveSummary`` per metric; ``barrier``
    the same sets with max minus the mean of the two ends; ``bump`` with the largest rise above the straight
    line between the ends' values; ``barrier_unaligned`` and ``bump_unaligned`` those of the unaligned segment
    A -> B with --compare-unaligned (None without)."""

    curve: str
    num_bends: int
    num_points: int
    length: float | None
    length_ratio: float | None
    barrier: dict[str, Metrics[float] | None] = field(default_factory=dict)
    bump: dict[str, Metrics[float] | None] = field(default_factory=dict)
    barrier_unaligned: dict[str, Metrics[float] | None] | None = None
    bump_unaligned: dict[str, Metrics[float] | None] | None = None


@dataclass(kw_only=True)
class PointResult(Result[float]):
    """``point``: ``t`` for a point on a curve or ``index`` for an ensemble member (the other None)."""

    t: float | None = None
    index: int | None = None
    bn_recalibrated: bool = False


@dataclass(kw_only=True)
class PlotResult(Result[float]):
    """``plot``: ``kind`` of the files drawn (``evaluate-curve``, ``plane``, ``surface``, ``train``, ``connect``,
    ``fge``, ``hessian``, or ``history`` for per-epoch files of several of train, connect and fge)."""

    kind: str


@dataclass(kw_only=True)
class MergeResult(Result[Any]):
    """``merge``: ``kind`` of the run merged (``plane``, ``surface`` or ``evaluate-curve``) and its number of
    ``shards``; ``inputs`` are the shard files, ``metrics`` the merged file's summary as that command's ``--json`` gives
    it, and ``split`` the split the shards were evaluated on."""

    kind: str
    shards: int


@dataclass
class PlaneSummary:
    """One metric over the plane: grid min and max, and the values at the three points."""

    min: float | None
    max: float | None
    at_points: list[float | None]


@dataclass(kw_only=True)
class PlaneResult(Result[PlaneSummary]):
    """``plane``: ``metrics.train``/``metrics.eval`` hold a ``PlaneSummary`` per metric."""

    grid_points: int
    dx: float
    dy: float
    points: list[list[float]]
    curve_max_offplane: float | None = None


@dataclass(kw_only=True)
class FGEResult(Result[float]):
    """``fge``: ``metrics.eval`` is the FGE ensemble; ``metrics.start`` the start network, ``metrics.last_member``
    the last snapshot alone, ``metrics.swa`` the averaged weights (None without ``--swa``)."""

    members: int
    cycle_iters: int
    config: dict[str, Any] | None = _config()


@dataclass(kw_only=True)
class AlignResult(Result[float]):
    """``align``: B's hidden units permuted into A's order. ``groups`` permutation groups of ``units`` units in all,
    of which the fraction ``moved`` changed place; ``sweeps`` and ``objective`` (<A, permuted B> over the
    parameters after the last sweep) for ``method`` ``weights``, ``correlation`` (mean correlation of the
    matched units) for ``activations``, the other None; ``distance_before``/``distance_after`` are the L2
    distances between A's and B's parameters before and after the permutation."""

    method: str
    groups: int
    units: int
    moved: float
    sweeps: int | None = None
    objective: float | None = None
    correlation: float | None = None
    distance_before: float
    distance_after: float


@dataclass(kw_only=True)
class HessianResult(Result[float]):
    """``hessian``: at each of ``num_points`` networks (``points_kind``: ``model``, ``curve`` with ``t``, or
    ``ensemble`` members), the ``top_k`` largest Hessian eigenvalues of the training loss (``eigenvalues``,
    descending; None where ARPACK did not converge) and, with ``--trace``, Hutchinson's ``trace`` and its
    ``trace_stderr``; ``hvps`` Hessian-vector products in all; ``train_subset`` the number of training images
    defining the loss (None: all; fewer than ``--train-subset`` where the data set holds fewer); ``parameters`` the
    dimension of the Hessian."""

    points_kind: str
    num_points: int
    top_k: int
    parameters: int
    train_subset: int | None
    t: list[float] | None = None
    eigenvalues: list[list[float | None]]
    trace: list[float | None] | None = None
    trace_stderr: list[float | None] | None = None
    hvps: int


@dataclass(kw_only=True)
class SurfaceResult(Result[PlaneSummary]):
    """``surface``: ``metrics.train``/``metrics.eval`` hold a ``PlaneSummary`` per metric (grid min and max, and
    ``at_points``: [the value at the network itself]); ``dims`` directions (``random`` filter-normalised,
    ``pca`` of a trajectory, or ``files``), ``grid_points`` per direction over ``ranges`` ([low, high] per
    direction); ``direction_norms`` the L2 norm of each direction; for ``pca`` the share of the trajectory's
    squared distances to the network along each direction and the largest relative projection error."""

    dims: int
    directions: str
    grid_points: int
    ranges: list[list[float]]
    direction_norms: list[float]
    explained_variance_ratio: list[float] | None = None
    trajectory_max_error: float | None = None
