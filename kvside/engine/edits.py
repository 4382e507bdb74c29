"""Cache edits: each changes a session's cells in place and records itself in the ledger and the
edit log. All run on the engine thread with the session idle.

Every edit has a fallback, `reprefill`: rebuild the session's cells from the ledger's tokens. It is
also the reference every edit is measured against, and what runs when the cache cannot shift
(`llama_memory_can_shift` is false) or llama.cpp refuses a removal. An edit either completes or the
session is rebuilt from its ledger: it is never left half-edited.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass

from kvside.engine import checkpoints, deviation, native, prompt
from kvside.engine.jobs import JOB_CHUNK, finish
from kvside.engine.ledger import ERRATUM, LIVE, RECOMPUTED, SUMMARY
from kvside.engine.session import (
    MSG_DROPPED,
    MSG_MASKED,
    MSG_PRUNED,
    MSG_ROLLED,
    MSG_SUMMARIZED,
    Message,
    Session,
)
from kvside.engine.state import copy_seq_on_device, set_seq_state
from kvside.errors import EditError, InvalidRequest, KvsideError

SINK = 4  # tokens kept at the front when a session has no pinned messages (the attention sink)


NATIVE_STRATEGIES = ("values", "select")


@dataclass(frozen=True)
class Strategy:
    """How the cells after an edit are brought up to date.

    shift        keep them as they are (keys re-rotated by the shift, values as computed)
    recompute:R  recompute the first R exactly (stock llama.cpp, through the scratch sequence)
    values:R     recompute only the values of the first R, keeping the shifted keys (native patch)
    values:all   the same for every cell after the edit (native patch)
    select:F     recompute, in place, the fraction F of cells the deviation signal ranks most
                 stale, wherever they are (native patch; kvside/engine/deviation.py)
    reprefill    rebuild the session from its tokens (the reference)
    """

    name: str
    r: int = 0  # recompute, values: how many cells (-1: all)
    frac: float = 0.0  # select: the fraction of cells

    @classmethod
    def parse(cls, text: str) -> Strategy:
        text = (text or "shift").strip()
        if text in ("shift", "reprefill"):
            return cls(text)
        name, _, arg = text.partition(":")
        if name not in ("recompute", "values", "select") or not arg:
            raise InvalidRequest(f"unknown strategy {text!r} (shift, recompute:R, values:R, values:all, "
                                 "select:F, reprefill)")
        if name in NATIVE_STRATEGIES and not native.available():
            raise InvalidRequest(f"strategy {text!r} needs kvside's native patch to llama.cpp, which is not "
                                 "loaded (build it with `make native`; kvside loads it from there)")
        if name == "select":
            try:
                frac = float(arg)
            except ValueError:
                frac = -1.0
            if not 0.0 < frac <= 1.0:
                raise InvalidRequest(f"bad strategy {text!r}: select:F needs 0 < F <= 1")
            return cls(name, frac=frac)
        if name == "values" and arg == "all":
            return cls(name, r=-1)
        try:
            r = int(arg)
        except ValueError:
            r = -1
        if r < 0:
            raise InvalidRequest(f"bad strategy {text!r}: {name}:R needs R >= 0" +
                                 (" or 'all'" if name == "values" else ""))
        return cls(name, r)

    @property
    def needs_scores(self) -> bool:
        return self.name == "select"

    def repaired(self, later: int, whole: int) -> int:
        """How many cells the strategy computes again when an edit precedes `later` cells of a
        session of `whole` cells (for the cost of an edit)."""
        if self.name == "reprefill":
            return whole
        if self.name == "select":
            return math.ceil(self.frac * later)
        if self.name in ("recompute", "values"):
            return later if self.r < 0 else min(self.r, later)
        return 0

    def __str__(self) -> str:
        if self.name == "select":
            return f"select:{self.frac:g}"
        if self.name in ("recompute", "values"):
            return f"{self.name}:{'all' if self.r < 0 else self.r}"
        return self.name


def head_size(s: Session) -> int:
    """Cells kept at the front by default: every pinned message (the system prompt), else the sink."""
    pinned = {m.id for m in s.messages if m.pinned}
    n = 0
    while n < len(s.ledger) and s.ledger.msg[n] in pinned:
        n += 1
    return n if n else min(SINK, len(s.ledger))


# -- the rebuild every edit can fall back to --------------------------------------------------------
def reprefill_steps(core, s: Session, chunk: int = JOB_CHUNK):
    """Rebuild s's cells from its ledger's tokens, `chunk` tokens at a time (a generator: see
    Core.start_job). Where the cache cannot go back (a recurrent state, a sliding window) and a
    context checkpoint still follows the ledger's first cells, those come back from it and only
    the rest is read (checkpoints.py); otherwise everything is read from position 0. What is read
    lies densely after what came back. Returns how many cells came back from a checkpoint."""
    led = s.ledger
    tokens = list(led.tok)
    start = 0
    cp = checkpoints.best(s)
    if cp is not None:
        try:
            checkpoints.restore(core, s, cp)
            start = cp.n
        except KvsideError:
            start = 0  # read everything
    if not start:
        core.mem.clear_seq(s.seq)
    p0 = led.pos[start - 1] + 1 if start else 0
    try:
        yield from core.decode_steps(s.seq, tokens[start:], p0, chunk)
    except KvsideError:
        core.mem.clear_seq(s.seq)
        led.truncate(0)
        raise EditError(f"session {s.name!r} could not be rebuilt; its cache was cleared") from None
    led.pos = led.pos[:start] + list(range(p0, p0 + len(tokens) - start))
    return start


def reprefill(core, s: Session) -> int:
    """reprefill_steps at once; returns how many cells came back from a checkpoint."""
    return finish(reprefill_steps(core, s, core.n_batch))


# -- roll -------------------------------------------------------------------------------------------
def roll(core, s: Session, drop: int, keep: int | None = None, strategy: str | Strategy = "shift",
         boundary: bool = False, reason: str = "rolled") -> dict:
    """Drop `drop` cells after the first `keep` (default: the system prompt, else the sink) and move
    the rest down to follow the head. With `boundary`, round `drop` up to a whole message."""
    return finish(roll_steps(core, s, drop, keep, strategy, boundary, reason, chunk=core.n_batch))


def roll_steps(core, s: Session, drop: int, keep: int | None = None, strategy: str | Strategy = "shift",
               boundary: bool = False, reason: str = "rolled", chunk: int = JOB_CHUNK):
    """roll as a job: a re-prefill (the strategy, or the fallback) advances `chunk` tokens at a time."""
    strat = strategy if isinstance(strategy, Strategy) else Strategy.parse(strategy)
    led = s.ledger
    keep = head_size(s) if keep is None else keep
    if keep < 0 or drop < 0:
        raise InvalidRequest("keep and drop must be >= 0")
    if keep + drop > len(led):
        raise InvalidRequest(f"cannot drop {drop} after {keep} kept: the session holds {len(led)} cells")
    if drop == 0:
        return {"dropped": 0, "strategy": str(strat)}
    end = keep + drop  # cell index of the first kept window cell
    if boundary:
        last_msg = led.msg[end - 1]
        while end < len(led) and led.msg[end] == last_msg:
            end += 1
    dropped_msgs = set(led.msg[keep:end])
    kept_after = set(led.msg[end:]) | set(led.msg[:keep])
    if s.pending_msg in dropped_msgs and s.pending_msg not in kept_after:
        kept_after.add(s.pending_msg)
    t0 = time.perf_counter()
    p_drop = led.pos[keep] if keep < len(led) else led.next_pos
    p_rest = led.pos[end] if end < len(led) else led.next_pos
    p_head_end = (led.pos[keep - 1] + 1) if keep else 0  # the window moves to follow the head
    n_dropped = end - keep
    fallback = None
    restored = 0  # cells a rebuild took from a context checkpoint
    snapshot = led.copy()
    chosen = None
    if strat.needs_scores and end < len(led) and core.mem.can_shift():
        chosen = deviation.choose(deviation.scores(core, s.seq, (p_drop, p_rest), led.pos[end:]), strat.frac)
    try:
        if strat.name == "reprefill" or not core.mem.can_shift():
            if strat.name != "reprefill":
                fallback = "reprefill (this cache cannot shift positions)"
            led.remove(p_drop, p_rest, reason)
            restored = yield from reprefill_steps(core, s, chunk)
            recomputed = len(led) - restored
        else:
            core.mem.rm(s.seq, p_drop, p_rest)
            led.remove(p_drop, p_rest, reason)
            delta = p_head_end - p_rest
            if delta:
                core.mem.add(s.seq, p_rest, -1, delta)
                led.shift(p_rest, -1, delta)
            recomputed = repair(core, s, keep, len(led), strat, chosen)
    except EditError as exc:
        fallback = f"reprefill ({exc.message})"
        s.ledger = led = snapshot  # the cache may be half-edited: rebuild it from the ledger
        led.remove(p_drop, p_rest, reason)
        restored = yield from reprefill_steps(core, s, chunk)
        recomputed = len(led) - restored
    for m in s.messages:
        if m.id in dropped_msgs and m.id not in kept_after:
            m.state = MSG_ROLLED
    report = {
        "dropped": n_dropped,
        "kept_head": keep,
        "strategy": str(strat),
        "recomputed": recomputed,
        "n_cells": len(led),
        "messages_rolled": sorted(dropped_msgs - kept_after),
        "t_edit_s": time.perf_counter() - t0,
    }
    if fallback:
        report["fallback"] = fallback
    if restored:
        report["from_checkpoint"] = restored
    s.log("roll", **report)
    return report


def _recompute_window(core, s: Session, keep: int, r: int) -> int:
    """Recompute the first r cells of the window after the head exactly, with stock llama.cpp:
    the head's cells are shared into the scratch sequence, the window's tokens decoded there after
    them, and the fresh cells handed back to the session in place of the shifted ones."""
    led = s.ledger
    r = min(r, len(led) - keep)
    if r <= 0:
        return 0
    p0 = led.pos[keep]
    # only a contiguous run can be decoded in one go (a batch must start at pos_max + 1)
    run = 1
    while run < r and led.pos[keep + run] == p0 + run:
        run += 1
    r = run
    scratch = core.scratch_seq
    head_end = led.pos[keep - 1] + 1 if keep else 0
    if head_end != p0:
        raise EditError("the window does not follow the head")
    core.mem.clear_seq(scratch)
    try:
        if keep:
            core.mem.cp(s.seq, scratch, 0, p0)
        core.decode_now(scratch, led.tok[keep : keep + r], p0, logits="none")
        core.mem.rm(s.seq, p0, p0 + r)
        core.mem.cp(scratch, s.seq, p0, p0 + r)
    finally:
        core.mem.clear_seq(scratch)
    led.mark(p0, p0 + r, RECOMPUTED)
    return r


def repair(core, s: Session, first: int, end: int, strat: Strategy, chosen: list[int] | None = None) -> int:
    """Bring the cells at ledger indices [first, end) up to date after an edit changed what came
    before them, as `strat` says. `chosen`: for select, the offsets (from `first`) to recompute.
    Returns how many cells were recomputed."""
    led = s.ledger
    n = end - first
    if n <= 0 or strat.name in ("shift", "reprefill"):
        return 0
    if strat.name == "recompute":
        return _recompute_window(core, s, first, min(strat.r, n))
    if strat.name == "values":
        idx = list(range(first, first + (n if strat.r < 0 else min(strat.r, n))))
    else:
        idx = [first + o for o in (chosen or []) if o < n]
    positions = [led.pos[i] for i in idx]
    native.recompute(core, s.seq, positions, [led.tok[i] for i in idx], values_only=strat.name == "values")
    for p0, p1 in _spans(positions):
        led.mark(p0, p1, RECOMPUTED)
    return len(idx)


# -- gaps -------------------------------------------------------------------------------------------
def close_gaps(core, s: Session) -> dict:
    """Move every cell down so positions are dense again (one K-shift at the next decode).
    Masks leave holes on purpose: the kept cells keep the distances they were computed with, and
    llama.cpp re-rotates every cell of the cache on a shift, so kvside closes holes only when the
    positions run out."""
    led = s.ledger
    t0 = time.perf_counter()
    moved = 0
    if not core.mem.can_shift():
        raise EditError("this cache cannot shift positions")
    for i in range(len(led.pos)):
        p = led.pos[i]
        if p != i:  # everything from here on moves down by the hole's width
            core.mem.add(s.seq, p, -1, i - p)
            led.shift(p, -1, i - p)
            moved += 1
    report = {"strategy": "close_gaps", "dropped": 0, "gaps_closed": moved, "next_pos": led.next_pos,
              "t_edit_s": time.perf_counter() - t0}
    if moved:
        s.log("close_gaps", **report)
    return report


# -- auto-roll --------------------------------------------------------------------------------------
def auto_roll(core, s: Session, need: int, protect: set[int]) -> dict | None:
    """Make room for `need` more positions: close holes left by masks if that is enough, else roll
    whole oldest turns (never pinned messages or those in `protect`). Returns the report, or None
    when nothing had to change."""
    led = s.ledger
    if led.next_pos + need < core.n_ctx:
        return None
    if len(led) + need < core.n_ctx and len(led) < led.next_pos and core.mem.can_shift():
        report = close_gaps(core, s)
        report["auto"] = True
        return report
    pruned = _prune_for_room(core, s, need, protect) if s.prune_tools is not None else None
    if pruned is not None and led.next_pos + need < core.n_ctx:
        return pruned
    rolled = _roll_for_room(core, s, need, protect)
    if pruned is not None and rolled is not None:
        rolled["pruned"] = pruned
    return rolled or pruned


def _prune_for_room(core, s: Session, need: int, protect: set[int]) -> dict | None:
    """The agent policy: mask the oldest tool results (all but the last s.prune_tools) until the
    window has room, and close the hole so their positions come back. The turns around them
    (the calls, the answers) keep their cells: an agent's later steps lean on those, while an
    old tool output has usually been read and acted on already."""
    led = s.ledger
    results = [m for m in s.messages if m.kind == "tool" and not m.pinned and m.id not in protect
               and led.positions_of({m.id})]
    old = results[: max(len(results) - s.prune_tools, 0)]
    chosen, cells = [], len(led)
    for m in old:
        chosen.append(m.id)
        cells -= len(led.positions_of({m.id}))
        if cells + need < core.n_ctx:
            break
    if not chosen:
        return None
    report = mask(core, s, messages=chosen, close_gap=core.mem.can_shift(), reason="pruned (window full)",
                  state=MSG_PRUNED)
    report.update(auto=True, strategy="prune_tools", pruned_messages=chosen)
    return report


def _roll_for_room(core, s: Session, need: int, protect: set[int]) -> dict | None:
    led = s.ledger
    keep = head_size(s)
    pinned = {m.id for m in s.messages if m.pinned} | protect
    end = keep
    # roll whole messages from the head on until the rest fits
    while end < len(led) and led.msg[end] not in pinned:
        first_msg = led.msg[end]
        while end < len(led) and led.msg[end] == first_msg:
            end += 1
        p_rest = led.pos[end] if end < len(led) else led.next_pos
        head_end = led.pos[keep - 1] + 1 if keep else 0
        if head_end + (led.next_pos - p_rest) + need < core.n_ctx:
            break
    if end == keep:
        return None
    report = roll(core, s, end - keep, keep=keep, strategy=s.roll_strategy, reason="auto-rolled")
    report["auto"] = True
    return report


# -- mask -------------------------------------------------------------------------------------------
def _spans(positions: list[int]) -> list[tuple[int, int]]:
    """Maximal runs of consecutive positions as half-open spans."""
    spans: list[tuple[int, int]] = []
    for p in positions:
        if spans and spans[-1][1] == p:
            spans[-1] = (spans[-1][0], p + 1)
        else:
            spans.append((p, p + 1))
    return spans


def mask(core, s: Session, messages: list[int] | None = None, span: tuple[int, int] | None = None,
         close_gap: bool = False, reason: str = "masked", state: str = MSG_MASKED,
         strategy: str | Strategy = "shift") -> dict:
    return finish(mask_steps(core, s, messages, span, close_gap, reason, state, strategy, chunk=core.n_batch))


def mask_steps(core, s: Session, messages: list[int] | None = None, span: tuple[int, int] | None = None,
               close_gap: bool = False, reason: str = "masked", state: str = MSG_MASKED,
               strategy: str | Strategy = "shift", chunk: int = JOB_CHUNK):
    """Remove the cells of `messages` (or of the position span [p0, p1)); later cells keep the KV
    computed while those were visible. With close_gap the later cells move down to close the hole.
    `strategy` says what happens to the cells after the first removed one (see Strategy); the
    default, shift, leaves them as they are."""
    strat = strategy if isinstance(strategy, Strategy) else Strategy.parse(strategy)
    if strat.name == "recompute" and strat.r and not close_gap:
        raise InvalidRequest("recompute:R after a mask needs close_gap: stock llama.cpp decodes only right "
                             "after a sequence's last position (values:R works across the hole, with the "
                             "native patch)")
    led = s.ledger
    if (messages is None) == (span is None):
        raise InvalidRequest("mask needs either messages or a position span")
    if messages is not None:
        ids = set(messages)
        known = {m.id for m in s.messages}
        if not ids <= known:
            raise InvalidRequest(f"unknown message ids: {sorted(ids - known)}")
        if any(s.message(i).pinned for i in ids):
            raise InvalidRequest("pinned messages (the system prompt) cannot be masked")
        positions = led.positions_of(ids)
    else:
        p0, p1 = span
        if not 0 <= p0 < p1:
            raise InvalidRequest("span must satisfy 0 <= p0 < p1")
        i0, i1 = led.span(p0, p1)
        positions = led.pos[i0:i1]
        ids = set(led.msg[i0:i1])
    t0 = time.perf_counter()
    spans = _spans(positions)
    n = len(positions)
    fallback = None
    snapshot = led.copy()
    first = sum(1 for p in led.pos if p < spans[0][0]) if spans else len(led)  # first cell the mask affects
    chosen = None
    if strat.needs_scores and spans:
        removed = set(positions)
        after = [p for p in led.pos[first:] if p not in removed]
        if after:
            chosen = deviation.choose(deviation.scores(core, s.seq, removed, after), strat.frac)
    recomputed = restored = 0
    try:
        if close_gap and not core.mem.can_shift():
            raise EditError("this cache cannot shift positions")
        for p0, p1 in reversed(spans):  # from the end, so earlier spans keep their positions
            core.mem.rm(s.seq, p0, p1)
            led.remove(p0, p1, reason)
            if close_gap and p1 < led.next_pos + (p1 - p0):
                core.mem.add(s.seq, p1, -1, p0 - p1)
                led.shift(p1, -1, p0 - p1)
        if strat.name == "reprefill":
            restored = yield from reprefill_steps(core, s, chunk)
            recomputed = len(led) - restored
        else:
            recomputed = repair(core, s, first, len(led), strat, chosen)
    except EditError as exc:
        fallback = f"reprefill ({exc.message})"
        s.ledger = led = snapshot  # the cache may be half-edited: rebuild it from the ledger
        for p0, p1 in reversed(spans):
            led.remove(p0, p1, reason)
        restored = yield from reprefill_steps(core, s, chunk)
        recomputed = len(led) - restored
    for m in s.messages:
        if m.id in ids and not led.positions_of({m.id}):
            m.state = state
    report = {"masked": n, "messages": sorted(ids), "spans": spans, "close_gap": close_gap,
              "strategy": str(strat), "recomputed": recomputed,
              "n_cells": len(led), "next_pos": led.next_pos, "t_edit_s": time.perf_counter() - t0}
    if fallback:
        report["fallback"] = fallback
    if restored:
        report["from_checkpoint"] = restored
    s.log("mask", **report)
    return report


def prune(core, s: Session, kind: str = "tool", keep_last: int = 1, close_gap: bool = False) -> dict:
    """Mask old messages of one kind (tool results by default), keeping the last `keep_last`."""
    candidates = [m.id for m in s.messages if m.kind == kind and s.ledger.positions_of({m.id})]
    old = candidates[: max(len(candidates) - keep_last, 0)]
    if not old:
        return {"masked": 0, "messages": []}
    return mask(core, s, messages=old, close_gap=close_gap, reason="pruned", state=MSG_PRUNED)


# -- replace: a message the client changed, edited token by token -------------------------------------

def message_tokens(core, s: Session, msg_id: int, new: dict) -> list[int]:
    """The tokens the client's version `new` of message msg_id renders to, in its place: after
    the messages before it and with the one after it (templates that group turns move closings)."""
    order = [m for m in s.messages if m.kind != "text"]
    i = next(k for k, m in enumerate(order) if m.id == msg_id)
    after = [order[i + 1].as_template()] if i + 1 < len(order) else []
    segs = core.template.segments([m.as_template() for m in order[:i]], [new] + after,
                                  add_generation_prompt=False, tools=s.tools)
    if segs is None:
        raise EditError("the chat template rewrites earlier turns for this change")
    tokens = core.model.tokenize(segs[0], add_special=False, parse_special=True)
    first_cell = s.ledger.msg[0] if len(s.ledger) else None
    if first_cell == msg_id and core.model.add_bos and s.ledger.tok[0] == core.model.bos:
        tokens.insert(0, core.model.bos)
    return tokens


def replace_message(core, s: Session, msg_id: int, new: dict) -> dict | None:
    """Make message msg_id the client's version `new`: the tokens that did not change keep their
    cells, the removed ones leave, and the new ones are decoded into the hole at their place,
    attending to everything before them (the stock recipe: the prefix is shared into the scratch
    sequence, the tokens decoded there, the cells handed over). When the hole is too small the
    later cells move up. The later cells keep the KV they were computed with; the session's
    strategy decides what is repaired. Returns None, changing nothing, when the edit would take
    longer than reading this message and everything after it again (the binding then cuts the
    match here), by the engine's measured decode rates (costs.py): each changed stretch is a small
    decode of its own, growing the message shifts the tail, the strategy repairs what follows."""
    m = s.message(msg_id)
    if msg_id not in s.ledger.msg:  # no cells (rolled or masked): only the history changes
        _update_message(m, new)
        return {"replaced": msg_id, "cells": False}
    if s.pending and s.pending_msg == msg_id:
        return None  # its last token is not in the cache yet: read it anew
    report = rewrite_cells(core, s, msg_id, message_tokens(core, s, msg_id, new))
    if report is not None:
        _update_message(m, new)
    return report


def rewrite_cells(core, s: Session, msg_id: int, tokens: list[int], kind: str = "replace") -> dict | None:
    """Make the cells of message msg_id hold `tokens` (see replace_message): the unchanged
    tokens keep their cells, the rest are removed or decoded into the hole. Returns None,
    changing nothing, when that would cost more than reading the message and what follows again,
    or when the cache cannot be written there."""
    from difflib import SequenceMatcher

    t0 = time.perf_counter()
    led = s.ledger
    idx = [i for i, mm in enumerate(led.msg) if mm == msg_id]
    if not idx or not core.mem.window_ok(s.seq, led.pos[idx[0]]):
        return None  # a recurrent state or a sliding window cannot be written into its past
    old = [led.tok[i] for i in idx]
    ops = SequenceMatcher(None, old, tokens, autojunk=False).get_opcodes()
    kept = sum(i2 - i1 for tag, i1, i2, _, _ in ops if tag == "equal")
    growth = sum(max(0, (j2 - j1) - (i2 - i1)) for tag, i1, i2, j1, j2 in ops if tag != "equal")
    strat = Strategy.parse(s.roll_strategy)
    cost = edit_cost(core, s, idx, len(tokens), [j2 - j1 for tag, _, _, j1, j2 in ops if tag != "equal"],
                     growth > 0, strat)
    if cost["edit_s"] >= cost["reread_s"]:
        return None
    # room for what grows, checked before anything changes (an edit must not stop half-way)
    if growth and not _room_to_grow(core, s, growth):
        return None
    idx = [i for i, mm in enumerate(led.msg) if mm == msg_id]  # (closing the holes moved them)
    positions = [led.pos[i] for i in idx]
    removed = inserted = shifted = 0
    first_changed = None
    for tag, i1, i2, j1, j2 in reversed(ops):  # from the end: earlier positions stay put
        if tag == "equal":
            continue
        if i1 < i2:
            p0, p1 = positions[i1], positions[i2 - 1] + 1
            core.mem.rm(s.seq, p0, p1)
            removed += led.remove(p0, p1, "replaced")
        # the slot: after the cell before it, up to the cell after it
        anchor_pos = positions[i1] if i1 < len(positions) else positions[-1] + 1
        k = led.index(anchor_pos)
        start = led.pos[k - 1] + 1 if k else 0
        if j2 > j1:
            need = j2 - j1
            limit = led.pos[k] if k < len(led) else None
            if limit is not None and start + need > limit:
                grow = start + need - limit
                if led.next_pos + grow > core.n_ctx or not core.mem.can_shift():
                    raise EditError("no room to write the changed tokens in place")
                core.mem.add(s.seq, limit, -1, grow)
                led.shift(limit, -1, grow)
                shifted += grow
            _decode_into_hole(core, s, tokens[j1:j2], start)
            led.insert(start, tokens[j1:j2], msg_id)
            inserted += need
        first_changed = start
    recomputed = 0
    if strat.name == "reprefill":
        reprefill(core, s)
        recomputed = len(led)
    elif first_changed is not None:
        first = led.index(first_changed)
        try:
            recomputed = repair(core, s, first, len(led), strat)
        except EditError:
            reprefill(core, s)  # the strategy cannot run across this layout: the exact fallback
            recomputed = len(s.ledger)
    report = {"replaced": msg_id, "kept_tokens": kept, "removed": removed, "inserted": inserted,
              "shifted": shifted, "strategy": str(strat), "recomputed": recomputed, **cost,
              "t_edit_s": time.perf_counter() - t0}
    s.log(kind, **report)
    return report


@dataclass
class Restyle:
    """What appending messages takes when the chat template renders earlier turns differently
    once they follow (see restyle)."""
    segments: list[str]  # the text each new message adds
    reread: list[tuple[int, str]]  # held messages whose cells went, to be read again first
    report: dict | None  # None when no earlier turn changed


def restyle(core, s: Session, new: list[Message], recheck: list[int] = ()) -> Restyle:
    """Prepare s for appending `new`. Templates of reasoning models (Qwen3 and others) show an
    assistant turn's reasoning, or an empty think block, only until the next user message: once
    it comes, the earlier turns render without it, and llama.cpp reads the whole prompt again.
    Here the held turns whose text changed are edited in place like any client edit (the dropped
    think block's cells go, the later cells keep their KV; rewrite_cells). Where a turn cannot be
    edited (a recurrent state, a sliding window, or an edit dearer than reading), its cells and
    those after it go and the turns are read again before the new messages. `recheck`: held
    messages changed since their cells were read (a reply sent back without its reasoning), whose
    text is compared too."""
    order = [m for m in s.messages if m.kind != "text" and m.state != MSG_DROPPED]  # as template_history
    ids = [m.id for m in order]
    start = min((ids.index(i) for i in recheck if i in ids), default=None)
    k, texts = core.template.layout([m.as_template() for m in order], [m.as_template() for m in new],
                                    tools=s.tools, start=start)
    held, segments = texts[: len(order) - k], texts[len(order) - k:]
    t0 = time.perf_counter()
    led = s.ledger
    edited, cut = [], None
    for m, text in zip(order[k:], held):
        cells = [i for i, mm in enumerate(led.msg) if mm == m.id]
        pending = m.id == s.pending_msg
        if not cells and not pending:
            continue  # not in the cache (rolled, masked): nothing there to change
        bos = cells and cells[0] == 0 and core.model.add_bos and led.tok[0] == core.model.bos
        tokens = [led.tok[i] for i in cells[1 if bos else 0:]]
        suffix = (core.model.detokenize(s.pending, special=True) + s.closing) if pending else ""
        if core.model.detokenize(tokens, special=True) + suffix == text:
            continue
        # a reply's last token and closing text wait to be read with the next prompt: they stay
        # when the new text still ends with them, else the cells take the whole new text
        keep_pending = pending and text.endswith(suffix)
        body = text[: len(text) - len(suffix)] if keep_pending else text
        report = None
        if cells:
            want = ([core.model.bos] if bos else []) + \
                core.model.tokenize(body, add_special=False, parse_special=True)
            report = rewrite_cells(core, s, m.id, want, kind="restyle")
        if report is None:
            cut = m
            break
        if pending and not keep_pending:
            core.clear_pending(s)
        edited.append(report)
    reread: list[tuple[int, str]] = []
    if cut is not None:
        # from this turn on, the cells go and the turns' new text is read again
        live = {m.id for m in order if m.id in led.msg or m.id == s.pending_msg}
        first = led.msg.index(cut.id) if cut.id in led.msg else len(led)
        if first < len(led):
            p0 = led.pos[first]
            try:
                core.mem.rm(s.seq, p0, -1)
            except EditError:
                pass  # a recurrent state cannot drop its end: the reply's start rebuilds it from a checkpoint
            led.remove(p0, -1, "restyled")
        core.clear_pending(s)
        j = order.index(cut)
        for m, text in zip(order[j:], held[j - k:]):
            if m.id in live and text:
                reread.append((m.id, text))
    if not edited and cut is None:
        return Restyle(segments, [], None)
    report = {"restyled": [r["replaced"] for r in edited], "removed": sum(r["removed"] for r in edited),
              "inserted": sum(r["inserted"] for r in edited),
              "recomputed": sum(r["recomputed"] for r in edited),
              "reread_messages": [m for m, _ in reread],
              "t_edit_s": time.perf_counter() - t0}
    s.log("restyle", **report)
    return Restyle(segments, reread, report)


def insert_messages(core, s: Session, before_id: int, new: list[dict]) -> dict | None:
    """Messages a client inserted before held message `before_id` (a note, a tool result it had
    left out): their tokens are decoded into room made at their place (the later cells move up by
    their length: one K-shift, unless an earlier mask left a hole there), attending to everything
    before them; the later cells keep their KV and the session's strategy decides what is
    repaired. Returns None, changing nothing, when that would take longer than reading the new
    messages and everything after them again (costs.py), when the template would render the held
    message after them differently, or when the cache cannot shift or has no room."""
    t0 = time.perf_counter()
    led = s.ledger
    order = [m for m in s.messages if m.kind != "text"]
    i = next(k for k, m in enumerate(order) if m.id == before_id)
    idx = [k for k, mm in enumerate(led.msg) if mm == before_id]
    if not idx or (s.pending and s.pending_msg in {m.id for m in order[:i]}):
        return None
    if not core.mem.window_ok(s.seq, led.pos[idx[0]]):
        return None  # a recurrent state or a sliding window cannot be written into its past
    msgs = [Message.from_request(-1, version) for version in new]
    segs = core.template.segments([m.as_template() for m in order[:i]], [m.as_template() for m in msgs]
                                  + [order[i].as_template()], add_generation_prompt=False, tools=s.tools)
    if segs is None:
        return None  # the template rewrites earlier turns for this insertion
    # the held message keeps its cells: only if it reads the same after the insertion (its tokens
    # may be the model's own, not the tokenizer's, so text is compared)
    if core.model.detokenize([led.tok[k] for k in idx], special=True) != segs[len(new)]:
        return None
    pieces = [core.model.tokenize(text, add_special=False, parse_special=True) for text in segs[:len(new)]]
    n = sum(len(p) for p in pieces)
    if not n:
        return None
    strat = Strategy.parse(s.roll_strategy)
    costs, depth = core.costs, core.used_cells()
    later = len(led) - idx[0]
    start = led.pos[idx[0] - 1] + 1 if idx[0] else 0
    grow = max(n - (led.pos[idx[0]] - start), 0)  # a hole an earlier mask left there takes some
    edit_s = costs.read(n, depth) + (costs.shift() if grow else 0.0) + \
        costs.read(strat.repaired(later, len(led) + n), depth)
    reread_s = costs.read(n + later, depth - later)
    if edit_s >= reread_s or core.used_cells() + n > core.n_cells:
        return None
    if grow and led.next_pos + grow >= core.n_ctx:
        if not _room_to_grow(core, s, grow):
            return None
        # the holes are closed: the cells after the insertion point move up by all of it
        idx = [k for k, mm in enumerate(led.msg) if mm == before_id]
        start = led.pos[idx[0] - 1] + 1 if idx[0] else 0
        grow = n
    elif grow and not core.mem.can_shift():
        return None
    if grow:
        core.mem.add(s.seq, led.pos[idx[0]], -1, grow)
        led.shift(led.pos[idx[0]], -1, grow)
    _decode_into_hole(core, s, [t for p in pieces for t in p], start)
    pos, added = start, []
    for msg, toks in zip(msgs, pieces):
        msg.id = s.next_message_id()
        led.insert(pos, toks, msg.id)
        pos += len(toks)
        s.messages.insert(s.messages.index(order[i]), msg)
        added.append(msg.id)
    if strat.name == "reprefill":
        reprefill(core, s)
        recomputed = len(s.ledger)
    else:
        try:
            recomputed = repair(core, s, led.index(pos), len(led), strat)
        except EditError:
            reprefill(core, s)  # the strategy cannot run across this layout: the exact fallback
            recomputed = len(s.ledger)
    report = {"inserted_messages": added, "inserted": n, "shifted": grow, "strategy": str(strat),
              "recomputed": recomputed, "edit_s": round(edit_s, 4), "reread_s": round(reread_s, 4),
              "t_edit_s": time.perf_counter() - t0}
    s.log("insert", **report)
    return report


def _room_to_grow(core, s: Session, n: int) -> bool:
    """Whether the session's cells can move up by n positions: below the window's end, after
    closing the holes earlier masks left (a long agent chat whose client drops exchanges runs out
    of positions long before it runs out of cells) when that is what it takes."""
    led = s.ledger
    if not core.mem.can_shift():
        return False
    if led.next_pos + n < core.n_ctx:
        return True
    if len(led) + n >= core.n_ctx:
        return False
    close_gaps(core, s)
    return True


def edit_cost(core, s: Session, idx: list[int], new_len: int, stretches: list[int], grows: bool,
              strat: Strategy) -> dict:
    """Estimated seconds (costs.py) of rewriting the message at ledger indices idx into new_len
    tokens by decoding the changed `stretches` into holes, against reading the message and every
    later cell again."""
    costs, led = core.costs, s.ledger
    depth = core.used_cells()
    later = len(led) - idx[-1] - 1
    edit = sum(costs.read(n, depth) for n in stretches if n)
    edit += costs.shift() if grows else 0.0
    edit += costs.read(strat.repaired(later, len(led)), depth)
    reread = costs.read(new_len + later, depth - (len(led) - idx[0]))
    return {"edit_s": round(edit, 4), "reread_s": round(reread, 4), "cost_measured": costs.measured}


def _decode_into_hole(core, s: Session, tokens: list[int], start: int) -> None:
    """Decode `tokens` at positions start.. of the session, where no cells are, attending to the
    cells before `start` only: stock llama.cpp decodes a sequence only after its last position,
    so the prefix is shared into the scratch sequence, decoded after there, and handed back."""
    scratch = core.scratch_seq
    core.mem.clear_seq(scratch)
    try:
        if start:
            core.mem.cp(s.seq, scratch, 0, start)
        core.decode_now(scratch, tokens, start, logits="none")
        core.mem.cp(scratch, s.seq, start, start + len(tokens))
    finally:
        core.mem.clear_seq(scratch)


def _update_message(m: Message, new: dict) -> None:
    m.content = new.get("content") or ""
    m.tool_calls = new.get("tool_calls") or None
    m.tool_call_id = new.get("tool_call_id")
    m.reasoning = new.get("reasoning_content") or ""


# -- append-only notes ------------------------------------------------------------------------------
def append_note(core, s: Session, role: str, content: str, kind: str, state: str) -> tuple[Message, dict]:
    """Append a message to the cache now (no generation) with its cells in `state`."""
    msg = Message(s.next_message_id(), role, content, kind=kind)
    pieces = prompt.chat_pieces(core, s, [msg], generation=False)
    tokens = [t for _, toks in pieces for t in toks]
    rolled = auto_roll(core, s, len(tokens) + 1, protect=set())
    core.room_check(s, len(tokens))
    start = s.ledger.next_pos
    core.decode_now(s.seq, tokens, start, logits="none")
    for msg_id, toks in pieces:
        s.ledger.append(toks, msg_id, state if msg_id == msg.id else LIVE)
    s.messages.append(msg)
    s.pending, s.pending_msg, s.closing = [], -1, ""
    report = {"message": msg.id, "n_tokens": len(tokens)}
    if rolled:
        report["rolled"] = rolled
    return msg, report


def erratum(core, s: Session, text: str) -> dict:
    """An append-only correction: the earlier text stays, a note after it says what was wrong."""
    if not text.strip():
        raise InvalidRequest("the erratum is empty")
    _, report = append_note(core, s, "system", f"Correction: {text}", "erratum", ERRATUM)
    s.log("erratum", **report)
    return report


# -- compaction -------------------------------------------------------------------------------------
SUMMARY_TOKENS_PER_STEP = 8  # summary tokens written between two decode steps of the generations
# The instruction frames the turns as a document to take notes from: asked to "summarize the
# conversation", instruction-tuned models answered a transcript holding a passkey with "I'm sorry, but
# I can't assist with that." (Qwen2.5-Coder-0.5B-Instruct, docs/results.md).
SUMMARY_PROMPT = ("Below is the start of a conversation between a user and an assistant. The assistant will "
                  "no longer see it, only your notes. Write short notes of every fact in it: names, numbers, "
                  "places, dates, preferences and decisions, each with what it is about.")
# what an instruction model says instead of doing the task
REFUSALS = ("i'm sorry", "i am sorry", "i can't", "i cannot", "i can not", "i'm unable", "i am unable",
            "as an ai", "i apologize", "i'm not able", "i am not able")


def compact(core, s: Session, up_to: int, summary: str | None = None, mode: str = "mask",
            max_summary_tokens: int = 160, close_gap: bool = True) -> dict:
    """Summarize messages up to id `up_to` (inclusive, pinned ones excepted), append the summary and
    mask the summarized turns (mode 'mask'), or rebuild the cache from text (mode 'restart').
    close_gap (default) moves the later cells down so the masked positions are free again."""
    return finish(compact_steps(core, s, up_to, summary, mode, max_summary_tokens, close_gap,
                                seq=core.scratch_seq, chunk=core.n_batch))


def compact_steps(core, s: Session, up_to: int, summary: str | None = None, mode: str = "mask",
                  max_summary_tokens: int = 160, close_gap: bool = True, seq: int | None = None,
                  chunk: int = JOB_CHUNK):
    """compact as a job: the summary is written in sequence `seq` (default: the job sequence) and
    a restart re-prefills, `chunk` tokens at a time."""
    if mode not in ("mask", "restart"):
        raise InvalidRequest("compact mode is 'mask' or 'restart'")
    targets = [m.id for m in s.messages if m.id <= up_to and not m.pinned and m.kind != "summary"
               and s.ledger.positions_of({m.id})]
    if not targets:
        raise InvalidRequest(f"nothing to compact up to message {up_to}")
    t0 = time.perf_counter()
    source = "given"
    if summary is None:
        summary, source = yield from write_summary_steps(core, s, targets, max_summary_tokens,
                                                         core.job_seq if seq is None else seq, chunk)
    if mode == "mask":
        # The summary takes the compacted turns' place, decoded into their hole: the later turns
        # keep the KV they computed with the turns in view, and the summary reads before them as
        # in a restart (measured: answered from the end of the chat, notes are recalled less,
        # docs/results.md). Where that cannot be done it is appended. An empty summary compacts
        # to nothing: the turns are masked and no note takes their place.
        later = _first_kept_after(s, targets)
        # (a cache that cannot shift closes holes by reading again: the mask does that, then appends)
        in_place = bool(summary) and later is not None and core.mem.can_shift()
        masked = mask(core, s, messages=targets, close_gap=close_gap and not in_place, reason="compacted",
                      state=MSG_SUMMARIZED)
        msg, placed = None, None
        if summary:
            text = f"Summary of earlier turns: {summary}"
            inserted = insert_messages(core, s, later, [{"role": "system", "content": text}]) if in_place else None
            if inserted:
                msg, placed = s.message(inserted["inserted_messages"][0]), "in place"
                msg.kind = "summary"
                for p0, p1 in _spans(s.ledger.positions_of({msg.id})):
                    s.ledger.mark(p0, p1, SUMMARY)
                if close_gap:  # what the summary did not fill of the turns' hole
                    _close_hole_after(core, s, msg.id)
            else:
                msg, placed = append_note(core, s, "system", text, "summary", SUMMARY)[0], "appended"
                if close_gap and in_place:
                    close_gaps(core, s)
        report = {"mode": mode, "summary": summary, "summary_message": msg.id if msg else None,
                  "summary_placed": placed, "masked": masked["masked"], "messages": targets}
    else:
        report = yield from _restart_steps(core, s, targets, summary, chunk)
    report["summary_source"] = source
    report["t_edit_s"] = time.perf_counter() - t0
    s.log("compact", **report)
    return report


def _close_hole_after(core, s: Session, msg_id: int) -> None:
    """Move the cells after message msg_id down to follow it directly."""
    led = s.ledger
    last = max(i for i, m in enumerate(led.msg) if m == msg_id)
    if last + 1 < len(led) and led.pos[last + 1] > led.pos[last] + 1:
        p, gap = led.pos[last + 1], led.pos[last + 1] - led.pos[last] - 1
        core.mem.add(s.seq, p, -1, -gap)
        led.shift(p, -1, -gap)


def _first_kept_after(s: Session, targets: list[int]) -> int | None:
    """The first message after the compacted ones that keeps cells: the summary goes before it."""
    held, last = set(s.ledger.msg), max(targets)
    order = [m for m in s.messages if m.kind != "text"]
    seen_last = False
    for m in order:
        if m.id == last:
            seen_last = True
        elif seen_last and m.id in held and m.id not in targets:
            return m.id
    return None


def write_summary(core, s: Session, targets: list[int], max_tokens: int) -> tuple[str, str]:
    return finish(write_summary_steps(core, s, targets, max_tokens, core.scratch_seq, core.n_batch))


def write_summary_steps(core, s: Session, targets: list[int], max_tokens: int, seq: int, chunk: int = JOB_CHUNK):
    """Have the model write notes of the target messages, greedily, in sequence `seq` (cleared
    before and after); yields between prompt chunks and every few summary tokens. Returns
    (summary, source): the model's notes ("model"), with the user's own statements whose number,
    name or object the notes lost appended ("model+extract"), or, when the model refused, wrote nothing
    or echoed the instruction, notes extracted from the turns themselves ("extract")."""
    from kvside.engine.sampling import Sampler, SamplingParams

    msgs = [s.message(i) for i in targets]
    lines = [f"{m.role}: {m.content}" for m in msgs]
    prompt = [{"role": "user", "content": SUMMARY_PROMPT + "\n\n" + "\n".join(lines) + "\n\nNotes:"}]
    text = core.template.render(prompt, add_generation_prompt=True)
    tokens = core.model.tokenize(text, add_special=core.model.add_bos, parse_special=True)
    room = core.n_ctx - max_tokens - 1
    if len(tokens) > room:  # keep the end of the transcript, which the summary matters most for
        tokens = tokens[:8] + tokens[-(room - 8):]
    core.mem.clear_seq(seq)
    params = SamplingParams(temperature=0.0, repeat_penalty=1.1, max_tokens=max_tokens)
    sampler = Sampler(params, tokens, core.model.n_vocab)
    out: list[int] = []
    try:
        yield from core.decode_steps(seq, tokens, 0, chunk)
        pos = len(tokens)
        while len(out) < max_tokens:
            tok = sampler.sample(core.ctx, core.batch.n - 1)  # right after its decode: nothing ran between
            if core.model.is_eog(tok):
                break
            out.append(tok)
            if len(out) % SUMMARY_TOKENS_PER_STEP == 0:
                yield
            core.decode_now(seq, [tok], pos, logits="last")
            pos += 1
    finally:
        sampler.close()
        core.mem.clear_seq(seq)
    return checked_summary(core.model.detokenize(out).strip(), msgs, budget_chars=4 * max_tokens)


def checked_summary(written: str, msgs: list, budget_chars: int) -> tuple[str, str]:
    """The summary to keep, and where it came from (see write_summary_steps)."""
    said = [m for m in msgs if m.role in ("user", "tool")]
    if summary_problem(written) is not None:
        return extract_notes(said, budget_chars), "extract"
    notes = written.lower()
    lost = [t for t in _fact_sentences(said) if any(k.lower() not in notes for k in _key_words(t))]
    if not lost:
        return written, "model"
    return written + " Also said: " + _fit(lost, budget_chars - len(written)), "model+extract"


def summary_problem(text: str) -> str | None:
    """Why a written summary cannot stand for the turns: None when it can."""
    if len(text.split()) < 3:
        return "empty"
    head = text[:160].lower().replace("\u2019", "'")
    if any(r in head for r in REFUSALS):
        return "refusal"
    if SUMMARY_PROMPT[:40].lower() in text.lower():
        return "echo"
    return None


def extract_notes(msgs: list, budget_chars: int) -> str:
    """Notes from the turns themselves, for when the model writes none: the sentences that state
    something (a number, a name, something of the user's own), in the user's words."""
    picked = _fact_sentences(msgs)
    return "Notes from earlier turns: " + _fit(picked, budget_chars) if picked else ""


_SENTENCE = re.compile(r"[^.!?\n]+[.!?]?")
_OWN = re.compile(r"\b(my|mine|i am|i'm|i live|i work|i like|i prefer|i use|i have|call me|we|our|remember)\b", re.I)


def _fact_sentences(msgs: list) -> list[str]:
    """Statements (not questions) holding a number, a capitalised name past their first word, or
    something the user says of themselves."""
    out = []
    for m in msgs:
        for raw in _SENTENCE.findall(m.content or ""):
            t = raw.strip()
            if len(t) < 4 or t.endswith("?"):
                continue
            words = t.split()
            if re.search(r"\d", t) or any(w[:1].isupper() for w in words[1:]) or _OWN.search(t):
                out.append(t if t[-1] in ".!" else t + ".")
    return list(dict.fromkeys(out))


def _key_words(sentence: str) -> list[str]:
    """What notes of a statement must keep: its numbers, the names in it (capitalised past the
    first word) and its last word, where a statement of fact usually puts what it states ("my
    favourite fruit is mango")."""
    words = re.findall(r"[\w'-]+", sentence)
    numbers = re.findall(r"\d[\d.,:/-]*\d|\d", sentence)
    names = [w for w in words[1:] if w[:1].isupper() and w.lower() not in ("i", "i'm")]
    last = [words[-1]] if words and len(words[-1]) > 2 else []
    return list(dict.fromkeys(numbers + names + last))


def _fit(sentences: list[str], budget_chars: int) -> str:
    """As many sentences as fit, the latest kept when not all do (what was said last is what the
    summarized turns ended with)."""
    kept, size = [], 0
    for t in reversed(sentences):
        if size + len(t) + 1 > max(budget_chars, 0) and kept:
            break
        kept.append(t)
        size += len(t) + 1
    return " ".join(reversed(kept))


def _restart_steps(core, s: Session, targets: list[int], summary: str, chunk: int = JOB_CHUNK):
    """The baseline compaction: re-prefill <system><summary><later turns> from text."""
    keep = [m for m in s.messages if m.id not in targets and m.kind != "text" and s.ledger.positions_of({m.id})]
    summary_msg = Message(s.next_message_id(), "system", f"Summary of earlier turns: {summary}", kind="summary")
    pinned = [m for m in keep if m.pinned]
    later = [m for m in keep if not m.pinned]
    order = pinned + ([summary_msg] if summary else []) + later  # an empty summary: the turns just go
    for m in s.messages:
        if m.id in targets:
            m.state = MSG_SUMMARIZED
    if summary:
        s.messages.append(summary_msg)
    old_cells = len(s.ledger)
    s.ledger.remove(0, -1, "restarted")
    core.mem.clear_seq(s.seq)
    s.pending, s.pending_msg, s.closing = [], -1, ""
    hist: list[dict] = []
    for m in order:
        seg = core.template.delta(hist, [m.as_template()], add_generation_prompt=False, tools=s.tools) or ""
        toks = core.model.tokenize(seg, add_special=not hist and core.model.add_bos, parse_special=True)
        start = s.ledger.next_pos
        yield from core.decode_steps(s.seq, toks, start, chunk)
        s.ledger.append(toks, m.id, SUMMARY if m is summary_msg else LIVE)
        hist.append(m.as_template())
    return {"mode": "restart", "summary": summary, "summary_message": summary_msg.id if summary else None,
            "reprefilled": len(s.ledger), "cells_before": old_cells, "messages": targets}


# -- fork -------------------------------------------------------------------------------------------
def fork(core, s: Session, name: str | None = None, on_device: bool | None = None) -> tuple[Session, dict]:
    """An independent copy in a new sequence (seq_cp would share cells: a later shift or in-place
    recompute of one would change the other). On a GPU the cells are copied on the device (see
    state.copy_seq_on_device); on CPU, or with on_device=False, through host memory."""
    t0 = time.perf_counter()
    if on_device is None:
        on_device = core.backend != "cpu"
    child = core.new_session(name, keep={s.name})  # never send the parent to disk to make room
    try:
        if on_device:
            core.settle()
            size = copy_seq_on_device(core.ctx, s.seq, child.seq)
            core.mem.state_restored(child.seq)
        else:
            blob = core.seq_state(s.seq)
            size = len(blob)
            set_seq_state(core.ctx, child.seq, blob)
            core.mem.state_restored(child.seq)
    except KvsideError:
        core.delete_session(child.name)
        raise
    child.ledger = s.ledger.copy()
    child.messages = [Message(**m.to_dict()) for m in s.messages]
    child.pending, child.pending_msg, child.closing = list(s.pending), s.pending_msg, s.closing
    child.defaults, child.roll_strategy, child.tools = s.defaults, s.roll_strategy, list(s.tools)
    child.checkpoints = list(s.checkpoints)  # a checkpoint is never changed, only replaced: shared
    child.edit_log = list(s.edit_log)
    report = {"parent": s.name, "child": child.name, "on_device": on_device, "bytes_through_host": size,
              "t_edit_s": time.perf_counter() - t0}
    child.log("fork", **report)
    return child, report
