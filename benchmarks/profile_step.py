"""Where a training step's GPU time goes: the top kernels of a plain and a curve step (torch.profiler).

    python benchmarks/profile_step.py --arch cifar_vgg16 --variant bf16+cl

Prints, for each step kind, the CUDA kernels (on a CPU, the operators) that take most of 10 eager steps,
and their total time per step: what the curve step adds to the plain one, kernel by kernel. Then
(``--passes``, default on) the time of the curve step's extra work over the network's P parameters in
alternative formulations, each alone, so that the cheapest can be chosen by measurement: forming w(t)
with its squared norm, and turning the network's gradients g into c_j (g + wd w) for the free point.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from mctool.curve_training import CurveStep
from mctool.curves import Curve
from mctool.data import load_data
from mctool.flat import ParamLayout
from mctool.graphs import sgd
from mctool.models import build_model
from mctool.loop import sgd_step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="cifar_vgg16")
    p.add_argument("--variant", default="fp32", help="fp32 or bf16, optionally +cl")
    p.add_argument("--rows", type=int, default=12)
    p.add_argument("--passes", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the formulations of the curve step's passes over the parameters")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="include torch.compile'd formulations (default: on CUDA only)")
    args = p.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision, cl = args.variant.split("+")[0], "cl" in args.variant
    data = load_data("synthetic:size=32,channels=3,classes=10,train=2560,test=128", device=dev, channels_last=cl)
    batches = list(data.train.batches(128, shuffle=True, augment=True, seed=0))
    torch.manual_seed(0)
    model = build_model(args.arch, 10, 3, {}).to(dev)
    if cl:
        model.to(memory_format=torch.channels_last)
    opt = sgd(model.parameters(), lr=0.01, momentum=0.9, wd=5e-4, device=dev, graphs=False)
    plain = sgd_step(model, opt, dev, precision)
    layout = ParamLayout.of(model)
    flat = layout.flatten(dict(model.named_parameters())).cpu()
    curve = CurveStep(model, Curve("bezier", 1, torch.stack([flat, flat * 1.01, flat * 1.02]), layout, None, {}),
                      [1], wd=5e-4, momentum=0.9, precision=precision)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    for name, step in (("plain", plain), ("curve", curve)):
        for x, y in batches[:5]:
            step(x, y, 0.01)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        with profile(activities=activities) as prof:
            for x, y in batches[5:15]:
                step(x, y, 0.01)
            if dev.type == "cuda":
                torch.cuda.synchronize()
        key = "self_device_time_total" if dev.type == "cuda" else "self_cpu_time_total"
        events = [e for e in prof.key_averages() if getattr(e, key, 0) > 0]
        total = sum(getattr(e, key) for e in events if e.device_type == torch.autograd.DeviceType.CUDA) \
            if dev.type == "cuda" else sum(getattr(e, key) for e in events)
        print(f"== {args.arch} {args.variant} {name} step: {total / 10 / 1000:.3f} ms of kernels per step")
        print(prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=70))
    if args.passes:
        time_passes(layout, dev, dev.type == "cuda" if args.compile is None else args.compile)


def time_passes(layout: ParamLayout, dev: torch.device, with_compile: bool, reps: int = 20) -> None:
    """Milliseconds per call of each formulation, for a one-bend Bezier curve (K = 3) of this layout."""
    import time

    n = layout.size
    pts = torch.randn(3, n, device=dev)
    w = torch.empty(n, device=dev)
    c = torch.tensor([0.25, 0.5, 0.25], device=dev)
    r = c / c.cumsum(0)
    w_views = list(layout.views(w).values())
    grads0 = [torch.randn_like(v) for v in w_views]
    grads = [g.clone() for g in grads0]
    flat_g = torch.empty(n, device=dev)

    def lerp_chain():  # CurveStep
        torch.lerp(pts[0], pts[1], r[1], out=w)
        w.lerp_(pts[2], r[2])
        return torch.dot(w, w)

    def addcmul_chain():  # the version before
        torch.mul(pts[0], c[0], out=w)
        w.addcmul_(pts[1], c[1])
        w.addcmul_(pts[2], c[2])
        return torch.dot(w, w)

    def gemv():  # one cuBLAS gemv over the [P, 3] column-major view
        torch.mv(pts.t(), c, out=w)
        return torch.dot(w, w)

    def foreach_add_mul():  # CurveStep
        torch._foreach_add_(grads, w_views, alpha=5e-4)
        torch._foreach_mul_(grads, c[1])

    def cat_add_mul():  # the version before: flat gradient, then two passes
        torch.cat([g.view(-1) for g in grads], out=flat_g)
        flat_g.add_(w, alpha=5e-4).mul_(c[1])

    def baseline_copy():  # one read and one write of P floats, for scale
        flat_g.copy_(w)

    cases = [("copy of P floats (2 passes, for scale)", baseline_copy),
             ("w(t) + |w|^2: lerp chain (CurveStep)", lerp_chain),
             ("w(t) + |w|^2: mul + 2 addcmul (before)", addcmul_chain),
             ("w(t) + |w|^2: gemv", gemv),
             ("gradient: foreach add + mul (CurveStep)", foreach_add_mul),
             ("gradient: cat + add + mul (before)", cat_add_mul)]
    if with_compile:
        try:
            wt = torch.compile(lambda p, c: ((c[:, None] * p).sum(0), None))

            def compiled_w():
                out, _ = wt(pts, c)
                return torch.dot(out, out)

            fused_w = torch.compile(lambda p, c: (lambda v: (v, v.pow(2).sum()))((c[:, None] * p).sum(0)))
            grad_fn = torch.compile(lambda gs, ws, cj: [cj * (g + 5e-4 * x) for g, x in zip(gs, ws)])
            cases += [("w(t): torch.compile, dot separate", compiled_w),
                      ("w(t) + |w|^2: torch.compile, one fused function", lambda: fused_w(pts, c)),
                      ("gradient: torch.compile over the list", lambda: grad_fn(grads, w_views, c[1]))]
        except Exception as e:  # noqa: BLE001 - report and go on without
            print(f"torch.compile unavailable: {type(e).__name__}: {e}")
    print(f"== passes over P = {n:,} parameters ({4 * n / 2**20:.0f} MiB), ms per call")
    for name, fn in cases:
        try:
            for _ in range(3):
                fn()
            _sync(dev)
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            _sync(dev)
            print(f"{1000 * (time.perf_counter() - t0) / reps:9.3f}  {name}")
        except Exception as e:  # noqa: BLE001
            print(f"   failed  {name}: {type(e).__name__}: {str(e).splitlines()[0]}")
        for g, g0 in zip(grads, grads0):
            g.copy_(g0)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
