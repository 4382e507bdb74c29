"""Bindings for kvside's patch to llama.cpp (native/kvside.patch), and the recomputes it allows.

Stock llama.cpp appends: a batch must start right after a sequence's last position. The patch adds
a recompute mode in which each token of a batch goes back into the cell that already holds its
(sequence, position), attending to the cache as it stands:

- KV mode rewrites key and value: any set of positions is recomputed in place, in one batch;
- values mode rewrites only the value: the cell keeps its (shifted) key.

The functions are looked up in the loaded libllama; on a stock build `available()` is False and
the strategies that need them are refused before anything is touched.
"""

from __future__ import annotations

import ctypes
import functools

from kvside._llama import lib, native_patch_loaded, recent_log
from kvside.errors import EditError

MODE_OFF, MODE_KV, MODE_VALUES = 0, 1, 2


def available() -> bool:
    return native_patch_loaded()


@functools.cache
def _fn(name: str, restype, *argtypes):
    """A patch function with its C signature, bound once (call only when available())."""
    fn = getattr(lib._lib, name)
    fn.restype = restype
    fn.argtypes = list(argtypes)
    return fn


def version() -> int | None:
    if not available():
        return None
    return int(_fn("llama_kvside_patch_version", ctypes.c_int32)())


def _set_recompute(ctx, mode: int) -> None:
    if _fn("llama_kvside_set_recompute", ctypes.c_int32, ctypes.c_void_p, ctypes.c_int32)(ctx, mode) != 0:
        raise EditError(f"llama.cpp refused recompute mode {mode}: {recent_log(2)}")


def set_exact(ctx, exact: bool) -> None:
    """CPU: ggml's reference kernels, so attention does not depend on where cells sit."""
    _fn("llama_kvside_set_exact", None, ctypes.c_void_p, ctypes.c_bool)(ctx, exact)


def recompute(core, seq: int, positions: list[int], tokens: list[int], values_only: bool) -> int:
    """Re-decode `tokens` at `positions` (increasing, all held by seq in cells of its own) in
    place. Batches are cut at n_batch; each sees the ones before it already rewritten, which is
    what one big batch would see. Raises EditError on failure: the cells are then partly
    rewritten and the caller must rebuild the session."""
    if not available():
        raise EditError("in-place recompute needs kvside's native patch to llama.cpp (not loaded)")
    if len(positions) != len(tokens):
        raise ValueError("one token per position")
    if not positions:
        return 0
    core.mem.before_write(seq, min(positions))
    batch = core.batch
    _set_recompute(core.ctx, MODE_VALUES if values_only else MODE_KV)
    try:
        for c0 in range(0, len(positions), core.n_batch):
            batch.clear()
            for p, t in zip(positions[c0 : c0 + core.n_batch], tokens[c0 : c0 + core.n_batch]):
                batch.add(t, p, seq, False)
            rc = core.llama_decode(batch)
            if rc != 0:
                raise EditError(f"in-place recompute failed (llama_decode {rc}): {recent_log(2)}")
    finally:
        _set_recompute(core.ctx, MODE_OFF)
    return len(positions)
