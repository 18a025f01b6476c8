"""An exclusive lock among the processes of one host, for the few files several workers may create at once."""
from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def host_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive `flock` on `path` for the block: an existing directory (nothing is created in it) or a
    lock file (created if missing).

    The kernel drops the lock when its descriptor is closed, so a worker killed inside the block cannot leave it
    held.
    """
    if path.is_dir():
        fd = os.open(path, os.O_RDONLY)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
