"""One inter-process lock for everything that must happen once per file: a model download, a kernel build.

``filelock`` takes an OS lock (``fcntl.flock`` on POSIX, ``msvcrt.locking`` on Windows), which the kernel releases
when its holder dies, so a killed process never leaves the others waiting.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["exclusive"]


@contextlib.contextmanager
def exclusive(lock_path: Path, waiting: str) -> Iterator[None]:
    """Hold the lock on ``lock_path`` for the ``with`` block; log ``waiting`` (INFO) if another process holds it."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0.05)
    except Timeout:
        log.info("%s (lock %s)", waiting, lock.lock_file)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()
