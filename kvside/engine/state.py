"""Sequence state as bytes: llama_state_seq_get_data / set_data. Used for deep forks (seq_cp only
shares cells) and for session files."""

from __future__ import annotations

import ctypes

from kvside._llama import lib
from kvside.errors import CacheFull, KvsideError

ON_DEVICE = 2  # LLAMA_STATE_SEQ_FLAGS_ON_DEVICE


def get_seq_state(ctx, seq: int, into=None):
    """The sequence's state in a ctypes buffer (supports the buffer protocol; no extra copy).
    `into`: a buffer to write into instead of a new one (`into(size)` gives it, at least size
    bytes long); the state is then its first size bytes, size = llama_state_seq_get_size."""
    size = lib.llama_state_seq_get_size(ctx, seq)
    buf = into(size) if into is not None else (ctypes.c_uint8 * size)()
    written = lib.llama_state_seq_get_data(ctx, buf, size, seq)
    assert written == size, f"state size changed while copying ({written} != {size})"
    return buf


class StateRejected(KvsideError):
    """llama.cpp would not load a sequence state: no room for its cells, or a blob it cannot read
    (damaged, or from another model or build). Its answer does not say which; callers that know
    (a restore compares the cells needed with the cells free) say which one it was."""

    status = 500
    kind = "server_error"
    code = "state_rejected"


def set_seq_state(ctx, seq: int, data, size: int | None = None) -> None:
    """Replace seq's content with data (bytes or a ctypes buffer; its first `size` bytes where
    given). Raises StateRejected when llama.cpp refuses; seq is then empty."""
    if isinstance(data, (bytes, bytearray)):
        data = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
    if lib.llama_state_seq_set_data(ctx, data, len(data) if size is None else size, seq) == 0:
        raise StateRejected("llama.cpp could not load the sequence state")


def copy_seq_on_device(ctx, src: int, dst: int) -> int:
    """Deep-copy src's cells into dst with llama.cpp's device-side sequence state: the keys and
    values go from the cache into a backend buffer and back (VRAM to VRAM on a GPU); only the cell
    metadata passes through host memory. llama.cpp keeps that buffer, one per source sequence, for
    the context's lifetime: the price is a second copy of src's cells. Returns the metadata size."""
    size = lib.llama_state_seq_get_size_ext(ctx, src, ON_DEVICE)
    meta = (ctypes.c_uint8 * size)()
    if lib.llama_state_seq_get_data_ext(ctx, meta, size, src, ON_DEVICE) != size:
        raise KvsideError("llama.cpp could not copy the sequence state on the device")
    if lib.llama_state_seq_set_data_ext(ctx, meta, size, dst, ON_DEVICE) == 0:
        raise CacheFull("llama.cpp could not load the sequence state (no room in the cache)")
    return size
