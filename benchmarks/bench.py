"""Time mctool's hot paths on whatever device is present; write bench-out/results.json.

    python benchmarks/bench.py                 # CPU set (make bench): small networks, small synthetic data
    python benchmarks/bench.py --full          # GPU set: cifar_preresnet110 and cifar_vgg16, CIFAR-sized data

Figures (per architecture): plain and curve training step (ms), their ratio, a reference-style curve step
that forms w(t) with a Python loop over parameters, one curve point and one plane point (BN pass plus
train and test evaluation, s), one training epoch and the data pipeline's share of it.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.func import functional_call

from mctool.curves import Curve, CurveStep, coefficients
from mctool.data import load_data
from mctool.evaluation import evaluate_weights
from mctool.flat import ParamLayout
from mctool.models import arch_kwargs_for, build_model
from mctool.plane import PlaneBasis
from mctool.training import sgd_step


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _time_steps(step, batches, dev, warmup: int, reps: int) -> float:
    """Median milliseconds of one call of ``step(x, y, lr)``."""
    times = []
    for i in range(warmup + reps):
        x, y = batches[i % len(batches)]
        _sync(dev)
        t0 = time.perf_counter()
        step(x, y, 0.01)
        _sync(dev)
        if i >= warmup:
            times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def _timed(fn, dev) -> float:
    _sync(dev)
    t0 = time.perf_counter()
    fn()
    _sync(dev)
    return time.perf_counter() - t0


def bench_arch(arch: str, data, dev, args) -> dict[str, float]:
    info = data.info
    torch.manual_seed(0)
    make = lambda: build_model(arch, info.num_classes, info.in_chans,  # noqa: E731
                               arch_kwargs_for(arch, {}, info.image_size)).to(dev)
    batches = [b for b, _ in zip(data.train.batches(args.batch_size, shuffle=True, augment=True, seed=1),
                                 range(args.warmup + args.reps))]
    out: dict[str, float] = {}

    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    plain = _time_steps(sgd_step(model, opt, dev, args.precision), batches, dev, args.warmup, args.reps)

    layout = ParamLayout.of(model)
    flat = layout.flatten(dict(model.named_parameters())).cpu()
    points = torch.stack([flat, flat + 0.01 * torch.randn_like(flat), flat + 0.02 * torch.randn_like(flat)])
    curve = Curve("bezier", 1, points, layout, None, {})  # meta unused for stepping
    cstep = CurveStep(model, curve, [1], wd=5e-4, momentum=0.9, precision=args.precision)
    curve_ms = _time_steps(cstep, batches, dev, args.warmup, args.reps)

    # Reference-style: w(t) assembled parameter by parameter in Python.
    per_param = [points[:, o:o + n].to(dev) for o, n in zip(_offsets(layout), layout.numels)]
    bend = [torch.nn.Parameter(p[1].clone()) for p in per_param]
    ref_opt = torch.optim.SGD(bend, lr=0.01, momentum=0.9)
    buffers = dict(model.named_buffers())

    def ref_step(x, y, lr):
        c = coefficients("bezier", 1, torch.rand(())).tolist()
        params = {name: (c[0] * p[0] + c[1] * b + c[2] * p[2]).view(shape)
                  for name, shape, p, b in zip(layout.names, layout.shapes, per_param, bend)}
        out_ = functional_call(model, {**params, **buffers}, (x,))
        loss = torch.nn.functional.cross_entropy(out_, y)
        ref_opt.zero_grad()
        loss.backward()
        ref_opt.step()
        return loss.detach(), out_.detach()

    ref_ms = _time_steps(ref_step, batches, dev, args.warmup, args.reps)
    out.update({f"plain_step_ms/{arch}": plain, f"curve_step_ms/{arch}": curve_ms,
                f"curve_over_plain_step/{arch}": curve_ms / plain, f"curve_step_per_parameter_ms/{arch}": ref_ms,
                f"plain_step_img_per_s/{arch}": 1000 * args.batch_size / plain,
                f"curve_step_img_per_s/{arch}": 1000 * args.batch_size / curve_ms})

    # One curve point and one plane point: assign weights, BN pass, train and test evaluation.
    eval_model = make().eval()
    w = (coefficients("bezier", 1, 0.5).float() @ points).to(dev)
    kw = dict(wd=5e-4, batch_size=args.eval_batch_size, precision=args.precision)
    evaluate_weights(eval_model, data, **kw)  # warm-up
    out[f"curve_point_s/{arch}"] = _timed(lambda: (layout.assign(eval_model, w),
                                                   evaluate_weights(eval_model, data, **kw)), dev)
    basis = PlaneBasis.through(*[p.to(dev) for p in points])
    out[f"plane_point_s/{arch}"] = _timed(lambda: (layout.assign(eval_model, basis.weights(0.3, 0.4)),
                                                   evaluate_weights(eval_model, data, **kw)), dev)

    # One training epoch, and the data pipeline alone (batches gathered, augmented and normalised).
    step = sgd_step(model, opt, dev, args.precision)
    out[f"train_epoch_s/{arch}"] = _timed(lambda: [step(x, y, 0.01) for x, y in data.train.batches(
        args.batch_size, shuffle=True, augment=True, seed=2)], dev)
    out[f"data_pipeline_s/{arch}"] = _timed(lambda: [None for _ in data.train.batches(
        args.batch_size, shuffle=True, augment=True, seed=3)], dev)
    out[f"data_share_of_epoch/{arch}"] = out[f"data_pipeline_s/{arch}"] / out[f"train_epoch_s/{arch}"]
    return out


def _offsets(layout: ParamLayout) -> list[int]:
    offs, o = [], 0
    for n in layout.numels:
        offs.append(o)
        o += n
    return offs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="GPU set: preresnet110 and vgg16 on 50,000/10,000 images")
    p.add_argument("--archs", nargs="*", help="architectures (default: per set)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--eval-batch-size", type=int, default=None)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out", default="bench-out/results.json")
    args = p.parse_args()
    dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if args.device == "auto" else args.device))
    if args.full:
        archs, n_train, n_test = args.archs or ["cifar_preresnet110", "cifar_vgg16"], 50_000, 10_000
        args.eval_batch_size = args.eval_batch_size or 1024
    else:
        archs, n_train, n_test = args.archs or ["cifar_convfc", "cifar_preresnet20"], 2048, 512
        args.eval_batch_size = args.eval_batch_size or 512
    data = load_data(f"synthetic:size=32,channels=3,classes=10,train={n_train},test={n_test}", device=dev)
    figures: dict[str, float] = {}
    for arch in archs:
        t0 = time.time()
        figures.update(bench_arch(arch, data, dev, args))
        print(f"{arch}: " + ", ".join(f"{k.split('/')[0]} {v:.4g}" for k, v in figures.items() if k.endswith(arch))
              + f"  ({time.time() - t0:.0f} s)", flush=True)
    result = {"figures": figures, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else
              f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
              "torch": torch.__version__, "settings": {"archs": archs, "train_images": n_train, "test_images": n_test,
                                                       "batch_size": args.batch_size, "precision": args.precision,
                                                       "eval_batch_size": args.eval_batch_size,
                                                       "warmup": args.warmup, "reps": args.reps}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
