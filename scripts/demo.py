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
    cmd = [sys.executable, "-m", "mctool", *args, "--json", "--force"]
    print("$ " + shlex.join(["mctool", *args, "--json", "--force"]), flush=True)
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        sys.exit(f"demo step failed with exit code {done.returncode}")
    return json.loads(done.stdout)


def main() -> None:
    t0 = time.time()
    OUT.mkdir(parents=True, exist_ok=True)
    models = []
    for seed in (1, 2):
        path = OUT / f"model-seed{seed}.safetensors"
        mctool("train", "--dataset", "digits", "--arch", "mlp", "--epochs", EPOCHS, "--seed", str(seed),
               "-o", str(path), "-m", str(OUT / f"train-seed{seed}.h5"))
        models.append(str(path))
    ev = mctool("evaluate", *models, "-m", str(OUT / "evaluate.h5"))

    print(f"\nmctool demo: two MLPs on digits ({EPOCHS} epochs each), test set of {ev['samples']} images")
    print(f"{'network':<34}{'test error':>12}{'test NLL':>10}{'ECE':>8}")
    for m in ev["models"]:
        print(f"{m['path']:<34}{100 * m['err']:>11.2f}%{m['nll']:>10.4f}{m['ece']:>8.4f}")
    e = ev["ensemble"]
    print(f"{'ensemble of both (mean softmax)':<34}{100 * e['err']:>11.2f}%{e['nll']:>10.4f}{e['ece']:>8.4f}")
    print(f"\nfiles in {OUT}/: " + ", ".join(sorted(p.name for p in OUT.iterdir())))
    print(f"inspect any of them with: mctool info FILE    (demo took {time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
