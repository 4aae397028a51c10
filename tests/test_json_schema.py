"""Every command's ``--json`` has the one documented shape: it validates against mctool/schemas/ and its key set is
pinned. Plus: human output prints file names and metadata as they are (no Rich markup, no control characters)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mctool.results import SCHEMA_VERSION, json_schemas

jsonschema = pytest.importorskip("jsonschema")
referencing = pytest.importorskip("referencing")

SCHEMAS = json_schemas()
CPU = ["--device", "cpu"]
COMMON = {"command", "schema_version", "inputs", "outputs", "split", "metrics", "seconds"}
METRIC_NAMES = {"loss", "nll", "err", "ece", "brier"}


def _load(name: str) -> dict:
    return SCHEMAS[name]


@pytest.fixture(scope="module")
def registry():
    from referencing import Registry, Resource

    return Registry().with_resources((d["$id"], Resource.from_contents(d)) for d in SCHEMAS.values())


def check(registry, r: dict, command: str, extra: set[str], outputs: set[str], metric_sets: set[str]) -> dict:
    """Validate ``r`` against the command's schema and pin its keys: the common ones, then the command's own."""
    schema = _load(command)
    jsonschema.Draft202012Validator(schema, registry=registry).validate(r)
    assert set(r) == COMMON | extra and set(schema["required"]) == set(r)
    assert r["command"] == command and r["schema_version"] == SCHEMA_VERSION
    assert set(r["outputs"]) == outputs and set(r["metrics"]) == metric_sets
    for f in [*r["inputs"], *(f for f in r["outputs"].values() if f is not None)]:
        assert set(f) == {"path", "sha256"} and Path(f["path"]).exists()
    for m in r["metrics"].values():
        assert m is None or set(m) == METRIC_NAMES
    return r


def test_schemas_pin_every_key():
    """Every object in every schema lists all its properties as required and allows nothing else."""
    def walk(node):
        if isinstance(node, dict):
            if "properties" in node:
                assert node.get("additionalProperties") is False and set(node["required"]) == set(node["properties"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    names = set(SCHEMAS)
    assert names == {"common", "train", "evaluate", "info", "connect", "evaluate-curve", "point", "ensemble", "plot",
                     "plane", "fge", "merge", "align", "hessian", "surface", "docs"}
    for name in names:
        walk(_load(name))


def test_result_to_json_has_null_for_nan_and_keeps_every_key():
    from mctool.results import FileRef, Metrics, PointResult

    r = PointResult(command="point", outputs={"model": FileRef("p.safetensors", "0" * 64)},
                    metrics={"train": Metrics(loss=float("nan"), err=float("inf")), "eval": None}, seconds=0.5, t=0.5)
    d = json.loads(r.to_json())
    assert d == r.to_dict() and d["metrics"]["train"] == dict.fromkeys(METRIC_NAMES)
    assert list(d)[:7] == ["command", "schema_version", "inputs", "outputs", "split", "metrics", "seconds"]
    assert d["index"] is None and d["outputs"]["model"] == {"path": "p.safetensors", "sha256": "0" * 64}


def test_train(cli, registry, tmp_path):
    out = tmp_path / "m.safetensors"
    r = check(registry, cli.json("train", "-d", "digits", "--arch-kwargs", '{"hidden": 8}', "--epochs", "1",
                                 "--split", "val", "-o", out, *CPU),
              "train", {"arch", "dataset", "epochs", "members"}, {"model", "metrics"}, {"train", "eval"})
    assert r["split"] == "val" and r["outputs"]["metrics"]["path"] == str(tmp_path / "m.h5")
    assert r["metrics"]["eval"]["err"] is not None and r["metrics"]["train"]["nll"] is None
    assert r["members"] is None and r["inputs"] == []


def test_evaluate_and_ensemble(cli, registry, tmp_path, digits_models):
    extra = {"dataset", "samples", "members", "models", "calibration"}
    r = check(registry, cli.json("evaluate", digits_models[0], "-m", tmp_path / "e.h5", *CPU), "evaluate", extra,
              {"ensemble", "metrics"}, {"train", "eval", "calibrated"})
    assert r["members"] == 1 and r["metrics"]["eval"] == r["models"][0]["metrics"]  # one network: itself
    assert r["outputs"]["ensemble"] is None and r["calibration"] is None
    r = check(registry, cli.json("ensemble", *digits_models, "-o", tmp_path / "ens.safetensors", *CPU), "ensemble",
              extra, {"ensemble", "metrics"}, {"train", "eval", "calibrated"})
    assert r["members"] == 2 and r["outputs"]["metrics"] is None and r["metrics"]["eval"]["loss"] is None
    assert [m["path"] for m in r["models"]] == [str(p) for p in digits_models]


def test_info(cli, registry, tmp_path, digits_models):
    extra = {"type", "bytes", "metadata", "tensors", "datasets"}
    r = check(registry, cli.json("info", digits_models[0]), "info", extra, set(), {"train", "eval"})
    assert r["type"] == "safetensors" and r["datasets"] is None and r["split"] is None
    h5 = digits_models[0].with_suffix(".h5")
    r = check(registry, cli.json("info", h5), "info", extra, set(), {"train", "eval"})
    assert r["type"] == "hdf5" and r["tensors"] is None and r["metadata"]["split"] == "test"
    assert r["inputs"][0]["path"] == str(h5)


def test_docs(cli, registry):
    extra = {"documents", "section", "text"}
    r = check(registry, cli.json("docs"), "docs", extra, set(), {"train", "eval"})
    assert r["inputs"] == [] and r["text"] is None and len(r["documents"]) > 10
    r = check(registry, cli.json("docs", "method.md#fge"), "docs", extra, set(), {"train", "eval"})
    assert r["section"] == "fge" and r["text"].startswith("## 6. Fast Geometric Ensembling")


@pytest.fixture(scope="module")
def curve_files(tmp_path_factory, digits_models):
    from conftest import Cli

    folder = tmp_path_factory.mktemp("schema-curve")
    curve = folder / "c.safetensors"
    r = Cli().json("connect", *digits_models, "-o", curve, "--epochs", "1", "--lr", "0.05", *CPU)
    return curve, r


def test_connect(cli, registry, tmp_path, curve_files, digits_models):
    extra = {"curve", "num_bends", "trained", "epochs"}
    r = check(registry, curve_files[1], "connect", extra, {"curve", "metrics"}, {"train", "eval"})
    assert r["trained"] and r["metrics"]["train"]["loss"] is not None and len(r["inputs"]) == 2
    r = check(registry, cli.json("connect", *digits_models, "--curve", "line", "-o", tmp_path / "l.safetensors"),
              "connect", extra, {"curve", "metrics"}, {"train", "eval"})
    assert not r["trained"] and r["metrics"]["train"] is None and r["outputs"]["metrics"] is None


CURVE_KEYS = {"curve", "num_bends", "num_points", "length", "length_ratio", "barrier", "barrier_unaligned", "bump",
              "bump_unaligned"}


def test_evaluate_curve_point_and_plot(cli, registry, tmp_path, curve_files):
    curve = curve_files[0]
    m = tmp_path / "c.h5"
    r = check(registry, cli.json("evaluate-curve", curve, "-m", m, "--num-points", "2", "--bn-batches", "1", *CPU),
              "evaluate-curve", CURVE_KEYS, {"metrics", "plot"}, {"train", "eval"})
    assert set(r["metrics"]["eval"]["err"]) == {"start", "end", "min", "max", "mean", "int"}
    assert r["metrics"]["eval"]["ece"] is None and r["barrier"]["eval"]["err"] is not None
    assert r["barrier_unaligned"] is None and r["bump_unaligned"] is None and r["bump"]["eval"]["err"] >= 0
    r = check(registry, cli.json("point", curve, "--t", "0.5", "--bn-batches", "1", "-o", tmp_path / "p.safetensors",
                                 *CPU), "point", {"t", "index", "bn_recalibrated"}, {"model"}, {"train", "eval"})
    assert r["t"] == 0.5 and r["index"] is None
    r = check(registry, cli.json("plot", m, "-o", tmp_path / "c.png"), "plot", {"kind"},
              {"plot", "html", "vtk", "vtk_points"}, {"train", "eval"})
    assert r["kind"] == "evaluate-curve" and r["split"] is None


def test_evaluate_curve_compare_unaligned(cli, registry, tmp_path, digits_models):
    aligned = tmp_path / "b-aligned.safetensors"
    cli("align", *digits_models, "-o", aligned, "-q", *CPU)
    r = check(registry, cli.json("evaluate-curve", digits_models[0], aligned, "--compare-unaligned", digits_models[1],
                                 "-m", tmp_path / "c.h5", "--num-points", "2", *CPU),
              "evaluate-curve", CURVE_KEYS, {"metrics", "plot"}, {"train", "eval"})
    assert set(r["barrier_unaligned"]) == {"train", "eval"} and r["barrier_unaligned"]["train"]["loss"] is not None
    assert [f["path"] for f in r["inputs"]] == [str(digits_models[0]), str(aligned), str(digits_models[1])]


def test_point_index(cli, registry, tmp_path, digits_models):
    ens = tmp_path / "ens.safetensors"
    cli("ensemble", *digits_models, "-o", ens, "-q", *CPU)
    r = check(registry, cli.json("point", ens, "--index", "1", "-o", tmp_path / "p.safetensors"), "point",
              {"t", "index", "bn_recalibrated"}, {"model"}, {"train", "eval"})
    assert r["index"] == 1 and r["t"] is None and r["split"] is None and r["inputs"][0]["path"] == str(ens)


def test_plane(cli, registry, tmp_path, curve_files):
    r = check(registry, cli.json("plane", curve_files[0], "-m", tmp_path / "p.h5", "--grid-points", "2",
                                 "--bn-batches", "1", "--train-subset", "64", *CPU),
              "plane", {"grid_points", "dx", "dy", "points", "curve_max_offplane"}, {"metrics", "plot"},
              {"train", "eval"})
    assert len(r["metrics"]["train"]["loss"]["at_points"]) == 3 and r["metrics"]["train"]["nll"] is None


def test_merge(cli, registry, tmp_path, curve_files, digits_models):
    shards = [tmp_path / f"s{i}.h5" for i in range(2)]
    for i, s in enumerate(shards):
        cli("plane", curve_files[0], "-m", s, "--grid-points", "2", "--bn-batches", "1", "--train-subset", "64",
            "--shard", f"{i}/2", "-q", *CPU)
    extra = {"kind", "shards"}
    outputs = {"metrics", "plot", "directions"}
    r = check(registry, cli.json("merge", *shards, "-o", tmp_path / "p.h5", "--plot", tmp_path / "p.png"), "merge",
              extra, outputs, {"train", "eval"})
    assert r["kind"] == "plane" and r["shards"] == 2 and r["split"] == "test" and len(r["inputs"]) == 2
    assert len(r["metrics"]["train"]["loss"]["at_points"]) == 3 and r["metrics"]["train"]["nll"] is None
    for i, s in enumerate(shards):
        cli("evaluate-curve", curve_files[0], "-m", s, "--num-points", "2", "--bn-batches", "1", "--shard", f"{i}/2",
            "--force", "-q", *CPU)
    r = check(registry, cli.json("merge", *shards, "-o", tmp_path / "c.h5"), "merge", extra, outputs, {"train", "eval"})
    assert r["kind"] == "evaluate-curve" and r["outputs"]["plot"] is None and r["outputs"]["directions"] is None
    assert set(r["metrics"]["eval"]["err"]) == {"start", "end", "min", "max", "mean", "int"}
    for i, s in enumerate(shards):
        cli("surface", digits_models[0], "-m", s, "--grid-points", "2", "--dims", "1",
            "--bn-batches", "1", "--train-subset", "64", "--shard", f"{i}/2", "--force", "-q", *CPU)
    r = check(registry, cli.json("merge", *shards, "-o", tmp_path / "s.h5"), "merge", extra, outputs, {"train", "eval"})
    assert r["kind"] == "surface" and r["outputs"]["directions"]["path"] == str(tmp_path / "s-directions.safetensors")
    assert len(r["metrics"]["eval"]["err"]["at_points"]) == 1


def test_fge(cli, registry, tmp_path, digits_models):
    r = check(registry, cli.json("fge", digits_models[0], "-o", tmp_path / "f.safetensors", "--epochs", "1",
                                 "--cycle-iters", "4", "--bn-batches", "1", "--swa", tmp_path / "swa.safetensors",
                                 *CPU),
              "fge", {"members", "cycle_iters"}, {"ensemble", "metrics", "swa"},
              {"train", "eval", "start", "last_member", "swa"})
    assert r["members"] >= 1 and r["metrics"]["swa"]["err"] is not None


def test_align(cli, registry, tmp_path, digits_models):
    extra = {"method", "groups", "units", "moved", "sweeps", "objective", "correlation", "distance_before",
             "distance_after"}
    r = check(registry, cli.json("align", *digits_models, "-o", tmp_path / "b.safetensors", *CPU), "align", extra,
              {"model", "metrics"}, {"train", "eval"})
    assert r["method"] == "weights" and r["groups"] == 2 and r["units"] == 64 and r["correlation"] is None
    assert r["sweeps"] >= 1 and r["objective"] is not None and [f["path"] for f in r["inputs"]] == [
        str(p) for p in digits_models]
    r = check(registry, cli.json("align", *digits_models, "-o", tmp_path / "c.safetensors", "--method", "activations",
                                 "--batches", "1", *CPU), "align", extra, {"model", "metrics"}, {"train", "eval"})
    assert r["sweeps"] is None and r["objective"] is None and r["correlation"] is not None


def test_hessian(cli, registry, tmp_path, digits_models):
    extra = {"points_kind", "num_points", "top_k", "parameters", "train_subset", "t", "eigenvalues", "trace",
             "trace_stderr", "hvps"}
    r = check(registry, cli.json("hessian", digits_models[0], "-m", tmp_path / "h.h5", "--top-k", "1",
                                 "--train-subset", "100", *CPU), "hessian", extra, {"metrics", "eigenvectors", "plot"},
              {"train", "eval"})
    assert r["points_kind"] == "model" and r["t"] is None and r["trace"] is None
    assert r["outputs"]["eigenvectors"] is None
    assert r["outputs"]["plot"] is None
    assert r["split"] == "test" and len(r["eigenvalues"]) == 1 and r["hvps"] > 0
    r = check(registry, cli.json("hessian", *digits_models, "-m", tmp_path / "s.h5", "--top-k", "1", "--num-points",
                                 "2", "--trace", "--trace-samples", "2", "--train-subset", "100", "--eigenvectors",
                                 tmp_path / "v.safetensors", "--plot", tmp_path / "s.png", *CPU), "hessian", extra,
              {"metrics", "eigenvectors", "plot"}, {"train", "eval"})
    assert r["t"] == [0.0, 1.0] and len(r["trace"]) == 2 and r["outputs"]["eigenvectors"] is not None
    assert r["outputs"]["plot"]["path"] == str(tmp_path / "s.png")
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    # plot draws it, and the per-epoch files of train
    for f, kind in ((tmp_path / "s.h5", "hessian"), (digits_models[0].with_suffix(".h5"), "train")):
        r = check(registry, cli.json("plot", f, "-o", tmp_path / f"{kind}.png"), "plot", {"kind"},
                  {"plot", "html", "vtk", "vtk_points"}, {"train", "eval"})
        assert r["kind"] == kind and (tmp_path / f"{kind}.png").read_bytes()[:4] == b"\x89PNG"


def test_surface(cli, registry, tmp_path, digits_models):
    extra = {"dims", "directions", "grid_points", "ranges", "direction_norms", "explained_variance_ratio",
             "trajectory_max_error"}
    r = check(registry, cli.json("surface", digits_models[0], "-m", tmp_path / "s.h5", "--grid-points", "2", *CPU),
              "surface", extra, {"metrics", "directions", "plot"}, {"train", "eval"})
    # the network itself is evaluated even when the grid (even G) has no centre point
    assert r["split"] == "test" and r["outputs"]["plot"] is None
    assert r["metrics"]["eval"]["err"]["at_points"][0] is not None and r["explained_variance_ratio"] is None
    r = check(registry, cli.json("surface", digits_models[0], "-m", tmp_path / "l.h5", "--directions",
                                 digits_models[1], "--grid-points", "3", "--plot", tmp_path / "l.png", *CPU),
              "surface", extra, {"metrics", "directions", "plot"}, {"train", "eval"})
    assert r["dims"] == 1 and r["directions"] == "files" and r["outputs"]["plot"] is not None


# Human output prints what came from files and paths as it is.

def test_human_output_escapes_paths_and_metadata(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # short paths: table cells are not wrapped
    odd = Path("a[/]b\x1b[31mc.safetensors")
    out = cli("train", "-d", "digits", "--arch-kwargs", '{"hidden": 8}', "--epochs", "1", "-o", odd, *CPU)
    assert "a[/]b" in out.stderr and "\x1b[31m" not in out.stderr and odd.exists()
    out = cli("info", odd)
    assert "a[/]b" in out.stderr and "\x1b[31m" not in out.stderr
    evil = Path("evil[/].safetensors")  # the file "].safetensors" in the folder "evil["
    evil.parent.mkdir()
    save_file({"w": torch.zeros(2)}, str(evil), metadata={"note": "\x1b[31mred[/] [bold]x\x07", "[/]": "y"})
    out = cli("info", evil)
    assert "\x1b" not in out.stderr and "\x07" not in out.stderr
    assert "\\x1b[31mred[/] [bold]x\\x07" in out.stderr.replace("\n", "")
    assert "evil[/]" in out.stderr
    # error messages too: they name the file
    msg = cli.error("info", "gone\x1b[31m[/].h5")
    assert "\x1b" not in msg and "gone\\x1b[31m[/].h5" in msg


def test_the_json_examples_in_the_docs_follow_the_schemas(registry):
    """Every ```json example of a command's output in docs/ validates against that command's schema (the
    hessian example once showed a split of null). Shortened hashes ("344bd667...") stand for full ones."""
    import re

    docs = Path(__file__).parents[1] / "docs"
    seen = set()
    for md in sorted(docs.glob("*.md")):
        text = md.read_text()
        for block in re.finditer(r"```json\n(.*?)```", text, re.S):
            src = re.sub(r'"(?:[0-9a-f]{6,12})?\.\.\."', '"' + "a" * 64 + '"', block.group(1))
            src = re.sub(r",\s*\.\.\.\s*\]", "]", src).replace("[...]", "[]")  # elided list items
            where = f"{md.name}:{text[:block.start()].count(chr(10)) + 2}"
            doc = json.loads(src)  # every example parses
            if not isinstance(doc, dict) or "command" not in doc:
                continue
            errors = list(jsonschema.Draft202012Validator(_load(doc["command"]), registry=registry).iter_errors(doc))
            assert not errors, f"{where}: {errors[0].message}"
            seen.add(doc["command"])
    assert {"train", "evaluate", "connect", "evaluate-curve", "point", "plane", "align", "hessian", "fge",
            "ensemble"} <= seen


def test_the_schemas_come_with_the_package_and_the_docs_recipe_validates(registry):
    """``mctool.json_schemas()`` reads the schemas from the installed package (no checkout needed), and
    docs/cli.md's recipe validates a command's output with them (and refuses a key too many)."""
    import re

    import mctool

    assert mctool.json_schemas() == SCHEMAS and "common" in SCHEMAS
    assert all(s["$id"] == f"urn:mctool:schema:{SCHEMA_VERSION}:{name}" for name, s in SCHEMAS.items())
    text = (Path(__file__).parents[1] / "docs" / "cli.md").read_text()
    (recipe,) = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "json_schemas" in b]
    example = next(json.loads(re.sub(r'"(?:[0-9a-f]{6,12})?\.\.\."', '"' + "a" * 64 + '"', b))
                   for b in re.findall(r"```json\n(.*?)```", text, re.S) if '"command": "plane"' in b)
    exec(recipe, {"result": example})
    with pytest.raises(jsonschema.ValidationError, match="extra"):
        exec(recipe, {"result": {**example, "extra": 1}})

