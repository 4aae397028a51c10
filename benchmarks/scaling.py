"""How mctool scales over processes: time a plane and an epoch of curve training at world sizes 1, 2, ...

    python benchmarks/scaling.py                        # CPU: Gloo ranks sharing this machine's cores
    python benchmarks/scaling.py --device cuda --worlds 1 2 4 8 --arch cifar_preresnet20 --grid-points 11

Each run is a real ``torchrun --standalone --nproc-per-node W -m mctool ...`` (world 1 also as plain
``python -m mctool``, to measure what torchrun itself costs). On the CPU the cores are split between the ranks
(``OMP_NUM_THREADS`` = cores / W), so world W uses the same machine as world 1. Times are the commands'
own ``seconds`` (--json: the work, not the process start-up) and the wall time of the whole launch.
Figures go into ``bench-out/results.json`` (merged with what is there) as ``scaling/<what>/<world>``
(seconds), ``scaling/<what>/<world>/speedup`` and ``.../efficiency`` (speedup / world), plus
``scaling/<what>/torchrun1_overhead`` (world-1 torchrun over plain, as a fraction).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


TIMEOUT = 600.0  # seconds for one command (--timeout)


def _run(cmd: list[str], threads: int) -> tuple[dict, float]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    t0 = time.perf_counter()
    # a session of its own, so that a command past the timeout goes with all its processes (torchrun's ranks)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            stdout, stderr = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
        raise SystemExit(f"timed out after {TIMEOUT:g} s: {' '.join(cmd)}\n{stderr[-3000:]}")
    except BaseException:  # Ctrl-C, or SIGTERM (main): the group is out of reach of both, so it goes too
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # (it had just ended)
            pass
        raise
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{stderr[-2000:]}")
    return json.loads(stdout), wall


def mctool(args: list[str], world: int | None, threads: int) -> tuple[dict, float]:
    """One command; ``world`` None: plain ``python -m mctool``, else torchrun with ``world`` processes."""
    launcher = ([sys.executable, "-m", "mctool"] if world is None else
                [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
                 "-m", "mctool"])
    return _run([*launcher, *args, "--json", "--force", "-q"], threads)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worlds", type=int, nargs="*", default=[1, 2])
    p.add_argument("--device", default="cpu", help="cpu (Gloo) or cuda (NCCL, one GPU per rank)")
    p.add_argument("--dataset", default="synthetic:size=16,channels=3,classes=10,train=4096,test=1024")
    p.add_argument("--arch", default="cifar_convfc")
    p.add_argument("--arch-kwargs", default='{"width": 0.5}')
    p.add_argument("--grid-points", type=int, default=5, help="plane grid (G x G points plus the three)")
    p.add_argument("--reps", type=int, default=2, help="runs per setting (the fastest counts)")
    p.add_argument("--cores", type=int, default=os.cpu_count(), help="CPU cores to split between the ranks")
    p.add_argument("--timeout", type=float, default=TIMEOUT, help="seconds for one command (then it is killed)")
    p.add_argument("--out", default="bench-out/results.json")
    args = p.parse_args()
    globals()["TIMEOUT"] = args.timeout
    # SIGTERM (an outer timeout, as in gpu_session.sh) as an exception, so that _run ends the running command's
    # process group, which a signal to this script's group no longer reaches
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = Path(tempfile.mkdtemp(prefix="mctool-scaling-"))
    dev = ["--device", args.device]
    threads_1 = args.cores if args.device == "cpu" else 1
    # Two endpoints and a curve (single process); the timed commands read them.
    t0 = time.perf_counter()
    for seed in (1, 2):
        mctool(["train", "-d", args.dataset, "-a", args.arch, "--arch-kwargs", args.arch_kwargs, "--epochs", "2",
                "--seed", str(seed), "-o", str(work / f"m{seed}.safetensors"), *dev], None, threads_1)
    mctool(["connect", str(work / "m1.safetensors"), str(work / "m2.safetensors"), "--epochs", "1",
            "-o", str(work / "curve.safetensors"), *dev], None, threads_1)
    print(f"two networks and a curve trained ({time.perf_counter() - t0:.1f} s)", flush=True)
    jobs = {
        "plane": ["plane", str(work / "curve.safetensors"), "-m", str(work / "plane.h5"),
                  "--grid-points", str(args.grid_points), *dev],
        "connect_epoch": ["connect", str(work / "m1.safetensors"), str(work / "m2.safetensors"), "--epochs", "1",
                          "-o", str(work / "c.safetensors"), *dev],
    }
    figures: dict[str, float] = {}
    for what, cmd in jobs.items():
        base = None
        for world in [None, *args.worlds]:
            threads = max(1, args.cores // (world or 1)) if args.device == "cpu" else 1
            best = min((mctool(cmd, world, threads) for _ in range(args.reps)), key=lambda r: r[0]["seconds"])
            seconds, wall = best[0]["seconds"], best[1]
            if world is None:
                base = seconds
                figures[f"scaling/{what}/plain"] = seconds
                print(f"{what} plain: {seconds:.2f} s (wall {wall:.1f} s)", flush=True)
                continue
            figures[f"scaling/{what}/{world}"] = seconds
            figures[f"scaling/{what}/{world}/wall"] = wall
            if world == 1:
                figures[f"scaling/{what}/torchrun1_overhead"] = seconds / base - 1
            one = figures.get(f"scaling/{what}/1", base)
            figures[f"scaling/{what}/{world}/speedup"] = one / seconds
            figures[f"scaling/{what}/{world}/efficiency"] = one / seconds / world
            print(f"{what} world {world}: {seconds:.2f} s (wall {wall:.1f} s), speedup {one / seconds:.2f}",
                  flush=True)
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {}
    result.setdefault("figures", {}).update(figures)
    result["scaling_settings"] = {k: v for k, v in vars(args).items() if k != "out"}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
