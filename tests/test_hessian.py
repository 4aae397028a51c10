"""``mctool hessian``: eigenvalues against the exact Hessian, the trace estimate, points along curves and ensemble
members, resume and errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.func import functional_call

from mctool.checkpoint import load_model, read_metadata
from mctool.data import load_data
from mctool.flat import ParamLayout
from mctool.h5io import read_h5
from mctool.hessian import LossHessian

CPU = ["--device", "cpu"]
SUBSET = 300


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """An MLP with 610 parameters trained briefly on digits, and its exact Hessian (float64) on the hessian
    command's training subset."""
    from conftest import Cli

    path = tmp_path_factory.mktemp("hessian") / "m.safetensors"
    Cli()("train", "-d", "digits", "-a", "mlp", "--arch-kwargs", '{"hidden": 8, "depth": 1}', "--epochs", "3",
          "--lr", "0.1", "-o", path, "-q", *CPU)
    model = load_model(path).model.double().eval()
    layout = ParamLayout.of(model)
    w = layout.flatten(dict(model.named_parameters())).double()
    xs, ys = zip(*load_data("digits").train.subset(SUBSET).batches(512))
    x, y = torch.cat(xs).double(), torch.cat(ys)
    h = torch.func.hessian(lambda v: F.cross_entropy(functional_call(model, layout.views(v), (x,)), y))(w)
    return path, h.numpy()


def test_eigenvalues_eigenvectors_and_trace_match_the_exact_hessian(cli, tmp_path, tiny):
    path, h = tiny
    exact = np.linalg.eigvalsh(h)[::-1]
    m, vec = tmp_path / "h.h5", tmp_path / "v.safetensors"
    r = cli.json("hessian", path, "-m", m, "--top-k", "4", "--trace", "--trace-samples", "400", "--train-subset",
                 SUBSET, "--eigenvectors", vec, *CPU)
    assert r["points_kind"] == "model" and r["num_points"] == 1 and r["parameters"] == h.shape[0] and r["t"] is None
    # float32 Hessian-vector products (relative rounding ~1e-6 over 300 images) and ARPACK's tol 1e-4
    np.testing.assert_allclose(r["eigenvalues"][0], exact[:4], rtol=1e-4)
    data, attrs = read_h5(m)
    assert attrs["kind"] == "hessian" and data["eigenvalues"].shape == (1, 4) and (data["residuals"] < 1e-3).all()
    # Hutchinson: the exact trace within 4 standard errors of the estimate (a fixed seed: deterministic)
    assert abs(r["trace"][0] - np.trace(h)) < 4 * r["trace_stderr"][0] and 0 < r["trace_stderr"][0] < 0.1 * np.trace(h)
    v = load_file(vec)["eigenvectors"].double().numpy()
    assert v.shape == (1, 4, h.shape[0])
    for j in range(4):
        np.testing.assert_allclose(np.linalg.norm(v[0, j]), 1, rtol=1e-5)
        np.testing.assert_allclose(h @ v[0, j], exact[j] * v[0, j], atol=1e-3 * exact[0])
    assert r["outputs"]["eigenvectors"]["path"] == str(vec)
    md = read_metadata(vec)  # the provenance of the metrics file, the command line included
    assert md["kind"] == "hessian-eigenvectors" and (md["command"], md["config"]) == (attrs["command"], attrs["config"])


def test_points_along_a_segment_and_ensemble_members(cli, tmp_path, digits_models):
    a, b = digits_models
    one = cli.json("hessian", a, "-m", tmp_path / "a.h5", "--top-k", "2", "--train-subset", SUBSET, *CPU)
    seg = cli.json("hessian", a, b, "-m", tmp_path / "s.h5", "--top-k", "2", "--num-points", "3", "--train-subset",
                   SUBSET, *CPU)
    assert seg["points_kind"] == "curve" and seg["t"] == [0.0, 0.5, 1.0] and len(seg["eigenvalues"]) == 3
    np.testing.assert_allclose(seg["eigenvalues"][0], one["eigenvalues"][0], rtol=1e-4)  # t = 0 is A
    data, _ = read_h5(tmp_path / "s.h5")
    np.testing.assert_array_equal(data["t"], [0, 0.5, 1])
    # an ensemble file: one point per member, each with its own weights
    ens = tmp_path / "e.safetensors"
    cli("ensemble", a, b, "-o", ens, "-q", *CPU)
    r = cli.json("hessian", ens, "-m", tmp_path / "e.h5", "--top-k", "2", "--train-subset", SUBSET, *CPU)
    assert r["points_kind"] == "ensemble" and r["num_points"] == 2
    np.testing.assert_allclose(r["eigenvalues"], [seg["eigenvalues"][0], seg["eigenvalues"][2]], rtol=1e-4)
    # the human summary names each point as it is (it was a traceback for a network and for members)
    for sources, named, m in (([a], ["network"], "a2.h5"), ([ens], ["member", "0"], "e2.h5"),
                              ([a, b], ["t", "=", "0"], "s2.h5")):
        said = cli("hessian", *sources, "-m", tmp_path / m, "--top-k", "2", "--num-points", "2", "--train-subset",
                   SUBSET, *CPU).stderr
        rows = [line.replace("\u2502", " ").split() for line in said.splitlines()]
        assert named in [row[:len(named)] for row in rows], said


def test_batchnorm_is_recomputed_at_each_point_of_a_curve(cli, tmp_path):
    # a BN network: the midpoint of the segment, analysed in place, equals the point exported with its
    # recomputed statistics (mctool point) and analysed as a network
    nets = []
    for seed in (0, 1):
        out = tmp_path / f"n{seed}.safetensors"
        cli("train", "-d", "digits", "-a", "mlp", "--arch-kwargs", '{"hidden": 8, "depth": 1, "batch_norm": true}',
            "--epochs", "2", "--lr", "0.1", "--seed", seed, "-o", out, "-q", *CPU)
        nets.append(out)
    args = ["--top-k", "2", "--train-subset", SUBSET, *CPU]
    # (plain BN passes: their statistics differ more from the stale ones than augmented ones, which are close
    # to what the networks stored while training)
    seg = cli.json("hessian", *nets, "-m", tmp_path / "s.h5", "--num-points", "3", "--bn-data", "plain", *args)
    line, mid = tmp_path / "line.safetensors", tmp_path / "mid.safetensors"
    cli("connect", *nets, "--curve", "line", "-o", line, "-q", *CPU)
    cli("point", line, "--t", "0.5", "-o", mid, "--bn-data", "plain", "-q", *CPU)
    alone = cli.json("hessian", mid, "-m", tmp_path / "m.h5", *args)
    np.testing.assert_allclose(seg["eigenvalues"][1], alone["eigenvalues"][0], rtol=1e-3)
    # ...and not what the start network's statistics would give at the midpoint
    stale = tmp_path / "stale.safetensors"
    r = cli("point", line, "--t", "0.5", "--no-bn-update", "-o", stale, "-q", *CPU)
    assert "Warning: --no-bn-update: the network at t = 0.5 gets the BatchNorm statistics the curve file" in r.output
    assert "Warning" not in cli("point", line, "--t", "0", "--no-bn-update", "-o", tmp_path / "a.safetensors",
                                "-q", *CPU).output  # (A with its own statistics)
    other = cli.json("hessian", stale, "-m", tmp_path / "o.h5", *args)
    assert abs(other["eigenvalues"][0][0] - alone["eigenvalues"][0][0]) > 1e-2 * alone["eigenvalues"][0][0]


def test_resume_computes_only_the_missing_points(cli, tmp_path, digits_models, monkeypatch):
    args = [*digits_models, "--top-k", "2", "--num-points", "3", "--train-subset", SUBSET, "--trace",
            "--trace-samples", "4", *CPU]
    full = cli.json("hessian", *args, "-m", tmp_path / "full.h5")
    real, calls = LossHessian.top_eigen, []

    def interrupt_second(self, *a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *a, **kw)

    monkeypatch.setattr(LossHessian, "top_eigen", interrupt_second)
    vec = tmp_path / "v.safetensors"
    msg = cli.error("hessian", *args, "-m", tmp_path / "h.h5", "--eigenvectors", vec, code=130)
    assert "1 of 3 points are saved" in msg and "--resume" in msg
    data, attrs = read_h5(tmp_path / "h.h5")
    assert not np.isnan(data["eigenvalues"][0]).any() and np.isnan(data["eigenvalues"][1:]).all()
    assert attrs["eigenvectors"] == "v.safetensors"  # (relative to the metrics file's folder)
    # its figure says it is an interrupted run's, and shows the whole segment (t from 0 to 1)
    import mctool.plots as plots

    r = cli("plot", tmp_path / "h.h5", "-o", tmp_path / "h.png")
    assert "is an interrupted run's: 1 of 3 points are computed" in r.output and "--resume" in r.output
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, *a: figures.append(fig))
    with pytest.warns(Warning, match="interrupted run's"):
        plots.plot_hessian(tmp_path / "h.h5", tmp_path / "h2.png")
    assert all(ax.get_xlim() == (-0.03, 1.03) for ax in figures[0].axes)
    monkeypatch.setattr(LossHessian, "top_eigen", real)
    calls.clear()
    # dropping --trace is named as such (it was '--trace-samples: 4 -> none')
    assert "these differ: --trace: true -> false, --trace-samples: 4 -> none." in cli.error(
        "hessian", *digits_models, "--top-k", "2", "--num-points", "3", "--train-subset", SUBSET, *CPU,
        "-m", tmp_path / "h.h5", "--resume")
    # --eigenvectors left out: the interrupted run's file is completed (its vectors were left NaN)
    r = cli.json("hessian", *args, "-m", tmp_path / "h.h5", "--resume")
    assert r["eigenvalues"] == full["eigenvalues"] and r["trace"] == full["trace"]  # same seeds: the same numbers
    assert r["outputs"]["eigenvectors"]["path"] == str(vec)
    assert np.isfinite(load_file(vec)["eigenvectors"].numpy()).all()
    # a resume with nothing to compute leaves both files as they are
    before = [(tmp_path / "h.h5").read_bytes(), vec.read_bytes()]
    cli("hessian", *args, "-m", tmp_path / "h.h5", "--resume", "-q")
    assert [(tmp_path / "h.h5").read_bytes(), vec.read_bytes()] == before
    # resuming with other options is refused
    assert "other settings" in cli.error("hessian", *args[:-2], "--top-k", "3", *CPU, "-m", tmp_path / "h.h5",
                                         "--resume")


def test_errors(cli, tmp_path, tiny, digits_models):
    path, _ = tiny
    m = tmp_path / "h.h5"
    assert "--top-k must be >= 1" in cli.error("hessian", path, "-m", m, "--top-k", "0", *CPU)
    assert "below the number of parameters (610)" in cli.error("hessian", path, "-m", m, "--top-k", "610", *CPU)
    assert "--tol must be" in cli.error("hessian", path, "-m", m, "--tol", "0", *CPU)
    assert "--tol must be" in cli.error("hessian", path, "-m", m, "--tol", "nan", *CPU)
    assert "--trace-samples must be >= 2" in cli.error("hessian", path, "-m", m, "--trace", "--trace-samples", "1",
                                                       *CPU)
    assert "--num-points must be >= 2" in cli.error("hessian", *digits_models, "-m", m, "--num-points", "1", *CPU)
    assert ("give one model checkpoint, curve file or ensemble file, or two model checkpoints (the segment "
            "between them), not 3 files.") in cli.error("hessian", path, path, path, "-m", m, *CPU)
    assert not m.exists()
    cli("hessian", path, "-m", m, "--top-k", "1", "--train-subset", "100", "-q", *CPU)
    assert "already exists" in cli.error("hessian", path, "-m", m, *CPU)
    assert "input" in cli.error("hessian", path, "-m", path, "--force", *CPU)  # never overwrites its input


def test_resume_with_eigenvectors_computes_the_points_whose_vectors_are_missing(cli, tmp_path, tiny):
    """A first run without --eigenvectors (or stopped between its two writes) left points with eigenvalues
    but no vectors: --resume --eigenvectors computes them instead of writing NaN vectors and exiting 0."""
    path, h = tiny
    m, vec = tmp_path / "h.h5", tmp_path / "v.safetensors"
    args = [path, "-m", m, "--top-k", "2", "--train-subset", SUBSET, *CPU]
    first = cli.json("hessian", *args)
    again = cli.json("hessian", *args, "--eigenvectors", vec, "--resume")
    np.testing.assert_allclose(again["eigenvalues"], first["eigenvalues"], rtol=1e-4)
    v = load_file(vec)["eigenvectors"].double().numpy()
    assert np.isfinite(v).all()
    exact = np.linalg.eigvalsh(h)[::-1]
    for j in range(2):
        np.testing.assert_allclose(h @ v[0, j], exact[j] * v[0, j], atol=1e-3 * exact[0])


def test_the_progress_display_counts_hessian_vector_products(cli, tmp_path, tiny, monkeypatch):
    """A single network is one step of the bar: the Lanczos products are what show that it is moving."""
    import contextlib

    import mctool.points
    infos = []

    class Bar:
        def add_task(self, *args, **kwargs):
            return 0

        def update(self, task, advance=0, info=None):
            infos.append(info)

    monkeypatch.setattr(mctool.points, "progress_bar", lambda quiet: contextlib.nullcontext(Bar()))
    r = cli.json("hessian", tiny[0], "-m", tmp_path / "h.h5", "--top-k", "1", "--train-subset", SUBSET, *CPU)
    counts = [int(i.split(": ")[1].split()[0]) for i in infos if i and "Hessian-vector products" in i]
    assert counts == list(range(1, r["hvps"] + 1))
    assert infos[-1].endswith(f"m.safetensors top eigenvalue {r['eigenvalues'][0][0]:.4g}")


def test_a_run_that_cannot_fit_in_memory_is_refused_before_any_file(cli, tmp_path, tiny, monkeypatch):
    """ARPACK's basis (max(2k + 1, 20) float64 vectors) and the --eigenvectors array are sized up front: a
    MemoryError traceback before (e.g. PreResNet-110 with --top-k 1000)."""
    import os

    pages = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 10}  # a machine of 40 KiB
    monkeypatch.setattr(os, "sysconf", lambda name: pages[name])
    m, vec = tmp_path / "h.h5", tmp_path / "v.safetensors"
    err = cli.error("hessian", tiny[0], "-m", m, "--top-k", "4", "--eigenvectors", vec, *CPU)
    assert "--top-k 4 needs a Lanczos basis of 0.1 MiB for 610 parameters and the --eigenvectors array 0.0 MiB " \
           "(1 points x 4 x 610), more than this machine's 0.0 MiB of memory can hold; lower --top-k, " \
           "--num-points, or leave out --eigenvectors." in err
    assert list(tmp_path.iterdir()) == []
    pages["SC_PHYS_PAGES"] = 100  # 400 KiB: 610 x 20 x 8 + 610 x 4 x 4 bytes fit
    cli("hessian", tiny[0], "-m", m, "--top-k", "4", "--eigenvectors", vec, "-q", "--train-subset", SUBSET, *CPU)


def test_the_loss_is_over_the_images_the_network_was_trained_on(cli, tmp_path, monkeypatch):
    """A network trained with --split val never saw the held-out images: its training loss, and so its Hessian,
    leaves them out (hessian read the whole training set before)."""
    import importlib

    module = importlib.import_module("mctool.hessian")
    seen = []
    real = module.LossHessian.__init__

    def recorded(self, *args, **kwargs):
        real(self, *args, **kwargs)
        seen.append(self.n)

    monkeypatch.setattr(module.LossHessian, "__init__", recorded)
    net = tmp_path / "v.safetensors"
    cli("train", "-d", "digits", "-a", "mlp", "--arch-kwargs", '{"hidden": 8, "depth": 1}', "--epochs", "1",
        "--split", "val", "-o", net, "-q", *CPU)
    m = tmp_path / "h.h5"
    r = cli.json("hessian", net, "-m", m, "--top-k", "1", "--train-subset", "0", *CPU)
    assert seen == [len(load_data("digits", split="val").train)] and seen[0] < len(load_data("digits").train)
    assert json.loads(read_h5(m)[1]["config"])["split"] == "val" and r["split"] == "val"


def test_resume_refuses_eigenvectors_of_another_run(cli, tmp_path, tiny):
    """Only the kind and shape were checked: --resume carried on with the vectors of a run of other options."""
    args = [tiny[0], "--top-k", "1", "--train-subset", SUBSET, "-q", *CPU]
    vec = tmp_path / "v.safetensors"
    cli("hessian", *args, "-m", tmp_path / "a.h5", "--seed", "0", "--eigenvectors", vec)
    cli("hessian", *args, "-m", tmp_path / "b.h5", "--seed", "1")
    err = cli.error("hessian", *args, "-m", tmp_path / "b.h5", "--seed", "1", "--eigenvectors", vec, "--resume")
    assert f"'{vec}' does not hold this run's eigenvectors (other inputs or options); start over with --force." in err
    cli("hessian", *args, "-m", tmp_path / "a.h5", "--seed", "0", "--eigenvectors", vec, "--resume")


def test_plot_draws_the_eigenvalues_along_the_curve_and_the_trace(cli, tmp_path, tiny, monkeypatch):
    import mctool.plots as plots

    m, net, other = tmp_path / "h.h5", tiny[0], tmp_path / "o.safetensors"
    assert "its segment is a single point; 'mctool hessian FILE' analyses the network" in cli.error(
        "hessian", net, net, "-m", m, *CPU)
    cli("train", "-d", "digits", "-a", "mlp", "--arch-kwargs", '{"hidden": 8, "depth": 1}', "--epochs", "1",
        "--seed", "1", "-o", other, "-q", *CPU)
    cli("hessian", net, other, "-m", m, "--top-k", "2", "--num-points", "3", "--trace", "--trace-samples", "2",
        "-q", *CPU)
    values, _ = read_h5(m)
    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, *_: drawn.append(fig))
    plots.plot_hessian(m, tmp_path / "h.png")
    eig_ax, trace_ax = drawn[0].axes
    lines = eig_ax.get_lines()
    assert [line.get_label() for line in lines] == ["$\\lambda_{1}$", "$\\lambda_{2}$"]
    for k, line in enumerate(lines):
        assert line.get_xdata().tolist() == [0.0, 0.5, 1.0]
        assert line.get_ydata().tolist() == values["eigenvalues"][:, k].tolist()
    assert trace_ax.get_xlabel().startswith("t ")
    # points that are not along a curve: one tick per point on both panels, named after its file (the trace
    # panel had ticks at -0.04 ... 0.04 around its single point)
    one = tmp_path / "one.h5"
    cli("hessian", net, "-m", one, "--top-k", "1", "--trace", "--trace-samples", "2", "-q", *CPU)
    plots.plot_hessian(one, tmp_path / "one.png")
    for ax in drawn[1].axes:
        assert ax.get_xticks().tolist() == [0.0] and [t.get_text() for t in ax.get_xticklabels()] == [net.name]


def test_plot_of_many_eigenvalues_keys_them_by_a_colour_bar_and_refuses_a_file_with_none(cli, tmp_path, tiny,
                                                                                          monkeypatch):
    """More than 10 eigenvalues: a legend would overflow the axes (and repeat colours), so shades of one colour
    map and a colour bar; a file with no eigenvalue computed yet is refused, not drawn as empty axes."""
    import warnings

    import h5py

    import mctool.plots as plots
    from mctool.errors import MetricsFileError

    m = tmp_path / "h.h5"
    cli("hessian", tiny[0], "-m", m, "--top-k", "12", "--train-subset", SUBSET, "-q", *CPU)
    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, *_: drawn.append(fig))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # constrained_layout's "not applied" warning broke the one-line rule
        warnings.simplefilter("ignore", DeprecationWarning)  # (matplotlib 3.7's own, with pyparsing >= 3.3)
        plots.plot_hessian(m, tmp_path / "h.png")
        drawn[0].canvas.draw()
    ax, bar = drawn[0].axes
    lines = ax.get_lines()
    assert len(lines) == 12 and ax.get_legend() is None and bar.get_ylabel().startswith("k ($\\lambda_k$")
    assert len({line.get_color() if isinstance(line.get_color(), str) else tuple(line.get_color())
                for line in lines}) == 12
    with h5py.File(m, "r+") as f:
        f["eigenvalues"][...] = np.nan
    with pytest.raises(MetricsFileError, match="nothing to draw yet: no eigenvalue is computed"):
        plots.plot_hessian(m, tmp_path / "h.png")


def test_json_reports_the_training_images_used_when_the_data_set_has_fewer(cli, tmp_path, tiny):
    path, _ = tiny
    n = len(load_data("digits").train)
    assert n < 5000  # the default --train-subset: every training image of digits
    m = tmp_path / "h.h5"
    r = cli.json("hessian", path, "-m", m, "--top-k", "1", *CPU)
    assert r["train_subset"] == n and read_h5(m)[1]["train_images"] == n
    assert cli.json("hessian", path, "-m", m, "--top-k", "1", "--resume", *CPU)["train_subset"] == n  # nothing run
    assert cli.json("hessian", path, "-m", tmp_path / "s.h5", "--top-k", "1", "--train-subset", SUBSET,
                    *CPU)["train_subset"] == SUBSET
    assert cli.json("hessian", path, "-m", tmp_path / "a.h5", "--top-k", "1", "--train-subset", "0",
                    *CPU)["train_subset"] is None  # 0: all, as before


def test_residual_of_a_zero_eigenvalue_is_against_the_point_scale():
    """||H v - lambda v|| / |lambda| was ~1e22 for the exact zeros of BN networks (correct pairs looking
    failed); below a thousandth of the largest |lambda| the residual is relative to that instead."""
    from types import SimpleNamespace

    from mctool.hessian import RESIDUAL_FLOOR

    h = torch.diag(torch.tensor([2.0, 1.0, 0.0]))
    noise = torch.full((3,), 2.0**-20)  # rounding in a Hessian-vector product (exact in float32 beside 1 and 2)
    fake = SimpleNamespace(w=torch.zeros(1), hvp=lambda v: h @ v + noise)
    vals, vecs = np.array([2.0, 1.0, 1e-35]), np.eye(3)
    got = LossHessian.residuals(fake, vals, vecs)
    lifted = float(noise.double().norm())
    np.testing.assert_allclose(got, [lifted / 2.0, lifted / 1.0, lifted / (RESIDUAL_FLOOR * 2.0)], rtol=1e-6)
    assert got.max() < 1e-3
    assert np.isnan(LossHessian.residuals(fake, np.array([2.0, np.nan, 1.0]), vecs)[1])


def test_ctrl_c_while_drawing_says_every_point_is_saved(cli, tmp_path, tiny, monkeypatch):
    import mctool.plots as plots

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(plots, "plot_hessian", interrupted)
    m = tmp_path / "h.h5"
    args = ["hessian", tiny[0], "-m", m, "--top-k", "1", "--train-subset", SUBSET, "--plot", tmp_path / "h.png", *CPU]
    message = cli.error(*args, code=130)
    assert f"interrupted while finishing; its one point is saved in '{m}'" in message and "--resume" in message
    monkeypatch.undo()
    cli(*args, "--resume", "-q")  # computes nothing again: draws the figure
    assert (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"


def test_hessian_of_a_vision_transformer_whose_attention_is_fused():
    """timm's ViT calls scaled_dot_product_attention, whose fused kernels (flash attention, on the CPU too) have
    no second derivative: Hessian-vector products must run it on the math kernel (and agree with it)."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=3, img_size=8, patch_size=4, embed_dim=16, depth=1,
                              num_heads=2)
    assert model.blocks[0].attn.fused_attn
    layout = ParamLayout.of(model)
    w = layout.flatten(dict(model.named_parameters()))
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    v = torch.randn_like(w)
    hv = LossHessian(model, layout, w, [(x, y)]).hvp(v)
    for block in model.blocks:
        block.attn.fused_attn = False  # the same attention, written out
    want = LossHessian(model, layout, w, [(x, y)]).hvp(v)
    assert torch.allclose(hv, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def test_hessian_through_a_hard_sigmoid_gate():
    """nn.Hardsigmoid (MobileNetV3's squeeze-excite gates) has no derivative of its backward: Hessian-vector
    products run it as relu6(x + 3) / 6, and agree with finite differences of the gradient; the network keeps
    its own module afterwards."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 8), torch.nn.Hardsigmoid(),
                                torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    layout = ParamLayout.of(model)
    w = layout.flatten(dict(model.named_parameters())).double()
    x, y = torch.randn(16, 3, 2, 2, dtype=torch.float64), torch.randint(0, 3, (16,))
    model.double()
    h = LossHessian(model, layout, w, [(x, y)])
    v = torch.randn_like(w)
    hv = h.hvp(v)

    def grad(at: torch.Tensor) -> torch.Tensor:
        at = at.detach().requires_grad_(True)
        return torch.autograd.grad(h.loss(at, x, y), at)[0]

    eps = 1e-3  # (the loss is float32: smaller steps drown in its rounding)
    fd = (grad(w + eps * v) - grad(w - eps * v)) / (2 * eps)
    assert torch.allclose(hv, fd, rtol=1e-3, atol=1e-3 * float(fd.abs().max()))
    assert "forward" not in vars(model[2])


def test_recorded_settings_that_are_no_option_are_named_as_recorded():
    """A hessian file's ``points_kind`` (what its points are: a network, a curve, a segment) is no option: a
    --resume that finds it changed names it as the file records it, not as a '--points-kind' that does not exist."""
    from mctool.options import setting_name

    assert setting_name("points_kind") == "points_kind" and setting_name("points") == "points"
    assert setting_name("num_points") == "--num-points" and setting_name("trace_samples") == "--trace-samples"


def test_eigenvalues_not_found_are_none_in_the_result_as_in_json(tmp_path, tiny, monkeypatch):
    """ARPACK that stops with fewer eigenvalues than asked: the missing ones are NaN in the file, None in the
    Python result and null in --json (the result held NaN, unlike its documentation and its JSON)."""
    import scipy.sparse.linalg as linalg

    import mctool

    real = linalg.eigsh

    def one_found(op, k, **kw):
        vals, vecs = real(op, k=1, **kw)
        raise linalg.ArpackNoConvergence("stopped", vals, vecs)

    monkeypatch.setattr(linalg, "eigsh", one_found)
    path, _ = tiny
    with pytest.warns(mctool.MctoolWarning, match="ARPACK did not converge for all 2 eigenvalues"):
        r = mctool.hessian([path], tmp_path / "h.h5", top_k=2, device="cpu")
    assert r.eigenvalues[0][1] is None and isinstance(r.eigenvalues[0][0], float)
    assert json.loads(r.to_json())["eigenvalues"][0][1] is None
    assert np.isnan(read_h5(tmp_path / "h.h5")[0]["eigenvalues"][0, 1])
