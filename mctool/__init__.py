"""mctool: loss surfaces, mode connectivity and fast ensembling of neural networks.

The public Python API; the ``mctool`` command is a thin layer over these functions.
"""

from ._version import __version__
from .checkpoint import LoadedModel, ModelMeta, load_model, read_checkpoint, save_model
from .data import Data, DatasetInfo, load_data
from .errors import (CheckpointError, ConfigError, DataError, Interrupted, MctoolError, MctoolWarning,
                     MetricsFileError, NonFiniteLossError, OutputError)
from .ensembles import evaluate_models, load_ensemble
from .evaluation import brier, ece, error, nll, predict_probs
from .h5io import read_h5
from .info import file_info
from .models import MCTOOL_ARCHS, build_model
from .results import SCHEMA_VERSION, FileRef, Metrics, Result
from .runtime import progress
from .schedules import lr_at, paper_factor
from .training import TrainConfig, train

__all__ = [
    "__version__", "LoadedModel", "ModelMeta", "load_model", "read_checkpoint", "save_model", "Data", "DatasetInfo",
    "load_data", "CheckpointError", "ConfigError", "DataError", "Interrupted", "MctoolError", "MetricsFileError",
    "MctoolWarning", "NonFiniteLossError", "OutputError", "progress", "brier", "ece", "error", "evaluate_models",
    "load_ensemble", "nll", "predict_probs", "read_h5",
    "file_info", "MCTOOL_ARCHS", "build_model", "lr_at", "paper_factor", "TrainConfig", "train",
    "SCHEMA_VERSION", "FileRef", "Metrics", "Result",
]
