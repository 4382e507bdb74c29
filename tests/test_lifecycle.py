"""Session lifecycle under faults: every path either completes or leaves everything as it was."""

import threading
import time

import numpy as np
import pytest

from conftest import GREEDY
from kvside import sessionfile
from kvside.engine import Engine, compose, edits
from kvside.errors import EditError, EngineClosed, KvsideError
from kvside.sessionfile import SessionFileError


def resident(engine):
    return {r["name"] for r in engine.sessions() if r["resident"]}


def say(engine, name, text, n=6):
    return engine.chat(name, text, max_tokens=n, **GREEDY).wait()


def test_fork_never_evicts_its_own_parent(tmp_path):
    with Engine(n_ctx=256, max_sessions=2, n_threads=2, sessions_dir=str(tmp_path)) as engine:
        parent = engine.new_session("parent")
        say(engine, parent, "The parent remembers a green door.")
        other = engine.new_session("other")
        say(engine, other, "Unrelated.")  # now the parent is the least recently used
        child = engine.fork(parent, "child")
        assert resident(engine) == {"parent", "child"}  # "other" went to disk, not the parent
        assert engine.ledger(child).tok == engine.ledger(parent).tok
        engine.check(parent), engine.check(child)
        assert "green door" in engine.messages(child)[0]["content"]


def _garbage_state_file(engine, tmp_path, name="broken"):
    """A file whose header and checksum are right but whose cache state llama.cpp refuses."""
    s = engine.new_session(name)
    say(engine, s, "Some words to save.")
    good = tmp_path / f"{name}-good.kvs"
    engine.save(s, str(good))
    engine.delete_session(s)
    sf = sessionfile.read_header(good, verify=True)
    bad = tmp_path / f"{name}.kvs"
    sessionfile.write(bad, dict(sf.header), b"\x07" * 4096)
    return bad


def test_a_restore_that_fails_after_its_checks_registers_nothing_and_evicts_nobody(tmp_path):
    with Engine(n_ctx=256, max_sessions=2, n_threads=2, sessions_dir=str(tmp_path / "s")) as engine:
        bad = _garbage_state_file(engine, tmp_path)
        for name in ("a", "b"):
            engine.new_session(name)
            say(engine, name, f"Session {name}.")
        before = engine.sessions()
        with pytest.raises(SessionFileError) as err:  # not CacheFull (503, "try again"): the file is bad
            engine.restore(str(bad), "restored")
        assert err.value.status == 400 and "refused" in err.value.message
        assert engine.sessions() == before
        assert resident(engine) == {"a", "b"}
        assert engine.call(lambda core: sorted(core.free_seqs)) == []
        say(engine, "a", "Still fine?")


def test_new_session_gives_its_sequence_back_when_the_system_prompt_fails(tmp_path):
    with Engine(n_ctx=64, max_sessions=2, n_threads=2, sessions_dir=str(tmp_path)) as engine:
        for _ in range(4):
            with pytest.raises(KvsideError):
                engine.new_session(system="far too long " * 100)
        assert engine.sessions() == []
        a, b = engine.new_session(), engine.new_session()
        assert resident(engine) == {a, b}


def test_close_fails_work_waiting_behind_a_busy_session(tmp_path):
    engine = Engine(n_ctx=512, max_sessions=2, n_threads=2, sessions_dir=str(tmp_path)).start()
    name = engine.new_session()
    stream = engine.chat(name, "Write a long story.", max_tokens=400, ignore_eos=True, **GREEDY)
    next(iter(stream))  # generating now
    waiting = [engine.submit(lambda core: "ran", session=name) for _ in range(3)]
    time.sleep(0.2)
    assert not any(f.done() for f in waiting)
    closer = threading.Thread(target=engine.close)
    closer.start()
    for f in waiting:
        with pytest.raises(EngineClosed):
            f.result(timeout=30)
    closer.join(timeout=30)
    with pytest.raises(EngineClosed):
        stream.wait(timeout=5)


def test_close_reports_sessions_it_could_not_save(tmp_path):
    engine = Engine(n_ctx=256, max_sessions=2, n_threads=2, sessions_dir=str(tmp_path), persist=True).start()
    for name in ("kept", "blocked"):
        engine.new_session(name)
        say(engine, name, "Hello.")
    (tmp_path / "blocked.kvs").mkdir()  # a folder where the file must go: the save fails
    engine.close()
    assert len(engine.close_failures) == 1 and "blocked" in engine.close_failures[0]
    assert (tmp_path / "kept.kvs").is_file()


def test_an_auto_roll_that_fails_mid_reply_is_an_error_not_length(tmp_path, monkeypatch):
    real = edits.auto_roll

    def failing(core, s, need, protect):
        if s.busy:
            raise EditError("the disk is on fire")
        return real(core, s, need, protect)

    monkeypatch.setattr(edits, "auto_roll", failing)
    with Engine(n_ctx=96, max_sessions=1, n_threads=2, sessions_dir=str(tmp_path)) as engine:
        name = engine.new_session()
        stream = engine.chat(name, "Tell me everything about the sea.", max_tokens=500, ignore_eos=True, **GREEDY)
        with pytest.raises(EditError) as err:
            stream.wait(timeout=300)
        assert "disk is on fire" in err.value.message
        held = engine.messages(name)
        assert held[-1]["role"] == "assistant" and held[-1]["content"]  # the reply so far stays, consistently
        engine.check(name)


def test_a_damaged_document_index_is_an_error_not_an_empty_index(tmp_path, monkeypatch):
    monkeypatch.setenv("KVSIDE_HOME", str(tmp_path))
    assert compose.load_index() == {}
    (tmp_path / "blocks" / "index.json").write_text('{"a": ')
    with pytest.raises(compose.DocumentError) as err:
        compose.load_index()
    assert "damaged" in err.value.message
    (tmp_path / "blocks" / "index.json").write_text("[1, 2]")
    with pytest.raises(compose.DocumentError):
        compose.load_index()


@pytest.fixture(scope="module")
def exact(tmp_path_factory):
    """Flash attention off: a cache restored into other cells gives bit-identical logits."""
    with Engine(n_ctx=384, max_sessions=2, n_threads=2, exact=True,
                sessions_dir=str(tmp_path_factory.mktemp("exact"))) as e:
        yield e


def _state(engine, name):
    return engine.messages(name), engine.ledger(name), engine.next_logits(name)


def _assert_same(engine, name, before):
    messages, ledger, logits = before
    assert engine.messages(name) == messages
    got = engine.ledger(name)
    assert (got.pos, got.tok, got.msg, got.state) == (ledger.pos, ledger.tok, ledger.msg, ledger.state)
    assert np.array_equal(engine.next_logits(name), logits)
    engine.check(name)


@pytest.mark.parametrize("step", ["mask", "insert_messages"])
def test_compact_that_fails_midway_is_rolled_back(exact, monkeypatch, step):
    """A compaction masks the turns, then decodes the summary into their place: a failure at
    either step leaves the session as it was."""
    name = exact.new_session(system="You are brief.")
    for q in ("My cat is Tom.", "My dog is Rex.", "My bird is Kiwi."):
        say(exact, name, q)
    before = _state(exact, name)

    def failing(*args, **kwargs):
        raise EditError(f"{step} failed")

    monkeypatch.setattr(edits, step, failing)
    with pytest.raises(EditError):
        exact.compact(name, up_to=4, summary="Pets: Tom, Rex.")
    _assert_same(exact, name, before)


def test_restart_compaction_that_fails_mid_prefill_is_rolled_back(exact):
    name = exact.new_session(system="You are brief.")
    for q in ("The river is called Ume.", "The lake is called Siljan."):
        say(exact, name, q)
    before = _state(exact, name)

    def arm(core):
        real, calls = core.decode_steps, []

        def failing(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise EditError("decode failed")
            return real(*args, **kwargs)

        core.decode_steps = failing
        return real

    real = exact.call(arm)
    try:
        with pytest.raises(EditError):
            exact.compact(name, up_to=2, summary="Rivers and lakes.", mode="restart")
    finally:
        exact.call(lambda core: setattr(core, "decode_steps", real))
    _assert_same(exact, name, before)


def test_a_failed_mask_with_reprefill_fallback_failing_too_is_rolled_back(exact, monkeypatch):
    name = exact.new_session()
    for q in ("Alpha beta gamma.", "Delta epsilon."):
        say(exact, name, q)
    before = _state(exact, name)

    def failing_repair(*args, **kwargs):
        raise EditError("repair failed")

    def failing_reprefill(core, s, chunk=None):
        core.mem.clear_seq(s.seq)
        s.ledger.truncate(0)
        raise EditError("could not rebuild")
        yield  # a generator, like the real one

    monkeypatch.setattr(edits, "repair", failing_repair)
    monkeypatch.setattr(edits, "reprefill_steps", failing_reprefill)
    with pytest.raises(EditError):
        exact.mask(name, messages=[0], strategy="recompute:4", close_gap=True)
    _assert_same(exact, name, before)


def test_session_names_skip_saved_sessions_and_files(tmp_path):
    (tmp_path / "s1.kvs").write_bytes(b"someone's file")
    with Engine(n_ctx=128, max_sessions=2, n_threads=2, sessions_dir=str(tmp_path)) as engine:
        name = engine.new_session()
        assert name != "s1"
    assert (tmp_path / "s1.kvs").read_bytes() == b"someone's file"


def test_evicted_session_names_are_not_reused(tmp_path):
    with Engine(n_ctx=128, max_sessions=1, n_threads=2, sessions_dir=str(tmp_path), persist=True) as engine:
        first = engine.new_session()
        say(engine, first, "Keep me.")
    with Engine(n_ctx=128, max_sessions=1, n_threads=2, sessions_dir=str(tmp_path), persist=True) as engine:
        second = engine.new_session()
        assert second != first
        assert {r["name"] for r in engine.sessions()} == {first, second}


def test_a_session_too_large_to_copy_is_rebuilt_whole_on_roll_back(exact, monkeypatch):
    from kvside.engine import txn

    name = exact.new_session(system="You are brief.")
    for q in ("My cat is Tom.", "My dog is Rex."):
        say(exact, name, q)
    messages, ledger = exact.messages(name), exact.ledger(name)
    monkeypatch.setattr(txn, "SNAPSHOT_MAX_BYTES", 0)  # as for a long session of a large model
    monkeypatch.setattr(edits, "mask", lambda *a, **k: (_ for _ in ()).throw(EditError("mask failed")))
    with pytest.raises(EditError):
        exact.compact(name, up_to=2, summary="Pets.")
    assert exact.messages(name) == messages
    assert exact.ledger(name).tok == ledger.tok  # the same tokens, rebuilt densely
    exact.check(name)
    say(exact, name, "And my bird?")
