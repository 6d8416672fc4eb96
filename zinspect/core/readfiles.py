"""Open the checkpoint's files for reading: only regular files, with no window to swap them.

Checking with stat() and then opening leaves a window: a FIFO put at the name in between makes
open() block until a writer comes (for ever), a device reads endless bytes. So the file is
opened with O_NONBLOCK (opening a FIFO then returns at once; on a regular file the flag does
nothing) and the descriptor itself is checked with fstat(): whatever the name led to, what was
opened is what is checked. Symbolic links are followed, as for the rank files they may be.
"""

from __future__ import annotations

import errno
import os
import stat
import threading

from zinspect.errors import UnreadableFile

_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)


def mode_kind(mode: int) -> str | None:
    """None for a regular file; else what it is ('a FIFO (named pipe)', 'a directory', ...)."""
    if stat.S_ISREG(mode):
        return None
    return ("a directory" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
            else "a character device" if stat.S_ISCHR(mode) else "a block device"
            if stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode) else "a special file")


def open_regular(path: str | os.PathLike) -> int:
    """A read-only descriptor of `path`, which must be a regular file (or a link to one).
    Raises OSError when it cannot be opened, UnreadableFile when it is something else."""
    fd = os.open(path, _FLAGS)
    try:
        kind = mode_kind(os.fstat(fd).st_mode)
    except BaseException:
        os.close(fd)
        raise
    if kind is not None:
        os.close(fd)
        raise UnreadableFile(f"{path}: is {kind} now, not a regular file (it was replaced "
                             "after the checkpoint was opened)",
                             "nothing may change the checkpoint while zinspect reads it; open "
                             "it again")
    return fd


class SourceFiles:
    """Open file descriptors of the rank files, one per path, for positional reads; shared by
    the reader threads (opening is locked: two threads opening one path would leak an fd)."""

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def fd(self, path: str) -> int:
        fd = self._fds.get(path)
        if fd is not None:
            return fd
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                try:
                    fd = self._fds[path] = _open_read(path)
                except OSError as e:
                    raise UnreadableFile(f"{path}: cannot open ({e.strerror})",
                                         "check that the file still exists and is readable") from e
        return fd

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> SourceFiles:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _open_read(path: str) -> int:
    """open_regular (a regular file, never blocking on a FIFO swapped in), and on "too many
    open files" raise the soft limit to the hard one and retry: 512 ranks with frozen params
    are 1024 rank files, the common soft limit is 1024."""
    try:
        return open_regular(path)
    except OSError as e:
        if e.errno != errno.EMFILE or not _raise_open_file_limit():
            raise
        return open_regular(path)


def _raise_open_file_limit() -> bool:
    try:
        import resource
    except ImportError:  # not on this platform
        return False
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft >= hard:
        return False
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError):  # an unlimited hard limit is more than the kernel allows
        return False
    return True
