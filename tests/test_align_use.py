"""Using alignment: connect --align, evaluate-curve --compare-unaligned and --repair (REPAIR)."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch

from conftest import count_networks, ctrl_c_during_epoch
from mctool import load_model
from mctool.checkpoint import read_metadata
from mctool.errors import ConfigError
from mctool.curves import line_between, load_curve
from mctool.data import load_data
from mctool.flat import ParamLayout
from mctool.h5io import read_h5
from mctool.repair import channel_stats, interpolate_stats, repair, repair_layers

CPU = ["--device", "cpu"]


@pytest.fixture(scope="module")
def aligned(tmp_path_factory, digits_models):
    """B (digits_models[1]) aligned to A by weight matching with mctool align."""
    from conftest import Cli

    out = tmp_path_factory.mktemp("aligned") / "b-aligned.safetensors"
    Cli()("align", *digits_models, "-o", out, "-q", *CPU)
    return out


def _flat(path) -> torch.Tensor:
    m = load_model(path).model
    return ParamLayout.of(m).flatten(m.state_dict())


# connect --align

def test_connect_align_ends_at_aligned_b(cli, tmp_path, digits_models, aligned):
    a, b = digits_models
    out = tmp_path / "c.safetensors"
    r = cli.json("connect", a, b, "--align", "weights", "-o", out, "--epochs", "1", "--lr", "0.05", *CPU)
    assert r["trained"] and [f["path"] for f in r["inputs"]] == [str(a), str(b)]
    curve, _, md = load_curve(out)
    assert json.loads(md["config"])["align"] == "weights" and md["align_method"] == "weights"
    assert md["align_permuted"] == "end" and [g["size"] for g in json.loads(md["align_groups"])] == [32, 32]
    assert json.loads(md["inputs"]) == {str(a): load_model(a).sha256, str(b): load_model(b).sha256}
    # the end point is mctool align's output, bit for bit, and it is not B's own weights
    assert torch.equal(curve.points[-1], _flat(aligned)) and not torch.equal(curve.points[-1], _flat(b))
    assert torch.equal(curve.points[0], _flat(a))
    # ...and computes B's function
    model_b, end = load_model(b).model, curve.build_model()
    curve.layout.assign(end, curve.weights(1.0))
    x = next(iter(load_data("digits").eval.batches(256)))[0]
    with torch.no_grad():
        ref = model_b(x)
        torch.testing.assert_close(end.eval()(x), ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    # evaluate-curve of the curve file is about A and aligned B
    e = cli.json("evaluate-curve", out, "-m", tmp_path / "c.h5", "--num-points", "2", *CPU)
    s = cli.json("evaluate-curve", a, aligned, "-m", tmp_path / "s.h5", "--num-points", "2", *CPU)
    assert e["metrics"]["train"]["loss"]["end"] == pytest.approx(s["metrics"]["train"]["loss"]["end"], rel=1e-6)
    # an unknown method: the CLI's choices (a usage error), and the library's own check for Python callers
    assert "'bogus' is not one of 'weights', 'activations'" in cli.error("connect", a, b, "--align", "bogus", "-o",
                                                                         tmp_path / "x.safetensors", *CPU, code=2)
    from mctool.curve_training import ConnectConfig

    with pytest.raises(ConfigError, match="--align must be one of weights, activations"):
        ConnectConfig(align="bogus").validate()


def test_connect_align_activations_ends_at_align_activations_output(cli, tmp_path, digits_models):
    # connect --align activations --seed S aligns exactly as mctool align --method activations --seed S
    a, b = digits_models
    ref = tmp_path / "b-act.safetensors"
    cli("align", a, b, "-o", ref, "--method", "activations", "--seed", "3", "-q", *CPU)
    out = tmp_path / "c.safetensors"
    cli("connect", a, b, "--align", "activations", "--seed", "3", "--curve", "line", "-o", out, "-q", *CPU)
    curve, _, md = load_curve(out)
    assert md["align_method"] == "activations" and json.loads(md["config"])["align"] == "activations"
    assert torch.equal(curve.points[-1], _flat(ref)) and not torch.equal(curve.points[-1], _flat(b))
    with h5py.File(tmp_path / "b-act-align.h5") as f:
        assert f.attrs["method"] == "activations" and (f["groups/correlation"][()] > 0).all()


def test_connect_align_line_and_resume(cli, tmp_path, digits_models, aligned, monkeypatch):
    line = tmp_path / "l.safetensors"
    cli("connect", *digits_models, "--curve", "line", "--align", "weights", "-o", line, "-q", *CPU)
    assert torch.equal(load_curve(line)[0].points[-1], _flat(aligned))
    args = [*digits_models, "--align", "weights", "--epochs", "2", "--lr", "0.05", "-q", *CPU]
    ref = tmp_path / "ref.safetensors"
    cli("connect", *args, "-o", ref)
    out = tmp_path / "run.safetensors"
    restore = ctrl_c_during_epoch(monkeypatch, 2)
    assert "--resume" in cli.error("connect", *args, "-o", out, code=130)
    restore()
    assert json.loads(read_metadata(tmp_path / "run.state.safetensors")["config"])["align"] == "weights"
    # another --align is another run; left out, the interrupted run's is taken and the alignment recomputed
    # (deterministic: the state's end point is checked against it)
    other = ["--align" if a == "--align" else "activations" if a == "weights" else a for a in args]
    assert "these differ: --align: weights -> activations" in cli.error("connect", *other, "-o", out, "--resume")
    cli("connect", *[a for a in args if a not in ("--align", "weights")], "-o", out, "--resume")
    assert torch.equal(load_curve(ref)[0].points, load_curve(out)[0].points)


# evaluate-curve --compare-unaligned

def test_compare_unaligned(cli, tmp_path, digits_models, aligned, monkeypatch):
    a, b = digits_models
    m = tmp_path / "cmp.h5"
    args = [a, aligned, "--compare-unaligned", b, "-m", m, "--num-points", "3", *CPU]
    r = cli.json("evaluate-curve", *args)
    data, attrs = read_h5(m)
    for name in ("train/loss", "train/nll", "train/err", "test/nll", "test/err", "dl"):
        assert data["unaligned/" + name].shape == (3,) and not np.isnan(data["unaligned/" + name]).any()
    v, u = data["train/loss"], data["unaligned/train/loss"]
    assert u[0] == v[0]  # both segments start at A
    assert u[-1] == pytest.approx(v[-1], rel=1e-4)  # and end at networks computing the same function
    assert r["barrier_unaligned"]["train"]["loss"] == pytest.approx(u.max() - (u[0] + u[-1]) / 2)
    assert r["barrier"]["train"]["loss"] == pytest.approx(v.max() - (v[0] + v[-1]) / 2)
    # (t = 0, 0.5, 1: the line between the ends is their mean at t = 0.5)
    assert r["bump_unaligned"]["train"]["loss"] == pytest.approx(max(0.0, u[1] - (u[0] + u[-1]) / 2), abs=1e-12)
    assert r["bump"]["train"]["loss"] == pytest.approx(max(0.0, v[1] - (v[0] + v[-1]) / 2), abs=1e-12)
    assert json.loads(attrs["config"])["compare_unaligned"] == str(b)
    assert json.loads(attrs["summary_unaligned"])["barrier"]["train"]["loss"] == pytest.approx(
        r["barrier_unaligned"]["train"]["loss"])
    assert attrs["distance_unaligned"] > attrs["distance"]  # aligning brings B closer to A
    # plot draws both segments of such a file
    import mctool.plots as plots

    seen = []
    monkeypatch.setattr(plots, "_save", lambda fig, *_: seen.append([t.get_text().split(",")[0]
                                                                  for t in fig.legends[0].get_texts()]))
    plots.plot_curves([m], tmp_path / "cmp.png")
    assert seen == [["segment to aligned B", "segment to unaligned B"]]
    with h5py.File(m) as f:
        assert f["unaligned/train/loss"].dims[0][0].name == "/t"
    # resume: only the points with a missing (NaN) value in either segment are computed again
    with h5py.File(m, "a") as f:
        f["unaligned/test/err"][1] = np.nan
    calls = count_networks(monkeypatch)
    cli("evaluate-curve", *args, "--resume", "-q")
    assert len(calls) == 2  # point 1 of both segments
    again, _ = read_h5(m)
    assert again["unaligned/test/err"] == pytest.approx(data["unaligned/test/err"])
    assert "compare_unaligned" in cli.error("evaluate-curve", a, aligned, "-m", m, "--num-points", "3", "--resume")


def test_compare_unaligned_passes_share_a(cli, tmp_path, digits_models, aligned, monkeypatch):
    """Both segments start at A: a pass's span holds A once, and the values are those of one network at a
    time."""
    import mctool.batched as batched

    a, b = digits_models
    args = [a, aligned, "--compare-unaligned", b, "--num-points", "3", *CPU, "-q"]
    cli("evaluate-curve", *args, "-m", tmp_path / "one.h5", "--points-per-pass", "1")
    spans = []
    real = batched.WideNetwork.assign

    def spy(self, w, span=None):
        real(self, w, span)
        if span is not None:
            spans.append((tuple(c.shape[0] for c in span.controls),
                          any(x.basis is not None for x in self.input_layers.values())))

    monkeypatch.setattr(batched.WideNetwork, "assign", spy)
    cli("evaluate-curve", *args, "-m", tmp_path / "three.h5", "--points-per-pass", "3")
    # the span: A and aligned B, then B. 3 networks to a pass: t = 0 twice (A alone) and t = 0.5 to aligned B use 2
    # vectors ((3 - 2) x 64 inputs >= 10 x 3 x 2: the first layer computes less; with A counted twice, 3 vectors
    # would not), then t = 0.5 to B and t = 1 of both use 3
    assert spans == [((2, 1), True), ((2, 1), False)]
    one, _ = read_h5(tmp_path / "one.h5")
    three, _ = read_h5(tmp_path / "three.h5")
    for name in one:
        if name.endswith(("loss", "nll")):
            np.testing.assert_allclose(three[name], one[name], rtol=1e-5, atol=1e-7, err_msg=name)


def test_compare_unaligned_errors(cli, tmp_path, digits_models, aligned):
    a, b = digits_models
    m = ["-m", tmp_path / "x.h5", "--num-points", "2", *CPU]
    curve = tmp_path / "l.safetensors"
    cli("connect", a, aligned, "--curve", "line", "-o", curve, "-q")
    assert "not a curve file" in cli.error("evaluate-curve", curve, "--compare-unaligned", b, *m)
    assert "--shard" in cli.error("evaluate-curve", a, aligned, "--compare-unaligned", b, "--shard", "0/2", *m)
    assert "not a network written by mctool align" in cli.error("evaluate-curve", a, b, "--compare-unaligned", b, *m)
    assert "not the network" in cli.error("evaluate-curve", a, aligned, "--compare-unaligned", a, *m)
    assert "aligned to another network" in cli.error("evaluate-curve", b, aligned, "--compare-unaligned", b, *m)


# evaluate-curve --repair

def test_repair_matches_interpolated_statistics(digits_models, aligned):
    a, b = load_model(digits_models[0]), load_model(aligned)
    line = line_between(a, b)
    model = line.build_model()
    train = load_data("digits").train
    opts = {"batches": 1, "batch_size": 4096}  # the whole training set in one batch
    ends = []
    for w in line.points:
        line.layout.assign(model, w)
        ends.append(channel_stats(model, train, **opts))
    assert list(ends[0]) == list(repair_layers(model)) == ["net.1", "net.3"]  # not the classifier net.5
    line.layout.assign(model, line.weights(0.5))
    before = channel_stats(model, train, **opts)
    targets = interpolate_stats(*ends, 0.5)
    repair(model, train, targets, **opts)
    after = channel_stats(model, train, **opts)
    for name, (mean, std) in targets.items():
        torch.testing.assert_close(after[name][0], mean, rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(after[name][1], std, rtol=1e-3, atol=1e-4)
    # the midpoint's units had lost variance; REPAIR gave it back
    assert float(before["net.3"][1].mean()) < float(targets["net.3"][1].mean())


def test_repair_lowers_the_barrier(cli, tmp_path, digits_models, aligned):
    args = [digits_models[0], aligned, "--num-points", "3", "--batch-size", "4096", *CPU]
    # (one network per pass, as --repair evaluates its points: the same arithmetic, so the ends compare exactly)
    plain = cli.json("evaluate-curve", *args, "-m", tmp_path / "plain.h5", "--points-per-pass", "1")
    fixed = cli.json("evaluate-curve", *args, "-m", tmp_path / "repair.h5", "--repair", "--repair-batches", "1")
    assert fixed["barrier"]["train"]["loss"] <= plain["barrier"]["train"]["loss"]
    # the ends are the networks themselves, whose statistics are REPAIR's targets there: left exactly as they are
    for k in ("start", "end"):
        assert fixed["metrics"]["train"]["loss"][k] == plain["metrics"]["train"]["loss"][k]
    _, attrs = read_h5(tmp_path / "repair.h5")
    assert attrs["repair"] and json.loads(attrs["config"])["repair_batches"] == 1
    assert not read_h5(tmp_path / "plain.h5")[1]["repair"]
    msg = cli.error("evaluate-curve", *args, "-m", tmp_path / "repair.h5", "--resume")
    assert "--repair-batches: 1 -> none" in msg
    # REPAIR normalises over a batch: one image per batch is refused before any work (it was a traceback)
    assert "it needs a --batch-size of at least 2, got 1." in cli.error(
        "evaluate-curve", *args, "-m", tmp_path / "bs1.h5", "--repair", "--batch-size", "1")
    assert not (tmp_path / "bs1.h5").exists()


def test_repair_refuses_batchnorm(cli, tmp_path):
    nets = []
    for seed in (0, 1):
        out = tmp_path / f"bn{seed}.safetensors"
        cli("train", "-d", "digits", "--arch-kwargs", '{"hidden": 8, "batch_norm": true}', "--epochs", "1",
            "--seed", seed, "-o", out, "-q", *CPU)
        nets.append(out)
    msg = cli.error("evaluate-curve", *nets, "-m", tmp_path / "x.h5", "--repair", *CPU)
    assert "--repair is for networks without BatchNorm" in msg and not (tmp_path / "x.h5").exists()


def test_an_architecture_align_cannot_follow_is_named_with_its_file(cli, tmp_path):
    import shutil

    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    cli("train", "-d", "digits", "-a", "test_vit", "--arch-kwargs", '{"img_size": 8, "patch_size": 4}', "--epochs",
        "1", "-o", a, "-q", *CPU)
    shutil.copy(a, b)
    err = cli.error("align", a, b, "-o", tmp_path / "c.safetensors", *CPU)
    assert f"'{b}' (test_vit): align cannot permute the hidden units of this network" in err
    assert err.rstrip().endswith("Connect, evaluate and draw planes of these networks without --align.")
