"""Many networks of one architecture evaluated in one pass (docs/performance.md#many-networks-in-one-pass).

``WideNetwork`` turns a network into P copies of itself side by side: every convolution, linear layer and
normalisation layer is replaced by one with P times the channels, the copies' weights concatenated along the
output channels, and convolutions grouped so that no copy sees another's channels (a linear layer on P
copies' features is a batched matrix product). Elementwise operations, pooling, residual additions and
flattening work unchanged on the wide activations. Each data batch is read once and goes through all P
networks together; BatchNorm statistics are per channel, so each copy's recalibrated statistics are those
of a separate pass over the same batches.

Operations that mix channels in other ways (concatenation along channels, channel shuffles, attention,
LayerNorm over channels) would silently mix the copies, so every wide network is checked against the P
separate networks on a probe batch before use; one that disagrees, or has a layer with parameters of a
kind not listed above, is refused and the caller evaluates the networks one at a time.

Networks that are combinations of a few vectors (``Span``: a curve's points of its control points, a plane's
cells of its origin and directions) share more: a linear layer that reads the input itself computes its
output once per vector and mixes those per network (docs/performance.md#a-first-layer-per-control-point).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .bn import one_batch_statistics, recalibrate_bn
from .data import Split
from .evaluation import evaluate_weights, has_convolutions, l2_term, point_metrics, predict_probs
from .errors import ConfigError
from .flat import ParamLayout
from .runtime import full_float32, maybe_compile

_CONVS = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)  # SyncBN: --sync-bn under torchrun


class _WideConv(nn.Module):
    """P convolutions of one shape; input of the original channels (shared by all copies) or P times them."""

    is_convolution = True  # (evaluation.has_convolutions)

    def __init__(self, conv: nn.Module, p: int):
        super().__init__()
        self.p, self.fn, self.in_channels, self.groups = p, _CONVS[type(conv)], conv.in_channels, conv.groups
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.weight = nn.Parameter(conv.weight.detach().repeat(p, *[1] * (conv.weight.dim() - 1)))
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().repeat(p))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == self.in_channels:  # the input images: every copy reads the same channels
            if self.groups == 1:
                return self.fn(x, self.weight, self.bias, self.stride, self.padding, self.dilation, 1)
            x = x.repeat(1, self.p, *[1] * (x.dim() - 2))
        return self.fn(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups * self.p)


class _WideLinear(nn.Module):
    """P linear layers of one shape: on shared features (one matrix product with the stacked weights) or on P
    copies' features side by side in the last dimension (a batched matrix product). On shared features, with a
    ``basis`` set (``WideNetwork.assign`` with a ``Span``): one matrix product with the K vectors' weights, then
    each copy's output as its coefficients times those K outputs."""

    def __init__(self, linear: nn.Linear, p: int):
        super().__init__()
        self.p, self.in_features, self.out_features = p, linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.detach().repeat(p, 1))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().repeat(p))
        # (weights [K * out, in], bias [K * out] or None, coefficients [P, K] in float32): not parameters
        self.basis: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None = None

    def pays(self, k: int) -> bool:
        """Whether K vectors' outputs, mixed, beat the P copies' own on shared features: the matrix product saves
        (P - K) x in multiply-adds per output, the mixing costs about P x K (memory-bound, so counted 10 times;
        measured on the CPU: docs/performance.md#a-first-layer-per-control-point)."""
        return k < self.p and (self.p - k) * self.in_features >= 10 * self.p * k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] == self.in_features:
            if self.basis is None:
                return F.linear(x, self.weight, self.bias)
            weight, bias, c = self.basis
            y = F.linear(x, weight, bias)
            with torch.autocast(x.device.type, enabled=False):  # the mixing in float32 (bf16 would round it)
                mixed = torch.matmul(c, y.unflatten(-1, (c.shape[1], self.out_features)).float())
            return mixed.to(y.dtype).flatten(-2)
        lead = x.shape[:-1]
        xs = x.reshape(-1, self.p, self.in_features).transpose(0, 1)  # [P, N, in]
        w = self.weight.view(self.p, self.out_features, self.in_features).transpose(1, 2)  # [P, in, out]
        out = (torch.bmm(xs, w) if self.bias is None
               else torch.baddbmm(self.bias.view(self.p, 1, self.out_features), xs, w))
        return out.transpose(0, 1).reshape(*lead, self.p * self.out_features)


def _wide_norm(m: nn.Module, p: int) -> nn.Module:
    """A BatchNorm or GroupNorm layer, or a subclass of one (timm's ``BatchNormAct2d`` and ``GroupNormAct``, which
    apply an elementwise activation after it), with P times the channels (and groups): a copy of the layer whose
    per-channel parameters and statistics are repeated P times."""
    wide = copy.deepcopy(m)
    for name, t in m.named_parameters(recurse=False):
        setattr(wide, name, nn.Parameter(t.detach().repeat(p)))
    for name, b in m.named_buffers(recurse=False):
        if b is not None and b.dim() == 1:
            setattr(wide, name, b.repeat(p))
    if isinstance(m, nn.GroupNorm):
        wide.num_groups, wide.num_channels = m.num_groups * p, m.num_channels * p
    else:
        wide.num_features = m.num_features * p
    return wide


def _widen(model: nn.Module, p: int) -> nn.Module | None:
    """A deep copy of ``model`` with every layer replaced by its P-wide version, or None if a module with
    parameters or buffers is of a kind this cannot widen."""
    wide = copy.deepcopy(model)
    for name, m in list(wide.named_modules()):
        if type(m) in _CONVS:
            if m.padding_mode != "zeros" or isinstance(m.padding, str):
                return None
            new = _WideConv(m, p)
        elif isinstance(m, nn.Linear):  # (timm's Linear too; a subclass computing otherwise fails the probe check)
            new = _WideLinear(m, p)
        elif isinstance(m, (*_BNS, nn.GroupNorm)):  # (subclasses too: the probe check catches one that mixes)
            new = _wide_norm(m, p)
        elif any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False)):
            return None
        else:
            continue
        parent, _, leaf = name.rpartition(".")
        setattr(wide.get_submodule(parent) if parent else wide, leaf, new)
    return wide


class CompiledForward(nn.Module):
    """``--compile`` for evaluation: ``model``'s forward through ``torch.compile`` (``runtime.maybe_compile``: a
    warning and the plain forward if compiling fails), in mode ``reduce-overhead`` on CUDA, which replays each
    batch shape's forward as a CUDA graph. Such a replay overwrites the previous one's output, so outputs are
    copied there. Every batch of a pass is the same call (the BN pass too: ``bn.recalibrate_bn``) and the batch
    size is symbolic, so a run compiles one graph per mode (train-mode BN, evaluation) and width, and reuses
    them."""

    def __init__(self, model: nn.Module, what: str):
        super().__init__()
        self.model = model
        # One graph per mode (train-mode BN in the BN pass, with momentum 1; evaluation, with the module's own
        # momentum) and width (P networks, the last pass's fewer, one), the batch size left symbolic (a smaller
        # last batch needs no graph of its own): more than dynamo's default of 8 per function with several
        # widths, after which it would silently run uncompiled.
        config = torch._dynamo.config
        limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.6
        setattr(config, limit, max(getattr(config, limit), 64))
        cuda = next(model.parameters()).device.type == "cuda"
        self._copy = cuda
        self._forward = maybe_compile(model, True, what, mode="reduce-overhead" if cuda else None, dynamic=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._dynamo.maybe_mark_dynamic(x, 0)  # the batch size
        out = self._forward(x)
        return out.clone() if self._copy else out


def compiled(model: nn.Module, enabled: bool, what: str = "the evaluation forward") -> nn.Module:
    """``model`` itself, or with ``enabled`` (``--compile``) a ``CompiledForward`` around it (same parameters and
    buffers, under the prefix ``model.``)."""
    return CompiledForward(model, what) if enabled else model


class Span(NamedTuple):
    """Networks given as combinations of a few vectors: row i of their flat weights is ``coefficients[i] @
    torch.cat(controls)`` (a curve's points of its control points, a plane's or a surface's cells of its origin
    and directions). ``controls`` is a sequence of blocks [K_j, N] (a curve's control points, a plane's origin as
    ``w0[None]``...: never concatenated; on any device: ``assign`` moves the parts it uses to the wide network's),
    ``coefficients`` [n, sum of K_j].
    ``WideNetwork.assign`` uses it for layers that read the input itself
    (docs/performance.md#a-first-layer-per-control-point)."""

    controls: Sequence[torch.Tensor]
    coefficients: torch.Tensor

    def rows(self, start: int, stop: int) -> "Span":
        return Span(self.controls, self.coefficients[start:stop])


#: Weight entries of a layer compared with their ``Span`` combination: every (size // this)-th, 4,096 to 8,191 of
#: them, or all of a smaller parameter (a strided sample: a wrong span shows in every entry, and the whole
#: comparison would cost what the span saves on small data sets).
_SPAN_SAMPLE = 4096


def _span_tolerance(device: torch.device) -> float:
    """How far a network's weights may be from their ``Span`` combination, relative to sum_k |c_k| |w_k|: a few
    float32 roundings (1e-5) where they were computed on the CPU; on a GPU, weights computed there by a matrix
    product (a curve's points) may have had TF32's 10-bit rounding (5e-4: ``allow_tf32``, ``fp32_precision``,
    ``TORCH_ALLOW_TF32_CUBLAS_OVERRIDE``), so 2e-3. A wrong span is off by the size of the weights themselves."""
    return 1e-5 if device.type == "cpu" else 2e-3


class WideNetwork(nn.Module):
    """P networks of ``model``'s architecture as one module: ``forward(x)`` gives logits ``[B, P, K]``."""

    def __init__(self, net: nn.Module, p: int, layout: ParamLayout):
        super().__init__()
        self.net, self.p, self.layout = net, p, layout
        self._params = dict(net.named_parameters())
        self.channels_last = False  # images (4-D batches) go through in channels-last memory format
        object.__setattr__(self, "_run", net)  # or its compiled forward (``compile``); not a second submodule
        # Linear layers that read the input itself (found on the probe batch, ``of``): those a ``Span`` can serve.
        self.input_layers: dict[str, _WideLinear] = {}
        self._compiled = False

    def compile(self) -> "WideNetwork":
        """Run the wide network's forward through ``torch.compile`` (``CompiledForward``). A compiled forward
        takes no ``Span`` (the basis would change what the compiled graph reads from pass to pass)."""
        object.__setattr__(self, "_run", CompiledForward(self.net, f"the evaluation forward of {self.p} networks "
                                                                   "side by side"))
        self._compiled = True
        for layer in self.input_layers.values():
            layer.basis = None
        return self

    @property
    def takes_span(self) -> bool:
        """Whether ``assign`` can use a ``Span``: a linear layer reads the input, and the forward is not compiled
        (a caller may then skip building one)."""
        return bool(self.input_layers) and not self._compiled

    def use_channels_last(self) -> "WideNetwork":
        """Run 2-D convolutions in channels-last memory format (weights now, each input batch as it comes)."""
        self.channels_last = True
        self.net.to(memory_format=torch.channels_last)
        self._params = dict(self.net.named_parameters())
        return self

    @classmethod
    def of(cls, model: nn.Module, p: int, layout: ParamLayout, probe: torch.Tensor) -> "WideNetwork | None":
        """The P-wide version of ``model`` (whose parameters ``layout`` describes), checked on the batch
        ``probe``: P different networks (``model``'s weights, scaled per copy) must give, side by side, the
        logits each gives alone (eval mode), and a BN pass over it each one's running statistics (train-mode norm
        layers, which a subclass may compute otherwise). None if the architecture cannot be widened or fails the
        check. The check computes in full float32 (no TF32 on CUDA, whose rounding, compounded over a hundred
        layers, can exceed the tolerance that tells a mixing of the copies from rounding)."""
        with full_float32():
            return cls._checked(model, p, layout, probe)

    @classmethod
    def _checked(cls, model: nn.Module, p: int, layout: ParamLayout, probe: torch.Tensor) -> "WideNetwork | None":
        net = _widen(model, p)
        if net is None or p < 1 or set(dict(net.named_parameters())) != set(layout.names):
            return None
        wide = cls(net.to(probe.device), p, layout)
        w = layout.flatten(dict(model.named_parameters())).to(probe.device)
        seen: dict[str, _WideLinear] = {}

        def note_input_layer(name: str, layer: _WideLinear, args: tuple) -> None:
            if args and torch.is_tensor(args[0]) and args[0].shape[-1] == layer.in_features:
                seen[name] = layer

        hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: note_input_layer(name, mod, args))
                 for name, m in net.named_modules() if isinstance(m, _WideLinear)]
        # Weights whose logits overflow (far from trained ones) prove nothing: then the same directions, scaled
        # to at most 1 in size.
        for base in (w, w / max(float(w.abs().max()), 1e-30)):
            weights = torch.stack([base * (1 + 0.25 * k) for k in range(p)])
            was = model.training
            model.eval()
            wide.eval()
            try:
                with torch.no_grad():
                    wide.assign(weights)
                    got = wide(probe).float()
                    want = []
                    for k in range(p):
                        layout.assign(model, weights[k])
                        want.append(model(probe).float())
            except torch.cuda.OutOfMemoryError:  # not a layer that mixes the networks: say so as it is
                raise
            except (RuntimeError, ValueError, TypeError, IndexError):
                return None
            finally:
                layout.assign(model, w)
                model.train(was)
                for hook in hooks:  # (the first forward found the input layers)
                    hook.remove()
            want = torch.stack(want, dim=1)
            if got.shape != want.shape:
                return None
            if bool(torch.isfinite(want).all()):
                break
        scale = float(want.abs().max()) + 1e-6
        if float((got - want).abs().max()) > 1e-3 * scale:
            return None
        try:
            got_stats = one_batch_statistics(wide.net, probe)
            want_stats = []
            for k in range(p):
                layout.assign(model, weights[k])
                want_stats.append(one_batch_statistics(model, probe))
        except torch.cuda.OutOfMemoryError:
            raise
        except (RuntimeError, ValueError, TypeError, IndexError):
            return None
        finally:
            layout.assign(model, w)
        for k, stats in enumerate(want_stats):
            if len(stats) != len(got_stats):
                return None
            for (g_mean, g_var), (mean, var) in zip(got_stats, stats):
                if g_var.numel() != p * var.numel() or (g_mean is None) != (mean is None):
                    return None
                # each copy's own statistics, up to float rounding: means measured in standard deviations
                unit = float(var.abs().max()) + 1e-12
                if float((g_var.view(p, -1)[k] - var.flatten()).abs().max()) > 1e-3 * unit:
                    return None
                if mean is not None and float((g_mean.view(p, -1)[k] - mean.flatten()).abs().max()) > (
                        1e-3 * (unit ** 0.5 + float(mean.abs().max()))):
                    return None
        wide.input_layers = seen
        return wide

    @torch.no_grad()
    def assign(self, weights: torch.Tensor, span: Span | None = None) -> None:
        """Set the P copies' parameters from flat vectors ``weights`` [P, N] (``layout`` order). With ``span``
        (the same networks as combinations of K vectors, ``Span``), a linear layer that reads the input itself
        computes its output once per vector the pass uses and mixes them (where that ``pays``): the same
        outputs up to float rounding. ValueError if ``span`` does not give ``weights`` (the networks are then
        those of the previous call). Every parameter is set all the same: a layer may also be called on other
        features (weights tied across depth), and nothing reads a copy left from another pass."""
        for layer in self.input_layers.values():
            layer.basis = None
        bases = self._bases(weights, span) if span is not None and self.takes_span else {}
        for name, chunk, shape in zip(self.layout.names, torch.split(weights, self.layout.numels, dim=1),
                                      self.layout.shapes):
            self._params[name].copy_(chunk.reshape(self.p * shape[0], *shape[1:]))
        for name, layer in self.input_layers.items():
            layer.basis = bases.get(name)

    def _bases(self, weights: torch.Tensor, span: Span) -> dict[str, tuple]:
        """Each input layer's ``_WideLinear.basis`` for the networks ``weights`` given by ``span``, where it pays."""
        controls, c = span
        if any(b.dim() != 2 or b.shape[1] != weights.shape[1] for b in controls) or c.dim() != 2 or (
                c.shape != (self.p, sum(len(b) for b in controls))):
            raise ValueError(f"a span of {[tuple(b.shape) for b in controls]} vectors and {tuple(c.shape)} "
                             f"coefficients does not describe {self.p} networks of {weights.shape[1]} parameters")
        c = c.detach().to("cpu", torch.float64)
        used = [k for k in range(c.shape[1]) if bool(c[:, k].ne(0).any())]  # vectors this pass's networks use
        c = c[:, used]
        layers = {name: layer for name, layer in self.input_layers.items() if used and layer.pays(len(used))}
        if not layers:
            return {}
        offsets = dict(zip(self.layout.names, torch.tensor([0, *self.layout.numels]).cumsum(0).tolist()))
        sizes = dict(zip(self.layout.names, self.layout.numels))
        dev = next(iter(layers.values())).weight.device  # (the wide network's; the caller's may be others)
        parts = {}
        for param in [f"{name}.{kind}" for name, layer in layers.items() for kind in ("weight", "bias")
                      if kind == "weight" or layer.bias is not None]:
            # the vectors' part of the parameter, compared with the networks' own on a strided sample in float64
            # (exact for the combination whatever the float32 matmul precision: TF32 would round it to 1e-3)
            lo, hi, step = offsets[param], offsets[param] + sizes[param], max(1, sizes[param] // _SPAN_SAMPLE)
            part = torch.cat([b[:, lo:hi].to(dev) for b in controls]).index_select(0, torch.tensor(used, device=dev))
            given = weights[:, lo:hi:step].to(dev, torch.float64)
            if not bool(torch.isfinite(given).all()):
                return {}  # (overflowed weights: each network's own give what they give)
            sample = part[:, ::step].double()
            got, scale = c.to(dev) @ sample, c.abs().to(dev) @ sample.abs()
            if not bool(((got - given).abs() <= _span_tolerance(dev) * scale + 1e-30).all()):
                raise ValueError(f"the span does not give these networks' weights ({param})")
            parts[param] = part.reshape(-1, *self._params[param].shape[1:]).to(self._params[param].dtype)
        mix = c.to(dev, torch.float32)
        return {name: (parts[f"{name}.weight"], parts.get(f"{name}.bias"), mix) for name in layers}

    @torch.no_grad()
    def assign_buffers(self, buffers: list[dict[str, torch.Tensor]]) -> None:
        """Set the P copies' buffers (BatchNorm running statistics) from each network's own, by state dict name;
        a scalar buffer (``num_batches_tracked``) is the first network's."""
        for name, buf in self.net.named_buffers():
            if buf.dim() == 1:
                buf.copy_(torch.cat([b[name].to(buf.device, buf.dtype) for b in buffers]))
            else:
                buf.copy_(buffers[0][name])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        out = self._run(x)
        return out.reshape(out.shape[0], self.p, -1)

    def running_stats(self, k: int) -> dict[str, torch.Tensor]:
        """Copy ``k``'s BatchNorm running statistics, as its own network's state dict names them."""
        out = {}
        for name, buf in self.net.named_buffers():
            out[name] = buf.view(self.p, -1)[k].clone() if buf.dim() == 1 else buf.clone()
        return out


def evaluate_many(wide: WideNetwork, weights: torch.Tensor, data: Any, *, wd: float, batch_size: int = 512,
                  bn_batches: int | None = None, precision: str = "fp32",
                  train_split: Split | None = None, bn_data: str = "augmented",
                  span: Span | None = None) -> list[dict[str, float]]:
    """``evaluation.evaluate_weights`` for the P networks ``weights`` [P, N] in one pass over the data: BN
    recomputed for each, then each one's train loss, NLL and error and evaluation NLL and error. ``span``: the
    same networks as combinations of a few vectors (``WideNetwork.assign``)."""
    wide.assign(weights, span)
    recalibrate_bn(wide, data.train, batch_size=batch_size, max_batches=bn_batches, precision=precision,
                   bn_data=bn_data)
    probs_t, labels_t = predict_probs(wide, train_split or data.train, batch_size=batch_size, precision=precision)
    probs_e, labels_e = predict_probs(wide, data.eval, batch_size=batch_size, precision=precision)
    return [point_metrics((probs_t[:, k], labels_t), (probs_e[:, k], labels_e),
                          l2_term(torch.split(weights[k], wide.layout.numels), wd), data.eval_split)
            for k in range(wide.p)]


#: What ``--points-per-pass`` defaults to (docs/performance.md#many-networks-in-one-pass).
DEFAULT_POINTS_PER_PASS = 8
_PROBE = 8  # images in the batch that checks a wide network


class ManyEvaluator:
    """Evaluates networks of ``model``'s architecture given as flat parameter vectors, ``points_per_pass`` at a
    time in one wide network (``WideNetwork``), or one at a time with ``evaluate_weights`` when that is 1 or
    the architecture cannot be widened (with a warning). Wide networks are built once per number of points."""

    def __init__(self, model: nn.Module, layout: ParamLayout, data: Any, *, points_per_pass: int, wd: float,
                 batch_size: int = 512, bn_batches: int | None = None, precision: str = "fp32",
                 train_split: Split | None = None, channels_last: bool = False, label: str = "network",
                 compile: bool = False, bn_data: str = "augmented"):
        self.model, self.layout, self.data, self.points_per_pass = model, layout, data, points_per_pass
        self.options = {"wd": wd, "batch_size": batch_size, "bn_batches": bn_batches, "precision": precision,
                        "train_split": train_split, "bn_data": bn_data}
        self.label, self.compile = label, compile
        self._single: nn.Module | None = None  # the network one at a time (compiled with ``compile``)
        self._wides = WideNetworks(data, channels_last=channels_last, compile=compile)

    def _wide(self, p: int) -> WideNetwork | None:
        return self._wides.get(p, self.model, p, self.layout, f"this {self.label}'s networks")

    def evaluate(self, weights: torch.Tensor, span: Span | None = None) -> list[dict[str, float]]:
        """Metrics (``evaluate_weights``'s) of each row of ``weights`` [n, N], any n: in passes of at most
        ``points_per_pass`` networks. ``span``: the same networks as combinations of a few vectors (``Span``,
        coefficients [n, K]), which lets a first linear layer compute less (``WideNetwork.assign``)."""
        out: list[dict[str, float]] = []
        for start in range(0, len(weights), self.points_per_pass):
            rows = weights[start:start + self.points_per_pass]
            wide = self._wide(len(rows)) if len(rows) > 1 else None
            if wide is not None:
                out += evaluate_many(wide, rows, self.data, span=None if span is None else
                                     span.rows(start, start + len(rows)), **self.options)
                continue
            self._single = self._single or compiled(self.model, self.compile)
            for w in rows:
                self.layout.assign(self.model, w)
                out.append(evaluate_weights(self._single, self.data, **self.options))
        return out


class WideNetworks:
    """Wide networks (``wide_for``) for ``data``, built once per key and kept; the warning that an architecture
    cannot be widened is given once."""

    def __init__(self, data: Any, *, channels_last: bool, compile: bool = False):
        self.data, self.channels_last, self.compile = data, channels_last, compile
        self._built: dict[Any, WideNetwork | None] = {}
        self._warned = False

    def get(self, key: Any, model: nn.Module, p: int, layout: ParamLayout, what: str) -> WideNetwork | None:
        """The wide network of ``p`` copies of ``model`` stored under ``key`` (built the first time); None for
        fewer than 2 copies, or where ``wide_for`` gives none."""
        if p < 2:
            return None
        if key not in self._built:
            self._built[key] = wide_for(model, p, layout, self.data, channels_last=self.channels_last, what=what,
                                        warn_now=not self._warned, compile=self.compile)
            self._warned = self._warned or self._built[key] is None
        return self._built[key]


def wide_for(model: nn.Module, p: int, layout: ParamLayout, data: Any, *, channels_last: bool, what: str,
             warn_now: bool = True, compile: bool = False) -> WideNetwork | None:
    """``WideNetwork.of`` ``model`` for P networks, checked on a probe batch of ``data``'s evaluation images, in
    channels-last format where asked, its forward compiled with ``compile``; None when P networks side by side
    would not be faster there (``pays_off``), or (with a warning naming ``what``, if ``warn_now``) when the
    architecture cannot be widened."""
    probe = next(iter(data.eval.batches(_PROBE)))[0]
    if not pays_off(model, probe.device):
        return None
    wide = WideNetwork.of(model, p, layout, probe)
    if wide is not None and channels_last:
        wide.use_channels_last()
    if wide is not None and compile:
        wide.compile()
    if wide is None and warn_now:
        from .console import warn

        warn(f"{what} cannot be evaluated {p} to a pass (a layer or an operation would mix them: see "
             "docs/performance.md#many-networks-in-one-pass); evaluating one network per pass.")
    return wide


def pays_off(model: nn.Module, device: torch.device) -> bool:
    """Whether P networks side by side beat one at a time on ``device``: everywhere but for convolutional networks
    on the CPU, where (measured: docs/performance.md#on-the-cpu) a grouped convolution of P copies is slower than
    P narrow ones and P copies' activations overflow the caches; those go one network per pass, which costs the
    same or less."""
    return device.type != "cpu" or not has_convolutions(model)


def check_points_per_pass(value: Any) -> None:
    from .options import check_count

    check_count("--points-per-pass", value)
    if value > 64:
        raise ConfigError(f"--points-per-pass must be at most 64, got {value}.")
