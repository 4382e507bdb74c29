"""Thin, checked wrappers over llama.cpp's memory (KV cache) calls for one context."""

from __future__ import annotations

from kvside._llama import lib
from kvside.errors import EditError


class Memory:
    def __init__(self, ctx, *, n_swa: int = 0, recurrent: bool = False, n_seq: int = 1):
        self.ctx = ctx
        self.mem = lib.llama_get_memory(ctx)
        # Sliding-window layers (Gemma 3, gpt-oss): a cell more than n_swa positions behind its
        # sequence's last one is out of every future token's window, and llama.cpp treats it as
        # free: the next llama_decode of any sequence may overwrite it, and a state read leaves it
        # out. Edits that decode anywhere but after the last cell need the n_swa cells before that
        # point, so kvside keeps, per sequence, the floor: every cell at or above it has stayed
        # inside the window since it was written (so it is still there); below it, cells may be
        # gone. A decode whose window reaches below the floor is refused (window_ok).
        self.n_swa = n_swa
        # Recurrent layers (Mamba, hybrids) hold one state per sequence, not one cell per position:
        # a sequence can only go on from its end or start again from nothing.
        self.recurrent = recurrent
        self.n_seq = n_seq
        self.floor: dict[int, int] = {}
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
        if self.recurrent and not (p0 <= 0 and p1 < 0) and p0 <= self.pos_max(seq):
            # llama.cpp says yes to a span that misses the state's last position and removes
            # nothing: the state still holds what was to go
            raise EditError(f"this model's cache cannot remove positions {p0}..{p1} (its recurrent state can "
                            "only go on from its end or start again)")
        if not lib.llama_memory_seq_rm(self.mem, seq, p0, p1):
            raise EditError(f"this model's cache cannot remove positions {p0}..{p1}"
                            + (" (its recurrent state can only go on from its end or start again)"
                               if self.recurrent else ""))
        if p0 <= 0 and p1 < 0:  # all of it (llama.cpp's last position cannot tell: on a sliding
            self.floor.pop(seq, None)  # window it is the windowed layers', empty after a cut)

    def clear_seq(self, seq: int) -> None:
        lib.llama_memory_seq_rm(self.mem, seq, -1, -1)
        self.shared.pop(seq, None)
        self.floor.pop(seq, None)

    # -- what a decode may rely on ----------------------------------------------------------------
    def window_ok(self, seq: int, pos: int) -> bool:
        """Whether tokens decoded into seq from position `pos` on see every cell they would see
        in a fresh prefill of the same cells: always on plain attention; on a sliding window, when
        the n_swa positions before `pos` lie at or above the sequence's floor; on a recurrent
        state, only after its end (an emptied sequence starts again from nothing)."""
        if self.recurrent:  # (an empty sequence's last position is -1)
            return pos > self.pos_max(seq)
        if not self.n_swa:
            return True
        return max(0, pos - self.n_swa + 1) >= self.floor.get(seq, 0)

    def window_lost(self, pos: int) -> str:
        """Why a decode from `pos` was refused (see window_ok), in words."""
        if self.recurrent:
            return f"the recurrent state cannot go back to position {pos}"
        return f"the sliding-window cache no longer holds the {self.n_swa} positions before {pos}"

    def before_decode(self) -> None:
        """A llama_decode is about to look for free cells: any sequence's cells that are out of
        its own window may be taken (llama_kv_cache::find_slot), so each floor rises to there."""
        if not self.n_swa:
            return
        for seq in range(self.n_seq):
            top = self.pos_max(seq)
            if top >= 0:
                self.floor[seq] = max(self.floor.get(seq, 0), top + 2 - self.n_swa)

    def state_restored(self, seq: int) -> None:
        """seq was set from a state blob: a state keeps only the cells inside the window, and
        loading it keeps only those the next token sees (measured on a window-sized cache: the
        oldest cell of the saved window does not come back)."""
        if self.n_swa:
            self.floor[seq] = max(0, self.pos_max(seq) + 2 - self.n_swa)

    def add(self, seq: int, p0: int, p1: int, delta: int) -> None:
        """Shift positions in [p0, p1) by delta; llama.cpp re-rotates the keys (RoPE) lazily.
        Raises where the cache cannot shift (multi-section RoPE, a window-sized sliding window):
        llama.cpp would abort the process at the next decode."""
        if delta and not self.can_shift():
            raise EditError("this model's cache cannot shift positions")
        if delta:
            self.before_write(seq, p0)
        lib.llama_memory_seq_add(self.mem, seq, p0, p1, delta)
        floor = self.floor.get(seq, 0)
        if delta and floor > 0:
            if p0 < floor:  # the cells that may be gone move too (all of them, conservatively)
                self.floor[seq] = max(floor, floor + delta) if p1 >= 0 else floor + delta
            elif delta < 0 and p1 < 0:  # the tail moves down into a hole: it is all above the floor
                self.floor[seq] = min(floor, p0 + delta)
        if delta:
            self.shift_pending = True

    def lift_floor(self, seq: int, floor: int | None) -> None:
        if floor:
            self.floor[seq] = max(self.floor.get(seq, 0), floor)

    def cp(self, src: int, dst: int, p0: int, p1: int, floor: bool = True) -> None:
        """Share src's cells in [p0, p1) with dst. Shared cells have one position for both
        sequences: shifting one moves the other."""
        lib.llama_memory_seq_cp(self.mem, src, dst, p0, p1)
        if floor:  # (a caller that knows which of the copied cells are whole says so itself)
            self.lift_floor(dst, self.floor.get(src))

    def can_shift(self) -> bool:
        return bool(lib.llama_memory_can_shift(self.mem))

    def clear(self) -> None:
        lib.llama_memory_clear(self.mem, True)
        self.shared.clear()
        self.floor.clear()
