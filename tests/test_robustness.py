"""Outputs, options and interruptions: name clashes, numeric options, Ctrl-C, atomic writes, locks, --force."""

from __future__ import annotations

import errno
import fcntl
import importlib
import json
import math
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn

import mctool.batched
import mctool.checkpoint
import mctool.curve_eval
import mctool.fileio
import mctool.h5io
from conftest import count_networks, ctrl_c_during_epoch
from mctool.bn import recalibrate_bn
from mctool.checkpoint import load_model, read_checkpoint, read_metadata, save_model
from mctool.curve_training import ConnectConfig
from mctool.ensemble_eval import evaluate_models
from mctool.errors import ConfigError, DataError, OutputError
from mctool.fge import FGEConfig
from mctool.fileio import atomic_path, check_outputs, holds_output_locks, lock_path, sha256_file
from mctool.h5io import read_h5
from mctool.plane import plane
from mctool.training import TrainConfig

plane_module = importlib.import_module("mctool.plane")  # the module: mctool.plane is the function

TINY = ["-d", "digits", "--arch-kwargs", '{"hidden": 32}', "--device", "cpu"]


@pytest.fixture(scope="module")
def files(tmp_path_factory, digits_models) -> dict[str, Path]:
    """Two models, a third one off their line, a line curve between the first two and an evaluate-curve file."""
    from conftest import Cli

    folder = tmp_path_factory.mktemp("robustness")
    m0, m1 = digits_models
    m2 = folder / "m2.safetensors"
    loaded = load_model(m1)
    with torch.no_grad():
        for p in loaded.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    save_model(m2, loaded.model, loaded.meta)
    line = folder / "line.safetensors"
    Cli()("connect", m0, m1, "--curve", "line", "-o", line, "-q")
    curve_h5 = folder / "e.h5"
    Cli()("evaluate-curve", m0, m1, "-m", curve_h5, "--num-points", "2", "-q", "--device", "cpu")
    return {"m0": m0, "m1": m1, "m2": m2, "line": line, "curve_h5": curve_h5}


# --- 1. outputs that share a file -------------------------------------------------------------------------------

CLASHES = {
    "train -o X -m X": lambda f, t: ["train", *TINY, "-o", t / "x", "-m", t / "x", "--epochs", "1"],
    "train --save-every: -m is a snapshot": lambda f, t: [
        "train", *TINY, "-o", t / "m.safetensors", "-m", t / "m-epoch001.safetensors", "--epochs", "2",
        "--save-every", "1"],
    "train -m is the training state": lambda f, t: [
        "train", *TINY, "-o", t / "m.safetensors", "-m", t / "m.state.safetensors", "--epochs", "1"],
    "connect -o X -m X": lambda f, t: ["connect", f["m0"], f["m1"], "-o", t / "x", "-m", t / "x", "--epochs", "1"],
    "fge -o X -m X": lambda f, t: ["fge", f["m0"], "-o", t / "x", "-m", t / "x", "--epochs", "1"],
    "fge -o X --swa X": lambda f, t: ["fge", f["m0"], "-o", t / "x", "--swa", t / "x", "--epochs", "1"],
    "fge -m NAME.state.safetensors": lambda f, t: [
        "fge", f["m0"], "-o", t / "f.safetensors", "-m", t / "f.state.safetensors", "--epochs", "1"],
    "ensemble -o X -m X": lambda f, t: ["ensemble", f["m0"], f["m1"], "-o", t / "x", "-m", t / "x"],
    "plane -m P --plot P": lambda f, t: ["plane", f["m0"], f["m2"], f["m1"], "-m", t / "p.h5", "--plot", t / "p.h5"],
    "evaluate-curve -m E --plot E": lambda f, t: [
        "evaluate-curve", f["m0"], f["m1"], "-m", t / "e.h5", "--plot", t / "e.h5"],
}


@pytest.mark.parametrize("name", list(CLASHES))
def test_outputs_sharing_a_file_are_refused_before_any_work(cli, tmp_path, files, name):
    args = CLASHES[name](files, tmp_path)
    err = cli.error(*args, "--force")
    assert "are the same file" in err
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a lock file


WRONG_ENDINGS = {
    "train -o model.pt": (lambda f, t: ["train", *TINY, "-o", t / "model.pt", "--epochs", "1"],
                          "--output '{t}/model.pt' would hold a safetensors file, but '.pt' is the ending of another "
                          "format; end the name with .safetensors."),
    "train -m metrics.safetensors": (lambda f, t: ["train", *TINY, "-o", t / "m", "-m", t / "m.safetensors",
                                                   "--epochs", "1"], "would hold an HDF5 file, but '.safetensors'"),
    "connect -o curve.pth": (lambda f, t: ["connect", f["m0"], f["m1"], "-o", t / "c.pth"], "'.pth' is the ending"),
    "fge --swa swa.ckpt": (lambda f, t: ["fge", f["m0"], "-o", t / "f", "--swa", t / "swa.ckpt"], "'.ckpt' is the"),
    "evaluate -m out.json": (lambda f, t: ["evaluate", f["m0"], "-m", t / "out.json"], "'.json' is the ending"),
    "ensemble -o e.h5": (lambda f, t: ["ensemble", f["m0"], f["m1"], "-o", t / "e.h5"], "'.h5' is the ending"),
    "point -o p.pt": (lambda f, t: ["point", f["line"], "--t", "0.5", "-o", t / "p.pt"], "'.pt' is the ending"),
    "evaluate-curve --plot e.jpg": (lambda f, t: ["evaluate-curve", f["line"], "-m", t / "e.h5", "--plot",
                                                  t / "e.jpg"], "figures are drawn as PNG, PDF or SVG"),
    "plane --plot p": (lambda f, t: ["plane", f["m0"], f["m2"], f["m1"], "-m", t / "p.h5", "--plot", t / "p"],
                       "end the name with .png, .pdf or .svg"),
    "merge -o m.safetensors": (lambda f, t: ["merge", f["curve_h5"], "-o", t / "m.safetensors"], "would hold an HDF5"),
    "plot --vtk g.vtk": (lambda f, t: ["plot", f["curve_h5"], "--vtk", t / "g.vtk"],
                         "ParaView reads this file by its name's ending; end the name with .vts."),
    "align -o b.bin": (lambda f, t: ["align", f["m0"], f["m1"], "-o", t / "b.bin"], "'.bin' is the ending"),
    "hessian --eigenvectors v.npy": (lambda f, t: ["hessian", f["m0"], "-m", t / "h.h5", "--eigenvectors",
                                                   t / "v.npy"], "'.npy' is the ending"),
    "surface -m s.pt": (lambda f, t: ["surface", f["m0"], "-m", t / "s.pt"], "'.pt' is the"),
    "plot --html g.png": (lambda f, t: ["plot", f["curve_h5"], "--html", t / "g.png"], "would hold an HTML page"),
}


@pytest.mark.parametrize("name", list(WRONG_ENDINGS))
def test_an_output_named_for_another_format_is_refused_before_any_work(cli, tmp_path, files, name):
    args, message = WRONG_ENDINGS[name]
    for force in ((), ("--force",)):
        assert message.format(t=tmp_path) in cli.error(*args(files, tmp_path), *force)
    assert list(tmp_path.iterdir()) == []


INPUTS_AS_OUTPUTS = {
    "evaluate-curve": lambda f: ["evaluate-curve", f["line"], "-m", f["line"]],
    "evaluate-curve --plot": lambda f: ["evaluate-curve", f["m0"], f["m1"], "-m", "unused.h5", "--plot", f["m1"]],
    "plane": lambda f: ["plane", f["m0"], f["m2"], f["m1"], "-m", f["m2"]],
    "point --t": lambda f: ["point", f["line"], "--t", "0.5", "-o", f["line"]],
    "train --init": lambda f: ["train", *TINY, "--init", f["m0"], "-o", f["m0"], "--epochs", "1"],
    "connect": lambda f: ["connect", f["m0"], f["m1"], "-o", f["m1"], "--curve", "line"],
    "connect -m": lambda f: ["connect", f["m0"], f["m1"], "-o", "unused.safetensors", "-m", f["m0"]],
    "fge": lambda f: ["fge", f["m0"], "-o", f["m0"]],
    "fge --swa": lambda f: ["fge", f["m0"], "-o", "unused.safetensors", "--swa", f["m0"]],
    "evaluate -m": lambda f: ["evaluate", f["m0"], "-m", f["m0"]],
    "ensemble -o": lambda f: ["ensemble", f["m0"], f["m1"], "-o", f["m1"]],
    "plot": lambda f: ["plot", f["curve_h5"], "-o", f["curve_h5"]],
}


@pytest.mark.parametrize("name", list(INPUTS_AS_OUTPUTS))
def test_an_input_is_never_overwritten_even_with_force(cli, tmp_path, files, name, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = {k: sha256_file(p) for k, p in files.items()}
    err = cli.error(*INPUTS_AS_OUTPUTS[name](files), "--force")
    assert "is also an input" in err
    assert {k: sha256_file(p) for k, p in files.items()} == before
    assert list(tmp_path.iterdir()) == []


def test_links_to_an_input_are_the_input(cli, tmp_path, files):
    link = tmp_path / "link.h5"
    link.symlink_to(files["m0"])
    assert "is also an input" in cli.error("evaluate", files["m0"], "-m", link, "--force")
    hard = tmp_path / "hard.safetensors"
    os.link(files["line"], hard)
    assert "is also an input" in cli.error("point", files["line"], "--t", "0", "-o", hard, "--force")


def test_an_output_that_is_a_link_writes_the_file_it_leads_to(cli, tmp_path, files):
    """The link was replaced by a regular file (a dangling one even without --force); its target untouched."""
    target, link = tmp_path / "store" / "p.safetensors", tmp_path / "p.safetensors"
    link.symlink_to(target)  # dangling: the target and its folder do not exist yet
    cli("point", files["line"], "--t", "0.5", "-o", link, "-q")
    assert link.is_symlink() and target.is_file()
    assert "already exists" in cli.error("point", files["line"], "--t", "0.25", "-o", link)
    before = sha256_file(target)
    cli("point", files["line"], "--t", "0.25", "-o", link, "-q", "--force")
    assert link.is_symlink() and sha256_file(target) != before
    # train --force deletes the old output first (an interrupted run must not leave it): the file, not the link
    net, store = tmp_path / "net.safetensors", tmp_path / "store" / "net.safetensors"
    net.symlink_to(store)
    args = ["train", *TINY, "--epochs", "1", "-o", net, "-m", tmp_path / "net.h5", "-q"]
    cli(*args)
    cli(*args, "--force")
    assert net.is_symlink() and store.is_file()
    # a lock file that is a link is never followed
    lock = tmp_path / ".q.safetensors.lock"
    lock.symlink_to(tmp_path / "elsewhere")
    assert "is a symbolic link" in cli.error("point", files["line"], "--t", "0.5", "-o", tmp_path / "q.safetensors")
    assert not (tmp_path / "elsewhere").exists() and not (tmp_path / "q.safetensors").exists()


def test_python_callers_get_the_same_clash_checks(tmp_path, files):
    with pytest.raises(OutputError, match="are the same file"):
        evaluate_models([str(files["m0"])], metrics=str(tmp_path / "x"), output=str(tmp_path / "x"))
    with pytest.raises(OutputError, match="is also an input"):
        check_outputs({"--output": files["m0"]}, [files["m0"]], force=True)


def test_an_error_naming_a_file_with_a_newline_is_one_line(cli, tmp_path):
    bad = tmp_path / "bad\nname.safetensors"
    msg = cli.error("evaluate", bad, "--device", "cpu")
    assert "\n" not in msg and "bad\\nname.safetensors" in msg and "does not exist" in msg


def test_a_metrics_file_that_is_a_folder_or_a_pipe_is_named_so(cli, tmp_path):
    folder, pipe = tmp_path / "d.h5", tmp_path / "p.h5"
    folder.mkdir()
    os.mkfifo(pipe)
    for path in (folder, pipe):
        assert "is not a file (a folder, pipe or device)" in cli.error("plot", path, "-o", tmp_path / "x.png")


def test_an_empty_output_name_is_an_error(cli):
    assert "--output is empty (or '.'), not a file name" in cli.error("train", *TINY, "-o", "", "--epochs", "1")
    assert "--output '..' is not a file name" in cli.error("train", *TINY, "-o", "..", "--epochs", "1")
    assert "not a file name" in cli.error("evaluate", "x.safetensors", "-m", "")


# --- 2. numeric options -------------------------------------------------------------------------------------------

BAD_OPTIONS = {
    "point --bn-batches 0": (lambda f: ["point", f["line"], "--t", "0.5", "--bn-batches", "0"],
                             "--bn-batches must be >= 1"),
    "point --bn-batches -3": (lambda f: ["point", f["line"], "--t", "0.5", "--bn-batches", "-3"],
                              "--bn-batches must be >= 1"),
    "point --batch-size 0": (lambda f: ["point", f["line"], "--t", "0.5", "--batch-size", "0"],
                             "--batch-size must be >= 1"),
    "point --t nan": (lambda f: ["point", f["line"], "--t", "nan"], "--t must be a finite number in [0, 1]"),
    "fge --bn-batches 0": (lambda f: ["fge", f["m0"], "--bn-batches", "0"], "--bn-batches must be >= 1"),
    "fge --cycle-epochs inf": (lambda f: ["fge", f["m0"], "--cycle-epochs", "inf"], "--cycle-epochs must be a finite"),
    "fge --cycle-epochs 0": (lambda f: ["fge", f["m0"], "--cycle-epochs", "0"], "--cycle-epochs must be in (0, 1e5]"),
    "fge --lr-min nan": (lambda f: ["fge", f["m0"], "--lr-min", "nan"],
                         "--lr-min must be a finite number in (0, 1e6]"),
    "fge --lr-max inf": (lambda f: ["fge", f["m0"], "--lr-max", "inf"],
                         "--lr-max must be a finite number in (0, 1e6]"),
    "fge --wd nan": (lambda f: ["fge", f["m0"], "--wd", "nan"], "--wd must be a finite number in [0, 1e6]"),
    "ensemble --bn-batches 0": (lambda f: ["ensemble", f["line"], "--num-points", "3", "--bn-batches", "0"],
                                "--bn-batches must be >= 1"),
    "ensemble --num-points 0": (lambda f: ["ensemble", f["line"], "--num-points", "0"], "--num-points must be >= 1"),
    "evaluate --batch-size 0": (lambda f: ["evaluate", f["m0"], "--batch-size", "0"], "--batch-size must be >= 1"),
    "evaluate-curve --bn-batches 0": (lambda f: ["evaluate-curve", f["line"], "-m", "e.h5", "--bn-batches", "0"],
                                      "--bn-batches must be >= 1"),
    "evaluate-curve --wd nan": (lambda f: ["evaluate-curve", f["line"], "-m", "e.h5", "--wd", "nan"],
                                "--wd must be a finite number in [0, 1e6]"),
    "plane --bn-batches 0": (lambda f: ["plane", f["m0"], f["m2"], f["m1"], "-m", "p.h5", "--bn-batches", "0"],
                             "--bn-batches must be >= 1"),
    "plane --margin nan": (lambda f: ["plane", f["m0"], f["m2"], f["m1"], "-m", "p.h5", "--margin", "nan"],
                           "--margin must be a finite number in [0, 10]"),
    "plane --margin-top inf": (lambda f: ["plane", f["m0"], f["m2"], f["m1"], "-m", "p.h5", "--margin-top", "inf"],
                               "--margin-top must be a finite number in [0, 10]"),
    "plane --wd nan": (lambda f: ["plane", f["m0"], f["m2"], f["m1"], "-m", "p.h5", "--wd", "nan"],
                       "--wd must be a finite number in [0, 1e6]"),
    "plane --batch-size 0": (lambda f: ["plane", f["m0"], f["m2"], f["m1"], "-m", "p.h5", "--batch-size", "0"],
                             "--batch-size must be >= 1"),
    "train --wd nan": (lambda f: ["train", *TINY, "--wd", "nan"], "--wd must be a finite number in [0, 1e6]"),
    "train --wd inf": (lambda f: ["train", *TINY, "--wd", "inf"], "--wd must be a finite number in [0, 1e6]"),
    "train --lr inf": (lambda f: ["train", *TINY, "--lr", "inf"], "--lr must be a finite number in (0, 1e6]"),
    "train --momentum nan": (lambda f: ["train", *TINY, "--momentum", "nan"],
                             "--momentum must be a finite number in [0, 1)"),
    "train --snapshots 0": (lambda f: ["train", *TINY, "--schedule", "sse", "--snapshots", "0"],
                            "--snapshots must be >= 1"),
    "train --save-every -1": (lambda f: ["train", *TINY, "--save-every", "-1"], "--save-every must be >= 0"),
    "connect --lr nan": (lambda f: ["connect", f["m0"], f["m1"], "--lr", "nan"],
                         "--lr must be a finite number in (0, 1e6]"),
    "connect --num-bends -1": (lambda f: ["connect", f["m0"], f["m1"], "--num-bends", "-1"],
                               "--num-bends must be >= 0"),
    "connect --num-bends 101": (lambda f: ["connect", f["m0"], f["m1"], "--num-bends", "101"],
                                "--num-bends must be at most 100"),  # a curve file holds at most 100
    "evaluate-curve --num-points 10**9": (lambda f: ["evaluate-curve", f["line"], "-m", "e.h5", "--num-points",
                                                     str(10**9)], "--num-points must be at most 100,000"),
    "plane --grid-points 100000": (lambda f: ["plane", f["m0"], f["m2"], f["m1"], "-m", "p.h5", "--grid-points",
                                              "100000"], "--grid-points must be at most 1,001"),
    "train --lr 1e308": (lambda f: ["train", *TINY, "--lr", "1e308"], "--lr must be in (0, 1e6], got 1e308"),
    # beyond float32's range SGD's update overflowed, or ARPACK's 32-bit counters, or the run could never end
    "train --wd 1e39": (lambda f: ["train", *TINY, "--wd", "1e39"], "--wd must be in [0, 1e6], got 1e39"),
    "train --epochs 10**20": (lambda f: ["train", *TINY, "--epochs", str(10**20)],
                              "--epochs must be at most 100,000"),
    "connect --wd 1e39": (lambda f: ["connect", f["m0"], f["m1"], "--wd", "1e39"], "--wd must be in [0, 1e6]"),
    "fge --wd 1e39": (lambda f: ["fge", f["m0"], "--wd", "1e39", "--cycle-epochs", "1"], "--wd must be in [0, 1e6]"),
    "fge --lr-min 1e39": (lambda f: ["fge", f["m0"], "--lr-min", "1e39", "--cycle-epochs", "1"],
                          "--lr-min must be in (0, 1e6]"),
    "fge --cycle-epochs 1e308": (lambda f: ["fge", f["m0"], "--cycle-epochs", "1e308"],
                                 "--cycle-epochs must be in (0, 1e5], got 1e308"),
    "fge --cycle-iters 10**20": (lambda f: ["fge", f["m0"], "--cycle-iters", str(10**20)],
                                 "--cycle-iters must be at most 1e9"),
    "hessian --max-restarts 3e9": (lambda f: ["hessian", f["m0"], "-m", "h.h5", "--max-restarts", "3000000000"],
                                   "--max-restarts must be at most 1e9"),
    "hessian --trace-samples 10**20": (lambda f: ["hessian", f["m0"], "-m", "h.h5", "--trace", "--trace-samples",
                                                  str(10**20)], "--trace-samples must be at most 1,000,000"),
    "surface --range 1e308": (lambda f: ["surface", f["m0"], "-m", "s.h5", "--range", "1e308"],
                              "--range must be in (0, 1e6], got 1e308"),
    "plane --wd 1e39": (lambda f: ["plane", f["m0"], f["m2"], f["m1"], "-m", "p.h5", "--wd", "1e39"],
                        "--wd must be in [0, 1e6]"),
    "evaluate-curve --wd 1e39": (lambda f: ["evaluate-curve", f["line"], "-m", "e.h5", "--wd", "1e39"],
                                 "--wd must be in [0, 1e6]"),
    "train --seed 2**64": (lambda f: ["train", *TINY, "--seed", str(2**64)],
                           "--seed must be a whole number in [0, 2^32)"),
    "align --seed 10**23": (lambda f: ["align", f["m0"], f["m1"], "-o", "b.safetensors", "--seed", str(10**23)],
                            "--seed must be a whole number in [0, 2^32)"),  # was a traceback
    # one range for every --seed (align's and connect --align's seeds were not the same set)
    "align --seed 2**32": (lambda f: ["align", f["m0"], f["m1"], "-o", "b.safetensors", "--seed", str(2**32)],
                           "--seed must be a whole number in [0, 2^32)"),
    "surface --seed 2**32": (lambda f: ["surface", f["m0"], "-m", "s.h5", "--seed", str(2**32)],
                             "--seed must be a whole number in [0, 2^32)"),
    "hessian --seed 2**32": (lambda f: ["hessian", f["m0"], "-m", "h.h5", "--seed", str(2**32)],
                             "--seed must be a whole number in [0, 2^32)"),
    "train --num-workers -1": (lambda f: ["train", *TINY, "--num-workers", "-1"], "--num-workers must be >= 0"),
    "hessian --train-subset -1": (lambda f: ["hessian", f["m0"], "-m", "h.h5", "--train-subset", "-1"],
                                  "--train-subset must be >= 0"),
    "surface --ignore foo": (lambda f: ["surface", f["m0"], "-m", "s.h5", "--ignore", "foo"],
                             "--ignore takes bn, bias (comma-separated) or none, got 'foo'"),
    "align --max-sweeps 1e10": (lambda f: ["align", f["m0"], f["m1"], "-o", "b.safetensors", "--max-sweeps",
                                           str(10**10)], "--max-sweeps must be at most 1e9"),
    # point checked these only when it recalibrated BN (a network without BN took any value, exit 0)
    "point --device bogus": (lambda f: ["point", f["line"], "--t", "0.5", "--device", "bogus"],
                             "--device must be auto, cpu, cuda or cuda:N, got 'bogus'"),
    "point --num-workers -1": (lambda f: ["point", f["line"], "--t", "0.5", "--num-workers", "-1"],
                               "--num-workers must be >= 0"),
    "point -d bogus": (lambda f: ["point", f["line"], "--t", "0.5", "-d", "bogus"], "unknown data set 'bogus'"),
}


@pytest.mark.parametrize("name", list(BAD_OPTIONS))
def test_bad_numeric_options_are_refused_before_any_work(cli, tmp_path, files, name, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make, message = BAD_OPTIONS[name]
    args = make(files)
    if "-o" not in args:
        args += ["-o", "out.safetensors"] if args[0] in ("train", "connect", "fge", "point") else []
    assert message in cli.error(*args)
    assert list(tmp_path.iterdir()) == []


EXISTING = {  # each names the option that gave the path (they said output, metrics file, plot, ... by command)
    "--output": lambda f: ["train", *TINY, "-o", "x", "-m", "m.h5"],
    "--metrics": lambda f: ["evaluate-curve", f["line"], "-m", "x", "--num-points", "2"],
    "--plot": lambda f: ["evaluate-curve", f["line"], "-m", "e.h5", "--num-points", "2", "--plot", "x.png"],
    "--eigenvectors": lambda f: ["hessian", f["m0"], "-m", "h.h5", "--eigenvectors", "x"],
}


@pytest.mark.parametrize("option", list(EXISTING))
def test_an_existing_output_is_named_by_its_option(cli, tmp_path, files, option, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = EXISTING[option](files)
    existing = args[args.index(option if option != "--output" and option != "--metrics" else
                               {"--output": "-o", "--metrics": "-m"}[option]) + 1]
    (tmp_path / existing).write_bytes(b"keep")
    assert f"Error: {option} '{existing}' already exists; pass --force to overwrite it." in cli.error(*args)
    assert (tmp_path / existing).read_bytes() == b"keep"


@pytest.mark.parametrize("bad", [
    dict(lr=math.inf), dict(lr=math.nan), dict(wd=math.nan), dict(wd=-1.0), dict(momentum=1.0), dict(epochs=0),
    dict(epochs=2.5), dict(batch_size=0), dict(save_every=-1), dict(snapshots=0), dict(arch_kwargs='{"hidden": 8}')])
def test_python_callers_get_the_same_option_errors(bad):
    with pytest.raises(ConfigError, match="must be"):
        TrainConfig(**bad).validate()


FGE_LRS = dict(lr_max=0.05, lr_min=0.0005, wd=5e-4)


@pytest.mark.parametrize("cfg", [
    ConnectConfig(momentum=math.nan), ConnectConfig(num_bends=-1), FGEConfig(**FGE_LRS, cycle_epochs=math.inf),
    FGEConfig(**FGE_LRS, cycle_iters=1), FGEConfig(**{**FGE_LRS, "lr_min": math.nan}),
    FGEConfig(**{**FGE_LRS, "lr_max": math.inf}), FGEConfig(**{**FGE_LRS, "lr_min": 1.0}),
    FGEConfig(**FGE_LRS, bn_batches=0)])
def test_config_validation_refuses_non_finite_and_out_of_range(cfg):
    with pytest.raises(ConfigError):
        cfg.validate()


def test_plane_and_curve_functions_check_their_numbers(files, tmp_path):
    paths = [str(files["m0"]), str(files["m2"]), str(files["m1"])]
    with pytest.raises(ConfigError, match="--margin-bottom"):
        plane(paths, tmp_path / "p.h5", margins=(0.2, 0.2, math.nan, 0.2))
    with pytest.raises(ConfigError, match="--train-subset"):
        plane(paths, tmp_path / "p.h5", train_subset=-1)
    with pytest.raises(ConfigError, match="--batch-size"):
        mctool.curve_eval.export_point(files["line"], 0.5, tmp_path / "x.safetensors", batch_size=0)
    with pytest.raises(ConfigError, match="--num-points"):
        mctool.curve_eval.evaluate_curve([str(files["line"])], tmp_path / "e.h5", num_points=1)
    assert list(tmp_path.iterdir()) == []


class _Batches:
    def __init__(self, n: int):
        self.x = torch.randn(n, 4, generator=torch.Generator().manual_seed(0)) * 3 + 5

    def batches(self, batch_size: int, **order):  # in stored order, whatever order is asked for
        for i in range(0, len(self.x), batch_size):
            yield self.x[i:i + batch_size], None


def test_bn_recalibration_never_reports_reset_statistics_as_recomputed():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    nn.init.eye_(model[0].weight)
    nn.init.zeros_(model[0].bias)
    for bad in (0, -1):
        with pytest.raises(ConfigError, match="--bn-batches must be >= 1"):
            recalibrate_bn(model, _Batches(8), max_batches=bad)
    with pytest.raises(ConfigError, match="--batch-size must be >= 1"):
        recalibrate_bn(model, _Batches(8), batch_size=0)
    with pytest.raises(DataError, match="no training images"):
        recalibrate_bn(model, _Batches(0))
    split = _Batches(64)
    assert recalibrate_bn(model, split, batch_size=16, max_batches=4)
    # 4 batch means of 16 averaged against one mean of 64: within ~70 x 2^-24 of max |x|; allow 1e-4 of it
    torch.testing.assert_close(model[1].running_mean, split.x.mean(0), rtol=0, atol=1e-4 * float(split.x.abs().max()))


# --- 3. Ctrl-C ----------------------------------------------------------------------------------------------------

def _ctrl_c_on_call(monkeypatch, module, n: int):
    """Make ``module.evaluate_weights`` raise KeyboardInterrupt on its n-th call (1-based); with
    --points-per-pass 1 every network is evaluated there (``mctool.batched``)."""
    real = module.evaluate_weights
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "evaluate_weights", interrupted)
    return lambda: monkeypatch.setattr(module, "evaluate_weights", real)


def test_a_network_whose_logits_overflow_is_measured_not_left_nan(cli, tmp_path, files, monkeypatch):
    """Logits that overflow to infinity give an image no prediction (wrong, largest NLL): the point has
    numbers, not NaN, so --resume has nothing left to compute and the shards of such a run merge."""
    loaded = load_model(files["m0"])
    with torch.no_grad():
        last = [m for m in loaded.model.modules() if isinstance(m, nn.Linear)][-1]
        last.weight.mul_(1e38)  # finite weights, but the logits overflow float32
    big = tmp_path / "big.safetensors"
    save_model(big, loaded.model, loaded.meta)
    m = tmp_path / "e.h5"
    run = cli("evaluate-curve", big, files["m1"], "-m", m, "--num-points", "3", "-q", "--device", "cpu")
    assert "Warning" not in run.stderr  # the 3 points still go in one pass (the wide network's check copes)
    values, _ = read_h5(m)
    for name in ("train/loss", "train/nll", "train/err", "test/nll", "test/err"):
        assert np.isfinite(values[name]).all(), name
    assert values["train/loss"][0] > 1e60  # the L2 term of weights of 1e38, summed in float64 (inf in float32)
    assert values["test/err"][0] > 0.5 and values["test/nll"][0] > 10  # most images: wrong, NLL -log(1e-300)
    calls = count_networks(monkeypatch)
    cli("evaluate-curve", big, files["m1"], "-m", m, "--num-points", "3", "--resume", "-q", "--device", "cpu")
    assert calls == []
    shards = [tmp_path / f"s{i}.h5" for i in range(2)]
    for i, shard in enumerate(shards):
        cli("evaluate-curve", big, files["m1"], "-m", shard, "--num-points", "3", "--shard", f"{i}/2", "-q",
            "--device", "cpu")
    merged = tmp_path / "merged.h5"
    cli("merge", *shards, "-o", merged, "-q")
    assert read_h5(merged)[0]["test/nll"] == pytest.approx(values["test/nll"], rel=1e-6)


def test_ctrl_c_in_evaluate_curve_keeps_the_points_and_says_how_to_resume(cli, tmp_path, files, monkeypatch):
    m = tmp_path / "e.h5"
    args = ["evaluate-curve", files["m0"], files["m1"], "-m", m, "--num-points", "4", "--device", "cpu",
            "--points-per-pass", "1"]
    restore = _ctrl_c_on_call(monkeypatch, mctool.batched, 3)
    err = cli.error(*args, code=130)
    assert err == f"Error: interrupted; 2 of 4 points are saved in '{m}'. Continue with the same command plus --resume."
    data, _ = read_h5(m)
    assert np.isfinite(data["train/loss"][:2]).all() and np.isnan(data["train/loss"][2:]).all()
    restore()
    r = cli.json(*args, "--resume")
    assert np.isfinite(read_h5(m)[0]["train/loss"]).all()
    assert r["command"] == "evaluate-curve"


def test_ctrl_c_in_plane_keeps_the_points_and_says_how_to_resume(cli, tmp_path, files, monkeypatch):
    m = tmp_path / "p.h5"
    args = ["plane", files["m0"], files["m2"], files["m1"], "-m", m, "--grid-points", "2", "--device", "cpu",
            "--points-per-pass", "1"]
    restore = _ctrl_c_on_call(monkeypatch, mctool.batched, 5)
    err = cli.error(*args, code=130)
    assert err == f"Error: interrupted; 4 of 7 points are saved in '{m}'. Continue with the same command plus --resume."
    data, _ = read_h5(m)
    assert np.isfinite(data["at_points/train/loss"]).all() and np.isnan(data["train/loss"]).sum() == 3
    restore()
    cli(*args, "--resume", "-q")
    assert np.isfinite(read_h5(m)[0]["train/loss"]).all()


def _wait_for_handlers(pid: int, signals: set[int], timeout: float = 60) -> None:
    """Wait until process ``pid`` catches all of ``signals`` (Linux's /proc; elsewhere 0.3 s). A fixed sleep
    signalled a process that had not reached mctool's handlers yet on a loaded machine (Python's own
    KeyboardInterrupt traceback, or death by SIGTERM), or one that was done already on a fast one."""
    import time

    status = Path(f"/proc/{pid}/status")
    if not status.exists():
        time.sleep(0.3)
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            caught = int(next(line for line in status.read_text().splitlines()
                              if line.startswith("SigCgt:")).split()[1], 16)
        except (OSError, StopIteration):  # the process has ended
            return
        if all(caught >> (s - 1) & 1 for s in signals):
            return
        time.sleep(0.002)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_signal_while_the_command_starts_gives_one_line(tmp_path, sig):
    """Ctrl-C (or SIGTERM) in the seconds `python -m mctool` spends importing torch: one Error line, exit 130,
    no traceback; a Python program importing mctool keeps Python's own handling."""
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    # SIGHUP as a terminal's for the child: under `nohup pytest` it is ignored from the start (an ignored signal
    # stays ignored across exec), and mctool leaves it so
    hangup = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        p = subprocess.Popen([sys.executable, "-m", "mctool", "info", tmp_path / "x.h5"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
    finally:
        signal.signal(signal.SIGHUP, hangup)
    _wait_for_handlers(p.pid, {sig, signal.SIGTERM})  # then inside `import torch` (seconds)
    p.send_signal(sig)
    out, err = p.communicate(timeout=60)
    said = "interrupted (Ctrl-C)" if sig == signal.SIGINT else f"stopped ({signal.Signals(sig).name})"
    assert (p.returncode, out, err) == (130, "", f"Error: {said}.\n")
    script = "import mctool, signal; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"
    assert subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          timeout=60).stdout == "True\n"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_signal_after_the_work_is_done_or_while_an_error_is_reported_changes_no_exit_code(tmp_path, sig):
    """A signal that arrives once the work is done (the result being printed) or while an error is reported:
    the exit code stays the run's, 0 or 1 (a SIGTERM ended a finished run with 143, a Ctrl-C an error's with -2)."""
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    h5 = tmp_path / "m.h5"
    with h5py.File(h5, "w") as f:
        f["x"] = np.zeros(2)
    # the mctool command (its argv[0]), with the signal sent to itself just before it prints its result or error
    script = ("import os, signal, sys\n"
              "sys.argv[0] = 'mctool'\n"
              "import mctool.cli as cli\n"
              "def before(real):\n"
              "    return lambda *a: (os.kill(os.getpid(), signal.Signals[os.environ['SIG']]), real(*a))[1]\n"
              "cli._print_json, cli._error = before(cli._print_json), before(cli._error)\n"
              "cli.main()\n")
    hangup = signal.signal(signal.SIGHUP, signal.SIG_DFL)  # (as a terminal's: see the test above)
    try:
        for target, code in ((h5, 0), (tmp_path / "none.h5", 1)):
            done = subprocess.run([sys.executable, "-c", script, "info", str(target), "--json"], capture_output=True,
                                  text=True, env={**env, "SIG": signal.Signals(sig).name}, timeout=120)
            assert done.returncode == code, done.stderr
            if code == 0:
                assert json.loads(done.stdout)["command"] == "info"
            else:
                assert done.stderr.startswith("Error: ") and "does not exist" in done.stderr, done.stderr
    finally:
        signal.signal(signal.SIGHUP, hangup)


def test_more_ctrl_c_after_the_interruption_is_reported_add_nothing(tmp_path):
    """Users press Ctrl-C twice: once the interruption is reported, further ones must not break the exit
    (mctool 0.2.0 then printed `Exception ignored in atexit callback` tracebacks and died of SIGINT)."""
    import subprocess
    import time

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = tmp_path / "t.safetensors"
    p = subprocess.Popen([sys.executable, "-m", "mctool", "train", "-d", "digits", "--epochs", "100", "-o", out,
                          "--device", "cpu", "-q"], stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not (tmp_path / "t.state.safetensors").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    first = p.stderr.readline()
    for _ in range(5):
        time.sleep(0.01)
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
    err = first + p.stderr.read()
    p.stderr.close()
    # (A Ctrl-C that lands in a finalizer, a weakref callback, is printed and dropped by Python itself as
    # "Exception ignored ..."; one of the next ones stops the run. What follows the report must be nothing.)
    assert p.wait(timeout=60) == 130 and "Error: " in err, err
    report = err[err.index("Error: "):]
    assert report.startswith(("Error: interrupted during epoch", "Error: interrupted while saving epoch")), err
    assert report.count("\n") == 1, err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_without_a_launcher_ends_a_run_like_ctrl_c(cli, tmp_path, files, monkeypatch, sig, request):
    """What SLURM (a --shard job-array task at its time limit) or `timeout` sends, or SIGHUP (the terminal
    closed: it exited 129 without a word, leaving lock files): the points are kept, the lock removed, one Error
    line, exit 130, and --resume completes the file."""
    m = tmp_path / "e.h5"
    args = ["evaluate-curve", files["m0"], files["m1"], "-m", m, "--num-points", "4", "--device", "cpu",
            "--points-per-pass", "1"]
    real, calls = mctool.batched.evaluate_weights, {"n": 0}

    def terminated(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), sig)  # delivered before the call returns
        return real(*a, **k)

    monkeypatch.setattr(mctool.batched, "evaluate_weights", terminated)
    if sig == signal.SIGHUP:  # as in a terminal: under `nohup pytest` it is ignored, and mctool leaves it so
        previous = signal.signal(sig, signal.SIG_DFL)
        request.addfinalizer(lambda: signal.signal(sig, previous))
    before = signal.getsignal(sig)
    err = cli.error(*args, code=130)
    assert err == f"Error: interrupted; 2 of 4 points are saved in '{m}'. Continue with the same command plus --resume."
    assert signal.getsignal(sig) is before  # the handler is the command's only
    assert not list(tmp_path.glob(".*.lock"))
    monkeypatch.setattr(mctool.batched, "evaluate_weights", real)
    cli(*args, "--resume", "-q")
    assert np.isfinite(read_h5(m)[0]["train/loss"]).all()


def test_ctrl_c_while_starting_up_exits_130_without_a_traceback(cli, tmp_path, files, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(mctool.curve_eval, "load_data", interrupted)
    err = cli.error("evaluate-curve", files["line"], "-m", tmp_path / "e.h5", code=130)
    assert err == "Error: interrupted (Ctrl-C)."
    assert not list(tmp_path.glob(".*.lock"))  # the lock is released

    def terminated(*args, **kwargs):  # what a launcher, `timeout` or a job's time limit sends: said as it is
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(mctool.curve_eval, "load_data", terminated)
    assert cli.error("evaluate-curve", files["line"], "-m", tmp_path / "e.h5", code=130) == \
        "Error: stopped (SIGTERM)."
    monkeypatch.setattr(mctool.curve_eval, "load_data", interrupted)  # and the next command's Ctrl-C is a Ctrl-C
    assert cli.error("evaluate-curve", files["line"], "-m", tmp_path / "e.h5", code=130) == \
        "Error: interrupted (Ctrl-C)."


def test_sighup_is_left_ignored_under_nohup(cli, tmp_path, files, monkeypatch):
    """nohup starts a command with SIGHUP ignored, so that it outlives the terminal: it stays ignored."""
    m = tmp_path / "e.h5"
    real = mctool.batched.evaluate_weights

    def hung_up(*a, **k):
        os.kill(os.getpid(), signal.SIGHUP)
        return real(*a, **k)

    monkeypatch.setattr(mctool.batched, "evaluate_weights", hung_up)
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        cli("evaluate-curve", files["m0"], files["m1"], "-m", m, "--num-points", "3", "--device", "cpu",
            "--points-per-pass", "1", "-q")
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert np.isfinite(read_h5(m)[0]["train/loss"]).all()


def _command(*args: object, **popen: object) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "MCTOOL_LOG_EVERY": "0"}
    return subprocess.Popen([sys.executable, "-m", "mctool", *map(str, args)], text=True, env=env, **popen)


def test_a_stderr_whose_reader_went_away_does_not_stop_the_run(tmp_path, files):
    """`mctool train ... 2>&1 | head`: the next progress line met a broken pipe and the run stopped there, exit 1,
    without a word. Human output is dropped instead; with stderr closed, --json still prints."""
    out = tmp_path / "t.safetensors"
    p = _command("train", "-d", "digits", "--epochs", "6", "-o", out, "--device", "cpu", stdout=subprocess.DEVNULL,
                 stderr=subprocess.PIPE)
    p.stderr.readline()  # the first progress line, then the reader goes away
    p.stderr.close()
    assert p.wait(timeout=120) == 0 and out.exists()
    assert read_h5(tmp_path / "t.h5")[0]["epoch"].tolist() == [1, 2, 3, 4, 5, 6]
    closed = _command("evaluate", files["m0"], "--device", "cpu", "--json", stdout=subprocess.PIPE,
                      preexec_fn=lambda: os.close(2))
    with closed.stdout:
        assert closed.wait(timeout=120) == 0 and json.loads(closed.stdout.read())["command"] == "evaluate"


def test_json_with_stdout_closed_or_its_reader_gone(tmp_path, files):
    """`--json >&-`: one Error line (was a traceback); `--json | true`: exit 141 as a shell reports SIGPIPE (was
    exit 1 without a word), the work done."""
    closed = _command("evaluate", files["m0"], "--device", "cpu", "--json", stderr=subprocess.PIPE,
                      preexec_fn=lambda: os.close(1))
    err = closed.communicate(timeout=120)[1]
    assert closed.returncode == 1 and err.splitlines()[-1].startswith("Error: stdout is closed"), err
    m = tmp_path / "e.h5"
    gone = _command("evaluate", files["m0"], "-m", m, "--device", "cpu", "--json", "-q", stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE)
    gone.stdout.close()  # the reader exits before the result is printed
    err = gone.stderr.read()
    gone.stderr.close()  # (left open: a ResourceWarning, an error under PYTHONWARNINGS=error)
    assert gone.wait(timeout=120) == 141 and err == "" and m.exists()


def test_json_on_a_full_stdout_is_one_error_line(files):
    """`--json > /dev/full`: the write fails with ENOSPC after the work; one Error line, not a traceback."""
    with open("/dev/full", "w") as full:
        p = _command("evaluate", files["m0"], "--device", "cpu", "--json", "-q", stdout=full, stderr=subprocess.PIPE)
        err = p.communicate(timeout=120)[1]
    assert p.returncode == 1 and err.startswith("Error: cannot print the --json result on stdout (No space left"), err


def test_a_dash_is_not_taken_for_a_file_name(cli, tmp_path, files, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert "writes files, not to stdout" in cli.error("evaluate", files["m0"], "-m", "-", "--device", "cpu")
    assert not (tmp_path / "-").exists()


# --- 4. atomic writes ---------------------------------------------------------------------------------------------

@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names the synced files through /proc (Linux)")
def test_atomic_writes_sync_and_leave_the_umask_alone(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))

    def no_umask(mask):
        raise AssertionError("os.umask changes the umask of every thread")

    monkeypatch.setattr(os, "umask", no_umask)
    out = tmp_path / "a.bin"
    with atomic_path(out) as tmp:
        tmp.write_bytes(b"x")
    assert out.read_bytes() == b"x"
    assert len(synced) == 2 and synced[0].endswith(".tmp") and synced[1] == str(tmp_path)
    assert list(tmp_path.iterdir()) == [out]


def test_a_folder_that_cannot_be_opened_for_syncing_is_no_error(tmp_path, monkeypatch):
    """Windows cannot open a folder (to fsync it after the rename): the file is in place, and that is no error."""
    real_open = os.open

    def no_folders(path, flags, *args):
        if os.path.isdir(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_folders)
    out = tmp_path / "a.bin"
    with atomic_path(out) as tmp:
        tmp.write_bytes(b"x")
    assert out.read_bytes() == b"x" and list(tmp_path.iterdir()) == [out]


def test_names_a_run_records_use_slashes_on_every_system(monkeypatch):
    """A training state records its metrics file relative to -o (and hessian its eigenvectors): with '/', so a run
    folder made on Windows resumes on Linux or macOS; a file on another drive is recorded whole."""
    import ntpath
    import types
    from pathlib import PureWindowsPath

    from mctool import loop

    monkeypatch.setattr(loop, "os", types.SimpleNamespace(path=ntpath))
    monkeypatch.setattr(loop, "Path", PureWindowsPath)
    out = PureWindowsPath(r"C:\runs\a\m.safetensors")
    assert loop.relative_to_output(r"C:\runs\a\logs\m.h5", out) == "logs/m.h5"
    assert loop.relative_to_output(r"C:\runs\b.h5", out) == "../b.h5"
    assert loop.relative_to_output(r"D:\m.h5", out) == "D:/m.h5"


def test_mctool_imports_without_posix_only_signals_and_fork_hooks(tmp_path):
    """Windows has no SIGHUP, os.register_at_fork or fcntl: `import mctool` (and the command's start-up, which
    installs its signal handlers) must not need them."""
    script = (
        "import builtins, os, signal, sys, torch\n"  # (torch registers its own fork hooks where there are any)
        "del signal.SIGHUP, os.register_at_fork\n"
        "real = builtins.__import__\n"
        "def imp(name, *a, **k):\n"
        "    if name == 'fcntl': raise ImportError(name)\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = imp\n"
        "import mctool._launch_env as e\n"
        "assert e._hangup_ignored\n"
        "import mctool\n"
        "from mctool.distributed import STOP_SIGNALS, _sigterm_as_ctrl_c\n"
        "assert STOP_SIGNALS == (signal.SIGTERM,)\n"
        "with _sigterm_as_ctrl_c(): pass\n"
        "print('ok')\n")
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"},
                       timeout=120)
    assert p.returncode == 0 and p.stdout == "ok\n", p.stderr[-2000:]


@pytest.mark.parametrize("how", ["oserror", "safetensors", "safetensors-0.8"])
def test_a_full_disk_is_an_error_and_keeps_the_old_checkpoint(cli, tmp_path, files, monkeypatch, how):
    from safetensors import SafetensorError

    out = tmp_path / "p.safetensors"
    cli("point", files["line"], "--t", "0.5", "-o", out, "-q")
    before = sha256_file(out)

    def full(*args, **kwargs):
        if how == "oserror":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if how == "safetensors":  # the words of safetensors before 0.5...
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                                  '"No space left on device" })')
        raise SafetensorError("I/O error: No space left on device (os error 28)")  # ...and of 0.8

    monkeypatch.setattr(mctool.checkpoint, "save_file", full)
    err = cli.error("point", files["line"], "--t", "0.25", "-o", out, "--force")
    assert err == f"Error: cannot write '{out}': No space left on device."
    assert sha256_file(out) == before and list(tmp_path.iterdir()) == [out]


def test_a_full_disk_while_writing_metrics_is_an_error(cli, tmp_path, files, monkeypatch):
    # the file is built in memory and written as bytes: a full disk fails that write (h5py writing to the
    # disk itself raised RuntimeError and could crash the interpreter)
    real, writes = Path.write_bytes, []

    def full(self, data):
        writes.append(self)
        if len(writes) == 2:  # the second flush of the file
            with open(self, "wb") as f:  # part of it, then no room
                f.write(bytes(data)[:100])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", full)
    m = tmp_path / "e.h5"
    err = cli.error("evaluate-curve", files["line"], "-m", m, "--num-points", "2", "--device", "cpu")
    assert err == f"Error: cannot write '{m}': No space left on device."
    # the first flush stays whole: the interrupted write never replaced it
    assert list(tmp_path.iterdir()) == [m] and read_h5(m)[1]["kind"] == "evaluate-curve"


# --- 5. temporary files left by killed runs, and locks --------------------------------------------------------------

def test_stale_temporary_files_of_an_output_are_removed(cli, tmp_path, files):
    out = tmp_path / "p.safetensors"
    stale = [tmp_path / ".p.safetensors.k2j4_x9a.tmp", tmp_path / ".p.safetensors.00000000.tmp"]
    kept = [tmp_path / ".q.safetensors.k2j4_x9a.tmp", tmp_path / ".p.safetensors.toolongname.tmp",
            tmp_path / "p.safetensors.k2j4_x9a.tmp"]
    for p in stale + kept:
        p.write_bytes(b"half a checkpoint")
    cli("point", files["line"], "--t", "0.5", "-o", out, "-q")
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)
    assert out.exists() and not lock_path(out).exists()


def test_safetensors_own_temporary_file_is_written_where_the_next_run_removes_it(cli, tmp_path, files,
                                                                                  monkeypatch):
    """safetensors (>= 0.6) writes '.tmpXXXXXX' beside the file it is given and renames it: a run killed
    meanwhile (kill -9) left it in the output's folder for good. It is now written inside a folder named like
    the output's temporary file, which the next run writing that output removes."""
    out = tmp_path / "p.safetensors"
    stale = tmp_path / ".p.safetensors.k2j4_x9a.tmp"  # a killed run's folder, safetensors' file inside
    stale.mkdir()
    (stale / ".tmpAbC123").write_bytes(b"half a checkpoint")
    other = tmp_path / ".q.safetensors.k2j4_x9a.tmp"  # another output's: kept
    other.mkdir()
    real, folders = mctool.checkpoint.save_file, []

    def save_file(tensors, filename, metadata=None):
        folders.append(Path(filename).parent)
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(mctool.checkpoint, "save_file", save_file)
    cli("point", files["line"], "--t", "0.5", "-o", out, "-q")
    assert not stale.exists() and other.exists()
    assert [f.parent for f in folders] == [tmp_path] and re.fullmatch(r"\.p\.safetensors\.[a-z0-9_]{8}\.tmp",
                                                                        folders[0].name)
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name, out.name]


def test_a_killed_runs_forked_children_do_not_keep_its_locks(tmp_path):
    """A forked child (a DataLoader worker of an imagefolder run) shared the run's flock locks: after kill -9 the
    orphaned workers kept the outputs locked until they noticed (about 1.5 s) and an immediate --resume was
    refused ('another mctool run is writing'). Children close their copies of the lock descriptors."""
    out = tmp_path / "m.safetensors"
    code = textwrap.dedent(f"""
        import os, sys, time
        from mctool.fileio import _lock
        release = _lock({str(out)!r})
        worker = os.fork()
        if worker == 0:  # the worker: lives on after its parent is gone (off the test's pipes)
            os.dup2(os.open(os.devnull, os.O_RDWR), 1)
            os.dup2(os.open(os.devnull, os.O_RDWR), 2)
            time.sleep(60)
            os._exit(0)
        print(worker, flush=True)
        os._exit(0)  # killed: nothing released
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    worker = int(done.stdout.strip())
    try:
        os.kill(worker, 0)  # still alive
        release = importlib.import_module("mctool.fileio")._lock(out)  # not refused
        release()
    finally:
        os.kill(worker, signal.SIGKILL)


def test_a_second_run_on_a_locked_output_is_refused(cli, tmp_path, files):
    out = tmp_path / "m.safetensors"
    fd = os.open(lock_path(out), os.O_RDWR | os.O_CREAT)
    tmp = tmp_path / ".m.safetensors.abcdefgh.tmp"  # the other run's temporary file: not touched
    tmp.write_bytes(b"being written")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        err = cli.error("train", *TINY, "-o", out, "--epochs", "1", "--force")
        assert f"another mctool run is writing '{out}'" in err
        assert tmp.exists() and not out.exists() and not (tmp_path / "m.h5").exists()
    finally:
        os.close(fd)
    cli("train", *TINY, "-o", out, "--epochs", "1", "--force", "-q")
    assert out.exists() and not tmp.exists() and not lock_path(out).exists()


def test_two_outputs_that_are_one_file_on_this_file_system_are_named(cli, tmp_path):
    """On a case-insensitive file system (macOS, Windows) -o E.safetensors --swa e.safetensors are one file, and
    so are their lock files: the second lock is this command's own, not another run's. (A hard link between
    the lock files stands in for such a file system here.)"""
    out, metrics = tmp_path / "a.safetensors", tmp_path / "b.h5"
    os.close(os.open(lock_path(out), os.O_RDWR | os.O_CREAT))
    os.link(lock_path(out), lock_path(metrics))
    err = cli.error("train", *TINY, "-o", out, "-m", metrics, "--epochs", "1")
    assert f"'{out}' and '{metrics}' are one file on this file system (names that differ only in case" in err
    assert "another mctool run" not in err and not out.exists() and not metrics.exists()


def test_runs_sharing_a_training_state_cannot_run_together(cli, tmp_path):
    """``-o x`` and ``-o x.safetensors`` are two outputs with one training state, x.state.safetensors: it is
    locked too, so the second run is refused instead of mixing its epochs into the first one's state."""
    state = tmp_path / "x.state.safetensors"
    fd = os.open(lock_path(state), os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        err = cli.error("train", *TINY, "-o", tmp_path / "x", "-m", tmp_path / "x.h5", "--epochs", "1")
        assert f"another mctool run is writing '{state}'" in err
    finally:
        os.close(fd)
    cli("train", *TINY, "-o", tmp_path / "x", "-m", tmp_path / "x.h5", "--epochs", "1", "-q")
    assert not lock_path(state).exists() and not state.exists()


def test_locks_are_held_for_the_whole_call_and_released_on_errors(tmp_path):
    out = tmp_path / "x.h5"

    def locked_elsewhere() -> bool:
        fd = os.open(lock_path(out), os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    @holds_output_locks
    def run(fail: bool) -> None:
        check_outputs({"--metrics": out}, force=True)
        check_outputs({"--metrics": out}, force=True)  # a second check in the same call does not lock itself out
        assert locked_elsewhere()
        if fail:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(True)
    assert not lock_path(out).exists()
    run(False)
    assert not lock_path(out).exists()


LOCKING = {
    "train": lambda f, t: ["train", *TINY, "-o", t / "o.safetensors", "--epochs", "1"],
    "connect": lambda f, t: ["connect", f["m0"], f["m1"], "--curve", "line", "-o", t / "o.safetensors"],
    "fge": lambda f, t: ["fge", f["m0"], "-o", t / "o.safetensors", "--epochs", "1", "--cycle-iters", "2",
                         "--device", "cpu"],
    "evaluate-curve": lambda f, t: ["evaluate-curve", f["line"], "-m", t / "o", "--num-points", "2", "--device", "cpu"],
    "plane": lambda f, t: ["plane", f["m0"], f["m2"], f["m1"], "-m", t / "o", "--grid-points", "2", "--device", "cpu"],
    "point": lambda f, t: ["point", f["line"], "--t", "0.5", "-o", t / "o"],
    "evaluate": lambda f, t: ["evaluate", f["m0"], "-m", t / "o", "--device", "cpu"],
    "ensemble": lambda f, t: ["ensemble", f["m0"], f["m1"], "-o", t / "o", "--device", "cpu"],
    "plot": lambda f, t: ["plot", f["curve_h5"], "-o", t / "o.png"],
}


@pytest.mark.parametrize("name", list(LOCKING))
def test_every_writing_command_locks_its_outputs(cli, tmp_path, files, name, monkeypatch):
    real, held = mctool.fileio._lock, []

    def recorded(output):
        held.append(output)
        release = real(output)
        assert lock_path(output).exists()
        return release

    monkeypatch.setattr(mctool.fileio, "_lock", recorded)
    cli(*LOCKING[name](files, tmp_path), "-q")
    assert {tmp_path / "o", tmp_path / "o.safetensors", tmp_path / "o.png"} & set(held)
    assert not list(tmp_path.glob(".*"))  # locks released, no temporary files left


def test_two_concurrent_runs_cannot_both_write_one_output(tmp_path):
    import subprocess

    script = ("import time, mctool.fileio as f\n"
              "@f.holds_output_locks\n"
              "def run():\n"
              f"    f.check_outputs({{'-o': {str(tmp_path / 'm.safetensors')!r}}}, force=True)\n"
              "    print('locked', flush=True)\n"
              "    time.sleep(30)\n"
              "run()\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}  # this checkout's mctool
    first = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert first.stdout.readline() == "locked\n"
        second = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env)
        assert second.returncode != 0 and "another mctool run is writing" in second.stderr
    finally:
        first.kill()
        first.wait()
        first.stdout.close()


# --- 6. what an interrupted run leaves, and --force ----------------------------------------------------------------

def test_fge_interrupted_after_its_first_snapshot_says_what_to_run(cli, tmp_path, files, monkeypatch):
    out = tmp_path / "f.safetensors"
    args = ["fge", files["m0"], "-o", out, "--epochs", "2", "--cycle-iters", "4", "--device", "cpu", "-q"]
    restore = ctrl_c_during_epoch(monkeypatch, 1, after_batches=3)  # the first snapshot is after iteration 2
    err = cli.error(*args, code=130)
    assert "nothing resumable was saved" in err and "plus --force" in err
    assert (tmp_path / "f.h5").exists() and not (tmp_path / "f.state.safetensors").exists()
    restore()
    cli(*args, "--force")
    assert out.exists()


class _Killed(BaseException):
    """``kill -9``: nothing of the run's own clean-up runs (no ``except Exception``, no Ctrl-C handling)."""


@pytest.mark.parametrize("command", ["train", "fge"])
def test_a_run_killed_before_its_first_epoch_was_saved_is_named_so(cli, tmp_path, files, monkeypatch, command):
    """``kill -9`` during epoch 1 of a run that writes its metrics file at a snapshot in epoch 1 (fge, train
    --schedule sse) leaves that file and no training state: the rerun and the --resume are refused with what
    happened and the option that starts over (not --init of an output that does not exist), which then runs."""
    args = {"train": ["train", *TINY, "--schedule", "sse", "--snapshots", "1"],
            "fge": ["fge", files["m0"], "--device", "cpu", "--cycle-epochs", "1"]}[command] + ["--epochs", "1", "-q"]
    module = importlib.import_module(f"mctool.{'training' if command == 'train' else 'fge'}")
    save_model = module.write_model

    def killed_at_the_first_state(path, *a, **k):
        if str(path).endswith(".state.safetensors"):
            raise _Killed
        return save_model(path, *a, **k)

    left, out = tmp_path / "m.h5", tmp_path / "m.safetensors"
    args = [*args, "-m", left]
    with monkeypatch.context() as m:
        m.setattr(module, "write_model", killed_at_the_first_state)
        with pytest.raises(_Killed):
            cli(*args, "-o", out)
    with h5py.File(left, "r") as f:  # what the killed run left: its metrics file, no epoch in it
        assert "finished" not in f.attrs and f["epoch"].shape == (0,)
    assert not out.exists() and not out.with_name("m.state.safetensors").exists()
    err = cli.error(*args, "-o", out)
    assert f"--metrics '{left}' was left by a run that stopped before its first epoch was saved" in err
    assert "pass --force to start over" in err
    err = cli.error(*args, "-o", out, "--resume")
    assert "nothing to resume" in err and "start over with --force instead of --resume" in err
    assert "--init" not in err  # (no weights to start from: the run wrote none)
    cli(*args, "-o", out, "--force")
    assert out.exists()


@pytest.mark.parametrize("command", ["train", "connect", "fge"])
def test_an_interrupted_runs_metrics_given_to_another_output_is_not_called_killed(cli, tmp_path, files, command):
    """An unfinished metrics file with epochs had a training state (each epoch's row is written after it): one
    given as --metrics of another output belongs to a resumable run, not to one killed before its first epoch;
    it is an existing file like any other (--force, the advice for the killed one, would lose that run's)."""
    args = {"train": ["train", *TINY], "connect": ["connect", files["m0"], files["m1"], "--device", "cpu"],
            "fge": ["fge", files["m0"], "--device", "cpu", "--cycle-epochs", "1"]}[command] + ["--epochs", "1", "-q"]
    cli(*args, "-o", tmp_path / "done.safetensors", "-m", tmp_path / "done.h5")
    left = tmp_path / "other.h5"  # another run's, interrupted after some epochs (its state beside its output)
    shutil.copy(tmp_path / "done.h5", left)
    with h5py.File(left, "r+") as f:
        del f.attrs["finished"]
    out, args = tmp_path / "m.safetensors", [*args, "-m", left]
    err = cli.error(*args, "-o", out)
    assert "already exists; pass --force" in err and "before its first epoch" not in err
    err = cli.error(*args, "-o", out, "--resume")
    assert "nothing to resume" in err and "before its first epoch" not in err and "--init" not in err


@pytest.mark.parametrize("command", ["train", "connect", "fge"])
def test_ctrl_c_after_the_last_epoch_says_how_to_finish(cli, tmp_path, files, monkeypatch, command):
    """Ctrl-C while a run writes its outputs after the last epoch keeps the state of every epoch; the message
    says to resume, and the resumed run, training nothing again, writes what an uninterrupted run writes."""
    module = importlib.import_module({"train": "mctool.training", "connect": "mctool.curve_training",
                                      "fge": "mctool.fge"}[command])
    writer = {"train": "write_model", "connect": "save_curve", "fge": "save_ensemble"}[command]
    args = {"train": ["train", *TINY], "connect": ["connect", files["m0"], files["m1"], "--device", "cpu"],
            "fge": ["fge", files["m0"], "--device", "cpu", "--cycle-epochs", "1"]}[command]
    args += ["--epochs", "2", "-q"]
    whole = tmp_path / "whole.safetensors"
    cli(*args, "-o", whole)
    out = tmp_path / "m.safetensors"
    real = getattr(module, writer)

    def stop(path, *a, **k):
        if Path(path) == out:  # the output itself, not a training state
            raise KeyboardInterrupt
        return real(path, *a, **k)

    monkeypatch.setattr(module, writer, stop)
    err = cli.error(*args, "-o", out, code=130)
    assert "interrupted after the last epoch" in err and "all 2 epochs are saved" in err and "--resume" in err
    monkeypatch.setattr(module, writer, real)
    steps = []
    monkeypatch.setattr(module, "fit", lambda *a, fit=module.fit, **k: steps.append(k["start_epoch"]) or fit(*a, **k))
    cli(*args, "-o", out, "--resume")
    assert steps == [2] and not (tmp_path / "m.state.safetensors").exists()
    got, want = read_checkpoint(out)[0], read_checkpoint(whole)[0]
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


@pytest.mark.parametrize("command", ["train", "fge"])
def test_ctrl_c_after_the_last_state_is_written_says_all_epochs_are_saved(cli, tmp_path, files, monkeypatch,
                                                                          command):
    """A Ctrl-C between the last epoch's state and the end of the epoch loop (the metrics file being written)
    is after the last epoch too: not "interrupted during epoch 3"."""
    args = {"train": ["train", *TINY], "fge": ["fge", files["m0"], "--device", "cpu", "--cycle-epochs", "1"]}[command]
    args += ["--epochs", "2", "-q", "-o", tmp_path / "m.safetensors"]
    real, state = mctool.h5io.MetricsLog.flush, tmp_path / "m.state.safetensors"

    def flush(self, *a, **k):
        real(self, *a, **k)
        if state.exists() and read_metadata(state)["epoch"] == "2":  # the flush after the last epoch's state
            raise KeyboardInterrupt

    monkeypatch.setattr(mctool.h5io.MetricsLog, "flush", flush)
    err = cli.error(*args, code=130)
    assert "interrupted after the last epoch" in err and "all 2 epochs are saved" in err, err
    monkeypatch.setattr(mctool.h5io.MetricsLog, "flush", real)
    cli(*args, "--resume")
    assert (tmp_path / "m.safetensors").exists() and not (tmp_path / "m.state.safetensors").exists()


@pytest.mark.parametrize("command", ["evaluate-curve", "plane"])
def test_ctrl_c_just_after_a_point_is_written_counts_it(cli, tmp_path, files, monkeypatch, command):
    """The message counts the points the metrics file holds, also when Ctrl-C lands after a point's write
    and before the run counted it."""
    module, writer = {"evaluate-curve": (mctool.curve_eval, "write_curve_file"),
                      "plane": (importlib.import_module("mctool.plane"), "write_plane_file")}[command]
    real, calls = getattr(module, writer), []

    def write(*a, **k):
        real(*a, **k)
        calls.append(1)
        if len(calls) == 3:  # the write before it (if any) and two points
            raise KeyboardInterrupt

    monkeypatch.setattr(module, writer, write)
    m = tmp_path / "m.h5"
    args = {"evaluate-curve": ["evaluate-curve", files["m0"], files["m1"], "--num-points", "5"],
            "plane": ["plane", files["m0"], files["m1"], files["m2"], "--grid-points", "2"]}[command]
    err = cli.error(*args, "-m", m, "--points-per-pass", "1", "--device", "cpu", "-q", code=130)
    values, _ = read_h5(m)
    held = int((~np.isnan(values["train/loss"])).sum()) + int((~np.isnan(values.get("at_points/train/loss",
                                                                                     np.array([])))).sum())
    assert held >= 1 and f"interrupted; {held} of {5 if command == 'evaluate-curve' else 7} points are saved" in err


def test_force_removes_the_old_state_so_the_next_interrupt_message_is_true(cli, tmp_path, monkeypatch):
    out = tmp_path / "m.safetensors"
    state = tmp_path / "m.state.safetensors"
    args = ["train", *TINY, "-o", out, "--epochs", "3", "-q"]
    restore = ctrl_c_during_epoch(monkeypatch, 2, after_batches=1)
    cli.error(*args, code=130)
    assert state.exists()
    restore()
    restore = ctrl_c_during_epoch(monkeypatch, 1, after_batches=1)
    err = cli.error(*args, "--force", code=130)
    assert "nothing was saved" in err and not state.exists()
    restore()
    cli(*args, "--force")  # "Run the same command again"
    assert out.exists()


def test_an_interrupted_force_run_does_not_leave_the_old_network_beside_its_metrics(cli, tmp_path, monkeypatch):
    """`train --force` over a finished run, interrupted: the old -o file would pass for this run's result
    next to this run's metrics and state; it is gone from the first epoch on, and --resume writes the new one."""
    out = tmp_path / "m.safetensors"
    args = ["train", *TINY, "-o", out, "--epochs", "3", "-q"]
    cli(*args)
    old = out.read_bytes()
    restore = ctrl_c_during_epoch(monkeypatch, 2, after_batches=1)
    cli.error(*args, "--seed", "5", "--force", code=130)
    assert not out.exists() and (tmp_path / "m.state.safetensors").exists()
    restore()
    cli(*args, "--seed", "5", "--resume")
    assert out.exists() and out.read_bytes() != old


def test_force_removes_stale_snapshots_of_the_run_but_not_inputs(cli, tmp_path, digits_models):
    out = tmp_path / "m.safetensors"
    stale = [tmp_path / "m-epoch005.safetensors", tmp_path / "m.state.safetensors"]
    for p in stale:
        p.write_bytes(b"old run")
    init = tmp_path / "m-epoch001.safetensors"
    init.write_bytes(digits_models[0].read_bytes())
    other = tmp_path / "mm-epoch005.safetensors"
    other.write_bytes(b"another run")
    cli("train", *TINY, "--init", init, "-o", out, "--epochs", "1", "--force", "-q")
    assert not any(p.exists() for p in stale)
    assert init.exists() and other.exists() and out.exists()
    assert read_checkpoint(out)[1]["kind"] == "model"


@pytest.mark.parametrize("command", ["train", "connect", "fge"])
def test_force_keeps_the_old_run_when_a_later_check_refuses_the_new_one(cli, tmp_path, digits_models, command):
    """--force removes an earlier run's state and --save-every checkpoints only once the new run has passed
    every check: here the data set fails to load, after the outputs were checked."""
    out = tmp_path / "m.safetensors"
    old = [tmp_path / "m.state.safetensors", tmp_path / "m-epoch002.safetensors"]
    for p in old:
        p.write_bytes(b"old run")
    bad_data = "synthetic:size=5,channels=1,classes=10,train=20,test=10"  # not 8x8 digits
    args = {"train": ["train", *TINY],
            "connect": ["connect", *digits_models, "--curve", "bezier", "--device", "cpu"],
            "fge": ["fge", digits_models[0], "--device", "cpu"]}[command]
    if command == "train":
        args[2] = "nosuch"
    else:
        args += ["--dataset", bad_data]
    err = cli.error(*args, "-o", out, "--epochs", "2", "--force", "-q")
    assert err.startswith("Error:")
    assert all(p.read_bytes() == b"old run" for p in old) and not out.exists()


BAD_DATA = "synthetic:size=5,channels=1,classes=10,train=20,test=10"  # not the digits' 8x8 images

REFUSED_LATE = {  # each fails when its data set loads, after its outputs were checked (and folders made)
    "train": lambda f, o: ["train", "-d", "nosuch", "-o", o / "m.safetensors", "--epochs", "1"],
    "connect": lambda f, o: ["connect", f["m0"], f["m1"], "-o", o / "c.safetensors", "--epochs", "1",
                             "--dataset", BAD_DATA],
    "fge": lambda f, o: ["fge", f["m0"], "-o", o / "e.safetensors", "--epochs", "1", "--dataset", BAD_DATA],
    "evaluate-curve": lambda f, o: ["evaluate-curve", f["line"], "-m", o / "e.h5", "--num-points", "2",
                                    "--dataset", BAD_DATA, "--plot", o / "e.png"],
    "plane": lambda f, o: ["plane", f["m0"], f["m1"], f["m2"], "-m", o / "p.h5", "--grid-points", "2",
                           "--dataset", BAD_DATA],
    "surface": lambda f, o: ["surface", f["m0"], "-m", o / "s.h5", "--grid-points", "2", "--dataset", BAD_DATA],
    "evaluate": lambda f, o: ["evaluate", f["m0"], f["m1"], "-m", o / "ev.h5", "--dataset", BAD_DATA],
}


@pytest.mark.parametrize("name", REFUSED_LATE)
def test_a_run_refused_after_its_output_checks_leaves_nothing(cli, tmp_path, files, name):
    """A command that fails once its data set loads writes no file (no metrics file full of NaN, no directions
    file) and removes the folders it created for its outputs."""
    out = tmp_path / "new" / "deeper"
    err = cli.error(*REFUSED_LATE[name](files, out), "-q", "--device", "cpu")
    assert err.startswith("Error:") and "\n" not in err.strip()
    assert list(tmp_path.iterdir()) == []
    # an existing folder stays, and so do existing outputs: --force replaces them only with a finished result
    out.mkdir(parents=True)
    args = REFUSED_LATE[name](files, out)
    target = Path(args[args.index("-o" if "-o" in args else "-m") + 1])
    target.write_bytes(b"earlier result")
    cli.error(*args, "-q", "--device", "cpu", "--force")
    assert [p.name for p in out.iterdir()] == [target.name] and target.read_bytes() == b"earlier result"


def test_a_batch_size_the_bn_pass_cannot_use_is_refused_before_any_file(cli, tmp_path):
    """--batch-size 1 cannot recompute BatchNorm statistics: refused before the metrics file (all NaN) or the
    directions file is written, so the corrected command needs no --force."""
    bn_mlp = ["-d", "digits", "-a", "mlp", "--arch-kwargs", '{"hidden": 8, "batch_norm": true}', "--epochs", "1",
              "-q", "--device", "cpu"]
    a, b, c = (tmp_path / f"{n}.safetensors" for n in "abc")
    for seed, path in enumerate((a, b, c)):
        cli("train", *bn_mlp, "--seed", seed, "-o", path)
    out = tmp_path / "out"
    for args in (["evaluate-curve", a, b, "-m", out / "e.h5", "--num-points", "2"],
                 ["plane", a, b, c, "-m", out / "p.h5", "--grid-points", "2"],
                 ["surface", a, "-m", out / "s.h5", "--grid-points", "2"],
                 ["hessian", a, b, "-m", out / "h.h5", "--num-points", "2", "--top-k", "1"]):
        err = cli.error(*args, "--batch-size", "1", "--device", "cpu")
        assert "--batch-size must be >= 2 to recompute BatchNorm statistics" in err, args[0]
        assert not out.exists(), args[0]


def test_stale_state_without_force_still_asks_for_resume_or_force(cli, tmp_path):
    out = tmp_path / "m.safetensors"
    (tmp_path / "m.state.safetensors").write_bytes(b"old run")
    err = cli.error("train", *TINY, "-o", out, "--epochs", "1")
    assert "--resume" in err and "--force" in err


def test_a_single_image_batch_and_batchnorm1d(cli, tmp_path):
    """9 training images in batches of 4 leave one image for the last batch: BatchNorm1d cannot train on it
    (refused before any epoch), and the BN pass leaves it out (a batch of one image has no variance)."""
    data = "synthetic:size=4,channels=1,classes=2,train=9,test=4"
    bn_mlp = ["-a", "mlp", "--arch-kwargs", '{"hidden": 8, "batch_norm": true}', "-q", "--epochs", "1"]
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    message = cli.error("train", "-d", data, "-o", a, "--batch-size", "4", *bn_mlp)
    assert "--batch-size 4, the last batch of an epoch gives a BatchNorm layer a single image" in message
    assert "(e.g. to 5)" in message and not a.exists()
    assert "every batch" in cli.error("train", "-d", data, "-o", a, "--batch-size", "1", *bn_mlp)
    for seed, path in enumerate((a, b)):
        cli("train", "-d", data, "-o", path, "--batch-size", "3", "--seed", seed, *bn_mlp)
    curve, point = tmp_path / "curve.safetensors", tmp_path / "mid.safetensors"
    assert "single image" in cli.error("connect", a, b, "-o", curve, "--epochs", "1", "--batch-size", "4", "-q")
    cli("connect", a, b, "-o", curve, "--epochs", "1", "--batch-size", "3", "-q")
    # the BN pass at t = 0.5: batches of 4, 4 and 1 -> the two full ones
    shown = cli("point", curve, "--t", "0.5", "-o", point, "--batch-size", "4").stderr
    assert "BN pass at t = 0.5" in shown and "3/3" in shown  # its progress bar
    from mctool.bn import pass_batches
    from mctool.checkpoint import load_model
    from mctool.data import load_data

    model = load_model(point).model
    parts = [model.net[1](x.flatten(1)).detach() for x, _ in pass_batches(load_data(data).train, 4, augment=True)]
    assert [len(p) for p in parts] == [4, 4, 1]
    mean = (parts[0].sum(0) + parts[1].sum(0)) / 8
    var = (parts[0].var(0) + parts[1].var(0)) / 2
    bn = model.net[2]
    torch.testing.assert_close(bn.running_mean, mean, rtol=1e-5, atol=1e-5 * float(mean.abs().max()))
    torch.testing.assert_close(bn.running_var, var, rtol=1e-4, atol=0)
    assert "--batch-size must be >= 2 to recompute BatchNorm" in cli.error(
        "point", curve, "--t", "0.5", "-o", point, "--force", "--batch-size", "1", "-q")


@pytest.mark.parametrize("arch", ["resnet18", "cifar_vgg16_bn"])
def test_a_single_image_batch_and_batchnorm2d_on_a_1x1_map(cli, tmp_path, arch):
    """timm's resnet18 and VGG16-BN shrink 8x8 images to 1x1 maps: a BatchNorm2d there sees one value per channel
    from a one-image batch (a torch ValueError mid-epoch before): refused before training, like BatchNorm1d."""
    data = "synthetic:size=8,channels=1,classes=2,train=9,test=4"
    out = tmp_path / "a.safetensors"
    for size, where in (("1", "every batch"), ("4", "the last batch of an epoch")):
        message = cli.error("train", "-d", data, "-a", arch, "-o", out, "--batch-size", size, "--epochs", "1", "-q",
                            "--device", "cpu")
        assert f"--batch-size {size}, {where} gives a BatchNorm layer a single image" in message
    assert list(tmp_path.iterdir()) == []


def test_a_single_image_batch_is_fine_where_batchnorm_still_sees_positions(cli, tmp_path):
    """cifar_preresnet20's last maps are 2x2 on 8x8 images: a one-image batch still has 4 values per channel,
    which torch normalises (mctool 0.2.0 trained it; only layers that see one value per channel are refused)."""
    out = tmp_path / "a.safetensors"
    cli("train", "-d", "synthetic:size=8,channels=1,classes=2,train=9,test=4", "-a", "cifar_preresnet20",
        "-o", out, "--batch-size", "4", "--epochs", "1", "-q", "--device", "cpu")
    assert out.exists()


def test_a_file_name_too_long_for_the_file_system_is_one_error(cli, tmp_path):
    """pathlib re-raises ENAMETOOLONG from exists()/is_file(): it ended in an OSError traceback."""
    long = tmp_path / ("x" * 300 + ".safetensors")
    message = f"the file name '{long}' is too long for the file system"
    assert message in cli.error("info", long)
    assert message in cli.error("evaluate", long, "--device", "cpu")
    assert f"--output '{long}': its name is 312 bytes" in cli.error("train", *TINY, "-o", long, "--epochs", "1")
    # 242 bytes fit the file system, but not the temporary file written first: refused before training (it
    # failed at the end of epoch 1, naming the hidden temporary file and leaving the training state behind)
    metrics = tmp_path / ("c" * 239 + ".h5")
    assert f"--metrics '{metrics}': its name is 242 bytes, and mctool needs 256 for the temporary file it writes " \
           "first; this file system allows 255. Give a name of at most 241 bytes." in cli.error(
               "train", *TINY, "-o", tmp_path / "c.safetensors", "-m", metrics, "--epochs", "1")
    # -o of 241 bytes fits, its training state's name (6 bytes longer) does not: the state's name is derived
    out = tmp_path / ("q" * 229 + ".safetensors")
    msg = cli.error("train", *TINY, "-o", out, "-m", tmp_path / "q.h5", "--epochs", "1")
    assert "its name is 247 bytes" in msg and "Shorten the name it is made from by 6 bytes or more." in msg
    assert list(tmp_path.iterdir()) == []


def _without_root_override(*args: object) -> list[str]:
    """``args`` run so that file permissions apply (root ignores them: run it without that capability)."""
    if os.geteuid() != 0:
        return [str(a) for a in args]
    if shutil.which("setpriv") is None:
        pytest.skip("runs as root without setpriv: file permissions cannot be tested")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", *map(str, args)]


def test_files_the_user_may_not_read_are_one_error_line(tmp_path, files):
    """A folder the user cannot enter (another user's 0700 home) ended in a PermissionError traceback; a file the
    user cannot read was a usage error (exit 2, the usage line). Both are one Error line, exit 1."""
    shut = tmp_path / "shut"
    (shut / "sub").mkdir(parents=True)
    shutil.copy(files["m0"], shut / "sub" / "m.safetensors")
    unreadable = tmp_path / "u.safetensors"
    shutil.copy(files["m0"], unreadable)
    shut.chmod(0o600)  # readable, not searchable
    unreadable.chmod(0)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    try:
        for args, name in ((["info", shut / "sub" / "m.safetensors"], shut / "sub" / "m.safetensors"),
                           (["info", unreadable], unreadable),
                           (["point", files["line"], "--t", "0.5", "-o", shut / "x.safetensors"], shut),
                           (["evaluate", unreadable, "--device", "cpu"], unreadable)):
            done = subprocess.run(_without_root_override(sys.executable, "-m", "mctool", *args), capture_output=True,
                                  text=True, env=env, timeout=120)
            assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
            assert done.stderr.startswith("Error: ") and "Permission denied" in done.stderr, done.stderr
            assert str(name) in done.stderr or "is not writable" in done.stderr, done.stderr
    finally:
        shut.chmod(0o700)


def test_a_command_in_a_deleted_folder_says_so(tmp_path, files):
    """torch cannot be imported in a folder that no longer exists ("Intel oneMKL FATAL ERROR", exit 2)."""
    script = (f'mkdir gone && cd gone && rmdir "$PWD" && exec "{sys.executable}" -m mctool info "{files["m0"]}"')
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(["sh", "-c", script], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 1 and done.stderr.startswith("Error: the current folder no longer exists"), done.stderr


def test_an_unwritable_home_prints_no_matplotlib_messages(tmp_path, files):
    """A read-only HOME (containers, CI): matplotlib printed two multi-line messages about its configuration
    folder, even with -q; the figure is drawn all the same."""
    home = tmp_path / "home"
    home.write_text("a file: no folder can be made under it")
    env = {k: v for k, v in os.environ.items() if k not in ("MPLCONFIGDIR", "XDG_CONFIG_HOME", "XDG_CACHE_HOME")}
    env.update(HOME=str(home), PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    done = subprocess.run([sys.executable, "-m", "mctool", "plot", files["curve_h5"], "-o", tmp_path / "f.png", "-q"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0 and done.stderr == "" and (tmp_path / "f.png").exists(), done.stderr


def test_outputs_that_are_streams_or_loops_of_links_are_refused(cli, tmp_path, files, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("/dev/stdout", "/dev/stderr", "/proc/self/fd/1", "/proc/thread-self/fd/2", "/dev/../dev/stdout"):
        assert "writes files, not to stdout or stderr" in cli.error("point", files["line"], "--t", "0.5", "-o", name)
    (tmp_path / "b.safetensors").symlink_to("a.safetensors")
    (tmp_path / "a.safetensors").symlink_to("b.safetensors")
    assert "is a symbolic link that leads to itself" in cli.error("point", files["line"], "--t", "0.5", "-o",
                                                                   "a.safetensors")
    assert (tmp_path / "a.safetensors").is_symlink()


def test_a_replaced_output_keeps_its_permissions(cli, tmp_path, files):
    """--force made a checkpoint its owner had made private (chmod 600) readable by everyone again."""
    out = tmp_path / "p.safetensors"
    cli("point", files["line"], "--t", "0.5", "-o", out, "-q")
    out.chmod(0o600)
    cli("point", files["line"], "--t", "0.4", "-o", out, "-q", "--force")
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    new = tmp_path / "new.safetensors"
    cli("point", files["line"], "--t", "0.4", "-o", new, "-q")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(new.stat().st_mode) == 0o666 & ~umask
    # a new train run with --force deletes the old -o before its first epoch, and evaluate-curve an old --plot
    # before its first write (an interrupted run leaves neither beside its own files): their modes are kept too
    trained = tmp_path / "t.safetensors"
    cli("train", *TINY, "-o", trained, "--epochs", "1")
    trained.chmod(0o600)
    cli("train", *TINY, "-o", trained, "--epochs", "1", "--force")
    assert stat.S_IMODE(trained.stat().st_mode) == 0o600
    figure, link = tmp_path / "f.png", tmp_path / "link.png"
    link.symlink_to(figure.name)
    args = ["evaluate-curve", files["line"], "-m", tmp_path / "c.h5", "--num-points", "2", "--plot", link, "-q",
            "--device", "cpu"]
    cli(*args)
    figure.chmod(0o600)
    cli(*args, "--force")
    assert link.is_symlink() and stat.S_IMODE(figure.stat().st_mode) == 0o600


def test_a_file_being_written_is_private_until_it_is_complete(tmp_path):
    """The temporary file of a replaced private file was readable by everyone while it was written."""
    out = tmp_path / "m.bin"
    out.write_bytes(b"old")
    out.chmod(0o640)
    with atomic_path(out) as tmp:
        tmp.write_bytes(b"new")
        assert stat.S_IMODE(tmp.stat().st_mode) == 0o600
    assert out.read_bytes() == b"new" and stat.S_IMODE(out.stat().st_mode) == 0o640


def test_an_output_the_user_may_not_read_is_refused_before_the_work(tmp_path, files):
    """An existing output of mode 0200 (writable, not readable) passed the checks with --force and failed after
    the work: a replaced file keeps its mode, and mctool reads what it wrote. Refused first, in one line."""
    out = tmp_path / "p.safetensors"
    out.write_bytes(b"x")
    out.chmod(0o200)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(_without_root_override(sys.executable, "-m", "mctool", "point", files["line"], "--t", "0.5",
                                                 "-o", out, "--force", "-q", "--device", "cpu"),
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert f"--output '{out}' exists and may not be read" in done.stderr, done.stderr
    assert out.read_bytes() == b"x"


def test_control_characters_in_names_are_escaped_in_tables(cli, tmp_path, files):
    """A newline in a file name made one name look like two rows of a table (ESC was escaped already)."""
    out = tmp_path / "a\nb.safetensors"
    r = cli("point", files["line"], "--t", "0.5", "-o", out)
    assert "a\\nb.safetensors" in r.stderr.replace("\n", "") and "a\nb" not in r.stderr


def test_running_out_of_memory_is_one_error(cli, tmp_path, monkeypatch, files):
    """The GPU's or the host's memory running out is the machine's limit, not a bug: one Error line with what to
    lower, exit 1, not torch's traceback."""
    module = importlib.import_module("mctool.ensemble_eval")
    for error, where in ((torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore"),
                          "the GPU"), (MemoryError(), "the host")):
        def evaluate_models(*args, error=error, **kwargs):
            raise error
        monkeypatch.setattr(module, "evaluate_models", evaluate_models)
        msg = cli.error("evaluate", files["m0"], "--device", "cpu")
        assert msg.startswith(f"Error: {where} ran out of memory") and "smaller --batch-size" in msg and "\n" not in msg
        assert ("(CUDA out of memory. Tried to allocate 2.00 GiB);" in msg) == (where == "the GPU")


def test_a_file_of_another_kind_says_what_to_do_with_it(cli, tmp_path, files):
    line, m0 = files["line"], files["m0"]
    assert f"'{line}' holds a 'curve', not a single network (kind 'model'); take a network on it with 'mctool " \
           "point FILE --t T -o net.safetensors'" in cli.error("fge", line, "-o", tmp_path / "f.safetensors")
    # evaluate and ensemble take a curve's networks as an ensemble with --num-points, which the message names
    for command in ("evaluate", "ensemble"):
        assert f"'{line}' holds a curve, not a network: 'mctool ensemble {line} --num-points K' evaluates K " \
               "networks along it" in cli.error(command, line, "--device", "cpu")
    assert f"'{line}' is a 'curve' file, not an ensemble; --index picks a member of an ensemble file" in cli.error(
        "point", line, "--index", "0", "-o", tmp_path / "p.safetensors")
    assert f"'{m0}' is a 'model' file, not an ensemble; it is already a single network" in cli.error(
        "point", m0, "--index", "0", "-o", tmp_path / "p.safetensors")
    h5 = tmp_path / "m.h5"
    h5.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(100))
    assert f"'{h5}' is an HDF5 metrics file, not a checkpoint; give the .safetensors file" in cli.error(
        "evaluate", h5, "--device", "cpu")
    assert f"'{m0}' is not a readable HDF5 file (" in (err := cli.error("plot", m0, "-o", tmp_path / "p.png"))
    assert "It looks like a safetensors checkpoint; this takes the HDF5 metrics files" in err


def test_point_on_a_curve_that_records_no_data_set_asks_for_dataset(cli, tmp_path):
    """export_point passed the missing name on to load_data: an AttributeError traceback."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    bn = ["-d", "digits", "-a", "mlp", "--arch-kwargs", '{"hidden": 8, "batch_norm": true}', "--epochs", "1", "-q",
          "--device", "cpu"]
    a, b, curve = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "c.safetensors"
    cli("train", *bn, "-o", a)
    cli("train", *bn, "-o", b, "--seed", "1")
    cli("connect", a, b, "-o", curve, "--epochs", "1", "-q", "--device", "cpu")
    with safe_open(curve, "pt") as f:
        md = {k: v for k, v in f.metadata().items() if k != "dataset"}
        tensors = {k: f.get_tensor(k).clone() for k in f.keys()}
    bare = tmp_path / "bare.safetensors"
    save_file(tensors, bare, md)
    out = tmp_path / "p.safetensors"
    assert f"'{bare}' does not record its data set; pass --dataset." in cli.error(
        "point", bare, "--t", "0.5", "-o", out, "--device", "cpu")
    assert not out.exists()
    assert "predicts 10 classes but data set 'synthetic:size=8,channels=1,classes=3' has 3" in cli.error(
        "point", bare, "--t", "0.5", "-o", out, "-d", "synthetic:size=8,channels=1,classes=3", "--device", "cpu")
    r = cli.json("point", bare, "--t", "0.5", "-o", out, "-d", "digits", "--device", "cpu")
    assert r["bn_recalibrated"] is True and json.loads(read_metadata(out)["config"])["bn_dataset"] == "digits"


def test_resume_without_a_metrics_file_says_there_is_nothing_to_resume(cli, tmp_path, files):
    m = tmp_path / "nothere.h5"
    for args in (["evaluate-curve", files["line"]], ["plane", files["m0"], files["m2"], files["m1"]]):
        err = cli.error(*args, "-m", m, "--resume", "--device", "cpu")
        assert f"nothing to resume: metrics file '{m}' does not exist. Run without --resume to start." in err
    assert list(tmp_path.iterdir()) == []


def test_evaluate_curve_resume_refuses_a_file_missing_a_dataset(cli, tmp_path, files):
    """As plane, surface and hessian: a metrics file without one of the run's datasets is not this run's
    (evaluate-curve refilled it with NaN and recomputed every point before)."""
    m = tmp_path / "e.h5"
    cli("evaluate-curve", files["line"], "-m", m, "--num-points", "3", "-q", "--device", "cpu")
    with h5py.File(m, "a") as f:
        del f["train/nll"]
    err = cli.error("evaluate-curve", files["line"], "-m", m, "--num-points", "3", "--resume", "--device", "cpu")
    assert f"'{m}' cannot be resumed: dataset 'train/nll' should be numbers of shape (3,), got nothing" in err
    with h5py.File(m, "a") as f:  # the right shape, but not numbers
        f["train/nll"] = np.zeros(3, dtype=bool)
    err = cli.error("evaluate-curve", files["line"], "-m", m, "--num-points", "3", "--resume", "--device", "cpu")
    assert "should be numbers of shape (3,), got (3,) of bool" in err


@pytest.mark.parametrize("command", ["train", "connect", "fge"])
def test_a_resume_without_m_goes_on_in_the_interrupted_runs_metrics_file(cli, tmp_path, digits_models, monkeypatch,
                                                                         command):
    """-m left out on --resume is the interrupted run's metrics file (the state records it, relative to -o's
    folder), as other options left out are: the whole history went to the default file beside -o, and the file
    given at first was left with the first epochs only."""
    args = {"train": ["-d", "digits", "--arch-kwargs", '{"hidden": 16}', "--epochs", "3"],
            "connect": [*digits_models, "--epochs", "3"],
            "fge": [digits_models[0], "--epochs", "3", "--cycle-epochs", "1"]}[command]
    out, m = tmp_path / "run" / "o.safetensors", tmp_path / "logs" / "custom.h5"
    restore = ctrl_c_during_epoch(monkeypatch, 2)
    cli.error(command, *args, "-o", out, "-m", m, "-q", "--device", "cpu", code=130)
    restore()
    md = read_metadata(tmp_path / "run" / "o.state.safetensors")
    assert md["metrics"] == os.path.join("..", "logs", "custom.h5")
    r = cli.json(command, *args, "-o", out, "--resume", "--device", "cpu")
    assert r["outputs"]["metrics"]["path"] == str(m)
    assert read_h5(m)[0]["epoch"].tolist() == [1, 2, 3]
    assert not [p for p in (tmp_path / "run").iterdir() if p.suffix == ".h5"]  # no second metrics file
