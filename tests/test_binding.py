"""Binding requests to sessions: best_match on its own, then binding and starting as one engine task
under concurrent clients (no two requests may bind one session)."""

import threading

import httpx
import pytest

from conftest import GREEDY, LiveDaemon
from kvside.engine import Engine
from kvside.engine.binding import best_match


def held(*pairs, states=None):
    out = []
    for i, (role, content) in enumerate(pairs):
        out.append({"id": i, "role": role, "content": content, "state": (states or {}).get(i, "live")})
    return out


def msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


SYS, U1, A1, U2, A2, U3 = ("system", "be brief"), ("user", "q1"), ("assistant", "a1"), ("user", "q2"), \
    ("assistant", "a2"), ("user", "q3")


# -- best_match ---------------------------------------------------------------------------------------
def test_best_match_appends_to_an_exact_prefix():
    m = best_match({"s": held(SYS, U1, A1)}, msgs(SYS, U1, A1, U2))
    assert (m.session, m.reused, m.dropped, m.new) == ("s", 3, [], msgs(U2))


def test_best_match_turns_a_dropped_front_after_the_system_prompt_into_dropped_ids():
    m = best_match({"s": held(SYS, U1, A1, U2, A2)}, msgs(SYS, U2, A2, U3))
    assert m.dropped == [1, 2] and m.reused == 3 and m.new == msgs(U3) and m.replaced == []


def test_best_match_without_a_system_prompt_drops_from_the_very_front():
    m = best_match({"s": held(U1, A1, U2, A2)}, msgs(U2, A2, U3))
    assert m.dropped == [0, 1] and m.new == msgs(U3)


def test_best_match_drops_in_the_middle_as_agents_do():
    """Cline keeps its first task message and drops the oldest exchange after it."""
    m = best_match({"s": held(SYS, U1, A1, U2, A2, U3, ("assistant", "a3"))},
                   msgs(SYS, U1, U2, A2, U3, ("assistant", "a3"), ("user", "q4")))
    assert m.dropped == [2] and m.reused == 6 and m.new == msgs(("user", "q4"))


def test_best_match_pairs_changed_messages_for_an_edit_in_place():
    """A clock in the system prompt, a tool output replaced by a placeholder: same role, other text."""
    m = best_match({"s": held(SYS, U1, A1, U2)}, msgs(("system", "be brief. 12:02"), U1, A1, U2, U3))
    assert m.replaced == [(0, {"role": "system", "content": "be brief. 12:02"})] and m.new == msgs(U3)
    m = best_match({"s": held(SYS, U1, ("tool", "long output"), A1, U2)},
                   msgs(SYS, U1, ("tool", "[elided]"), A1, U2, U3))
    assert [i for i, _ in m.replaced] == [2] and m.dropped == [] and m.reused == 5


def test_best_match_prefers_the_longest_reuse_across_sessions():
    sessions = {"short": held(SYS, U1, A1), "long": held(SYS, U1, A1, U2, A2)}
    m = best_match(sessions, msgs(SYS, U1, A1, U2, A2, U3))
    assert m.session == "long" and m.reused == 5


def test_best_match_weighs_the_cells_a_session_would_save_not_its_message_count():
    """A session holding a long tool output the client still sends saves more reading than one
    that matches more short messages but holds that output elided."""
    tool, elided = ("tool", "x " * 400), ("tool", "[elided]")
    cells = lambda *n: [dict(m, n_cells=k) for m, k in zip(*n)]  # noqa: E731
    sessions = {"with-output": cells(held(SYS, U1, tool), [10, 5, 500]),
                "more-messages": cells(held(SYS, U1, elided, A1, U2, A2), [10, 5, 3, 5, 5, 5])}
    m = best_match(sessions, msgs(SYS, U1, tool, A1, U2, A2, U3))
    assert m.session == "with-output" and m.reused_cells == 515


def test_best_match_needs_something_new_to_answer():
    assert best_match({"s": held(SYS, U1, A1)}, msgs(SYS, U1, A1)) is None


def test_best_match_places_a_message_inserted_in_the_middle():
    """A message inserted between held ones is an insertion before the held message that follows
    it (edits.insert_messages decodes it into room made there); everything held is reused."""
    m = best_match({"s": held(SYS, U1, A1, U2, A2)}, msgs(SYS, U1, ("user", "aside"), A1, U2, A2, U3))
    assert m.reused == 5 and m.dropped == [] and m.new == msgs(U3)
    assert m.inserted == [(2, msgs(("user", "aside")))]


def test_best_match_cuts_at_an_insertion_before_a_message_without_cells():
    """Before a message whose cells already went (rolled, masked), there is nowhere to put it: the
    cells before it are reused, the rest is read anew."""
    m = best_match({"s": held(SYS, U1, A1, U2, A2, states={2: "rolled"})},
                   msgs(SYS, U1, ("user", "aside"), A1, U2, A2, U3))
    assert m.inserted == [] and m.dropped == [3, 4] and m.new[0] == {"role": "user", "content": "aside"}


def test_best_match_never_drops_a_pinned_message():
    pinned = held(SYS, U1, A1, U2, A2)
    pinned[0]["pinned"] = True
    assert best_match({"s": pinned}, msgs(U1, A1, U2, A2, U3)) is None


def test_best_match_does_not_report_cells_already_gone_as_dropped():
    m = best_match({"s": held(SYS, U1, A1, U2, A2, states={1: "masked"})}, msgs(SYS, U2, A2, U3))
    assert m.dropped == [2]


def test_best_match_compares_whitespace_trimmed_content_and_roles():
    assert best_match({"s": held(SYS, U1)}, msgs(("system", " be brief \n"), U1, U2)).reused == 2
    assert best_match({"s": held(SYS, U1)}, msgs(SYS, ("assistant", "q1"), U2)) is None  # same text, other role


def test_best_match_does_not_take_another_conversation_that_shares_only_the_head():
    other = held(SYS, ("user", "theirs"), ("assistant", "their answer"), ("user", "more"), ("assistant", "more"))
    assert best_match({"s": other}, msgs(SYS, ("user", "mine"))) is None
    # but a client that dropped less than it kept is trimming its own history
    m = best_match({"s": held(SYS, U1, A1, U2, A2)}, msgs(SYS, U2, A2, U3))
    assert m is not None and m.dropped == [1, 2]


def test_best_match_of_nothing_held_is_none():
    assert best_match({}, msgs(U1)) is None
    assert best_match({"s": []}, msgs(U1)) is None


# -- one task: bind, edit, start ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    with Engine(n_ctx=256, max_sessions=6, n_threads=2, sessions_dir=str(tmp_path_factory.mktemp("bind"))) as e:
        yield e


def test_two_identical_requests_posted_together_never_share_a_session(engine):
    first = engine.bind_chat(msgs(SYS, U1), max_tokens=4, **GREEDY)
    first.wait()
    base = msgs(SYS, U1) + [{"role": "assistant", "content": first.completion.text}]
    a = engine.bind_chat(base + msgs(U2), max_tokens=4, **GREEDY)
    b = engine.bind_chat(base + msgs(U2), max_tokens=4, **GREEDY)
    a.wait(), b.wait()
    assert a.session != b.session
    assert a.session == first.session or b.session == first.session  # one of them reused it
    for stream in (a, b):
        contents = [m["content"] for m in engine.messages(stream.session)]
        assert contents == [c for _, c in (SYS, U1)] + [first.completion.text, U2[1], stream.completion.text]


def test_a_failed_start_leaves_the_matched_session_as_it_was(engine):
    first = engine.bind_chat(msgs(SYS, U1, A1, U2), max_tokens=4, **GREEDY)
    first.wait()
    before = engine.messages(first.session)
    ledger = engine.ledger(first.session)
    # drops two messages (a mask), then fails to start: an empty message is refused after the edit
    history = msgs(SYS, U2) + [{"role": "assistant", "content": first.completion.text}, {"role": "user", "content": "  "}]
    bad = engine.bind_chat(history, max_tokens=4, **GREEDY)
    with pytest.raises(Exception):
        bad.wait()
    assert engine.messages(first.session) == before
    assert engine.ledger(first.session).pos == ledger.pos
    engine.check(first.session)


def test_concurrent_http_clients_each_get_a_session_with_exactly_their_messages(tmp_path):
    with Engine(n_ctx=256, max_sessions=6, n_threads=2, sessions_dir=str(tmp_path)) as engine:
        live = LiveDaemon(engine)
        try:
            url = live.url + "/v1/chat/completions"
            seed = httpx.post(url, json={"messages": msgs(SYS, U1), "max_tokens": 4, **GREEDY}, timeout=120).json()
            base = msgs(SYS, U1) + [{"role": "assistant", "content": seed["choices"][0]["message"]["content"]}]
            asks = [base + msgs(("user", f"question {i % 3}")) for i in range(6)]  # identical and near-identical
            results: dict[int, dict] = {}

            def one(i):
                r = httpx.post(url, json={"messages": asks[i], "max_tokens": 4, **GREEDY}, timeout=240)
                results[i] = r.json()

            threads = [threading.Thread(target=one, args=(i,)) for i in range(len(asks))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            sessions = [results[i]["kvside"]["session"] for i in range(len(asks))]
            assert len(set(sessions)) == len(asks), sessions  # nobody's turn landed in another's session
            for i, name in enumerate(sessions):
                contents = [m["content"] for m in engine.messages(name)]
                reply = results[i]["choices"][0]["message"]["content"]
                assert contents == [m["content"] for m in asks[i]] + [reply], (i, contents)
        finally:
            live.stop()


def test_a_conversation_whose_session_went_to_disk_is_brought_back_not_prefilled(tmp_path):
    with Engine(n_ctx=256, max_sessions=1, n_threads=2, sessions_dir=str(tmp_path)) as engine:
        first = engine.bind_chat(msgs(SYS, U1), max_tokens=4, **GREEDY)
        first.wait()
        other = engine.bind_chat(msgs(("user", "a different conversation")), max_tokens=4, **GREEDY)
        other.wait()  # one resident session: the first one went to disk to make room
        assert other.session != first.session
        assert {r["name"]: r["resident"] for r in engine.sessions()}[first.session] is False
        again = engine.bind_chat(msgs(SYS, U1) + [{"role": "assistant", "content": first.completion.text}] + msgs(U2),
                                 max_tokens=4, **GREEDY)
        again.wait()
        assert again.session == first.session
        assert again.completion.usage.cached_tokens > 0
        contents = [m["content"] for m in engine.messages(first.session)]
        assert contents == [SYS[1], U1[1], first.completion.text, U2[1], again.completion.text]


def test_best_match_does_not_take_a_one_turn_conversation_that_shares_the_system_prompt():
    """Two users, one question each after the same system prompt: the second gets its own session
    instead of destroying the first one's."""
    assert best_match({"s": held(SYS, U1)}, msgs(SYS, ("user", "something else"))) is None
    assert best_match({"s": held(SYS, U1, A1)}, msgs(SYS, ("user", "something else"))) is None


def test_best_match_pairs_an_edited_system_prompt_when_the_front_is_also_dropped():
    """A clock in the system prompt and an editor dropping the oldest exchange, in the same turn:
    the system prompt is edited, the exchange dropped, the rest reused."""
    m = best_match({"s": held(SYS, U1, A1, U2, A2)}, msgs(("system", "be brief. 10:06"), U2, A2, U3))
    assert [i for i, _ in m.replaced] == [0] and m.dropped == [1, 2] and m.new == msgs(U3) and m.reused == 3


def test_best_match_keeps_the_new_turn_new_after_a_changed_block():
    m = best_match({"s": held(SYS, U1, A1)}, msgs(SYS, ("user", "q1, edited"), A1, U2))
    assert [i for i, _ in m.replaced] == [1] and m.new == msgs(U2)


def test_best_match_follows_a_client_that_dropped_more_than_it_kept_but_runs_on_from_the_last_reply():
    """An agent with a tight budget (its tool definitions just grew) keeps its task message and the
    last exchange only: it is this conversation trimmed, since it holds this session's last reply."""
    T1, R1, T2, R2, T3, R3 = (("tool", "out 1"), ("assistant", "r1"), ("tool", "out 2"), ("assistant", "r2"),
                              ("tool", "out 3"), ("assistant", "r3"))
    m = best_match({"s": held(SYS, U1, T1, R1, T2, R2, T3, R3)}, msgs(SYS, U1, T3, R3, ("tool", "out 4")))
    assert m is not None and m.dropped == [2, 3, 4, 5] and m.new == msgs(("tool", "out 4"))
    # the same head with an earlier reply of this session last is not enough: another client's
    assert best_match({"s": held(SYS, U1, T1, R1, T2, R2, T3, R3)}, msgs(SYS, U1, T1, R1, ("tool", "x"))) is None


def test_a_conversation_binds_to_its_session_after_the_engine_restarts(tmp_path):
    """An editor's chat, then the daemon restarts: the sessions request binding made were saved
    on close, and the next request of the same conversation is matched against their files and
    continues from the cache instead of being read again."""
    chat = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
    with Engine(n_ctx=512, max_sessions=2, n_threads=2, persist=True, sessions_dir=str(tmp_path)) as e:
        first = e.bind_chat(chat, max_tokens=6, **GREEDY).wait()
        unrelated = e.bind_chat([{"role": "user", "content": "Count to three."}], max_tokens=4, **GREEDY).wait()
    assert first.session != unrelated.session
    later = chat + [{"role": "assistant", "content": first.text}, {"role": "user", "content": "Another."}]
    with Engine(n_ctx=512, max_sessions=2, n_threads=2, persist=True, sessions_dir=str(tmp_path)) as e:
        events = []
        done = e.bind_chat(later, max_tokens=2, on_event=events.append, **GREEDY).wait()
        e.check(done.session)
    bound = next(ev.data for ev in events if ev.kind == "bound")
    assert done.session == first.session and bound.get("reused_messages") == 3
    assert done.usage.cached_tokens >= first.usage.prompt_tokens
