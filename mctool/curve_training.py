"""``mctool connect``: learning a low-loss curve between two networks (docs/method.md#training).

One SGD step (``CurveStep``) draws t, forms w(t) from the control points, runs the unchanged network on it
with ``torch.func.functional_call`` and updates the free control points; ``connect`` runs it in the shared
resumable loop (``loop.fit``) and writes the curve file. Curve mathematics and the file format are in
``curves.py``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .align import METHODS as ALIGN_METHODS, align_networks
from .bn import bn_modules, use_sync_bn
from .checkpoint import MOMENTUM_PREFIX, check_finite, load_model
from .curves import (BEND_INITS, MAX_BENDS, Curve, check_two_networks, coefficients, initial_points, line_between,
                     save_curve)
from .data import check_fits, check_same_data_as, load_data
from .errors import CheckpointError, ConfigError
from .fileio import check_outputs, holds_output_locks, same_inputs
from .graphs import GraphedStep, set_lr, sgd, use_graphs
from .h5io import MetricsLog, provenance, utc_now
from .loop import (TRAIN_LR, GradSum, adopt_recorded, fill_from_record, finishing, fit, history_json,
                   old_run_remover, prepare_outputs, recorded_lr, relative_to_output, remove_state, resumed_metrics,
                   state_path, train_mode, validate_sgd)
from .options import check_count
from .results import ConnectResult, FileRef, Metrics, file_refs
from .calls import library_call
from .runtime import autocast, maybe_compile, resolve_device, training_command


def _interpolate(points: torch.Tensor, c: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """w = sum_k c_k W_k into ``out``, for coefficients c that sum to 1; returns ||w||^2.

    S_0 = W_0, S_k = lerp(S_{k-1}, W_k, c_k / (c_0 + ... + c_k)): K - 1 passes. Where the running sum is
    still 0 so is c_k, and the next nonzero c_k has weight 1, which gives exactly W_k. (Compiled, the
    interpolations and the norm become one pass.)
    """
    r = c / c.cumsum(0).clamp_min(torch.finfo(c.dtype).tiny)
    torch.lerp(points[0], points[1], r[1], out=out)
    for k in range(2, points.shape[0]):
        out.lerp_(points[k], r[k])
    return torch.dot(out, out)


def _free_point_grads(grads: list[torch.Tensor], w: list[torch.Tensor], c_free: list[torch.Tensor],
                      wd: float) -> list[list[torch.Tensor]]:
    """Per parameter, c_j (g + wd w) for each free point j, from the network's gradients g at w (two
    multi-tensor passes; compiled, one). The last free point's gradients reuse the storage of ``grads``."""
    if wd:
        torch._foreach_add_(grads, w, alpha=wd)
    rows = [torch._foreach_mul(grads, c) for c in c_free[:-1]]
    torch._foreach_mul_(grads, c_free[-1])
    return rows + [grads]


class CurveStep:
    """One training step of a curve: draw t ~ U(0, 1), form w(t) = sum_k c_k(t) W_k, run the base network on
    it with ``functional_call``, minimise CE + 0.5 wd ||w(t)||^2 and step only the free control points (SGD
    with momentum; no optimiser weight decay).

    For wide networks every pass over the P parameters counts (VGG16: 15M parameters, 61 MB per pass,
    where a whole training step takes 2-4 ms on a GPU), so the step makes few of them:

    - All K control points live in one ``[K, P]`` tensor on the device. Since the coefficients sum to one,
      w(t) is a chain of K - 1 interpolations (``lerp``) into one preallocated vector, with no autograd
      graph behind it (``_interpolate``).
    - The network sees per-parameter leaves that share w's storage; their gradients g_i stay per parameter
      (no concatenation into a flat gradient), and the free point j gets c_j (g + wd w) from two
      multi-tensor passes (``_free_point_grads``). Its parameters are views into its row of the ``[K, P]``
      tensor, so SGD updates the row in place, and their momentum buffers are views of one ``[n_free, P]``
      tensor.

    Eagerly, a deep and narrow network's step is bound by host work, so whatever can be is made once: the
    views of w and the leaves (every step rewrites w in place), and the name -> leaf mapping that
    ``functional_call`` gets (parameters only, under every name the network reaches them by, so tied
    weights stay tied without a search at every step).

    With ``cuda_graphs`` the step is replayed as a CUDA graph (``graphs.GraphedStep``); t is drawn outside
    it, from the same device RNG, so both paths see the same t. When the network's convolution weights
    are channels-last, the control points are kept on the device in that memory order too (so the
    per-parameter views are channels-last without a copy per step); ``points()`` and ``momentum()``
    return them in the file order.

    With ``compile`` both helpers run through ``torch.compile`` (``runtime.maybe_compile``), which fuses each
    into one pass over the parameters."""

    def __init__(self, model: nn.Module, curve: Curve, free_idx: list[int], *, wd: float, momentum: float,
                 precision: str = "fp32", cuda_graphs: bool = False, compile: bool = False):
        dev = next(model.parameters()).device
        self.model, self.curve, self.wd, self.precision, self.device = model, curve, wd, precision, dev
        self.free_idx, self.cuda_graphs, self._use_momentum = list(free_idx), cuda_graphs, momentum != 0
        self._cl = curve.layout.channels_last_mask(model)
        self._points = self._reorder(curve.points.to(dev, torch.float32, copy=True), to_device_order=True)
        self._params = [[nn.Parameter(v) for v in self._views(self._points[j]).values()] for j in self.free_idx]
        self._momentum = torch.zeros(len(self.free_idx), curve.layout.size, device=dev)
        self._w = torch.empty(curve.layout.size, device=dev)  # w(t), rewritten in place by every step
        # Made once: per-parameter views of w, and leaves sharing their storage (so they always hold the
        # current w(t)) that the network runs on; their gradients stay separate (autograd.grad).
        self._w_views = list(self._views(self._w).values())
        self._leaves = [v.detach().requires_grad_() for v in self._w_views]
        # Every name the network reaches a parameter by (tied weights have several) maps to its leaf, so
        # functional_call need not look for ties at every step; the network's own buffers stay.
        named = dict(model.named_parameters())
        leaf_of = {id(named[n]): leaf for n, leaf in zip(curve.layout.names, self._leaves)}
        self._on_curve = {n: leaf_of[id(p)] for n, p in model.named_parameters(remove_duplicate=False)}
        self.opt = sgd([p for row in self._params for p in row], lr=0.0, momentum=momentum, wd=0.0, device=dev,
                       graphs=cuda_graphs)
        if self._use_momentum:  # SGD's first update from a zero buffer equals its own first step
            for row, buf in zip(self._params, self._momentum):
                for p, b in zip(row, self._views(buf).values()):
                    self.opt.state[p]["momentum_buffer"] = b
        self._t = torch.zeros((), device=dev)
        coefficients(curve.curve, curve.num_bends, self._t)  # caches its constants outside any graph capture
        self._interpolate = maybe_compile(_interpolate, compile, "the curve point w(t)")
        self._free_point_grads = maybe_compile(_free_point_grads, compile, "the control points' gradient")
        self._graphed = GraphedStep(self._body, enabled=cuda_graphs)
        # Distributed (docs/distributed.md): gradients summed over ranks, and t from a generator of its own,
        # so that every rank draws the same t for a global batch whatever dropout draws on its piece.
        self._grad_sum = GradSum.for_run(cuda_graphs)
        self._t_gen = torch.Generator(device=dev) if self._grad_sum is not None else None

    def start_epoch(self, seed: int) -> None:
        """Called by ``loop.fit`` at the start of each epoch with the epoch's seed."""
        if self._t_gen is not None:
            self._t_gen.manual_seed(seed)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        set_lr(self.opt, lr)
        # One t per global mini-batch, drawn from the (per-epoch seeded) RNG of the compute device: no host
        # sync. With the same seed a generator of its own gives the same t's as the default one, as long as
        # nothing else (dropout) draws from that.
        self._t.copy_(torch.rand((), device=self.device, generator=self._t_gen))
        return self._graphed(x, y)

    def _body(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = coefficients(self.curve.curve, self.curve.num_bends, self._t).float()
        sq_norm = self._interpolate(self._points, c, self._w)
        train_mode(self.model)  # BN uses batch statistics; running statistics are recomputed when evaluating
        with autocast(self.device, self.precision, cache=not self.cuda_graphs):
            out = functional_call(self.model, self._on_curve, (x,), tie_weights=False)
        loss = F.cross_entropy(out.float(), y) + 0.5 * self.wd * sq_norm
        # the network's gradient g at w, per parameter (zeros for a parameter the network left unused)
        grads = list(torch.autograd.grad(loss, self._leaves, materialize_grads=True))
        if self._grad_sum is not None:
            self._grad_sum(grads, y.shape[0])
        rows = self._free_point_grads(grads, self._w_views, [c[j] for j in self.free_idx], self.wd)
        for row, grads_j in zip(self._params, rows):
            for p, g in zip(row, grads_j):  # every step sets every .grad: no zero_grad needed
                p.grad = g
        self.opt.step()
        return loss.detach(), out.detach()

    def _views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.curve.layout.views(flat, self._cl)

    def _reorder(self, rows: torch.Tensor, to_device_order: bool) -> torch.Tensor:
        return self.curve.layout.to_memory_order(rows, self._cl, inverse=not to_device_order)

    def points(self) -> torch.Tensor:
        """All control points ``[K, P]`` on the CPU in file order, with the free ones as trained so far."""
        return self._reorder(self._points.to("cpu", copy=True), to_device_order=False)

    def momentum(self) -> torch.Tensor | None:
        """SGD momentum of the free points ``[n_free, P]`` on the CPU in file order (None without momentum)."""
        if not self._use_momentum:
            return None
        return self._reorder(self._momentum.to("cpu", copy=True), to_device_order=False)

    def set_momentum(self, buf: torch.Tensor) -> None:
        """Restore momentum saved by ``momentum()`` (file order)."""
        self._momentum.copy_(self._reorder(buf.to(self.device, torch.float32), to_device_order=True))


@dataclass
class ConnectConfig:
    """What determines a trained curve (recorded in its files). ``None`` means: take it from endpoint A."""

    curve: str = "bezier"
    num_bends: int | None = None  # default: 1, or 0 for a line (resolved by validate)
    epochs: int | None = None  # default: default_curve_epochs of A's record
    lr: float | None = None  # default: default_curve_lr of A's record and the curve's iterations
    wd: float | None = None  # default: A's recorded wd (the paper's curves use their endpoints' wd)
    momentum: float = 0.9
    batch_size: int = 128
    schedule: str = "paper"
    seed: int = 0
    bend_init: str = "linear"
    free_start: bool = False
    free_end: bool = False
    dataset: str | None = None
    augment: str | None = None  # default: A's recorded augmentation (auto if none)
    split: str | None = None  # default: A's recorded split, else test
    precision: str = "fp32"
    sync_bn: bool = False  # distributed: BN statistics over the whole global batch (docs/distributed.md)
    channels_last: bool = False
    cuda_graphs: bool = False  # how, not what: may differ on --resume
    deterministic: bool = False  # how, not what: may differ on --resume
    compile: bool = False  # how, not what: may differ on --resume
    save_every: int = 0
    # permute B's hidden units into A's order first (mctool align's method, with --seed); None: B as it is
    align: str | None = None
    # filled in by connect(): how each option left to its default was derived (None: none was)
    derived: dict[str, str] | None = None

    def validate(self) -> None:
        if self.num_bends is None:
            self.num_bends = 0 if self.curve == "line" else 1
        check_count("--num-bends", self.num_bends, 0)
        if self.num_bends > MAX_BENDS:  # what curve files may hold: a longer curve could not be read back
            raise ConfigError(f"--num-bends must be at most {MAX_BENDS}, got {self.num_bends}.")
        coefficients(self.curve, self.num_bends, 0.0)
        if self.bend_init not in BEND_INITS:
            raise ConfigError(f"--bend-init must be one of {', '.join(BEND_INITS)}, got '{self.bend_init}'.")
        validate_sgd(self)
        if self.schedule == "sse":
            raise ConfigError("--schedule sse (Snapshot Ensembles) is for train; use paper, cosine or constant.")
        if self.curve == "line" and (self.free_start or self.free_end):
            raise ConfigError("a line has nothing to train; --free-start/--free-end need a bezier or polychain curve.")
        if self.align is not None and self.align not in ALIGN_METHODS:
            raise ConfigError(f"--align must be one of {', '.join(ALIGN_METHODS)}, got {self.align!r}.")


#: The paper's curves train at 0.3 x their endpoints' learning rate (VGG16 0.05 -> 0.015, PreResNet164 and
#: WRN-28-10 0.1 -> 0.03), over 78,000 SGD iterations or more.
CURVE_LR_RATIO = 0.3


#: A shorter curve run keeps lr x iterations at (at least) this many iterations' worth of A's learning rate.
CURVE_LR_ITERS = 10_000


#: Epochs assumed for an endpoint that does not record them.
_UNRECORDED_EPOCHS = 200




def default_curve_epochs(train_epochs: int, batchnorm: bool) -> int:
    """connect's epochs for endpoints trained for ``train_epochs`` (docs/curves.md#training-a-curve-connect).

    The paper's recipes: as many as the endpoints with BatchNorm (PreResNet164, WRN-28-10: 200 -> 200),
    three times as many without (VGG16: 200 -> 600), which optimise more slowly.
    """
    return train_epochs if batchnorm else 3 * train_epochs


def default_curve_lr(train_lr: float, iterations: int) -> float:
    """connect's learning rate for a curve of ``iterations`` SGD steps between networks trained at ``train_lr``
    (docs/curves.md#training-a-curve-connect): ``train_lr * min(1, max(0.3, 10_000 / iterations))``.

    A long run (33,334 iterations or more; the paper's have 78,000 to 235,000) gets the paper's 0.3 x train_lr.
    The bends start on the segment, far from the low-loss path, and how far SGD moves them grows with
    lr x iterations; so a shorter run (a small data set has few iterations per epoch: digits has 12) keeps
    lr x iterations at 10,000 x train_lr, up to train_lr itself, at which the endpoints trained stably.
    """
    return train_lr * min(1.0, max(CURVE_LR_RATIO, CURVE_LR_ITERS / max(iterations, 1)))


@library_call
@holds_output_locks
@training_command(ConnectConfig)
def connect(cfg: ConnectConfig, start: str | Path, end: str | Path, output: str | Path,
            metrics: str | Path | None = None, *,
            device: str = "auto", data_root: str | Path | None = None, download: bool = False, num_workers: int = 4,
            resume: bool = False, force: bool = False, quiet: bool = False) -> ConnectResult:
    """Learn a low-loss curve from ``start`` to ``end`` (docs/method.md#training); ``ConnectConfig(curve="line")``
    writes the segment, with nothing to train.

    ``cfg`` is not changed: defaults taken from A are filled in on a copy."""
    t0 = time.time()
    cfg = replace(cfg)
    cfg.validate()
    output = Path(output)
    metrics = resumed_metrics(output, metrics, resume, "-connect")
    a, b = load_model(start), load_model(end)
    check_two_networks(a, b, "a curve from a network to itself would be trained for nothing")
    line = line_between(a, b)
    align_meta: dict[str, str] = {}

    def aligned_line() -> Curve:
        # B's units in A's order (after the output checks: it costs a matching): the curve ends at aligned B,
        # its recorded inputs stay A and B as given
        al = align_networks(a, b, method=cfg.align, seed=cfg.seed, dataset=cfg.dataset, device=device,
                            data_root=data_root, download=download, num_workers=num_workers, quiet=quiet)
        align_meta.update({"align_method": cfg.align, "align_groups": json.dumps(al.group_info()),
                           "align_permuted": "end"})
        return line_between(a, replace(b, model=al.model))

    derived = {}
    if cfg.epochs is None:
        train_epochs = a.meta.config.get("epochs")
        source = f"A's {train_epochs} epochs"
        if train_epochs is None:
            train_epochs, source = _UNRECORDED_EPOCHS, f"{_UNRECORDED_EPOCHS} epochs (A records none)"
        batchnorm = bool(bn_modules(a.model))
        cfg.epochs = default_curve_epochs(train_epochs, batchnorm)
        derived["epochs"] = f"{source} x {1 if batchnorm else 3} ({'with' if batchnorm else 'no'} BatchNorm)"
    derived |= fill_from_record(cfg, a.meta.config, "A", resume=resume)
    cfg.derived = derived or None
    cfg.dataset = cfg.dataset or a.meta.dataset
    if cfg.curve == "line":  # nothing to train: no metrics file
        check_outputs({"--output": output}, [start, end], force=force, formats={"--output": "safetensors"})
        if cfg.align is not None:
            line = aligned_line()
        save_curve(output, line, asdict(cfg), extra_meta=align_meta)
        return ConnectResult(command="connect", inputs=file_refs(line.meta.inputs),
                             outputs={"curve": FileRef.of(output), "metrics": None}, split=None,
                             metrics={"train": None, "eval": None}, seconds=time.time() - t0, curve="line",
                             num_bends=0, trained=False, epochs=None, config=asdict(cfg))
    if cfg.dataset is None:
        raise ConfigError(f"'{start}' does not record its data set; pass --dataset.")
    # mctool 0.1.0 recorded bend_init as "init" (its connect --init): such interrupted runs still resume
    resume_state = prepare_outputs(output, metrics, asdict(cfg), resume=resume, force=force,
                                   state_kind="curve-state", renamed={"init": "bend_init"}, inputs=[start, end])
    adopt_recorded(cfg, resume_state, renamed={"init": "bend_init"})
    cfg.split = cfg.split or "test"  # a state of a version that did not record it
    if cfg.align is not None:
        line = aligned_line()

    dev = resolve_device(device)
    data = load_data(cfg.dataset, root=data_root, split=cfg.split, download=download, device=dev,
                     augment=cfg.augment, channels_last=cfg.channels_last, num_workers=num_workers,
                     **a.meta.data_options())
    check_fits(a.meta, data.info, start)
    if resume_state is not None:
        check_same_data_as(resume_state[1].get("data_fingerprint"), data, cfg.dataset, state_path(output))
    if cfg.lr is None:  # needs the number of iterations, so the data
        iterations = cfg.epochs * data.train.num_batches(cfg.batch_size)
        train_lr = recorded_lr(a.meta.config)
        source = f"A's training lr {train_lr!r}"
        if train_lr is None:
            train_lr, source = TRAIN_LR, f"{TRAIN_LR!r} (A records none)"
        cfg.lr = default_curve_lr(train_lr, iterations)
        derived["lr"] = (f"{source} x min(1, max({CURVE_LR_RATIO}, {CURVE_LR_ITERS} / {iterations} iterations)) "
                         f"= x {cfg.lr / train_lr:.4g}")
        cfg.derived = derived
    points = initial_points(line, cfg.curve, cfg.num_bends, cfg.bend_init)
    curve = Curve(cfg.curve, cfg.num_bends, points, line.layout, line.meta, line.buffers)
    log = MetricsLog(metrics, "epoch", ["lr", "train/loss", "train/err", "seconds"],
                     {**provenance(line.meta.inputs, asdict(cfg), "connect"), "curve": cfg.curve,
                      "num_bends": cfg.num_bends, "split": cfg.split, "data_fingerprint": data.fingerprint})
    start_epoch, momentum = 0, None
    if resume_state is not None:
        tensors, md = resume_state
        if not same_inputs(json.loads(md.get("inputs", "{}")), line.meta.inputs):
            raise ConfigError(f"the interrupted run connected other files (or they changed since): "
                              f"{md.get('inputs')}; --resume needs the same endpoints.")
        saved, momentum = tensors.get("control_points"), tensors.get(MOMENTUM_PREFIX + "free")
        n_free = curve.num_points - 2 + cfg.free_start + cfg.free_end
        if (saved is None or saved.shape != curve.points.shape or not saved.is_floating_point()
                or (momentum is not None and momentum.shape != (n_free, curve.points.shape[1]))):
            raise CheckpointError(f"'{state_path(output)}' does not fit this curve (control points "
                                  f"{tuple(curve.points.shape)}); start over with --force.")
        if cfg.momentum and momentum is None:
            raise CheckpointError(f"'{state_path(output)}' has no optimizer momentum ('{MOMENTUM_PREFIX}free'): "
                                  "resuming would restart it from zero; start over with --force.")
        check_finite(state_path(output), {"control_points": saved, **({} if momentum is None else
                                                                       {MOMENTUM_PREFIX + "free": momentum})})
        # (A is never permuted: a start that differs means swapped endpoints, not another --align)
        if not cfg.free_start and not torch.equal(saved[0].float(), curve.points[0]):
            raise CheckpointError(f"'{state_path(output)}' starts at another network than A: give the endpoints in "
                                  "the interrupted run's order, or start over with --force.")
        if not cfg.free_end and not torch.equal(saved[-1].float(), curve.points[-1]):
            raise CheckpointError(f"'{state_path(output)}' ends at another network than "
                                  f"{'B aligned to A' if cfg.align else 'B'}: resume with the interrupted run's "
                                  "--align, or start over with --force.")
        curve.points = saved.float()
        start_epoch = int(md["epoch"])
        log.rows = json.loads(md["history"])
        log.attrs["started"] = md.get("started", log.attrs["started"])

    free_idx = [i for i in range(curve.num_points) if (0 < i < curve.num_points - 1) or (i == 0 and cfg.free_start)
                or (i == curve.num_points - 1 and cfg.free_end)]
    model = use_sync_bn(curve.build_model().to(dev), cfg.sync_bn, dev)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    step = CurveStep(model, curve, free_idx, wd=cfg.wd, momentum=cfg.momentum, precision=cfg.precision,
                     cuda_graphs=use_graphs(cfg.cuda_graphs, dev), compile=cfg.compile)
    if momentum is not None:
        step.set_momentum(momentum)

    def save_state(epoch: int, path: Path, kind: str) -> None:
        mom = step.momentum()
        extra = {MOMENTUM_PREFIX + "free": mom} if mom is not None else {}
        snap = Curve(curve.curve, curve.num_bends, step.points(), curve.layout, curve.meta, curve.buffers)
        save_curve(path, snap, asdict(cfg), extra, {"epoch": str(epoch), "history": history_json(log.rows),
                                                    "started": log.attrs["started"],
                                                    "data_fingerprint": data.fingerprint,
                                                    # (what a --resume reads, not a --save-every checkpoint)
                                                    **({"metrics": relative_to_output(metrics, output)}
                                                       if path == state_path(output) else {})},
                   kind="curve-state")

    t_run = time.time()
    fit(step, model=model, cfg=cfg, data=data, log=log, start_epoch=start_epoch, output=output, save_state=save_state,
        evaluate=dict, quiet=quiet, desc=f"connect ({cfg.curve})",
        old_run=old_run_remover(output, [start, end], force=force, resume_state=resume_state))
    with finishing(output, cfg.epochs):  # Ctrl-C from here on: resume to finish
        curve.points = step.points()
        save_curve(output, curve, asdict(cfg), extra_meta=align_meta)
        log.attrs["finished"] = utc_now()
        log.flush()
        remove_state(output)
    last = log.rows[-1]
    return ConnectResult(command="connect", inputs=file_refs(line.meta.inputs),
                         outputs={"curve": FileRef.of(output), "metrics": FileRef.of(metrics)}, split=cfg.split,
                         metrics={"train": Metrics(loss=last["train/loss"], err=last["train/err"]), "eval": None},
                         seconds=time.time() - t_run, curve=cfg.curve, num_bends=cfg.num_bends, trained=True,
                         epochs=cfg.epochs, config=asdict(cfg))
