"""Client edits to the history as cache edits: a message changed in place keeps its unchanged
tokens' cells and decodes only the changed ones into the hole, attending to exactly what precedes
them; with reprefill as the strategy the result equals a fresh prefill; the daemon turns the edits
clients make (a clock in the system prompt, a dropped middle exchange, tool outputs replaced by a
placeholder) into edits and says so."""

import numpy as np
import pytest

from conftest import GREEDY
from kvside.bench import corpus
from kvside.engine import Engine, edits, prompt
from kvside.engine.session import Message

PROBE = [198, 504, 260, 1115]
SYSTEM = "Current time: 12:01. You are a terse assistant; answer in a few words."


# Rates of an idle 2-core machine (docs/benchmarks.md, "Decode costs"): the edit-or-read choices
# these tests expect are made at them. Learned from the tests' own decodes instead, a busy machine
# (another process on the cores) skews a rate and an edit the test expects is declined.
IDLE_RATES = {(False, 0): 0.005, (True, 0): 0.005, (False, 1): 0.008, (True, 1): 0.006}
IDLE_SHIFT_S = 0.02  # a K-shift re-rotates every cell: 0.10-0.15 s at n_ctx 4096, these tests use 640


@pytest.fixture(scope="module")
def exact():
    with Engine(n_ctx=640, max_sessions=3, n_threads=2, exact=True) as e:
        def pin(core):
            core.costs.rates, core.costs.shift_s = dict(IDLE_RATES), IDLE_SHIFT_S
            core.costs.record = lambda *args, **kwargs: None  # the tests set what they decide by
        e.call(pin)
        yield e


def chat_session(engine, messages: list[dict]) -> str:
    """A session whose cache holds `messages` as the template renders them (no reply)."""
    name = engine.new_session()

    def fill(core):
        s = core.get(name)
        new = [Message(i, m["role"], m["content"], kind="tool" if m["role"] == "tool" else "chat")
               for i, m in enumerate(messages)]
        core.prefill(s, prompt.chat_pieces(core, s, new, generation=False))
        s.messages.extend(new)

    engine.call(fill)
    return name


def test_tokens_decoded_into_a_hole_attend_to_exactly_what_precedes_them(exact):
    """Cells written into a hole match cells appended right after the same prefix. Not bit for
    bit: the attention sums run over the cache's cells in their physical order, which differs
    (measured: splitting one prefill into two batches moves these logits by up to 0.57); a token
    that also saw the 80 cells after the hole would move them by far more (checked below)."""
    tokens = exact.call(lambda core: corpus.tokens(core.model, 200))
    inserted = exact.call(lambda core: core.model.tokenize(" a different middle part"))
    hole, ref = exact.new_session(), exact.new_session()
    try:
        def edit(core):
            s = core.get(hole)
            core.prefill(s, [(0, tokens)])
            core.mem.rm(s.seq, 80, 120)  # a hole of 40 positions, cells after it stay
            s.ledger.remove(80, 120, "test")
            edits._decode_into_hole(core, s, inserted, 80)
            s.ledger.insert(80, inserted, 0)
            core.mem.rm(s.seq, 80 + len(inserted), -1)  # now drop the tail to compare what is left
            s.ledger.truncate(80 + len(inserted))
            r = core.get(ref)
            core.prefill(r, [(0, tokens)])
            core.mem.rm(r.seq, 80, -1)
            r.ledger.truncate(80)
            core.prefill(r, [(0, inserted)])  # appended right after the prefix

        exact.call(edit)
        exact.check(hole)
        assert exact.ledger(hole).tok == exact.ledger(ref).tok
        got, want = exact.next_logits(hole, PROBE, all_logits=True), exact.next_logits(ref, PROBE, all_logits=True)
        close_logits(got, want)
        # what a token that also attended to the old middle and tail would give: far off
        wrong = exact.new_session()
        try:
            exact.call(lambda core: core.prefill(core.get(wrong), [(0, tokens[:120] + inserted)]))
            far = exact.next_logits(wrong, PROBE, all_logits=True)
            assert np.abs(far - want).max() > 2 * np.abs(got - want).max()
        finally:
            exact.delete_session(wrong)
    finally:
        exact.delete_session(hole)
        exact.delete_session(ref)


def close_logits(got: np.ndarray, want: np.ndarray) -> None:
    """Equal up to the layout noise of the attention sums (see the hole test): same top token on
    every row, and near in value."""
    assert (got.argmax(1) == want.argmax(1)).all()
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() > 0.995 and np.abs(got - want).max() < 1.5


@pytest.mark.parametrize("change", ["clock", "placeholder"])
def test_replace_in_place_keeps_unchanged_cells_and_gives_the_client_prompt(exact, change):
    """The edited cache holds exactly the tokens a fresh session would for the client's new
    history; the unchanged tokens kept their cells; only the changed tokens were decoded."""
    history = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Run the tests."},
               {"role": "tool", "content": "collected 40 items\n" + "test_x.py::test_ok PASSED\n" * 30},
               {"role": "assistant", "content": "All 40 tests passed."},
               {"role": "user", "content": "Good. Anything else?"}]
    target, version = ((0, {"role": "system", "content": SYSTEM.replace("12:01", "12:02")}) if change == "clock"
                       else (2, {"role": "tool", "content": "[output elided]"}))
    client = [dict(m) for m in history]
    client[target] = version
    name, ref = chat_session(exact, history), chat_session(exact, client)
    try:
        before = exact.ledger(name)
        report = exact.call(lambda core: edits.replace_message(core, core.get(name), target, version))
        exact.check(name)
        after = exact.ledger(name)
        assert after.tok == exact.ledger(ref).tok  # exactly the client's prompt
        others = [(t, p) for t, p, m in zip(before.tok, before.pos, before.msg) if m != target]
        assert [(t, p) for t, p, m in zip(after.tok, after.pos, after.msg) if m != target] == others
        assert report["kept_tokens"] > 0 and report["recomputed"] == 0
        assert report["edit_s"] < report["reread_s"]
        if change == "clock":  # the clock's token, not the whole system prompt
            assert report["inserted"] <= 3 and report["removed"] <= 3
        else:
            assert report["removed"] > 5 * report["inserted"]
    finally:
        exact.delete_session(name)
        exact.delete_session(ref)


def test_with_reprefill_as_the_strategy_a_changed_message_is_read_again_from_the_change(exact):
    """Editing in place and then rebuilding the session costs more than reading again from the
    changed message: the binding keeps the cells before it and reads the rest, and the result is
    a fresh prefill of the client's prompt."""
    history = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Run the tests."},
               {"role": "assistant", "content": "All 40 tests passed."},
               {"role": "user", "content": "Good. Anything else?"}]
    name = exact.new_session(system="")
    exact.set_roll_strategy(name, "reprefill")
    exact.bind_chat(history[:3], session=name, max_tokens=1, **GREEDY).wait()
    client = [dict(m) for m in history]
    client[1] = {"role": "user", "content": "Run the unit tests."}
    events = []
    exact.bind_chat(client, session=name, max_tokens=1, on_event=events.append, **GREEDY).wait()
    note = next(e.data for e in events if e.kind == "bound")
    assert "edited_messages" not in note and note["dropped_messages"], note
    fresh = chat_session(exact, client)
    try:
        exact.check(name)
        held, want = exact.ledger(name), exact.ledger(fresh)
        n = len(want)
        assert held.tok[:n] == want.tok and held.pos[:n] == list(range(n))
        exact.call(lambda core: _truncate(core, core.get(name), n))
        close_logits(exact.next_logits(name, PROBE, all_logits=True), exact.next_logits(fresh, PROBE, all_logits=True))
    finally:
        exact.delete_session(name)
        exact.delete_session(fresh)


def _truncate(core, s, n: int) -> None:
    core.mem.rm(s.seq, s.ledger.pos[n], -1)
    s.ledger.truncate(n)


def test_the_measured_price_of_a_shift_decides_between_editing_and_reading_again(exact):
    """A message near the end that grows must shift what follows it: when the engine has measured
    that a shift costs more than reading those few cells again, the edit is declined (the binding
    reads from there); when shifts are cheap, it is made in place."""
    history = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Name a colour."},
               {"role": "assistant", "content": "Blue."}]
    version = {"role": "user", "content": "Name a colour that is not red, green or any shade of grey."}
    name = chat_session(exact, history)
    try:
        def decide(core, shift_s):
            saved = dict(core.costs.rates), core.costs.shift_s
            core.costs.rates = {(False, 0): 0.005, (True, 0): 0.0025}
            core.costs.shift_s = shift_s
            try:
                s = core.get(name)
                before = list(s.ledger.tok)
                report = edits.replace_message(core, s, 1, version)
                return report, before == list(s.ledger.tok)
            finally:
                core.costs.rates, core.costs.shift_s = saved

        report, unchanged = exact.call(lambda core: decide(core, 1.0))
        assert report is None and unchanged
        report, unchanged = exact.call(lambda core: decide(core, 0.001))
        assert report is not None and report["shifted"] > 0 and not unchanged
        exact.check(name)
    finally:
        exact.delete_session(name)


def test_replace_with_shift_keeps_later_cells_as_they_were(exact):
    history = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Name a colour."}]
    name = chat_session(exact, history)
    try:
        before = exact.ledger(name)
        version = {"role": "system", "content": SYSTEM.replace("12:01", "12:02")}
        report = exact.call(lambda core: edits.replace_message(core, core.get(name), 0, version))
        after = exact.ledger(name)
        exact.check(name)
        assert report["strategy"] == "shift" and report["recomputed"] == 0
        assert len(after) == len(before) and after.pos == before.pos  # same width: in place, nothing moved
        assert sum(a != b for a, b in zip(after.tok, before.tok)) <= 2
    finally:
        exact.delete_session(name)


def test_a_longer_replacement_moves_the_later_cells_up(exact):
    history = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Name a colour."},
               {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another."}]
    name = chat_session(exact, history)
    try:
        version = {"role": "user", "content": "Name a colour that is not red, green or any shade of grey."}
        report = exact.call(lambda core: edits.replace_message(core, core.get(name), 1, version))
        exact.check(name)
        assert report["shifted"] > 0
        after = exact.ledger(name)
        assert after.pos == sorted(set(after.pos))
        assert exact.call(lambda core: core.get(name).message(1).content) == version["content"]
    finally:
        exact.delete_session(name)


def test_daemon_binding_turns_client_edits_into_cache_edits(exact):
    """Through bind_chat, as the daemon does: the clock changes, then the client drops the oldest
    exchange after its first task message, then it elides an old tool output."""
    sys_at = lambda t: {"role": "system", "content": SYSTEM.replace("12:01", t)}  # noqa: E731
    history = [sys_at("12:01"), {"role": "user", "content": "Check the logs, one by one."}]
    for i in range(3):
        c = exact.bind_chat(history, max_tokens=6, **GREEDY).wait()
        history += [{"role": "assistant", "content": c.text or "ok"},
                    {"role": "tool", "content": f"log {i}: " + "line ok; " * 40}]
    # 1. the clock moved: the system prompt is edited in place, everything else is reused
    history[0] = sys_at("12:02")
    events = []
    c = exact.bind_chat(history, max_tokens=4, on_event=events.append, **GREEDY).wait()
    note = next(e.data for e in events if e.kind == "bound")
    assert note.get("edited_messages") == [0] and note["inserted_tokens"] <= 3, note
    new_tokens = c.usage.prompt_tokens - c.usage.cached_tokens
    assert new_tokens < 200, (c.usage, note)  # the last tool output and the clock, not the whole history
    history += [{"role": "assistant", "content": c.text or "ok"}, {"role": "user", "content": "Next."}]
    # 2. Cline-style: keep the task message, drop the oldest exchange after it
    trimmed = history[:2] + history[4:]
    events = []
    c = exact.bind_chat(trimmed, max_tokens=4, on_event=events.append, **GREEDY).wait()
    note = next(e.data for e in events if e.kind == "bound")
    assert note["session"] == c.session and len(note["dropped_messages"]) == 2
    assert c.usage.prompt_tokens - c.usage.cached_tokens < 40
    trimmed += [{"role": "assistant", "content": c.text or "ok"}, {"role": "user", "content": "Done?"}]
    # 3. micro-compaction: an old tool output becomes a placeholder
    compacted = [dict(m) for m in trimmed]
    k = next(i for i, m in enumerate(compacted) if m["role"] == "tool")
    compacted[k]["content"] = "[log elided]"
    events = []
    c = exact.bind_chat(compacted, max_tokens=4, on_event=events.append, **GREEDY).wait()
    note = next(e.data for e in events if e.kind == "bound")
    assert len(note.get("edited_messages", [])) == 1 and note["removed_tokens"] > note["inserted_tokens"], note
    assert c.usage.prompt_tokens - c.usage.cached_tokens < 40
    exact.check(c.session)


def _tool(name: str, doc: str) -> dict:
    return {"type": "function", "function": {"name": name, "description": doc, "parameters": {
        "type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}}


def test_changed_tool_definitions_are_edited_in_place(exact):
    """An agent whose tool set changes mid-conversation (an MCP server connects): the session that
    holds the conversation has the turn carrying the tools rewritten token by token, the rest is
    reused, and the cache then holds exactly the tokens a fresh session would for the new prompt."""
    from kvside.engine.reply import ReplySpec
    from kvside.engine.session import Session

    read = _tool("read_file", "Read a file of the repository.")
    grep = _tool("grep", "Search the repository for a pattern.")
    # a conversation long enough after the tool turn that rewriting that turn clearly costs less
    # than reading everything again (the engine weighs the two at its measured rates)
    makefile = "all: build test\nbuild:\n\tpython -m build\ntest:\n\tpytest -q\n" * 12
    history = [{"role": "system", "content": "You are a coding agent."},
               {"role": "user", "content": "What does this Makefile do?\n" + makefile}]
    c = exact.bind_chat(history, reply=ReplySpec(tools=[read]), max_tokens=8, **GREEDY).wait()
    history += [{"role": "assistant", "content": c.text or "ok"}, {"role": "user", "content": "And the tests?"}]
    events = []
    c2 = exact.bind_chat(history, reply=ReplySpec(tools=[read, grep]), max_tokens=1, on_event=events.append,
                         **GREEDY).wait()
    note = next(e.data for e in events if e.kind == "bound")
    assert note["session"] == c.session and note.get("tools_changed") is True, note
    assert note["reused_messages"] >= 3
    assert 0 < note["inserted_tokens"] < c2.usage.prompt_tokens // 2
    assert c2.usage.prompt_tokens - c2.usage.cached_tokens < c2.usage.prompt_tokens // 2
    exact.check(c.session)

    def fresh_tokens(core):
        s = core.get(c.session)
        assert s.tools == [read, grep]
        msgs = [Message(i, m["role"], m["content"]) for i, m in enumerate(history)]
        pieces = prompt.chat_pieces(core, Session(name="-", seq=-1, tools=[read, grep]), msgs, generation=True)
        return [t for _, toks in pieces for t in toks], list(s.ledger.tok)

    want, held = exact.call(fresh_tokens)
    assert held == want


def _cline_trace(engine, session: str) -> tuple[list[dict], list[dict]]:
    """A conversation held by `session`, and the client's next array: its first task message
    kept, the oldest exchange after it dropped (Cline), a new question."""
    history = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Check the logs, one by one."}]
    for i in range(3):
        history.append({"role": "tool", "content": f"log {i}: " + "line ok; " * 30})
        c = engine.bind_chat(history, session=session, max_tokens=6, **GREEDY).wait()
        history.append({"role": "assistant", "content": c.text or "ok"})
    trimmed = history[:2] + history[4:] + [{"role": "user", "content": "Next."}]
    return history, trimmed


def test_with_reprefill_a_dropped_middle_exchange_is_read_again_from_the_drop(exact):
    """The session's strategy decides what follows a drop: with reprefill, the cells before the
    drop are kept and the rest is read again, so the cache is a fresh prefill of the client's
    prompt (dense positions, the same tokens and logits)."""
    name = exact.new_session(system="")
    exact.set_roll_strategy(name, "reprefill")
    try:
        _, trimmed = _cline_trace(exact, name)
        events = []
        c = exact.bind_chat(trimmed, session=name, max_tokens=1, on_event=events.append, **GREEDY).wait()
        note = next(e.data for e in events if e.kind == "bound")
        assert note["strategy"] == "reprefill" and note.get("recomputed_tokens", 0) == 0, note
        exact.check(name)
        fresh = chat_session(exact, trimmed)
        try:
            held, want = exact.ledger(name), exact.ledger(fresh)
            n = len(want)  # the session also holds the reply's first token
            assert held.tok[:n] == want.tok and held.pos == list(range(len(held)))
            assert c.usage.cached_tokens < n // 2  # the prefix before the drop, not the later turns
            exact.call(lambda core: _truncate(core, core.get(name), n))
            close_logits(exact.next_logits(name, PROBE, all_logits=True),
                         exact.next_logits(fresh, PROBE, all_logits=True))
        finally:
            exact.delete_session(fresh)
    finally:
        exact.delete_session(name)


def test_with_recompute_the_cells_after_a_drop_are_computed_again(exact):
    """recompute:R after a client's drop: the hole is closed and the first R cells after it are
    computed again (stock llama.cpp can only decode after a sequence's last cell); the answer says
    so and does not count them as cached."""
    name = exact.new_session(system="")
    exact.set_roll_strategy(name, "recompute:8")

    def price(core, values):  # rates under which repairing beats reading the later turns again
        saved = dict(core.costs.rates), core.costs.shift_s
        core.costs.rates, core.costs.shift_s = values
        return saved

    saved = exact.call(lambda core: price(core, ({(False, 0): 0.005, (True, 0): 0.0025}, 0.05)))
    try:
        _, trimmed = _cline_trace(exact, name)
        events = []
        c = exact.bind_chat(trimmed, session=name, max_tokens=1, on_event=events.append, **GREEDY).wait()
        exact.call(lambda core: price(core, saved))
        note = next(e.data for e in events if e.kind == "bound")
        assert note["strategy"] == "recompute:8" and note["recomputed_tokens"] == 8, note
        assert len(note["dropped_messages"]) == 2
        exact.check(name)
        held = exact.ledger(name)
        assert held.pos == list(range(len(held)))  # the hole was closed
        assert held.state.count("recomputed") == 8
        assert c.usage.cached_tokens <= len(held) - 8 - 1  # the recomputed cells and the new turn were read
    finally:
        exact.delete_session(name)


@pytest.mark.parametrize("strategy", ["shift", "reprefill"])
def test_a_message_inserted_in_the_middle_is_decoded_into_room_made_there(exact, strategy):
    """A client puts a message between two it sent before (a note it had left out): the later
    cells move up by its length and keep their KV, its tokens are decoded there attending to what
    precedes them, and the cache then reads exactly as the client's prompt. With reprefill as the
    strategy the match is cut there instead and the rest read."""
    name = exact.new_session(system="")
    exact.set_roll_strategy(name, strategy)
    try:
        history = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Check the logs, one by one."}]
        for i in range(2):
            history.append({"role": "tool", "content": f"log {i}: " + "line ok; " * 30})
            c = exact.bind_chat(history, session=name, max_tokens=4, **GREEDY).wait()
            history.append({"role": "assistant", "content": c.text or "ok"})
        client = history[:3] + [{"role": "user", "content": "Also note: the disk is nearly full."}] + history[3:]
        client.append({"role": "user", "content": "Summarize."})
        before = exact.ledger(name)
        events = []
        exact.bind_chat(client, session=name, max_tokens=1, on_event=events.append, **GREEDY).wait()
        note = next(e.data for e in events if e.kind == "bound")
        exact.check(name)
        fresh = chat_session(exact, client)
        try:
            held, want = exact.ledger(name), exact.ledger(fresh)
            text = lambda led, n: exact.call(lambda core: core.model.detokenize(led.tok[:n], special=True))  # noqa: E731
            assert text(held, len(want)) == text(want, len(want))  # reads as the client's prompt
            assert held.pos == sorted(set(held.pos))
            if strategy == "shift":
                assert note.get("inserted_messages") == 1 and not note.get("dropped_messages"), note
                assert note["inserted_tokens"] > 5
                # the cells after the insertion are the ones held before, moved up
                tail = [t for t, m in zip(before.tok, before.msg) if m >= 3]
                moved = [t for t, m in zip(held.tok, held.msg) if m in (3, 4, 5)]
                assert moved[:len(tail)] == tail
            else:
                assert "inserted_messages" not in note and note["dropped_messages"], note
        finally:
            exact.delete_session(fresh)
    finally:
        exact.delete_session(name)


def test_a_regenerated_reply_binds_to_its_session_and_reads_only_the_generation_prompt(exact):
    """A client asking for another answer sends its history again without the reply it got: the
    session that gave that reply answers again, only its reply dropped. The last message's cells
    stay where they are and only the generation prompt is read (it used to read the last message
    again; llama-server reads one token again). With `reprefill` as the strategy the result equals
    a fresh prefill of the client's messages."""
    history = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Name a river."}]
    first = exact.bind_chat(history, max_tokens=6, **GREEDY).wait()
    history += [{"role": "assistant", "content": first.text or "ok"},
                {"role": "user", "content": "And a lake, with a sentence about its shores and the towns on them?"}]
    second = exact.bind_chat(history, max_tokens=6, **GREEDY).wait()
    assert second.session == first.session
    held = exact.ledger(second.session)
    last_id = max(held.msg)  # the reply
    kept = [(t, p) for t, p, m in zip(held.tok, held.pos, held.msg) if m != last_id]
    events = []
    again = exact.bind_chat(history, max_tokens=6, on_event=events.append, **GREEDY).wait()
    note = next(e.data for e in events if e.kind == "bound")
    assert again.session == first.session and note["dropped_messages"] == [last_id], note
    live = [m for m in exact.messages(again.session) if m["state"] == "live"]
    assert [m["content"] for m in live[-2:]] == [history[-1]["content"], again.text]
    assert again.usage.cached_tokens == len(kept)  # everything but the reply, the last message included
    assert 0 < again.usage.prompt_tokens - again.usage.cached_tokens <= 4  # <|im_start|>assistant\n
    after = exact.ledger(again.session)
    assert [(t, p) for t, p in zip(after.tok, after.pos)][:len(kept)] == kept  # not moved, not read again
    assert again.text == second.text  # greedy: the same answer to the same prompt
    exact.check(again.session)


def test_a_message_that_grows_when_positions_ran_out_closes_the_holes_and_is_edited_in_place(exact):
    """A long agent chat whose client drops exchanges leaves holes: its positions run out long
    before its cells do. A message that grows there closes the holes (one shift) and is edited in
    place, instead of everything after it being read again."""
    task = "Run the tests."
    output = "collected 42 items\n" + "test_x.py::test_ok PASSED\n" * 42
    history = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": task},
               {"role": "tool", "content": output}, {"role": "assistant", "content": "All 40 tests passed."},
               {"role": "user", "content": "Good. Anything else?"}]
    name = chat_session(exact, history)
    try:
        def edit(core):
            s = core.get(name)
            edits.mask(core, s, messages=[2])  # a hole of the tool output's width
            before = s.ledger.next_pos
            grown = {"role": "user", "content": task + " Then run the linter on every module and report each warning"
                                                       " with its file, its line and the rule that raised it."}
            growth = len(edits.message_tokens(core, s, 1, grown)) - s.ledger.msg.count(1)
            assert before + growth >= core.n_ctx > len(s.ledger) + growth  # no positions left, cells enough
            return edits.replace_message(core, s, 1, grown), before, s.ledger.next_pos

        report, before, after = exact.call(edit)
        assert report is not None and report["inserted"] > 0, report
        assert after < before  # the holes were closed
        assert [e["edit"] for e in exact.edit_log(name)][-2:] == ["close_gaps", "replace"]
        exact.check(name)
    finally:
        exact.delete_session(name)


def test_a_named_session_whose_client_rewrites_its_system_prompt_reads_it_again_pinned(exact):
    """A client that names its session and sends a new system prompt (here with `reprefill`, so the
    change is read again, not edited in place) was refused: binding dropped the old system prompt
    with what followed, and the cache refuses to drop a pinned message. The client's history is
    the conversation: the old prompt goes, the new one is read and pinned in its place."""
    name = exact.new_session(system="")
    try:
        exact.set_roll_strategy(name, "reprefill")
        history = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Name a river."}]
        first = exact.bind_chat(history, session=name, max_tokens=4, **GREEDY).wait()
        history = [{"role": "system", "content": "You answer in French, in one word, and never explain."},
                   history[1], {"role": "assistant", "content": first.text}, {"role": "user", "content": "A lake?"}]
        again = exact.bind_chat(history, session=name, max_tokens=4, **GREEDY).wait()
        live = [m for m in exact.messages(name) if m["state"] == "live"]
        assert [(m["role"], m["content"]) for m in live[:-1]] == [(m["role"], m["content"]) for m in history]
        assert live[0]["pinned"] and again.usage.cached_tokens < 5
        exact.check(name)
    finally:
        exact.delete_session(name)
