"""Many processes with ``torch.distributed``: launched by ``torchrun`` or SLURM (docs/distributed.md).

mctool reads the launcher's standard environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``; under SLURM's ``srun`` also ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``) and
joins one process group: Gloo for CPU tensors, NCCL for CUDA tensors (one group serves both). Without
those variables, or with a world of one process, nothing here is used and a run is exactly the
single-process run.

What is parallel and how:

- training (``train``, ``connect``, ``fge``): data parallel. Every rank forms the same global batches
  (same seed, same order, same augmentation) and takes its piece of each (``Split.batches(chunk=...)``);
  gradients are summed over ranks in one flat buffer, weighted by each rank's share of the global batch,
  so an update is the single-process update of the whole batch.
- evaluating one network (``evaluate``, ``ensemble``, each training epoch's evaluation, BN
  recalibration): whole batches are dealt round-robin (``Split.batches(deal=...)``) and the sums that
  make the metrics (and BN statistics) are added over ranks.
- many points (``evaluate-curve``, ``plane``, ``surface``: whole passes of ``--points-per-pass`` points,
  ``hessian``: one point at a time; ``points.PointRun``): each rank takes the next pass from a shared counter
  as it becomes free (``deal_points``); rank 0 writes the results as they arrive.

Only rank 0 writes files, draws progress and prints results (``fileio.writes_files``); another rank's
own error reaches the user as one ``Error: rank N: ...`` line. Every wait on other ranks has a timeout
(``MCTOOL_DIST_TIMEOUT`` seconds, default 1800) and notices a rank that failed.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, TypeVar

import torch

from .errors import ConfigError, DataError, MctoolError
from .options import env_seconds

_K = TypeVar("_K")
_DEFAULT_TIMEOUT = 1800.0
_POLL = 0.005  # seconds between looks at the store while waiting


class PeerFailed(MctoolError):
    """Another rank failed (its own error is reported by that rank); this rank stops too."""


class PeerLost(MctoolError):
    """A collective operation failed and no rank reported an error: a rank was killed or crashed, so this
    rank reports it (the training loop adds what is saved)."""


@dataclass(frozen=True)
class Dist:
    """This process's place in the group."""

    rank: int
    world: int
    local_rank: int

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def part(self) -> tuple[int, int]:
        """(rank, world), the form ``Split.batches(chunk=..., deal=...)`` takes."""
        return self.rank, self.world


_launched: Dist | None = None  # set by ``launched`` while the CLI runs a command on several processes
_sequence = [0]  # numbers the waits (``sync``) and point queues, which all ranks call in the same order


def _env_int(env: dict[str, str], key: str, low: int, high: int | None = None) -> int:
    raw = env.get(key, "")
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {key}={raw!r} is not an integer.") from None
    if value < low or (high is not None and value > high):
        raise ConfigError(f"environment variable {key}={value} is out of range "
                          f"({low}..{'' if high is None else high}).")
    return value


def from_env(env: dict[str, str] | None = None) -> Dist | None:
    """The launch described by the environment (torchrun's variables, else SLURM's), or None if none is."""
    env = dict(os.environ if env is None else env)
    if "WORLD_SIZE" in env:
        keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    elif "SLURM_NTASKS" in env and "SLURM_PROCID" in env and "MASTER_ADDR" in env:
        keys = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")
    elif "SLURM_NTASKS" in env and env.get("SLURM_PROCID", "0").strip() not in ("", "0"):
        # (a batch script is task 0: there SLURM's variables without MASTER_ADDR are a run of one process)
        raise ConfigError(f"this is task {env['SLURM_PROCID']} of an srun step, but MASTER_ADDR is not set, so "
                          "every task would run the whole command alone on the same outputs; export MASTER_ADDR "
                          "and MASTER_PORT in the job script (docs/distributed.md), or start one task.")
    else:
        return None
    world = _env_int(env, keys[1], 1)
    if world == 1:  # nothing to join: the launcher's other variables do not matter
        return Dist(0, 1, 0)
    if keys[0] not in env:  # every process would take itself for rank 0
        raise ConfigError(f"{keys[1]}={world} but {keys[0]} is not set; start mctool with torchrun (or srun), which "
                          f"sets both, or set {keys[0]} for each process.")
    rank = _env_int(env, keys[0], 0, world - 1)
    local = _env_int(env, keys[2], 0, world - 1) if keys[2] in env else 0
    return Dist(rank, world, local)


def timeout_seconds() -> float:
    return env_seconds("MCTOOL_DIST_TIMEOUT", _DEFAULT_TIMEOUT)


#: Seconds between a rank's heartbeats (``_Heartbeat``).
_BEAT_EVERY = 1.0


def heartbeat_timeout() -> float:
    """Seconds without a heartbeat after which a waiting rank counts another as gone (MCTOOL_DIST_HEARTBEAT)."""
    return env_seconds("MCTOOL_DIST_HEARTBEAT", 60.0)


class _Heartbeat:
    """A thread that adds 1 to this rank's ``beat/RANK`` key in the group's store every second while the rank is
    in the group, so that a rank waiting for the others tells one that is gone (killed or crashed where no
    launcher's agent stops the rest: ``srun`` without ``--kill-on-bad-exit``) from one still at work. The
    store's client serialises its operations, so the thread shares it with the rank's own."""

    def __init__(self, d: Dist):
        self._store, self._key, self._stop = _store(), _key(f"beat/{d.rank}"), threading.Event()
        self._thread = threading.Thread(target=self._run, name="mctool-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(_BEAT_EVERY):
            try:
                self._store.add(self._key, 1)
            except Exception:  # the store is gone: the rank finds that out itself
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


_heartbeat: list[_Heartbeat | None] = [None]


def current() -> Dist | None:
    """The group this process works in, or None for a single process (also a world of one)."""
    if _launched is not None:
        return _launched
    if torch.distributed.is_available() and torch.distributed.is_initialized():  # a Python caller's own group
        world = torch.distributed.get_world_size()
        if world > 1:
            rank = torch.distributed.get_rank()
            local = int(os.environ.get("LOCAL_RANK", rank % max(1, torch.cuda.device_count())))
            return Dist(rank, world, local)
    return None


def is_main() -> bool:
    d = current()
    return d is None or d.main


def _rendezvous(d: Dist, timeout: datetime.timedelta) -> dict[str, Any]:
    """How the ranks find each other: ``env://``, except under a torchrun agent that may restart them
    (``--max-restarts``). Its store outlives an attempt, with the keys where the ranks of the last one left their
    addresses, and a rank of the next one read them before their successors wrote theirs (Gloo: "connectFullMesh
    failed ... Connection refused"): there the group gets a store of its own for each attempt."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or attempt is None:
        return {"init_method": "env://"}
    agent = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), d.world,
                                       is_master=False, timeout=timeout)
    return {"store": torch.distributed.PrefixStore(f"mctool/attempt/{attempt}", agent)}


@contextlib.contextmanager
def launched() -> Iterator[Dist | None]:
    """Join the process group the environment describes for the block (the CLI wraps each command in it).

    The group uses Gloo for CPU tensors and NCCL for CUDA ones; each rank's default GPU is
    ``cuda:LOCAL_RANK``. SIGTERM (what launchers, SLURM at a time limit and ``timeout`` send to stop a job)
    ends the run like Ctrl-C, in a single process too. The group is destroyed at the end, after errors and
    interruptions too.
    """
    global _launched
    d = from_env()
    if d is None or d.world == 1:
        with _sigterm_as_ctrl_c():
            yield None
        return
    if torch.distributed.is_available() and torch.distributed.is_initialized():  # the caller's own group
        yield current()
        return
    if not torch.distributed.is_available():
        raise ConfigError("this PyTorch build has no torch.distributed; run mctool without torchrun.")
    for key in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(key):
            raise ConfigError(f"{key} is not set; start mctool with torchrun, or set MASTER_ADDR and MASTER_PORT "
                              "for SLURM (see docs/distributed.md).")
    cuda = torch.cuda.is_available()
    if cuda:
        if d.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {d.local_rank} but this node has {torch.cuda.device_count()} GPU(s); "
                              "start at most one process per GPU.")
        torch.cuda.set_device(d.local_rank)
    timeout = datetime.timedelta(seconds=timeout_seconds())
    try:
        torch.distributed.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", **_rendezvous(d, timeout),
                                             rank=d.rank, world_size=d.world, timeout=timeout)
    except Exception as e:  # rendezvous failures: one clear line
        raise ConfigError(f"cannot join the process group of {d.world} ranks: {e}") from None
    _launched = d
    _sequence[0] = 0
    _aside[0] = False
    try:
        _heartbeat[0] = _Heartbeat(d)
        sync("the start")  # every rank begins the command together: the same mistake fails on all at once
    except BaseException:
        _launched = None
        _stop_heartbeat()
        with contextlib.suppress(Exception):
            torch.distributed.destroy_process_group()
        raise
    finished = False
    try:
        with _sigterm_as_ctrl_c():
            yield d
        finished = True
    finally:
        _leave(d, finished)


def _stop_heartbeat() -> None:
    beat, _heartbeat[0] = _heartbeat[0], None
    if beat is not None:
        beat.stop()


def _leave(d: Dist, finished: bool) -> None:
    """End this rank's part in the group. After a finished command every rank first waits for all the others
    to finish (no rank closes its connections while another is still in a collective operation), and rank 0,
    whose process may host the group's store (``env://`` without torchrun's agent), leaves last: it waits up
    to 10 s for word that each other rank has left. After an error the failure report has done the waiting."""
    global _launched
    store = None
    if finished and not _aside[0]:
        with contextlib.suppress(Exception):  # a rank that failed at the very end reports its own error
            sync("the end")
            store = _store()
    _launched = None
    _stop_heartbeat()
    if store is not None and d.main:
        with contextlib.suppress(Exception):
            deadline = time.monotonic() + 10.0
            waiting = list(range(1, d.world))
            while waiting and time.monotonic() < deadline:
                waiting = [r for r in waiting if not store.check([_key(f"left/{r}")])]
                time.sleep(_POLL)
    with contextlib.suppress(Exception):
        torch.distributed.destroy_process_group()
    if store is not None and not d.main:
        with contextlib.suppress(Exception):
            store.set(_key(f"left/{d.rank}"), "1")


#: The signals that stop a command as Ctrl-C does: SIGTERM (a launcher, ``timeout``, a job's time limit) and
#: SIGHUP (the terminal or SSH session closed).
STOP_SIGNALS = (signal.SIGTERM, *((signal.SIGHUP,) if hasattr(signal, "SIGHUP") else ()))  # (none on Windows)


@contextlib.contextmanager
def _sigterm_as_ctrl_c() -> Iterator[None]:
    """SIGTERM and SIGHUP raise KeyboardInterrupt for the block: the command saves what it has, removes its
    locks and exits 130 with its usual message, as for Ctrl-C."""
    _stopped_by[0] = None
    try:  # (SIGHUP ignored when the process started, under nohup, stays ignored)
        previous = [(s, signal.signal(s, _terminate)) for s in STOP_SIGNALS
                    if not (s != signal.SIGTERM and signal.getsignal(s) is signal.SIG_IGN)]
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        for s, handler in previous:
            if signal.getsignal(s) is not signal.SIG_IGN:  # (ignored for a command's report and exit: stays so)
                signal.signal(s, handler)


_stopped_by: list[str | None] = [None]


def _terminate(signum: int, frame: Any) -> None:
    _stopped_by[0] = signal.Signals(signum).name
    raise KeyboardInterrupt


def stop_signal() -> str | None:
    """The signal that interrupted the command now running, ``SIGTERM`` or ``SIGHUP``; None for Ctrl-C."""
    return _stopped_by[0]


def _store() -> Any:
    # The key-value store every rank of the default group shares (the rendezvous store of torchrun).
    from torch.distributed import distributed_c10d

    return distributed_c10d._get_default_store()


def _key(name: str) -> str:
    """A store key of this attempt: torchrun's agent keeps its store across restarts (--max-restarts)."""
    return f"mctool/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{name}"


def report_failure(message: str) -> bool:
    """Record this rank's error for the others; returns whether this rank should print it.

    Rank 0 always prints. Another rank stays silent when rank 0 failed with the same message (a bad
    option fails on every rank: the user sees it once); otherwise it prints, naming itself. It waits for
    rank 0's verdict (its own error, or word that it stopped because of another rank's) for up to 10 s,
    and rank 0, whose process may hold the group's store, waits as long for the others to have read it.
    """
    d = current()
    if d is None:
        return True
    try:
        store = _store()
        store.set(_key(f"error/{d.rank}"), message)
        store.add(_key("errors"), 1)
        deadline = time.monotonic() + 10.0
        if d.main:
            others = list(range(1, d.world))
            while others and time.monotonic() < deadline:
                others = [r for r in others if not store.check([_key(f"done/{r}")])]
                time.sleep(0.02)
            return True
        verdict = True
        while time.monotonic() < deadline:
            if store.check([_key("error/0")]):
                verdict = store.get(_key("error/0")).decode() != message
                break
            if store.check([_key("stopped/0")]):
                break
            time.sleep(0.02)
        store.set(_key(f"done/{d.rank}"), "1")
        return verdict
    except Exception:  # the store itself is gone: say it here
        return True


def stand_aside() -> None:
    """A rank other than 0 that stops with nothing to report (Ctrl-C reaches every rank; rank 0 says what was
    saved) tells rank 0 not to wait for it to read rank 0's report. When no rank reports anything within 10 s,
    the Ctrl-C or SIGTERM reached this rank alone: it then leaves without waiting for the others at the end
    (rank 0, in a collective operation, would never come; it finds out when this rank's connections close, or
    at its next wait on the store, and says so)."""
    d = current()
    if d is None or d.main:
        return
    with contextlib.suppress(Exception):  # the store is gone: rank 0 is not waiting
        store = _store()
        store.set(_key(f"done/{d.rank}"), "1")
        deadline = time.monotonic() + 10.0
        while store.add(_key("errors"), 0) == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        _aside[0] = store.add(_key("errors"), 0) == 0


_aside = [False]  # this rank stood aside (``stand_aside``): it does not wait for the others at the end


def _check_aside(store: Any, d: Dist) -> None:
    """``PeerLost`` naming the other ranks that stopped with nothing to report (``stand_aside``) while no rank
    reported an error (``_check_peers`` looks at those first)."""
    aside = [r for r in range(d.world) if r != d.rank and store.check([_key(f"done/{r}")])]
    if aside:
        raise PeerLost(f"rank {', '.join(map(str, aside))} stopped on a Ctrl-C or SIGTERM that reached it alone "
                       "(not every rank: a signal sent to one process)")


def _failed_ranks(store: Any, d: Dist) -> str:
    failed = [r for r in range(d.world) if r != d.rank and store.check([_key(f"error/{r}")])]
    return ", ".join(map(str, failed)) or "another rank"


def _check_peers(store: Any, d: Dist) -> None:
    if store.add(_key("errors"), 0) > 0:
        store.set(_key(f"stopped/{d.rank}"), "1")  # it reports nothing: the failed rank speaks
        store.set(_key(f"done/{d.rank}"), "1")
        raise PeerFailed(f"rank {_failed_ranks(store, d)} failed; rank {d.rank} stops too.")


def sync(what: str) -> None:
    """Wait until every rank got here (a barrier that notices failed ranks and times out)."""
    d = current()
    if d is None:
        return
    with _talking(d):
        store = _store()
        _sequence[0] += 1
        key = _key(f"sync/{_sequence[0]}")
        store.add(key, 1)
        _wait_until(store, d, lambda: store.add(key, 0) >= d.world, f"the other ranks at {what}")


def check_same_command(command: str, options: dict[str, str]) -> None:
    """Refuse, before any work, a run whose ranks were started with different commands or options (a job
    script that gives one node another ``--lr``, or an old command line on one node): the ranks would mix
    results of different runs in one file, or wait for each other in different places. ``options`` maps each
    option (as the user writes it: ``--lr``) to its value as text; rank 0's are the run's."""
    d = current()
    if d is None:
        return
    theirs = broadcast_object({"command": command, "options": options})
    fix = "every process must run the same command line (only --data-root, --download, --num-workers, --quiet, " \
          "--json and the folder of an imagefolder: --dataset may differ)."
    if theirs["command"] != command:
        raise ConfigError(f"this rank runs 'mctool {command}', rank 0 'mctool {theirs['command']}'; {fix}")
    for name in dict.fromkeys([*theirs["options"], *options]):
        mine, its = options.get(name), theirs["options"].get(name)
        if mine != its:
            raise ConfigError(f"{name} is {mine if mine is not None else 'not given'} here, "
                              f"{its if its is not None else 'not given'} on rank 0; {fix}")
    sync("the check of the command line")


def check_same_files(paths: Iterable[str | os.PathLike]) -> None:
    """Refuse, before any work, a run whose ranks read different files under one name (a stale copy on one
    node's disk, another checkout): each rank hashes the input files it can open and compares them with rank
    0's, then all wait for the verdict. A file some rank cannot open is left to the command, which names it."""
    d = current()
    if d is None:
        return
    from .fileio import sha256_file

    mine: dict[str, str | None] = {}  # None: not a file here (the command names it when it reads it)
    for p in dict.fromkeys(map(str, paths)):
        mine[p] = None
        with contextlib.suppress(OSError):
            if os.path.isfile(p):
                mine[p] = sha256_file(p)
    theirs = broadcast_object(mine)
    fix = "every process must read the same inputs: copy them again, or use a file system all nodes share."
    for p, h in mine.items():
        if h is not None and theirs.get(p) is not None and theirs[p] != h:
            raise ConfigError(f"'{p}' here is not the file rank 0 read under that name (sha256 {h[:12]}... vs "
                              f"{theirs[p][:12]}...); {fix}")
        if h is not None and p not in theirs:  # a pattern (--trajectory) matching other files here
            raise ConfigError(f"this rank reads '{p}', which rank 0 does not (a file pattern matches other files "
                              f"on each node?); {fix}")
    for p, h in theirs.items():
        if h is not None and p not in mine:
            raise ConfigError(f"rank 0 reads '{p}', which this rank does not (a file pattern matches other files "
                              f"on each node?); {fix}")
    sync("the check of the input files")


def check_same_data(name: str, fingerprint: str) -> None:
    """Refuse a run whose ranks loaded different data under one name (each node's own copy of a data set, one
    of them stale or partial): ``fingerprint`` (see ``data.load_data``) is compared with rank 0's on every
    rank. Every rank calls it at the same point: where the command loads its data."""
    d = current()
    if d is None:
        return
    theirs = broadcast_object(fingerprint)
    if theirs != fingerprint:
        raise DataError(f"the data set '{name}' here is not the one rank 0 loaded (fingerprint {fingerprint[:12]}... "
                        f"vs {theirs[:12]}...); every process must read the same data: copy it again, or give "
                        "--data-root a folder all nodes share.")
    sync("the check of the data set")


def _check_alive(store: Any, d: Dist, seen: dict[int, tuple[int, float]]) -> None:
    """``PeerLost`` for a rank that stood aside (``_check_aside``), or whose heartbeat has not moved for
    ``heartbeat_timeout()`` while this rank waited (``seen``: each rank's count and when this rank saw it
    change) and that has not left."""
    _check_aside(store, d)
    now = time.monotonic()
    for r in range(d.world):
        if r == d.rank:
            continue
        beats = store.add(_key(f"beat/{r}"), 0)
        if r not in seen or seen[r][0] != beats:
            seen[r] = (beats, now)
        elif now - seen[r][1] > heartbeat_timeout() and not store.check([_key(f"left/{r}")]):
            raise PeerLost(f"rank {r} stopped answering (no heartbeat for {heartbeat_timeout():.0f} s): it was "
                           "killed or crashed, or its node failed (its own output, or the launcher's, may say why)")


def _wait_until(store: Any, d: Dist, ready: Callable[[], bool], what: str) -> None:
    """Poll ``ready()`` until it holds; stop at once when another rank failed, when one is gone (rank 0 looks at
    the heartbeats every second: ``_check_alive``; it then reports the lost rank, and the others stop on its
    report), and after the timeout."""
    deadline = time.monotonic() + timeout_seconds()
    seen: dict[int, tuple[int, float]] = {}
    next_look = time.monotonic()
    while not ready():
        with _talking(d):
            _check_peers(store, d)
            if d.main and time.monotonic() >= next_look:
                _check_alive(store, d, seen)
                next_look = time.monotonic() + _BEAT_EVERY
        if time.monotonic() > deadline:
            raise MctoolError(f"rank {d.rank} waited {timeout_seconds():.0f} s for {what}; "
                              "is another rank stuck? (MCTOOL_DIST_TIMEOUT sets the limit)")
        time.sleep(_POLL)


@contextlib.contextmanager
def _talking(d: Dist) -> Iterator[None]:
    """Turn a store that has gone away into ``PeerLost``: rank 0's process (or the launcher's agent) keeps it, and
    rank 0, stopping on an error, waits for the others to read it; so rank 0 was killed or crashed."""
    try:
        yield
    except MctoolError:
        raise
    except (RuntimeError, ValueError, OSError):
        raise PeerLost("the process group's store is gone, which rank 0's process (or the launcher's agent) "
                       "holds: rank 0 was killed or crashed (its own output, or the launcher's, may say why)") from None


def _collective(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except (RuntimeError, torch.distributed.DistBackendError) as e:
        d = current()
        with _talking(d):
            store = _store()
            _check_peers(store, d)  # the usual cause: another rank failed and left
            _check_aside(store, d)  # or one that a signal reached alone
        # (Gloo's messages start with its source location: "[.../gloo/transport/tcp/pair.cc:545] Read error ...")
        # and go on with advice for Gloo's users: its first sentence is the reason
        reason = re.sub(r"^\[[^\]]*\]\s*", "", (str(e).splitlines() or [""])[0]).split(". ")[0].rstrip(".")
        raise PeerLost(f"a collective operation failed ({reason}): another rank was killed or crashed (its own "
                       "output, or the launcher's, may say why).") from None


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` in place over ranks (no-op for a single process); returns it."""
    if current() is not None:
        _collective(lambda: torch.distributed.all_reduce(t))
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """Elementwise maximum of ``t`` over ranks, in place (no-op for a single process); returns it."""
    if current() is not None:
        _collective(lambda: torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX))
    return t


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s JSON-able ``obj`` on every rank (through the store; no-op for a single process)."""
    d = current()
    if d is None:
        return obj
    with _talking(d):
        store = _store()
        _sequence[0] += 1
        key = _key(f"object/{_sequence[0]}")
        if d.rank == src:
            store.set(key, json.dumps(obj))
            return obj
        return json.loads(_wait_get(store, d, key, "data from rank 0"))


def _wait_get(store: Any, d: Dist, key: str, what: str) -> str:
    _wait_until(store, d, lambda: store.check([key]), what)
    return store.get(key).decode()


def deal_points(todo: Iterable[_K], measure: Callable[[_K], dict[str, float]],
                record: Callable[[_K, dict[str, float]], None]) -> None:
    """Evaluate independent points: ``record(k, measure(k))`` for every k of ``todo``.

    A single process goes through them in order. Several ranks take the next point from a shared counter
    whenever they become free (dynamic assignment: points cost different amounts); each result goes into
    the process group's store, and rank 0 calls ``record`` for every result as soon as it sees one, in
    whatever order they finish (after each of its own points, and while it waits at the end), so an
    interrupted run loses only the points in flight. ``todo`` must be the same on every rank (take it from
    rank 0 with ``broadcast_object``); keys and results must be JSON-able.
    """
    todo = list(todo)
    d = current()
    if d is None:
        for k in todo:
            record(k, measure(k))
        return
    def talk(fn: Callable[[], Any]) -> Any:  # one exchange with the store (not the work between them)
        with _talking(d):
            return fn()

    store = talk(_store)
    _sequence[0] += 1
    prefix = _key(f"points/{_sequence[0]}")
    pending: set[int] = set()  # (rank 0) points handed out whose results are not recorded yet
    handed = 0

    def collect() -> bool:
        """Record the results that are in; returns whether every point is recorded."""
        nonlocal handed
        handed_now = min(len(todo), talk(lambda: store.add(f"{prefix}/next", 0)))
        pending.update(range(handed, handed_now))
        handed = handed_now
        for i in sorted(pending):
            key = f"{prefix}/result/{i}"
            if talk(lambda: store.check([key])):
                record(todo[i], json.loads(talk(lambda: store.get(key))))
                pending.discard(i)
        return not pending and handed == len(todo)

    while True:
        i = talk(lambda: store.add(f"{prefix}/next", 1)) - 1
        if i >= len(todo):
            break
        talk(lambda: _check_peers(store, d))
        result = json.dumps(measure(todo[i]))
        talk(lambda: store.set(f"{prefix}/result/{i}", result))
        if d.main:
            collect()
    if d.main:
        _wait_until(store, d, collect, "the points other ranks are evaluating")
    sync("the end of the point evaluation")
