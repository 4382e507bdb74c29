"""Clients with the same system prompt (or a template's default system block) share one copy of its
cells: a new conversation starts from the resident session whose cache begins with the same tokens.
Shared cells have one position and one KV for every sequence that holds them, so an edit that would
move or rewrite them first gives its session copies of its own: the other session never changes."""

import threading

import numpy as np
import pytest

from conftest import GREEDY
from kvside.engine import Engine

SYSTEM = ("You are the build assistant of a large repository. Answer in one short sentence, name files "
          "exactly, and never invent a command that the repository does not have. ") * 2
PROBE = [198, 504, 260]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    with Engine(n_ctx=512, max_sessions=3, n_threads=2, exact=True,
                sessions_dir=str(tmp_path_factory.mktemp("sessions"))) as e:
        yield e


def ask(engine, messages, **params):
    done = threading.Event()
    events = []

    def on(ev):
        events.append(ev)
        if ev.kind in ("done", "error"):
            done.set()

    stream = engine.bind_chat(messages, on_event=on, **{**GREEDY, "max_tokens": 6, **params})
    assert done.wait(120)
    errors = [e.data["error"] for e in events if e.kind == "error"]
    if errors:
        raise errors[0]
    return next(e.data for e in events if e.kind == "bound"), stream.completion


def chat(question):
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


def shared_map(engine):
    return engine.call(lambda core: dict(core.mem.shared))


def test_a_new_conversation_shares_the_system_prompt_and_answers_as_if_read(engine):
    first, _ = ask(engine, chat("Where is the Makefile?"))
    assert "shared_tokens" not in first
    second, done = ask(engine, chat("How do I run the tests?"))
    assert second["session"] != first["session"] and second["shared_from"] == first["session"]
    n_system = engine.call(lambda core: len(core.model.tokenize(SYSTEM)))
    assert second["shared_tokens"] >= n_system
    assert done.usage.cached_tokens == second["shared_tokens"]
    engine.check(second["session"])
    engine.check(first["session"])
    # the same request read whole, in an engine that shares nothing
    with Engine(n_ctx=512, max_sessions=1, n_threads=2, exact=True) as fresh:
        _, alone = ask(fresh, chat("How do I run the tests?"))
    assert done.text == alone.text


def test_editing_shared_cells_gives_the_session_its_own_copy(tmp_path):
    """Rolling a session whose first cells another session shares gives it copies of its own first:
    the other session's cells stay byte for byte as they were (without the copy, the roll moves the
    shared cells under it: its logits measured 1.0 off)."""
    with Engine(n_ctx=512, max_sessions=3, n_threads=2, exact=True, sessions_dir=str(tmp_path)) as engine:
        a, _ = ask(engine, chat("What does make chat do?"))
        b, _ = ask(engine, chat("What does make peer do?"))
        assert b.get("shared_from") == a["session"]
        def cells_of_a(core):
            core.settle()
            return bytes(core.seq_state(core.get(a["session"]).seq))

        held = engine.call(cells_of_a)
        before = engine.next_logits(a["session"], PROBE, all_logits=True)
        # roll b from the very front: its shared cells would move, so it gets its own first
        engine.roll(b["session"], drop=8, keep=0, strategy="shift")
        engine.check(b["session"])
        assert engine.call(lambda core: core.get(b["session"]).seq) not in shared_map(engine)
        # a's cells are untouched: positions, keys and values byte for byte
        assert engine.call(cells_of_a) == held
        after = engine.next_logits(a["session"], PROBE, all_logits=True)
        # and the answers read from them agree: the probe's own cells may land elsewhere, which
        # some CPUs' kernels round differently (bit-identical on one machine, up to 0.5 in the
        # probe's third row on another)
        assert (before.argmax(1) == after.argmax(1)).all()
        cos = (before * after).sum(1) / np.linalg.norm(before, axis=1) / np.linalg.norm(after, axis=1)
        assert cos.min() > 0.999
        engine.check(a["session"])


def test_deleting_the_source_leaves_the_sharer_whole(engine):
    a, _ = ask(engine, chat("Which file holds the version?"))
    b, _ = ask(engine, chat("Which file lists the dependencies?"))
    assert b.get("shared_from") == a["session"]
    before = engine.next_logits(b["session"], PROBE, all_logits=True)
    engine.delete_session(a["session"])
    assert np.array_equal(before, engine.next_logits(b["session"], PROBE, all_logits=True))
    engine.check(b["session"])


def test_with_one_resident_session_the_prefix_survives_the_sources_eviction(tmp_path):
    with Engine(n_ctx=512, max_sessions=1, n_threads=2, exact=True, sessions_dir=str(tmp_path)) as e:
        a, _ = ask(e, chat("Where do the tests live?"))
        b, done = ask(e, chat("Where do the docs live?"))
        assert b["shared_from"] == a["session"] and done.usage.cached_tokens == b["shared_tokens"]
        assert a["session"] not in {s["name"] for s in e.sessions() if s.get("resident")}
        e.check(b["session"])
        with Engine(n_ctx=512, max_sessions=1, n_threads=2, exact=True) as fresh:
            _, alone = ask(fresh, chat("Where do the docs live?"))
        assert done.text == alone.text


def test_a_new_conversation_shares_the_prefix_of_a_saved_session(tmp_path):
    """Agent CLIs (Claude Code, Cline) start every task as a new conversation behind the same long
    system prompt and tools. Once the session holding them was on disk (after a restart, or sent
    there to make room), a new task read them all again: Claude Code's 18.7k tokens took 347 s on a
    2-core CPU. Now the saved session is brought back and its prefix shared."""
    long_chat = lambda q: [{"role": "system", "content": SYSTEM * 6}, {"role": "user", "content": q}]  # noqa: E731
    with Engine(n_ctx=1024, max_sessions=2, n_threads=2, exact=True, persist=True, sessions_dir=str(tmp_path)) as e:
        first = e.bind_chat(long_chat("Where is the Makefile?"), max_tokens=4, **GREEDY).wait()
    with Engine(n_ctx=1024, max_sessions=2, n_threads=2, exact=True, persist=True, sessions_dir=str(tmp_path)) as e:
        assert e.call(lambda core: first.session not in core.sessions)  # on disk after the restart
        second, done = ask(e, long_chat("How do I run the tests?"))
        assert second["session"] != first.session and second["shared_from"] == first.session
        n_system = e.call(lambda core: len(core.model.tokenize(SYSTEM * 6)))
        assert n_system >= 256 and second["shared_tokens"] >= n_system
        assert done.usage.cached_tokens == second["shared_tokens"]
        assert e.call(lambda core: core.costs.restore_s is not None)  # what bringing it back cost: measured
        e.check(second["session"])
        e.check(first.session)
        # a short shared run is read instead: bringing back a whole file is not worth it for it
        short, _ = ask(e, [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi."}])
        assert "shared_from" not in short
    with Engine(n_ctx=1024, max_sessions=1, n_threads=2, exact=True) as fresh:
        _, alone = ask(fresh, long_chat("How do I run the tests?"))
    assert done.text == alone.text


def test_a_damaged_saved_session_is_read_past_not_shared(tmp_path):
    """A saved session whose file was damaged since is not brought back: the new conversation is
    read in full and answered, and the file stays for `kvside sessions` to report."""
    long_chat = lambda q: [{"role": "system", "content": SYSTEM * 6}, {"role": "user", "content": q}]  # noqa: E731
    with Engine(n_ctx=1024, max_sessions=2, n_threads=2, exact=True, persist=True, sessions_dir=str(tmp_path)) as e:
        first = e.bind_chat(long_chat("Where is the Makefile?"), max_tokens=4, **GREEDY).wait()
    path = tmp_path / f"{first.session}.kvs"
    data = bytearray(path.read_bytes())
    data[-64:] = bytes(b ^ 0xFF for b in data[-64:])  # cells damaged, header whole: found at start
    path.write_bytes(bytes(data))
    with Engine(n_ctx=1024, max_sessions=2, n_threads=2, exact=True, persist=True, sessions_dir=str(tmp_path)) as e:
        bound, done = ask(e, long_chat("How do I run the tests?"))
        assert "shared_from" not in bound and done.usage.cached_tokens == 0 and done.text
        assert e.call(lambda core: first.session not in core.auto_saved)  # not tried again
        e.check(bound["session"])
    assert path.exists()


def test_once_measured_a_saved_session_is_brought_back_only_when_reading_would_cost_more(tmp_path):
    """With the engine's decode rates and a restore measured, the choice is made in seconds: a
    restore measured slow (1 s a cell) is not worth a prefix of a few hundred tokens; a fast one is."""
    long_chat = lambda q: [{"role": "system", "content": SYSTEM * 6}, {"role": "user", "content": q}]  # noqa: E731
    opts = dict(n_ctx=1024, max_sessions=2, n_threads=2, exact=True, persist=True, sessions_dir=str(tmp_path))
    with Engine(**opts) as e:
        e.bind_chat(long_chat("Where is the Makefile?"), max_tokens=4, **GREEDY).wait()
    for restore_s, shares in ((1.0, False), (1e-9, True)):
        with Engine(**opts) as e:
            ask(e, [{"role": "user", "content": "Count to three."}])  # the engine measures its decodes
            e.call(lambda core: setattr(core.costs, "restore_s", restore_s))
            # a question of its own each time: the same one again would continue the session
            # the first time saved (another reply to its last message)
            bound, done = ask(e, long_chat(f"How do I run the tests in {'CI' if shares else 'a container'}?"))
            assert ("shared_from" in bound) == shares, restore_s
            assert done.usage.cached_tokens == bound.get("shared_tokens", 0)
