"""Safe file handling shared by every command: output checks, locks, atomic writes, hashes.

Every command that writes files calls ``check_outputs`` before any work: it refuses outputs that share a
file with each other or with an input, existing outputs without ``force``, and outputs that another mctool
run is writing (an advisory lock ``.NAME.lock`` beside each output, held until the command returns).
Files are written through ``atomic_path``: a temporary ``.NAME.XXXXXXXX.tmp`` in the same folder, synced
and renamed into place; temporaries left by a killed run are removed by the next run writing that output.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import functools
import hashlib
import os
import re
import secrets
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, TypeVar

from .errors import OutputError

try:
    import fcntl
except ImportError:  # not on Windows: no locks there
    fcntl = None

#: The first bytes of every HDF5 file (a metrics file).
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"

_F = TypeVar("_F", bound=Callable[..., Any])
PathLike = str | os.PathLike
# Temporary files this process is writing now: never removed as stale.
_WRITING: set[str] = set()
# The locks taken inside the innermost ``holds_output_locks`` call: real path -> function releasing it.
_LOCKS: contextvars.ContextVar[dict[str, Callable[[], None]] | None] = contextvars.ContextVar("mctool_locks",
                                                                                            default=None)
# The folders ``check_output`` created inside the innermost ``holds_output_locks`` call, deepest first per output.
_CREATED: contextvars.ContextVar[list[Path] | None] = contextvars.ContextVar("mctool_created", default=None)


def writes_files() -> bool:
    """Whether this process writes files: always, except on the ranks other than 0 of a distributed run
    (rank 0 checks, locks and writes every output; the others compute and stay off the disk)."""
    from .distributed import is_main  # (torch: not for the command line's start-up)

    return is_main()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def same_inputs(recorded: Any, inputs: dict[str, str]) -> bool:
    """Whether a run recorded as made from ``recorded`` (path -> sha256) used the files ``inputs``: the same
    contents, however their paths are spelled now (relative or absolute, another working folder: a requeued
    job). The order of the inputs is each caller's to check where it matters."""
    return isinstance(recorded, dict) and sorted(map(str, recorded.values())) == sorted(inputs.values())


def did_you_mean(path: str | os.PathLike) -> str:
    """For a file that does not exist: " Did you mean ...?" naming up to 3 files of its folder with close names
    and the same suffix (e.g. the --save-every checkpoints that exist), or ""."""
    import difflib

    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    try:
        stems = sorted(p.stem for p in folder.iterdir() if p.suffix == path.suffix and p.is_file())[:10_000]
    except OSError:
        return ""
    close = difflib.get_close_matches(path.stem, stems, n=3, cutoff=0.7)  # names, not the shared suffix
    return f" Did you mean {', '.join(repr(str(folder / (c + path.suffix))) for c in close)}?" if close else ""


# The names of a process's own streams (``-o /dev/stdout`` in a pipe led to "/proc/PID/fd/pipe:[N]" messages).
_STREAM = re.compile(r"/dev/(stdout|stderr|stdin|fd/\d+)|/proc/(self|thread-self|\d+)(/task/\d+)?/fd/[^/]+")


def check_output(path: str | os.PathLike, force: bool, what: str = "output") -> Path:
    """Refuse an existing output unless ``force``; make sure its folder exists and is writable.

    Called before any work starts, so a long run never fails at its very end.
    """
    if str(path) in ("", "."):  # (the command line turns an empty name into '.')
        raise OutputError(f"{what} is empty (or '.'), not a file name; give a file name.")
    if Path(path).name in ("", ".", ".."):
        raise OutputError(f"{what} '{path}' is not a file name; give a file name.")
    if str(path) == "-" or any(_STREAM.fullmatch(p) for p in (os.path.abspath(path), os.path.realpath(path))):
        # (safetensors and HDF5 files are written by seeking; the names as written and as the links resolve)
        raise OutputError(f"{what} '{path}': mctool writes files, not to stdout or stderr; give a file name.")
    folder_name = _given_as_folder(path)
    if folder_name is not None:
        raise OutputError(f"{what} '{folder_name}' names a folder (it ends with '/'); give a file name.")
    path = Path(path)
    if not writes_files():  # rank 0 checks (another rank could see rank 0's new file as existing)
        return path
    if path.is_symlink():  # a link counts as the file it leads to (which is written, the link kept)
        path = Path(os.path.realpath(path))
        if path.is_symlink():  # (realpath leaves a loop of links as it is: it leads to no file to write)
            raise OutputError(f"{what} '{path}' is a symbolic link that leads to itself (a loop of links); give "
                              "another name, or remove the link.")
    if path.is_dir():
        raise OutputError(f"{what} '{path}' is a folder; give a file name.")
    if path.exists() and not path.is_file():  # a device, pipe or socket: --force must not replace it
        raise OutputError(f"{what} '{path}' is not a regular file (a device, pipe or socket); give another name.")
    if path.exists() and not force:
        raise OutputError(f"{what} '{path}' already exists; pass --force to overwrite it.")
    if path.exists() and not os.access(path, os.R_OK):  # (a file replaced keeps its mode: mctool reads what it wrote)
        raise OutputError(f"{what} '{path}' exists and may not be read (its permissions); the file that replaces it "
                          "would keep them, and mctool reads what it writes (its sha256). Change them (chmod u+r) "
                          "or give another name.")
    folder = path.parent if str(path.parent) else Path(".")
    missing = [f for f in (folder, *folder.parents) if not os.path.lexists(f)]
    holder = next((f for f in (folder, *folder.parents) if os.path.lexists(f)), None)  # the deepest that exists
    if holder is not None and not holder.is_dir():
        raise OutputError(f"cannot write {what} '{path}': '{holder}' is a file, not a folder; give another path.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        created = _CREATED.get()
        if created is not None:
            created.extend(missing)
        fd, probe = tempfile.mkstemp(prefix=".mctool-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"cannot write {what} '{path}': folder '{folder}' is not writable ({e.strerror}).") from None
    return path


# What each kind of output is written as, and the name endings that say so. A name may end otherwise (``-o run1``,
# ``-o model.v2``) unless its ending names another format: a safetensors file called ``model.pt`` would be handed
# to ``torch.load`` by the next tool. Figures and VTK files are read by their ending, so theirs must match.
_ENDINGS = {"safetensors": (".safetensors",), "hdf5": (".h5", ".hdf5"), "figure": (".png", ".pdf", ".svg"),
            "html": (".html", ".htm"), "vtk-grid": (".vts",), "vtk-points": (".vtp",)}
_STRICT = {"figure", "vtk-grid", "vtk-points"}
_OTHER_FORMATS = {".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle", ".npy", ".npz", ".json", ".csv", ".txt",
                  ".onnx", ".jpg", ".jpeg", ".gif", ".eps", ".ps", ".vtk", ".vtu", ".hdf", ".nc", ".zip", ".gz",
                  ".tar", ".yaml", ".yml", ".md"}


def check_format(path: PathLike, fmt: str, what: str = "output") -> None:
    """Refuse an output name whose ending names another format than ``fmt`` (a key of ``_ENDINGS``)."""
    endings = _ENDINGS[fmt]
    suffix = Path(path).suffix.lower()
    if suffix in endings:
        return
    others = {e for f, es in _ENDINGS.items() if f != fmt for e in es} | _OTHER_FORMATS
    ending = " or ".join([", ".join(endings[:-1]), endings[-1]] if len(endings) > 1 else endings)
    if fmt == "figure":
        raise OutputError(f"{what} '{path}': figures are drawn as PNG, PDF or SVG, chosen by the name's ending; "
                          f"end the name with {ending}.")
    if fmt in _STRICT:
        raise OutputError(f"{what} '{path}': ParaView reads this file by its name's ending; end the name with "
                          f"{ending}.")
    if suffix in others:
        writes = {"safetensors": "a safetensors file", "hdf5": "an HDF5 file", "html": "an HTML page"}[fmt]
        raise OutputError(f"{what} '{path}' would hold {writes}, but '{suffix}' is the ending of another format; "
                          f"end the name with {ending}.")


def figure_format(path: PathLike) -> str:
    """The matplotlib format of a figure output, from its ending: ``png``, ``pdf`` or ``svg``."""
    check_format(path, "figure", "figure")
    return Path(path).suffix.lower()[1:]


def _identity(path: Path) -> tuple[int, int] | str:
    """What a name reaches: (device, inode) of an existing file (so hard links match), else the path with
    symlinks resolved."""
    try:
        st = os.stat(path)
        return st.st_dev, st.st_ino
    except OSError:
        return os.path.realpath(path)


def _given_as_folder(path: str | os.PathLike) -> str | None:
    """The name as given, when it ends with a slash ('runs/a/': a folder, which ``pathlib`` and the command
    line's path options turn into the file 'runs/a'); else None. Under the CLI the arguments tell."""
    from .h5io import COMMAND_LINE

    seps = tuple({"/", os.sep})
    if isinstance(path, str) and path.endswith(seps):
        return path
    for arg in COMMAND_LINE.get() or ():
        value = arg.split("=", 1)[1] if arg.startswith("--") and "=" in arg else arg
        if value.endswith(seps) and value.rstrip("".join(seps)) and str(Path(value)) == str(Path(path)):
            return value
    return None


def check_outputs(outputs: Mapping[str, PathLike | None], inputs: Iterable[PathLike | None] = (), *,
                  force: bool = False, derived: Mapping[str, PathLike] | None = None,
                  locked: Mapping[str, PathLike] | None = None,
                  formats: Mapping[str, str] | None = None) -> dict[str, Path]:
    """Check all outputs of one command before any work; returns them as paths (``None`` entries dropped).

    ``outputs`` maps a description (usually the option, e.g. ``--metrics``) to a file the command writes;
    ``derived`` maps descriptions to files written alongside them (a training state, --save-every
    checkpoints); ``locked`` those of them that are also locked like outputs (a training state, which runs
    with ``-o x`` and ``-o x.safetensors`` share); ``formats`` maps descriptions to what the file is written as
    (see ``check_format``). Refused, whatever ``force``: two of these that are one file (symlinks and hard links
    included), any of them that is one of ``inputs``, and a name whose ending names another format. Then each
    output must be new unless ``force`` (see ``check_output``) and not being written by another mctool run. Inside a
    ``holds_output_locks`` call the outputs (and ``locked``) stay locked until it returns, and temporary
    files a killed run left for any of these files are removed.
    """
    sources = {_identity(Path(p)) for p in inputs if p is not None}
    named = {what: Path(p) for what, p in outputs.items() if p is not None}
    extra = {**(derived or {}), **(locked or {})}
    every = [*named.items(), *((what, Path(p)) for what, p in extra.items())]
    seen: dict[tuple[int, int] | str, str] = {}
    for what, path in every:
        _check_name_text(path, what)
        _check_name_length(path, what, derived=what not in named)
        key = _identity(path)
        if key in sources:
            raise OutputError(f"{what} '{path}' is also an input of this command; mctool never overwrites its "
                              "inputs, so give the output another name.")
        if key in seen:
            raise OutputError(f"{seen[key]} and {what} are the same file '{path}'; give each output its own name.")
        seen[key] = what
    for what, fmt in (formats or {}).items():
        if named.get(what) is not None:
            check_format(named[what], fmt, what)
    for what, path in named.items():
        check_output(path, force, what)
    locks = _LOCKS.get()
    if locks is not None and fcntl is not None and writes_files():
        to_lock = {os.path.realpath(p) for p in [*named.values(), *(locked or {}).values()]}
        for path in sorted(to_lock - set(locks)):
            locks[path] = _lock(Path(path))
        _remove_stale_temporaries([path for _, path in every])
    return named


def _check_name_text(path: Path, what: str) -> None:
    """Refuse a name that is not text (bytes that no encoding the system uses decodes, kept by Python as
    surrogates): runs record their outputs' names in files whose text is UTF-8 (a training state names its
    metrics file), and such a run would fail at that write, after the work."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        shown = str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        raise OutputError(f"{what} '{shown}': the name is not valid text (UTF-8); mctool records its outputs' names "
                          "in its files. Give the output a name of letters, digits and punctuation.") from None


def _check_name_length(path: Path, what: str, derived: bool = False) -> None:
    """Refuse a name whose temporary file (``.NAME.XXXXXXXX.tmp``, 14 bytes longer) the file system could not
    hold: such a run would fail at its first write, after the work. ``derived``: a name made from an option's
    (a training state's), which is the one to shorten."""
    folder = path.parent if str(path.parent) else Path(".")
    existing = next((f for f in (folder, *folder.parents) if f.is_dir()), Path("."))
    try:
        limit = os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        limit = 255
    size = len(os.fsencode(path.name))
    if size + 14 > limit:
        fix = (f"Shorten the name it is made from by {size + 14 - limit} bytes or more." if derived else
               f"Give a name of at most {limit - 14} bytes.")
        raise OutputError(f"{what} '{path}': its name is {size} bytes, and mctool needs {size + 14} for the "
                          f"temporary file it writes first; this file system allows {limit}. {fix}")


def holds_output_locks(fn: _F) -> _F:
    """Keep the outputs that ``check_outputs`` locked during a call of ``fn`` locked until it returns or raises;
    if it raises, also remove the folders ``check_output`` created for its outputs that are still empty."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        locks: dict[str, Callable[[], None]] = {}
        created: list[Path] = []
        token, created_token = _LOCKS.set(locks), _CREATED.set(created)
        done = False
        try:
            result = fn(*args, **kwargs)
            done = True
            return result
        finally:
            _LOCKS.reset(token)
            _CREATED.reset(created_token)
            for release in reversed(locks.values()):
                release()
            if not done:
                for folder in created:  # deepest first; a folder holding anything stays
                    with contextlib.suppress(OSError):
                        folder.rmdir()

    return wrapper  # type: ignore[return-value]


# The descriptors of the locks this process holds. A forked child (a DataLoader worker) shares their flock
# locks: killed with kill -9, the run's locks lived on in its orphaned workers until they noticed (about
# 1.5 s), and an immediate --resume was refused. Children close their copies; the parent's hold the locks.
_HELD: dict[int, Path] = {}  # (each descriptor: the output it locks)


def _close_inherited_locks() -> None:
    for fd in list(_HELD):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


if hasattr(os, "register_at_fork"):  # (not on Windows, which neither forks nor has these locks)
    os.register_at_fork(after_in_child=_close_inherited_locks)


def lock_path(output: PathLike) -> Path:
    """The advisory lock file of an output: ``.NAME.lock`` beside it."""
    output = Path(output)
    return output.with_name(f".{output.name}.lock")


def being_written(output: PathLike) -> bool:
    """Whether a running mctool command holds the lock of ``output`` (it is writing it now). Creates nothing."""
    if fcntl is None:  # (no advisory locks here: nobody can say)
        return False
    try:
        fd = os.open(lock_path(output), os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:  # no lock file (or a link): nobody is writing it
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # a file system without locks
        return False
    finally:
        os.close(fd)  # (closing releases a lock taken here)
    return False


def _same_file(a: int, b: int) -> bool:
    try:
        return os.path.samestat(os.fstat(a), os.fstat(b))
    except OSError:
        return False


def _lock(output: Path) -> Callable[[], None]:
    """Take the lock of ``output`` without waiting; returns the function that releases it (and removes the file)."""
    path = lock_path(output)
    for _ in range(20):
        try:
            # (never through a link: in a shared folder it could make mctool create or open a file elsewhere)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise OutputError(f"cannot write '{output}': its lock file '{path}' is a symbolic link; remove "
                                  "it.") from None
            raise OutputError(f"cannot write '{output}': cannot create its lock file '{path}' "
                              f"({e.strerror}).") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            mine = next((other for held, other in _HELD.items() if _same_file(held, fd)), None)
            os.close(fd)
            if mine is not None:  # this command's own lock: two of its outputs are one file here
                raise OutputError(f"'{mine}' and '{output}' are one file on this file system (names that differ "
                                  "only in case, on a case-insensitive one such as macOS's?); give each output its "
                                  "own name.") from None
            raise OutputError(f"another mctool run is writing '{output}' (it holds the lock '{path}'); wait for it "
                              "to finish, or write to another file.") from None
        except OSError:  # a file system without locks: go on without one
            os.close(fd)
            return lambda: None
        # A run releasing the lock removes the file: make sure ours is still the one under that name.
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    else:
        raise OutputError(f"cannot lock '{output}': '{path}' keeps changing; is another mctool run starting?")
    _HELD[fd] = output

    def release() -> None:
        with contextlib.suppress(OSError):
            os.unlink(path)
        _HELD.pop(fd, None)
        os.close(fd)

    return release


# The name ``atomic_path`` gives the temporary file of NAME (and tempfile.mkstemp gave in mctool 0.1).
_TEMPORARY = re.compile(r"\.(.+)\.[a-z0-9_]{8}\.tmp")


def _remove_stale_temporaries(paths: list[Path]) -> None:
    """Remove ``.NAME.XXXXXXXX.tmp`` files of ``paths`` left by a killed run (the caller holds their lock)."""
    names: dict[Path, set[str]] = {}
    for path in paths:
        names.setdefault(path.parent, set()).add(path.name)
    for folder, wanted in names.items():
        try:
            entries = os.listdir(folder)
        except OSError:
            continue
        for entry in entries:
            found = _TEMPORARY.fullmatch(entry)
            tmp = folder / entry
            if found and found.group(1) in wanted and os.path.abspath(tmp) not in _WRITING:
                if tmp.is_dir() and not tmp.is_symlink():  # a ``private_folder`` (safetensors' own temporary inside)
                    shutil.rmtree(tmp, ignore_errors=True)
                elif tmp.is_file():
                    with contextlib.suppress(OSError):
                        tmp.unlink()


@contextlib.contextmanager
def private_folder(tmp: Path) -> Iterator[Path]:
    """A new folder beside ``atomic_path``'s temporary file ``tmp``, named like it (``.NAME.XXXXXXXX.tmp``), for a
    writer that makes temporary files of its own beside its target (safetensors): left by a killed run, it is
    removed, with what is inside, by the next run writing NAME; removed at once otherwise."""
    name = _TEMPORARY.fullmatch(tmp.name)
    folder: Path | None = None
    try:  # (named before it is made: a Ctrl-C at any moment leaves no folder behind)
        for _ in range(100):
            folder = tmp.parent / f".{name.group(1) if name else tmp.name}.{secrets.token_hex(4)}.tmp"
            _WRITING.add(os.path.abspath(folder))
            try:
                os.mkdir(folder, 0o700)
                break
            except FileExistsError:
                _WRITING.discard(os.path.abspath(folder))
                folder = None
        if folder is None:
            raise OutputError(f"cannot write '{tmp.parent}': no free name for a temporary folder.")
        yield folder
    finally:
        if folder is not None:
            _WRITING.discard(os.path.abspath(folder))
            shutil.rmtree(folder, ignore_errors=True)


def _umask() -> int:
    """The process umask, read without changing it (Linux's /proc); elsewhere by setting it back at once."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def _fsync(path: PathLike, folder: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if folder else 0))
    except OSError:
        if not folder:  # (Windows cannot open a folder: there the rename is all there is)
            raise
        return
    try:
        os.fsync(fd)
    except OSError:
        if not folder:  # some file systems cannot sync a folder; the rename itself is still atomic
            raise
    finally:
        os.close(fd)


# Outputs an earlier run left that a new run with --force deleted before writing them again (``remove_output``):
# their permissions and group, by real path, for the new file (``atomic_path``).
_REMOVED: dict[str, tuple[int, int]] = {}


def remove_output(path: PathLike) -> None:
    """Delete an earlier run's output that a new run (``--force``) writes again later, so that an interrupted run
    never leaves it beside its own files: the file a link leads to (the link stays, as when it is written), its
    permissions and group kept for the file that takes its place."""
    path = Path(os.path.realpath(path)) if os.path.islink(path) else Path(path)
    with contextlib.suppress(FileNotFoundError):
        st = os.stat(path)
        _REMOVED[os.path.abspath(path)] = (stat.S_IMODE(st.st_mode), st.st_gid)
        path.unlink()


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path in the same folder; sync it and rename it onto ``path`` only if the block succeeds.

    A new output gets the permissions an ordinary new file would (0o666 less the umask); a file replaced keeps
    its own permissions and group (a checkpoint made private with ``chmod 600`` stays private after --force or
    a run's rewrite of it). A write that fails (a full disk...) raises ``OutputError``; ``path`` is then
    unchanged.
    """
    path = Path(path)
    if path.is_symlink():  # written where the link leads (the link stays), as check_output checked it
        path = Path(os.path.realpath(path))
    folder = path.parent if str(path.parent) else Path(".")
    tmp: Path | None = None
    try:
        try:
            for _ in range(100):
                tmp = folder / f".{path.name}.{secrets.token_hex(4)}.tmp"
                try:
                    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))  # private while written
                    break
                except FileExistsError:
                    tmp = None
            _WRITING.add(os.path.abspath(tmp))
            yield tmp
            _fsync(tmp)
            # Written (by us, or by a writer that replaced the file we made: safetensors), and private so far:
            # now the permissions an ordinary new file gets, or those of the file it replaces (set after the
            # sync, which reads the file: a file the user may not read, mode 0200, can still be replaced).
            try:
                old = os.stat(path)
                mode, group = stat.S_IMODE(old.st_mode), old.st_gid
            except FileNotFoundError:  # (a new file, or one a --force run deleted first: remove_output)
                mode, group = _REMOVED.pop(os.path.abspath(path), (0o666 & ~_umask(), None))
            if group is not None and group != os.stat(tmp).st_gid:
                with contextlib.suppress(OSError):  # (a group the user is not in: the file gets theirs)
                    os.chown(tmp, -1, group)
            os.chmod(tmp, mode)
            os.replace(tmp, path)
            _fsync(folder, folder=True)
        except OSError as e:
            raise OutputError(f"cannot write '{path}': {e.strerror or e}.") from e
    finally:
        if tmp is not None:
            _WRITING.discard(os.path.abspath(tmp))
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
