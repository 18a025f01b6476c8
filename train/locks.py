"""Locks among the processes of one host: an exclusive lock for the few files several workers may create at once,
and the host's CPU lock, which gives a latency measurement the machine to itself."""
from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

# The host's CPU lock file, shared by the processes that set it: `python -m search multirun` sets it (to
# `host_cpu_lock()`, unless set already) for itself and the workers it starts, so every study of the user on the
# host takes part. Unset, `quiet_host` and `cpu_work` do nothing.
CPU_LOCK_ENV = "OCRDET_CPU_LOCK"
_quiet = threading.local()


@contextmanager
def host_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive `flock` on `path` for the block: an existing directory (nothing is created in it) or a
    lock file (created if missing).

    The kernel drops the lock when its descriptor is closed, so a worker killed inside the block cannot leave it
    held.
    """
    if not path.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
    with _flock(path, fcntl.LOCK_EX):
        yield


def build_folder(root: Path, is_complete: Callable[[Path], bool], build: Callable[[Path], None],
                 check_replaceable: Callable[[Path], None] | None = None) -> Path:
    """``root`` as ``build`` makes it, unless ``is_complete(root)`` already holds: built in a sibling temp folder and
    swapped in by rename, so an interrupted build never leaves a partial folder that looks complete.

    Workers started together would each build it and swap their copy in under the others' feet: one builds, the
    rest wait on a lock on the parent folder itself (no lock file) and find it complete. ``check_replaceable``
    may refuse to replace what is at ``root`` (it raises).
    """
    root = Path(root)
    if is_complete(root):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with host_lock(root.parent):
        if is_complete(root):
            return root
        if check_replaceable is not None:
            check_replaceable(root)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
        try:
            build(tmp)
            if root.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
                root.rename(old / root.name)
                tmp.rename(root)
                shutil.rmtree(old)
            else:
                tmp.rename(root)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
    return root


@contextmanager
def _flock(path: Path, operation: int) -> Iterator[None]:
    """Hold `flock(operation)` on `path` (a directory, or a file created if missing) for the block."""
    fd = os.open(path, os.O_RDONLY) if path.is_dir() else os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, operation)
        yield
    finally:
        os.close(fd)


def host_cpu_lock() -> Path:
    """The default CPU lock of this user on this host (in the system's temp folder, which is host-local)."""
    return Path(tempfile.gettempdir()) / f"ocrdet-cpu-{os.getuid()}.lock"


def _cpu_lock(path: Path | None) -> Path | None:
    if path is None:
        value = os.environ.get(CPU_LOCK_ENV)
        if not value:
            return None
        path = Path(value)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def quiet_host(lock: Path | None = None) -> Iterator[None]:
    """The block runs while the other processes sharing the CPU lock pause their work units (`cpu_work`).

    Timing on a machine where another worker trains measures the contention, not the model: the unpruned model
    timed against itself read 0.767 (interval 0.651-0.904) beside busy workers. Two locks make a turnstile: the
    gate, held exclusively here, stops new work units; the work lock, taken exclusively after it, waits for the
    running ones (a training step, an evaluated image) to end. Without the gate a worker that takes its next step
    at once could keep the shared work lock forever. ``lock``: the CPU lock file, by default the one
    `CPU_LOCK_ENV` names.
    """
    path = _cpu_lock(lock)
    if path is None or getattr(_quiet, "held", False):
        yield
        return
    with _flock(path.with_name(path.name + ".gate"), fcntl.LOCK_EX), _flock(path, fcntl.LOCK_EX):
        _quiet.held = True
        try:
            yield
        finally:
            _quiet.held = False


@contextmanager
def cpu_work(lock: Path | None = None) -> Iterator[None]:
    """One unit of CPU work (a training step, an evaluated image): waits while a `quiet_host` block runs
    anywhere on the host. Inside this process's own `quiet_host` block it does nothing."""
    path = _cpu_lock(lock)
    if path is None or getattr(_quiet, "held", False):
        yield
        return
    with _flock(path.with_name(path.name + ".gate"), fcntl.LOCK_SH):
        pass
    with _flock(path, fcntl.LOCK_SH):
        yield
