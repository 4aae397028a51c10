"""Runs over independent points, written to a metrics file as they are computed: evaluate-curve's points,
plane and surface cells, hessian's networks.

One place for what these runs share: which points a shard takes (``--shard I/N``), dealing the points to
ranks a pass at a time (``deal_passes``), the progress bar and the per-pass write (``PointRun``), and what
Ctrl-C says (``interrupted``, ``finishing``).
"""

from __future__ import annotations

import contextlib
import numbers
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from . import distributed
from .console import progress_bar
from .errors import ConfigError, Interrupted
from .fileio import remove_output


def parse_shard(text: str) -> tuple[int, int]:
    """``--shard I/N`` as (I, N), checked like ``check_shard``."""
    parts = str(text).strip().split("/")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ConfigError(f"--shard must be I/N with whole numbers 0 <= I < N (e.g. 0/8), got {str(text)[:40]!r}.")
    return check_shard((int(parts[0]), int(parts[1])))


def check_shard(shard: Any, plot: str | Path | None = None, what: str = "curve") -> tuple[int, int] | None:
    """``shard`` = (I, N): whole numbers with N >= 1 and 0 <= I < N; ``None`` (the whole run) passes. A shard
    cannot be drawn (``plot``): it holds only part of the ``what``."""
    if shard is None:
        return None
    if (not isinstance(shard, (tuple, list)) or len(shard) != 2
            or any(isinstance(x, bool) or not isinstance(x, numbers.Integral) for x in shard)):
        raise ConfigError(f"--shard must be I/N (shard=(I, N) in Python) with whole numbers, got {shard!r}.")
    i, n = int(shard[0]), int(shard[1])
    if n < 1 or not 0 <= i < n:
        raise ConfigError(f"--shard I/N needs N >= 1 and 0 <= I < N (shards are numbered 0 to N-1), got {i}/{n}.")
    if plot is not None:
        raise ConfigError(f"--plot draws the whole {what} and a shard file holds only part of it; draw it when "
                          "merging the shards (mctool merge SHARDS... -o FILE --plot FIGURE).")
    return i, n


def shard_text(shard: tuple[int, int] | None) -> str | None:
    """(I, N) as the ``I/N`` recorded in a shard file's attributes and config."""
    return None if shard is None else f"{shard[0]}/{shard[1]}"


def shard_tasks(tasks: list, shard: tuple[int, int] | None) -> list:
    """The tasks of shard I of N: those whose index in the full task list is I modulo N (round-robin, so that
    points of different cost spread evenly over the shards); all of them for ``None``."""
    return tasks if shard is None else tasks[shard[0]::shard[1]]


def deal_passes(todo: list, points_per_pass: int, measure: Callable[[list], list[dict[str, Any]]],
                record: Callable[[Any, dict[str, Any]], None], flush: Callable[[], None] | None = None) -> None:
    """``distributed.deal_points`` for work done ``points_per_pass`` points at a time: ``measure(points)`` gives
    one metrics dict per point of a pass; ``record(point, metrics)`` is called for each point of a pass as soon
    as the pass is done, then ``flush()`` (the caller's write of its file: once per pass, not per point), so an
    interrupted run loses at most the pass in flight. Under torchrun the ranks take whole passes."""
    from . import distributed

    passes = [todo[i:i + points_per_pass] for i in range(0, len(todo), points_per_pass)]

    def measure_pass(points: list) -> dict[str, Any]:
        return {f"{k}\t{name}": v for k, m in enumerate(measure(points)) for name, v in m.items()}

    def record_pass(points: list, flat: dict[str, Any]) -> None:
        for k, point in enumerate(points):
            record(point, {key.split("\t", 1)[1]: v for key, v in flat.items() if key.startswith(f"{k}\t")})
        if flush is not None:
            flush()

    distributed.deal_points(passes, measure_pass, record_pass)


class PointRun:
    """A run of ``total`` points (in this run or shard) that writes ``metrics`` as they complete: ``run`` computes
    the missing ones with a progress bar, and says on Ctrl-C what is saved (``interrupted``, counting the
    computed entries of the ``counted`` datasets of ``metrics``)."""

    def __init__(self, label: str, *, total: int, metrics: Path, quiet: bool = False,
                 counted: tuple[str, ...] = ("train/loss",)):
        self.label, self.total, self.metrics, self.quiet, self.counted = label, total, metrics, quiet, counted
        self._bar: Any = None
        self._task: Any = None

    def note(self, text: str) -> None:
        """Show what the point in flight is doing (hessian: its Hessian-vector products so far)."""
        if self._bar is not None:
            self._bar.update(self._task, info=text)

    def run(self, todo: list, measure: Callable[[list], list[dict[str, Any]]],
            store: Callable[[Any, dict[str, Any]], None], describe: Callable[[Any, dict[str, Any]], str], *,
            points_per_pass: int = 1, flush: Callable[[], None] | None = None) -> None:
        """Compute the points of ``todo`` (the others are in the file already): ``measure(points)``
        ``points_per_pass`` at a time (``deal_passes``), ``store(point, metrics)`` each as its pass completes, then
        ``flush()`` once per pass; the progress bar shows ``describe(point, metrics)`` of the last point."""
        saved = self.total - len(todo)
        try:
            with progress_bar(self.quiet) as bar:
                self._bar, self._task = bar, bar.add_task(self.label, total=self.total, completed=saved, info="")

                def record(point: Any, m: dict[str, Any]) -> None:
                    nonlocal saved
                    store(point, m)
                    saved += 1
                    bar.update(self._task, advance=1, info=describe(point, m))

                # one process: in order; several (torchrun): each rank takes the next pass when free
                deal_passes(todo, points_per_pass, measure, record, flush)
        except KeyboardInterrupt:
            raise interrupted(saved, self.total, self.metrics, self.counted) from None
        except distributed.PeerLost as e:  # a rank killed or crashed: say what rank 0 had saved
            raise distributed.PeerLost(f"{str(e).rstrip('.')}; {_saved(saved, self.total, self.metrics, self.counted)}"
                                       ": continue with the same command plus --resume (with any number of "
                                       "processes).") from None
        finally:
            self._bar = self._task = None


def interrupted(saved: int, total: int, metrics: Path, counted: tuple[str, ...] = ("train/loss",)) -> Interrupted:
    """The error for Ctrl-C in a run that writes its metrics file as points complete (evaluate-curve, plane,
    surface, hessian). ``saved`` is what the run counted; the file's own count (the computed entries of the
    ``counted`` datasets) wins, since a Ctrl-C can land after a point's write and before it was counted."""
    return Interrupted(f"interrupted; {_saved(saved, total, metrics, counted)}. Continue with the same command plus "
                       "--resume.")


def _saved(saved: int, total: int, metrics: Path, counted: tuple[str, ...]) -> str:
    """'N of M points are saved in FILE', N counted in the file where it can be read."""
    from .h5io import read_h5

    with contextlib.suppress(Exception):  # a file that cannot be read: the run's count stands
        data, _ = read_h5(metrics)
        saved = sum(int(np.count_nonzero(~np.isnan(np.asarray(data[name], dtype=np.float64)))) for name in counted)
    return f"{saved:,} of {total:,} points are saved in '{metrics}'"


@contextlib.contextmanager
def from_the_first_write(metrics: Path, total: int, started: Any, counted: tuple[str, ...] = ("train/loss",),
                         replaced_figure: str | os.PathLike | None = None) -> Iterator[None]:
    """Around a run's first write of its metrics file (all NaN, or a resumed run's values) and what follows
    until ``PointRun`` takes over: Ctrl-C there says what the file holds and that --resume goes on
    (``interrupted``), as in a pass, once the file is this run's (its ``started``): a rerun without --resume
    would be refused. Before the file is written, the Ctrl-C goes on as it is. ``replaced_figure``: the --plot
    this run draws at its end over an earlier run's (``--force``), deleted first, so that an interrupted run
    never leaves the old figure beside its own metrics (as ``train`` deletes an old ``-o``)."""
    if replaced_figure is not None and distributed.is_main() and os.path.lexists(replaced_figure):
        remove_output(replaced_figure)
    try:
        yield
    except KeyboardInterrupt:
        from .h5io import read_h5

        ours = False
        with contextlib.suppress(Exception):  # (no file, or one that cannot be read: nothing of this run's)
            ours = read_h5(metrics)[1].get("started") == started
        if ours:
            raise interrupted(0, total, metrics, counted) from None
        raise


@contextlib.contextmanager
def finishing(metrics: Path, total: int) -> Iterator[None]:
    """Ctrl-C once every point of a run is computed, while its summary or plot is written: say that nothing is
    lost and that --resume finishes the run (evaluate-curve, plane, surface)."""
    try:
        yield
    except Interrupted:  # (already said what was saved)
        raise
    except KeyboardInterrupt:
        saved = f"all {total:,} points are" if total != 1 else "its one point is"
        raise Interrupted(f"interrupted while finishing; {saved} saved in '{metrics}'. The same "
                          "command plus --resume writes the summary (and the plot) without computing any point "
                          "again.") from None
