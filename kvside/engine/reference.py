"""A session's cache against its honest reference: a re-prefill of exactly the tokens it holds.

Every edit kvside makes (a mask, a roll, a message rewritten in place, runs moved) leaves cells
that were computed after another context. How much that matters is measured on the session's last
message (the reply, as a rule): its tokens are teacher-forced twice in the scratch sequence, once
after the session's own cells before it (shared, not copied: the edited cache as it is) and once
after a fresh prefill of the same tokens at positions 0.. (what reading the client's prompt whole
would have given), and the two rows of logits per token are compared (bench/fidelity.py: KL of
the reference's distribution to the edited one, top-1 agreement). The session is left as it was.

The daemon serves this as POST /kvside/sessions/{name}/fidelity, so any client's trace can be scored
turn by turn (`kvside bench serve --client`)."""

from __future__ import annotations

import time

from kvside.errors import CacheFull, InvalidRequest, SessionBusy

MAX_TOKENS = 256  # of the last message compared: enough for a stable mean, bounded in cost


def against_reprefill(core, s, max_tokens: int = 64) -> dict:
    from kvside.bench.fidelity import compare

    if s.busy:
        raise SessionBusy(f"session {s.name!r} is generating")
    if not 1 <= max_tokens <= MAX_TOKENS:
        raise InvalidRequest(f"'tokens' must be between 1 and {MAX_TOKENS}", param="tokens")
    led = s.ledger
    if len(led) < 2:
        raise InvalidRequest(f"session {s.name!r} holds too little to measure ({len(led)} cells)")
    last = led.msg[-1]
    split = len(led)
    while split > 1 and led.msg[split - 1] == last:
        split -= 1
    forced = list(led.tok[split:split + max_tokens])
    if any(led.pos[split + i] != led.pos[split] + i for i in range(len(forced))):
        raise InvalidRequest("the last message's cells are not contiguous: nothing to teacher-force")
    if not core.mem.window_ok(s.seq, led.pos[split]):
        raise InvalidRequest(f"cannot teacher-force the last message on this session's own cells: "
                             f"{core.mem.window_lost(led.pos[split])}")
    if core.used_cells() + split + 2 * len(forced) > core.n_cells:
        raise CacheFull("no room in the cache to measure against a re-prefill now")
    t0 = time.perf_counter()
    scratch = core.scratch_seq
    core.mem.clear_seq(scratch)
    try:
        # the edited cache: the session's cells before the last message, shared into the scratch
        start = led.pos[split]
        core.mem.cp(s.seq, scratch, 0, start)
        edited = core.decode_now(scratch, forced, start, logits="all")
        core.mem.clear_seq(scratch)
        # the reference: the same tokens read whole, at dense positions
        core.decode_now(scratch, list(led.tok[:split]), 0, logits="none")
        reference = core.decode_now(scratch, forced, split, logits="all")
    finally:
        core.mem.clear_seq(scratch)
    out = compare(edited, reference)
    holes = led.pos[split - 1] + 1 - split  # positions the edits left empty before the last message
    return {"session": s.name, "tokens": len(forced), "context_tokens": split, "position_gaps": holes,
            "kl": out["kl"], "kl_max": out["kl_max"], "top1": out["top1"], "logit_cos": out["logit_cos"],
            "edits": [e.get("edit") for e in s.edit_log][-16:], "t_measure_s": round(time.perf_counter() - t0, 3)}
