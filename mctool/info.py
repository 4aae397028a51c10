"""``mctool info``: what is inside a checkpoint or a metrics file."""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import read_header
from .errors import MctoolError
from .fileio import HDF5_MAGIC, did_you_mean
from .results import FileRef, InfoResult
from .h5io import read_h5
from .options import check_count
from .calls import library_call



#: Metadata nested deeper than this is shown as its text (the JSON output would nest as deep).
MAX_JSON_DEPTH = 32


def _depth(value: Any) -> int:
    """How deeply lists and objects nest in a parsed JSON value (iterative: no recursion limit)."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        v, d = todo.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, d)
            todo.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


def _json_or_str(v: str) -> Any:
    """A metadata value as JSON when it is a JSON object or array of sane depth, else as its text."""
    try:
        value = json.loads(v) if v[:1] in "{[" else v
    except (json.JSONDecodeError, RecursionError):
        return v
    return v if _depth(value) > MAX_JSON_DEPTH else value


@library_call
def file_info(path: str | os.PathLike, max_tensors: int = 20) -> InfoResult:
    """What a safetensors checkpoint or an HDF5 metrics file holds (``to_dict()`` gives the JSON form)."""
    t0 = time.time()
    check_count("max_tensors", max_tensors, 0)
    path = Path(path)
    try:
        os.lstat(path)  # (a name too long for the file system raises its own OSError)
    except (FileNotFoundError, NotADirectoryError):
        raise MctoolError(f"'{path}' does not exist.{did_you_mean(path)}") from None
    if path.is_symlink() and not path.exists():
        raise MctoolError(f"'{path}' is a symbolic link to '{os.readlink(path)}', which does not exist.")
    if not path.is_file():
        raise MctoolError(f"'{path}' is not a file (a folder, pipe or device); info reads safetensors checkpoints and "
                          "HDF5 metrics files.")
    with open(path, "rb") as f:
        magic = f.read(8)
    if not magic:
        raise MctoolError(f"'{path}' is empty (0 bytes); info reads safetensors checkpoints and HDF5 metrics files.")
    base = dict(command="info", inputs=[FileRef.of(path)], outputs={}, split=None,
                metrics={"train": None, "eval": None}, bytes=path.stat().st_size)
    if magic == HDF5_MAGIC:
        data, attrs = read_h5(path)
        datasets = {}
        for name, arr in sorted(data.items()):
            arr = np.asarray(arr)
            entry: dict[str, Any] = {"shape": list(arr.shape), "dtype": str(arr.dtype), "nan": None, "inf": None,
                                     "min": None, "max": None, "last": None}  # the rest for non-empty float arrays
            if arr.dtype.kind == "f" and arr.size:
                finite = arr[np.isfinite(arr)]
                entry["nan"] = int(np.isnan(arr).sum())  # not computed yet
                entry["inf"] = int(np.isinf(arr).sum())  # values (an overflowed loss), but not in min and max
                if finite.size:
                    entry.update(min=float(finite.min()), max=float(finite.max()),
                                 last=float(arr.reshape(-1)[-1]) if np.isfinite(arr.reshape(-1)[-1]) else None)
            datasets[name] = entry
        return InfoResult(**base, type="hdf5", metadata={k: _json_or_str(v) if isinstance(v, str) else v
                                                          for k, v in attrs.items()},
                          datasets=datasets, seconds=time.time() - t0)
    header, md = read_header(path)  # names, shapes and dtypes only: no tensor data is read
    tensors = {k: header[k] for k in sorted(header)}
    dtypes = Counter(t.torch_dtype for t in tensors.values())
    listing = [{"name": k, "shape": list(t.shape), "dtype": t.torch_dtype}
               for k, t in list(tensors.items())[:max_tensors]]
    return InfoResult(**base, type="safetensors",
                      metadata={k: _json_or_str(v) for k, v in md.items() if k != "history"},
                      tensors={"count": len(tensors), "elements": sum(math.prod(t.shape) for t in tensors.values()),
                               "dtypes": dict(dtypes), "first": listing}, seconds=time.time() - t0)
