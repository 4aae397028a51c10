"""Reading and writing safetensors checkpoints with mctool's metadata. mctool never unpickles a file.

Metadata is a str -> str map; structured values are JSON strings. The keys are documented in
``docs/file-formats.md``.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ._version import __version__
from .errors import CheckpointError
from .fileio import atomic_path, sha256_file
from .h5io import utc_now
from .models import build_model

#: Checkpoint kinds that hold one network's state dict (a train-state adds optimiser tensors).
MODEL_KINDS = ("model", "train-state")
#: Prefix of optimiser momentum tensors in a train-state checkpoint.
MOMENTUM_PREFIX = "optimizer/momentum/"
_MAX_HEADER = 100 * 1024 * 1024


@dataclass
class ModelMeta:
    """What is needed to rebuild a network and its data pipeline, plus provenance."""

    arch: str
    num_classes: int
    in_chans: int
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    dataset: str | None = None
    image_size: int | None = None
    normalization: dict[str, list[float]] | None = None
    kind: str = "model"
    config: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)
    version: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def to_metadata(self) -> dict[str, str]:
        md = {
            "format": "pt",
            "kind": self.kind,
            "mctool_version": __version__,
            "created": utc_now(),
            "arch": self.arch,
            "arch_kwargs": json.dumps(self.arch_kwargs, sort_keys=True),
            "num_classes": str(self.num_classes),
            "in_chans": str(self.in_chans),
            "config": json.dumps(self.config, sort_keys=True),
            "inputs": json.dumps(self.inputs, sort_keys=True),
        }
        if self.dataset is not None:
            md["dataset"] = self.dataset
        if self.image_size is not None:
            md["image_size"] = str(self.image_size)
        if self.normalization is not None:
            md["normalization"] = json.dumps(self.normalization)
        md.update(self.extra)
        return md

    @classmethod
    def from_metadata(cls, md: dict[str, str], path: str | os.PathLike) -> "ModelMeta":
        known = {"format", "kind", "mctool_version", "created", "arch", "arch_kwargs", "num_classes", "in_chans",
                 "config", "inputs", "dataset", "image_size", "normalization"}
        try:
            return cls(
                arch=md["arch"],
                num_classes=int(md["num_classes"]),
                in_chans=int(md["in_chans"]),
                arch_kwargs=json.loads(md.get("arch_kwargs", "{}")),
                dataset=md.get("dataset"),
                image_size=int(md["image_size"]) if "image_size" in md else None,
                normalization=json.loads(md["normalization"]) if "normalization" in md else None,
                kind=md.get("kind", "model"),
                config=json.loads(md.get("config", "{}")),
                inputs=json.loads(md.get("inputs", "{}")),
                version=md.get("mctool_version"),
                extra={k: v for k, v in md.items() if k not in known},
            )
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"'{path}' has malformed mctool metadata ({type(e).__name__}: {e}).") from None


def _check_safetensors_file(path: Path) -> None:
    """Explain what is wrong with a file before safetensors' own, terser, errors would."""
    if not path.exists():
        raise CheckpointError(f"checkpoint '{path}' does not exist.")
    if path.is_dir():
        raise CheckpointError(f"checkpoint '{path}' is a folder, not a safetensors file.")
    size = path.stat().st_size
    pickled = CheckpointError(
        f"'{path}' is a pickled PyTorch file (.pt/.pth); mctool never unpickles files because they can run code. "
        "If you trust it, convert it once with: python -c \"import torch, safetensors.torch as s; "
        "s.save_file(torch.load('IN.pt', weights_only=True), 'OUT.safetensors')\" "
        "and pass --arch and --num-classes when loading it.")
    with open(path, "rb") as f:
        head = f.read(8)
        if head[:4] == b"PK\x03\x04":  # torch.save's zip container
            raise pickled
        if len(head) < 8:
            raise CheckpointError(f"'{path}' is not a safetensors file (only {size} bytes).")
        (n,) = struct.unpack("<Q", head)
        header = None
        if n <= _MAX_HEADER and 8 + n <= size:
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError):
                header = None
    if header is None:
        # A raw pickle starts with 0x80 (its protocol marker); checked only now, because a safetensors
        # header length can start with that byte too.
        if head[:1] == b"\x80":
            raise pickled
        if n > _MAX_HEADER or 8 + n > size:
            raise CheckpointError(f"'{path}' is not a safetensors file, or it is truncated (header of {n} bytes in a "
                                  f"file of {size} bytes).")
        raise CheckpointError(f"'{path}' is not a safetensors file (its header is not JSON).")
    if not isinstance(header, dict):
        raise CheckpointError(f"'{path}' is not a safetensors file (its header is not a JSON object).")
    end = max((v["data_offsets"][1] for k, v in header.items()
               if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"'{path}' is truncated: its header promises {8 + n + end} bytes but the file has "
                              f"{size}. Re-create or re-copy it.")


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors (on CPU) and the metadata of a safetensors file, with clear errors for bad files."""
    path = Path(path)
    _check_safetensors_file(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"'{path}' is not a valid safetensors file: {e}") from None
    return tensors, metadata


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """Only the metadata of a safetensors file (no tensor data is read)."""
    path = Path(path)
    _check_safetensors_file(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"'{path}' is not a valid safetensors file: {e}") from None


def save_checkpoint(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write tensors and metadata atomically (temporary file in the same folder, then rename)."""
    # Copies to CPU break any storage sharing (tied weights), which safetensors refuses.
    cpu = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(cpu, str(tmp), metadata=metadata)


def save_model(path: str | os.PathLike, model: nn.Module, meta: ModelMeta,
               extra_tensors: dict[str, torch.Tensor] | None = None) -> None:
    """Save a network's state dict (parameters and buffers) with its metadata."""
    tensors = dict(model.state_dict())
    tensors.update(extra_tensors or {})
    save_checkpoint(path, tensors, meta.to_metadata())


@dataclass
class LoadedModel:
    model: nn.Module
    meta: ModelMeta
    path: Path
    sha256: str
    extra_tensors: dict[str, torch.Tensor]


def _describe_mismatch(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], limit: int = 5) -> str:
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shapes = [f"{k}: file {tuple(got[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in got and tuple(got[k].shape) != tuple(v.shape)]
    parts = []
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            more = f" (and {len(items) - limit} more)" if len(items) > limit else ""
            parts.append(f"{len(items)} {title}: {', '.join(items[:limit])}{more}")
    return "; ".join(parts)


def load_model(path: str | os.PathLike, *, arch: str | None = None, num_classes: int | None = None,
               in_chans: int | None = None, arch_kwargs: dict[str, Any] | None = None) -> LoadedModel:
    """Rebuild a network from a checkpoint, on CPU, in eval mode.

    mctool checkpoints carry their architecture; a plain safetensors state dict (e.g. from timm) needs
    ``arch`` and ``num_classes`` (and ``in_chans`` when not 3). Explicit arguments override metadata.
    """
    path = Path(path)
    tensors, md = read_checkpoint(path)
    if "arch" in md:
        meta = ModelMeta.from_metadata(md, path)
        if meta.kind not in MODEL_KINDS:
            raise CheckpointError(f"'{path}' holds a '{meta.kind}', not a single network (kind 'model').")
    else:
        if arch is None or num_classes is None:
            raise CheckpointError(f"'{path}' has no mctool metadata; pass --arch and --num-classes "
                                  "(and --in-chans if it is not 3) to load it as a plain state dict.")
        meta = ModelMeta(arch=arch, num_classes=num_classes, in_chans=in_chans or 3)
    if arch is not None:
        meta.arch = arch
    if num_classes is not None:
        meta.num_classes = num_classes
    if in_chans is not None:
        meta.in_chans = in_chans
    if arch_kwargs:
        meta.arch_kwargs = {**meta.arch_kwargs, **arch_kwargs}
    model = build_model(meta.arch, meta.num_classes, meta.in_chans, meta.arch_kwargs)
    extra = {k: v for k, v in tensors.items() if k.startswith(("optimizer/", "snapshots/"))}
    state = {k: v for k, v in tensors.items() if k not in extra}
    expected = model.state_dict()
    problem = _describe_mismatch(expected, state)
    if problem:
        raise CheckpointError(f"'{path}' does not fit architecture '{meta.arch}' "
                              f"(num_classes={meta.num_classes}, in_chans={meta.in_chans}): {problem}.")
    model.load_state_dict(state)
    model.eval()
    return LoadedModel(model=model, meta=meta, path=path, sha256=sha256_file(path), extra_tensors=extra)
