"""Many networks in one pass (``mctool.batched``): the same metrics and BN statistics as one at a time, passes
that do not divide the points, resume, and architectures that cannot be widened."""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import mctool.batched as batched
from mctool.batched import ManyEvaluator, WideNetwork, evaluate_many
from mctool.bn import recalibrate_bn
from mctool.data import load_data
from mctool.evaluation import evaluate_weights
from mctool.flat import ParamLayout
from mctool.h5io import read_h5
from mctool.models import build_model

from conftest import assert_metrics_close

CPU = ["--device", "cpu"]


def _points(model: nn.Module, layout: ParamLayout, p: int) -> torch.Tensor:
    """p different networks around ``model``: its weights plus seeded noise of 10% of their scale."""
    w = layout.flatten(dict(model.named_parameters()))
    g = torch.Generator().manual_seed(1)
    return torch.stack([w + 0.1 * w.abs().mean() * torch.randn(w.numel(), generator=g) for _ in range(p)])


SYNTH16 = "synthetic:size=16,train=96,test=40"


# timm's own CNNs: BatchNormAct2d (BatchNorm then an activation), GroupNormAct, timm's Linear subclass
@pytest.mark.parametrize("arch, dataset, kwargs", [
    ("cifar_preresnet20", SYNTH16, {"img_size": 16}), ("mlp", "digits", {"img_size": 8}),
    ("test_efficientnet", SYNTH16, {}), ("test_efficientnet_gn", SYNTH16, {}),
    ("mobilenetv3_small_050", SYNTH16, {})])
def test_one_pass_gives_what_separate_passes_give(arch, dataset, kwargs):
    import timm

    if arch.startswith(("test_", "mobilenet")) and not timm.is_model(arch):
        pytest.skip(f"this timm has no {arch}")
    torch.manual_seed(0)
    data = load_data(dataset)
    info = data.info
    model = build_model(arch, info.num_classes, info.in_chans, kwargs)
    layout = ParamLayout.of(model)
    weights = _points(model, layout, 3)
    probe = next(iter(data.eval.batches(8)))[0]
    wide = WideNetwork.of(model, 3, layout, probe)
    assert wide is not None
    got = evaluate_many(wide, weights, data, wd=5e-4, batch_size=32, bn_batches=2)
    for k in range(3):
        layout.assign(model, weights[k])
        want = evaluate_weights(model, data, wd=5e-4, batch_size=32, bn_batches=2)
        assert got[k].keys() == want.keys()
        for name in want:
            # float32 sums over a few hundred images, and a grouped convolution or batched matrix product in
            # place of a plain one: agreement to ~1e-6 relative; an error rate may flip one image near a tie
            tol = 1.5 / len(data.eval) if name.endswith("err") else 1e-4 * max(1.0, abs(want[name]))
            assert got[k][name] == pytest.approx(want[name], abs=tol), (k, name)
        if arch != "mlp":  # each copy's BatchNorm statistics are its own separate pass's
            recalibrate_bn(model, data.train, batch_size=32, max_batches=2)
            mine = wide.running_stats(k)
            for name, buf in model.named_buffers():
                if buf.dtype.is_floating_point:
                    torch.testing.assert_close(mine[name], buf, rtol=1e-5, atol=1e-6)
                else:
                    assert torch.equal(mine[name], buf)


class _Concat(nn.Module):
    """Concatenates two branches along the channels: widened, the copies' channels would be interleaved."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(1, 2, 3, padding=1)
        self.fc = nn.Linear(4 * 64, 10)

    def forward(self, x):
        return self.fc(torch.flatten(torch.cat([self.a(x), self.b(x)], dim=1), 1))


def test_architectures_that_would_mix_the_copies_are_evaluated_one_at_a_time():
    data = load_data("digits")
    probe = next(iter(data.eval.batches(8)))[0]
    cat = _Concat()
    assert WideNetwork.of(cat, 2, ParamLayout.of(cat), probe) is None  # caught by the check on the probe batch
    ln = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.LayerNorm(16), nn.Linear(16, 10))
    assert WideNetwork.of(ln, 2, ParamLayout.of(ln), probe) is None  # a layer it cannot widen

    class _OutOfMemory(nn.Module):  # running out of memory on the probe is not a layer that mixes the copies
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    oom = _OutOfMemory()
    with pytest.raises(torch.cuda.OutOfMemoryError):
        WideNetwork.of(oom, 2, ParamLayout.of(oom), probe)
    layout = ParamLayout.of(ln)
    weights = _points(ln, layout, 3)
    many = ManyEvaluator(ln, layout, data, points_per_pass=3, wd=0.0, batch_size=256)
    with pytest.warns(UserWarning, match="one network per pass"):
        got = many.evaluate(weights)
    for k in range(3):
        layout.assign(ln, weights[k])
        assert got[k] == evaluate_weights(ln, data, wd=0.0, batch_size=256)  # the same code path: equal


def test_convolutional_networks_go_one_per_pass_on_the_cpu(monkeypatch, recwarn):
    """On the CPU a wide network of convolutions costs more than P narrow ones (docs/performance.md#on-the-cpu):
    the evaluator chooses one network per pass there, without a warning; elsewhere it widens them."""
    data = load_data("synthetic:size=8,train=40,test=16")
    cat = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 10))
    layout = ParamLayout.of(cat)
    assert not batched.pays_off(cat, torch.device("cpu")) and batched.pays_off(cat, torch.device("cuda"))
    assert batched.pays_off(nn.Sequential(nn.Flatten(), nn.Linear(192, 10)), torch.device("cpu"))
    # a convolution that cannot be widened (transposed) is one too: one per pass, not "cannot be widened"
    up = nn.Sequential(nn.ConvTranspose2d(3, 2, 1), nn.Flatten(), nn.Linear(2 * 64, 10))
    assert not batched.pays_off(up, torch.device("cpu")) and batched.pays_off(up, torch.device("cuda"))
    assert batched.wide_for(cat, 2, layout, data, channels_last=False, what="x") is None
    assert batched.wide_for(up, 2, ParamLayout.of(up), data, channels_last=False, what="x") is None
    assert WideNetwork.of(cat, 2, layout, next(iter(data.eval.batches(8)))[0]) is not None  # it could be widened
    calls = []
    monkeypatch.setattr(batched, "evaluate_many", lambda *a, **k: calls.append(a))
    weights = _points(cat, layout, 3)
    got = ManyEvaluator(cat, layout, data, points_per_pass=3, wd=0.0, batch_size=16).evaluate(weights)
    assert len(got) == 3 and calls == [] and not recwarn.list
    from mctool.ensembles import SnapshotCollector  # FGE: snapshots need not wait for a pass, then

    assert SnapshotCollector(cat, data, points_per_pass=4).points_per_pass == 1
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(192, 10))
    assert SnapshotCollector(mlp, data, points_per_pass=4).points_per_pass == 4


@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                    reason="torch.compile on the CPU needs a C++ compiler (none on PATH)")
def test_compiled_evaluation_gives_the_same_metrics(monkeypatch):
    """--compile: the wide network and the single one run through torch.compile (real inductor on this CPU;
    one graph per batch shape and mode) and give the eager metrics within float tolerance."""
    data = load_data("digits")
    torch.manual_seed(0)
    model = build_model("mlp", 10, 1, {"img_size": 8, "hidden": 16, "batch_norm": True})
    layout = ParamLayout.of(model)
    weights = _points(model, layout, 3)
    opts = {"points_per_pass": 2, "wd": 5e-4, "batch_size": 1024}  # passes of 2 (one wide network) and 1
    want = ManyEvaluator(model, layout, data, **opts).evaluate(weights)
    compiled, real = [], torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(type(fn).__name__) or real(fn, **kw))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to the plain forward
        got = ManyEvaluator(model, layout, data, compile=True, **opts).evaluate(weights)
    assert compiled == ["MLP", "MLP"]  # the wide network (a widened copy), then the network itself
    for g, w in zip(got, want):
        for name in w:  # inductor may fuse and reorder float32 sums: ~1e-6 relative
            tol = 1.5 / len(data.eval) if name.endswith("err") else 1e-4 * max(1.0, abs(w[name]))
            assert g[name] == pytest.approx(w[name], abs=tol), name


@pytest.mark.parametrize("command", ["evaluate-curve", "plane", "surface", "evaluate", "ensemble"])
def test_compile_option_reaches_the_evaluation(cli, tmp_path, digits_models, monkeypatch, command):
    from mctool.checkpoint import load_model, save_model

    third = load_model(digits_models[0])  # a third point off the line through the two
    with torch.no_grad():
        for p in third.model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    save_model(tmp_path / "c.safetensors", third.model, third.meta)
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(kw) or fn)  # fast: the plumbing only
    files = {"evaluate-curve": digits_models, "plane": [digits_models[0], tmp_path / "c.safetensors",
                                                        digits_models[1]],
             "surface": digits_models[:1], "evaluate": digits_models, "ensemble": digits_models}[command]
    size = {"evaluate-curve": ["--num-points", "3"], "plane": ["--grid-points", "2", "--curve-points", "2"],
            "surface": ["--grid-points", "3", "--dims", "1"], "evaluate": ["--points-per-pass", "1"],
            "ensemble": []}[command]  # evaluate: one network at a time; ensemble: the two in one wide network
    cli(command, *files, *size, "-m", tmp_path / "x.h5", "--compile", *CPU, "-q")
    assert compiled and all(kw == {"dynamic": None, "mode": None} for kw in compiled)  # on CUDA: reduce-overhead


def test_evaluate_curve_in_passes_that_do_not_divide_the_points(cli, tmp_path, digits_models, monkeypatch):
    args = ["evaluate-curve", *digits_models, "--num-points", "5", *CPU, "-q"]
    cli(*args, "-m", tmp_path / "one.h5", "--points-per-pass", "1")
    one, _ = read_h5(tmp_path / "one.h5")
    passes = []
    real = batched.evaluate_many
    monkeypatch.setattr(batched, "evaluate_many", lambda w, x, *a, **k: passes.append(len(x)) or real(w, x, *a, **k))
    cli(*args, "-m", tmp_path / "two.h5", "--points-per-pass", "2")
    assert passes == [2, 2]  # and the fifth point alone, as one network
    two, _ = read_h5(tmp_path / "two.h5")
    for name in ("train/loss", "train/nll", "test/nll"):
        np.testing.assert_allclose(two[name], one[name], rtol=1e-5, atol=0)
    for name in ("train/err", "test/err"):
        np.testing.assert_allclose(two[name], one[name], rtol=0, atol=1.5 / 360)


def _inputs(command: str, tmp_path: Path, digits_models: list[Path], grid: int) -> tuple[list[Path], list[str]]:
    """Input files and size options of a small run of ``command`` (evaluate-curve: 9 points of the line between
    the two digits models; plane: a grid x grid plane through them and a third network off their line;
    surface: a 2-D grid x grid surface around the first)."""
    from mctool.checkpoint import load_model, save_model

    third = load_model(digits_models[0])  # a third point off the line through the two
    with torch.no_grad():
        for p in third.model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    save_model(tmp_path / "c.safetensors", third.model, third.meta)
    files = {"evaluate-curve": digits_models, "plane": [digits_models[0], tmp_path / "c.safetensors", digits_models[1]],
             "surface": digits_models[:1]}[command]
    size = {"evaluate-curve": ["--num-points", "9"], "plane": ["--grid-points", str(grid), "--curve-points", "2"],
            "surface": ["--grid-points", str(grid), "--dims", "2"]}[command]
    return files, size


@pytest.mark.parametrize("command", ["evaluate-curve", "plane", "surface"])
def test_the_file_is_written_once_per_pass_not_once_per_point(cli, tmp_path, digits_models, monkeypatch, command):
    """Each write builds and fsyncs the whole file (30-50 ms): per point it was 40-65% of a small run."""
    import mctool.h5io

    writes, real = [], mctool.h5io.write_h5
    for module in ("mctool.curve_eval", "mctool.plane", "mctool.surface"):
        monkeypatch.setattr(importlib.import_module(module), "write_h5",
                            lambda *a, **k: writes.append(1) or real(*a, **k), raising=False)
    files, size = _inputs(command, tmp_path, digits_models, grid=3)
    cli(command, *files, *size, "-m", tmp_path / "x.h5", "--points-per-pass", "4", *CPU, "-q")
    points = {"evaluate-curve": 9, "plane": 3 + 9, "surface": 1 + 9}[command]
    passes = -(-points // 4)
    assert len(writes) <= passes + 2, writes  # the first (empty) file, one per pass, the summary


def test_an_interrupted_pass_loses_only_its_own_points(cli, tmp_path, digits_models, monkeypatch):
    m = tmp_path / "e.h5"
    args = ["evaluate-curve", *digits_models, "--num-points", "5", "--points-per-pass", "2", *CPU]
    real, calls = batched.evaluate_many, []

    def second_pass_interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(batched, "evaluate_many", second_pass_interrupted)
    assert "2 of 5 points are saved" in cli.error(*args, "-m", m, code=130)
    data, _ = read_h5(m)
    assert np.isfinite(data["train/loss"][:2]).all() and np.isnan(data["train/loss"][2:]).all()
    monkeypatch.setattr(batched, "evaluate_many", real)
    cli(*args, "-m", m, "--resume", "-q")  # resuming with another P is allowed: results do not depend on it
    cli(*args[:-4], *CPU, "-m", tmp_path / "full.h5", "--points-per-pass", "4", "-q")
    again, _ = read_h5(m)
    full, _ = read_h5(tmp_path / "full.h5")
    np.testing.assert_allclose(again["test/nll"], full["test/nll"], rtol=1e-5, atol=0)


def test_points_per_pass_is_checked(cli, tmp_path, digits_models):
    for bad in ("0", "65"):
        for cmd in (["evaluate-curve", *digits_models], ["surface", digits_models[0]]):
            assert "--points-per-pass must be" in cli.error(*cmd, "-m", tmp_path / "x.h5", "--points-per-pass", bad,
                                                            *CPU)
    assert not (tmp_path / "x.h5").exists()


def test_a_surface_in_passes_equals_one_network_per_pass(cli, tmp_path, digits_models):
    for p in ("1", "3"):
        cli("surface", digits_models[0], "-m", tmp_path / f"s{p}.h5", "--grid-points", "3", "--points-per-pass", p,
            "-q", *CPU)
    one, _ = read_h5(tmp_path / "s1.h5")
    three, _ = read_h5(tmp_path / "s3.h5")
    for name in ("train/loss", "test/nll", "at_points/test/nll"):
        np.testing.assert_allclose(three[name], one[name], rtol=1e-5, atol=0)


def test_ensemble_members_in_passes(cli, tmp_path, digits_models):
    from safetensors.torch import load_file

    a, b = digits_models
    one = cli.json("ensemble", a, b, a, "--points-per-pass", "1", *CPU)
    two = cli.json("ensemble", a, b, a, "--points-per-pass", "2", *CPU)  # a pass of 2, then 1
    pairs = [(m1["metrics"], m2["metrics"]) for m1, m2 in zip(one["models"], two["models"])]
    for r1, r2 in pairs + [(one["metrics"]["eval"], two["metrics"]["eval"])]:
        for key in ("nll", "brier") + (("loss",) if r1.get("loss") is not None else ()):
            assert r2[key] == pytest.approx(r1[key], rel=1e-5)
        assert abs(r2["err"] - r1["err"]) <= 1.5 / 360
    # points of a curve: BN recomputed for each (the MLP has none: the same path), written as one file
    curve = tmp_path / "c.safetensors"
    cli("connect", a, b, "-o", curve, "--epochs", "1", "-q", *CPU)
    for p in ("1", "3"):
        cli("ensemble", curve, "--num-points", "3", "-o", tmp_path / f"e{p}.safetensors", "--points-per-pass", p,
            "-q", *CPU)
    e1, e3 = load_file(tmp_path / "e1.safetensors"), load_file(tmp_path / "e3.safetensors")
    assert e1.keys() == e3.keys()
    for k in e1:
        torch.testing.assert_close(e3[k], e1[k], rtol=0, atol=0)  # the members' weights themselves
    # 8 points of the curve to a pass: the MLP's first layer from the 3 control points (batched.Span)
    with _spans_used() as used:
        eight = cli.json("ensemble", curve, "--num-points", "9", "--points-per-pass", "8", *CPU)
    assert used == [["net.1"]]  # then the ninth point alone
    one = cli.json("ensemble", curve, "--num-points", "9", "--points-per-pass", "1", *CPU)
    assert_metrics_close([r["metrics"] for r in eight["models"]] + [eight["metrics"]],
                         [r["metrics"] for r in one["models"]] + [one["metrics"]])


@pytest.mark.parametrize("arch", ["cifar_preresnet20", "mlp", "wide"])
def test_cpu_predictions_of_convolutional_networks_run_in_pieces_with_the_same_logits(arch):
    """On the CPU an evaluation batch goes through a convolutional network (a wide one too) in pieces of
    CPU_EVAL_PIECE images (faster: the activations stay in the caches), and through an MLP whole (faster: its
    weight matrices are read once); each image's logits are its own, so they equal one whole-batch forward."""
    from mctool.evaluation import CPU_EVAL_PIECE, predict_logits

    data = load_data("digits")
    torch.manual_seed(0)
    model = (build_model("mlp", 10, 1, {"img_size": 8, "hidden": 16, "batch_norm": True}) if arch == "mlp" else
             build_model("cifar_preresnet20", 10, 1, {})).eval()
    if arch == "wide":  # two networks side by side (grouped convolutions)
        layout = ParamLayout.of(model)
        w = layout.flatten(dict(model.named_parameters()))
        model = WideNetwork.of(model, 2, layout, next(iter(data.eval.batches(8)))[0]).eval()
        model.assign(torch.stack([w, 1.1 * w]))
    sizes = []
    model.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    logits, labels = predict_logits(model, data.eval, batch_size=300)  # 360 test images: batches of 300 and 60
    assert sizes == ([300, 60] if arch == "mlp" else [CPU_EVAL_PIECE] * 4 + [300 - 4 * CPU_EVAL_PIECE, 60])
    x = torch.cat([x for x, _ in data.eval.batches(360)])
    with torch.no_grad():
        # per-image arithmetic in another grouping of the matrix products: equal up to float32 rounding
        torch.testing.assert_close(logits, model(x).float(), rtol=1e-4, atol=1e-5)
    assert torch.equal(labels, data.eval.labels)


class _SharedVarianceBatchNorm(nn.BatchNorm2d):
    """Per-channel in eval mode, but one variance for all channels while training (the BN pass): a wide copy's
    statistics would mix the networks, which an eval-mode probe cannot see."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3)).mean().expand(x.shape[1])
        with torch.no_grad():
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var, self.momentum)
        return (x - mean.view(1, -1, 1, 1)) / (var.view(1, -1, 1, 1) + self.eps).sqrt()


@pytest.mark.parametrize("norm", [_SharedVarianceBatchNorm, nn.BatchNorm2d])
def test_the_probe_check_runs_the_bn_pass_too(norm):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), norm(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 10)).eval()
    layout = ParamLayout.of(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    wide = WideNetwork.of(model, 3, layout, torch.rand(8, 3, 16, 16))
    assert (wide is None) == (norm is _SharedVarianceBatchNorm)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the probe changed nothing
    assert model[1].momentum == 0.1 and not model.training


def test_the_commands_default_is_the_librarys():
    """The CLI (which does not import torch for --help) and the library agree on --points-per-pass's default;
    fge keeps its own (its snapshots wait for a pass)."""
    import inspect

    from mctool import cli
    from mctool.fge import FGEConfig

    for command in (cli.evaluate, cli.evaluate_curve, cli.ensemble, cli.plane_cmd, cli.surface_cmd):
        assert inspect.signature(command).parameters["points_per_pass"].default == batched.DEFAULT_POINTS_PER_PASS
    assert inspect.signature(cli.fge_cmd).parameters["points_per_pass"].default == FGEConfig.points_per_pass == 4
    # and docs/cli.md's option tables, command by command
    text = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    documented = dict(re.findall(r"\n## ([\w-]+)\n(?:(?!\n## ).)*?\| `--points-per-pass INT` \| (\d+) \|", text, re.S))
    want = dict.fromkeys(["evaluate", "evaluate-curve", "ensemble", "plane", "surface"],
                         str(batched.DEFAULT_POINTS_PER_PASS))
    assert documented == {**want, "fge": "4"}


def _tf32_settings():
    """Whether TF32 is allowed for convolutions and matrix products, through the settings this PyTorch has."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if hasattr(conv, "fp32_precision"):  # (recent PyTorch)
        return conv.fp32_precision == "tf32", torch.backends.cuda.matmul.fp32_precision == "tf32"
    return torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32


def test_the_probe_check_computes_in_full_float32(monkeypatch):
    """TF32 (CUDA's default for convolutions) is off while a wide network is checked, and as it was after,
    also when the check fails: its rounding over a deep network exceeded the tolerance that tells mixed
    copies from rounding (PreResNet-110 on an H200), and the evaluation itself keeps the user's setting."""
    seen = []

    def of(*args):
        seen.append(_tf32_settings())
        raise RuntimeError("boom")

    monkeypatch.setattr(WideNetwork, "_checked", classmethod(lambda cls, *a: of(*a)))
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32  # (not monkeypatch-able)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with pytest.raises(RuntimeError, match="boom"):
            WideNetwork.of(nn.Linear(2, 2), 2, None, torch.zeros(1, 2))
        assert seen == [(False, False)]
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.skipif(not hasattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision"),
                    reason="this PyTorch has no fp32_precision settings")
def test_full_float32_keeps_the_newer_precision_settings():
    """With PyTorch's newer settings (fp32_precision, the ones it recommends) TF32 goes off in the block
    and the user's own come back exactly after it; the older allow_tf32 flags, read after those were set,
    raise there (this crashed every wide network's check), and a 'medium' matmul precision could not be read back."""
    from mctool.runtime import full_float32

    flags = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    saved = [f.fp32_precision for f in flags], torch.get_float32_matmul_precision()
    try:
        for f in flags:
            f.fp32_precision = "tf32"
        with full_float32():
            assert [f.fp32_precision for f in flags] == ["ieee", "ieee"]
        assert [f.fp32_precision for f in flags] == ["tf32", "tf32"]
        torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision = saved[0]
        torch.set_float32_matmul_precision("medium")
        with full_float32():
            pass
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(saved[1])
        torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision = saved[0]


# --- A first linear layer per control point (Span) ---------------------------------------------------------------


def _bezier_span(model: nn.Module, layout: ParamLayout, ts: list[float]) -> tuple[torch.Tensor, batched.Span]:
    """Networks at ``ts`` on a Bezier curve with one bend through three points around ``model``, and their span."""
    from mctool.curves import coefficients

    controls = _points(model, layout, 3)
    c = torch.stack([coefficients("bezier", 1, t) for t in ts])
    return c.float() @ controls, batched.Span((controls[:1], controls[1:]), c)


def _uses(wide: WideNetwork) -> list[str]:
    return [name for name, layer in wide.input_layers.items() if layer.basis is not None]


@contextlib.contextmanager
def _spans_used():
    """Record, for every ``WideNetwork.assign`` given a span, the input layers that compute from it (``_uses``)."""
    used: list[list[str]] = []
    real = WideNetwork.assign

    def spy(self, w, sp=None):
        real(self, w, sp)
        if sp is not None:
            used.append(_uses(self))

    with pytest.MonkeyPatch.context() as m:
        m.setattr(WideNetwork, "assign", spy)
        yield used


@pytest.mark.parametrize("batch_norm", [False, True])
def test_a_span_gives_the_metrics_and_statistics_of_each_networks_own_weights(batch_norm):
    torch.manual_seed(0)
    data = load_data("synthetic:size=16,channels=3,train=96,test=40")
    model = build_model("mlp", 10, 3, {"img_size": 16, "hidden": 32, "batch_norm": batch_norm})
    layout = ParamLayout.of(model)
    ts = [0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 0.8, 0.9, 1.0]  # passes of 4, 4 and one network alone
    weights, span = _bezier_span(model, layout, ts)
    opts = dict(wd=5e-4, batch_size=32, bn_batches=2)
    many = ManyEvaluator(model, layout, data, points_per_pass=4, **opts)
    with _spans_used() as spans:
        got = many.evaluate(weights, span)
    assert spans == [["net.1"], ["net.1"]]  # the first layer (768 inputs) of both passes of 4 from the span
    one = ManyEvaluator(model, layout, data, points_per_pass=1, **opts).evaluate(weights)
    for k, (g, want) in enumerate(zip(got, one)):
        for name in want:  # float rounding only: a product reassociated over 768 inputs
            tol = 1.5 / len(data.eval) if name.endswith("err") else 1e-4 * max(1.0, abs(want[name]))
            assert g[name] == pytest.approx(want[name], abs=tol), (k, name)
    if batch_norm:  # each copy's recalibrated statistics are its own network's
        wide = many._wide(4)
        wide.assign(weights[:4], span.rows(0, 4))
        assert _uses(wide) == ["net.1"]
        recalibrate_bn(wide, data.train, batch_size=32, max_batches=2)
        for k in range(4):
            layout.assign(model, weights[k])
            recalibrate_bn(model, data.train, batch_size=32, max_batches=2)
            mine = wide.running_stats(k)
            for name, buf in model.named_buffers():
                if buf.dtype.is_floating_point:
                    torch.testing.assert_close(mine[name], buf, rtol=1e-5, atol=1e-6)


def test_a_span_is_used_only_where_it_computes_less():
    torch.manual_seed(0)
    data = load_data("digits")
    probe = next(iter(data.eval.batches(8)))[0]
    model = build_model("mlp", 10, 1, {"img_size": 8, "hidden": 16})
    layout = ParamLayout.of(model)
    for p, ts, want in [
            (8, [k / 7 for k in range(8)], ["net.1"]),  # 8 networks from 3 vectors: 5 x 64 inputs saved per output
            (4, [0.2, 0.4, 0.6, 0.8], []),  # 4 from 3 on 64 inputs: the mixing would cost more than it saves
            (4, [0.0] * 4, ["net.1"])]:  # 4 copies of one vector (the others' coefficients all 0)
        wide = WideNetwork.of(model, p, layout, probe)
        weights, span = _bezier_span(model, layout, ts)
        wide.assign(weights, span)
        assert _uses(wide) == want, (p, ts)
        with torch.no_grad():
            got = wide(probe)
            wide.assign(weights)  # no span: every copy from its own weights
            assert _uses(wide) == []
            torch.testing.assert_close(got, wide(probe), rtol=1e-5, atol=1e-6)
    conv = build_model("cifar_convfc", 10, 1, {"img_size": 8})  # a convolution reads the input: nothing to use
    conv_layout = ParamLayout.of(conv)
    wide = WideNetwork.of(conv, 8, conv_layout, probe)
    assert wide is not None and wide.input_layers == {}
    weights, span = _bezier_span(conv, conv_layout, [k / 7 for k in range(8)])
    wide.assign(weights, span)
    wide, weights, span = _eight_mlp_points(torch.randn(8, 3, 16, 16))
    wide.compile()  # a compiled forward reads each copy's own weights (its graph is fixed)
    wide.assign(weights, span)
    assert _uses(wide) == []


def _eight_mlp_points(probe: torch.Tensor) -> tuple[WideNetwork, torch.Tensor, batched.Span]:
    """8 points of a Bezier curve of MLPs on 3 x 16 x 16 images, their span, and their wide network."""
    torch.manual_seed(0)
    model = build_model("mlp", 10, 3, {"img_size": 16, "hidden": 32})
    layout = ParamLayout.of(model)
    weights, span = _bezier_span(model, layout, [k / 7 for k in range(8)])
    return WideNetwork.of(model, 8, layout, probe), weights, span


def test_a_span_in_bf16_mixes_in_float32():
    x = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    wide, weights, span = _eight_mlp_points(x[:8])
    layer = wide.input_layers["net.1"]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        wide.assign(weights, span)
        assert _uses(wide) == ["net.1"]
        got = wide(x)
        first = layer(x.flatten(1))
        basis, bias, c = layer.basis
        y = torch.nn.functional.linear(x.flatten(1), basis, bias)  # the K outputs, in bf16
        wide.assign(weights)
        want = wide(x)
    assert got.dtype == want.dtype == first.dtype == y.dtype == torch.bfloat16
    # the mixing adds no rounding but the last one: float32 coefficients (2t(1 - t) at t = 1/7 has no bf16 value)
    # times the bf16 outputs, summed in float32, rounded once to bf16
    assert torch.equal(first, torch.matmul(c, y.float().unflatten(-1, (3, 32))).to(torch.bfloat16).flatten(-2))
    assert not torch.equal(first, torch.matmul(c.bfloat16(), y.unflatten(-1, (3, 32))).flatten(-2))
    # both ways round the first layer's outputs to bf16 (8 bits: 0.4%); the logits pass two more layers
    torch.testing.assert_close(got.float(), want.float(), rtol=0.03, atol=0.03 * float(want.abs().max()))


class _Tied(nn.Module):
    """One linear layer applied twice (weights tied across depth): on the input, then on its own output."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(3 * 16 * 16, 3 * 16 * 16), nn.Linear(3 * 16 * 16, 10)

    def forward(self, x):
        return self.head(torch.relu(self.fc(torch.relu(self.fc(x.flatten(1))))))


def test_a_layer_that_reads_the_input_and_its_own_features_gets_its_weights_with_a_span():
    torch.manual_seed(0)
    model = _Tied()
    layout = ParamLayout.of(model)
    x = torch.randn(8, 3, 16, 16)
    wide = WideNetwork.of(model, 8, layout, x)
    assert wide is not None and list(wide.input_layers) == ["fc"]
    weights, span = _bezier_span(model, layout, [k / 7 for k in range(8)])
    with torch.no_grad():
        wide.assign(weights.flip(0))  # another pass's networks first
        wide.assign(weights, span)
        assert _uses(wide) == ["fc"]
        got = wide(x)  # the second call of fc reads its (wide) weights: this pass's, not the previous one's
        wide.assign(weights)
        torch.testing.assert_close(got, wide(x), rtol=1e-4, atol=1e-5)


def test_a_span_that_does_not_give_the_weights_is_refused():
    wide, weights, span = _eight_mlp_points(torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    controls = torch.cat(span.controls)
    bad = [batched.Span((controls * 1.001,), span.coefficients),  # other vectors
           batched.Span((controls,), span.coefficients.flip(0)),  # coefficients of other networks
           batched.Span((controls[:2],), span.coefficients),  # too few vectors
           batched.Span((controls,), span.coefficients[:4]),  # too few networks
           batched.Span((controls[:, :-1],), span.coefficients)]  # vectors of another size
    for sp in bad:
        with pytest.raises(ValueError, match="span"):
            wide.assign(weights, sp)
    wide.assign(weights, span)
    assert _uses(wide) == ["net.1"]
    overflowed = weights.clone()
    overflowed[:, 0] = float("inf")  # (the first weight is in the sample): each network from its own weights
    wide.assign(overflowed, span)
    assert _uses(wide) == []
    wide.assign(torch.zeros_like(weights), batched.Span(span.controls, torch.zeros_like(span.coefficients)))
    assert _uses(wide) == []  # no vector used at all


@pytest.mark.parametrize("command", ["evaluate-curve", "plane", "surface"])
def test_commands_give_an_mlps_first_layer_its_span(cli, tmp_path, digits_models, monkeypatch, command):
    """evaluate-curve (a line: 2 vectors), plane and surface (origin and 2 directions) pass their points' span;
    the results are those of one network per pass."""
    files, size = _inputs(command, tmp_path, digits_models, grid=4)
    cli(command, *files, *size, "-m", tmp_path / "one.h5", "--points-per-pass", "1", *CPU, "-q")
    used = []
    real = batched.evaluate_many

    def spy(wide, *a, **k):
        out = real(wide, *a, **k)
        used.append(bool(_uses(wide)))
        return out

    monkeypatch.setattr(batched, "evaluate_many", spy)
    cli(command, *files, *size, "-m", tmp_path / "eight.h5", "--points-per-pass", "8", *CPU, "-q")
    # evaluate-curve: 8 points of a line, then one alone; plane: a pass with the three points (given as
    # themselves, so that their values are exactly the networks' own), one of 8 cells, the last 3 cells (3
    # networks of 3 vectors: nothing to save); surface: the centre and 15 cells in two passes, 1 cell alone
    assert used == {"evaluate-curve": [True], "plane": [False, True, False],
                    "surface": [True, True]}[command], used
    one, _ = read_h5(tmp_path / "one.h5")
    eight, _ = read_h5(tmp_path / "eight.h5")
    for name in one:
        if name.endswith(("loss", "nll")):
            np.testing.assert_allclose(eight[name], one[name], rtol=1e-5, atol=1e-7, err_msg=name)


def test_full_float32_in_overlapping_threads_leaves_the_settings_as_they_were():
    """Two threads' blocks overlapping (A in, B in, A out, B out): each used to restore what it found, and B had
    found TF32 off, so it stayed off. The settings are the process's: restored when the last block ends."""
    import threading

    from mctool.runtime import full_float32

    before = _tf32_settings()
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def a():
        with full_float32():
            a_in.set()
            b_in.wait(10)
        a_out.set()

    def b():
        a_in.wait(10)
        with full_float32():
            b_in.set()
            a_out.wait(10)
            seen["inside, after A ended"] = _tf32_settings()

    threads = [threading.Thread(target=f) for f in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert seen == {"inside, after A ended": (False, False)}
    assert _tf32_settings() == before


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_child_forked_while_another_thread_is_in_full_float32_gets_the_settings_back():
    """Only the forking thread lives on in a child: the block another thread was in never ends there, so the
    child restores the settings (they stayed TF32-off for good). A fresh interpreter: forking this one, with
    torch's threads, would be unsafe."""
    script = textwrap.dedent("""
        import os, threading, torch
        from mctool.runtime import full_float32
        conv = getattr(torch.backends.cudnn, "conv", None)
        def tf32():
            if hasattr(conv, "fp32_precision"):
                return conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision
            return torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        before, inside, leave = tf32(), threading.Event(), threading.Event()
        def hold():
            with full_float32():
                inside.set()
                leave.wait(30)
        t = threading.Thread(target=hold)
        t.start()
        inside.wait(30)
        held = tf32()
        pid = os.fork()
        if pid == 0:
            ok = tf32() == before
            with full_float32():
                ok = ok and tf32() == held
            os._exit(0 if ok and tf32() == before else 3)
        _, status = os.waitpid(pid, 0)
        leave.set()
        t.join(30)
        print(held != before, os.waitstatus_to_exitcode(status), tf32() == before)
    """)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.split() == ["True", "0", "True"], out.stderr[-2000:]
