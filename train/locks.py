"""An exclusive lock among the processes of one host, for the few files several workers may create at once."""
from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
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
