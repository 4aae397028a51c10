"""The frame of mctool's public functions (``library_call``): what every call checks, and what it leaves as
the caller had it. Light to import: ``mctool docs`` and ``mctool info`` run without torch."""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import sys
import threading
from typing import Any, Callable, Iterator, TypeVar

from .errors import ConfigError, Interrupted

F = TypeVar("F", bound=Callable[..., Any])


@contextlib.contextmanager
def _torch_kept() -> Iterator[None]:
    """torch's default dtype float32 for the block, and the caller's default dtype and random state after it;
    nothing where torch is not imported (the caller has no torch state: ``read_docs``, ``file_info``)."""
    if "torch" not in sys.modules:
        yield
        return
    import torch

    from .runtime import callers_rng_kept

    dtype = torch.get_default_dtype()
    with callers_rng_kept():
        if dtype != torch.float32:
            torch.set_default_dtype(torch.float32)
        try:
            yield
        finally:
            if dtype != torch.float32:
                torch.set_default_dtype(dtype)


_CALLS = threading.local()  # how deep this thread is in library_call functions (0: the caller's own code)


def _argument_checks(fn: Callable[..., Any]) -> dict[str, tuple[str, bool]]:
    """The parameters of ``fn`` whose type ``library_call`` checks, by their annotations: name -> (kind, None
    allowed), kind ``bool`` (True or False) or ``path`` (a file name: ``str | Path``). Numbers and choices are
    checked by the functions themselves, with the options' own messages."""
    import pathlib
    import types
    import typing

    checks: dict[str, tuple[str, bool]] = {}
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001  (an annotation that cannot be resolved at run time: nothing checked)
        return checks
    for name, hint in hints.items():
        args = set(typing.get_args(hint)) if isinstance(hint, types.UnionType) else {hint}
        optional = type(None) in args
        args.discard(type(None))
        if args == {bool}:
            checks[name] = ("bool", optional)
        elif args and args <= {str, pathlib.Path, os.PathLike} and args != {str}:
            checks[name] = ("path", optional)
    return checks


def _check_arguments(fn: Callable[..., Any], checks: dict[str, tuple[str, bool]], bound: dict[str, Any]) -> None:
    what = {"bool": "True or False", "path": "a file name (a str or a pathlib.Path)"}
    for name, value in bound.items():
        if name not in checks or (value is None and checks[name][1]):
            continue
        kind = checks[name][0]
        if kind == "bool":  # (NumPy's bool from a sweep too)
            numpy_bool = type(value).__module__ == "numpy" and type(value).__name__ in ("bool_", "bool")
            ok = isinstance(value, bool) or numpy_bool
        else:
            ok = isinstance(value, (str, os.PathLike))
        if not ok:
            raise ConfigError(f"{fn.__name__}(): {name} must be {what[kind]}{' or None' if checks[name][1] else ''}, "
                              f"got {value!r}"[:300] + ".")


def library_call(fn: F) -> F:
    """The frame of every public function that builds networks or reads and writes mctool's files, at the
    outermost such call of a thread (the functions call each other):

    - its arguments annotated ``bool`` or as file names are checked (``resume="no"`` is not True;
      ``output=5`` is a ``ConfigError`` that names it, not a ``TypeError`` from deep inside);
    - torch's default dtype is float32 during the call (mctool's networks and data are float32: a caller who
      computes in float64, ``torch.set_default_dtype(torch.float64)``, got float64 networks and a dtype
      mismatch) and the caller's again afterwards;
    - the caller's torch random state is kept: building a network to load weights into draws its throw-away
      initialisation from the global generator;
    - a Ctrl-C that the function does not report itself (one with nothing saved to say) becomes
      ``Interrupted``, as the docs promise for every long call.
    """
    checks: list[dict[str, tuple[str, bool]]] = []  # (read at the first call: annotations need every module)
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        depth = getattr(_CALLS, "depth", 0)
        if depth:
            return fn(*args, **kwargs)
        if not checks:
            checks.append(_argument_checks(fn))
        _check_arguments(fn, checks[0], signature.bind(*args, **kwargs).arguments)  # (a wrong call: TypeError)
        _CALLS.depth = 1
        try:
            with _torch_kept():
                return fn(*args, **kwargs)
        except KeyboardInterrupt as e:
            if isinstance(e, Interrupted):
                raise
            d = sys.modules.get("mctool.distributed")  # (imported with torch: never by read_docs alone)
            by = d.stop_signal() if d is not None else None
            raise Interrupted(f"stopped ({by})." if by else "interrupted (Ctrl-C).") from None
        finally:
            _CALLS.depth = 0

    return wrapper  # type: ignore[return-value]
