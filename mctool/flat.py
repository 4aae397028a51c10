"""A network's parameters as one flat vector: the storage behind curves, planes and ensembles.

Parameters keep ``model.named_parameters()`` order. ``views`` splits a flat vector into per-parameter
views (no copies) to feed ``torch.func.functional_call``; ``assign`` copies one into a module for
evaluation with ordinary forward passes.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch
from torch import nn

from .checkpoint import ModelMeta, bad_field
from .errors import CheckpointError, ConfigError
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
    def from_record(cls, meta: ModelMeta, path: str | os.PathLike) -> "ParamLayout":
        """Take the ``param_layout`` field out of a curve's or ensemble's metadata (``meta.extra``) and parse it;
        a bad one is refused naming the file and the field."""
        try:
            return cls.from_json(meta.extra.pop("param_layout"))
        except ValueError as e:
            raise bad_field(path, "param_layout", str(e)) from None

    @classmethod
    def from_json(cls, text: str) -> "ParamLayout":
        """Parse a ``param_layout`` string; ValueError says what is wrong with it (it comes from a file)."""
        try:
            items = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as e:
            raise ValueError(f"not valid JSON ({e})") from None
        if not isinstance(items, list) or not all(
                isinstance(i, list) and len(i) == 2 and isinstance(i[0], str) and isinstance(i[1], list)
                and len(i[1]) <= 8 and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**48
                                           for d in i[1]) for i in items):
            raise ValueError("expected a JSON array of [name, [dim, ...]] pairs with non-negative dims")
        names = tuple(n for n, _ in items)
        if len(set(names)) != len(names):
            raise ValueError("a parameter name appears twice")
        return cls(names, tuple(tuple(s) for _, s in items))

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

    def views(self, flat: torch.Tensor, channels_last: list[bool] | None = None) -> dict[str, torch.Tensor]:
        """Per-parameter views of ``flat`` (gradients flow back into it).

        With a ``channels_last`` mask (``channels_last_mask``), ``flat`` is in memory order (``to_memory_order``)
        and the masked 4-D weights come out as channels-last views, without a copy.
        """
        mask = channels_last or [False] * len(self.names)
        # channels-last: stored as (O, H, W, I), viewed as (O, I, H, W) with channels-last strides
        return {n: v.view(s[0], s[2], s[3], s[1]).permute(0, 3, 1, 2) if cl else v.view(s)
                for n, v, s, cl in zip(self.names, torch.split(flat, self.numels), self.shapes, mask)}

    def channels_last_mask(self, model: nn.Module) -> list[bool]:
        """Which parameters of ``model`` are 4-D weights stored channels-last (and not also contiguous)."""
        named = dict(model.named_parameters())
        return [len(s) == 4 and not named[n].is_contiguous() and named[n].is_contiguous(
            memory_format=torch.channels_last) for n, s in zip(self.names, self.shapes)]

    def to_memory_order(self, rows: torch.Tensor, channels_last: list[bool], inverse: bool = False) -> torch.Tensor:
        """Flat rows ``[n, P]`` from file order to the memory order of ``views(..., channels_last)``
        (or back, with ``inverse``); only the masked weights move."""
        if not any(channels_last):
            return rows
        n, out = rows.shape[0], []
        for chunk, shape, cl in zip(torch.split(rows, self.numels, dim=1), self.shapes, channels_last):
            if cl:
                o, i, h, w = shape
                chunk = (chunk.reshape(n, o, h, w, i).permute(0, 1, 4, 2, 3) if inverse else
                         chunk.reshape(n, o, i, h, w).permute(0, 1, 3, 4, 2)).reshape(n, -1)
            out.append(chunk)
        return torch.cat(out, dim=1)

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


def state_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """The buffers of ``model`` that its state dict holds (BatchNorm statistics...): non-persistent ones, such as
    timm's relative position indices, are rebuilt with the network and neither stored nor loaded."""
    keys = set(model.state_dict().keys())
    return {n: b for n, b in model.named_buffers() if n in keys}


def load_buffers(model: nn.Module, buffers: dict[str, torch.Tensor]) -> None:
    """Load stored ``buffers`` into ``model``: every buffer of its state dict is set (the stored ones, the others
    kept), and names the state dict does not hold are left out: non-persistent buffers, which ensemble files
    written by mctool 0.2.0 may hold (they are rebuilt with the network). Callers check the stored names and
    shapes first (``check_network``, ``build_network``)."""
    state = model.state_dict()
    model.load_state_dict({**state, **{n: b for n, b in buffers.items() if n in state}}, strict=True)


def check_network(meta: ModelMeta, layout: ParamLayout, buffers: list[dict[str, torch.Tensor]],
                  path: str | os.PathLike) -> None:
    """Refuse a file whose parameter layout or buffers do not fit ``meta``'s architecture, before building it.

    The network is built on the ``meta`` device (shapes, no storage), so a file cannot make mctool allocate a
    network larger than the parameters it holds.
    """
    try:
        with torch.device("meta"):
            model = build_model(meta.arch, meta.num_classes, meta.in_chans, meta.arch_kwargs)
    except ConfigError as e:
        raise ConfigError(f"cannot rebuild the network of '{path}': {e}") from None
    diff = ParamLayout.of(model).differences(layout)
    own = {n: tuple(b.shape) for n, b in model.named_buffers()}
    for i, bufs in enumerate(buffers):
        if diff:
            break
        where = f" of member {i}" if len(buffers) > 1 else ""
        diff = [f"buffer{where} '{n}' of shape {tuple(b.shape)} is not a buffer of that shape in the network"
                for n, b in bufs.items() if own.get(n) != tuple(b.shape)][:5]
    if diff:
        raise CheckpointError(f"'{path}': stored parameters do not fit architecture '{meta.arch}': "
                              f"{'; '.join(diff)}.")


def build_network(meta: ModelMeta, layout: ParamLayout, buffers: dict[str, torch.Tensor]) -> nn.Module:
    """A network of ``meta``'s architecture with ``buffers`` loaded (parameters to be assigned), in eval mode."""
    model = build_model(meta.arch, meta.num_classes, meta.in_chans, meta.arch_kwargs)
    if ParamLayout.of(model) != layout:
        diff = ParamLayout.of(model).differences(layout)
        raise CheckpointError(f"stored parameters do not fit architecture '{meta.arch}': {'; '.join(diff)}.")
    problem = [n for n, b in buffers.items() if n not in dict(model.named_buffers())
               or model.get_buffer(n).shape != b.shape]
    if problem:
        raise CheckpointError(f"stored buffers do not fit architecture '{meta.arch}': {', '.join(problem[:5])}.")
    load_buffers(model, buffers)
    return model.eval()
