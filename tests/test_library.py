"""The Python API's manners: no printing, warnings through ``warnings``, progress only when asked for,
configs left as given; the CLI's choices come from the library."""

import collections
import copy
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import mctool
import mctool.cli
from conftest import ctrl_c_during_epoch
from mctool.align import METHODS as ALIGN_METHODS
from mctool.checkpoint import read_checkpoint
from mctool.curve_training import ConnectConfig, connect
from mctool.curves import BEND_INITS, CURVES, load_curve
from mctool.data import AUGMENTS, SPLITS
from mctool.errors import ConfigError
from mctool.fge import FGEConfig, fge
from mctool.runtime import PRECISIONS
from mctool.schedules import SCHEDULES

CPU = ["--device", "cpu"]


def _tiny_train_config(**kw) -> mctool.TrainConfig:
    return mctool.TrainConfig(**{"dataset": "digits", "arch_kwargs": {"hidden": 8}, "epochs": 1, "lr": 0.05, **kw})


def test_python_train_prints_nothing_warns_and_keeps_its_config(tmp_path, capfd):
    cfg = _tiny_train_config(cuda_graphs=True)  # on a CPU: a warning, then eager steps
    before = copy.deepcopy(cfg)
    with pytest.warns(mctool.MctoolWarning, match="--cuda-graphs needs a CUDA device"):
        r = mctool.train(cfg, tmp_path / "m.safetensors", tmp_path / "m.h5", device="cpu")
    assert capfd.readouterr() == ("", "")  # no progress bars, no warning text
    assert cfg == before  # arch and arch_kwargs were filled in on a copy
    assert cfg.arch is None and cfg.arch_kwargs == {"hidden": 8}
    # the effective config comes back with the result (for Python callers; not in --json)
    assert r.config["arch"] == "mlp" and r.config["arch_kwargs"] == {"hidden": 8, "img_size": 8}
    assert r.config == json.loads(read_checkpoint(tmp_path / "m.safetensors")[1]["config"])
    assert "config" not in r.to_dict()


def test_warnings_can_be_silenced_and_progress_asked_for(tmp_path, capfd, recwarn):
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=mctool.MctoolWarning)
        with mctool.progress():
            mctool.train(_tiny_train_config(cuda_graphs=True), tmp_path / "m.safetensors", tmp_path / "m.h5",
                         device="cpu")
    out, err = capfd.readouterr()
    assert out == "" and "train" in err and "Warning" not in err
    assert not [w for w in recwarn if issubclass(w.category, mctool.MctoolWarning)]
    # quiet wins over progress()
    with mctool.progress():
        mctool.train(_tiny_train_config(), tmp_path / "q.safetensors", tmp_path / "q.h5", device="cpu", quiet=True)
    assert capfd.readouterr() == ("", "")


def test_progress_in_a_log_is_plain_lines(cli, tmp_path, monkeypatch):
    """stderr a file or pipe (a batch job): no bar drawn once at the end, but lines with each task's count,
    throttled by MCTOOL_LOG_EVERY (here 0: every step), and one at the end."""
    m = tmp_path / "e.h5"
    args = ["evaluate-curve", *(tmp_path / f"{s}.safetensors" for s in "ab"), "-m", m, "--num-points", "3",
            "--points-per-pass", "1", "--device", "cpu"]
    for s in "ab":
        cli("train", "-d", "digits", "--epochs", "2", "--seed", "ab".index(s), "-o", tmp_path / f"{s}.safetensors",
            "--arch-kwargs", '{"hidden": 8}', "-q", "--device", "cpu")
    monkeypatch.setenv("MCTOOL_LOG_EVERY", "0")
    lines = [line for line in cli(*args).stderr.splitlines() if line.startswith("[0:")]
    assert [line.split("] ", 1)[1].split(" t=")[0] for line in lines] == [f"evaluate-curve {i}/3" for i in (1, 2, 3)]
    assert "train loss" in lines[0] and "test err" in lines[0]
    monkeypatch.setenv("MCTOOL_LOG_EVERY", "1000")  # only the end
    lines = [line for line in cli(*args, "--force").stderr.splitlines() if line.startswith("[0:")]
    assert len(lines) == 1 and "evaluate-curve 3/3" in lines[0]
    # FORCE_COLOR (CI systems set it for coloured logs) makes Rich take the log for a terminal: still lines,
    # not redrawn bars (cursor movements); Rich's TTY_INTERACTIVE=0 too
    for env in ("FORCE_COLOR", "TTY_INTERACTIVE"):
        monkeypatch.setenv(env, "1" if env == "FORCE_COLOR" else "0")
        err = cli(*args, "--force").stderr
        lines = [line for line in err.splitlines() if line.startswith("[0:")]
        assert len(lines) == 1 and "evaluate-curve 3/3" in lines[0] and "\x1b[?25l" not in err and "\r" not in err
    # TTY_INTERACTIVE=1 alone: Rich would draw the bars once, at the end, on a log it does not take for a terminal
    monkeypatch.delenv("FORCE_COLOR")
    monkeypatch.setenv("TTY_INTERACTIVE", "1")
    lines = [line for line in cli(*args, "--force").stderr.splitlines() if line.startswith("[0:")]
    assert len(lines) == 1 and "evaluate-curve 3/3" in lines[0]
    monkeypatch.setenv("MCTOOL_LOG_EVERY", "soon")
    m.unlink()
    assert "MCTOOL_LOG_EVERY='soon'" in cli.error(*args) and not m.exists()  # refused before any file


def test_cli_prints_each_warning_as_one_line_every_time(cli, tmp_path):
    for name in ("a", "b"):  # the second run warns too (no once-per-process filtering)
        r = cli("train", "-d", "digits", "--arch-kwargs", '{"hidden": 8}', "--epochs", "1", "--cuda-graphs", "-q",
                "-o", tmp_path / f"{name}.safetensors", *CPU)
        lines = [line for line in r.stderr.splitlines() if line.startswith("Warning: ")]
        assert lines == ["Warning: --cuda-graphs needs a CUDA device; training runs eagerly on the CPU."]


def test_connect_and_fge_keep_their_configs(tmp_path, digits_models):
    a, b = digits_models
    cc = ConnectConfig(epochs=2, dataset=None)
    before = copy.deepcopy(cc)
    r = connect(cc, a, b, tmp_path / "c.safetensors", tmp_path / "c.h5", device="cpu")
    assert cc == before  # the data set (and any other default) was taken from A on a copy
    assert r.config["dataset"] == "digits" and r.config["epochs"] == 2
    assert r.config == json.loads(read_checkpoint(tmp_path / "c.safetensors")[1]["config"])

    fc = FGEConfig(epochs=1, cycle_iters=4, lr_max=0.05, lr_min=0.005, wd=None, dataset=None)
    before = copy.deepcopy(fc)
    r = fge(fc, a, tmp_path / "f.safetensors", tmp_path / "f.h5", device="cpu")
    assert fc == before  # wd and dataset were taken from the start network on a copy
    assert r.config["wd"] == 5e-4 and r.config["dataset"] == "digits"


def test_connect_line_from_python_needs_no_num_bends(tmp_path, digits_models):
    """ConnectConfig(curve="line") failed with 'a line has no bends; use --num-bends 0' (the CLI set it)."""
    r = connect(ConnectConfig(curve="line"), *digits_models, tmp_path / "l.safetensors", tmp_path / "l.h5",
                device="cpu")
    assert (r.curve, r.num_bends) == ("line", 0)
    assert connect(ConnectConfig(epochs=1), *digits_models, tmp_path / "c.safetensors", tmp_path / "c.h5",
                   device="cpu", quiet=True).num_bends == 1
    with pytest.raises(ConfigError, match="a line has no bends"):
        ConnectConfig(curve="line", num_bends=2).validate()


def test_cli_choices_are_the_library_tuples():
    for enum, values in [(mctool.cli.Precision, PRECISIONS), (mctool.cli.Split, SPLITS),
                         (mctool.cli.Schedule, SCHEDULES), (mctool.cli.Augment, AUGMENTS),
                         (mctool.cli.CurveKind, CURVES), (mctool.cli.BendInit, BEND_INITS),
                         (mctool.cli.AlignMethod, ALIGN_METHODS)]:
        assert tuple(m.value for m in enum) == values


def test_connect_resumes_a_state_that_calls_bend_init_init(cli, tmp_path, digits_models, monkeypatch):
    args = [*digits_models, "--epochs", "3", "--lr", "0.05", "--bend-init", "start", "-q", *CPU]
    ref = tmp_path / "ref.safetensors"
    cli("connect", *args, "-o", ref)
    out = tmp_path / "run.safetensors"
    restore = ctrl_c_during_epoch(monkeypatch, 2)
    cli.error("connect", *args, "-o", out, code=130)
    restore()
    # rewrite the state as mctool 0.1.0 wrote it: the bend initialisation under the name "init"
    state = tmp_path / "run.state.safetensors"
    tensors, md = read_checkpoint(state)
    config = json.loads(md["config"])
    config["init"] = config.pop("bend_init")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(state), {**md, "config": json.dumps(config)})
    # the old name is understood, so a different --bend-init is still refused
    other = [*digits_models, "--epochs", "3", "--lr", "0.05", "--bend-init", "end", "-q", *CPU]
    assert "--bend-init: start -> end" in cli.error("connect", *other, "-o", out, "--resume")
    cli("connect", *args, "-o", out, "--resume")
    assert torch.equal(load_curve(ref)[0].points, load_curve(out)[0].points)
    assert json.loads(read_checkpoint(out)[1]["config"])["bend_init"] == "start"


def test_method_citations_point_at_existing_sections():
    import re
    from pathlib import Path

    root = Path(__file__).parents[1]
    anchors = set(re.findall(r'<a id="([\w-]+)"></a>', (root / "docs" / "method.md").read_text()))
    files = [*root.glob("mctool/*.py"), *root.glob("docs/*.md"), root / "README.md"]
    cited = {(f.name, a) for f in files for a in re.findall(r"method\.md#([\w-]+)", f.read_text())}
    assert {"curves", "fge"} <= {a for _, a in cited}
    assert not [(f, a) for f, a in cited if a not in anchors]
    assert not [f.name for f in files if "paper" + "-notes" in f.read_text()]  # external notes; split name


# The CLI's options repeat the library's defaults; these differ on purpose (parsed or resolved differently).
_CLI_ONLY = {("train", "arch_kwargs"), ("connect", "num_bends"), ("point", "t"), ("point", "index"),
             ("point", "no_bn_update"), ("surface_cmd", "directions"), ("surface_cmd", "ignore"),
             ("surface_cmd", "range_"), *(("plane_cmd", m) for m in ("margin", "margin_left", "margin_right",
                                                                      "margin_bottom", "margin_top"))}


@pytest.mark.parametrize("command, library", [
    ("train", ["mctool.training:train", "mctool.training:TrainConfig"]),
    ("connect", ["mctool.curve_training:connect", "mctool.curve_training:ConnectConfig"]),
    ("fge_cmd", ["mctool.fge:fge", "mctool.fge:FGEConfig"]),
    ("evaluate_curve", ["mctool.curve_eval:evaluate_curve"]), ("point", ["mctool.curve_eval:export_point"]),
    ("plane_cmd", ["mctool.plane:plane"]), ("surface_cmd", ["mctool.surface:surface"]),
    ("hessian_cmd", ["mctool.hessian:hessian"]), ("align_cmd", ["mctool.align:align"]),
    ("evaluate", ["mctool.ensemble_eval:evaluate_models"]), ("ensemble", ["mctool.ensemble_eval:evaluate_models"]),
    ("merge_cmd", ["mctool.merge:merge"]), ("plot", ["mctool.plots:plot_files"]),
])
def test_cli_defaults_are_the_library_defaults(command, library):
    """Every option's default on the command line is the library's (a Python caller gets the same run)."""
    import dataclasses
    import enum
    import importlib
    import inspect

    lib: dict = {}
    for spec in library:
        module, name = spec.split(":")
        obj = getattr(importlib.import_module(module), name)
        if dataclasses.is_dataclass(obj):
            lib |= {f.name: f.default for f in dataclasses.fields(obj) if f.default is not dataclasses.MISSING}
        else:
            lib |= {n: p.default for n, p in inspect.signature(obj).parameters.items()
                    if p.default is not inspect.Parameter.empty}
    checked = 0
    for name, p in inspect.signature(getattr(mctool.cli, command)).parameters.items():
        if p.default is inspect.Parameter.empty or name in ("as_json", "quiet", "force") \
                or (command, name) in _CLI_ONLY:
            continue
        default = p.default.value if isinstance(p.default, enum.Enum) else p.default
        assert name in lib, f"{command} --{name} has no library counterpart"
        assert lib[name] == default, f"{command} --{name}: CLI {default!r}, library {lib[name]!r}"
        checked += 1
    assert checked >= 1


def test_public_annotations_take_what_the_functions_take():
    """The package ships py.typed, so a user's type checker goes by these annotations: file lists are covariant
    sequences of str or Path (a list[str] or list[Path] variable, a tuple), files and data roots take a Path, and
    Curve.network takes the Data of load_data as its docstring says."""
    import inspect

    from mctool.curves import Curve

    public = {n: getattr(mctool, n) for n in mctool.__all__ if inspect.isfunction(getattr(mctool, n))}
    checked = 0
    for name, fn in public.items():
        for p in inspect.signature(fn).parameters.values():
            ann = str(p.annotation)
            if p.name in ("paths", "files", "trajectory") or (p.name == "directions" and name == "surface"):
                assert "Sequence[str | Path]" in ann and "list[" not in ann, (name, p.name, ann)
                checked += 1
            elif p.name in ("data_root", "metrics", "output") and "str" in ann:
                assert "Path" in ann or "PathLike" in ann, (name, p.name, ann)
                checked += 1
    assert checked >= 20
    assert "Data" in str(inspect.signature(Curve.network).parameters["data"].annotation)


def test_every_option_is_in_the_command_reference_and_nothing_else_is():
    """docs/cli.md's table of each command lists every option of its --help (by one of its names), and no option
    the command does not have."""
    import re
    from pathlib import Path

    import typer.main

    text = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    sections = dict(re.findall(r"^## (\S+)\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M))
    for name, command in typer.main.get_command(mctool.cli.app).commands.items():
        assert name in sections, f"docs/cli.md has no section '## {name}'"
        cells = " ".join(row.split("|")[1] for row in sections[name].splitlines() if row.startswith("| `"))
        documented = set(re.findall(r"(?<![\w-])(--[a-z0-9][a-z0-9-]*|-[a-zA-Z])\b", cells))
        options = [p.opts + p.secondary_opts for p in command.params  # (an argument's name has no dash)
                   if p.opts and p.opts[0].startswith("-") and "--help" not in p.opts]
        for names in options:
            assert documented & set(names), f"{name}: {'/'.join(names)} is not in docs/cli.md"
        known = {o for names in options for o in names}
        assert documented <= known, f"{name}: docs/cli.md lists {sorted(documented - known)}, which it lacks"


def test_one_file_given_as_a_string_or_path_is_one_file(tmp_path, digits_models):
    """A str where a list of files is expected was split into characters ("checkpoint 'a' does not exist",
    "not 13 files"); one str or Path is one file, anything else a ConfigError."""
    a = digits_models[0]
    assert mctool.evaluate(str(a), device="cpu").members == 1
    assert mctool.evaluate(a, device="cpu").members == 1  # a Path: was a TypeError
    # any sequence of names, as the annotation (Sequence[str | Path]) says
    assert mctool.evaluate(collections.UserList([a]), device="cpu").members == 1
    r = mctool.surface(a, tmp_path / "s.h5", directions=str(digits_models[1]), ignore="bn", grid_points=2,
                       device="cpu")
    assert r.dims == 1 and r.directions == "files"
    with pytest.raises(mctool.ConfigError, match="paths must be a list of file names, got int"):
        mctool.evaluate(3, device="cpu")
    with pytest.raises(mctool.ConfigError, match="files must be a list of file names"):
        mctool.plot_files({"a": 1}, tmp_path / "x.png")


def test_numpy_numbers_and_paths_are_taken_and_recorded_as_plain_json(tmp_path):
    """A sweep's ``np.int64`` / ``np.float32`` and ``pathlib.Path`` arguments passed the checks and then failed
    with json's TypeError when the config was written (``evaluate`` after writing its metrics file)."""
    import numpy as np

    first = mctool.train(_tiny_train_config(seed=np.int64(3), batch_size=np.int64(64), lr=np.float32(0.05)),
                         tmp_path / "a.safetensors", device="cpu")
    assert first.config["seed"] == 3 and type(first.config["seed"]) is int
    config = json.loads(read_checkpoint(tmp_path / "a.safetensors")[1]["config"])
    assert (config["seed"], config["batch_size"]) == (3, 64) and config["lr"] == pytest.approx(0.05, rel=1e-7)
    mctool.train(_tiny_train_config(seed=4, init=tmp_path / "a.safetensors"), tmp_path / "b.safetensors",
                 device="cpu")
    recorded = json.loads(read_checkpoint(tmp_path / "b.safetensors")[1]["config"])
    assert recorded["init"] == str(tmp_path / "a.safetensors")
    ens = mctool.evaluate([tmp_path / "a.safetensors", tmp_path / "b.safetensors"], metrics=tmp_path / "e.h5",
                          output=tmp_path / "e.safetensors", device="cpu")
    assert json.loads(ens.to_json())["outputs"]["ensemble"]["path"] == str(tmp_path / "e.safetensors")
    curve = mctool.evaluate_curve([tmp_path / "a.safetensors", tmp_path / "b.safetensors"], tmp_path / "c.h5",
                                  num_points=np.int64(3), device="cpu")
    assert curve.num_points == 3 and json.loads(mctool.read_h5(tmp_path / "c.h5")[1]["config"])["num_points"] == 3
    # numpy seeds reach torch.Generator.manual_seed, which takes no numpy.int64 (a TypeError in surface, align
    # and connect's random t)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    mctool.surface(a, tmp_path / "s.h5", dims=1, grid_points=np.int64(3), seed=np.int64(3), device="cpu")
    mctool.align(a, b, tmp_path / "al.safetensors", seed=np.int64(1), device="cpu")
    mctool.connect(mctool.ConnectConfig(epochs=1, seed=np.int64(2)), a, b, tmp_path / "con.safetensors", device="cpu")
    mctool.hessian([a], tmp_path / "h.h5", top_k=1, train_subset=64, seed=np.int64(4), device="cpu")


def test_training_keeps_the_callers_random_state_and_threads_take_turns(tmp_path):
    """train (likewise connect and fge) seeds torch's global generator: the caller's draws after a call are
    those without it, and two threads' runs give the weights each gives alone."""
    from concurrent.futures import ThreadPoolExecutor

    torch.manual_seed(1234)
    mctool.train(_tiny_train_config(seed=5), tmp_path / "r.safetensors", device="cpu")
    after = torch.rand(4)
    torch.manual_seed(1234)
    assert torch.equal(after, torch.rand(4))

    def run(seed: int, tag: str) -> dict:
        mctool.train(_tiny_train_config(seed=seed, epochs=2), tmp_path / f"{tag}{seed}.safetensors", device="cpu")
        return read_checkpoint(tmp_path / f"{tag}{seed}.safetensors")[0]

    alone = [run(seed, "alone") for seed in (0, 1)]
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(run, (0, 1), ("together",) * 2))
    for a, b in zip(alone, together):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ctrl_c_is_a_keyboard_interrupt_that_except_exception_lets_through(tmp_path, monkeypatch):
    """A loop over runs with ``except Exception`` must stop at Ctrl-C, not go on to the next run."""
    assert issubclass(mctool.Interrupted, KeyboardInterrupt) and not issubclass(mctool.Interrupted, Exception)
    ctrl_c_during_epoch(monkeypatch, epoch=2)
    finished = []
    with pytest.raises(mctool.Interrupted, match="1 completed epoch"):
        for seed in (1, 2):
            try:
                mctool.train(_tiny_train_config(seed=seed, epochs=3), tmp_path / f"s{seed}.safetensors", device="cpu")
                finished.append(seed)
            except Exception:  # noqa: BLE001  (what a sweep does)
                finished.append(-seed)
    assert finished == []


@pytest.mark.parametrize("call, message", [
    (lambda: mctool.train({"epochs": 1}, "x.safetensors"), "takes a mctool.TrainConfig"),
    (lambda: mctool.connect(_tiny_train_config(), "a", "b", "c"), "takes a mctool.ConnectConfig"),
    (lambda: mctool.train(mctool.TrainConfig(dataset=None), "x.safetensors"), "--dataset must name"),
    (lambda: mctool.train(_tiny_train_config(), "x.safetensors", device=None), "--device must be"),
    (lambda: mctool.load_data("digits", device="mps"), "--device must be"),
    (lambda: mctool.load_data(None), "data set must be named"),
    (lambda: mctool.paper_factor(0, 0), "epochs must be >= 1"),
    (lambda: mctool.lr_at("cosine", 0.1, 0, 10, 0, 0), "iters_per_epoch must be >= 1"),
    (lambda: mctool.progress("no").__enter__(), "True or False"),
    (lambda: mctool.predict_probs(torch.nn.Linear(64, 10), mctool.load_data("digits")), "give a split"),
    (lambda: mctool.predict_probs(torch.nn.Linear(64, 10), mctool.load_data("digits").eval, device="cuda"),
     "the model is on cpu"),
    # arguments of the wrong type: a ConfigError that names them, not a TypeError or AttributeError from inside
    (lambda: mctool.train(_tiny_train_config(), 5), r"train\(\): output must be a file name .* got 5"),
    (lambda: mctool.load_model(None), r"load_model\(\): path must be a file name"),
    (lambda: mctool.read_h5(None), r"read_h5\(\): path must be a file name"),
    (lambda: mctool.load_data("digits", root=3), r"load_data\(\): root must be a file name .* or None, got 3"),
    (lambda: mctool.evaluate_curve(["a.safetensors"], "c.h5", resume="no"), r"resume must be True or False"),
    (lambda: mctool.evaluate(["a.safetensors", 5], device="cpu"), r"paths must be a list of file names .* holds 5"),
    (lambda: mctool.plot_files(collections.UserList(["a.h5", None])), r"files must be a list .* holds None"),
    (lambda: mctool.train(_tiny_train_config(), "x.safetensors", force=1), r"force must be True or False, got 1"),
    (lambda: mctool.read_docs(5), r"read_docs\(\) takes a page or section name"),
    (lambda: mctool.save_model("x.safetensors", torch.nn.Linear(2, 2), None), "takes a mctool.ModelMeta"),
    (lambda: mctool.predict_probs(torch.nn.Flatten(), mctool.load_data("digits").eval), "with parameters"),
    (lambda: mctool.nll(torch.full((2, 3), 1 / 3), torch.tensor([0.0, 1.0])), "labels must be whole numbers"),
    (lambda: mctool.error(torch.full((2, 3), 1 / 3), torch.tensor([0, 3])), r"labels must be in \[0, 3\)"),
    (lambda: mctool.error(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)), "no images"),
    (lambda: mctool.brier(torch.full((3,), 1 / 3), torch.tensor([0])), r"must be a floating point \[N, C\]"),
    (lambda: mctool.ece(torch.full((2, 3), 1 / 3), torch.tensor([0, 1]), bins=0), "bins must be >= 1"),
    (lambda: mctool.paper_factor(-5, 10), "epoch must be >= 0"),
])
def test_wrong_python_arguments_are_config_errors(tmp_path, monkeypatch, call, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=message):
        call()


def test_metrics_take_numpy_arrays():
    probs, labels = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]), np.array([0, 1, 1])
    assert mctool.error(probs, labels) == pytest.approx(1 / 3)
    assert mctool.nll(probs, labels) == pytest.approx(-np.log([0.9, 0.8, 0.4]).mean())


def test_save_model_refuses_an_existing_file_unless_forced(tmp_path, digits_models):
    loaded = mctool.load_model(digits_models[0])
    out = tmp_path / "m.safetensors"
    mctool.save_model(out, loaded.model, loaded.meta)
    before = out.read_bytes()
    other = mctool.load_model(digits_models[1])
    with pytest.raises(mctool.OutputError, match="already exists"):
        mctool.save_model(out, other.model, other.meta)
    assert out.read_bytes() == before
    mctool.save_model(out, other.model, other.meta, force=True)
    assert torch.equal(mctool.load_model(out).model.state_dict()["net.1.weight"],
                       other.model.state_dict()["net.1.weight"])


def test_library_calls_leave_the_callers_state_as_it_was(tmp_path, digits_models):
    """A notebook's state after a call is its own: the matplotlib backend and pyplot's figures, each module's
    train/eval mode (BatchNorm frozen while the rest fine-tunes), torch's default dtype (float64 for curvature
    work: mctool still builds and evaluates float32 networks, in every thread), Python's generator at import."""
    import subprocess

    import matplotlib
    import matplotlib.pyplot as plt

    backend, figures = matplotlib.get_backend(), plt.get_fignums()
    matplotlib.use("svg")
    try:
        h5 = tmp_path / "c.h5"
        mctool.evaluate_curve(digits_models, h5, num_points=3, device="cpu")
        mctool.plot_files([h5], tmp_path / "c.png")
        assert matplotlib.get_backend() == "svg" and plt.get_fignums() == figures
    finally:
        matplotlib.use(backend)

    model = mctool.build_model("mlp", 10, 1, {"img_size": 8, "hidden": 16, "batch_norm": True}).train()
    frozen = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert frozen
    for m in frozen:
        m.eval()
    modes = [m.training for m in model.modules()]
    split = mctool.load_data("digits").eval
    mctool.predict_probs(model, split)
    assert [m.training for m in model.modules()] == modes
    hook = model.register_forward_hook(lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        mctool.predict_probs(model, split)
    hook.remove()
    assert [m.training for m in model.modules()] == modes

    expected = mctool.evaluate([digits_models[0]], device="cpu").metrics["eval"].nll
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        loaded = mctool.load_model(digits_models[0])
        assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
        assert mctool.evaluate([digits_models[0]], device="cpu").metrics["eval"].nll == expected
        assert torch.get_default_dtype() == torch.float64
        # calls in several threads at once: float32 while any runs (the default is the process's), the caller's
        # again when the last one returns
        from concurrent.futures import ThreadPoolExecutor

        def load(_):
            return {p.dtype for p in mctool.load_model(digits_models[0]).model.parameters()}

        with ThreadPoolExecutor(3) as pool:
            assert set().union(*pool.map(load, range(60))) == {torch.float32}
        assert torch.get_default_dtype() == torch.float64
    finally:
        torch.set_default_dtype(dtype)

    code = ("import random; random.seed(1); a = random.random(); random.seed(1); import mctool; "
            "assert random.random() == a")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)


def test_align_leaves_no_thread_behind(tmp_path, digits_models):
    """torch.fx's interpreter made a tqdm bar, whose monitor thread stayed for the rest of the process (in a
    process of its own: another test's tqdm bar may have started the thread here)."""
    import subprocess

    code = (f"import threading, mctool; a, b = {str(digits_models[0])!r}, {str(digits_models[1])!r}\n"
            "for m in ('weights', 'activations'):\n"
            f"    mctool.align(a, b, {str(tmp_path)!r} + f'/{{m}}.safetensors', method=m, device='cpu', quiet=True)\n"
            "print([t.name for t in threading.enumerate()])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert done.returncode == 0 and done.stdout.strip() == "['MainThread']", done.stdout + done.stderr


def test_ctrl_c_in_any_long_call_is_interrupted(digits_models, monkeypatch):
    """The docs promise mctool.Interrupted for a Ctrl-C in a long call, also where nothing was saved to say."""
    import mctool.ensemble_eval

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(mctool.ensemble_eval, "predict_logits", ctrl_c)
    with pytest.raises(mctool.Interrupted, match=r"interrupted \(Ctrl-C\)"):
        mctool.evaluate([digits_models[0]], device="cpu")


def test_file_info_refuses_a_negative_listing_length(digits_models):
    with pytest.raises(ConfigError, match="max_tensors must be >= 0"):
        mctool.file_info(digits_models[0], max_tensors=-1)
    assert mctool.file_info(digits_models[0], max_tensors=0).tensors["first"] == []


def test_a_curve_network_in_memory_is_the_exported_point(tmp_path):
    """``Curve.network(t, data)`` is what ``export_point`` writes, BatchNorm statistics included; without data
    it keeps the start network's statistics."""
    kw = {"hidden": 16, "batch_norm": True}
    ends = [tmp_path / f"n{seed}.safetensors" for seed in (1, 2)]
    for seed, end in zip((1, 2), ends):
        mctool.train(_tiny_train_config(seed=seed, arch_kwargs=kw), end, device="cpu")
    connect(ConnectConfig(curve="line"), *ends, tmp_path / "l.safetensors", device="cpu")
    mctool.export_point(tmp_path / "l.safetensors", 0.25, tmp_path / "p.safetensors", device="cpu")
    curve = load_curve(tmp_path / "l.safetensors")[0]
    digits = mctool.load_data("digits", augment=curve.meta.train_augment(), **curve.meta.data_options())
    got = curve.network(0.25, digits).state_dict()
    want = mctool.load_model(tmp_path / "p.safetensors").model.state_dict()
    assert got.keys() == want.keys()
    for k in got:  # the same arithmetic in the same order: equal
        assert torch.equal(got[k], want[k]), k
    plain = curve.network(0.25).state_dict()
    start = mctool.load_model(ends[0]).model.state_dict()
    stats = [k for k in plain if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(plain[k], start[k]) for k in stats)
    assert not all(torch.equal(got[k], start[k]) for k in stats)
    with pytest.raises(ConfigError, match="t must be in"):
        curve.network(1.5)
    with pytest.raises(ConfigError, match="got None"):
        curve.network(None)


def test_a_process_forked_while_another_thread_trains_can_train(tmp_path):
    """The lock that makes train/connect/fge take turns: a child forked while a thread held it would wait for
    that thread, which the child does not have, forever."""
    import os
    import threading

    from mctool import runtime

    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with runtime._TRAINING:
            held.set()
            release.wait(30)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert held.wait(30)
        pid = os.fork()
        if pid == 0:  # the child: only the lock, no torch work
            os._exit(0 if runtime._TRAINING.acquire(timeout=10) else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        release.set()
        thread.join()


def test_a_dumb_terminal_gets_the_logs_lines(monkeypatch):
    """TERM=dumb (Emacs' shell, some IDE consoles) cannot redraw: Rich draws its bars there only once, at the end
    of the run, which showed nothing for hours; such a terminal gets the progress lines of a log."""
    import io

    from rich.console import Console

    from mctool.console import _live

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("TTY_INTERACTIVE", raising=False)
    monkeypatch.setattr("sys.stderr", Tty())
    for term, live in (("xterm-256color", True), ("dumb", False)):
        monkeypatch.setenv("TERM", term)
        assert _live(Console(file=sys.stderr)) is live, term
