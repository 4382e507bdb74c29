"""Session files: a session's exact KV state plus everything needed to trust it.

Layout (all integers little-endian):
    magic      8 bytes   b"KVSIDE\\x00S"
    head_len   4 bytes   length of the msgpack header
    header     head_len  msgpack map: format, version, model fingerprint, n_ctx, KV types, rope
                         settings, ledger, messages, edit log, timestamps, state_len
    state      state_len raw llama.cpp sequence state (llama_state_seq_get_data)
    extra      sum(extra) blobs the header lists by size (v2; a session's context checkpoints)
    checksum   32 bytes  sha256 over header, state and extra

Writes go to a temporary file in the same folder, are fsynced and renamed over the target, so a
failed save leaves the old file as it was. Reads check everything (magic, sizes, checksum, format,
version, model, context) before the caller touches the cache.
"""

from __future__ import annotations

import ctypes
import hashlib
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import msgpack

from kvside import __version__
from kvside.atomic import atomic_writer
from kvside.errors import KvsideError

MAGIC = b"KVSIDE\x00S"
FORMAT = "kvside-session"
VERSION = 2
CHECKSUM_LEN = 32
MAX_HEADER = 256 * 1024 * 1024  # a ledger of millions of cells still fits; anything above is hostile
_PREFIX = struct.Struct("<8sI")
_CHUNK = 4 * 1024 * 1024


class SessionFileError(KvsideError):
    status = 400
    kind = "invalid_request_error"
    code = "bad_session_file"


class SessionSaveError(KvsideError):
    status = 507
    kind = "server_error"
    code = "session_save_failed"


# Migrations: MIGRATIONS[v] turns a version-v header into a version v+1 header. Append only.
MIGRATIONS: dict[int, Callable[[dict], dict]] = {
    1: lambda h: dict(h, version=2, extra=[]),  # v2: blobs after the state (none in a v1 file)
}


@dataclass
class SessionFile:
    header: dict
    state_offset: int
    state_len: int
    path: Path
    checksum_ok: bool

    @property
    def extra_sizes(self) -> list[int]:
        return self.header.get("extra", [])


def write(path: Path, header: dict, state: Any, fmt: str = FORMAT, extra: list | None = None) -> int:
    """Write header + state (bytes or a ctypes buffer) + the `extra` blobs atomically. Returns
    the file size."""
    path = Path(path)
    views = [memoryview(b).cast("B") for b in [state, *(extra or [])]]
    head = dict(header, format=fmt, version=VERSION, kvside_version=__version__,
                state_len=len(views[0]), extra=[len(v) for v in views[1:]], saved_at=time.time())
    packed = msgpack.packb(head, use_bin_type=True)
    digest = hashlib.sha256(packed)
    try:
        with atomic_writer(path) as f:
            f.write(_PREFIX.pack(MAGIC, len(packed)))
            f.write(packed)
            for view in views:
                for i in range(0, len(view), _CHUNK):  # written in place, never copied
                    chunk = view[i : i + _CHUNK]
                    digest.update(chunk)
                    f.write(chunk)
            f.write(digest.digest())
    except OSError as exc:
        raise SessionSaveError(f"could not save {path.name}: {exc.strerror or exc}") from None
    return _PREFIX.size + len(packed) + sum(len(v) for v in views) + CHECKSUM_LEN


def read_header(path: Path, verify: bool = True, fmt: str = FORMAT) -> SessionFile:
    """Parse and check a session file without loading its state. Raises SessionFileError."""
    path = Path(path)
    name = path.name
    try:
        size = path.stat().st_size
        f = open(path, "rb")
    except FileNotFoundError:
        raise SessionFileError(f"no such session file: {path}") from None
    except OSError as exc:
        raise SessionFileError(f"cannot read {name}: {exc.strerror}") from None
    with f:
        prefix = f.read(_PREFIX.size)
        if len(prefix) < _PREFIX.size:
            raise SessionFileError(f"{name} is not a kvside session file (too short)")
        magic, head_len = _PREFIX.unpack(prefix)
        if magic != MAGIC:
            raise SessionFileError(f"{name} is not a kvside session file")
        if head_len > MAX_HEADER or _PREFIX.size + head_len + CHECKSUM_LEN > size:
            raise SessionFileError(f"{name} is truncated or damaged (header of {head_len} bytes)")
        packed = f.read(head_len)
        try:
            header = msgpack.unpackb(packed, raw=False, strict_map_key=False)
        except Exception:  # msgpack raises several kinds on garbage
            raise SessionFileError(f"{name} has a damaged header") from None
        if not isinstance(header, dict) or header.get("format") != fmt:
            raise SessionFileError(f"{name} is not a kvside session file (format {header.get('format') if isinstance(header, dict) else '?'})")
        version = header.get("version")
        if not isinstance(version, int) or version < 1:
            raise SessionFileError(f"{name} has an invalid format version")
        if version > VERSION:
            raise SessionFileError(f"{name} was written by a newer kvside (format v{version}; this one reads v{VERSION})")
        state_len = header.get("state_len")
        if not isinstance(state_len, int) or state_len < 0:
            raise SessionFileError(f"{name} has an invalid state size")
        extra = header.get("extra", []) if version >= 2 else []
        if not isinstance(extra, list) or not all(isinstance(n, int) and n >= 0 for n in extra):
            raise SessionFileError(f"{name} has an invalid list of extra sections")
        state_offset = _PREFIX.size + head_len
        if state_offset + state_len + sum(extra) + CHECKSUM_LEN != size:
            raise SessionFileError(
                f"{name} is truncated or damaged ({size} bytes, header says "
                f"{state_offset + state_len + sum(extra) + CHECKSUM_LEN})"
            )
        ok = True
        if verify:
            digest = hashlib.sha256(packed)
            remaining = state_len + sum(extra)
            while remaining:
                chunk = f.read(min(_CHUNK, remaining))
                if not chunk:
                    raise SessionFileError(f"{name} is truncated")
                digest.update(chunk)
                remaining -= len(chunk)
            ok = digest.digest() == f.read(CHECKSUM_LEN)
            if not ok:
                raise SessionFileError(f"{name} failed its checksum: the file is damaged")
    while header["version"] < VERSION:
        header = MIGRATIONS[header["version"]](header)
    return SessionFile(header, state_offset, state_len, path, ok)


def read_state(sf: SessionFile):
    """The state blob as a ctypes buffer (one copy in memory), re-checked against the checksum."""
    return finish_steps(read_state_steps(sf))


def read_state_steps(sf: SessionFile):
    """read_state as a generator that yields after every chunk read (a job of the engine loop)."""
    state, _ = yield from read_all_steps(sf)
    return state


def read_all_steps(sf: SessionFile):
    """The state and the extra blobs (ctypes buffers), re-checked against the checksum, as a
    generator that yields after every chunk read."""
    bufs = [(ctypes.c_uint8 * n)() for n in [sf.state_len, *sf.extra_sizes]]
    with open(sf.path, "rb") as f:
        prefix = f.read(_PREFIX.size)
        _, head_len = _PREFIX.unpack(prefix)
        digest = hashlib.sha256(f.read(head_len))
        for buf in bufs:
            view = memoryview(buf).cast("B")
            got = 0
            while got < len(view):
                n = f.readinto(view[got : got + _CHUNK])
                if not n:
                    raise SessionFileError(f"{sf.path.name} is truncated")
                digest.update(view[got : got + n])
                got += n
                yield
        if digest.digest() != f.read(CHECKSUM_LEN):
            raise SessionFileError(f"{sf.path.name} changed or is damaged: checksum mismatch")
    return bufs[0], bufs[1:]


def rewrite(src: Path, dst: Path, fmt: str = FORMAT, **changes) -> int:
    """Copy a checked file to dst with some header fields changed (the state is carried as is)."""
    sf = read_header(src, verify=True, fmt=fmt)
    state, extra = finish_steps(read_all_steps(sf))
    header = {k: v for k, v in sf.header.items()
              if k not in ("format", "version", "state_len", "extra", "kvside_version", "saved_at")}
    header.update(changes)
    return write(dst, header, state, fmt=fmt, extra=extra)


def finish_steps(steps):
    """Run a reading generator to its end and return its value."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value
