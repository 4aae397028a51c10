"""Errors mctool raises for user mistakes; the CLI prints them as ``Error: ...`` with exit code 1 (an
interruption with exit code 130)."""


class MctoolError(Exception):
    """A problem the user can fix: the message says what is wrong and how to fix it."""


class ConfigError(MctoolError):
    """An option value that cannot work (bad learning rate, bad arch kwargs, ...)."""


class DataError(MctoolError):
    """A data set that is missing, malformed or does not fit the model."""


class CheckpointError(MctoolError):
    """A checkpoint file that cannot be read, is not safetensors, or does not fit its architecture."""


class MetricsFileError(MctoolError):
    """An HDF5 metrics file that cannot be read or does not have the expected layout."""


class OutputError(MctoolError):
    """An output that already exists (without --force) or cannot be written."""


class NonFiniteLossError(MctoolError):
    """Training produced a NaN or infinite loss."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped a run (SIGTERM and SIGHUP too inside ``distributed.launched()``, as the command runs); the
    message says what was saved and how to continue (``resume=True``, ``--resume`` on the command line). A
    ``KeyboardInterrupt``, as Python's own: a loop over runs with ``except Exception`` does not swallow it and
    go on to the next run."""


class MctoolWarning(UserWarning):
    """Something the user should know while the run goes on (an option ignored on this machine, a fallback).

    Silence it with ``warnings.filterwarnings("ignore", category=mctool.MctoolWarning)``; the CLI prints
    it as "Warning: ..." on stderr.
    """
