"""The one way kvside writes a file it cares about: into a temporary file in the same folder,
flushed and fsynced, then renamed over the target, and the folder fsynced. A crash at any point
leaves either the old file or the new one, never a mix (readers never see a half-written file)."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator


@contextmanager
def atomic_writer(path: Path) -> Iterator[BinaryIO]:
    """Yields a binary file; on a clean exit it replaces `path`, on an exception it is removed
    and `path` is untouched. OSError goes to the caller, which knows what the file was for."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_writer(path) as f:
        f.write(data)


def copy_file(src: Path, dst: Path, chunk: int = 1 << 20) -> None:
    with open(src, "rb") as fin, atomic_writer(dst) as fout:
        while block := fin.read(chunk):
            fout.write(block)


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (where the platform can open folders)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
