"""`mctool train`: learning, outputs, resume, and its refusals."""

import json
from pathlib import Path

import h5py
import pytest
import torch

import mctool.data
import mctool.loop
from conftest import ctrl_c_during_epoch, image_folder
from mctool.checkpoint import read_checkpoint, read_metadata
from mctool.h5io import read_h5
from safetensors.torch import save_file

TINY = ["-d", "digits", "--arch-kwargs", '{"hidden": 32}', "--device", "cpu"]


def test_train_learns_and_writes_provenance(cli, tmp_path):
    out = tmp_path / "m.safetensors"
    r = cli.json("train", *TINY, "-o", out, "--epochs", "4", "--lr", "0.1")
    assert r["outputs"]["model"]["path"] == str(out) and r["outputs"]["metrics"]["path"] == str(tmp_path / "m.h5")
    assert r["metrics"]["eval"]["err"] < 0.35  # chance is 0.9
    assert 0 <= r["metrics"]["train"]["err"] <= 1 and r["epochs"] == 4
    md = read_metadata(out)
    assert md["kind"] == "model" and md["arch"] == "mlp" and md["dataset"] == "digits"
    assert json.loads(md["config"])["lr"] == 0.1
    assert json.loads(md["arch_kwargs"]) == {"hidden": 32, "img_size": 8}
    data, attrs = read_h5(tmp_path / "m.h5")
    assert data["epoch"].tolist() == [1, 2, 3, 4]
    assert data["test/err"][-1] == pytest.approx(r["metrics"]["eval"]["err"])
    assert ((0 <= data["train/err"]) & (data["train/err"] <= 1)).all()
    assert attrs["kind"] == "train" and json.loads(attrs["config"])["epochs"] == 4
    assert not (tmp_path / "m.state.safetensors").exists()  # removed once the run is complete


def test_same_seed_same_weights_other_seed_differs(cli, tmp_path):
    outs = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        outs.append(tmp_path / f"{name}.safetensors")
        cli("train", *TINY, "-o", outs[-1], "--epochs", "2", "--seed", seed, "-q")
    a, b, c = (read_checkpoint(p)[0] for p in outs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_source_date_epoch_makes_reruns_byte_identical(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    outs = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    for out in outs:
        cli("train", *TINY, "-o", out, "--epochs", "3", "--save-every", "2", "-q")
    assert outs[0].read_bytes() == outs[1].read_bytes()
    # the --save-every checkpoints (and states) too, whose history records no wall-clock seconds then
    snapshots = [tmp_path / "a-epoch002.safetensors", tmp_path / "b-epoch002.safetensors"]
    assert snapshots[0].read_bytes() == snapshots[1].read_bytes()
    assert all("seconds" not in row for row in json.loads(read_metadata(snapshots[0])["history"]))
    assert read_metadata(outs[0])["created"] == "2023-11-14T22:13:20+00:00"
    with h5py.File(tmp_path / "a.h5") as f:
        assert f.attrs["started"] == f.attrs["finished"] == "2023-11-14T22:13:20+00:00"
    for bad in ("soon", "-1", "1.5", "253402300800", "\u0661"):  # the last: an Arabic-Indic digit one
        monkeypatch.setenv("SOURCE_DATE_EPOCH", bad)
        assert "SOURCE_DATE_EPOCH" in cli.error("train", *TINY, "-o", tmp_path / "c.safetensors", "-q")
        assert not (tmp_path / "c.safetensors").exists() and not (tmp_path / "c.h5").exists()


def test_deterministic_is_recorded_and_changes_nothing_on_a_cpu(cli, tmp_path):
    plain, det = tmp_path / "plain.safetensors", tmp_path / "det.safetensors"
    cli("train", *TINY, "-o", plain, "--epochs", "2", "-q")
    r = cli.json("train", *TINY, "-o", det, "--epochs", "2", "--deterministic")
    assert json.loads(read_metadata(det)["config"])["deterministic"] is True
    a, b = read_checkpoint(plain)[0], read_checkpoint(det)[0]
    assert all(torch.equal(a[k], b[k]) for k in a)  # the CPU kernels are deterministic anyway
    assert r["epochs"] == 2
    assert not torch.are_deterministic_algorithms_enabled()  # the process's settings are restored afterwards


def test_deterministic_context_sets_and_restores_torch_settings(monkeypatch):
    from mctool.runtime import deterministic

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
              torch.backends.cudnn.benchmark)
    with pytest.raises(RuntimeError, match="boom"):
        with deterministic(True):
            assert torch.are_deterministic_algorithms_enabled()
            assert torch.is_deterministic_algorithms_warn_only_enabled()
            assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
            assert __import__("os").environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
            raise RuntimeError("boom")
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
            torch.backends.cudnn.benchmark) == before
    with deterministic(False):
        assert torch.are_deterministic_algorithms_enabled() == before[0]


def test_maybe_compile_falls_back_to_the_plain_function_with_one_warning(monkeypatch, recwarn):
    from mctool.runtime import maybe_compile

    def add_one(x):
        return x + 1

    assert maybe_compile(add_one, False, "it") is add_one

    def broken_compile(fn, **kwargs):
        def compiled(*args):
            raise RuntimeError("no C++ compiler found\ndetails")
        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    f = maybe_compile(add_one, True, "the thing")
    assert f(1) == 2 and f(2) == 3
    warned = [str(w.message) for w in recwarn if issubclass(w.category, mctool.MctoolWarning)]
    assert warned == ["--compile: could not compile the thing (RuntimeError: no C++ compiler found); "
                      "it runs uncompiled."]

    # running out of memory is not the compiler's failure (uncompiled would fail too): it is raised as it is
    def out_of_memory(fn, **kwargs):
        def compiled(*args):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return compiled

    monkeypatch.setattr(torch, "compile", out_of_memory)
    g = maybe_compile(add_one, True, "the thing")
    with pytest.raises(torch.cuda.OutOfMemoryError):
        g(1)
    with pytest.raises(torch.cuda.OutOfMemoryError):  # and it stays compiled: not switched off by it
        g(1)


def test_val_split_and_save_every(cli, tmp_path):
    out = tmp_path / "m.safetensors"
    r = cli.json("train", *TINY, "-o", out, "--epochs", "3", "--split", "val", "--save-every", "1")
    assert r["split"] == "val" and r["metrics"]["eval"]["err"] is not None
    data, _ = read_h5(tmp_path / "m.h5")
    assert "val/err" in data and "test/err" not in data
    for epoch in (1, 2):
        snap = tmp_path / f"m-epoch{epoch:03d}.safetensors"
        tensors, md = read_checkpoint(snap)
        assert md["kind"] == "train-state" and md["epoch"] == str(epoch)
        assert any(k.startswith("optimizer/momentum/") for k in tensors)
    assert not (tmp_path / "m-epoch003.safetensors").exists()  # the final epoch is the output itself


@pytest.mark.parametrize("cut", [1, 3])
def test_ctrl_c_while_an_epoch_is_saved_says_so(cli, tmp_path, monkeypatch, cut):
    """An epoch trained in full whose state was being written: not "during epoch 3" (which sounded like its
    training), but while saving it, and that --resume trains it again."""
    import mctool.training

    real, calls = mctool.training.write_model, []

    def cut_short(*a, **k):
        calls.append(1)
        if len(calls) == cut:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(mctool.training, "write_model", cut_short)
    err = cli.error("train", *TINY, "-o", tmp_path / "m.safetensors", "--epochs", "4", "-q", code=130)
    if cut == 1:
        assert err == ("Error: interrupted while saving epoch 1, before its files were complete; nothing was saved. "
                       "Run the same command again to start over.")
    else:
        assert err.startswith("Error: interrupted while saving epoch 3, which --resume trains again; 2 completed "
                              "epoch(s) are saved in"), err


def test_resume_after_interrupt_gives_identical_weights(cli, tmp_path, monkeypatch):
    ref = tmp_path / "ref.safetensors"
    cli("train", *TINY, "-o", ref, "--epochs", "4", "--seed", "3", "-q")

    out = tmp_path / "run.safetensors"
    restore = ctrl_c_during_epoch(monkeypatch, 3, after_batches=1)
    err = cli.error("train", *TINY, "-o", out, "--epochs", "4", "--seed", "3", "-q", code=130)
    assert "--resume" in err and "2 completed epoch(s)" in err
    assert not out.exists() and (tmp_path / "run.state.safetensors").exists()
    data, _ = read_h5(tmp_path / "run.h5")
    assert data["epoch"].tolist() == [1, 2]
    restore()

    # without --resume the leftover state is not silently discarded
    assert "--resume" in cli.error("train", *TINY, "-o", out, "--epochs", "4", "--seed", "3")
    # options must match the interrupted run
    assert "lr" in cli.error("train", *TINY, "-o", out, "--epochs", "4", "--seed", "3", "--lr", "0.2", "--resume")
    # kwargs: the new side as the run would have them (the recorded img_size is not shown as dropped)
    assert 'these differ: --arch-kwargs: {"hidden": 32, "img_size": 8} -> {"hidden": 16, "img_size": 8}.' in cli.error(
        "train", *TINY[:2], "--arch-kwargs", '{"hidden": 16}', *TINY[4:], "-o", out, "--epochs", "4", "--seed", "3",
        "--resume")
    # --cuda-graphs and --deterministic change how, not what: a resumed run may differ in them (on a CPU
    # --cuda-graphs only warns)
    r = cli("train", *TINY, "-o", out, "--epochs", "4", "--seed", "3", "-q", "--resume", "--cuda-graphs",
            "--deterministic")
    assert "Warning: --cuda-graphs needs a CUDA device" in r.stderr
    a, b = read_checkpoint(ref)[0], read_checkpoint(out)[0]
    assert all(torch.equal(a[k], b[k]) for k in a)
    d_ref, _ = read_h5(tmp_path / "ref.h5")
    d_run, _ = read_h5(tmp_path / "run.h5")
    assert d_run["epoch"].tolist() == [1, 2, 3, 4]
    assert d_run["test/err"].tolist() == d_ref["test/err"].tolist()
    message = cli.error("train", *TINY, "-o", out, "--epochs", "4", "--seed", "3", "--resume")
    assert "nothing to resume" in message and "already finished" in message and f"--init '{out}'" in message


def test_resume_replaces_no_metrics_file_but_its_runs_own(cli, tmp_path, monkeypatch):
    """The resumed run rewrites its metrics file with its history: another existing file given as -m (or named
    by a tampered state) is refused without --force, as on a new run."""
    out, own = tmp_path / "run.safetensors", tmp_path / "run.h5"
    args = ["train", *TINY, "-o", out, "--epochs", "3", "-q"]
    restore = ctrl_c_during_epoch(monkeypatch, 2, after_batches=1)
    cli.error(*args, code=130)
    restore()
    precious = tmp_path / "precious.h5"
    precious.write_bytes(own.read_bytes())  # a train metrics file of another run (its start time differs)
    with h5py.File(precious, "a") as f:
        f.attrs["started"] = "2026-01-01T00:00:00+00:00"
    before = precious.read_bytes()
    message = cli.error(*args, "--resume", "-m", precious)
    assert f"--metrics '{precious}' already exists and is not the metrics file of the run" in message
    assert f"(that is '{own}')" in message and "pass --force" in message and precious.read_bytes() == before
    # a tampered state naming that file: refused too
    tensors, md = read_checkpoint(tmp_path / "run.state.safetensors")
    save_file(tensors, str(tmp_path / "run.state.safetensors"), metadata={**md, "metrics": "precious.h5"})
    assert "is not the metrics file of the run" in cli.error(*args, "--resume")
    assert precious.read_bytes() == before
    save_file(tensors, str(tmp_path / "run.state.safetensors"), metadata=md)
    restore = ctrl_c_during_epoch(monkeypatch, 1, after_batches=1)  # (the resumed run's first: epoch 2)
    cli.error(*args, "--resume", "-m", own, code=130)  # its own file, named: goes on
    restore()
    assert read_h5(own)[0]["epoch"].tolist() == [1]
    cli(*args, "--resume", "-m", precious, "--force")  # replaced, as asked
    assert read_h5(precious)[0]["epoch"].tolist() == [1, 2, 3]


def test_nan_loss_stops_and_keeps_last_good_state(cli, tmp_path, monkeypatch):
    out = tmp_path / "m.safetensors"
    err = cli.error("train", *TINY, "-o", out, "--epochs", "2", "--lr", "1e6")
    assert "NaN/inf" in err and "epoch 1, iteration" in err and "lower learning rate." in err
    assert not out.exists() and "--force" not in err  # nothing to replace: the same command runs again as it is

    # divergence in epoch 2 keeps epoch 1's state for inspection or --resume
    real = mctool.loop.lr_at
    monkeypatch.setattr(mctool.loop, "lr_at", lambda s, lr, epoch, *a: real(s, lr, epoch, *a) * (1e8 if epoch else 1))
    err = cli.error("train", *TINY, "-o", out, "--epochs", "3", "--force")
    assert "epoch 2, iteration" in err and "end of epoch 1" in err and "(and --force)" in err
    tensors, md = read_checkpoint(tmp_path / "m.state.safetensors")
    assert md["epoch"] == "1" and all(torch.isfinite(t).all() for t in tensors.values())
    assert not out.exists()


def test_nan_loss_from_weight_decay_names_it(cli, tmp_path, digits_models):
    """lr x wd >= 1 makes weight decay alone overshoot: the advice names --wd, not only the learning rate."""
    err = cli.error("train", *TINY, "-o", tmp_path / "w.safetensors", "--epochs", "1", "--wd", "1e6")
    assert "lower learning rate or weight decay (learning rate x --wd is 5e+04" in err
    assert "weight decay" not in cli.error("train", *TINY, "-o", tmp_path / "w.safetensors", "--epochs", "1",
                                           "--lr", "1e6")
    # fge flushes its snapshots' metrics during epoch 1: with no state to resume them, that file goes too
    out = tmp_path / "f.safetensors"
    err = cli.error("fge", digits_models[0], "-o", out, "--lr-max", "1e6", "--lr-min", "1e5", "--epochs", "1",
                    "--cycle-iters", "2", "--device", "cpu")
    assert "NaN/inf" in err and "nothing was saved" in err and "--force" not in err
    assert list(tmp_path.iterdir()) == []


def test_init_from_checkpoint_keeps_arch(cli, tmp_path, digits_models):
    out = tmp_path / "cont.safetensors"
    r = cli.json("train", "-d", "digits", "--init", digits_models[0], "-o", out, "--epochs", "1", "--lr", "0.01",
                 "--device", "cpu")
    md = read_metadata(out)
    assert md["arch"] == "mlp" and json.loads(md["arch_kwargs"])["hidden"] == 32
    assert str(digits_models[0]) in json.loads(md["inputs"])
    assert r["metrics"]["eval"]["err"] < 0.2
    assert "holds a 'mlp', but --arch is cifar_convfc; leave out --arch" in cli.error(
        "train", "-d", "digits", "--init", digits_models[0], "--arch", "cifar_convfc", "-o", tmp_path / "x.safetensors",
        "--epochs", "1")
    # --arch-kwargs must build a network the checkpoint's weights fit (they are applied, not just recorded)
    err = cli.error("train", "-d", "digits", "--init", digits_models[0], "--arch-kwargs", '{"hidden": 16}', "-o",
                    tmp_path / "x.safetensors", "--epochs", "1")
    assert "--arch-kwargs {\"hidden\": 16} change the network that --init" in err
    assert "net.1.weight: file (32, 64) vs model (16, 64)" in err and "Leave out --arch-kwargs" in err
    assert "missing" in cli.error("train", "-d", "digits", "--init", digits_models[0], "--arch-kwargs",
                                  '{"batch_norm": true}', "-o", tmp_path / "x.safetensors", "--epochs", "1")
    assert not (tmp_path / "x.safetensors").exists()
    same = tmp_path / "same.safetensors"  # options that keep the shapes are fine, and the file loads again
    cli.json("train", "-d", "digits", "--init", digits_models[0], "--arch-kwargs", '{"hidden": 32, "depth": 2}',
             "-o", same, "--epochs", "1", "--device", "cpu")
    assert json.loads(read_metadata(same)["arch_kwargs"])["depth"] == 2
    cli.json("evaluate", same, "--device", "cpu")
    # a data set whose class count does not fit the checkpoint
    assert "classes" in cli.error("train", "-d", "synthetic:size=8,channels=1,classes=3", "--init",
                                  digits_models[0], "-o", tmp_path / "y.safetensors", "--epochs", "1")


@pytest.mark.parametrize("args, message", [
    (["--lr", "0"], "--lr must be in (0, 1e6]"),
    (["--lr", "-1"], "--lr must be in (0, 1e6]"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--wd", "-1"], "--wd must be in [0, 1e6]"),
    (["--batch-size", "0"], "--batch-size"),
    (["--arch", "cifar_vgg61"], "cifar_vgg16"),
    (["--arch-kwargs", "{oops"], "JSON object"),
    (["--arch-kwargs", '{"nonsense": 1}'], "does not accept"),
    (["--dataset", "nonsense"], "unknown data set"),
    (["--dataset", "mnist", "--data-root", "{tmp}/empty"], "--download"),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "tpu"], "--device"),
])
def test_bad_options_are_clear_errors(cli, tmp_path, args, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    err = cli.error("train", "-o", tmp_path / "m.safetensors", "--epochs", "1", *args)
    assert message in err
    assert not (tmp_path / "m.safetensors").exists() and not (tmp_path / "m.h5").exists()


def test_refuses_to_overwrite_without_force(cli, tmp_path):
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"precious")
    assert "--force" in cli.error("train", *TINY, "-o", out, "--epochs", "1")
    assert out.read_bytes() == b"precious"
    metrics = tmp_path / "other.h5"
    metrics.write_bytes(b"precious")
    assert "--force" in cli.error("train", *TINY, "-o", tmp_path / "n.safetensors", "-m", metrics, "--epochs", "1")
    assert metrics.read_bytes() == b"precious"
    cli("train", *TINY, "-o", out, "--epochs", "1", "--force", "-q")
    assert read_metadata(out)["kind"] == "model"
    blocker = tmp_path / "plainfile"
    blocker.write_text("")
    assert f"'{blocker}' is a file, not a folder" in cli.error("train", *TINY, "-o", blocker / "m.safetensors",
                                                                "--epochs", "1")


def test_usage_errors_exit_2(cli, tmp_path):
    cli("train", "-o", tmp_path / "m.safetensors", "--schedule", "weird", code=2)
    cli("train", "--epochs", "1", code=2)  # -o is required


def test_bf16_and_channels_last_run_on_cpu(cli, tmp_path):
    out = tmp_path / "m.safetensors"
    r = cli.json("train", "-d", "synthetic:size=8,classes=3,train=256,test=64", "--arch", "cifar_convfc",
                 "--arch-kwargs", '{"width": 0.25}', "-o", out, "--epochs", "2", "--precision", "bf16",
                 "--channels-last", "--device", "cpu")
    assert 0 <= r["metrics"]["eval"]["err"] <= 1 and r["metrics"]["train"]["loss"] is not None  # finite (NaN: null)
    tensors, md = read_checkpoint(out)
    assert all(t.dtype == torch.float32 for t in tensors.values())  # weights stay fp32 under autocast
    assert json.loads(md["config"])["precision"] == "bf16"
    ev = cli.json("evaluate", out, "--precision", "bf16", "--channels-last", "--device", "cpu")
    ev32 = cli.json("evaluate", out, "--device", "cpu")
    assert abs(ev["metrics"]["eval"]["err"] - ev32["metrics"]["eval"]["err"]) <= 0.05


def test_init_from_plain_state_dict_and_snapshot_guard(cli, tmp_path, digits_models):
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file(read_checkpoint(digits_models[0])[0], str(plain))
    out = tmp_path / "m.safetensors"
    assert "--arch" in cli.error("train", *TINY, "--init", plain, "-o", out, "--epochs", "1")
    r = cli.json("train", *TINY, "--arch", "mlp", "--init", plain, "-o", out, "--epochs", "1", "--lr", "0.001")
    assert r["metrics"]["eval"]["err"] < 0.3  # started from the trained weights, not from scratch
    # existing --save-every checkpoints are not overwritten without --force
    snap = tmp_path / "n-epoch001.safetensors"
    snap.write_bytes(b"precious")
    assert "--force" in cli.error("train", *TINY, "-o", tmp_path / "n.safetensors", "--epochs", "2",
                                  "--save-every", "1")
    assert snap.read_bytes() == b"precious"


def test_interrupt_before_first_epoch_says_nothing_was_saved(cli, tmp_path, monkeypatch):
    def boom(self, *a, **k):
        raise KeyboardInterrupt
        yield

    monkeypatch.setattr(mctool.data.TensorSplit, "batches", boom)
    err = cli.error("train", *TINY, "-o", tmp_path / "m.safetensors", "--epochs", "2", code=130)
    assert "nothing was saved" in err and "--resume" not in err


def test_outputs_get_normal_permissions(cli, tmp_path, digits_models):
    import os
    import stat

    umask = os.umask(0o022)
    try:
        out = tmp_path / "p.safetensors"
        cli("train", *TINY, "-o", out, "--epochs", "1", "-q")
        assert stat.S_IMODE(out.stat().st_mode) == 0o644
        assert stat.S_IMODE((tmp_path / "p.h5").stat().st_mode) == 0o644
    finally:
        os.umask(umask)


def test_steps_switch_an_evaluated_network_back_to_train_mode():
    """After evaluation (model.eval()) the plain and the curve step run the whole network in train mode again
    (BN on batch statistics), and leave a network already in train mode as it is."""
    from mctool.curve_training import CurveStep
    from mctool.curves import Curve
    from mctool.flat import ParamLayout
    from mctool.graphs import sgd
    from mctool.models import build_model

    torch.manual_seed(0)
    model = build_model("cifar_preresnet20", 4, 3, {})
    opt = sgd(model.parameters(), lr=0.1, momentum=0.9, wd=0.0, device=torch.device("cpu"), graphs=False)
    layout = ParamLayout.of(model)
    flat = layout.flatten(dict(model.named_parameters()))
    steps = [mctool.loop.sgd_step(model, opt, torch.device("cpu"), "fp32"),
             CurveStep(model, Curve("bezier", 1, torch.stack([flat, flat, flat]), layout, None, {}), [1],
                       wd=0.0, momentum=0.9)]
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))
    for step in steps:
        model.eval()
        step(x, y, 0.01)
        assert all(m.training for m in model.modules())
        bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
        seen = int(bn.num_batches_tracked)
        step(x, y, 0.01)
        assert int(bn.num_batches_tracked) == seen + 1  # batch statistics, running averages updated


def test_a_stop_between_the_epoch_files_loses_no_save_every_checkpoint(cli, tmp_path, monkeypatch):
    """At the end of epoch 2 (--save-every 2) two checkpoints are written: stopped between them, a resumed
    run still leaves epoch 2's --save-every checkpoint, equal to an uninterrupted run's."""
    import mctool.checkpoint

    args = [*TINY, "--epochs", "3", "--save-every", "2"]
    cli("train", *args, "-o", tmp_path / "ref.safetensors")
    real, writes = mctool.checkpoint.atomic_path, []

    def stop_at_the_second_write_of_epoch_2(path):  # writes: epoch 1's state, then epoch 2's two files
        writes.append(Path(path).name)
        if len(writes) == 3:
            raise KeyboardInterrupt
        return real(path)

    monkeypatch.setattr(mctool.checkpoint, "atomic_path", stop_at_the_second_write_of_epoch_2)
    out = tmp_path / "run.safetensors"
    assert "--resume" in cli.error("train", *args, "-o", out, code=130)
    assert sorted(writes[1:]) == ["run-epoch002.safetensors", "run.state.safetensors"]
    monkeypatch.setattr(mctool.checkpoint, "atomic_path", real)
    cli("train", *args, "-o", out, "--resume")
    want = read_checkpoint(tmp_path / "ref-epoch002.safetensors")[0]
    got = read_checkpoint(tmp_path / "run-epoch002.safetensors")[0]
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_a_network_that_cannot_take_the_images_is_refused_before_any_work(cli, tmp_path):
    """A fixed-size timm model, an img_size other than the data's, or a plain state dict built for other images
    failed with torch's traceback in the first step; now one Error line, and nothing is written."""
    from safetensors.torch import save_file

    from mctool.models import build_model

    out = tmp_path / "m.safetensors"
    cpu = ["--epochs", "1", "-q", "--device", "cpu"]
    assert ("architecture 'vit_tiny_patch16_224' failed on the 1x8x8 images of data set 'digits' (AssertionError: "
            "Input height (8) doesn't match model (224).); check its --arch-kwargs, pick another --arch") in cli.error(
        "train", "-d", "digits", "-a", "vit_tiny_patch16_224", "-o", out, *cpu)
    assert "architecture 'mlp' failed on the 1x8x8 images of data set 'digits' (RuntimeError: mat1 and mat2 " \
           "shapes cannot be multiplied" in cli.error("train", "-d", "digits", "--arch-kwargs", '{"img_size": 28}',
                                                      "-o", out, *cpu)
    assert list(tmp_path.iterdir()) == []
    plain = tmp_path / "plain.safetensors"
    save_file(build_model("mlp", 10, 1, {"img_size": 28, "hidden": 16}).state_dict(), plain)
    assert "architecture 'mlp' failed on the 1x8x8 images" in cli.error(
        "evaluate", plain, "--arch", "mlp", "--num-classes", "10", "--in-chans", "1", "--arch-kwargs",
        '{"img_size": 28, "hidden": 16}', "-d", "digits", "--device", "cpu")


def test_device_names_a_gpu_this_machine_has(monkeypatch):
    """cuda:N beyond the GPUs there are failed at the first .to() with torch's 'invalid device ordinal'."""
    from mctool.errors import ConfigError
    from mctool.runtime import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ConfigError, match=r"--device cuda:2: this machine has 2 CUDA GPU\(s\), cuda:0 to cuda:1"):
        resolve_device("cuda:2")


def test_resume_refuses_an_init_file_that_changed(cli, tmp_path, monkeypatch, digits_models):
    """connect and fge refused a changed input on --resume; train recorded the new --init's sha256 for weights
    trained partly from the old one."""
    import shutil

    from mctool.fileio import sha256_file

    init = tmp_path / "init.safetensors"
    shutil.copy(digits_models[0], init)
    out = tmp_path / "run.safetensors"
    args = ["train", "--init", init, "-o", out, "--epochs", "3", "-q", "--device", "cpu"]
    restore = ctrl_c_during_epoch(monkeypatch, 2, after_batches=1)
    cli.error(*args, code=130)
    restore()
    shutil.copy(digits_models[1], init)  # another network under the same name
    assert "the interrupted run started from another file (or it changed since)" in cli.error(*args, "--resume")
    shutil.copy(digits_models[0], init)
    cli(*args, "--resume")
    assert json.loads(read_metadata(out)["inputs"]) == {str(init): sha256_file(init)}


def test_momentum_of_a_parameter_without_gradient_is_saved_as_zeros_and_restores_exactly():
    """A training state holds every parameter's momentum (so that a missing one is refused on --resume); a
    parameter that has had no gradient yet gets zeros, and its first step from them equals one from none."""
    from mctool.graphs import sgd
    from mctool.loop import get_momentum, set_momentum

    def net():
        torch.manual_seed(0)
        return torch.nn.ModuleDict({"used": torch.nn.Linear(4, 3), "unused": torch.nn.Linear(4, 3)})

    def step(m, opt, x):
        opt.zero_grad(set_to_none=True)
        m["used"](x).square().sum().backward()
        opt.step()

    x = torch.randn(5, 4)
    m = net()
    opt = sgd(m.parameters(), lr=0.1, momentum=0.9, wd=1e-4, device=torch.device("cpu"), graphs=False)
    step(m, opt, x)
    params = dict(m.named_parameters())
    saved = {k: v.clone() for k, v in get_momentum(opt, params).items()}  # (as written to a file)
    assert sorted(saved) == sorted("optimizer/momentum/" + k for k in params)
    assert torch.equal(saved["optimizer/momentum/unused.weight"], torch.zeros(3, 4))
    # the same network, resumed from the saved state, then trained on with the unused layer now used
    m2 = net()
    m2.load_state_dict(m.state_dict())
    opt2 = sgd(m2.parameters(), lr=0.1, momentum=0.9, wd=1e-4, device=torch.device("cpu"), graphs=False)
    set_momentum(opt2, dict(m2.named_parameters()), saved)
    for mm, oo in ((m, opt), (m2, opt2)):
        oo.zero_grad(set_to_none=True)
        (mm["used"](x).square().sum() + mm["unused"](x).sum()).backward()
        oo.step()
    for k, p in m.named_parameters():
        assert torch.equal(p, dict(m2.named_parameters())[k]), k
    no_momentum = sgd(m.parameters(), lr=0.1, momentum=0.0, wd=0.0, device=torch.device("cpu"), graphs=False)
    assert get_momentum(no_momentum, params) == {}


def test_resume_refuses_other_data_than_the_interrupted_runs(cli, tmp_path, monkeypatch):
    """The data set is recorded (``data_fingerprint``: images and labels; an image folder's class folders and
    image names) in the metrics file and the training state; --resume on other data (an image renamed, removed
    or added) was accepted and mixed two experiments."""
    image_folder(tmp_path / "imgs")
    args = ["train", "-d", f"imagefolder:{tmp_path / 'imgs'}", "-a", "mlp", "--arch-kwargs",
            '{"hidden": 4, "img_size": 224}', "--num-workers", "0", "--epochs", "2", "-o", tmp_path / "r.safetensors",
            "-q", "--device", "cpu"]
    restore = ctrl_c_during_epoch(monkeypatch, 2)
    cli(*args, code=130)
    restore()
    recorded = read_metadata(tmp_path / "r.state.safetensors")["data_fingerprint"]
    assert len(recorded) == 64 and read_h5(tmp_path / "r.h5")[1]["data_fingerprint"] == recorded
    moved = tmp_path / "imgs" / "train" / "x" / "3.png"
    moved.rename(moved.with_name("9.png"))
    said = cli.error(*args, "--resume")
    assert (f"the data set 'imagefolder:{tmp_path / 'imgs'}' is not the one the interrupted run in "
            f"'{tmp_path / 'r.state.safetensors'}' used (its class folders or image names differ") in said
    assert "resume with the folder as it was, or start over with --force." in said
    moved.with_name("9.png").rename(moved)
    cli(*args, "--resume")
    assert read_h5(tmp_path / "r.h5")[1]["data_fingerprint"] == recorded
