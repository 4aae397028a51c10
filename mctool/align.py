"""``mctool align``: permute network B's hidden units into network A's order (Git Re-Basin).

A network's hidden units can be permuted without changing the function it computes: the output channels
of a layer, the input channels of the layers that read them, and every per-channel parameter and buffer
in between. ``discover_groups`` finds these permutation groups from the network's graph (``torch.fx``),
with union-find over (tensor, axis) nodes; ``weight_matching`` and ``activation_matching`` choose one
permutation per group; ``align`` writes B permuted, after checking that it computes what B computes.

Anything the tracer cannot follow is refused with a ``ConfigError`` that names the layer and the
operation: a wrong permutation would silently change the network.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import math
import operator
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from .checkpoint import LoadedModel, ModelMeta, load_model, meta_differences, write_model
from .data import check_fits, load_data
from .choices import ALIGN_METHODS
from .errors import ConfigError, MctoolError
from .fileio import check_outputs, holds_output_locks
from .h5io import provenance, write_h5
from .options import MAX_ITERATIONS, check_count, check_seed
from .results import AlignResult, FileRef, file_refs
from .calls import library_call
from .runtime import resolve_device
from .console import progress_bar

METHODS = ALIGN_METHODS

# Layers whose parameters are per output channel (dim 0) and per input channel (dim 1), traced as leaves.
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORM = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
# Modules and functions that act on each channel alone (the permutation passes through them unchanged).
_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.ELU,
    nn.Mish, nn.Softplus, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)
_POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                 nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
                 nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_NONLINEAR = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.ELU,
              nn.Mish, nn.Softplus)
_NONLINEAR_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, torch.sigmoid, torch.tanh,
                        F.hardswish, F.elu, F.mish, F.softplus}
_ELEMENTWISE_FUNCTIONS = _NONLINEAR_FUNCTIONS | {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, torch.neg,
                                                  operator.neg, F.hardsigmoid}
_POOL_FUNCTIONS = {F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
                   F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
                   F.adaptive_max_pool2d, F.adaptive_max_pool3d}
_NONLINEAR_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_"}
_ELEMENTWISE_METHODS = _NONLINEAR_METHODS | {"contiguous", "clone", "float", "to", "neg", "detach"}
# Element-by-element arithmetic of two tensors (or a tensor and a number).
_BINARY = {operator.add, operator.iadd, operator.mul, operator.imul, operator.sub, operator.isub, operator.truediv,
           operator.itruediv, torch.add, torch.mul, torch.sub, torch.div}
_BINARY_METHODS = {"add", "add_", "mul", "mul_", "sub", "sub_", "div", "div_"}
_REDUCE_METHODS = {"mean", "sum", "amax"}
_REDUCE_FUNCTIONS = {torch.mean, torch.sum, torch.amax}


@dataclass(frozen=True)
class Member:
    """Axis ``axis`` of tensor ``name`` (a parameter or buffer) is indexed by the group's units, each unit
    covering ``inner`` consecutive entries (a Linear's input columns ``c * H * W + k`` after a flatten), from
    entry ``offset`` on (a layer reading a concatenation: the units of its later parts come after the earlier
    parts' entries)."""

    name: str
    axis: int
    inner: int = 1
    offset: int = 0


@dataclass
class Group:
    """One permutation group: ``size`` units shared by all ``members``; ``producers`` are the layers that write
    its channels (several for a residual stream); ``points`` the graph nodes where activation matching
    reads its units, with the channel axis of each node's output; ``tie_points`` where it reads them to break
    ties (before the nonlinearity whose outputs are ``points``: a unit that is never active is 0 after a ReLU,
    equally like every unit there)."""

    name: str
    size: int
    members: list[Member]
    producers: list[str]
    points: list[tuple[str, int]] = field(default_factory=list)
    tie_points: list[tuple[str, int]] = field(default_factory=list)


@dataclass(frozen=True)
class _Chan:
    """What a traced tensor's channel axis holds: the units of union-find element ``uf`` along ``axis``,
    ``inner`` entries each; or, after a concatenation along the channel axis, ``parts``: the (uf element,
    units, inner) of each concatenated piece, in order (``uf`` is then -1)."""

    uf: int
    axis: int
    inner: int = 1
    parts: tuple[tuple[int, int, int], ...] = ()

    def pieces(self, length: int) -> list[tuple[int, int, int, int]]:
        """(uf element, units, inner, first entry) of each piece of a channel axis of ``length`` entries."""
        if not self.parts:
            return [(self.uf, length // self.inner, self.inner, 0)]
        starts = np.cumsum([0] + [n * k for _, n, k in self.parts[:-1]]).tolist()
        return [(uf, n, k, start) for (uf, n, k), start in zip(self.parts, starts)]

    @property
    def plain(self) -> bool:
        """One entry per unit (no flattened block) in every piece."""
        return all(k == 1 for _, _, k in self.parts) if self.parts else self.inner == 1

    def scaled(self, k: int) -> _Chan:
        """The same units after flattening ``k`` entries into each entry."""
        if not self.parts:
            return replace(self, inner=self.inner * k)
        return replace(self, parts=tuple((uf, n, inner * k) for uf, n, inner in self.parts))


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []
        self.fixed: list[bool] = []

    def new(self, fixed: bool = False) -> int:
        self.parent.append(len(self.parent))
        self.fixed.append(fixed)
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a != b:
            self.parent[max(a, b)] = min(a, b)
            self.fixed[min(a, b)] = self.fixed[a] or self.fixed[b]

    def fix(self, i: int) -> None:
        self.fixed[self.find(i)] = True


def _channels_first_layernorm() -> tuple[type, ...]:
    """LayerNorm subclasses that normalise over axis 1 of ``[N, C, H, W]`` (timm's ``LayerNorm2d``)."""
    try:
        from timm.layers import LayerNorm2d
    except ImportError:  # pragma: no cover - timm is a dependency
        return ()
    return (LayerNorm2d,)


class _Tracer(torch.fx.Tracer):
    """torch.fx's tracer, with every convolution, linear and normalisation layer (timm's too) kept as one node."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (*_CONV, nn.Linear, *_NORM)) or super().is_leaf_module(m, qualname)


def _meta_tracer() -> type:
    from torch.fx.experimental.meta_tracer import MetaTracer

    class _ShapeTracer(MetaTracer):
        """torch.fx's tracer with the input's shape known (meta tensors), so that branches on shapes are taken as
        they are for that input (timm's VGG pools only inputs smaller than its classifier's window)."""

        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, (*_CONV, nn.Linear, *_NORM)) or super().is_leaf_module(m, qualname)

    return _ShapeTracer


def trace(model: nn.Module, example: torch.Tensor | None = None) -> torch.fx.GraphModule:
    """The network as a ``torch.fx`` graph; ConfigError when the tracer cannot follow its forward pass. With an
    ``example`` input, a forward pass that branches on its input's shape is traced for that shape."""
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # the tracer raises anything: TraceError, TypeError, NotImplementedError...
        graph = None
        if example is not None:
            import inspect
            import warnings

            name = next(iter(inspect.signature(model.forward).parameters), "x")
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    graph = _meta_tracer()().trace(model, meta_args={name: example.to("meta")})
            except Exception:
                graph = None
        if graph is None:
            raise ConfigError(f"align cannot trace the network ({type(model).__name__}) with torch.fx: "
                              f"{type(e).__name__}: {str(e)[:300]}. Its hidden units cannot be matched.") from None
    return torch.fx.GraphModule(model, graph)


def _shape(node: Any) -> tuple[int, ...] | None:
    meta = getattr(node, "meta", {}).get("tensor_meta") if isinstance(node, torch.fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _what(node: torch.fx.Node, gm: torch.fx.GraphModule) -> str:
    """A node as a user knows it: the layer and the operation."""
    if node.op == "call_module":
        return f"layer '{node.target}' ({type(gm.get_submodule(node.target)).__name__})"
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    where = node.meta.get("nn_module_stack")
    layer = f" in layer '{list(where)[-1]}'" if where else ""
    return f"operation '{target}' ({node.op}, node '{node.name}'){layer}"


@contextlib.contextmanager
def _no_tqdm_monitor() -> Iterator[None]:
    """torch.fx's interpreter makes a (disabled) tqdm bar for every run, and tqdm starts its monitor thread for it,
    which stays for the rest of the caller's process: not during this block."""
    try:
        from tqdm import tqdm
    except ImportError:  # (torch then uses a stub of its own, without a thread)
        yield
        return
    interval = tqdm.monitor_interval
    tqdm.monitor_interval = 0
    try:
        yield
    finally:
        tqdm.monitor_interval = interval


def discover_groups(model: nn.Module, example: torch.Tensor) -> list[Group]:
    """The permutation groups of ``model``, found by tracing it with ``torch.fx`` and running ``example`` (a small
    batch of inputs) through the graph for the shapes.

    Rules: a Conv/Linear's output channels (weight and bias dim 0) start a group, its input channels (weight dim 1)
    join the group of the tensor it reads; normalisation layers' parameters and running statistics join their
    input's group; element-wise operations, pooling and dropout pass it on; adding or multiplying two tensors merges
    their groups (a residual stream shares one permutation); flattening a ``[C, H, W]`` map makes each unit a block
    of ``H * W`` features. The network's input channels and its outputs are never permuted. Everything else that
    touches a hidden channel raises ConfigError naming the layer and the operation.
    """
    gm = trace(model, example)
    try:
        with torch.no_grad(), _no_tqdm_monitor():
            ShapeProp(gm).propagate(example)
    except Exception as e:
        raise ConfigError(f"align cannot run the traced network ({type(model).__name__}) on an example batch: "
                          f"{type(e).__name__}: {str(e)[:300]}.") from None
    uf = _UnionFind()
    desc: dict[torch.fx.Node, _Chan | None] = {}
    # 1-D parameters read outside a layer (layer scale): node -> (parameter name, the axis holding its entries)
    attrs: dict[torch.fx.Node, tuple[str, int]] = {}
    members: dict[int, list[tuple[Member, int]]] = {}  # uf element -> (member, units)
    producers: dict[int, list[str]] = {}
    points: dict[int, list[tuple[str, int, bool]]] = {}  # uf element -> (node, channel axis, after a nonlinearity)
    states = dict(gm.named_parameters()) | dict(gm.named_buffers())
    layernorm_2d = _channels_first_layernorm()

    def refuse(node: torch.fx.Node, why: str) -> ConfigError:
        return ConfigError(f"align cannot permute the hidden units of this network: {_what(node, gm)} {why}. "
                           "Only Conv/Linear/normalisation layers, element-wise operations, pooling, residual "
                           "additions, concatenation, flattening into a Linear and 1-D scales are understood.")

    owner: dict[tuple[str, int, int], int] = {}  # (tensor, axis, offset) -> the uf element it was first tied to

    def tie(uf_id: int, name: str, axis: int, inner: int = 1, offset: int = 0, units: int | None = None) -> None:
        if name in states:
            units = states[name].shape[axis] // inner if units is None else units
            members.setdefault(uf_id, []).append((Member(name, axis, inner, offset), units))
            # a layer called twice (shared weights) ties the groups of both calls together
            uf.union(owner.setdefault((name, axis, offset), uf_id), uf_id)

    def pieces(node: torch.fx.Node, c: _Chan) -> list[tuple[int, int, int, int]]:
        return c.pieces(_shape(node)[c.axis])

    def tie_chan(c: _Chan, node: torch.fx.Node, name: str, axis: int) -> None:
        """Tie axis ``axis`` of ``name`` to the channels of ``node`` (each piece of a concatenation in turn)."""
        for part, units, inner, start in pieces(node, c):
            tie(part, name, axis, inner, start, units)

    def layout(node: torch.fx.Node, c: _Chan) -> list[tuple[int, int]]:
        """Units and entries per unit of each piece: what two tensors must share to be combined entry by entry."""
        return [(units, inner) for _, units, inner, _ in pieces(node, c)]

    def add_point(c: _Chan, node: torch.fx.Node, nonlinear: bool) -> None:
        if not c.parts and c.inner == 1:  # a concatenation's units are read where their pieces are made
            points.setdefault(c.uf, []).append((node.name, c.axis, nonlinear))

    def tensor_args(node: torch.fx.Node) -> list[torch.fx.Node]:
        found: list[torch.fx.Node] = []
        torch.fx.node.map_arg((node.args, node.kwargs), lambda a: found.append(a) if _shape(a) is not None else None)
        return found

    def dims_arg(node: torch.fx.Node) -> list[int]:
        dims = node.args[1:] if node.op == "call_method" else node.args[1:2]
        dims = node.kwargs.get("dims", dims)
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = dims[0]
        return [int(d) for d in dims]

    for node in gm.graph.nodes:
        shape = _shape(node)
        args = tensor_args(node)
        ins = [a for a in args if desc.get(a) is not None]
        scales = [a for a in args if a in attrs]
        if node.op == "placeholder":
            desc[node] = _Chan(uf.new(fixed=True), 1) if shape is not None and len(shape) >= 2 else None
            continue
        if node.op == "output":
            for a in ins:
                for part, _, _, _ in pieces(a, desc[a]):
                    uf.fix(part)  # the classes (any output) are never permuted
            if scales:
                raise refuse(node, "returns a parameter")
            continue
        if node.op == "get_attr":
            t = states.get(node.target)
            if t is not None and t.numel() > 1:
                if t.dim() != 1:
                    raise refuse(node, "reads a parameter or buffer of more than one axis directly (not through "
                                       "a layer)")
                attrs[node] = (node.target, 0)
            desc[node] = None
            continue
        if scales and not ins:
            # a 1-D parameter reshaped to broadcast against channels (``gamma.reshape(1, -1, 1, 1)``)
            name, axis = attrs[scales[0]]
            long = [i for i, n in enumerate(shape or ()) if n > 1]
            reshapes = node.op == "call_method" and node.target in ("reshape", "view") or node.target is torch.reshape
            if not reshapes or len(scales) != 1 or len(long) != 1 or shape[long[0]] != states[name].numel():
                raise refuse(node, "uses a parameter outside a layer in a way align cannot follow")
            attrs[node] = (name, long[0])
            desc[node] = None
            continue
        if shape is None:  # sizes, ints, tuples: not one tensor
            size_query = (node.op == "call_method" and node.target in ("size", "dim")) or node.target is getattr
            if ins and not size_query:
                raise refuse(node, "turns a hidden tensor into something that is not one tensor")
            desc[node] = None
            continue
        if not ins:
            # Computed from the input alone (or from constants): no hidden units involved.
            desc[node] = _Chan(uf.new(fixed=True), 1) if len(shape) >= 2 else None
            continue
        x = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else ins[0]
        x = ins[0] if x in attrs else x  # ``gamma * x``
        c = desc.get(x)
        if c is None:
            raise refuse(node, "reads a tensor whose channel axis align cannot follow")
        mod = gm.get_submodule(node.target) if node.op == "call_module" else None
        fn = node.target if node.op == "call_function" else None
        meth = node.target if node.op == "call_method" else None
        if scales and not (fn in _BINARY or meth in _BINARY_METHODS):
            raise refuse(node, "uses a parameter outside a layer in a way align cannot follow")
        if mod is not None and isinstance(mod, (*_CONV, nn.Linear)):
            axis = 1 if isinstance(mod, _CONV) else len(shape) - 1
            if c.axis != axis or (isinstance(mod, _CONV) and not c.plain):
                raise refuse(node, "reads a tensor whose channels are not on the axis it works on")
            groups = getattr(mod, "groups", 1)
            if groups == 1:
                out = _Chan(uf.new(), axis)
                tie_chan(c, x, f"{node.target}.weight", 1)
                producers.setdefault(out.uf, []).append(node.target)
            elif groups == mod.in_channels == mod.out_channels:  # depthwise: channel i reads channel i only
                out = c
            else:
                raise refuse(node, f"is a grouped convolution ({groups} groups)")
            tie_chan(out, x if out is c else node, f"{node.target}.weight", 0)
            tie_chan(out, x if out is c else node, f"{node.target}.bias", 0)
            desc[node] = out
            add_point(out, node, False)
        elif mod is not None and isinstance(mod, _NORM):
            if isinstance(mod, layernorm_2d):
                if c.axis != 1 or not c.plain or len(mod.normalized_shape) != 1:
                    raise refuse(node, "normalises over more than the channel axis")
            elif isinstance(mod, nn.LayerNorm):
                if c.axis != len(shape) - 1 or not c.plain or len(mod.normalized_shape) != 1:
                    raise refuse(node, "normalises over more than the channel axis")
            elif c.axis != 1 or not c.plain:
                raise refuse(node, "reads a tensor whose channels are not on axis 1")
            if isinstance(mod, nn.GroupNorm) and mod.num_groups not in (1, mod.num_channels):
                raise refuse(node, f"normalises groups of channels ({mod.num_groups} groups); permuting "
                                   "channels across groups would change it")
            for p in ("weight", "bias", "running_mean", "running_var"):
                tie_chan(c, x, f"{node.target}.{p}", 0)
            desc[node] = c
        elif (isinstance(mod, (*_ELEMENTWISE_MODULES, *_POOL_MODULES)) or fn in _ELEMENTWISE_FUNCTIONS
              or fn in _POOL_FUNCTIONS or meth in _ELEMENTWISE_METHODS):
            pools = isinstance(mod, _POOL_MODULES) or fn in _POOL_FUNCTIONS
            if len(ins) != 1 or (pools and (c.axis != 1 or not c.plain)):
                raise refuse(node, "mixes hidden tensors or pools across channels")
            if len(shape) <= c.axis or shape[c.axis] != _shape(x)[c.axis]:
                raise refuse(node, "changes the size of the channel axis")
            desc[node] = c
            if isinstance(mod, _NONLINEAR) or fn in _NONLINEAR_FUNCTIONS or meth in _NONLINEAR_METHODS:
                add_point(c, node, True)
        elif fn in _BINARY or meth in _BINARY_METHODS:
            others = [a for a in args if desc.get(a) is None and a not in attrs and math.prod(_shape(a)) > 1]
            if others:
                raise refuse(node, "combines a hidden tensor with a tensor of unknown channels")
            # broadcasting aligns axes from the end: compare channel axes counted from the last one
            first = desc[ins[0]]
            end = first.axis - len(_shape(ins[0]))
            for a in ins:
                ca = desc[a]
                if (ca.axis - len(_shape(a)), layout(a, ca)) != (end, layout(ins[0], first)):
                    raise refuse(node, "combines tensors whose channels do not line up")
                for (pa, *_), (pf, *_) in zip(pieces(a, ca), pieces(ins[0], first)):
                    uf.union(pf, pa)
            if len(shape) + end < 0 or shape[end] != _shape(ins[0])[first.axis]:
                raise refuse(node, "broadcasts along the channel axis")
            out = replace(first, axis=len(shape) + end)
            for s in scales:
                name, axis = attrs[s]
                if axis - len(_shape(s)) != end or not out.plain:
                    raise refuse(node, "scales the tensor along an axis that is not its channel axis")
                tie_chan(out, node, name, 0)
            desc[node] = out
            if len(ins) > 1 and (fn in (operator.add, operator.iadd, torch.add) or meth in ("add", "add_")):
                add_point(out, node, False)
        elif fn in (torch.cat, torch.concat, torch.concatenate):
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", node.kwargs.get("axis", 0))
            parts_in = node.args[0]
            if len(ins) != len(args) or not isinstance(parts_in, (list, tuple)):
                raise refuse(node, "concatenates a hidden tensor with a tensor of unknown channels")
            if dim % len(shape) != c.axis:
                raise refuse(node, "concatenates along an axis that is not the channel axis")
            parts: list[tuple[int, int, int]] = []
            for a in parts_in:
                ca = desc[a]
                if ca.axis != c.axis:
                    raise refuse(node, "concatenates tensors whose channels are not on the same axis")
                parts += [(part, units, inner) for part, units, inner, _ in pieces(a, ca)]
            desc[node] = _Chan(-1, c.axis, 1, tuple(parts))
        elif fn is torch.permute or meth in ("permute", "transpose") or fn is torch.transpose:
            ndim = len(shape)
            if fn is torch.transpose or meth == "transpose":
                d0, d1 = (int(d) % ndim for d in (node.args[1:3] or (node.kwargs["dim0"], node.kwargs["dim1"])))
                order = list(range(ndim))
                order[d0], order[d1] = d1, d0
            else:
                order = [d % ndim for d in dims_arg(node)]
            if not c.plain or sorted(order) != list(range(ndim)):
                raise refuse(node, "moves the axes of a flattened channel axis")
            desc[node] = replace(c, axis=order.index(c.axis))
        elif (isinstance(mod, nn.Flatten) or fn is torch.flatten or meth in ("flatten", "view", "reshape")
              or fn is torch.reshape):
            old = _shape(x)
            if shape == old:
                desc[node] = c
            elif c.axis == 1 and len(shape) == 2 and shape[0] == old[0]:
                desc[node] = c.scaled(math.prod(old[2:]))  # [N, C, *S] -> [N, C * prod(S)]
            else:
                raise refuse(node, f"reshapes the channel axis ({list(old)} -> {list(shape)})")
        elif fn in _REDUCE_FUNCTIONS or meth in _REDUCE_METHODS:
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            dims = [dims] if isinstance(dims, int) else list(dims or [])
            old = _shape(x)
            dims = [d % len(old) for d in dims]
            if not dims or not c.plain or any(d <= c.axis for d in dims):
                raise refuse(node, "reduces over the channel axis or the axes before it")
            desc[node] = c
        else:
            raise refuse(node, "is an operation align does not know how to permute through")
    return _collect(uf, members, producers, points)


def _collect(uf: _UnionFind, members: dict[int, list[tuple[Member, int]]], producers: dict[int, list[str]],
             points: dict[int, list[tuple[str, int, bool]]]) -> list[Group]:
    """Merge the union-find sets into groups (in graph order), dropping the fixed ones."""
    groups: dict[int, Group] = {}
    sizes: dict[int, set[int]] = {}
    after: dict[int, list[tuple[str, int]]] = {}
    for raw in sorted(set(members) | set(producers) | set(points)):
        root = uf.find(raw)
        if uf.fixed[root]:
            continue
        g = groups.setdefault(root, Group(name="", size=0, members=[], producers=[]))
        for m, size in members.get(raw, []):
            if m not in g.members:
                g.members.append(m)
                sizes.setdefault(root, set()).add(size)
        g.producers += producers.get(raw, [])
        g.points += [(name, axis) for name, axis, _ in points.get(raw, [])]
        after.setdefault(root, []).extend((name, axis) for name, axis, nonlinear in points.get(raw, []) if nonlinear)
    out = []
    for root, g in groups.items():
        if not g.members:
            continue
        if len(sizes[root]) != 1:
            raise ConfigError(f"align found channels of different sizes {sorted(sizes[root])} tied together at "
                              f"layer '{g.producers[0] if g.producers else g.members[0].name}'; it cannot permute "
                              "them.")
        g.size = sizes[root].pop()
        g.name = g.producers[0] if g.producers else g.members[0].name
        # activation matching reads the units after a nonlinearity where there is one, else where they are made
        # (those then break ties)
        made = sorted(set(g.points) - set(after[root]))
        g.points = sorted(set(after[root] or g.points))
        g.tie_points = made if after[root] else []
        out.append(g)
    return out


# Permutations: perm[i] is the unit of B that moves to position i (A's unit i).

def _index(perm: torch.Tensor, m: Member, length: int) -> torch.Tensor:
    """Indices that apply ``perm`` to member ``m``'s entries along an axis of ``length`` entries."""
    idx = (perm[:, None] * m.inner + torch.arange(m.inner, device=perm.device)).reshape(-1) if m.inner > 1 else perm
    if m.offset == 0 and len(idx) == length:
        return idx
    full = torch.arange(length, device=perm.device)
    full[m.offset:m.offset + len(idx)] = m.offset + idx
    return full


def permute_state(state: dict[str, torch.Tensor], groups: list[Group], perms: list[torch.Tensor], *,
                  skip: Member | None = None) -> dict[str, torch.Tensor]:
    """``state`` (a state dict) with every group's permutation applied to its members (all but ``skip``)."""
    out = dict(state)
    for g, perm in zip(groups, perms):
        for m in g.members:
            if m != skip and m.name in out:
                t = out[m.name]
                out[m.name] = t.index_select(m.axis, _index(perm.to(t.device), m, t.shape[m.axis]))
    return out


def _unit_rows(t: torch.Tensor, m: Member, size: int) -> torch.Tensor:
    """``t`` as ``[size, -1]``: one row per unit of the member's axis (its ``inner`` entries together)."""
    return t.narrow(m.axis, m.offset, size * m.inner).movedim(m.axis, 0).reshape(size, -1).float()


def _inner_product(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], names: list[str]) -> float:
    return sum(float(torch.dot(a[n].reshape(-1).float(), b[n].reshape(-1).float())) for n in names)


def _assign(score: torch.Tensor) -> torch.Tensor:
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(score.cpu().numpy(), maximize=True)
    return torch.as_tensor(cols[np.argsort(rows)], dtype=torch.long)


def weight_matching(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], groups: list[Group], *, seed: int = 0,
                    max_sweeps: int = 100) -> tuple[list[torch.Tensor], list[float]]:
    """Coordinate descent over the groups (random order, seeded): each step solves the linear assignment that
    maximises the sum, over the tensors tied to the group, of <A's unit slice, permuted B's unit slice>, with the
    other groups' current permutations applied. Returns the permutations and the objective <A, P(B)> (over
    the parameters ``a`` holds) after each sweep; stops after a sweep that changes nothing."""
    perms = [torch.arange(g.size, device=next(iter(b.values())).device) for g in groups]
    names = [n for n in a if a[n].is_floating_point()]
    g_rand = torch.Generator().manual_seed(seed)
    objective: list[float] = []
    for _ in range(max_sweeps):
        changed = False
        for gi in torch.randperm(len(groups), generator=g_rand).tolist():
            g = groups[gi]
            score = torch.zeros(g.size, g.size, dtype=torch.float64, device=perms[gi].device)
            for m in g.members:
                if m.name not in a:
                    continue
                # every other axis of this tensor gets its group's current permutation
                other = permute_state({m.name: b[m.name]}, groups, perms, skip=m)[m.name]
                score += (_unit_rows(a[m.name], m, g.size) @ _unit_rows(other, m, g.size).T).double()
            new = _assign(score).to(perms[gi].device)
            if not torch.equal(new, perms[gi]):
                # keep the old one on a tie: no endless swapping between equally good permutations
                old_score = score[torch.arange(g.size), perms[gi]].sum()
                if score[torch.arange(g.size), new].sum() > old_score:
                    perms[gi], changed = new, True
        objective.append(_inner_product(a, permute_state(b, groups, perms), names))
        if not changed:
            break
    return perms, objective


class _Recorder(torch.fx.Interpreter):
    """Runs a traced network and keeps the outputs of the nodes named in ``wanted``."""

    def __init__(self, gm: torch.fx.GraphModule, wanted: set[str]):
        super().__init__(gm)
        self.wanted: set[str] = wanted
        self.seen: dict[str, Any] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.wanted:  # a copy: an in-place ReLU after it would overwrite a layer's own output
            self.seen[n.name] = out.detach().clone() if isinstance(out, torch.Tensor) else out
        return out


def _rows(t: torch.Tensor, axis: int) -> torch.Tensor:
    """Activations with channels on ``axis`` as ``[samples, C]`` in float64."""
    return t.detach().movedim(axis, -1).reshape(-1, t.shape[axis]).double()


#: The weight of the correlation before a nonlinearity in activation matching (``Group.tie_points``).
_TIE_WEIGHT = 1e-6


def activation_matching(model_a: nn.Module, model_b: nn.Module, groups: list[Group],
                        batches: Iterator[torch.Tensor]) -> tuple[list[torch.Tensor], list[float]]:
    """One assignment per group that maximises the summed correlation between A's and B's units, measured on
    ``batches`` at the group's points (averaged over its points). Returns the permutations and the mean
    correlation of the matched units of each group."""
    batches = iter(batches)
    first = next(batches)
    gm_a, gm_b = trace(model_a, first), trace(model_b, first)
    wanted = {p for g in groups for p in (*g.points, *g.tie_points)}  # (node, channel axis)
    stats: dict[str, list[torch.Tensor | float]] = {}
    for x in itertools.chain([first], batches):
        ra, rb = _Recorder(gm_a, {p for p, _ in wanted}), _Recorder(gm_b, {p for p, _ in wanted})
        with torch.no_grad(), _no_tqdm_monitor():
            ra.run(x)
            rb.run(x)
        for p in wanted:
            xa, xb = _rows(ra.seen[p[0]], p[1]), _rows(rb.seen[p[0]], p[1])
            s = [xa.shape[0], xa.sum(0), xb.sum(0), (xa * xa).sum(0), (xb * xb).sum(0), xa.T @ xb]
            stats[p] = s if p not in stats else [u + v for u, v in zip(stats[p], s)]
    def correlation(points: list[tuple[str, int]]) -> torch.Tensor:
        corr = 0
        for p in points:
            n, sa, sb, saa, sbb, sab = stats[p]
            ma, mb = sa / n, sb / n
            cov = sab / n - ma[:, None] * mb[None, :]
            sd_a = (saa / n - ma * ma).clamp_min(0).sqrt()
            sd_b = (sbb / n - mb * mb).clamp_min(0).sqrt()
            corr = corr + cov / (sd_a[:, None] * sd_b[None, :] + 1e-12)
        return corr / len(points)

    perms, corrs = [], []
    for g in groups:
        corr = correlation(g.points)
        # Units never active on the data (0 after the ReLU) correlate with none: their correlation before it
        # decides where they go, weighted so little that it only breaks such ties (its sum over all units is at
        # most TIE_WEIGHT x size, below any difference in the main score that matters).
        score = corr + _TIE_WEIGHT * correlation(g.tie_points) if g.tie_points else corr
        perm = _assign(score)
        perms.append(perm)
        corrs.append(float(corr[torch.arange(g.size), perm.to(corr.device)].mean()))
    return perms, corrs


def _check_same_network(a: LoadedModel, b: LoadedModel) -> None:
    for key, va, vb in meta_differences(a.meta, b.meta, ("arch", "arch_kwargs", "num_classes", "in_chans"))[:1]:
        raise ConfigError(f"'{a.path}' and '{b.path}' are different networks ({key} {json.dumps(va)} vs "
                          f"{json.dumps(vb)}); align needs two networks of the same architecture.")


def _check_function(model_b: nn.Module, aligned: nn.Module, x: torch.Tensor, what: str) -> None:
    """Refuse an aligned network whose logits on ``x`` are not B's, within float32 rounding."""
    with torch.no_grad():
        ref, got = model_b(x).float(), aligned(x).float()
    atol = 1e-5 * float(ref.abs().max()) + 1e-30
    if not torch.allclose(got, ref, rtol=1e-4, atol=atol):
        diff = float((got - ref).abs().max())
        raise MctoolError(f"the permuted network does not compute what '{what}' computes (largest logit difference "
                          f"{diff:.3g}, allowed about {atol:.3g}): align found a permutation the network does not "
                          "allow. Nothing was written; please report this network.")


@dataclass
class Alignment:
    """Network B aligned to network A in memory (``align_networks``): ``model`` is B with ``perms`` (one per group)
    applied, checked to compute B's function; ``objective`` after each sweep (weights) or the mean correlation
    of each group's matched units (activations); ``split`` the data set split the data came from."""

    method: str
    groups: list[Group]
    perms: list[torch.Tensor]
    model: nn.Module
    objective: list[float]
    correlations: list[float]
    dataset: str
    split: str
    data_fingerprint: str = ""  # (``data.Data.fingerprint`` of the data set read)

    def group_info(self) -> list[dict[str, Any]]:
        """Name, size and producers of each group (the ``align_groups`` metadata)."""
        return [{"name": g.name, "size": g.size, "producers": g.producers} for g in self.groups]


def align_networks(a: LoadedModel, b: LoadedModel, *, method: str = "weights", seed: int = 0, max_sweeps: int = 100,
                   batches: int = 8, batch_size: int = 256, dataset: str | None = None, device: str = "auto",
                   data_root: str | Path | None = None, download: bool = False, num_workers: int = 4,
                   quiet: bool = True) -> Alignment:
    """B's hidden units permuted into A's order, in memory: what ``align`` writes (same options, same result, bit
    for bit). The data (B's data set and split, un-augmented) gives the check batch and, for ``activations``,
    the training batches. ``a.model`` and ``b.model`` are left unchanged, on their devices; the aligned copy
    of B is on the CPU."""
    if method not in METHODS:
        raise ConfigError(f"--method must be one of {', '.join(METHODS)}, got {method!r}.")
    _check_same_network(a, b)
    name = b.meta.dataset_or(dataset, b.path)
    split = b.meta.config.get("split", "test")
    dev = resolve_device(device)
    data = load_data(name, root=data_root, split=split, download=download, device=dev, augment="none",
                     **b.meta.data_options(), num_workers=num_workers)
    check_fits(b.meta, data.info, b.path)
    homes = [next(m.parameters()).device for m in (a.model, b.model)]
    model_a, model_b = a.model.to(dev).eval(), b.model.to(dev).eval()
    try:
        check_x = next(iter(data.eval.batches(batch_size)))[0]
        with progress_bar(quiet) as bar:
            task = bar.add_task("align", total=None, info="tracing")
            try:
                groups = discover_groups(model_b, check_x[:2])
            except ConfigError as e:  # name the file, and what still works without alignment
                raise ConfigError(f"'{b.path}' ({b.meta.arch}): {e} Connect, evaluate and draw planes of these "
                                  "networks without --align.") from None
            if not groups:
                raise ConfigError(f"align found no hidden units to permute in '{b.path}' ({b.meta.arch}).")
            state_a, state_b = model_a.state_dict(), model_b.state_dict()
            bar.update(task, info=f"{len(groups)} groups; {method} matching")
            if method == "weights":
                params = {n: state_a[n] for n, _ in model_a.named_parameters()}
                perms, objective = weight_matching(params, state_b, groups, seed=seed, max_sweeps=max_sweeps)
                corrs = []
            else:
                xs = (x for x, _ in data.train.batches(batch_size, shuffle=True, seed=seed))
                perms, corrs = activation_matching(model_a, model_b, groups,
                                                   (x for _, x in zip(range(batches), xs)))
                objective = []
            bar.update(task, total=1, completed=1)  # one step, done (not "0/?" in a log)
        perms = [p.cpu() for p in perms]
        aligned = copy.deepcopy(model_b)
        aligned.load_state_dict(permute_state(state_b, groups, perms))
        _check_function(model_b, aligned, check_x, str(b.path))
    finally:
        model_a.to(homes[0])
        model_b.to(homes[1])
    return Alignment(method, groups, perms, aligned.cpu(), objective, corrs, name, split, data.fingerprint)


@library_call
@holds_output_locks
def align(a_path: str | Path, b_path: str | Path, output: str | Path, *, method: str = "weights",
          metrics: str | Path | None = None, seed: int = 0, max_sweeps: int = 100, batches: int = 8,
          batch_size: int = 256, dataset: str | None = None, device: str = "auto", data_root: str | Path | None = None,
          download: bool = False, num_workers: int = 4, force: bool = False, quiet: bool = False) -> AlignResult:
    """Write network B with its hidden units permuted into network A's order (same function as B).

    ``method`` is ``weights`` (weight matching) or ``activations`` (activation matching on ``batches`` training
    batches of ``batch_size``). ``metrics`` (default: the output's name with ``-align.h5``) receives the
    groups, the permutations, the objective after each sweep or the correlations, and the fraction of units
    each permutation moves. The output is checked, on a batch of the recorded data set, to give B's logits.
    """
    t0 = time.time()
    if method not in METHODS:
        raise ConfigError(f"--method must be one of {', '.join(METHODS)}, got {method!r}.")
    seed = check_seed(seed)
    check_count("--max-sweeps", max_sweeps, 1, MAX_ITERATIONS)
    check_count("--activation-batches", batches)
    check_count("--batch-size", batch_size)
    check_count("--num-workers", num_workers, 0)
    if metrics is None:
        from .loop import metrics_path

        metrics = metrics_path(output, "-align")
    check_outputs({"--output": output, "--metrics": metrics}, [a_path, b_path], force=force,
                  formats={"--output": "safetensors", "--metrics": "hdf5"})
    a, b = load_model(a_path), load_model(b_path)
    al = align_networks(a, b, method=method, seed=seed, max_sweeps=max_sweeps, batches=batches,
                        batch_size=batch_size, dataset=dataset, device=device, data_root=data_root,
                        download=download, num_workers=num_workers, quiet=quiet)
    groups, perms, objective, corrs, name, split = (al.groups, al.perms, al.objective, al.correlations, al.dataset,
                                                    al.split)
    state_a, state_b, aligned_state = a.model.state_dict(), b.model.state_dict(), al.model.state_dict()

    names = [n for n, _ in a.model.named_parameters()]
    flat = lambda s: torch.cat([s[n].detach().reshape(-1).double().cpu() for n in names])  # noqa: E731
    before, after = float((flat(state_a) - flat(state_b)).norm()), float((flat(state_a) - flat(aligned_state)).norm())
    moved = [float((p != torch.arange(len(p))).double().mean()) for p in perms]
    units = sum(g.size for g in groups)
    moved_all = sum(m * g.size for m, g in zip(moved, groups)) / units
    group_info = al.group_info()
    inputs = {str(a_path): a.sha256, str(b_path): b.sha256}
    config = {"method": method, "reference": str(a_path), "seed": seed, "dataset": name, "split": split}
    if method == "weights":
        config["max_sweeps"] = max_sweeps
    else:
        config |= {"batches": batches, "batch_size": batch_size}

    meta = ModelMeta(**{**asdict(b.meta), "kind": "model", "inputs": inputs,
                        "config": {**b.meta.config, "align": config},
                        "extra": {**{k: v for k, v in b.meta.extra.items() if not k.startswith("align_")},
                                  "align_method": method, "align_groups": json.dumps(group_info),
                                  "align_reference_sha256": a.sha256}})
    g_index = np.arange(len(groups))
    datasets: dict[str, tuple[np.ndarray, tuple[str, ...]]] = {
        "groups/size": (np.array([g.size for g in groups], dtype=np.float64), ("group",)),
        "groups/moved": (np.array(moved), ("group",)),
        "distance": (np.array([before, after]), ()),
    }
    datasets |= {f"permutations/{i:04d}": (p.numpy().astype(np.float64), ()) for i, p in enumerate(perms)}
    scales: dict[str, np.ndarray] = {"group": g_index}
    if method == "activations":
        datasets["groups/correlation"] = (np.array(corrs), ("group",))
    if objective:
        scales["sweep"] = np.arange(1, len(objective) + 1)
        datasets["objective"] = (np.array(objective), ("sweep",))
    attrs = {**provenance(inputs, config, "align"), "method": method, "groups": json.dumps(group_info),
             "distance_before": before, "distance_after": after, "data_fingerprint": al.data_fingerprint}
    write_model(output, al.model, meta)
    write_h5(metrics, scales=scales, datasets=datasets, attrs=attrs,
             dataset_attrs={f"permutations/{i:04d}": {"group": g.name} for i, g in enumerate(groups)})
    # (each file once, as every command lists them: 'align a a' read one file)
    return AlignResult(command="align", inputs=file_refs({str(a_path): a.sha256, str(b_path): b.sha256}),
                       outputs={"model": FileRef.of(output), "metrics": FileRef.of(metrics)}, split=split,
                       metrics={"train": None, "eval": None}, seconds=time.time() - t0, method=method,
                       groups=len(groups), units=units, moved=moved_all, sweeps=len(objective) or None,
                       objective=objective[-1] if objective else None,
                       correlation=float(np.average(corrs, weights=[g.size for g in groups]))
                       if method == "activations" else None,
                       distance_before=before, distance_after=after)
