"""Automatic session binding: editors send the whole message array on every request, and drop the
oldest turns from the front when their window fills. Match the array against what resident
sessions hold, reuse the longest match, and turn a dropped front into a suffix-cache edit (the
dropped messages' cells go, the later cells move down) instead of a re-prefill."""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass


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
    keep_head: int  # leading messages kept (the system prompt)
    dropped: list[int]  # message ids the client no longer sends
    reused: int  # messages reused
    new: list[dict]  # messages to append


def best_match(sessions: dict[str, list[dict]], incoming: list[dict]) -> Match | None:
    """sessions: name -> the session's chat messages (id, role, content, state) in order, rolled
    ones included (the client may still send what the cache already let go).
    The incoming array must be held[:a] + held[b:] + new, with a in {0, 1} (the system prompt)."""
    want = [_key(m) for m in incoming]
    best: Match | None = None
    for name, held in sessions.items():
        have = [_key(m) for m in held]
        for a in (1, 0):
            if a > len(have) or want[:a] != have[:a]:
                continue
            for b in range(a, len(have) + 1):
                tail = have[b:]
                n = len(tail)
                if a + n > len(want) or want[a : a + n] != tail:
                    continue
                if a + n == len(want):
                    break  # the client sends exactly what this session holds: nothing new to answer
                gone = [m["id"] for m in held[a:b] if m.get("state", "live") == "live"]
                if any(m.get("pinned") for m in held[a:b] if m.get("state", "live") == "live"):
                    break  # the system prompt or the turn with the tool definitions: never dropped
                # Dropping more than is kept is not a client trimming its history but another
                # conversation that shares a head (the same system prompt): taking this session
                # would destroy that conversation's cache to save a few tokens. llama-server's
                # slot choice asks for the same kind of similarity.
                if len(gone) > n:
                    break
                reused = a + n
                if best is None or reused > best.reused:
                    best = Match(name, a, gone, reused, incoming[a + n :])
                break  # the smallest b (fewest drops) is best for this head
    if best is not None and best.reused == 0:
        return None
    return best


# -- binding a request to a session and starting its reply: one task on the engine thread ------------
AUTO_PREFIX = "auto-"
CHAT_KINDS = ("chat", "tool")


def chat_history(s) -> list[dict]:
    """What a client could resend of a session: its chat and tool messages, rolled ones included."""
    return [m.to_dict() for m in s.messages if m.kind in CHAT_KINDS]


def bind_and_start(core, messages: list[dict], params: dict, stream, *, session: str | None = None,
                   reuse: bool = True, documents: list[str] = (), reply=None) -> dict:
    """Choose the session that answers `messages`, edit it to match, and start the reply, all in
    one engine task: nothing outside the engine thread decides from a snapshot, so two requests
    cannot bind one session (a session is claimed by the reply it starts, which marks it busy).

    session: an explicit name (created if unknown; the engine runs this task after that session's
    current work). Without it, the best match among idle sessions that binding created is reused,
    or a new one is made. Returns what was reused and edited; on any failure the chosen session
    is as it was before this call (a session created here is removed again)."""
    from kvside.engine import compose, edits
    from kvside.engine.stream import Event
    from kvside.engine.txn import atomic

    created = False
    if session is not None:
        if session in core.sessions or session in core.evicted:
            s = core.get(session)
            match = best_match({s.name: chat_history(s)}, messages)
        else:
            s, match, created = core.new_session(session), None, True
    else:
        tools = tools_key(reply.tools if reply is not None else [])
        candidates = {n: chat_history(c) for n, c in core.sessions.items()
                      if c.auto_bound and not c.busy and tools_key(c.tools) == tools} if reuse else {}
        if reuse:  # on disk: brought back (exactly) if they match best
            candidates.update({n: held for n, (key, held) in core.auto_saved.items() if key == tools})
        match = best_match(candidates, messages)
        if match is not None:
            s = core.get(match.session)
        else:
            s, created = core.new_session(core.free_name(AUTO_PREFIX)), True
            s.auto_bound = reuse
            s.temporary = not reuse
    note: dict = {"session": s.name}
    new = messages if match is None else match.new
    several_steps = bool(documents) or (match is not None and bool(match.dropped))
    try:
        sampling = s.defaults.replace(**params)
        with atomic(core, s) if several_steps else nullcontext():
            if match is not None:
                note["reused_messages"] = match.reused
                if match.dropped:
                    # the client dropped messages from the front: their cells go, the later KV
                    # stays; the hole stays until positions run out (see edits.close_gaps)
                    report = edits.mask(core, s, messages=match.dropped, close_gap=False)
                    note["dropped_messages"] = match.dropped
                    note["dropped_tokens"] = report["masked"]
            if documents:
                held = {e.get("document") for e in s.edit_log if e.get("edit") == "attach"}
                attached = []
                for doc in documents:
                    key, _ = compose.find(doc)
                    if key not in held:
                        attached.append(compose.attach(core, s, doc))
                note["attached"] = attached
            stream.session = s.name
            stream.put(Event("bound", data=note))
            core.start_chat(s.name, new, sampling, stream, reply)
    except BaseException:
        if created:
            core.delete_session(s.name)
        raise
    return note


def bind_text(core, params: dict, stream, *, text: str | None = None, tokens=None,
              session: str | None = None, reply=None) -> dict:
    """The same for a text completion: an explicit session (created if unknown), or a temporary
    one removed when the reply ends. `tokens`: a function of the core giving the prompt's tokens
    (fill-in-the-middle prompts carry special tokens); else `text` is the prompt."""
    from kvside.engine.stream import Event

    created = False
    if session is not None and (session in core.sessions or session in core.evicted):
        s = core.get(session)
    else:
        s, created = core.new_session(session), True
        s.temporary = session is None
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
