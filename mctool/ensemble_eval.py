"""``mctool evaluate`` and ``mctool ensemble``: networks, ensemble files and points of a curve evaluated alone
and as an ensemble (mean of softmax outputs), with optional temperature scaling.

The ensemble file format and the snapshot collector live in ``ensembles.py``.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .batched import DEFAULT_POINTS_PER_PASS, Span, WideNetwork, WideNetworks, check_points_per_pass, compiled
from .bn import check_bn_data, recalibrate_bn, unused_bn_options
from .checkpoint import ModelMeta, load_model, meta_differences, read_metadata
from .curves import coefficients, load_curve
from .data import check_fits, load_data
from .ensembles import Ensemble, as_ensemble_meta, load_ensemble, save_ensemble
from .errors import CheckpointError, ConfigError, DataError
from .evaluation import l2_term, nll, predict_logits, probabilities, summarize
from .fileio import check_outputs, holds_output_locks
from .flat import ParamLayout, state_buffers
from .h5io import provenance, write_h5
from .loop import evaluation_split
from .models import check_takes_images
from .options import MAX_POINTS, check_count, file_list
from .results import Calibration, EvaluateResult, FileRef, MemberMetrics, Metrics, file_refs
from .calls import library_call
from .runtime import resolve_device
from .console import progress_bar, warn


@dataclass
class Member:
    """One network to evaluate: a model checkpoint, one member of an ensemble file, or a point on a curve."""

    label: str
    meta: ModelMeta
    source: str
    sha256: str
    make: Callable[[], nn.Module]
    recalibrate: bool = False  # BN statistics must be recomputed (points along a curve)
    # a point on a curve: its control points [K, N] (the curve's tensor, shared by its points) and coefficients
    # [K], for a pass's ``batched.Span``
    span: tuple[torch.Tensor, torch.Tensor] | None = None


def _built_once(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """A fresh copy of ``build()``'s network at each call, built once: building one per point or member threw
    a random initialisation away each time (0.1 s for VGG16)."""
    made: list[nn.Module] = []

    def copy_of() -> nn.Module:
        if not made:
            made.append(build())
        return copy.deepcopy(made[0])

    return copy_of


def load_members(paths: list[str], num_points: int | None = None, **plain: Any) -> list[Member]:
    """Expand model checkpoints and ensemble files into members (networks are built lazily); with
    ``num_points`` the single path is a curve file sampled at that many evenly spaced t."""
    if num_points is not None:
        if len(paths) != 1 or num_points < 1:
            raise ConfigError("--num-points samples one curve file: give exactly one curve and K >= 1.")
        curve = load_curve(paths[0])[0]
        ts = np.linspace(0, 1, num_points) if num_points > 1 else np.array([0.5])

        blank = _built_once(curve.build_model)

        def at(t: float) -> nn.Module:
            model = blank()
            curve.layout.assign(model, curve.weights(t))
            return model

        return [Member(f"{paths[0]}@t={t:.4g}", curve.meta, str(paths[0]), curve.sha256, lambda t=t: at(float(t)),
                       recalibrate=True, span=(curve.points, coefficients(curve.curve, curve.num_bends, float(t))))
                for t in ts]
    out: list[Member] = []
    for p in paths:
        kind = read_metadata(p).get("kind")
        if kind in ("curve", "curve-state"):
            raise CheckpointError(f"'{p}' holds a curve, not a network: 'mctool ensemble {p} --num-points K' "
                                  "evaluates K networks along it as an ensemble, 'mctool evaluate-curve FILE' each "
                                  "point, and 'mctool point FILE --t T -o net.safetensors' takes one network.")
        if kind == "ensemble":
            ens = load_ensemble(p)
            blank = _built_once(lambda e=ens: e.network(0))
            out += [Member(f"{p}#{i}", ens.meta, str(p), ens.sha256, lambda e=ens, i=i, b=blank: e.network(i, b()))
                    for i in range(len(ens))]
        else:
            lm = load_model(p, **plain)
            out.append(Member(str(p), lm.meta, str(p), lm.sha256, lambda m=lm.model: m))
    return out


def fit_temperature(logits: list[torch.Tensor], labels: torch.Tensor) -> float:
    """One temperature T for all members minimising the NLL of mean_m softmax(z_m / T) (golden-section on log T)."""
    def loss(log_t: float) -> float:
        p = torch.stack([probabilities(z / math.exp(log_t), 1) for z in logits]).mean(0)
        return nll(p, labels)

    lo, hi = math.log(0.05), math.log(20.0)
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = loss(a), loss(b)
    for _ in range(60):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = loss(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = loss(b)
    return math.exp((lo + hi) / 2)


def check_members_compatible(members: list[Member]) -> None:
    """Members must predict the same classes from the same inputs: equal classes and channels, and equal
    normalisation where both record one (a plain state dict records none and reads the data as given)."""
    first = members[0].meta
    for m in members[1:]:
        recorded = m.meta.normalization is not None and first.normalization is not None
        for key, _, _ in meta_differences(m.meta, first, ("num_classes", "in_chans", "normalization")
                                          if recorded else ("num_classes", "in_chans")):
            raise ConfigError(f"'{m.label}' differs from '{members[0].label}' in {key}; ensemble members must "
                              "read the same inputs and predict the same classes.")


class _MemberPasses:
    """Members in passes of at most ``points_per_pass``: consecutive members of one architecture and BN
    treatment go through one ``batched.WideNetwork`` together (built once per kind and size, and checked);
    members of an architecture that cannot be widened go one at a time (with a warning)."""

    def __init__(self, points_per_pass: int, data: Any, channels_last: bool, compile: bool = False):
        self.points_per_pass = points_per_pass
        self._wides = WideNetworks(data, channels_last=channels_last, compile=compile)

    @staticmethod
    def _kind(m: Member) -> tuple:
        return (m.meta.arch, json.dumps(m.meta.arch_kwargs, sort_keys=True), m.meta.num_classes, m.meta.in_chans,
                m.recalibrate)

    def passes(self, members: list[Member]) -> list[list[Member]]:
        out: list[list[Member]] = []
        for m in members:
            if out and self._kind(out[-1][0]) == self._kind(m) and len(out[-1]) < self.points_per_pass:
                out[-1].append(m)
            else:
                out.append([m])
        return out

    def span(self, chunk: list[Member], wide: WideNetwork) -> Span | None:
        """The pass's networks as combinations of one curve's control points (``batched.Span``: an MLP's first
        layer computes less), when they are all points of that curve and ``wide`` can use them. The control
        points stay where they are: ``WideNetwork.assign`` moves only the parts of its input layers, and only
        where the span pays."""
        spans = [m.span for m in chunk]
        first = spans[0]
        if first is None or any(s is None or s[0] is not first[0] for s in spans) or not wide.takes_span:
            return None
        return Span((first[0],), torch.stack([s[1] for s in spans if s is not None]))

    def wide(self, chunk: list[Member], model: nn.Module) -> WideNetwork | None:
        return self._wides.get((*self._kind(chunk[0]), len(chunk)), model, len(chunk), ParamLayout.of(model),
                               f"{chunk[0].meta.arch} networks")


@library_call
@holds_output_locks
def evaluate_models(paths: Sequence[str | Path], *, dataset: str | None = None, split: str | None = None,
                    device: str = "auto", data_root: str | Path | None = None, download: bool = False,
                    batch_size: int = 512, precision: str = "fp32", channels_last: bool = False,
                    metrics: str | Path | None = None, output: str | Path | None = None, num_points: int | None = None,
                    temperature_scale: bool = False, bn_batches: int | None = None, force: bool = False,
                    arch: str | None = None, num_classes: int | None = None, in_chans: int | None = None,
                    arch_kwargs: dict | None = None, num_workers: int = 4,
                    points_per_pass: int = DEFAULT_POINTS_PER_PASS, compile: bool = False, bn_data: str = "augmented",
                    quiet: bool = False, command: str = "evaluate") -> EvaluateResult:
    """Evaluate networks and, given several, their ensemble (mean of softmax) on one split.

    ``paths`` are model checkpoints and ensemble files (expanded into their members), or one curve
    file sampled at ``num_points`` t (each point BN-recalibrated). Per member: ``loss`` (NLL plus the L2
    term with the wd it was trained with), ``nll``, ``err``, ``ece``, ``brier``; the ensemble's metrics
    for its first k members, k = 1..M. ``temperature_scale`` fits one temperature on the held-out part
    of the training data (the ``val`` split) and reports calibrated ensemble metrics beside the raw ones.
    ``output`` writes all members as one ensemble file. ``command`` names the result (``evaluate`` or
    ``ensemble``). ``points_per_pass`` members of one architecture are evaluated together (``batched``);
    ``compile`` runs the evaluation forward through ``torch.compile`` (``batched.CompiledForward``).
    ``bn_data``: the images of the curve points' BN passes, augmented as the curve was trained or ``plain``.
    """
    t0 = time.time()
    paths = file_list(paths, "paths")
    check_points_per_pass(points_per_pass)
    if not paths:
        raise ConfigError("give at least one model checkpoint, ensemble file or curve.")
    check_count("--batch-size", batch_size)
    check_count("--bn-batches", bn_batches)
    check_bn_data(bn_data)
    check_count("--num-points", num_points, 1, MAX_POINTS)
    check_count("--num-classes", num_classes)
    check_count("--in-chans", in_chans)
    check_outputs({"--metrics": metrics or None, "--output": output or None}, paths, force=force,
                  formats={"--metrics": "hdf5", "--output": "safetensors"})
    members = load_members(paths, num_points, arch=arch, num_classes=num_classes, in_chans=in_chans,
                           arch_kwargs=arch_kwargs)
    first = members[0].meta
    name = first.dataset_or(dataset, paths[0])
    check_members_compatible(members)  # also with --dataset: the data is normalised once, as the first reads it
    # (--temperature-scale fits on val: its metrics are on test unless asked otherwise)
    split = "test" if split is None and temperature_scale else evaluation_split(split, paths)
    if output:
        for m in members[1:]:
            if (m.meta.arch, m.meta.arch_kwargs) != (first.arch, first.arch_kwargs):
                raise ConfigError(f"one ensemble file holds one architecture: '{m.label}' is {m.meta.arch} "
                                  f"{m.meta.arch_kwargs}, '{members[0].label}' is {first.arch} {first.arch_kwargs}. "
                                  "Leave out -o to evaluate mixed ensembles.")
    dev = resolve_device(device)
    # The inputs as the members read them: the first that records its normalisation (a plain state dict
    # records none, and check_members_compatible has made the others agree with it).
    reads = next((m.meta for m in members if m.meta.normalization is not None), first)
    data = load_data(name, root=data_root, split=split, download=download, device=dev, channels_last=channels_last,
                     augment=reads.train_augment(), **reads.data_options(), num_workers=num_workers)
    held = None
    if temperature_scale:
        try:
            held = load_data(name, root=data_root, split="val", device=dev, channels_last=channels_last,
                             **reads.data_options(), num_workers=num_workers)
        except DataError as e:
            raise DataError(f"--temperature-scale fits its temperature on the val split (images held out of the "
                            f"training set), which this data set cannot give: {e} Leave out --temperature-scale "
                            "for it.") from None
    for m in members:
        check_fits(m.meta, data.info, m.label)
        if m.meta.image_size is None:  # a plain state dict: nothing recorded says it takes these images
            check_takes_images(m.make().to(dev), m.meta.arch, data.info.num_classes, data.info.in_chans,
                               data.info.image_size, data.info.name)
    rows, running, ens, recalibrated = [], [], None, False
    eval_logits, held_logits, labels, held_labels = [], [], None, None
    weights, buffers = [], []
    many = _MemberPasses(points_per_pass, data, channels_last, compile)
    with progress_bar(quiet) as bar:
        task = bar.add_task(command, total=len(members), info="")
        for chunk in many.passes(members):
            models = [member.make().to(dev) for member in chunk]
            if channels_last:
                for model in models:
                    model.to(memory_format=torch.channels_last)
            wide = many.wide(chunk, models[0])
            if wide is not None:  # the pass's networks side by side: each batch read once
                wide.assign(torch.stack([wide.layout.flatten(dict(m.named_parameters())) for m in models]),
                            many.span(chunk, wide))
                wide.assign_buffers([dict(m.named_buffers()) for m in models])
                if chunk[0].recalibrate:
                    recalibrated |= recalibrate_bn(wide, data.train, batch_size=batch_size, max_batches=bn_batches,
                                                   precision=precision, sharded=True, bn_data=bn_data)
                    for k, model in enumerate(models):  # each network keeps its recomputed statistics
                        model.load_state_dict(wide.running_stats(k), strict=False)
                z, labels = predict_logits(wide, data.eval, batch_size=batch_size, precision=precision, sharded=True)
                pass_logits = [z[:, k] for k in range(len(chunk))]
                if temperature_scale:
                    hz, held_labels = predict_logits(wide, held.eval, batch_size=batch_size, precision=precision,
                                                     sharded=True)
                    pass_held = [hz[:, k] for k in range(len(chunk))]
            else:
                pass_logits, pass_held = [], []
                for member, model in zip(chunk, models):
                    run = compiled(model, compile)
                    if member.recalibrate:
                        recalibrated |= recalibrate_bn(run, data.train, batch_size=batch_size,
                                                       max_batches=bn_batches, precision=precision, sharded=True,
                                                       bn_data=bn_data)
                    z, labels = predict_logits(run, data.eval, batch_size=batch_size, precision=precision,
                                               sharded=True)
                    pass_logits.append(z)
                    if temperature_scale:
                        hz, held_labels = predict_logits(run, held.eval, batch_size=batch_size,
                                                         precision=precision, sharded=True)
                        pass_held.append(hz)
            for k, (member, model) in enumerate(zip(chunk, models)):
                logits = pass_logits[k]
                probs = probabilities(logits, 1)
                m = summarize(probs, labels)
                m["loss"] = m["nll"] + l2_term(model, float(member.meta.config.get("wd", 0.0)))
                rows.append({"label": member.label, "path": member.source, "sha256": member.sha256, **m})
                ens = probs if ens is None else ens + probs
                running.append(summarize(ens / len(rows), labels))
                if temperature_scale:
                    eval_logits.append(logits)
                    held_logits.append(pass_held[k])
                if output:
                    weights.append(ParamLayout.of(model).flatten(dict(model.named_parameters())).cpu())
                    buffers.append({n: b.detach().cpu().clone() for n, b in state_buffers(model).items()})
                model.to("cpu")
                bar.advance(task)
    if not recalibrated:
        unused_bn_options(bn_batches, bn_data, "here: only the points of a curve (--num-points) whose network has "
                          "BatchNorm statistics get a BatchNorm pass; checkpoints and members keep theirs")
    split = data.eval_split
    final = rows[0] if len(rows) == 1 else running[-1]  # one network: its own metrics, with its loss
    result = EvaluateResult(command=command, split=split, dataset=data.info.name, samples=len(data.eval),
                            members=len(rows),
                            metrics={"train": None, "eval": Metrics.of(final), "calibrated": None},
                            models=[MemberMetrics(r["label"], r["path"], r["sha256"], Metrics.of(r)) for r in rows])
    if temperature_scale:
        temp = fit_temperature(held_logits, held_labels)
        cal = torch.stack([probabilities(z / temp, 1) for z in eval_logits]).mean(0)
        result.metrics["calibrated"] = Metrics.of(summarize(cal, labels))
        warning = None
        if any(m.meta.config.get("split") != "val" for m in members):
            warning = ("some members were trained on the images the temperature was fitted on (they were not "
                       "trained with --split val), so the temperature is fitted to training data and is likely "
                       "too low.")
            warn(f"temperature scaling: {warning}")  # also in --json, as calibration.warning
        result.calibration = Calibration(temp, warning)
    inputs = {m.source: m.sha256 for m in members}
    result.inputs = file_refs(inputs)
    result.outputs = {"ensemble": None, "metrics": None}
    if output:  # (first: a run stopped between the two leaves no metrics of an ensemble file that is not there)
        layout = ParamLayout.of(members[0].make())
        ens_file = Ensemble(as_ensemble_meta(first, inputs),
                            layout, torch.stack(weights), buffers, [{"source": r["label"]} for r in rows])
        # what the members agree on is the ensemble's: a member evaluated from the file (evaluate, point --index)
        # then has the loss with its weight decay, and its split, as evaluated from its own file
        shared = {}
        for k in ("wd", "split"):
            values = [m.meta.config.get(k) for m in members]
            if values[0] is not None and all(v == values[0] for v in values):
                shared[k] = values[0]
        save_ensemble(output, ens_file, {"inputs": list(paths), "num_points": num_points, **shared})
        result.outputs["ensemble"] = FileRef.of(output)
    if metrics:
        col = lambda rs, key: np.array([r[key] for r in rs], dtype=np.float64)  # noqa: E731
        keys = ("nll", "err", "ece", "brier")
        datasets = {f"members/{split}/{key}": (col(rows, key), ("member",)) for key in ("loss", *keys)}
        datasets.update({f"ensemble/{split}/{key}": (col(running, key), ("member",)) for key in keys})
        if temperature_scale:
            datasets.update({f"ensemble/{split}/calibrated/{k}": (np.array([getattr(result.metrics["calibrated"], k)]),
                                                                  ()) for k in keys})
        recalibration = {"bn_batches": bn_batches, "bn_data": bn_data} if recalibrated else {}
        attrs = {**provenance(inputs,
                              {"dataset": name, "split": split, "precision": precision, "num_points": num_points,
                               "temperature_scale": temperature_scale, **recalibration}, "evaluate",
                              [inputs[str(p)] for p in paths] if all(str(p) in inputs for p in paths) else None),
                 "member_labels": json.dumps([r["label"] for r in rows]), "num_members": len(rows), "split": split,
                 "data_fingerprint": data.fingerprint}
        if temperature_scale:
            attrs["temperature"] = result.calibration.temperature
        write_h5(metrics, scales={"member": np.arange(1, len(rows) + 1)}, datasets=datasets, attrs=attrs)
        result.outputs["metrics"] = FileRef.of(metrics)
    result.seconds = time.time() - t0
    return result
