"""Where and how computation runs: device choice, mixed precision, deterministic kernels, compilation, and the
frame of the training commands."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import threading
from typing import Any, Callable, Iterator, TypeVar

import torch

from . import distributed
from .choices import PRECISIONS
from .console import warn
from .errors import ConfigError
from .options import plain


def resolve_device(spec: str = "auto") -> torch.device:
    """'auto' picks CUDA when available; asking for CUDA without a GPU is a clear error.

    In a distributed run (docs/distributed.md) 'auto' and 'cuda' mean each rank's own GPU, cuda:LOCAL_RANK.
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    if not isinstance(spec, str):
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {spec!r}.")
    d = distributed.current()
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if d is not None and spec == "cuda":
        spec = f"cuda:{d.local_rank}"
    elif d is not None and spec.startswith("cuda:"):
        raise ConfigError(f"--device {spec} names one GPU, but {d.world} ranks run; give --device cuda (or auto) and "
                          "each rank uses its own GPU, cuda:LOCAL_RANK.")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got '{spec}'.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {spec} was asked for, but PyTorch sees no CUDA GPU here; use --device cpu.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise ConfigError(f"--device {spec}: this machine has {n} CUDA GPU(s), cuda:0 to cuda:{n - 1}; give one of "
                          "those, or cuda.")
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


@contextlib.contextmanager
def deterministic(enabled: bool) -> Iterator[None]:
    """Deterministic kernels while the block runs (``--deterministic``), then the previous settings again.

    CPU runs are bitwise reproducible anyway. On CUDA, cuDNN and cuBLAS pick fast kernels that add in a
    varying order (weight gradients, for example), so the same seed gives slightly different numbers;
    this asks for deterministic ones instead (cuDNN's deterministic algorithms, no autotuning, and a fixed
    cuBLAS workspace), usually at some cost in speed. An operation that has no deterministic CUDA
    implementation still runs, with PyTorch's warning naming it.
    """
    if not enabled:
        yield
        return
    # cuBLAS reads this when it sets up its workspace: it must be in place before the first matmul (and is the
    # caller's again afterwards).
    workspace = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]
        if workspace is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


class _FullFloat32:
    """What ``full_float32`` shares between threads: how deep each thread is inside it, and the settings as they
    were when the first block began (restored when the last ends: two threads each restoring what it found left
    TF32 off when their blocks overlapped)."""

    lock = threading.Lock()
    inside: dict[int, int] = {}  # thread ident -> blocks it is in
    saved: list[tuple[Any, str, Any]] = []

    @classmethod
    def restore(cls) -> None:
        for owner, name, value in cls.saved:
            setattr(owner, name, value)
        cls.saved = []

    @classmethod
    def after_fork(cls) -> None:
        """In a forked child only the forking thread goes on: the other threads' blocks will never end."""
        cls.lock = threading.Lock()
        me = threading.get_ident()
        cls.inside = {me: cls.inside[me]} if me in cls.inside else {}
        if not cls.inside and cls.saved:
            cls.restore()


@contextlib.contextmanager
def full_float32() -> Iterator[None]:
    """Full float32 convolutions and matrix products on CUDA (TF32 off) inside the block; the settings as they
    were after it (after the last block to end, where threads' blocks overlap: the settings are per process).
    Recent PyTorch has per-backend ``fp32_precision`` settings: reading the older ``allow_tf32`` flags raises
    there once a user has set the newer ones (and setting them leaves a ``'medium'`` matmul precision in a state
    that ``torch.get_float32_matmul_precision()`` refuses to read), so those are used where they exist."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    if hasattr(getattr(cudnn, "conv", None), "fp32_precision"):
        settings = [(cudnn.conv, "fp32_precision", "ieee"), (matmul, "fp32_precision", "ieee")]
    else:
        settings = [(cudnn, "allow_tf32", False), (matmul, "allow_tf32", False)]
    state, me = _FullFloat32, threading.get_ident()
    with state.lock:
        if not state.inside:
            state.saved = [(owner, name, getattr(owner, name)) for owner, name, _ in settings]
            try:
                for owner, name, value in settings:
                    setattr(owner, name, value)
            except BaseException:
                state.restore()
                raise
        state.inside[me] = state.inside.get(me, 0) + 1
    try:
        yield
    finally:
        with state.lock:
            depth = state.inside.pop(me) - 1  # (one step: an interruption here leaves no count of 0 behind)
            if depth:
                state.inside[me] = depth
            if not state.inside:
                state.restore()


F = TypeVar("F", bound=Callable[..., Any])


# train, connect and fge seed torch's global random number generator (a network's initialisation, dropout): one
# of them at a time in a process, or two threads' runs would draw from each other's seeds.
_TRAINING = threading.RLock()


def _new_locks_after_fork() -> None:  # a child forked while another thread held one would wait for it forever
    global _TRAINING
    _TRAINING = threading.RLock()
    _FullFloat32.after_fork()


if hasattr(os, "register_at_fork"):  # (not on Windows, which never forks)
    os.register_at_fork(after_in_child=_new_locks_after_fork)


@contextlib.contextmanager
def callers_rng_kept() -> Iterator[None]:
    """The caller's torch random state (CPU, and the current GPU's where CUDA is in use) as it was after the
    block: a library call that seeds torch for its own reproducibility does not reseed the caller's draws."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        yield


def training_command(config_type: type) -> Callable[[F], F]:
    """The frame of ``train``, ``connect`` and ``fge``, ``fn(cfg, ...)``: ``cfg`` must be a ``config_type``
    (a copy with NumPy numbers and paths made plain is passed on, so the caller's is never changed), the calls
    run one at a time in a process with the caller's torch random state kept, and inside
    ``deterministic(cfg.deterministic)`` from their first CUDA call to their last."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(cfg: Any, *args: Any, **kwargs: Any) -> Any:
            if not isinstance(cfg, config_type):
                raise ConfigError(f"{fn.__name__}() takes a mctool.{config_type.__name__} as its first argument, "
                                  f"got {type(cfg).__name__}.")
            cfg = dataclasses.replace(cfg, **{f.name: plain(getattr(cfg, f.name))
                                              for f in dataclasses.fields(cfg) if f.init})
            with _TRAINING, callers_rng_kept(), deterministic(cfg.deterministic):
                return fn(cfg, *args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return wrap


def maybe_compile(fn: F, enabled: bool, what: str, *, mode: str | None = None, dynamic: bool | None = False) -> F:
    """``fn`` compiled with ``torch.compile`` (its ``mode`` and ``dynamic``) when ``enabled`` (``--compile``), else
    ``fn`` itself.

    Compilation happens at the first call. If it fails (no Triton for the GPU, no C++ compiler for the
    CPU, an unsupported operation), a warning says so and ``fn`` runs uncompiled from then on; ``fn``
    must therefore not have changed anything before the compiled call fails, which holds for pure
    tensor code.
    """
    if not enabled:
        return fn
    compiled = torch.compile(fn, dynamic=dynamic, mode=mode)
    current = [compiled]
    # inductor's C++ build says "No CUDA runtime is found" on every CPU machine: quiet during the compiled calls
    # (when it compiles), the caller's logging as it was between them
    quiet = logging.getLogger("torch.utils.cpp_extension") if not torch.cuda.is_available() else None

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        if current[0] is fn:
            return fn(*args, **kwargs)
        level = quiet.level if quiet is not None else None
        try:
            if quiet is not None:
                quiet.setLevel(logging.ERROR)
            return current[0](*args, **kwargs)
        except (torch.cuda.OutOfMemoryError, MemoryError):  # would fail uncompiled too: not a compiler's failure
            raise
        except Exception as e:  # torch._dynamo and inductor raise many kinds; all mean "run it uncompiled"
            current[0] = fn
            warn(f"--compile: could not compile {what} ({type(e).__name__}: {str(e).strip().splitlines()[0][:200]}); "
                 "it runs uncompiled.")
            return fn(*args, **kwargs)
        finally:
            if quiet is not None and level is not None:
                quiet.setLevel(level)

    return call  # type: ignore[return-value]
