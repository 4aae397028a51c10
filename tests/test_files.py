"""Checkpoint and HDF5 round trips, and the errors for files mctool must refuse."""

import json
import os
import pickle
import struct

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mctool.checkpoint import ModelMeta, load_model, read_checkpoint, read_metadata, save_checkpoint, save_model
from mctool.errors import CheckpointError, ConfigError, OutputError
from mctool.fileio import atomic_path, check_output
from mctool.h5io import COMMAND_LINE, MetricsLog, provenance, read_h5
from mctool.models import build_model


def _mlp():
    torch.manual_seed(0)
    return build_model("mlp", 10, 1, {"img_size": 8, "hidden": 16})


def _meta(**kw):
    base = dict(arch="mlp", num_classes=10, in_chans=1, arch_kwargs={"img_size": 8, "hidden": 16}, dataset="digits",
                image_size=8, normalization={"mean": [0.3], "std": [0.4]}, config={"lr": 0.1},
                inputs={"a.safetensors": "ab" * 32})
    base.update(kw)
    return ModelMeta(**base)


def test_model_checkpoint_round_trip(tmp_path):
    model, path = _mlp(), tmp_path / "m.safetensors"
    save_model(path, model, _meta())
    loaded = load_model(path)
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.model.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    md = read_metadata(path)
    assert md["format"] == "pt" and md["kind"] == "model" and md["arch"] == "mlp"
    assert json.loads(md["arch_kwargs"]) == {"img_size": 8, "hidden": 16}
    assert json.loads(md["normalization"]) == {"mean": [0.3], "std": [0.4]}
    assert json.loads(md["inputs"]) == {"a.safetensors": "ab" * 32}
    assert loaded.meta.dataset == "digits" and loaded.meta.image_size == 8 and loaded.meta.config == {"lr": 0.1}
    assert len(loaded.sha256) == 64
    assert not loaded.model.training
    # no temporary files are left behind
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_checkpoint_bytes_do_not_depend_on_the_metadata_order(tmp_path):
    # safetensors writes the metadata in a random order; mctool sorts the header so that the same tensors and
    # metadata give the same file (strings that JSON escapes included).
    tensors = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3, dtype=torch.float64),
               "n": torch.tensor(7), "h": torch.zeros(5, dtype=torch.bfloat16)}
    md = {f"key{i}": f"v\u00e9\"\\\n\x01\u2028{i}" for i in range(20)}
    save_checkpoint(tmp_path / "a.safetensors", tensors, md)
    save_checkpoint(tmp_path / "b.safetensors", dict(reversed(tensors.items())), dict(reversed(md.items())))
    raw = (tmp_path / "a.safetensors").read_bytes()
    assert raw == (tmp_path / "b.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    assert n % 8 == 0 and list(json.loads(raw[8:8 + n])) == sorted(["__metadata__", *tensors])
    loaded, metadata = read_checkpoint(tmp_path / "a.safetensors")
    assert metadata == md and loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[k], tensors[k]) and loaded[k].dtype == tensors[k].dtype for k in tensors)


def test_plain_state_dict_needs_arch_and_num_classes(tmp_path):
    model, path = _mlp(), tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    with pytest.raises(CheckpointError, match="--arch and --num-classes"):
        load_model(path)
    loaded = load_model(path, arch="mlp", num_classes=10, in_chans=1, arch_kwargs={"img_size": 8, "hidden": 16})
    assert torch.equal(loaded.model.net[1].weight, model.net[1].weight)


def test_shape_and_key_mismatches_are_listed(tmp_path):
    path = tmp_path / "m.safetensors"
    save_model(path, _mlp(), _meta(arch_kwargs={"img_size": 8, "hidden": 16}))
    with pytest.raises(CheckpointError) as e:
        load_model(path, arch_kwargs={"hidden": 8})
    assert "shape mismatches" in str(e.value) and "net.1.weight" in str(e.value)
    with pytest.raises(CheckpointError, match="missing keys"):
        load_model(path, arch_kwargs={"depth": 3})


def test_unknown_arch_in_metadata(tmp_path):
    path = tmp_path / "m.safetensors"
    save_model(path, _mlp(), _meta(arch="no_such_net"))
    with pytest.raises(ConfigError, match="unknown architecture 'no_such_net'"):
        load_model(path)


def test_refuses_pickles_garbage_and_truncation(tmp_path):
    pt = tmp_path / "m.pt"
    torch.save({"w": torch.zeros(2)}, pt)  # zip container with a pickle inside
    with pytest.raises(CheckpointError, match="never unpickles"):
        read_checkpoint(pt)
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps({"w": 1}, protocol=2))
    with pytest.raises(CheckpointError, match="never unpickles"):
        read_checkpoint(raw)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"hello, this is not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        read_checkpoint(junk)
    bad_json = tmp_path / "bad.safetensors"
    bad_json.write_bytes(struct.pack("<Q", 4) + b"{{{{")
    with pytest.raises(CheckpointError, match="not JSON"):
        read_checkpoint(bad_json)
    good = tmp_path / "good.safetensors"
    save_model(good, _mlp(), _meta())
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        read_checkpoint(cut)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "missing.safetensors")


def test_output_checks(tmp_path):
    existing = tmp_path / "x.h5"
    existing.write_text("keep me")
    with pytest.raises(OutputError, match="--force"):
        check_output(existing, force=False)
    check_output(existing, force=True)
    assert existing.read_text() == "keep me"  # checking never touches the file
    blocker = tmp_path / "file"
    blocker.write_text("")
    for below in (blocker / "out.safetensors", blocker / "a" / "b" / "out.safetensors"):
        with pytest.raises(OutputError, match=f"'{blocker}' is a file, not a folder"):
            check_output(below, force=False)
    check_output(tmp_path / "new" / "dir" / "out.safetensors", force=False)
    assert (tmp_path / "new" / "dir").is_dir()
    # a device, pipe or socket is never replaced, even with --force (as root, -m /dev/full once did)
    fifo = tmp_path / "pipe.h5"
    os.mkfifo(fifo)
    for force in (False, True):
        with pytest.raises(OutputError, match="not a regular file"):
            check_output(fifo, force=force)
    with pytest.raises(OutputError, match="not a regular file"):
        check_output("/dev/null", force=True)


def test_atomic_path_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "t.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["t.txt"]
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"


def test_ctrl_c_as_a_temporary_folder_is_made_leaves_none(tmp_path, monkeypatch):
    """Ctrl-C just after the folder of a checkpoint's temporary files was made (before the block that removes
    it was entered) left an empty .NAME.XXXXXXXX.tmp folder beside the output."""
    real = os.mkdir

    def made_then_ctrl_c(path, *args, **kwargs):
        real(path, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "mkdir", made_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "m.safetensors", {"w": torch.zeros(2)}, {"kind": "model"})
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def test_metrics_log_layout(tmp_path):
    path = tmp_path / "m.h5"
    log = MetricsLog(path, "epoch", ["lr", "train/loss"], provenance({"in": "00"}, {"lr": 0.1}, "train"))
    log.append(1, lr=0.1, **{"train/loss": 2.5})
    log.append(2, lr=0.05)
    log.flush()
    data, attrs = read_h5(path)
    assert data["epoch"].tolist() == [1, 2]
    assert data["lr"].tolist() == [0.1, 0.05]
    assert data["train/loss"][0] == 2.5 and np.isnan(data["train/loss"][1])  # NaN: not computed
    assert attrs["kind"] == "train" and json.loads(attrs["inputs"]) == {"in": "00"}
    assert attrs["mctool_version"] and attrs["command"].startswith("python ") and attrs["started"]  # a library call
    assert attrs["torch_version"] == torch.__version__ and attrs["torch_threads"] == str(torch.get_num_threads())
    with h5py.File(path) as f:
        assert f["epoch"].attrs["CLASS"] == b"DIMENSION_SCALE"
        assert f["train/loss"].dims[0][0].name == "/epoch"
        assert f["lr"].maxshape == (None,)  # appendable by other tools
    with pytest.raises(ValueError):
        log.append(3, nonsense=1.0)


def test_header_length_starting_with_pickle_byte_is_not_a_pickle(tmp_path):
    # A safetensors header of 128 + 256k bytes starts with byte 0x80, like a raw pickle does.
    path = tmp_path / "m.safetensors"
    for pad in range(300):
        save_file({"w": torch.zeros(2)}, str(path), metadata={"pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    tensors, md = read_checkpoint(path)
    assert torch.equal(tensors["w"], torch.zeros(2)) and md["pad"]


def test_a_command_line_with_undecodable_bytes_is_recorded(tmp_path, monkeypatch):
    """A file name that is not UTF-8 reaches sys.argv as surrogate escapes; HDF5 text must be UTF-8 (writing
    the `command` attribute was a traceback)."""
    token = COMMAND_LINE.set(["evaluate", "a.safetensors", "-m", "bad\udcff.h5"])
    try:
        attrs = provenance({"bad\udcff.safetensors": "0" * 64}, {}, "evaluate")
    finally:
        COMMAND_LINE.reset(token)
    assert attrs["command"] == "mctool evaluate a.safetensors -m 'bad\\xff.h5'"
    log = MetricsLog(tmp_path / "m.h5", "epoch", ["x"], attrs)
    log.append(1, x=1.0)
    log.flush()
    assert read_h5(tmp_path / "m.h5")[1]["command"] == attrs["command"]


def test_an_output_name_ending_with_a_slash_is_a_folder_not_a_file(cli, tmp_path, digits_models):
    """'-m runs/a/' names a folder; the command line's path options drop the slash, and the run wrote the file
    'runs/a'."""
    a = digits_models[0]
    for args in (("evaluate", a, "-m", f"{tmp_path}/ev/"), ("evaluate", a, f"--metrics={tmp_path}/ev/"),
                 ("point", a, "--t", "0", "-o", f"{tmp_path}/pt/")):
        message = cli.error(*args, "--device", "cpu")
        assert f"'{args[-1].split('=')[-1]}' names a folder (it ends with '/'); give a file name." in message
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(OutputError, match="names a folder"):
        check_output(f"{tmp_path}/x/", force=False)


@pytest.mark.skipif(os.name == "nt", reason="Windows file names are text: there are no undecodable ones")
def test_an_output_name_that_is_not_text_is_refused_before_any_work(cli, tmp_path, digits_models):
    """Runs record their outputs' names in UTF-8 text (a training state its metrics file, surface its
    directions file, hessian its eigenvectors file): such a name was a traceback after the first epoch or
    point. Every output is refused up front, with the name shown escaped."""
    a = digits_models[0]
    bad = tmp_path / "m\udcff.h5"
    cases = [("train", "-d", "digits", "--epochs", "1", "-o", tmp_path / "ok.safetensors", "-m", bad),
             ("train", "-d", "digits", "--epochs", "1", "-o", tmp_path / "n\udcff.safetensors"),
             ("surface", a, "--grid-points", "3", "--dims", "1", "-m", bad, "--device", "cpu"),
             ("hessian", a, "-m", tmp_path / "h.h5", "--eigenvectors", tmp_path / "v\udcff.safetensors",
              "--device", "cpu")]
    for args in cases:
        message = cli.error(*args)
        assert "\\xff" in message and "the name is not valid text (UTF-8)" in message, message
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written


def test_the_recorded_command_is_the_one_that_ran(cli, tmp_path, monkeypatch):
    """The CLI records its own arguments; a Python program calling the library records itself, not a made-up
    mctool command built from the program's arguments."""
    import mctool

    monkeypatch.setattr("sys.argv", ["myscript.py", "--lr", "3"])
    cli("train", "-d", "digits", "--epochs", "1", "-o", tmp_path / "a.safetensors", "-q", "--device", "cpu")
    assert read_h5(tmp_path / "a.h5")[1]["command"] == \
        f"mctool train -d digits --epochs 1 -o {tmp_path / 'a.safetensors'} -q --device cpu"
    mctool.train(mctool.TrainConfig(dataset="digits", epochs=1), tmp_path / "b.safetensors", tmp_path / "b.h5",
                 device="cpu", quiet=True)
    assert read_h5(tmp_path / "b.h5")[1]["command"] == "python myscript.py --lr 3"


def test_a_missing_input_names_the_files_it_may_have_meant(cli, tmp_path, digits_models):
    """A --save-every checkpoint of another epoch, a typo: the error names close names in the same folder."""
    for epoch in (2, 4):
        (tmp_path / f"c-epoch{epoch:03d}.safetensors").write_bytes(digits_models[0].read_bytes())
    (tmp_path / "c.h5").write_bytes(b"")
    err = cli.error("fge", tmp_path / "c-epoch024.safetensors", "-o", tmp_path / "f.safetensors", "--device", "cpu")
    assert err.startswith(f"Error: checkpoint '{tmp_path / 'c-epoch024.safetensors'}' does not exist. Did you mean ")
    assert "c-epoch002.safetensors" in err and "c-epoch004.safetensors" in err and "c.h5" not in err
    assert "Did you mean" not in cli.error("evaluate", tmp_path / "zzz.safetensors", "--device", "cpu")
