"""``mctool surface``: filter normalisation, directions, the grid around a network, resume, plots and errors."""

from __future__ import annotations

import importlib
import importlib.util
import io
import json
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import mctool
import mctool.plots as plots
from mctool.checkpoint import load_model
from conftest import Cli, assert_metrics_close
from mctool.errors import ConfigError
from mctool.flat import ParamLayout
from mctool.h5io import read_h5
from mctool.surface import filter_normalize, parameter_kinds, pca_directions, project_trajectory, random_directions

CPU = ["--device", "cpu"]


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


def test_filter_normalisation_follows_its_definition():
    model = _bn_net()
    layout = ParamLayout.of(model)
    w = layout.flatten(dict(model.named_parameters()))
    kinds = parameter_kinds(model)
    assert kinds == {"0.weight": "weight", "0.bias": "bias", "1.weight": "bn", "1.bias": "bn", "4.weight": "weight",
                     "4.bias": "bias"}
    d = torch.randn(w.numel(), generator=torch.Generator().manual_seed(1))
    out = layout.views(filter_normalize(d, w, layout, kinds, ("bn", "bias")))
    ref = dict(model.named_parameters())
    for name in ("0.weight", "4.weight"):  # each filter (a slice along dim 0) has its network filter's norm
        got = out[name].reshape(out[name].shape[0], -1).norm(dim=1)
        want = ref[name].detach().reshape(got.shape[0], -1).norm(dim=1)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
        # ...and the direction of the random filter
        cos = torch.nn.functional.cosine_similarity(out[name].reshape(got.shape[0], -1),
                                                    layout.views(d)[name].reshape(got.shape[0], -1), dim=1)
        torch.testing.assert_close(cos, torch.ones_like(cos), rtol=0, atol=1e-5)
    for name in ("0.bias", "1.weight", "1.bias", "4.bias"):  # ignored: zero
        assert not out[name].any()
    kept = layout.views(filter_normalize(d, w, layout, kinds, ()))
    for name in ("0.bias", "1.weight"):  # kept 1-D parameters: one filter each
        torch.testing.assert_close(kept[name].norm(), ref[name].detach().norm(), rtol=1e-5, atol=0)


def test_random_directions_depend_only_on_the_seed():
    model = _bn_net()
    layout = ParamLayout.of(model)
    w = layout.flatten(dict(model.named_parameters()))
    a = random_directions(model, w, layout, 2, 3, ("bn", "bias"))
    assert a.shape == (2, w.numel()) and torch.equal(a, random_directions(model, w, layout, 2, 3, ("bn", "bias")))
    assert not torch.equal(a, random_directions(model, w, layout, 2, 4, ("bn", "bias")))
    assert not torch.equal(a[0], a[1])


def test_surface_around_a_network(cli, tmp_path, digits_models):
    a, b = digits_models
    m = tmp_path / "s.h5"
    r = cli.json("surface", a, "-m", m, "--grid-points", "3", "--plot", tmp_path / "s.png", *CPU)
    assert r["dims"] == 2 and r["directions"] == "random" and r["grid_points"] == 3
    assert r["ranges"] == [[-1.0, 1.0], [-1.0, 1.0]] and r["explained_variance_ratio"] is None
    data, attrs = read_h5(m)
    assert attrs["kind"] == "surface" and data["train/loss"].shape == (3, 3) and not np.isnan(data["test/err"]).any()
    np.testing.assert_array_equal(data["alpha"], [-1, 0, 1])
    # the centre is the network itself: the metrics evaluate gives
    ev = cli.json("evaluate", a, *CPU)["metrics"]["eval"]
    assert data["test/err"][1, 1] == pytest.approx(ev["err"], abs=1e-6)
    assert data["test/nll"][1, 1] == pytest.approx(ev["nll"], rel=1e-5)
    assert r["metrics"]["eval"]["err"]["at_points"] == [pytest.approx(ev["err"], abs=1e-6)]
    # ...evaluated once more as the run's first point: the same network, the same numbers
    np.testing.assert_array_equal(data["at_points/test/err"], [data["test/err"][1, 1]])
    np.testing.assert_array_equal(data["at_points/train/loss"], [data["train/loss"][1, 1]])
    # the directions are stored beside the metrics file, filter-normalised (weights only: BN/biases ignored)
    d = load_file(tmp_path / "s-directions.safetensors")["directions"]
    model = load_model(a).model
    w_norm = torch.cat([p.detach().reshape(-1) for n, p in model.named_parameters() if n.endswith("weight")]).norm()
    torch.testing.assert_close(d.norm(dim=1), torch.stack([w_norm, w_norm]), rtol=1e-5, atol=0)
    assert r["outputs"]["directions"]["path"] == str(tmp_path / "s-directions.safetensors")
    from mctool import __version__
    from mctool.checkpoint import read_metadata

    md = read_metadata(tmp_path / "s-directions.safetensors")  # provenance, as every output carries
    assert (md["kind"], md["mctool_version"]) == ("surface-directions", __version__)
    assert md["command"] == read_h5(m)[1]["command"]  # the command line, as the metrics file's (was "surface")
    assert md["inputs"] and md["config"] and md["created"]
    assert (tmp_path / "s.png").stat().st_size > 0
    cli("plot", m, "-o", tmp_path / "again.png", "-q")


def test_a_direction_towards_another_network(cli, tmp_path, digits_models):
    a, b = digits_models
    r = cli.json("surface", a, "-m", tmp_path / "l.h5", "--directions", b, "--grid-points", "3", "--plot",
                 tmp_path / "l.png", *CPU)
    assert r["dims"] == 1 and r["directions"] == "files"
    # by default the range holds A (0) and B (1) with a margin of 0.2 of that extent on each side
    assert r["ranges"] == [[-0.2, 1.2]]
    data, _ = read_h5(tmp_path / "l.h5")
    assert data["test/err"].shape == (3,)
    np.testing.assert_allclose(data["alpha"], [-0.2, 0.5, 1.2], rtol=0, atol=1e-15)
    r = cli.json("surface", a, "-m", tmp_path / "l2.h5", "--directions", b, "--grid-points", "3", "--range", "1",
                 *CPU)
    data, _ = read_h5(tmp_path / "l2.h5")
    # coefficient 1 reaches B (w + (w_B - w) in float32: B up to rounding)
    ev = cli.json("evaluate", b, *CPU)["metrics"]["eval"]
    assert data["test/nll"][2] == pytest.approx(ev["nll"], rel=1e-4)
    assert abs(data["test/err"][2] - ev["err"]) <= 1 / 360  # at most one of the 360 test images flips
    # the figures mark the other network at coefficient 1 (when the grid reaches it), named by its file
    from mctool.plots import grid_view

    for f in ("l.h5", "l2.h5"):
        view = grid_view(tmp_path / f)
        assert view.point_labels == [a.name, b.name] and view.points.tolist() == [[0.0], [1.0]]
        assert view.xlabel == f"a (towards {b.name}: 1 is that network)"
    short = tmp_path / "short.h5"
    cli("surface", a, "-m", short, "--directions", b, "--grid-points", "3", "--range", "0.5", "-q", *CPU)
    assert grid_view(short).point_labels == [a.name]  # B lies outside [-0.5, 0.5]
    c = tmp_path / "c.safetensors"
    cli("train", "-d", "digits", "-o", c, "--epochs", "1", "--seed", "2", "--arch-kwargs", '{"hidden": 32}', "-q",
        *CPU)
    two = tmp_path / "two.h5"
    cli("surface", a, "-m", two, "--directions", b, "--directions", c, "--grid-points", "2", "--range", "1", "-q",
        "--plot", tmp_path / "two.png", *CPU)
    view = grid_view(two)
    assert view.point_labels == [a.name, b.name, c.name]
    assert view.ylabel == f"b (towards {c.name}: 1 is that network)"
    assert view.points.tolist() == [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]


def test_resume_after_an_interruption(cli, tmp_path, digits_models, monkeypatch):
    a = digits_models[0]
    args = [a, "--grid-points", "3", "--dims", "1", "--seed", "5", *CPU]
    full = cli.json("surface", *args, "-m", tmp_path / "full.h5")
    args += ["--points-per-pass", "1"]  # one network per pass: an interruption after the first
    batched = importlib.import_module("mctool.batched")
    real, calls = batched.evaluate_weights, []

    def interrupt_second(*x, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*x, **kw)

    monkeypatch.setattr(batched, "evaluate_weights", interrupt_second)
    msg = cli.error("surface", *args, "-m", tmp_path / "s.h5", code=130)
    assert "1 of 4 points are saved" in msg  # the network itself, then 3 grid points
    monkeypatch.setattr(batched, "evaluate_weights", real)
    # a requeued job: the network's path spelled otherwise (relative, from its folder); the directions file
    # (its inputs recorded by path and sha256) is the run's all the same
    monkeypatch.chdir(Path(a).parent)
    r = cli.json("surface", Path(a).name, *args[1:], "-m", tmp_path / "s.h5", "--resume")
    assert_metrics_close(r["metrics"], full["metrics"])  # one network per pass vs the 4 in one pass
    assert "other settings" in cli.error("surface", a, "--grid-points", "3", "--dims", "1", "--seed", "6", *CPU,
                                         "-m", tmp_path / "s.h5", "--resume")
    # a 1-D figure marks the network with its own value (0 is not a grid point of an even grid)
    from mctool.plots import grid_view

    view = grid_view(tmp_path / "s.h5")
    assert view.at_points["train/loss"].tolist() == [r["metrics"]["train"]["loss"]["at_points"][0]]


def test_stopped_while_writing_its_first_files_the_run_can_go_on(cli, tmp_path, digits_models, monkeypatch):
    """Stopped while its first (all-NaN) metrics file was being written, a run left its directions file alone:
    the same command was refused (the directions file exists) and so was --resume (no metrics file). The
    metrics file is written first now; stopped after it, --resume goes on."""
    a = digits_models[0]
    base = [a, "--grid-points", "3", "--dims", "1", "--seed", "5", *CPU]
    full = cli.json("surface", *base, "-m", tmp_path / "full.h5")
    args = [*base, "-m", tmp_path / "s.h5"]
    surface_module = importlib.import_module("mctool.surface")

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    real = surface_module.write_surface_file
    monkeypatch.setattr(surface_module, "write_surface_file", ctrl_c)
    cli.error("surface", *args, code=130)
    assert not (tmp_path / "s-directions.safetensors").exists() and not (tmp_path / "s.h5").exists()
    monkeypatch.setattr(surface_module, "write_surface_file", real)
    # killed between the metrics file and the directions file
    save_vectors = surface_module.save_vectors
    monkeypatch.setattr(surface_module, "save_vectors", ctrl_c)
    cli.error("surface", *args, code=130)
    assert not (tmp_path / "s-directions.safetensors").exists() and (tmp_path / "s.h5").exists()
    monkeypatch.setattr(surface_module, "save_vectors", save_vectors)
    assert cli.json("surface", *args, "--resume")["metrics"] == full["metrics"]
    assert (tmp_path / "s-directions.safetensors").exists()


def test_errors(cli, tmp_path, digits_models):
    a, b = digits_models
    m = tmp_path / "s.h5"
    assert "--dims must be 1 or 2" in cli.error("surface", a, "-m", m, "--dims", "3", *CPU)
    # one direction file is one direction: --dims 2 was silently ignored
    assert "--dims 2 with 1 direction file(s)" in cli.error("surface", a, "-m", m, "--directions", b, "--dims", "2",
                                                            *CPU)
    assert "--range must be" in cli.error("surface", a, "-m", m, "--range", "0", *CPU)
    assert "--range must be" in cli.error("surface", a, "-m", m, "--range", "inf", *CPU)
    assert "--grid-points must be >= 2" in cli.error("surface", a, "-m", m, "--grid-points", "1", *CPU)
    assert "--ignore takes bn, bias" in cli.error("surface", a, "-m", m, "--ignore", "conv", *CPU)
    assert "not a mix" in cli.error("surface", a, "-m", m, "--directions", "random", "--directions", b, *CPU)
    assert "needs the training trajectory" in cli.error("surface", a, "-m", m, "--directions", "pca", *CPU)
    for typo in ("rnadom", "PCA"):  # was "checkpoint 'rnadom' does not exist."
        assert f"--directions '{typo}' is neither a method (random, pca) nor an existing checkpoint file." in \
            cli.error("surface", a, "-m", m, "--directions", typo, *CPU)
    # direction files that give no direction, or no plane
    assert "the direction towards it is zero" in cli.error("surface", a, "-m", m, "--directions", a, *CPU)
    assert "span no plane" in cli.error("surface", a, "-m", m, "--directions", b, "--directions", b, *CPU)
    assert not m.exists()
    assert "matches no file" in cli.error("surface", a, "-m", m, "--directions", "pca", "--trajectory",
                                          tmp_path / "nothing-*.safetensors", *CPU)
    assert "goes with --directions pca" in cli.error("surface", a, "-m", m, "--trajectory", b, *CPU)
    # one checkpoint spans one direction away from the network, not two
    assert "spans fewer than 2 directions" in cli.error("surface", a, "-m", m, "--directions", "pca",
                                                        "--trajectory", b, *CPU)
    message = cli.error("surface", a, "-m", m, "--directions", "pca", "--dims", "1", "--trajectory", a, *CPU)
    assert "spans fewer than 1 direction " in message and "--dims 1" not in message  # (it is given)
    assert "--margin must be" in cli.error("surface", a, "-m", m, "--margin", "nan", *CPU)
    assert "one or two direction files" in cli.error("surface", a, "-m", m, "--directions", b, "--directions", b,
                                                     "--directions", b, *CPU)
    other = tmp_path / "o.safetensors"
    cli("train", "-d", "digits", "--arch-kwargs", '{"hidden": 8}', "--epochs", "1", "-o", other, "-q", *CPU)
    assert "cannot be connected; they differ in: arch_kwargs" in cli.error("surface", a, "-m", m, "--directions",
                                                                            other, *CPU)
    assert not m.exists() and not (tmp_path / "s-directions.safetensors").exists()
    cli("surface", a, "-m", m, "--grid-points", "2", "--dims", "1", "-q", *CPU)
    assert "already exists" in cli.error("surface", a, "-m", m, "--grid-points", "2", "--dims", "1", *CPU)
    # --ignore as the command line writes it: the biases are zero in the directions by default, not with none
    layout = ParamLayout.of(load_model(a).model)

    def biases(name: str) -> torch.Tensor:
        d = load_file(tmp_path / f"{name}-directions.safetensors")["directions"][0]
        return torch.cat([v.reshape(-1) for k, v in layout.views(d).items() if k.endswith("bias")])

    assert not biases("s").any()
    cli("surface", a, "-m", tmp_path / "n.h5", "--grid-points", "2", "--dims", "1", "--ignore", "none", "-q", *CPU)
    assert biases("n").all()


def test_pca_directions_are_orthonormal_and_explain_the_trajectory():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(500, generator=g)
    basis = torch.linalg.qr(torch.randn(500, 3, generator=g, dtype=torch.float64))[0].T  # orthonormal rows
    # a trajectory mostly along basis[0], less along basis[1], a little along basis[2], ending near w
    steps = torch.linspace(-4, -0.5, 8, dtype=torch.float64)
    pts = [(w.double() + s * basis[0] + 0.5 * torch.sin(s) * basis[1] + 0.01 * (k % 2) * basis[2]).float()
           for k, s in enumerate(steps)]
    d = pca_directions(w, pts, 2)
    assert d.shape == (2, 500) and d.dtype == torch.float32
    torch.testing.assert_close(d.double() @ d.double().T, torch.eye(2, dtype=torch.float64), rtol=0, atol=1e-6)
    seen = project_trajectory(w, pts, d)
    # the first two directions span basis[0] and basis[1]; what is left is the small basis[2] part
    diffs = torch.stack([(p - w).double() for p in pts])
    total = float((diffs ** 2).sum())
    off = float(((diffs @ basis[2]) ** 2).sum())
    assert sum(seen.explained) == pytest.approx(1 - off / total, rel=1e-5)
    assert seen.explained[0] > seen.explained[1] > 0
    # the explained variance is the squared coordinates' share; the coordinates reproduce the points in the plane
    np.testing.assert_allclose((seen.coords ** 2).sum(axis=0) / total, seen.explained, rtol=1e-12)
    resid = diffs.numpy() - seen.coords @ d.double().numpy()
    np.testing.assert_allclose(np.linalg.norm(resid, axis=1) / diffs.norm(dim=1).numpy(), seen.error, rtol=1e-9)
    # optimal: the plane through w along d leaves no more off-plane than the plane of basis[0] and basis[1]
    assert float((resid ** 2).sum()) <= off * (1 + 1e-6)
    # sign: the trajectory starts at negative coordinates and runs towards the network
    assert (seen.coords[0] <= 0).all()
    # the same points give the same directions (no randomness)
    assert torch.equal(d, pca_directions(w, pts, 2))
    with pytest.raises(ConfigError, match="spans fewer than 2"):
        pca_directions(w, [w + basis[0].float(), w + 2 * basis[0].float()], 2)


@pytest.fixture(scope="module")
def trajectory(tmp_path_factory):
    """A digits MLP trained 6 epochs with a checkpoint after each: the final network and its 5 earlier states."""
    folder = tmp_path_factory.mktemp("trajectory")
    out = folder / "run.safetensors"
    Cli()("train", "-d", "digits", "-o", out, "--epochs", "6", "--lr", "0.1", "--seed", "3", "--save-every", "1",
               "--arch-kwargs", '{"hidden": 16}', "-q", *CPU)
    return out, [folder / f"run-epoch{e:03d}.safetensors" for e in range(1, 6)]


def test_surface_along_the_principal_directions_of_a_trajectory(cli, tmp_path, trajectory, monkeypatch):
    final, states = trajectory
    m = tmp_path / "pca.h5"
    # a quoted glob pattern: its matches in natural order (training order)
    r = cli.json("surface", final, "-m", m, "--directions", "pca", "--trajectory", final.parent / "run-epoch*",
                 "--grid-points", "3", "--plot", tmp_path / "pca.png", *CPU)
    assert [i["path"] for i in r["inputs"]] == [str(p) for p in [final, *states]]
    assert r["directions"] == "pca" and r["dims"] == 2
    data, attrs = read_h5(m)
    ev = r["explained_variance_ratio"]
    assert json.loads(attrs["explained_variance_ratio"]) == ev and 0 < ev[1] <= ev[0] and sum(ev) <= 1 + 1e-9
    # the stored numbers follow from the stored directions: recompute them
    d = load_file(tmp_path / "pca-directions.safetensors")["directions"]
    layout = ParamLayout.of(load_model(final).model)
    flat = [layout.flatten(dict(load_model(p).model.named_parameters())) for p in [final, *states]]
    torch.testing.assert_close(d.double() @ d.double().T, torch.eye(2, dtype=torch.float64), rtol=0, atol=1e-6)
    seen = project_trajectory(flat[0], flat[1:], d)
    np.testing.assert_allclose(data["trajectory"], seen.coords, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(data["trajectory_error"], seen.error, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(ev, seen.explained, rtol=1e-9)
    assert r["trajectory_max_error"] == pytest.approx(float(seen.error.max()), rel=1e-9)
    # the grid holds the network (0) and the whole trajectory, with 20% of its extent on each side
    for k, (lo, hi) in enumerate(r["ranges"]):
        c = np.append(seen.coords[:, k], 0.0)
        extent = c.max() - c.min()
        assert lo == pytest.approx(c.min() - 0.2 * extent, rel=1e-9) and hi == pytest.approx(c.max() + 0.2 * extent,
                                                                                          rel=1e-9)
    np.testing.assert_allclose(data["alpha"], np.linspace(*r["ranges"][0], 3), rtol=1e-12)
    assert not np.isnan(data["test/err"]).any() and (tmp_path / "pca.png").stat().st_size > 0
    # the network itself, evaluated as the run's first point
    assert r["metrics"]["eval"]["err"]["at_points"] == [pytest.approx(cli.json("evaluate", final, *CPU)["metrics"]
                                                                      ["eval"]["err"], abs=1e-6)]
    cli("plot", m, "-o", tmp_path / "pca3d.png", "--3d", "-q")
    assert (tmp_path / "pca3d.png").stat().st_size > 0
    # both axes are weight-space units, drawn to fill the panel: PC2's label says how much its unit is stretched
    # (a detour along PC2 looked larger than it is); the trajectory's first point is named as what it is
    import matplotlib.pyplot as plt

    view = plots.grid_view(m)
    assert view.same_units == ("PC1", "PC2") and not view.equal_aspect
    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, *_: drawn.append(fig))
    plots.plot_grid(m, tmp_path / "again.png")
    ax = drawn[0].axes[0]
    drawn[0].savefig(io.BytesIO(), format="png")  # the panels' sizes as written, after the layout
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    box = ax.get_window_extent()
    stretch = (box.height / (y1 - y0)) / (box.width / (x1 - x0))
    said = re.search(r"a unit of PC2 drawn ([0-9.,]+)x as long as a unit of PC1", ax.get_ylabel())
    assert said and float(said.group(1).replace(",", "")) == pytest.approx(stretch, rel=0.1)
    assert "first checkpoint" in [t.get_text() for t in ax.texts]
    legend = [t.get_text() for t in drawn[0].legends[0].get_texts()]
    assert legend == ["trajectory (projected)", f"{final.name} (the centre)"]
    plt.close("all")


def test_a_surface_in_shards_merges_into_the_whole_run(cli, tmp_path, trajectory):
    final, states = trajectory
    args = [final, "--directions", "pca", *[x for p in states for x in ("--trajectory", p)], "--grid-points", "3", *CPU]
    whole = cli.json("surface", *args, "-m", tmp_path / "whole.h5")
    for i in range(3):
        cli("surface", *args, "-m", tmp_path / f"s{i}.h5", "--shard", f"{i}/3", "-q")
    shard0, _ = read_h5(tmp_path / "s0.h5")
    assert np.isnan(shard0["test/err"]).sum() == 6  # 10 points (the network + 9 cells): shard 0 has 4
    r = cli.json("merge", *[tmp_path / f"s{i}.h5" for i in (2, 0, 1)], "-o", tmp_path / "merged.h5", "--plot",
                 tmp_path / "merged.png")
    assert r["kind"] == "surface" and r["shards"] == 3
    assert_metrics_close(r["metrics"], whole["metrics"])  # the shards' passes group the cells otherwise
    merged, attrs = read_h5(tmp_path / "merged.h5")
    want, _ = read_h5(tmp_path / "whole.h5")
    for name in ("trajectory", "alpha", "beta"):
        np.testing.assert_array_equal(merged[name], want[name])
    for name in ("train/loss", "at_points/test/nll"):
        np.testing.assert_allclose(merged[name], want[name], rtol=1e-5, atol=0)
    np.testing.assert_allclose(merged["test/err"], want["test/err"], rtol=0, atol=0.01)
    assert attrs["directions_file"] == "merged-directions.safetensors"
    assert torch.equal(load_file(tmp_path / "merged-directions.safetensors")["directions"],
                       load_file(tmp_path / "whole-directions.safetensors")["directions"])
    assert "--plot draws the whole surface" in cli.error("surface", *args, "-m", tmp_path / "x.h5", "--shard", "0/2",
                                                         "--plot", tmp_path / "x.png")
    # a shard naming no directions file, or one elsewhere, is one error line (it was a traceback)
    for bad in ("", "../x.safetensors", "..\\x.safetensors"):  # (a backslash: a folder on Windows)
        for i in range(3):
            with h5py.File(tmp_path / f"s{i}.h5", "r+") as f:
                f.attrs["directions_file"] = bad
        assert "attribute 'directions_file' must name a file beside it" in cli.error(
            "merge", *[tmp_path / f"s{i}.h5" for i in range(3)], "-o", tmp_path / "bad.h5")


def _vtk_arrays(path) -> tuple[dict[str, np.ndarray], dict[str, list[int]], str]:
    """The float64 arrays (by name; the points as 'Points') and integer arrays of a VTK XML file we write."""
    import base64
    import xml.etree.ElementTree as ET

    root = ET.parse(path).getroot()
    assert root.get("byte_order") == "LittleEndian" and root.get("header_type") == "UInt32"
    floats, ints = {}, {}
    for parent in root.iter():
        for arr in parent.findall("DataArray"):
            if arr.get("type") == "Float64":
                raw = base64.b64decode(arr.text)
                size = int(np.frombuffer(raw[:4], "<u4")[0])
                assert size == len(raw) - 4
                values = np.frombuffer(raw[4:], "<f8")
                floats[arr.get("Name") or parent.tag] = values.reshape(-1, int(arr.get("NumberOfComponents")))
            else:
                ints[f"{parent.tag}/{arr.get('Name')}"] = [int(v) for v in arr.text.split()]
    return floats, ints, root.get("type")


def test_plot_exports_vtk_and_html(cli, tmp_path, trajectory):
    final, states = trajectory
    m = tmp_path / "s.h5"
    cli("surface", final, "-m", m, "--directions", "pca", "--trajectory", final.parent / "run-epoch*",
        "--grid-points", "3", "-q", *CPU)
    data, _ = read_h5(m)
    with h5py.File(m, "r+") as f:  # a cell not computed yet
        f["test/err"][0, 2] = np.nan
    data, _ = read_h5(m)
    # plotly is the optional extra `html`: without it (pip install -e ".[test]") the VTK files are still checked
    html = importlib.util.find_spec("plotly") is not None
    r = cli.json("plot", m, "--vtk", tmp_path / "s.vts", *(["--html", tmp_path / "s.html"] if html else []))
    assert r["kind"] == "surface" and r["outputs"]["plot"] is None
    assert r["outputs"]["vtk_points"]["path"] == str(tmp_path / "s-points.vtp")
    # the structured grid: x runs fastest, every metric as point data, NaN kept
    arrays, _, kind = _vtk_arrays(tmp_path / "s.vts")
    assert kind == "StructuredGrid"
    xx, yy = np.meshgrid(data["alpha"], data["beta"], indexing="xy")
    np.testing.assert_array_equal(arrays["Points"], np.stack([xx.ravel(), yy.ravel(), 0 * xx.ravel()], axis=1))
    for name in ("train/loss", "train/err", "test/nll", "test/err"):
        np.testing.assert_array_equal(arrays[name.replace("/", "_")][:, 0], data[name].T.ravel())
    assert np.isnan(arrays["test_err"][2 * 3 + 0, 0])  # cell (i=0, j=2)
    # the points file: the network at the origin, then the trajectory ending there, as one polyline
    arrays, ints, kind = _vtk_arrays(tmp_path / "s-points.vtp")
    assert kind == "PolyData"
    np.testing.assert_array_equal(arrays["Points"][0], [0, 0, 0])
    np.testing.assert_array_equal(arrays["Points"][1:-1, :2], data["trajectory"])
    np.testing.assert_array_equal(arrays["Points"][-1], [0, 0, 0])
    assert ints["Lines/connectivity"] == list(range(1, 7)) and ints["Lines/offsets"] == [6]
    if html:
        page = (tmp_path / "s.html").read_text()
        assert "plotly" in page and '"type":"surface"' in page and "trajectory (projected)" in page
    # errors: nothing to write, exports of curves, HTML of a 1-D surface; outputs are not clobbered
    assert "give an output" in cli.error("plot", m)
    assert "already exists" in cli.error("plot", m, "--vtk", tmp_path / "s.vts")
    cli("surface", final, "-m", tmp_path / "l.h5", "--dims", "1", "--grid-points", "2", "-q", *CPU)
    assert "this surface is 1-D" in cli.error("plot", tmp_path / "l.h5", "--html", tmp_path / "l.html")
    assert "is a 1-D surface" in cli.error("plot", tmp_path / "l.h5", "-o", tmp_path / "l.png", "--3d")
    cli("plot", tmp_path / "l.h5", "--vtk", tmp_path / "l.vts", "-q")  # a 1-D grid is a line of points
    arrays, _, _ = _vtk_arrays(tmp_path / "l.vts")
    assert arrays["Points"].shape == (2, 3)


def test_an_unquoted_trajectory_glob_gets_a_hint(cli, tmp_path, digits_models):
    """The shell expands an unquoted pattern into many arguments; the option takes one, so say to quote it."""
    a, b = digits_models
    err = cli.error("surface", a, "-m", tmp_path / "s.h5", "--directions", "pca", "--trajectory", a, b, code=2)
    # ("argument (" in click's wording before Typer carried its copy)
    assert "Got unexpected extra argument" in err and "quote it" in err
    assert "quote it" not in cli.error("info", a, b, code=2)


def test_a_trajectory_glob_is_in_training_order_past_epoch_999(tmp_path, digits_models):
    """--save-every pads epochs to three digits; epoch 1000 comes after epoch 500 (natural order, not by name).
    The library expands the patterns, so Python callers can give them as the command line does."""
    from mctool.options import expand_patterns as _expand_globs

    for e in (500, 1000, 99, 1001, 5):
        (tmp_path / f"long-epoch{e:03d}.safetensors").touch()
    (tmp_path / "long.safetensors").touch()
    got = _expand_globs([str(tmp_path / "long-epoch*.safetensors"), str(tmp_path / "long.safetensors")], "-t")
    assert [p.rsplit("/", 1)[1] for p in got] == [f"long-epoch{e:03d}.safetensors" for e in (5, 99, 500, 1000, 1001)] \
        + ["long.safetensors"]
    with pytest.raises(ConfigError, match="matches no file"):
        _expand_globs([str(tmp_path / "none-*.safetensors")], "--trajectory")
    with pytest.raises(ConfigError, match="--trajectory '.*none-\\*.safetensors' matches no file"):
        mctool.surface(digits_models[0], tmp_path / "s.h5", directions="pca",
                       trajectory=[str(tmp_path / "none-*.safetensors")], device="cpu")


def test_3d_figures_draw_the_path_on_the_surface():
    """The trajectory of a 3-D figure lies on the surface (bilinear between grid cells, exact for a plane
    z = 2x + 3y up to rounding), not hidden under it; outside the grid it has no height (NaN)."""
    from mctool.plots import _on_grid

    x, y = np.linspace(-1, 1, 5), np.linspace(0, 2, 3)
    z = 2 * x[:, None] + 3 * y[None, :]
    px, py = np.array([-1.0, -0.3, 0.99, 1.0, 1.5]), np.array([0.0, 1.7, 0.25, 2.0, 1.0])
    got = _on_grid(x, y, z, px, py)
    np.testing.assert_allclose(got[:4], 2 * px[:4] + 3 * py[:4], rtol=0, atol=1e-12)
    assert np.isnan(got[4])
    # between its vertices too: each segment of the path is drawn through points lifted onto the surface (a
    # straight chord between two lifted vertices passed through a curved surface)
    from mctool.plots import _densified

    path = np.array([[0.0, 0.0], [1.0, 2.0], [1.0, 0.0]])
    dense = _densified(path, per_segment=4)
    assert dense.shape == (9, 2) and dense[::4].tolist() == path.tolist()
    assert dense[1:4].tolist() == [[0.25, 0.5], [0.5, 1.0], [0.75, 1.5]]


def test_a_directions_file_is_not_taken_for_a_network(cli, tmp_path, digits_models):
    """A surface's NAME-directions.safetensors given to --directions was "a plain state dict without mctool
    metadata; pass --arch ..." (options surface lacks); it is named as what it is."""
    a = digits_models[0]
    cli("surface", a, "-m", tmp_path / "s.h5", "--dims", "1", "--grid-points", "2", "-q", *CPU)
    vec = tmp_path / "s-directions.safetensors"
    err = cli.error("surface", a, "-m", tmp_path / "t.h5", "--directions", vec, "--grid-points", "2", *CPU)
    assert f"'{vec}' is a 'surface-directions' file, not a network; it holds the directions of a surface run" in err
    assert "--arch" not in err
    # the message fits any command that takes a network (hessian has no --directions)
    err = cli.error("hessian", vec, "-m", tmp_path / "h.h5", *CPU)
    assert "give a model checkpoint (surface's --directions too takes networks" in err
