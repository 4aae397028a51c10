"""Reading and writing safetensors checkpoints with mctool's metadata. mctool never unpickles a file.

Metadata is a str -> str map; structured values are JSON strings. The keys are documented in
``docs/file-formats.md``.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ._version import __version__
from .errors import CheckpointError, ConfigError
from .fileio import (HDF5_MAGIC, atomic_path, check_output, did_you_mean, private_folder, same_inputs, sha256_file,
                     writes_files)
from .h5io import command_line, utc_now
from .data import AUGMENTS
from .models import MAX_CLASSES, MAX_IN_CHANS, build_model, check_arch_kwargs, model_shapes
from .options import plain
from .calls import library_call

#: Checkpoint kinds that hold one network's state dict (a train-state adds optimiser tensors).
MODEL_KINDS = ("model", "train-state")
#: Prefix of optimiser momentum tensors in a train-state checkpoint.
MOMENTUM_PREFIX = "optimizer/momentum/"
#: Tensors of a checkpoint or training state that are not the network's state dict: the optimizer's momentum,
#: and FGE's and Snapshot Ensembles' collected snapshots.
EXTRA_PREFIXES = ("optimizer/", "snapshots/")


def network_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The network's state dict among a checkpoint's tensors (everything but ``EXTRA_PREFIXES``)."""
    return {k: v for k, v in tensors.items() if not k.startswith(EXTRA_PREFIXES)}
_MAX_HEADER = 100 * 1024 * 1024
#: Bytes per element of the safetensors dtypes mctool reads, and their PyTorch names.
_DTYPES = {"F64": (8, "float64"), "F32": (4, "float32"), "F16": (2, "float16"), "BF16": (2, "bfloat16"),
           "I64": (8, "int64"), "I32": (4, "int32"), "I16": (2, "int16"), "I8": (1, "int8"), "U8": (1, "uint8"),
           "BOOL": (1, "bool")}
_MAX_DIMS = 8
_MAX_TEXT = 4096  # longest metadata string mctool uses as a name (arch, kind, dataset)
_MAX_IMAGE_SIZE = 65536


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as a safetensors header describes it (nothing read from the data)."""

    dtype: str  # safetensors' code, e.g. "F32"
    shape: tuple[int, ...]

    @property
    def torch_dtype(self) -> str:
        return _DTYPES[self.dtype][1]


def bad_field(path: str | os.PathLike, key: str, problem: str) -> CheckpointError:
    return CheckpointError(f"'{path}' has a bad metadata field '{key}': {problem}. The file was not written by "
                           "mctool or was changed since; re-create it.")


def _text(md: dict[str, str], key: str, path: str | os.PathLike, default: str | None = None,
          limit: int = _MAX_TEXT) -> str | None:
    v = md.get(key, default)
    if v is not None and (len(v) > limit or not v.isprintable()):
        raise bad_field(path, key, f"expected printable text of at most {limit} characters")
    return v


def metadata_int(md: dict[str, str], key: str, path: str | os.PathLike, lo: int, hi: int) -> int:
    text = md[key]
    if not (re.fullmatch(r"\s*-?[0-9]{1,18}\s*", text, re.ASCII)) or not lo <= int(text) <= hi:
        raise bad_field(path, key, f"expected an integer from {lo:,} to {hi:,}, got {text[:40]!r}")
    return int(text)


def metadata_json(md: dict[str, str], key: str, path: str | os.PathLike, kind: type, default: str) -> Any:
    try:
        value = json.loads(md.get(key, default))
    except (json.JSONDecodeError, RecursionError) as e:
        raise bad_field(path, key, f"not valid JSON ({e})") from None
    if not isinstance(value, kind):
        raise bad_field(path, key, f"expected a JSON {'object' if kind is dict else 'array'}, "
                                      f"got {type(value).__name__}")
    return value


def check_state_metadata(md: dict[str, str], path: str | os.PathLike) -> dict[str, str]:
    """The fields ``--resume`` reads from a training state (train, connect, fge), each checked."""
    for key in ("epoch", "history", "config"):
        if key not in md:
            raise CheckpointError(f"'{path}' is not a complete training state (no '{key}'); start over with --force.")
    if md.get("kind") == "fge-state" and "snapshots" not in md:
        raise CheckpointError(f"'{path}' is not a complete training state (no 'snapshots'); start over with --force.")
    epoch = metadata_int(md, "epoch", path, 0, 10**6)
    for key, default in (("history", "[]"), ("snapshots", "[]"), ("pending_snapshots", "[]")):
        rows = metadata_json(md, key, path, list, default)
        if not all(isinstance(r, dict) for r in rows):
            raise bad_field(path, key, "expected a JSON array of objects")
    metadata_json(md, "inputs", path, dict, "{}")
    config = metadata_json(md, "config", path, dict, "{}")
    epochs = config.get("epochs")
    if isinstance(epochs, int) and not isinstance(epochs, bool) and int(md["epoch"]) > epochs:
        raise bad_field(path, "epoch", f"{md['epoch']} epochs done of a run of {epochs}")
    history = json.loads(md["history"])
    if len(history) != epoch:  # one row per epoch done: the metrics file is rebuilt from them
        raise bad_field(path, "history", f"{len(history)} rows for {epoch} epochs done")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for r in history for v in r.values()):
        raise bad_field(path, "history", "each row's values must be numbers")
    if md.get("kind") == "train-state" and not ("arch" in config and isinstance(config["arch"], (str, type(None)))
                                                 and isinstance(config.get("arch_kwargs"), dict)):
        raise bad_field(path, "config", "'arch' must be a string and 'arch_kwargs' a JSON object")
    _text(md, "started", path)
    return md


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _normalization(md: dict[str, str], path: str | os.PathLike, in_chans: int) -> dict[str, list[float]] | None:
    if "normalization" not in md:
        return None
    norm = metadata_json(md, "normalization", path, dict, "{}")
    mean, std = norm.get("mean"), norm.get("std")
    if set(norm) != {"mean", "std"} or not isinstance(mean, list) or not isinstance(std, list):
        raise bad_field(path, "normalization", 'expected {"mean": [...], "std": [...]}')
    if len(mean) != in_chans or len(std) != in_chans:
        raise bad_field(path, "normalization", f"expected {in_chans} values each for mean and std (in_chans), got "
                                                  f"{len(mean)} and {len(std)}")
    if not all(_finite(m) for m in mean) or not all(_finite(s) and s > 0 for s in std):
        raise bad_field(path, "normalization", "mean must be finite numbers and std finite numbers above 0")
    return {"mean": [float(m) for m in mean], "std": [float(s) for s in std]}


def check_finite(path: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse weights (or control points, members) holding NaN or infinity: a diverged run's file would
    otherwise give NaN surfaces and curves, or blame the learning rate of the next run."""
    for k, v in tensors.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise CheckpointError(f"'{path}' holds NaN or infinite values in '{k}' (saved from a diverged run?); "
                                  "mctool cannot evaluate or train from it.")
        # mctool computes in float32: a float64 value beyond its range would become infinite when loaded
        if v.dtype == torch.float64 and not bool(torch.isfinite(v.float()).all()):
            raise CheckpointError(f"'{path}' holds values in '{k}' beyond float32's range (|x| > 3.4e38), in which "
                                  "mctool computes; they would become infinite.")


def same_normalization(a: dict[str, list[float]] | None, b: dict[str, list[float]] | None) -> bool:
    """Whether two networks read their inputs alike: equal means and stds up to 1e-9 relative (statistics of
    the training images computed by earlier versions differ in the last digits between machines)."""
    if a is None or b is None:
        return a is b
    return all(len(a[k]) == len(b[k]) and all(math.isclose(x, y, rel_tol=1e-9, abs_tol=0.0)
                                              for x, y in zip(a[k], b[k])) for k in ("mean", "std"))


def meta_differences(a: "ModelMeta", b: "ModelMeta", keys: tuple[str, ...]) -> list[tuple[str, Any, Any]]:
    """The ``keys`` in which two networks' records differ, as (key, a's value, b's value); normalisations are
    equal within ``same_normalization``'s tolerance. One rule for every command that pairs networks (curves,
    align, ensembles), each with its own keys."""
    from .data import canonical_dataset

    out = []
    for key in keys:
        va, vb = getattr(a, key), getattr(b, key)
        if key == "normalization":
            same = same_normalization(va, vb)
        elif key == "dataset" and isinstance(va, str) and isinstance(vb, str):
            same = canonical_dataset(va) == canonical_dataset(vb)  # one data set, however it was spelled
        else:
            same = va == vb
        if not same:
            out.append((key, va, vb))
    return out


def _config(md: dict[str, str], path: str | os.PathLike) -> dict[str, Any]:
    """The recorded options; the ones mctool reads back (wd, epochs, split) are checked."""
    config = metadata_json(md, "config", path, dict, "{}")
    if "wd" in config and not (_finite(config["wd"]) and config["wd"] >= 0):
        raise bad_field(path, "config", f"'wd' must be a finite number >= 0, got {config['wd']!r}")
    epochs = config.get("epochs")
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or not 1 <= epochs <= 10**6):
        raise bad_field(path, "config", f"'epochs' must be an integer from 1 to 1,000,000, got {epochs!r}")
    if "split" in config and config["split"] not in ("test", "val"):
        raise bad_field(path, "config", f"'split' must be 'test' or 'val', got {config['split']!r}")
    if config.get("augment") is not None and config["augment"] not in AUGMENTS:
        raise bad_field(path, "config", f"'augment' must be one of {', '.join(AUGMENTS)}, got {config['augment']!r}")
    return config


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

    def dataset_or(self, given: str | None, path: str | os.PathLike | None) -> str:
        """The data set to use: ``given`` (--dataset), else the one this network records; refused if neither."""
        name = given or self.dataset
        if name is None:
            raise ConfigError(f"'{path}' does not record its data set; pass --dataset." if path is not None else
                              "the network does not record its data set; pass --dataset.")
        return name

    def train_augment(self) -> str:
        """The augmentation the network was trained with (``auto``, the data set's default, when not recorded):
        what the BN passes of ``--bn-data augmented`` apply (docs/method.md#bn)."""
        return self.config.get("augment") or "auto"

    def data_options(self) -> dict[str, Any]:
        """``load_data`` options that feed this network the images it was trained on: its normalisation and,
        for ``imagefolder:`` data, its image size and (``train --pretrained``) timm's transforms."""
        from .models import recorded_data_config

        opts: dict[str, Any] = {"normalization": self.normalization, "data_config": recorded_data_config(self.config)}
        if self.image_size is not None:
            opts["image_size"] = self.image_size
        return opts

    def to_metadata(self) -> dict[str, str]:
        md = {
            "format": "pt",
            "kind": self.kind,
            "mctool_version": __version__,
            # what else decides the bits of a training run (docs/file-formats.md#reproducible-files)
            "torch_version": torch.__version__,
            "torch_threads": str(torch.get_num_threads()),
            "created": utc_now(),
            "arch": self.arch,
            "arch_kwargs": json.dumps(plain(self.arch_kwargs), sort_keys=True),
            "num_classes": str(self.num_classes),
            "in_chans": str(self.in_chans),
            "config": json.dumps(plain(self.config), sort_keys=True),
            "inputs": json.dumps(plain(self.inputs), sort_keys=True),
        }
        if self.dataset is not None:
            md["dataset"] = self.dataset
        if self.image_size is not None:
            md["image_size"] = str(self.image_size)
        if self.normalization is not None:
            md["normalization"] = json.dumps(plain(self.normalization))
        md.update(self.extra)
        return md

    @classmethod
    def from_metadata(cls, md: dict[str, str], path: str | os.PathLike) -> "ModelMeta":
        """Every field checked for type and range: a file is untrusted input (CheckpointError names the field)."""
        known = {"format", "kind", "mctool_version", "torch_version", "torch_threads", "created", "arch", "arch_kwargs",
                 "num_classes", "in_chans", "config", "inputs", "dataset", "image_size", "normalization"}
        for key in ("arch", "num_classes", "in_chans"):
            if key not in md:
                raise CheckpointError(f"'{path}' has mctool metadata without '{key}'; re-create the file, or remove "
                                      "'arch' to load it as a plain state dict with --arch and --num-classes.")
        arch = _text(md, "arch", path, limit=200)
        num_classes = metadata_int(md, "num_classes", path, 1, MAX_CLASSES)
        in_chans = metadata_int(md, "in_chans", path, 1, MAX_IN_CHANS)
        arch_kwargs = metadata_json(md, "arch_kwargs", path, dict, "{}")
        try:
            check_arch_kwargs(arch, arch_kwargs)
        except ConfigError as e:
            raise bad_field(path, "arch_kwargs", str(e).rstrip(".")) from None
        inputs = metadata_json(md, "inputs", path, dict, "{}")
        if not all(isinstance(v, str) for v in inputs.values()):
            raise bad_field(path, "inputs", "expected a JSON object of file -> sha256 strings")
        return cls(
            arch=arch,
            num_classes=num_classes,
            in_chans=in_chans,
            arch_kwargs=arch_kwargs,
            dataset=_text(md, "dataset", path),
            image_size=metadata_int(md, "image_size", path, 1, _MAX_IMAGE_SIZE) if "image_size" in md else None,
            normalization=_normalization(md, path, in_chans),
            kind=_text(md, "kind", path, "model", limit=64),
            config=_config(md, path),
            inputs=inputs,
            version=md.get("mctool_version"),
            extra={k: v for k, v in md.items() if k not in known},
        )


def _check_safetensors_file(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Explain what is wrong with a file before safetensors' own, terser, errors would; returns the header's
    tensors and metadata, every field checked (no tensor data is read)."""
    if not path.exists():
        raise CheckpointError(f"checkpoint '{path}' does not exist.{did_you_mean(path)}")
    if path.is_dir():
        raise CheckpointError(f"checkpoint '{path}' is a folder, not a safetensors file.")
    if not path.is_file():  # reading a pipe or a device could wait forever or never end
        raise CheckpointError(f"checkpoint '{path}' is not a regular file (a pipe, device or socket); mctool reads "
                              "checkpoints from files.")
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
        if head == HDF5_MAGIC:
            raise CheckpointError(f"'{path}' is an HDF5 metrics file, not a checkpoint; give the .safetensors file "
                                  "the command wrote with -o.")
        if size == 0:
            raise CheckpointError(f"'{path}' is empty (0 bytes), not a safetensors checkpoint.")
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
        other = next((what for magic, what in _OTHER_FORMATS if head.startswith(magic)), None)
        if other is not None:
            raise CheckpointError(f"'{path}' is {other}, not a safetensors checkpoint; give a checkpoint written "
                                  "by mctool or safetensors.")
        if n > _MAX_HEADER or 8 + n > size:
            raise CheckpointError(f"'{path}' is not a safetensors file, or it is truncated (header of {n} bytes in a "
                                  f"file of {size} bytes); give a checkpoint written by mctool or safetensors.")
        raise CheckpointError(f"'{path}' is not a safetensors file (its header is not JSON).")
    if not isinstance(header, dict):
        raise CheckpointError(f"'{path}' is not a safetensors file (its header is not a JSON object).")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"'{path}' is not a valid safetensors file: its '__metadata__' must map strings to "
                              "strings.")
    def bad(name: str, why: str) -> CheckpointError:
        return CheckpointError(f"'{path}' is not a valid safetensors file: tensor '{name}' {why}.")

    entries, end = {}, 0
    for name, v in header.items():
        if not isinstance(v, dict) or not {"dtype", "shape", "data_offsets"} <= set(v):
            raise bad(name, "needs 'dtype', 'shape' and 'data_offsets'")
        dtype, shape, offsets = v["dtype"], v["shape"], v["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise bad(name, f"has dtype {str(dtype)[:20]!r}; mctool reads {', '.join(_DTYPES)}")
        if (not isinstance(shape, list) or len(shape) > _MAX_DIMS
                or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**48 for d in shape)):
            raise bad(name, f"has a bad shape (expected at most {_MAX_DIMS} non-negative integers)")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise bad(name, "has bad 'data_offsets' (expected [begin, end] with 0 <= begin <= end)")
        if offsets[1] - offsets[0] != math.prod(shape) * _DTYPES[dtype][0]:
            raise bad(name, f"has {offsets[1] - offsets[0]} bytes of data for shape {shape} of {dtype}")
        entries[name] = TensorEntry(dtype, tuple(shape))
        end = max(end, offsets[1])
    if 8 + n + end > size:
        raise CheckpointError(f"'{path}' is truncated: its header promises {8 + n + end} bytes but the file has "
                              f"{size}. Re-create or re-copy it.")
    return entries, metadata


#: Files given as checkpoints by mistake, named by their first bytes (mctool's own outputs among them) once the
#: file has failed to read as safetensors (a header length can start with any byte). Only its first 8 bytes
#: are read.
_OTHER_FORMATS = ((b"\x89PNG", "a PNG image"), (b"%PDF", "a PDF document"), (b"<?xml", "an XML file (SVG or VTK?)"),
                  (b"<svg", "an SVG image"), (b"<!DOCTYP", "an HTML page"), (b"<!doctyp", "an HTML page"),
                  (b"<html", "an HTML page"), (b"\x1f\x8b", "gzip-compressed"), (b"\x93NUMPY", "a NumPy array file"),
                  (b"{", "a JSON file"))


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Names, dtypes and shapes of a safetensors file's tensors, and its metadata, without reading tensor data."""
    return _check_safetensors_file(Path(path))


@library_call
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
    return read_header(path)[1]


def save_checkpoint(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write tensors and metadata atomically (temporary file in the same folder, then rename); nothing on
    the ranks that do not write files (``fileio.writes_files``)."""
    if not writes_files():
        return
    # Copies to CPU break any storage sharing (tied weights), which safetensors refuses.
    cpu = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp, private_folder(tmp) as scratch:
        try:
            # safetensors (>= 0.6) writes its own temporary file ('.tmpXXXXXX') beside the file it is given and
            # renames it: inside a folder named like our temporary file, a killed run's leftovers are found and
            # removed by the next run writing this output.
            save_file(cpu, str(scratch / "data"), metadata=metadata)
            os.replace(scratch / "data", tmp)
        except SafetensorError as e:  # I/O failures (a full disk...) come as this; make them the OSError they are
            # (safetensors < 0.5 spells them 'IoError(Os { code: 28, ... message: "..." })', later versions
            # 'I/O error: No space left on device (os error 28)')
            text = str(e)
            if "IoError" not in text and "I/O error" not in text and "os error" not in text:
                raise
            code = re.search(r"code: (\d+)", text) or re.search(r"os error (\d+)", text)
            message = re.search(r'message: "([^"]+)"', text) or re.search(r"I/O error: (.+?)(?: \(os error|$)", text)
            raise OSError(int(code.group(1)) if code else 0, message.group(1) if message else text) from e
        _sort_header(tmp)


def save_vectors(path: str | os.PathLike, name: str, tensor: torch.Tensor, *, kind: str, layout: Any,
                 inputs: dict[str, str], config: dict[str, Any]) -> None:
    """A file of flat parameter-space vectors beside a metrics file (``surface-directions``,
    ``hessian-eigenvectors``): ``name`` -> ``tensor`` with the provenance of the run that wrote it (its
    ``layout``, a ``flat.ParamLayout``, inputs, config and command line)."""
    save_checkpoint(path, {name: tensor.contiguous()},
                    {"format": "pt", "kind": kind, "param_layout": layout.to_json(),
                     "inputs": json.dumps(plain(inputs), sort_keys=True),
                     "config": json.dumps(plain(config), sort_keys=True),
                     "mctool_version": __version__, "command": command_line(), "created": utc_now()})


def read_vectors(path: str | os.PathLike, name: str, *, kind: str, layout: Any, inputs: dict[str, str],
                 config: dict[str, Any], shape: tuple[int, ...], what: str, finite: bool = False) -> torch.Tensor:
    """The float32 ``name`` [``shape``] of a ``save_vectors`` file written by a run of the same ``kind``, layout,
    inputs (their contents, however their paths are spelled now) and config (``--resume``; ``finite``: no NaN,
    which marks vectors not yet computed); another run's file is refused."""
    tensors, md = read_checkpoint(path)
    t = tensors.get(name)
    try:
        recorded = json.loads(md.get("inputs", "null"))
    except ValueError:
        recorded = None
    same = (md.get("kind") == kind and md.get("param_layout") == layout.to_json()
            and same_inputs(recorded, inputs)  # (by contents: the paths may be spelled otherwise now)
            and md.get("config") == json.dumps(plain(config), sort_keys=True))
    if (not same or t is None or t.dtype != torch.float32 or tuple(t.shape) != tuple(shape)
            or (finite and not bool(torch.isfinite(t).all()))):
        raise ConfigError(f"'{path}' does not hold this run's {what} (other inputs or options); start over with "
                          "--force.")
    return t


def _sort_header(path: Path) -> None:
    """Rewrite the header safetensors just wrote with its keys sorted, in place, so that the same tensors and
    metadata always give the same bytes (safetensors writes the metadata in a random order; the tensor data it
    lays out in a fixed one). The sorted header has the same entries, written the same way, so it is as long
    as the original; it is padded with spaces to exactly that length, as safetensors pads its own."""
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        text = f.read(n)
        header = json.loads(text)
        # Compact and not ASCII-escaped, as safetensors (serde_json) writes it.
        ordered = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        if len(ordered) > n:  # a string escaped otherwise than serde_json does: keep safetensors' own header
            return
        f.seek(8)
        f.write(ordered + b" " * (n - len(ordered)))


@library_call
def save_model(path: str | os.PathLike, model: nn.Module, meta: ModelMeta,
               extra_tensors: dict[str, torch.Tensor] | None = None, *, force: bool = False) -> None:
    """Save a network's state dict (parameters and buffers) with its metadata, atomically. An existing file is
    refused unless ``force`` (as every command's output is)."""
    if not isinstance(meta, ModelMeta):
        raise ConfigError(f"save_model() takes a mctool.ModelMeta as meta (load_model(...).meta, or one made for "
                          f"the network), got {type(meta).__name__}.")
    if not isinstance(model, nn.Module):
        raise ConfigError(f"save_model() takes a torch.nn.Module as model, got {type(model).__name__}.")
    write_model(check_output(path, force), model, meta, extra_tensors)


def write_model(path: str | os.PathLike, model: nn.Module, meta: ModelMeta,
                extra_tensors: dict[str, torch.Tensor] | None = None) -> None:
    """``save_model`` for a command, which has checked its outputs before any work (and replaces its own
    training state every epoch)."""
    tensors = dict(model.state_dict())
    tensors.update(extra_tensors or {})
    save_checkpoint(path, tensors, meta.to_metadata())


def check_state_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Refuse a training state (``--resume``) whose tensors do not fit the network being trained: its state
    dict, ``optimizer/momentum/<param>`` and the ``snapshots/*`` of FGE and Snapshot Ensembles."""
    own = model.state_dict()
    expected = {k: tuple(v.shape) for k, v in own.items()}
    state = network_state(tensors)
    got = {k: tuple(v.shape) for k, v in state.items()}
    problems = [_describe_mismatch(expected, got)]
    # (as load_model: loading would round float weights into an integer tensor or the other way round)
    problems += [f"'{k}' is {v.dtype} ".replace("torch.", "") + ("where the network has floating point"
                                                                if own[k].is_floating_point() else "(a counter)")
                 for k, v in state.items() if k in own and v.is_floating_point() != own[k].is_floating_point()]
    params = {k: tuple(p.shape) for k, p in model.named_parameters()}
    buffers = {k: tuple(b.shape) for k, b in model.named_buffers()}
    size = sum(math.prod(s) for s in params.values())
    members = tensors.get("snapshots/members")
    count = members.shape[0] if members is not None and members.ndim == 2 else 0
    for k, v in tensors.items():
        shape, name = tuple(v.shape), k.split("/", 3)
        if k.startswith(MOMENTUM_PREFIX):
            ok = params.get(k[len(MOMENTUM_PREFIX):]) == shape and v.is_floating_point()
        elif k in ("snapshots/members", "snapshots/pending"):
            ok = v.ndim == 2 and shape[1] == size and v.is_floating_point()
        elif k == "snapshots/probs_sum":
            ok = (members is not None and v.ndim == 2 and v.is_floating_point()
                  and shape[1] == getattr(model, "num_classes", shape[1]))
        elif k.startswith("snapshots/buffers/"):
            ok = (len(name) == 4 and name[2].isdecimal() and int(name[2]) < count
                  and buffers.get(name[3]) == shape)
        else:
            ok = not k.startswith(EXTRA_PREFIXES)
        if not ok:
            problems.append(f"'{k}' of shape {shape} fits nothing in the network")
    if members is not None and "snapshots/probs_sum" not in tensors:
        problems.append("'snapshots/members' without 'snapshots/probs_sum'")
    problem = "; ".join([p for p in problems if p][:6])
    if problem:
        raise CheckpointError(f"'{path}' does not fit the network being trained ({problem}); start over with "
                              "--force.")
    check_finite(path, tensors)  # (NaN weights or momentum would be blamed on the learning rate)


@dataclass
class LoadedModel:
    """A network read from a checkpoint (``load_model``): ``model`` an ordinary ``nn.Module`` in eval mode on the
    CPU, ``meta`` its metadata, ``path`` and ``sha256`` the file's, ``extra_tensors`` what else the file holds
    (a training state's optimizer momentum)."""

    model: nn.Module
    meta: ModelMeta
    path: Path
    sha256: str
    extra_tensors: dict[str, torch.Tensor]


def _describe_mismatch(expected: dict[str, tuple[int, ...]], got: dict[str, tuple[int, ...]], limit: int = 5) -> str:
    """Differences between the state dict shapes a network has and those a file has (empty when none)."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shapes = [f"{k}: file {got[k]} vs model {v}" for k, v in expected.items() if k in got and got[k] != v]
    parts = []
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            more = f" (and {len(items) - limit} more)" if len(items) > limit else ""
            parts.append(f"{len(items)} {title}: {', '.join(items[:limit])}{more}")
    return "; ".join(parts)


@library_call
def load_model(path: str | os.PathLike, *, arch: str | None = None, num_classes: int | None = None,
               in_chans: int | None = None, arch_kwargs: dict[str, Any] | None = None) -> LoadedModel:
    """Rebuild a network from a checkpoint, on CPU, in eval mode.

    mctool checkpoints carry their architecture; a plain safetensors state dict (e.g. from timm) needs
    ``arch`` and ``num_classes`` (and ``in_chans`` when not 3). Explicit arguments override metadata.
    """
    path = Path(path)
    header, md = read_header(path)
    if "arch" in md:
        meta = ModelMeta.from_metadata(md, path)
        if meta.kind not in MODEL_KINDS:
            article = "an" if meta.kind[:1] in "aeiou" else "a"
            hint = {"curve": "take a network on it with 'mctool point FILE --t T -o net.safetensors', or evaluate "
                             "the curve with 'mctool evaluate-curve FILE'",
                    "ensemble": "take a member with 'mctool point FILE --index I -o net.safetensors'; 'mctool "
                                "evaluate FILE' evaluates the whole ensemble",
                    "fge-state": "it is an interrupted fge run's training state: resume the run with --resume, or "
                                 "take a member of its ensemble file with 'mctool point ENSEMBLE --index I'"
                    }.get(meta.kind)
            hint = hint or ("it is a curve saved during a connect run: take a network on it with 'mctool point FILE "
                            "--t T -o net.safetensors'" if meta.kind == "curve-state" else "give a model checkpoint "
                            "(written by train, point or align)")
            raise CheckpointError(f"'{path}' holds {article} '{meta.kind}', not a single network (kind 'model'); "
                                  f"{hint}.")
    else:
        if isinstance(md.get("kind"), str):  # an mctool file that holds no network (e.g. a surface's directions)
            hint = {"surface-directions": "it holds the directions of a surface run, which that run's --resume "
                                          "reads; give a model checkpoint (surface's --directions too takes "
                                          "networks: each direction is a network's weights minus the centre's)"
                    }.get(md["kind"], "give a model checkpoint")
            raise CheckpointError(f"'{path}' is a '{str(md['kind'])[:40]}' file, not a network; {hint}.")
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
    # The network's shapes come from a build on the 'meta' device: nothing is allocated before the file is
    # known to hold exactly these tensors, so a network is never larger than the file that describes it.
    try:
        expected = model_shapes(meta.arch, meta.num_classes, meta.in_chans, meta.arch_kwargs)
    except ConfigError as e:
        raise ConfigError(f"cannot rebuild the network of '{path}': {e}") from None
    shapes = {k: v.shape for k, v in header.items()}
    problem = _describe_mismatch(expected, {k: v for k, v in shapes.items() if not k.startswith(EXTRA_PREFIXES)})
    if problem:
        plain = (" Build it as it was built: its --arch-kwargs (e.g. '{\"hidden\": 16}' for mlp), and its classes "
                 "and channels (--num-classes and --in-chans of evaluate; train takes them from the data set). "
                 "To fine-tune timm weights made for another number of classes, give them to train as "
                 "--pretrained-file (the classifier is re-initialised), not as --init." if "arch" not in md else "")
        raise CheckpointError(f"'{path}' does not fit architecture '{meta.arch}' "
                              f"(num_classes={meta.num_classes}, in_chans={meta.in_chans}): {problem}.{plain}")
    tensors, _ = read_checkpoint(path)
    model = build_model(meta.arch, meta.num_classes, meta.in_chans, meta.arch_kwargs)
    params = {k: tuple(p.shape) for k, p in model.named_parameters()}
    momentum = [f"{k} {v}" for k, v in shapes.items()
                if k.startswith(MOMENTUM_PREFIX) and (params.get(k[len(MOMENTUM_PREFIX):]) != v
                                                      or not tensors[k].is_floating_point())]
    if momentum:
        raise CheckpointError(f"'{path}' has momentum tensors that fit no parameter of architecture '{meta.arch}' "
                              f"(shape, or a floating-point type): {', '.join(momentum[:5])}.")
    state = network_state(tensors)
    extra = {k: v for k, v in tensors.items() if k not in state}
    own = model.state_dict()
    kinds = [f"{k} ({v.dtype})".replace("torch.", "") for k, v in state.items()
             if k in own and v.is_floating_point() != own[k].is_floating_point()]
    if kinds:
        raise CheckpointError(f"'{path}' holds tensors of the wrong kind of number for architecture '{meta.arch}' "
                              f"(weights must be floating point, counters integers): {', '.join(kinds[:5])}.")
    check_finite(path, state)
    model.load_state_dict(state)
    model.eval()
    return LoadedModel(model=model, meta=meta, path=path, sha256=sha256_file(path), extra_tensors=extra)
