"""A network's parameters as one flat vector: the storage behind curves, planes and ensembles.

Parameters keep ``model.named_parameters()`` order. ``views`` splits a flat vector into per-parameter
views (no copies) to feed ``torch.func.functional_call``; ``assign`` copies one into a module for
evaluation with ordinary forward passes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch
from torch import nn

from .checkpoint import ModelMeta
from .errors import CheckpointError
from .models import build_model


@dataclass(frozen=True)
class ParamLayout:
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, model: nn.Module) -> "ParamLayout":
        named = list(model.named_parameters())
        return cls(tuple(n for n, _ in named), tuple(tuple(p.shape) for _, p in named))

    @classmethod
    def from_json(cls, text: str) -> "ParamLayout":
        items = json.loads(text)
        return cls(tuple(n for n, _ in items), tuple(tuple(s) for _, s in items))

    def to_json(self) -> str:
        return json.dumps([[n, list(s)] for n, s in zip(self.names, self.shapes)])

    @property
    def numels(self) -> list[int]:
        return [math.prod(s) for s in self.shapes]

    @property
    def size(self) -> int:
        return sum(self.numels)

    def flatten(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """One float32 vector of the named tensors (e.g. a state dict), in layout order."""
        return torch.cat([tensors[n].detach().reshape(-1).float() for n in self.names])

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-parameter views of ``flat`` (gradients flow back into it)."""
        return {n: v.view(s) for n, v, s in zip(self.names, torch.split(flat, self.numels), self.shapes)}

    @torch.no_grad()
    def assign(self, model: nn.Module, flat: torch.Tensor) -> None:
        """Copy ``flat`` into the module's parameters."""
        params = dict(model.named_parameters())
        for n, v in self.views(flat).items():
            params[n].copy_(v)

    def differences(self, other: "ParamLayout", limit: int = 5) -> list[str]:
        """Human-readable differences between two layouts (empty when they match)."""
        out = []
        mine, theirs = dict(zip(self.names, self.shapes)), dict(zip(other.names, other.shapes))
        out += [f"only in the first: {n}" for n in self.names if n not in theirs]
        out += [f"only in the second: {n}" for n in other.names if n not in mine]
        out += [f"{n}: {mine[n]} vs {theirs[n]}" for n in self.names if n in theirs and mine[n] != theirs[n]]
        if not out and self.names != other.names:
            out.append("the same parameters in a different order")
        return out[:limit] + ([f"... and {len(out) - limit} more"] if len(out) > limit else [])


def build_network(meta: ModelMeta, layout: ParamLayout, buffers: dict[str, torch.Tensor]) -> nn.Module:
    """A network of ``meta``'s architecture with ``buffers`` loaded (parameters to be assigned), in eval mode."""
    model = build_model(meta.arch, meta.num_classes, meta.in_chans, meta.arch_kwargs)
    if ParamLayout.of(model) != layout:
        diff = ParamLayout.of(model).differences(layout)
        raise CheckpointError(f"stored parameters do not fit architecture '{meta.arch}': {'; '.join(diff)}.")
    model.load_state_dict({**dict(model.state_dict()), **buffers}, strict=True)
    return model.eval()
