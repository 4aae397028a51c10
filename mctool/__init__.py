"""mctool: loss surfaces, mode connectivity and fast ensembling of neural networks.

The public Python API; the ``mctool`` command is a thin layer over these functions.
"""

from . import _launch_env  # noqa: F401  (first: it sets the environment before torch is imported)
from ._version import __version__

# The mctool command (cli.py) imports what each command runs, so that `mctool --help`, a usage error or --version
# answer in a fraction of a second instead of the seconds torch and timm take to import; a Python program gets
# the whole API (and mctool's architectures registered in timm, docs/models.md) with `import mctool`.
if not _launch_env.is_command():
    import random as _random

    _random_state = _random.getstate()  # (a dependency's import draws from it: rich's; the caller's, put back below)
    from .align import align
    from .checkpoint import LoadedModel, ModelMeta, load_model, read_checkpoint, save_model
    from .curve_eval import evaluate_curve, export_point
    from .curve_training import ConnectConfig, connect
    from .curves import Curve, load_curve
    from .data import Data, DatasetInfo, Split, load_data
    from .ensemble_eval import evaluate_models
    from .ensemble_eval import evaluate_models as evaluate
    from .ensembles import Ensemble, export_member, load_ensemble
    from .errors import (CheckpointError, ConfigError, DataError, Interrupted, MctoolError, MctoolWarning,
                         MetricsFileError, NonFiniteLossError, OutputError)
    from .evaluation import brier, ece, error, nll, predict_probs
    from .fge import FGEConfig, fge
    from .h5io import read_h5
    from .hessian import hessian
    from .info import file_info
    from .manual import read_docs
    from .merge import merge
    from .models import MCTOOL_ARCHS, build_model, register_in_timm
    from .plane import plane
    from .surface import surface
    from .plots import plot_files
    from .results import (SCHEMA_VERSION, AlignResult, Calibration, ConnectResult, CurveResult, CurveSummary,
                          DocsResult, Document, EvaluateResult, FGEResult, FileRef, HessianResult, InfoResult,
                          MemberMetrics, MergeResult, Metrics, PlaneResult, PlaneSummary, PlotResult, PointResult,
                          Result, SurfaceResult, TrainResult, json_schemas)
    from .console import progress
    from .schedules import lr_at, paper_factor
    from .training import TrainConfig, train

    register_in_timm()  # `import mctool` registers mctool's architectures in timm (docs/models.md)
    _random.setstate(_random_state)
    del _random, _random_state

__all__ = [
    "__version__",
    # commands: one function each, returning a typed result (mctool.results)
    "train", "connect", "evaluate_curve", "export_point", "export_member", "plane", "fge", "evaluate",
    "evaluate_models", "plot_files", "file_info", "merge", "align", "hessian", "surface", "read_docs",
    "TrainConfig", "ConnectConfig", "FGEConfig",
    "Result", "TrainResult", "ConnectResult", "CurveResult", "PointResult", "PlaneResult", "FGEResult",
    "EvaluateResult", "InfoResult", "PlotResult", "MergeResult", "AlignResult", "HessianResult", "SurfaceResult",
    "DocsResult", "Document", "FileRef", "Metrics", "MemberMetrics", "Calibration", "CurveSummary", "PlaneSummary",
    "SCHEMA_VERSION", "json_schemas",
    # files
    "load_model", "load_curve", "load_ensemble", "read_checkpoint", "save_model", "read_h5", "LoadedModel",
    "ModelMeta", "Curve", "Ensemble",
    # data, models, metrics, schedules
    "Data", "DatasetInfo", "Split", "load_data", "MCTOOL_ARCHS", "build_model", "brier", "ece", "error", "nll",
    "predict_probs", "lr_at", "paper_factor",
    # progress, warnings and errors
    "progress", "MctoolWarning", "MctoolError", "CheckpointError", "ConfigError", "DataError", "Interrupted",
    "MetricsFileError", "NonFiniteLossError", "OutputError",
]
