"""What llama_decode costs on this machine, learned from the engine's own decodes: the rates
behind each choice between editing the cache and reading tokens again (edits.replace_message,
textreuse), in seconds rather than token counts.

Token counts are the wrong currency. Measured on a 2-core CPU with the default model
(docs/benchmarks.md, "Decode costs"):
- deep in a cache (1,000 cells and more) a token read in a batch of under 64 costs about twice one
  read in a bigger batch (llama.cpp's CPU kernels switch at 64 tokens per ubatch): decoding 3 changed
  tokens into each of 4 holes is not "12 tokens" of a 500-token prefill;
- the cost per token grows with the cells in the cache (attention spans every used cell);
- a K-shift costs 0.10-0.15 s at the next decode (llama.cpp re-rotates every cell of the cache, used
  or not): as much as 15-20 prompt tokens read, whatever moved.

So the engine keeps a table of seconds per token by (batch class, cache depth), updated from every
llama_decode it runs, and the shift's price from the decodes that applied one. Until a rate has
been seen, estimates fall back to the nearest one measured, and with nothing measured yet to one
unit per token (the old rule), so a fresh engine decides as before and learns from its first prefill.
"""

from __future__ import annotations

SMALL_BATCH = 64  # below this many tokens per ubatch llama.cpp's CPU kernels differ (scheduler.py, too)
DEPTH_STEP = 512  # cache depth (used cells) buckets: rates are kept per bucket
WEIGHT = 0.2  # of a new sample in a rate's running average
SHIFT_SAMPLE_MAX = 16  # tokens: decodes larger than this that apply a shift do not price it
RESTORE_SAMPLE_MIN = 64  # cells: a smaller session's restore is mostly the file's fixed costs


class DecodeCosts:
    def __init__(self, n_ubatch: int):
        self.n_ubatch = n_ubatch
        self.rates: dict[tuple[bool, int], float] = {}  # (big batch, depth bucket) -> seconds per token
        self.shift_s: float | None = None  # what applying a pending K-shift adds to a decode
        self.restore_s: float | None = None  # seconds per cell of bringing a saved session back
        self.samples = 0

    # -- learning ---------------------------------------------------------------------------------
    def record(self, n_tokens: int, depth: int, seconds: float, shifted: bool) -> None:
        """One llama_decode of n_tokens with `depth` cells in the cache took `seconds`; `shifted`:
        it also applied a pending K-shift (its price is the time above the decode's own)."""
        if n_tokens <= 0:
            return
        if shifted:
            # priced from small decodes only: next to a prompt chunk's seconds (and their noise)
            # a shift's tenth of a second cannot be told apart
            own = self._known(n_tokens, depth) if n_tokens <= SHIFT_SAMPLE_MAX else None
            if own is not None:
                self.shift_s = _average(self.shift_s, max(seconds - own, 0.0))
            return
        key = (n_tokens >= SMALL_BATCH, depth // DEPTH_STEP)
        self.rates[key] = _average(self.rates.get(key), seconds / n_tokens)
        self.samples += 1

    def record_restore(self, n_cells: int, seconds: float) -> None:
        """A saved session of n_cells was brought back (its file read, checked and loaded) in
        `seconds`."""
        if n_cells >= RESTORE_SAMPLE_MIN:
            self.restore_s = _average(self.restore_s, seconds / n_cells)

    def _rate(self, big: bool, depth: int) -> float | None:
        """Seconds per token, from the nearest bucket measured: same batch class first."""
        bucket = depth // DEPTH_STEP
        for same_class in (True, False):
            known = [(abs(b - bucket), r) for (cls, b), r in self.rates.items() if (cls == big) == same_class]
            if known:
                return min(known)[1]
        return None

    def _known(self, n_tokens: int, depth: int) -> float | None:
        rate = self._rate(n_tokens >= SMALL_BATCH, depth)
        return None if rate is None else rate * n_tokens

    # -- estimates (seconds once anything is measured; tokens before) -------------------------------
    def read(self, n_tokens: int, depth: int) -> float:
        """Reading n_tokens as one prompt after `depth` cells: in ubatches, the cache growing."""
        total, left = 0.0, n_tokens
        while left > 0:
            n = min(left, self.n_ubatch)
            rate = self._rate(n >= SMALL_BATCH, depth)
            total += n * (rate if rate is not None else 1.0)
            depth += n
            left -= n
        return total

    def shift(self) -> float:
        """Applying a K-shift once (every move of one edit is applied by the same re-rotation)."""
        return self.shift_s if self.shift_s is not None else 0.0

    def restore(self, n_cells: int) -> float | None:
        """Bringing a saved session of n_cells back; None until one was measured."""
        return None if self.restore_s is None else self.restore_s * n_cells

    @property
    def measured(self) -> bool:
        return bool(self.rates)

    def report(self) -> dict:
        """The table, for /health and the docs: ms per token by batch class and depth."""
        rows = {f"{'big' if big else 'small'}@{b * DEPTH_STEP}": round(r * 1000, 3)
                for (big, b), r in sorted(self.rates.items())}
        return {"ms_per_token": rows, "shift_ms": None if self.shift_s is None else round(self.shift_s * 1000, 1),
                "restore_ms_per_1k_cells": None if self.restore_s is None else round(self.restore_s * 1e6, 1),
                "samples": self.samples}


def _average(old: float | None, new: float) -> float:
    """A running average that one outlier cannot drag far (a decode preempted by another process on
    a busy machine, a first call that warms caches): a sample counts at most 3x, at least 1/3 of it."""
    if old is None:
        return new
    return (1 - WEIGHT) * old + WEIGHT * min(max(new, old / 3), old * 3)
