"""``mctool train``: SGD training of one network, resumable, with per-epoch metrics."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .checkpoint import MOMENTUM_PREFIX, ModelMeta, load_model, read_checkpoint, save_model
from .data import DEFAULT_ARCH, check_fits, load_data
from .errors import ConfigError, Interrupted, NonFiniteLossError
from .evaluation import predict_probs, summarize
from .fileio import check_output, sha256_file
from .h5io import MetricsLog, provenance
from .models import arch_kwargs_for, build_model
from .runtime import autocast, progress_bar, resolve_device
from .schedules import SCHEDULES, lr_at

_NAN_CHECK_EVERY = 50  # iterations between NaN checks (each check waits for the device)


@dataclass
class TrainConfig:
    """Everything that determines a training run's result (recorded in its outputs)."""

    dataset: str = "digits"
    arch: str | None = None  # default: per data set (data.DEFAULT_ARCH)
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    epochs: int = 30
    lr: float = 0.05
    wd: float = 5e-4
    momentum: float = 0.9
    batch_size: int = 128
    schedule: str = "paper"
    seed: int = 0
    augment: str = "auto"
    split: str = "test"
    precision: str = "fp32"
    channels_last: bool = False
    init: str | None = None
    save_every: int = 0

    def validate(self) -> None:
        if not self.lr > 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr}.")
        if self.epochs < 1:
            raise ConfigError(f"--epochs must be >= 1, got {self.epochs}.")
        if self.wd < 0:
            raise ConfigError(f"--wd must be >= 0, got {self.wd}.")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"--momentum must be in [0, 1), got {self.momentum}.")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}.")
        if self.save_every < 0:
            raise ConfigError(f"--save-every must be >= 0, got {self.save_every}.")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"--schedule must be one of {', '.join(SCHEDULES)}, got '{self.schedule}'.")


def state_path(output: str | Path) -> Path:
    """Where the resumable training state of ``output`` lives: ``model.safetensors`` -> ``model.state.safetensors``."""
    output = Path(output)
    stem = output.name[: -len(".safetensors")] if output.name.endswith(".safetensors") else output.name
    return output.with_name(stem + ".state.safetensors")


def snapshot_path(output: str | Path, epoch: int) -> Path:
    """``--save-every`` checkpoint of ``output`` after ``epoch`` epochs: ``model-epoch010.safetensors``."""
    output = Path(output)
    stem = output.name[: -len(".safetensors")] if output.name.endswith(".safetensors") else output.name
    return output.with_name(f"{stem}-epoch{epoch:03d}.safetensors")


def _epoch_seed(seed: int, epoch: int) -> int:
    # Each epoch's shuffling, augmentation and dropout depend only on (seed, epoch), so a resumed run
    # replays exactly what an uninterrupted run would have done.
    return seed * 1_000_003 + epoch


def train(cfg: TrainConfig, output: str | Path, metrics: str | Path, *, device: str = "auto",
          data_root: str | None = None, download: bool = False, num_workers: int = 4, resume: bool = False,
          force: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Train one network; returns a summary (paths and final metrics). See docs/cli.md#train."""
    cfg.validate()
    output, metrics, state_file = Path(output), Path(metrics), state_path(output)
    resume_state = None
    if resume:
        if not state_file.exists():
            hint = " The run already finished." if output.exists() else ""
            raise ConfigError(f"nothing to resume: no training state '{state_file}'.{hint}")
        resume_state = read_checkpoint(state_file)
        saved_cfg = json.loads(resume_state[1].get("config", "{}"))
        diff = {k: (saved_cfg.get(k), v) for k, v in asdict(cfg).items()
                if k not in ("arch", "arch_kwargs") and saved_cfg.get(k) != v}
        if cfg.arch is not None and saved_cfg.get("arch") != cfg.arch:
            diff["arch"] = (saved_cfg.get("arch"), cfg.arch)
        saved_kwargs = saved_cfg.get("arch_kwargs", {})
        if {**saved_kwargs, **cfg.arch_kwargs} != saved_kwargs:  # recorded kwargs also hold derived ones
            diff["arch_kwargs"] = (saved_kwargs, cfg.arch_kwargs)
        if diff:
            shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
            raise ConfigError(f"--resume needs the same options as the interrupted run; these differ: {shown}.")
        cfg.arch, cfg.arch_kwargs = saved_cfg["arch"], saved_kwargs
        check_output(output, force=True)
    else:
        check_output(output, force)
        check_output(metrics, force, "metrics file")
        if state_file.exists() and not force:
            raise ConfigError(f"an interrupted run left '{state_file}'; pass --resume to continue it or --force to "
                              "start over.")

    dev = resolve_device(device)
    init = load_model(cfg.init) if cfg.init else None
    data = load_data(cfg.dataset, root=data_root, split=cfg.split, download=download, device=dev,
                     augment=cfg.augment, channels_last=cfg.channels_last, num_workers=num_workers,
                     normalization=init.meta.normalization if init else None)
    if init is not None:
        check_fits(init.meta.num_classes, init.meta.in_chans, data.info, cfg.init)
        if cfg.arch not in (None, init.meta.arch):
            raise ConfigError(f"--arch {cfg.arch} differs from --init's architecture '{init.meta.arch}'.")
        cfg.arch, cfg.arch_kwargs = init.meta.arch, {**init.meta.arch_kwargs, **cfg.arch_kwargs}
        model = init.model
    else:
        cfg.arch = cfg.arch or DEFAULT_ARCH[data.info.base]
        cfg.arch_kwargs = arch_kwargs_for(cfg.arch, cfg.arch_kwargs, data.info.image_size)
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.arch, data.info.num_classes, data.info.in_chans, cfg.arch_kwargs)
    inputs = {str(cfg.init): init.sha256} if init else {}
    meta = ModelMeta(arch=cfg.arch, num_classes=data.info.num_classes, in_chans=data.info.in_chans,
                     arch_kwargs=cfg.arch_kwargs, dataset=data.info.name, image_size=data.info.image_size,
                     normalization=data.info.normalization, config=asdict(cfg), inputs=inputs)
    model.to(dev)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.wd)
    split = data.eval_split
    log = MetricsLog(metrics, "epoch", ["lr", "train/loss", "train/err", f"{split}/nll", f"{split}/err", "seconds"],
                     {**provenance(inputs, asdict(cfg), "train"), "eval_split": split})
    start_epoch = 0
    if resume_state is not None:
        tensors, md = resume_state
        start_epoch = int(md["epoch"])
        model.load_state_dict({k: v for k, v in tensors.items() if not k.startswith(MOMENTUM_PREFIX)})
        names = dict(model.named_parameters())
        for name, buf in tensors.items():
            if name.startswith(MOMENTUM_PREFIX):
                opt.state[names[name[len(MOMENTUM_PREFIX):]]]["momentum_buffer"] = buf.to(dev)
        log.rows = json.loads(md["history"])
        log.attrs["started"] = md.get("started", log.attrs["started"])
    elif init is not None:
        names = dict(model.named_parameters())
        for name, buf in init.extra_tensors.items():  # keep a train-state's momentum
            opt.state[names[name[len(MOMENTUM_PREFIX):]]]["momentum_buffer"] = buf.to(dev)

    def save_state(epoch: int, path: Path, kind: str) -> None:
        names = {p: n for n, p in model.named_parameters()}
        momentum = {MOMENTUM_PREFIX + names[p]: s["momentum_buffer"] for p, s in opt.state.items()
                    if s.get("momentum_buffer") is not None}
        state_meta = ModelMeta(**{**asdict(meta), "kind": kind,
                                  "extra": {"epoch": str(epoch), "history": json.dumps(log.rows),
                                            "started": log.attrs["started"]}})
        save_model(path, model, state_meta, momentum)

    n_iter = data.train.num_batches(cfg.batch_size, drop_last=False)
    t_run = time.time()
    try:
        with progress_bar(quiet) as bar:
            ep_task = bar.add_task("train", total=cfg.epochs, completed=start_epoch, info="")
            it_task = bar.add_task("  epoch", total=n_iter, info="")
            for epoch in range(start_epoch, cfg.epochs):
                t0 = time.time()
                torch.manual_seed(_epoch_seed(cfg.seed, epoch))
                model.train()
                losses = torch.zeros(n_iter, device=dev)
                wrong = torch.zeros((), device=dev)
                seen = 0
                bar.reset(it_task, total=n_iter)
                batches = data.train.batches(cfg.batch_size, shuffle=True, augment=True,
                                             seed=_epoch_seed(cfg.seed, epoch))
                for i, (x, y) in enumerate(batches):
                    lr = lr_at(cfg.schedule, cfg.lr, epoch, cfg.epochs, i, n_iter)
                    for group in opt.param_groups:
                        group["lr"] = lr
                    with autocast(dev, cfg.precision):
                        out = model(x)
                    loss = F.cross_entropy(out.float(), y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    losses[i] = loss.detach() * y.shape[0]
                    wrong += (out.detach().argmax(1) != y).sum()
                    seen += y.shape[0]
                    if (i + 1) % _NAN_CHECK_EVERY == 0 or i + 1 == n_iter:
                        _check_finite(losses[: i + 1], epoch, state_file if state_file.exists() else None)
                    bar.advance(it_task)
                probs, labels = predict_probs(model, data.eval, precision=cfg.precision, device=dev)
                ev = summarize(probs, labels)
                log.append(epoch + 1, lr=lr, **{"train/loss": float(losses.sum()) / seen,
                                                "train/err": float(wrong) / seen, f"{split}/nll": ev["nll"],
                                                f"{split}/err": ev["err"], "seconds": time.time() - t0})
                # Order matters: the state (with the history) first, then the metrics file it reproduces.
                save_state(epoch + 1, state_file, "train-state")
                log.flush()
                if cfg.save_every and (epoch + 1) % cfg.save_every == 0 and epoch + 1 < cfg.epochs:
                    save_state(epoch + 1, snapshot_path(output, epoch + 1), "train-state")
                bar.update(ep_task, completed=epoch + 1,
                           info=f"loss {log.rows[-1]['train/loss']:.3f} {split} err {ev['err']:.2%}")
    except KeyboardInterrupt:
        done = len(log.rows)
        raise Interrupted(f"interrupted during epoch {done + 1}; {done} completed epoch(s) are saved in "
                          f"'{state_file}'. Continue with the same command plus --resume.") from None
    save_model(output, model, meta)
    log.attrs["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    log.flush()
    state_file.unlink(missing_ok=True)
    last = log.rows[-1]
    return {"output": str(output), "metrics_file": str(metrics), "arch": cfg.arch, "dataset": data.info.name,
            "epochs": cfg.epochs, "eval_split": split, "train_loss": last["train/loss"], "train_err": last["train/err"],
            f"{split}_nll": last[f"{split}/nll"], f"{split}_err": last[f"{split}/err"],
            "seconds": time.time() - t_run, "sha256": sha256_file(output)}


def _check_finite(weighted_losses: torch.Tensor, epoch: int, good_state: Path | None) -> None:
    bad = ~torch.isfinite(weighted_losses)
    if bool(bad.any()):
        it = int(bad.nonzero()[0, 0])
        kept = (f"the last good state (end of epoch {epoch}) is kept in '{good_state}'" if good_state
                else "no epoch had completed, so nothing was saved")
        raise NonFiniteLossError(f"the loss became NaN/inf in epoch {epoch + 1}, iteration {it + 1}; training "
                                 f"stopped and {kept}. Try a lower --lr.")
