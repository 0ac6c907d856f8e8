"""Atomic outputs: artefacts are written to a temporary sibling and moved into place only when complete.

A run stopped with an exception, Ctrl-C or SIGTERM (the CLI turns SIGTERM into an exception) removes its temporary
at once. A run killed outright (SIGKILL, a power cut) cannot; its temporaries carry its process id
(`.NAME.tmp-PID-xxxx`), and the next write beside them sweeps those of dead processes. If the kill fell in the
instant between moving the previous artefact aside (`.NAME.old-PID-xxxx`) and moving the new one in, that sweep
puts the previous artefact back first. Either way the previous artefact is never lost and never half-written.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_DEBRIS = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-")


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; on success it replaces `path`, on error it is removed.

    A previous artefact at `path` stays intact until the new one is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    try:
        yield tmp
        umask = _umask()
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; an artefact gets the usual permissions
        for f in tmp.rglob("*"):
            if f.is_file():
                os.chmod(f, 0o666 & ~umask)
                _fsync(f)
        _failpoint("before-commit")
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-{os.getpid()}-", dir=path.parent))
            os.replace(path, old / path.name)
            _failpoint("between-renames")
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator:
    """Open a temporary file beside `path` for writing; it replaces `path` only when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        _failpoint("before-commit")
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp made it 0600; an artefact gets the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def recover(path: str | os.PathLike) -> Path:
    """For readers: where `path` is missing because a writer was killed mid-swap, put the previous artefact back."""
    path = Path(path)
    if not path.exists() and path.parent.is_dir():
        sweep(path)
    return path


def sweep(path: Path) -> list[Path]:
    """Remove what killed writers of `path` left beside it (restoring a previous artefact a kill left aside)."""
    removed = []
    try:
        siblings = list(path.parent.iterdir())
    except OSError:
        return removed
    for entry in sorted(siblings, key=lambda p: p.name):
        m = _DEBRIS.match(entry.name)
        if m is None or m["name"] != path.name or _alive(int(m["pid"])):
            continue
        if m["kind"] == "old" and not path.exists() and (entry / path.name).exists():
            os.replace(entry / path.name, path)  # the kill fell between the two renames: put it back
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


_HITS: dict[str, int] = {}


def _failpoint(name: str) -> None:
    """`ACG_FAILPOINT=NAME:SECONDS[:NTH]` pauses a writer there (at its NTH write, default the first), so that tests
    can kill it at that point (a test hook)."""
    spec = os.environ.get("ACG_FAILPOINT", "")
    point, _, rest = spec.partition(":")
    if point != name:
        return
    _HITS[name] = _HITS.get(name, 0) + 1
    nth = rest.partition(":")[2]
    if _HITS[name] == int(nth or 1):
        spec = f"{point}:{rest.partition(':')[0]}"
        mark = os.environ.get("ACG_FAILPOINT_MARK")
        if mark:
            Path(mark).write_text(str(os.getpid()))
        time.sleep(float(spec.partition(":")[2] or 60))


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(file: Path) -> None:
    with open(file, "rb") as f:
        os.fsync(f.fileno())
