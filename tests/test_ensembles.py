"""FGE, Snapshot Ensembles, ensemble files and ensemble evaluation."""

import importlib
import json
import math

import h5py
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import ctrl_c_during_epoch
from mctool.checkpoint import load_model, read_checkpoint, read_metadata
from mctool.curves import load_curve
from mctool.data import load_data
from mctool.ensemble_eval import fit_temperature
from mctool.ensembles import load_ensemble
from mctool.evaluation import brier, nll, predict_logits, predict_probs, probabilities
from mctool.h5io import read_h5
from mctool.schedules import fge_is_snapshot, fge_lr, sse_is_snapshot, sse_lr

CPU = ["--device", "cpu"]


def test_fge_schedule_hand_values():
    a1, a2, c = 0.05, 0.0005, 8
    # t = (i mod c + 1) / c: start of a cycle (t = 1/8), quarter (t = 1/4), mid (1/2), end (1)
    assert fge_lr(0, c, a1, a2) == pytest.approx((1 - 2 / 8) * a1 + 2 / 8 * a2)
    assert fge_lr(1, c, a1, a2) == pytest.approx(0.5 * a1 + 0.5 * a2)
    assert fge_lr(3, c, a1, a2) == pytest.approx(a2)
    assert fge_lr(5, c, a1, a2) == pytest.approx(0.5 * a2 + 0.5 * a1)  # t = 3/4
    assert fge_lr(7, c, a1, a2) == pytest.approx(a1)
    assert fge_lr(8 + 3, c, a1, a2) == pytest.approx(a2)  # periodic
    assert [i for i in range(24) if fge_is_snapshot(i, c)] == [3, 11, 19]
    assert all(fge_lr(i, c, a1, a2) == pytest.approx(a2) for i in range(24) if fge_is_snapshot(i, c))


def test_sse_schedule():
    assert sse_lr(0, 100, 4, 0.2) == pytest.approx(0.2)
    assert sse_lr(25, 100, 4, 0.2) == pytest.approx(0.2)  # restart
    assert sse_lr(12, 100, 4, 0.2) == pytest.approx(0.1 * (np.cos(np.pi * 12 / 25) + 1))
    assert [i for i in range(100) if sse_is_snapshot(i, 100, 4)] == [24, 49, 74, 99]
    # 10 iterations in 3 cycles of ceil(10 / 3) = 4: the last cycle, cut short to 2 iterations, still ends in a
    # snapshot (train accepts this run: ceil(10 / 4) = 3 snapshots, as asked)
    assert [i for i in range(10) if sse_is_snapshot(i, 10, 3)] == [3, 7, 9]


@pytest.fixture(scope="module")
def start_state(tmp_path_factory):
    from conftest import Cli

    folder = tmp_path_factory.mktemp("fge")
    Cli()("train", "-d", "digits", "--arch-kwargs", '{"hidden": 32}', "-o", folder / "m.safetensors", "--epochs", "4",
          "--lr", "0.1", "--save-every", "3", "-q", *CPU)
    return folder / "m-epoch003.safetensors"


def test_fge_members_metrics_and_files(cli, tmp_path, start_state):
    out, m = tmp_path / "fge.safetensors", tmp_path / "fge.h5"
    r = cli.json("fge", start_state, "-o", out, "-m", m, "--epochs", "3", "--cycle-iters", "8", "--lr-max", "0.05",
                 "--lr-min", "0.001", "--swa", tmp_path / "swa.safetensors", *CPU)
    data, attrs = read_h5(m)
    n_iter = 12  # 1,437 digits / 128
    snaps = [i for i in range(3 * n_iter) if fge_is_snapshot(i, 8)]
    assert r["members"] == len(snaps) == 5 and r["cycle_iters"] == 8
    assert data["members/iteration"].tolist() == snaps
    assert data["lr"][snaps] == pytest.approx([0.001] * 5)  # snapshots only at lr-min
    assert data["lr"].shape == (36,) and data["lr"].max() <= 0.05
    ens = load_ensemble(out)
    assert len(ens) == 5 and read_metadata(out)["kind"] == "ensemble"
    assert json.loads(read_metadata(out)["inputs"]) == {str(start_state): load_model(start_state).sha256}
    # the recorded ensemble NLL is the NLL of the averaged member probabilities, computed by hand
    d = load_data("digits")
    probs = [predict_probs(ens.network(i), d.eval)[0] for i in range(5)]
    labels = d.eval.labels
    assert data["ensemble/test/nll"][-1] == pytest.approx(nll(sum(probs) / 5, labels), rel=1e-5)
    assert data["members/test/nll"][1] == pytest.approx(nll(probs[1], labels), rel=1e-5)
    assert data["ensemble/test/nll"][0] == pytest.approx(data["members/test/nll"][0])
    assert r["metrics"]["eval"]["err"] == pytest.approx(data["ensemble/test/err"][-1])
    assert r["metrics"]["last_member"]["nll"] == pytest.approx(data["members/test/nll"][-1])
    assert attrs["num_members"] == 5 and attrs["split"] == "test"
    assert read_metadata(tmp_path / "swa.safetensors")["kind"] == "model" and r["metrics"]["swa"]["err"] is not None
    assert r["outputs"]["swa"]["path"] == str(tmp_path / "swa.safetensors")
    # SWA is the mean of the snapshots' weights (no BN here: nothing else changes): a float32 mean of 5 values, within
    # a few 2^-24 of max |w| of a float64 one; leaving the first snapshot out moves weights by up to 3e-2 of it
    swa = load_model(tmp_path / "swa.safetensors").model
    members = ens.members.double()
    torch.testing.assert_close(ens.layout.flatten(dict(swa.named_parameters())).double(), members.mean(0), rtol=0,
                               atol=8 * 2**-24 * float(members.abs().max()))
    with h5py.File(m) as f:
        assert f["ensemble/test/err"].dims[0][0].name == "/member" and f["lr"].dims[0][0].name == "/iteration"

    # point --index round-trips a member bit for bit
    p2 = tmp_path / "m2.safetensors"
    assert "Warning" not in cli("point", out, "--index", "2", "-o", p2, "-q").stderr
    net = load_model(p2).model
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), ens.network(2).state_dict().values()))
    assert "--index must be between 0 and 4" in cli.error("point", out, "--index", "5", "-o", tmp_path / "x.st")
    assert "exactly one of --t" in cli.error("point", out, "-o", tmp_path / "x.st")
    # the data options do not apply to a member, and are checked all the same (they were taken as they came)
    for bad, message in ((["--device", "bogus"], "--device must be auto, cpu, cuda or cuda:N"),
                         (["--dataset", "foo"], "unknown data set 'foo'"),
                         (["--num-workers", "-1"], "--num-workers must be >= 0")):
        assert message in cli.error("point", out, "--index", "0", "-o", tmp_path / "x.safetensors", *bad)
    assert not (tmp_path / "x.safetensors").exists()
    # ... and given, they are said to have no effect (a member keeps its own BatchNorm statistics)
    said = cli("point", out, "--index", "0", "-o", tmp_path / "x.safetensors", "--bn-batches", "3", "-d", "digits",
               "--device", "cpu", "-q").stderr
    assert ("Warning: --bn-batches, --dataset, --device do not apply to --index: a member is written as stored, with "
            "its own BatchNorm statistics; ignored.") in said
    assert "is an ensemble file, not a curve: 'mctool point FILE --index I'" in cli.error(
        "point", out, "--t", "0.5", "-o", tmp_path / "x.st")
    # evaluate accepts ensemble files and expands them into members
    ev = cli.json("evaluate", out, *CPU)
    assert len(ev["models"]) == 5 and ev["models"][4]["label"] == f"{out}#4" and ev["models"][4]["path"] == str(out)
    assert ev["metrics"]["eval"]["nll"] == pytest.approx(r["metrics"]["eval"]["nll"], rel=1e-5)


@pytest.mark.parametrize("bn_data", ["augmented", "plain"])
def test_fge_given_bn_data_on_a_network_without_batchnorm_resumes(cli, tmp_path, start_state, monkeypatch, bn_data):
    """--bn-data changes nothing for an MLP and is not recorded; given, --resume with the same command was
    refused ("--bn-data: none -> augmented"), though the interruption said to run just that."""
    args = ["fge", start_state, "--epochs", "2", "--cycle-iters", "8", "--bn-data", bn_data, "-q", *CPU,
            "-o", tmp_path / "f.safetensors"]
    restore = ctrl_c_during_epoch(monkeypatch, 2)
    cli.error(*args, code=130)
    restore()
    assert json.loads(read_checkpoint(tmp_path / "f.state.safetensors")[1]["config"])["bn_data"] is None
    cli(*args, "--resume")
    assert (tmp_path / "f.safetensors").exists()


def test_fge_resume_refuses_snapshots_of_another_cycle(cli, tmp_path, start_state, monkeypatch):
    """mctool 0.2 rounded --cycle-iters 5 down to 4: its snapshots are not where cycles of 6 put them."""
    fge_module = importlib.import_module("mctool.fge")  # (mctool.fge is the function)
    args = [start_state, "--epochs", "3", "--cycle-iters", "5", "-q", *CPU, "-o", tmp_path / "f.safetensors"]
    rounded = fge_module.cycle_length
    monkeypatch.setattr(fge_module, "cycle_length", lambda cfg, n: 4)
    restore = ctrl_c_during_epoch(monkeypatch, 3)
    cli.error("fge", *args, code=130)
    restore()
    monkeypatch.setattr(fge_module, "cycle_length", rounded)
    msg = cli.error("fge", *args, "--resume")
    assert "cycles of 6 iterations" in msg and "--force" in msg
    r = cli.json("fge", *args, "--force")
    assert r["cycle_iters"] == 6


def test_fge_keeps_momentum_and_resumes_identically(cli, tmp_path, start_state, monkeypatch):
    args = [start_state, "--epochs", "3", "--cycle-iters", "8", "-q", *CPU]
    cli("fge", *args, "-o", tmp_path / "ref.safetensors")
    restore = ctrl_c_during_epoch(monkeypatch, 3)
    cli.error("fge", *args, "-o", tmp_path / "run.safetensors", code=130)
    restore()
    # a state written by another version, whose config.derived words the same defaults otherwise, resumes
    from safetensors import safe_open
    from safetensors.torch import save_file

    state = tmp_path / "run.state.safetensors"
    with safe_open(state, "pt") as f:
        md, tensors = f.metadata(), {k: f.get_tensor(k).clone() for k in f.keys()}
    config = json.loads(md["config"])
    config["derived"] = {**config["derived"], "wd": "the start network's wd"}
    save_file(tensors, state, {**md, "config": json.dumps(config)})
    # --cycle-iters left out: the interrupted run's is taken (a default would change the cycles); and a runtime
    # option added
    cli("fge", start_state, "--epochs", "3", "-q", *CPU, "-o", tmp_path / "run.safetensors", "--resume",
        "--deterministic")
    a, b = load_ensemble(tmp_path / "ref.safetensors"), load_ensemble(tmp_path / "run.safetensors")
    assert torch.equal(a.members, b.members)
    ra, _ = read_h5(tmp_path / "ref.h5")
    rb, _ = read_h5(tmp_path / "run.h5")
    assert ra["ensemble/test/nll"].tolist() == rb["ensemble/test/nll"].tolist()
    # the training state's momentum is used: starting from the plain model differs
    plain = tmp_path / "plain.safetensors"
    from mctool.checkpoint import save_model

    lm = load_model(start_state)
    save_model(plain, lm.model, lm.meta)
    cli("fge", plain, "--epochs", "3", "--cycle-iters", "8", "-q", *CPU, "-o", tmp_path / "nomom.safetensors")
    assert not torch.equal(load_ensemble(tmp_path / "nomom.safetensors").members, a.members)


def test_fge_resume_from_another_folder_writes_the_recorded_swa_file(cli, tmp_path, start_state, monkeypatch):
    """--swa is recorded relative to the folder of -o: a resume from another working folder (a requeued job)
    that leaves it out writes it where the interrupted run was told to, and one that spells it otherwise is the
    same run; a file of the same relative name in the new folder is left alone. A run folder moved or copied
    elsewhere resumes there and writes its SWA file beside -o, not into the old folder; a state of mctool
    0.2.0 (absolute --swa) still resumes."""
    import os
    import shutil

    from safetensors.torch import load_file, save_file

    (tmp_path / "s").mkdir()
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "s").mkdir(parents=True)
    (elsewhere / "s" / "swa.safetensors").write_text("precious")
    args = [start_state, "--epochs", "3", "--cycle-iters", "8", "-q", *CPU, "-o", tmp_path / "f.safetensors"]
    monkeypatch.chdir(tmp_path)
    restore = ctrl_c_during_epoch(monkeypatch, 3)
    cli.error("fge", *args, "--swa", "s/swa.safetensors", code=130)
    restore()
    run = tmp_path / "run"  # the interrupted run's files, moved to another folder (the old one then deleted)
    run.mkdir()
    for name in ("f.state.safetensors", "f.h5"):
        shutil.copy2(tmp_path / name, run / name)
    monkeypatch.chdir(elsewhere)
    config = json.loads(read_checkpoint(tmp_path / "f.state.safetensors")[1]["config"])
    assert config["swa"] == os.path.join("s", "swa.safetensors")
    assert config["bn_data"] is None  # an MLP without BatchNorm: the setting changes nothing, so none is recorded
    r = cli.json("fge", *args, "--resume")
    assert r["outputs"]["swa"]["path"] == str(tmp_path / "s" / "swa.safetensors")
    assert (tmp_path / "s" / "swa.safetensors").exists()
    assert (elsewhere / "s" / "swa.safetensors").read_text() == "precious"
    # the moved run: beside its -o, with or without --swa; nothing written into the folder it came from
    before = sorted(p.name for p in (tmp_path / "s").iterdir())
    moved = [*args[:-1], run / "f.safetensors", "--resume"]
    shutil.copytree(run, tmp_path / "run2")
    r = cli.json("fge", *moved)
    assert r["outputs"]["swa"]["path"] == str(run / "s" / "swa.safetensors")
    assert (run / "s" / "swa.safetensors").exists()
    cli("fge", *args[:-1], tmp_path / "run2" / "f.safetensors", "--resume", "--swa",
        tmp_path / "run2" / "s" / "swa.safetensors")
    assert (tmp_path / "run2" / "s" / "swa.safetensors").exists()
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == before
    # the same file spelled from another folder is the same option
    restore = ctrl_c_during_epoch(monkeypatch, 3)
    cli.error("fge", *args[:-1], tmp_path / "g.safetensors", "--swa", "../s/swa2.safetensors", code=130)
    restore()
    monkeypatch.chdir(tmp_path)
    state = tmp_path / "g.state.safetensors"
    tensors, md = load_file(state), read_checkpoint(state)[1]
    save_file(tensors, state, metadata={**md, "config": json.dumps(  # as mctool 0.2.0 recorded it: absolute
        {**json.loads(md["config"]), "swa": str(tmp_path / "s" / "swa2.safetensors")})})
    cli("fge", *args[:-1], tmp_path / "g.safetensors", "--swa", "s/swa2.safetensors", "--resume")
    assert (tmp_path / "s" / "swa2.safetensors").exists()


def test_fge_snapshots_evaluated_together_equal_one_at_a_time_and_resume(cli, tmp_path, monkeypatch):
    """--points-per-pass P: snapshots wait for a pass of P (one wide network, BN statistics per copy); training
    is unchanged, members and their metrics equal one-at-a-time evaluation, and pending snapshots survive an
    interrupt (resumed with another P)."""
    import mctool.batched as batched
    import mctool.ensembles as ensembles

    start = tmp_path / "bn.safetensors"
    cli("train", "-d", "digits", "--arch-kwargs", '{"hidden": 32, "batch_norm": true}', "-o", start, "--epochs",
        "2", "--lr", "0.1", "-q", *CPU)
    args = [start, "--epochs", "3", "--cycle-iters", "8", "-q", *CPU]  # snapshots at iterations 3, 11, 19, 27, 35
    passes, wides = [], []
    evaluate, wide_for = ensembles.SnapshotCollector._evaluate, batched.wide_for
    monkeypatch.setattr(ensembles.SnapshotCollector, "_evaluate",
                        lambda self, w: passes.append(len(w)) or evaluate(self, w))
    monkeypatch.setattr(batched, "wide_for", lambda *a, **k: wides.append(wide_for(*a, **k)) or wides[-1])
    cli("fge", *args, "-o", tmp_path / "one.safetensors", "--points-per-pass", "1")
    assert passes == [1] * 5 and wides == []
    passes.clear()
    cli("fge", *args, "-o", tmp_path / "three.safetensors", "--points-per-pass", "3")
    assert passes == [3, 2] and len(wides) == 2 and all(w is not None for w in wides)

    one, three = load_ensemble(tmp_path / "one.safetensors"), load_ensemble(tmp_path / "three.safetensors")
    ref, _ = read_h5(tmp_path / "one.h5")

    def same_as_one(ens, name):
        assert torch.equal(ens.members, one.members)  # when snapshots are evaluated does not change training
        for a, b in zip(ens.buffers, one.buffers):
            assert a.keys() == b.keys() and a  # BN running statistics, each member's own
            for k in a:  # float32 sums over 1,437 images in another order: relative error ~1e-6
                torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
        got, _ = read_h5(tmp_path / name)
        assert got["members/iteration"].tolist() == ref["members/iteration"].tolist() == [3, 11, 19, 27, 35]
        for key in ("members/test/nll", "ensemble/test/nll"):
            np.testing.assert_allclose(got[key], ref[key], rtol=1e-4)
        for key in ("members/test/err", "ensemble/test/err"):  # at most one near-tie of 360 test images flips
            np.testing.assert_allclose(got[key], ref[key], atol=1.01 / 360)

    same_as_one(three, "three.h5")

    # interrupted in epoch 3: three snapshots taken, none evaluated (a pass is 4); the state keeps them
    passes.clear()
    run = tmp_path / "run.safetensors"
    restore = ctrl_c_during_epoch(monkeypatch, 3)
    cli.error("fge", *args, "-o", run, "--points-per-pass", "4", code=130)
    restore()
    assert passes == []
    state = load_file(tmp_path / "run.state.safetensors")
    assert state["snapshots/pending"].shape == (3, one.layout.size) and "snapshots/members" not in state
    torch.testing.assert_close(state["snapshots/pending"], one.members[:3], rtol=0, atol=0)
    mid, attrs = read_h5(tmp_path / "run.h5")  # taken but not computed: NaN
    assert mid["members/iteration"].tolist() == [3, 11, 19] and np.isnan(mid["members/test/nll"]).all()
    cli("fge", *args, "-o", run, "--resume", "--points-per-pass", "2")  # another P: allowed
    assert passes == [2, 2, 1]  # 4 pending at iteration 27, then the last one at the end
    same_as_one(load_ensemble(run), "run.h5")
    assert "--points-per-pass" in cli.error("fge", start, "-o", tmp_path / "x.st", "--points-per-pass", "0")


def test_fge_errors(cli, tmp_path, start_state):
    assert "need 0 < --lr-min <= --lr-max, got 0.1 and 0.01." in cli.error(
        "fge", start_state, "-o", tmp_path / "f.st", "--lr-min", "0.1", "--lr-max", "0.01")
    # only --lr-max given, below the derived --lr-min: the message says where that came from
    assert "got 0.001 and 1e-05; --lr-min 0.001 is its default, the start network's training lr 0.1 / 100" in cli.error(
        "fge", start_state, "-o", tmp_path / "f.st", "--lr-max", "1e-05")
    assert "no snapshot" in cli.error("fge", start_state, "-o", tmp_path / "f.st", "--epochs", "1",
                                      "--cycle-epochs", "4")
    assert not (tmp_path / "f.st").exists() and not (tmp_path / "f.st.h5").exists()  # refused before any work
    assert "--cycle-iters" in cli.error("fge", start_state, "-o", tmp_path / "g.st", "--cycle-iters", "1")
    assert "--lr-max must be in (0, 1e6]" in cli.error("fge", start_state, "-o", tmp_path / "h.st", "--lr-max", "0")


def test_snapshot_ensembles(cli, tmp_path):
    out = tmp_path / "sse.safetensors"
    r = cli.json("train", "-d", "digits", "--arch-kwargs", '{"hidden": 32}', "--schedule", "sse", "--snapshots",
                 "2", "--epochs", "4", "--lr", "0.1", "-o", out, *CPU)
    assert r["members"] == 2 and len(load_ensemble(out)) == 2
    data, _ = read_h5(tmp_path / "sse.h5")
    assert r["metrics"]["eval"]["nll"] == pytest.approx(data["ensemble/test/nll"][-1])  # the output: the ensemble
    assert data["members/iteration"].tolist() == [23, 47]  # the end of each of the 2 cycles (48 iterations)
    assert "--snapshots" in cli.error("train", "-d", "digits", "--schedule", "sse", "--snapshots", "0", "-o",
                                      tmp_path / "x.st", "--epochs", "1")
    # 36 iterations cannot make 7 equal cycles: refused rather than silently giving 6 members
    assert "equal cycles (cycles of 6 iterations give 6 snapshots)" in cli.error(
        "train", "-d", "digits", "--schedule", "sse", "--snapshots", "7", "-o", tmp_path / "y.st", "--epochs", "3")
    # more snapshots than iterations: said so, without counting the iterations one by one (which took forever)
    assert "--snapshots 100,000,000,000,000,000,000 is more than the 36 iterations of the run" in cli.error(
        "train", "-d", "digits", "--schedule", "sse", "--snapshots", str(10**20), "-o", tmp_path / "y.st",
        "--epochs", "3")


def test_ensemble_file_needs_one_architecture(cli, tmp_path, digits_models):
    other = tmp_path / "other.safetensors"
    cli("train", "-d", "digits", "--arch-kwargs", '{"hidden": 8}', "-o", other, "--epochs", "1", "-q", *CPU)
    assert "one architecture" in cli.error("ensemble", digits_models[0], other, "-o", tmp_path / "e.safetensors")
    r = cli.json("ensemble", digits_models[0], other, *CPU)  # evaluating a mixed ensemble is fine
    assert r["members"] == 2


def test_ensemble_command_and_metrics(cli, tmp_path, digits_models):
    m, out = tmp_path / "e.h5", tmp_path / "e.safetensors"
    r = cli.json("ensemble", *digits_models, "-o", out, "-m", m, *CPU)
    d = load_data("digits")
    probs = [predict_probs(load_model(p).model, d.eval)[0] for p in digits_models]
    avg = (probs[0] + probs[1]) / 2
    assert r["metrics"]["eval"]["brier"] == pytest.approx(brier(avg, d.eval.labels), rel=1e-5)
    onehot = torch.nn.functional.one_hot(d.eval.labels, 10).float()
    assert r["metrics"]["eval"]["brier"] == pytest.approx(float(((avg - onehot) ** 2).sum(1).mean()), rel=1e-5)
    assert len(load_ensemble(out)) == 2
    assert read_h5(m)[0]["ensemble/test/brier"].shape == (2,)
    # input_order: the files as given, one given twice too (an ensemble with a member counted twice)
    m3 = tmp_path / "e3.h5"
    cli("ensemble", digits_models[0], digits_models[1], digits_models[0], "-m", m3, "-q", *CPU)
    shas = [load_model(p).sha256 for p in digits_models]
    assert json.loads(read_h5(m3)[1]["input_order"]) == [shas[0], shas[1], shas[0]]
    assert json.loads(read_h5(m)[1]["input_order"]) == shas
    assert read_h5(m)[1]["data_fingerprint"] == d.fingerprint  # the data set it evaluated on
    # re-evaluating the written ensemble file gives the same numbers
    again = cli.json("evaluate", out, *CPU)
    assert again["metrics"]["eval"]["nll"] == pytest.approx(r["metrics"]["eval"]["nll"], rel=1e-6)
    # ... members' losses included: the file keeps the weight decay (and split) its members share, so a
    # member's loss is NLL + wd/2 |w|^2 as from its own file, not its NLL alone
    assert load_ensemble(out).meta.config["wd"] == load_model(digits_models[0]).meta.config["wd"] > 0
    for member, own in zip(again["models"], r["models"]):
        assert member["metrics"]["loss"] == pytest.approx(own["metrics"]["loss"], rel=1e-6)
        assert member["metrics"]["loss"] > member["metrics"]["nll"]



def test_ensemble_stopped_while_writing_leaves_no_metrics_of_a_missing_file(cli, tmp_path, digits_models,
                                                                             monkeypatch):
    """-o is written before -m: a run stopped while writing the ensemble file left a metrics file describing an
    ensemble file that does not exist (and the rerun was refused because the metrics file existed)."""
    import importlib

    module = importlib.import_module("mctool.ensemble_eval")

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "save_ensemble", stopped)
    m, out = tmp_path / "e.h5", tmp_path / "e.safetensors"
    cli.error("ensemble", *digits_models, "-o", out, "-m", m, *CPU, code=130)
    assert not m.exists() and not out.exists()
    monkeypatch.undo()
    cli("ensemble", *digits_models, "-o", out, "-m", m, "-q", *CPU)  # the rerun needs no --force
    assert m.exists() and out.exists()


def test_ensemble_along_a_curve_and_temperature(cli, tmp_path, digits_models):
    c = tmp_path / "c.safetensors"
    cli("connect", *digits_models, "-o", c, "--epochs", "1", "-q", *CPU)
    res = cli("ensemble", c, "--num-points", "3", "--temperature-scale", *CPU, "--json")
    r = json.loads(res.stdout)
    # the warning: one line on stderr, with --json (or --quiet) too, and in the JSON
    assert [w for w in res.stderr.splitlines() if w.startswith("Warning: ")] == [
        f"Warning: temperature scaling: {r['calibration']['warning']}"]
    assert [x["label"].split("@")[1] for x in r["models"]] == ["t=0", "t=0.5", "t=1"]
    ends = cli.json("evaluate", *digits_models, *CPU)
    assert r["models"][0]["metrics"]["nll"] == pytest.approx(ends["models"][0]["metrics"]["nll"], rel=1e-5)  # t=0: A
    assert r["calibration"]["temperature"] > 0 and r["metrics"]["calibrated"]["nll"] is not None
    # the calibrated ensemble: the mean of softmax(z_m / T) of the three points (no BN: the curve's networks as
    # they are), by hand; within 1e-5 as the other metrics (the members went through one wide pass)
    d, curve, temp = load_data("digits"), load_curve(c)[0], r["calibration"]["temperature"]
    logits = [predict_logits(curve.network(t), d.eval)[0] for t in (0.0, 0.5, 1.0)]
    cal = sum(probabilities(z / temp, 1) for z in logits) / 3
    assert r["metrics"]["calibrated"]["nll"] == pytest.approx(nll(cal, d.eval.labels), rel=1e-5)
    assert abs(math.log(temp)) > 0.05  # T far enough from 1 for z / T and z * T to differ
    # one point: the curve's midpoint t = 0.5 (docs/cli.md, ensemble --num-points)
    one = cli.json("ensemble", c, "--num-points", "1", *CPU)
    assert one["models"][0]["label"] == f"{c}@t=0.5"
    assert one["metrics"]["eval"]["nll"] == pytest.approx(nll(probabilities(logits[1], 1), d.eval.labels), rel=1e-5)
    assert r["calibration"]["warning"]  # the members were not trained with --split val
    assert "--num-points" in cli.error("ensemble", *digits_models, "--num-points", "3")


def test_curve_points_and_ensemble_members_build_one_network_each_source(cli, tmp_path, digits_models,
                                                                          monkeypatch):
    """A network built for each of K points (a random initialisation thrown away, 0.1 s each for VGG16): one
    is built per curve or ensemble file and copied (the t = 0 copy is endpoint A, checked above)."""
    import mctool.flat

    c, e = tmp_path / "c.safetensors", tmp_path / "e.safetensors"
    cli("connect", *digits_models, "-o", c, "--epochs", "1", "-q", *CPU)
    cli("ensemble", c, "--num-points", "2", "-o", e, "-q", *CPU)
    before = [cli.json("ensemble", path, *extra, *CPU) for path, extra in ((c, ["--num-points", "5"]), (e, []))]
    assert before[0]["models"][4]["metrics"] == cli.json("evaluate", digits_models[1], *CPU)["models"][0]["metrics"]
    builds, real = [], mctool.flat.build_network
    monkeypatch.setattr(mctool.flat, "build_network", lambda *a, **k: builds.append(1) or real(*a, **k))
    for module in ("mctool.curves", "mctool.ensembles"):
        monkeypatch.setattr(importlib.import_module(module), "build_network", mctool.flat.build_network)
    for (path, extra), want in zip(((c, ["--num-points", "5"]), (e, [])), before):
        builds.clear()
        got = cli.json("ensemble", path, *extra, *CPU)
        assert len(builds) == 1, builds
        assert [m["metrics"] for m in got["models"]] == [m["metrics"] for m in want["models"]]


def test_fit_temperature_recovers_a_known_temperature():
    g = torch.Generator().manual_seed(0)
    true_logits = 3 * torch.randn(4000, 5, generator=g)
    labels = torch.multinomial(torch.softmax(true_logits, 1), 1, generator=g)[:, 0]
    t = fit_temperature([true_logits * 2.0], labels)  # logits twice too sharp: the best T is about 2
    assert t == pytest.approx(2.0, rel=0.1)


def test_default_fge_lrs_give_the_papers_values():
    from mctool.fge import default_fge_lrs

    lr_max, lr_min = default_fge_lrs(0.05, batchnorm=False)  # VGG16, trained at 0.05
    assert lr_max == pytest.approx(0.01, rel=1e-12) and lr_min == pytest.approx(5e-4, rel=1e-12)
    lr_max, lr_min = default_fge_lrs(0.1, batchnorm=True)  # PreResNet164, WRN-28-10, trained at 0.1
    assert lr_max == pytest.approx(0.05, rel=1e-12) and lr_min == pytest.approx(5e-4, rel=1e-12)


def test_fge_defaults_follow_the_start_network_and_are_recorded(cli, tmp_path, start_state):
    # the start network: an MLP (no BatchNorm) trained at lr 0.1 with wd 5e-4
    out, m = tmp_path / "fge.safetensors", tmp_path / "fge.h5"
    cli("fge", start_state, "-o", out, "-m", m, "--epochs", "1", "--cycle-iters", "8", "-q", *CPU)
    config = json.loads(read_metadata(out)["config"])
    assert config["lr_max"] == pytest.approx(0.02, rel=1e-12) and config["lr_min"] == pytest.approx(0.001, rel=1e-12)
    assert config["wd"] == 5e-4 and set(config["derived"]) == {"augment", "lr_max", "lr_min", "split", "wd"}
    assert config["augment"] == "auto"  # the start network's
    data, _ = read_h5(m)
    assert data["lr"].max() == pytest.approx(0.02) and data["lr"].min() == pytest.approx(0.001)

    cli("fge", start_state, "-o", tmp_path / "g.safetensors", "--epochs", "1", "--cycle-iters", "8", "--lr-max",
        "0.002", "-q", *CPU)
    config = json.loads(read_metadata(tmp_path / "g.safetensors")["config"])
    assert config["lr_max"] == 0.002 and config["lr_min"] == pytest.approx(0.001) and "lr_max" not in config["derived"]


def test_recorded_augment_is_checked():
    from mctool.loop import recorded_augment

    assert recorded_augment({"augment": "none"}) == "none" and recorded_augment({"augment": "crop-flip"}) == "crop-flip"
    for config in ({}, {"augment": 3}, {"augment": "bogus"}, {"augment": None}, {"augment": ["none"]}):
        assert recorded_augment(config) is None


def test_fge_and_connect_train_with_the_start_networks_augmentation(cli, tmp_path):
    # a start network trained without augmentation: FGE (and connect) by default train without it too, the same
    # run as with an explicit --augment none, and not the same as with digits' own default (crop)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    for seed, out in ((0, a), (1, b)):
        cli("train", "-d", "digits", "--arch-kwargs", '{"hidden": 16}', "-o", out, "--epochs", "1", "--lr", "0.1",
            "--augment", "none", "--seed", seed, "-q", *CPU)
    runs = {}
    for name, extra in (("default", []), ("none", ["--augment", "none"]), ("crop", ["--augment", "crop"])):
        out = tmp_path / f"fge-{name}.safetensors"
        cli("fge", a, "-o", out, "--epochs", "1", "--cycle-iters", "4", *extra, "-q", *CPU)
        config = json.loads(read_metadata(out)["config"])
        runs[name] = load_file(out)
        assert config["augment"] == ("crop" if name == "crop" else "none")
        assert ("augment" in config["derived"]) == (name == "default")
    assert runs["default"].keys() == runs["none"].keys()
    assert all(torch.equal(runs["default"][k], runs["none"][k]) for k in runs["none"])
    assert not all(torch.equal(runs["crop"][k], runs["none"][k]) for k in runs["none"])
    cli("connect", a, b, "-o", tmp_path / "c.safetensors", "--epochs", "1", "-q", *CPU)
    config = json.loads(read_metadata(tmp_path / "c.safetensors")["config"])
    assert config["augment"] == "none" and config["derived"]["augment"] == "A's augmentation 'none'"


def test_members_that_read_their_inputs_differently_are_refused_also_with_dataset(cli, tmp_path, digits_models):
    """The data is normalised once, as the first member reads it: a member normalised otherwise would be fed
    wrong inputs, with --dataset too (it skipped the check before)."""
    from dataclasses import replace

    from mctool.checkpoint import save_model

    loaded = load_model(digits_models[1])
    other = tmp_path / "other.safetensors"
    save_model(other, loaded.model, replace(loaded.meta, normalization={"mean": [0.5], "std": [0.25]}))
    for extra in ((), ("-d", "digits")):
        err = cli.error("evaluate", digits_models[0], other, *extra, *CPU)
        assert f"'{other}' differs from '{digits_models[0]}' in normalization" in err
    cli("evaluate", digits_models[0], digits_models[1], "-d", "digits", "-q", *CPU)


def test_a_plain_state_dict_first_does_not_choose_the_inputs_of_the_others(cli, tmp_path, digits_models):
    """The data is normalised as the first member that records a normalisation reads it (a plain state dict
    records none): a network after a plain state dict was fed the data set's default normalisation."""
    from dataclasses import replace

    from safetensors.torch import save_file

    from mctool.checkpoint import save_model

    loaded = load_model(digits_models[1])
    other = tmp_path / "other.safetensors"
    save_model(other, loaded.model, replace(loaded.meta, normalization={"mean": [0.5], "std": [0.25]}))
    plain = tmp_path / "plain.safetensors"
    save_file(load_model(digits_models[0]).model.state_dict(), plain)
    plain_args = ["--arch", "mlp", "--num-classes", "10", "--in-chans", "1", "--arch-kwargs",
                  json.dumps(load_model(digits_models[0]).meta.arch_kwargs), "-d", "digits"]
    alone = cli.json("evaluate", other, *CPU)["models"][0]["metrics"]
    both = cli.json("evaluate", plain, other, *plain_args, *CPU)["models"][1]["metrics"]
    assert both["err"] == alone["err"] and both["nll"] == pytest.approx(alone["nll"], rel=1e-5)


def test_temperature_scaling_without_held_out_images_says_so(cli, tmp_path):
    data = "synthetic:size=8,channels=1,train=1"
    net = tmp_path / "t.safetensors"
    cli("train", "-d", data, "-a", "mlp", "--arch-kwargs", '{"hidden": 8}', "--epochs", "1", "-o", net, "-q", *CPU)
    err = cli.error("ensemble", net, "--temperature-scale", *CPU)
    assert "--temperature-scale fits its temperature on the val split" in err
    assert err.rstrip().endswith("Leave out --temperature-scale for it.")
    cli("ensemble", net, "-q", *CPU)


def _swin_non_persistent_buffers(kwargs: str) -> dict[str, torch.Tensor]:
    import timm

    model = timm.create_model("swin_tiny_patch4_window7_224", num_classes=3, **json.loads(kwargs))
    keys = set(model.state_dict())
    return {n: b for n, b in model.named_buffers() if n not in keys}


def test_non_persistent_buffers_are_not_stored_and_old_files_load(cli, tmp_path):
    """timm's Swin keeps its relative position indices in non-persistent buffers: they are rebuilt with the
    network, so fge, ensemble -o and hessian must neither store nor expect them (they once did: an fge file
    nothing could read, and hessian of a model checkpoint failed)."""
    kwargs = '{"img_size": 16, "window_size": 4, "embed_dim": 8, "depths": [1], "num_heads": [1]}'
    data = "synthetic:size=16,train=32,test=16,classes=3"
    a = tmp_path / "a.safetensors"
    cli("train", "-d", data, "--arch", "swin_tiny_patch4_window7_224", "--arch-kwargs", kwargs, "--epochs", "1",
        "--batch-size", "16", "-o", a, "-q", *CPU)
    fge = tmp_path / "fge.safetensors"
    cli("fge", a, "--epochs", "2", "--cycle-iters", "2", "--batch-size", "16", "-o", fge, "-q", *CPU)
    assert not [k for k in load_file(fge) if "relative_position_index" in k]
    cli.json("evaluate", fge, *CPU)
    ens = tmp_path / "ens.safetensors"
    cli.json("ensemble", a, fge, "-o", ens, *CPU)
    assert not [k for k in load_file(ens) if "relative_position_index" in k]
    cli.json("hessian", a, "-m", tmp_path / "h.h5", "--top-k", "1", "--train-subset", "16", "--tol", "0.1", *CPU)
    # an ensemble file written with the non-persistent buffers (mctool 0.2.0) still loads
    tensors = load_file(fge)
    tensors.update({f"buffers/0/{k}": v for k, v in _swin_non_persistent_buffers(kwargs).items()})
    old = tmp_path / "old.safetensors"
    with safe_open(str(fge), "pt") as f:
        save_file(tensors, str(old), metadata=f.metadata())
    cli.json("evaluate", old, *CPU)
