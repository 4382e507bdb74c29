"""Context checkpoints: where a cache cannot go back, copies of what it cannot give back.

A recurrent state (Mamba, the recurrent layers of a hybrid) holds one state per sequence, and a
sliding-window layer (Gemma 3, gpt-oss) only the last n_swa positions: once a sequence has read
past a point, no edit can return the cache to that point, and every edit that goes back (a client
that regenerates a reply, edits its last message, drops an old exchange) would read the session
again from its first token. A checkpoint is the part of a sequence's memory that cannot be cut
back, read with llama.cpp's partial sequence state (LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY: the
recurrent state, or the window layers' cells; full-attention layers keep their cells per position
and are cut like any cache), taken at message boundaries while a prompt is read. Going back to a
point at or after a checkpoint restores it, cuts the rest, and reads only from there (the anchor:
llama-server's context checkpoints, tools/server/server-context.cpp).

A checkpoint says which cells it follows (a digest of their tokens and positions): it is used only
while the session's ledger still begins with exactly those cells, so no edit can make one stale.
"""

from __future__ import annotations

import ctypes
import hashlib
from dataclasses import dataclass

import numpy as np

from kvside._llama import lib
from kvside.engine.ledger import Ledger
from kvside.engine.state import StateRejected

PARTIAL_ONLY = 1  # LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY
# checkpoints closer than this many cells to the previous one are not taken (the last of a
# prompt always is: it is where a regenerated reply goes back to)
MIN_STEP = 64


@dataclass
class Checkpoint:
    n: int  # ledger cells it follows
    key: bytes  # digest of those cells' tokens and positions
    floor: int  # the sliding-window floor when taken (Memory.floor)
    blob: ctypes.Array

    @property
    def size(self) -> int:
        return len(self.blob)


def prefix_key(led: Ledger, n: int) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(np.asarray(led.tok[:n], dtype=np.int32).tobytes())
    h.update(np.asarray(led.pos[:n], dtype=np.int32).tobytes())
    return h.digest()


def needed(core) -> bool:
    """Whether this model's cache needs checkpoints to go back (plain attention cuts anywhere)."""
    return (core.recurrent or core.n_swa > 0) and core.config.checkpoints > 0


def take(core, s) -> Checkpoint | None:
    """A checkpoint of s's cache as it is now (it must hold exactly the ledger's cells), kept in
    s.checkpoints: the first one taken and the latest ones, at most core.config.checkpoints."""
    led = s.ledger
    n = len(led)
    if not needed(core) or n == 0:
        return None
    if any(c.n == n and c.key == prefix_key(led, n) for c in s.checkpoints):
        return None
    size = lib.llama_state_seq_get_size_ext(core.ctx, s.seq, PARTIAL_ONLY)
    blob = (ctypes.c_uint8 * size)()
    if lib.llama_state_seq_get_data_ext(core.ctx, blob, size, s.seq, PARTIAL_ONLY) != size:
        return None  # the cache would not say: no checkpoint, the fallback stays a full re-read
    cp = Checkpoint(n, prefix_key(led, n), core.mem.floor.get(s.seq, 0), blob)
    # those that no longer follow the ledger cannot serve again: they go first
    s.checkpoints = [c for c in s.checkpoints if c.n < n and c.key == prefix_key(led, c.n)] + [cp]
    while len(s.checkpoints) > core.config.checkpoints:
        # keep the first (a system prompt and first task, which clients keep while they drop
        # what follows) and the most recent
        del s.checkpoints[1 if len(s.checkpoints) > 1 else 0]
    return cp


def marks(core, s, todo_msg: list[int]) -> list[int]:
    """Where a prompt about to be read (todo_msg: the message of each of its tokens) gets
    checkpoints, as ledger lengths: always at its last two message boundaries (before the reply,
    where a regenerated reply goes back to, and before the last message, where an edited last
    message goes back to), and at earlier boundaries at least MIN_STEP cells past the previous
    checkpoint. The scheduler splits its prefill at each."""
    if not needed(core):
        return []
    base = len(s.ledger)
    last = max((c.n for c in s.checkpoints), default=0)
    starts = [i for i in range(1, len(todo_msg)) if todo_msg[i] != todo_msg[i - 1]]
    out = []
    for i in starts:
        if i in starts[-2:] or base + i - last >= MIN_STEP:
            out.append(base + i)
            last = base + i
    return out


def best(s, upto: int | None = None) -> Checkpoint | None:
    """The latest checkpoint that s's ledger still begins with, covering at most `upto` cells."""
    led = s.ledger
    limit = len(led) if upto is None else min(upto, len(led))
    for cp in sorted(s.checkpoints, key=lambda c: -c.n):
        if cp.n <= limit and cp.key == prefix_key(led, cp.n):
            return cp
    return None


def restore(core, s, cp: Checkpoint) -> None:
    """Set s's cache to what it held when cp was taken: the checkpointed part from cp, the other
    layers' cells cut after cp's last position. The ledger is left to the caller, who reads the
    rest (its cells from cp.n on are not in the cache). Raises StateRejected (s's cache may then
    be empty: the caller reads everything)."""
    # partial state first: a recurrent state cannot be cut at a middle position, but once it is
    # set back, the cut after its last position is a clean one
    if lib.llama_state_seq_set_data_ext(core.ctx, cp.blob, cp.size, s.seq, PARTIAL_ONLY) == 0:
        raise StateRejected("llama.cpp could not load the context checkpoint")
    end = s.ledger.pos[cp.n - 1] + 1
    if not lib.llama_memory_seq_rm(core.mem.mem, s.seq, end, -1):
        raise StateRejected("llama.cpp could not cut the cache after the context checkpoint")
    if core.n_swa:
        core.mem.state_restored(s.seq)
        core.mem.lift_floor(s.seq, cp.floor)


def for_file(s) -> tuple[list[dict], list]:
    """s's checkpoints as a session file keeps them: records for the header, blobs for its extra
    sections (in the same order)."""
    return [{"n": c.n, "key": c.key, "floor": c.floor} for c in s.checkpoints], [c.blob for c in s.checkpoints]


def from_file(core, records, blobs: list) -> list[Checkpoint]:
    """The checkpoints a session file kept, for this engine: none where the model's cache goes
    back without them or they are turned off, at most core.config.checkpoints (the first and the
    latest, as take() keeps them). A record that does not describe its blob is refused (ValueError);
    one that no longer follows the ledger is harmless: best() never picks it."""
    if not isinstance(records, list) or len(records) != len(blobs):
        raise ValueError("the checkpoint records do not match the file's extra sections")
    out = []
    for r, blob in zip(records, blobs):
        if not (isinstance(r, dict) and type(r.get("n")) is int and r["n"] > 0 and isinstance(r.get("key"), bytes)
                and len(r["key"]) == 16 and type(r.get("floor")) is int and r["floor"] >= 0):
            raise ValueError("a checkpoint record is damaged")
        out.append(Checkpoint(r["n"], r["key"], r["floor"], blob))
    if not needed(core):
        return []
    out.sort(key=lambda c: c.n)
    limit = core.config.checkpoints
    if len(out) <= limit:
        return out
    return out[-1:] if limit == 1 else out[:1] + out[len(out) - limit + 1 :]


def total_bytes(sessions) -> int:
    return sum(c.size for s in sessions for c in s.checkpoints)
