"""Why evaluation on the CPU runs in pieces of 64 images and one convolutional network per pass.

    python benchmarks/cpu_eval.py            # about a minute on 2 cores

Prints (the fastest of --reps runs each; no gradients):
  1. the evaluation-mode forward of P = 4 cifar_preresnet20 networks over 512 images of 32x32, in pieces of
     512, 128, 64, 32 and 16 images (``evaluation.CPU_EVAL_PIECE``), plain and channels-last;
  2. the same P networks side by side in one wide network (``batched.WideNetwork``), same piece sizes;
  3. one 3x3 convolution of P copies: P separate convolutions vs one grouped convolution (what the wide network
     runs), for the three stages of a CIFAR ResNet (16, 32, 64 channels at 32, 16, 8 pixels);
  4. the P networks in pieces of 64, one at a time on all threads vs two at once on one thread each (Python
     threads here, to see the gain without launch costs: mctool gets it from torchrun ranks), plain and
     channels-last.
  5. a linear layer (256 outputs) on 512 shared inputs of 64 and of 3,072 features for P networks: the P
     copies' weights in one matrix product vs K vectors' products mixed per network (``batched.Span``), for
     (P, K) = (4, 3), (8, 3): where the rule ``_WideLinear.pays`` draws its line.
docs/performance.md#on-the-cpu gives the figures of the development machine.
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

from mctool.batched import WideNetwork, _WideLinear
from mctool.flat import ParamLayout
from mctool.models import build_model


def fastest(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--images", type=int, default=512)
    args = p.parse_args()
    torch.manual_seed(0)
    n, nets = args.images, 4
    model = build_model("cifar_preresnet20", 10, 3, {}).eval()
    x = torch.randn(n, 3, 32, 32)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with torch.no_grad():
        wide = WideNetwork.of(model, nets, ParamLayout.of(model), x[:8]).eval()
        for cl in (False, True):
            fmt = torch.channels_last if cl else torch.contiguous_format
            net, xs = model.to(memory_format=fmt), x.contiguous(memory_format=fmt)
            if cl:
                wide.use_channels_last()
            for piece in (512, 128, 64, 32, 16):
                one = fastest(lambda: [[net(c) for c in xs.split(piece)] for _ in range(nets)], args.reps)
                side = fastest(lambda: [wide(c) for c in x.split(piece)], args.reps)
                print(f"{'channels-last' if cl else 'plain'} pieces of {piece:3d}: {nets} networks one at a time "
                      f"{one:.3f} s, side by side {side:.3f} s")
        for c, h in ((16, 32), (32, 16), (64, 8)):
            for cl in (False, True):
                fmt = torch.channels_last if cl else torch.contiguous_format
                xs = [torch.randn(n, c, h, h).contiguous(memory_format=fmt) for _ in range(nets)]
                ws = [torch.randn(c, c, 3, 3).contiguous(memory_format=fmt) for _ in range(nets)]
                xw = torch.randn(n, nets * c, h, h).contiguous(memory_format=fmt)
                ww = torch.cat(ws).contiguous(memory_format=fmt)
                sep = fastest(lambda: [F.conv2d(a, w, padding=1) for a, w in zip(xs, ws)], args.reps)
                grp = fastest(lambda: F.conv2d(xw, ww, padding=1, groups=nets), args.reps)
                print(f"conv {c} channels at {h}x{h}, {'channels-last' if cl else 'plain'}: {nets} separate "
                      f"{1000 * sep:.0f} ms, grouped {1000 * grp:.0f} ms ({grp / sep:.2f})")
    threads = torch.get_num_threads()
    copies = [build_model("cifar_preresnet20", 10, 3, {}).eval() for _ in range(nets)]

    def run(net: torch.nn.Module, xs: torch.Tensor) -> None:
        with torch.no_grad():
            for c in xs.split(64):
                net(c)

    def two_at_once(xs: torch.Tensor) -> None:
        def half(i: int) -> None:
            torch.set_num_threads(1)
            for net in copies[i::2]:
                run(net, xs)

        with ThreadPoolExecutor(2) as pool:
            list(pool.map(half, range(2)))

    for cl in (False, True):
        fmt = torch.channels_last if cl else torch.contiguous_format
        xs = x.contiguous(memory_format=fmt)
        for net in copies:
            net.to(memory_format=fmt)
        torch.set_num_threads(threads)
        one = fastest(lambda: [run(net, xs) for net in copies], args.reps)
        two = fastest(lambda: two_at_once(xs), args.reps)
        torch.set_num_threads(threads)
        print(f"{'channels-last' if cl else 'plain'} pieces of 64: {nets} networks one at a time on {threads} "
              f"threads {one:.3f} s, two at once on one thread each {two:.3f} s ({two / one:.2f})")
    for features in (64, 3072):
        x = torch.randn(512, features)
        for p, k in ((4, 3), (8, 3)):
            w, b = torch.randn(p * 256, features), torch.randn(p * 256)
            wk, bk, c = torch.randn(k * 256, features), torch.randn(k * 256), torch.rand(p, k)
            whole = fastest(lambda: F.linear(x, w, b), 10 * args.reps)
            mixed = fastest(lambda: torch.matmul(c, F.linear(x, wk, bk).unflatten(-1, (k, 256))), 10 * args.reps)
            rule = _WideLinear(torch.nn.Linear(features, 256), p).pays(k)
            print(f"linear layer on {features} shared features, P = {p}, K = {k}: P copies {1000 * whole:.2f} ms, "
                  f"K mixed {1000 * mixed:.2f} ms ({mixed / whole:.2f}; the rule says {'mix' if rule else 'P'})")


if __name__ == "__main__":
    main()
