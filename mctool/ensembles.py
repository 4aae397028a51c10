"""Ensemble files (many networks in one file) and the snapshot collector that fills them (FGE, Snapshot
Ensembles); evaluating networks and ensembles is ``ensemble_eval.py``.

An ensemble file (kind ``ensemble``) stores its members as one ``[M, P]`` tensor of flat parameter
vectors plus each member's buffers (its own, recalibrated BN statistics). Ensemble predictions are the
mean of the members' softmax outputs.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .batched import WideNetworks, pays_off
from .bn import recalibrate_bn
from .checkpoint import ModelMeta, bad_field, check_finite, metadata_int, read_checkpoint, save_checkpoint, write_model
from .errors import CheckpointError, ConfigError
from .evaluation import predict_probs, summarize
from .fileio import check_outputs, holds_output_locks, sha256_file
from .flat import ParamLayout, build_network, check_network, load_buffers, state_buffers
from .options import check_count
from .results import FileRef, PointResult
from .calls import library_call

_MEMBERS = "members"


@dataclass
class Ensemble:
    meta: ModelMeta
    layout: ParamLayout
    members: torch.Tensor  # [M, P]
    buffers: list[dict[str, torch.Tensor]]
    info: list[dict[str, Any]] = field(default_factory=list)
    path: Path | None = None
    sha256: str | None = None

    def __len__(self) -> int:
        return self.members.shape[0]

    @library_call
    def network(self, i: int, model: nn.Module | None = None) -> nn.Module:
        """Member ``i`` (0-based) as a network; pass ``model`` to reuse one instead of building another."""
        model = model or build_network(self.meta, self.layout, self.buffers[i])
        load_buffers(model, self.buffers[i])
        self.layout.assign(model, self.members[i].to(next(model.parameters()).device))
        return model


def save_ensemble(path: str | Path, ens: Ensemble, config: dict[str, Any]) -> None:
    md = ModelMeta(**{**asdict(ens.meta), "kind": "ensemble", "config": config,
                      "extra": {"param_layout": ens.layout.to_json(), "num_members": str(len(ens)),
                                "member_info": json.dumps(ens.info)}}).to_metadata()
    tensors = {_MEMBERS: ens.members}
    for i, bufs in enumerate(ens.buffers):
        tensors.update({f"buffers/{i}/{k}": v for k, v in bufs.items()})
    save_checkpoint(path, tensors, md)


@library_call
def load_ensemble(path: str | Path) -> Ensemble:
    """An ensemble file (``fge``, ``train --schedule sse``, ``evaluate -o``): its members as one flat parameter
    vector each (``members[i]``), with their buffers; ``ens.network(i)`` builds member ``i`` as a network.
    Another kind of file is refused with a hint at what to do with it."""
    path = Path(path)
    tensors, md = read_checkpoint(path)
    if md.get("kind") != "ensemble":
        kind = md.get("kind", "plain safetensors")
        hint = {"curve": "; --index picks a member of an ensemble file (fge, train --schedule sse, ensemble -o): for "
                         "a curve, give --t T instead",
                "curve-state": "; for a curve, give --t T instead of --index",
                "model": "; it is already a single network", "train-state": "; it is already a single network"}
        raise CheckpointError(f"'{path}' is a '{kind}' file, not an ensemble{hint.get(kind, '')}.")
    meta = ModelMeta.from_metadata(md, path)
    missing = [k for k in ("param_layout", "num_members") if k not in meta.extra]
    missing += [] if _MEMBERS in tensors else [f"the tensor {_MEMBERS}"]
    if missing:
        raise CheckpointError(f"'{path}' is not a complete ensemble file (missing {', '.join(missing)}).")
    check_finite(path, tensors)
    layout = ParamLayout.from_record(meta, path)
    m = metadata_int(meta.extra, "num_members", path, 1, 1_000_000)
    meta.extra.pop("num_members")
    try:
        info = json.loads(meta.extra.pop("member_info", "[]"))
    except (json.JSONDecodeError, RecursionError):
        info = None
    if not isinstance(info, list) or not all(isinstance(i, dict) for i in info):
        raise bad_field(path, "member_info", "expected a JSON array of objects")
    if info and len(info) != m:
        raise bad_field(path, "member_info", f"{len(info)} entries for {m} members")
    members = tensors[_MEMBERS]
    if members.shape != (m, layout.size) or not members.is_floating_point():
        raise CheckpointError(f"'{path}': members of shape {tuple(members.shape)} ({members.dtype}) do not match {m} "
                              f"networks of {layout.size} parameters (floating point).")
    members = members.float()
    buffers: list[dict[str, torch.Tensor]] = [{} for _ in range(m)]
    stray = []
    for k, v in tensors.items():
        parts = k.split("/", 2)
        if len(parts) == 3 and parts[0] == "buffers" and parts[1].isdecimal() and parts[1] == str(int(parts[1])) \
                and int(parts[1]) < m:
            buffers[int(parts[1])][parts[2]] = v
        elif k != _MEMBERS:
            stray.append(k)
    if stray:
        raise CheckpointError(f"'{path}' has tensors an ensemble file does not hold: {', '.join(stray[:5])}.")
    check_network(meta, layout, buffers, path)
    return Ensemble(meta, layout, members, buffers, info, path, sha256_file(path))


class SnapshotCollector:
    """Collects snapshots of a network being trained (FGE, Snapshot Ensembles).

    Each snapshot gets its own BN recalibration, is evaluated, and joins the running ensemble (mean of
    softmax) whose metrics are recorded. Snapshots wait until ``points_per_pass`` of them are pending, then go
    through one pass over the data together (``batched.WideNetwork``; one at a time, each as it is taken, when
    that is 1 or would not be faster: ``batched.pays_off``; one at a time when the architecture cannot be
    widened); ``flush`` evaluates whatever is pending. Pending snapshots are part of the
    resumable state, so an interrupted run loses none of them.
    """

    def __init__(self, model: nn.Module, data, *, batch_size: int = 512, bn_batches: int | None = None,
                 precision: str = "fp32", points_per_pass: int = 1, channels_last: bool = False,
                 bn_data: str = "augmented"):
        self.eval_model = copy.deepcopy(model).eval()
        self.bn_data = bn_data
        self.layout = ParamLayout.of(model)
        self.data, self.batch_size, self.bn_batches, self.precision = data, batch_size, bn_batches, precision
        # where P networks side by side would not be faster (batched.pays_off), each snapshot goes at once
        device = next(model.parameters()).device
        self.points_per_pass = points_per_pass if pays_off(model, device) else 1
        self._wides = WideNetworks(data, channels_last=channels_last)
        self.members: list[torch.Tensor] = []
        self.buffers: list[dict[str, torch.Tensor]] = []
        self.rows: list[dict[str, float]] = []
        self.probs_sum: torch.Tensor | None = None
        self.pending: list[tuple[torch.Tensor, dict[str, float]]] = []  # (flat weights, info), not yet evaluated

    @torch.no_grad()
    def add(self, model: nn.Module, **info: float) -> list[dict[str, float]]:
        """Take a snapshot of ``model``; returns the rows of the snapshots this evaluated (none while fewer than
        ``points_per_pass`` are pending)."""
        self.pending.append((self.layout.flatten(dict(model.named_parameters())), info))
        return self.flush() if len(self.pending) >= self.points_per_pass else []

    @torch.no_grad()
    def flush(self) -> list[dict[str, float]]:
        """Evaluate the pending snapshots (in passes of at most ``points_per_pass``) and add them to the ensemble,
        in the order they were taken; returns their rows."""
        rows: list[dict[str, float]] = []
        while self.pending:
            chunk, rest = self.pending[:self.points_per_pass], self.pending[self.points_per_pass:]
            for (w, info), (probs, labels, bufs) in zip(chunk, self._evaluate(torch.stack([w for w, _ in chunk]))):
                self.probs_sum = probs if self.probs_sum is None else self.probs_sum + probs
                member, ens = summarize(probs, labels), summarize(self.probs_sum / (len(self.members) + 1), labels)
                self.members.append(w.cpu())
                self.buffers.append(bufs)
                rows.append({**info, **{f"member_{k}": v for k, v in member.items()},
                             **{f"ensemble_{k}": v for k, v in ens.items()}})
                self.rows.append(rows[-1])
            self.pending = rest
        return rows

    def _evaluate(self, weights: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]:
        """Each network's evaluation probabilities, labels and recalibrated buffers, for flat ``weights`` [n, N]."""
        opts = {"batch_size": self.batch_size, "precision": self.precision, "sharded": True}
        bn = {"max_batches": self.bn_batches, "bn_data": self.bn_data}
        n = len(weights)
        wide = self._wides.get(n, self.eval_model, n, self.layout, "these snapshots")
        if wide is not None:
            wide.assign(weights.to(next(wide.parameters()).device))
            recalibrate_bn(wide, self.data.train, **bn, **opts)
            probs, labels = predict_probs(wide, self.data.eval, **opts)
            return [(probs[:, k].contiguous(), labels, {b: v.cpu() for b, v in wide.running_stats(k).items()})
                    for k in range(n)]
        out = []
        for w in weights:
            self.layout.assign(self.eval_model, w)
            recalibrate_bn(self.eval_model, self.data.train, **bn, **opts)
            probs, labels = predict_probs(self.eval_model, self.data.eval, **opts)
            bufs = {k: v.detach().cpu().clone() for k, v in state_buffers(self.eval_model).items()}
            out.append((probs, labels, bufs))
        return out

    def state_tensors(self) -> dict[str, torch.Tensor]:
        t: dict[str, torch.Tensor] = {}
        if self.members:
            t["snapshots/members"] = torch.stack(self.members)
            t["snapshots/probs_sum"] = self.probs_sum
            for i, bufs in enumerate(self.buffers):
                t.update({f"snapshots/buffers/{i}/{k}": v for k, v in bufs.items()})
        if self.pending:
            t["snapshots/pending"] = torch.stack([w for w, _ in self.pending]).cpu()
        return t

    def pending_info(self) -> list[dict[str, float]]:
        """What the resumable state records of the pending snapshots besides their weights."""
        return [info for _, info in self.pending]

    def load_state(self, tensors: dict[str, torch.Tensor], rows: list[dict[str, float]],
                   pending: list[dict[str, float]] = (), path: str | Path = "the training state") -> None:
        """Restore what ``state_tensors``, the rows and ``pending_info`` saved (metadata checked by
        ``checkpoint.check_state_metadata``, tensor shapes against the network by ``check_state_tensors``)."""
        members = tensors.get("snapshots/members")
        waiting = tensors.get("snapshots/pending")
        if len(rows) != (0 if members is None else len(members)) or len(pending) != (0 if waiting is None
                                                                                     else len(waiting)):
            raise CheckpointError(f"'{path}': the records of {len(rows)} evaluated and {len(pending)} pending "
                                  "snapshot(s) do not match its snapshot tensors; start over with --force.")
        self.rows = rows
        if members is not None:
            self.members = list(members.float())
            self.probs_sum = tensors["snapshots/probs_sum"].double().to(self.data.eval.device)
            self.buffers = [{k.split("/", 3)[3]: v for k, v in tensors.items()
                             if k.startswith(f"snapshots/buffers/{i}/")} for i in range(len(self.members))]
        if waiting is not None:
            self.pending = [(w.float().to(self.data.eval.device), info) for w, info in zip(waiting, pending)]

    def h5_datasets(self, split: str) -> dict[str, tuple[np.ndarray, tuple[str, ...]]]:
        """``members/<split>/nll|err|ece|brier``, ``ensemble/<split>/nll|err|ece|brier`` and
        ``members/iteration``, by member (pending snapshots included, their metrics NaN)."""
        rows = self.rows + self.pending_info()
        col = lambda k: np.array([r.get(k, np.nan) for r in rows], dtype=np.float64)  # noqa: E731
        out = {f"members/{split}/{k}": (col(f"member_{k}"), ("member",)) for k in ("nll", "err", "ece", "brier")}
        out.update({f"ensemble/{split}/{k}": (col(f"ensemble_{k}"), ("member",)) for k in ("err", "nll", "ece",
                                                                                          "brier")})
        out["members/iteration"] = (col("iteration"), ("member",))
        return out

    def ensemble(self, meta: ModelMeta) -> Ensemble:
        return Ensemble(meta, self.layout, torch.stack(self.members), self.buffers, self.rows)

    def average(self) -> torch.Tensor:
        """The mean of the snapshots' weights (Stochastic Weight Averaging)."""
        return torch.stack(self.members).mean(0)


def as_ensemble_meta(meta: ModelMeta, inputs: dict[str, str]) -> ModelMeta:
    return ModelMeta(**{**asdict(meta), "kind": "ensemble", "inputs": inputs, "extra": {}})


def rows_summary(rows: list[dict[str, float]]) -> dict[str, Any]:
    return {k[len("ensemble_"):]: v for k, v in rows[-1].items() if k.startswith("ensemble_")} if rows else {}


@library_call
@holds_output_locks
def export_member(path: str | Path, index: int, output: str | Path, *, force: bool = False) -> PointResult:
    """Write member ``index`` (0-based) of an ensemble file as an ordinary model checkpoint."""
    t0 = time.time()
    check_count("--index", index, 0)
    check_outputs({"--output": output}, [path], force=force, formats={"--output": "safetensors"})
    ens = load_ensemble(path)
    if not 0 <= index < len(ens):
        raise ConfigError(f"--index must be between 0 and {len(ens) - 1} for '{path}', got {index}.")
    meta = ModelMeta(**{**asdict(ens.meta), "kind": "model", "inputs": {str(path): ens.sha256},
                        "config": {"ensemble": str(path), "index": index,
                                   **{k: ens.meta.config[k] for k in ("wd", "split") if k in ens.meta.config}},
                        "extra": {"ensemble_sha256": ens.sha256, "ensemble_index": str(index)}})
    write_model(output, ens.network(index), meta)
    return PointResult(command="point", inputs=[FileRef(str(path), ens.sha256)],
                       outputs={"model": FileRef.of(output)}, metrics={"train": None, "eval": None},
                       seconds=time.time() - t0, index=index)


