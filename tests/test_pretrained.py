"""`train --pretrained` / `--pretrained-file`: weights loaded as they are, head re-initialised, provenance,
refusals, and checkpoints that load without timm's weights (all offline: timm's `test_resnet`, a local file)."""

import json
import logging

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

import mctool
from mctool.checkpoint import read_metadata
from mctool.errors import CheckpointError, ConfigError
from mctool.fileio import sha256_file
from mctool.models import build_pretrained
from mctool.training import TrainConfig

ARCH = "test_resnet"  # timm's own tiny ResNet (470k parameters; pretrained at 160x160, 1000 classes)
TINY = ["-d", "synthetic:size=16,classes=3,train=32,test=16", "--arch", ARCH, "--epochs", "1", "--batch-size", "16",
        "--device", "cpu", "-q"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A timm state dict of test_resnet in a safetensors file (a stand-in for downloaded weights)."""
    torch.manual_seed(123)
    state = {k: v.contiguous() for k, v in timm.create_model(ARCH).state_dict().items()}
    path = tmp_path_factory.mktemp("weights") / "test_resnet.safetensors"
    save_file(state, str(path))
    return path, state


def _no_download(monkeypatch):
    real = timm.create_model

    def create(*args, pretrained=False, **kwargs):
        assert not pretrained, "timm was asked to download weights"
        return real(*args, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", create)


def test_file_weights_are_loaded_as_they_are(weights, monkeypatch):
    path, state = weights
    _no_download(monkeypatch)
    model, source = build_pretrained(ARCH, 1000, 3, file=path)
    got = model.state_dict()
    assert got.keys() == state.keys() and all(torch.equal(got[k], v) for k, v in state.items())
    assert source["reinitialized"] == [] and source["adapted_input_conv"] == []
    assert source["sha256"] == sha256_file(path)
    assert source["data_config"]["input_size"] == [3, 160, 160] and source["data_config"]["mean"] == [0.5] * 3


def test_other_classes_reinitialise_the_head_with_a_warning(weights):
    path, state = weights
    with pytest.warns(mctool.MctoolWarning, match="classifier.*fc.bias, fc.weight.*random initialisation"):
        model, source = build_pretrained(ARCH, 3, 3, file=path)
    got = model.state_dict()
    assert got["fc.weight"].shape == (3, state["fc.weight"].shape[1])
    assert source["reinitialized"] == ["fc.bias", "fc.weight"]
    assert all(torch.equal(got[k], v) for k, v in state.items() if not k.startswith("fc."))


def test_a_file_without_a_classifier_says_so(weights, tmp_path):
    _, state = weights
    headless = tmp_path / "headless.safetensors"
    save_file({k: v for k, v in state.items() if not k.startswith("fc.")}, str(headless))
    with pytest.warns(mctool.MctoolWarning, match=r"headless.safetensors' holds no classifier \(fc.bias, fc.weight\)"):
        _, source = build_pretrained(ARCH, 3, 3, file=headless)
    assert source["reinitialized"] == ["fc.bias", "fc.weight"]


def test_other_input_channels_adapt_the_first_conv_as_timm_does(weights):
    path, state = weights
    with pytest.warns(mctool.MctoolWarning):  # the head (3 classes)
        model, source = build_pretrained(ARCH, 3, 1, file=path)
    assert source["adapted_input_conv"] == ["conv1.0.weight"]
    torch.testing.assert_close(model.state_dict()["conv1.0.weight"], state["conv1.0.weight"].sum(1, keepdim=True))



@pytest.mark.parametrize("base, in_chans", [(3, 1), (3, 5), (1, 3), (2, 7), (4, 2)])
def test_the_first_conv_rule_needs_no_timm_with_base_chans(base, in_chans):
    """timm's ``adapt_input_conv`` takes ``base_chans`` from 1.0.31 on; with an older one (this signature)
    mctool applies the same rule itself."""
    import inspect

    from timm.models import adapt_input_conv

    from mctool.models import _adapt_input_conv

    w = torch.randn(8, base, 3, 3)
    got = _adapt_input_conv(lambda in_chans, conv_weight: pytest.fail("an old timm cannot adapt this"), in_chans, w)
    expected = (w.sum(1, keepdim=True) if in_chans == 1 else
                torch.cat([w] * in_chans, 1)[:, :in_chans] * (base / in_chans))
    torch.testing.assert_close(got, expected)
    if "base_chans" in inspect.signature(adapt_input_conv).parameters:
        torch.testing.assert_close(got, adapt_input_conv(in_chans, w, base_chans=base))

def test_train_records_where_the_weights_came_from(cli, weights, tmp_path):
    path, _ = weights
    out = tmp_path / "ft.safetensors"
    r = cli.json("train", *TINY, "--pretrained-file", path, "-o", out)
    sha = sha256_file(path)
    assert {"path": str(path), "sha256": sha} in r["inputs"]
    md = read_metadata(out)
    config = json.loads(md["config"])
    assert config["pretrained"] is True and config["pretrained_file"] == str(path)
    assert config["pretrained_source"]["sha256"] == sha and config["pretrained_source"]["file"] == str(path)
    assert config["pretrained_source"]["reinitialized"] == ["fc.bias", "fc.weight"]
    assert json.loads(md["inputs"]) == {str(path): sha}
    # small data sets keep their own image size and normalisation
    assert md["image_size"] == "16" and json.loads(md["normalization"])["mean"] != [0.5, 0.5, 0.5]


def test_pretrained_file_implies_pretrained():
    assert TrainConfig(pretrained_file="w.safetensors").pretrained is True
    assert TrainConfig().pretrained is False


def test_a_fine_tuned_checkpoint_loads_without_any_download(cli, weights, tmp_path, monkeypatch):
    path, state = weights
    out = tmp_path / "ft.safetensors"
    cli("train", *TINY, "--pretrained-file", path, "--lr", "1e-9", "-o", out)  # weights barely move
    _no_download(monkeypatch)
    loaded = mctool.load_model(out)
    assert loaded.meta.arch == ARCH and loaded.meta.config["pretrained"] is True
    got = loaded.model.state_dict()
    torch.testing.assert_close(got["layer1.0.conv1.weight"], state["layer1.0.conv1.weight"], rtol=0, atol=1e-6)
    r = cli.json("evaluate", out, "--device", "cpu", "-q")
    assert 0 <= r["metrics"]["eval"]["err"] <= 1


def test_timm_hub_weights_are_asked_for_and_recorded(cli, tmp_path, monkeypatch):
    real, calls = timm.create_model, []

    def create(*args, pretrained=False, **kwargs):  # stands in for timm's download (no network in tests)
        calls.append(pretrained)
        return real(*args, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", create)
    out = tmp_path / "hub.safetensors"
    cli("train", *TINY, "--pretrained", "-o", out)
    assert True in calls
    source = json.loads(read_metadata(out)["config"])["pretrained_source"]
    assert source["hf_hub_id"] == "timm/test_resnet.r160_in1k" and source["tag"] == "r160_in1k"
    assert source["reinitialized"] == ["fc.bias", "fc.weight"]
    assert json.loads(read_metadata(out)["inputs"]) == {}


@pytest.mark.parametrize("failure, message", [
    (OSError("We couldn't connect to 'https://huggingface.co'"),
     "could not get timm's pretrained weights for 'test_resnet' (OSError: We couldn't connect"),
    (RuntimeError("size mismatch for fc.weight"),
     "timm could not load its pretrained weights into 'test_resnet' with num_classes=3"),
])
def test_timm_failures_are_one_error_line(cli, tmp_path, monkeypatch, failure, message):
    real = timm.create_model

    def create(*args, pretrained=False, **kwargs):
        if pretrained:  # offline, huggingface_hub logs each retry of its download as a warning
            logging.getLogger("huggingface_hub.utils._http").warning("thrown while requesting HEAD; Retrying in 8s")
            raise failure
        return real(*args, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", create)
    seen, level = [], logging.getLogger("huggingface_hub").level
    handler = logging.Handler()
    handler.emit = seen.append
    logging.getLogger().addHandler(handler)
    try:
        err = cli.error("train", *TINY, "--pretrained", "-o", tmp_path / "m.safetensors")
    finally:
        logging.getLogger().removeHandler(handler)
    assert message in err and ("--pretrained-file" in err) == isinstance(failure, OSError)
    assert not (tmp_path / "m.safetensors").exists()
    assert not seen and logging.getLogger("huggingface_hub").level == level  # quiet, then as it was


def test_imagefolder_gets_the_pretrained_models_input(cli, weights, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for part in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / "img" / part / cls).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(
                    tmp_path / "img" / part / cls / f"{i}.png")
    out = tmp_path / "ft.safetensors"
    cli("train", "-d", f"imagefolder:{tmp_path / 'img'}", "--arch", ARCH, "--pretrained-file", weights[0],
        "--epochs", "1", "--batch-size", "6", "--num-workers", "0", "--device", "cpu", "-q", "-o", out)
    md = read_metadata(out)
    assert md["image_size"] == "160" and json.loads(md["normalization"]) == {"mean": [0.5] * 3, "std": [0.5] * 3}


# --- refusals ------------------------------------------------------------------------------------------------


def test_missing_file(cli, tmp_path):
    missing = tmp_path / "nope.safetensors"
    err = cli.error("train", *TINY, "--pretrained-file", missing, "-o", tmp_path / "m.safetensors")
    assert "nope.safetensors' does not exist" in err


def test_pickle_is_refused(cli, weights, tmp_path):
    pt = tmp_path / "w.pth"
    torch.save(weights[1], pt)
    err = cli.error("train", *TINY, "--pretrained-file", pt, "-o", tmp_path / "m.safetensors")
    assert "pickled" in err and "never unpickles" in err


def test_wrong_shapes_and_missing_tensors_are_refused(weights, tmp_path):
    _, state = weights
    bad = dict(state, **{"layer1.0.conv1.weight": torch.zeros(1, 1, 3, 3)})
    del bad["layer2.0.bn1.weight"]
    path = tmp_path / "bad.safetensors"
    save_file(bad, str(path))
    with pytest.raises(CheckpointError, match=r"does not fit 'test_resnet'.*1 missing keys: layer2.0.bn1.weight.*"
                                              r"1 shape mismatches: layer1.0.conv1.weight"):
        build_pretrained(ARCH, 1000, 3, file=path)


def test_another_architectures_file_is_refused(cli, weights, tmp_path):
    err = cli.error("train", "-d", "synthetic:size=16,train=8,test=8", "--arch", "resnet10t", "--epochs", "1",
                    "--device", "cpu", "--pretrained-file", weights[0], "-o", tmp_path / "m.safetensors")
    assert "does not fit 'resnet10t'" in err and "shape mismatches" in err


@pytest.mark.parametrize("arch", ["cifar_convfc", None])  # None: digits' default, mctool's mlp
def test_mctool_architectures_have_no_pretrained_weights(cli, weights, tmp_path, arch):
    args = ["-d", "digits", "--epochs", "1", "--device", "cpu", *(["--arch", arch] if arch else [])]
    err = cli.error("train", *args, "--pretrained-file", weights[0], "-o", tmp_path / "m.safetensors")
    assert "mctool's own CIFAR-style networks, which have no pretrained weights" in err
    with pytest.raises(ConfigError, match="no pretrained weights"):
        build_pretrained(arch or "mlp", 10, 1)


def test_pretrained_with_init_is_refused(cli, weights, tmp_path):
    err = cli.error("train", *TINY, "--pretrained", "--init", weights[0], "-o", tmp_path / "m.safetensors")
    assert "--init both choose the starting weights" in err


def test_timm_model_without_weights_is_refused_for_hub_weights(cli, tmp_path):
    err = cli.error("train", "-d", "synthetic:size=16,train=8,test=8", "--arch", "resnetblur18", "--pretrained",
                    "--epochs", "1", "--device", "cpu", "-o", tmp_path / "m.safetensors")
    assert "timm has no pretrained weights for 'resnetblur18'" in err and "--pretrained-file" in err


def test_resume_keeps_the_pretrained_provenance(cli, weights, tmp_path, monkeypatch):
    from conftest import ctrl_c_during_epoch

    path, _ = weights
    out = tmp_path / "run.safetensors"
    args = [a for a in TINY if a != "1"]  # all but the epoch count
    args.remove("--epochs")
    restore = ctrl_c_during_epoch(monkeypatch, 2)
    cli.error("train", *args, "--epochs", "2", "--pretrained-file", path, "-o", out, code=130)
    restore()
    other = tmp_path / "other.safetensors"
    other.write_bytes(path.read_bytes())
    err = cli.error("train", *args, "--epochs", "2", "--pretrained-file", other, "-o", out, "--resume")
    assert f"--pretrained-file: {path} -> {other}" in err
    cli("train", *args, "--epochs", "2", "-o", out, "--resume")  # options left out: as recorded
    config = json.loads(read_metadata(out)["config"])
    assert config["pretrained"] is True and config["pretrained_file"] == str(path)
    assert json.loads(read_metadata(out)["inputs"]) == {str(path): sha256_file(path)}


def test_recorded_data_config_is_checked(cli, weights, tmp_path):
    from mctool.models import recorded_data_config

    out = tmp_path / "ft.safetensors"
    cli("train", *TINY, "--pretrained-file", weights[0], "-o", out)
    config = json.loads(read_metadata(out)["config"])
    dc = recorded_data_config(config)
    assert dc == config["pretrained_source"]["data_config"] and dc["input_size"] == [3, 160, 160]
    assert recorded_data_config({}) is None and recorded_data_config({"pretrained_source": None}) is None
    for bad in ({"input_size": [3, 10**9, 160]}, {"mean": [0.5]}, {"std": [0.5, 0.5, 0.0]},
                {"interpolation": "x" * 500}, {"crop_pct": float("nan")}, {"extra": 1}):
        with pytest.raises(ConfigError, match="data_config is not what train --pretrained writes"):
            recorded_data_config({"pretrained_source": {"data_config": {**dc, **bad}}})
