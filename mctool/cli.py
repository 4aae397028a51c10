"""The ``mctool`` command: a thin Typer layer that parses options, calls the library, prints results.

Human output (progress, tables) goes to stderr; ``--json`` prints exactly one JSON object on stdout.
User mistakes (``MctoolError``) print ``Error: ...`` and exit 1; usage errors exit 2; Ctrl-C exits 130.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import importlib
import inspect
import json
import math
import os
import re
import signal
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, Optional

import typer
import typer.core
from rich.console import Console
from rich.table import Table
from rich.text import Text

# Only light modules here: `mctool --help`, a usage error or --version answers without importing torch (seconds);
# each command imports what it runs.
from ._version import __version__
from . import _launch_env
from .choices import ALIGN_METHODS, AUGMENTS, BEND_INITS, BN_DATA, CURVES, PRECISIONS, SCHEDULES, SPLITS
from .console import keep_stderr, log_every, progress, show_warnings, stderr_console, warn
from .errors import ConfigError, Interrupted, MctoolError
from .options import expand_patterns
from .results import (AlignResult, ConnectResult, CurveResult, EvaluateResult, FGEResult, FileRef, HessianResult,
                      InfoResult, MergeResult, Metrics, PlaneResult, PointResult, Result, SurfaceResult,
                      TrainResult)

# pydantic's words (Typer >= 0.29) and click's (older Typer) for a value of the wrong type, as a user reads them
_PYDANTIC_WORDS = ((r"^Input should be a valid integer.*", "not a whole number."),
                   (r"^Input should be a valid number.*", "not a number."),
                   (r"^'.*' is not a valid integer\.$", "not a whole number."),
                   (r"^'.*' is not a valid float\.$", "not a number."))


class _Group(typer.core.TyperGroup):
    """Typer's command group, with clearer usage errors: option values worded as click words them (Typer checks
    values with pydantic, whose messages start with "Value error, "), and a hint for the files an unquoted glob
    pattern spills after an option that takes one value."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        ctx.meta["mctool_args"] = list(args)
        return super().parse_args(ctx, args)

    def invoke(self, ctx: Any) -> Any:
        from .h5io import COMMAND_LINE

        token = COMMAND_LINE.set(list(ctx.meta.get("mctool_args", ())))  # recorded as the files' "command"
        try:
            return super().invoke(ctx)
        except _ClickException as e:  # usage errors (typer.exceptions.TyperException from Typer 0.27.3 on)
            message = getattr(e, "message", None)
            if isinstance(e, typer.BadParameter):
                e.message = re.sub(r"^Value error, ", "", str(message))
                for pydantic, plain in _PYDANTIC_WORDS:
                    e.message = re.sub(pydantic, plain, e.message)
            elif (isinstance(message, str) and message.startswith("Got unexpected extra argument")
                  and "--trajectory" in ctx.meta.get("mctool_args", ())):
                e.message = (f"{message}. An option takes one value each time it is given; to pass a glob pattern "
                             "(e.g. --trajectory 'run-epoch*.safetensors'), quote it so that mctool expands it.")
            raise
        finally:
            COMMAND_LINE.reset(token)


app = typer.Typer(
    name="mctool", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, cls=_Group,
    context_settings={"help_option_names": ["-h", "--help"]},  # (every command's context inherits it)
    rich_markup_mode=None,  # plain help: flags without a "<bool>" value, usage errors as one "Error:" line
    help="Loss surfaces, mode connectivity and fast ensembling of neural networks (Garipov et al., 2018). "
         "The commands read and write safetensors checkpoints and HDF5 metrics files. A page or section that a "
         "help text cites as docs/NAME.md#section: 'mctool docs NAME.md#section' prints it.",
)


def _choices(name: str, values: tuple[str, ...]) -> Any:
    """An Enum of the library's own tuple of values, so that --help lists them and Typer checks them."""
    return Enum(name, {v: v for v in values}, type=str)


# The choices come from the library (one list each); a member's name is its value: Augment["crop-flip"].
Precision = _choices("Precision", PRECISIONS)
BnData = _choices("BnData", BN_DATA)
Split = _choices("Split", SPLITS)
Schedule = _choices("Schedule", SCHEDULES)
CurveSchedule = _choices("CurveSchedule", tuple(s for s in SCHEDULES if s != "sse"))  # one network per run
AlignMethod = _choices("AlignMethod", ALIGN_METHODS)
Augment = _choices("Augment", AUGMENTS)
CurveKind = _choices("CurveKind", CURVES)
BendInit = _choices("BendInit", BEND_INITS)


def _argument(*args: Any, **kwargs: Any) -> Any:
    """``typer.Argument`` whose file is not checked for readability: Typer refuses a file it cannot read as a
    usage error (exit 2, with the usage line); the command reads it and says so in one ``Error:`` line (exit 1),
    as for a missing file."""
    return typer.Argument(*args, readable=False, **kwargs)


def _option(*args: Any, **kwargs: Any) -> Any:
    """``typer.Option``, its file not checked for readability (see ``_argument``)."""
    return typer.Option(*args, readable=False, **kwargs)


# Options shared by several commands (one definition each).
DeviceOpt = Annotated[str, _option(help="Compute device: auto (CUDA when available), cpu, cuda or cuda:N.")]
PrecisionOpt = Annotated[Precision, _option(help="fp32, or bf16 autocast for forward passes (GPU).")]
ChannelsLastOpt = Annotated[bool, _option("--channels-last", help="Use channels-last memory format (faster "
                                                                  "convolutions on recent GPUs).")]
GraphsOpt = Annotated[bool, _option("--cuda-graphs", help="Capture each training step as a CUDA graph and "
                                    "replay it (much faster for deep, narrow networks on a GPU; same "
                                    "updates). Ignored, with a warning, on a CPU and with PyTorch < 2.3.")]
DeterministicOpt = Annotated[bool, _option("--deterministic", help="Ask cuDNN and cuBLAS for deterministic "
                                           "kernels, so that a GPU run with the same seed repeats exactly "
                                           "(usually slower; an operation without such a kernel warns). CPU "
                                           "runs are reproducible without it.")]
SyncBnOpt = Annotated[bool, _option("--sync-bn", help="Under torchrun: BatchNorm statistics over the whole "
                                    "global batch, all ranks together (SyncBatchNorm; CUDA only), "
                                    "instead of each rank's piece. No effect in one process.")]
JsonOpt = Annotated[bool, _option("--json", help="Print exactly one JSON object (paths and summary metrics) "
                                                 "on stdout.")]
QuietOpt = Annotated[bool, _option("--quiet", "-q", help="No progress bars or summary tables on stderr.")]
ForceOpt = Annotated[bool, _option("--force", help="Overwrite existing output files.")]
ForceRunOpt = Annotated[bool, _option("--force", help="Overwrite existing output files, and start over where an "
                                      "interrupted run left its state or a partial metrics file (instead of "
                                      "--resume).")]
DataRootOpt = Annotated[Optional[Path], _option(
    help="Folder with downloaded data sets (default: $MCTOOL_DATA, else ~/.cache/mctool/datasets).")]
DownloadOpt = Annotated[bool, _option("--download", help="Download the data set into --data-root if missing "
                                                         "(needs internet).")]
SplitOpt = Annotated[Split, _option(help="Evaluate on the official test set, or on 'val': the last 5,000 "
                                         "training images (10% of small sets; a fixed random draw for "
                                         "imagefolder:), held out from training.")]
CurveSplitOpt = Annotated[Optional[Split], _option(help="'val' holds out the last 5,000 training images (10% "
                                                        "of small sets; a fixed random draw for imagefolder:) "
                                                        "from curve training; connect evaluates "
                                                        "nothing. Default: A's recorded split, so that the "
                                                        "curve trains on A's images; else test.")]
FgeSplitOpt = Annotated[Optional[Split], _option(help="Evaluate the snapshots on the official test set, or on "
                                                      "'val': the last 5,000 training images (10% of small "
                                                      "sets; a fixed random draw for imagefolder:), then held "
                                                      "out from training. Default: the start "
                                                      "network's recorded split; else test.")]
_VAL = ("the last 5,000 training images (10% of small sets; a fixed random draw for imagefolder:)")
_VAL_WARNING = ("'val' is held-out data only for networks trained with --split val (else a warning). Default: the "
                "split the inputs were trained with; test if they record none or disagree.")
EvalSplitOpt = Annotated[Optional[Split], _option(
    help=f"Evaluate on the official test set, or on 'val': {_VAL}, then also left out of the train metrics and BN "
         f"passes. {_VAL_WARNING}")]
EvaluateSplitOpt = Annotated[Optional[Split], _option(
    help=f"Evaluate on the official test set, or on 'val': {_VAL}. {_VAL_WARNING}")]
EnsembleSplitOpt = Annotated[Optional[Split], _option(
    help=f"Evaluate on the official test set, or on 'val': {_VAL}, then also left out of the BN passes of curve "
         f"points. {_VAL_WARNING} With --temperature-scale the default is test (the temperature is fitted on "
         "val).")]
WorkersOpt = Annotated[int, _option(help="DataLoader worker processes (imagefolder data sets only; at most the "
                                              "CPU cores available).")]
ShardOpt = Annotated[Optional[str], _option(
    metavar="I/N", help="Evaluate only shard I of N (0 <= I < N): the points whose index in the run's list of points "
                        "is I modulo N, into this shard's own metrics file; the others stay NaN. Combine the N files "
                        "with 'mctool merge' (for job arrays without a shared launcher). Not with --plot.")]



def _compile_help(passes: str, pays: str) -> str:
    return (f"Run the evaluation forward ({passes}) through torch.compile; on CUDA in mode reduce-overhead, which "
            "replays it as CUDA graphs. Compiling takes seconds to a minute per graph (one per width and mode; the "
            f"batch size is symbolic), so it pays off for {pays}. Needs Triton (GPU) or a C++ compiler (CPU); falls "
            "back, with a warning, when compiling fails.")


EvalCompileOpt = Annotated[bool, _option(
    "--compile", help=_compile_help("BN passes and predictions", "many points (planes, long curves)"))]
EvaluateCompileOpt = Annotated[bool, _option(
    "--compile", help=_compile_help("predictions", "many members of one architecture"))]
EnsembleCompileOpt = Annotated[bool, _option(
    "--compile", help=_compile_help("predictions, and the BN passes of curve points",
                                    "many members of one architecture"))]

PointsPerPassOpt = Annotated[int, _option(
    help="Networks evaluated together in one pass over the data, 1 to 64 (P copies side by side in one wide "
         "network; each batch is read once). 1 evaluates one at a time. Lower it if P copies' activations do not "
         "fit in memory. Architectures that cannot be widened are evaluated one at a time, with a warning; on the CPU, "
         "convolutional networks are (faster there). For curve points and plane or surface cells, a linear layer "
         "that reads the input (an MLP's first) is computed once per vector the pass's networks combine (control "
         "points; origin and directions), where that computes less and without --compile.")]


def _shard(text: str | None) -> tuple[int, int] | None:
    from .points import parse_shard

    return None if text is None else parse_shard(text)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mctool {__version__}")
        raise typer.Exit()


@app.callback()
def _main(ctx: typer.Context,
          version: Annotated[bool, _option("--version", callback=_version, is_eager=True,
                                           help="Print the version and exit.")] = False) -> None:
    """Loss surfaces, mode connectivity and fast ensembling of neural networks."""
    # For the whole command: library warnings become "Warning: ..." lines on stderr, and the library draws
    # progress bars there (each command passes --quiet on to hide them).
    ctx.with_resource(show_warnings())
    ctx.with_resource(progress())


def _error(message: str) -> None:
    # One unwrapped line, whatever the terminal width, so scripts can grep it (a newline in a file's name too
    # is shown as an escape).
    stderr_console().print(_safe(f"Error: {message}".replace("\n", "\\n")), highlight=False, soft_wrap=True)


def _ignore_more_ctrl_c() -> None:
    """Once an interruption or an error is being reported, a second Ctrl-C (users press it twice) would only
    break the report and the exit's cleanup with tracebacks, as would a Ctrl-C once the work is done (outputs
    complete) while the result is printed; a SIGTERM or SIGHUP then would end a finished run with 143 or 129
    (or an error's with 130): the ``mctool`` process ignores all three from here on."""
    if _launch_env.is_command():
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)


def _run(work: Callable[[], Result], as_json: bool, quiet: bool, show: Callable[[Any], None]) -> None:
    """Call the library, map user errors to exit codes, print the result (``--json``: its ``to_json()``).

    Under torchrun (or SLURM) the command runs on every rank of the group (docs/distributed.md): rank 0
    prints, another rank prints only its own error, as ``Error: rank N: ...``."""
    import torch

    from . import distributed
    from .h5io import source_date_epoch

    code, main, result = 0, True, None
    try:
        _launch_env.restore_signals()  # from here on, Ctrl-C is this function's to report
        with distributed.launched() as d:
            main = d is None or d.main
            try:
                try:
                    if not quiet:
                        log_every()  # a bad MCTOOL_LOG_EVERY: refused before any work, not at the first bar
                    source_date_epoch()  # likewise a bad SOURCE_DATE_EPOCH, not at the first file written
                    if d is not None:  # every rank runs the same command on the same files, or none starts
                        distributed.check_same_command(*_command_line())
                        distributed.check_same_files(_input_files())
                    result = work()
                    _ignore_more_ctrl_c()  # done: what is left (the report, the exit) is not interrupted
                except OSError as e:  # a name the file system cannot hold, a folder the user may not enter:
                    name = os.fsdecode(e.filename) if e.filename is not None else "a file"  # the user's, not a bug
                    if e.errno == errno.ENAMETOOLONG:
                        raise ConfigError(f"the file name '{name}' is too long for the file system (at most 255 "
                                          "bytes per name, 4,096 per path on most); give a shorter one.") from None
                    if e.errno in (errno.EACCES, errno.EPERM):
                        raise ConfigError(f"cannot use '{name}': {e.strerror or 'permission denied'} (check the "
                                          "permissions of the file and of the folders above it).") from None
                    raise
                except (torch.cuda.OutOfMemoryError, MemoryError) as e:  # the machine's limit, not a bug
                    where = "the GPU" if isinstance(e, torch.cuda.OutOfMemoryError) else "the host"
                    why = (str(e).strip().splitlines() or [""])[0][:200]
                    raise ConfigError(f"{where} ran out of memory{f' ({why})' if why else ''}; use a smaller "
                                      "--batch-size (and --points-per-pass where the command has it), or a "
                                      "machine with more memory. Files written so far are kept (--resume "
                                      "continues an interrupted run).") from None
            except (MctoolError, KeyboardInterrupt) as e:
                interrupted = isinstance(e, (Interrupted, KeyboardInterrupt))
                code = 130 if interrupted else 1
                _ignore_more_ctrl_c()  # (the report and the exit: an error's exit code is 1, not a signal's)
                # Ctrl-C before a command's own handling starts (loading data, building a model)
                stopped_by = distributed.stop_signal() if interrupted else None
                message = (str(e) if isinstance(e, (MctoolError, Interrupted)) else
                           f"stopped ({stopped_by})." if stopped_by else "interrupted (Ctrl-C).")
                if stopped_by == "SIGTERM" and d is not None:  # not a Ctrl-C: often another rank's end
                    message += (" The SIGTERM came from the launcher, which stops every rank when one fails or is "
                                "killed (its output says which), or from the job's time limit.")
                # Ctrl-C reaches every rank: rank 0 says what was saved
                silent = isinstance(e, distributed.PeerFailed) or (interrupted and not main)
                if d is not None:  # the launcher stops the ranks left when one fails: this report goes first
                    signal.signal(signal.SIGTERM, signal.SIG_IGN)
                if main and not silent:
                    _error(message)  # before waiting (up to 10 s) for the other ranks to read it
                    distributed.report_failure(message)
                elif not silent and distributed.report_failure(message):
                    _error(f"rank {d.rank}: {message}")
                elif silent:
                    distributed.stand_aside()
            except Exception as e:  # a bug: the traceback is for us; the other ranks stop at once
                if d is not None:
                    distributed.report_failure(f"internal error ({type(e).__name__})")
                raise
    except MctoolError as e:  # joining the group failed
        code = 1
        _ignore_more_ctrl_c()
        _error(str(e))
    except KeyboardInterrupt:
        code = 130
        _ignore_more_ctrl_c()
        if main:
            _error("interrupted (Ctrl-C).")
    if code:
        raise typer.Exit(code)
    if not main:
        return
    if as_json:
        _print_json(result.to_json())
    elif not quiet:
        show(result)


def _print_json(text: str) -> None:
    """The --json object on stdout. A reader that went away before reading it (``| true``) ends the command
    with 141, as a shell reports a process that SIGPIPE stopped (the work is done, the files written); a
    closed stdout (``>&-``) is an error."""
    if sys.stdout is None:
        _error("stdout is closed, so the --json result cannot be printed (the work is done, its files are "
               "written); leave out --json, or give the command a stdout.")
        raise typer.Exit(1)
    try:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    except OSError as e:
        with contextlib.suppress(OSError):  # (Python's own flush at exit would fail again, with a message)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        if isinstance(e, BrokenPipeError):
            raise typer.Exit(141) from None
        _error(f"cannot print the --json result on stdout ({e.strerror or e}); the work is done and its files "
               "are written.")
        raise typer.Exit(1) from None


_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")  # all but tab (a newline in a name would make two lines)


# The options that name files a command reads (its arguments are all inputs too).
_INPUT_OPTIONS = ("init", "pretrained_file", "compare_unaligned", "directions", "trajectory")


# The click that Typer runs on: click itself, or the copy recent Typer versions carry (typer._click).
_click = importlib.import_module(typer.Context.__mro__[1].__module__.rsplit(".", 1)[0])
_ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def _context() -> Any:
    """The running command's click context (of the click Typer runs on), or None outside a command."""
    return importlib.import_module(f"{_click.__name__}.globals").get_current_context(silent=True)


# Options each rank may give its own value: where its copy of the data is, its loader, what it prints.
_PER_RANK_OPTIONS = ("data_root", "download", "num_workers", "quiet", "as_json")


def _command_line() -> tuple[str, dict[str, str]]:
    """The running command's name and its parameters' values as text, by the name the user writes (``--lr``,
    ``argument CHECKPOINTS``), left out where not given and without a default, or in ``_PER_RANK_OPTIONS``; an
    ``imagefolder:`` data set without its folder (each node's copy may be elsewhere: ``check_same_data`` compares
    what they hold)."""
    ctx = _context()
    if ctx is None:
        return "", {}
    options = {}
    for p in ctx.command.params:
        value = ctx.params.get(p.name)
        if p.name in _PER_RANK_OPTIONS or value is None:
            continue
        name = (f"argument {p.name.upper()}" if p.param_type_name == "argument" else
                max(p.opts, key=lambda o: (o.startswith("--"), len(o))))
        if p.name == "dataset" and str(value).startswith("imagefolder:"):
            value = "imagefolder:"  # (each node's own copy: where it is may differ; the data are compared)
        values = value if isinstance(value, (list, tuple)) else [value]
        options[name] = " ".join("on" if v is True else "off" if v is False else str(getattr(v, "value", v))
                                 for v in values)
    return str(ctx.info_name), options


def _input_files() -> list[str]:
    """The files the running command reads, as given: its arguments and the ``_INPUT_OPTIONS`` (patterns of
    --trajectory expanded); names that are not files (``--directions random``) are left to the command."""
    ctx = _context()
    if ctx is None:
        return []
    names = [p.name for p in ctx.command.params if p.param_type_name == "argument" or p.name in _INPUT_OPTIONS]
    files = []
    for name in names:
        value = ctx.params.get(name)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None:
                files += expand_patterns([v], "--trajectory") if name == "trajectory" else [str(v)]
    return files


def _safe(value: Any) -> Text:
    """Text to print as it is: no Rich markup (``[/]`` in a path), control characters (an ESC sequence in
    metadata) shown as escapes instead of reaching the terminal."""
    text = value if isinstance(value, str) else str(value)
    return Text(_CONTROL.sub(lambda m: repr(m.group())[1:-1], text))


def _new_table(title: Any, columns: tuple[str, ...], right: tuple[str, ...] = (), show_header: bool = True) -> Table:
    """A table whose text cells wrap instead of ending in "...": in a log (80 columns) or a narrow terminal, two
    long file names that differ at the end stay two names. Number cells (``right``) never wrap: a number split
    over two lines reads as another number."""
    t = Table(title=title, show_header=show_header, title_justify="left")
    for col in columns:
        number = col in right
        t.add_column(col, justify="right" if number else "left", overflow="ellipsis" if number else "fold",
                     no_wrap=number, min_width=7 if number else 10)  # (a number such as 100.00%: 7 characters)
    return t


def _print_table(t: Table, console: Any = None) -> None:
    """Print a table whole: in a terminal narrower than its columns' least widths the lines wrap (the terminal
    does), instead of being cut at its edge."""
    console = console or stderr_console()
    least = sum((column.min_width or 1) + 3 for column in t.columns) + 1  # (each cell: padding and a border)
    if least > console.width:
        console = Console(file=console.file, width=least, force_terminal=console.is_terminal,
                          no_color=console.no_color)
    console.print(t, crop=False)


def _ignored(options: dict[str, str], why: str) -> None:
    """Warn that the options given on the command line (flag -> parameter name) have no effect in this use."""
    ctx, default = _context(), importlib.import_module(f"{_click.__name__}.core").ParameterSource.DEFAULT
    given = [flag for flag, name in options.items()
             if ctx is not None and ctx.get_parameter_source(name) not in (None, default)]
    if given:
        warn(f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply {why}; ignored.")


def _table(title: str, rows: list[tuple[str, Any]]) -> None:
    t = _new_table(_safe(title), ("key", "value"), show_header=False)
    for k, v in rows:
        t.add_row(_safe(k), _safe(v))
    _print_table(t)


def _path(ref: FileRef | None) -> str:
    return "-" if ref is None else ref.path


def _num(x: float | None, fmt: str = ".4f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}%"


def _pts(x: float | None) -> str:
    """A difference of two error rates, in percentage points (21.25 pts, not a relative 21.25%)."""
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f} pts"


def _metric_rows(r: Any) -> Iterator[tuple[str, str, Any]]:
    """(label, metric, value) for each train and evaluation metric a curve, plane or surface result holds,
    labelled with the split shown ("train loss", "test err", ...)."""
    for group, shown in (("train", "train"), ("eval", r.split)):
        for key in ("loss", "nll", "err"):
            v = getattr(r.metrics[group], key)
            if v is not None:
                yield f"{shown} {key}", key, v


def _grid_value(key: str) -> Callable[[float | None], str]:
    """How a plane or surface table shows a metric's values: errors in percent, as the other tables."""
    return _pct if key == "err" else (lambda x: _num(x, ".4g"))


def _parse_kwargs(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--arch-kwargs must be a JSON object such as '{{\"width\": 2}}' ({e.msg}).") from None
    if not isinstance(value, dict):
        raise ConfigError("--arch-kwargs must be a JSON object such as '{\"width\": 2}'.")
    return value



@app.command()
def train(
    output: Annotated[Path, _option("--output", "-o", help="Model checkpoint to write (.safetensors); with "
                                    "--schedule sse, an ensemble file of the snapshots.")],
    metrics: Annotated[Optional[Path], _option("--metrics", "-m", help="HDF5 file for per-epoch metrics "
                                               "(default: the output's name with .h5).")] = None,
    dataset: Annotated[str, _option("--dataset", "-d", help="digits, fashion-mnist, mnist, cifar10, cifar100, "
                                    "svhn, synthetic[:size=32,channels=3,classes=10,train=1024,test=256,seed=0] "
                                    "or imagefolder:PATH.")] = "digits",
    arch: Annotated[Optional[str], _option("--arch", "-a", help="Any timm model name or an mctool one "
                                           "(cifar_convfc, cifar_vgg16[_bn], cifar_preresnet20/110/164, "
                                           "cifar_wrn28_10, mlp). Default depends on the data set.")] = None,
    arch_kwargs: Annotated[Optional[str], _option(help="Extra architecture arguments as a JSON object, "
                                                  "e.g. '{\"width\": 2}'.")] = None,
    epochs: Annotated[int, _option(help="Number of training epochs (1 to 100,000).")] = 200,
    lr: Annotated[float, _option(help="Initial (peak) learning rate (> 0, at most 1e6).")] = 0.05,
    wd: Annotated[float, _option(help="Weight decay (L2 coefficient) for SGD, 0 to 1e6.")] = 5e-4,
    momentum: Annotated[float, _option(help="SGD momentum, in [0, 1).")] = 0.9,
    batch_size: Annotated[int, _option(help="Mini-batch size (>= 1; a batch, the last one included, of 1 image "
                                      "is refused where a BatchNorm layer would see one value per "
                                      "channel).")] = 128,
    schedule: Annotated[Schedule, _option(help="paper: constant for 50% of epochs, linear decay to 1% at 90%, "
                                          "then 1%; cosine: cosine annealing to 0; constant; sse: Snapshot "
                                          "Ensembles (cosine restarts, one snapshot per cycle; the output is "
                                          "then an ensemble file).")] = Schedule.paper,
    snapshots: Annotated[int, _option(help="With --schedule sse: number of cycles and snapshots (1 to "
                                           "the run's iterations).")] = 5,
    seed: Annotated[int, _option(help="Seed for initialisation, data order, augmentation and dropout; a "
                                      "whole number in [0, 2^32).")] = 0,
    augment: Annotated[Augment, _option(help="Training augmentation: auto (per data set: crop+flip for cifar10, "
                                        "cifar100, synthetic and imagefolder; crop only, no mirror images, for "
                                        "digits, mnist, fashion-mnist and svhn), none, crop, crop-flip.")]
    = Augment.auto,
    split: SplitOpt = Split.test,
    save_every: Annotated[int, _option(help="Also write a training-state checkpoint (weights and SGD momentum, "
                                       "e.g. an FGE start point) every N epochs as NAME-epochNNN.safetensors "
                                       "(N >= 0; 0 = never).")] = 0,
    init: Annotated[Optional[Path], _option(help="Start from this checkpoint's weights (and momentum, for a "
                                            "training state) instead of a random initialisation: an mctool "
                                            "checkpoint, or a plain safetensors state dict with --arch.")]
    = None,
    pretrained: Annotated[bool, _option("--pretrained", help="Start from timm's pretrained weights for --arch "
                                        "(a timm model; timm downloads them once and caches them), e.g. to "
                                        "connect two fine-tunings of one pretrained network. A classifier for "
                                        "another number of classes is re-initialised. With imagefolder data, "
                                        "images get the model's size, resizing and mean/std (timm's "
                                        "transforms). Not with --init.")] = False,
    pretrained_file: Annotated[Optional[Path], _option(help="Offline --pretrained: a local safetensors file "
                                                       "with the timm model's state dict (e.g. saved with "
                                                       "safetensors.torch.save_file(model.state_dict(), "
                                                       "PATH)); never a pickle. Its sha256 is recorded. "
                                                       "Implies --pretrained.")] = None,
    resume: Annotated[bool, _option("--resume", help="Continue an interrupted run from its last completed epoch "
                                    "(same options as the interrupted command).")] = False,
    data_root: DataRootOpt = None,
    download: DownloadOpt = False,
    num_workers: WorkersOpt = 4,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = Precision.fp32,
    channels_last: ChannelsLastOpt = False,
    cuda_graphs: GraphsOpt = False,
    sync_bn: SyncBnOpt = False,
    deterministic: DeterministicOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    force: ForceRunOpt = False,
) -> None:
    """Train a network with SGD; writes a model checkpoint and per-epoch metrics.

    Interrupt with Ctrl-C at any time: completed epochs are kept and --resume continues the run.
    """
    from .training import TrainConfig, train as run_train

    def work() -> Result:
        cfg = TrainConfig(dataset=dataset, arch=arch, arch_kwargs=_parse_kwargs(arch_kwargs), epochs=epochs, lr=lr,
                          wd=wd, momentum=momentum, batch_size=batch_size, schedule=schedule.value, seed=seed,
                          augment=augment.value, split=split.value, precision=precision.value,
                          channels_last=channels_last, cuda_graphs=cuda_graphs, deterministic=deterministic,
                          sync_bn=sync_bn,
                          init=str(init) if init else None, save_every=save_every, snapshots=snapshots,
                          pretrained=pretrained, pretrained_file=str(pretrained_file) if pretrained_file else None)
        return run_train(cfg, output, metrics, device=device, data_root=data_root,
                         download=download, num_workers=num_workers, resume=resume, force=force, quiet=quiet)

    def show(r: TrainResult) -> None:
        tr, ev = r.metrics["train"], r.metrics["eval"]
        what = f"ensemble of {r.members}" if r.members is not None else "network"
        _table("trained", [("model", _path(r.outputs["model"])), ("metrics", _path(r.outputs["metrics"])),
                           ("arch", r.arch), ("data set", r.dataset), ("epochs", str(r.epochs)),
                           ("train loss / err", f"{_num(tr.loss)} / {_pct(tr.err)}"),
                           (f"{r.split} nll / err ({what})", f"{_num(ev.nll)} / {_pct(ev.err)}"),
                           ("time", f"{r.seconds:.1f} s")])

    _run(work, as_json, quiet, show)


def _show_evaluation(r: EvaluateResult) -> None:
    t = _new_table(_safe(f"{r.dataset} ({r.split} split)"), ("model", "loss", "nll", "err", "ece", "brier"),
                   right=("loss", "nll", "err", "ece", "brier"))

    def row(label: str, m: Metrics) -> None:
        t.add_row(_safe(label), _num(m.loss), _num(m.nll), _pct(m.err), _num(m.ece), _num(m.brier))

    for m in r.models:
        row(m.label, m.metrics)
    if r.members > 1:
        row(f"ensemble of {r.members}", r.metrics["eval"])
    if r.calibration is not None:
        row(f"  temperature-scaled (T = {r.calibration.temperature:.3f})", r.metrics["calibrated"])
    console = stderr_console()
    _print_table(t, console)
    for role, ref in (r.outputs or {}).items():
        if ref is not None:
            console.print(_safe(f"{'ensemble file' if role == 'ensemble' else role}: {_path(ref)}"), soft_wrap=True)


@app.command()
def evaluate(
    models: Annotated[list[Path], _argument(
        metavar="MODEL", help="Model checkpoints or ensemble files (.safetensors); several "
                              "networks are also evaluated as an ensemble (mean of softmax "
                              "outputs).")],
    metrics: Annotated[Optional[Path], _option("--metrics", "-m", help="Write the metrics to this HDF5 "
                                               "file.")] = None,
    dataset: Annotated[Optional[str], _option("--dataset", "-d", help="Data set to evaluate on (default: the "
                                              "one recorded in the first checkpoint).")] = None,
    split: EvaluateSplitOpt = None,
    batch_size: Annotated[int, _option(help="Evaluation batch size.")] = 512,
    arch: Annotated[Optional[str], _option("--arch", "-a", help="Architecture of a plain safetensors state "
                                           "dict without mctool metadata (e.g. saved by timm; needs "
                                           "--num-classes too); for mctool checkpoints it overrides the "
                                           "recorded one.")] = None,
    num_classes: Annotated[Optional[int], _option(help="Class count of a plain state dict (overrides the "
                                                  "recorded one of mctool checkpoints).")] = None,
    arch_kwargs: Annotated[Optional[str], _option(help="Architecture arguments of a plain state dict as a JSON "
                                                  "object, e.g. '{\"img_size\": 8}' (overrides the recorded "
                                                  "ones).")] = None,
    in_chans: Annotated[Optional[int], _option(help="Input channels of a plain state dict (default 3; "
                                               "overrides the recorded ones).")] = None,
    data_root: DataRootOpt = None,
    download: DownloadOpt = False,
    num_workers: WorkersOpt = 4,
    points_per_pass: PointsPerPassOpt = 8,
    compile: EvaluateCompileOpt = False,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = Precision.fp32,
    channels_last: ChannelsLastOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    force: ForceOpt = False,
) -> None:
    """Loss, NLL, error, ECE (15 bins) and Brier score of each network and of their ensemble.

    The loss is the training objective: the NLL plus the weight decay's L2 term 0.5 wd ||w||^2 (the wd each
    network recorded); the ensemble has no loss, only its NLL.
    """
    from .ensemble_eval import evaluate_models

    def work() -> Result:
        return evaluate_models([str(p) for p in models], dataset=dataset, split=split.value if split else None,
                               device=device, data_root=data_root, download=download, batch_size=batch_size,
                               precision=precision.value, channels_last=channels_last,
                               metrics=str(metrics) if metrics else None, force=force, arch=arch,
                               num_classes=num_classes, in_chans=in_chans, arch_kwargs=_parse_kwargs(arch_kwargs),
                               num_workers=num_workers, points_per_pass=points_per_pass, compile=compile,
                               quiet=quiet)

    _run(work, as_json, quiet, _show_evaluation)


@app.command()
def info(
    file: Annotated[Path, _argument(metavar="FILE", help="A safetensors checkpoint or an HDF5 metrics file.")],
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Metadata and a tensor summary of a checkpoint, or the layout and attributes of an HDF5 file."""
    from .info import file_info

    def show(r: InfoResult) -> None:
        console = stderr_console()
        f = r.inputs[0]
        head = _safe(f.path)
        head.stylize("bold")
        console.print(head + _safe(f" ({r.type}, {r.bytes:,} bytes, sha256 {f.sha256[:16]}...)"))
        _table("metadata" if r.type == "safetensors" else "attributes",
               [(k, v if isinstance(v, str) else json.dumps(v)) for k, v in r.metadata.items()])
        if r.tensors is not None:
            ts = r.tensors
            kinds = ", ".join(f"{n} {d}" for d, n in ts["dtypes"].items()) if isinstance(ts["dtypes"], dict) \
                else str(ts["dtypes"])
            t = _new_table(_safe(f"{ts['count']} tensors ({kinds}), {ts['elements']:,} elements"),
                           ("name", "shape", "dtype"))
            for e in ts["first"]:
                t.add_row(_safe(e["name"]), str(tuple(e["shape"])), _safe(e["dtype"]))
            if ts["count"] > len(ts["first"]):
                t.add_row(f"... {ts['count'] - len(ts['first'])} more", "", "")
        else:
            numbers = ("NaN", "inf", "min", "max", "last")
            t = _new_table("datasets", ("name", "shape", *numbers), right=numbers)
            fmt = lambda v: "-" if v is None else f"{v:.4g}"  # noqa: E731
            for name, e in (r.datasets or {}).items():
                t.add_row(_safe(name), str(tuple(e["shape"])), *("-" if e[k] is None else str(e[k]) for k in
                                                                 ("nan", "inf")),
                          fmt(e["min"]), fmt(e["max"]), fmt(e["last"]))
        _print_table(t, console)

    _run(lambda: file_info(file), as_json, quiet, show)


_BN_DATA_HELP = ("Training images of each BatchNorm recalibration pass: augmented as the network was trained (the "
                 "statistics its layers were trained with, which its stored ones also average) or plain (as they "
                 "are).")
BnDataOpt = Annotated[BnData, _option(help=_BN_DATA_HELP)]
BnBatchesOpt = Annotated[Optional[int], _option(
    help="Batches for each BatchNorm recalibration pass (default: the whole training set; fewer is faster but "
         "gives noisier statistics).")]
EvalBatchOpt = Annotated[int, _option(help="Batch size for BN passes and evaluation.")]
RecordedDatasetOpt = Annotated[Optional[str], _option("--dataset", "-d", help="Data set (default: the recorded "
                                                      "one).")]
GridTrainSubsetOpt = Annotated[Optional[int], _option(
    help="Compute train loss and error on a fixed random subset of this many training images (faster; the BN "
         "pass still uses --bn-batches). Default, or 0: all of them.")]


@app.command()
def connect(
    start: Annotated[Path, _argument(metavar="START", help="Start network A (model checkpoint).")],
    end: Annotated[Path, _argument(metavar="END", help="End network B (same architecture as A).")],
    output: Annotated[Path, _option("--output", "-o", help="Curve file to write (.safetensors).")],
    metrics: Annotated[Optional[Path], _option("--metrics", "-m", help="HDF5 file for per-epoch training "
                                               "metrics (default: NAME-connect.h5 beside the output).")] = None,
    curve: Annotated[CurveKind, _option(help="bezier (Bernstein polynomial), polychain (piecewise linear "
                                        "through the bends) or line (the segment; nothing to train).")]
    = CurveKind.bezier,
    num_bends: Annotated[int, _option(help="Interior control points, 1 to 100 (the paper's curves have 1); "
                                      "ignored with --curve line.")] = 1,
    epochs: Annotated[Optional[int], _option(help="Training epochs (default: as many as A was trained "
                                             "for, else 200; three times as many if A has no "
                                             "BatchNorm, as in the paper).")] = None,
    lr: Annotated[Optional[float], _option(help="Initial learning rate (default: A's training lr x "
                                           "min(1, max(0.3, 10000 / the curve's iterations)): the paper's 0.3 x "
                                           "for long runs, up to A's lr for short ones; see docs/curves.md).")]
    = None,
    wd: Annotated[Optional[float], _option(help="L2 coefficient (0 to 1e6): the loss is CE + 0.5 * wd * "
                                           "||w(t)||^2 (default: the wd A was trained with, else 5e-4).")] = None,
    momentum: Annotated[float, _option(help="SGD momentum, in [0, 1).")] = 0.9,
    batch_size: Annotated[int, _option(help="Mini-batch size (>= 1); each batch draws one t ~ U(0, 1).")] = 128,
    schedule: Annotated[CurveSchedule, _option(help="Learning-rate schedule (as for train; sse, which makes "
                                               "an ensemble, does not apply).")] = CurveSchedule.paper,
    seed: Annotated[int, _option(help="Seed for t, data order and augmentation; a whole number in "
                                      "[0, 2^32).")] = 0,
    bend_init: Annotated[BendInit, _option(help="Initial bends: on the segment (linear), at A (start) or at "
                                           "B (end).")] = BendInit.linear,
    free_start: Annotated[bool, _option("--free-start", help="Train the start point too.")] = False,
    free_end: Annotated[bool, _option("--free-end", help="Train the end point too.")] = False,
    dataset: Annotated[Optional[str], _option("--dataset", "-d", help="Training data (default: A's data "
                                              "set).")] = None,
    augment: Annotated[Optional[Augment], _option(help="Training augmentation (as for train; default: the "
                                                  "one A was trained with, else auto).")] = None,
    split: CurveSplitOpt = None,
    save_every: Annotated[int, _option(help="Also write a curve state every N epochs as "
                                       "NAME-epochNNN.safetensors (N >= 0; 0 = never).")] = 0,
    align: Annotated[Optional[AlignMethod], _option("--align", help="First permute B's hidden units into A's "
                                                    "order (weights or activations matching, as mctool align "
                                                    "with --seed): the curve ends at aligned B, which computes "
                                                    "B's function.")]
    = None,
    resume: Annotated[bool, _option("--resume", help="Continue an interrupted run (same options).")] = False,
    data_root: DataRootOpt = None,
    download: DownloadOpt = False,
    num_workers: WorkersOpt = 4,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = Precision.fp32,
    channels_last: ChannelsLastOpt = False,
    cuda_graphs: GraphsOpt = False,
    sync_bn: SyncBnOpt = False,
    deterministic: DeterministicOpt = False,
    compile: Annotated[bool, _option("--compile", help="Fuse the step's passes over the parameters (forming "
                                     "w(t), the control points' gradient) with torch.compile: less memory "
                                     "traffic for wide networks on a GPU. Needs Triton (GPU) or a C++ "
                                     "compiler (CPU); falls back, with a warning, when compiling fails.")]
    = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    force: ForceRunOpt = False,
) -> None:
    """Learn a low-loss curve between two trained networks (any architecture).

    Only the bends are trained (endpoints stay fixed unless freed). BatchNorm layers use batch statistics
    while training; their running statistics are recomputed wherever a point of the curve is used (evaluate-curve,
    point, plane, hessian, ensemble --num-points).
    """
    from .curve_training import ConnectConfig, connect as run_connect

    def work() -> Result:
        cfg = ConnectConfig(curve=curve.value, num_bends=None if curve == CurveKind.line else num_bends,
                            epochs=epochs, lr=lr, wd=wd, momentum=momentum, batch_size=batch_size,
                            schedule=schedule.value, seed=seed, bend_init=bend_init.value, free_start=free_start,
                            free_end=free_end, dataset=dataset, augment=augment.value if augment else None,
                            split=split.value if split else None,
                            precision=precision.value,
                            channels_last=channels_last, cuda_graphs=cuda_graphs, deterministic=deterministic,
                            sync_bn=sync_bn,
                            compile=compile, save_every=save_every, align=align.value if align else None)
        return run_connect(cfg, start, end, output, metrics, device=device,
                           data_root=data_root, download=download, num_workers=num_workers, resume=resume,
                           force=force, quiet=quiet)

    def show(r: ConnectResult) -> None:
        rows = [("curve", _path(r.outputs["curve"])), ("type", f"{r.curve} ({r.num_bends} bend(s))")]
        if r.trained:
            tr = r.metrics["train"]
            rows += [("metrics", _path(r.outputs["metrics"])), ("epochs", str(r.epochs)),
                     ("train loss / err (last epoch)", f"{_num(tr.loss)} / {_pct(tr.err)}"),
                     ("time", f"{r.seconds:.1f} s")]
        _table("connected", rows)

    _run(work, as_json, quiet, show)


@app.command("evaluate-curve")
def evaluate_curve(
    files: Annotated[list[Path], _argument(
        metavar="FILES", help="A curve file, or two model checkpoints (their straight "
                              "segment).")],
    metrics: Annotated[Path, _option("--metrics", "-m", help="HDF5 file for the metrics at each t.")],
    num_points: Annotated[int, _option(help="Evaluate at this many evenly spaced t in [0, 1], 2 to "
                                       "100,000.")] = 61,
    plot: Annotated[Optional[Path], _option(help="Also draw train loss and error against t to this "
                                            "figure (.png, .pdf or .svg).")] = None,
    resume: Annotated[bool, _option("--resume", help="Compute only the points still missing (NaN) in an "
                                    "existing metrics file.")] = False,
    bn_batches: BnBatchesOpt = None,
    bn_data: BnDataOpt = BnData.augmented,
    wd: Annotated[Optional[float], _option(help="L2 coefficient of the train loss, 0 to 1e6 (default: the "
                                           "curve's, or A's for two checkpoints).")] = None,
    batch_size: EvalBatchOpt = 512,
    dataset: RecordedDatasetOpt = None,
    split: EvalSplitOpt = None,
    data_root: DataRootOpt = None,
    download: DownloadOpt = False,
    num_workers: WorkersOpt = 4,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = Precision.fp32,
    channels_last: ChannelsLastOpt = False,
    shard: ShardOpt = None,
    points_per_pass: PointsPerPassOpt = 8,
    compile: EvalCompileOpt = False,
    compare_unaligned: Annotated[Optional[Path], _option("--compare-unaligned", help="With A and B-aligned "
                                                         "(from mctool align): the original B; also evaluate "
                                                         "the segment A -> B (same points and options) and "
                                                         "report both barriers. Two checkpoints only, not "
                                                         "with --shard.")] = None,
    repair: Annotated[bool, _option("--repair", help="REPAIR at every point between the ends (networks "
                                    "without BatchNorm): rescale each hidden Conv/Linear channel to the "
                                    "interpolated mean and std of the endpoints'. Refused for BatchNorm "
                                    "networks; one point per pass, not compiled.")] = False,
    repair_batches: Annotated[int, _option(help="Training batches (of --batch-size) for REPAIR's "
                                           "statistics.")] = 8,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    force: ForceRunOpt = False,
) -> None:
    """Train loss, train NLL/error and test NLL/error along a curve, BatchNorm recomputed at every point.

    Reports, per metric, the value at both ends, min, max, mean and the arc-length weighted mean, plus
    the curve length, its ratio to ||B - A||, the barriers (max minus the mean of the two ends) and the bumps
    (the largest rise above the straight line between the two ends' values).
    """
    from .curve_eval import evaluate_curve as run

    def work() -> Result:
        return run([str(f) for f in files], metrics, num_points=num_points, plot=plot, resume=resume, force=force,
                   device=device, dataset=dataset, data_root=data_root, download=download,
                   split=split.value if split else None, batch_size=batch_size, bn_batches=bn_batches, wd=wd,
                   bn_data=bn_data.value,
                   precision=precision.value, channels_last=channels_last, num_workers=num_workers, shard=_shard(shard),
                   points_per_pass=points_per_pass, compile=compile, compare_unaligned=compare_unaligned,
                   repair=repair,
                   repair_batches=repair_batches, quiet=quiet)

    def show(r: CurveResult) -> None:
        cols = ("start", "end", "min", "max", "mean", "int")
        t = _new_table(f"{r.curve} curve, {r.num_points} points", ("metric", *cols), right=cols)
        for label, key, v in _metric_rows(r):
            fmt = _pct if key == "err" else _num
            t.add_row(label, *(fmt(getattr(v, k)) for k in cols))
        _print_table(t)
        _table("shape", [("length", _num(r.length, ".4g")), ("length / ||B - A||", _num(r.length_ratio)),
                         ("barrier: train loss", _num(r.barrier["train"].loss)),
                         (f"barrier: {r.split} error", _pts(r.barrier["eval"].err)),
                         ("bump: train loss", _num(r.bump["train"].loss)),
                         (f"bump: {r.split} error", _pts(r.bump["eval"].err)),
                         *([("unaligned barrier: train loss", _num(r.barrier_unaligned["train"].loss)),
                            (f"unaligned barrier: {r.split} error", _pts(r.barrier_unaligned["eval"].err)),
                            ("unaligned bump: train loss", _num(r.bump_unaligned["train"].loss)),
                            (f"unaligned bump: {r.split} error", _pts(r.bump_unaligned["eval"].err))]
                           if r.barrier_unaligned is not None else []),
                         ("metrics", _path(r.outputs["metrics"])), ("plot", _path(r.outputs["plot"]))])

    _run(work, as_json, quiet, show)


@app.command()
def point(
    source: Annotated[Path, _argument(
        metavar="SOURCE", help="A curve file from connect, or an ensemble file (fge, train "
                          "--schedule sse, ensemble -o).")],
    output: Annotated[Path, _option("--output", "-o", help="Model checkpoint to write.")],
    t: Annotated[Optional[float], _option("--t", help="Position along a curve, in [0, 1].")] = None,
    index: Annotated[Optional[int], _option("--index", help="Member of an ensemble file (0-based).")] = None,
    no_bn_update: Annotated[bool, _option("--no-bn-update", help="Keep the start network's BatchNorm "
                                          "statistics instead of recomputing them at t.")] = False,
    bn_batches: BnBatchesOpt = None,
    bn_data: BnDataOpt = BnData.augmented,
    batch_size: EvalBatchOpt = 512,
    dataset: RecordedDatasetOpt = None,
    data_root: DataRootOpt = None,
    download: DownloadOpt = False,
    num_workers: WorkersOpt = 4,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = Precision.fp32,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    force: ForceOpt = False,
) -> None:
    """Export one network as an ordinary model checkpoint: a curve's point at --t, or an ensemble's member --index.

    The result is usable by evaluate, train --init, fge and timm. A point on a curve gets its BatchNorm
    statistics recomputed unless --no-bn-update.
    """
    from .curve_eval import check_point_options, export_point
    from .ensembles import export_member

    def work() -> Result:
        if (t is None) == (index is None):
            raise ConfigError("give exactly one of --t (a curve) or --index (an ensemble member).")
        data_options = {"--bn-batches": "bn_batches", "--bn-data": "bn_data", "--batch-size": "batch_size",
                         "--dataset": "dataset", "--data-root": "data_root", "--download": "download",
                         "--num-workers": "num_workers", "--precision": "precision"}
        if index is not None:  # (the data options do not apply; still checked, as by every command)
            check_point_options(batch_size=batch_size, bn_batches=bn_batches, bn_data=bn_data.value,
                                num_workers=num_workers, device=device, dataset=dataset)
            _ignored({"--no-bn-update": "no_bn_update", **data_options, "--device": "device"},
                     "to --index: a member is written as stored, with its own BatchNorm statistics")
            return export_member(source, index, output, force=force)
        if no_bn_update:
            _ignored(data_options, "with --no-bn-update: no BatchNorm pass is run")
        r = export_point(source, t, output, bn_update=not no_bn_update, bn_batches=bn_batches,
                         bn_data=bn_data.value, force=force,
                         device=device, dataset=dataset, data_root=data_root, download=download,
                         batch_size=batch_size,
                         precision=precision.value, num_workers=num_workers, quiet=quiet)
        if not no_bn_update and not r.bn_recalibrated:
            _ignored(data_options, "to a network without BatchNorm statistics: no BatchNorm pass is run")
        return r

    def show(r: PointResult) -> None:
        where = [("t", str(r.t)), ("BN recomputed", str(r.bn_recalibrated))] if r.t is not None else [
            ("member", str(r.index))]
        _table("point", [("model", _path(r.outputs["model"])), *where])

    _run(work, as_json, quiet, show)


@app.command()
def ensemble(
    files: Annotated[list[Path], _argument(
        metavar="FILES", help="Model checkpoints and ensemble files to combine, or one curve "
                              "file with --num-points.")],
    output: Annotated[Optional[Path], _option("--output", "-o", help="Also write all members as one "
                                              "ensemble file.")] = None,
    metrics: Annotated[Optional[Path], _option("--metrics", "-m", help="Write the metrics to this HDF5 "
                                               "file.")] = None,
    num_points: Annotated[Optional[int], _option(help="Sample this many evenly spaced points along a curve "
                                                 "file, ends included (each BN-recalibrated), as the members; "
                                                 "1 takes t = 0.5; at most 100,000.")] = None,
    temperature_scale: Annotated[bool, _option("--temperature-scale", help="Fit one temperature on the "
                                               "held-out part of the training data (the val split) and "
                                               "report calibrated metrics too.")] = False,
    bn_batches: BnBatchesOpt = None,
    bn_data: BnDataOpt = BnData.augmented,
    dataset: RecordedDatasetOpt = None,
    split: EnsembleSplitOpt = None,
    batch_size: EvalBatchOpt = 512,
    data_root: DataRootOpt = None,
    download: DownloadOpt = False,
    num_workers: WorkersOpt = 4,
    points_per_pass: PointsPerPassOpt = 8,
    compile: EnsembleCompileOpt = False,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = Precision.fp32,
    channels_last: ChannelsLastOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    force: ForceOpt = False,
) -> None:
    """Combine networks into one ensemble and evaluate it (error, NLL, ECE, Brier score).

    Metrics are given for each member and for the ensemble (mean of softmax outputs) as members are added.
    """
    from .ensemble_eval import evaluate_models

    def work() -> Result:
        return evaluate_models([str(p) for p in files], dataset=dataset, split=split.value if split else None,
                               device=device, data_root=data_root, download=download, batch_size=batch_size,
                               precision=precision.value, channels_last=channels_last,
                               metrics=str(metrics) if metrics else None, output=str(output) if output else None,
                               num_points=num_points, temperature_scale=temperature_scale, bn_batches=bn_batches,
                               bn_data=bn_data.value,
                               force=force, num_workers=num_workers, points_per_pass=points_per_pass,
                               compile=compile, quiet=quiet, command="ensemble")

    _run(work, as_json, quiet, _show_evaluation)


@app.command()
def plot(
    files: Annotated[list[Path], _argument(
        metavar="FILES", help="evaluate-curve metrics files (several overlaid), or the per-epoch "
                              "metrics files of train, connect and fge (several overlaid); or "
                              "one plane, surface or hessian file.")],
    output: Annotated[Optional[Path], _option("--output", "-o", help="Figure to write: PNG, PDF or SVG, "
                                                                     "by the name's ending.")] = None,
    three_d: Annotated[bool, _option("--3d", help="Draw a plane or 2-D surface file as 3-D surfaces instead of "
                                     "filled contours (points, curve and trajectory drawn on them).")] = False,
    html: Annotated[Optional[Path], _option(help="Plane or 2-D surface file: also write an interactive, "
                                            "rotatable 3-D figure to this HTML file (needs the optional extra: "
                                            "pip install 'mctool[html]').")] = None,
    vtk: Annotated[Optional[Path], _option(help="Plane or surface file: also write the grid as a VTK structured "
                                           "grid (.vts) for ParaView, and its points and curve or trajectory "
                                           "beside it as NAME-points.vtp.")] = None,
    dpi: Annotated[int, _option(help="Dots per inch of a PNG figure (10 to 1200; 300 for print). PDF "
                                     "and SVG are vector figures.")] = 120,
    log_loss: Annotated[bool, _option("--log-loss", help="Curve, 1-D surface and per-epoch figures: the loss "
                                      "on a log axis (ends near 1e-3 beside a barrier of 2 show only the "
                                      "barrier on a linear one).")] = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    force: ForceOpt = False,
) -> None:
    """Redraw figures from metrics files without recomputing anything."""
    from .plots import plot_files

    def work() -> Result:
        return plot_files(files, output, three_d=three_d, html=html, vtk=vtk, force=force, dpi=dpi,
                          log_loss=log_loss)

    _run(work, as_json, quiet, lambda r: _table("plot", [("written", ", ".join(_path(f) for f in r.outputs.values()
                                                                                if f is not None))]))


@app.command("merge")
def merge_cmd(
    files: Annotated[list[Path], _argument(
        metavar="SHARDS", help="The N shard files of one plane, surface or evaluate-curve run "
                               "(written with --shard I/N), in any order.")],
    output: Annotated[Path, _option("--metrics", "-m", "--output", "-o",
                                    help="HDF5 file to write: the metrics file (-m) the run writes without "
                                         "--shard. -o/--output is the same option.")],
    plot: Annotated[Optional[Path], _option(help="Also draw the merged file to this figure (.png, .pdf "
                                            "or .svg).")] = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    force: ForceOpt = False,
) -> None:
    """Combine the shard files of one plane, surface or evaluate-curve run (--shard I/N) into one metrics file.

    Checks that the files are shards 0..N-1 of the same run (same inputs and options), each given once, and
    that every value was computed in exactly one of them.
    """
    from .merge import merge

    def work() -> Result:
        return merge(files, output, plot=plot, force=force)

    def show(r: MergeResult) -> None:
        _table("merged", [("kind", r.kind), ("shards", str(r.shards)), ("metrics", _path(r.outputs["metrics"])),
                          ("plot", _path(r.outputs["plot"]))])

    _run(work, as_json, quiet, show)


@app.command("plane")
def plane_cmd(
    files: Annotated[list[Path], _argument(
        metavar="FILES", help="A curve file (its start, one bend and its end), or three model "
                              "checkpoints w0 w1 w2.")],
    metrics: Annotated[Path, _option("--metrics", "-m", help="HDF5 file for the surfaces.")],
    grid_points: Annotated[int, _option(help="Grid points along each axis, 2 to 1,001 (G x G evaluations).")] = 21,
    margin: Annotated[float, _option(help="Extra room on all four sides, as a fraction of the distances "
                                     "between the points (0 to 10).")] = 0.2,
    margin_left: Annotated[Optional[float], _option(help="Override --margin on the left (before w0).")] = None,
    margin_right: Annotated[Optional[float], _option(help="Override --margin on the right (after w2).")] = None,
    margin_bottom: Annotated[Optional[float], _option(help="Override --margin below the w0-w2 line.")] = None,
    margin_top: Annotated[Optional[float], _option(help="Override --margin above w1.")] = None,
    bend: Annotated[Optional[int], _option(help="Which bend of a curve spans the plane (1..n; default the "
                                           "middle one).")] = None,
    curve_points: Annotated[int, _option(help="Points of the curve projected onto the plane for the "
                                         "drawing (2 to 100,000).")] = 61,
    plot: Annotated[Optional[Path], _option(help="Also draw both surfaces to this figure (.png, .pdf or "
                                            ".svg).")] = None,
    resume: Annotated[bool, _option("--resume", help="Compute only the grid cells still missing (NaN) in an "
                                    "existing metrics file.")] = False,
    bn_batches: BnBatchesOpt = None,
    bn_data: BnDataOpt = BnData.augmented,
    train_subset: GridTrainSubsetOpt = None,
    wd: Annotated[Optional[float], _option(help="L2 coefficient of the train loss, 0 to 1e6 (default: the "
                                           "curve's or w0's).")] = None,
    batch_size: EvalBatchOpt = 512,
    dataset: RecordedDatasetOpt = None,
    split: EvalSplitOpt = None,
    data_root: DataRootOpt = None,
    download: DownloadOpt = False,
    num_workers: WorkersOpt = 4,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = Precision.fp32,
    channels_last: ChannelsLastOpt = False,
    shard: ShardOpt = None,
    points_per_pass: PointsPerPassOpt = 8,
    compile: EvalCompileOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    force: ForceRunOpt = False,
) -> None:
    """Loss and error surfaces on the plane through three points, BatchNorm recomputed at every grid point.

    Draws like the paper's Figure 1 with --plot (or later with 'mctool plot FILE -o PNG').
    """
    from .plane import plane as run

    def work() -> Result:
        from .options import check_real

        check_real("--margin", margin, 0, 10)  # (each side given is checked under its own name by plane)
        pick = lambda side: margin if side is None else side  # noqa: E731
        margins = (pick(margin_left), pick(margin_right), pick(margin_bottom), pick(margin_top))
        return run([str(f) for f in files], metrics, grid_points=grid_points, margins=margins, bend=bend,
                   curve_points=curve_points, plot=plot, resume=resume, force=force, device=device, dataset=dataset,
                   data_root=data_root, download=download, split=split.value if split else None, batch_size=batch_size,
                   bn_batches=bn_batches, bn_data=bn_data.value, train_subset=train_subset, wd=wd,
                   precision=precision.value,
                   channels_last=channels_last, num_workers=num_workers, shard=_shard(shard),
                   points_per_pass=points_per_pass, compile=compile, quiet=quiet)

    def show(r: PlaneResult) -> None:
        rows = []
        names = "A, bend, B" if r.curve_max_offplane is not None else "w0, w1, w2"
        for label, key, v in _metric_rows(r):
            f = _grid_value(key)
            rows.append((label, f"grid min {f(v.min)}, max {f(v.max)}; at {names} "
                         + ", ".join(f(x) for x in v.at_points)))
        rows += [("dx, dy", f"{r.dx:.4g}, {r.dy:.4g}"), ("metrics", _path(r.outputs["metrics"])),
                 ("plot", _path(r.outputs["plot"]))]
        _table(f"plane, {r.grid_points} x {r.grid_points} grid", rows)

    _run(work, as_json, quiet, show)


@app.command("surface")
def surface_cmd(
    checkpoint: Annotated[Path, _argument(
        metavar="CHECKPOINT", help="The network at the centre (model checkpoint).")],
    metrics: Annotated[Path, _option("--metrics", "-m", help="HDF5 file for the surfaces; the directions go "
                                     "beside it as NAME-directions.safetensors.")],
    dims: Annotated[Optional[int], _option(help="1 (a line through the network) or 2 (a surface). Default: 2, "
                                           "or the number of direction files.")] = None,
    directions: Annotated[Optional[list[str]], _option(
        "--directions", metavar="random|pca|FILE", help="'random' (default): Gaussian directions, filter-normalised "
        "to the network; 'pca': the principal directions of --trajectory relative to the network; or a model "
        "checkpoint, given once per direction: the direction from the network to that one (coefficient 1 reaches "
        "it).")] = None,
    trajectory: Annotated[Optional[list[str]], _option(
        metavar="FILE|GLOB", help="With --directions pca: the checkpoints of a training run (at most 1,000), in "
        "training order: a file (repeat the option for each) or a quoted glob pattern such as "
        "'run-epoch*.safetensors' (its matches in natural order: epoch500 before epoch1000).")] = None,
    ignore: Annotated[str, _option(help="Random directions: parameters set to zero, comma-separated: bn "
                                   "(normalisation layers), bias; 'none' keeps all (each 1-D parameter is then "
                                   "one filter).")] = "bn,bias",
    seed: Annotated[int, _option(help="Seed for the random directions; a whole number in [0, 2^32).")] = 0,
    range_: Annotated[Optional[float], _option(
        "--range", help="Coefficients from -RANGE to RANGE along each direction (at most 1e6). Default: "
        "[-1, 1] for random directions; for pca and files, the range that holds the points of interest (the "
        "network, the trajectory, the files' networks at 1) plus --margin.")] = None,
    margin: Annotated[float, _option(help="Without --range: space added on each side of the points of "
                                     "interest, as a fraction of their extent along each direction (0 to "
                                     "10).")] = 0.2,
    grid_points: Annotated[int, _option(help="Grid points per direction (2 to 1,001; with random directions "
                                        "an odd number puts the network itself on the grid).")] = 21,
    plot: Annotated[Optional[Path], _option(help="Also draw the surface to this figure (.png, .pdf or "
                                            ".svg).")] = None,
    resume: Annotated[bool, _option("--resume", help="Compute only the grid points still missing (NaN) in an "
                                    "existing metrics file.")] = False,
    bn_batches: BnBatchesOpt = None,
    bn_data: BnDataOpt = BnData.augmented,
    train_subset: GridTrainSubsetOpt = None,
    wd: Annotated[Optional[float], _option(help="L2 coefficient of the train loss, 0 to 1e6 (default: the "
                                           "network's wd).")] = None,
    batch_size: EvalBatchOpt = 512,
    dataset: RecordedDatasetOpt = None,
    split: EvalSplitOpt = None,
    data_root: DataRootOpt = None,
    download: DownloadOpt = False,
    num_workers: WorkersOpt = 4,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = Precision.fp32,
    channels_last: ChannelsLastOpt = False,
    shard: ShardOpt = None,
    points_per_pass: PointsPerPassOpt = 8,
    compile: EvalCompileOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    force: ForceRunOpt = False,
) -> None:
    """Loss and error around one network: along random filter-normalised directions, the principal directions of
    a training trajectory, or towards other networks.

    Random directions are normalised per filter (Li et al. 2018). BatchNorm statistics are recomputed at every
    grid point. Draws filled contours (2-D, with the trajectory) or lines (1-D) with --plot, or later with
    'mctool plot FILE -o PNG' (also --3d, --html, --vtk).
    """
    from .surface import surface as run

    def work() -> Result:
        return run(checkpoint, metrics, dims=dims, directions=directions or "random",
                   trajectory=trajectory or None, ignore=ignore,
                   seed=seed, span=range_, margin=margin, grid_points=grid_points, plot=plot, resume=resume,
                   force=force, device=device, dataset=dataset,
                   data_root=data_root, download=download, split=split.value if split else None, batch_size=batch_size,
                   bn_batches=bn_batches, bn_data=bn_data.value, train_subset=train_subset, wd=wd,
                   precision=precision.value,
                   channels_last=channels_last, num_workers=num_workers, shard=_shard(shard),
                   points_per_pass=points_per_pass, compile=compile, quiet=quiet)

    def show(r: SurfaceResult) -> None:
        rows = []
        for label, key, v in _metric_rows(r):
            f = _grid_value(key)
            rows.append((label, f"grid min {f(v.min)}, max {f(v.max)}; at the network {f(v.at_points[0])}"))
        rows += [("directions", f"{r.dims} {r.directions}, norms " + ", ".join(f"{n:.4g}" for n in
                                                                              r.direction_norms))]
        if r.explained_variance_ratio is not None:
            rows.append(("trajectory", "explained variance " + ", ".join(f"{v:.1%}" for v in
                                                                         r.explained_variance_ratio)
                         + f"; largest projection error {r.trajectory_max_error:.1%}"))
        rows += [("metrics", _path(r.outputs["metrics"])), ("directions file", _path(r.outputs["directions"])),
                 ("plot", _path(r.outputs["plot"]))]
        over = " x ".join(f"[{lo:.3g}, {hi:.3g}]" for lo, hi in r.ranges)
        size = f"{r.grid_points} x {r.grid_points} grid" if r.dims == 2 else f"{r.grid_points} points"
        _table(f"surface, {size} over {over}", rows)

    _run(work, as_json, quiet, show)


@app.command("hessian")
def hessian_cmd(
    files: Annotated[list[Path], _argument(
        metavar="FILE", help="A model checkpoint, a curve file (points along it), an "
                              "ensemble file (each member), or two checkpoints (the segment).")],
    metrics: Annotated[Path, _option("--metrics", "-m", help="HDF5 file for the eigenvalues and traces.")],
    top_k: Annotated[int, _option(help="How many of the largest eigenvalues to find (1 to 1,000).")] = 5,
    trace: Annotated[bool, _option("--trace", help="Also estimate the trace (Hutchinson, Rademacher "
                                   "probes).")] = False,
    trace_samples: Annotated[int, _option(help="Probes for --trace, 2 to 1,000,000 (one Hessian-vector "
                                          "product each); the standard error is recorded.")] = 20,
    num_points: Annotated[int, _option(help="Points along a curve or segment (evenly spaced t, both ends "
                                       "included), 2 to 100,000; checked for every input.")] = 11,
    train_subset: Annotated[int, _option(help="The loss is the mean cross-entropy (no L2 term) over a fixed "
                                         "random subset of this many training images (un-augmented); 0 = "
                                         "all. Its default, 5000, keeps each Hessian-vector product short; "
                                         "plane's and surface's --train-subset default to all.")] = 5000,
    tol: Annotated[float, _option(help="Relative accuracy asked of the eigenvalues (ARPACK's tol), in "
                                  "(0, 1).")] = 1e-4,
    max_restarts: Annotated[int, _option(help="Lanczos restarts before giving up, at most 1e9 (the "
                                         "eigenvalues not found are NaN, with a warning).")] = 100,
    seed: Annotated[int, _option(help="Seed for the start vector and the trace probes; a whole number in "
                                      "[0, 2^32).")] = 0,
    eigenvectors: Annotated[Optional[Path], _option(help="Also write the unit eigenvectors, [points, k, "
                                                    "parameters] float32, to this safetensors file (not "
                                                    "under torchrun).")] = None,
    plot: Annotated[Optional[Path], _option(help="Also draw the eigenvalues (and the trace) to this figure "
                                            "(.png, .pdf or .svg), as mctool plot draws the metrics "
                                            "file.")] = None,
    resume: Annotated[bool, _option("--resume", help="Compute only the points still missing (NaN) in an "
                                    "existing metrics file.")] = False,
    bn_batches: BnBatchesOpt = None,
    bn_data: BnDataOpt = BnData.augmented,
    batch_size: Annotated[int, _option(help="Batch size for the Hessian-vector products and the BN pass.")]
    = 512,
    dataset: RecordedDatasetOpt = None,
    data_root: DataRootOpt = None,
    download: DownloadOpt = False,
    num_workers: WorkersOpt = 4,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    force: ForceRunOpt = False,
) -> None:
    """Curvature of the training loss: top Hessian eigenvalues (and trace), at a network, on a curve or per member.

    Hessian-vector products feed a Lanczos method: the Hessian is never formed. BatchNorm statistics are
    recomputed at every point of a curve (docs/hessian.md).
    """
    from .hessian import hessian as run

    def work() -> Result:
        return run([str(f) for f in files], metrics, top_k=top_k, trace=trace, trace_samples=trace_samples,
                   num_points=num_points, train_subset=train_subset, batch_size=batch_size, tol=tol,
                   max_restarts=max_restarts, seed=seed, eigenvectors=eigenvectors, bn_batches=bn_batches,
                   bn_data=bn_data.value,
                   resume=resume, force=force, device=device, dataset=dataset, data_root=data_root,
                   download=download, num_workers=num_workers, plot=plot, quiet=quiet)

    def show(r: HessianResult) -> None:
        rows = []
        for i, vals in enumerate(r.eigenvalues):
            where = (f"t = {r.t[i]:.3g}" if r.t is not None
                     else f"member {i}" if r.points_kind == "ensemble" else "network")
            text = ", ".join(_num(v, ".4g") for v in vals)
            if r.trace is not None:
                text += f"; trace {_num(r.trace[i], '.4g')} +- {_num(r.trace_stderr[i], '.2g')}"
            rows.append((where, text))
        rows += [("parameters", f"{r.parameters:,}"), ("Hessian-vector products", str(r.hvps)),
                 ("metrics", _path(r.outputs["metrics"])), ("eigenvectors", _path(r.outputs["eigenvectors"]))]
        if r.outputs["plot"] is not None:
            rows.append(("plot", _path(r.outputs["plot"])))
        _table(f"hessian: top {r.top_k} eigenvalues", rows)

    _run(work, as_json, quiet, show)



@app.command("align")
def align_cmd(
    reference: Annotated[Path, _argument(metavar="A", help="Network A (model checkpoint): the order to align "
                                         "to.")],
    other: Annotated[Path, _argument(metavar="B", help="Network B (same architecture as A): the network to "
                                     "permute.")],
    output: Annotated[Path, _option("--output", "-o", help="Model checkpoint to write: B with its hidden units "
                                    "permuted into A's order (the same function as B).")],
    metrics: Annotated[Optional[Path], _option("--metrics", "-m", help="HDF5 file for the groups, permutations "
                                               "and objective (default: NAME-align.h5 beside the output).")]
    = None,
    method: Annotated[AlignMethod, _option(help="weights: weight matching (coordinate descent over the groups, "
                                           "one linear assignment each); activations: match units by the "
                                           "correlation of their activations on training batches.")]
    = AlignMethod.weights,
    seed: Annotated[int, _option(help="Seed for the order of the groups (weights) or of the training images "
                                "(activations); a whole number in [0, 2^32).")] = 0,
    max_sweeps: Annotated[int, _option(help="Weight matching: stop after this many sweeps over the groups, 1 "
                                      "to 1e9 (it stops earlier when a sweep changes nothing).")] = 100,
    batches: Annotated[int, _option("--activation-batches", "--batches",
                                    help="Activation matching: training batches (of --batch-size) to measure "
                                    "the correlations on (--batches: the name in mctool 0.2.0).")] = 8,
    batch_size: Annotated[int, _option(help="Batch size for activation matching and for the final check "
                                      "that the output computes B's logits.")] = 256,
    dataset: Annotated[Optional[str], _option("--dataset", "-d", help="Data set (default: the one B "
                                              "records).")] = None,
    data_root: DataRootOpt = None,
    download: DownloadOpt = False,
    num_workers: WorkersOpt = 4,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    force: ForceOpt = False,
) -> None:
    """Permute network B's hidden units into network A's order (Git Re-Basin), keeping B's function.

    The permutation groups come from the network's graph (torch.fx); the output is checked to give B's
    logits on a batch of the data set. Connect A and the output to compare with the unaligned pair.
    """
    from .align import align

    def work() -> Result:
        return align(reference, other, output, method=method.value, metrics=metrics, seed=seed,
                     max_sweeps=max_sweeps, batches=batches, batch_size=batch_size, dataset=dataset, device=device,
                     data_root=data_root, download=download, num_workers=num_workers, force=force, quiet=quiet)

    def show(r: AlignResult) -> None:
        rows = [("model", _path(r.outputs["model"])), ("metrics", _path(r.outputs["metrics"])),
                ("method", r.method), ("groups", f"{r.groups} ({r.units} units, {_pct(r.moved)} moved)")]
        if r.sweeps is not None:
            rows.append(("sweeps / objective", f"{r.sweeps} / {_num(r.objective, '.6g')}"))
        if r.correlation is not None:
            rows.append(("mean correlation", _num(r.correlation)))
        rows += [("||A - B||", f"{_num(r.distance_before, '.4g')} -> {_num(r.distance_after, '.4g')} aligned"),
                 ("time", f"{r.seconds:.1f} s")]
        _table("aligned", rows)

    _run(work, as_json, quiet, show)


@app.command("fge")
def fge_cmd(
    start: Annotated[Path, _argument(
        metavar="START", help="Trained network to start from: a model checkpoint, or a training "
                         "state from train --save-every (its SGD momentum is kept).")],
    output: Annotated[Path, _option("--output", "-o", help="Ensemble file to write (all members).")],
    metrics: Annotated[Optional[Path], _option("--metrics", "-m", help="HDF5 file for the learning rate, "
                                               "member and ensemble metrics (default: NAME.h5 beside the "
                                               "output).")] = None,
    epochs: Annotated[int, _option(help="FGE epochs, 1 to 100,000 (the paper: 40 epochs give 20 members "
                                   "with 2-epoch cycles).")] = 20,
    cycle_epochs: Annotated[float, _option(help="Cycle length in epochs, > 0 and at most 100,000 (may be "
                                           "fractional); rounded to an even number of iterations.")] = 2.0,
    cycle_iters: Annotated[Optional[int], _option(help="Cycle length in iterations, 2 to 1e9 (overrides "
                                                  "--cycle-epochs); an odd number is rounded up to an "
                                                  "even one, the snapshot being at mid cycle.")] = None,
    lr_max: Annotated[Optional[float], _option(help="Learning rate at the start and end of each cycle (a1; "
                                               "default: the start network's training lr / 2 with BatchNorm, "
                                               "/ 5 without, the paper's ratios, taking the training lr as "
                                               "0.05 if it records none; see docs/ensembles.md).")]
    = None,
    lr_min: Annotated[Optional[float], _option(help="Learning rate at mid cycle, where snapshots are taken (a2; "
                                               "default: the start network's training lr / 200 with "
                                               "BatchNorm, / 100 without, taking it as 0.05 if it records "
                                               "none).")] = None,
    wd: Annotated[Optional[float], _option(help="Weight decay, 0 to 1e6 (default: the start network's, as "
                                           "recorded in its config, else 5e-4).")] = None,
    momentum: Annotated[float, _option(help="SGD momentum, in [0, 1).")] = 0.9,
    batch_size: Annotated[int, _option(help="Mini-batch size (>= 1; a batch, the last one included, of 1 image "
                                      "is refused where a BatchNorm layer would see one value per "
                                      "channel).")] = 128,
    seed: Annotated[int, _option(help="Seed for data order and augmentation; a whole number in [0, 2^32).")] = 0,
    swa: Annotated[Optional[Path], _option(help="Also write the average of the snapshots (BN recomputed) "
                                           "as a model checkpoint here.")] = None,
    bn_batches: BnBatchesOpt = None,
    bn_data: Annotated[Optional[BnData], _option(
        help=_BN_DATA_HELP + " Default: augmented; on --resume, the interrupted run's.")] = None,
    points_per_pass: Annotated[int, _option(
        help="Snapshots evaluated together in one pass over the data, 1 to 64 (P copies side by side in one wide "
             "network): "
             "a snapshot waits until P are taken (or the run ends), so the running ensemble's metrics come P at a "
             "time. 1 evaluates each as it is taken. Lower it if P copies' activations (or P waiting snapshots' "
             "weights) do not fit in memory. May differ on --resume.")] = 4,
    dataset: Annotated[Optional[str], _option("--dataset", "-d", help="Data set (default: the start "
                                              "network's).")] = None,
    augment: Annotated[Optional[Augment], _option(help="Training augmentation (as for train; default: the "
                                                  "one the start network was trained with, else auto).")]
    = None,
    split: FgeSplitOpt = None,
    resume: Annotated[bool, _option("--resume", help="Continue an interrupted run (same options).")] = False,
    data_root: DataRootOpt = None,
    download: DownloadOpt = False,
    num_workers: WorkersOpt = 4,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = Precision.fp32,
    channels_last: ChannelsLastOpt = False,
    cuda_graphs: GraphsOpt = False,
    sync_bn: SyncBnOpt = False,
    deterministic: DeterministicOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    force: ForceRunOpt = False,
) -> None:
    """Fast Geometric Ensembling: cyclic learning rate from a trained network, one snapshot per cycle.

    Snapshots are taken at the exact mid-cycle iteration (lr = lr-min), each with its own BatchNorm
    recalibration; the running ensemble's error, NLL and ECE are recorded as members are added.
    """
    from .fge import FGEConfig, fge

    def work() -> Result:
        cfg = FGEConfig(epochs=epochs, cycle_epochs=cycle_epochs, cycle_iters=cycle_iters, lr_max=lr_max,
                        lr_min=lr_min, wd=wd, momentum=momentum, batch_size=batch_size, seed=seed, dataset=dataset,
                        augment=augment.value if augment else None, split=split.value if split else None,
                        precision=precision.value,
                        channels_last=channels_last, cuda_graphs=cuda_graphs, deterministic=deterministic,
                        sync_bn=sync_bn, points_per_pass=points_per_pass,
                        bn_batches=bn_batches, bn_data=bn_data.value if bn_data else None,
                        swa=str(swa) if swa else None)
        return fge(cfg, start, output, metrics, device=device, data_root=data_root,
                   download=download, num_workers=num_workers, resume=resume, force=force, quiet=quiet)

    def show(r: FGEResult) -> None:
        s, e, m, w = (r.metrics[k] for k in ("start", "eval", "last_member", "swa"))
        rows = [("ensemble", f"{_path(r.outputs['ensemble'])} ({r.members} members, cycle {r.cycle_iters} "
                 "iterations)"),
                ("metrics", _path(r.outputs["metrics"])),
                (f"start network {r.split} err / nll", f"{_pct(s.err)} / {_num(s.nll)}"),
                (f"last member {r.split} err / nll", f"{_pct(m.err)} / {_num(m.nll)}"),
                (f"FGE ensemble {r.split} err / nll / ece", f"{_pct(e.err)} / {_num(e.nll)} / {_num(e.ece)}")]
        if w is not None:
            rows.append((f"SWA {r.split} err / nll", f"{_pct(w.err)} / {_num(w.nll)}"))
        _table("fge", rows)

    _run(work, as_json, quiet, show)


@app.command("docs")
def docs_cmd(
    topic: Annotated[Optional[str], _argument(
        metavar="TOPIC", help="A page (method, cli, curves, ...) or one section of it, as help texts and messages "
                                "cite them: 'method', 'method.md#bn' or 'docs/method.md#bn'. Left out: the list "
                                "of pages.")] = None,
    path_only: Annotated[bool, _option("--path", help="Print the page's file (or, without TOPIC, the docs "
                                                      "folder) instead of its text: to open it in an editor "
                                                      "or a Markdown viewer.")] = False,
    as_json: Annotated[bool, _option("--json", help="Print exactly one JSON object on stdout: the pages, and "
                                                    "the Markdown of the one asked for.")] = False,
) -> None:
    """The documentation, in the terminal and offline: the pages that help texts cite as docs/NAME.md#section.

    Prints the page (or section) as formatted text on stdout; pipe it to 'less -R' to page through it."""
    from .manual import read_docs, terminal_markdown

    try:
        r = read_docs(topic)
    except MctoolError as e:
        _error(str(e))
        raise typer.Exit(1) from None
    if as_json:
        _print_json(r.to_json())
        return
    console = Console(file=sys.stdout, highlight=False, soft_wrap=path_only)
    try:
        if path_only:
            console.print(_safe(r.documents[0].path if topic is not None else
                                str(Path(r.documents[0].path).parent) if r.documents else ""))
        elif r.text is not None:
            console.print(terminal_markdown(r.text))
        else:
            t = _new_table("mctool docs TOPIC (also TOPIC.md#section)", ("page", "title"))
            for d in r.documents:
                t.add_row(_safe(d.name), _safe(d.title))
            console.print(t)
        sys.stdout.flush()
    except BrokenPipeError:  # (| head: the reader went away; nothing else to do)
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(141) from None


# The command list shows each command's whole first paragraph, not the first 45 characters of it.
for _info in app.registered_commands:
    if _info.short_help is None:
        _doc = inspect.cleandoc(_info.help or _info.callback.__doc__ or "")
        _info.short_help = " ".join(_doc.split("\n\n")[0].split())


def main() -> None:
    keep_stderr()  # progress and messages on a stderr that went away are dropped; the work goes on
    if _launch_env.launch_rank() == "0":
        app()
        return
    # Another rank of a torchrun (or srun) launch parses the same command line as rank 0, whose report of a
    # usage error (exit 2), --help or --version is the user's: this rank exits with the same code, silently (it
    # never prints to stdout: results and --json are rank 0's; its own errors go to stderr).
    sys.stdout = open(os.devnull, "w")
    atexit.register(sys.stdout.close)  # closed, not left to the finalizer ("ResourceWarning: unclosed file")
    try:
        code = app(standalone_mode=False)
    except _ClickException as e:
        code = e.exit_code
    except typer.Abort:
        code = 1
    sys.exit(code if isinstance(code, int) else 0)
