"""Everything read from a file is untrusted: each bad field gets its own error, and nothing is built,
loaded or allocated from a file before its metadata and tensor shapes are checked."""

import json
import re
import struct
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mctool.checkpoint import ModelMeta, load_model, read_checkpoint, save_model
from mctool.curves import Curve, initial_points, line_between, load_curve, save_curve
from mctool.data import load_data
from mctool.ensembles import Ensemble, load_ensemble, save_ensemble
from mctool.errors import CheckpointError, ConfigError, MetricsFileError
from mctool.flat import ParamLayout
from mctool.h5io import read_h5
from mctool.models import REFUSED_KWARGS, build_model

KWARGS = {"img_size": 8, "hidden": 16}


def _meta(**kw) -> ModelMeta:
    base = dict(arch="mlp", num_classes=10, in_chans=1, arch_kwargs=dict(KWARGS), dataset="digits", image_size=8,
                normalization={"mean": [0.3], "std": [0.4]}, config={"wd": 5e-4, "epochs": 1})
    return ModelMeta(**{**base, **kw})


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("mlp", 10, 1, KWARGS)


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "m.safetensors"
    save_model(path, _model(), _meta())
    return path


def _rewrite(path, out, **changes):
    """Copy a safetensors file with metadata fields changed (None removes a field). (Tensors read here are
    cloned: safetensors < 0.8 maps them onto the file, and a test that rewrites that file in place would end
    pytest with a bus error.)"""
    with safe_open(str(path), "pt") as f:
        md, tensors = dict(f.metadata()), {k: f.get_tensor(k).clone() for k in f.keys()}
    for k, v in changes.items():
        md.pop(k, None) if v is None else md.__setitem__(k, v)
    save_file(tensors, str(out), metadata=md)
    return out


def _raw(path, header: dict, data: bytes = b"") -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


@pytest.fixture
def builds(monkeypatch):
    """Records the device of every network built (timm.create_model, or mctool's own architectures built as it
    builds them; 'meta' costs no memory)."""
    import mctool.models

    devices = []
    real = mctool.models._create_model

    def create(*args, **kwargs):
        devices.append(torch.empty(0).device.type)
        return real(*args, **kwargs)

    monkeypatch.setattr(mctool.models, "_create_model", create)
    return devices


@pytest.mark.parametrize("kind, hint", [
    ("fge-state", "it is an interrupted fge run's training state: resume the run with --resume, or take a member"),
    ("curve-state", "it is a curve saved during a connect run: take a network on it with 'mctool point FILE"),
])
def test_a_state_given_as_a_network_names_what_it_is(cli, tmp_path, model_file, kind, hint):
    """(fge has no --save-every: its state is only an interrupted run's)"""
    f = _rewrite(model_file, tmp_path / "s.safetensors", kind=kind)
    err = cli.error("fge", f, "-o", tmp_path / "f.safetensors", "--device", "cpu")
    assert f"holds a '{kind}', not a single network (kind 'model'); {hint}" in err and "--save-every" not in err


# --- arch kwargs never reach timm unchecked ---------------------------------------------------------------

@pytest.mark.parametrize("key", REFUSED_KWARGS)
def test_loading_kwargs_are_refused(key):
    with pytest.raises(ConfigError, match=f"'{key}' is not allowed"):
        build_model("resnet18", 10, 3, {key: "x.pt"})


def test_checkpoint_path_in_a_checkpoint_is_refused_before_timm_sees_it(tmp_path, model_file, builds, monkeypatch):
    torch.save({"w": torch.zeros(1)}, tmp_path / "x.pt")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("a pickle was loaded"))
    bad = _rewrite(model_file, tmp_path / "bad.safetensors",
                   arch_kwargs=json.dumps({**KWARGS, "checkpoint_path": str(tmp_path / "x.pt")}))
    with pytest.raises(CheckpointError, match="arch_kwargs.*checkpoint_path.*not allowed"):
        load_model(bad)
    with pytest.raises(ConfigError, match="pretrained_cfg_overlay"):  # from the caller: ConfigError
        load_model(model_file, arch_kwargs={"pretrained_cfg_overlay": {"file": "x.pt"}})
    assert builds == []


def test_arch_kwargs_option_errors_are_error_lines(cli, tmp_path):
    out = tmp_path / "m.safetensors"
    for kwargs, message in (('{"hidden": -1}', "'hidden' of 'mlp' must be an integer from 1"),
                            ('{"hidden": -5}', "'hidden' of 'mlp' must be an integer from 1"),
                            ('{"img_size": 0}', "'img_size' of 'mlp' must be an integer from 1"),
                            ('{"hidden": "wide"}', "'hidden' of 'mlp' must be an integer"),
                            ('{"depth": true}', "'depth' of 'mlp' must be an integer"),
                            ('{"nope": 1}', "does not accept the arch kwarg 'nope'"),
                            ('{"checkpoint_path": "x.pt"}', "'checkpoint_path' is not allowed")):
        assert message in cli.error("train", "-o", out, "--epochs", "1", "--arch-kwargs", kwargs, "--device", "cpu")
    assert not out.exists()


def test_timm_construction_errors_name_the_arch_and_kwargs():
    with pytest.raises(ConfigError, match=r"'test_vit' cannot be built .*\{\"num_heads\": 0\}.*ZeroDivisionError"):
        build_model("test_vit", 10, 3, {"num_heads": 0})
    try:  # timm >= 1.0.31 refuses a zero image size itself (older timm builds it; mctool refuses it at its first batch)
        build_model("test_vit", 10, 3, {"img_size": 0})
    except ConfigError as e:
        assert re.search(r"'test_vit' cannot be built .*\{\"img_size\": 0\}.*ValueError", str(e)), e
    with pytest.raises(ConfigError, match="'test_vit' cannot be built .*RuntimeError"):
        build_model("test_vit", 10, 3, {"embed_dim": -3})


# --- memory bombs -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [{"hidden": 20000}, {"hidden": 60000, "depth": 3}])
def test_metadata_larger_than_the_file_is_refused_before_allocating(tmp_path, model_file, builds, kwargs):
    bad = _rewrite(model_file, tmp_path / "bad.safetensors", arch_kwargs=json.dumps({**KWARGS, **kwargs}))
    with pytest.raises((CheckpointError, ConfigError), match="does not fit|at most"):
        load_model(bad)
    assert set(builds) <= {"meta"}


@pytest.mark.parametrize("field, value, message", [
    ("arch_kwargs", json.dumps({**KWARGS, "hidden": 10_000_000}), "hidden"),
    ("num_classes", str(10**11), "num_classes"),
    ("in_chans", "100000", "in_chans"),
    ("arch_kwargs", json.dumps({**KWARGS, "img_size": 1 << 20}), "img_size"),
])
def test_huge_sizes_are_refused(tmp_path, model_file, builds, field, value, message):
    bad = _rewrite(model_file, tmp_path / "bad.safetensors", **{field: value})
    with pytest.raises(CheckpointError, match=message):
        load_model(bad)
    assert builds == []


def test_a_network_bigger_than_the_limit_is_refused_on_the_meta_device(builds):
    with pytest.raises(ConfigError, match="mctool builds at most"):
        build_model("mlp", 10, 1, {"img_size": 4096, "hidden": 65536})  # 1.1e12 parameters
    assert builds == ["meta"]


def test_synthetic_data_set_size_is_bounded():
    with pytest.raises(ConfigError, match="too large"):
        load_data("synthetic:size=30000")
    with pytest.raises(ConfigError, match="too large"):
        load_data("synthetic:size=32,train=10000000")


# --- safetensors headers -------------------------------------------------------------------------------------

@pytest.mark.parametrize("entry, message", [
    ({"dtype": "F32", "shape": [2], "data_offsets": [0]}, "data_offsets"),
    ({"dtype": "F32", "shape": [2], "data_offsets": "0-8"}, "data_offsets"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}, "data_offsets"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [0, None]}, "data_offsets"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}, "4 bytes of data"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [0, 1 << 60]}, "bytes of data"),
    ({"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}, "shape"),
    ({"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}, "shape"),
    ({"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}, "dtype"),
    ({"dtype": 4, "shape": [2], "data_offsets": [0, 8]}, "dtype"),
    ({"shape": [2], "data_offsets": [0, 8]}, "needs 'dtype'"),
    ([0, 8], "needs 'dtype'"),
])
def test_malformed_headers(cli, tmp_path, entry, message):
    path = tmp_path / "bad.safetensors"
    _raw(path, {"w": entry}, bytes(8))
    with pytest.raises(CheckpointError, match=message):
        read_checkpoint(path)
    assert "is not a valid safetensors file" in cli.error("info", path)


def test_metadata_must_map_strings_to_strings(tmp_path):
    path = tmp_path / "bad.safetensors"
    _raw(path, {"__metadata__": {"arch": 3}, "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(4))
    with pytest.raises(CheckpointError, match="__metadata__"):
        read_checkpoint(path)


def test_info_reads_no_tensor_data(cli, model_file, monkeypatch):
    import safetensors

    monkeypatch.setattr(safetensors, "safe_open", lambda *a, **k: pytest.fail("tensor data was read"))
    r = cli.json("info", model_file)
    assert r["tensors"]["count"] == 6


# --- metadata fields -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("num_classes", "-3"), ("num_classes", "--10"), ("num_classes", "-"), ("num_classes", "ten"),
    ("num_classes", "1e3"), ("num_classes", ""),
    ("in_chans", "0"), ("image_size", "-8"), ("image_size", "8.5"),
    ("arch_kwargs", json.dumps({**KWARGS, "hidden": -4})), ("arch_kwargs", "[1, 2]"), ("arch_kwargs", "{"),
    ("arch_kwargs", json.dumps({**KWARGS, "hidden": float("nan")})),
    ("config", "[]"), ("config", json.dumps({"wd": "x"})), ("config", json.dumps({"wd": -1})),
    ("config", json.dumps({"epochs": 0})), ("config", json.dumps({"split": ["test"]})),
    ("normalization", "{}"), ("normalization", '"mean"'), ("normalization", json.dumps({"mean": [0.1], "std": [0]})),
    ("normalization", json.dumps({"mean": [0.1], "std": [-1]})),
    ("normalization", json.dumps({"mean": [0.1, 0.2, 0.3], "std": [1, 1, 1]})),
    ("normalization", '{"mean": [NaN], "std": [1]}'), ("normalization", '{"mean": [0], "std": [Infinity]}'),
    ("inputs", "[]"), ("inputs", json.dumps({"a": 1})),
    ("kind", "model\x00"), ("dataset", "digits\n"), ("arch", "mlp\x1b[31m"),
])
def test_bad_metadata_fields_are_named(cli, tmp_path, model_file, field, value):
    bad = _rewrite(model_file, tmp_path / "bad.safetensors", **{field: value})
    with pytest.raises(CheckpointError, match=f"'{field}'"):
        load_model(bad)
    assert f"'{field}'" in cli.error("evaluate", bad, "--device", "cpu")


@pytest.mark.parametrize("field", ["num_classes", "in_chans"])
def test_missing_required_fields(tmp_path, model_file, field):
    bad = _rewrite(model_file, tmp_path / "bad.safetensors", **{field: None})
    with pytest.raises(CheckpointError, match=f"without '{field}'"):
        load_model(bad)


def test_std_of_zero_never_gives_nan_metrics(cli, tmp_path, model_file):
    bad = _rewrite(model_file, tmp_path / "bad.safetensors", normalization=json.dumps({"mean": [0.3], "std": [0.0]}))
    assert "std finite numbers above 0" in cli.error("evaluate", bad, "--device", "cpu")


def test_momentum_that_fits_no_parameter(tmp_path, model_file):
    with safe_open(str(model_file), "pt") as f:
        md, tensors = dict(f.metadata()), {k: f.get_tensor(k).clone() for k in f.keys()}
    w = tensors["net.1.weight"]
    for extra in ({"optimizer/momentum/net.nope": torch.zeros(3)}, {"optimizer/momentum/net.1.weight": torch.zeros(3)},
                  {"optimizer/momentum/net.1.weight": torch.zeros(w.shape, dtype=torch.int32)},  # was a traceback
                  {"optimizer/momentum/net.1.weight": torch.zeros(w.shape, dtype=torch.bool)}):
        path = tmp_path / "state.safetensors"
        save_file({**tensors, **extra}, str(path), metadata={**md, "kind": "train-state"})
        with pytest.raises(CheckpointError, match="momentum tensors that fit no parameter"):
            load_model(path)


# --- curve and ensemble files --------------------------------------------------------------------------------

@pytest.fixture
def curve_file(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_model(a, _model(0), _meta())
    save_model(b, _model(1), _meta())
    line = line_between(load_model(a), load_model(b))
    points = initial_points(line, "bezier", 1, "linear")
    points[1] += 0.01 * torch.randn(points.shape[1], generator=torch.Generator().manual_seed(0))  # off the segment
    curve = Curve("bezier", 1, points, line.layout, line.meta, line.buffers)
    path = tmp_path / "c.safetensors"
    save_curve(path, curve, {"wd": 5e-4})
    return path


@pytest.fixture
def ensemble_file(tmp_path):
    models = [_model(i) for i in range(2)]
    layout = ParamLayout.of(models[0])
    members = torch.stack([layout.flatten(dict(m.named_parameters())) for m in models])
    path = tmp_path / "e.safetensors"
    save_ensemble(path, Ensemble(_meta(), layout, members, [{}, {}]), {})
    return path


@pytest.mark.parametrize("layout", ['{"a": 1}', "[[1, [2]]]", '[["net.1.weight", [-1]]]', '[["w", [2], 3]]',
                                    '[["w", "2"]]', "not json", '[["w", [1]], ["w", [1]]]', '[["w", [true]]]'])
def test_malformed_param_layout(tmp_path, curve_file, ensemble_file, layout):
    for path, load in ((curve_file, load_curve), (ensemble_file, load_ensemble)):
        bad = _rewrite(path, tmp_path / "bad.safetensors", param_layout=layout)
        with pytest.raises(CheckpointError, match="'param_layout'"):
            load(bad)


def test_layout_that_does_not_fit_the_architecture(tmp_path, curve_file):
    with safe_open(str(curve_file), "pt") as f:
        md, tensors = dict(f.metadata()), {k: f.get_tensor(k).clone() for k in f.keys()}
    layout = json.loads(md["param_layout"])
    layout[0][0] = "net.9.weight"
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata={**md, "param_layout": json.dumps(layout)})
    with pytest.raises(CheckpointError, match="do not fit architecture 'mlp'"):
        load_curve(path)


def test_extra_buffer_tensors(cli, tmp_path, curve_file, ensemble_file):
    for path, load, name in ((curve_file, load_curve, "buffers/net.9.running_mean"),
                             (ensemble_file, load_ensemble, "buffers/0/net.9.running_mean"),
                             (ensemble_file, load_ensemble, "buffers/7/x"), (ensemble_file, load_ensemble, "stray")):
        with safe_open(str(path), "pt") as f:
            md, tensors = dict(f.metadata()), {k: f.get_tensor(k).clone() for k in f.keys()}
        bad = tmp_path / "bad.safetensors"
        save_file({**tensors, name: torch.zeros(3)}, str(bad), metadata=md)
        with pytest.raises(CheckpointError, match="buffer|does not hold"):
            load(bad)
    with safe_open(str(curve_file), "pt") as f:
        md, tensors = dict(f.metadata()), {k: f.get_tensor(k).clone() for k in f.keys()}
    bad = tmp_path / "extra.safetensors"
    save_file({**tensors, "buffers/net.9.running_mean": torch.zeros(3)}, str(bad), metadata=md)
    assert "buffer" in cli.error("point", bad, "--t", "0.5", "-o", tmp_path / "p.safetensors", "--device", "cpu")


@pytest.mark.parametrize("field, value", [("curve", "spline"), ("num_bends", "-1"), ("num_bends", "x"),
                                          ("num_bends", "0"), ("num_bends", "100000")])
def test_bad_curve_fields(tmp_path, curve_file, field, value):
    bad = _rewrite(curve_file, tmp_path / "bad.safetensors", **{field: value})
    with pytest.raises(CheckpointError, match=f"'{field}'"):
        load_curve(bad)


@pytest.mark.parametrize("field, value", [("num_members", "0"), ("num_members", "two"), ("member_info", "{}"),
                                          ("member_info", "[1]"), ("member_info", "["),
                                          ("member_info", "[" + ", ".join(["{}"] * 7) + "]")])
def test_bad_ensemble_fields(tmp_path, ensemble_file, field, value):
    bad = _rewrite(ensemble_file, tmp_path / "bad.safetensors", **{field: value})
    with pytest.raises(CheckpointError, match=f"'{field}'"):
        load_ensemble(bad)


def test_a_curve_file_with_stray_tensors_is_refused(tmp_path, curve_file):
    with safe_open(str(curve_file), "pt") as f:
        md, tensors = dict(f.metadata()), {k: f.get_tensor(k).clone() for k in f.keys()}
    bad = tmp_path / "bad.safetensors"
    save_file({**tensors, "junk": torch.zeros(3)}, str(bad), metadata=md)
    with pytest.raises(CheckpointError, match="has tensors a curve file does not hold: junk"):
        load_curve(bad)


def test_integer_control_points_are_refused(tmp_path, curve_file):
    with safe_open(str(curve_file), "pt") as f:
        md, tensors = dict(f.metadata()), {k: f.get_tensor(k).clone() for k in f.keys()}
    bad = tmp_path / "bad.safetensors"
    save_file({**tensors, "control_points": tensors["control_points"].long()}, str(bad), metadata=md)
    with pytest.raises(CheckpointError, match="floating point"):
        load_curve(bad)


# --- HDF5 files ----------------------------------------------------------------------------------------------

def _h5(path, attrs: dict, datasets: dict | None = None):
    with h5py.File(path, "w") as f:
        for k, v in attrs.items():
            f.attrs[k] = v
        for k, v in (datasets or {}).items():
            f[k] = v
    return path


@pytest.mark.parametrize("value, message", [(np.bytes_(b"\xff\xfe"), "UTF-8"), (1 + 2j, "complex"),
                                            (np.array([b"x", b"\xff"]), "UTF-8"), (h5py.Empty("f"), "Empty")])
def test_bad_hdf5_attributes(cli, tmp_path, value, message):
    path = _h5(tmp_path / "bad.h5", {"kind": "plane", "note": value}, {"t": np.zeros(3)})
    with pytest.raises(MetricsFileError, match=f"attribute 'note'.*{message}"):
        read_h5(path)
    assert "attribute 'note'" in cli.error("info", path)
    assert "attribute 'note'" in cli.error("plot", path, "-o", tmp_path / "p.png")


def test_undecodable_string_attribute(cli, tmp_path):
    path = tmp_path / "bad.h5"
    with h5py.File(path, "w") as f:
        f.attrs.create("kind", data=b"\xff\xfe", dtype=h5py.string_dtype("utf-8"))
    assert "UTF-8" in cli.error("info", path)


@pytest.mark.parametrize("kind", [3, np.array([1, 2]), "evaluate-curve\n"])
def test_kind_of_the_wrong_type(cli, tmp_path, kind):
    path = _h5(tmp_path / "bad.h5", {"kind": kind}, {"t": np.zeros(3)})
    assert "cannot draw" in cli.error("plot", path, "-o", tmp_path / "p.png")


@pytest.mark.parametrize("kind, datasets, missing", [
    ("evaluate-curve", {}, "'t'"),
    ("evaluate-curve", {"t": np.zeros(3)}, "'train/loss'"),
    ("evaluate-curve", {"t": np.zeros(3), "train/loss": np.zeros(3)}, "'test/err'"),
    ("evaluate-curve", {"t": np.zeros(3), "train/loss": np.zeros(4), "test/err": np.zeros(3)}, "'train/loss'"),
    ("plane", {"alpha": np.zeros(3), "beta": np.zeros(3), "train/loss": np.zeros((3, 3))}, "'points'"),
    ("plane", {"alpha": np.zeros(3), "beta": np.zeros(3), "train/loss": np.zeros((3, 2)), "test/err": np.zeros((3, 3)),
               "points": np.zeros((3, 2))}, "'train/loss'"),
    ("plane", {"alpha": np.zeros(1), "beta": np.zeros(1), "train/loss": np.zeros((1, 1)), "test/err": np.zeros((1, 1)),
               "points": np.zeros((3, 2))}, "at least 2"),
    ("plane", {"alpha": np.zeros(2), "beta": np.zeros(2), "train/loss": np.zeros((2, 2)), "test/err": np.zeros((2, 2)),
               "points": np.zeros((2, 2))}, "'points'"),
    ("train", {"epoch": np.zeros(3)}, "'train/loss'"),
    ("train", {k: np.zeros(0) for k in ("epoch", "train/loss", "train/err", "test/err", "test/nll")},
     "nothing to draw yet"),  # no epoch done: no longer "shape (0,) ..., got (0,)"
    ("fge", {"epoch": np.zeros(3), "train/loss": np.zeros(3), "train/err": np.zeros(4)}, "'train/err'"),
    ("hessian", {}, "'eigenvalues'"),
    ("hessian", {"eigenvalues": np.zeros(3)}, "'eigenvalues'"),
    ("hessian", {"eigenvalues": np.zeros((0, 2))}, "'eigenvalues'"),
])
def test_plot_needs_the_datasets_of_its_kind(cli, tmp_path, kind, datasets, missing):
    path = _h5(tmp_path / "bad.h5", {"kind": kind, "split": "test"}, datasets)
    assert missing in cli.error("plot", path, "-o", tmp_path / "p.png")


def test_hdf5_datasets_must_be_numbers_in_the_file(cli, tmp_path):
    path = tmp_path / "bad.h5"
    with h5py.File(path, "w") as f:
        f["t"] = np.array([b"a", b"b"])
    assert "not an array of numbers" in cli.error("info", path)
    (tmp_path / "raw.bin").write_bytes(bytes(64))
    with h5py.File(path, "w") as f:
        f.create_dataset("t", (8,), dtype="f8", external=[(str(tmp_path / "raw.bin"), 0, 64)])
    assert "not an array of numbers" in cli.error("info", path)


def test_hdf5_value_count_is_bounded(cli, tmp_path):
    path = tmp_path / "big.h5"
    with h5py.File(path, "w") as f:  # a few KB on disk, 8 GB in memory
        f.create_dataset("t", (1 << 30,), dtype="f8", chunks=(1 << 20,), compression="gzip", fillvalue=0.0)
    assert path.stat().st_size < 1 << 20
    assert "more than" in cli.error("info", path)


def _replace_dataset(path, name, value):
    with h5py.File(path, "r") as f:
        attrs = dict(f.attrs)
        data = {}
        f.visititems(lambda n, o: data.__setitem__(n, o[()]) if isinstance(o, h5py.Dataset) else None)
    data[name] = value
    _h5(path, attrs, data)


@pytest.mark.parametrize("command, args, dataset", [
    ("evaluate-curve", ["--num-points", "2"], "train/loss"),
    ("plane", ["--grid-points", "2", "--curve-points", "3"], "at_points/train/loss"),
])
def test_resume_refuses_datasets_of_the_wrong_shape(cli, tmp_path, curve_file, command, args, dataset):
    metrics = tmp_path / "r.h5"
    cli(command, curve_file, "-m", metrics, *args, "-q", "--device", "cpu")
    _replace_dataset(metrics, dataset, np.zeros(7))
    assert "cannot be resumed" in cli.error(command, curve_file, "-m", metrics, *args, "--resume", "-q",
                                            "--device", "cpu")
    with h5py.File(metrics, "a") as f:
        f.attrs["config"] = "[1]"
    assert "'inputs' and 'config' must be JSON objects" in cli.error(command, curve_file, "-m", metrics, *args,
                                                                     "--resume", "-q", "--device", "cpu")


@pytest.mark.parametrize("arch", ["hf-hub:timm/resnet18.a1_in1k", "local-dir:/tmp", "timm/resnet18"])
def test_architectures_from_hubs_or_folders_are_refused(arch, builds):
    with pytest.raises(ConfigError, match="registry name only"):
        build_model(arch, 10, 3)
    assert builds == []


def _interrupted(cli, tmp_path, monkeypatch, command: list) -> tuple[list, Path]:
    """Run ``command`` for 2 epochs, interrupted in epoch 2; return its arguments and its training state."""
    from conftest import ctrl_c_during_epoch

    args = [*command, "-o", tmp_path / "run.safetensors", "--epochs", "2", "-q", "--device", "cpu"]
    restore = ctrl_c_during_epoch(monkeypatch, 2)
    cli(*args, code=130)
    restore()
    return args, tmp_path / "run.state.safetensors"


@pytest.mark.parametrize("field, value", [("epoch", "-1"), ("epoch", "two"), ("epoch", "3"), ("history", "{}"),
                                          ("history", "[1]"), ("config", "[]"), ("config", '{"arch_kwargs": {}}'),
                                          ("snapshots", "["),
                                          # history: one row of numbers per epoch done (non-numbers crashed the
                                          # metrics file at the next epoch, and every resume after it)
                                          ("history", "[]"), ("history", '[{"epoch": 1}, {"epoch": 2}]'),
                                          ("history", '[{"epoch": 1, "lr": "abc"}]'),
                                          ("history", '[{"epoch": 1, "lr": [0.1]}]'),
                                          ("history", '[{"epoch": 1, "lr": true}]')])
def test_resume_checks_the_training_state(cli, tmp_path, monkeypatch, field, value):
    args, state = _interrupted(cli, tmp_path, monkeypatch, ["train", "-d", "digits", "--arch-kwargs", '{"hidden": 8}'])
    _rewrite(state, state, **{field: value})
    assert f"'{field}'" in cli.error(*args, "--resume")


def test_resume_checks_the_training_state_tensors(cli, tmp_path, monkeypatch):
    args, state = _interrupted(cli, tmp_path, monkeypatch, ["train", "-d", "digits", "--arch-kwargs", '{"hidden": 8}'])
    with safe_open(str(state), "pt") as f:
        md, tensors = dict(f.metadata()), {k: f.get_tensor(k).clone() for k in f.keys()}
    for extra in ({"net.1.weight": torch.zeros(3)}, {"optimizer/momentum/net.1.weight": torch.zeros(3)},
                  {"snapshots/members": torch.zeros(1, 3)}, {"net.9.weight": torch.zeros(3)},
                  # the right shape, the wrong kind of number: loading rounded the weights to whole numbers
                  {"net.1.weight": tensors["net.1.weight"].long()}):
        save_file({**tensors, **extra}, str(state), metadata=md)
        assert "does not fit the network being trained" in cli.error(*args, "--resume")
    assert "'net.1.weight' is int64 where the network has floating point" in cli.error(*args, "--resume")
    # every parameter's momentum is saved; one missing would silently restart from zero
    names = [k for k in tensors if k.startswith("optimizer/momentum/")]
    assert sorted(names) == sorted("optimizer/momentum/" + k for k in tensors
                                   if not k.startswith("optimizer/") and "running" not in k and "num_batches" not in k)
    assert md["momentum_saved"] == "all"
    save_file({k: v for k, v in tensors.items() if k != names[0]}, str(state), metadata=md)
    assert f"has no optimizer momentum for 1 of the network's {len(names)} parameters" in cli.error(*args, "--resume")
    # a state of an earlier version saved no momentum for a parameter that had had no gradient, and says nothing:
    # taken as it is
    legacy = {k: v for k, v in md.items() if k != "momentum_saved"}
    save_file({k: v for k, v in tensors.items() if k != names[0]}, str(state), metadata=legacy)
    cli(*args, "--resume")


def test_fge_resume_checks_its_pending_snapshots(cli, tmp_path, monkeypatch, digits_models):
    # 2 epochs of 12 iterations, cycles of 8: snapshots at 3 and 11, both in epoch 1, pending (a pass is 4)
    args, state = _interrupted(cli, tmp_path, monkeypatch, ["fge", digits_models[0], "--cycle-iters", "8"])
    with safe_open(str(state), "pt") as f:
        md, tensors = dict(f.metadata()), {k: f.get_tensor(k).clone() for k in f.keys()}
    assert tensors["snapshots/pending"].shape[0] == len(json.loads(md["pending_snapshots"])) == 2
    save_file({**tensors, "snapshots/pending": torch.zeros(2, 3)}, str(state), metadata=md)
    assert "does not fit the network being trained" in cli.error(*args, "--resume")
    for bad, expected in (("[", "'pending_snapshots'"), ('{"a": 1}', "'pending_snapshots'"),
                          ("[1]", "'pending_snapshots'"), ("[]", "0 pending snapshot(s) do not match")):
        save_file(tensors, str(state), metadata={**md, "pending_snapshots": bad})
        assert expected in cli.error(*args, "--resume")
    save_file(tensors, str(state), metadata=md)
    cli(*args, "--resume")


def test_connect_resume_checks_the_control_points(cli, tmp_path, monkeypatch, curve_file):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"  # the endpoints curve_file was made from
    args, state = _interrupted(cli, tmp_path, monkeypatch, ["connect", a, b])
    with safe_open(str(state), "pt") as f:
        md, tensors = dict(f.metadata()), {k: f.get_tensor(k).clone() for k in f.keys()}
    for extra in ({"control_points": tensors["control_points"][:2]}, {"optimizer/momentum/free": torch.zeros(2, 3)}):
        save_file({**tensors, **extra}, str(state), metadata=md)
        assert "does not fit this curve" in cli.error(*args, "--resume")
    save_file({k: v for k, v in tensors.items() if k != "optimizer/momentum/free"}, str(state), metadata=md)
    assert "has no optimizer momentum ('optimizer/momentum/free')" in cli.error(*args, "--resume")
    # NaN control points or momentum: the file's fault, not the learning rate's
    for key in ("control_points", "optimizer/momentum/free"):
        bad = tensors[key].clone()
        bad.view(-1)[len(bad.view(-1)) // 2] = float("nan")
        save_file({**tensors, key: bad}, str(state), metadata=md)
        assert f"holds NaN or infinite values in '{key}'" in cli.error(*args, "--resume")


def test_resume_refuses_a_state_of_another_kind(cli, tmp_path, monkeypatch):
    args, state = _interrupted(cli, tmp_path, monkeypatch, ["train", "-d", "digits", "--arch-kwargs", '{"hidden": 8}'])
    for kind in ("model", "curve-state", None):
        _rewrite(state, state, kind=kind)
        assert "is not a training state of this command" in cli.error(*args, "--resume")


def test_train_resume_checks_the_state_is_finite(cli, tmp_path, monkeypatch):
    args, state = _interrupted(cli, tmp_path, monkeypatch, ["train", "-d", "digits", "--arch-kwargs", '{"hidden": 8}'])
    with safe_open(str(state), "pt") as f:
        md, tensors = dict(f.metadata()), {k: f.get_tensor(k).clone() for k in f.keys()}
    key = next(k for k in tensors if k.startswith("optimizer/momentum/"))
    tensors[key].view(-1)[0] = float("inf")
    save_file(tensors, str(state), metadata=md)
    assert f"holds NaN or infinite values in '{key}'" in cli.error(*args, "--resume")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_weights_that_are_not_finite_are_refused(cli, tmp_path, model_file, value):
    """A diverged run's weights gave NaN surfaces, tracebacks (align, hessian) or blamed the learning rate."""
    with safe_open(str(model_file), "pt") as f:
        md, tensors = dict(f.metadata()), {k: f.get_tensor(k).clone() for k in f.keys()}
    tensors["net.1.weight"][0, 0] = value
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=md)
    message = "holds NaN or infinite values in 'net.1.weight'"
    with pytest.raises(CheckpointError, match=message):
        load_model(bad)
    assert message in cli.error("evaluate-curve", model_file, bad, "-m", tmp_path / "e.h5", "--device", "cpu")
    assert message in cli.error("align", model_file, bad, "-o", tmp_path / "b.safetensors", "--device", "cpu")
    assert not (tmp_path / "e.h5").exists()


def test_float64_values_beyond_float32_are_refused_in_models_curves_and_ensembles(cli, tmp_path, model_file,
                                                                                   curve_file):
    """mctool computes in float32: 1e300 in a float64 file became infinity after the finite check (evaluate
    reported loss inf, point wrote infinite weights)."""
    bad = tmp_path / "bad.safetensors"
    for src, key in ((model_file, "net.1.weight"), (curve_file, "control_points")):
        with safe_open(str(src), "pt") as f:
            md, tensors = dict(f.metadata()), {k: f.get_tensor(k).double() if k == key else f.get_tensor(k)
                                               for k in f.keys()}
        tensors[key].view(-1)[0] = 1e300
        save_file(tensors, str(bad), metadata=md)
        assert f"holds values in '{key}' beyond float32's range" in cli.error("point" if key == "control_points"
                                                                             else "evaluate", bad, *(
            ["--t", "0.5", "-o", tmp_path / "p.safetensors"] if key == "control_points" else []), "--device", "cpu")
    ens = tmp_path / "e.safetensors"
    cli("ensemble", model_file, model_file, "-o", ens, "-q", "--device", "cpu")
    with safe_open(str(ens), "pt") as f:
        md, tensors = dict(f.metadata()), {k: f.get_tensor(k).clone() for k in f.keys()}
    tensors["members"] = tensors["members"].double()
    tensors["members"][0, 0] = -1e300
    save_file(tensors, str(bad), metadata=md)
    assert "beyond float32's range" in cli.error("evaluate", bad, "--device", "cpu")
    assert not (tmp_path / "p.safetensors").exists()


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.uint8])
def test_weights_that_are_not_floating_point_are_refused(cli, tmp_path, model_file, dtype):
    """Integer or bool weights were cast without a word (evaluate: 90% error, exit 0)."""
    with safe_open(str(model_file), "pt") as f:
        md, tensors = dict(f.metadata()), {k: f.get_tensor(k).clone() for k in f.keys()}
    tensors["net.1.weight"] = tensors["net.1.weight"].to(dtype)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=md)
    assert "wrong kind of number" in cli.error("evaluate", bad, "--device", "cpu")
