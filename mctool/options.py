"""Checks of numeric option values, made by the library functions so that Python callers get the CLI's errors.

Every count is a whole number with a lower bound; every real number is finite and in its range. NaN and
infinity pass most comparisons silently (``nan < 1`` is False), so they are refused explicitly.
"""

from __future__ import annotations

import collections.abc
import glob
import json
import math
import numbers
import os
import re
from typing import Any

import numpy as np

from .errors import ConfigError


# Points of a curve or an axis of a grid: far beyond any use (a 1001 x 1001 plane is a million evaluations), and
# small enough that the arrays and files they size never exhaust memory (which would end in a traceback).
MAX_POINTS = 100_000
MAX_GRID_POINTS = 1001
# Upper bounds of the other numbers, far beyond any use; past them float32 arithmetic (an SGD step's lr * wd * w),
# ARPACK's 32-bit counters or the length of a run end in overflow or a run that never ends.
MAX_RATE = 1e6  # --lr, --lr-max, --lr-min, --wd
MAX_EPOCHS = 100_000  # --epochs, --cycle-epochs (a training state holds a row per epoch: 100 MB at most)
MAX_ITERATIONS = 1_000_000_000  # --cycle-iters, --max-restarts
MAX_SAMPLES = 1_000_000  # --trace-samples
MAX_SPAN = 1e6  # surface --range (in units of the directions' norms)


def check_count(option: str, value: Any, minimum: int = 1, maximum: int | None = None) -> None:
    """A whole-number option such as ``--epochs``: at least ``minimum`` (and at most ``maximum``). ``None``
    (not given) passes."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{option} must be a whole number >= {minimum}, got {value!r}.")
    if value < minimum:
        raise ConfigError(f"{option} must be >= {minimum}, got {value}.")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{option} must be at most {count_text(maximum)}, got {count_text(value)}.")


def check_seed(value: Any, bits: int = 32, option: str = "--seed") -> int:
    """A seed: a whole number in [0, 2^bits), returned as a Python ``int`` (``torch.Generator.manual_seed``
    takes no ``numpy.int64``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value < 2**bits:
        raise ConfigError(f"{option} must be a whole number in [0, 2^{bits}), got {value!r}.")
    return int(value)


def check_real(option: str, value: Any, low: float | None = None, high: float | None = None, *,
               low_open: bool = False, high_open: bool = False) -> None:
    """A real-valued option: finite and within [low, high] (an open end with ``low_open`` / ``high_open``).
    ``None`` (not given) passes."""
    if value is None:
        return
    if low is not None and high is not None:
        wanted = f"in {'(' if low_open else '['}{_number(low)}, {_number(high)}{')' if high_open else ']'}"
    elif low is not None:
        wanted = f"{'>' if low_open else '>='} {_number(low)}"
    elif high is not None:
        wanted = f"{'<' if high_open else '<='} {_number(high)}"
    else:
        wanted = "finite"
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ConfigError(f"{option} must be a finite number{'' if wanted == 'finite' else ' ' + wanted}, "
                          f"got {value!r}.")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        shown = _number(value)
        if float(shown) != value:  # (1.0000001, not "1")
            shown = repr(float(value))
        raise ConfigError(f"{option} must be {wanted}, got {shown}.")


def count_text(n: int) -> str:
    """A whole number as the help texts write it: ``1,000,000``; a power of ten beyond that as ``1e9``."""
    if n >= 10**7 and str(n).rstrip("0") == "1":
        return f"1e{len(str(n)) - 1}"
    return f"{n:,}"


def _number(x: float) -> str:
    """A number as the help texts write it: ``1e6``, ``1e5``, ``1e-8``, ``0.5`` (``:g`` writes ``1e+06`` and
    ``100000``)."""
    if x >= 1e5 and f"{x:g}".rstrip("0") == "1":
        return f"1e{len(f'{x:g}') - 1}"
    text = f"{x:g}"
    if "e" in text:
        mantissa, exponent = text.split("e")
        text = f"{mantissa}e{int(exponent)}"
    return text


def file_list(value: Any, what: str) -> list:
    """A list of files from a Python caller: a list or tuple as it is, one ``str`` or path as a list of one
    (a string is not split into characters, each taken for a file name); anything else is a ConfigError."""
    if isinstance(value, (str, os.PathLike)):
        return [value]
    # (any sequence, as the annotations say, Sequence[str | Path]: a list, a tuple, a UserList, ...; bytes is not
    # one of names)
    if not isinstance(value, collections.abc.Sequence) or isinstance(value, (bytes, bytearray)):
        raise ConfigError(f"{what} must be a list of file names, got {type(value).__name__}.")
    return list(value)


def expand_patterns(values: list, option: str) -> list[str]:
    """Each value that is not a file but a glob pattern (``*``, ``?``, ``[``) replaced by its matches in natural
    order: runs of digits compare as numbers, so ``--save-every``'s ``-epoch500`` comes before ``-epoch1000`` (its
    numbers are padded to three digits only) and the matches are in training order. A pattern that matches
    nothing is a ConfigError naming ``option``."""
    def natural(name: str) -> list:
        return [(int(part), part) if i % 2 else (0, part) for i, part in enumerate(re.split(r"(\d+)", name))]

    out = []
    for v in map(str, values):
        if os.path.exists(v) or not glob.has_magic(v):
            out.append(v)
            continue
        found = sorted(glob.glob(v), key=natural)
        if not found:
            raise ConfigError(f"{option} '{v}' matches no file.")
        out.extend(found)
    return out


def plain(value: Any) -> Any:
    """``value`` with NumPy scalars and arrays as Python numbers and lists, and paths as strings, through dicts,
    lists and tuples: what a Python caller may pass (``np.int64`` from a sweep, ``pathlib.Path``) as the JSON
    that files record and ``--json`` prints."""
    if isinstance(value, dict):
        return {plain(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value) if type(value) in (list, tuple) else [plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return plain(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


#: Recorded settings whose option is not ``--`` plus the key with ``-`` for ``_`` (None: not an option, a
#: property of the inputs).
_SETTING_OPTIONS = {"bn_batch_size": "--batch-size (of the BN passes)", "margins": "--margin (or --margin-*)",
                    "points": None, "points_kind": None, "derived": None, "pretrained_source": None}


def setting_name(key: str) -> str:
    """A recorded setting (a key of a file's ``config``) as the differences of a ``--resume`` name it: its
    option (``num_points`` -> ``--num-points``), or the key itself for what is not an option."""
    if key in _SETTING_OPTIONS:
        return _SETTING_OPTIONS[key] or key
    return "--" + str(key).replace("_", "-")


def show_setting(value: Any) -> str:
    """A recorded setting as the differences of a ``--resume`` are listed: text as it is, ``none`` for an
    option left out, anything else as JSON (``{"hidden": 16}``, ``[0.2, 0.2]``)."""
    if value is None:
        return "none"
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return str(value)


def env_seconds(name: str, default: float, *, zero: bool = False) -> float:
    """Seconds from the environment variable ``name``: ``default`` when it is unset or empty, else a number
    > 0 (>= 0 with ``zero``) below 1e7 (115 days); anything else is a ConfigError naming the variable."""
    raw = os.environ.get(name, "")
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not (0 <= value if zero else 0 < value) or not value < 1e7:
        raise ConfigError(f"{name}={raw!r} must be a number of seconds {'>= 0' if zero else '> 0'} (below 1e7).")
    return value
