"""The SGD training loop shared by ``train``, ``connect`` and ``fge``: option checks, output and resume
handling, the plain training step, and the resumable epoch loop (``fit``).

Each command builds its own step (a network's, or a curve's) and hands it to ``fit``; the commands
themselves live in ``training.py``, ``curve_training.py`` and ``fge.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F

from . import distributed
from .bn import bn_modules
from .checkpoint import (MOMENTUM_PREFIX, check_state_metadata, check_state_tensors, network_state, read_checkpoint,
                         read_metadata)
from .data import AUGMENTS, SPLITS, Data
from .errors import CheckpointError, ConfigError, Interrupted, MctoolError, NonFiniteLossError, OutputError
from .fileio import check_output, check_outputs, remove_output, same_inputs, writes_files
from .graphs import GraphedStep, set_lr
from .h5io import MetricsLog, recorded_setting, source_date_epoch, training_run_of, unfinished_training
from .models import blank_images, probe_forward
from .options import MAX_EPOCHS, MAX_RATE, check_count, check_real, check_seed, setting_name, show_setting
from .runtime import autocast
from .console import progress_bar, warn
from .schedules import SCHEDULES, lr_at

_NAN_CHECK_EVERY = 50  # iterations between NaN checks (each check waits for the device)
# Options that change how a run computes, not what: a resumed run may set them differently.
RUNTIME_OPTIONS = frozenset({"cuda_graphs", "deterministic", "compile", "points_per_pass"})


def validate_sgd(cfg: Any, lr_option: str = "--lr") -> None:
    """Checks shared by every SGD run (train, connect, fge): clear errors for values that cannot work."""
    # (beyond float32's range, SGD's update overflowed: a traceback)
    check_real(lr_option, cfg.lr, 0, MAX_RATE, low_open=True)
    check_count("--epochs", cfg.epochs, 1, MAX_EPOCHS)
    # (each epoch's generator gets seed * 1_000_003 + epoch, which must fit in 63 bits)
    cfg.seed = check_seed(cfg.seed, 32)
    check_real("--wd", cfg.wd, 0, MAX_RATE)
    check_real("--momentum", cfg.momentum, 0, 1, high_open=True)
    check_count("--batch-size", cfg.batch_size)
    check_count("--save-every", cfg.save_every, 0)
    if cfg.schedule not in SCHEDULES:
        raise ConfigError(f"--schedule must be one of {', '.join(SCHEDULES)}, got '{cfg.schedule}'.")


def _recorded_number(config: dict[str, Any], key: str, positive: bool) -> float | None:
    value = config.get(key)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok and (value > 0 if positive else value >= 0) else None


#: mctool train's learning rate and weight decay: its defaults, and what connect and fge assume for a network
#: that records none.
TRAIN_LR = 0.05
TRAIN_WD = 5e-4


def fill_from_record(cfg: Any, config: dict[str, Any], who: str, *, resume: bool) -> dict[str, str]:
    """Set ``cfg.split``, ``cfg.augment`` and ``cfg.wd`` left as None from a network's recorded ``config`` (the
    start network of connect or fge: train on its images, with its augmentation and weight decay), else to
    test, auto and ``TRAIN_WD``; returns how, for ``config.derived``. The split is left alone when resuming:
    the interrupted run's is taken then (``adopt_recorded``)."""
    derived = {}
    if cfg.split is None and not resume:
        split = recorded_split(config)
        cfg.split = split or "test"
        derived["split"] = f"{who}'s split {split!r}" if split is not None else f"test ({who} records none)"
    if cfg.augment is None:
        augment = recorded_augment(config)
        cfg.augment = augment or "auto"
        derived["augment"] = (f"{who}'s augmentation {augment!r}" if augment is not None
                              else f"auto ({who} records none)")
    if cfg.wd is None:
        wd = recorded_wd(config)
        cfg.wd = TRAIN_WD if wd is None else wd
        derived["wd"] = f"{who}'s wd {wd!r}" if wd is not None else f"{TRAIN_WD!r} ({who} records none)"
    return derived


def recorded_lr(config: dict[str, Any]) -> float | None:
    """The learning rate a network's recorded config says it was trained at (None if absent or not a positive
    number): connect and fge derive their defaults from it."""
    return _recorded_number(config, "lr", positive=True)


def recorded_augment(config: dict[str, Any]) -> str | None:
    """The training augmentation a network's recorded config names (None if absent or not one of
    ``AUGMENTS``): connect and fge train with the same one by default."""
    return _recorded_choice(config, "augment", AUGMENTS)


def recorded_split(config: dict[str, Any]) -> str | None:
    """The split a network's recorded config was trained with (None if absent or not one of ``SPLITS``):
    connect and fge train on the same images by default (with 'val', A's held-out images stay out)."""
    return _recorded_choice(config, "split", SPLITS)


def evaluation_split(split: str | None, paths: Iterable[str | Path], resumed: Path | None = None) -> str:
    """The split an evaluation command (evaluate, ensemble, evaluate-curve, plane, surface) uses: ``split`` if
    given, else the one every input was trained with (so a network trained with --split val is evaluated on its
    held-out images, its BN passes and train metrics without them, as point does), else test. ``resumed``: the
    metrics file of a run being resumed, whose recorded split is then the default. Warns when the inputs
    disagree, and when the val split is evaluated for a network that trained on those images."""
    if split is None and resumed is not None:
        split = recorded_split({"split": recorded_setting(resumed, "split")})
    recorded: dict[str, str | None] = {}
    for p in paths:
        try:
            config = json.loads(read_metadata(p).get("config", "{}"))
        except (MctoolError, OSError, ValueError):
            config = None
        recorded[str(p)] = recorded_split(config) if isinstance(config, dict) else None
    if split is None:
        kinds = {s or "test" for s in recorded.values()}
        if len(kinds) <= 1:
            return kinds.pop() if kinds else "test"
        val = [p for p, s in recorded.items() if s == "val"]
        warn(f"the inputs were trained with different splits ({', '.join(repr(p) for p in val)} with --split val, "
             "the others on all training images); evaluating on test. Pass --split to choose.")
        return "test"
    if split == "val":
        seen = [p for p, s in recorded.items() if s == "test"]  # (a file that records no split: unknown)
        if seen:
            warn(f"{', '.join(repr(p) for p in seen[:3])}{' ...' if len(seen) > 3 else ''} "
                 f"{'was' if len(seen) == 1 else 'were'} not trained with --split val, so the val images were among "
                 f"{'its' if len(seen) == 1 else 'their'} training images: the val metrics are not held-out metrics.")
    return split


def _recorded_choice(config: dict[str, Any], key: str, choices: tuple[str, ...]) -> str | None:
    value = config.get(key)
    return value if isinstance(value, str) and value in choices else None


def recorded_wd(config: dict[str, Any]) -> float | None:
    """The weight decay a network's recorded config says it was trained with (None if absent or not a
    number >= 0): connect's and fge's default."""
    return _recorded_number(config, "wd", positive=False)


def output_stem(output: str | Path) -> str:
    """A file name without its ``.safetensors`` ending, for names derived from an output."""
    name = Path(output).name
    if str(output) in ("", "."):  # (the command line turns an empty name into '.')
        raise OutputError("--output is empty (or '.'), not a file name; give a file name.")
    if name in ("", ".", ".."):
        raise OutputError(f"--output '{output}' is not a file name; give a file name.")
    return name[: -len(".safetensors")] if name.endswith(".safetensors") else name


def metrics_path(output: str | Path, suffix: str = "") -> Path:
    """The default metrics file of a run writing ``output``: ``model.safetensors`` -> ``model{suffix}.h5``
    (``train`` and ``fge``: no suffix; ``connect``: ``-connect``; ``align``: ``-align``)."""
    return Path(output).with_name(output_stem(output) + suffix + ".h5")


def state_path(output: str | Path) -> Path:
    """Where the resumable training state of ``output`` lives: ``model.safetensors`` -> ``model.state.safetensors``."""
    return Path(output).with_name(output_stem(output) + ".state.safetensors")


def state_metadata(output: str | Path) -> dict[str, str]:
    """The metadata of ``output``'s training state, for a look before ``prepare_outputs`` reads and checks it:
    empty when there is none or it cannot be read (``prepare_outputs`` then says why)."""
    with contextlib.suppress(Exception):
        return read_metadata(state_path(output))
    return {}


def relative_to_output(path: str | Path, output: Path) -> str:
    """``path`` as a training state records another output of its run: relative to the folder of ``-o``, so that
    a resume finds it from any working folder, and after the run's folder was moved or copied elsewhere."""
    try:
        name = os.path.relpath(os.path.abspath(path), os.path.abspath(output.parent))
    except ValueError:  # (Windows: on another drive, which no relative name reaches)
        name = os.path.abspath(path)
    return Path(name).as_posix()  # '/' whatever the system: a run folder made on Windows resumes elsewhere


def recorded_file(name: Any, output: Path) -> Path | None:
    """A file name a run recorded with ``relative_to_output`` (read back from an untrusted file), as a path:
    None unless it is a plausible name."""
    if not isinstance(name, str) or not 0 < len(name) <= 4096 or "\0" in name:
        return None
    return Path(os.path.normpath(output.parent / name))  # (shown as 'logs/m.h5', not 'run/../logs/m.h5')


def resumed_metrics(output: Path, metrics: str | Path | None, resume: bool, suffix: str = "") -> Path:
    """The metrics file of a training run: ``-m`` as given; left out, on ``--resume`` the interrupted run's (its
    state records it), so that the history goes on in the file that holds its first epochs, else the default
    beside ``-o`` (``metrics_path``)."""
    if metrics is not None:
        return Path(metrics)
    recorded = recorded_file(state_metadata(output).get("metrics"), output) if resume else None
    return recorded if recorded is not None else metrics_path(output, suffix)


def remove_state(output: str | Path) -> None:
    """Delete the training state of a finished run (on the rank that writes files)."""
    if writes_files():
        state_path(output).unlink(missing_ok=True)


def snapshot_path(output: str | Path, epoch: int) -> Path:
    """``--save-every`` checkpoint of ``output`` after ``epoch`` epochs: ``model-epoch010.safetensors``."""
    return Path(output).with_name(f"{output_stem(output)}-epoch{epoch:03d}.safetensors")


def adopt_recorded(cfg: Any, state: tuple[dict[str, torch.Tensor], dict[str, str]] | None,
                   renamed: dict[str, str] | None = None) -> None:
    """``--resume``: an option left out (``None`` in ``cfg``, a dataclass) takes the interrupted run's value, so
    the run goes on as it started (``prepare_outputs`` lets ``None`` match anything recorded), with the recorded
    words on how it was derived (``derived``), so the finished run records what an uninterrupted one would; then
    the options are validated again, since the state file is read from disk."""
    if state is None:
        return
    saved = json.loads(state[1].get("config", "{}"))
    saved = {(renamed or {}).get(k, k): v for k, v in saved.items()} if isinstance(saved, dict) else {}
    adopted = []
    for f in dataclasses.fields(cfg):
        if f.name != "derived" and getattr(cfg, f.name) is None and saved.get(f.name) is not None:
            setattr(cfg, f.name, saved[f.name])
            adopted.append(f.name)
    how = saved.get("derived")
    if hasattr(cfg, "derived") and isinstance(how, dict):
        how = {k: v for k, v in how.items() if k in adopted and isinstance(v, str)}
        cfg.derived = {**how, **(cfg.derived or {})} or None
    cfg.validate()


def _epoch_seed(seed: int, epoch: int) -> int:
    # Each epoch's shuffling, augmentation and dropout depend only on (seed, epoch), so a resumed run
    # replays exactly what an uninterrupted run would have done.
    return seed * 1_000_003 + epoch


#: The metrics file's ``kind`` of each training state's run.
_METRICS_KIND = {"train-state": "train", "curve-state": "connect", "fge-state": "fge"}


def prepare_outputs(output: Path, metrics: Path, config: dict[str, Any], *, resume: bool, force: bool,
                    state_kind: str, renamed: dict[str, str] | None = None,
                    inputs: list[str | Path | None] | tuple = (),
                    more_outputs: dict[str, str | Path | None] | None = None
                    ) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """Check outputs before any work; with ``resume``, return the saved state after checking its config.

    A resumed run must be given the same options; ``None`` (an option left out: ``adopt_recorded`` then
    takes the recorded value) and dicts that are a subset of the saved ones (arch kwargs) match what was
    recorded, and so does a
    flag left off that the interrupted run's version did not have. ``renamed`` maps
    config fields of older versions to their current names, so that their interrupted runs still resume.

    The output, the metrics file, ``more_outputs``, the training state and the --save-every checkpoints
    must all be different files and none of ``inputs``. On ``resume``, an existing metrics file must be the
    interrupted run's own (its kind and start time: ``training_run_of``) unless ``force``. What an earlier run
    of the same output left behind (its training state and --save-every checkpoints) is removed by ``fit`` once
    every check has passed, on a new run with ``force`` (``old_run_remover``): a run refused by a later check
    leaves those files alone.
    """
    state_file = state_path(output)
    every, epochs = config.get("save_every") or 0, config.get("epochs") or 0
    snapshots = {f"the --save-every checkpoint of epoch {e}": snapshot_path(output, e)
                 for e in (range(every, epochs, every) if every else ())}
    # force=True: only name clashes and locks here; whether existing files may be replaced depends on resume.
    check_outputs({"--output": output, "--metrics": metrics, **(more_outputs or {})}, inputs, force=True,
                  derived=snapshots, locked={"the training state of --output": state_file},
                  formats={"--output": "safetensors", "--metrics": "hdf5",
                           **{k: "safetensors" for k in more_outputs or {}}})
    if resume:
        if not state_file.exists():
            finished = output.exists()
            hint = " The run already finished." if finished else ""
            if not finished and unfinished_training(metrics):
                hint = (f" The run that wrote --metrics '{metrics}' stopped before its first epoch was saved; start "
                        "over with --force instead of --resume.")
            if finished and state_kind == "train-state":  # (its weights: only a finished run has them)
                hint += (f" To train it further, start a new run from its weights: --init '{output}' (a new "
                         "learning-rate schedule) with another -o.")
            raise ConfigError(f"nothing to resume: no training state '{state_file}'.{hint}")
        state = read_checkpoint(state_file)
        if state[1].get("kind") != state_kind:
            found = str(state[1].get("kind", "none"))[:40]
            raise CheckpointError(f"'{state_file}' is not a training state of this command (kind {found!r}, not "
                                  f"{state_kind!r}); start over with --force.")
        check_state_metadata(state[1], state_file)
        saved = json.loads(state[1].get("config", "{}"))
        saved = {(renamed or {}).get(k, k): v for k, v in saved.items()}
        diff = {}
        for k, v in config.items():
            # (derived only says how defaults were found, in words that may change between versions)
            if k in RUNTIME_OPTIONS or k == "derived" or (k not in saved and v is False):  # or added since, left off
                continue
            old = saved.get(k)
            same = v is None or v == old or (isinstance(v, dict) and isinstance(old, dict) and {**old, **v} == old)
            if not same:  # (a dict of kwargs: what the run would have, the recorded ones it leaves as they are)
                diff[k] = (old, {**old, **v} if isinstance(v, dict) and isinstance(old, dict) else v)
        if diff:
            shown = ", ".join(f"{setting_name(k)}: {show_setting(a)} -> {show_setting(b)}"
                              for k, (a, b) in diff.items())
            raise ConfigError(f"--resume needs the same options as the interrupted run; these differ: {shown}.")
        check_output(output, force=True)
        if not force and os.path.lexists(metrics) and not training_run_of(
                metrics, _METRICS_KIND[state_kind], state[1].get("started")):
            recorded = recorded_file(state[1].get("metrics"), output)
            raise OutputError(
                f"--metrics '{metrics}' already exists and is not the metrics file of the run '{state_file}' holds"
                + (f" (that is '{recorded}')" if recorded is not None and recorded != metrics else "")
                + "; the resumed run would replace it with its history. Give another name (or leave -m out), or "
                  "pass --force to replace it.")
        return state
    if state_file.exists() and not force:
        raise ConfigError(f"an interrupted run left '{state_file}'; pass --resume to continue it or --force to "
                          "start over.")
    check_output(output, force, "--output")
    if not force and unfinished_training(metrics):
        raise OutputError(f"--metrics '{metrics}' was left by a run that stopped before its first epoch was saved "
                          f"(there is no training state '{state_file}' to resume from); pass --force to start over.")
    check_output(metrics, force, "--metrics")
    for what, path in {**(more_outputs or {}), **snapshots}.items():
        if path is not None:
            check_output(path, force, what)
    return None


def old_run_remover(output: Path, inputs: list[str | Path | None] | tuple, *, force: bool,
                    resume_state: Any) -> Callable[[], None] | None:
    """For ``fit(old_run=...)``: on a new run with ``force``, the function deleting what an earlier run of
    ``output`` left (see ``prepare_outputs``); otherwise None."""
    if not force or resume_state is not None:
        return None
    return lambda: remove_old_run(output, inputs)


def remove_old_run(output: Path, inputs: list[str | Path | None] | tuple) -> None:
    """Delete what an earlier run of ``output`` left (not inputs): the output itself, so that an interrupted
    new run does not leave the old network beside the new run's metrics and state, its training state and its
    --save-every checkpoints."""
    if not writes_files():
        return
    names = rf"{re.escape(output_stem(output))}(\.state|-epoch\d{{3,}})\.safetensors|{re.escape(output.name)}"
    pattern = re.compile(names)
    folder = output.parent if str(output.parent) else Path(".")
    keep = [Path(p) for p in inputs if p is not None and Path(p).exists()]
    for path in folder.iterdir() if folder.is_dir() else ():
        if pattern.fullmatch(path.name) and path.is_file() and not any(path.samefile(k) for k in keep):
            # (a link: the file it leads to, which the new run writes; the link stays)
            remove_output(path)


def set_momentum(opt: torch.optim.Optimizer, params: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> None:
    """Restore SGD momentum buffers saved under ``optimizer/momentum/<param name>``."""
    for name, buf in tensors.items():
        if name.startswith(MOMENTUM_PREFIX):
            p = params[name[len(MOMENTUM_PREFIX):]]
            opt.state[p]["momentum_buffer"] = buf.to(p.device)


def restore_state(resume_state: tuple[dict[str, torch.Tensor], dict[str, str]], output: Path, inputs: dict[str, str],
                  same_start: str, model: torch.nn.Module, opt: torch.optim.Optimizer,
                  params: dict[str, torch.Tensor], log: MetricsLog) -> int:
    """Put an interrupted ``train`` or ``fge`` run's saved state (``prepare_outputs``'s ``resume_state``) back:
    the network, the momentum buffers, the rows of the metrics log and its start time. Refuses a run that
    started from other input files (``same_start`` says which option names them). Returns the epochs done."""
    tensors, md = resume_state
    if not same_inputs(json.loads(md.get("inputs", "{}")), inputs):
        raise ConfigError(f"the interrupted run started from another file (or it changed since): "
                          f"{md.get('inputs')}; --resume needs the same {same_start}.")
    check_state_tensors(model, tensors, state_path(output))
    missing = [name for name in params if MOMENTUM_PREFIX + name not in tensors]
    # (get_momentum saves every parameter's, and the state says so; an earlier version's left out a parameter
    # that had had no gradient, so its states are taken as they are)
    if opt.defaults.get("momentum") and md.get("momentum_saved") == "all" and missing:
        raise CheckpointError(f"'{state_path(output)}' has no optimizer momentum for {len(missing)} of the network's "
                              f"{len(params)} parameters ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}"
                              "): resuming would restart it from zero; start over with --force.")
    model.load_state_dict(network_state(tensors))
    set_momentum(opt, params, tensors)
    log.rows = json.loads(md["history"])
    log.attrs["started"] = md.get("started", log.attrs["started"])
    return int(md["epoch"])


#: Metadata of a training state whose ``optimizer/momentum/*`` hold every parameter's momentum (``get_momentum``).
MOMENTUM_SAVED = {"momentum_saved": "all"}


def get_momentum(opt: torch.optim.Optimizer, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SGD momentum buffers keyed ``optimizer/momentum/<param name>``: with momentum on, one for every parameter
    (zeros for a parameter that has had no gradient yet: its first step from a zero buffer is the same as from
    none), so that ``restore_state`` can tell a complete state from a damaged one; none without momentum."""
    if not opt.defaults.get("momentum"):
        return {}
    return {MOMENTUM_PREFIX + name: (buf if (buf := opt.state.get(p, {}).get("momentum_buffer")) is not None
                                     else torch.zeros_like(p, memory_format=torch.preserve_format))
            for name, p in params.items()}


def train_mode(model: torch.nn.Module) -> None:
    """``model.train()``, skipped when the network is already in train mode: it visits every module (about
    1 ms of host time per step for PreResNet-110). mctool switches modes only on the whole network."""
    if not model.training:
        model.train()


class GradSum:
    """Data parallel training (docs/distributed.md): each rank's gradients, of the mean loss over its piece
    of the global batch, become the gradients of the mean loss over the whole batch. One flat buffer holds
    every gradient times the rank's batch size, plus that size; summed over ranks and divided by the
    total, it is the same on every rank, and so are the updates. ``None`` for a single process."""

    @classmethod
    def for_run(cls, cuda_graphs: bool = False) -> "GradSum | None":
        d = distributed.current()
        if d is None:
            return None
        if cuda_graphs:
            raise ConfigError(f"--cuda-graphs cannot capture the gradient exchange of {d.world} ranks; leave it out "
                              "under torchrun (see docs/distributed.md).")
        return cls()

    def __call__(self, grads: list[torch.Tensor], batch: int) -> None:
        flat = torch.cat([*(g.reshape(-1) for g in grads), torch.ones(1, device=grads[0].device, dtype=grads[0].dtype)])
        flat.mul_(batch)
        distributed.all_reduce_sum(flat)
        flat = flat[:-1] / flat[-1]
        torch._foreach_copy_(grads, [v.view_as(g) for v, g in zip(flat.split([g.numel() for g in grads]), grads)])


def _bn_sees_one_value(model: torch.nn.Module, image: torch.Tensor) -> bool:
    """Whether a BatchNorm layer of ``model`` gets a single value per channel from one image (``image``, a batch
    of one): its features have no positions (BatchNorm1d on flat features, or a BatchNorm2d after the feature
    map has shrunk to 1x1, as in a ResNet on 8x8 images), so a one-image batch has no variance to normalise
    with while training. Found by running the image through the network once (eval mode)."""
    seen: list[bool] = []
    hooks = [m.register_forward_hook(lambda _m, args, _out: seen.append(math.prod(args[0].shape[2:]) == 1))
             for m in bn_modules(model)]
    try:
        probe_forward(model, image)
    finally:
        for h in hooks:
            h.remove()
    return any(seen)


def check_batches(n: int, batch_size: int, model: torch.nn.Module, image: torch.Tensor | None = None) -> None:
    """Refuse, before training, batches that cannot train: every rank needs at least one image of every
    global batch (the last one included), and a network whose BatchNorm layers see one value per channel for
    one image (``_bn_sees_one_value`` on ``image``; without it, any BatchNorm network) at least two images in
    a BatchNorm's batch: a rank's piece, or the global batch with SyncBatchNorm."""
    d = distributed.current()
    world = d.world if d is not None else 1
    smallest = min(batch_size, n - (n - 1) // batch_size * batch_size) if n else 0
    if smallest < world:
        raise ConfigError(f"with {n} training images and --batch-size {batch_size}, a batch has only {smallest} "
                          f"image(s) for {world} ranks; every rank needs one: change --batch-size or use fewer "
                          "ranks.")
    bns = bn_modules(model)
    synced = any(isinstance(m, torch.nn.SyncBatchNorm) for m in bns)
    if synced:
        world = 1  # the statistics are the global batch's
    if bns and smallest // world < 2 and (image is None or _bn_sees_one_value(model, image)):
        where = "every batch" if batch_size // world < 2 else "the last batch of an epoch"
        piece = f" (split over {world} ranks)" if world > 1 else ""
        raise ConfigError(f"with {n} training images and --batch-size {batch_size}, {where}{piece} gives a "
                          f"BatchNorm layer a single image, which it cannot normalise while training; change "
                          f"--batch-size (e.g. to {batch_size + 1}).")


def sgd_step(model: torch.nn.Module, opt: torch.optim.Optimizer, device: torch.device, precision: str, *,
             cuda_graphs: bool = False) -> Callable[[torch.Tensor, torch.Tensor, float],
                                                   tuple[torch.Tensor, torch.Tensor]]:
    """The plain training step (train, fge): set lr, forward, cross-entropy, backward, SGD step.

    With ``cuda_graphs`` (``opt`` from ``graphs.sgd(..., graphs=True)``) the step is replayed as a CUDA graph.
    In a distributed run the gradients are summed over ranks before the SGD step (``GradSum``).
    """
    grad_sum = GradSum.for_run(cuda_graphs)
    params = [p for p in model.parameters() if p.requires_grad]

    def body(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        train_mode(model)
        with autocast(device, precision, cache=not cuda_graphs):
            out = model(x)
        loss = F.cross_entropy(out.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_sum is not None:  # parameters the network left unused have no gradient on any rank
            grad_sum([p.grad for p in params if p.grad is not None], y.shape[0])
        opt.step()
        return loss.detach(), out.detach()

    graphed = GraphedStep(body, enabled=cuda_graphs)

    def step(x: torch.Tensor, y: torch.Tensor, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        set_lr(opt, lr)
        return graphed(x, y)

    return step


def fit(step: Callable[[torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]], *,
        model: torch.nn.Module, cfg: Any,
        data: Data, log: MetricsLog, start_epoch: int, output: Path,
        save_state: Callable[[int, Path, str], None], evaluate: Callable[[], dict[str, float]],
        quiet: bool, desc: str, lr_fn: Callable[[int, int, int], float] | None = None,
        after_step: Callable[[int, int], None] | None = None,
        old_run: Callable[[], None] | None = None) -> None:
    """The epoch loop shared by ``train``, ``connect`` and ``fge``.

    ``step(x, y, lr)`` does one optimisation step of ``model`` and returns the (detached) mean loss and logits;
    ``lr_fn(epoch, i, iters_per_epoch)`` gives its learning rate (default: ``cfg.schedule``) and
    ``after_step(epoch, i)`` runs after it (e.g. to take a snapshot). After each epoch: ``evaluate()``,
    a metrics row, the resumable state, then the metrics file. ``old_run`` (``old_run_remover``) runs once
    the last check has passed, before the first epoch.
    ``cfg`` needs epochs, lr, schedule, seed, batch_size and save_every.
    """
    lr_fn = lr_fn or (lambda epoch, i, n: lr_at(cfg.schedule, cfg.lr, epoch, cfg.epochs, i, n))
    d = distributed.current()
    check_batches(len(data.train), cfg.batch_size, model,
                  blank_images(model, 1, data.info.in_chans, data.info.image_size))
    if old_run is not None:
        old_run()
    state_file = state_path(output)
    metrics_before = log.path.stat().st_mtime_ns if log.path.exists() else None  # to tell what this run wrote
    saved = start_epoch  # epochs in the state file (a Ctrl-C may hit while it is being written)
    saving = 0  # the epoch whose files are being written, trained in full (0: none)
    n_iter = data.train.num_batches(cfg.batch_size)
    dev = getattr(data.train, "device", torch.device("cpu"))
    try:
        with progress_bar(quiet) as bar:
            ep_task = bar.add_task(desc, total=cfg.epochs, completed=start_epoch, info="")
            it_task = bar.add_task("  batches", total=n_iter, info="")
            for epoch in range(start_epoch, cfg.epochs):
                t0 = time.time()
                torch.manual_seed(_epoch_seed(cfg.seed, epoch))
                if hasattr(step, "start_epoch"):
                    step.start_epoch(_epoch_seed(cfg.seed, epoch))
                losses = torch.zeros(n_iter, device=dev)
                wrong = torch.zeros((), device=dev, dtype=torch.long)
                seen = 0
                bar.reset(it_task, total=n_iter)
                batches = data.train.batches(cfg.batch_size, shuffle=True, augment=True,
                                             seed=_epoch_seed(cfg.seed, epoch), chunk=d.part if d else None)
                for i, (x, y) in enumerate(batches):
                    lr = lr_fn(epoch, i, n_iter)
                    loss, out = step(x, y, lr)
                    losses[i] = loss * y.shape[0]
                    wrong += (out.argmax(1) != y).sum()
                    seen += y.shape[0]
                    if (i + 1) % _NAN_CHECK_EVERY == 0 or i + 1 == n_iter:
                        good = state_file if state_file.exists() else None
                        # (fge and sse flush their snapshots' metrics during epoch 1: nothing to resume them from)
                        _check_finite(losses[: i + 1], epoch, good, (output, log.path),
                                      lr, getattr(cfg, "wd", 0) or 0,
                                      discard=(log.path, metrics_before) if good is None and writes_files() else None)
                    if after_step is not None:
                        after_step(epoch, i)
                    bar.advance(it_task)
                if d is not None:  # the epoch's sums over all ranks
                    sums = distributed.all_reduce_sum(torch.stack([losses.double().sum(), wrong.double(),
                                                                   torch.tensor(float(seen), device=dev,
                                                                                dtype=torch.float64)]))
                    loss_sum, wrong_sum, seen_sum = (float(v) for v in sums)
                else:
                    loss_sum, wrong_sum, seen_sum = float(losses.sum()), float(wrong), seen
                shown_row = {"lr": lr, "train/loss": loss_sum / seen_sum, "train/err": wrong_sum / seen_sum,
                             **evaluate()}
                # evaluate() may add values only for the progress display (the log keeps its own columns)
                row = {k: v for k, v in shown_row.items() if k in log.columns}
                log.append(epoch + 1, **row, seconds=time.time() - t0)
                # Order matters: a --save-every checkpoint first (a run stopped before the state below redoes
                # this epoch and writes it again), then the state (with the history), then the metrics file
                # it reproduces.
                saving = epoch + 1
                if cfg.save_every and (epoch + 1) % cfg.save_every == 0 and epoch + 1 < cfg.epochs:
                    save_state(epoch + 1, snapshot_path(output, epoch + 1), "train-state")
                save_state(epoch + 1, state_file, "train-state")
                saved, saving = epoch + 1, 0
                log.flush()
                shown = "  ".join(f"{k} {v:.4g}" for k, v in shown_row.items() if k != "lr")
                bar.update(ep_task, completed=epoch + 1, info=shown)
    except KeyboardInterrupt:
        done = _epochs_saved(saved, state_file)
        # (an epoch trained in full whose files were being written is trained again on --resume)
        where = (f"while saving epoch {saving}, which --resume trains again" if saving > done else
                 f"during epoch {done + 1}")
        if not state_file.exists():
            # fge and sse record snapshots as they are taken: the metrics file may be this run's, and then a new
            # run needs --force (unless it was there before, when this command already had --force)
            if log.path.exists() and log.path.stat().st_mtime_ns != metrics_before:
                again = "plus --force" if metrics_before is None else "again"
                raise Interrupted(f"interrupted {_where_first(saving)}; nothing resumable was saved ('{log.path}' "
                                  f"holds only snapshots of that epoch). Run the same command {again} to start "
                                  "over.") from None
            raise Interrupted(f"interrupted {_where_first(saving)}; nothing was saved. Run the same command again to "
                              "start over.") from None
        if done >= cfg.epochs:  # after the last state was written, before fit returned
            raise Interrupted(_all_epochs_saved(state_file, cfg.epochs)) from None
        raise Interrupted(f"interrupted {where}; {done} completed epoch(s) are saved in '{state_file}'. Continue "
                          "with the same command plus --resume.") from None
    except distributed.PeerLost as e:  # a rank killed or crashed: say what the others had saved
        done = _epochs_saved(saved, state_file)
        kept = (f"{done} completed epoch(s) are saved in '{state_file}': continue with the same command plus "
                "--resume (with any number of processes)." if state_file.exists() and done else
                "no epoch had completed, so nothing resumable was saved; run the command again.")
        raise distributed.PeerLost(f"{str(e).rstrip('.')}; {kept}") from None


def history_json(rows: list[dict[str, Any]]) -> str:
    """The epoch history a training state or ``--save-every`` checkpoint records (the metrics file's rows, which
    ``--resume`` restores), without the wall-clock ``seconds`` when ``SOURCE_DATE_EPOCH`` asks for files that a
    rerun writes byte for byte (docs/file-formats.md#reproducible-files)."""
    if source_date_epoch() is not None:
        rows = [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    return json.dumps(rows)


def _where_first(saving: int) -> str:
    """Where a run stopped before its first epoch was saved: in its training, or while writing its files."""
    return ("while saving epoch 1, before its files were complete" if saving else
            "during epoch 1, before any epoch was complete")


def _epochs_saved(saved: int, state_file: Path) -> int:
    """The epochs in the state file when a run stopped: ``saved``, or more if the stop came inside
    ``save_state`` after its file was in place."""
    with contextlib.suppress(Exception):
        return max(saved, int(read_metadata(state_file).get("epoch", saved)))
    return saved


@contextlib.contextmanager
def finishing(output: Path, epochs: int) -> Iterator[None]:
    """Around what ``train``, ``connect`` and ``fge`` do after ``fit``'s last epoch (final evaluations, the
    outputs): Ctrl-C there keeps the training state of all epochs, and the error says how to finish."""
    try:
        yield
    except Interrupted:  # (already said what was saved)
        raise
    except KeyboardInterrupt:
        state = state_path(output)
        if not state.exists() or not writes_files():
            raise
        raise Interrupted(_all_epochs_saved(state, epochs)) from None


def _all_epochs_saved(state: Path, epochs: int) -> str:
    return (f"interrupted after the last epoch, while finishing; all {epochs} epochs are saved in '{state}'. "
            "Finish with the same command plus --resume (no epoch is trained again).")


def _check_finite(weighted_losses: torch.Tensor, epoch: int, good_state: Path | None,
                  outputs: tuple[Path, ...] = (), lr: float = 0.0, wd: float = 0.0,
                  discard: tuple[Path, int | None] | None = None) -> None:
    """Stop on a NaN or infinite loss; the message says what was kept, and asks for --force only if a file
    (the state, or one of ``outputs``) is there to be replaced. The advice names --wd too when it is extreme
    (1 or more) and the step's lr x wd is 1 or more: weight decay alone then overshoots zero at every step
    (from 2 on the weights grow). ``discard`` = (file, its mtime before the run): that file, if this run wrote
    it, is removed first (nothing can resume it)."""
    bad = ~torch.isfinite(weighted_losses)
    if bool(bad.any()):
        if discard is not None and discard[0].exists() and discard[0].stat().st_mtime_ns != discard[1]:
            discard[0].unlink(missing_ok=True)
        it = int(bad.nonzero()[0, 0])
        kept = (f"the last good state (end of epoch {epoch}) is kept in '{good_state}'" if good_state
                else "no epoch had completed, so nothing was saved")
        force = " (and --force)" if good_state or any(p.exists() for p in outputs) else ""
        advice = (f" or weight decay (learning rate x --wd is {lr * wd:.3g}: from 1 on, weight decay alone "
                  "overshoots at every step)" if wd >= 1 and lr * wd >= 1 else "")
        raise NonFiniteLossError(f"the loss became NaN/inf in epoch {epoch + 1}, iteration {it + 1}; training "
                                 f"stopped and {kept}. Start again with a lower learning rate{advice}{force}.")
