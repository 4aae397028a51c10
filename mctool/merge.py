"""``mctool merge``: the shard files of one ``plane``, ``surface`` or ``evaluate-curve`` run (``--shard I/N``)
combined into the file the whole run writes (docs/distributed.md#sharding-without-a-launcher---shard-and-merge).

The shards must be of one run: the same kind, inputs (with their sha256), options and number of shards N,
each shard 0..N-1 given once, and every value computed in exactly one of them. The merged file is written by
the same function as the command's own file, so it holds the same datasets and attributes (its config has no
``shard``), plus ``merged_from``: the shard files and their sha256. A surface's directions file (the same in
every shard: the directions depend only on the inputs and options) is copied from shard 0's beside the output.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from . import distributed
from .curve_eval import curve_metric_names, curve_metrics, curve_summary, write_curve_file
from .errors import ConfigError, MetricsFileError
from .fileio import being_written, check_outputs, holds_output_locks, same_inputs
from .h5io import json_attr, metrics_file, provenance
from .options import file_list, setting_name, show_setting
from .checkpoint import read_checkpoint, save_checkpoint
from .plane import grid_metrics, grid_summary, plane_metric_names, write_plane_file
from .points import parse_shard
from .surface import directions_path, write_surface_file
from .results import FileRef, MergeResult, file_refs
from .calls import library_call

KINDS = ("plane", "surface", "evaluate-curve")


@dataclass
class _Shard:
    path: Path
    data: dict[str, np.ndarray]
    attrs: dict[str, Any]
    index: int
    count: int
    inputs: dict[str, Any]
    config: dict[str, Any]  # without "shard"


def _read_shard(path: Path) -> _Shard:
    data, attrs = metrics_file(path, KINDS)
    if "shard" not in attrs:
        raise MetricsFileError(f"'{path}' is not a shard file (it has no attribute 'shard'); merge combines the files "
                               "written by plane, surface or evaluate-curve with --shard I/N.")
    try:
        index, count = parse_shard(attrs["shard"] if isinstance(attrs["shard"], str) else "")
    except ConfigError:
        raise MetricsFileError(f"'{path}': attribute 'shard' must be I/N with 0 <= I < N, got "
                               f"{str(attrs['shard'])[:40]!r}.") from None
    inputs, config = json_attr(attrs, "inputs", path), json_attr(attrs, "config", path)
    if not isinstance(inputs, dict) or not isinstance(config, dict):
        raise MetricsFileError(f"'{path}': attributes 'inputs' and 'config' must be JSON objects.")
    if config.pop("shard", None) != attrs["shard"]:
        raise MetricsFileError(f"'{path}': attributes 'shard' and 'config' name different shards; the file was "
                               "changed after it was written.")
    if attrs.get("split") not in ("test", "val"):
        raise MetricsFileError(f"'{path}': attribute 'split' must be 'test' or 'val'.")
    return _Shard(path, data, attrs, index, count, inputs, config)


def _same_run(first: _Shard, s: _Shard) -> None:
    """Refuse a shard of another run than ``first``'s, naming what differs."""
    def other(why: str) -> MetricsFileError:
        return MetricsFileError(f"'{s.path}' and '{first.path}' are shards of different runs ({why}); merge the "
                                "shards of one run.")

    if s.attrs["kind"] != first.attrs["kind"]:
        article = {"plane": "a", "surface": "a", "evaluate-curve": "an"}
        raise other(f"one is {article[s.attrs['kind']]} {s.attrs['kind']} file, the other "
                    f"{article[first.attrs['kind']]} {first.attrs['kind']} file")
    if not same_inputs(s.inputs, first.inputs):  # (the same files spelled otherwise: shards run elsewhere)
        raise other("computed from other input files, or inputs with other contents")
    if s.attrs.get("input_order") != first.attrs.get("input_order"):
        raise other("the same input files given in another order")
    # (a plane's bend: mctool 0.2 recorded a --bend left out as null, now the bend used; the points' coordinates,
    # compared below, tell another bend)
    keys = sorted(k for k in set(s.config) | set(first.config) if first.config.get(k) != s.config.get(k)
                  and not (k == "bend" and None in (first.config.get(k), s.config.get(k))))
    if keys:
        diff = ", ".join(f"{setting_name(k)}: {show_setting(first.config.get(k))} -> {show_setting(s.config.get(k))}"
                         for k in keys)
        raise other(f"other settings: {diff}")
    if s.count != first.count:
        raise other(f"shard {s.index}/{s.count} and shard {first.index}/{first.count}: another number of shards")

    if set(s.data) != set(first.data) or any(np.shape(s.data[k]) != np.shape(first.data[k]) for k in first.data):
        raise other("other datasets or shapes")


def _layout(kind: str, split: str, data: dict[str, np.ndarray], path: Path) -> list[str]:
    """The datasets a shard fills (NaN where another shard computes), checked for shape."""
    if kind == "plane":
        names = plane_metric_names(split)
        need = {**{n: 2 for n in names}, **{f"at_points/{n}": 1 for n in names}, "alpha": 1, "beta": 1,
                "points": 2}
        if "curve" in data or "curve_offplane" in data:  # curve input: both
            need.update({"curve": 2, "curve_offplane": 1})
    elif kind == "surface":
        names = plane_metric_names(split)
        dims = 2 if "beta" in data else 1
        need = {**{n: dims for n in names}, **{f"at_points/{n}": 1 for n in names}, "alpha": 1}
        if dims == 2:
            need["beta"] = 1
        if "trajectory" in data or "trajectory_error" in data:  # pca: both
            need.update({"trajectory": 2, "trajectory_error": 1})
    else:
        names = curve_metric_names(split)
        need = {**{n: 1 for n in names}, "t": 1, "dl": 1}
    for name, ndim in need.items():
        if name not in data or np.ndim(data[name]) != ndim or data[name].dtype.kind not in "fiu":
            raise MetricsFileError(f"'{path}' is not a complete {kind} file: dataset '{name}' is missing or is not a "
                                   f"{ndim}-D array of numbers.")
    if kind == "evaluate-curve":
        filled, side, grid_shape, extra = names, len(data["t"]), (len(data["t"]),), ["dl"]
    else:
        filled = names + [f"at_points/{n}" for n in names]
        side = len(data["alpha"])
        grid_shape = (side, side) if kind == "plane" or "beta" in data else (side,)
        extra = ["beta"] if len(grid_shape) == 2 else []
    for name in filled + extra:
        want = (((3,) if kind == "plane" else (1,)) if name.startswith("at_points/")
                else (side,) if name in ("beta", "dl") else grid_shape)
        if np.shape(data[name]) != want:
            raise MetricsFileError(f"'{path}': dataset '{name}' should have shape {want}, got {np.shape(data[name])}.")
    return filled


def _task(kind: str, name: str, where: tuple[int, ...], side: int) -> int:
    """The index of a value's point in the run's full task list (``plane_tasks``, or the curve's points)."""
    if kind == "evaluate-curve":
        return where[0]
    first = 3 if kind == "plane" else 1  # the points before the grid cells: plane_tasks, surface_tasks
    if name.startswith("at_points/"):
        return where[0]
    return first + (where[0] * side + where[1] if len(where) == 2 else where[0])


def _combine(shards: list[_Shard], names: list[str], kind: str) -> dict[str, np.ndarray]:
    """Each value from the one shard that computed it."""
    count = shards[0].count
    side = len(shards[0].data["t" if kind == "evaluate-curve" else "alpha"])
    out = {}
    for name in names:
        stack = np.stack([np.asarray(s.data[name], dtype=np.float64) for s in shards])
        present = ~np.isnan(stack)
        per_value = present.sum(axis=0)
        if (per_value > 1).any():
            where = tuple(int(x) for x in np.argwhere(per_value > 1)[0])
            twice = [str(s.path) for s, p in zip(shards, present) if p[where]]
            raise MetricsFileError(f"value {name}{list(where)} is computed in more than one shard ('{twice[0]}' and "
                                   f"'{twice[1]}'); each value must come from exactly one shard.")
        if (per_value == 0).any():
            where = tuple(int(x) for x in np.argwhere(per_value == 0)[0])
            owner = shards[_task(kind, name, where, side) % count]
            todo = ("a running mctool command is writing it: merge again when it has finished" if
                    being_written(owner.path) else "finish it with the same command plus --resume, then merge again")
            raise MetricsFileError(f"value {name}{list(where)} is missing (NaN) in every shard; it belongs to shard "
                                   f"{owner.index}/{count} ('{owner.path}'): {todo}.")
        merged = np.full(stack.shape[1:], np.nan)
        for values, mask in zip(stack, present):
            merged[mask] = values[mask]
        out[name] = merged
    return out


def _earliest(shards: list[_Shard]) -> str | None:
    """The earliest ``started`` of the shards (ISO 8601), or None if none can be read."""
    times = []
    for s in shards:
        try:
            times.append((datetime.fromisoformat(s.attrs["started"]), s.attrs["started"]))
        except (KeyError, TypeError, ValueError):
            continue
    try:
        return min(times)[1] if times else None
    except TypeError:  # naive and aware times mixed: not written by mctool
        return None


@library_call
@holds_output_locks
def merge(files: Sequence[str | Path], output: str | Path, *, plot: str | Path | None = None,
          force: bool = False) -> MergeResult:
    """Combine the N shard files of one ``plane``, ``surface`` or ``evaluate-curve`` run into ``output``, the file
    the run writes without ``--shard`` (and draw it to ``plot``)."""
    t0 = time.time()
    paths = [Path(f) for f in file_list(files, "files")]
    if not paths:
        raise ConfigError("give the shard files to merge (all N files of one run's --shard I/N).")
    output = Path(output)
    check_outputs({"--metrics": output, "--plot": plot}, paths, force=force,
                  formats={"--metrics": "hdf5", "--plot": "figure"})
    shards = [_read_shard(p) for p in paths]
    first = shards[0]
    for s in shards[1:]:
        _same_run(first, s)
    by_index: dict[int, _Shard] = {}
    for s in shards:
        if s.index in by_index:
            raise MetricsFileError(f"'{s.path}' and '{by_index[s.index].path}' are both shard {s.index}/{s.count}; "
                                   "give each shard once.")
        by_index[s.index] = s
    n = first.count
    missing = [i for i in range(n) if i not in by_index]
    if missing:
        shown = ", ".join(f"{i}/{n}" for i in missing[:10]) + (", ..." if len(missing) > 10 else "")
        raise MetricsFileError(f"shard{'s' if len(missing) > 1 else ''} {shown} of this run "
                               f"{'are' if len(missing) > 1 else 'is'} missing: give all {n} shard files "
                               f"(0/{n} to {n - 1}/{n}).")
    shards = [by_index[i] for i in range(n)]
    first = shards[0]
    kind, split = first.attrs["kind"], first.attrs["split"]
    if kind == "surface":  # its directions file too
        check_outputs({"--metrics": output, "--plot": plot,
                       "directions file (beside --metrics)": directions_path(output)}, paths, force=force,
                      formats={"--metrics": "hdf5", "--plot": "figure"})
    names = _layout(kind, split, first.data, first.path)
    for s in shards[1:]:  # what every shard computes alike: the split, the grid's or curve's coordinates...
        if s.attrs.get("split") != split:
            raise MetricsFileError(f"'{s.path}' and '{first.path}' are shards of different runs (evaluated on the "
                                   f"{s.attrs.get('split')!r} and the {split!r} split); merge the shards of one run.")
        differ = [k for k in sorted(first.data) if k not in names
                  and not np.array_equal(s.data[k], first.data[k], equal_nan=True)]
        if differ:
            raise MetricsFileError(f"'{s.path}' and '{first.path}' are shards of different runs (other values in "
                                   f"{', '.join(differ[:5])}); merge the shards of one run.")
    values = _combine(shards, names, kind)

    refs = file_refs([s.path for s in shards])
    # provenance as this command writes it (its config without the shard), the rest as the shards have it
    config = dict(first.config)
    if "bend" in config and config["bend"] is None:  # (the bend used, where a newer shard records it)
        config["bend"] = next((s.config["bend"] for s in shards if s.config.get("bend") is not None), None)
    attrs = provenance(first.inputs, config, kind)
    for key in ("torch_version", "torch_threads"):  # what computed the values: the shards' (the same, or each)
        found = sorted({str(s.attrs[key]) for s in shards if key in s.attrs})
        if found:
            attrs[key] = ", ".join(found)
        else:
            attrs.pop(key)
    attrs.pop("input_order")  # the shards' (first.inputs is sorted by path), or none for older shards
    attrs.update({k: v for k, v in first.attrs.items()
                  if k not in attrs and k not in ("shard", "summary", "merged_from")})
    # the data set the shards were evaluated on (a shard that computed no point loaded none, and records none)
    prints = {s.path: s.attrs["data_fingerprint"] for s in shards if isinstance(s.attrs.get("data_fingerprint"), str)}
    if len(set(prints.values())) > 1:
        shown = ", ".join(f"'{p}' {fp[:12]}..." for p, fp in prints.items())
        raise MetricsFileError(f"the shards were evaluated on different data (data set fingerprints: {shown}); merge "
                               "the shards of one run.")
    if prints:
        attrs["data_fingerprint"] = next(iter(prints.values()))
    started = _earliest(shards)
    if started is not None:
        attrs["started"] = started
    attrs["merged_from"] = json.dumps([{"path": r.path, "sha256": r.sha256} for r in refs])
    data = first.data
    if kind == "plane":
        grid = {n_: values[n_] for n_ in plane_metric_names(split)}
        at_points = {n_: values[f"at_points/{n_}"] for n_ in grid}
        summary = grid_summary(grid, at_points)
        write_plane_file(output, attrs, alpha=data["alpha"], beta=data["beta"], grid=grid, at_points=at_points,
                         points=data["points"], curve=data.get("curve"), curve_offplane=data.get("curve_offplane"),
                         summary=summary)
        metrics = grid_metrics(summary)
    elif kind == "surface":
        grid = {n_: values[n_] for n_ in plane_metric_names(split)}
        center = {n_: values[f"at_points/{n_}"] for n_ in grid}
        summary = grid_summary(grid, center)
        vec_out = directions_path(output)
        name = first.attrs.get("directions_file")
        if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name:
            raise MetricsFileError(f"'{first.path}': attribute 'directions_file' must name a file beside it, got "
                                   f"{name!r}.")
        vec_in = first.path.with_name(name)
        tensors, md = read_checkpoint(vec_in) if vec_in.is_file() else ({}, {})
        if md.get("kind") != "surface-directions" or "directions" not in tensors:
            raise MetricsFileError(f"'{first.path}': its directions file '{vec_in}' is missing or is not a surface "
                                   "directions file; merge copies it beside the output.")
        attrs["directions_file"] = vec_out.name
        save_checkpoint(vec_out, tensors, md)
        scales = {"alpha": data["alpha"], **({"beta": data["beta"]} if "beta" in data else {})}
        write_surface_file(output, attrs, scales=scales, grid=grid, center=center, trajectory=data.get("trajectory"),
                           trajectory_error=data.get("trajectory_error"), summary=summary)
        metrics = grid_metrics(summary)
    else:
        distance = attrs.get("distance")
        if isinstance(distance, bool) or not isinstance(distance, (int, float)):
            raise MetricsFileError(f"'{first.path}': attribute 'distance' must be a number.")
        summary = curve_summary(values, np.asarray(data["dl"], dtype=np.float64), float(distance),
                                np.asarray(data["t"], dtype=np.float64))
        write_curve_file(output, attrs, t=data["t"], values=values, dl=data["dl"], summary=summary)
        metrics = curve_metrics(summary)[0]
    if plot is not None and distributed.is_main():
        from .plots import plot_curves, plot_grid

        if kind in ("plane", "surface"):
            plot_grid(output, plot)
        else:
            plot_curves([output], plot)
    return MergeResult(command="merge", inputs=refs,
                       outputs={"metrics": FileRef.of(output), "plot": FileRef.of(plot) if plot is not None else None,
                                "directions": FileRef.of(directions_path(output)) if kind == "surface" else None},
                       split=split, metrics=metrics, seconds=time.time() - t0, kind=kind, shards=n)
