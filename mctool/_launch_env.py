"""Set before torch is imported.

- For runs under a launcher (torchrun, SLURM): a rank whose peers have ended, or that cannot reach rank 0's
  store, logs c10d's C++ warnings and errors, with stack frames, while it stops; mctool reports that itself in
  one line (docs/distributed.md). ``TORCH_CPP_LOG_LEVEL=WARNING`` shows them again.
- For the ``mctool`` command (the console script, or ``python -m mctool``): Ctrl-C, SIGTERM or SIGHUP while it
  starts up (importing torch takes seconds) prints ``Error: interrupted (Ctrl-C).`` (``Error: stopped (SIGTERM).``)
  on rank 0 and exits 130, as later, instead of a traceback. ``cli`` hands the signals back to Python's
  handling (``restore_signals``) once its own handling is in place. A Python program importing mctool is left alone.
- For the command, too: a current folder that no longer exists is one ``Error:`` line (torch cannot be imported
  there), and matplotlib logs only errors.
"""

import os
import signal
import sys

if "WORLD_SIZE" in os.environ or "SLURM_NTASKS" in os.environ:
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")


def is_command() -> bool:
    """Whether this process is the ``mctool`` command (not a Python program importing mctool)."""
    if os.path.basename(sys.argv[0]) == "mctool":
        return True
    orig = list(getattr(sys, "orig_argv", []))
    return "-mmctool" in orig or any(a == "-m" and b == "mctool" for a, b in zip(orig, orig[1:]))


def launch_rank() -> str:
    """This process's rank as a launcher set it (torchrun's RANK, srun's SLURM_PROCID), "0" without one: the
    rank that prints what every rank would (``distributed.from_env`` reads and checks the launch itself)."""
    env = os.environ
    rank = env.get("RANK", "0") if "WORLD_SIZE" in env else env.get("SLURM_PROCID", "0") if "SLURM_NTASKS" in env \
        else "0"
    return rank.strip() or "0"


def _stop_while_starting(signum: int, frame: object) -> None:
    if launch_rank() == "0":  # one line, from rank 0
        try:
            os.write(2, b"Error: interrupted (Ctrl-C).\n" if signum == signal.SIGINT else
                     f"Error: stopped ({signal.Signals(signum).name}).\n".encode())
        except OSError:  # stderr closed, or its reader gone
            pass
    os._exit(130)


if is_command():
    try:  # a shell left in a folder that was deleted: torch's import would die with "Intel oneMKL FATAL ERROR"
        os.getcwd()
    except FileNotFoundError:
        if launch_rank() == "0":
            sys.stderr.write("Error: the current folder no longer exists (it was deleted or moved away); cd to an "
                             "existing folder and run the command again.\n")
        sys.exit(1)
    # matplotlib's messages about a configuration folder it cannot write (a read-only HOME in a container or CI)
    # are several lines each, not one "Warning:" line; it works on with a temporary folder
    import logging

    logging.getLogger("matplotlib").setLevel(logging.ERROR)

# SIGHUP ignored when the process started (``nohup``) stays ignored. Ctrl-C and SIGTERM stop mctool whatever
# the parent set (a shell script's background job, ``mctool ... & wait``, starts with Ctrl-C ignored).
# (Windows has no SIGHUP: treated as ignored, so that nothing below touches it)
_hangup_ignored = not hasattr(signal, "SIGHUP") or signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
_installed = False
if is_command():
    try:
        for _sig in (signal.SIGINT, signal.SIGTERM, *(() if _hangup_ignored else (signal.SIGHUP,))):
            signal.signal(_sig, _stop_while_starting)
        _installed = True
    except ValueError:  # not the main thread
        pass


def restore_signals() -> None:
    """Ctrl-C raises KeyboardInterrupt again and SIGTERM (SIGHUP) end the process (``distributed.launched``
    turns them into Ctrl-C for a command's work); a no-op unless the start-up handlers are in place."""
    global _installed
    if _installed:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if not _hangup_ignored:
            signal.signal(signal.SIGHUP, signal.SIG_DFL)
        _installed = False
