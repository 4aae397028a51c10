"""Training steps replayed as CUDA graphs (``--cuda-graphs``): one launch per step instead of hundreds.

Deep, narrow networks such as PreResNet-110 spend most of an eager step launching kernels; capturing the
whole step (forward, backward, SGD update) once and replaying it removes that overhead. A step body
must then be capture-safe: no host synchronisation, no new Python-side tensors whose values change
between steps. So the learning rate is a one-element device tensor read by a fused SGD, and anything
random that must match the eager path (a curve's t) is drawn outside the graph and copied in.

The first ``warmup`` calls for each batch shape run eagerly (they are real steps, on a side stream as
CUDA requires before capture); the next one is captured and replayed, so the sequence of updates is the
same as without graphs. Another batch shape (a smaller last batch) gets its own graph. Without CUDA,
or if capture fails, steps run eagerly and a warning says so.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from .console import warn

StepBody = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def use_graphs(requested: bool, device: torch.device) -> bool:
    """Whether CUDA graphs can be used; warns (once, here) when they were asked for on a CPU."""
    if requested and device.type != "cuda":
        warn("--cuda-graphs needs a CUDA device; training runs eagerly on the CPU.")
        return False
    if requested:
        try:  # the update is a fused SGD reading a device-tensor learning rate: PyTorch 2.3 and later
            torch.optim.SGD([torch.zeros(1, device=device, requires_grad=True)], lr=torch.tensor(0.1, device=device),
                            momentum=0.9, fused=True)
        except (TypeError, ValueError, RuntimeError) as e:
            warn(f"--cuda-graphs needs a fused SGD with a tensor learning rate, which this PyTorch "
                 f"({torch.__version__}) lacks ({type(e).__name__}); training runs eagerly.")
            return False
    return requested


def sgd(params: Iterable[torch.nn.Parameter], *, lr: float, momentum: float, wd: float, device: torch.device,
        graphs: bool) -> torch.optim.SGD:
    """SGD with momentum; for CUDA graphs the learning rate is a device tensor and the update one fused kernel."""
    if graphs:
        return torch.optim.SGD(params, lr=torch.tensor(lr, device=device), momentum=momentum, weight_decay=wd,
                               fused=True)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=wd)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate in place (a tensor learning rate keeps its storage, which a graph reads)."""
    for group in opt.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


class GraphedStep:
    """Call ``body(x, y) -> (loss, logits)`` eagerly, or as a replayed CUDA graph when ``enabled``.

    Returned tensors of a replayed graph are overwritten by the next call: read them before it.
    """

    def __init__(self, body: StepBody, *, enabled: bool, warmup: int = 3):
        self.body, self.enabled, self.warmup = body, enabled, warmup
        self._calls: dict[tuple, int] = {}
        self._side: torch.cuda.Stream | None = None
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, tuple]] = {}

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.enabled:
            return self.body(x, y)
        key = (tuple(x.shape), x.dtype, x.is_contiguous(memory_format=torch.channels_last), tuple(y.shape))
        if key in self._graphs:
            graph, sx, sy, out = self._graphs[key]
            sx.copy_(x)
            sy.copy_(y)
            graph.replay()
            return out
        n = self._calls.get(key, 0)
        self._calls[key] = n + 1
        if n < self.warmup:
            side = self._side = self._side or torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.body(x, y)
            torch.cuda.current_stream().wait_stream(side)
            return out
        try:
            self._graphs[key] = self._capture(x, y)
        except torch.cuda.OutOfMemoryError:  # out of memory is not a step that cannot be captured
            raise
        except RuntimeError as e:  # e.g. a network with a host synchronisation in its forward
            self.enabled = False
            self._graphs.clear()
            torch.cuda.synchronize()
            warn(f"could not capture the training step as a CUDA graph ({str(e).splitlines()[0]}); "
                 "continuing without --cuda-graphs.")
            return self.body(x, y)
        return self(x, y)  # replays the new graph for this batch

    def _capture(self, x: torch.Tensor, y: torch.Tensor):
        sx, sy = x.clone(), y.clone()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.body(sx, sy)
        return graph, sx, sy, out
