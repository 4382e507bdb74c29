"""The ledger: for every position a session holds in the KV cache, the token, the message it
belongs to and its state. After edits the cache no longer equals a text prefix, so the ledger is the
single truth of what the model sees; `check` compares it with llama.cpp's view of the sequence.

Positions are strictly increasing; gaps are allowed (a mask without close_gap leaves one).
Ranges are half-open: [p0, p1).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

# States of cells that are in the cache.
LIVE = "live"
SUMMARY = "summary"
COMPOSED = "composed"
RECOMPUTED = "recomputed"
ERRATUM = "erratum"
CELL_STATES = (LIVE, SUMMARY, COMPOSED, RECOMPUTED, ERRATUM)


@dataclass
class Removed:
    """Cells that left the cache (rolled away, masked, pruned): kept for the cache map and the log."""

    reason: str
    messages: list[int]
    n_tokens: int
    first_pos: int
    last_pos: int


@dataclass
class Ledger:
    pos: list[int] = field(default_factory=list)
    tok: list[int] = field(default_factory=list)
    msg: list[int] = field(default_factory=list)
    state: list[str] = field(default_factory=list)
    removed: list[Removed] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.pos)

    @property
    def next_pos(self) -> int:
        """Where the next token goes: llama.cpp requires pos_max + 1."""
        return self.pos[-1] + 1 if self.pos else 0

    def append(self, tokens: list[int], msg: int, state: str = LIVE) -> int:
        """Record tokens decoded at next_pos.., returns the first position used."""
        start = self.next_pos
        self.pos.extend(range(start, start + len(tokens)))
        self.tok.extend(tokens)
        self.msg.extend([msg] * len(tokens))
        self.state.extend([state] * len(tokens))
        return start

    def head(self) -> list[int]:
        """The tokens of the cells at positions 0, 1, 2, ... up to the first hole or edit: the
        part of this cache a new prompt that begins the same way can share."""
        n = 0
        for n, p in enumerate(self.pos):
            if p != n:
                return self.tok[:n]
        return list(self.tok)

    def index(self, p: int) -> int:
        """Index of the first cell at position >= p."""
        return bisect.bisect_left(self.pos, p)

    def span(self, p0: int, p1: int) -> tuple[int, int]:
        """Index range of cells with p0 <= pos < p1 (p1 < 0: to the end)."""
        i0 = self.index(p0)
        i1 = len(self.pos) if p1 < 0 else self.index(p1)
        return i0, i1

    def remove(self, p0: int, p1: int, reason: str) -> int:
        """Forget cells at [p0, p1); returns how many there were."""
        i0, i1 = self.span(p0, p1)
        if i1 <= i0:
            return 0
        msgs = sorted(set(self.msg[i0:i1]))
        self.removed.append(Removed(reason, msgs, i1 - i0, self.pos[i0], self.pos[i1 - 1]))
        for column in (self.pos, self.tok, self.msg, self.state):
            del column[i0:i1]
        return i1 - i0

    def insert(self, p0: int, tokens: list[int], msg: int, state: str = LIVE) -> None:
        """Record tokens decoded into a hole at positions p0.. (before cells that stay)."""
        i = self.index(p0)
        end = self.pos[i] if i < len(self.pos) else None
        if end is not None and p0 + len(tokens) > end:
            raise ValueError("inserted cells overlap the cells after the hole")
        self.pos[i:i] = range(p0, p0 + len(tokens))
        self.tok[i:i] = tokens
        self.msg[i:i] = [msg] * len(tokens)
        self.state[i:i] = [state] * len(tokens)

    def truncate(self, p0: int) -> None:
        """Drop cells at p0 and later without recording them (undo of a failed append)."""
        i0 = self.index(p0)
        for column in (self.pos, self.tok, self.msg, self.state):
            del column[i0:]

    def shift(self, p0: int, p1: int, delta: int) -> None:
        """Move positions in [p0, p1) by delta, as llama_memory_seq_add does."""
        i0, i1 = self.span(p0, p1)
        for i in range(i0, i1):
            self.pos[i] += delta
        assert all(a < b for a, b in zip(self.pos, self.pos[1:])), "shift broke position order"

    def mark(self, p0: int, p1: int, state: str) -> None:
        i0, i1 = self.span(p0, p1)
        for i in range(i0, i1):
            self.state[i] = state

    def positions_of(self, messages: set[int]) -> list[int]:
        return [p for p, m in zip(self.pos, self.msg) if m in messages]

    def runs(self) -> list[dict]:
        """Contiguous runs of (message, state) along the positions, for the cache map."""
        out: list[dict] = []
        for p, m, s in zip(self.pos, self.msg, self.state):
            last = out[-1] if out else None
            if last and last["msg"] == m and last["state"] == s and last["p1"] == p:
                last["p1"] = p + 1
                last["n"] += 1
            else:
                out.append({"msg": m, "state": s, "p0": p, "p1": p + 1, "n": 1})
        return out

    def copy(self) -> "Ledger":
        return Ledger(list(self.pos), list(self.tok), list(self.msg), list(self.state), list(self.removed))

    def to_dict(self) -> dict:
        return {
            "pos": self.pos,
            "tok": self.tok,
            "msg": self.msg,
            "state": self.state,
            "removed": [vars(r) for r in self.removed],
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Ledger":
        ledger = cls(list(data["pos"]), list(data["tok"]), list(data["msg"]), list(data["state"]))
        ledger.removed = [Removed(**r) for r in data.get("removed", [])]
        n = len(ledger.pos)
        if not (len(ledger.tok) == len(ledger.msg) == len(ledger.state) == n):
            raise ValueError("ledger columns differ in length")
        if not all(type(v) is int for col in (ledger.pos, ledger.tok, ledger.msg) for v in col):
            raise ValueError("ledger positions, tokens and messages must be integers")
        if any(s not in CELL_STATES for s in ledger.state):
            raise ValueError("ledger has an unknown cell state")
        if any(a >= b for a, b in zip(ledger.pos, ledger.pos[1:])) or (n and ledger.pos[0] < 0):
            raise ValueError("ledger positions are not strictly increasing from 0 on")
        return ledger
