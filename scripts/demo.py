"""`make demo`: the main mctool workflow on the bundled `digits` data set, on CPU, in well under 5 minutes.

Each step is an ordinary mctool command (printed before it runs); everything is written under the
output folder given as the only argument (default: demo-out/).
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(sys.argv[1] if len(sys.argv) > 1 else "demo-out")
EPOCHS = "30"


def mctool(*args: str) -> dict:
    shown = ["mctool", *args, "--json", "--force"]
    print("$ " + shlex.join(shown), flush=True)
    done = subprocess.run([sys.executable, "-m", "mctool", *shown[1:]], stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        sys.exit(f"demo step failed with exit code {done.returncode}")
    return json.loads(done.stdout)


def main() -> None:
    t0 = time.time()
    OUT.mkdir(parents=True, exist_ok=True)
    o = lambda name: str(OUT / name)  # noqa: E731
    a, b = o("model-seed1.safetensors"), o("model-seed2.safetensors")
    for seed, path in ((1, a), (2, b)):
        # --save-every 24 keeps the training state at 80% of the budget: FGE's start point below
        mctool("train", "--dataset", "digits", "--arch", "mlp", "--epochs", EPOCHS, "--seed", str(seed), "-o", path,
               "-m", o(f"train-seed{seed}.h5"), *(["--save-every", "24"] if seed == 1 else []))
    ev = mctool("evaluate", a, b, "-m", o("evaluate.h5"))
    seg = mctool("evaluate-curve", a, b, "--num-points", "31", "-m", o("segment.h5"), "--plot", o("segment.png"))
    mctool("connect", a, b, "--curve", "bezier", "--num-bends", "1", "--epochs", EPOCHS, "--lr", "0.05",
           "-o", o("bezier.safetensors"), "-m", o("connect.h5"))
    bez = mctool("evaluate-curve", o("bezier.safetensors"), "--num-points", "31", "-m", o("bezier.h5"),
                 "--plot", o("bezier.png"))
    mctool("plot", o("segment.h5"), o("bezier.h5"), "-o", o("segment-vs-bezier.png"))
    mctool("point", o("bezier.safetensors"), "--t", "0.5", "-o", o("bezier-midpoint.safetensors"))
    fge = mctool("fge", o("model-seed1-epoch024.safetensors"), "--epochs", "6", "--cycle-epochs", "1",
                 "-o", o("fge.safetensors"), "-m", o("fge.h5"))
    pl = mctool("plane", o("bezier.safetensors"), "--grid-points", "21", "-m", o("plane.h5"), "--plot", o("plane.png"))

    print(f"\nmctool demo on digits ({ev['samples']} test images), {time.time() - t0:.0f} s")
    print(f"\n{'network':<36}{'test error':>11}{'test NLL':>10}{'ECE':>8}")
    for entry in ev["models"]:
        m = entry["metrics"]
        print(f"{Path(entry['path']).name:<36}{100 * m['err']:>10.2f}%{m['nll']:>10.4f}{m['ece']:>8.4f}")
    e = ev["metrics"]["eval"]  # the ensemble of both
    print(f"{'ensemble of both (mean softmax)':<36}{100 * e['err']:>10.2f}%{e['nll']:>10.4f}{e['ece']:>8.4f}")
    print(f"\n{'path from A to B':<22}{'train-loss barrier':>20}{'test-error barrier':>20}{'test-error bump':>17}"
          f"{'length / |B-A|':>16}")
    for name, r in (("straight segment", seg), ("Bezier, 1 bend", bez)):
        b = r["barrier"]
        print(f"{name:<22}{b['train']['loss']:>20.4f}{100 * b['eval']['err']:>18.2f} pt"
              f"{100 * r['bump']['eval']['err']:>14.2f} pt{r['length_ratio']:>16.3f}")
    one, f = ev["models"][0]["metrics"], fge["metrics"]["eval"]
    print(f"\nsame budget (30 epochs) from seed 1: one network {100 * one['err']:.2f}% error, NLL {one['nll']:.4f}; "
          f"FGE from epoch 24 ({fge['members']} members in 6 epochs) {100 * f['err']:.2f}% error, NLL {f['nll']:.4f}")
    lo, hi = pl["metrics"]["train"]["loss"]["min"], pl["metrics"]["train"]["loss"]["max"]
    print(f"\nplane through A, the bend and B: {pl['grid_points']}x{pl['grid_points']} grid, train loss from "
          f"{lo:.3f} to {hi:.3f}; the curve leaves the plane by at most {pl['curve_max_offplane']:.2g}")
    print(f"plots: {o('segment-vs-bezier.png')} (both paths), {o('plane.png')} (surfaces, like the paper's "
          f"Figure 1), {o('segment.png')}, {o('bezier.png')}")
    print(f"everything is in {OUT}/; inspect any file with: mctool info FILE")


if __name__ == "__main__":
    main()
