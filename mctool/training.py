"""``mctool train``: SGD training of one network, resumable, with per-epoch metrics (the loop is ``loop.py``)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .bn import use_sync_bn
from .checkpoint import ModelMeta, load_model, read_metadata, write_model
from .data import DEFAULT_ARCH, check_fits, check_same_data_as, load_data
from .ensembles import SnapshotCollector, as_ensemble_meta, rows_summary, save_ensemble
from .errors import CheckpointError, ConfigError
from .evaluation import predict_probs, summarize
from .fileio import holds_output_locks
from .graphs import sgd, use_graphs
from .h5io import MetricsLog, provenance, utc_now
from .loop import (MOMENTUM_SAVED, TRAIN_LR, TRAIN_WD, adopt_recorded, finishing, fit, get_momentum, history_json,
                   old_run_remover, prepare_outputs, relative_to_output, remove_state, restore_state, resumed_metrics,
                   set_momentum, sgd_step, state_path, validate_sgd)
from .models import arch_kwargs_for, build_model, build_pretrained, check_takes_images, pretrained_data_config
from .options import check_count
from .results import FileRef, Metrics, TrainResult, file_refs
from .calls import library_call
from .runtime import resolve_device, training_command
from .console import warn
from .schedules import sse_is_snapshot, sse_lr


@dataclass
class TrainConfig:
    """Everything that determines a training run's result (recorded in its outputs)."""

    dataset: str = "digits"
    arch: str | None = None  # default: per data set (data.DEFAULT_ARCH)
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    epochs: int = 200
    lr: float = TRAIN_LR
    wd: float = TRAIN_WD
    momentum: float = 0.9
    batch_size: int = 128
    schedule: str = "paper"
    seed: int = 0
    augment: str = "auto"
    split: str = "test"
    precision: str = "fp32"
    sync_bn: bool = False  # distributed: BN statistics over the whole global batch (docs/distributed.md)
    channels_last: bool = False
    cuda_graphs: bool = False  # how, not what: may differ on --resume
    deterministic: bool = False  # how, not what: may differ on --resume
    init: str | None = None
    save_every: int = 0
    snapshots: int = 5  # Snapshot Ensembles (schedule "sse"): cycles, one snapshot at the end of each
    pretrained: bool = False  # start from timm's pretrained weights (or pretrained_file's)
    pretrained_file: str | None = None  # a local safetensors state dict of the timm model; implies pretrained
    pretrained_source: dict[str, Any] | None = None  # filled in by train(): where the weights came from

    def __post_init__(self) -> None:
        self.pretrained = self.pretrained or self.pretrained_file is not None

    def validate(self) -> None:
        if not isinstance(self.dataset, str):
            raise ConfigError(f"--dataset must name a data set (dataset: a string), got {self.dataset!r}.")
        validate_sgd(self)
        check_count("--snapshots", self.snapshots)
        if not isinstance(self.arch_kwargs, dict):  # (the CLI parses its JSON; a Python caller gives the dict)
            raise ConfigError(f"--arch-kwargs must be a JSON object (arch_kwargs: a dict), got "
                              f"{type(self.arch_kwargs).__name__} {str(self.arch_kwargs)[:60]!r}.")
        if self.pretrained and self.init:
            raise ConfigError("--pretrained (or --pretrained-file) and --init both choose the starting weights; "
                              "pass only one of them.")


@library_call
@holds_output_locks
@training_command(TrainConfig)
def train(cfg: TrainConfig, output: str | Path, metrics: str | Path | None = None, *, device: str = "auto",
          data_root: str | Path | None = None, download: bool = False, num_workers: int = 4, resume: bool = False,
          force: bool = False, quiet: bool = False) -> TrainResult:
    """Train one network; returns its paths and final metrics. See docs/cli.md#train.

    ``cfg`` is not changed: defaults (``arch``, ``arch_kwargs``) are filled in on a copy."""
    cfg.validate()
    cfg = replace(cfg, arch_kwargs=dict(cfg.arch_kwargs), pretrained_source=None)  # the source is found out below
    output = Path(output)
    metrics = resumed_metrics(output, metrics, resume)
    # (a run interrupted before --pretrained existed recorded no 'pretrained': the same as False)
    resume_state = prepare_outputs(output, metrics, {k: v for k, v in asdict(cfg).items() if v or k != "pretrained"},
                                   resume=resume, force=force, state_kind="train-state",
                                   inputs=[cfg.init, cfg.pretrained_file])
    adopt_recorded(cfg, resume_state)
    if resume_state is not None:
        saved = json.loads(resume_state[1]["config"])
        cfg.arch, cfg.arch_kwargs = saved["arch"], saved["arch_kwargs"]
        file = saved.get("pretrained_file")
        cfg.pretrained, cfg.pretrained_file = saved.get("pretrained") is True, file if isinstance(file, str) else None

    dev = resolve_device(device)
    init_md = read_metadata(cfg.init) if cfg.init else {}
    # A pretrained network expects its own input (imagefolder data: its image size, resizing and mean/std).
    arch = cfg.arch or DEFAULT_ARCH.get(cfg.dataset.split(":", 1)[0])  # None: load_data names the bad data set
    data_config = (pretrained_data_config(arch, need_weights=cfg.pretrained_file is None)
                   if cfg.pretrained and arch else None)
    data = load_data(cfg.dataset, root=data_root, split=cfg.split, download=download, device=dev,
                     augment=cfg.augment, channels_last=cfg.channels_last, num_workers=num_workers,
                     normalization=ModelMeta.from_metadata(init_md, cfg.init).normalization if "arch" in init_md
                     else None, data_config=data_config)
    if resume_state is not None:
        check_same_data_as(resume_state[1].get("data_fingerprint"), data, cfg.dataset, state_path(output))
    init = None
    if cfg.init and "arch" not in init_md:  # a plain state dict (e.g. from timm): --arch says what it is
        if cfg.arch is None:
            raise ConfigError(f"--init '{cfg.init}' has no mctool metadata; pass --arch (and --arch-kwargs) to say "
                              "which network it holds.")
        init = load_model(cfg.init, arch=cfg.arch, num_classes=data.info.num_classes, in_chans=data.info.in_chans,
                          arch_kwargs=arch_kwargs_for(cfg.arch, cfg.arch_kwargs, data.info.image_size))
    elif cfg.init:
        init = load_model(cfg.init)
    if init is not None:
        check_fits(init.meta, data.info, cfg.init)
        if cfg.arch not in (None, init.meta.arch):
            raise ConfigError(f"--init '{cfg.init}' holds a '{init.meta.arch}', but --arch is {cfg.arch}; leave "
                              "out --arch (the checkpoint's architecture is used), or give --init a checkpoint of "
                              f"{cfg.arch}.")
        changed = {k: v for k, v in cfg.arch_kwargs.items()
                   if k not in init.meta.arch_kwargs or init.meta.arch_kwargs[k] != v}
        if changed:  # e.g. another drop rate: the network is rebuilt with them, and must still fit the weights
            try:
                init = load_model(cfg.init, arch_kwargs=changed)
            except CheckpointError as e:
                raise ConfigError(f"--arch-kwargs {json.dumps(changed)} change the network that --init "
                                  f"'{cfg.init}' holds, so its weights do not fit ({str(e).rstrip('.')}). Leave out "
                                  f"--arch-kwargs (the checkpoint's {json.dumps(init.meta.arch_kwargs)} are used), or "
                                  "give only options that keep its shapes.") from None
        cfg.arch, cfg.arch_kwargs = init.meta.arch, {**init.meta.arch_kwargs, **cfg.arch_kwargs}
        model = init.model
    else:
        cfg.arch = cfg.arch or DEFAULT_ARCH[data.info.base]
        cfg.arch_kwargs = arch_kwargs_for(cfg.arch, cfg.arch_kwargs, data.info.image_size)
        torch.manual_seed(cfg.seed)
        if cfg.pretrained:
            model, cfg.pretrained_source = build_pretrained(cfg.arch, data.info.num_classes, data.info.in_chans,
                                                            cfg.arch_kwargs, file=cfg.pretrained_file)
            size = data_config["input_size"][-1]
            if not size / 2 <= data.info.image_size <= size * 2:  # small data sets keep their own size
                warn(f"'{cfg.arch}' was pretrained on {size}x{size} images; data set '{data.info.name}' has "
                     f"{data.info.image_size}x{data.info.image_size}, so the pretrained features may help less.")
        else:
            model = build_model(cfg.arch, data.info.num_classes, data.info.in_chans, cfg.arch_kwargs)
    inputs = {str(cfg.init): init.sha256} if init else {}
    if cfg.pretrained_file:
        inputs[str(cfg.pretrained_file)] = cfg.pretrained_source["sha256"]
    meta = ModelMeta(arch=cfg.arch, num_classes=data.info.num_classes, in_chans=data.info.in_chans,
                     arch_kwargs=cfg.arch_kwargs, dataset=data.info.name, image_size=data.info.image_size,
                     normalization=data.info.normalization, config=asdict(cfg), inputs=inputs)
    model = use_sync_bn(model.to(dev), cfg.sync_bn, dev)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    check_takes_images(model, cfg.arch, data.info.num_classes, data.info.in_chans, data.info.image_size,
                       data.info.name)
    graphs = use_graphs(cfg.cuda_graphs, dev)
    opt = sgd(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, wd=cfg.wd, device=dev, graphs=graphs)
    params = dict(model.named_parameters())
    split = data.eval_split
    n_iter = data.train.num_batches(cfg.batch_size)
    sse = cfg.schedule == "sse"
    snaps = SnapshotCollector(model, data, precision=cfg.precision) if sse else None
    log = MetricsLog(metrics, "epoch", ["lr", "train/loss", "train/err", f"{split}/nll", f"{split}/err", "seconds"],
                     {**provenance(inputs, asdict(cfg), "train"), "split": split,
                      "data_fingerprint": data.fingerprint},
                     (lambda: ({"member": np.arange(1, len(snaps.rows) + 1)}, snaps.h5_datasets(split))) if sse
                     else None)
    start_epoch = 0
    if resume_state is not None:
        tensors, md = resume_state
        start_epoch = restore_state(resume_state, output, inputs, "--init (and --pretrained-file)", model, opt,
                                    params, log)
        if snaps is not None:
            snaps.load_state(tensors, json.loads(md.get("snapshots", "[]")))
    elif init is not None:
        set_momentum(opt, params, init.extra_tensors)  # keep a train-state's momentum

    def save_state(epoch: int, path: Path, kind: str) -> None:
        extra = {"epoch": str(epoch), "history": history_json(log.rows), "started": log.attrs["started"],
                 "data_fingerprint": data.fingerprint, **MOMENTUM_SAVED}
        if path == state_path(output):  # (what a --resume reads; a --save-every checkpoint starts new runs)
            extra["metrics"] = relative_to_output(metrics, output)
        tensors = get_momentum(opt, params)
        if snaps is not None:
            extra["snapshots"] = json.dumps(snaps.rows)
            tensors.update(snaps.state_tensors())
        write_model(path, model, ModelMeta(**{**asdict(meta), "kind": kind, "extra": extra}), tensors)

    step = sgd_step(model, opt, dev, cfg.precision, cuda_graphs=graphs)

    last_eval: dict[str, float] = {}  # the last evaluation, all metrics (the log keeps nll and err)

    def evaluate() -> dict[str, float]:
        probs, labels = predict_probs(model, data.eval, precision=cfg.precision, device=dev, sharded=True)
        ev = summarize(probs, labels)
        last_eval.update(ev)
        return {f"{split}/nll": ev["nll"], f"{split}/err": ev["err"]}

    total = cfg.epochs * n_iter
    if sse:
        period = -(-total // cfg.snapshots)  # ceil(T / M) iterations per cycle (sse_is_snapshot), in integers
        taken = -(-total // period)  # the snapshots sse_is_snapshot takes: one per cycle, the last one cut short
        if cfg.snapshots > total:
            raise ConfigError(f"--snapshots {cfg.snapshots:,} is more than the {total:,} iterations of the run "
                              f"({cfg.epochs} epochs of {n_iter}); change --epochs or --snapshots.")
        if taken != cfg.snapshots:
            raise ConfigError(f"{cfg.epochs} epochs of {n_iter} iterations cannot be split into {cfg.snapshots} "
                              f"equal cycles (cycles of {period} iterations give {taken} snapshots); change --epochs "
                              "or --snapshots.")

    def sse_snapshot(epoch: int, i: int) -> None:
        it = epoch * n_iter + i
        if sse_is_snapshot(it, total, cfg.snapshots):
            snaps.add(model, iteration=it, epoch=(it + 1) / n_iter)  # epochs completed at the snapshot
            log.flush()

    t_run = time.time()
    fit(step, model=model, cfg=cfg, data=data, log=log, start_epoch=start_epoch, output=output, save_state=save_state,
        evaluate=evaluate, quiet=quiet, desc="train",
        lr_fn=(lambda epoch, i, n: sse_lr(epoch * n + i, total, cfg.snapshots, cfg.lr)) if sse else None,
        after_step=sse_snapshot if sse else None,
        old_run=old_run_remover(output, [cfg.init, cfg.pretrained_file], force=force, resume_state=resume_state))
    with finishing(output, cfg.epochs):  # Ctrl-C from here on: resume to finish
        if snaps is not None:  # Snapshot Ensembles: the output is the ensemble of all snapshots
            save_ensemble(output, snaps.ensemble(as_ensemble_meta(meta, inputs)), asdict(cfg))
        else:
            write_model(output, model, meta)
        log.attrs["finished"] = utc_now()
        log.flush()
        remove_state(output)
    last = log.rows[-1]
    final = (Metrics.of(rows_summary(snaps.rows)) if snaps else
             Metrics.of(last_eval or {"nll": last[f"{split}/nll"], "err": last[f"{split}/err"]}))
    return TrainResult(command="train", inputs=file_refs(inputs),
                       outputs={"model": FileRef.of(output), "metrics": FileRef.of(metrics)}, split=split,
                       metrics={"train": Metrics(loss=last["train/loss"], err=last["train/err"]), "eval": final},
                       seconds=time.time() - t_run, arch=cfg.arch, dataset=data.info.name, epochs=cfg.epochs,
                       members=len(snaps.rows) if snaps else None, config=asdict(cfg))


