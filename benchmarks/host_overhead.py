"""Host time of a plain and a curve training step, with almost no arithmetic to do.

    python benchmarks/host_overhead.py                          # cifar_preresnet110, batch 2 of 4x4 images, CPU
    python benchmarks/host_overhead.py --arch cifar_vgg16 --image-size 32

An eager step on a GPU is bound by the host when the network is deep and narrow (PreResNet-110: 331
parameter tensors, about a thousand operators per step): the GPU waits for Python and for kernel launches.
On tiny inputs the same holds on the CPU, so what the curve step adds to a plain step here is mostly its
host work (functional_call, views, autograd bookkeeping), plus its passes over the parameters (real
arithmetic on the CPU, which a GPU does in tens of microseconds). CUDA graphs remove the host work on a GPU
(``--cuda-graphs``). Both steps take turns in blocks of steps, as in bench.py; medians are printed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench import _time_steps  # noqa: E402

from mctool.curve_training import CurveStep  # noqa: E402
from mctool.curves import Curve  # noqa: E402
from mctool.flat import ParamLayout  # noqa: E402
from mctool.graphs import sgd  # noqa: E402
from mctool.models import build_model  # noqa: E402
from mctool.loop import sgd_step  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="cifar_preresnet110")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--image-size", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (1: less noise)")
    ap.add_argument("--runs", type=int, default=5, help="repeated measurements (each: --reps blocks)")
    ap.add_argument("--reps", type=int, default=10, help="timed blocks of --block steps per run")
    ap.add_argument("--block", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(args.arch, 10, 3, {}).to(dev)
    layout = ParamLayout.of(model)
    flat = layout.flatten(dict(model.named_parameters()))
    points = torch.stack([flat, flat + 0.01 * torch.randn_like(flat), flat + 0.02 * torch.randn_like(flat)])
    curve_step = CurveStep(model, Curve("bezier", 1, points, layout, None, {}), [1], wd=5e-4, momentum=0.9)
    opt = sgd(model.parameters(), lr=0.01, momentum=0.9, wd=5e-4, device=dev, graphs=False)
    plain_step = sgd_step(model, opt, dev, "fp32")
    s, b = args.image_size, args.batch_size
    batches = [(torch.randn(b, 3, s, s, device=dev), torch.randint(0, 10, (b,), device=dev)) for _ in range(5)]
    plain, curve = [], []
    for _ in range(args.runs):
        p, c = _time_steps([plain_step, curve_step], batches, dev, 2, args.reps, args.block)
        plain.append(p)
        curve.append(c)
    p, c = statistics.median(plain), statistics.median(curve)
    added = statistics.median(ci - pi for pi, ci in zip(plain, curve))
    print(f"{args.arch}, {len(layout.names)} parameter tensors, batch {b} of {s}x{s} on {dev}: plain step "
          f"{p:.2f} ms, curve step {c:.2f} ms, the curve step adds {added:.2f} ms "
          f"(runs: {', '.join(f'{ci - pi:.1f}' for pi, ci in zip(plain, curve))})")


if __name__ == "__main__":
    main()
