"""Where and how computation runs: device choice, mixed precision, progress display."""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .errors import ConfigError

PRECISIONS = ("fp32", "bf16")


def resolve_device(spec: str = "auto") -> torch.device:
    """'auto' picks CUDA when available; asking for CUDA without a GPU is a clear error."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got '{spec}'.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but PyTorch sees no CUDA GPU here; use --device cpu.")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got '{spec}'.")
    return device


def autocast(device: torch.device, precision: str, cache: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast for the forward pass, or nothing for fp32.

    ``cache=False`` for steps captured as CUDA graphs: autocast's cache of bf16 weight copies must not
    outlive a capture.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got '{precision}'.")
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, cache_enabled=cache)
    return contextlib.nullcontext()


def stderr_console() -> Console:
    return Console(file=sys.stderr)


def warn(message: str) -> None:
    """A warning on stderr ("Warning: ..."): the run goes on, but the user should know."""
    stderr_console().print(f"Warning: {message}", markup=False, highlight=False)


@contextlib.contextmanager
def progress_bar(quiet: bool = False) -> Iterator[Progress]:
    """Rich progress on stderr (hidden with --quiet); stdout stays free for --json."""
    p = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                 console=stderr_console(), disable=quiet, transient=False)
    with p:
        yield p
