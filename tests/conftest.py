"""Shared fixtures: a CLI runner and a few tiny trained networks (CPU, seconds)."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

# The tests read the CLI's human output (tables, help, errors after progress) as a log gets it: stderr not a
# terminal, 80 columns, no colour codes. Rich (and typer) take a width, or a terminal, from these variables
# too; COLUMNS=30 wrapped help lines and FORCE_COLOR=1 (set in many CI setups) drew progress bars before the
# "Error: " line. They are left out here, before typer is imported, for this process and the ones it starts.
for _name in ("COLUMNS", "LINES", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "TERMINAL_WIDTH"):
    os.environ.pop(_name, None)
# matplotlib keeps its font cache in MPLCONFIGDIR, else in the home folder: the tests' figures (and the commands
# they start) leave the user's home alone, with a folder of their own for this run.
if not os.environ.get("MPLCONFIGDIR"):
    os.environ["MPLCONFIGDIR"] = tempfile.mkdtemp(prefix="mctool-tests-mpl-")
    atexit.register(shutil.rmtree, os.environ["MPLCONFIGDIR"], True)

from typer.testing import CliRunner  # noqa: E402

from mctool.cli import app  # noqa: E402

# Two threads unless MCTOOL_TEST_THREADS (or else OMP_NUM_THREADS) says otherwise: run the suite with 1 and
# with 2 to check that no result depends on the thread count (see docs/testing.md).
torch.set_num_threads(int(os.environ.get("MCTOOL_TEST_THREADS") or os.environ.get("OMP_NUM_THREADS") or 2))


def pytest_report_header(config) -> str:
    return f"torch threads: {torch.get_num_threads()} (set MCTOOL_TEST_THREADS to change)"


class Cli:
    """Runs ``mctool`` in-process and checks the invariants every invocation must keep."""

    def __init__(self) -> None:
        self.runner = CliRunner()

    def __call__(self, *args: str, code: int = 0):
        result = self.runner.invoke(app, [str(a) for a in args])
        assert "Traceback" not in result.output, result.output
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        assert result.exit_code == code, f"exit {result.exit_code}, expected {code}:\n{result.output}"
        return result

    def json(self, *args: str) -> dict:
        result = self(*args, "--json")
        return json.loads(result.stdout)

    def error(self, *args: str, code: int = 1) -> str:
        result = self(*args, code=code)
        # Progress bars may precede it on stderr; the error is the last thing printed, on its own line.
        lines = result.stderr.splitlines()
        starts = [i for i, line in enumerate(lines) if line.startswith("Error: ")]
        assert starts, result.stderr
        return "\n".join(lines[starts[-1]:])


@pytest.fixture
def cli() -> Cli:
    return Cli()


def assert_metrics_close(got, want, rtol: float = 1e-5, err_atol: float = 0.01, path: str = "") -> None:
    """Two ``--json`` metrics trees (dicts, lists, numbers, None) agree: the same shape, and numbers to ``rtol``
    (float rounding: runs whose passes group the networks differently, docs/performance.md#a-first-layer-per-
    control-point), error rates to ``err_atol`` (an image near a tie may flip)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), path
        for k in want:
            assert_metrics_close(got[k], want[k], rtol, err_atol, f"{path}/{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want)):
            assert_metrics_close(g, w, rtol, err_atol, f"{path}[{i}]")
    elif isinstance(want, float) and not isinstance(want, bool):
        atol = err_atol if "/err" in path else 0.0
        assert got == pytest.approx(want, rel=rtol, abs=atol, nan_ok=True), path
    else:
        assert got == want, path


@pytest.fixture(scope="session")
def digits_models(tmp_path_factory) -> list[Path]:
    """Two small MLPs trained on digits from different seeds."""
    folder = tmp_path_factory.mktemp("digits-models")
    cli = Cli()
    paths = []
    for seed in (0, 1):
        out = folder / f"m{seed}.safetensors"
        cli("train", "-d", "digits", "-o", out, "--epochs", "8", "--lr", "0.1", "--seed", seed,
            "--arch-kwargs", '{"hidden": 32}',
            "-q", "--device", "cpu")
        paths.append(out)
    return paths


def ctrl_c_during_epoch(monkeypatch, epoch: int, after_batches: int = 0):
    """Make the training pass of ``epoch`` (1-based) raise KeyboardInterrupt after ``after_batches`` batches,
    as a user's Ctrl-C would; returns a function that undoes it."""
    import mctool.data

    splits = (mctool.data.TensorSplit, mctool.data.LoaderSplit)  # (data sets held as tensors; image folders)
    reals = {cls: cls.batches for cls in splits}
    calls = {"n": 0}

    def interrupted(self, *args, **kwargs):
        real = reals[type(self)]
        if kwargs.get("augment"):  # training passes only
            calls["n"] += 1
            if calls["n"] == epoch:
                it = real(self, *args, **kwargs)
                for _ in range(after_batches):
                    yield next(it)
                raise KeyboardInterrupt
        yield from real(self, *args, **kwargs)

    for cls in splits:
        monkeypatch.setattr(cls, "batches", interrupted)
    return lambda: [monkeypatch.setattr(cls, "batches", real) for cls, real in reals.items()]


def image_folder(root: Path) -> Path:
    """A tiny ``imagefolder:`` data set at ``root``: train/ and val/, classes x and y, 4 images of 8 x 8 each."""
    from PIL import Image

    for part in ("train", "val"):
        for label in ("x", "y"):
            (root / part / label).mkdir(parents=True)
            for k in range(4):
                Image.new("RGB", (8, 8), (40 * k, 200 if label == "x" else 0, 0)).save(root / part / label / f"{k}.png")
    return root


def count_networks(monkeypatch) -> list[int]:
    """Count the networks evaluated from now on (one entry each), one at a time or many to a pass."""
    import mctool.batched as batched

    calls: list[int] = []
    one, many = batched.evaluate_weights, batched.evaluate_many
    monkeypatch.setattr(batched, "evaluate_weights", lambda *a, **k: calls.append(1) or one(*a, **k))
    monkeypatch.setattr(batched, "evaluate_many", lambda wide, weights, *a, **k: calls.extend([1] * len(weights))
                        or many(wide, weights, *a, **k))
    return calls
