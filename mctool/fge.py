"""``mctool fge``: Fast Geometric Ensembling from a trained network (docs/method.md#fge).

A cyclic learning rate, set every iteration, goes from lr_max down to lr_min at mid cycle and back;
at the exact mid-cycle iteration a snapshot is taken; snapshots get their own BN recalibration and are
evaluated ``--points-per-pass`` at a time (``ensembles.SnapshotCollector``), joining the running ensemble.
All members go into one ensemble file.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .bn import bn_modules, check_bn_data, recalibrate_bn, use_sync_bn
from .checkpoint import ModelMeta, load_model, write_model
from .data import check_fits, check_same_data_as, load_data
from .ensembles import SnapshotCollector, as_ensemble_meta, rows_summary, save_ensemble
from .errors import ConfigError
from .evaluation import predict_probs, summarize
from .fileio import check_outputs, holds_output_locks
from .batched import check_points_per_pass
from .options import MAX_EPOCHS, MAX_ITERATIONS, MAX_RATE, check_count, check_real
from .graphs import sgd, use_graphs
from .h5io import MetricsLog, provenance, utc_now
from .results import FGEResult, FileRef, Metrics, file_refs
from .calls import library_call
from .runtime import resolve_device, training_command
from .console import progress_bar
from .schedules import fge_is_snapshot, fge_lr
from .loop import (MOMENTUM_SAVED, TRAIN_LR, adopt_recorded, fill_from_record, finishing, fit, get_momentum,
                   history_json, old_run_remover, prepare_outputs, recorded_lr, relative_to_output, remove_state,
                   restore_state, resumed_metrics, set_momentum, sgd_step, state_metadata, state_path, validate_sgd)


@dataclass
class FGEConfig:
    """What decides an ``fge`` run (recorded in its files; docs/cli.md#fge and docs/ensembles.md): ``epochs`` of
    cycles of ``cycle_epochs`` (or ``cycle_iters``) iterations each, the learning rate going from ``lr_max``
    down to ``lr_min`` and back, one snapshot at each cycle's middle. Left as None, the learning rates, weight
    decay, augmentation and split come from what the start network records about its own training."""

    epochs: int = 20
    cycle_epochs: float | None = 2.0
    cycle_iters: int | None = None
    lr_max: float | None = None  # default: from the start network's training lr (default_fge_lrs)
    lr_min: float | None = None  # default: from the start network's training lr (default_fge_lrs)
    wd: float | None = None  # default: the start network's
    momentum: float = 0.9
    batch_size: int = 128
    seed: int = 0
    dataset: str | None = None
    augment: str | None = None  # default: the start network's recorded augmentation (auto if none)
    split: str | None = None  # default: the start network's recorded split, else test
    precision: str = "fp32"
    points_per_pass: int = 4  # how, not what: may differ on --resume (docs/performance.md)
    sync_bn: bool = False  # distributed: BN statistics over the whole global batch (docs/distributed.md)
    channels_last: bool = False
    cuda_graphs: bool = False  # how, not what: may differ on --resume
    deterministic: bool = False  # how, not what: may differ on --resume
    bn_batches: int | None = None
    bn_data: str | None = None  # default: augmented (docs/method.md#bn); None on --resume: the recorded one
    swa: str | None = None
    # fit() reads these
    schedule: str = "constant"
    save_every: int = 0
    # filled in by fge(): how each option left to its default was derived (None: none was)
    derived: dict[str, str] | None = None

    @property
    def lr(self) -> float | None:  # (None until fge() derives lr_max, as for ConnectConfig.lr)
        return self.lr_max

    def validate(self) -> None:
        validate_sgd(self, lr_option="--lr-max")
        check_real("--lr-min", self.lr_min, 0, MAX_RATE, low_open=True)
        if self.lr_min is not None and self.lr_max is not None and not self.lr_min <= self.lr_max:
            derived = self.derived or {}
            hint = next((f"; --{k.replace('_', '-')} {getattr(self, k)} is its default, {derived[k]}: give it too"
                         for k in ("lr_min", "lr_max") if k in derived), "")
            raise ConfigError(f"need 0 < --lr-min <= --lr-max, got {self.lr_min} and {self.lr_max}{hint}.")
        check_count("--cycle-iters", self.cycle_iters, 2, MAX_ITERATIONS)
        if self.cycle_iters is None and self.cycle_epochs is None:
            raise ConfigError("give --cycle-epochs or --cycle-iters.")
        check_real("--cycle-epochs", self.cycle_epochs, 0, MAX_EPOCHS, low_open=True)
        check_count("--bn-batches", self.bn_batches)
        if self.bn_data is not None:
            check_bn_data(self.bn_data)
        check_points_per_pass(self.points_per_pass)


def default_fge_lrs(train_lr: float, batchnorm: bool) -> tuple[float, float]:
    """FGE's (lr_max, lr_min), a1 and a2, for a network trained at ``train_lr``
    (docs/ensembles.md#fast-geometric-ensembling-fge).

    The paper's values as ratios: without BatchNorm a1 = lr / 5, a2 = lr / 100 (VGG16, trained at 0.05:
    0.01 and 5e-4); with BatchNorm a1 = lr / 2, a2 = lr / 200 (PreResNet164 and WRN-28-10, trained at 0.1:
    0.05 and 5e-4). A cycle should take the network only a little way from where it is, so that members
    stay about as good as it while differing: a1 is a fraction of the training lr, smaller without
    BatchNorm (whose networks are not invariant to the scale of their weights). Measured in
    docs/results.md#defaults.
    """
    return (train_lr / 2, train_lr / 200) if batchnorm else (train_lr / 5, train_lr / 100)


def _fill_defaults(cfg: FGEConfig, meta: ModelMeta, batchnorm: bool, resume: bool = False) -> None:
    """Set the options left to None from the start network's record, noting in ``cfg.derived`` how (the split
    not when resuming: the interrupted run's is taken then)."""
    derived = fill_from_record(cfg, meta.config, "the start network", resume=resume)
    if cfg.lr_max is None or cfg.lr_min is None:
        train_lr = recorded_lr(meta.config)
        source = f"the start network's training lr {train_lr!r}"
        if train_lr is None:
            train_lr, source = TRAIN_LR, f"{TRAIN_LR!r} (the start network records none)"
        lr_max, lr_min = default_fge_lrs(train_lr, batchnorm)
        bn = "with BatchNorm" if batchnorm else "no BatchNorm"
        if cfg.lr_max is None:
            cfg.lr_max = lr_max
            derived["lr_max"] = f"{source} / {2 if batchnorm else 5} ({bn})"
        if cfg.lr_min is None:
            cfg.lr_min = lr_min
            derived["lr_min"] = f"{source} / {200 if batchnorm else 100} ({bn})"
    cfg.derived = derived or None


def cycle_length(cfg: FGEConfig, iters_per_epoch: int) -> int:
    """Cycle length in iterations, made even so that mid cycle falls exactly on an iteration.

    The nearest even number, an odd one rounded up (5 -> 6, 7 -> 8; Python's round() would send 5 to 4).
    """
    raw = cfg.cycle_iters if cfg.cycle_iters is not None else cfg.cycle_epochs * iters_per_epoch
    return max(2, 2 * math.floor(raw / 2 + 0.5))


def _swa_recorded(swa: str, output: Path, resume: bool) -> str:
    """``--swa`` as the state records it: relative to the folder of ``-o`` (the state's folder), so that a resume
    that leaves it out writes it beside ``-o`` again, also after the run's folder was moved or copied, and the
    same file spelled otherwise is the same option. An interrupted run of mctool 0.2.0 recorded it absolute:
    the same file, given again, is compared as recorded."""
    if resume:
        with contextlib.suppress(Exception):  # (prepare_outputs reads and checks the state itself)
            old = json.loads(state_metadata(output).get("config", "{}")).get("swa")
            if isinstance(old, str) and os.path.isabs(old) and old == os.path.abspath(swa):
                return old
    return relative_to_output(swa, output)


@library_call
@holds_output_locks
@training_command(FGEConfig)
def fge(cfg: FGEConfig, start: str | Path, output: str | Path, metrics: str | Path | None = None, *,
        device: str = "auto",
        data_root: str | Path | None = None, download: bool = False, num_workers: int = 4, resume: bool = False,
        force: bool = False, quiet: bool = False) -> FGEResult:
    """Run FGE from ``start`` (a model or a training state, whose SGD momentum is kept).

    ``cfg`` is not changed: defaults taken from the start network are filled in on a copy."""
    cfg = replace(cfg)
    start_model = load_model(start)
    meta = start_model.meta
    batchnorm = bool(bn_modules(start_model.model))
    _fill_defaults(cfg, meta, batchnorm, resume)
    cfg.dataset = cfg.dataset or meta.dataset
    cfg.validate()
    if not batchnorm:  # nothing to recompute: not recorded, so never a --resume difference (checked above)
        cfg.bn_data = None
    if cfg.dataset is None:
        raise ConfigError(f"'{start}' does not record its data set; pass --dataset.")
    output = Path(output)
    metrics = resumed_metrics(output, metrics, resume)
    swa_given = swa_path = cfg.swa  # (written, and named in the result, as given)
    if swa_given:
        cfg.swa = _swa_recorded(cfg.swa, output, resume)
    resume_state = prepare_outputs(output, metrics, asdict(cfg), resume=resume, force=force, state_kind="fge-state",
                                   inputs=[start], more_outputs={"--swa": swa_given})
    adopt_recorded(cfg, resume_state)
    if cfg.swa is not None and not swa_given:  # the interrupted run's --swa: an output like the others
        # (an absolute one, as mctool 0.2.0 recorded, stays so)
        swa_path = os.path.normpath(os.path.join(output.parent, cfg.swa))
        check_outputs({"--output": output, "--metrics": metrics, "--swa": swa_path}, [start], force=True,
                      formats={"--swa": "safetensors"})
    cfg.split = cfg.split or "test"  # a state of a version that did not record it
    # (a state of a version that did not record it evaluated its snapshots on un-augmented images)
    if batchnorm:
        cfg.bn_data = cfg.bn_data or ("plain" if resume_state is not None else "augmented")
    bn_data = cfg.bn_data or "augmented"  # (what the passes use; a network without BatchNorm has none to run)

    dev = resolve_device(device)
    data = load_data(cfg.dataset, root=data_root, split=cfg.split, download=download, device=dev,
                     augment=cfg.augment, channels_last=cfg.channels_last, num_workers=num_workers,
                     **meta.data_options())
    check_fits(meta, data.info, start)
    if resume_state is not None:
        check_same_data_as(resume_state[1].get("data_fingerprint"), data, cfg.dataset, state_path(output))
    model = use_sync_bn(start_model.model.to(dev), cfg.sync_bn, dev)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    # The start network's own metrics (its stored BN statistics), for comparison, before any step.
    start_metrics = summarize(*predict_probs(model, data.eval, precision=cfg.precision, sharded=True))
    params = dict(model.named_parameters())
    graphs = use_graphs(cfg.cuda_graphs, dev)
    opt = sgd(model.parameters(), lr=cfg.lr_max, momentum=cfg.momentum, wd=cfg.wd, device=dev, graphs=graphs)
    set_momentum(opt, params, start_model.extra_tensors)
    n_iter = data.train.num_batches(cfg.batch_size)
    cycle = cycle_length(cfg, n_iter)
    total = cfg.epochs * n_iter
    if total < cycle // 2:
        raise ConfigError(f"no snapshot would be taken: {cfg.epochs} epoch(s) of {n_iter} iterations are shorter than "
                          f"half a cycle ({cycle // 2} iterations); use more --epochs or a shorter cycle.")
    split = data.eval_split
    snaps = SnapshotCollector(model, data, bn_batches=cfg.bn_batches, precision=cfg.precision,
                              points_per_pass=cfg.points_per_pass, channels_last=cfg.channels_last,
                              bn_data=bn_data)
    inputs = {str(start): start_model.sha256}
    attrs = {**provenance(inputs, asdict(cfg), "fge"), "cycle_iters": cycle, "iters_per_epoch": n_iter,
             "split": split, "data_fingerprint": data.fingerprint}
    lrs = np.array([fge_lr(i, cycle, cfg.lr_max, cfg.lr_min) for i in range(total)])

    def extra() -> tuple[dict, dict]:  # snapshots taken but not yet evaluated have NaN metrics
        log.attrs["num_members"] = len(snaps.rows) + len(snaps.pending)
        return ({"iteration": np.arange(total), "member": np.arange(1, log.attrs["num_members"] + 1)},
                {"lr": (lrs, ("iteration",)), **snaps.h5_datasets(split)})

    # The learning rate is recorded per iteration (the "lr" dataset); per-epoch rows keep losses and times.
    log = MetricsLog(metrics, "epoch", ["train/loss", "train/err", "seconds"], attrs, extra)
    start_epoch = 0
    if resume_state is not None:
        tensors, md = resume_state
        start_epoch = restore_state(resume_state, output, inputs, "start network", model, opt, params, log)
        snaps.load_state(tensors, json.loads(md["snapshots"]), json.loads(md.get("pending_snapshots", "[]")),
                         path=state_path(output))  # both checked by prepare_outputs
        taken = [int(r["iteration"]) for r in snaps.rows + snaps.pending_info()]
        if not all(fge_is_snapshot(it, cycle) for it in taken):  # 0.2 rounded an odd --cycle-iters down
            raise ConfigError(f"the interrupted run took its snapshots at iterations {taken}, not where cycles of "
                              f"{cycle} iterations put them (mctool 0.2 rounded an odd cycle length down, 5 to 4); "
                              "finish it with the version that started it, or start over with --force.")

    def save_state(epoch: int, path: Path, kind: str) -> None:
        extra = {"epoch": str(epoch), "history": history_json(log.rows), "started": log.attrs["started"],
                 "data_fingerprint": data.fingerprint, **MOMENTUM_SAVED, "metrics": relative_to_output(metrics, output),
                 "snapshots": json.dumps(snaps.rows), "pending_snapshots": json.dumps(snaps.pending_info())}
        write_model(path, model, ModelMeta(**{**asdict(meta), "kind": "fge-state", "config": asdict(cfg),
                                             "inputs": inputs, "extra": extra}),
                   {**get_momentum(opt, params), **snaps.state_tensors()})

    def after_step(epoch: int, i: int) -> None:
        it = epoch * n_iter + i
        if fge_is_snapshot(it, cycle):
            snaps.add(model, iteration=it, epoch=(it + 1) / n_iter, lr=fge_lr(it, cycle, cfg.lr_max, cfg.lr_min))
            log.flush()  # a pass just evaluated, or one more snapshot pending (NaN metrics)

    def shown() -> dict[str, float]:  # for the progress display only
        last = snaps.rows[-1] if snaps.rows else None
        # the ensemble of the evaluated members; those taken since wait for their pass (--points-per-pass)
        return {"members": len(snaps.rows), **({"waiting": len(snaps.pending)} if snaps.pending else {}),
                **({"ensemble err": last["ensemble_err"], "ensemble nll": last["ensemble_nll"]} if last else {})}

    t_run = time.time()
    fit(sgd_step(model, opt, dev, cfg.precision, cuda_graphs=graphs), model=model, cfg=cfg, data=data, log=log,
        start_epoch=start_epoch, output=output, save_state=save_state, evaluate=shown, quiet=quiet,
        desc=f"fge (cycles of {cycle} it)", after_step=after_step,
        lr_fn=lambda epoch, i, n: fge_lr(epoch * n + i, cycle, cfg.lr_max, cfg.lr_min),
        old_run=old_run_remover(output, [start], force=force, resume_state=resume_state))
    with finishing(output, cfg.epochs):  # Ctrl-C from here on: resume to finish
        final = bool(snaps.pending) + 2 * bool(cfg.swa)  # after the epochs' bars: the last snapshots', SWA's passes
        with progress_bar(quiet or not final) as bar:
            task = bar.add_task("fge: final evaluations", total=final, info="")
            if snaps.pending:
                snaps.flush()
                log.flush()
                bar.advance(task)
            swa_metrics = None
            if cfg.swa:
                swa_model = snaps.eval_model
                snaps.layout.assign(swa_model, snaps.average().to(dev))
                recalibrate_bn(swa_model, data.train, max_batches=cfg.bn_batches, precision=cfg.precision, sharded=True,
                               bn_data=bn_data)
                bar.advance(task)
                swa_metrics = Metrics.of(summarize(*predict_probs(swa_model, data.eval, precision=cfg.precision,
                                                                  sharded=True)))
                bar.advance(task)
        save_ensemble(output, snaps.ensemble(as_ensemble_meta(meta, inputs)), asdict(cfg))
        last = log.rows[-1]
        result = FGEResult(command="fge", inputs=file_refs(inputs), split=split, members=len(snaps.rows),
                           cycle_iters=cycle, config=asdict(cfg),
                           metrics={"train": Metrics(loss=last["train/loss"], err=last["train/err"]),
                                    "eval": Metrics.of(rows_summary(snaps.rows)), "start": Metrics.of(start_metrics),
                                    "last_member": Metrics.of(snaps.rows[-1], "member_"), "swa": None})
        if cfg.swa:
            result.metrics["swa"] = swa_metrics
            swa_meta = ModelMeta(**{**asdict(meta), "kind": "model", "inputs": inputs,
                                    "config": {"swa_of": str(output), **asdict(cfg)}, "extra": {}})
            write_model(swa_path, swa_model.cpu(), swa_meta)
        log.attrs["finished"] = utc_now()
        log.attrs["summary"] = json.dumps(rows_summary(snaps.rows))
        log.flush()
        remove_state(output)
    result.outputs = {"ensemble": FileRef.of(output), "metrics": FileRef.of(metrics),
                      "swa": FileRef.of(swa_path) if swa_path else None}
    result.seconds = time.time() - t_run
    return result
