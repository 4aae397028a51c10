"""Learning-rate schedules as small pure functions (unit-tested and plottable)."""

from __future__ import annotations

import math

from .choices import SCHEDULES
from .errors import ConfigError
from .options import check_count



def _check_epochs(epochs: int) -> None:
    check_count("epochs", epochs)


def paper_factor(epoch: int, epochs: int) -> float:
    """The paper's schedule (docs/method.md#lr-schedule), set once per epoch with a = epoch / epochs.

    1 for a <= 0.5, then linear down to 0.01 at a = 0.9, then 0.01.
    """
    _check_epochs(epochs)
    check_count("epoch", epoch, minimum=0)
    a = epoch / epochs
    if a <= 0.5:
        return 1.0
    if a <= 0.9:
        return 1.0 - 0.99 * (a - 0.5) / 0.4
    return 0.01


def cosine_factor(progress: float) -> float:
    """Cosine annealing from 1 to 0 over training; ``progress`` in [0, 1]."""
    return 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


def lr_at(schedule: str, base_lr: float, epoch: int, epochs: int, iteration: int = 0,
          iters_per_epoch: int = 1) -> float:
    """Learning rate for an iteration: ``epoch`` is 0-based, ``iteration`` counts within the epoch."""
    _check_epochs(epochs)
    check_count("iters_per_epoch", iters_per_epoch)
    check_count("epoch", epoch, minimum=0)
    check_count("iteration", iteration, minimum=0)
    if schedule == "paper":
        return base_lr * paper_factor(epoch, epochs)
    if schedule == "cosine":
        return base_lr * cosine_factor((epoch + iteration / iters_per_epoch) / epochs)
    if schedule == "constant":
        return base_lr
    if schedule == "sse":
        raise ConfigError("the sse schedule depends on the number of snapshots; use mctool.schedules.sse_lr().")
    raise ConfigError(f"--schedule must be one of {', '.join(SCHEDULES)}, got '{schedule}'.")


def fge_lr(iteration: int, cycle: int, lr_max: float, lr_min: float) -> float:
    """FGE's cyclic learning rate (docs/method.md#fge) at a 0-based global iteration.

    With t = (iteration mod cycle + 1) / cycle: lr = (1 - 2t) lr_max + 2t lr_min for t <= 1/2, and
    (2 - 2t) lr_min + (2t - 1) lr_max after: down to lr_min at mid cycle, back to lr_max at its end.
    """
    t = (iteration % cycle + 1) / cycle
    if t <= 0.5:
        return (1 - 2 * t) * lr_max + 2 * t * lr_min
    return (2 - 2 * t) * lr_min + (2 * t - 1) * lr_max


def fge_is_snapshot(iteration: int, cycle: int) -> bool:
    """True after the mid-cycle iteration (lr = lr_min exactly; ``cycle`` is even)."""
    return iteration % cycle + 1 == cycle // 2


def sse_lr(iteration: int, total: int, snapshots: int, lr0: float) -> float:
    """Snapshot Ensembles' cosine annealing with restarts (docs/method.md#sse), 0-based iteration.

    lr(i) = lr0 / 2 * (cos(pi * mod(i - 1, ceil(T / M)) / ceil(T / M)) + 1) with i = iteration + 1.
    """
    period = math.ceil(total / snapshots)
    return lr0 / 2 * (math.cos(math.pi * (iteration % period) / period) + 1)


def sse_is_snapshot(iteration: int, total: int, snapshots: int) -> bool:
    """True after the last iteration of each of the M cycles."""
    period = math.ceil(total / snapshots)
    return (iteration + 1) % period == 0 or iteration + 1 == total
