"""Safe output files: written under a temporary name, renamed into place only when complete."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from marco_gguf.errors import MarcoError
from marco_gguf.sizes import format_bytes


def check_destination(path: Path, force: bool) -> None:
    """Refuse a destination in a missing folder, a folder, or an existing file without --force."""
    if not path.parent.is_dir():
        raise MarcoError(f"output folder {path.parent} does not exist")
    if path.is_dir():
        raise MarcoError(f"output path {path} is a folder")
    if path.exists() and not force:
        raise MarcoError(f"{path} already exists (use --force to overwrite it)")


def check_free_space(path: Path, needed: int) -> None:
    """Fail early when the destination's file system cannot hold `needed` bytes."""
    free = shutil.disk_usage(path.parent).free
    if needed > free:
        raise MarcoError(
            f"not enough disk space for {path}: needs {format_bytes(needed)}, "
            f"{format_bytes(free)} free"
        )


def partial_name(path: Path, pid: int) -> Path:
    """The hidden temporary file a process `pid` writes `path` under."""
    return path.with_name(f".{path.name}.{pid}.partial")


def _pid_running(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would terminate it there; never take a partial for stale
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except (OverflowError, ValueError):  # not a PID this system can have
        return False
    return True


def _locked(file: Path) -> bool:
    """Whether a writer holds the lock atomic_output takes on its temporary file (on a shared file system:
    a writer on another machine, whose PID means nothing here). False where locks are not available."""
    try:
        import fcntl
    except ImportError:
        return False
    try:
        fd = os.open(file, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # releases the lock if we took it
    return False


def remove_stale_partials(path: Path) -> list[str]:
    """Remove the temporary files of earlier writes of `path` whose process no longer runs (killed with
    SIGKILL, or the machine went down); a message for each, for the caller to show.

    Only names of exactly the pattern `.NAME.PID.partial` for this destination are considered, never
    this process's own; one whose PID runs (it may be writing, or the PID was reused) or whose lock is
    held (a writer on another machine of a shared file system) is left, and the message says where.
    """
    pattern = re.compile(rf"\.{re.escape(path.name)}\.([0-9]+)\.partial")
    messages = []
    for candidate in sorted(path.parent.iterdir()):
        match = pattern.fullmatch(candidate.name)
        if match is None or not candidate.is_file() or candidate.is_symlink():
            continue
        pid = int(match.group(1))
        if pid == os.getpid():
            continue
        if _pid_running(pid) or _locked(candidate):
            messages.append(f"left {candidate}: process {pid} may still be writing {path.name}")
            continue
        try:
            size = candidate.stat().st_size
            candidate.unlink()
        except OSError as exc:
            messages.append(f"could not remove {candidate}, left by an earlier write of {path.name} that did not "
                            f"finish (process {pid}): {exc.strerror or exc}")
            continue
        messages.append(f"removed {candidate} ({format_bytes(size)}), left by an earlier write of {path.name} "
                        f"that did not finish (process {pid} no longer runs)")
    return messages


def _lock(fd: int) -> None:
    with contextlib.suppress(ImportError, OSError):
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


@contextlib.contextmanager
def atomic_output(path: Path, force: bool = False, needed: int = 0,
                  warnings: list[str] | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it to `path` if the block succeeds.

    On any failure, Ctrl-C included, the temporary file is removed and `path` is untouched. A process
    killed outright (SIGKILL) cannot remove it: the next write of the same `path` does
    (remove_stale_partials), and appends what it removed to `warnings` if given. The temporary file is
    locked while it is written, so that no other writer takes it for stale.
    """
    path = Path(path)
    check_destination(path, force)
    stale = remove_stale_partials(path)
    if warnings is not None:
        warnings.extend(stale)
    check_free_space(path, needed)
    tmp = partial_name(path, os.getpid())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        _lock(fd)
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise MarcoError(f"disk full while writing {path}") from exc
        raise
    finally:
        os.close(fd)
        tmp.unlink(missing_ok=True)
