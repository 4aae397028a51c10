"""``mctool hessian``: curvature of the training loss: top Hessian eigenvalues and the trace
(docs/method.md#hessian).

The loss is the mean cross-entropy over a fixed subset of the un-augmented training set, with the network
in eval mode (BatchNorm uses its running statistics, recomputed at every point of a curve; dropout is off).
Its Hessian is never formed: Hessian-vector products (double backward through ``functional_call`` on the
flat parameter vector) feed ARPACK's implicitly restarted Lanczos method (``scipy.sparse.linalg.eigsh``)
for the top-k eigenvalues, and Rademacher probes give Hutchinson's estimate of the trace.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from . import distributed
from .bn import (bn_data_setting, bn_modules, bn_pass_setting, check_bn_batch_size, check_bn_data, recalibrate_bn,
                 unused_bn_options)
from .checkpoint import load_model, read_metadata, read_vectors, save_vectors
from .curve_eval import curve_from_files
from .data import Split, check_fits, load_data
from .ensembles import load_ensemble
from .errors import ConfigError
from .fileio import check_output, check_outputs, holds_output_locks
from .flat import ParamLayout, load_buffers, state_buffers
from .h5io import kept_attrs, open_outputs, provenance, read_h5, record_data, write_h5
from .loop import recorded_file, recorded_split, relative_to_output
from .options import MAX_ITERATIONS, MAX_POINTS, MAX_SAMPLES, check_count, check_real, check_seed, file_list
from .points import PointRun, finishing, from_the_first_write
from .results import FileRef, HessianResult, file_refs
from .calls import library_call
from .runtime import resolve_device
from .console import warn

#: A residual is relative to its eigenvalue, but not to less than this fraction of the point's largest |lambda|.
RESIDUAL_FLOOR = 1e-3


@dataclass
class Points:
    """The networks to analyse: ``kind`` ``model`` (one network), ``curve`` (points at ``t`` along a curve or
    segment; BN statistics recomputed at each) or ``ensemble`` (each member, with its own statistics)."""

    kind: str
    labels: list[str]
    coords: np.ndarray  # t along a curve, else the member's number (0-based)
    weights: Callable[[int], torch.Tensor]  # flat parameters of point i (on the CPU)
    buffers: Callable[[int], dict[str, torch.Tensor]]
    layout: ParamLayout
    model: nn.Module
    meta: Any
    inputs: dict[str, str]
    recalibrate: bool


def _points(paths: list[str], num_points: int) -> Points:
    kind = read_metadata(paths[0]).get("kind") if len(paths) == 1 else None
    if kind == "ensemble":
        ens = load_ensemble(paths[0])
        return Points("ensemble", [f"{paths[0]}#{i}" for i in range(len(ens))], np.arange(len(ens), dtype=float),
                      lambda i: ens.members[i], lambda i: ens.buffers[i], ens.layout, ens.network(0), ens.meta,
                      {str(ens.path): ens.sha256}, recalibrate=False)
    if len(paths) == 1 and kind not in ("curve", "curve-state"):
        m = load_model(paths[0])
        layout = ParamLayout.of(m.model)
        w = layout.flatten(dict(m.model.named_parameters()))
        bufs = state_buffers(m.model)
        return Points("model", [str(paths[0])], np.zeros(1), lambda i: w, lambda i: bufs, layout, m.model, m.meta,
                      {str(m.path): m.sha256}, recalibrate=False)
    if len(paths) > 2:
        raise ConfigError(f"give one model checkpoint, curve file or ensemble file, or two model checkpoints (the "
                          f"segment between them), not {len(paths)} files.")
    curve = curve_from_files(paths, "'mctool hessian FILE' analyses the network")  # a curve file, or a segment
    t = np.linspace(0.0, 1.0, num_points)

    def at(i: int) -> torch.Tensor:
        return curve.weights(t[i])

    inputs = curve.meta.inputs if curve.path is None else {str(curve.path): curve.sha256}
    return Points("curve", [f"t={x:.4g}" for x in t], t, at, lambda i: curve.buffers, curve.layout,
                  curve.build_model(), curve.meta, inputs, recalibrate=True)


def _check_memory(p: int, n: int, top_k: int, eigenvectors: bool) -> None:
    """Refuse, before any file is written, a run whose Lanczos basis (ARPACK keeps max(2k + 1, 20) float64
    vectors of the P parameters) or ``--eigenvectors`` array (points x k x P float32) cannot fit in memory."""
    lanczos = 8 * p * max(2 * top_k + 1, 20)
    vectors = 4 * n * top_k * p if eigenvectors else 0
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return
    if lanczos + vectors > 0.8 * ram:
        def size(b: float) -> str:
            return f"{b / 2 ** 30:,.1f} GiB" if b >= 2 ** 30 else f"{b / 2 ** 20:,.1f} MiB"

        also = f" and the --eigenvectors array {size(vectors)} ({n} points x {top_k} x {p:,})" if vectors else ""
        raise ConfigError(f"--top-k {top_k} needs a Lanczos basis of {size(lanczos)} for {p:,} "
                          f"parameters{also}, more than this machine's {size(ram)} of memory can hold; "
                          "lower --top-k" + (", --num-points, or leave out --eigenvectors." if vectors else "."))


def _hard_sigmoid(x: torch.Tensor) -> torch.Tensor:
    return F.relu6(x + 3.0) / 6.0  # nn.Hardsigmoid's function, with a derivative of its backward


@contextlib.contextmanager
def _twice_differentiable(model: nn.Module):
    """Run ``model`` with operations that have a derivative of their backward, which a Hessian-vector product
    needs: ``scaled_dot_product_attention`` (timm's ViT, DeiT, ...) on its math kernel (the fused ones, flash
    attention on the CPU too and memory-efficient attention, have none), and ``nn.Hardsigmoid`` (the gates of
    timm's MobileNetV3 and GhostNet) as ``relu6(x + 3) / 6`` (the same function)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        attention = sdpa_kernel(SDPBackend.MATH)
    except ImportError:  # torch < 2.3: the older switch, for CUDA's fused kernels (CPU flash attention stays on)
        attention = torch.backends.cuda.sdp_kernel(enable_flash=False, enable_mem_efficient=False, enable_math=True)
    gates = [m for m in model.modules() if isinstance(m, nn.Hardsigmoid)]
    for m in gates:
        m.forward = _hard_sigmoid  # (an instance attribute: the class's forward is back once it is deleted)
    try:
        with attention:
            yield
    finally:
        for m in gates:
            del m.forward


class LossHessian:
    """Hessian-vector products of the mean cross-entropy of ``model`` over ``batches`` at the flat parameters
    ``w`` (eval mode). ``calls`` counts the products; ``on_product`` is called with that count after each."""

    def __init__(self, model: nn.Module, layout: ParamLayout, w: torch.Tensor,
                 batches: list[tuple[torch.Tensor, torch.Tensor]], on_product: Callable[[int], None] | None = None):
        self.model, self.layout, self.w, self.batches = model.eval(), layout, w, batches
        self.n = sum(int(y.shape[0]) for _, y in batches)
        self.calls = 0
        self.on_product = on_product

    def loss(self, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(self.model, self.layout.views(w), (x,)).float(), y,
                               reduction="sum") / self.n

    def hvp(self, v: torch.Tensor) -> torch.Tensor:
        """H v, summed batch by batch (float32, on the parameters' device)."""
        self.calls += 1
        out = torch.zeros_like(self.w)
        with _twice_differentiable(self.model):
            for x, y in self.batches:
                w = self.w.detach().requires_grad_(True)
                (g,) = torch.autograd.grad(self.loss(w, x, y), w, create_graph=True)
                (hv,) = torch.autograd.grad(g @ v, w)
                out += hv
        if self.on_product is not None:
            self.on_product(self.calls)
        return out

    def top_eigen(self, k: int, *, tol: float, max_restarts: int, seed: int) -> tuple[np.ndarray, np.ndarray, bool]:
        """The ``k`` largest (algebraic) eigenvalues, descending, their unit eigenvectors ``[P, k]`` and whether
        ARPACK converged (if not, the pairs that did are returned and the rest are NaN)."""
        from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

        p = self.w.numel()
        dev = self.w.device

        def matvec(v: np.ndarray) -> np.ndarray:
            hv = self.hvp(torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32).reshape(-1)).to(dev))
            return hv.double().cpu().numpy()

        op = LinearOperator((p, p), matvec=matvec, dtype=np.float64)
        v0 = np.random.default_rng(seed).standard_normal(p)
        converged = True
        try:
            vals, vecs = eigsh(op, k=k, which="LA", v0=v0, tol=tol, maxiter=max_restarts)
        except ArpackNoConvergence as e:
            vals, vecs, converged = e.eigenvalues, e.eigenvectors, False
        order = np.argsort(vals)[::-1]
        out_vals, out_vecs = np.full(k, np.nan), np.full((p, k), np.nan)
        out_vals[:len(order)], out_vecs[:, :len(order)] = vals[order], vecs[:, order]
        return out_vals, out_vecs, converged

    def residuals(self, vals: np.ndarray, vecs: np.ndarray) -> np.ndarray:
        """||H v - lambda v|| / max(|lambda|, RESIDUAL_FLOOR * the largest |lambda| of the point) of each pair (NaN
        for a missing pair): how well it has converged. An eigenvalue of (about) 0, e.g. along a direction a
        BatchNorm layer makes flat, has no relative error: it is measured against the point's scale instead."""
        out = np.full(len(vals), np.nan)
        found = np.abs(vals[np.isfinite(vals)])
        floor = max(RESIDUAL_FLOOR * float(found.max()) if len(found) else 0.0, 1e-30)
        for j, lam in enumerate(vals):
            if np.isfinite(lam):
                v = torch.from_numpy(vecs[:, j].astype(np.float32)).to(self.w.device)
                r = self.hvp(v).double() - lam * v.double()
                out[j] = float(r.norm()) / max(abs(lam), floor)
        return out

    def trace(self, samples: int, seed: int) -> tuple[float, float]:
        """Hutchinson's estimate E[z^T H z] over Rademacher z: the mean and its standard error."""
        g = torch.Generator().manual_seed(seed)
        values = []
        for _ in range(samples):
            z = (torch.randint(0, 2, (self.w.numel(),), generator=g).float() * 2 - 1).to(self.w.device)
            values.append(float(z.double() @ self.hvp(z).double()))
        mean = float(np.mean(values))
        stderr = float(np.std(values, ddof=1) / math.sqrt(samples)) if samples > 1 else float("nan")
        return mean, stderr


def _recorded_eigenvectors(metrics: Path) -> str | None:
    """The eigenvector file an interrupted run wrote (its metrics file records it, relative to its own folder),
    for a ``--resume`` that leaves ``--eigenvectors`` out: the run goes on as it started, as the training
    commands take a recorded option. None when there is none (or the file is unreadable: the resume says so)."""
    try:
        name = read_h5(metrics)[1].get("eigenvectors")
    except Exception:  # (a missing or broken metrics file is open_outputs' to report)
        return None
    path = recorded_file(name, metrics)
    return None if path is None else str(path)


def _none_for_nan(values: np.ndarray) -> list:
    """``values`` as (nested) lists with None where a value was not found (NaN), as the result documents."""
    return np.where(np.isnan(values), None, values.astype(object)).tolist()


@library_call
@holds_output_locks
def hessian(paths: Sequence[str | Path], metrics: str | Path, *, top_k: int = 5, trace: bool = False,
            trace_samples: int = 20, num_points: int = 11, train_subset: int | None = 5000, batch_size: int = 512,
            tol: float = 1e-4, max_restarts: int = 100, seed: int = 0, eigenvectors: str | Path | None = None,
            bn_batches: int | None = None, resume: bool = False, force: bool = False, device: str = "auto",
            dataset: str | None = None, data_root: str | Path | None = None, download: bool = False,
            num_workers: int = 4, bn_data: str = "augmented", plot: str | Path | None = None,
            quiet: bool = False) -> HessianResult:
    """Top-``top_k`` eigenvalues (and with ``trace`` Hutchinson's trace from ``trace_samples`` probes) of the
    training loss's Hessian, at one network, at ``num_points`` points along a curve or segment, or at each
    member of an ensemble. ``train_subset`` training images (None or 0: all) define the loss; ``eigenvectors``
    writes the unit eigenvectors (``[points, k, P]``) as safetensors. ``bn_data``: the images of the BN passes
    at curve points (docs/method.md#bn). ``plot``: also draw the eigenvalues (and trace) to this figure, as
    ``mctool plot`` draws the metrics file."""
    t0 = time.time()
    paths = file_list(paths, "paths")
    check_count("--top-k", top_k, 1, 1000)
    check_count("--trace-samples", trace_samples, 2, MAX_SAMPLES)
    check_count("--num-points", num_points, 2, MAX_POINTS)
    check_count("--train-subset", train_subset, 0)  # 0: all training images, as the CLI documents
    train_subset = train_subset or None
    check_count("--batch-size", batch_size)
    check_count("--max-restarts", max_restarts, 1, MAX_ITERATIONS)
    check_count("--bn-batches", bn_batches)
    check_bn_data(bn_data)
    check_real("--tol", tol, 0, 1, low_open=True, high_open=True)
    seed = check_seed(seed)
    metrics = Path(metrics)
    adopted = eigenvectors is None and resume and (eigenvectors := _recorded_eigenvectors(metrics)) is not None
    if eigenvectors is not None and distributed.current() is not None:
        raise ConfigError("--eigenvectors is for a run of one process (not under torchrun)" +
                          (f"; the interrupted run wrote them to '{eigenvectors}' (recorded in '{metrics}'): resume "
                           "it in one process." if adopted else "."))
    pts = _points(paths, num_points)
    p = pts.layout.size
    if top_k >= p:
        raise ConfigError(f"--top-k must be below the number of parameters ({p:,}), got {top_k}.")
    name = pts.meta.dataset_or(dataset, paths[0])
    # The training images the network was trained on: with --split val its held-out images stay out.
    split = recorded_split(pts.meta.config) or "test"
    n = len(pts.labels)
    buffers = [b for b, _ in pts.model.named_buffers()]
    if not pts.recalibrate:
        unused_bn_options(bn_batches, bn_data, "to checkpoints and ensemble members, which keep their stored "
                          "BatchNorm statistics")
    config = {"top_k": top_k, "trace": trace, "trace_samples": trace_samples if trace else None, "num_points": n,
              "train_subset": train_subset, "dataset": name, "tol": tol, "max_restarts": max_restarts,
              "seed": seed, "bn_batches": bn_batches, "points_kind": pts.kind,
              "bn_batch_size": bn_pass_setting(buffers, batch_size) if pts.recalibrate else None,
              "bn_data": bn_data_setting(buffers, bn_data, bn_batches) if pts.recalibrate else None,
              **({"split": split} if split != "test" else {})}  # (files of mctool 0.2.0 record none: test)
    shapes = {"eigenvalues": (n, top_k), "residuals": (n, top_k), "hvps": (n,)}
    if trace:
        shapes |= {"trace": (n,), "trace_stderr": (n,)}
    _check_memory(p, n, top_k, eigenvectors is not None)
    old, started, _, draw = open_outputs(metrics, pts.inputs, config, resume=resume, force=force, plot=plot,
                                         shapes=shapes)
    vec_path = Path(eigenvectors) if eigenvectors is not None else None
    values = {k: np.full(s, np.nan) for k, s in shapes.items()}
    values |= {k: np.asarray(old[k], dtype=np.float64) for k in shapes if k in old}
    vectors = np.full((n, top_k, p), np.nan, dtype=np.float32) if vec_path is not None else None
    if vec_path is not None:
        check_outputs({"--metrics": metrics, "--eigenvectors": vec_path, "--plot": plot}, list(pts.inputs),
                      force=True, formats={"--metrics": "hdf5", "--eigenvectors": "safetensors", "--plot": "figure"})
        if resume and vec_path.exists():
            vectors = read_vectors(vec_path, "eigenvectors", kind="hessian-eigenvectors", layout=pts.layout,
                                   inputs=pts.inputs, config=config, shape=vectors.shape,
                                   what="eigenvectors").numpy().copy()
        else:
            check_output(vec_path, force or resume, "--eigenvectors")
    attrs = {**provenance(pts.inputs, config, "hessian"), "points_kind": pts.kind, "parameters": p,
             "labels": "\n".join(pts.labels), "loss": "mean cross-entropy over the training subset, eval mode "
             "(no weight decay: the training objective's eigenvalues are these plus wd)"}
    if vec_path is not None:  # (relative to the metrics file's folder: a --resume that leaves it out finds it)
        attrs["eigenvectors"] = relative_to_output(vec_path, metrics)
    if started:
        attrs["started"] = started
    if resume:  # (kept when no point is left to compute: no data set is loaded then)
        attrs |= kept_attrs(metrics)

    def write() -> None:
        scale = "t" if pts.kind == "curve" else "point"
        write_h5(metrics, scales={scale: pts.coords, "k": np.arange(1, top_k + 1, dtype=float)},
                 datasets={k: (v, (scale,) if v.ndim == 1 else (scale, "k")) for k, v in values.items()},
                 attrs=attrs)
        if vectors is not None and distributed.is_main():
            save_vectors(vec_path, "eigenvectors", torch.from_numpy(vectors),  # float32 already: no copy
                         kind="hessian-eigenvectors", layout=pts.layout, inputs=pts.inputs, config=config)

    def missing(i: int) -> bool:  # (with --eigenvectors, also a point whose vectors were never written)
        return bool(np.isnan(values["hvps"][i]) or (trace and np.isnan(values["trace"][i]))
                    or (vectors is not None and np.isnan(vectors[i]).all()))

    todo = distributed.broadcast_object([i for i in range(n) if missing(i)])
    if todo:
        dev = resolve_device(device)
        data = load_data(name, root=data_root, split=split, download=download, device=dev,
                         augment=pts.meta.train_augment(), **pts.meta.data_options(), num_workers=num_workers)
        check_fits(pts.meta, data.info, paths[0])
        record_data(attrs, data, name, metrics if resume else None)
        subset: Split = data.train.subset(train_subset) if train_subset else data.train
        attrs["train_images"] = len(subset)  # (fewer than --train-subset where the data set is smaller)
        batches = list(subset.batches(batch_size))
        model = pts.model.to(dev)
        has_bn = bool(bn_modules(model))
        if pts.recalibrate:
            check_bn_batch_size(model, batch_size)
        def measure(i: int) -> dict[str, Any]:
            load_buffers(model, {k: b.to(dev) for k, b in pts.buffers(i).items()})
            w = pts.weights(i).to(dev)
            pts.layout.assign(model, w)
            if pts.recalibrate and has_bn:
                recalibrate_bn(model, data.train, batch_size=batch_size, max_batches=bn_batches, bn_data=bn_data)
            # Lanczos runs an unknown number of products: show them, so a long point visibly moves.
            h = LossHessian(model, pts.layout, w, batches,
                            on_product=lambda c: run.note(f"{pts.labels[i]}: {c} Hessian-vector products"))
            vals, vecs, converged = h.top_eigen(top_k, tol=tol, max_restarts=max_restarts, seed=seed + i)
            if not converged:
                warn(f"{pts.labels[i]}: ARPACK did not converge for all {top_k} eigenvalues within "
                     f"--max-restarts {max_restarts}; the others are NaN.")
            out: dict[str, Any] = {"eigenvalues": vals.tolist(), "residuals": h.residuals(vals, vecs).tolist()}
            if trace:
                out["trace"], out["trace_stderr"] = h.trace(trace_samples, seed + i)
            out["hvps"] = h.calls
            if vectors is not None:
                vectors[i] = vecs.T.astype(np.float32)
            return out

        def store(i: int, m: dict[str, Any]) -> None:
            for k in values:
                values[k][i] = m[k]

        run = PointRun("hessian", total=n, metrics=metrics, quiet=quiet, counted=("hvps",))
        distributed.sync("the checks before the first write")  # a run refused on any rank writes no file
        with from_the_first_write(metrics, n, attrs["started"], ("hvps",), replaced_figure=plot if draw else None):
            write()
            run.run(todo, lambda points: [measure(i) for i in points], store,
                    lambda i, m: f"{pts.labels[i]} top eigenvalue {m['eigenvalues'][0]:.4g}", flush=write)
    else:  # nothing left to compute: the count recorded by the run that computed the points
        images = read_h5(metrics)[1].get("train_images") if metrics.exists() else None
        if images is not None:
            attrs["train_images"] = images
    if todo:  # (a resume with nothing to compute leaves the files as they are, with their provenance)
        write()
    images = attrs.get("train_images")
    if train_subset is not None and isinstance(images, (int, np.integer)) and 0 < images < train_subset:
        train_subset = int(images)  # the data set holds fewer training images than asked for: all of them
    result = HessianResult(command="hessian", inputs=file_refs(pts.inputs), metrics={"train": None, "eval": None},
                           split=split,
                           points_kind=pts.kind, num_points=n,
                           top_k=top_k, parameters=p, train_subset=train_subset,
                           t=pts.coords.tolist() if pts.kind == "curve" else None,
                           eigenvalues=_none_for_nan(values["eigenvalues"]),
                           trace=_none_for_nan(values["trace"]) if trace else None,
                           trace_stderr=_none_for_nan(values["trace_stderr"]) if trace else None,
                           hvps=int(np.nansum(values["hvps"])))
    if draw and distributed.is_main():
        from .plots import plot_hessian

        with finishing(metrics, n):  # Ctrl-C now: every point is saved, --resume draws it
            plot_hessian(metrics, plot)
    result.outputs = {"metrics": FileRef.of(metrics),
                      "eigenvectors": FileRef.of(vec_path) if vec_path is not None else None,
                      "plot": FileRef.of(plot) if plot is not None else None}
    result.seconds = time.time() - t0
    return result
