"""Opening the files a user names: regular files only.

A device such as /dev/zero reads without end, and a FIFO blocks its reader until someone writes to it: a
model path must be neither. The file is opened without blocking, checked with `fstat` on the open
descriptor (a symlink counts as what it points to, and nothing can be swapped in between the check and
the read), and only then read as usual.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from typing import BinaryIO

__all__ = ["open_regular", "sha256_of"]

_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
}


def open_regular(path: str | os.PathLike[str]) -> BinaryIO:
    """Open `path` for reading in binary mode if it is a regular file; OSError (EINVAL) naming what it is if not."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = _KINDS.get(stat.S_IFMT(mode), "not a file")
            raise OSError(errno.EINVAL, f"it is {kind}, not a regular file", os.fspath(path))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def sha256_of(path: str | os.PathLike[str]) -> str:
    """``sha256:<hex>`` of a regular file's bytes: the name a store (ours or Ollama's) keeps it under."""
    digest = hashlib.sha256()
    with open_regular(path) as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()
