"""Cache edits on the real model: the ledger stays equal to the cache, the reference strategies
reproduce a re-prefill, forks are independent, chats run far past n_ctx."""

import numpy as np
import pytest
from conftest import GREEDY

from kvside.bench import corpus
from kvside.bench.fidelity import compare, degeneration
from kvside.engine import Engine, edits, kvstate, native
from kvside.errors import EditError, InvalidRequest


@pytest.fixture(scope="module")
def exact():
    # flash attention off: a re-prefill reproduces a cache bit for bit (see EngineConfig)
    with Engine(n_ctx=320, max_sessions=3, n_threads=2, exact=True) as e:
        yield e


def filled(engine, n=240):
    """A session holding n corpus tokens, with no chat structure."""
    name = engine.new_session()
    engine.call(lambda core: core.prefill(core.get(name), [(0, corpus.tokens(core.model, n))]))
    return name


def reference_logits(engine, name, probe):
    """Logits of a fresh session prefilled with the same tokens as `name`'s ledger."""
    tokens = engine.ledger(name).tok
    ref = engine.new_session()
    try:
        engine.call(lambda core: core.prefill(core.get(ref), [(0, tokens)]))
        return engine.next_logits(ref, probe, all_logits=True)
    finally:
        engine.delete_session(ref)


PROBE = [198, 504, 260, 1115]


def test_reprefill_equals_a_fresh_prefill(exact):
    name = filled(exact)
    report = exact.roll(name, 80, keep=4, strategy="reprefill")
    assert report["dropped"] == 80 and report["recomputed"] == 160
    exact.check(name)
    got = exact.next_logits(name, PROBE, all_logits=True)
    np.testing.assert_array_equal(got, reference_logits(exact, name, PROBE))
    exact.delete_session(name)


@pytest.mark.parametrize("strategy", ["shift", "recompute:16", "recompute:1000"])
def test_roll_keeps_ledger_equal_to_cache(exact, strategy):
    name = filled(exact)
    before = exact.ledger(name)
    report = exact.roll(name, 100, keep=4, strategy=strategy)
    led = exact.ledger(name)
    exact.check(name)
    assert led.tok == before.tok[:4] + before.tok[104:]
    assert led.pos == list(range(len(led)))  # the window follows the head
    assert report["n_cells"] == len(led) == 140
    if strategy == "recompute:16":
        assert led.state[4:20] == ["recomputed"] * 16 and led.state[20] == "live"
    exact.delete_session(name)


def test_recompute_covering_the_window_matches_the_reference(exact):
    results = {}
    for strategy in ("shift", "recompute:1000"):
        name = filled(exact)
        exact.roll(name, 100, keep=4, strategy=strategy)
        got = exact.next_logits(name, PROBE, all_logits=True)
        results[strategy] = compare(got, reference_logits(exact, name, PROBE))
        exact.delete_session(name)
    full = results["recompute:1000"]
    # Every cell of the window is recomputed exactly; what remains is the rounding of a
    # differently shaped batch (measured: kl ~0.005, max logit diff < 1).
    assert full["top1"] == 1.0 and full["kl"] < 0.02 and full["logit_cos"] > 0.999
    assert full["kl"] < results["shift"]["kl"]


def test_fork_edits_never_touch_the_original(engine):
    name = engine.new_session(system="You are brief.")
    engine.chat(name, "Tell me about tides.", max_tokens=24, **GREEDY).wait()
    before = engine.next_logits(name)
    ledger_before = engine.ledger(name).to_dict()
    child = engine.fork(name)
    engine.check(child)
    assert engine.ledger(child).to_dict() == ledger_before
    np.testing.assert_array_equal(engine.next_logits(child), before)
    engine.roll(child, 10, strategy="recompute:4")
    engine.mask(child, messages=[1], close_gap=True)
    engine.chat(child, "And about waves?", max_tokens=8, **GREEDY).wait()
    np.testing.assert_array_equal(engine.next_logits(name), before)
    assert engine.ledger(name).to_dict() == ledger_before
    engine.check(name)
    engine.check(child)
    engine.delete_session(child)
    engine.delete_session(name)


def test_fork_on_device_copies_every_cell(exact):
    """llama.cpp's device-side sequence state (the GPU path of fork) gives the same cells as the
    host round trip; on CPU the 'device' is host memory, which is what this can check here."""
    name = filled(exact, 200)
    exact.roll(name, 50, keep=4)  # a pending shift: the copy must carry the re-rotated keys

    def cells(core, s):
        kv = kvstate.parse(core.seq_state(s.seq)).by_position()
        return kv.pos, kv.k + kv.v

    def both(core):
        s = core.get(name)
        on_dev, rep_dev = edits.fork(core, s, on_device=True)
        on_host, rep_host = edits.fork(core, s, on_device=False)
        return on_dev.name, on_host.name, rep_dev, rep_host, [cells(core, x) for x in (s, on_dev, on_host)]

    dev, host, rep_dev, rep_host, copies = exact.call(both)
    assert rep_dev["on_device"] and not rep_host["on_device"]
    assert rep_dev["bytes_through_host"] < rep_host["bytes_through_host"] / 10  # metadata only
    for pos, tensors in copies[1:]:
        np.testing.assert_array_equal(pos, copies[0][0])
        for a, b in zip(tensors, copies[0][1]):
            np.testing.assert_array_equal(a, b)
    before = exact.next_logits(name)
    exact.roll(dev, 20, keep=4)
    np.testing.assert_array_equal(exact.next_logits(name), before)
    for n in (name, dev, host):
        exact.check(n)
        exact.delete_session(n)


@pytest.mark.parametrize("close_gap", [False, True])
def test_mask_keeps_generating_coherently(engine, close_gap):
    name = engine.new_session(system="You are a helpful assistant.")
    engine.chat(name, "My cat is called Tom.", max_tokens=24, **GREEDY).wait()
    engine.chat(name, "I live in Paris.", max_tokens=24, **GREEDY).wait()
    before = engine.ledger(name)
    report = engine.mask(name, messages=[1, 2], close_gap=close_gap)
    led = engine.ledger(name)
    engine.check(name)
    assert report["masked"] == sum(1 for m in before.msg if m in (1, 2))
    assert not {1, 2} & set(led.msg)
    if close_gap:
        assert led.pos == list(range(len(led)))
    else:
        assert led.next_pos == before.next_pos  # the hole stays
    done = engine.chat(name, "Write two sentences about the city.", max_tokens=64, **GREEDY).wait()
    assert done.text.strip()
    assert degeneration(done.tokens) < 0.5
    states = {m["id"]: m["state"] for m in engine.messages(name)}
    assert states[1] == states[2] == "masked"
    engine.check(name)
    engine.delete_session(name)


def test_auto_roll_runs_a_chat_far_past_n_ctx():
    with Engine(n_ctx=192, max_sessions=1, n_threads=2) as e:
        name = e.new_session(system="You are a helpful assistant.")
        notices = 0
        total = 0
        for i in range(8):
            done = e.chat(name, f"Tell me fact number {i} about the ocean.", max_tokens=48, **GREEDY).wait()
            notices += len(done.notices)
            total += done.usage.completion_tokens + (done.usage.prompt_tokens - done.usage.cached_tokens)
            e.check(name)
            led = e.ledger(name)
            assert led.next_pos < 192
            assert led.msg[0] == 0  # the system prompt is never rolled
        assert total > 2 * 192
        assert notices >= 1
        log = e.edit_log(name)
        assert any(entry["edit"] == "roll" for entry in log)
        rolled = [m for m in e.messages(name) if m["state"] == "rolled"]
        assert rolled and all(m["role"] != "system" for m in rolled)


def test_auto_roll_during_a_long_reply():
    with Engine(n_ctx=128, max_sessions=1, n_threads=2) as e:
        name = e.new_session()
        e.chat(name, "Hello there.", max_tokens=20, **GREEDY).wait()
        stream = e.chat(name, "Write a very long story.", max_tokens=150, ignore_eos=True, **GREEDY)
        kinds = [ev.kind for ev in stream.events()]
        done = stream.completion
        assert "notice" in kinds
        # the reply went on past the room the window had when it started: the roll made room
        assert done.usage.completion_tokens > 128 - done.usage.prompt_tokens
        e.check(name)


def _passkey_chat(engine, max_tokens: int) -> str:
    """A session whose first two turns (messages 1-4) state a passkey: what compaction tests compact."""
    name = engine.new_session(system="You are a helpful assistant.")
    engine.chat(name, "The passkey is 4417.", max_tokens=max_tokens, **GREEDY).wait()
    engine.chat(name, "Remember it.", max_tokens=max_tokens, **GREEDY).wait()
    return name


def test_compact_mask_and_restart(engine):
    for mode in ("mask", "restart"):
        name = _passkey_chat(engine, 16)
        report = engine.compact(name, up_to=2, summary="The user said the passkey is 4417.", mode=mode)
        engine.check(name)
        led = engine.ledger(name)
        assert not {1, 2} & set(led.msg)
        assert "summary" in led.state
        assert report["summary_message"] in led.msg
        # the summary stands where the compacted turns stood, before the later ones, with no hole left
        summary_pos = [p for p, m in zip(led.pos, led.msg) if m == report["summary_message"]]
        assert max(summary_pos) < min(p for p, m in zip(led.pos, led.msg) if m == 3)
        assert led.pos == list(range(len(led)))
        if mode == "mask":
            assert report["summary_placed"] == "in place"
            assert [m["id"] for m in engine.messages(name) if m["kind"] == "summary"] == [report["summary_message"]]
        states = {m["id"]: m["state"] for m in engine.messages(name)}
        assert states[1] == states[2] == "summarized"
        assert engine.chat(name, "What is the passkey?", max_tokens=16, **GREEDY).wait().text
        engine.check(name)
        engine.delete_session(name)


def test_compact_closes_its_own_hole_and_no_other(engine):
    """A hole an earlier mask left on purpose (the kept cells keep the distances they were computed
    with) stays when a later compaction closes what its summary did not fill."""
    name = engine.new_session(system="You are a helpful assistant.")
    for text in ("The passkey is 4417.", "Remember it.", "Now something else.", "And one more thing."):
        engine.chat(name, text, max_tokens=8, **GREEDY).wait()
    engine.mask(name, messages=[5])  # the third user turn: its hole stays
    hole = engine.ledger(name)
    gap_before = [b - a for a, b in zip(hole.pos, hole.pos[1:]) if b - a > 1]
    report = engine.compact(name, up_to=2, summary="The passkey is 4417.")
    engine.check(name)
    led = engine.ledger(name)
    assert report["summary_placed"] == "in place"
    assert [b - a for a, b in zip(led.pos, led.pos[1:]) if b - a > 1] == gap_before
    first_later = led.msg.index(3)
    assert led.pos[: first_later + 1] == list(range(first_later + 1))
    engine.delete_session(name)


def test_compact_writes_its_own_summary_and_keeps_the_numbers(engine):
    """Whatever the model writes, the summary that stands for the turns holds the number the user
    gave: the model's notes, with the user's sentence appended where they lost it, or notes taken
    from the turns when the model wrote nothing usable."""
    name = engine.new_session()
    engine.chat(name, "I am planning a trip to Rome in May. My booking code is 58213.", max_tokens=24, **GREEDY).wait()
    report = engine.compact(name, up_to=1)
    assert report["summary_source"] in ("model", "model+extract", "extract")
    assert "58213" in report["summary"]
    engine.check(name)
    engine.delete_session(name)


def test_compact_with_an_empty_summary_leaves_no_note(engine):
    for mode in ("mask", "restart"):
        name = _passkey_chat(engine, 8)
        report = engine.compact(name, up_to=2, summary="", mode=mode)
        engine.check(name)
        led = engine.ledger(name)
        assert report["summary_message"] is None and "summary" not in led.state and not {1, 2} & set(led.msg)
        assert [m["kind"] for m in engine.messages(name)].count("summary") == 0
        engine.delete_session(name)


class _Said:
    def __init__(self, role, content):
        self.role, self.content = role, content


def test_a_refused_or_empty_summary_is_replaced_by_notes_from_the_turns():
    from kvside.engine.edits import checked_summary, summary_problem

    turns = [_Said("user", "My passkey is 73914. Please remember it."), _Said("assistant", "Sure, 73914."),
             _Said("user", "My cat is called Pixel."), _Said("user", "What is the weather like?"),
             _Said("user", "i live in lisbon")]
    assert summary_problem("I'm sorry, but I can't assist with that.") == "refusal"
    assert summary_problem("I\u2019m sorry, I cannot help.") == "refusal"
    assert summary_problem("") == "empty" and summary_problem("Okay.") == "empty"
    assert summary_problem("The user has a cat called Pixel and a passkey.") is None
    text, source = checked_summary("I'm sorry, but I can't assist with that.", turns, 400)
    assert source == "extract"
    assert "My passkey is 73914." in text and "My cat is called Pixel." in text and "i live in lisbon." in text
    assert "weather" not in text and "Sure" not in text  # questions and the assistant's words are not facts
    # notes that lost a number, a name or what a statement states get the user's sentences that hold it
    text, source = checked_summary("The user has a cat called Pixel.", turns, 400)
    assert source == "model+extract" and text.endswith("Also said: My passkey is 73914. i live in lisbon.")
    text, source = checked_summary("Passkey 73914. Lives in Lisbon.", turns, 400)
    assert source == "model+extract" and text.endswith("Also said: My cat is called Pixel.")
    assert checked_summary("The passkey is 73914; the cat is Pixel; lives in Lisbon.", turns, 400) == \
        ("The passkey is 73914; the cat is Pixel; lives in Lisbon.", "model")
    # the budget keeps the latest sentences
    text, _ = checked_summary("", turns, 40)
    assert "lisbon" in text and "73914" not in text


def test_prune_and_erratum(engine):
    name = engine.new_session()
    engine.chat(name, [{"role": "user", "content": "Look up the weather."},
                       {"role": "tool", "content": "weather: rain, 12 C"}], max_tokens=8, **GREEDY).wait()
    engine.chat(name, [{"role": "tool", "content": "weather: sun, 20 C"}], max_tokens=8, **GREEDY).wait()
    report = engine.prune(name, kind="tool", keep_last=1)
    assert report["messages"] == [1]
    engine.check(name)
    msgs = {m["id"]: m for m in engine.messages(name)}
    assert msgs[1]["state"] == "pruned" and msgs[3]["state"] == "live"
    note = engine.erratum(name, "the first forecast was for yesterday")
    led = engine.ledger(name)
    assert led.state[-1] == "erratum" and note["message"] in led.msg
    engine.check(name)
    engine.delete_session(name)


def test_cache_that_cannot_shift_falls_back_to_reprefill(exact, monkeypatch):
    name = filled(exact, 120)
    monkeypatch.setattr("kvside.engine.memory.Memory.can_shift", lambda self: False)
    report = exact.roll(name, 40, keep=4, strategy="shift")
    assert "reprefill" in report["fallback"]
    exact.check(name)
    np.testing.assert_array_equal(exact.next_logits(name, PROBE, all_logits=True), reference_logits(exact, name, PROBE))
    exact.delete_session(name)


def test_refused_removal_falls_back_without_half_edit(exact, monkeypatch):
    name = filled(exact, 120)
    before = exact.ledger(name)

    def refuse(self, seq, p0, p1):
        raise EditError("refused by this cache")

    monkeypatch.setattr("kvside.engine.memory.Memory.rm", refuse)
    report = exact.roll(name, 40, keep=4, strategy="shift")
    monkeypatch.undo()
    assert "refused" in report["fallback"]
    led = exact.ledger(name)
    assert led.tok == before.tok[:4] + before.tok[44:]
    exact.check(name)
    np.testing.assert_array_equal(exact.next_logits(name, PROBE, all_logits=True), reference_logits(exact, name, PROBE))
    exact.delete_session(name)


def test_a_failed_edit_puts_the_cells_back_exactly_each_time(exact):
    """Edits of several steps run inside a snapshot (txn.atomic): one that fails after cutting
    cells leaves the session as it was, logits included. Twice in a row (the snapshot's buffer is
    reused, so the second must not see the first's bytes), and inside another session's snapshot
    (which still holds the kept buffer: the inner one gets its own)."""
    from kvside.engine.txn import atomic

    a, b = filled(exact, 150), filled(exact, 90)
    want = {n: (exact.ledger(n).tok, exact.next_logits(n, PROBE, all_logits=True)) for n in (a, b)}

    def cut_then_fail(core, s):
        core.mem.rm(s.seq, 10, 60)
        s.ledger.remove(10, 60, "mask")
        raise EditError("failed after cutting")

    def nested(core, s):
        with atomic(core, core.get(b)):
            cut_then_fail(core, core.get(b))

    for name, fn in [(a, cut_then_fail), (b, cut_then_fail), (a, nested)]:
        with pytest.raises(EditError):
            exact._atomic_edit(name, fn)
    for n in (a, b):
        exact.check(n)
        assert exact.ledger(n).tok == want[n][0]
        np.testing.assert_array_equal(exact.next_logits(n, PROBE, all_logits=True), want[n][1])
    exact.delete_session(a)
    exact.delete_session(b)


def test_bad_edits_are_clear_errors(exact):
    name = filled(exact, 60)
    with pytest.raises(InvalidRequest, match="cannot drop"):
        exact.roll(name, 500)
    with pytest.raises(InvalidRequest, match="unknown strategy"):
        exact.roll(name, 5, strategy="teleport")
    if not native.available():
        with pytest.raises(InvalidRequest, match="native patch"):
            exact.roll(name, 5, strategy="values:8")
    with pytest.raises(InvalidRequest, match="unknown message"):
        exact.mask(name, messages=[99])
    with pytest.raises(InvalidRequest):
        exact.mask(name, span=(10, 5))
    exact.check(name)
    assert len(exact.ledger(name)) == 60
    exact.delete_session(name)


def test_masked_holes_are_closed_when_positions_run_out():
    with Engine(n_ctx=160, max_sessions=1, n_threads=2) as e:
        name = e.new_session(system="You are brief.")
        e.chat(name, "One.", max_tokens=30, ignore_eos=True, **GREEDY).wait()
        e.chat(name, "Two.", max_tokens=30, ignore_eos=True, **GREEDY).wait()
        e.mask(name, messages=[1, 2])  # a hole, positions unchanged
        led = e.ledger(name)
        assert len(led) < led.next_pos
        done = e.chat(name, "Three, a longer question that needs room in the window.", max_tokens=70,
                      ignore_eos=True, **GREEDY).wait()
        kinds = [n.get("strategy") for n in done.notices]
        assert "close_gaps" in kinds
        led = e.ledger(name)
        e.check(name)
        assert led.pos == list(range(len(led)))
        assert any(entry["edit"] == "close_gaps" for entry in e.edit_log(name))
