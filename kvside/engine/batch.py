"""A reusable llama_batch that holds tokens of several sequences at once."""

from __future__ import annotations

from kvside._llama import lib


class Batch:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self.raw = lib.llama_batch_init(capacity, 0, 1)
        self.n = 0
        self.starts: dict[int, int] = {}  # sequence -> its first position in this batch

    def close(self) -> None:
        if self.raw is not None:
            lib.llama_batch_free(self.raw)
            self.raw = None

    def clear(self) -> None:
        self.n = 0
        self.starts.clear()
        self.raw.n_tokens = 0

    @property
    def room(self) -> int:
        return self.capacity - self.n

    def add(self, token: int, pos: int, seq: int, logits: bool) -> int:
        """Append one token; returns its index (the index llama_get_logits_ith takes)."""
        i = self.n
        assert i < self.capacity, "batch overflow"
        raw = self.raw
        raw.token[i] = token
        raw.pos[i] = pos
        raw.n_seq_id[i] = 1
        raw.seq_id[i][0] = seq
        raw.logits[i] = logits
        if pos < self.starts.setdefault(seq, pos):
            self.starts[seq] = pos
        self.n = i + 1
        raw.n_tokens = self.n
        return i
