"""One writer per dataset prefix, and cleanup of the temporaries that killed writers leave.

`MMapIndexedDatasetBuilder` takes `PrefixLock(prefix)` before it creates anything: an exclusive
`fcntl.flock` on the hidden file `DIR/.BASE.lock`, which holds "PID HOST" of its owner so that a
refused writer can name it. Two runs writing the same prefix (two `preprocess_data.py` with the
same --output-prefix) would otherwise both succeed and the last would silently win.

Why flock: the kernel drops the lock when its holder dies, even by SIGKILL, so a lock file left
by a killed run never blocks the next one. The holder unlinks the file when it releases it; a
waiter that locked the unlinked file notices (the path now names another inode) and retries.

Stale temporaries: the builder writes `.BASE.PID.HEX.bin.tmp` / `.idx.tmp`. While the lock is
held no other writer of BASE that uses this lock is alive, so every such file is left over from
an interrupted run and is removed whatever its PID says (PIDs are reused, especially in
containers, and mean nothing across the hosts of a shared filesystem). Without the lock
(a filesystem without flock support) nothing is removed.

Limits: advisory only (programs that write the final names directly do not take it; the builder
notices when such a program replaced the output during the run); flock over NFS depends on the
client (Linux emulates it with byte-range locks); no locking where `fcntl` is missing.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import socket
import sys
from typing import List, Optional, Tuple

from megatron.data.index_format import IndexedDatasetError

try:
    import fcntl
except ImportError:  # not POSIX: no locking
    fcntl = None


def _split(prefix: str) -> Tuple[str, str]:
    return os.path.split(os.path.abspath(prefix))


def lock_file_path(prefix: str) -> str:
    """`DIR/.BASE.lock`: hidden, so directory scans of datasets skip it."""
    directory, base = _split(prefix)
    return os.path.join(directory, f".{base}.lock")


def temporary_stem(prefix: str) -> str:
    """A new unique `DIR/.BASE.PID.HEX` for one writer's `.bin.tmp` / `.idx.tmp` files."""
    directory, base = _split(prefix)
    return os.path.join(directory, f".{base}.{os.getpid()}.{secrets.token_hex(4)}")


def _temporary_pattern(base: str) -> "re.Pattern[str]":
    # Anchored with a fixed tail, so it never matches another prefix's names (".BASE.v2...").
    return re.compile(rf"\.{re.escape(base)}\.[0-9]+\.[0-9a-f]{{8}}\.(bin|idx)\.tmp")


class PrefixLock:
    """Exclusive advisory lock on a dataset prefix, held from `acquire()` to `release()`."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.path = lock_file_path(prefix)
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> bool:
        """Take the lock; False where the filesystem cannot lock (the caller goes on unlocked).

        Raises IndexedDatasetError naming the prefix and the holder when another writer has it.
        """
        if fcntl is None:
            return False
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise IndexedDatasetError(
                    f"{self.prefix}: another run is writing this dataset ({holder}, lock "
                    f"{self.path}); wait for it to finish or choose another --output-prefix"
                ) from None
            except OSError as e:
                empty = os.fstat(fd).st_size == 0
                os.close(fd)
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                if empty:
                    with contextlib.suppress(OSError):
                        os.unlink(self.path)
                print(f"note: {self.path}: this filesystem cannot lock files ({e.strerror}); "
                      "a concurrent writer of the same prefix would not be detected",
                      file=sys.stderr)
                return False
            if _same_file(fd, self.path):
                break
            os.close(fd)  # locked a file its former holder had just unlinked: start again
        try:  # who holds it, for the message of a refused writer; best effort (disk full)
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        except OSError:
            pass
        self._fd = fd
        return True

    def release(self) -> None:
        """Unlink the lock file, then unlock; safe to call more than once."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)  # also for forked children sharing the descriptor
            os.close(fd)

    def remove_stale_temporaries(self) -> List[Tuple[str, int]]:
        """Remove every builder temporary of this prefix and say so in one line on stderr;
        returns [(name, bytes)] of what was removed.

        Only with the lock held: then no writer of the prefix can be alive (module docstring).
        """
        assert self.held, "stale temporaries may only be removed under the lock"
        directory, base = _split(self.prefix)
        pattern = _temporary_pattern(base)
        removed = []
        for name in sorted(os.listdir(directory)):
            if pattern.fullmatch(name):
                path = os.path.join(directory, name)
                try:
                    size = os.path.getsize(path)
                    os.unlink(path)
                except FileNotFoundError:
                    continue
                removed.append((name, size))
        if removed:
            total = sum(size for _, size in removed)
            print(f"note: {self.prefix}: removed {len(removed)} stale temporary file(s) of an "
                  f"interrupted earlier run ({total:,} bytes): "
                  f"{', '.join(name for name, _ in removed)}", file=sys.stderr)
        return removed


def file_identity(path: str) -> Optional[Tuple[int, int, int, int]]:
    """(device, inode, size, mtime) of `path`, None when absent: tells a file written since."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _same_file(fd: int, path: str) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _read_holder(fd: int) -> str:
    """"PID 123" (plus " on HOST" when it is another machine) from the lock file, if written."""
    try:
        fields = os.pread(fd, 256, 0).decode(errors="replace").split()
    except OSError:
        fields = []
    if not fields or not fields[0].isdigit():
        return "holder unknown"
    if len(fields) > 1 and fields[1] != socket.gethostname():
        return f"PID {fields[0]} on {fields[1]}"
    return f"PID {fields[0]}"
