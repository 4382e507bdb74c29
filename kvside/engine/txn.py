"""All or nothing for edits of more than one step (compact = append a summary + mask; a binding =
mask the dropped front + start the reply): take a snapshot of the session, run the steps, and on
any failure put the cells and the session's records back as they were.

The snapshot is the sequence's state (llama_state_seq_get_data: about 23 KB per token of the
default model) plus copies of the ledger and messages, so a roll back is exact, not a rebuild.
Above SNAPSHOT_MAX_BYTES of state (a long session of a large model, where the copy would cost
more than the edit) only the records are kept, and a roll back rebuilds the cells from the
saved ledger's tokens: the session is whole again, with its positions made dense.
"""

from __future__ import annotations

import copy
import ctypes
import logging
from contextlib import contextmanager

from kvside._llama import lib
from kvside.engine.session import Session
from kvside.engine.state import set_seq_state
from kvside.errors import KvsideError

log = logging.getLogger("kvside")

_FIELDS = ("ledger", "messages", "pending", "pending_msg", "closing", "roll_strategy", "edit_log", "defaults")


SNAPSHOT_MAX_BYTES = 64 << 20  # about 10 ms of copying on a laptop CPU


class Snapshot:
    def __init__(self, core, s: Session):
        self.core, self.session = core, s
        self.buffer, self.size = None, 0
        size = lib.llama_state_seq_get_size(core.ctx, s.seq)
        if size <= SNAPSHOT_MAX_BYTES:
            self.buffer = core.seq_state(s.seq, into=lambda n: _borrow(core, n))
            self.size = size
        self.fields = {f: copy.deepcopy(getattr(s, f)) for f in _FIELDS}

    def restore(self) -> None:
        """Put the session back as it was. Without a state copy, or if llama.cpp cannot take the
        cells back (it always could hold them before), rebuild them from the saved ledger."""
        from kvside.engine.edits import reprefill

        core, s = self.core, self.session
        for f, value in self.fields.items():
            setattr(s, f, value)
        if self.buffer is None:
            reprefill(core, s)
            return
        try:
            set_seq_state(core.ctx, s.seq, self.buffer, self.size)
            core.mem.state_restored(s.seq)
        except KvsideError as exc:
            log.warning("session %s: could not reload its snapshot (%s); rebuilding from its tokens", s.name, exc)
            reprefill(core, s)

    def release(self) -> None:
        if self.buffer is not None:
            _give_back(self.core, self.buffer)
            self.buffer = None


# Every binding that edits a session takes a snapshot first: for a 1,100-token conversation of a
# 0.5B model that is 13 MB. A new buffer each time cost more than reading the state into it
# (fresh pages are zeroed and faulted in, then copied once more into bytes): about 20 ms a turn,
# measured. One buffer is kept for the next snapshot; one taken while it is lent gets its own.
def _borrow(core, size: int):
    buffer = core.snapshot_buffer
    if buffer is not None and len(buffer) >= size:
        core.snapshot_buffer = None
        return buffer
    return (ctypes.c_uint8 * (size + size // 4))()  # room for the conversation to grow


def _give_back(core, buffer) -> None:
    if core.snapshot_buffer is None or len(buffer) > len(core.snapshot_buffer):
        core.snapshot_buffer = buffer


@contextmanager
def atomic(core, s: Session):
    """Run the body as one edit of s: on any exception s is restored and the exception goes on."""
    snap = Snapshot(core, s)
    try:
        yield snap
    except BaseException:
        snap.restore()
        raise
    finally:
        snap.release()
