"""What differs between the operating systems the package runs on: usable CPU count, positional reads.

Linux has `os.sched_getaffinity` (the CPUs this process may use, which a container or `taskset` can
limit) and `os.preadv`; macOS has neither, Windows has no `os.pread` either. Each helper uses the
best call the platform offers and falls back to one every platform has.
"""

from __future__ import annotations

import os


def default_threads() -> int:
    """CPU threads this process may use: its affinity mask where the OS has one, else every core."""
    affinity = getattr(os, "sched_getaffinity", None)
    if affinity is not None:
        try:
            return max(1, len(affinity(0)))
        except OSError:
            pass
    return os.cpu_count() or 1


def read_into(fd: int, view: memoryview, offset: int) -> int:
    """Read len(view) bytes at `offset` of the open file `fd` into `view`; returns the bytes read (less at EOF).

    os.preadv reads straight into the buffer (Linux, BSD); os.pread copies (macOS); without either
    (Windows) a seek and readinto. Several threads may share `fd` only where one of the first two exists.
    """
    preadv = getattr(os, "preadv", None)
    if preadv is not None:
        return _fill(lambda v, at: preadv(fd, [v], at), view, offset)
    pread = getattr(os, "pread", None)
    if pread is not None:
        def read(v: memoryview, at: int) -> int:
            data = pread(fd, len(v), at)
            v[:len(data)] = data
            return len(data)
        return _fill(read, view, offset)
    with os.fdopen(os.dup(fd), "rb", buffering=0) as f:
        f.seek(offset)
        return _fill(lambda v, at: f.readinto(v) or 0, view, offset)


def _fill(read, view: memoryview, offset: int) -> int:
    """Repeat a positional read until the view is full or the file ends (a read may return fewer bytes)."""
    done = 0
    while done < len(view):
        got = read(view[done:], offset + done)
        if got <= 0:
            break
        done += got
    return done
