"""``mctool surface``: filter normalisation, directions, the grid around a network, resume, plots and errors."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from mctool.checkpoint import load_model
from mctool.flat import ParamLayout
from mctool.h5io import read_h5
from mctool.surface import filter_normalize, parameter_kinds, random_directions

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
    assert r["dims"] == 2 and r["directions"] == "random" and r["grid_points"] == 3 and r["range"] == 1.0
    data, attrs = read_h5(m)
    assert attrs["kind"] == "surface" and data["train/loss"].shape == (3, 3) and not np.isnan(data["test/err"]).any()
    np.testing.assert_array_equal(data["alpha"], [-1, 0, 1])
    # the centre is the network itself: the metrics evaluate gives
    ev = cli.json("evaluate", a, *CPU)["metrics"]["eval"]
    assert data["test/err"][1, 1] == pytest.approx(ev["err"], abs=1e-6)
    assert data["test/nll"][1, 1] == pytest.approx(ev["nll"], rel=1e-5)
    assert r["metrics"]["eval"]["err"]["at_points"] == [pytest.approx(ev["err"], abs=1e-6)]
    # the directions are stored beside the metrics file, filter-normalised (weights only: BN/biases ignored)
    d = load_file(tmp_path / "s-directions.safetensors")["directions"]
    model = load_model(a).model
    w_norm = torch.cat([p.detach().reshape(-1) for n, p in model.named_parameters() if n.endswith("weight")]).norm()
    torch.testing.assert_close(d.norm(dim=1), torch.stack([w_norm, w_norm]), rtol=1e-5, atol=0)
    assert r["outputs"]["directions"]["path"] == str(tmp_path / "s-directions.safetensors")
    assert (tmp_path / "s.png").stat().st_size > 0
    cli("plot", m, "-o", tmp_path / "again.png", "-q")


def test_a_direction_towards_another_network(cli, tmp_path, digits_models):
    a, b = digits_models
    r = cli.json("surface", a, "-m", tmp_path / "l.h5", "--directions", b, "--grid-points", "3", "--plot",
                 tmp_path / "l.png", *CPU)
    assert r["dims"] == 1 and r["directions"] == "files"
    data, _ = read_h5(tmp_path / "l.h5")
    assert data["test/err"].shape == (3,)
    # coefficient 1 reaches B (w + (w_B - w) in float32: B up to rounding)
    ev = cli.json("evaluate", b, *CPU)["metrics"]["eval"]
    assert data["test/nll"][2] == pytest.approx(ev["nll"], rel=1e-4)
    assert abs(data["test/err"][2] - ev["err"]) <= 1 / 360  # at most one of the 360 test images flips


def test_resume_after_an_interruption(cli, tmp_path, digits_models, monkeypatch):
    a = digits_models[0]
    args = [a, "--grid-points", "3", "--dims", "1", "--seed", "5", *CPU]
    full = cli.json("surface", *args, "-m", tmp_path / "full.h5")
    plane_module = importlib.import_module("mctool.plane")  # mctool.plane is the function
    real, calls = plane_module.evaluate_weights, []

    def interrupt_second(*x, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*x, **kw)

    monkeypatch.setattr(plane_module, "evaluate_weights", interrupt_second)
    msg = cli.error("surface", *args, "-m", tmp_path / "s.h5", code=130)
    assert "1 of 3 points are saved" in msg
    monkeypatch.setattr(plane_module, "evaluate_weights", real)
    r = cli.json("surface", *args, "-m", tmp_path / "s.h5", "--resume")
    assert r["metrics"] == full["metrics"]
    assert "other settings" in cli.error("surface", a, "--grid-points", "3", "--dims", "1", "--seed", "6", *CPU,
                                         "-m", tmp_path / "s.h5", "--resume")


def test_errors(cli, tmp_path, digits_models):
    a, b = digits_models
    m = tmp_path / "s.h5"
    assert "--dims must be 1 or 2" in cli.error("surface", a, "-m", m, "--dims", "3", *CPU)
    assert "--range must be" in cli.error("surface", a, "-m", m, "--range", "0", *CPU)
    assert "--range must be" in cli.error("surface", a, "-m", m, "--range", "inf", *CPU)
    assert "--grid-points must be >= 2" in cli.error("surface", a, "-m", m, "--grid-points", "1", *CPU)
    assert "--ignore takes bn, bias" in cli.error("surface", a, "-m", m, "--ignore", "conv", *CPU)
    assert "not both" in cli.error("surface", a, "-m", m, "--directions", "random", "--directions", b, *CPU)
    assert "one or two direction files" in cli.error("surface", a, "-m", m, "--directions", b, "--directions", b,
                                                     "--directions", b, *CPU)
    other = tmp_path / "o.safetensors"
    cli("train", "-d", "digits", "--arch-kwargs", '{"hidden": 8}', "--epochs", "1", "-o", other, "-q", *CPU)
    assert "cannot be connected; they differ in: arch_kwargs" in cli.error("surface", a, "-m", m, "--directions",
                                                                            other, *CPU)
    assert not m.exists() and not (tmp_path / "s-directions.safetensors").exists()
    cli("surface", a, "-m", m, "--grid-points", "2", "--dims", "1", "-q", *CPU)
    assert "already exists" in cli.error("surface", a, "-m", m, "--grid-points", "2", "--dims", "1", *CPU)
