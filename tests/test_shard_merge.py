"""`--shard I/N` for plane and evaluate-curve, and `mctool merge`: N shard files merge into the unsharded file."""

import json
import shutil

import h5py
import numpy as np
import pytest

import mctool
from conftest import count_networks
from mctool.errors import ConfigError
from mctool.fileio import sha256_file
from mctool.h5io import read_h5

CPU = ["--device", "cpu"]
PLANE = ["--grid-points", "3", "--bn-batches", "1", "--train-subset", "64", "-q", *CPU]
CURVE = ["--num-points", "5", "--bn-batches", "1", "-q", *CPU]
# attributes that say when and by which command line a file was written
WHEN = {"started", "command", "merged_from"}


@pytest.fixture(scope="module")
def bezier(tmp_path_factory, digits_models):
    out = tmp_path_factory.mktemp("shard") / "c.safetensors"
    from conftest import Cli

    Cli()("connect", *digits_models, "-o", out, "--epochs", "1", "--lr", "0.05", "-q", *CPU)
    return out


def h5_contents(path):
    """Every dataset with its values, attributes and attached scales, and the root attributes."""
    out = {}
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                scales = [[s.name for s in obj.dims[k].values()] for k in range(obj.ndim)]
                own = {k: v for k, v in obj.attrs.items() if k not in ("DIMENSION_LIST", "DIMENSION_LABELS")}
                out[name] = (obj[()], own if not obj.is_scale else None, scales,
                             [obj.dims[k].label for k in range(obj.ndim)])
        f.visititems(visit)
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
    return out, attrs


def assert_same_file(merged, full):
    """Same datasets (values exactly equal, NaN included), dataset attributes, scales and root attributes, apart
    from when and how each was written."""
    a, a_attrs = h5_contents(merged)
    b, b_attrs = h5_contents(full)
    assert set(a) == set(b)
    for name in a:
        np.testing.assert_array_equal(a[name][0], b[name][0], err_msg=name)
        assert a[name][2:] == b[name][2:], name
        if a[name][1] is not None:
            assert a[name][1].keys() == b[name][1].keys(), name
            for k in a[name][1]:
                np.testing.assert_array_equal(a[name][1][k], b[name][1][k], err_msg=f"{name}.{k}")
    assert {k: v for k, v in a_attrs.items() if k not in WHEN} == {k: v for k, v in b_attrs.items() if k not in WHEN}
    assert "shard" not in a_attrs and "shard" not in json.loads(a_attrs["config"])


def test_plane_shards_merge_into_the_unsharded_file(cli, tmp_path, bezier):
    full = tmp_path / "full.h5"
    cli("plane", bezier, "-m", full, *PLANE)
    shards = [tmp_path / f"p{i}.h5" for i in range(2)]
    for i, s in enumerate(shards):
        cli("plane", bezier, "-m", s, "--shard", f"{i}/2", *PLANE)
    # each shard holds its round-robin share of [w0, w1, w2, cell (0, 0), (0, 1), ...] and NaN elsewhere
    data, attrs = read_h5(shards[1])
    assert attrs["shard"] == "1/2" and json.loads(attrs["config"])["shard"] == "1/2"
    assert np.isnan(data["at_points/train/loss"]).tolist() == [True, False, True]
    assert np.isnan(data["train/loss"]).ravel().tolist() == [k % 2 == 0 for k in range(1, 10)]
    summary = json.loads(attrs["summary"])["train"]["loss"]  # over the cells this shard computed
    assert summary["min"] == np.nanmin(data["train/loss"]) and summary["at_points"][0] is not None
    assert np.isnan(summary["at_points"][0])

    merged, png = tmp_path / "merged.h5", tmp_path / "merged.png"
    r = cli.json("merge", shards[1], shards[0], "-o", merged, "--plot", png)
    assert r["command"] == "merge" and r["kind"] == "plane" and r["shards"] == 2 and r["split"] == "test"
    assert [f["path"] for f in r["inputs"]] == [str(s) for s in shards]
    assert r["outputs"]["metrics"] == {"path": str(merged), "sha256": sha256_file(merged)}
    assert png.read_bytes()[:4] == b"\x89PNG" and r["outputs"]["plot"]["path"] == str(png)
    assert_same_file(merged, full)
    _, merged_attrs = read_h5(merged)
    assert json.loads(merged_attrs["merged_from"]) == [{"path": str(s), "sha256": sha256_file(s)} for s in shards]
    assert merged_attrs["started"] == min(read_h5(s)[1]["started"] for s in shards)
    full_summary = json.loads(read_h5(full)[1]["summary"])
    assert r["metrics"]["train"]["loss"] == full_summary["train"]["loss"]
    # the merged file is a complete plane file: plot and resume read it like the unsharded one
    cli("plot", merged, "-o", tmp_path / "again.png")
    before = merged.read_bytes()
    r = cli.json("plane", bezier, "-m", merged, "--resume", *PLANE)
    # nothing to compute: the file is left as it is, with its record of the shards (it was rewritten without it)
    assert merged.read_bytes() == before and r["outputs"]["metrics"]["sha256"] == sha256_file(merged)
    assert r["metrics"]["train"]["loss"] == full_summary["train"]["loss"]
    # the torch build recorded is the shards' (which computed the values), not the merging process's
    for i, s in enumerate(shards):
        with h5py.File(s, "a") as f:
            f.attrs["torch_version"] = f"2.{i}"
    cli("merge", *shards, "-o", tmp_path / "builds.h5", "-q")
    assert read_h5(tmp_path / "builds.h5")[1]["torch_version"] == "2.0, 2.1"
    # a shard of mctool 0.2 recorded a --bend left out as null: it merges with one that records the bend used
    with h5py.File(shards[0], "a") as f:
        f.attrs["config"] = json.dumps({**json.loads(f.attrs["config"]), "bend": None})
    cli("merge", *shards, "-o", tmp_path / "old-and-new.h5", "-q")
    assert json.loads(read_h5(tmp_path / "old-and-new.h5")[1]["config"])["bend"] == 1


def test_curve_shards_merge_into_the_unsharded_file(cli, tmp_path, bezier):
    full = tmp_path / "full.h5"
    cli("evaluate-curve", bezier, "-m", full, *CURVE)
    shards = [tmp_path / f"c{i}.h5" for i in range(3)]
    for i, s in enumerate(shards):
        cli("evaluate-curve", bezier, "-m", s, "--shard", f"{i}/3", *CURVE)
    data, attrs = read_h5(shards[2])
    assert attrs["shard"] == "2/3" and np.isnan(data["test/err"]).tolist() == [True, True, False, True, True]
    assert json.loads(attrs["summary"])["train"]["loss"]["max"] is not None  # NaN: points are missing
    assert np.isnan(json.loads(attrs["summary"])["train"]["loss"]["max"])
    merged = tmp_path / "merged.h5"
    r = mctool.merge([shards[2], shards[0], shards[1]], merged)
    assert r.kind == "evaluate-curve" and r.shards == 3 and r.outputs["plot"] is None
    assert_same_file(merged, full)
    # a shard is every third point, not a curve: plot refuses it as it refuses a plane's shard (it drew dots)
    msg = cli.error("plot", shards[0], "-o", tmp_path / "s.png")
    assert f"'{shards[0]}' is shard 0/3 of an evaluate-curve run" in msg and "mctool merge" in msg
    cli("plot", merged, "-o", tmp_path / "m.png", "-q")
    # -m names the merged file too, as it names the metrics file of the command that wrote the shards
    again = tmp_path / "again.h5"
    cli("merge", *shards, "-m", again, "-q")
    assert_same_file(again, full)
    assert r.metrics["eval"].err.max == json.loads(read_h5(full)[1]["summary"])["eval"]["err"]["max"]


def test_resume_a_shard(cli, tmp_path, bezier, monkeypatch):
    m = tmp_path / "s.h5"
    cli("evaluate-curve", bezier, "-m", m, "--shard", "1/2", *CURVE)  # points 1 and 3
    before, _ = read_h5(m)
    with h5py.File(m, "a") as f:
        f["train/loss"][3] = np.nan
    calls = count_networks(monkeypatch)
    cli("evaluate-curve", bezier, "-m", m, "--shard", "1/2", "--resume", *CURVE)
    assert len(calls) == 1  # only the shard's own missing point, not the other shard's NaN ones
    after, attrs = read_h5(m)
    np.testing.assert_array_equal(after["train/loss"], before["train/loss"])
    assert attrs["shard"] == "1/2"
    # another shard, no shard, or a shard of an unsharded file: other settings
    assert "shard: 1/2 -> 0/2" in cli.error("evaluate-curve", bezier, "-m", m, "--shard", "0/2", "--resume",
                                         *CURVE)
    assert "shard: 1/2 -> none" in cli.error("evaluate-curve", bezier, "-m", m, "--resume", *CURVE)
    full = tmp_path / "full.h5"
    cli("evaluate-curve", bezier, "-m", full, "--num-points", "2", "--bn-batches", "1", "-q", *CPU)
    assert "shard: none -> 0/2" in cli.error("evaluate-curve", bezier, "-m", full, "--num-points", "2",
                                             "--shard", "0/2", "--resume", *CPU)


@pytest.mark.parametrize("text", ["2/2", "a/b", "-1/2", "1/0", "1", "0/2/3", ""])
def test_bad_shard_text(cli, tmp_path, bezier, text):
    for command in ("plane", "evaluate-curve"):
        msg = cli.error(command, bezier, "-m", tmp_path / "x.h5", f"--shard={text}", *CPU)
        assert "--shard" in msg and "I/N" in msg
    assert not (tmp_path / "x.h5").exists()


def test_shard_checks_in_the_library(tmp_path, bezier):
    for bad in [(2, 2), (0, 0), (-1, 2), (True, 2), ("0", 2), (0,), 3]:
        with pytest.raises(ConfigError, match="--shard"):
            mctool.plane([str(bezier)], tmp_path / "x.h5", shard=bad, device="cpu")
        with pytest.raises(ConfigError, match="--shard"):
            mctool.evaluate_curve([str(bezier)], tmp_path / "x.h5", shard=bad, device="cpu")
    with pytest.raises(ConfigError, match="draws the whole plane and a shard file holds only part"):
        mctool.plane([str(bezier)], tmp_path / "x.h5", shard=(0, 2), plot=tmp_path / "x.png", device="cpu")
    with pytest.raises(ConfigError, match="draws the whole curve and a shard file holds only part"):
        mctool.evaluate_curve([str(bezier)], tmp_path / "x.h5", shard=(0, 2), plot=tmp_path / "x.png", device="cpu")
    assert not (tmp_path / "x.h5").exists()


@pytest.fixture(scope="module")
def curve_shards(tmp_path_factory, bezier):
    """Shards 0/2 and 1/2 of a 2-point evaluate-curve run, and shard 0/3 of the same run."""
    from conftest import Cli

    folder = tmp_path_factory.mktemp("curve-shards")
    out = {}
    for name, shard in (("a", "0/2"), ("b", "1/2"), ("third", "0/3")):
        out[name] = folder / f"{name}.h5"
        Cli()("evaluate-curve", bezier, "-m", out[name], "--num-points", "2", "--bn-batches", "1", "--shard", shard,
              "-q", *CPU)
    return out


def test_merge_errors(cli, tmp_path, bezier, curve_shards, digits_models):
    a, b = curve_shards["a"], curve_shards["b"]
    out = tmp_path / "m.h5"
    assert "shard 1/2 of this run is missing" in cli.error("merge", a, "-o", out)
    assert f"'{a}' are both shard 0/2" in cli.error("merge", a, b, a, "-o", out)
    msg = cli.error("merge", a, curve_shards["third"], "-o", out)
    assert "different runs" in msg and "another number of shards" in msg
    # shards evaluated on different copies of the data set (their fingerprints differ)
    odd = tmp_path / "odd.h5"
    shutil.copy(b, odd)
    with h5py.File(odd, "a") as f:
        f.attrs["data_fingerprint"] = "f" * 64
    msg = cli.error("merge", a, odd, "-o", out)
    assert msg.startswith("Error: the shards were evaluated on different data (data set fingerprints: ")
    assert f"'{odd}' ffffffffffff..." in msg
    cli("merge", a, b, "-o", out, "-q")
    assert read_h5(out)[1]["data_fingerprint"] == read_h5(a)[1]["data_fingerprint"]
    out.unlink()
    # other options: another number of points
    other = tmp_path / "other.h5"
    cli("evaluate-curve", bezier, "-m", other, "--num-points", "3", "--bn-batches", "1", "--shard", "1/2", "-q", *CPU)
    msg = cli.error("merge", a, other, "-o", out)
    assert "different runs" in msg and "(other settings: --num-points: 2 -> 3)" in msg
    # the same curve under another name (a shard run elsewhere) is the same input; another curve is not
    copy = tmp_path / "copy.safetensors"
    shutil.copy(bezier, copy)
    renamed = tmp_path / "renamed-input.h5"
    cli("evaluate-curve", copy, "-m", renamed, "--num-points", "2", "--bn-batches", "1", "--shard", "1/2", "-q", *CPU)
    cli("merge", a, renamed, "-o", tmp_path / "renamed-merged.h5", "-q")
    line = tmp_path / "line.safetensors"
    cli("connect", *digits_models, "--curve", "line", "-o", line, "-q", *CPU)
    other = tmp_path / "other-input.h5"
    cli("evaluate-curve", line, "-m", other, "--num-points", "2", "--bn-batches", "1", "--shard", "1/2", "-q", *CPU)
    assert "other input files" in cli.error("merge", a, other, "-o", out)
    # another kind
    plane = tmp_path / "plane.h5"
    cli("plane", bezier, "-m", plane, "--grid-points", "2", "--shard", "1/2", "--bn-batches", "1", "--train-subset",
        "16", "-q", *CPU)
    msg = cli.error("merge", a, plane, "-o", out)
    assert "different runs" in msg and "one is a plane file, the other an evaluate-curve file" in msg
    # not a shard file, not an HDF5 file, not a file
    full = tmp_path / "full.h5"
    cli("evaluate-curve", bezier, "-m", full, "--num-points", "2", "--bn-batches", "1", "-q", *CPU)
    assert f"'{full}' is not a shard file" in cli.error("merge", a, full, "-o", out)
    text = tmp_path / "notes.h5"
    text.write_text("not hdf5")
    assert f"'{text}' is not a readable HDF5 file" in cli.error("merge", a, text, "-o", out)
    assert "does not exist" in cli.error("merge", a, tmp_path / "gone.h5", "-o", out)
    assert "is a 'train' file" in cli.error("merge", a, digits_models[0].with_suffix(".h5"), "-o", out)
    # outputs: an input, an existing file without --force
    assert "also an input" in cli.error("merge", a, b, "-o", a)
    out.write_text("old")
    assert "--force" in cli.error("merge", a, b, "-o", out)
    cli("merge", a, b, "-o", out, "--force", "-q")
    assert read_h5(out)[1]["kind"] == "evaluate-curve"
    assert not list(tmp_path.glob(".*.tmp"))


def test_merge_checks_each_value_comes_from_one_shard(cli, tmp_path, curve_shards):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    shutil.copy(curve_shards["a"], a)
    shutil.copy(curve_shards["b"], b)
    with h5py.File(b, "a") as f:  # shard 1/2 computes t[1]; give it t[0] too
        f["test/err"][0] = 0.5
    msg = cli.error("merge", a, b, "-o", tmp_path / "m.h5")
    assert "value test/err[0] is computed in more than one shard" in msg and str(b) in msg
    shutil.copy(curve_shards["b"], b)
    with h5py.File(b, "a") as f:
        f["train/nll"][1] = np.nan
    msg = cli.error("merge", a, b, "-o", tmp_path / "m.h5")
    assert "value train/nll[1] is missing (NaN) in every shard" in msg and f"shard 1/2 ('{b}')" in msg
    assert "--resume" in msg and not (tmp_path / "m.h5").exists()
    from mctool import fileio

    release = fileio._lock(b)  # a shard still running: wait for it, not --resume
    try:
        msg = cli.error("merge", a, b, "-o", tmp_path / "m.h5")
    finally:
        release()
    assert "a running mctool command is writing it: merge again when it has finished." in msg and "--resume" not in msg
    # what every shard computes alike (the coordinates, the split) must agree
    shutil.copy(curve_shards["b"], b)
    with h5py.File(b, "a") as f:
        f["t"][1] = 0.9
    assert "other values in t" in cli.error("merge", a, b, "-o", tmp_path / "m.h5")
    shutil.copy(curve_shards["b"], b)
    with h5py.File(b, "a") as f:
        f.attrs["split"] = "val"
    assert "evaluated on the 'val' and the 'test' split" in cli.error("merge", a, b, "-o", tmp_path / "m.h5")


def test_a_shard_on_two_ranks(cli, tmp_path, bezier):
    """A shard's points are dealt over torchrun's ranks; the shard files merge as ever."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    # TMPDIR: torchrun leaves a folder torchelastic_* there at every launch
    env.update(OMP_NUM_THREADS="1", MCTOOL_DIST_TIMEOUT="60", PYTHONPATH=str(root), TMPDIR=str(tmp_path))
    full, shards = tmp_path / "full.h5", [tmp_path / "s0.h5", tmp_path / "s1.h5"]
    cli("evaluate-curve", bezier, "-m", full, *CURVE)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "mctool", "evaluate-curve", str(bezier), "-m", str(shards[0]), "--shard", "0/2",
                           *CURVE], capture_output=True, text=True, timeout=240, env=env, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    assert np.isnan(read_h5(shards[0])[0]["train/loss"]).tolist() == [False, True, False, True, False]
    cli("evaluate-curve", bezier, "-m", shards[1], "--shard", "1/2", *CURVE)
    merged = tmp_path / "merged.h5"
    cli("merge", *shards, "-o", merged, "-q")
    a, b = read_h5(merged)[0], read_h5(full)[0]
    assert a.keys() == b.keys()
    for name in a:  # another thread count on the ranks: float32 sums in another order (see test_distributed)
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-7, err_msg=name)


def test_the_same_inputs_in_another_order_are_another_run(cli, tmp_path, digits_models):
    """A B and B A name the same files (the `inputs` attribute is sorted by path) but not the same segment:
    neither --resume nor merge may mix them (`input_order`)."""
    a, b = digits_models
    seg = ["--num-points", "3", "-q", *CPU]
    m = tmp_path / "ab.h5"
    cli("evaluate-curve", a, b, "-m", m, *seg)
    assert json.loads(read_h5(m)[1]["input_order"]) == [sha256_file(a), sha256_file(b)]
    assert "given in another order" in cli.error("evaluate-curve", b, a, "-m", m, *seg, "--resume")
    cli("evaluate-curve", a, b, "-m", m, *seg, "--resume")  # the run's own order: nothing left to do
    s0, s1 = tmp_path / "s0.h5", tmp_path / "s1.h5"
    cli("evaluate-curve", a, b, "-m", s0, "--shard", "0/2", *seg)
    cli("evaluate-curve", b, a, "-m", s1, "--shard", "1/2", *seg)
    assert "the same input files given in another order" in cli.error("merge", s0, s1, "-o", tmp_path / "m.h5")
