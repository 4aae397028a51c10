"""Distributed runs: real processes joined by torch.distributed (Gloo on the CPU), compared with one process.

Every test here starts processes (``torchrun``, or two ``python -m mctool`` with the launcher's environment
set by hand, as SLURM does), so each takes seconds; they use the smallest networks that show the point.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 240  # seconds for one launch; a hang fails the test instead of the suite


@pytest.fixture(autouse=True)
def _launch_temporaries_in_tmp_path(tmp_path, monkeypatch):
    """torchrun leaves a folder ``torchelastic_*`` in the temporary folder at every launch (its workers' logs):
    in tmp_path, not in /tmp, where each suite run left a dozen. (This process's tempfile has read TMPDIR
    already, when pytest made its base temporary folder.)"""
    monkeypatch.setenv("TMPDIR", str(tmp_path))


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", MCTOOL_DIST_TIMEOUT="60", PYTHONPATH=str(ROOT), **extra)
    return env


def torchrun(*args, nproc: int = 2, check: bool = True) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node N -m mctool ARGS`` on the CPU."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "mctool", *map(str, args)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=_env(), cwd=ROOT)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _on_a_free_port(start: Callable[[int], list[subprocess.Popen]]) -> list[subprocess.CompletedProcess]:
    """The ranks ``start(port)`` launches (rank 0 first), run to their end on a port that was free: another
    process may take it between ``_free_port`` and rank 0's bind. Rank 0 then fails at once (the others would
    wait for it, or talk to the taker): they are stopped and the launch is made again on another port (3 tries).
    A rank that outlives ``TIMEOUT`` fails the test (``TimeoutExpired``), and no rank is left running."""
    for attempt in range(3):
        procs, out = start(_free_port()), []
        try:
            for p in procs:
                stdout, stderr = p.communicate(timeout=TIMEOUT)
                out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
                if p is procs[0] and p.returncode and (
                        "EADDRINUSE" in stderr or "address already in use" in stderr.lower()):
                    for other in procs[1:]:
                        other.kill()
                        stdout, stderr = other.communicate(timeout=TIMEOUT)
                        out.append(subprocess.CompletedProcess(other.args, other.returncode, stdout, stderr))
                    break
            else:
                return out
        finally:
            for p in procs:  # (after a timeout or Ctrl-C: the ranks still running, and their pipes)
                if p.poll() is None:
                    p.kill()
                    p.communicate()
    return out  # (the third launch's results, rank 0's error among them)


def ranks(args_per_rank: list[list], cwds: list[Path] | None = None) -> list[subprocess.CompletedProcess]:
    """One ``python -m mctool`` per rank with RANK/WORLD_SIZE/... set, as a launcher (SLURM) starts them;
    each rank may get its own arguments (and working folder, as on its own node)."""
    world = len(args_per_rank)
    return _on_a_free_port(lambda port: [
        subprocess.Popen([sys.executable, "-m", "mctool", *map(str, args)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd=(cwds or [ROOT] * world)[r],
                         env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                                  MASTER_PORT=str(port)))
        for r, args in enumerate(args_per_rank)])


def _workers(agent: int) -> list[int]:
    """The processes torchrun's agent ``agent`` started (its children), from /proc."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == agent:
                out.append(int(entry.name))
    return out


def _kill_one_worker(proc: subprocess.Popen) -> None:
    """SIGKILL one rank, as a crash or a node failure would; torchrun then stops the others and exits."""
    workers = _workers(proc.pid)
    assert workers, "torchrun has no worker processes"
    os.kill(max(workers), signal.SIGKILL)
    try:
        proc.wait(timeout=60)
    finally:
        _end_launch(proc)


def _end_launch(proc: subprocess.Popen) -> None:
    """Kill what is left of a torchrun launch: its workers, then the agent."""
    for pid in _workers(proc.pid):
        os.kill(pid, signal.SIGKILL)
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _h5(path: Path) -> dict[str, np.ndarray]:
    out = {}
    with h5py.File(path) as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


@pytest.fixture(scope="module")
def bezier(tmp_path_factory, digits_models) -> Path:
    """A one-bend Bezier curve between the two digits networks (one epoch: it only needs a bend)."""
    from conftest import Cli

    out = tmp_path_factory.mktemp("dist") / "bez.safetensors"
    Cli()("connect", *digits_models, "-o", out, "--epochs", "1", "--device", "cpu", "-q")
    return out


# Evaluation of one point is the same arithmetic whichever rank does it; only the thread count differs (one
# per rank here, two in this process), which reorders float32 sums of a few thousand terms: relative
# differences of a few 1e-7 in a loss, none in an error count (an argmax flips only on an exact tie).
RTOL, ATOL = 1e-5, 1e-7


def test_plane_on_two_ranks_equals_one_process(cli, tmp_path, bezier):
    one, two = tmp_path / "one.h5", tmp_path / "two.h5"
    cli("plane", bezier, "-m", one, "--grid-points", "4", "--device", "cpu", "-q")
    done = torchrun("plane", bezier, "-m", two, "--grid-points", "4", "--json")
    assert done.stdout.count("{") >= 1 and json.loads(done.stdout)["command"] == "plane"  # rank 0 only
    assert "Error" not in done.stderr
    a, b = _h5(one), _h5(two)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].shape == b[name].shape, name
        np.testing.assert_allclose(b[name], a[name], rtol=RTOL, atol=ATOL, err_msg=name)
    with h5py.File(one) as fa, h5py.File(two) as fb:
        assert set(fa.attrs) == set(fb.attrs)
        assert json.loads(fa.attrs["config"]) == json.loads(fb.attrs["config"])


def test_evaluate_curve_on_two_ranks_equals_one_process(cli, tmp_path, bezier):
    one, two = tmp_path / "one.h5", tmp_path / "two.h5"
    ref = cli.json("evaluate-curve", bezier, "-m", one, "--num-points", "5", "--device", "cpu", "-q")
    done = torchrun("evaluate-curve", bezier, "-m", two, "--num-points", "5", "--json")
    got = json.loads(done.stdout)
    a, b = _h5(one), _h5(two)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=RTOL, atol=ATOL, err_msg=name)
    assert got["metrics"]["eval"]["err"]["max"] == pytest.approx(ref["metrics"]["eval"]["err"]["max"], abs=1e-12)
    assert not list(tmp_path.glob(".*.tmp"))  # no rank left a temporary file


def test_surface_and_hessian_on_two_ranks_equal_one_process(cli, tmp_path, digits_models):
    # surface: the same directions on every rank (seeded), grid points dealt to the ranks, rank 0 writes
    one, two = tmp_path / "one.h5", tmp_path / "two.h5"
    cli("surface", digits_models[0], "-m", one, "--dims", "1", "--grid-points", "4", "--device", "cpu", "-q")
    torchrun("surface", digits_models[0], "-m", two, "--dims", "1", "--grid-points", "4")
    a, b = _h5(one), _h5(two)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=RTOL, atol=ATOL, err_msg=name)
    assert (tmp_path / "one-directions.safetensors").read_bytes()[-1000:] == \
        (tmp_path / "two-directions.safetensors").read_bytes()[-1000:]  # the same directions
    # hessian: each point on one rank; ARPACK's answers agree within its tolerance (1e-4 relative)
    ref = cli.json("hessian", *digits_models, "-m", tmp_path / "h1.h5", "--num-points", "3", "--top-k", "1",
                   "--train-subset", "200", "--device", "cpu", "-q")
    done = torchrun("hessian", *digits_models, "-m", tmp_path / "h2.h5", "--num-points", "3", "--top-k", "1",
                    "--train-subset", "200", "--json")
    got = json.loads(done.stdout)
    np.testing.assert_allclose(got["eigenvalues"], ref["eigenvalues"], rtol=1e-3)
    refused = torchrun("hessian", digits_models[0], "-m", tmp_path / "h3.h5", "--eigenvectors",
                       tmp_path / "v.safetensors", check=False)
    assert refused.returncode != 0 and "--eigenvectors is for a run of one process" in refused.stderr


def test_killed_distributed_plane_resumes_on_one_process_without_recomputing(cli, tmp_path, bezier):
    metrics = tmp_path / "p.h5"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "mctool",
           "plane", str(bezier), "-m", str(metrics), "--grid-points", "7", "-q",
           "--points-per-pass", "2"]  # small passes: many flushes, so the kill lands mid-run (8 ran through)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(), cwd=ROOT)
    done = 0
    deadline = time.monotonic() + TIMEOUT
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.exists():
                try:
                    with h5py.File(metrics) as f:
                        done = int(np.isfinite(f["train/loss"][()]).sum())
                except OSError:  # between the temporary file's rename and our read
                    pass
            if done >= 6:
                break
            time.sleep(0.05)
    finally:
        _kill_one_worker(proc)
    assert 6 <= done < 49, f"{done} cells computed when the run was killed"
    # A sentinel in one computed cell: a resumed run that recomputed it would overwrite it.
    with h5py.File(metrics, "r+") as f:
        loss = f["train/loss"][()]
        i, j = np.argwhere(np.isfinite(loss))[0]
        kept = loss.copy()
        loss[i, j] = 123.0
        f["train/loss"][...] = loss
    cli("plane", bezier, "-m", metrics, "--grid-points", "7", "--resume", "--device", "cpu", "-q")
    with h5py.File(metrics) as f:
        final = f["train/loss"][()]
    assert final[i, j] == 123.0
    assert np.isfinite(final).all()
    before = np.isfinite(kept)
    before[i, j] = False
    assert np.array_equal(final[before], kept[before])


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(path)).items() if not k.startswith("optimizer/")}


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            scale = float(a[k].abs().max())
            torch.testing.assert_close(b[k], a[k], rtol=rtol, atol=rtol * scale, msg=k)


# Data parallel SGD differs from one process only in how the gradient sums are split (each rank sums its
# piece, then the pieces are added): float32 rounding of 1e-7 relative per step, which SGD with momentum
# carries along and amplifies mildly over the 24 steps here; 1e-4 of the largest weight bounds it with room
# while a wrong split of the batch (a mean of means, a missing rank) is off by 1e-2 or more.
SGD_RTOL = 1e-4


def test_train_on_two_ranks_matches_one_process(cli, tmp_path):
    args = ["train", "-d", "digits", "--epochs", "2", "--lr", "0.1", "--arch-kwargs", '{"hidden": 16}',
            "--batch-size", "100", "--seed", "3", "--save-every", "1"]
    cli(*args, "-o", tmp_path / "one.safetensors", "--device", "cpu", "-q")
    done = torchrun(*args, "-o", tmp_path / "two.safetensors", "--json")
    got = json.loads(done.stdout)
    _close(_weights(tmp_path / "one.safetensors"), _weights(tmp_path / "two.safetensors"), SGD_RTOL)
    # the epoch-1 checkpoint with its momentum: the same files, resumable on any world size
    a, b = load_file(str(tmp_path / "one-epoch001.safetensors")), load_file(str(tmp_path / "two-epoch001.safetensors"))
    _close(a, b, SGD_RTOL)
    assert not [k for k in b if k.startswith("module.")]
    one, two = _h5(tmp_path / "one.h5"), _h5(tmp_path / "two.h5")
    np.testing.assert_allclose(two["train/loss"], one["train/loss"], rtol=1e-4)
    assert got["metrics"]["eval"]["err"] == pytest.approx(float(one["test/err"][-1]), abs=2 / 360)


def test_connect_and_fge_on_two_ranks_match_one_process(cli, tmp_path, digits_models):
    args = ["connect", *digits_models, "--epochs", "2", "--batch-size", "100"]
    cli(*args, "-o", tmp_path / "c1.safetensors", "--device", "cpu", "-q")
    torchrun(*args, "-o", tmp_path / "c2.safetensors")
    _close(_weights(tmp_path / "c1.safetensors"), _weights(tmp_path / "c2.safetensors"), SGD_RTOL)

    args = ["fge", digits_models[0], "--epochs", "2", "--cycle-epochs", "1", "--batch-size", "100"]
    cli(*args, "-o", tmp_path / "f1.safetensors", "--device", "cpu", "-q")
    torchrun(*args, "-o", tmp_path / "f2.safetensors")
    _close(_weights(tmp_path / "f1.safetensors"), _weights(tmp_path / "f2.safetensors"), SGD_RTOL)
    one, two = _h5(tmp_path / "f1.h5"), _h5(tmp_path / "f2.h5")
    np.testing.assert_allclose(two["ensemble/test/nll"], one["ensemble/test/nll"], rtol=1e-3)


def test_batchnorm_network_trains_on_two_ranks_and_stays_close(cli, tmp_path):
    # Per-rank batch statistics (as DistributedDataParallel) differ from the whole batch's: the networks are
    # not equal, but they learn the same thing.
    args = ["train", "-d", "digits", "--epochs", "3", "--lr", "0.1", "--arch-kwargs",
            '{"hidden": 32, "batch_norm": true}', "--seed", "1"]
    ref = cli.json(*args, "-o", tmp_path / "one.safetensors", "--device", "cpu", "-q")
    got = json.loads(torchrun(*args, "-o", tmp_path / "two.safetensors", "--json").stdout)
    assert got["metrics"]["eval"]["err"] < 0.5  # far from chance (0.9) after 3 epochs, as in one process:
    assert abs(got["metrics"]["eval"]["err"] - ref["metrics"]["eval"]["err"]) < 0.05
    assert got["metrics"]["train"]["loss"] == pytest.approx(ref["metrics"]["train"]["loss"], rel=0.1)


def test_killed_two_rank_training_resumes_on_one_process(cli, tmp_path):
    args = ["train", "-d", "digits", "--epochs", "40", "--lr", "0.05", "--arch-kwargs", '{"hidden": 16}',
            "--batch-size", "100", "--seed", "4"]
    cli(*args, "-o", tmp_path / "ref.safetensors", "--device", "cpu", "-q")
    out, state = tmp_path / "run.safetensors", tmp_path / "run.state.safetensors"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "mctool",
           *args, "-o", str(out), "-q"]
    with open(tmp_path / "stderr.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, env=_env(), cwd=ROOT)
        try:
            deadline = time.monotonic() + TIMEOUT
            while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            _kill_one_worker(proc)
    assert state.exists() and not out.exists(), "the run finished before it could be killed"
    # the rank left says what is saved (it said "interrupted (Ctrl-C)": the launcher's stop broke its report)
    errors = [line for line in (tmp_path / "stderr.log").read_text().splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "completed epoch(s) are saved in" in errors[0] and "--resume" in errors[0], errors
    cli(*args, "-o", out, "--resume", "--device", "cpu", "-q")
    _close(_weights(tmp_path / "ref.safetensors"), _weights(out), 1e-3)


def test_torchrun_max_restarts_resumes_after_a_rank_is_killed(cli, tmp_path):
    """``torchrun --max-restarts``: a rank killed, the agent starts every rank again with the same command; a
    wrapper adds --resume when a training state is there. The restarted ranks joined the group through the
    agent's store, where the killed attempt's ranks had left their addresses (Gloo: "connectFullMesh failed ...
    Connection refused"); now each attempt has a store of its own, and the run finishes as one uninterrupted."""
    args = ["train", "-d", "digits", "--epochs", "40", "--lr", "0.05", "--arch-kwargs", '{"hidden": 16}',
            "--batch-size", "100", "--seed", "4"]
    cli(*args, "-o", tmp_path / "ref.safetensors", "--device", "cpu", "-q")
    out, state = tmp_path / "run.safetensors", tmp_path / "run.state.safetensors"
    script = tmp_path / "run.sh"
    script.write_text(f"""#!/bin/sh
resume=; [ -e '{state}' ] && resume=--resume
if [ "$TORCHELASTIC_RESTART_COUNT" = 0 ] && [ "$RANK" = 1 ]; then  # the first attempt's rank 1 dies
    (while [ ! -e '{state}' ]; do sleep 0.01; done; kill -9 $$) &
fi
exec '{sys.executable}' -m mctool "$@" $resume
""")
    script.chmod(0o755)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=1",
           "--no-python", str(script), *args, "-o", str(out), "-q"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=_env(), cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "completed epoch(s) are saved in" in errors[0], errors  # the first attempt's
    assert out.exists() and not state.exists()
    with h5py.File(tmp_path / "run.h5") as f:
        assert f["epoch"][()].tolist() == list(range(1, 41)) and np.isfinite(f["train/loss"][()]).all()
    _close(_weights(tmp_path / "ref.safetensors"), _weights(out), 1e-3)


def _kill_one_of_two_slurm_ranks(args: list, ready: Callable[[], bool], victim: int, tmp_path: Path,
                                  **extra: str) -> tuple[int, list[str], float]:
    """Two ranks started as srun starts them (no torchrun agent: rank 0's process holds the store); once
    ``ready()``, ``victim`` is killed (SIGKILL). Returns the other rank's exit code, its stderr lines and the
    seconds it took to end after the kill."""
    port, survivor = _free_port(), 1 - victim
    logs = [open(tmp_path / f"rank{r}.err", "wb") for r in range(2)]
    procs = [subprocess.Popen([sys.executable, "-m", "mctool", *map(str, args)], stdout=subprocess.DEVNULL,
                              stderr=logs[r], cwd=ROOT,
                              env=_env(SLURM_NTASKS="2", SLURM_PROCID=str(r), SLURM_LOCALID=str(r),
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **extra))
             for r in range(2)]
    try:
        deadline = time.monotonic() + TIMEOUT
        while not ready() and all(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.02)
        procs[victim].kill()
        start = time.monotonic()
        procs[survivor].wait(timeout=TIMEOUT)
        waited = time.monotonic() - start
    finally:
        for p, log in zip(procs, logs):
            p.kill()
            p.wait()
            log.close()
    return procs[survivor].returncode, (tmp_path / f"rank{survivor}.err").read_text().strip().splitlines(), waited


def test_a_rank_killed_without_a_launcher_agent_is_reported_with_what_is_saved(tmp_path, bezier):
    """srun without --kill-on-bad-exit leaves the other rank running. Rank 1 killed during a plane: rank 0 waited
    for its pass until MCTOOL_DIST_TIMEOUT (30 minutes), saying nothing; now it stops once rank 1's heartbeat
    has been still for MCTOOL_DIST_HEARTBEAT. Rank 0 killed during training: rank 1 exited 1 without a word (the
    store went with rank 0); now it says so, and what is saved."""
    metrics = tmp_path / "p.h5"
    code, message, waited = _kill_one_of_two_slurm_ranks(
        ["plane", bezier, "-m", metrics, "--grid-points", "15", "--points-per-pass", "2", "-q"], metrics.exists, 1,
        tmp_path, MCTOOL_DIST_HEARTBEAT="3")
    assert code == 1 and len(message) == 1, message
    assert message[0].startswith("Error: rank 1 stopped answering (no heartbeat for 3 s)"), message
    assert "points are saved in" in message[0] and "--resume" in message[0] and waited < 60, (message, waited)

    out, state = tmp_path / "run.safetensors", tmp_path / "run.state.safetensors"
    code, message, _ = _kill_one_of_two_slurm_ranks(
        ["train", "-d", "digits", "--epochs", "300", "--arch-kwargs", '{"hidden": 16}', "-o", out, "-q"],
        state.exists, 0, tmp_path)
    assert code == 1 and len(message) == 1, message
    assert message[0].startswith("Error: rank 1: ") and "rank 0 was killed or crashed" in message[0], message
    assert "completed epoch(s) are saved in" in message[0] and "--resume" in message[0], message


def test_a_sigterm_that_reaches_one_rank_alone_ends_the_run_at_once(tmp_path):
    """`kill -TERM` of one worker: it stood aside silently and then waited for the others at the end, while rank
    0 waited in its next collective operation for it, until MCTOOL_DIST_TIMEOUT. It now leaves once no rank
    has reported anything for 10 s, and rank 0 says what happened and what is saved."""
    out, state = tmp_path / "run.safetensors", tmp_path / "run.state.safetensors"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "mctool",
           "train", "-d", "digits", "--epochs", "300", "--arch-kwargs", '{"hidden": 16}', "-o", str(out), "-q"]
    with open(tmp_path / "stderr.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, cwd=ROOT,
                                env={**_env(), "MCTOOL_DIST_TIMEOUT": "200"})
        try:
            deadline = time.monotonic() + TIMEOUT
            while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            rank1 = [p for p in _workers(proc.pid)
                     if b"RANK=1\0" in Path(f"/proc/{p}/environ").read_bytes().replace(b"LOCAL_RANK", b"")]
            assert len(rank1) == 1
            os.kill(rank1[0], signal.SIGTERM)
            start = time.monotonic()
            proc.wait(timeout=TIMEOUT)
            waited = time.monotonic() - start
        finally:
            _end_launch(proc)
    errors = [line for line in (tmp_path / "stderr.log").read_text().splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and waited < 100, (errors, waited)
    # (rank 0 finds out in its next collective operation; on a busy machine the launcher's SIGTERM, sent once
    # rank 1 has ended, may reach it first, and its message says so)
    assert ("rank 1 stopped on a Ctrl-C or SIGTERM that reached it alone" in errors[0]
            or "The SIGTERM came from the launcher" in errors[0]), errors
    assert "epoch(s) are saved in" in errors[0] and "--resume" in errors[0], errors


def test_bad_option_on_every_rank_prints_one_error(tmp_path):
    done = torchrun("train", "-d", "digits", "--epochs", "1", "--lr", "-1", "-o", tmp_path / "m.safetensors",
                    check=False)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, done.stderr
    assert "--lr" in errors[0]
    assert "Traceback" not in "\n".join(line for line in done.stderr.splitlines() if "mctool" in line)
    # a usage error (exit 2), found while the command line is parsed: once too (every rank printed it)
    r0, r1 = ranks([["train", "--bogus"]] * 2)
    assert (r0.returncode, r1.returncode) == (2, 2)
    assert ("No such option: --bogus" in r0.stderr or "No such option '--bogus'" in r0.stderr) and r1.stderr == "", \
        r1.stderr  # (the second: click's wording, Typer before 0.26)
    r0, r1 = ranks([["--help"]] * 2)  # --help and --version too
    assert (r0.returncode, r1.returncode) == (0, 0) and "Usage" in r0.stdout and r1.stdout == r1.stderr == ""


def test_ranks_that_read_different_files_under_one_name_are_refused(tmp_path, digits_models):
    """Each node reads its own copy of an input: a stale one would mix two networks' results in one file that
    records rank 0's sha256. Refused before any work, by the rank that holds the other file."""
    folders = [tmp_path / "node0", tmp_path / "node1"]
    for folder, model in zip(folders, digits_models):
        folder.mkdir()
        (folder / "m.safetensors").write_bytes(model.read_bytes())
    args = ["evaluate-curve", "m.safetensors", digits_models[1], "-m", "c.h5", "--num-points", "3", "--device", "cpu"]
    r0, r1 = ranks([args, args], cwds=folders)
    assert (r0.returncode, r1.returncode) == (1, 1)
    lines = [line for r in (r0, r1) for line in r.stderr.splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1 and lines[0].startswith("Error: rank 1: 'm.safetensors' here is not the file rank 0 "
                                                   "read under that name"), (r0.stderr, r1.stderr)
    assert not (folders[0] / "c.h5").exists()
    # the same file everywhere: it runs
    (folders[1] / "m.safetensors").write_bytes(digits_models[0].read_bytes())
    assert [r.returncode for r in ranks([[*args, "-q"]] * 2, cwds=folders)] == [0, 0]
    assert (folders[0] / "c.h5").exists() and not (folders[1] / "c.h5").exists()
    # a --trajectory pattern that matches one more checkpoint on one node: refused there, before any work
    for folder in folders:
        for e, model in enumerate(digits_models, 1):
            (folder / f"t-epoch{e:03d}.safetensors").write_bytes(model.read_bytes())
    (folders[1] / "t-epoch003.safetensors").write_bytes(digits_models[1].read_bytes())
    args = ["surface", "m.safetensors", "-m", "s.h5", "--directions", "pca", "--trajectory", "t-epoch*.safetensors",
            "--grid-points", "2", "--device", "cpu"]
    r0, r1 = ranks([args, args], cwds=folders)
    assert (r0.returncode, r1.returncode) == (1, 1), (r0.stderr, r1.stderr)
    assert "Error: rank 1: this rank reads 't-epoch003.safetensors', which rank 0 does not" in r1.stderr
    assert not (folders[0] / "s.h5").exists()


def test_ranks_started_with_different_options_are_refused(tmp_path, digits_models):
    """A job script that gives one node another option (or another command) would mix two runs' results in one
    file: refused before any work, by the rank whose command line differs, naming the option. Options that may
    differ per node (--data-root, --quiet, ...) do not count."""
    base = ["evaluate-curve", *digits_models[:2], "-m", tmp_path / "c.h5", "--device", "cpu"]
    cases = [([*base, "--num-points", "3"], [*base, "--num-points", "5"], "--num-points is 5 here, 3 on rank 0"),
             ([*base, "--wd", "0.001"], base, "--wd is not given here, 0.001 on rank 0"),
             (base, [*base, "--channels-last"], "--channels-last is on here, off on rank 0"),
             (base, ["evaluate", *digits_models[:2], "--device", "cpu"],
              "this rank runs 'mctool evaluate', rank 0 'mctool evaluate-curve'")]
    for args0, args1, says in cases:
        r0, r1 = ranks([args0, args1])
        assert (r0.returncode, r1.returncode) == (1, 1), (r0.stderr, r1.stderr)
        lines = [line for r in (r0, r1) for line in r.stderr.splitlines() if line.startswith("Error: ")]
        assert len(lines) == 1 and lines[0].startswith(f"Error: rank 1: {says}; every process must run the same "
                                                       "command line"), (says, r0.stderr, r1.stderr)
        assert not (tmp_path / "c.h5").exists()
    r0, r1 = ranks([[*base, "--num-points", "3", "-q"], [*base, "--num-points", "3", "--json"]])
    assert (r0.returncode, r1.returncode) == (0, 0), (r0.stderr, r1.stderr)
    assert (tmp_path / "c.h5").exists() and r1.stdout == ""
    # each node's own copy of an image folder, in a folder of its own: the same data, so it runs
    from conftest import image_folder

    copies = [image_folder(tmp_path / f"node{r}" / "imgs") for r in (0, 1)]
    train = ["train", "-a", "mlp", "--epochs", "1", "--batch-size", "4", "--num-workers", "0", "--device", "cpu", "-q",
             "--arch-kwargs", '{"hidden": 4, "img_size": 224}', "-o", tmp_path / "i.safetensors"]
    r0, r1 = ranks([[*train, "-d", f"imagefolder:{copy}"] for copy in copies])
    assert (r0.returncode, r1.returncode) == (0, 0), (r0.stderr, r1.stderr)


def test_ranks_that_load_different_data_under_one_name_are_refused(tmp_path):
    """Each node's own copy of a data set (--data-root on a local disk), one of them changed: refused on the
    rank that loaded other images, before any work; equal copies in different folders run."""
    from test_data import _write_idx

    rng = np.random.default_rng(0)
    arrays = {"train-images-idx3-ubyte.gz": rng.integers(0, 256, (40, 6, 6)),
              "train-labels-idx1-ubyte.gz": np.arange(40) % 10,
              "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (10, 6, 6)), "t10k-labels-idx1-ubyte.gz": np.arange(10)}
    roots = [tmp_path / "node0", tmp_path / "node1"]
    for root in roots:
        (root / "fashion-mnist").mkdir(parents=True)
        for name, array in arrays.items():
            _write_idx(root / "fashion-mnist" / name, array)
    train = ["train", "-d", "fashion-mnist", "--arch", "mlp", "--epochs", "1", "--batch-size", "8", "--device", "cpu",
             "-q"]
    assert [r.returncode for r in ranks([[*train, "-o", tmp_path / "same.safetensors", "--data-root", root]
                                         for root in roots])] == [0, 0]
    arrays["t10k-images-idx3-ubyte.gz"][3, 2, 2] ^= 1  # one pixel of one test image
    _write_idx(roots[1] / "fashion-mnist" / "t10k-images-idx3-ubyte.gz", arrays["t10k-images-idx3-ubyte.gz"])
    r0, r1 = ranks([[*train, "-o", tmp_path / "m.safetensors", "--data-root", root] for root in roots])
    assert (r0.returncode, r1.returncode) == (1, 1), (r0.stderr, r1.stderr)
    lines = [line for r in (r0, r1) for line in r.stderr.splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1 and lines[0].startswith("Error: rank 1: the data set 'fashion-mnist' here is not the one "
                                                   "rank 0 loaded"), (r0.stderr, r1.stderr)
    assert not (tmp_path / "m.safetensors").exists()


def test_the_launch_the_environment_describes():
    from mctool.distributed import Dist, from_env
    from mctool.errors import ConfigError

    assert from_env({}) is None
    assert from_env({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}) == Dist(1, 2, 1)
    # a world of one joins nothing, whatever the launcher's other variables say
    assert from_env({"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "3"}) == Dist(0, 1, 0)
    with pytest.raises(ConfigError, match="LOCAL_RANK=3 is out of range"):
        from_env({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "3"})
    with pytest.raises(ConfigError, match="WORLD_SIZE=2 but RANK is not set"):  # (each took itself for rank 0)
        from_env({"WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    # SLURM: a batch script (task 0) without MASTER_ADDR is one process; srun's other tasks are refused (each would
    # run the whole command alone on the same outputs)
    slurm = {"SLURM_NTASKS": "2", "SLURM_LOCALID": "0"}
    assert from_env({**slurm, "SLURM_PROCID": "0"}) is None
    with pytest.raises(ConfigError, match="task 1 of an srun step, but MASTER_ADDR is not set"):
        from_env({**slurm, "SLURM_PROCID": "1"})
    assert from_env({**slurm, "SLURM_PROCID": "1", "SLURM_LOCALID": "1", "MASTER_ADDR": "n1"}) == Dist(1, 2, 1)


def test_a_run_refused_on_another_rank_writes_no_file(tmp_path, digits_models):
    """Rank 0's checks passed, rank 1's did not: rank 0 waits for every rank's before its first write, so a
    rerun is not told that the file holds an interrupted run."""
    folders = [tmp_path / "node0", tmp_path / "node1"]
    for folder in folders:
        folder.mkdir()
    (folders[0] / "b.safetensors").write_bytes(digits_models[1].read_bytes())  # not on node 1
    m = tmp_path / "c.h5"
    args = ["evaluate-curve", digits_models[0], "b.safetensors", "-m", m, "--num-points", "3", "--device", "cpu"]
    r0, r1 = ranks([args, args], cwds=folders)
    assert (r0.returncode, r1.returncode) == (1, 1), (r0.stderr, r1.stderr)
    assert "Error: rank 1: checkpoint 'b.safetensors' does not exist." in r1.stderr and "Error" not in r0.stderr
    assert not m.exists()


def test_error_on_one_rank_stops_all_ranks_with_one_line(tmp_path, digits_models):
    # the same command on both ranks; the input is on node 0's disk only
    folders = [tmp_path / "node0", tmp_path / "node1"]
    for folder in folders:
        folder.mkdir()
    (folders[0] / "missing.safetensors").write_bytes(digits_models[0].read_bytes())
    args = ["evaluate", "missing.safetensors", "--device", "cpu"]
    t0 = time.monotonic()
    r0, r1 = ranks([args, args], cwds=folders)
    assert time.monotonic() - t0 < TIMEOUT / 2  # nobody waited for the timeout
    assert r0.returncode == 1 and r1.returncode == 1
    lines = [line for r in (r0, r1) for line in r.stderr.splitlines() if line.startswith("Error: ")]
    assert lines == [f"Error: rank 1: {lines[0].split(': ', 2)[2]}"], (r0.stderr, r1.stderr)
    assert "missing.safetensors" in lines[0]
    assert "Traceback" not in r0.stderr + r1.stderr
    assert r0.stdout == r1.stdout == ""


_STUCK_RANK = """
import sys, time
from mctool import distributed
from mctool.errors import MctoolError
where = sys.argv[1]
with distributed.launched() as d:
    t0 = time.monotonic()
    try:
        if where == "sync":
            if d.rank == 1:
                time.sleep(8)  # stuck before the barrier
            distributed.sync("the test barrier")
        else:
            # rank 0 takes 0.5 s a point, rank 1 is stuck in the first it takes
            distributed.deal_points(range(4), lambda k: time.sleep(0.5 + 7.5 * d.rank) or {"v": float(k)},
                                    lambda k, r: None)
        print("done")
    except MctoolError as e:
        print(f"error: {e}")
        print(f"waited {time.monotonic() - t0:.1f}")
"""


@pytest.mark.parametrize("where", ["sync", "points"])
def test_a_stuck_rank_ends_the_wait_after_the_timeout(tmp_path, where):
    # rank 1 is stuck for 8 s (before a barrier, or in its point of the queue); rank 0 gives up after 2 s
    rank0, _ = _on_a_free_port(lambda port: [
        subprocess.Popen([sys.executable, "-c", _STUCK_RANK, where], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, cwd=ROOT, env={**_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                                                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)),
                                                   "MCTOOL_DIST_TIMEOUT": "2"})
        for r in range(2)])
    out0, err0 = rank0.stdout, rank0.stderr
    message, waited = out0.strip().splitlines()
    what = "the other ranks at the test barrier" if where == "sync" else "the points other ranks are evaluating"
    assert message == f"error: rank 0 waited 2 s for {what}; is another rank stuck? " \
                           "(MCTOOL_DIST_TIMEOUT sets the limit)", err0
    assert 2 <= float(waited.split()[1]) < 8  # it gave up at the timeout, without waiting for rank 1


def test_a_rank_that_cannot_reach_rank_0_says_so_in_one_line(digits_models):
    """Rank 1 alone (rank 0 never came up, or MASTER_ADDR is wrong): c10d logged its connection errors with some
    twenty lines of C++ stack frames before mctool's one line."""
    done = subprocess.run([sys.executable, "-m", "mctool", "evaluate", str(digits_models[0]), "--device", "cpu"],
                          capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT,
                          env={**_env(SLURM_NTASKS="2", SLURM_PROCID="1", SLURM_LOCALID="1", MASTER_ADDR="127.0.0.1",
                                      MASTER_PORT=str(_free_port())), "MCTOOL_DIST_TIMEOUT": "3"})
    assert done.returncode == 1 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: cannot join the process group of 2 ranks"), done.stderr


def test_device_naming_one_gpu_is_refused_under_several_ranks(tmp_path, digits_models):
    r0, r1 = ranks([["evaluate", digits_models[0], "--device", "cuda:0"]] * 2)
    assert r0.returncode == r1.returncode == 1
    errors = [line for r in (r0, r1) for line in r.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and ("cuda:0" in errors[0] or "no CUDA" in errors[0]), errors


def test_evaluate_on_two_ranks_equals_one_process(cli, tmp_path, digits_models):
    ref = cli.json("evaluate", *digits_models, "--device", "cpu", "-q")
    got = json.loads(torchrun("evaluate", *digits_models, "--json").stdout)
    for key in ("nll", "err", "ece", "brier"):
        assert got["metrics"]["eval"][key] == pytest.approx(ref["metrics"]["eval"][key], rel=RTOL, abs=ATOL)
    for a, b in zip(ref["models"], got["models"]):
        assert b["metrics"]["nll"] == pytest.approx(a["metrics"]["nll"], rel=RTOL)


def test_sync_bn_is_refused_on_cpu_ranks_and_a_no_op_in_one_process(cli, tmp_path):
    args = ["train", "-d", "digits", "--epochs", "1", "--arch-kwargs", '{"hidden": 16, "batch_norm": true}']
    done = torchrun(*args, "--sync-bn", "-o", tmp_path / "two.safetensors", check=False)
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error: ")]
    assert done.returncode != 0 and len(errors) == 1 and "--sync-bn needs CUDA" in errors[0], done.stderr
    cli(*args, "--sync-bn", "-o", tmp_path / "a.safetensors", "--device", "cpu", "-q")
    cli(*args, "-o", tmp_path / "b.safetensors", "--device", "cpu", "-q")
    a, b = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # one process: nothing to synchronise, the same run


def test_recalibration_of_sync_batchnorm_layers_uses_local_statistics():
    from mctool.bn import recalibrate_bn
    from mctool.data import load_data
    from mctool.models import build_model

    data = load_data("digits")
    torch.manual_seed(0)
    plain = build_model("mlp", 10, 1, {"hidden": 16, "batch_norm": True, "img_size": 8})
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(build_model("mlp", 10, 1, {"hidden": 16, "batch_norm": True,
                                                                                      "img_size": 8}))
    synced.load_state_dict(plain.state_dict())
    recalibrate_bn(plain, data.train, batch_size=100)
    recalibrate_bn(synced, data.train, batch_size=100)  # one process, CPU: would fail inside SyncBatchNorm
    assert isinstance(synced.net[2], torch.nn.SyncBatchNorm)  # restored after the pass
    for (k, v), w in zip(plain.state_dict().items(), synced.state_dict().values()):
        assert torch.equal(v, w), k  # the same operations on the same batches




@pytest.mark.parametrize("extra", [[], ["--precision", "bf16", "--channels-last"], ["--sync-bn"]])
@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (NCCL)")
def test_nccl_training_on_two_gpus(cli, tmp_path, extra):
    args = ["train", "-d", "synthetic:size=16,train=512,test=256", "-a", "cifar_preresnet20", "--epochs", "2",
            "--batch-size", "64", *extra]
    ref = cli.json(*args, "-o", tmp_path / "one.safetensors", "--device", "cuda", "-q")
    got = json.loads(torchrun(*args, "-o", tmp_path / "two.safetensors", "--device", "cuda", "--json").stdout)
    assert abs(got["metrics"]["eval"]["err"] - ref["metrics"]["eval"]["err"]) < 0.1


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (NCCL)")
def test_nccl_plane_on_two_gpus_equals_one(cli, tmp_path, bezier):
    one, two = tmp_path / "one.h5", tmp_path / "two.h5"
    cli("plane", bezier, "-m", one, "--grid-points", "4", "--device", "cuda", "-q")
    torchrun("plane", bezier, "-m", two, "--grid-points", "4", "--device", "cuda")
    a, b = _h5(one), _h5(two)
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-4, atol=1e-6, err_msg=name)
