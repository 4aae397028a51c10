"""Predictions and metrics: loss, NLL, error, ECE, for single networks and ensembles."""

from __future__ import annotations

import json

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .bn import recalibrate_bn
from .checkpoint import load_model
from .data import Split, check_fits, load_data
from .errors import ConfigError
from .fileio import check_output
from .h5io import provenance, write_h5
from .runtime import autocast, progress_bar, resolve_device


def l2_term(model: nn.Module, wd: float) -> float:
    """0.5 * wd * ||w||^2 over all parameters: the regularisation part of the training objective."""
    if wd == 0:
        return 0.0
    with torch.no_grad():
        return 0.5 * wd * float(sum(p.detach().float().pow(2).sum() for p in model.parameters()))


@torch.no_grad()
def predict_probs(model: nn.Module, split: Split, *, batch_size: int = 512, precision: str = "fp32",
                  device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax outputs ``[N, C]`` (float32) and labels ``[N]`` of a network over a split, in eval mode."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    probs, labels = [], []
    with autocast(device, precision):
        for x, y in split.batches(batch_size):
            probs.append(F.softmax(model(x).float(), dim=1))
            labels.append(y)
    model.train(was_training)
    return torch.cat(probs), torch.cat(labels)


def nll(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean negative log-likelihood of the true labels (probabilities clamped at 1e-12)."""
    return float(-probs.gather(1, labels[:, None]).clamp_min(1e-12).log().mean())


def error(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of wrong top-1 predictions, in [0, 1]."""
    return float((probs.argmax(1) != labels).float().mean())


def ece(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """Expected calibration error with equal-width confidence bins: sum_b |B|/N * |acc(B) - conf(B)|."""
    conf, pred = probs.max(1)
    correct = (pred == labels).float()
    # Bins are (lo, hi]; confidence 0 can't happen with a softmax over >= 2 classes.
    idx = (conf * bins).ceil().long().clamp(1, bins) - 1
    count = torch.zeros(bins, device=probs.device).scatter_add_(0, idx, torch.ones_like(conf))
    conf_sum = torch.zeros(bins, device=probs.device).scatter_add_(0, idx, conf)
    acc_sum = torch.zeros(bins, device=probs.device).scatter_add_(0, idx, correct)
    return float((conf_sum - acc_sum).abs().sum() / probs.shape[0])


def summarize(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """NLL, error and ECE of predicted probabilities."""
    return {"nll": nll(probs, labels), "err": error(probs, labels), "ece": ece(probs, labels)}


def evaluate_models(paths: list[str], *, dataset: str | None = None, split: str = "test", device: str = "auto",
                    data_root: str | None = None, download: bool = False, batch_size: int = 512,
                    precision: str = "fp32", channels_last: bool = False, metrics: str | None = None,
                    force: bool = False, arch: str | None = None, num_classes: int | None = None,
                    in_chans: int | None = None, arch_kwargs: dict | None = None, num_workers: int = 4,
                    quiet: bool = False) -> dict:
    """Evaluate networks and, given several, their ensemble (mean of softmax) on one split.

    Per network: ``loss`` (NLL plus the L2 term 0.5 * wd * ||w||^2 with the wd it was trained with),
    ``nll``, ``err`` and ``ece``. The ensemble's metrics are also given for its first k members, k = 1..M.
    """
    if not paths:
        raise ConfigError("give at least one model checkpoint.")
    if metrics:
        check_output(metrics, force, "metrics file")
    dev = resolve_device(device)
    loaded = [load_model(p, arch=arch, num_classes=num_classes, in_chans=in_chans, arch_kwargs=arch_kwargs)
              for p in paths]
    first = loaded[0].meta
    name = dataset or first.dataset
    if name is None:
        raise ConfigError(f"'{paths[0]}' does not record its data set; pass --dataset.")
    for lm in loaded[1:]:
        if lm.meta.normalization != first.normalization and dataset is None:
            raise ConfigError(f"'{lm.path}' was trained with another data set or normalisation than '{paths[0]}'; "
                              "an ensemble needs members that read the same inputs.")
    data = load_data(name, root=data_root, split=split, download=download, device=dev, channels_last=channels_last,
                     normalization=first.normalization, num_workers=num_workers)
    for lm in loaded:
        check_fits(lm.meta.num_classes, lm.meta.in_chans, data.info, lm.path)
    members, running, ens = [], [], None
    with progress_bar(quiet) as bar:
        task = bar.add_task("evaluate", total=len(loaded), info="")
        for k, lm in enumerate(loaded, 1):
            model = lm.model.to(dev)
            if channels_last:
                model.to(memory_format=torch.channels_last)
            probs, labels = predict_probs(model, data.eval, batch_size=batch_size, precision=precision, device=dev)
            m = summarize(probs, labels)
            m["loss"] = m["nll"] + l2_term(model, float(lm.meta.config.get("wd", 0.0)))
            members.append({"path": str(lm.path), "sha256": lm.sha256, **m})
            ens = probs if ens is None else ens + probs
            running.append(summarize(ens / k, labels))
            lm.model.to("cpu")
            bar.advance(task)
    result: dict = {"split": data.eval_split, "dataset": data.info.name, "samples": len(data.eval),
                    "models": members}
    final = running[-1]
    if len(loaded) > 1:
        result["ensemble"] = {"members": len(loaded), **final}
    result[f"{split}_err"], result[f"{split}_nll"], result[f"{split}_ece"] = final["err"], final["nll"], final["ece"]
    if metrics:
        col = lambda rows, key: np.array([r[key] for r in rows], dtype=np.float64)  # noqa: E731
        datasets = {f"{split}/{key}": (col(members, key), ("model",)) for key in ("loss", "nll", "err", "ece")}
        datasets.update({f"ensemble/{split}/{key}": (col(running, key), ("members",)) for key in ("nll", "err", "ece")})
        attrs = {**provenance({m["path"]: m["sha256"] for m in members},
                              {"dataset": name, "split": split, "precision": precision}, "evaluate"),
                 "models": json.dumps([m["path"] for m in members]), "eval_split": split}
        write_h5(metrics, scales={"model": np.arange(len(members)), "members": np.arange(1, len(members) + 1)},
                 datasets=datasets, attrs=attrs)
        result["metrics_file"] = str(metrics)
    return result


def evaluate_weights(model: nn.Module, data, *, wd: float, batch_size: int = 512, bn_batches: int | None = None,
                     precision: str = "fp32", train_split: Split | None = None) -> dict[str, float]:
    """Metrics of a network at its current weights, after recomputing BN statistics for them.

    Train metrics use the un-augmented training data (or ``train_split``, e.g. a fixed subset):
    ``train/loss`` (NLL + 0.5 * wd * ||w||^2, the training objective), ``train/nll``, ``train/err``;
    then ``<split>/nll`` and ``<split>/err``.
    """
    recalibrate_bn(model, data.train, batch_size=batch_size, max_batches=bn_batches, precision=precision)
    probs, labels = predict_probs(model, train_split or data.train, batch_size=batch_size, precision=precision)
    train_nll, train_err = nll(probs, labels), error(probs, labels)
    probs, labels = predict_probs(model, data.eval, batch_size=batch_size, precision=precision)
    split = data.eval_split
    return {"train/loss": train_nll + l2_term(model, wd), "train/nll": train_nll, "train/err": train_err,
            f"{split}/nll": nll(probs, labels), f"{split}/err": error(probs, labels)}
