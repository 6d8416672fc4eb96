"""The output directory of a merge: checked, locked, written under temporary names, committed by
rename, cleaned up on failure.

Why each piece (issue 8 item 5):
- every file is created with O_CREAT|O_EXCL|O_NOFOLLOW under a unique name
  (`.<name>.zinspect-partial-<pid>-<random>`) through a descriptor of OUT_DIR, so a symlink or
  file planted at any name is never opened, let alone truncated; results reach their names only
  by rename(), which replaces a directory entry and never writes into an existing file;
- OUT_DIR is never the checkpoint's root or tag dir, never inside the tag dir, and never holds a
  file of the checkpoint (same device and inode), with or without --force;
- one merge at a time: `.zinspect-lock` (pid, host, start time; created complete and flock()ed
  before it appears, by link()) makes a second merge refuse naming the holder; the lock of a dead
  process is no longer flock()ed, so it is recognised and taken over;
- a leftover of a killed merge (its partial files, its lock) is named on the rerun, and --force
  removes it; the dirs a merge created are removed again (rmdir: only when empty) on failure.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import socket
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from zinspect.errors import OutputError

LOCK_NAME = ".zinspect-lock"
PARTIAL = ".zinspect-partial"
#: free space kept beyond the output's size
DISK_MARGIN = 64 << 20
_PARTIAL_RE = re.compile(r"^\.(?P<name>.+)" + re.escape(PARTIAL) + r"-(?P<pid>\d+)-[0-9a-f]+$")
_OPEN_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def temp_name(name: str) -> str:
    return f".{name}{PARTIAL}-{os.getpid()}-{secrets.token_hex(4)}"


def partial_pid(name: str) -> int | None:
    """The pid in a partial file's name; -1 for the fixed suffix of zinspect before 0.x locks."""
    m = _PARTIAL_RE.match(name)
    if m:
        return int(m["pid"])
    return -1 if name.endswith(PARTIAL) else None


@dataclass(frozen=True)
class LockInfo:
    pid: int
    host: str
    started: float

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started)) \
            if self.started else "at an unknown time"
        return f"pid {self.pid} on {self.host}, started {when}"

    @classmethod
    def parse(cls, data: bytes) -> LockInfo:
        try:
            d = json.loads(data.decode("utf-8", "replace")[:4096])
            host = "".join(c if c.isprintable() else "?" for c in str(d["host"])[:64])
            return cls(int(d["pid"]), host, float(d["started"]))
        except (ValueError, KeyError, TypeError):
            return cls(0, "an unknown host", 0.0)

    def alive_here(self) -> bool:
        if self.host != socket.gethostname() or self.pid <= 0:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


class OutputDir:
    """`with OutputDir(path, names, ...) as out:` checks and locks `path` (creating it and its
    parents), `out.create(name)` opens a new temp file for output `name`, `out.commit()` renames
    every temp into place. Leaving the block without commit() (an error, a cancel, a signal that
    raised) removes the temps, the lock and the dirs it created."""

    def __init__(self, path: str | os.PathLike, names: list[str], *, inputs: list[Path],
                 forbidden_dirs: list[Path], nbytes: int, force: bool,
                 notice: Callable[[str], None] | None = None) -> None:
        self.path = Path(path).expanduser()
        self.names = list(names)
        self.inputs, self.forbidden_dirs = inputs, forbidden_dirs
        self.nbytes, self.force = nbytes, force
        self.notice = notice or (lambda msg: None)
        self.dfd: int | None = None
        self.lock_fd: int | None = None
        self.temps: dict[str, str] = {}  # output name -> temp name
        self.created: list[Path] = []
        self.final: list[Path] = []
        self._input_ids: set[tuple[int, int]] = set()
        self.stale: LockInfo | None = None  # the lock of a dead merge found in OUT_DIR
        self._stale_fd: int | None = None
        self._lock_tmp: str | None = None
        self._published = False

    # -- entering: check, create, lock --------------------------------------------------------
    def __enter__(self) -> OutputDir:
        try:
            self._check_path()
            self._make_dirs()
            self.dfd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            self._check_dir_identity()
            self._lock()
            self._check_contents()
            self._claim()
        except BaseException as e:
            self._cleanup()
            if isinstance(e, OSError):
                raise OutputError(f"{self.path}: cannot use it as the output directory "
                                  f"({e.strerror or e})", "check the path and its permissions"
                                  ) from e
            raise
        return self

    def _check_path(self) -> None:
        resolved = self.path.resolve()
        for d in self.forbidden_dirs:
            d = d.resolve()
            if resolved == d:
                raise OutputError(f"{self.path}: is the checkpoint's directory {d}",
                                  "write the merged weights somewhere else, e.g. beside it")
        tag = self.forbidden_dirs[0].resolve()
        if tag in resolved.parents:
            raise OutputError(f"{self.path}: is inside the checkpoint's tag dir {tag}",
                              "write the merged weights somewhere else, e.g. beside the checkpoint")
        if os.path.lexists(self.path) and not self.path.is_dir():
            raise OutputError(f"{self.path}: exists and is not a directory",
                              "give a directory for the output")
        probe = self.path
        while not probe.exists():
            probe = probe.parent
        free = shutil.disk_usage(probe).free
        if free < self.nbytes + DISK_MARGIN:
            raise OutputError(f"{self.path}: needs {self.nbytes:,} bytes, only {free:,} are free",
                              "free some space or write to another disk")
        for p in self.inputs:  # the files of the checkpoint, and what their links lead to
            for follow in (False, True):
                try:
                    st = os.stat(p, follow_symlinks=follow)
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    self._input_ids.add((st.st_dev, st.st_ino))

    def _make_dirs(self) -> None:
        missing = []
        probe = self.path
        while not os.path.lexists(probe):
            missing.append(probe)
            probe = probe.parent
        for d in reversed(missing):
            try:
                os.mkdir(d)
            except FileExistsError:  # made meanwhile by someone else: not ours to remove
                continue
            self.created.append(d)

    def _check_dir_identity(self) -> None:
        st = os.fstat(self.dfd)
        for d in self.forbidden_dirs:
            try:
                dst = os.stat(d)
            except OSError:
                continue
            if (dst.st_dev, dst.st_ino) == (st.st_dev, st.st_ino):
                raise OutputError(f"{self.path}: is the checkpoint's directory {d}",
                                  "write the merged weights somewhere else, e.g. beside it")

    def _lock(self) -> None:
        """Publish a complete, flock()ed lock file by link(); or hold a dead merge's lock
        (flock()ed by us) until the contents check passes, then replace it (_claim)."""
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "started": time.time()}).encode()
        self.lock_fd, self._lock_tmp = self._open_new(LOCK_NAME)
        tmp = self._lock_tmp
        os.write(self.lock_fd, info)
        fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        for _ in range(20):
            try:
                os.link(tmp, LOCK_NAME, src_dir_fd=self.dfd, dst_dir_fd=self.dfd,
                        follow_symlinks=False)
            except FileExistsError:
                if self._hold_stale():
                    return
                continue
            self._published = True
            os.unlink(tmp, dir_fd=self.dfd)
            self._lock_tmp = None
            return
        raise OutputError(f"{self.path}: its lock {LOCK_NAME} keeps changing",
                          "another program is using the directory; pick another one")

    def _hold_stale(self) -> bool:
        """True when the lock at LOCK_NAME is a dead merge's and we now hold its flock; raises
        when a live merge holds it; False to retry (it vanished or changed meanwhile)."""
        try:
            old = os.open(LOCK_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.dfd)
        except FileNotFoundError:
            return False
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise OutputError(f"{self.path}: {LOCK_NAME} is a symbolic link",
                                  "remove it; zinspect never follows links in OUT_DIR") from e
            raise
        try:
            holder = LockInfo.parse(os.read(old, 4096))
            try:
                fcntl.flock(old, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise OutputError(
                    f"{self.path}: another zinspect merge is writing into it "
                    f"({holder.describe()})",
                    "wait for it to finish, or pick another output directory") from None
            if holder.alive_here():
                raise OutputError(
                    f"{self.path}: locked by a running process ({holder.describe()})",
                    "wait for it to finish, or pick another output directory")
            now = os.stat(LOCK_NAME, dir_fd=self.dfd, follow_symlinks=False)
            st = os.fstat(old)
            if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                os.close(old)
                return False
        except BaseException:
            os.close(old)
            raise
        self._stale_fd, self.stale = old, holder
        return True

    def _claim(self) -> None:
        """Replace a held stale lock by ours, once the directory was found usable."""
        if self._stale_fd is None:
            return
        os.replace(self._lock_tmp, LOCK_NAME, src_dir_fd=self.dfd, dst_dir_fd=self.dfd)
        self._lock_tmp, self._published = None, True
        os.close(self._stale_fd)
        self._stale_fd = None
        self.notice(f"took over the lock of an interrupted merge ({self.stale.describe()})")

    def _check_contents(self) -> None:
        entries = [n for n in os.listdir(self.dfd) if n not in (LOCK_NAME, self._lock_tmp)]
        for n in entries:
            st = os.stat(n, dir_fd=self.dfd, follow_symlinks=False)
            if (st.st_dev, st.st_ino) in self._input_ids:
                raise OutputError(f"{self.path}: holds {n}, a file of the checkpoint",
                                  "write the merged weights to a directory of their own")
        leftovers = [n for n in entries if partial_pid(n) is not None]
        if leftovers and not self.force:
            pids = sorted({partial_pid(n) for n in leftovers} - {-1})
            who = self.stale.describe() if self.stale else \
                ("pid " + ", ".join(map(str, pids)) if pids else "an older zinspect")
            raise OutputError(f"{self.path}: holds partial output of an interrupted merge "
                              f"({who}): {', '.join(sorted(leftovers)[:4])}",
                              "--force replaces it (and removes the partial files)")
        for n in leftovers:
            os.unlink(n, dir_fd=self.dfd)
        if leftovers:
            self.notice(f"removed {len(leftovers)} partial file(s) of an interrupted merge")
        rest = [n for n in entries if n not in leftovers]
        if rest and not self.force:
            clash = [n for n in self.names if n in rest]
            what = f"it already holds {', '.join(clash)}" if clash else \
                f"it is not empty ({len(rest)} entries)"
            raise OutputError(f"{self.path}: {what}",
                              "pick an empty or new directory, or pass --force to overwrite")

    # -- writing ----------------------------------------------------------------------------
    def create(self, name: str) -> int:
        """A new, empty file (fd) that becomes `name` at commit(); the caller closes it."""
        assert name in self.names and name not in self.temps
        fd, self.temps[name] = self._open_new(name)
        return fd

    def _open_new(self, name: str) -> tuple[int, str]:
        """Create the temp file of `name`: never an existing entry (O_EXCL), never through a
        link (O_NOFOLLOW); something planted at the name is left alone and another is tried."""
        for _ in range(16):
            tmp = temp_name(name)
            try:
                return os.open(tmp, _OPEN_NEW, 0o644, dir_fd=self.dfd), tmp
            except FileExistsError:
                continue
        raise OutputError(f"{self.path}: cannot create a temporary file for {name}",
                          "something keeps creating files in OUT_DIR; pick another directory")

    def write_text(self, name: str, text: str) -> None:
        fd = self.create(name)
        try:
            data = memoryview(text.encode())
            while len(data):
                data = data[os.write(fd, data):]
            os.fsync(fd)
        finally:
            os.close(fd)

    def commit(self) -> list[Path]:
        """Rename every temp to its name (replacing only that entry, never writing through it)."""
        for name in self.names:
            try:
                st = os.stat(name, dir_fd=self.dfd, follow_symlinks=False)
            except FileNotFoundError:
                pass
            else:
                if (st.st_dev, st.st_ino) in self._input_ids:
                    raise OutputError(f"{self.path}: {name} is a file of the checkpoint",
                                      "write the merged weights to a directory of their own")
        for name in self.names:
            os.replace(self.temps[name], name, src_dir_fd=self.dfd, dst_dir_fd=self.dfd)
            del self.temps[name]
            self.final.append(self.path / name)
        os.fsync(self.dfd)
        return self.final

    # -- leaving ----------------------------------------------------------------------------
    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and self.final:
            # a rename failed half-way: what is already in place goes too
            for p in self.final:
                _quiet(os.unlink, p.name, dir_fd=self.dfd)
        self._cleanup(failed=exc_type is not None)

    def _cleanup(self, failed: bool = True) -> None:
        if self.dfd is not None:
            for tmp in self.temps.values():
                _quiet(os.unlink, tmp, dir_fd=self.dfd)
            self.temps.clear()
            if self._lock_tmp is not None:
                _quiet(os.unlink, self._lock_tmp, dir_fd=self.dfd)
            if self._published:
                _quiet(os.unlink, LOCK_NAME, dir_fd=self.dfd)
            for fd in (self._stale_fd, self.lock_fd):
                if fd is not None:
                    os.close(fd)
            self._stale_fd = self.lock_fd = self._lock_tmp = None
            self._published = False
            os.close(self.dfd)
            self.dfd = None
        if failed:
            for d in reversed(self.created):
                _quiet(os.rmdir, d)
        self.created = []


def writing_failed(out_dir, e: OSError) -> OutputError:
    """The error for an OSError while writing into OUT_DIR (merge, reshard, universal): a full
    disk says so; either way nothing was written (the output is committed only at the end)."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutputError(f"{out_dir}: the disk is full; nothing was written",
                           "free some space or write to another disk")
    return OutputError(f"{out_dir}: writing failed ({e.strerror or e}); nothing was written",
                       "check the output directory")


def _quiet(fn, *args, **kwargs) -> None:
    try:
        fn(*args, **kwargs)
    except OSError:
        pass
