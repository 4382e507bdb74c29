"""Context checkpoints on caches that cannot go back (tiny random-weight GGUFs, tinygguf.py): a
sliding window (gemma3, five of six layers keep the last 32 positions), a recurrent state (mamba)
and a hybrid (lfm2: recurrent short-convolution layers beside an attention layer, whose cells are
cut after the checkpoint's position). A client that regenerates a reply or rewrites its last message sends a history that goes
back before what such a cache still holds; kvside restores the checkpoint it took at that message
boundary and reads only from there, where without checkpoints it reads the whole session again.
Either way the session's next-token logits equal a fresh prefill of the client's messages."""

from __future__ import annotations

import numpy as np
import pytest

from kvside.engine import Engine
from kvside.errors import KvsideError
from test_families import GREEDY, WINDOW, conversation, prefilled, probe_tokens
from tinygguf import write

CACHES = ("gemma3", "mamba", "lfm2")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-ckpt")
    return {arch: write(arch, folder / f"tiny-{arch}.gguf", window=WINDOW) for arch in CACHES}


@pytest.fixture(scope="module", params=[(a, n) for a in CACHES for n in (8, 0)],
                ids=[f"{a}-{'checkpoints' if n else 'none'}" for a in CACHES for n in (8, 0)])
def engine(request, models):
    arch, n = request.param
    # the window's layers at the window's size: llama.cpp reuses their cells as soon as a
    # sequence has moved past them (at full size, only once the head wraps around the cache)
    with Engine(model=str(models[arch]), n_ctx=512, max_sessions=3, n_threads=2, exact=True, checkpoints=n,
                swa_full=False) as e:
        e.arch, e.n_checkpoints = arch, n
        yield e


def bound(engine, messages, session, max_tokens=2):
    events = []
    done = engine.bind_chat(messages, session=session, max_tokens=max_tokens, on_event=events.append, **GREEDY).wait()
    return done, next(e.data for e in events if e.kind == "bound")


def assert_equals_fresh_prefill(engine, name, messages):
    """The session holds the client's messages (and the reply), its cache equals its ledger, and
    its next-token logits equal a fresh read of its tokens (within batch-layout rounding)."""
    engine.check(name)
    live = [(m["role"], m["content"]) for m in engine.messages(name) if m["state"] == "live"]
    assert live[:-1] == [(m["role"], m["content"]) for m in messages] and live[-1][0] == "assistant"
    held = engine.ledger(name)
    fresh = prefilled(engine, held.tok)
    try:
        if engine.arch == "gemma3":
            # the windowed layers hold every position of the window, with a fresh read's keys (a
            # cut that went back without the checkpoint finds some of them overwritten)
            (pos, keys), (want_pos, want_keys) = window(engine, name), window(engine, fresh)
            assert pos == want_pos and len(pos) == WINDOW
            for got_k, want_k in zip(keys, want_keys):
                np.testing.assert_allclose(got_k, want_k, atol=1e-2)
        probe = probe_tokens(engine)
        got, want = engine.next_logits(name, probe, all_logits=True), engine.next_logits(fresh, probe, all_logits=True)
        assert (got.argmax(1) == want.argmax(1)).all()
        np.testing.assert_allclose(got, want, atol=1e-2)
    finally:
        engine.delete_session(fresh)


def churn(engine) -> None:
    """Another session reads a long prompt: on a sliding window its cells take the place of cells
    the first session's window has left behind (llama.cpp frees those), so going back without the
    checkpoint would find them gone."""
    for _ in range(3):
        engine.delete_session(prefilled(engine, probe_tokens(engine) * 150))


def window(engine, name) -> tuple[list[int], list[np.ndarray]]:
    """The positions and keys a session's sliding-window layers hold (its partial state)."""
    import ctypes

    from kvside._llama import lib
    from kvside.engine import checkpoints, kvstate

    def read(core):
        seq = core.get(name).seq
        size = lib.llama_state_seq_get_size_ext(core.ctx, seq, checkpoints.PARTIAL_ONLY)
        blob = (ctypes.c_uint8 * size)()
        lib.llama_state_seq_get_data_ext(core.ctx, blob, size, seq, checkpoints.PARTIAL_ONLY)
        kv = kvstate.parse(blob, values=False).by_position()
        return kv.pos.tolist(), kv.k

    return engine.call(read)


def cells_before_last(engine, name, k: int) -> int:
    """The session's cells before its last k messages."""
    msg = engine.ledger(name).msg
    last = sorted(set(msg))[-k:]
    return sum(1 for m in msg if m not in last)


def restored_cells(engine, name) -> int:
    return sum(e.get("from_checkpoint", 0) for e in engine.edit_log(name) if e["edit"] in ("rebuilt", "mask"))


def test_a_regenerated_reply_goes_back_to_the_checkpoint_before_it(engine):
    name = engine.new_session(system="")
    try:
        history = conversation(3) + [{"role": "user", "content": "hello"}]
        first, _ = bound(engine, history, name, max_tokens=6)
        churn(engine)
        again, note = bound(engine, history, name)  # the client asks for another answer
        assert note.get("dropped_messages"), note
        if engine.n_checkpoints:
            # everything up to the reply came back from the checkpoint taken there: only the
            # generation prompt is read
            assert again.usage.cached_tokens == cells_before_last(engine, name, 1) == restored_cells(engine, name) > 0
        else:
            assert again.usage.cached_tokens == 0 and restored_cells(engine, name) == 0
        assert again.usage.prompt_tokens == first.usage.prompt_tokens
        assert_equals_fresh_prefill(engine, name, history)
    finally:
        engine.delete_session(name)


def test_a_rewritten_last_message_goes_back_to_the_checkpoint_before_it(engine):
    name = engine.new_session(system="")
    try:
        history = conversation(3) + [{"role": "user", "content": "hello"}]
        reply, _ = bound(engine, history, name, max_tokens=6)
        turn = history + [{"role": "assistant", "content": reply.text}, {"role": "user", "content": "and the world"}]
        bound(engine, turn, name, max_tokens=6)
        churn(engine)
        before_last = cells_before_last(engine, name, 2)
        edited = turn[:-1] + [{"role": "user", "content": "and the capital of the world of France"}]
        done, note = bound(engine, edited, name)
        assert note.get("dropped_messages") or note.get("edited_messages"), note
        if engine.n_checkpoints:
            assert done.usage.cached_tokens >= before_last > 0
        else:
            assert done.usage.cached_tokens == 0
        assert_equals_fresh_prefill(engine, name, edited)
    finally:
        engine.delete_session(name)


def test_checkpoints_are_kept_few_the_first_and_the_latest(engine):
    if not engine.n_checkpoints:
        pytest.skip("with checkpoints")
    name = engine.new_session(system="")
    try:
        history = conversation(1)
        for i in range(8):
            history.append({"role": "user", "content": f"turn {i}: the world of Paris and the capital {i}"})
            reply, _ = bound(engine, history, name, max_tokens=3)
            history.append({"role": "assistant", "content": reply.text})
        row = next(r for r in engine.sessions() if r["name"] == name)
        marks = row["checkpoints"]
        assert 2 <= len(marks) <= engine.n_checkpoints and marks == sorted(marks)
        assert marks[-1] > len(engine.ledger(name)) - 40  # the latest turn's
        # a fork starts with its parent's checkpoints: its own edits go back as cheaply
        child = engine.fork(name)
        assert next(r for r in engine.sessions() if r["name"] == child)["checkpoints"] == marks
        engine.delete_session(child)
    finally:
        engine.delete_session(name)


def test_plain_attention_takes_no_checkpoints(tmp_path):
    path = write("llama", tmp_path / "tiny-llama.gguf", window=WINDOW)
    with Engine(model=str(path), n_ctx=512, max_sessions=2, n_threads=2, exact=True) as e:
        name = e.new_session(system="")
        e.bind_chat(conversation(2) + [{"role": "user", "content": "hello"}], session=name, max_tokens=2, **GREEDY).wait()
        assert next(r for r in e.sessions() if r["name"] == name)["checkpoints"] == []


def test_every_edit_works_on_a_window_sized_cache(engine):
    """At the window's size an iSWA cache cannot shift (llama.cpp shifts only when both parts have
    one size): a roll and a closed mask read again, from the checkpoint before the first change
    where one applies; the session stays equal to its ledger and answers."""
    if engine.arch != "gemma3" or not engine.n_checkpoints:
        pytest.skip("the window-sized sliding-window cache")
    name = engine.new_session(system="")
    try:
        history = conversation(4) + [{"role": "user", "content": "hello"}]
        bound(engine, history, name, max_tokens=3)
        report = engine.roll(name, drop=40)
        assert "cannot shift" in report["fallback"]
        engine.check(name)
        engine.chat(name, "what is the capital", max_tokens=3, **GREEDY).wait()
        ids = [m["id"] for m in engine.messages(name) if m["role"] == "user" and m["state"] == "live"]
        engine.mask(name, messages=[ids[-2]])
        engine.check(name)
        child = engine.fork(name)
        engine.chat(child, "and the world", max_tokens=3, **GREEDY).wait()
        engine.check(child)
        engine.delete_session(child)
        engine.evict(name)
        engine.chat(name, "hello again", max_tokens=3, **GREEDY).wait()
        engine.check(name)
    finally:
        engine.delete_session(name)


def test_checkpoints_go_to_disk_with_the_session(engine):
    """An idle session sent to disk comes back with its checkpoints: a regenerated reply still goes
    back to the one before it instead of reading the whole session again."""
    name = engine.new_session(system="")
    try:
        history = conversation(3) + [{"role": "user", "content": "hello"}]
        first, _ = bound(engine, history, name, max_tokens=6)
        marks = next(r for r in engine.sessions() if r["name"] == name)["checkpoints"]
        engine.evict(name)
        churn(engine)
        again, note = bound(engine, history, name)
        assert note.get("dropped_messages"), note
        if engine.n_checkpoints:
            assert len(marks) >= 2
            assert again.usage.cached_tokens == cells_before_last(engine, name, 1) == restored_cells(engine, name) > 0
        else:
            assert marks == [] and again.usage.cached_tokens == 0
        assert_equals_fresh_prefill(engine, name, history)
    finally:
        engine.delete_session(name)


def test_a_damaged_checkpoint_record_refuses_the_file(engine, tmp_path):
    if not engine.n_checkpoints:
        pytest.skip("with checkpoints")
    import hashlib

    import msgpack

    name = engine.new_session(system="")
    try:
        bound(engine, conversation(2) + [{"role": "user", "content": "hello"}], name, max_tokens=3)
        path = tmp_path / "s.kvs"
        engine.save(name, str(path))
        data = path.read_bytes()
        head_len = int.from_bytes(data[8:12], "little")
        header = msgpack.unpackb(data[12 : 12 + head_len], raw=False)
        assert len(header["checkpoints"]) == len(header["extra"]) >= 2
        header["checkpoints"][0]["key"] = b"short"
        packed = msgpack.packb(header, use_bin_type=True)
        body = data[12 + head_len : -32]
        path.write_bytes(data[:8] + len(packed).to_bytes(4, "little") + packed + body
                         + hashlib.sha256(packed + body).digest())
        with pytest.raises(KvsideError, match="checkpoint record is damaged"):
            engine.restore(str(path), "copy")
        assert "copy" not in [r["name"] for r in engine.sessions()]
    finally:
        engine.delete_session(name)


def test_a_file_keeps_at_most_the_checkpoints_the_engine_keeps(models, tmp_path):
    """Restored where fewer checkpoints are kept: the first and the latest, as take() keeps them;
    none where checkpoints are off."""
    path = tmp_path / "many.kvs"

    def engine(n):
        return Engine(model=str(models["gemma3"]), n_ctx=512, max_sessions=2, n_threads=2, exact=True,
                      checkpoints=n, swa_full=False)

    def marks(e, name):
        return next(r for r in e.sessions() if r["name"] == name)["checkpoints"]

    with engine(8) as e:
        name = e.new_session(system="")
        bound(e, conversation(3) + [{"role": "user", "content": "hello"}], name, max_tokens=4)
        saved = marks(e, name)
        e.save(name, str(path))
    assert len(saved) >= 3
    for n, want in [(8, saved), (2, [saved[0], saved[-1]]), (1, saved[-1:]), (0, [])]:
        with engine(n) as e:
            assert marks(e, e.restore(str(path))) == want, n
