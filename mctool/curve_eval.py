"""``mctool evaluate-curve`` and ``mctool point``: metrics along a curve, and networks taken from it."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import distributed
from .batched import DEFAULT_POINTS_PER_PASS, ManyEvaluator, Span, check_points_per_pass
from .bn import bn_data_setting, bn_modules, bn_pass_setting, check_bn_batch_size, check_bn_data, recalibrate_bn
from .checkpoint import ModelMeta, load_model, write_model
from .curves import Curve, check_two_networks, coefficients, line_between, load_curve
from .data import check_dataset_name, check_fits, load_data
from .errors import ConfigError
from .evaluation import evaluate_weights
from .fileio import check_outputs, holds_output_locks
from .h5io import kept_attrs, open_outputs, provenance, record_data, write_h5
from .loop import evaluation_split, recorded_split
from .options import MAX_POINTS, MAX_RATE, check_count, check_real, file_list
from .points import PointRun, check_shard, finishing, from_the_first_write, shard_tasks, shard_text
from .repair import channel_stats, check_repairable, interpolate_stats, repair as run_repair
from .results import CurveResult, CurveSummary, FileRef, Metrics, PointResult, file_refs
from .calls import library_call
from .runtime import resolve_device
from .console import progress_bar, warn

SUMMARY_KEYS = ("start", "end", "min", "max", "mean", "int")


def curve_from_files(paths: list[str], one_network: str = "'mctool evaluate FILE' evaluates the network") -> Curve:
    """A curve file, or the straight segment between two model checkpoints (two different ones: for the same
    network twice, the error suggests ``one_network``)."""
    if len(paths) == 1:
        return load_curve(paths[0])[0]
    if len(paths) == 2:
        a, b = load_model(paths[0]), load_model(paths[1])
        check_two_networks(a, b, f"its segment is a single point; {one_network}")
        return line_between(a, b)
    raise ConfigError(f"give one curve file or two model checkpoints, not {len(paths)} files.")


def ends_fingerprint(curve: Curve) -> str:
    """JSON of the sha256 of a curve's two ends' float32 parameters, A's then B's: equal for the segment and
    the curves between the same two networks, whatever files they came from (``plot`` overlays only those
    without a warning)."""
    def sha(end: torch.Tensor) -> str:
        data = end.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4", copy=False)
        return hashlib.sha256(data.tobytes()).hexdigest()

    return json.dumps([sha(curve.points[0]), sha(curve.points[-1])])


def segment_lengths(curve: Curve, t: np.ndarray) -> tuple[np.ndarray, float]:
    """dl_i = ||w(t_i) - w(t_{i-1})|| (dl_0 = 0) and ||B - A||, from the control points' Gram matrix."""
    g = curve.gram()
    c = coefficients(curve.curve, curve.num_bends, torch.as_tensor(t, dtype=torch.float64)).to(g.device)
    d = c[1:] - c[:-1]
    dl = torch.einsum("ik,kl,il->i", d, g, d).clamp_min(0).sqrt()
    e = torch.zeros(curve.num_points, dtype=torch.float64, device=g.device)
    e[0], e[-1] = -1.0, 1.0
    return np.concatenate([[0.0], dl.cpu().numpy()]), float((e @ g @ e).clamp_min(0).sqrt())


def metric_set(name: str) -> tuple[str, str]:
    """``train/loss`` -> (``train``, ``loss``), ``test/err`` or ``val/err`` -> (``eval``, ``err``)."""
    group, metric = name.split("/", 1)
    return ("train" if group == "train" else "eval"), metric


def curve_summary(values: dict[str, np.ndarray], dl: np.ndarray, distance: float,
                  t: np.ndarray) -> dict[str, Any]:
    """``{"train": {metric: summary}, "eval": {...}, "barrier": {"train": {metric: value}, "eval": {...}},
    "bump": {...}, "length", "length_ratio"}`` (docs/method.md#curve-evaluation); a summary holds start, end,
    min, max, mean and the arc-length weighted mean ``int``; a barrier is max minus the mean of the two ends, a
    bump the largest rise above the straight line between the ends' values along ``t`` (NaN while a point is
    missing)."""
    length = float(dl.sum())
    t = np.asarray(t, dtype=np.float64)
    out: dict[str, Any] = {"train": {}, "eval": {}, "barrier": {"train": {}, "eval": {}},
                           "bump": {"train": {}, "eval": {}}}
    for name, v in values.items():
        group, metric = metric_set(name)
        if np.isnan(v).any():
            out[group][metric] = {k: float("nan") for k in SUMMARY_KEYS}
            out["barrier"][group][metric] = out["bump"][group][metric] = float("nan")
            continue
        integral = float((0.5 * (v[1:] + v[:-1]) * dl[1:]).sum() / length) if length > 0 else float(v.mean())
        out[group][metric] = {"start": float(v[0]), "end": float(v[-1]), "min": float(v.min()),
                              "max": float(v.max()), "mean": float(v.mean()), "int": integral}
        out["barrier"][group][metric] = float(v.max()) - 0.5 * (float(v[0]) + float(v[-1]))
        # (t runs from exactly 0 to exactly 1, so the ends contribute 0: a bump is never negative)
        out["bump"][group][metric] = max(0.0, float((v - ((1 - t) * v[0] + t * v[-1])).max()))
    out["length"] = length
    out["length_ratio"] = length / distance if distance > 0 else float("nan")
    return out


def curve_metric_names(split: str) -> list[str]:
    """The metric datasets of an evaluate-curve file."""
    return ["train/loss", "train/nll", "train/err", f"{split}/nll", f"{split}/err"]


def curve_metrics(summary: dict[str, Any]) -> tuple[dict[str, Metrics], dict[str, Metrics], dict[str, Metrics]]:
    """``metrics``, ``barrier`` and ``bump`` of a ``CurveResult`` from ``curve_summary``'s dict."""
    return ({g: Metrics.of({k: CurveSummary(**v) for k, v in summary[g].items()}) for g in ("train", "eval")},
            {g: Metrics.of(summary["barrier"][g]) for g in ("train", "eval")},
            {g: Metrics.of(summary["bump"][g]) for g in ("train", "eval")})


def write_curve_file(path: str | Path, attrs: dict[str, Any], *, t: np.ndarray, values: dict[str, np.ndarray],
                     dl: np.ndarray, summary: dict[str, Any] | None = None,
                     unaligned: tuple[dict[str, np.ndarray], np.ndarray, dict[str, Any] | None] | None = None) -> None:
    """Write an evaluate-curve metrics file (atomically); with ``summary`` (``curve_summary``) also its root
    attribute ``summary`` and each metric dataset's summary attributes. ``unaligned`` (--compare-unaligned):
    the unaligned segment's values, ``dl`` and summary, written under ``unaligned/`` (root attribute
    ``summary_unaligned``). ``evaluate-curve`` and ``merge`` both write through here."""
    groups = [("", values, dl, summary, "summary")]
    if unaligned is not None:
        groups.append(("unaligned/", *unaligned, "summary_unaligned"))
    datasets: dict[str, tuple[np.ndarray, tuple[str, ...]]] = {}
    extra = {}
    for prefix, vals, lengths, summ, key in groups:
        datasets |= {prefix + n: (v, ("t",)) for n, v in vals.items()} | {prefix + "dl": (lengths, ("t",))}
        if summ is not None:
            attrs[key] = json.dumps(summ)
            extra |= {prefix + n: summ[metric_set(n)[0]][metric_set(n)[1]] for n in vals}
    write_h5(path, scales={"t": t}, datasets=datasets, attrs=attrs, dataset_attrs=extra)


def _aligned_and_unaligned(paths: list[str], unaligned: str | Path,
                           shard: tuple[int, int] | None) -> tuple[Curve, Curve]:
    """--compare-unaligned: the segments A -> aligned B and A -> B, after checking that ``paths`` are A and B
    aligned to A by ``mctool align``, and that ``unaligned`` is the B it permuted."""
    if len(paths) != 2:
        raise ConfigError("--compare-unaligned compares two straight segments: give A and B aligned to A (two model "
                          "checkpoints, as 'evaluate-curve A B-aligned --compare-unaligned B'), not a curve file. "
                          "A curve trained with connect --align already ends at aligned B.")
    if shard is not None:
        raise ConfigError("--compare-unaligned reports both segments' barriers from one whole run; it cannot be "
                          "split with --shard. Evaluate the two segments as two sharded runs instead.")
    a, b_aligned, b = load_model(paths[0]), load_model(paths[1]), load_model(unaligned)
    reference = b_aligned.meta.extra.get("align_reference_sha256")
    if reference is None:
        raise ConfigError(f"'{paths[1]}' is not a network written by mctool align (it records no "
                          "align_reference_sha256); --compare-unaligned needs B aligned to A (mctool align A B -o "
                          "B-aligned) as the second file.")
    if reference != a.sha256:
        raise ConfigError(f"'{paths[1]}' was aligned to another network than '{paths[0]}' (align_reference_sha256 "
                          "differs from its sha256); give the network it was aligned to as A.")
    # its recorded inputs are A (the reference) and the B it permuted
    if b.sha256 == reference or b.sha256 not in b_aligned.meta.inputs.values():
        raise ConfigError(f"'{unaligned}' is not the network '{paths[1]}' was made from (its sha256 is not among the "
                          "recorded inputs); give --compare-unaligned the B that mctool align permuted.")
    return line_between(a, b_aligned), line_between(a, b)


@library_call
@holds_output_locks
def evaluate_curve(paths: Sequence[str | Path], metrics: str | Path, *, num_points: int = 61,
                   plot: str | Path | None = None, resume: bool = False, force: bool = False, device: str = "auto",
                   dataset: str | None = None, data_root: str | Path | None = None, download: bool = False,
                   split: str | None = None, batch_size: int = 512, bn_batches: int | None = None,
                   wd: float | None = None, precision: str = "fp32", channels_last: bool = False, num_workers: int = 4,
                   shard: tuple[int, int] | None = None, compare_unaligned: str | Path | None = None,
                   repair: bool = False, repair_batches: int = 8, points_per_pass: int = DEFAULT_POINTS_PER_PASS,
                   compile: bool = False, bn_data: str = "augmented", quiet: bool = False) -> CurveResult:
    """Loss and error at ``num_points`` evenly spaced t, with BN recomputed at each
    (docs/method.md#curve-evaluation).

    ``shard=(I, N)`` evaluates only the points i with i % N == I (the others stay NaN, and so does the
    summary of every metric); ``mctool.merge`` combines the N shard files into the file of the whole run.
    ``compare_unaligned`` (with ``paths`` = A and B aligned by ``mctool align``): the unaligned B; the segment
    A -> B is evaluated too, at the same t and with the same options (``barrier_unaligned``, datasets under
    ``unaligned/``). ``repair`` (networks without BatchNorm): REPAIR at every point, with statistics from
    ``repair_batches`` training batches (docs/align.md#repair). ``bn_data``: the BN passes' images augmented
    as the curve was trained, or ``plain`` (docs/method.md#bn). ``points_per_pass`` points are evaluated
    together in one wide network (``batched.ManyEvaluator``; one at a time with ``repair``); ``compile`` runs
    the evaluation forward through ``torch.compile`` (``batched.CompiledForward``)."""
    t0 = time.time()
    paths = file_list(paths, "paths")
    check_points_per_pass(points_per_pass)
    shard = check_shard(shard, plot, "curve")
    check_count("--num-points", num_points, 2, MAX_POINTS)
    check_count("--batch-size", batch_size)
    check_count("--bn-batches", bn_batches)
    check_count("--repair-batches", repair_batches)
    check_real("--wd", wd, 0, MAX_RATE)
    check_bn_data(bn_data)
    metrics = Path(metrics)
    unaligned: Curve | None = None
    if compare_unaligned is not None:
        curve, unaligned = _aligned_and_unaligned(paths, compare_unaligned, shard)
    else:
        curve = curve_from_files(paths)
    inputs = curve.meta.inputs if curve.path is None else {str(curve.path): curve.sha256}
    if unaligned is not None:
        inputs = {**inputs, **unaligned.meta.inputs}
    split = evaluation_split(split, inputs, metrics if resume else None)
    if repair:
        check_repairable(curve.build_model(), str(paths[0]))
        if batch_size < 2:
            raise ConfigError("--repair normalises each layer's units over a batch of images; it needs a "
                              f"--batch-size of at least 2, got {batch_size}.")
    wd = float(curve.meta.config.get("wd", 0.0)) if wd is None else wd
    name = curve.meta.dataset_or(dataset, paths[0])
    names = curve_metric_names(split)
    t = np.linspace(0.0, 1.0, num_points)
    values = {n: np.full(num_points, np.nan) for n in names}
    values_un = {n: np.full(num_points, np.nan) for n in names} if unaligned is not None else None
    config = {"num_points": num_points, "dataset": name, "split": split, "wd": wd, "bn_batches": bn_batches,
              "bn_batch_size": bn_pass_setting(curve.buffers, batch_size),
              "bn_data": bn_data_setting(curve.buffers, bn_data, bn_batches), "precision": precision,
              "curve": curve.curve,
              "num_bends": curve.num_bends,
              # None when off: files of earlier versions, which lack these keys, still resume
              "compare_unaligned": str(compare_unaligned) if compare_unaligned is not None else None,
              "repair_batches": repair_batches if repair else None}
    # A shard file records its shard in its config; resuming compares it, also when --shard is not given.
    # Every dataset a run of these settings writes must be there (as plane, surface and hessian check).
    shapes = {prefix + n: (num_points,) for prefix, vals in (("", values), ("unaligned/", values_un or {}))
              for n in vals}
    old, started, finished, draw = open_outputs(metrics, inputs, {**config, "shard": shard_text(shard)},
                                                resume=resume, force=force, plot=plot, shapes=shapes)
    if shard is not None:
        config["shard"] = shard_text(shard)
    for prefix, vals in (("", values), ("unaligned/", values_un or {})):
        for n in vals:
            if prefix + n in old:
                vals[n] = np.asarray(old[prefix + n], dtype=np.float64)
    dl, distance = segment_lengths(curve, t)

    attrs = {**provenance(inputs, config, "evaluate-curve"), "curve": curve.curve, "num_bends": curve.num_bends,
             "split": split, "distance": distance, "repair": bool(repair), "ends_sha256": ends_fingerprint(curve)}
    dl_un = None
    if unaligned is not None:
        dl_un, attrs["distance_unaligned"] = segment_lengths(unaligned, t)
    if shard is not None:
        attrs["shard"] = shard_text(shard)
    if started:
        attrs["started"] = started
    if resume:  # (kept when no point is left to compute: no data set is loaded then)
        attrs |= kept_attrs(metrics)

    def write(summary: dict[str, Any] | None = None, summary_un: dict[str, Any] | None = None) -> None:
        write_curve_file(metrics, attrs, t=t, values=values, dl=dl, summary=summary,
                         unaligned=(values_un, dl_un, summary_un) if values_un is not None else None)

    def missing(i: int) -> bool:
        return any(np.isnan(v[n][i]) for v in (values, values_un or {}) for n in v)

    # This shard's points (all without --shard), less those already computed: rank 0's list (another rank may
    # read the file after rank 0 wrote more points into it)
    mine = shard_tasks(list(range(num_points)), shard)
    todo = distributed.broadcast_object([i for i in mine if missing(i)])
    if todo:
        dev = resolve_device(device)
        data = load_data(name, root=data_root, split=split, download=download, device=dev,
                         augment=curve.meta.train_augment(), channels_last=channels_last,
                         **curve.meta.data_options(), num_workers=num_workers)
        check_fits(curve.meta, data.info, paths[0])
        record_data(attrs, data, name, metrics if resume else None)
        model = curve.build_model().to(dev)
        check_bn_batch_size(model, batch_size)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        segments = [("", curve, curve.points.to(dev))]
        # each segment's control points as columns of the passes' Span: the unaligned segment starts at the same A
        columns = [list(range(curve.num_points))]
        controls = [segments[0][2]]
        if unaligned is not None:
            segments.append(("unaligned/", unaligned, unaligned.points.to(dev)))
            shared = int(torch.equal(unaligned.points[0], curve.points[0]))  # (always, from one loaded A)
            first = curve.num_points
            columns.append([0] * shared + list(range(first, first + unaligned.num_points - shared)))
            controls.append(segments[1][2][shared:])
        # REPAIR's endpoint statistics, measured once per segment (its start A and its end)
        ends: dict[str, tuple[dict, dict]] = {}
        if repair:
            for prefix, seg, pts in segments:
                stats = []
                for w in (pts[0], pts[-1]):
                    seg.layout.assign(model, w)
                    stats.append(channel_stats(model, data.train, batches=repair_batches, batch_size=batch_size,
                                               precision=precision))
                ends[prefix] = stats[0], stats[1]
        per_pass = 1 if repair else points_per_pass  # REPAIR changes each network's weights before its pass
        many = ManyEvaluator(model, curve.layout, data, points_per_pass=per_pass, wd=wd, batch_size=batch_size,
                             bn_batches=bn_batches, precision=precision, channels_last=channels_last,
                             label="curve", compile=compile, bn_data=bn_data)

        def weights_at(i: int, seg: Curve, pts: torch.Tensor) -> torch.Tensor:
            return seg.weights(t[i], pts)

        def measure_repaired(i: int) -> dict[str, float]:
            out = {}
            for prefix, seg, pts in segments:
                seg.layout.assign(model, weights_at(i, seg, pts))
                if 0 < t[i] < 1:  # an end is the network itself, whose statistics are its targets: left exact
                    run_repair(model, data.train, interpolate_stats(*ends[prefix], float(t[i])),
                               batches=repair_batches, batch_size=batch_size, precision=precision)
                m = evaluate_weights(model, data, wd=wd, batch_size=batch_size, bn_batches=bn_batches,
                                     precision=precision, bn_data=bn_data)
                out |= {prefix + n: v for n, v in m.items()}
            return out

        def measure(points: list[int]) -> list[dict[str, float]]:
            if repair:
                return [measure_repaired(i) for i in points]
            # every segment's network at every point of the pass, evaluated points_per_pass at a time; each is
            # its segment's coefficients times its control points (a Span: the first layer of an MLP computes
            # less)
            nets = [(k, prefix, weights_at(i, seg, pts)) for k, i in enumerate(points) for prefix, seg, pts in segments]
            rows = torch.zeros(len(nets), sum(len(c) for c in controls), dtype=torch.float64)
            for r, (i, j) in enumerate((i, j) for i in points for j in range(len(segments))):
                seg = segments[j][1]
                rows[r].index_add_(0, torch.tensor(columns[j]), coefficients(seg.curve, seg.num_bends, float(t[i])))
            span = Span(tuple(controls), rows)
            out: list[dict[str, float]] = [{} for _ in points]
            for (k, prefix, _), m in zip(nets, many.evaluate(torch.stack([w for _, _, w in nets]), span)):
                out[k] |= {prefix + n: v for n, v in m.items()}
            return out

        def store(i: int, m: dict[str, float]) -> None:
            for n in names:
                values[n][i] = m[n]
                if values_un is not None:
                    values_un[n][i] = m["unaligned/" + n]

        distributed.sync("the checks before the first write")  # a run refused on any rank writes no file
        with from_the_first_write(metrics, len(mine), attrs["started"], replaced_figure=plot if draw else None):
            write()
            PointRun("evaluate-curve", total=len(mine), metrics=metrics, quiet=quiet).run(
                todo, measure, store, lambda i, m: (f"t={t[i]:.3f} train loss {m['train/loss']:.4f} "
                                                    f"{split} err {m[f'{split}/err']:.2%}"),
                points_per_pass=per_pass, flush=write)
    with finishing(metrics, len(mine)):
        summary = curve_summary(values, dl, distance, t)
        summary_un = curve_summary(values_un, dl_un, attrs["distance_unaligned"], t) if values_un is not None else None
        if todo or not finished:  # (a resume with nothing to compute leaves a finished file as it is)
            write(summary, summary_un)
        summary_metrics, barrier, bump = curve_metrics(summary)
        unaligned_sets = curve_metrics(summary_un) if summary_un is not None else None
        result = CurveResult(command="evaluate-curve", inputs=file_refs(inputs), split=split, metrics=summary_metrics,
                             barrier=barrier, bump=bump, curve=curve.curve, num_bends=curve.num_bends,
                             num_points=num_points, length=summary["length"], length_ratio=summary["length_ratio"],
                             barrier_unaligned=unaligned_sets[1] if unaligned_sets else None,
                             bump_unaligned=unaligned_sets[2] if unaligned_sets else None)
        if draw and distributed.is_main():
            from .plots import plot_curves

            plot_curves([metrics], plot)
    result.outputs = {"metrics": FileRef.of(metrics), "plot": FileRef.of(plot) if plot is not None else None}
    result.seconds = time.time() - t0
    return result


def check_point_options(*, batch_size: int, bn_batches: int | None, bn_data: str, num_workers: int, device: str,
                        dataset: str | None) -> torch.device:
    """``point``'s data options, checked as every command checks them whether or not they are used (a network
    without BatchNorm, or an ensemble's member, reads no data); the device they name."""
    check_count("--batch-size", batch_size)
    check_count("--bn-batches", bn_batches)
    check_bn_data(bn_data)
    check_count("--num-workers", num_workers, 0)
    if dataset is not None:
        check_dataset_name(dataset)
    return resolve_device(device)


@library_call
@holds_output_locks
def export_point(path: str | Path, t: float, output: str | Path, *, bn_update: bool = True,
                 bn_batches: int | None = None, force: bool = False, device: str = "auto",
                 dataset: str | None = None, data_root: str | Path | None = None, download: bool = False,
                 batch_size: int = 512, precision: str = "fp32", num_workers: int = 4,
                 bn_data: str = "augmented", quiet: bool = False) -> PointResult:
    """Write the network at t of a curve as an ordinary model checkpoint (BN recomputed unless disabled, on the
    training images of ``dataset``, by default the recorded one; its pass shows a progress bar inside
    ``mctool.progress()`` unless ``quiet``)."""
    t0 = time.time()
    check_real("--t", t, 0, 1)
    dev = check_point_options(batch_size=batch_size, bn_batches=bn_batches, bn_data=bn_data,
                              num_workers=num_workers, device=device, dataset=dataset)
    check_outputs({"--output": output}, [path], force=force, formats={"--output": "safetensors"})
    curve = load_curve(path)[0]
    model = curve.build_model()
    curve.layout.assign(model, curve.weights(t))
    split = recorded_split(curve.meta.config) or "test"  # BN statistics from the data the curve was trained on
    recalibrated, fingerprint = False, None
    if not bn_update and t > 0 and bn_modules(model):
        warn(f"--no-bn-update: the network at t = {t:g} gets the BatchNorm statistics the curve file holds (A's, "
             "the start network's), not statistics of its own weights; away from t = 0 it may compute something "
             "else than its weights would (even at t = 1, which has B's weights).")
    if bn_update and bn_modules(model):
        data = load_data(curve.meta.dataset_or(dataset, path), root=data_root, split=split, download=download,
                         device=dev, augment=curve.meta.train_augment(), **curve.meta.data_options(),
                         num_workers=num_workers)
        check_fits(curve.meta, data.info, path)
        fingerprint = data.fingerprint
        model.to(dev)
        batches = data.train.num_batches(batch_size)
        world = distributed.current().world if distributed.current() is not None else 1
        with progress_bar(quiet) as bar:  # the ranks share the pass; rank 0 draws its batches as the world's
            task = bar.add_task(f"BN pass at t = {t:g}", total=min(batches, bn_batches or batches), info="")
            recalibrated = recalibrate_bn(model, data.train, batch_size=batch_size, max_batches=bn_batches,
                                          precision=precision, sharded=True, bn_data=bn_data,
                                          on_batch=lambda: bar.advance(task, world))
        model.to("cpu")
    config = {"curve": str(path), "t": t, "bn_update": recalibrated, "bn_batches": bn_batches, "split": split,
              **({"bn_dataset": dataset} if recalibrated and dataset is not None else {}),
              **({"bn_data": bn_data} if recalibrated else {}),
              **{k: curve.meta.config[k] for k in ("wd", "epochs", "augment") if k in curve.meta.config}}
    meta = ModelMeta(**{**asdict(curve.meta), "kind": "model", "config": config,
                        "inputs": {str(path): curve.sha256},
                        "extra": {"curve_sha256": curve.sha256, "curve_t": repr(float(t)),
                                  # the data set of its BN statistics
                                  **({"data_fingerprint": fingerprint} if recalibrated else {})}})
    write_model(output, model, meta)
    return PointResult(command="point", inputs=[FileRef(str(path), curve.sha256)],
                       outputs={"model": FileRef.of(output)}, split=split if recalibrated else None,
                       metrics={"train": None, "eval": None}, seconds=time.time() - t0, t=t,
                       bn_recalibrated=recalibrated)
