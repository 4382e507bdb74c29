"""Sequence state as bytes: llama_state_seq_get_data / set_data. Used for deep forks (seq_cp only
shares cells) and for session files."""

from __future__ import annotations

import ctypes

from kvside._llama import lib
from kvside.errors import CacheFull


def get_seq_state(ctx, seq: int):
    """The sequence's state in a ctypes buffer (supports the buffer protocol; no extra copy)."""
    size = lib.llama_state_seq_get_size(ctx, seq)
    buf = (ctypes.c_uint8 * size)()
    written = lib.llama_state_seq_get_data(ctx, buf, size, seq)
    assert written == size, f"state size changed while copying ({written} != {size})"
    return buf


def set_seq_state(ctx, seq: int, data) -> None:
    """Replace seq's content with data (bytes or a ctypes buffer). Raises CacheFull when llama.cpp
    refuses (no room in the cache, or a state that does not fit this context)."""
    if isinstance(data, (bytes, bytearray)):
        data = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
    if lib.llama_state_seq_set_data(ctx, data, len(data), seq) == 0:
        raise CacheFull("llama.cpp could not load the sequence state (no room in the cache, or a mismatch)")
