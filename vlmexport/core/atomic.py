"""Atomic outputs: long jobs write into a temporary sibling and rename at the end.

An interrupted export, calibration or training checkpoint therefore never leaves a
directory that looks complete, and never destroys what was at the path before.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
from pathlib import Path
from typing import Iterator

from .errors import VlmexportError

log = logging.getLogger(__name__)


def user_cache_dir(name: str) -> Path:
    """``$VLMEXPORT_CACHE/NAME`` (default ``~/.cache/vlmexport/NAME``): what a job may keep between runs."""
    return Path(os.environ.get("VLMEXPORT_CACHE", Path.home() / ".cache" / "vlmexport")) / name


class Terminated(BaseException):
    """SIGTERM (a job scheduler's timeout, ``kill``): raised in the main thread so that every
    ``atomic_directory`` / ``atomic_file`` on the way out removes its temporary output, as
    for Ctrl-C. (A C call in progress, e.g. llama.cpp's quantizer, finishes first.)"""


# Set by the SIGTERM handler as well as raising: an exception raised by a signal handler while
# Python runs a callback (a weakref's, an import lock's) is printed and dropped, and the job would
# go on to publish its output. Nothing is published once a stop was asked for.
_STOP = threading.Event()


def request_stop() -> None:
    _STOP.set()


def clear_stop() -> None:
    _STOP.clear()


def stop_requested() -> bool:
    return _STOP.is_set()


def check_stop() -> None:
    """Raise :class:`Terminated` if a stop was asked for (see :data:`_STOP`)."""
    if _STOP.is_set():
        raise Terminated()


def publish_permissions(root: Path) -> None:
    """mkdtemp makes 0700 directories; give the result the user's normal permissions."""
    umask = os.umask(0)
    os.umask(umask)
    for p in [root, *root.rglob("*")]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


RENAME_ATTEMPTS = 8


class AtomicWriteError(VlmexportError):
    """An output cannot be put in place (another process keeps replacing it, or a lock is held)."""


def replace_dir(tmp: Path, out: Path) -> None:
    """Swap ``tmp`` into place of ``out``; the previous ``out`` is removed only after the swap.

    Two commits can race (both move ``out`` aside, then both rename onto it): a rename
    that finds ``out`` gone or re-created tries again, and every version moved aside is
    removed at the end, so the last commit wins and none fails with a traceback."""
    moved: list[Path] = []
    try:
        for attempt in range(RENAME_ATTEMPTS):
            if out.exists() or out.is_symlink():
                old = out.with_name(f".{out.name}.old-{_owner_tag()}-{attempt}")
                try:
                    os.replace(out, old)
                    moved.append(old)
                except FileNotFoundError:  # another commit moved it aside first
                    continue
            try:
                os.replace(tmp, out)
                return
            except OSError as exc:  # another commit landed in between: ENOTEMPTY / EEXIST
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
        raise AtomicWriteError(f"{out}: another process kept replacing it ({RENAME_ATTEMPTS} tries); run one writer "
                               "at a time")
    finally:
        for old in moved:
            shutil.rmtree(old, ignore_errors=True)


def _owner_tag() -> str:
    """``<host>-<pid>``: which process owns a hidden work directory (see :func:`clean_stale`)."""
    host = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:16] or "host"
    return f"{host}-{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def clean_stale(out: str | os.PathLike) -> list[Path]:
    """Remove ``out``'s hidden work directories (``.NAME.tmp-HOST-PID-*``, ``.NAME.old-HOST-PID-*``)
    left by a process of this host that no longer runs (killed with SIGKILL, power loss).
    Directories of live processes, of other hosts (a shared file system) and untagged ones are
    kept. Returns what was removed."""
    out = Path(out)
    if not out.parent.is_dir():
        return []
    host = _owner_tag().rsplit("-", 1)[0]
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(?:tmp|old)-(?P<host>[A-Za-z0-9]+)-(?P<pid>\d+)-")
    removed = []
    for p in out.parent.iterdir():
        m = pattern.match(p.name)
        if m and m["host"] == host and not _alive(int(m["pid"])) and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
    if removed:
        log.warning("removed %d stale work director%s of %s left by a killed process", len(removed),
                    "y" if len(removed) == 1 else "ies", out)
    return removed


@contextlib.contextmanager
def output_lock(out: str | os.PathLike, what: str = "build") -> Iterator[Path]:
    """Hold an exclusive lock on ``out`` (a ``.NAME.lock`` file beside it, via ``filelock``) for a
    long job; a second job on the same path fails at once with one line instead of racing.
    The lock is released when the process ends, however it ends (flock)."""
    from filelock import FileLock, Timeout

    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AtomicWriteError(f"{out.parent}: cannot create the output directory ({exc.strerror}); choose a "
                               "writable path") from None
    lock_path = out.with_name(f".{out.name}.lock")
    lock = FileLock(lock_path, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise AtomicWriteError(f"{out}: another {what} is writing it (lock {lock_path.name} is held); wait for it "
                               "to finish or choose another output path") from None
    except OSError as exc:
        raise AtomicWriteError(f"{out.parent}: cannot write there ({exc.strerror}); choose a writable output "
                               "path") from None
    try:
        yield out
    finally:
        lock.release()


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``out`` when the block succeeds.

    Stale work directories of ``out`` left by killed processes are removed first
    (:func:`clean_stale`)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{_owner_tag()}-", dir=out.parent))
    try:
        yield tmp
        check_stop()
        publish_permissions(tmp)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path that replaces ``path`` when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-{_owner_tag()}-", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        check_stop()
        publish_permissions(tmp) if tmp.is_dir() else tmp.chmod(0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m
