"""``mctool info``: what is inside a checkpoint or a metrics file."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import read_checkpoint
from .errors import MctoolError
from .fileio import sha256_file
from .h5io import read_h5

_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def _json_or_str(v: str) -> Any:
    try:
        return json.loads(v) if v[:1] in "{[" else v
    except json.JSONDecodeError:
        return v


def file_info(path: str | os.PathLike, max_tensors: int = 20) -> dict[str, Any]:
    """A JSON-ready description of a safetensors checkpoint or an HDF5 metrics file."""
    path = Path(path)
    if not path.is_file():
        raise MctoolError(f"'{path}' does not exist or is not a file.")
    with open(path, "rb") as f:
        magic = f.read(8)
    base = {"path": str(path), "bytes": path.stat().st_size, "sha256": sha256_file(path)}
    if magic == _HDF5_MAGIC:
        data, attrs = read_h5(path)
        datasets = {}
        for name, arr in sorted(data.items()):
            arr = np.asarray(arr)
            entry: dict[str, Any] = {"shape": list(arr.shape), "dtype": str(arr.dtype)}
            if arr.dtype.kind == "f" and arr.size:
                finite = arr[np.isfinite(arr)]
                entry["nan"] = int(arr.size - finite.size)
                if finite.size:
                    entry.update(min=float(finite.min()), max=float(finite.max()),
                                 last=float(arr.reshape(-1)[-1]) if np.isfinite(arr.reshape(-1)[-1]) else None)
            datasets[name] = entry
        return {**base, "type": "hdf5", "attributes": {k: _json_or_str(v) if isinstance(v, str) else v
                                                        for k, v in attrs.items()}, "datasets": datasets}
    tensors, md = read_checkpoint(path)
    dtypes = Counter(str(t.dtype).replace("torch.", "") for t in tensors.values())
    listing = [{"name": k, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
               for k, t in list(tensors.items())[:max_tensors]]
    return {**base, "type": "safetensors",
            "metadata": {k: _json_or_str(v) for k, v in md.items() if k != "history"},
            "tensors": {"count": len(tensors), "elements": int(sum(t.numel() for t in tensors.values())),
                        "dtypes": dict(dtypes), "first": listing}}
