"""Learning-rate schedules as small pure functions (unit-tested and plottable)."""

from __future__ import annotations

import math

from .errors import ConfigError

SCHEDULES = ("paper", "cosine", "constant")


def paper_factor(epoch: int, epochs: int) -> float:
    """The paper's schedule (paper-notes section 2), set once per epoch with a = epoch / epochs.

    1 for a <= 0.5, then linear down to 0.01 at a = 0.9, then 0.01.
    """
    a = epoch / epochs
    if a <= 0.5:
        return 1.0
    if a <= 0.9:
        return 1.0 - 0.99 * (a - 0.5) / 0.4
    return 0.01


def cosine_factor(progress: float) -> float:
    """Cosine annealing from 1 to 0 over training; ``progress`` in [0, 1]."""
    return 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


def lr_at(schedule: str, base_lr: float, epoch: int, epochs: int, iteration: int = 0, iters_per_epoch: int = 1) -> float:
    """Learning rate for an iteration: ``epoch`` is 0-based, ``iteration`` counts within the epoch."""
    if schedule == "paper":
        return base_lr * paper_factor(epoch, epochs)
    if schedule == "cosine":
        return base_lr * cosine_factor((epoch + iteration / iters_per_epoch) / epochs)
    if schedule == "constant":
        return base_lr
    raise ConfigError(f"--schedule must be one of {', '.join(SCHEDULES)}, got '{schedule}'.")
