"""Text prompts (/completion, /infill, /v1/completions, Ollama's generate) bound to the cells an
earlier prompt left, token by token. Editors' autocomplete sends a new prompt per keystroke pause:
the same context chunks from other files (a few of them rotating), the code above and below the
cursor, the line being typed. What the new prompt shares with what a session holds is kept:

- the common prefix, exactly;
- after the first change, every run of at least `min_chunk` tokens the session also holds, in the
  same order, is moved to its new positions (llama_memory_seq_add re-rotates its keys);
- the tokens between those runs are decoded into the holes at their places, attending to what
  precedes them (the scratch-sequence recipe of edits._decode_into_hole); the cells the new prompt
  does not have go.

The moved runs keep the KV they were computed with after the old context (llama-server's
`--cache-reuse` makes the same trade); a session whose strategy is `reprefill` keeps the exact prefix
only. The token after the last kept run onwards is read as a prompt is."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from kvside.engine.edits import _decode_into_hole
from kvside.engine.ledger import RECOMPUTED
from kvside.engine.session import Session

ANCHOR = 8  # tokens that index a candidate run; runs are extended from there
MAX_CANDIDATES = 16  # occurrences of one anchor tried (repeated code lines have many)


@dataclass
class Plan:
    """How a new prompt reuses a session's cells: runs (held index, prompt index, length), in
    increasing order of both; the first starts at (0, 0) when there is a common prefix."""

    runs: list[tuple[int, int, int]] = field(default_factory=list)
    prefix: int = 0

    @property
    def reused(self) -> int:
        return sum(n for _, _, n in self.runs)


def plan(held: list[int], prompt: list[int], min_chunk: int) -> Plan:
    """The common prefix, then (min_chunk > 0) runs of at least min_chunk tokens found greedily in
    order: at each prompt position the longest run starting at one of the anchor's occurrences in
    what is held after the last run."""
    n = min(len(held), len(prompt))
    p = 0
    while p < n and held[p] == prompt[p]:
        p += 1
    out = Plan(runs=[(0, 0, p)] if p else [], prefix=p)
    if min_chunk <= 0 or len(prompt) - p < min_chunk:
        return out
    k = min(ANCHOR, min_chunk)
    index: dict[tuple, list[int]] = {}
    for i in range(p, len(held) - k + 1):
        index.setdefault(tuple(held[i:i + k]), []).append(i)
    i_min, j = p, p
    while j + min_chunk <= len(prompt):
        best_i, best_n = -1, 0
        for i in index.get(tuple(prompt[j:j + k]), ())[:MAX_CANDIDATES * 4]:
            if i < i_min:
                continue
            m = k
            while i + m < len(held) and j + m < len(prompt) and held[i + m] == prompt[j + m]:
                m += 1
            if m > best_n:
                best_i, best_n = i, m
        if best_n >= min_chunk:
            out.runs.append((best_i, j, best_n))
            i_min, j = best_i + best_n, j + best_n
        else:
            j += 1
    return out


def prefix_only(p: Plan) -> Plan:
    return Plan(runs=p.runs[:1], prefix=p.prefix) if p.prefix else Plan()


def cost(core, p: Plan, prompt_len: int, repair: int) -> float:
    """Estimated seconds (costs.py) until the prompt is read with plan p: each gap decoded into
    its hole on its own (small batches cost more per token), the repair of each moved run, one
    K-shift if anything moved, then the tail as a prompt."""
    costs, depth = core.costs, core.used_cells()
    moved = p.runs[1:] if p.prefix else p.runs
    total = costs.shift() if any(i != j for i, j, _ in moved) else 0.0
    end = 0
    for r, (_, j, n) in enumerate(p.runs):
        if j > end:
            total += costs.read(j - end, depth)
        if repair and (r or not p.prefix):
            total += costs.read(min(repair, n), depth)
        end = j + n
    return total + costs.read(prompt_len - end, depth)


def contiguous(s: Session) -> bool:
    pos = s.ledger.pos
    return not pos or pos[-1] == len(pos) - 1


def apply(core, s: Session, prompt: list[int], p: Plan, msg_id: int, repair: int = 0) -> dict:
    """Edit s's cells so they hold prompt[:end of the last run] at positions 0..: cells outside the
    runs go, runs move to their places, the gaps between runs are decoded into their holes, and the
    first `repair` tokens of each moved run are computed again after their new context (the cells
    that later tokens of the run attend to most, as a chunk's first tokens are: CacheBlend's and
    EPIC's finding). Returns what was done, with `tail`: the prompt tokens still to read. Moving
    runs needs a session without gaps and a cache that can shift; otherwise only the prefix is kept."""
    t0 = time.perf_counter()
    led = s.ledger
    runs = p.runs
    moved = runs[1:] if p.prefix else runs
    if moved and not (contiguous(s) and core.mem.can_shift()):
        runs, moved = runs[:1] if p.prefix else [], []
    # what no run keeps leaves the cache: from the end, so earlier positions stay valid
    spans, keep_until = [], 0
    for i, _, n in runs:
        if i > keep_until:
            spans.append((keep_until, i))
        keep_until = i + n
    spans.append((keep_until, len(led)))
    pos = list(led.pos)
    for i0, i1 in reversed(spans):
        if i1 > i0:
            core.mem.rm(s.seq, pos[i0], pos[i1 - 1] + 1)
            led.remove(pos[i0], pos[i1 - 1] + 1, "text changed")
    # a session with moved runs has no gaps, so a run's position is its old index. Runs moving
    # earlier go first, in order, then those moving later, last first: no run passes over cells
    # that are still in place
    shifts = [(i, n, j - i) for i, j, n in moved if j != i]
    for i, n, delta in [m for m in shifts if m[2] < 0] + [m for m in reversed(shifts) if m[2] > 0]:
        core.mem.add(s.seq, i, i + n, delta)
        led.shift(i, i + n, delta)
    # the gaps between runs, decoded in order so each attends to what precedes it, each moved run's
    # first tokens computed again after its gap
    inserted, repaired, end = 0, 0, 0
    for r, (_, j, n) in enumerate(runs):
        if j > end:
            _decode_into_hole(core, s, prompt[end:j], end)
            led.insert(end, prompt[end:j], msg_id)
            inserted += j - end
        if repair and (r or not p.prefix):
            k = min(repair, n)
            core.mem.rm(s.seq, j, j + k)
            _decode_into_hole(core, s, prompt[j:j + k], j)
            led.mark(j, j + k, RECOMPUTED)
            repaired += k
        end = j + n
    moved_tokens = sum(n for _, _, n in moved)
    return {"cached_tokens": p.prefix + moved_tokens - repaired, "prefix_tokens": p.prefix,
            "moved_tokens": moved_tokens, "moved_runs": len(moved), "inserted_tokens": inserted,
            "recomputed_tokens": repaired, "t_edit_s": time.perf_counter() - t0, "tail": prompt[end:]}
