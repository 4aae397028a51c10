"""What the user sees while a run goes on: warnings as one line each, progress bars (only when asked for) and
the stderr console. Imports nothing heavy: the command line uses it from its start, before torch is imported."""

from __future__ import annotations

import contextlib
import contextvars
import os
import re
import sys
import time
import warnings
from typing import Any, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .errors import ConfigError, MctoolWarning
from .options import env_seconds


class _KeptStderr:
    """The command's stderr, which only a person reads: when it fails (the reader of ``2>&1 | tee log`` went
    away, a log collector restarted, ``2>&-``), the run goes on and what it would say there is dropped. A
    broken pipe there stopped a 50-epoch run after its third epoch, without a word."""

    def __init__(self, stream: Any):
        self._stream, self._lost = stream, stream is None

    def write(self, text: str) -> int:
        if not self._lost:
            try:
                return self._stream.write(text)
            except (OSError, ValueError):  # a broken pipe, a closed file
                self._lost = True
        return len(text)

    def flush(self) -> None:
        if not self._lost:
            try:
                self._stream.flush()
            except (OSError, ValueError):
                self._lost = True

    def isatty(self) -> bool:
        try:
            return not self._lost and self._stream.isatty()
        except (OSError, ValueError):
            return False

    def __getattr__(self, name: str) -> Any:  # encoding, fileno, ...
        if self._stream is None:
            raise AttributeError(name)
        return getattr(self._stream, name)


def keep_stderr() -> None:
    """Make ``sys.stderr`` a ``_KeptStderr`` (the ``mctool`` command does, for the whole process)."""
    if not isinstance(sys.stderr, _KeptStderr):
        sys.stderr = _KeptStderr(sys.stderr)


def stderr_console() -> Console:
    return Console(file=sys.stderr)


def warn(message: str) -> None:
    """A ``MctoolWarning``: the run goes on, but the user should know.

    The library never prints: Python callers see (or filter) it like any other warning, and the CLI
    shows it as one "Warning: ..." line on stderr (``show_warnings``).
    """
    warnings.warn(message, MctoolWarning, stacklevel=2)


@contextlib.contextmanager
def show_warnings() -> Iterator[None]:
    """While the block runs, every ``MctoolWarning`` is printed as one unwrapped "Warning: ..." line on stderr
    (each time it happens); other warnings are shown as Python shows them. The CLI wraps each command in it."""
    with warnings.catch_warnings():
        warnings.simplefilter("always", MctoolWarning)
        shown = warnings.showwarning

        def show(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
            if issubclass(category, MctoolWarning):
                if not _is_main():  # one rank speaks for all
                    return
                stderr_console().print(f"Warning: {message}", markup=False, highlight=False, soft_wrap=True)
            else:
                shown(message, category, *args, **kwargs)

        warnings.showwarning = show
        yield


# Whether progress bars are drawn: off unless a caller (the CLI, or a Python user through ``progress()``)
# asks for them. A context variable, so that asking in one thread or task does not affect another.
_SHOW_PROGRESS: contextvars.ContextVar[bool] = contextvars.ContextVar("mctool_progress", default=False)


@contextlib.contextmanager
def progress(enabled: bool = True) -> Iterator[None]:
    """Draw progress bars on stderr for the mctool calls made inside the block (the CLI does this for every
    command without ``--quiet``); library calls outside it draw nothing::

        with mctool.progress():
            mctool.train(cfg, "m.safetensors", "m.h5")
    """
    if not isinstance(enabled, bool):
        raise ConfigError(f"progress() takes True or False, got {enabled!r}.")
    token = _SHOW_PROGRESS.set(enabled)
    try:
        yield
    finally:
        _SHOW_PROGRESS.reset(token)


class _NoProgress:
    """Accepts what a Rich ``Progress`` is told and draws nothing."""

    def add_task(self, *args: Any, **kwargs: Any) -> int:
        return 0

    def reset(self, *args: Any, **kwargs: Any) -> None:
        pass

    def advance(self, *args: Any, **kwargs: Any) -> None:
        pass

    def update(self, *args: Any, **kwargs: Any) -> None:
        pass


#: Seconds between progress lines when stderr is a file or pipe (``MCTOOL_LOG_EVERY`` sets it).
LOG_EVERY = 30.0
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def log_every() -> float:
    return env_seconds("MCTOOL_LOG_EVERY", LOG_EVERY, zero=True)


class _LogProgress:
    """Progress for a log (stderr a file or a pipe: a batch job's output, ``2> log``), where a Rich bar is
    drawn only once, at the end. One plain line with every task's count and info, at most every
    ``every`` seconds, when the outermost task completes, and at the end."""

    def __init__(self, every: float):
        self.every, self.tasks, self.changed = every, [], False
        self.t0 = self.last = time.monotonic()

    def add_task(self, description: str, total: float | None = None, completed: float = 0, info: str = "",
                 **_: Any) -> int:
        self.tasks.append({"description": description.strip(), "total": total, "completed": completed,
                           "info": info})
        return len(self.tasks) - 1

    def reset(self, task: int, total: float | None = None, **fields: Any) -> None:
        self.update(task, completed=0, total=total, **fields)

    def advance(self, task: int, advance: float = 1) -> None:
        self.update(task, advance=advance)

    def update(self, task: int, *, completed: float | None = None, advance: float | None = None,
               total: float | None = None, info: str | None = None, description: str | None = None,
               **_: Any) -> None:
        t = self.tasks[task]
        before = t["completed"]
        for key, value in (("total", total), ("completed", completed), ("info", info), ("description", description)):
            if value is not None:
                t[key] = value.strip() if key == "description" else value
        if advance is not None:
            t["completed"] += advance
        if t["completed"] == before:
            return
        self.changed = True
        done = task == 0 and t["total"] is not None and t["completed"] >= t["total"]
        if done or time.monotonic() - self.last >= self.every:
            self.line()

    def line(self) -> None:
        def count(x: float) -> str:
            return f"{x:g}"

        parts = [f"{t['description']} {count(t['completed'])}/{'?' if t['total'] is None else count(t['total'])}"
                 + (f" {t['info']}" if t["info"] else "") for t in self.tasks]
        seconds = int(time.monotonic() - self.t0)
        text = _CONTROL.sub(lambda m: repr(m.group())[1:-1], " | ".join(parts))  # one line; no ESC sequences
        sys.stderr.write(f"[{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}] {text}\n")
        sys.stderr.flush()
        self.last, self.changed = time.monotonic(), False


def _live(console: Console) -> bool:
    """Whether to draw live bars: on a terminal (or in Jupyter). ``FORCE_COLOR`` (set by many CI systems for
    coloured logs) makes Rich take any stderr for a terminal; a log would then fill with redrawn bars, so the
    stream itself must be one too, unless Rich's own ``TTY_INTERACTIVE`` says otherwise. A dumb terminal
    (``TERM=dumb``: Emacs' shell, some IDE consoles) cannot redraw: Rich shows its bars there only once, at the
    end, so it gets the log's lines."""
    if console.is_jupyter:
        return True
    forced = os.environ.get("TTY_INTERACTIVE", "").strip()
    if forced in ("0", "1"):
        return forced == "1" and console.is_terminal  # (1 on a plain log: Rich would draw the bars once, at the end)
    try:
        return console.is_terminal and not console.is_dumb_terminal and sys.stderr.isatty()
    except (AttributeError, ValueError, OSError):  # (a closed or unusual stream)
        return False


@contextlib.contextmanager
def progress_bar(quiet: bool = False) -> Iterator[Progress | _NoProgress | _LogProgress]:
    """A Rich progress display on stderr inside ``progress()`` (and not ``quiet``), else one that draws
    nothing; stdout stays free for --json. Only rank 0 of a distributed run draws. When stderr is not a
    terminal (a log file), plain lines instead (``_LogProgress``)."""
    if quiet or not _SHOW_PROGRESS.get() or not _is_main():
        yield _NoProgress()
        return
    console = stderr_console()
    if not _live(console):
        log = _LogProgress(log_every())
        try:
            yield log
        finally:
            if log.changed:
                log.line()
        return
    p = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                 console=stderr_console(), transient=False)
    with p:
        yield p


def _is_main() -> bool:
    """Rank 0 of a distributed run, or a single process (``distributed`` imports torch: only when asked)."""
    from . import distributed

    return distributed.is_main()
