"""`mctool evaluate` and `mctool info`."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mctool.checkpoint import load_model, read_checkpoint
from mctool.data import load_data
from mctool.evaluation import nll, predict_probs
from mctool.h5io import read_h5

ROOT = Path(__file__).resolve().parents[1]


def _python(*args, **kwargs) -> subprocess.CompletedProcess:
    """``python ARGS`` that imports this checkout's mctool, whatever the working folder (from another one, a
    plain ``python -m mctool`` ran whichever mctool was installed, or none)."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": path}, **kwargs)


def test_evaluate_single_and_ensemble_by_hand(cli, tmp_path, digits_models):
    metrics = tmp_path / "eval.h5"
    r = cli.json("evaluate", *digits_models, "-m", metrics, "--device", "cpu")
    assert r["split"] == "test" and len(r["models"]) == 2 and r["members"] == 2
    data = load_data("digits")
    probs = []
    for path, entry in zip(digits_models, r["models"]):
        assert entry["path"] == entry["label"] == str(path)
        m = entry["metrics"]
        p, labels = predict_probs(load_model(path).model, data.eval)
        probs.append(p)
        assert m["nll"] == pytest.approx(nll(p, labels), rel=1e-6)
        # the L2 term of the training objective, 0.5 wd ||w||^2 with the recorded wd: float64 sums of float32
        # squares in another order (a few 2^-53 relative apart), recovered as loss - nll (which loses up to 2^-52 of
        # the loss, a few times the term here): allow 1e-9 relative. Leaving out the 0.5 doubles it.
        lm = load_model(path)
        wd = float(lm.meta.config["wd"])
        l2 = 0.5 * wd * sum(float(p.detach().double().pow(2).sum()) for p in lm.model.parameters())
        assert wd > 0 and m["loss"] - m["nll"] == pytest.approx(l2, rel=1e-9)
        assert 0 <= m["err"] <= 1 and 0 <= m["ece"] <= 1
    ens = (probs[0] + probs[1]) / 2
    assert r["metrics"]["eval"]["nll"] == pytest.approx(nll(ens, labels), rel=1e-6)
    assert r["metrics"]["eval"]["loss"] is None  # the ensemble has no single training objective
    h5, attrs = read_h5(metrics)
    assert h5["members/test/nll"].tolist() == pytest.approx([m["metrics"]["nll"] for m in r["models"]])
    assert h5["ensemble/test/nll"][0] == pytest.approx(r["models"][0]["metrics"]["nll"])  # an ensemble of one
    assert h5["ensemble/test/nll"][1] == pytest.approx(r["metrics"]["eval"]["nll"])
    assert h5["member"].tolist() == [1, 2] and attrs["split"] == "test" and attrs["num_members"] == 2
    assert attrs["kind"] == "evaluate" and str(digits_models[0]) in json.loads(attrs["inputs"])
    # the metrics file is not overwritten without --force
    assert "--force" in cli.error("evaluate", digits_models[0], "-m", metrics)


def test_evaluate_val_split_and_human_output(cli, tmp_path, digits_models):
    r = cli.json("evaluate", digits_models[0], "--split", "val", "--device", "cpu")
    assert r["split"] == "val" and r["members"] == 1 and r["metrics"]["eval"] == r["models"][0]["metrics"]
    out = cli("evaluate", digits_models[0], "--device", "cpu")
    assert out.stdout == ""  # tables go to stderr
    assert "digits" in out.stderr and "%" in out.stderr and "metrics:" not in out.stderr
    # the files written are named after the table
    out = cli("ensemble", *digits_models, "-o", tmp_path / "e.safetensors", "-m", tmp_path / "e.h5", "--device", "cpu")
    assert out.stderr.splitlines()[-2:] == [f"ensemble file: {tmp_path / 'e.safetensors'}",
                                            f"metrics: {tmp_path / 'e.h5'}"]


def test_evaluate_plain_state_dict(cli, tmp_path, digits_models):
    tensors, _ = read_checkpoint(digits_models[0])
    plain = tmp_path / "plain.safetensors"
    save_file(tensors, str(plain))  # no metadata, as timm would save it
    assert "--arch and --num-classes" in cli.error("evaluate", plain, "-d", "digits")
    # mlp needs its hidden width and input size: the error lists the mismatching shapes
    assert "shape mismatches" in cli.error("evaluate", plain, "-d", "digits", "--arch", "mlp", "--num-classes", "10",
                                           "--in-chans", "1")
    plain_args = ["--arch", "mlp", "--num-classes", "10", "--in-chans", "1", "--arch-kwargs",
                  '{"hidden": 32, "img_size": 8}', "--device", "cpu"]
    assert "--dataset" in cli.error("evaluate", plain, *plain_args)
    r = cli.json("evaluate", plain, "-d", "digits", *plain_args)
    ref = cli.json("evaluate", digits_models[0], "--device", "cpu")
    assert r["metrics"]["eval"]["nll"] == pytest.approx(ref["metrics"]["eval"]["nll"])


def test_evaluate_refusals(cli, tmp_path, digits_models):
    pt = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(1)}, pt)
    assert "never unpickles" in cli.error("evaluate", pt)
    junk = tmp_path / "junk.safetensors"
    junk.write_text("not a checkpoint")
    assert "not a safetensors file" in cli.error("evaluate", junk)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(digits_models[0].read_bytes()[:-50])
    assert "truncated" in cli.error("evaluate", cut)
    assert "does not exist" in cli.error("evaluate", tmp_path / "missing.safetensors")
    # other files given by mistake are named as what they are (a PNG's first bytes read as a header length of
    # 7e17 bytes), and an empty file as empty
    png = tmp_path / "fig.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    assert cli.error("evaluate", png) == (f"Error: '{png}' is a PNG image, not a safetensors checkpoint; give a "
                                          "checkpoint written by mctool or safetensors.")
    page = tmp_path / "plane.html"  # as plot --html writes it
    page.write_text("<!doctype html>\n<html>\n<head>\n" + " " * 100)
    assert "is an HTML page, not a safetensors checkpoint" in cli.error("info", page)
    (tmp_path / "e.h5").touch()
    assert cli.error("evaluate", tmp_path / "e.h5").endswith("is empty (0 bytes), not a safetensors checkpoint.")
    assert cli.error("info", tmp_path / "e.h5").endswith("is empty (0 bytes); info reads safetensors checkpoints "
                                                         "and HDF5 metrics files.")
    assert "10 classes but data set" in cli.error("evaluate", digits_models[0], "-d",
                                                  "synthetic:size=8,channels=1,classes=4")
    assert "channel" in cli.error("evaluate", digits_models[0], "-d", "synthetic:size=8,channels=3,classes=10")
    other_size = ["-d", "synthetic:size=16,channels=1,classes=10,train=32,test=8"]  # was a traceback
    assert "was trained on 8x8 images but data set" in cli.error("evaluate", digits_models[0], *other_size)
    assert "8x8 images" in cli.error("fge", digits_models[0], *other_size, "-o", tmp_path / "f.safetensors")
    cli("evaluate", code=2)  # no model given


def test_info_checkpoint_and_metrics(cli, digits_models):
    r = cli.json("info", digits_models[0])
    assert r["type"] == "safetensors" and r["metadata"]["arch"] == "mlp" and r["metadata"]["kind"] == "model"
    assert r["metadata"]["arch_kwargs"] == {"hidden": 32, "img_size": 8}
    assert r["tensors"]["count"] == 6 and r["tensors"]["elements"] == 64 * 32 + 32 + 32 * 32 + 32 + 32 * 10 + 10
    h5 = digits_models[0].with_suffix(".h5")
    r = cli.json("info", h5)
    assert r["type"] == "hdf5" and r["metadata"]["kind"] == "train"
    assert r["datasets"]["test/err"]["shape"] == [8] and r["datasets"]["test/err"]["nan"] == 0
    human = cli("info", h5)
    assert "test/err" in human.stderr
    assert "does not exist" in cli.error("info", h5.with_name("nope.h5"))


def test_info_counts_nan_apart_from_infinities_and_pipes_are_refused(cli, tmp_path):
    """``nan`` counts values not computed yet; an infinity is a value (kept out of min/max)."""
    h5 = tmp_path / "m.h5"
    with h5py.File(h5, "w") as f:
        f["x"] = np.array([1.0, np.nan, np.inf, -np.inf, 2.0])
    entry = cli.json("info", h5)["datasets"]["x"]
    assert entry["nan"] == 1 and entry["min"] == 1.0 and entry["max"] == 2.0 and entry["last"] == 2.0
    assert entry["inf"] == 2  # counted, so that min and max over the finite values do not hide them
    rows = [line.replace("\u2502", " ").split() for line in cli("info", h5).stderr.splitlines()]  # (│ rules)
    assert ["x", "(5,)", "1", "2", "1", "2", "2"] in rows  # name, shape, NaN, inf, min, max, last
    pipe = tmp_path / "p.safetensors"
    os.mkfifo(pipe)
    for command in (["info", pipe], ["evaluate", pipe, "--device", "cpu"]):  # a process: a hang fails, not waits
        run = _python("-m", "mctool", *map(str, command), timeout=120)
        assert run.returncode == 1 and run.stderr.startswith("Error:") and "file" in run.stderr, run.stderr


def test_info_shows_deeply_nested_metadata_as_text(cli, tmp_path):
    """JSON nested 500 deep (a crafted file) made --json fail with RecursionError."""
    deep = "[" * 500 + "]" * 500
    h5 = tmp_path / "m.h5"
    with h5py.File(h5, "w") as f:
        f["x"] = np.zeros(2)
        f.attrs["config"] = deep
        f.attrs["inputs"] = '{"a": [1, 2]}'
    md = cli.json("info", h5)["metadata"]
    assert md["config"] == deep and md["inputs"] == {"a": [1, 2]}
    st = tmp_path / "m.safetensors"
    save_file({"w": torch.zeros(2)}, str(st), metadata={"config": deep})
    assert cli.json("info", st)["metadata"]["config"] == deep


def test_tables_keep_long_file_names_whole_in_a_log(cli, tmp_path, digits_models):
    """In a log (stderr not a terminal: 80 columns) two checkpoints of one sweep were cut to the same
    `experiments/2024-06-01-digits-...`; their cells wrap instead."""
    folder = tmp_path / "experiments" / "2024-06-01-digits-mlp-width-sweep" / "checkpoints"
    folder.mkdir(parents=True)
    paths = [folder / f"seed{i}.safetensors" for i in (1, 2)]
    for path, model in zip(paths, digits_models):
        path.write_bytes(model.read_bytes())
    err = cli("evaluate", *paths, "--device", "cpu").stderr
    assert "…" not in err
    # (a cell wraps at a space in the path as well: compare without spaces, as under a TMPDIR with one)
    first_column = "".join("".join(line.split("│")[1].split()) for line in err.splitlines() if line.startswith("│"))
    assert all("".join(str(path).split()) in first_column for path in paths), err


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["train", "--help"], ["plane", "--help"], ["trian"],
                                  ["train", "--nope"]])
def test_help_version_and_usage_errors_answer_without_importing_torch(args):
    """torch (and timm, which imports torchvision) take seconds to import: `mctool --help`, a usage error, or
    shell completion (which runs the command) must not wait for them."""
    done = _python("-X", "importtime", "-m", "mctool", *args)
    assert done.returncode in (0, 2), done.stderr[-2000:]
    imported = {line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "mctool.cli" in imported
    assert not imported & {"torch", "timm", "torchvision", "mctool.models"}, sorted(imported & {"torch", "timm"})


@pytest.mark.parametrize("option, value, said", [("--epochs", "abc", "not a whole number."),
                                                  ("--lr", "fast", "not a number.")])
def test_a_value_of_the_wrong_type_is_a_usage_error_in_plain_words(cli, option, value, said):
    """(pydantic's "Input should be a valid integer, unable to parse string as an integer")"""
    assert cli.error("train", option, value, code=2) == f"Error: Invalid value for '{option}': {said}"


def test_python_dash_m_and_version():
    out = _python("-m", "mctool", "--version", check=True)
    assert out.stdout.startswith("mctool ")
    out = _python("-m", "mctool", "train", "--help", check=True)
    for option in ("--dataset", "--arch", "--epochs", "--resume", "--save-every", "--json", "--force", "--precision"):
        assert option in out.stdout
    assert "<bool>" not in out.stdout  # flags take no value, and help does not suggest one
    assert [line.split()[:4] for line in out.stdout.splitlines() if line.strip().startswith("--force")] == [
        ["--force", "Overwrite", "existing", "output"]]  # (no value after the flag)
    short = _python("-m", "mctool", "train", "-h", check=True)
    assert short.stdout == out.stdout and "-h, --help" in out.stdout  # -h as every Unix tool's help
    # usage errors: exit 2 and one "Error:" line, as mctool's own errors
    bad = _python("-m", "mctool", "train", "--nope")
    assert bad.returncode == 2
    errors = [line for line in bad.stderr.splitlines() if "Error" in line]
    # (click's own wording before Typer 0.26 carried its copy: "No such option '--nope'. Did you mean ...")
    assert len(errors) == 1 and re.match(r"Error: No such option:? '?--nope", errors[0]), bad.stderr
    # the command list shows each command's whole first sentence
    listing = " ".join(_python("-m", "mctool", "--help", check=True).stdout.split())
    assert "fge Fast Geometric Ensembling: cyclic learning rate from a trained network, one snapshot per cycle." \
        in listing


def test_usage_lines_name_the_arguments_as_the_docs_do(cli):
    """Typer shows required arguments as {name}: the names are upper case, as in docs/cli.md (it showed
    {source}, {models}...)."""
    from mctool.cli import app

    import typer.main

    commands = typer.main.get_command(app).commands
    for name in commands:
        usage = cli(name, "--help").stdout.splitlines()[0]
        # required {A} and {A}... (A and A... before Typer 0.29), optional [A]
        arguments = r"( \{?[A-Z0-9]+\}?(\.\.\.)?| \[[A-Z0-9]+\])*"
        assert re.fullmatch(rf"Usage: mctool {name} \[OPTIONS\]{arguments}", usage), usage
    assert cli("connect", "--help").stdout.splitlines()[0].replace("{", "").replace("}", "") == \
        "Usage: mctool connect [OPTIONS] START END"


def test_a_plain_state_dict_that_does_not_fit_says_how_it_was_built(cli, tmp_path):
    from safetensors.torch import save_file

    from mctool.models import build_model

    plain = tmp_path / "plain.safetensors"
    save_file(build_model("mlp", 10, 1, {"img_size": 8, "hidden": 16}).state_dict(), plain)
    err = cli.error("evaluate", plain, "--arch", "mlp", "--num-classes", "10", "--in-chans", "1", "-d", "digits",
                    "--device", "cpu")
    assert f"'{plain}' does not fit architecture 'mlp'" in err
    assert "Build it as it was built: its --arch-kwargs (e.g. '{\"hidden\": 16}' for mlp), and its classes" in err
    assert "as --pretrained-file (the classifier is re-initialised), not as --init" in err
    r = cli.json("evaluate", plain, "--arch", "mlp", "--num-classes", "10", "--in-chans", "1", "--arch-kwargs",
                 '{"hidden": 16}', "-d", "digits", "--device", "cpu")
    assert r["members"] == 1


def test_info_tells_a_missing_file_from_a_folder(cli, tmp_path, digits_models):
    typo = digits_models[0].with_name("m00.safetensors")
    err = cli.error("info", typo)
    assert f"'{typo}' does not exist." in err
    assert cli.error("info", tmp_path).endswith(
        "is not a file (a folder, pipe or device); info reads safetensors checkpoints and HDF5 metrics files.")
    assert "Did you mean" in err and "m0.safetensors" in err
    link = tmp_path / "link.safetensors"
    link.symlink_to(tmp_path / "gone.safetensors")
    assert f"'{link}' is a symbolic link to '{tmp_path / 'gone.safetensors'}', which does not exist." in cli.error(
        "info", link)


def test_every_command_prints_its_summary_table(cli, tmp_path, digits_models):
    """Each command's human summary (no --json, no -q), in each of its forms: a summary that reads a field of
    the result the code no longer has is a traceback after the work is done (hessian of one network was)."""
    a, b = (str(p) for p in digits_models)
    t = str(tmp_path)
    cpu = ["--device", "cpu"]
    runs = [
        (["connect", a, b, "-o", f"{t}/c.safetensors", "--epochs", "1"], "connected"),
        (["evaluate", a], "evaluate"),
        (["evaluate", a, b], "ensemble"),
        (["ensemble", a, b, "-o", f"{t}/e.safetensors", "--temperature-scale"], "temperature-scaled"),
        (["evaluate", f"{t}/e.safetensors"], "ensemble"),
        (["ensemble", f"{t}/c.safetensors", "--num-points", "2"], "ensemble"),
        (["evaluate-curve", f"{t}/c.safetensors", "-m", f"{t}/ec.h5", "--num-points", "2"], "curve, 2 points"),
        (["plane", f"{t}/c.safetensors", "-m", f"{t}/p.h5", "--grid-points", "2"], "plane, 2 x 2 grid"),
        (["surface", a, "-m", f"{t}/s.h5", "--grid-points", "2"], "surface, 2 x 2 grid"),
        (["surface", a, "-m", f"{t}/s1.h5", "--dims", "1", "--grid-points", "2"], "surface, 2 points over [-1, 1]"),
        (["hessian", a, "-m", f"{t}/h.h5", "--top-k", "1", "--train-subset", "64", "--trace", "--trace-samples", "2"],
         "network"),
        (["hessian", f"{t}/e.safetensors", "-m", f"{t}/he.h5", "--top-k", "1", "--train-subset", "64"], "member 1"),
        (["fge", a, "--epochs", "1", "--cycle-iters", "4", "-o", f"{t}/f.safetensors"], "fge"),
        (["point", f"{t}/c.safetensors", "--t", "0.5", "-o", f"{t}/mid.safetensors"], "point"),
        (["point", f"{t}/e.safetensors", "--index", "1", "-o", f"{t}/m1.safetensors"], "member"),
        (["align", a, b, "-o", f"{t}/al.safetensors"], "aligned"),
        (["plane", f"{t}/c.safetensors", "-m", f"{t}/s0.h5", "--grid-points", "2", "--shard", "0/2"], "plane"),
        (["plane", f"{t}/c.safetensors", "-m", f"{t}/s1p.h5", "--grid-points", "2", "--shard", "1/2"], "plane"),
        (["merge", f"{t}/s0.h5", f"{t}/s1p.h5", "-o", f"{t}/merged.h5"], "merged"),
        (["info", a], "tensors"),
        (["info", f"{t}/p.h5"], "datasets"),
        (["plot", f"{t}/ec.h5", "-o", f"{t}/ec.png"], "plot"),
    ]
    for args, shown in runs:
        needs_device = args[0] not in ("info", "plot", "merge", "point") or "--t" in args
        err = cli(*args, *(cpu if needs_device else [])).stderr
        assert shown in err and "\u2502" in err, (args, err)  # a table with what it is about
