"""Seeded mutation fuzzing of every file kind mctool reads.

Valid files are made by the real commands; each case mutates one of them (safetensors header, metadata
values, raw bytes, HDF5 attributes and datasets) and runs the commands that read it. Whatever the file holds,
a command must end with exit 0, or exit 1 and an ``Error:`` line: never a traceback, and never a memory bomb
(peak memory is checked once for the whole loop). Case ``n`` uses ``random.Random(n)``, so a failure names a
case that can be replayed alone with ``_mutate_*(random.Random(n), ...)``.
"""

from __future__ import annotations

import json
import random
import resource
import struct
import traceback
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from mctool.cli import app

CPU = ["--device", "cpu"]
CASES = {"model": 40, "train-state": 15, "curve": 30, "ensemble": 25, "h5": 40}

# Values a mutated field may take: wrong types, out-of-range and huge numbers, NaN, control characters.
_NUMBERS = [-1, 0, 1, 3, 2**31, 10**11, 10**30, -(10**11), 0.5, 1e309, float("nan"), True, None]
_TEXT = ["", "x", "mlp", "resnet18", "test_vit", "\x00", "\x1b[31mred", "é" * 50, "a" * 5000, "[bold]x[/]", "$x^2$",
         "synthetic:size=30000", "synthetic:size=8,channels=1", "imagefolder:/nonexistent", "digits", "cifar10"]
_JSON = [[], {}, [1, 2], {"a": 1}, {"hidden": -1}, {"hidden": 20000}, {"checkpoint_path": "x.pt"},
         {"pretrained": True}, {"mean": [0.3], "std": [0]}, {"mean": [], "std": []}, [["w", [-1]]], [["w", "2"]]]
_METADATA_TEXT = ["-1", "0", "1", "3", "10", "1e3", "99999999999999999999", "NaN", "abc", "", "null", "[]", "{}",
                  "[1]", '"x"', "{", "\x00", "\u202e", "é" * 2000, "synthetic:size=30000", "line", "bezier",
                  "polychain", "ensemble", "curve", "model"]
_SAFETENSORS_DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I8", "U8", "BOOL", "C64", "F8_E4M3", "U32", "X", 7, None]


def _any_value(rng: random.Random):
    return rng.choice([rng.choice(_NUMBERS), rng.choice(_TEXT), rng.choice(_JSON)])


def _mutate_json(rng: random.Random, value):
    """Replace one randomly chosen node of a JSON value (or drop a key)."""
    if isinstance(value, dict) and value and rng.random() < 0.8:
        key = rng.choice(list(value))
        if rng.random() < 0.15:
            return {k: v for k, v in value.items() if k != key}
        return {**value, key: _mutate_json(rng, value[key])}
    if isinstance(value, list) and value and rng.random() < 0.8:
        i = rng.randrange(len(value))
        return value[:i] + [_mutate_json(rng, value[i])] + value[i + 1:]
    if isinstance(value, dict) and rng.random() < 0.5:
        return {**value, rng.choice(["hidden", "img_size", "depth", "width", "pretrained_cfg", "mean", "x"]):
                _any_value(rng)}
    return _any_value(rng)


def _split_safetensors(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join_safetensors(header: dict, body: bytes) -> bytes:
    text = json.dumps(header, allow_nan=True).encode()
    return struct.pack("<Q", len(text)) + text + body


def _mutate_safetensors(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    """One mutation of a safetensors file; returns the new bytes and what was done."""
    header, body = _split_safetensors(data)
    md = header.get("__metadata__", {})
    names = [k for k in header if k != "__metadata__"]
    how = rng.choice(["metadata", "metadata", "metadata-json", "metadata-json", "offsets", "dtype", "shape",
                      "entry", "bytes", "truncate"])
    if how == "metadata":
        key = rng.choice(list(md) + ["arch", "num_classes", "param_layout", "num_members", "num_bends", "curve"])
        value = rng.choice(_METADATA_TEXT)
        md = {k: v for k, v in md.items() if k != key} if rng.random() < 0.2 else {**md, key: value}
        header["__metadata__"] = md
        return _join_safetensors(header, body), f"metadata {key}={value[:30]!r}"
    if how == "metadata-json":
        keys = [k for k, v in md.items() if v[:1] in "{["]
        key = rng.choice(keys)
        value = json.dumps(_mutate_json(rng, json.loads(md[key])), allow_nan=True)
        header["__metadata__"] = {**md, key: value}
        return _join_safetensors(header, body), f"metadata {key}={value[:60]!r}"
    name = rng.choice(names)
    entry = dict(header[name])
    if how == "offsets":
        begin, end = entry["data_offsets"]
        entry["data_offsets"] = rng.choice([[end, begin], [begin, end + 4], [begin - 4, end], [0, 1 << 62], [begin],
                                            [begin, end, end], "0", [begin, None], [-8, end], [begin + 4, end + 4]])
    elif how == "dtype":
        entry["dtype"] = rng.choice(_SAFETENSORS_DTYPES)
    elif how == "shape":
        shape = list(entry["shape"])
        entry["shape"] = rng.choice([shape[::-1], shape + [1], shape[:-1], [-s for s in shape], [1 << 40] + shape[1:],
                                     [], "x", [0.5] * len(shape), [s * 2 for s in shape]])
    elif how == "entry":
        choice = rng.randrange(4)
        if choice == 0:
            del entry["dtype"]
        elif choice == 1:
            header[rng.choice(["buffers/x", "buffers/0/net.1.bias", "optimizer/momentum/nope", "snapshots/x"])] = entry
        elif choice == 2:
            header[name + ".renamed"] = header.pop(name)
            return _join_safetensors(header, body), f"renamed {name}"
        else:
            entry = rng.choice([[], "x", None, 3])
    elif how == "bytes":
        raw = bytearray(_join_safetensors(header, body))
        end = 8 + struct.unpack("<Q", raw[:8])[0]
        for _ in range(rng.randint(1, 4)):
            raw[rng.randrange(8, end)] = rng.randrange(256)
        return bytes(raw), "header bytes flipped"
    else:
        raw = _join_safetensors(header, body)
        cut = rng.randrange(len(raw))
        return raw[:cut], f"truncated at {cut} of {len(raw)}"
    header[name] = entry
    return _join_safetensors(header, body), f"{how} of {name}: {str(entry)[:80]}"


def _read_h5(path: Path) -> tuple[dict, dict]:
    with h5py.File(path, "r") as f:
        data = {}
        f.visititems(lambda n, o: data.__setitem__(n, o[()]) if isinstance(o, h5py.Dataset) else None)
        return data, dict(f.attrs)


def _mutate_h5(rng: random.Random, path: Path, out: Path) -> str:
    """Rewrite an HDF5 file with one attribute or dataset mutated (or its bytes truncated)."""
    data, attrs = _read_h5(path)
    how = rng.choice(["attr", "attr", "drop-attr", "dataset", "dataset", "drop-dataset", "truncate"])
    what = how
    if how == "attr":
        key = rng.choice(list(attrs) + ["split", "kind", "summary", "curve", "num_bends"])
        value = rng.choice([3, -1, 1.5, float("nan"), 1 + 2j, np.bytes_(b"\xff\xfe"), np.array([1, 2]), "x", "",
                            "plane", "evaluate-curve", "train", "val", "test", "[", "{}", '{"barrier": 3}',
                            '{"barrier": {"eval": {"err": "x"}}}', np.array([b"a", b"\xff"]), h5py.Empty("f"),
                            "$\\frac{$", "a" * 3000, True])
        attrs[key] = value
        what = f"attr {key}={str(value)[:40]!r}"
    elif how == "drop-attr" and attrs:
        key = rng.choice(list(attrs))
        del attrs[key]
        what = f"no attr {key}"
    elif how == "dataset":
        key = rng.choice(list(data))
        arr = np.asarray(data[key])
        data[key] = rng.choice([arr[:1], arr[:0], arr.reshape(-1), np.stack([arr, arr]), arr.astype(np.complex128),
                                np.full_like(arr, np.nan, dtype=np.float64), np.full(arr.shape, np.inf),
                                np.array([b"x"] * max(1, arr.size)), arr.astype(np.int8), np.float64(3.0),
                                np.full(arr.shape, 1e308)])
        what = f"dataset {key} -> {np.shape(data[key])} {np.asarray(data[key]).dtype}"
    elif how == "drop-dataset":
        key = rng.choice(list(data))
        del data[key]
        what = f"no dataset {key}"
    else:
        raw = path.read_bytes()
        cut = rng.randrange(len(raw))
        out.write_bytes(raw[:cut])
        return f"truncated at {cut} of {len(raw)}"
    with h5py.File(out, "w") as f:
        for k, v in attrs.items():
            f.attrs[k] = v
        for k, v in data.items():
            f[k] = v
    return what


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> dict[str, list[Path]]:
    """One valid file of each kind, written by the real commands (a tiny MLP on digits)."""
    d = tmp_path_factory.mktemp("fuzz-originals")
    runner = CliRunner()

    def run(*args):
        r = runner.invoke(app, [str(a) for a in args])
        assert r.exit_code == 0, r.output

    for seed in (0, 1):
        run("train", "-d", "digits", "-o", d / f"m{seed}.safetensors", "--epochs", "2", "--save-every", "1",
            "--seed", seed, "--arch-kwargs", '{"hidden": 8}', "-q", *CPU)
    run("connect", d / "m0.safetensors", d / "m1.safetensors", "-o", d / "c.safetensors", "--epochs", "1", "-q", *CPU)
    run("ensemble", d / "m0.safetensors", d / "m1.safetensors", "-o", d / "e.safetensors", "-q", *CPU)
    run("evaluate-curve", d / "c.safetensors", "-m", d / "ec.h5", "--num-points", "3", "-q", *CPU)
    run("plane", d / "c.safetensors", "-m", d / "p.h5", "--grid-points", "3", "--curve-points", "5", "-q", *CPU)
    run("surface", d / "m0.safetensors", "-m", d / "s.h5", "--directions", "pca", "--trajectory",
        d / "m0-epoch001.safetensors", "--trajectory", d / "m1-epoch001.safetensors", "--grid-points", "2", "-q", *CPU)
    return {"model": [d / "m0.safetensors"], "train-state": [d / "m0-epoch001.safetensors"],
            "curve": [d / "c.safetensors"], "ensemble": [d / "e.safetensors"],
            "h5": [d / "m0.h5", d / "ec.h5", d / "p.h5", d / "s.h5"]}


def _commands(kind: str, path: Path, out: Path, n: int) -> list[list]:
    common = [*CPU, "--data-root", out / "no-data", "-q"]
    if kind in ("model", "train-state"):
        return [["info", path, "--json"], ["evaluate", path, *common]]
    if kind == "curve":
        slow = [["evaluate-curve", path, "-m", out / "ec.h5", "--num-points", "2", "--force", *common]]
        return [["info", path], ["point", path, "--t", "0.5", "-o", out / "p.safetensors", "--force", *common],
                *(slow if n % 3 == 0 else [])]
    if kind == "ensemble":
        return [["info", path], ["evaluate", path, *common],
                ["point", path, "--index", "1", "-o", out / "p.safetensors", "--force", "-q"]]
    return [["info", path, "--json"], ["plot", path, "-o", out / "p.png", "--force", *(["--3d"] if n % 4 == 1 else [])]]


def _check(runner: CliRunner, args: list, case: str) -> None:
    r = runner.invoke(app, [str(a) for a in args])
    where = f"{case}\n$ mctool {' '.join(str(a) for a in args)}\n"
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        pytest.fail(where + "".join(traceback.format_exception(*r.exc_info)))
    assert "Traceback" not in r.output, where + r.output
    assert r.exit_code in (0, 1), where + r.output
    if r.exit_code == 1:
        assert any(line.startswith("Error: ") for line in r.stderr.splitlines()), where + r.output


@pytest.fixture(scope="module", autouse=True)
def _fast():
    """Read the digits CSV once for all cases (it is the same data every time); draw figures small."""
    import functools

    import mctool.data

    from matplotlib.figure import Figure

    real, savefig = mctool.data._digits, Figure.savefig
    mctool.data._digits = functools.cache(real)
    # Figures are drawn in full (every artist, so any bad value still fails) but rasterised small.
    Figure.savefig = lambda self, *a, **k: savefig(self, *a, **{**k, "dpi": 10})
    yield
    mctool.data._digits, Figure.savefig = real, savefig


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # drawing values near 1e308
@pytest.mark.parametrize("kind", list(CASES))
def test_mutated_files_give_errors_not_tracebacks(originals, tmp_path, kind):
    runner = CliRunner()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    for n in range(CASES[kind]):
        rng = random.Random(f"{kind}-{n}")
        source = rng.choice(originals[kind])
        path = tmp_path / f"case{source.suffix}"
        if kind == "h5":
            what = _mutate_h5(rng, source, path)
        else:
            raw, what = _mutate_safetensors(rng, source.read_bytes())
            path.write_bytes(raw)
        for args in _commands(kind, path, tmp_path, n):
            _check(runner, args, f"case {kind}-{n} ({source.name}): {what}")
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before
    assert grown < 1 << 20, f"peak memory grew by {grown / 1024:.0f} MiB while reading mutated {kind} files"
