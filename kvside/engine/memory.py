"""Thin, checked wrappers over llama.cpp's memory (KV cache) calls for one context."""

from __future__ import annotations

from kvside._llama import lib
from kvside.errors import EditError


class Memory:
    def __init__(self, ctx):
        self.ctx = ctx
        self.mem = lib.llama_get_memory(ctx)
        # llama.cpp re-rotates shifted keys at the start of the next llama_decode, not before: until
        # then a state read gets the new positions with the old keys (see Core.seq_state)
        self.shift_pending = False
        # sequences whose first positions sit in cells another session's sequence also holds
        # (share): seq -> how many positions may be shared. A shared cell has one position and one
        # KV for all its sequences, so before such cells move or are rewritten the sequence gets
        # copies of its own (on_shared_write: Core.unshare)
        self.shared: dict[int, int] = {}
        self.on_shared_write = None

    def share(self, src: int, dst: int, n: int) -> None:
        """dst begins with src's cells at positions [0, n): one copy serves both."""
        self.cp(src, dst, 0, n)
        for seq in (src, dst):
            self.shared[seq] = max(self.shared.get(seq, 0), n)

    def before_write(self, seq: int, p0: int) -> None:
        """Cells of seq from position p0 on are about to move or be rewritten."""
        if self.shared.get(seq, 0) > p0 and self.on_shared_write is not None:
            self.on_shared_write(seq)

    def pos_min(self, seq: int) -> int:
        """Smallest position of seq, -1 when empty."""
        return lib.llama_memory_seq_pos_min(self.mem, seq)

    def pos_max(self, seq: int) -> int:
        return lib.llama_memory_seq_pos_max(self.mem, seq)

    def rm(self, seq: int, p0: int, p1: int) -> None:
        """Remove seq's cells in [p0, p1); p1 < 0 means to the end. Raises when llama.cpp refuses
        (recurrent and hybrid memories cannot drop a middle span)."""
        if not lib.llama_memory_seq_rm(self.mem, seq, p0, p1):
            raise EditError(f"this model's cache cannot remove positions {p0}..{p1}")

    def clear_seq(self, seq: int) -> None:
        lib.llama_memory_seq_rm(self.mem, seq, -1, -1)
        self.shared.pop(seq, None)

    def add(self, seq: int, p0: int, p1: int, delta: int) -> None:
        """Shift positions in [p0, p1) by delta; llama.cpp re-rotates the keys (RoPE) lazily."""
        if delta:
            self.before_write(seq, p0)
        lib.llama_memory_seq_add(self.mem, seq, p0, p1, delta)
        if delta:
            self.shift_pending = True

    def cp(self, src: int, dst: int, p0: int, p1: int) -> None:
        """Share src's cells in [p0, p1) with dst. Shared cells have one position for both
        sequences: shifting one moves the other."""
        lib.llama_memory_seq_cp(self.mem, src, dst, p0, p1)

    def can_shift(self) -> bool:
        return bool(lib.llama_memory_can_shift(self.mem))

    def clear(self) -> None:
        lib.llama_memory_clear(self.mem, True)
        self.shared.clear()
