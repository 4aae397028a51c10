"""Where a training step's GPU time goes: the top kernels of a plain and a curve step (torch.profiler).

    python benchmarks/profile_step.py --arch cifar_vgg16 --variant bf16+cl

Prints, for each step kind, the CUDA kernels (on a CPU, the operators) that take most of 10 eager steps,
and their total time per step: what the curve step adds to the plain one, kernel by kernel.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from mctool.curves import Curve, CurveStep
from mctool.data import load_data
from mctool.flat import ParamLayout
from mctool.graphs import sgd
from mctool.models import build_model
from mctool.training import sgd_step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="cifar_vgg16")
    p.add_argument("--variant", default="fp32", help="fp32 or bf16, optionally +cl")
    p.add_argument("--rows", type=int, default=12)
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


if __name__ == "__main__":
    main()
