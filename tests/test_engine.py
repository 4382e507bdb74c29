import threading
import time

import numpy as np
import pytest

from conftest import GREEDY
from kvside.errors import ContextFull, InvalidRequest, SessionBusy, SessionNotFound


def test_greedy_generation_is_deterministic(engine):
    texts = []
    for _ in range(2):
        name = engine.new_session()
        texts.append(engine.chat(name, "Name a fruit.", max_tokens=24, **GREEDY).text())
        engine.delete_session(name)
    assert texts[0] == texts[1] and texts[0]


def test_seeded_sampling_is_deterministic(engine):
    runs = []
    for seed in (7, 7, 8):
        name = engine.new_session()
        runs.append(engine.chat(name, "Tell me a story.", temperature=1.0, seed=seed, max_tokens=24).text())
        engine.delete_session(name)
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_two_sessions_concurrently_equal_their_solo_runs(engine):
    prompts = ["What is two plus two?", "Write a haiku about the sea."]
    solo = []
    for p in prompts:
        name = engine.new_session()
        solo.append(engine.chat(name, p, max_tokens=32, **GREEDY).wait().tokens)
        engine.delete_session(name)
    names = [engine.new_session() for _ in prompts]
    streams = [engine.chat(n, p, max_tokens=32, **GREEDY) for n, p in zip(names, prompts)]
    together = [s.wait().tokens for s in streams]
    for n in names:
        engine.delete_session(n)
    assert together == solo


def test_cancellation_stops_within_a_few_tokens(engine, session):
    stream = engine.chat(session, "Count from one to one thousand.", max_tokens=400, ignore_eos=True, **GREEDY)
    seen = 0
    for _ in stream:
        seen += 1
        if seen == 5:
            stream.cancel()
    done = stream.completion
    assert done.finish_reason == "cancelled"
    assert done.usage.completion_tokens <= 5 + 3
    engine.check(session)
    # the session stays usable after a cancel
    again = engine.chat(session, "Thanks.", max_tokens=8, **GREEDY).wait()
    assert again.usage.cached_tokens > 0
    engine.check(session)


def test_cancel_during_prefill_leaves_session_as_before(engine, session):
    engine.chat(session, "Hello.", max_tokens=4, **GREEDY).wait()
    before = engine.ledger(session).to_dict()
    n_msgs = len(engine.messages(session))
    engine.submit(lambda core: time.sleep(0.5))  # holds the engine: the cancel lands before the prefill
    stream = engine.chat(session, "word " * 300, max_tokens=4, **GREEDY)
    stream.cancel()
    done = stream.wait()
    assert done.finish_reason == "cancelled" and not done.tokens
    assert engine.ledger(session).to_dict() == before
    assert len(engine.messages(session)) == n_msgs
    engine.check(session)


def test_ledger_matches_cache_after_every_turn(engine, session):
    for question in ["Hi!", "What is the sun?", "And the moon?"]:
        done = engine.chat(session, question, max_tokens=16, **GREEDY).wait()
        view = engine.check(session)
        ledger = engine.ledger(session)
        assert view["n_cells"] == len(ledger)
        assert ledger.pos == list(range(len(ledger)))  # no edits: positions are dense
        assert done.usage.prompt_tokens > done.usage.cached_tokens
    msgs = engine.messages(session)
    assert [m["role"] for m in msgs] == ["user", "assistant"] * 3
    assert set(ledger.msg) == {m["id"] for m in msgs}


def test_follow_up_turn_reuses_the_cache(engine, session):
    first = engine.chat(session, "My name is Ada.", max_tokens=12, **GREEDY).wait()
    second = engine.chat(session, "What is my name?", max_tokens=12, **GREEDY).wait()
    assert first.usage.cached_tokens == 0
    assert second.usage.cached_tokens >= first.usage.prompt_tokens + len(first.tokens) - 1


def test_cache_equals_a_fresh_prefill_of_the_ledger_tokens(engine, session):
    engine.chat(session, "Say something short.", max_tokens=12, **GREEDY).wait()
    ledger = engine.ledger(session)
    live = engine.next_logits(session)
    fresh = engine.new_session()
    try:
        engine.call(lambda core: core.prefill(core.get(fresh), [(0, ledger.tok)]))
        pending = engine.call(lambda core: list(core.get(session).pending))
        ref = engine.next_logits(fresh, pending or None)
    finally:
        engine.delete_session(fresh)
    np.testing.assert_allclose(live, ref, rtol=0, atol=1e-4)


def test_stop_strings_and_max_tokens(engine, session):
    done = engine.chat(session, "List the numbers 1, 2, 3, 4, 5.", max_tokens=40, stop=["3"], **GREEDY).wait()
    assert "3" not in done.text and done.finish_reason == "stop"
    done = engine.chat(session, "Write a long essay.", max_tokens=5, **GREEDY).wait()
    assert done.finish_reason == "length" and done.usage.completion_tokens == 5
    engine.check(session)


def test_bad_requests_are_clear_errors(engine, session):
    with pytest.raises(InvalidRequest, match="empty"):
        engine.chat(session, "   ").wait()
    with pytest.raises(InvalidRequest, match="top_p"):
        engine.chat(session, "hi", top_p=2.0).wait()
    with pytest.raises(SessionNotFound):
        engine.chat("no-such-session", "hi").wait()
    with pytest.raises(InvalidRequest, match="invalid session name"):
        engine.new_session("../etc/passwd")
    with pytest.raises(ContextFull):
        engine.chat(session, "word " * 600, max_tokens=4).wait()
    engine.check(session)


def test_requests_to_one_session_are_serialized(engine, session):
    a = engine.chat(session, "First question?", max_tokens=12, **GREEDY)
    b = engine.chat(session, "Second question?", max_tokens=12, **GREEDY)
    da, db = a.wait(), b.wait()
    assert db.usage.cached_tokens >= da.usage.prompt_tokens
    roles = [m["role"] for m in engine.messages(session)]
    assert roles == ["user", "assistant", "user", "assistant"]


def test_delete_while_generating_is_refused_then_works(engine):
    name = engine.new_session()
    stream = engine.chat(name, "Tell me about rivers.", max_tokens=64, ignore_eos=True, **GREEDY)
    with pytest.raises(SessionBusy):
        engine.call(lambda core: core.delete_session(name))
    stream.cancel()
    stream.wait()
    engine.delete_session(name)


def test_system_prompt_is_prefilled_and_pinned(engine):
    name = engine.new_session(system="You are terse.")
    try:
        ledger = engine.ledger(name)
        assert len(ledger) > 0 and set(ledger.msg) == {0}
        msgs = engine.messages(name)
        assert msgs[0]["role"] == "system" and msgs[0]["pinned"]
        engine.check(name)
    finally:
        engine.delete_session(name)


def test_streams_from_several_threads(engine):
    results = {}

    def worker(i):
        name = engine.new_session()
        results[i] = engine.chat(name, f"Say the number {i}.", max_tokens=8, **GREEDY).wait()
        engine.delete_session(name)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(results) == [0, 1, 2]
