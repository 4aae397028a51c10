"""Curves: coefficients, connect, evaluate-curve, point, plot."""

import json

import h5py
import numpy as np
import pytest
import torch

from conftest import count_networks, ctrl_c_during_epoch
from mctool.bn import bn_modules, pass_batches, recalibrate_bn
from mctool.checkpoint import load_model, read_checkpoint, read_metadata
from mctool.curve_eval import evaluate_curve
from mctool.curve_training import ConnectConfig, CurveStep
from mctool.curves import Curve, coefficients, initial_points, load_curve
from mctool.data import load_data
from mctool.errors import CheckpointError, ConfigError
from mctool.flat import ParamLayout
from mctool.h5io import read_h5
from mctool.models import build_model

CPU = ["--device", "cpu"]


@pytest.mark.parametrize("curve, bends", [("line", 0), ("bezier", 1), ("bezier", 3), ("polychain", 1),
                                          ("polychain", 4)])
def test_coefficients_partition_of_unity_and_endpoints(curve, bends):
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    c = coefficients(curve, bends, t)
    assert c.shape == (101, bends + 2)
    # at most 6 float64 terms: within a few 2^-53 of 1
    torch.testing.assert_close(c.sum(1), torch.ones(101, dtype=torch.float64), rtol=0, atol=1e-14)
    assert (c >= 0).all()
    assert torch.equal(c[0], torch.eye(bends + 2, dtype=torch.float64)[0])
    assert torch.equal(c[-1], torch.eye(bends + 2, dtype=torch.float64)[-1])


def test_coefficients_closed_forms():
    assert coefficients("bezier", 1, 0.3).tolist() == pytest.approx([0.49, 0.42, 0.09])
    assert coefficients("bezier", 2, 0.5).tolist() == pytest.approx([1 / 8, 3 / 8, 3 / 8, 1 / 8])
    assert coefficients("line", 0, 0.25).tolist() == pytest.approx([0.75, 0.25])
    assert coefficients("polychain", 1, 0.25).tolist() == pytest.approx([0.5, 0.5, 0.0])
    # a polychain passes through each bend at its knot t_k = k / (n + 1)
    for k in range(1, 4):
        assert coefficients("polychain", 3, k / 4).tolist() == pytest.approx(np.eye(5)[k].tolist())


@pytest.mark.parametrize("curve, bends, message", [("line", 1, "no bends"), ("bezier", 0, "--num-bends"),
                                                   ("spline", 1, "--curve")])
def test_coefficients_reject_bad_curves(curve, bends, message):
    with pytest.raises(ConfigError, match=message):
        coefficients(curve, bends, 0.5)


@pytest.mark.parametrize("bn_data", ["augmented", "plain"])
def test_recalibrate_bn_gives_exact_statistics(bn_data):
    data = load_data("synthetic:size=8,channels=1,classes=3,train=300,test=10")  # crop-flip augmentation
    torch.manual_seed(0)
    model = build_model("mlp", 3, 1, {"img_size": 8, "hidden": 16, "batch_norm": True}).eval()
    assert recalibrate_bn(model, data.train, batch_size=64, bn_data=bn_data)  # 300 = 4 x 64 + 44: unequal batches
    bn = model.net[2]
    with torch.no_grad():  # the pass's images: its fixed order, augmented or not
        parts = [model.net[1](x.flatten(1))
                 for x, _ in pass_batches(data.train, 64, augment=bn_data == "augmented")]
    h = torch.cat(parts)
    plain = model.net[1](torch.cat([x for x, _ in data.train.batches(300)]).flatten(1))
    assert torch.equal(h.sort(0).values, plain.sort(0).values) == (bn_data == "plain")
    # Means of 300 values summed in other groupings (batches of 64, then a running average) differ by up to
    # ~300 x 2^-24 = 2e-5 of max |h|: allow 1e-4 of it (measured: 1e-8). PyTorch's default running average
    # (momentum 0.1) is off by 8e-2 of it.
    torch.testing.assert_close(bn.running_mean, h.mean(0), rtol=0, atol=1e-4 * float(h.detach().abs().max()))
    # the variance: each batch's unbiased variance, averaged weighted by batch size (as one pass computes it)
    var = sum(len(p) * p.var(0, unbiased=True) for p in parts) / 300
    torch.testing.assert_close(bn.running_var, var, rtol=1e-4, atol=0)
    assert not model.training and not bn.training and bn.momentum == 0.1  # the module's mode and momentum kept
    assert not recalibrate_bn(build_model("mlp", 3, 1, {"img_size": 8}), data.train)  # no BN: nothing to do


@pytest.mark.parametrize("curve, bends", [("bezier", 1), ("bezier", 3), ("polychain", 2)])
def test_initial_bends_are_on_the_segment_at_a_or_at_b(curve, bends):
    """--bend-init (docs/cli.md, connect): linear puts bend j at A + j / (n + 1) (B - A), so that the initial curve
    is the segment itself, w(t) = A + t (B - A), for a Bezier curve and a polychain alike; start puts every bend
    at A, end every bend at B. The endpoints are A and B bit for bit."""
    a, b = torch.randn(2, 500, generator=torch.Generator().manual_seed(0))
    line = Curve("line", 0, torch.stack([a, b]), None, None)
    k = bends + 2
    # A + s (B - A) in float32: three roundings (the difference, the product, the sum) of terms up to 2 max |A, B|,
    # at most 6 x 2^-24 of max |A, B| from the exact point; allow 8 x. The coefficients are >= 0 and sum to 1,
    # so w(t) (in float64) is as close. A bend misplaced by 1 / (n + 1) of the segment is ~0.25 max |A, B| off.
    atol = 8 * 2**-24 * float(torch.stack([a, b]).abs().max())
    exact = lambda s: a.double() + s * (b.double() - a.double())  # noqa: E731
    linear = initial_points(line, curve, bends, "linear")
    assert linear.shape == (k, 500) and torch.equal(linear[0], a) and torch.equal(linear[-1], b)
    for j in range(k):
        torch.testing.assert_close(linear[j].double(), exact(j / (k - 1)), rtol=0, atol=atol)
    for t in (0.1, 0.37, 0.5, 0.9):
        w = coefficients(curve, bends, torch.tensor(t, dtype=torch.float64)) @ linear.double()
        torch.testing.assert_close(w, exact(t), rtol=0, atol=atol)
    start, end = initial_points(line, curve, bends, "start"), initial_points(line, curve, bends, "end")
    assert all(torch.equal(start[j], a) for j in range(k - 1)) and torch.equal(start[-1], b)
    assert torch.equal(end[0], a) and all(torch.equal(end[j], b) for j in range(1, k))


def test_recalibrate_bn_skips_layers_without_statistics_and_restores_the_network_on_an_error():
    """A BatchNorm layer with track_running_stats=False has no running statistics: nothing to recompute (it
    was a traceback, 'Tensor list must have at least one tensor'). An error (or Ctrl-C) mid-pass leaves every
    layer's momentum, class and mode as they were, not momentum 1 in train mode."""
    data = load_data("synthetic:size=8,channels=1,classes=3,train=64,test=10")
    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16),
                                torch.nn.BatchNorm1d(16, track_running_stats=False), torch.nn.Linear(16, 3)).eval()
    assert not recalibrate_bn(plain, data.train, batch_size=16)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.BatchNorm1d(16, momentum=0.3),
                                torch.nn.Linear(16, 3)).eval()

    def stop() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        recalibrate_bn(model, data.train, batch_size=16, on_batch=stop)
    assert model[2].momentum == 0.3 and not any(m.training for m in model.modules())


def test_recalibrate_bn_runs_without_dropout_and_forgets_old_statistics():
    """The BN pass runs only the BN layers in train mode (docs/method.md#bn): a dropout layer before a BN layer
    stays off, so the statistics are those of the evaluation-mode activations. And the statistics are
    recomputed, not added to: a second pass gives the same buffers bit for bit (num_batches_tracked too)."""
    data = load_data("synthetic:size=8,channels=1,classes=3,train=300,test=10")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.Dropout(0.5),
                                torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Linear(16, 3)).eval()
    assert recalibrate_bn(model, data.train, batch_size=64, bn_data="plain")
    first = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        parts = [model[1](x.flatten(1)) for x, _ in pass_batches(data.train, 64)]  # no dropout
    h = torch.cat(parts)
    bn = model[3]
    # tolerances as in test_recalibrate_bn_gives_exact_statistics; dropout (p = 0.5) doubles the variances
    torch.testing.assert_close(bn.running_mean, h.mean(0), rtol=0, atol=1e-4 * float(h.abs().max()))
    var = sum(len(p) * p.var(0, unbiased=True) for p in parts) / 300
    torch.testing.assert_close(bn.running_var, var, rtol=1e-4, atol=0)
    assert recalibrate_bn(model, data.train, batch_size=64, bn_data="plain")
    assert all(torch.equal(v, first[k]) for k, v in model.state_dict().items())
    assert int(bn.num_batches_tracked) == 5  # 300 = 4 x 64 + 44: five batches, this pass's only
    assert not model.training and not model[2].training


def test_connect_trains_only_the_bends(cli, tmp_path, digits_models):
    a, b = digits_models
    out = tmp_path / "c.safetensors"
    r = cli.json("connect", a, b, "-o", out, "--epochs", "2", "--lr", "0.05", *CPU)
    assert r["trained"] and r["curve"] == "bezier" and r["num_bends"] == 1 and r["epochs"] == 2
    curve, _, md = load_curve(out)
    assert md["kind"] == "curve" and md["arch"] == "mlp" and json.loads(md["config"])["num_bends"] == 1
    inputs = json.loads(md["inputs"])
    assert inputs == {str(a): load_model(a).sha256, str(b): load_model(b).sha256}
    layout = curve.layout
    pa, pb = (layout.flatten(load_model(p).model.state_dict()) for p in (a, b))
    assert torch.equal(curve.points[0], pa) and torch.equal(curve.points[2], pb)  # fixed endpoints untouched
    assert not torch.allclose(curve.points[1], (pa + pb) / 2)  # the bend moved off the segment
    data, attrs = read_h5(tmp_path / "c-connect.h5")
    assert data["epoch"].tolist() == [1, 2] and attrs["kind"] == "connect" and attrs["split"] == "test"
    assert r["outputs"]["metrics"]["path"] == str(tmp_path / "c-connect.h5") and r["split"] == "test"
    assert [f["path"] for f in r["inputs"]] == [str(a), str(b)] and r["metrics"]["train"]["loss"] > 0

    free = tmp_path / "free.safetensors"
    cli("connect", a, b, "-o", free, "--epochs", "1", "--free-start", "--curve", "polychain", "-q", *CPU)
    fc = load_curve(free)[0]
    assert not torch.equal(fc.points[0], pa) and torch.equal(fc.points[2], pb)


def test_connect_line_writes_segment_without_training(cli, tmp_path, digits_models):
    out = tmp_path / "line.safetensors"
    r = cli.json("connect", *digits_models, "-o", out, "--curve", "line", *CPU)
    assert not r["trained"] and not (tmp_path / "line-connect.h5").exists()
    curve = load_curve(out)[0]
    assert curve.curve == "line" and curve.points.shape[0] == 2


def test_connect_refusals(cli, tmp_path, digits_models):
    other = tmp_path / "other.safetensors"
    cli("train", "-d", "digits", "-o", other, "--epochs", "1", "--arch-kwargs", '{"hidden": 16}', "-q", *CPU)
    err = cli.error("connect", digits_models[0], other, "-o", tmp_path / "c.safetensors")
    assert "cannot be connected" in err and "arch_kwargs" in err
    bn = tmp_path / "bn.safetensors"
    cli("train", "-d", "digits", "-o", bn, "--epochs", "1", "--arch", "cifar_convfc", "--arch-kwargs",
        '{"width": 0.1}', "-q", *CPU)
    assert "arch" in cli.error("connect", digits_models[0], bn, "-o", tmp_path / "c.safetensors")
    assert "--num-bends" in cli.error("connect", *digits_models, "-o", tmp_path / "c.safetensors", "--num-bends", "0")
    assert "--lr" in cli.error("connect", *digits_models, "-o", tmp_path / "c.safetensors", "--lr", "0")
    assert "nothing to train" in cli.error("connect", *digits_models, "-o", tmp_path / "c.safetensors",
                                           "--curve", "line", "--free-end")
    cli("connect", *digits_models, "-o", tmp_path / "c.safetensors", "--bend-init", "middle", code=2)
    # the same network at both ends (a typo in a name, or a copy): nothing to connect or to walk along
    a = digits_models[0]
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(a.read_bytes())
    assert f"'{a}' is given twice: a curve from a network to itself would be trained for nothing. Give two " \
           "different networks." in cli.error("connect", a, a, "-o", tmp_path / "c.safetensors")
    assert f"'{a}' and '{copy}' are the same file (the same sha256): its segment is a single point; 'mctool " \
           "evaluate FILE' evaluates the network" in cli.error("evaluate-curve", a, copy, "-m", tmp_path / "s.h5", *CPU)
    assert not list(tmp_path.glob("c.*")) and not (tmp_path / "s.h5").exists()


def test_connect_resume_matches_uninterrupted(cli, tmp_path, digits_models, monkeypatch):
    args = [*digits_models, "--epochs", "3", "--lr", "0.05", "-q", *CPU]
    ref = tmp_path / "ref.safetensors"
    cli("connect", *args, "-o", ref)
    out = tmp_path / "run.safetensors"
    restore = ctrl_c_during_epoch(monkeypatch, 2)
    assert "--resume" in cli.error("connect", *args, "-o", out, code=130)
    restore()
    assert read_metadata(tmp_path / "run.state.safetensors")["kind"] == "curve-state"
    # the endpoints in the other order are refused
    assert "starts at another network than A: give the endpoints in the interrupted run's order" in cli.error(
        "connect", *digits_models[::-1], "--epochs", "3", *CPU, "-o", out, "--resume")
    # another curve: each difference named by its option
    assert "these differ: --curve: bezier -> polychain, --num-bends: 1 -> 2." in cli.error(
        "connect", *args, "-o", out, "--resume", "--curve", "polychain", "--num-bends", "2")
    # --lr left out: the interrupted run's, not the default connect would derive from A; the endpoints spelled
    # relative to another working folder (a requeued job) are the same files
    monkeypatch.chdir(digits_models[0].parent)
    cli("connect", *(p.name for p in digits_models), "--epochs", "3", "-q", *CPU, "-o", out, "--resume")
    assert torch.equal(load_curve(ref)[0].points, load_curve(out)[0].points)
    config = json.loads(read_metadata(out)["config"])
    assert config["lr"] == 0.05
    # how the defaults were derived, as the uninterrupted run records it (the split's entry was lost on --resume)
    assert config["derived"] == json.loads(read_metadata(ref)["config"])["derived"] and "split" in config["derived"]


def test_evaluate_curve_summary_and_files(cli, tmp_path, digits_models):
    a, b = digits_models
    m = tmp_path / "line.h5"
    png = tmp_path / "line.png"
    r = cli.json("evaluate-curve", a, b, "-m", m, "--num-points", "5", "--plot", png, *CPU)
    s = r["metrics"]
    for group, key in (("train", "loss"), ("train", "nll"), ("train", "err"), ("eval", "nll"), ("eval", "err")):
        assert set(s[group][key]) == {"start", "end", "min", "max", "mean", "int"}
    assert s["eval"]["loss"] is None and r["split"] == "test"
    data, attrs = read_h5(m)
    assert data["t"].tolist() == [0, 0.25, 0.5, 0.75, 1]
    v, dl = data["train/loss"], data["dl"]
    assert s["train"]["loss"]["max"] == pytest.approx(v.max())
    assert s["train"]["loss"]["int"] == pytest.approx((0.5 * (v[1:] + v[:-1]) * dl[1:]).sum() / dl.sum())
    assert r["barrier"]["train"]["loss"] == pytest.approx(v.max() - (v[0] + v[-1]) / 2)
    assert r["barrier"]["eval"]["err"] == pytest.approx(data["test/err"].max() - (data["test/err"][0] +
                                                                               data["test/err"][-1]) / 2)
    t = data["t"]
    for group, name in (("train", "train/loss"), ("eval", "test/err")):  # the rise above the line between the ends
        w = data[name]
        assert r["bump"][group][name.split("/")[1]] == pytest.approx(max(w - ((1 - t) * w[0] + t * w[-1])), abs=1e-12)
    stored = json.loads(attrs["summary"])["bump"]  # the file's summary holds the same numbers
    assert {(g, k): v for g in stored for k, v in stored[g].items()} == {
        (g, k): v for g in r["bump"] for k, v in r["bump"][g].items() if v is not None}
    pa, pb = (ParamLayout.of(load_model(p).model).flatten(load_model(p).model.state_dict()) for p in (a, b))
    assert r["length"] == pytest.approx(float((pb - pa).norm()), rel=1e-5)
    assert r["length_ratio"] == pytest.approx(1.0, rel=1e-6)  # the segment is its own shortest path
    assert dl[1:] == pytest.approx([r["length"] / 4] * 4, rel=1e-5)
    # the ends are the two networks themselves (no BN here)
    ev = cli.json("evaluate", a, *CPU)
    assert data["test/nll"][0] == pytest.approx(ev["metrics"]["eval"]["nll"], rel=1e-5)
    assert json.loads(attrs["summary"])["length_ratio"] == pytest.approx(1.0)
    with h5py.File(m) as f:
        assert f["test/err"].dims[0][0].name == "/t" and f["train/loss"].attrs["max"] == pytest.approx(v.max())
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_curve_resume_fills_only_missing_points(cli, tmp_path, digits_models, monkeypatch):
    m = tmp_path / "c.h5"
    cli("evaluate-curve", *digits_models, "-m", m, "--num-points", "4", "-q", *CPU)
    full, _ = read_h5(m)
    with h5py.File(m, "a") as f:  # as if interrupted after the first two points
        for name in ("train/loss", "test/err"):
            f[name][2:] = np.nan
    calls = count_networks(monkeypatch)
    assert "--force" in cli.error("evaluate-curve", *digits_models, "-m", m, "--num-points", "4")
    monkeypatch.chdir(digits_models[0].parent)  # the same files, spelled relative to another folder
    cli("evaluate-curve", *(p.name for p in digits_models), "-m", m, "--num-points", "4", "--resume", "-q", *CPU)
    assert len(calls) == 2
    again, _ = read_h5(m)
    for name in ("train/loss", "test/err", "test/nll"):
        assert again[name] == pytest.approx(full[name])
    assert "--num-points: 4 -> 5" in cli.error("evaluate-curve", *digits_models, "-m", m, "--num-points", "5",
                                               "--resume")


def test_resume_compares_the_batch_size_of_the_bn_pass(cli, tmp_path, digits_models):
    """With BatchNorm, --batch-size decides which images each batch of the BN pass holds (and with
    --bn-batches which images it reads): a resumed run with another one would mix two kinds of points."""
    data = ["-d", "synthetic:size=8,classes=3,train=96,test=32", *CPU, "-q"]
    bn = [tmp_path / f"bn{s}.safetensors" for s in (0, 1, 2)]
    for s, out in enumerate(bn):
        cli("train", *data, "-a", "mlp", "--arch-kwargs", '{"hidden": 8, "batch_norm": true}', "--epochs", "1",
            "--seed", s, "-o", out)
    m, p = tmp_path / "c.h5", tmp_path / "p.h5"
    cli("plane", *bn, "-m", p, "--grid-points", "2", "--batch-size", "32", *data)
    assert "--batch-size (of the BN passes): 32 -> 512" in cli.error("plane", *bn, "-m", p, "--grid-points", "2",
                                                                     "--resume", *data)
    bn = bn[:2]
    cli("evaluate-curve", *bn, "-m", m, "--num-points", "3", "--batch-size", "32", "--bn-batches", "1", *data)
    assert json.loads(read_h5(m)[1]["config"])["bn_batch_size"] == 32
    assert "--batch-size (of the BN passes): 32 -> 16" in cli.error(
        "evaluate-curve", *bn, "-m", m, "--num-points", "3", "--batch-size", "16", "--bn-batches", "1", "--resume",
        *data)
    cli("evaluate-curve", *bn, "-m", m, "--num-points", "3", "--batch-size", "32", "--bn-batches", "1", "--resume",
        *data)
    with h5py.File(m, "a") as f:  # a file of mctool 0.2.0 records no bn_batch_size: it resumes with any
        config = json.loads(f.attrs["config"])
        del config["bn_batch_size"]
        f.attrs["config"] = json.dumps(config)
    cli("evaluate-curve", *bn, "-m", m, "--num-points", "3", "--batch-size", "16", "--bn-batches", "1", "--resume",
        *data)
    # without BatchNorm the batch size changes nothing but rounding: not recorded, not compared
    m2 = tmp_path / "mlp.h5"
    cli("evaluate-curve", *digits_models, "-m", m2, "--num-points", "2", "--batch-size", "64", "-q", *CPU)
    assert json.loads(read_h5(m2)[1]["config"])["bn_batch_size"] is None
    cli("evaluate-curve", *digits_models, "-m", m2, "--num-points", "2", "--batch-size", "128", "--resume", "-q", *CPU)


def test_bn_data_augmented_matches_the_stored_statistics(cli, tmp_path, digits_models):
    """BN layers normalised augmented batches while the network trained, so statistics recomputed on augmented
    images (the default) give back what its stored ones give; plain images give other, worse ones (digits:
    8x8 images cropped with a padding of 1). --bn-data is recorded and compared on --resume."""
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    for seed, out in ((0, a), (1, b)):
        cli("train", "-d", "digits", "--arch-kwargs", '{"hidden": 32, "batch_norm": true}', "--epochs", "8",
            "--lr", "0.1", "--seed", seed, "-o", out, "-q", *CPU)
    stored = cli.json("evaluate", a, *CPU)["metrics"]["eval"]["err"]
    errs = {}
    for mode in ("augmented", "plain"):
        m = tmp_path / f"{mode}.h5"
        r = cli.json("evaluate-curve", a, b, "-m", m, "--num-points", "2", "--bn-data", mode, *CPU)
        errs[mode] = r["metrics"]["eval"]["err"]["start"]  # t = 0: A with recomputed statistics
        assert json.loads(read_h5(m)[1]["config"])["bn_data"] == mode
    # 360 test images: one image is 0.28 points
    assert abs(errs["augmented"] - stored) <= 0.015 and errs["plain"] >= stored + 0.02, (stored, errs)
    m = tmp_path / "augmented.h5"
    assert "--bn-data: augmented -> plain" in cli.error("evaluate-curve", a, b, "-m", m, "--num-points", "2",
                                                     "--bn-data", "plain", "--resume", *CPU)
    with h5py.File(m, "a") as f:  # a file of mctool 0.2.0 records none: its statistics came from plain images
        config = json.loads(f.attrs["config"])
        del config["bn_data"]
        f.attrs["config"] = json.dumps(config)
    assert "--bn-data: plain -> augmented" in cli.error("evaluate-curve", a, b, "-m", m, "--num-points", "2",
                                                     "--resume", *CPU)
    cli("evaluate-curve", a, b, "-m", m, "--num-points", "2", "--bn-data", "plain", "--resume", "-q", *CPU)
    # point records it too; without BatchNorm the setting is not recorded (and an old file resumes)
    line, p = tmp_path / "line.safetensors", tmp_path / "p.safetensors"
    cli("connect", a, b, "--curve", "line", "-o", line, "-q", *CPU)
    cli("point", line, "--t", "0", "-o", p, "--bn-data", "plain", "-q", *CPU)
    assert json.loads(read_metadata(p)["config"])["bn_data"] == "plain"
    # the same network and statistics, evaluated alone instead of beside another point: float32 sums in
    # another order, which may move one borderline image of the 360 (measured: none)
    np.testing.assert_allclose(cli.json("evaluate", p, *CPU)["metrics"]["eval"]["err"], errs["plain"],
                               rtol=0, atol=1 / 360 + 1e-9)
    m2 = tmp_path / "mlp.h5"
    cli("evaluate-curve", *digits_models, "-m", m2, "--num-points", "2", "-q", *CPU)
    assert json.loads(read_h5(m2)[1]["config"])["bn_data"] is None
    with pytest.raises(ConfigError, match="--bn-data must be one of augmented, plain, got 'clean'"):
        evaluate_curve([str(a), str(b)], tmp_path / "x.h5", num_points=2, bn_data="clean", device="cpu")
    assert cli("evaluate-curve", a, b, "-m", tmp_path / "y.h5", "--bn-data", "clean", code=2)


def test_ctrl_c_while_finishing_says_every_point_is_saved(cli, tmp_path, digits_models, monkeypatch):
    import mctool.curve_eval
    import mctool.plots

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    m, png = tmp_path / "e.h5", tmp_path / "e.png"
    args = ["evaluate-curve", *digits_models, "-m", m, "--num-points", "3", "--plot", png, "-q", *CPU]
    for module, name in ((mctool.curve_eval, "curve_summary"), (mctool.plots, "plot_curves")):
        monkeypatch.setattr(module, name, ctrl_c)
        message = cli.error(*args, "--force", code=130)
        assert "interrupted while finishing; all 3 points are saved" in message and "--resume" in message
        monkeypatch.undo()
        before = read_h5(m)[0]["train/loss"]
        if name == "curve_summary":  # the file has no summary yet: a rerun without --resume is told of it
            assert "holds an interrupted run; pass --resume" in cli.error(*args)
        else:  # every point and the summary are there, the figure is not: --resume draws it
            assert f"holds a finished run but --plot '{png}' is not there; pass --resume" in cli.error(*args)
        cli(*args, "--resume")
        assert png.exists() and np.array_equal(read_h5(m)[0]["train/loss"], before) and "summary" in read_h5(m)[1]
        png.unlink()


def test_resume_never_replaces_a_figure_it_did_not_draw(cli, tmp_path, digits_models, monkeypatch):
    """An unfinished run has drawn no figure: an existing --plot is someone else's, refused without --force as
    on a new run. Beside a finished file it may be the run's own (a requeued job): both are left as they are."""
    import mctool.curve_eval

    m, png = tmp_path / "e.h5", tmp_path / "precious.png"
    png.write_bytes(b"not this run's figure")
    args = ["evaluate-curve", *digits_models, "-m", m, "--num-points", "3", "-q", *CPU]

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(mctool.curve_eval, "curve_summary", ctrl_c)
    cli.error(*args, code=130)  # every point saved, no summary
    monkeypatch.undo()
    assert f"--plot '{png}' already exists" in cli.error(*args, "--resume", "--plot", png)
    assert png.read_bytes() == b"not this run's figure" and "summary" not in read_h5(m)[1]
    cli(*args, "--resume")  # finished, no figure asked for
    finished = m.read_bytes()
    r = cli(*args, "--resume", "--plot", png)
    assert "exists and" in r.output and "finished run: both are left as they are" in r.output
    assert png.read_bytes() == b"not this run's figure" and m.read_bytes() == finished
    cli(*args, "--resume", "--plot", png, "--force")  # asked for: drawn again
    assert png.read_bytes().startswith(b"\x89PNG") and m.read_bytes() == finished


def test_point_export_and_round_trip(cli, tmp_path, digits_models):
    a, b = digits_models
    c = tmp_path / "c.safetensors"
    cli("connect", a, b, "-o", c, "--epochs", "1", "-q", *CPU)
    p0 = tmp_path / "p0.safetensors"
    r = cli.json("point", c, "--t", "0", "-o", p0, *CPU)
    assert not r["bn_recalibrated"]  # an MLP has no BN
    ta, tp = read_checkpoint(a)[0], read_checkpoint(p0)[0]
    assert ta.keys() == tp.keys() and all(torch.equal(ta[k], tp[k]) for k in ta)  # bit for bit
    md = read_metadata(p0)
    assert md["kind"] == "model" and md["curve_t"] == "0.0" and md["curve_sha256"] == load_curve(c)[0].sha256
    mid = tmp_path / "mid.safetensors"
    cli("point", c, "--t", "0.5", "-o", mid, "-q", *CPU)
    curve = load_curve(c)[0]
    layout = curve.layout
    # w(0.5) = (W_0 + 2 W_1 + W_2) / 4 by whichever float32 kernel (a matmul or lerps): within (4K - 3) 2^-24
    # of max |W_k| of each other (see test_curve_step_interpolation_equals_the_weighted_sum)
    torch.testing.assert_close(layout.flatten(read_checkpoint(mid)[0]), curve.weights(0.5), rtol=0,
                               atol=12 * 2**-24 * float(curve.points.abs().max()))
    assert cli.json("evaluate", mid, *CPU)["metrics"]["eval"]["err"] < 0.5  # an ordinary, usable checkpoint
    # with --no-bn-update, options of the BN pass have no effect, and that is said
    r = cli("point", c, "--t", "0.5", "-o", mid, "--force", "--no-bn-update", "--bn-data", "plain", "-q", *CPU)
    assert "Warning: --bn-data does not apply with --no-bn-update: no BatchNorm pass is run; ignored." in r.stderr
    # nor for a network without BatchNorm (an MLP): said when given, silent when not
    r = cli("point", c, "--t", "0.5", "-o", mid, "--force", "--bn-batches", "3", "-q", *CPU)
    assert ("Warning: --bn-batches does not apply to a network without BatchNorm statistics: no BatchNorm pass is "
            "run; ignored.") in r.stderr
    assert "Warning" not in cli("point", c, "--t", "0.5", "-o", mid, "--force", "-q", *CPU).stderr
    r = cli("evaluate-curve", c, "-m", tmp_path / "e.h5", "--num-points", "2", "--bn-batches", "3", "--bn-data",
            "plain", "-q", *CPU)  # (the commands that evaluate many points say so too)
    assert ("Warning: --bn-batches, --bn-data do not apply to a network without BatchNorm statistics: no "
            "BatchNorm pass is run; ignored.") in r.stderr
    r = cli("ensemble", mid, "--bn-batches", "2", "-q", *CPU)  # a checkpoint keeps its statistics
    assert "Warning: --bn-batches does not apply here: only the points of a curve" in r.stderr
    r = cli("hessian", mid, "-m", tmp_path / "h.h5", "--top-k", "1", "--train-subset", "64", "--bn-data", "plain",
            "-q", *CPU)
    assert "Warning: --bn-data does not apply to checkpoints and ensemble members" in r.stderr
    assert "Warning" not in cli("ensemble", mid, "-q", *CPU).stderr
    assert "--t must be in [0, 1], got 1.5." in cli.error("point", c, "--t", "1.5", "-o", tmp_path / "x.safetensors")
    # a value just outside is shown as given, not rounded onto the bound ("got 1")
    assert "--t must be in [0, 1], got 1.0000001." in cli.error("point", c, "--t", "1.0000001", "-o",
                                                                tmp_path / "x.safetensors")
    assert "is a single network, not a curve (write a curve with" in cli.error("point", a, "--t", "0.5", "-o",
                                                                               tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError, match="not a curve"):
        load_curve(a)


def test_timm_bn_model_connects_and_evaluates(cli, tmp_path):
    arch = "test_resnet" if __import__("timm").is_model("test_resnet") else "resnet18"
    data = ["-d", "synthetic:size=16,classes=3,train=128,test=32", "--arch", arch, "--batch-size", "32", *CPU]
    ends = []
    for seed in (0, 1):
        ends.append(tmp_path / f"e{seed}.safetensors")
        cli("train", *data, "-o", ends[-1], "--epochs", "1", "--seed", seed, "-q")
    c = tmp_path / "c.safetensors"
    cli("connect", *ends, "-o", c, "--epochs", "1", "--batch-size", "32", "-q", *CPU)
    r = cli.json("evaluate-curve", c, "-m", tmp_path / "c.h5", "--num-points", "3", "--bn-batches", "2", *CPU)
    assert all(0 <= r["metrics"]["eval"]["err"][k] <= 1 for k in ("start", "end", "max"))
    p0 = tmp_path / "p0.safetensors"
    r = cli.json("point", c, "--t", "0", "-o", p0, *CPU)
    assert r["bn_recalibrated"]
    # the data set of its BN statistics is recorded
    assert read_metadata(p0)["data_fingerprint"] == read_h5(tmp_path / "c.h5")[1]["data_fingerprint"]
    ta, tp = read_checkpoint(ends[0])[0], read_checkpoint(p0)[0]
    params = ParamLayout.of(load_model(ends[0]).model).names
    assert all(torch.equal(ta[k], tp[k]) for k in params)  # parameters bit for bit, BN statistics recomputed
    assert any(not torch.equal(ta[k], tp[k]) for k in ta if k.endswith("running_mean"))


def test_plot_of_an_unfinished_curve_says_so(cli, tmp_path, digits_models):
    """An interrupted evaluate-curve draws what it has with a warning (it drew silently); one with nothing
    computed is refused."""
    import shutil

    m = tmp_path / "c.h5"
    cli("evaluate-curve", *digits_models, "-m", m, "--num-points", "4", "-q", *CPU)
    part, empty = tmp_path / "part.h5", tmp_path / "empty.h5"
    for path, points in ((part, [2, 3]), (empty, [0, 1, 2, 3])):
        shutil.copy(m, path)
        with h5py.File(path, "r+") as f:  # as an interrupted run leaves it: no summary, points still NaN
            del f.attrs["summary"]
            for name in ("train/loss", "train/nll", "train/err", "test/nll", "test/err"):
                f[name][points] = np.nan
    res = cli("plot", part, "-o", tmp_path / "part.png")
    assert [w for w in res.stderr.splitlines() if w.startswith("Warning: ")] == [
        f"Warning: '{part}' is an interrupted run's: 2 of 4 points are computed, and the figure shows only those. "
        "Finish it with the same command plus --resume."]
    assert "nothing to draw: no point of the curve is computed yet (NaN)" in cli.error("plot", empty, "-o",
                                                                                      tmp_path / "e.png")
    with h5py.File(empty, "r+") as f:  # finished, every point diverged: nothing to resume
        f.attrs["summary"] = "{}"
    assert "the run finished, but no point of the curve has a finite train loss" in cli.error(
        "plot", empty, "-o", tmp_path / "e.png")
    assert "Warning" not in cli("plot", m, "-o", tmp_path / "whole.png").stderr


def test_plot_command(cli, tmp_path, digits_models, monkeypatch):
    m = tmp_path / "l.h5"
    cli("evaluate-curve", *digits_models, "-m", m, "--num-points", "3", "-q", *CPU)
    png = tmp_path / "p.png"
    cli("plot", m, m, "-o", png)
    assert png.read_bytes()[:4] == b"\x89PNG"
    # two lines of one kind are told apart by their files' names; one of a kind needs none
    import mctool.plots as plots

    other = tmp_path / "other.h5"
    other.write_bytes(m.read_bytes())
    seen = []
    monkeypatch.setattr(plots, "_save", lambda fig, *_: seen.append([t.get_text() for t in
                                                                     fig.legends[0].get_texts()]))
    plots.plot_curves([m, other], png)
    plots.plot_curves([m], png)
    assert [x.split(",")[0] for x in seen[0]] == ["l.h5: segment", "other.h5: segment"]
    assert seen[1][0].startswith("segment, test err barrier ")
    assert "--force" in cli.error("plot", m, "-o", png)
    train_h5 = digits_models[0].with_suffix(".h5")
    ens = tmp_path / "ens.h5"
    cli("evaluate", *digits_models, "-m", ens, "-q", *CPU)
    assert f"cannot draw this file: '{ens}' (kind 'evaluate'). plot draws the metrics files of evaluate-curve" \
        in cli.error("plot", ens, "-o", tmp_path / "q.png")
    assert f"cannot draw files of different kinds together: '{m}' (kind 'evaluate-curve'), '{train_h5}' " \
           "(kind 'train')" in cli.error("plot", m, train_h5, "-o", tmp_path / "q.png")
    assert "give one curve file or two" in cli.error("evaluate-curve", m, m, m, "-m", tmp_path / "x.h5")
    assert "--num-points" in cli.error("evaluate-curve", *digits_models, "-m", tmp_path / "x.h5", "--num-points", "1")


def test_plots_are_png_pdf_or_svg_by_their_ending_and_reproducible(cli, tmp_path, digits_models):
    m = tmp_path / "l.h5"
    cli("evaluate-curve", *digits_models, "-m", m, "--num-points", "3", "--plot", tmp_path / "e.svg", "-q", *CPU)
    assert b"<svg" in (tmp_path / "e.svg").read_bytes()[:400]
    magic = {"png": b"\x89PNG", "pdf": b"%PDF", "svg": b"<?xml", "PDF": b"%PDF"}
    for ext, start in magic.items():
        out = tmp_path / f"p.{ext}"
        cli("plot", m, "-o", out)
        first = out.read_bytes()
        assert first.startswith(start)
        cli("plot", m, "-o", out, "--force")
        assert out.read_bytes() == first  # no creation date, fixed ids: the same file draws to the same bytes
    for name in ("p.jpg", "p", "p.h5"):
        err = cli.error("plot", m, "-o", tmp_path / name)
        assert "figures are drawn as PNG, PDF or SVG, chosen by the name's ending; end the name with .png, .pdf " \
               "or .svg." in err
    assert not (tmp_path / "p.jpg").exists() and not (tmp_path / "p").exists()


def test_curve_states_are_usable_and_sse_is_refused(cli, tmp_path, digits_models):
    out = tmp_path / "c.safetensors"
    cli("connect", *digits_models, "-o", out, "--epochs", "2", "--save-every", "1", "-q", *CPU)
    snap = tmp_path / "c-epoch001.safetensors"
    assert read_metadata(snap)["kind"] == "curve-state"
    cli("point", snap, "--t", "0.5", "-o", tmp_path / "p.safetensors", "-q", *CPU)  # a snapshot is a curve too
    # sse makes an ensemble: not a choice of connect (a usage error), and refused to Python callers
    assert "Invalid value for '--schedule': 'sse' is not one of 'paper', 'cosine', 'constant'" in cli.error(
        "connect", *digits_models, "-o", tmp_path / "d.safetensors", "--schedule", "sse", code=2)
    with pytest.raises(ConfigError, match="for train"):
        ConnectConfig(schedule="sse").validate()


def _curve_steps(channels_last: bool):
    torch.manual_seed(0)
    model = build_model("cifar_preresnet20", 4, 3, {})
    layout = ParamLayout.of(model)
    flat = layout.flatten(dict(model.named_parameters()))
    g = torch.Generator().manual_seed(1)
    points = torch.stack([flat, flat + 0.05 * torch.randn(flat.shape, generator=g),
                          flat + 0.1 * torch.randn(flat.shape, generator=g)])
    if channels_last:
        model.to(memory_format=torch.channels_last)
    step = CurveStep(model, Curve("bezier", 1, points, layout, None, {}), [1], wd=5e-4, momentum=0.9)
    assert torch.equal(step.points(), points)  # file order in, file order out
    data = load_data("synthetic:size=16,channels=3,classes=4,train=64,test=16", channels_last=channels_last)
    torch.manual_seed(5)
    for x, y in data.train.batches(32):  # two steps, so the second one uses momentum
        step(x, y, 0.05)
    return step, points


def test_curve_step_keeps_channels_last_weights_in_that_order_and_gives_the_same_curve():
    plain, points = _curve_steps(False)
    cl, _ = _curve_steps(True)
    assert any(cl._cl) and not any(plain._cl)
    views = cl._views(cl._points[1])
    conv = next(n for n, s in zip(cl.curve.layout.names, cl.curve.layout.shapes) if len(s) == 4 and s[2] > 1)
    assert views[conv].is_contiguous(memory_format=torch.channels_last) and not views[conv].is_contiguous()
    assert not torch.equal(plain.points()[1], points[1])  # the bend moved
    # Channels-last and contiguous convolutions are different kernels (and another CPU picks others), so the
    # two curves agree only up to float32 rounding. A conv weight gradient sums 32 x 16 x 16 = 8,192 products;
    # in another order it may differ by up to 8,192 x 2^-24 = 5e-4 of the sum of their sizes, and BN's backward
    # pass (which subtracts means) leaves some gradients much smaller than that sum. So the error scale is the
    # largest entry, not each entry's own size: allow 1% of the largest change of the bend and of the
    # largest momentum, with no relative term. (Measured with 1 thread, or with oneDNN disabled: up to 5e-4
    # and 1e-3 of them; with 2 threads 2e-5.) Momentum in the wrong memory order is off by 40%, no momentum by 50%.
    def same_up_to_rounding(actual, expected):
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-2 * float(expected.abs().max()))

    same_up_to_rounding(cl.points() - points, plain.points() - points)
    same_up_to_rounding(cl.momentum(), plain.momentum())
    # momentum restored in file order lands back in device order: a permutation there and back, exact
    cl.set_momentum(plain.momentum())
    assert torch.equal(cl.momentum(), plain.momentum())


@pytest.mark.parametrize("curve, bends", [("bezier", 1), ("bezier", 3), ("polychain", 1), ("polychain", 3)])
def test_curve_step_interpolation_equals_the_weighted_sum(curve, bends):
    """w(t) as a chain of lerps is sum_k c_k W_k, and exactly W_k where c is one-hot (ends, polychain knots)."""
    from mctool.curve_training import _interpolate

    points = torch.randn(bends + 2, 1000, generator=torch.Generator().manual_seed(0))
    w = torch.empty(1000)
    k = bends + 2
    # K - 1 lerps (three roundings each) against a K-term sum with coefficients <= 1: within (4K - 3) 2^-24
    # of the largest |W_k| of each other, however the kernels round; no relative term, since an entry of w
    # can be much smaller than the W_k it is made of (measured: 2 x 2^-24 max |W_k|). A wrong coefficient
    # moves entries by ~0.1 max |W_k|.
    atol = 4 * k * 2**-24 * float(points.abs().max())
    for t in (0.0, 0.13, 0.25, 0.5, 0.77, 1.0):
        c = coefficients(curve, bends, torch.tensor(t)).float()
        sq = _interpolate(points, c, w)
        torch.testing.assert_close(w, c @ points, rtol=0, atol=atol)
        # a float32 sum of 1,000 squares, in any order: within 1,000 x 2^-24 = 6e-5 relative
        assert float(sq) == pytest.approx(float((c @ points).double().pow(2).sum()), rel=1e-4)
        if int((c == 1).sum()) == 1:
            assert torch.equal(w, points[int(c.argmax())])


@pytest.mark.parametrize("free_idx, compile", [([1, 2], False), ([2], False), ([1, 2], True)])
def test_curve_step_updates_match_plain_autograd_and_sgd(free_idx, compile):
    """w(t) by interpolations and per-parameter gradients c_j (g + wd w) give the same SGD-with-momentum
    updates as plain autograd through CE + 0.5 wd ||w(t)||^2 with torch's SGD, over two steps; so do their
    torch.compile'd versions (--compile)."""
    torch.manual_seed(0)
    model = build_model("cifar_convfc", 4, 3, {"img_size": 16, "width": 0.25})
    layout = ParamLayout.of(model)
    flat = layout.flatten(dict(model.named_parameters()))
    g = torch.Generator().manual_seed(1)
    points = torch.stack([flat + 0.05 * torch.randn(flat.shape, generator=g) for _ in range(4)])  # 2 bends
    wd, lr = 5e-3, 0.1
    step = CurveStep(model, Curve("bezier", 2, points, layout, None, {}), free_idx, wd=wd, momentum=0.9,
                     compile=compile)
    batches = list(load_data("synthetic:size=16,channels=3,classes=4,train=64,test=8").train.batches(32))
    torch.manual_seed(7)
    losses = [float(step(x, y, lr)[0]) for x, y in batches]

    torch.manual_seed(7)
    free = points[free_idx].clone().requires_grad_(True)
    opt = torch.optim.SGD([free], lr=lr, momentum=0.9)
    fixed = [i for i in range(4) if i not in free_idx]
    ref_losses = []
    for x, y in batches:
        t = torch.rand(())
        rows = torch.empty(4, flat.numel())
        pts = rows.index_put((torch.tensor(fixed),), points[fixed]).index_put((torch.tensor(free_idx),), free)
        w = coefficients("bezier", 2, t).float() @ pts
        out = torch.func.functional_call(model, layout.views(w), (x,))
        loss = torch.nn.functional.cross_entropy(out, y) + 0.5 * wd * w.pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ref_losses.append(float(loss.detach()))
    # Both sides run the same kernels, on w(t) made two ways (lerps against a matmul: a few 2^-24 apart), and
    # this small network without BN carries that through two steps almost unchanged (measured: 1e-7 of the
    # loss, 1.3e-6 of the largest update and 1.5e-7 of the largest momentum entry). Allow 1e-5 of the loss and
    # 1e-4 of the largest update and momentum entry; leaving out the weight decay alone changes the update
    # by 8e-3 of it.
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    update, buf = free.detach() - points[free_idx], opt.state[free]["momentum_buffer"]
    torch.testing.assert_close(step.points()[free_idx] - points[free_idx], update, rtol=0,
                               atol=1e-4 * float(update.abs().max()))
    torch.testing.assert_close(step.momentum(), buf, rtol=0, atol=1e-4 * float(buf.abs().max()))
    assert all(torch.equal(step.points()[i], points[i]) for i in fixed)  # fixed points untouched, bit for bit
    assert not torch.equal(step.points()[free_idx], points[free_idx])
    assert torch.equal(step.curve.points, points)  # the Curve handed in is not trained in place


class _Tied(torch.nn.Module):
    """A network that reaches one weight by two names (as tied embeddings do)."""

    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(6, 6)
        self.hidden = torch.nn.Linear(6, 6)
        self.out = torch.nn.Linear(6, 3)
        self.hidden.weight = self.inp.weight

    def forward(self, x):
        return self.out(torch.tanh(self.hidden(torch.tanh(self.inp(x)))))


def test_curve_step_moves_tied_weights_together():
    """A weight reached by two names is one parameter of the layout; the curve step runs the network with
    w(t) under both names (the same gradients as autograd through functional_call's own tie handling)."""
    torch.manual_seed(0)
    model = _Tied()
    layout = ParamLayout.of(model)
    assert "hidden.weight" not in layout.names  # the alias is not a parameter of its own
    flat = layout.flatten(dict(model.named_parameters()))
    points = torch.stack([flat, flat + 0.3 * torch.randn_like(flat), flat + 0.3 * torch.randn_like(flat)])
    step = CurveStep(model, Curve("bezier", 1, points, layout, None, {}), [1], wd=0.0, momentum=0.0)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    torch.manual_seed(3)
    loss = float(step(x, y, 0.5)[0])

    torch.manual_seed(3)
    t = torch.rand(())
    bend = points[1].clone().requires_grad_(True)
    w = coefficients("bezier", 1, t).float() @ torch.stack([points[0], bend, points[2]])
    ref = torch.nn.functional.cross_entropy(torch.func.functional_call(model, layout.views(w), (x,)), y)
    ref.backward()
    # w(t) made two ways (lerps against a matmul) differs by a few 2^-24 of |W_k|, which three 6-wide layers
    # and a mean of 8 log-probabilities carry into the loss as some tens of 2^-24 (measured: 4 x 2^-24).
    assert loss == pytest.approx(float(ref.detach()), rel=1e-5)
    # The step adds the update to weights of size ~1, which rounds it by up to 2^-24, 5e-5 of the largest
    # update: allow 1e-3 of it. Running the alias on the network's own weight instead moves it by 25% of it.
    update = -0.5 * bend.grad
    torch.testing.assert_close(step.points()[1] - points[1], update, rtol=0, atol=1e-3 * float(update.abs().max()))


def test_connect_channels_last_resume_matches_uninterrupted(cli, tmp_path, monkeypatch):
    """Channels-last networks keep their control points (and momentum) in device order; files stay in file order."""
    data = ["-d", "synthetic:size=16,classes=3,train=96,test=32", "--batch-size", "32", *CPU]
    ends = []
    for seed in (0, 1):
        ends.append(tmp_path / f"e{seed}.safetensors")
        cli("train", *data, "-a", "cifar_convfc", "--arch-kwargs", '{"width": 0.25}', "-o", ends[-1], "--epochs",
            "1", "--seed", seed, "-q")
    args = [*ends, "--epochs", "3", "--lr", "0.05", "--batch-size", "32", "--bend-init", "linear", "-q", *CPU]
    ref, plain = tmp_path / "ref.safetensors", tmp_path / "plain.safetensors"
    cli("connect", *args, "--channels-last", "-o", ref)
    cli("connect", *args, "-o", plain)
    out = tmp_path / "run.safetensors"
    restore = ctrl_c_during_epoch(monkeypatch, 2, after_batches=1)
    cli.error("connect", *args, "--channels-last", "-o", out, code=130)
    restore()
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(fn.__name__) or fn)  # fast here
    # --deterministic and --compile are runtime options: a resumed run may differ in them
    cli("connect", *args, "--channels-last", "-o", out, "--resume", "--deterministic", "--compile")
    config = json.loads(read_metadata(out)["config"])
    assert config["deterministic"] is True and config["compile"] is True
    assert compiled == ["_interpolate", "_free_point_grads"]
    a, b, p = (load_curve(f)[0].points for f in (ref, out, plain))
    assert torch.equal(a, b)  # the resumed run replays the same steps with the same kernels: exact
    # The same curve as without channels-last, in file order, up to the rounding of other conv kernels: 1% of
    # the largest move of the bend from the middle of the segment, as in
    # test_curve_step_keeps_channels_last_weights_in_that_order_and_gives_the_same_curve (measured: 1e-7).
    moved = p[1] - (p[0] + p[2]) / 2
    torch.testing.assert_close(a, p, rtol=0, atol=1e-2 * float(moved.abs().max()))


def test_default_curve_lr_and_epochs_give_the_papers_recipes():
    from mctool.curve_training import default_curve_epochs, default_curve_lr

    cifar = 391  # iterations per epoch: 50,000 training images in batches of 128
    # VGG16 (no BatchNorm), trained 200 epochs at lr 0.05: its curve trains 600 epochs at 0.015
    assert default_curve_epochs(200, batchnorm=False) == 600
    assert default_curve_lr(0.05, 600 * cifar) == pytest.approx(0.015, rel=1e-12)
    # PreResNet164 and WRN-28-10 (BatchNorm), trained 200 epochs at 0.1: 200 epochs at 0.03
    assert default_curve_epochs(200, batchnorm=True) == 200
    assert default_curve_lr(0.1, 200 * cifar) == pytest.approx(0.03, rel=1e-12)


def test_default_curve_lr_keeps_short_runs_at_the_endpoints_lr():
    from mctool.curve_training import default_curve_lr

    assert default_curve_lr(0.05, 600 * 12) == 0.05  # digits: 12 iterations per epoch
    assert default_curve_lr(0.05, 20_000) == pytest.approx(0.025, rel=1e-12)  # lr x iterations = 10,000 x 0.05
    lrs = [default_curve_lr(0.1, n) for n in range(1, 100_000, 997)]
    assert lrs == sorted(lrs, reverse=True) and lrs[0] == 0.1 and lrs[-1] == pytest.approx(0.03, rel=1e-12)


def test_connect_defaults_follow_endpoint_a_and_are_recorded(cli, tmp_path, digits_models):
    # A: an MLP (no BatchNorm) trained 8 epochs at lr 0.1 on digits (12 iterations per epoch)
    out = tmp_path / "c.safetensors"
    r = cli.json("connect", *digits_models, "-o", out, *CPU)
    config = json.loads(read_metadata(out)["config"])
    assert config["epochs"] == 24 and config["lr"] == 0.1  # 3 x 8 epochs; 288 iterations keep A's lr
    assert set(config["derived"]) == {"augment", "epochs", "lr", "split", "wd"} and "0.1" in config["derived"]["lr"]
    assert config["split"] == "test" and config["derived"]["split"] == "A's split 'test'"
    assert config["augment"] == "auto" and config["derived"]["augment"] == "A's augmentation 'auto'"
    assert config["wd"] == json.loads(read_metadata(digits_models[0])["config"])["wd"]  # A's wd
    assert r["epochs"] == 24
    data, _ = read_h5(tmp_path / "c-connect.h5")
    assert data["lr"][0] == pytest.approx(0.1)

    explicit = tmp_path / "e.safetensors"
    cli("connect", *digits_models, "-o", explicit, "--epochs", "2", "--lr", "0.03", "--wd", "3e-4", "--augment",
        "none", "--split", "test", "-q", *CPU)
    config = json.loads(read_metadata(explicit)["config"])
    assert config["epochs"] == 2 and config["lr"] == 0.03 and config["wd"] == 3e-4 and config["derived"] is None
    assert config["augment"] == "none"


def test_connect_and_fge_train_on_the_images_the_start_network_was_trained_on(cli, tmp_path):
    """A network trained with --split val never saw the val images: by default its curve and its FGE run hold
    them out too (they used to train on them, with split test); an explicit --split still wins."""
    tiny = ["-d", "digits", "--arch-kwargs", '{"hidden": 8}', "--epochs", "1", "-q", *CPU]
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    for seed, path in ((0, a), (1, b)):
        cli("train", *tiny, "--split", "val", "--seed", seed, "-o", path)
    def config(path):
        return json.loads(read_metadata(path)["config"])

    r = cli.json("connect", a, b, "-o", tmp_path / "c.safetensors", "--epochs", "1", *CPU)
    assert r["split"] == "val" and config(tmp_path / "c.safetensors")["split"] == "val"
    assert config(tmp_path / "c.safetensors")["derived"]["split"] == "A's split 'val'"
    f = cli.json("fge", a, "-o", tmp_path / "f.safetensors", "--epochs", "1", "--cycle-epochs", "1", *CPU)
    assert f["split"] == "val" and config(tmp_path / "f.safetensors")["split"] == "val"
    r = cli.json("connect", a, b, "-o", tmp_path / "t.safetensors", "--epochs", "1", "--split", "test", *CPU)
    assert r["split"] == "test" and "split" not in (config(tmp_path / "t.safetensors")["derived"] or {})


def test_evaluation_commands_default_to_the_split_the_inputs_were_trained_with(cli, tmp_path):
    """A curve trained with --split val is evaluated on val by default, its BN passes without those images, so
    evaluate-curve, ensemble and plane agree with point + evaluate at the same t; an explicit val split for a
    network that trained on those images, or inputs of different splits, give a warning."""
    tiny = ["-d", "digits", "--arch-kwargs", '{"hidden": 8, "batch_norm": true}', "--epochs", "1", "-q", *CPU]
    a, b, t = (tmp_path / f"{n}.safetensors" for n in "abt")
    for seed, path, split in ((0, a, "val"), (1, b, "val"), (2, t, "test")):
        cli("train", *tiny, "--split", split, "--seed", seed, "-o", path)
    c = tmp_path / "c.safetensors"
    cli("connect", a, b, "-o", c, "--epochs", "1", "-q", *CPU)
    mid = tmp_path / "mid.safetensors"
    assert cli.json("point", c, "--t", "0.5", "-o", mid, *CPU)["split"] == "val"
    ref = cli.json("evaluate", mid, *CPU)
    assert ref["split"] == "val"
    r = cli.json("evaluate-curve", c, "-m", tmp_path / "e.h5", "--num-points", "3", *CPU)
    data, attrs = read_h5(tmp_path / "e.h5")
    assert r["split"] == "val" and attrs["split"] == "val" and "test/nll" not in data
    # the same network and BN statistics, evaluated in a batch of points: float32 sums in another order
    np.testing.assert_allclose(data["val/nll"][1], ref["metrics"]["eval"]["nll"], rtol=1e-5)
    e = cli.json("ensemble", c, "--num-points", "1", *CPU)
    assert e["split"] == "val"
    np.testing.assert_allclose(e["metrics"]["eval"]["nll"], data["val/nll"][1], rtol=1e-5)  # K = 1: t = 0.5
    p = cli.json("plane", a, mid, b, "-m", tmp_path / "p.h5", "--grid-points", "2", "-q", *CPU)
    assert p["split"] == "val"
    # an explicit split wins, without a warning where it is held out
    res = cli("evaluate-curve", c, "-m", tmp_path / "explicit.h5", "--num-points", "2", "--split", "test", "--json",
              *CPU)
    assert json.loads(res.stdout)["split"] == "test" and "Warning" not in res.stderr
    # --resume without --split takes the run's recorded split (a run begun with another default resumes)
    assert cli.json("evaluate-curve", c, "-m", tmp_path / "explicit.h5", "--num-points", "2", "--resume",
                    *CPU)["split"] == "test"
    assert "--split: test -> val" in cli.error("evaluate-curve", c, "-m", tmp_path / "explicit.h5", "--num-points",
                                                 "2", "--resume", "--split", "val", *CPU)

    def warnings(*args):
        res = cli(*args, "--json", *CPU)
        return json.loads(res.stdout)["split"], [w for w in res.stderr.splitlines() if w.startswith("Warning: ")]

    assert warnings("evaluate", t, "--split", "val") == ("val", [
        f"Warning: '{t}' was not trained with --split val, so the val images were among its training images: the "
        "val metrics are not held-out metrics."])
    assert warnings("evaluate", a, "--split", "val") == ("val", [])
    assert warnings("evaluate", a, t) == ("test", [
        f"Warning: the inputs were trained with different splits ('{a}' with --split val, the others on all "
        "training images); evaluating on test. Pass --split to choose."])
    assert warnings("evaluate", t) == ("test", [])
    # --temperature-scale fits on val, so its metrics stay on test (members trained with --split val: no warning)
    assert warnings("ensemble", a, b, "--temperature-scale") == ("test", [])


@pytest.mark.parametrize("norm", ["evonormb0", "batchnorm", "instancenorm"])
def test_bn_pass_recomputes_every_layer_with_running_statistics(norm):
    """Not only torch's BatchNorm: timm's EvoNorm2dB0 and InstanceNorm with track_running_stats keep a running
    variance that evaluation uses; a BN pass must recompute it from the data (its result may not depend on the
    statistics before the pass), else a curve's points keep the start network's and t = 1 does not reproduce the
    end network. The layers' momentum and mode are theirs again afterwards."""
    import timm

    torch.manual_seed(0)
    if norm == "instancenorm":
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.InstanceNorm2d(4, track_running_stats=True),
                                    torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                    torch.nn.Linear(4, 3))
    else:
        model = timm.create_model("test_efficientnet", num_classes=3, norm_layer=norm)
    layers = bn_modules(model)
    assert layers
    momenta = [m.momentum for m in layers]
    model.eval()
    data = load_data("synthetic:size=16,train=32,test=8,classes=3")
    results = []
    for start in (1.0, 5.0):
        for m in layers:
            m.running_var.fill_(start)
        assert recalibrate_bn(model, data.train, batch_size=16, bn_data="plain")
        results.append([m.running_var.clone() for m in layers])
    assert all(torch.equal(a, b) for a, b in zip(*results))
    assert not all(torch.allclose(a, torch.ones_like(a)) for a in results[0])
    assert [m.momentum for m in layers] == momenta and not any(m.training for m in model.modules())
