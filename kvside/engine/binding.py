"""Automatic session binding: editors send the whole message array on every request and edit it
as they go: they drop the oldest turns (from the very front, or after a first task message), replace
old tool outputs by placeholders, rewrite the system prompt (a clock, a refreshed repository map),
strip earlier reasoning. Match the array against what each session holds with a diff, and turn
every difference into a cache edit instead of a re-prefill of everything after it:
- a message the client no longer sends loses its cells (a mask); the later cells keep their KV;
- a message the client changed (same role, most of its tokens unchanged) is edited token by token
  in place: only the changed tokens are decoded, into the hole the old ones leave;
- a message inserted between held ones is decoded into room made at its place (the later cells
  move up and keep their KV);
- a change the diff cannot pair (a rewrite of most of a message), or an edit that would take longer
  than reading again at the engine's measured rates, cuts the match there: the cells before it are
  reused, those after it go, and the rest is read.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field
from difflib import SequenceMatcher

import numpy as np

from kvside.engine.session import MSG_DROPPED
from kvside.errors import InvalidRequest, KvsideError, NoIdleSession

log = logging.getLogger("kvside.binding")


def _key(m: dict) -> tuple:
    """What identifies a message the client resends: role, text, and for agents the calls an
    assistant turn made (name and arguments, compared as JSON: clients re-serialise them) and
    the call a tool result answers."""
    calls = tuple((c["function"]["name"], _canonical(c["function"].get("arguments")))
                  for c in (m.get("tool_calls") or []))
    return (m.get("role", ""), (m.get("content") or "").strip(), calls)


def _canonical(arguments) -> str:
    try:
        value = json.loads(arguments) if isinstance(arguments, str) else arguments
    except ValueError:
        return str(arguments)
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def tools_key(tools: list[dict]) -> str:
    """Tool definitions render into the system turn: only sessions made with the same ones match."""
    return json.dumps(tools or [], sort_keys=True, ensure_ascii=False)


@dataclass
class Match:
    session: str
    reused: int  # held messages reused: as they are, or edited in place
    dropped: list[int]  # live message ids the client no longer sends (their cells go)
    new: list[dict]  # messages to append
    replaced: list[tuple[int, dict]] = field(default_factory=list)  # (held id, the client's version)
    retooled: dict | None = None  # the tool definitions were rewritten in place (binding._retooled)
    inserted: list[tuple[int, list[dict]]] = field(default_factory=list)  # (held id, client messages put before it)
    reused_cells: int = 0  # cells of the reused messages: what choosing this session saves reading
    dropped_cells: int = 0  # cells its edits destroy (work another conversation may come back to)
    again: bool = False  # nothing to append: another reply to the last message (a regenerate)
    named: bool = False  # the client named the session and resent its history (diff's `named`)


def _live(m: dict) -> bool:
    return m.get("state", "live") == "live"


def diff(held: list[dict], incoming: list[dict], cut_at_change: bool = False, named: bool = False) -> Match | None:
    """How `incoming` follows from `held` (a session's chat messages in order, rolled ones
    included: the client may still send what the cache already let go), or None when it does
    not: nothing new to answer, nothing reused, a pinned message would go, or more would be
    dropped than kept (another conversation that shares a head, not this one trimmed).
    cut_at_change: the first change to a message that has cells ends the match (what follows is
    read again rather than kept), for a session that must equal a fresh prefill or where
    reading again costs less than the edit. named: the client named this session and resends its
    history (resends_history): it is this conversation whatever it dropped or changed, its system
    prompt included."""
    have, want = [_key(m) for m in held], [_key(m) for m in incoming]
    kept, dropped, replaced, cells, inserted = 0, [], [], 0, []
    cut_held, cut_want = len(held), len(want)
    last_equal = None  # (held index, incoming index) of the client's last message, when held
    equal_blocks = []
    for tag, i1, i2, j1, j2 in SequenceMatcher(None, have, want, autojunk=False).get_opcodes():
        if tag == "equal":
            equal_blocks.append((i1, i2, j1))
            kept += i2 - i1
            cells += sum(m.get("n_cells", 1) for m in held[i1:i2])
            if j2 == len(want):
                last_equal = (i2 - 1, j2 - 1)
        elif cut_at_change and tag in ("delete", "replace") and any(_live(m) for m in held[i1:i2]):
            cut_held, cut_want = i1, j1
            break
        elif tag == "delete":
            dropped += [m["id"] for m in held[i1:i2] if _live(m)]
        elif tag == "insert" and i1 < len(held) and _live(held[i1]) and not cut_at_change:
            inserted.append((held[i1]["id"], incoming[j1:j2]))  # messages put between held ones
        elif tag == "replace" and (pairs := _pair(held, incoming, i1, i2, j1, j2)) is not None:
            paired, tail = pairs
            replaced += [(held[i]["id"], incoming[j]) for i, j in paired]
            # an edited message saves reading only the part that stays
            cells += sum(int(held[i].get("n_cells", 1) * _similarity(have[i], want[j])) for i, j in paired)
            dropped += [held[i]["id"] for i in range(i1, i2) if i not in {i for i, _ in paired} and _live(held[i])]
            if tail is not None:  # the client's new messages follow the changed ones
                cut_held, cut_want = i2, tail
                break
        else:  # an insertion, or a change running to the end: everything from here is read anew
            cut_held, cut_want = i1, j1
            break
    again = False  # no new message: another reply to the client's last one
    if cut_want == len(want) and last_equal is not None and kept > 1:
        # nothing after what the session holds, but what followed it is gone: the client asks
        # for another reply (a regenerate). A reply follows a user or tool message directly: its
        # cells stay and only the generation prompt is read (llama-server reads one token again);
        # a cache that cannot drop its end goes back to the checkpoint taken before the reply
        # (checkpoints.py). After another message the last one is read again.
        i, j = last_equal
        if incoming[j].get("role") in ("user", "tool") and (dropped if cut_held == len(held) else cut_held == i + 1):
            cut_held, again = i + 1, True
        elif dropped and cut_held == len(held):
            cut_held, cut_want = i, j
            kept -= 1
            cells -= held[i].get("n_cells", 1)
        dropped = [d for d in dropped if d not in {m["id"] for m in held[cut_held:]}]
    new = incoming[cut_want:]
    resent = set(want[cut_want:])
    gone = list(dropped)  # what the client no longer sends
    for m, key in zip(held[cut_held:], have[cut_held:]):
        if _live(m):
            dropped.append(m["id"])
            if key not in resent:
                gone.append(m["id"])
    if (not new and not again) or kept + len(replaced) == 0:
        return None
    pinned = {m["id"] for m in held if m.get("pinned")}
    if pinned & set(dropped) and not named:
        return None  # the system prompt or the turn with the tool definitions: never dropped
    # Dropping more than is kept is not a client trimming its history but another conversation
    # that shares a head (the same system prompt): taking this session would destroy that
    # conversation's cache to save a few tokens. llama-server's slot choice asks the same.
    # A kept system prompt does not count (it is what other conversations share). Messages cut
    # off but sent again after the cut are read again, not dropped by the client.
    # A client whose history runs on from this session's last message (its latest reply, then the
    # client's new turn) is this conversation trimmed, however much it dropped at once (a tight
    # budget after its tools grew): another conversation does not hold this one's last reply.
    head = 1 if have and want and have[0] == want[0] and have[0][0] == "system" else 0
    if gone and len(gone) > kept - head and not _runs_on(held, equal_blocks, cut_want) and not named:
        return None
    size = {m["id"]: m.get("n_cells", 1) for m in held}
    inserted = [(i, msgs) for i, msgs in inserted if i not in dropped]  # before a message that goes: read
    return Match("", kept + len(replaced), dropped, new, replaced, inserted=inserted, reused_cells=cells,
                 dropped_cells=sum(size[i] for i in dropped), again=again, named=named)


def _runs_on(held: list[dict], equal_blocks: list[tuple[int, int, int]], first_new: int) -> bool:
    """Whether the session's last live message is kept, as the client's message right before its
    new ones (equal_blocks: (held start, held end, incoming start) of the unchanged runs)."""
    last = next((i for i in range(len(held) - 1, -1, -1) if _live(held[i])), None)
    if last is None or held[last].get("role") != "assistant":
        return False
    return any(i1 <= last < i2 and j1 + last - i1 == first_new - 1 for i1, i2, j1 in equal_blocks)


def _similarity(a: tuple, b: tuple) -> float:
    """How much of message key a survives in b (difflib's quick upper bound, on text and calls)."""
    return SequenceMatcher(None, f"{a[1]}{a[2]}", f"{b[1]}{b[2]}", autojunk=False).quick_ratio()


def _pair(held: list[dict], incoming: list[dict], i1: int, i2: int, j1: int, j2: int):
    """Pair the client's changed messages incoming[j1:j2] with held[i1:i2] (the diff saw them as
    one replaced block): in order, each with the most similar held message of its role; held
    ones left over were dropped. Returns (pairs, tail), tail being the index of the client's new
    messages when they follow the changed ones at the end; None when a message in the middle has
    no partner (an insertion: the match is cut there)."""
    pairs, i = [], i1
    for j in range(j1, j2):
        role = incoming[j].get("role")
        options = [k for k in range(i, i2) if held[k].get("role") == role]
        if not options:
            if j2 == len(incoming):
                return (pairs, j) if pairs else None  # the rest is the client's new turn
            return None
        text = incoming[j].get("content") or ""
        best = max(options, key=lambda k: SequenceMatcher(None, held[k].get("content") or "", text).quick_ratio())
        pairs.append((best, j))
        i = best + 1
    if j2 == len(incoming):
        # the last changed message is the client's new turn, not an edit of an old one
        pairs.pop()
        return (pairs, j2 - 1) if pairs else None
    return pairs, None


def resends_history(held: list[dict], incoming: list[dict]) -> bool:
    """Whether messages sent to a named session are its history again (they begin with its first
    message) rather than only what is new (what the chat app and `kvside ask` send). One message
    equal to the session's first user message stays new: the user said it again."""
    return bool(held and incoming) and _key(incoming[0]) == _key(held[0]) and (
        len(incoming) > 1 or held[0]["role"] == "system")


def best_match(sessions: dict[str, list[dict]], incoming: list[dict]) -> Match | None:
    """The session whose diff against `incoming` saves the most: the cells of reused messages (a
    long tool output kept outweighs two short turns) less the cells the edits would destroy (a
    session holding another conversation that shares the head loses its later turns), then the
    fewest messages edited in place and dropped."""
    def rank(m: Match) -> tuple:
        return m.reused_cells - m.dropped_cells, m.reused - len(m.replaced), -len(m.dropped)

    best: Match | None = None
    for name, held in sessions.items():
        m = diff(held, incoming)
        if m is None:
            continue
        m.session = name
        if best is None or rank(m) > rank(best):
            best = m
    return best


def _open_left(core, name: str, messages: list[dict]) -> Match | None:
    """Open a session another daemon left in the shared folder (restored under this daemon's
    lease) and match it again against what it really holds: that daemon may have continued it
    between the look at its file and the restore."""
    try:
        s = core.get(name)
    except KvsideError:  # taken by another daemon meanwhile, or its file went: read the prompt
        return None
    s.auto_bound = True
    return best_match({s.name: chat_history(s)}, messages)


def _repair_or_read_again(core, s, match: Match, messages: list[dict]) -> Match:
    """The session's strategy decides what happens to the cells after a dropped message: `shift`
    keeps them as they are (free); `recompute:R`, `values:R`, `select:F` compute some again; with
    `reprefill`, or when that repair would cost more than reading the later messages again (at the
    engine's measured rates), the match is cut at the first drop and the rest is read anew."""
    from kvside.engine import edits

    strat = edits.Strategy.parse(s.roll_strategy)
    if not match.dropped or strat.name == "shift":
        return match
    led = s.ledger
    dropped = set(match.dropped)
    first = next((i for i, m in enumerate(led.msg) if m in dropped), len(led))
    later = sum(1 for m in led.msg[first:] if m not in dropped)
    costs, depth = core.costs, core.used_cells()
    repair_s = costs.read(strat.repaired(later, len(led)), depth) + (costs.shift() if strat.name == "recompute" else 0.0)
    if strat.name != "reprefill" and repair_s < costs.read(later, depth - later):
        return match
    cut = diff(chat_history(s), messages, cut_at_change=True, named=match.named)
    if cut is None:
        return match  # nothing before the drop to keep: the mask and the strategy's own repair
    cut.session, cut.retooled = match.session, match.retooled
    return cut


def _read_from(s, held_id: int, first: dict, dropped: list[int], messages: list[dict]) -> tuple[list[int], list[dict]]:
    """An edit declined at held message held_id: it and every later live message go too, and the
    client's messages from `first` on are read anew. Returns (dropped, messages to append)."""
    order = [m.id for m in s.messages if m.kind in CHAT_KINDS]
    later = order[order.index(held_id):]
    dropped = sorted(set(dropped) | {i for i in later if s.message(i).state == "live"})
    return dropped, messages[next(j for j, m in enumerate(messages) if m is first):]


def _edit_to_match(core, s, match: Match, messages: list[dict], note: dict) -> list[dict]:
    """Edit session s as the diff says; returns the messages still to append. A replacement not
    worth editing (see edits.replace_message) cuts the match there. The cells after a dropped
    message are repaired as the session's strategy says."""
    from kvside.engine import edits

    dropped = list(match.dropped)
    new = match.new
    edited = []
    for held_id, version in match.replaced:
        report = edits.replace_message(core, s, held_id, version)
        if report is None:
            dropped, new = _read_from(s, held_id, version, dropped, messages)
            break
        edited.append(report)
    added = []
    for before_id, versions in match.inserted if len(edited) == len(match.replaced) else []:
        report = edits.insert_messages(core, s, before_id, versions)
        if report is None:  # read from the first inserted message on
            dropped, new = _read_from(s, before_id, versions[0], dropped, messages)
            break
        added.append(report)
    if added:
        note["inserted_messages"] = sum(len(r["inserted_messages"]) for r in added)
        note["inserted_tokens"] = note.get("inserted_tokens", 0) + sum(r["inserted"] for r in added)
        note["recomputed_tokens"] = note.get("recomputed_tokens", 0) + sum(r["recomputed"] for r in added)
    if dropped:
        # the client no longer sends these: their cells go, the later KV stays; a hole stays
        # until positions run out (see edits.close_gaps)
        if s.pending_msg in dropped:
            s.pending, s.pending_msg, s.closing = [], -1, ""
        for i in dropped:
            # a system prompt the client changed in a way not worth editing goes with everything
            # after it (the client's new one is read and pinned in its place); a roll never drops it
            s.message(i).pinned = False
        strat = edits.Strategy.parse(s.roll_strategy)
        gone = set(dropped)
        first = next((i for i, m in enumerate(s.ledger.msg) if m in gone), len(s.ledger))
        if all(m in gone for m in s.ledger.msg[first:]):
            strat = edits.Strategy("shift")  # a cut: nothing after it stays, nothing to repair
        # stock llama.cpp recomputes only right after a sequence's last cell: recompute:R closes the
        # hole first; the native strategies work across it
        report = edits.mask(core, s, messages=dropped, close_gap=strat.name == "recompute",
                            reason="dropped by the client", state=MSG_DROPPED, strategy=strat)
        note["dropped_messages"] = dropped
        note["dropped_tokens"] = report["masked"]
        note["recomputed_tokens"] = note.get("recomputed_tokens", 0) + report.get("recomputed", 0)
    if edited:
        note["edited_messages"] = [r["replaced"] for r in edited]
        note["inserted_tokens"] = note.get("inserted_tokens", 0) + sum(r.get("inserted", 0) for r in edited)
        note["removed_tokens"] = sum(r.get("removed", 0) for r in edited)
        note["recomputed_tokens"] = note.get("recomputed_tokens", 0) + sum(r.get("recomputed", 0) for r in edited)
    if dropped or edited or added:
        note["strategy"] = s.roll_strategy
    note["reused_messages"] = match.reused - (len(match.replaced) - len(edited))
    return new


# -- binding a request to a session and starting its reply: one task on the engine thread ------------
TEXT_PREFIX = "text-"  # text caches (fill-in-the-middle and completions without a session)
AUTO_PREFIX = "auto-"
CHAT_KINDS = ("chat", "tool")


def chat_history(s) -> list[dict]:
    """What a client could resend of a session: its chat and tool messages, including those
    kvside or its user let go (rolled, masked, pruned, summarized: the client still sends them),
    not those dropped because a client stopped sending them (leaving them in would let a diff pair
    the client's messages with stale copies: agents' replies often repeat word for word)."""
    cells = Counter(s.ledger.msg)
    return [dict(m.to_dict(), n_cells=cells.get(m.id, 0))
            for m in s.messages if m.kind in CHAT_KINDS and m.state != MSG_DROPPED]


MIN_SHARED = 16  # tokens: a shorter common prefix is read again rather than shared


@dataclass
class Share:
    source: str  # the resident session whose cells begin the same way
    n: int  # tokens shared
    pieces: list  # the new prompt's (message id, tokens), as start_chat will make them


def plan_share(core, messages: list[dict], tools: list[dict]) -> Share | None:
    """The resident session whose cache begins with the longest run of the new prompt's tokens
    (clients with one system prompt and tools; a template's default system block), if that run
    is worth sharing."""
    from kvside.engine import prompt
    from kvside.engine.session import Message, Session

    if core.config.default_system:  # the daemon's own system prompt comes first: not the client's tokens
        return None
    try:
        new = [Message.from_request(i, m) for i, m in enumerate(messages)]
        pieces = prompt.chat_pieces(core, Session(name="-", seq=-1, tools=list(tools)), new, generation=False)
    except Exception:  # a request start_chat refuses with its own clear error
        return None
    want = np.asarray([t for _, toks in pieces for t in toks], dtype=np.int32)
    best, best_n = None, 0
    for c in core.sessions.values():
        n = _shared_run(np.asarray(c.ledger.head(), dtype=np.int32), want)
        if n > best_n:
            best, best_n = c, n
    saved = _saved_to_share(core, want, best_n)
    if saved is not None:
        best, best_n = saved
    return Share(best.name, best_n, pieces) if best is not None and best_n >= MIN_SHARED else None


# Until the engine has measured a restore and its decodes, a saved session is brought back for its
# prefix when that gains this many tokens at least, and is a quarter of the file at least: bringing a
# cell back is a copy, reading it again a pass through every layer, so a file mostly of use costs a
# fraction of the reading it saves. Once measured, the two are weighed in seconds (costs.py).
MIN_SHARED_FROM_DISK = 256


def _shared_run(head: np.ndarray, want: np.ndarray) -> int:
    """How many of `want`'s first tokens a cache beginning with `head` holds (Ledger.head), short of
    the last one: one token at least is read, for the logits."""
    limit = min(len(head), len(want) - 1)
    differ = np.flatnonzero(head[:limit] != want[:limit])
    return int(differ[0]) if differ.size else max(limit, 0)


def _saved_to_share(core, want: np.ndarray, resident_n: int):
    """The saved session (request binding's, on disk) whose cache begins with the longest run of
    `want`, brought back, and that run's length; None when none shares enough more than the
    resident ones do. An agent CLI starts every task as a new conversation with the same long system
    prompt and tools: after a restart, or once their sessions went to disk, they were read again."""
    from kvside.engine import persist

    best, best_n = None, resident_n
    for name, saved in core.auto_saved.items():
        n = _shared_run(saved.head, want)
        if n > best_n and persist.still_as_saved(core, name):
            best, best_n = (name, saved), n
    if best is None:
        return None
    name, saved = best
    gain, restore_s = best_n - resident_n, core.costs.restore(saved.n_cells)
    if core.costs.measured and restore_s is not None:
        worth = core.costs.read(gain, core.used_cells()) > restore_s
    else:
        worth = gain >= MIN_SHARED_FROM_DISK and 4 * best_n >= saved.n_cells
    if not worth:
        return None
    try:
        return persist.bring_back(core, name), best_n
    except NoIdleSession:  # every resident session is busy: read instead
        return None
    except (KvsideError, OSError) as exc:  # damaged or gone since: read instead, and not tried again
        core.auto_saved.pop(name, None)
        log.warning("saved session %s was not brought back to share its prefix: %s", name,
                    getattr(exc, "message", exc))
        return None


def new_session_sharing(core, name: str, share: Share | None, tools: list[dict]):
    """A new session beginning with the shared prefix: llama.cpp's unified cache lets a cell belong
    to several sequences, so the prefix is shared, not copied (Memory.share; an edit that would move
    or rewrite shared cells first gives its session copies of its own). When a sequence must be
    freed for the new session, the source may be the one sent to disk: its prefix is held in the
    scratch sequence meanwhile. Returns the session and what was shared."""
    if share is None:
        return core.new_session(name), {}
    source = core.sessions[share.source]
    staged = not core.free_seqs
    if staged:
        core.mem.cp(source.seq, core.scratch_seq, 0, share.n)
    try:
        s = core.new_session(name, system="")
        src = source.seq if share.source in core.sessions else core.scratch_seq
        core.mem.share(src, s.seq, share.n)
    finally:
        if staged:
            core.mem.clear_seq(core.scratch_seq)
    if share.source not in core.sessions:  # the source went to disk: the cells are s's alone
        core.mem.shared.pop(s.seq, None)
    s.tools = list(tools)
    left = share.n
    for msg_id, toks in share.pieces:
        if left <= 0:
            break
        s.ledger.append(toks[:left], msg_id)
        left -= len(toks)
    return s, {"shared_tokens": share.n, "shared_from": share.source}


def _retooled(core, messages: list[dict], tools: list[dict]) -> Match | None:
    """A client that changed its tool definitions (an MCP server connected, a tool removed) but
    kept its conversation: the resident session that holds that conversation with the old tools,
    with the turn that carries the tools rewritten in place (edits.replace_message renders it with
    the new ones; only the changed tokens are decoded). None, changing nothing, when no session
    holds the conversation or the rewrite would cost as much as reading it again."""
    from kvside.engine import edits

    key = tools_key(tools)
    others = {n: chat_history(c) for n, c in core.sessions.items()
              if c.auto_bound and not c.busy and c.tools and tools_key(c.tools) != key}
    match = best_match(others, messages)
    if match is None:
        return None
    s = core.sessions[match.session]
    first = next(m for m in s.messages if m.kind in CHAT_KINDS)
    if first.id in match.dropped or not first.pinned:
        return None
    version = next((v for held_id, v in match.replaced if held_id == first.id), messages[0])
    old = s.tools
    s.tools = list(tools)
    try:
        report = edits.replace_message(core, s, first.id, version)
    except BaseException:
        s.tools = old
        raise
    if report is None:
        s.tools = old
        return None
    s.log("tools", before=len(old), after=len(tools), **{k: v for k, v in report.items() if k != "replaced"})
    match.replaced = [(i, v) for i, v in match.replaced if i != first.id]
    match.retooled = report
    return match


def _take_client_reasoning(s, messages: list[dict]) -> list[int]:
    """Held replies the client sends back with other reasoning than the session keeps (most
    clients send none back): the session takes the client's, and returns their ids, for the
    template renders them differently (a reasoning model's turns in a tool loop show their think
    block only with their reasoning; edits.restyle then edits the cells to match)."""
    sent: dict[tuple, list[str]] = {}
    for m in messages:
        if m.get("role") == "assistant":
            sent.setdefault(_key(m), []).append(m.get("reasoning_content") or "")
    changed = []
    for m in s.messages:
        if m.role != "assistant" or m.state != "live" or m.kind not in CHAT_KINDS:
            continue
        versions = sent.get(_key(m.to_dict()))
        if versions:
            reasoning = versions.pop(0)
            if reasoning != m.reasoning:
                m.reasoning = reasoning
                changed.append(m.id)
    return changed


def _after_changes(s, match: Match) -> list[int]:
    """The live messages right after each run of dropped or rewritten ones: a template may render
    them otherwise now (Gemma's folds the system prompt into the first user turn: the turn that
    becomes first takes it on, and a rewritten system prompt changes that turn's text, not its
    own cells), so they are compared with their rendering once more (edits.restyle)."""
    changed, out, after = set(match.dropped) | {i for i, _ in match.replaced}, [], False
    for m in s.messages:
        if m.kind not in CHAT_KINDS:
            continue
        if m.id in changed:
            after = True
        elif after and m.state == "live":
            out.append(m.id)
            after = False
    return out


def _last_reply(s) -> list[int]:
    """The session's latest live reply: its cells are what the model wrote, not the template's
    rendering of it, which may differ (templates that trim a reply's whitespace: Gemma, Llama 3),
    so it is compared once more now that the client sends it back (edits.restyle)."""
    last = next((m for m in reversed(s.messages) if m.state == "live" and m.kind in CHAT_KINDS), None)
    return [last.id] if last is not None and last.role == "assistant" else []


def bind_and_start(core, messages: list[dict], params: dict, stream, *, session: str | None = None,
                   reuse: bool = True, documents: list[str] = (), reply=None) -> dict:
    """Choose the session that answers `messages`, edit it to match, and start the reply, all in
    one engine task: nothing outside the engine thread decides from a snapshot, so two requests
    cannot bind one session (a session is claimed by the reply it starts, which marks it busy).

    session: an explicit name (created if unknown; the engine runs this task after that session's
    current work). Without it, the best match among idle sessions that binding created is reused,
    or a new one is made. Returns what was reused and edited; on any failure the chosen session
    is as it was before this call (a session created here is removed again)."""
    from kvside.engine import persist

    created = False
    if session is not None:
        if core.known(session):
            s = core.get(session)
            held = chat_history(s)
            match = diff(held, messages, named=resends_history(held, messages))
            if match is not None:
                match.session = s.name
                match = _repair_or_read_again(core, s, match, messages)
        else:
            s, match, created = core.new_session(session), None, True
    else:
        tools = tools_key(reply.tools if reply is not None else [])
        candidates = {n: chat_history(c) for n, c in core.sessions.items()
                      if c.auto_bound and not c.busy and tools_key(c.tools) == tools} if reuse else {}
        if reuse:  # on disk: brought back (exactly) if they match best
            candidates.update({n: saved.history for n, saved in core.auto_saved.items()
                               if saved.tools == tools and persist.still_as_saved(core, n)})
        # a shared folder: also those other daemons left there (a conversation that moved here)
        others = persist.left_by_others(core, tools) if reuse and core.fleet is not None else {}
        match = best_match({**candidates, **others}, messages)
        if match is not None and match.session in others:
            match = _open_left(core, match.session, messages)
        if match is None and reuse and reply is not None:
            match = _retooled(core, messages, reply.tools)
        shared: dict = {}
        if match is not None:
            s = core.get(match.session)
            match = _repair_or_read_again(core, s, match, messages)
        else:
            tool_list = reply.tools if reply is not None else []
            share = plan_share(core, messages, tool_list) if reuse and not documents else None
            s, shared = new_session_sharing(core, core.free_name(AUTO_PREFIX), share, tool_list)
            created = True
            s.auto_bound = reuse
            s.temporary = not reuse
    note: dict = {"session": s.name}
    if session is None:
        note.update(shared)
    return _edit_and_start(core, s, match, messages, params, stream, note, reply=reply, documents=documents,
                           created=created)


def answer_again(core, name: str, params: dict, stream) -> dict:
    """Another reply to session `name`'s last message, its last reply dropped (a chat app's
    regenerate): what bind_and_start does when a client sends its history again without the
    reply, for a session driven by name, which sends only what is new."""
    s = core.get(name)
    history = chat_history(s)
    live = [m for m in history if _live(m)]
    if len(live) < 2 or live[-1]["role"] != "assistant" or live[-2]["role"] not in ("user", "tool"):
        raise InvalidRequest(f"session {name!r} has no reply to a message of yours to give again")
    messages = history[: history.index(live[-1])]
    match = Match(s.name, len(messages), [live[-1]["id"]], [], reused_cells=sum(m["n_cells"] for m in messages),
                  dropped_cells=live[-1]["n_cells"], again=True)
    match = _repair_or_read_again(core, s, match, messages)
    return _edit_and_start(core, s, match, messages, params, stream, {"session": s.name})


def _edit_and_start(core, s, match: Match | None, messages: list[dict], params: dict, stream, note: dict, *,
                    reply=None, documents: list[str] = (), created: bool = False) -> dict:
    """Edit session s as `match` says (None: nothing held matches, `messages` are all new) and start
    the reply, atomically: on any failure s is as it was (and, `created` here, removed again)."""
    from kvside.engine import compose
    from kvside.engine.stream import Event
    from kvside.engine.txn import atomic

    new = messages if match is None else match.new
    several_steps = bool(documents) or (match is not None and bool(match.dropped or match.replaced or match.inserted))
    try:
        sampling = s.defaults.replace(**params)
        with atomic(core, s) if several_steps else nullcontext():
            if match is not None:
                new = _edit_to_match(core, s, match, messages, note)
                if match.retooled:
                    note["tools_changed"] = True
                    note["inserted_tokens"] = note.get("inserted_tokens", 0) + match.retooled.get("inserted", 0)
            if documents:
                held = {e.get("document") for e in s.edit_log if e.get("edit") == "attach"}
                new_docs = [doc for doc in documents if compose.find(doc)[0] not in held]
                note["attached"] = compose.attach_documents(core, s, new_docs) if new_docs else []
            recheck = (_take_client_reasoning(s, messages) + _last_reply(s) + _after_changes(s, match)
                       if match is not None else [])
            stream.session = s.name
            stream.put(Event("bound", data=note))
            core.start_chat(s.name, new, sampling, stream, reply, shared=note.get("shared_tokens", 0),
                            recheck=recheck, again=match is not None and match.again and not new)
            # cells decoded by the edits were computed for this request: not cached
            core.scheduler.discount_cached(s, note.get("inserted_tokens", 0) + note.get("recomputed_tokens", 0))
    except BaseException:
        if created:
            core.delete_session(s.name)
        raise
    return note


def bind_text(core, params: dict, stream, *, text: str | None = None, tokens=None,
              session: str | None = None, reply=None, reuse: bool = True) -> dict:
    """The same for a text completion. An explicit session (created if unknown) continues with the
    prompt appended. Without one, the prompt is bound to the idle text cache that shares most of
    it (textreuse: the common prefix, and runs found again after a change) or to a new one; text
    caches stay resident for the next request and are dropped, not saved, when room is needed.
    `tokens`: a function of the core giving the prompt's tokens (fill-in-the-middle prompts carry
    special tokens); else `text` is the prompt."""
    from kvside.engine import textreuse
    from kvside.engine.stream import Event

    if session is not None:
        created = False
        if core.known(session):
            s = core.get(session)
        else:
            s, created = core.new_session(session, system=""), True
        try:
            sampling = s.defaults.replace(**params)
            stream.session = s.name
            stream.put(Event("bound", data={"session": s.name}))
            if tokens is not None:
                core.start_tokens(s.name, tokens(core), sampling, stream, reply)
            else:
                core.start_text(s.name, text or "", sampling, stream, reply)
        except BaseException:
            if created:
                core.delete_session(s.name)
            raise
        return {"session": s.name}

    prompt = tokens(core) if tokens is not None else core.model.tokenize(text or "", add_special=True)
    if not prompt or (tokens is None and not text):
        raise InvalidRequest("the prompt is empty", param="prompt")
    if len(prompt) >= core.n_ctx:
        raise InvalidRequest(f"the prompt has {len(prompt)} tokens and the window {core.n_ctx}", param="prompt")
    min_chunk = core.config.reuse_chunk
    s, plan = None, textreuse.Plan()
    if reuse:
        for c in core.sessions.values():
            if c.text_cache and not c.busy:
                held = c.ledger.tok
                p = textreuse.plan(held, prompt, min_chunk if textreuse.contiguous(c) else 0)
                if s is None or p.reused > plan.reused:
                    s, plan = c, p
        if s is not None and plan.reused < max(min_chunk, 1) and core.free_seqs:
            s = None  # nothing worth keeping: a fresh cache, and the other one stays for its client
    declined = False
    if s is not None and len(plan.runs) > (1 if plan.prefix else 0):
        # moving runs is worth it only when it beats reading them again, at the measured rates
        exact = textreuse.prefix_only(plan)
        repair = core.config.reuse_repair
        if textreuse.cost(core, exact, len(prompt), repair) <= textreuse.cost(core, plan, len(prompt), repair):
            plan, declined = exact, True
    created = s is None
    if created:
        s = core.new_session(core.free_name(TEXT_PREFIX), system="")
        s.text_cache, s.temporary = reuse, not reuse
        plan = textreuse.Plan()
    try:
        sampling = s.defaults.replace(**params)
        core.clear_pending(s)
        if len(plan.runs) and plan.runs[-1][1] + plan.runs[-1][2] >= len(prompt):
            # all of it is cached: the last token is read again for its logits
            i, j, n = plan.runs[-1]
            plan.runs[-1] = (i, j, n - 1)
            plan.prefix = min(plan.prefix, len(prompt) - 1)
            if plan.runs[-1][2] == 0:
                plan.runs.pop()
        msg_id = s.next_message_id()
        report = textreuse.apply(core, s, prompt, plan, msg_id, repair=core.config.reuse_repair)
        tail = report.pop("tail")
        kept = set(s.ledger.msg)
        s.messages = [m for m in s.messages if m.id in kept]
        if report["moved_runs"] or report["inserted_tokens"]:
            s.log("text-reuse", **report)
        note = {"session": s.name, **report}
        if declined:
            note["moves_declined"] = True  # reading the runs again was estimated cheaper
        stream.session = s.name
        stream.put(Event("bound", data=note))
        core.start_tokens(s.name, tail, sampling, stream, reply)
        core.scheduler.discount_cached(s, report["inserted_tokens"] + report["recomputed_tokens"])
    except BaseException:
        core.delete_session(s.name)  # a cache half-edited is worth nothing: the next prompt starts anew
        raise
    return note
