"""Open the files that the config names without blocking on FIFOs or devices.

A plain open() of a FIFO waits for a writer, and a read of a character device can wait
forever, so a path swapped for such a file between validation and use would hang a
reload. Every file that the config names (config file, secret files, certificate, key
and CA files) is opened here with O_NONBLOCK and used only when fstat() shows a regular
file.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Linux names every open descriptor of the process here. Handing OpenSSL such a path
# makes it read the very file that was checked, even when the configured path has been
# replaced since.
_FD_FOLDER = Path("/proc/self/fd")
# Largest config file and largest secret file read, in bytes. A config is a few kB and a
# secret file one value, so the limits only keep a wrong path from filling memory.
MAX_CONFIG_FILE_SIZE = 16 << 20
MAX_SECRET_FILE_SIZE = 1 << 20
# Largest certificate file read for the expiry metric. Debian 12's CA bundle is about
# 220 kB.
MAX_CERTIFICATE_FILE_SIZE = 16 << 20
# Bytes hashed per read by `sha256_regular`.
_HASH_CHUNK_SIZE = 1 << 20


class NotRegularFileError(OSError):
    """The path names a FIFO, socket or device instead of a regular file."""

    def __init__(self, path: Path | str, kind: str) -> None:
        super().__init__(None, f"not a regular file but {kind}", str(path))
        self.kind = kind


class FileTooLargeError(OSError):
    """The file is larger than the caller's limit; `size` and `limit` are in bytes."""

    def __init__(self, path: Path | str, size: int, limit: int) -> None:
        super().__init__(
            None, f"{size} bytes, more than the limit of {limit} bytes", str(path)
        )
        self.size = size
        self.limit = limit


def special_file_kind(mode: int) -> str:
    """Return what a non-regular file is, such as "a FIFO", for a message."""
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    return "a special file"


def open_regular(path: Path | str) -> int:
    """Open a regular file for reading without blocking, and return its descriptor.

    Raises IsADirectoryError for a directory, NotRegularFileError for any other file
    that is not regular, and OSError when the file cannot be opened. The descriptor is
    checked with fstat(), so a path replaced after an earlier check is caught too.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError:
        # os.open below raises the error that names the cause, such as ENOENT.
        mode = stat.S_IFREG
    _check_mode(path, mode)
    # O_NONBLOCK returns at once from open() of a FIFO that has no writer, and O_NOCTTY
    # keeps a terminal from becoming the controlling terminal.
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    descriptor = os.open(path, flags)
    try:
        _check_mode(path, os.fstat(descriptor).st_mode)
    except BaseException:
        os.close(descriptor)
        raise
    return descriptor


def read_regular(path: Path | str, max_size: int | None = None) -> bytes:
    """Return the bytes of a regular file, opened as `open_regular` does.

    Raises FileTooLargeError when the file has more than `max_size` bytes.
    """
    descriptor = open_regular(path)
    with os.fdopen(descriptor, "rb") as stream:
        if max_size is None:
            return stream.read()
        data = stream.read(max_size + 1)
        if len(data) > max_size:
            size = max(os.fstat(descriptor).st_size, len(data))
            raise FileTooLargeError(path, size, max_size)
        return data


def sha256_regular(path: Path | str) -> str:
    """Return the SHA-256 hex digest of a regular file, read in chunks.

    Opens the file as `open_regular` does. The chunks keep memory flat for any size.
    """
    digest = hashlib.sha256()
    descriptor = open_regular(path)
    with os.fdopen(descriptor, "rb") as stream:
        while chunk := stream.read(_HASH_CHUNK_SIZE):
            digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def openssl_path(path: Path | None) -> Iterator[str | None]:
    """Open and check `path`, then yield a path for OpenSSL that reads the same file.

    OpenSSL's loaders open files by path and would block on a FIFO. On Linux the yielded
    path is /proc/self/fd/N of the checked descriptor, which stays open until the block
    ends. Raises as `open_regular` does. None yields None.
    """
    if path is None:
        yield None
        return
    descriptor = open_regular(path)
    try:
        if _FD_FOLDER.is_dir():
            yield str(_FD_FOLDER / str(descriptor))
        else:
            # NOTE: without /proc, a file swapped after this check reaches OpenSSL.
            yield str(path)
    finally:
        os.close(descriptor)


def _check_mode(path: Path | str, mode: int) -> None:
    if stat.S_ISREG(mode):
        return
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    raise NotRegularFileError(path, special_file_kind(mode))
