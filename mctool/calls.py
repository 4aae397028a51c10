"""The frame of mctool's public functions (``library_call``): what every call checks, and what it leaves as
the caller had it. Light to import: ``mctool docs`` and ``mctool info`` run without torch."""

from __future__ import annotations

import collections.abc
import contextlib
import functools
import inspect
import os
import sys
import threading
from typing import Any, Callable, Iterator, TypeVar

from .errors import ConfigError, Interrupted

F = TypeVar("F", bound=Callable[..., Any])


_DTYPE_LOCK = threading.Lock()
_dtype_users: list[Any] = [0, None]  # calls running in any thread, and the caller's default dtype they keep


def _new_lock_after_fork() -> None:  # a child forked while another thread held it would wait for it forever
    global _DTYPE_LOCK
    _DTYPE_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):  # (not on Windows, which never forks)
    os.register_at_fork(after_in_child=_new_lock_after_fork)


@contextlib.contextmanager
def _float32_default() -> Iterator[None]:
    """torch's default dtype float32 while any mctool call runs in the process (it is the process's, not a
    thread's), and the caller's again once the last one returns; nothing where torch is not imported (the caller
    has no torch state: ``read_docs``, ``file_info``)."""
    if "torch" not in sys.modules:
        yield
        return
    import torch

    with _DTYPE_LOCK:
        if _dtype_users[0] == 0:
            _dtype_users[1] = torch.get_default_dtype()
            if _dtype_users[1] != torch.float32:
                torch.set_default_dtype(torch.float32)
        _dtype_users[0] += 1
    try:
        yield
    finally:
        with _DTYPE_LOCK:
            _dtype_users[0] -= 1
            if _dtype_users[0] == 0 and _dtype_users[1] != torch.float32:
                torch.set_default_dtype(_dtype_users[1])


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
    paths = {str, pathlib.Path, os.PathLike}

    def members(t: Any) -> set[Any]:
        return set(typing.get_args(t)) if isinstance(t, types.UnionType) else {t}

    def path_union(types_: set[Any]) -> bool:
        return bool(types_) and types_ <= paths and types_ != {str}

    for name, hint in hints.items():
        args = members(hint)
        optional = type(None) in args
        args.discard(type(None))
        sequences = {a for a in args if typing.get_origin(a) is collections.abc.Sequence}
        if args == {bool}:
            checks[name] = ("bool", optional)
        elif path_union(args):
            checks[name] = ("path", optional)
        elif sequences and all(path_union(members(typing.get_args(a)[0])) for a in sequences) \
                and args - sequences <= paths:
            checks[name] = ("paths", optional)  # files: a list (or tuple) of names, or one name
    return checks


def _check_arguments(fn: Callable[..., Any], checks: dict[str, tuple[str, bool]], bound: dict[str, Any]) -> None:
    what = {"bool": "True or False", "path": "a file name (a str or a pathlib.Path)",
            "paths": "a list of file names (str or pathlib.Path)"}
    for name, value in bound.items():
        if name not in checks or (value is None and checks[name][1]):
            continue
        kind, got = checks[name][0], f"got {value!r}"
        if kind == "bool":  # (NumPy's bool from a sweep too)
            numpy_bool = type(value).__module__ == "numpy" and type(value).__name__ in ("bool_", "bool")
            ok = isinstance(value, bool) or numpy_bool
        elif kind == "path" or isinstance(value, (str, os.PathLike)):
            ok = isinstance(value, (str, os.PathLike))
        else:  # a list, tuple or other sequence of names (other iterables are the function's to take or refuse)
            names = value if isinstance(value, collections.abc.Sequence) and not isinstance(value, bytes) else []
            bad = [v for v in names if not isinstance(v, (str, os.PathLike))]
            ok, got = not bad, f"but it holds {bad[0]!r}" if bad else got
        if not ok:
            raise ConfigError(f"{fn.__name__}(): {name} must be {what[kind]}{' or None' if checks[name][1] else ''}, "
                              f"{got}"[:300] + ".")


def library_call(fn: F) -> F:
    """The frame of every public function that builds networks or reads and writes mctool's files, at the
    outermost such call of a thread (the functions call each other):

    - its arguments annotated ``bool`` or as file names are checked (``resume="no"`` is not True;
      ``output=5`` is a ``ConfigError`` that names it, not a ``TypeError`` from deep inside);
    - torch's default dtype is float32 during the call (mctool's networks and data are float32: a caller who
      computes in float64, ``torch.set_default_dtype(torch.float64)``, got float64 networks and a dtype
      mismatch) and the caller's again afterwards (``_float32_default``). (The caller's torch random state is
      not put back here, as the training functions put it back: that would rewind the draws other threads of
      the caller made during the call. A function that builds a network draws its throw-away initialisation.)
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
            with _float32_default():
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
