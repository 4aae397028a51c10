"""The sdist and the wheel built from the checkout: complete, and nothing that does not belong."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _tracked() -> list[str]:
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("needs a git checkout")
    out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, text=True)
    if out.returncode != 0:  # (e.g. a checkout owned by another user: "dubious ownership")
        pytest.skip(f"git cannot list the checkout's files: {out.stderr.strip()[:200]}")
    return [name for name in out.stdout.split("\0") if name]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[set[str], set[str], Path]:
    """Build an sdist and a wheel from a copy of the tracked files (no network, no build isolation)."""
    setuptools = pytest.importorskip("setuptools")
    if tuple(int(x) for x in setuptools.__version__.split(".")[:2]) < (70, 1):
        pytest.importorskip("wheel", reason="setuptools < 70.1 builds wheels with the 'wheel' package")
    tmp = tmp_path_factory.mktemp("pkg")
    src = tmp / "src"
    for name in _tracked():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    dist = tmp / "dist"
    dist.mkdir()
    names = []
    for hook in ("build_sdist", "build_wheel"):  # one process each: setuptools keeps state between the two
        code = f"import sys; from setuptools import build_meta as b; print('BUILT', b.{hook}(sys.argv[1]))"
        done = subprocess.run([sys.executable, "-c", code, str(dist)], cwd=src, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        names.append(next(line for line in done.stdout.splitlines() if line.startswith("BUILT ")).split()[1])
    sdist, wheel = names
    with tarfile.open(dist / sdist) as t:
        sdist_files = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    with zipfile.ZipFile(dist / wheel) as z:
        wheel_files = set(z.namelist())
    return sdist_files, wheel_files, dist / wheel


def test_sdist_holds_every_tracked_file_but_ci(built):
    sdist_files = built[0]
    missing = [n for n in _tracked() if not n.startswith((".ci/", ".git")) and n not in sdist_files]
    assert not missing, f"tracked files missing from the sdist (MANIFEST.in): {missing}"
    assert not [n for n in sdist_files if "__pycache__" in n or n.endswith(".pyc")]


def test_wheel_holds_the_package_and_nothing_else(built):
    wheel_files = built[1]
    package = {n for n in _tracked() if n.startswith("mctool/")}
    assert package <= wheel_files, sorted(package - wheel_files)
    stray = [n for n in wheel_files if not n.startswith(("mctool/", "mctool-"))]
    assert not stray, stray
    assert not [n for n in wheel_files if "__pycache__" in n or n.endswith(".pyc")]
    entry_points = next(n for n in wheel_files if n.endswith(".dist-info/entry_points.txt"))
    assert entry_points


def test_the_wheel_carries_the_docs_that_mctool_docs_shows(built, tmp_path):
    """Help texts cite docs/NAME.md#section: the wheel installs those pages as mctool/docs/, where `mctool docs`
    finds them (a wheel user has no docs/ folder)."""
    wheel_files, wheel = built[1], built[2]
    pages = {n for n in _tracked() if n.startswith("docs/") and n.endswith(".md")}
    assert pages and {f"mctool/{n}" for n in pages} <= wheel_files
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    # -S: no site hooks, so an editable install of the checkout (a finder ahead of PYTHONPATH) stays out
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), sysconfig.get_paths()["purelib"]])}
    run = subprocess.run([sys.executable, "-S", "-m", "mctool", "docs", "method.md#bn", "--path"], cwd=tmp_path,
                         env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert Path(run.stdout.strip()) == site / "mctool" / "docs" / "method.md"
