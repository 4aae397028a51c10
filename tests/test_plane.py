"""`mctool plane`: basis, grid, resume, inputs, errors."""

import importlib
import json

import h5py
import numpy as np
import pytest
import torch
from conftest import count_networks

from mctool import fileio
from mctool.checkpoint import load_model
from mctool.curves import Curve, load_curve, save_curve
from mctool.errors import ConfigError
from mctool.flat import ParamLayout
from mctool.h5io import read_h5
from mctool.plane import PlaneBasis

plane_module = importlib.import_module("mctool.plane")  # the module: mctool.plane is the function

CPU = ["--device", "cpu"]


@pytest.mark.parametrize("curve, bends", [("bezier", 1), ("bezier", 3), ("polychain", 2)])
def test_curve_projection_is_exact_in_float64(curve, bends):
    import importlib

    from mctool.curves import Curve

    plane_module = importlib.import_module("mctool.plane")  # (mctool.plane is also the function)

    g = torch.Generator().manual_seed(1)
    pts = torch.randn(bends + 2, 40, generator=g)
    c = Curve(curve, bends, pts, None, None, {})
    w0, w1, w2 = pts[0], pts[(bends + 1) // 2], pts[-1]
    b = PlaneBasis.through(w0, w1, w2)
    ts = np.linspace(0, 1, 7)
    old = plane_module._CHUNK
    try:
        plane_module._CHUNK = 16  # several blocks of parameters, as a large network has
        xy, off = plane_module.curve_projection(c, b, w0, w1, w2, ts)
    finally:
        plane_module._CHUNK = old
    # the reference: everything in float64 from the start
    p64 = pts.double()
    u = (p64[-1] - p64[0]) / (p64[-1] - p64[0]).norm()
    v = (p64[(bends + 1) // 2] - p64[0]) - ((p64[(bends + 1) // 2] - p64[0]) @ u) * u
    v = v / v.norm()
    for i, t in enumerate(ts):
        d = c.weights(t, p64) - p64[0]
        x, y = float(d @ u), float(d @ v)
        np.testing.assert_allclose(xy[i], [x, y], rtol=0, atol=1e-12 * float(d.norm() + 1))
        np.testing.assert_allclose(off[i], float((d - x * u - y * v).norm()), rtol=1e-9, atol=1e-12)
    if bends == 1:  # planar: off it by rounding alone, not float32's 1e-7
        assert off.max() < 1e-13 * b.dx


def test_basis_is_orthonormal_and_places_the_points():
    g = torch.Generator().manual_seed(0)
    w0, w1, w2 = (torch.randn(50, generator=g) for _ in range(3))
    b = PlaneBasis.through(w0, w1, w2)
    assert float(b.u.double().norm()) == pytest.approx(1.0, abs=1e-6)
    assert float(b.v.double().norm()) == pytest.approx(1.0, abs=1e-6)
    assert float(b.u.double() @ b.v.double()) == pytest.approx(0.0, abs=1e-6)
    assert b.project(w0)[:2] == pytest.approx((0.0, 0.0), abs=1e-5)
    assert b.project(w2)[:2] == pytest.approx((b.dx, 0.0), abs=1e-5)
    assert b.project(w1)[:2] == pytest.approx((float((w1 - w0) @ b.u), b.dy), abs=1e-5)
    # All three lie in their own plane, up to rounding: u and v are stored in float32 (components within
    # 2^-24 relative), so the residual d - x u - y v keeps ~|d| 2^-24 per coordinate pair: allow |d| 1e-6
    # (measured: 3e-8). sqrt(|d|^2 - x^2 - y^2) would cancel down to ~|d| 5e-4 (2e-3 was seen on a real plane).
    for w in (w1, w2):
        assert b.project(w)[2] == pytest.approx(0.0, abs=1e-6 * float((w - w0).norm()))
    off = torch.randn(50, generator=g).double()  # a known distance off the plane
    off -= (off @ b.u.double()) * b.u.double() + (off @ b.v.double()) * b.v.double()
    off = 0.01 * off / off.norm()
    # (w rounded to float32 moves it by ~sqrt(50) x 3 x 2^-24 = 1.3e-6, 1.3e-4 of the distance)
    assert b.project((w1.double() + off).float())[2] == pytest.approx(0.01, rel=1e-3)
    alpha, beta = 0.3, -0.15
    assert torch.allclose(b.weights(alpha, beta), w0 + alpha * b.dx * b.u + beta * b.dy * b.v)
    assert torch.allclose(b.weights(0, 0), w0) and torch.allclose(b.weights(1, 0), w2, atol=1e-5)


def test_degenerate_points_are_refused():
    w0, w2 = torch.zeros(10), torch.ones(10)
    with pytest.raises(ConfigError, match="one line"):
        PlaneBasis.through(w0, 0.4 * w2, w2)
    with pytest.raises(ConfigError, match="coincide"):
        PlaneBasis.through(w0, w2, w0.clone())


@pytest.fixture(scope="module")
def bezier(tmp_path_factory, digits_models):
    out = tmp_path_factory.mktemp("plane") / "c.safetensors"
    from conftest import Cli

    Cli()("connect", *digits_models, "-o", out, "--epochs", "1", "--lr", "0.05", "-q", *CPU)
    return out


def test_plane_from_curve_layout_and_values(cli, tmp_path, bezier):
    m, png = tmp_path / "p.h5", tmp_path / "p.png"
    r = cli.json("plane", bezier, "-m", m, "--grid-points", "3", "--margin", "0", "--plot", png, *CPU)
    data, attrs = read_h5(m)
    curve = load_curve(bezier)[0]
    b = PlaneBasis.through(*curve.points)
    assert attrs["kind"] == "plane" and attrs["dx"] == pytest.approx(b.dx) and attrs["dy"] == pytest.approx(b.dy)
    assert data["alpha"] == pytest.approx([0, b.dx / 2, b.dx]) and data["beta"] == pytest.approx([0, b.dy / 2, b.dy])
    assert data["points"] == pytest.approx(np.array([[0, 0], [b.w1_x, b.dy], [b.dx, 0]]), abs=1e-4)
    for name in ("train/loss", "train/err", "test/nll", "test/err"):
        assert data[name].shape == (3, 3) and np.isfinite(data[name]).all()
    # grid node (0, 0) is w0 itself, so it equals the value measured at the first point
    assert data["train/loss"][0, 0] == pytest.approx(data["at_points/train/loss"][0], rel=1e-5)
    assert data["test/err"][2, 0] == pytest.approx(data["at_points/test/err"][2], abs=1e-6)  # (1, 0) is w2
    # a 1-bend Bezier lies in the plane of its control points: off it by float64 rounding only
    assert data["curve"].shape == (61, 2) and data["curve_offplane"].max() < 1e-12 * b.dx
    assert r["metrics"]["eval"]["err"]["max"] == pytest.approx(np.max(data["test/err"]))
    assert r["metrics"]["train"]["loss"]["at_points"] == pytest.approx(data["at_points/train/loss"].tolist())
    assert r["outputs"]["plot"]["path"] == str(png) and attrs["split"] == "test"
    with h5py.File(m) as f:
        assert f["train/loss"].dims[0][0].name == "/alpha" and f["train/loss"].dims[1][0].name == "/beta"
    assert png.read_bytes()[:4] == b"\x89PNG"
    cli("plot", m, "-o", tmp_path / "again.png")  # redraw without recomputing
    assert (tmp_path / "again.png").stat().st_size > 1000


def test_plot_of_an_unfinished_or_sharded_plane_says_so(cli, tmp_path, bezier):
    """An interrupted plane draws what it has with a warning; one with nothing computed and a shard file (every
    N-th cell: nothing to contour) are refused, also for --html and --vtk (they were drawn empty, exit 0)."""
    import shutil

    m = tmp_path / "p.h5"
    cli("plane", bezier, "-m", m, "--grid-points", "3", "-q", *CPU)
    part, empty = tmp_path / "part.h5", tmp_path / "empty.h5"
    for path, cells in ((part, [(0, 0), (2, 2)]), (empty, [(i, j) for i in range(3) for j in range(3)])):
        shutil.copy(m, path)
        with h5py.File(path, "r+") as f:  # as an interrupted run leaves it: no summary, cells still NaN
            del f.attrs["summary"]
            for name in ("train/loss", "train/err", "test/nll", "test/err"):
                for i, j in cells:
                    f[name][i, j] = np.nan
    res = cli("plot", part, "-o", tmp_path / "part.png")
    assert [w for w in res.stderr.splitlines() if w.startswith("Warning: ")] == [
        f"Warning: '{part}' is an interrupted run's: 7 of 9 grid points are computed, and the figure shows only "
        "those. Finish it with the same command plus --resume."]
    for extra in (["-o", tmp_path / "e.png"], ["--vtk", tmp_path / "e.vts"], ["--html", tmp_path / "e.html"]):
        assert "nothing to draw: no point of the plane is computed yet (NaN)" in cli.error("plot", empty, *extra)
    assert not list(tmp_path.glob("e.*"))
    # a file that a running plane is writing (it holds the file's lock) is drawn as it is so far, not called
    # interrupted; the lock is looked at, not taken or created
    assert not fileio.being_written(part) and not fileio.lock_path(part).exists()
    releases = [fileio._lock(part), fileio._lock(empty)]
    try:
        assert fileio.being_written(part)
        res = cli("plot", part, "-o", tmp_path / "now.png")
        assert "is being written by a running mctool command: 7 of 9 grid points are computed so far" in res.stderr
        assert "--resume" not in res.stderr
        assert "A running mctool command is writing it: draw it again later." in cli.error(
            "plot", empty, "-o", tmp_path / "e.png")
    finally:
        for release in releases:
            release()
    assert not fileio.being_written(part) and not fileio.lock_path(part).exists()
    assert "Warning" not in cli("plot", m, "-o", tmp_path / "whole.png").stderr
    shard = tmp_path / "s.h5"
    cli("plane", bezier, "-m", shard, "--grid-points", "3", "--shard", "1/2", "-q", *CPU)
    assert f"'{shard}' is shard 1/2 of a plane: it holds only that shard's points. Merge the shards first" in \
        cli.error("plot", shard, "-o", tmp_path / "s.png")


def test_grid_point_weights_are_the_formula(tmp_path, bezier, monkeypatch):
    seen = []
    batched = importlib.import_module("mctool.batched")
    real = batched.evaluate_weights

    def spy(model, *a, **k):
        seen.append(ParamLayout.of(model).flatten(dict(model.named_parameters())).clone())
        return real(model, *a, **k)

    monkeypatch.setattr(batched, "evaluate_weights", spy)  # one network per pass: each goes through here
    plane_module.plane([str(bezier)], tmp_path / "p.h5", grid_points=2, margins=(0.5, 0.0, 0.25, 0.0),
                       device="cpu", quiet=True, points_per_pass=1)
    curve = load_curve(bezier)[0]
    b = PlaneBasis.through(*curve.points)
    assert len(seen) == 3 + 4
    assert torch.allclose(seen[1], curve.points[1])  # the three points first
    # then the grid in [alpha, beta] order: alpha in (-0.5, 1), beta in (-0.25, 1)
    assert torch.allclose(seen[3], b.weights(-0.5, -0.25), atol=1e-6)
    assert torch.allclose(seen[4], b.weights(-0.5, 1.0), atol=1e-6)
    assert torch.allclose(seen[6], b.weights(1.0, 1.0), atol=1e-6)


def test_resume_fills_only_nan_cells(cli, tmp_path, bezier, monkeypatch):
    m = tmp_path / "p.h5"
    args = [bezier, "-m", m, "--grid-points", "3", *CPU]
    cli("plane", *args, "-q")
    full, _ = read_h5(m)
    with h5py.File(m, "a") as f:
        f["test/err"][1, 2] = np.nan
        f["train/loss"][2, 0] = np.nan
    calls = count_networks(monkeypatch)
    cli("plane", *args, "--resume", "-q")
    assert len(calls) == 2
    again, _ = read_h5(m)
    assert again["test/err"] == pytest.approx(full["test/err"]) and again["train/loss"] == pytest.approx(
        full["train/loss"])
    assert "these differ: --grid-points: 3 -> 4." in cli.error("plane", bezier, "-m", m, "--grid-points", "4",
                                                               "--resume")
    assert "other settings" in cli.error("plane", bezier, "-m", m, "--grid-points", "3", "--wd", "0.1", "--resume")
    # the bend is recorded as used: --bend 1 (the default of a one-bend curve) given or not is the same plane
    assert json.loads(read_h5(m)[1]["config"])["bend"] == 1
    cli("plane", *args, "--bend", "1", "--resume", "-q")
    m2 = tmp_path / "p2.h5"
    cli("plane", bezier, "-m", m2, "--grid-points", "3", "--bend", "1", *CPU, "-q")
    assert json.loads(read_h5(m2)[1]["config"])["bend"] == 1
    cli("plane", bezier, "-m", m2, "--grid-points", "3", *CPU, "--resume", "-q")
    # a file of an earlier version recorded a --bend left out as null: the default bend, whichever way it is given
    with h5py.File(m2, "a") as f:
        f.attrs["config"] = json.dumps({**json.loads(f.attrs["config"]), "bend": None})
    cli("plane", bezier, "-m", m2, "--grid-points", "3", "--bend", "1", *CPU, "--resume", "-q")
    cli("plane", bezier, "-m", m2, "--grid-points", "3", *CPU, "--resume", "-q")


@pytest.mark.parametrize("when", ["before", "after"])
def test_ctrl_c_at_the_first_write_says_what_is_left(cli, tmp_path, bezier, monkeypatch, when):
    """Ctrl-C as the first (all-NaN) metrics file is written: before it is there, nothing is left (the start-up
    message); once it is there, the message says so and that --resume goes on (a plain rerun is refused)."""
    import importlib

    plane_module = importlib.import_module("mctool.plane")  # (mctool.plane is the function)
    m = tmp_path / "p.h5"
    args = ["plane", bezier, "-m", m, "--grid-points", "3", "-q", *CPU]
    real = plane_module.write_plane_file

    def ctrl_c(*a, **k):
        if when == "after":
            real(*a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(plane_module, "write_plane_file", ctrl_c)
    message = cli.error(*args, code=130)
    monkeypatch.undo()
    if when == "before":
        assert message.endswith("interrupted (Ctrl-C).") and not m.exists()
    else:
        assert f"interrupted; 0 of 12 points are saved in '{m}'. Continue with the same command plus --resume." in (
            message)
        assert "holds an interrupted run; pass --resume" in cli.error(*args)
        cli(*args, "--resume")
        assert "summary" in read_h5(m)[1]


def test_three_checkpoints_agree_with_the_curve(cli, tmp_path, bezier, digits_models):
    curve = load_curve(bezier)[0]
    mid = tmp_path / "bend.safetensors"
    # the bend as an ordinary checkpoint: take the MLP from A and put the bend's weights in it
    from mctool.checkpoint import save_model

    a = load_model(digits_models[0])
    curve.layout.assign(a.model, curve.points[1])
    save_model(mid, a.model, a.meta)
    r1 = cli.json("plane", bezier, "-m", tmp_path / "c.h5", "--grid-points", "2", *CPU)
    r3 = cli.json("plane", digits_models[0], mid, digits_models[1], "-m", tmp_path / "m.h5", "--grid-points", "2",
                  *CPU)
    for group, key in (("train", "loss"), ("eval", "err")):
        s1, s3 = r1["metrics"][group][key], r3["metrics"][group][key]
        assert s1["at_points"] == pytest.approx(s3["at_points"], rel=1e-5)
        assert s1["min"] == pytest.approx(s3["min"], rel=1e-5)
    assert np.array(r3["points"]) == pytest.approx(np.array(r1["points"]), rel=1e-5)
    _, attrs = read_h5(tmp_path / "m.h5")
    assert len(json.loads(attrs["inputs"])) == 3


def test_plane_errors(cli, tmp_path, bezier, digits_models):
    m = tmp_path / "p.h5"
    a, b = digits_models
    assert f"one line ('{a}' is on the line through '{a}' and '{b}')" in cli.error("plane", a, a, b, "-m", m)
    assert f"coincide ('{a}' and '{a}' are the same network)" in cli.error("plane", a, b, a, "-m", m)
    assert "three model checkpoints" in cli.error("plane", *digits_models, "-m", m)
    assert "--bend" in cli.error("plane", bezier, "-m", m, "--bend", "2")
    assert "--grid-points" in cli.error("plane", bezier, "-m", m, "--grid-points", "1")
    assert "--margin-top must be in [0, 10]" in cli.error("plane", bezier, "-m", m, "--margin-top", "-1")
    assert "--margin must be in [0, 10], got 11." in cli.error("plane", bezier, "-m", m, "--margin", "11")
    line = tmp_path / "line.safetensors"
    cli("connect", *digits_models, "--curve", "line", "-o", line, "-q")
    assert "no bend" in cli.error("plane", line, "-m", m)
    assert not m.exists()


def test_train_subset_is_used(tmp_path, bezier):
    r = plane_module.plane([str(bezier)], tmp_path / "p.h5", grid_points=2, train_subset=50, device="cpu",
                           quiet=True)
    # train error on 50 images moves in steps of 1/50
    errs = np.array(r.metrics["train"].err.at_points) * 50  # the library returns typed results
    assert np.allclose(errs, np.round(errs), atol=1e-4)
    # 0 means all training images, as for hessian: the same run as without the option (its config records None)
    every = plane_module.plane([str(bezier)], tmp_path / "a.h5", grid_points=2, train_subset=0, device="cpu",
                               quiet=True)
    plain = plane_module.plane([str(bezier)], tmp_path / "b.h5", grid_points=2, device="cpu", quiet=True)
    assert every.metrics["train"].err.at_points == plain.metrics["train"].err.at_points
    assert read_h5(tmp_path / "a.h5")[1]["config"] == read_h5(tmp_path / "b.h5")[1]["config"]


def test_the_default_bend_is_the_middle_one(tmp_path, bezier):
    """docs/cli.md (plane --bend): the default is the middle bend, (n + 1) // 2: bend 1 of a curve of 2 bends
    (n // 2 + 1 would take bend 2; for odd n the two agree)."""
    one = load_curve(bezier)[0]
    a, bend, b = one.points
    path = tmp_path / "two.safetensors"  # bend 2 is bend 1 moved by B - A: its plane coordinates differ by dx
    save_curve(path, Curve("bezier", 2, torch.stack([a, bend, bend + (b - a), b]), one.layout, one.meta, one.buffers),
               {})
    plane_module.plane([str(path)], tmp_path / "p.h5", grid_points=2, device="cpu", quiet=True)
    data, attrs = read_h5(tmp_path / "p.h5")
    basis = PlaneBasis.through(a, bend, b)
    assert attrs["dx"] == pytest.approx(basis.dx) and attrs["dy"] == pytest.approx(basis.dy)
    # float32 points, as in test_plane_from_curve_layout_and_values; bend 2 would move the middle point by dx (~14)
    assert data["points"] == pytest.approx(np.array([[0, 0], [basis.w1_x, basis.dy], [basis.dx, 0]]), abs=1e-4)


def test_the_grid_holds_every_point_of_interest():
    margins = (0.2, 0.2, 0.2, 0.2)
    # the usual case: the bend projects between w0 and w2, the curve inside the triangle: [-0.2, 1.2] in both
    pts = np.array([[0.0, 0.0], [1.0, 2.0], [4.0, 0.0]])
    curve = np.array([[-1e-7, 1e-8], [2.0, 1.0], [4.0, -1e-8]])  # float32 rounding outside the box: not widened
    a, b = plane_module.grid_fractions(pts, curve, 4.0, 2.0, margins, 8)
    np.testing.assert_array_equal(a, np.linspace(-0.2, 1.2, 8))
    np.testing.assert_array_equal(b, np.linspace(-0.2, 1.2, 8))
    # the bend beyond w2 and a curve of two bends that dips below the segment: the box grows to hold them
    pts = np.array([[0.0, 0.0], [6.0, 2.0], [4.0, 0.0]])
    curve = np.array([[0.0, 0.0], [5.0, -1.0], [4.0, 0.0]])
    a, b = plane_module.grid_fractions(pts, curve, 4.0, 2.0, (0.1, 0.2, 0.3, 0.4), 5)
    np.testing.assert_allclose(a, np.linspace(-0.1 * 1.5, 1.5 + 0.2 * 1.5, 5), rtol=0, atol=1e-15)
    np.testing.assert_allclose(b, np.linspace(-0.5 - 0.3 * 1.5, 1 + 0.4 * 1.5, 5), rtol=0, atol=1e-15)


SMALL_RUNS = [("plane", ["--grid-points", "3"]), ("evaluate-curve", ["--num-points", "3"])]


@pytest.mark.parametrize("command, size", SMALL_RUNS)
def test_an_interrupted_forced_run_leaves_no_old_figure(cli, tmp_path, bezier, monkeypatch, command, size):
    """--force over a finished run with --plot, interrupted: the earlier run's figure was left beside the new
    metrics file (and --resume then refused it). It is deleted with the first write, as train deletes an old -o."""
    import mctool.points

    m, png = tmp_path / "r.h5", tmp_path / "r.png"
    args = [command, bezier, "-m", m, "--plot", png, *size, *CPU, "-q"]
    cli(*args)
    assert png.exists()

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(mctool.points.PointRun, "run", ctrl_c)
    assert "--resume" in cli.error(*args, "--force", code=130)
    monkeypatch.undo()
    assert m.exists() and not png.exists()
    cli(*args, "--resume")  # no figure in the way: it draws its own
    assert png.read_bytes().startswith(b"\x89PNG")
    # a --force run refused before its first write (its data set is not there) keeps the earlier figure
    png.write_bytes(b"keep")
    said = cli.error(*args, "--force", "-d", "fashion-mnist", "--data-root", tmp_path / "nothing-here")
    assert "fashion-mnist" in said and png.read_bytes() == b"keep"


@pytest.mark.parametrize("command, size", SMALL_RUNS)
def test_resume_refuses_other_data_than_the_interrupted_runs(cli, tmp_path, bezier, command, size):
    """The metrics file records the data set its points were evaluated on (``data_fingerprint``); --resume on
    other data is refused, and a resume with nothing left to compute keeps the record."""
    from mctool.data import load_data

    m = tmp_path / "r.h5"
    args = [command, bezier, "-m", m, *size, *CPU, "-q"]
    cli(*args)
    recorded = read_h5(m)[1]["data_fingerprint"]
    assert recorded == load_data("digits").fingerprint
    with h5py.File(m, "a") as f:
        f["train/loss"][(0, 0) if command == "plane" else 0] = np.nan  # one point left to compute
        f.attrs["data_fingerprint"] = "f" * 64  # as another copy of the data set would have
    said = cli.error(*args, "--resume")
    assert "the data set 'digits' is not the one the interrupted run in" in said and "(its images or labels" in said
    with h5py.File(m, "a") as f:
        f.attrs["data_fingerprint"] = recorded
    cli(*args, "--resume")
    cli(*args, "--resume")  # nothing left: no data loaded, the record kept
    assert read_h5(m)[1]["data_fingerprint"] == recorded
