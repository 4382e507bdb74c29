"""Session files: exact round trips, eviction, and every kind of bad file refused cleanly."""

import os

import msgpack
import numpy as np
import pytest

from conftest import GREEDY
from kvside import sessionfile
from kvside.engine import Engine, native
from kvside.errors import KvsideError
from kvside.sessionfile import SessionFileError, SessionSaveError


@pytest.fixture(scope="module")
def exact(tmp_path_factory):
    # flash attention off: restored cells land elsewhere in the cache, and only without it is
    # a row's result independent of where its cells sit (see EngineConfig.flash_attn)
    folder = tmp_path_factory.mktemp("sessions")
    with Engine(n_ctx=384, max_sessions=2, n_threads=2, exact=True, sessions_dir=str(folder)) as e:
        yield e


def edited_session(engine, name):
    engine.new_session(name, system="You are brief.")
    engine.chat(name, "My name is Ada and I like tea.", max_tokens=20, **GREEDY).wait()
    engine.chat(name, "What do I like?", max_tokens=12, **GREEDY).wait()
    engine.roll(name, 8, strategy="recompute:4")
    engine.mask(name, messages=[2], close_gap=False)
    return name


def test_save_restore_is_bit_identical_after_edits(exact, tmp_path):
    name = edited_session(exact, "ada")
    before = exact.next_logits(name)
    path = tmp_path / "ada.kvs"
    exact.save(name, str(path))
    copy = exact.restore(str(path), "ada-copy")
    np.testing.assert_array_equal(exact.next_logits(copy), before)
    assert exact.ledger(copy).to_dict() == exact.ledger(name).to_dict()
    assert exact.messages(copy) == exact.messages(name)
    exact.check(copy)
    exact.delete_session(copy)
    exact.delete_session(name)


def test_saved_roll_strategy_needs_what_it_named(exact, tmp_path):
    """A session saved with a native strategy and restored where the patch is not loaded rolls with
    shift and says so in its edit log, instead of failing its next chat."""
    name = exact.new_session("strat")
    exact.chat(name, "Hello.", max_tokens=4, **GREEDY).wait()
    path = tmp_path / "strat.kvs"
    exact.save(name, str(path))
    sessionfile.rewrite(path, path, roll_strategy="values:8")
    copy = exact.restore(str(path), "strat-copy")
    strategy = exact.call(lambda core: core.get(copy).roll_strategy)
    if native.available():
        assert strategy == "values:8"
    else:
        assert strategy == "shift"
        assert exact.edit_log(copy)[-1]["was"] == "values:8"
    for n in (name, copy):
        exact.delete_session(n)


def test_idle_session_is_evicted_and_comes_back_exactly(exact):
    name = edited_session(exact, "bob")
    before = exact.next_logits(name)
    others = [exact.new_session() for _ in range(2)]  # only 2 resident: bob goes to disk
    listing = {row["name"]: row for row in exact.sessions()}
    assert listing["bob"]["resident"] is False
    np.testing.assert_array_equal(exact.next_logits(name), before)  # restored on use
    exact.check(name)
    for o in others:
        exact.delete_session(o)
    exact.delete_session(name)


def test_sessions_survive_a_restart(tmp_path):
    folder = tmp_path / "persist"
    with Engine(n_ctx=256, max_sessions=1, n_threads=2, exact=True, sessions_dir=str(folder), persist=True) as e:
        e.new_session("keep")
        e.chat("keep", "Remember the word lantern.", max_tokens=10, **GREEDY).wait()
        before = e.next_logits("keep")
    with Engine(n_ctx=256, max_sessions=1, n_threads=2, exact=True, sessions_dir=str(folder), persist=True) as e:
        np.testing.assert_array_equal(e.next_logits("keep"), before)


def _saved(exact, tmp_path, name="victim"):
    edited_session(exact, name)
    path = tmp_path / f"{name}.kvs"
    exact.save(name, str(path))
    exact.delete_session(name)
    return path


def _rewrite_header(path, change):
    data = path.read_bytes()
    head_len = int.from_bytes(data[8:12], "little")
    header = msgpack.unpackb(data[12 : 12 + head_len], raw=False)
    change(header)
    packed = msgpack.packb(header, use_bin_type=True)
    path.write_bytes(data[:8] + len(packed).to_bytes(4, "little") + packed + data[12 + head_len :])


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: p.write_bytes(p.read_bytes()[:-100]), "truncated"),
        (lambda p: p.write_bytes(p.read_bytes()[:5]), "too short"),
        (lambda p: _flip(p, -5000), "checksum"),
        (lambda p: p.write_bytes(b"\x93\x01\x02\x03" * 100), "not a kvside session"),
        (lambda p: _rewrite_header(p, lambda h: h.update(version=99)), "newer kvside"),
        (lambda p: _rewrite_header(p, lambda h: h.update(state_len=2**60)), "truncated"),
        (lambda p: _rewrite_header(p, lambda h: h.update(extra=[-1])), "extra sections"),
        (lambda p: _rewrite_header(p, lambda h: h.update(extra=[10**9])), "truncated"),
        (lambda p: _resave(p, checkpoints=[{"n": 1, "key": b"0" * 16, "floor": 0}]), "checkpoint records do not match"),
        (lambda p: _resave(p, model_fingerprint="0" * 64), "another model"),
        (lambda p: _resave(p, type_k="q8_0"), "KV types"),
        (lambda p: _resave(p, ledger={"pos": [1, 0], "tok": [1, 2], "msg": [0, 0], "state": ["live", "live"]}), "damaged ledger"),
        (lambda p: p.write_bytes(b"KVSIDE\x00S" + (2**31).to_bytes(4, "little") + b"x" * 64), "truncated"),
        (lambda p: p.write_bytes(b"KVSIDE\x00S" + (20).to_bytes(4, "little") + b"\xc1" * 20 + b"y" * 40), "damaged header"),
    ],
)
def test_bad_files_are_refused_and_nothing_changes(exact, tmp_path, damage, message):
    path = _saved(exact, tmp_path)
    damage(path)
    other = exact.new_session("bystander")
    before = exact.sessions()
    with pytest.raises(KvsideError, match=message):
        exact.restore(str(path), "victim2")
    assert exact.sessions() == before
    exact.check(other)
    exact.delete_session(other)


def _resave(path, **changes):
    """A well-formed, correctly checksummed file whose header says something else."""
    sessionfile.rewrite(path, path, **changes)


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_file_of_the_first_format_version_is_read(exact, tmp_path):
    """Version 1 files (no extra sections after the state) restore as they did."""
    import hashlib

    name = edited_session(exact, "v1")
    before = exact.next_logits(name)
    path = tmp_path / "v1.kvs"
    exact.save(name, str(path))
    data = path.read_bytes()
    head_len = int.from_bytes(data[8:12], "little")
    header = msgpack.unpackb(data[12 : 12 + head_len], raw=False)
    assert header["version"] == 2 and header["extra"] == []
    header["version"] = 1
    del header["extra"]
    packed = msgpack.packb(header, use_bin_type=True)
    state = data[12 + head_len : -32]
    path.write_bytes(data[:8] + len(packed).to_bytes(4, "little") + packed + state + hashlib.sha256(packed + state).digest())
    copy = exact.restore(str(path), "v1-copy")
    np.testing.assert_array_equal(exact.next_logits(copy), before)
    exact.delete_session(copy)
    exact.delete_session(name)


def test_checksum_covers_the_header(exact, tmp_path):
    path = _saved(exact, tmp_path)
    data = bytearray(path.read_bytes())
    data[40] ^= 0x01  # inside the msgpack header
    path.write_bytes(bytes(data))
    with pytest.raises(SessionFileError):
        sessionfile.read_header(path)


def test_interrupted_save_leaves_the_old_file(exact, tmp_path, monkeypatch):
    name = edited_session(exact, "carol")
    path = tmp_path / "carol.kvs"
    exact.save(name, str(path))
    good = path.read_bytes()
    injected = []
    real_fdopen = os.fdopen

    def failing_fdopen(fd, mode="r", *args, **kwargs):
        f = real_fdopen(fd, mode, *args, **kwargs)
        if "w" in mode:
            orig = f.write

            def write(chunk):
                if len(injected) >= 2:
                    raise OSError(28, "No space left on device")
                injected.append(len(chunk))
                return orig(chunk)

            f.write = write
        return f

    monkeypatch.setattr(os, "fdopen", failing_fdopen)
    with pytest.raises(SessionSaveError, match="No space left"):
        exact.save(name, str(path))
    monkeypatch.undo()
    assert len(injected) == 2  # the disk filled up mid-file, after the header
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["carol.kvs"]  # no temporary file left
    exact.delete_session(name)


def test_eviction_is_exact_with_default_kernels(tmp_path):
    """With llama.cpp's default (flash) attention a result depends on where cells sit; a session
    whose cells were not rearranged by edits comes back into the same cells, bit-identical.
    (Edited sessions need exact=True for that, as the tests above use.)"""
    with Engine(n_ctx=256, max_sessions=1, n_threads=2, sessions_dir=str(tmp_path)) as e:
        e.new_session("idle")
        e.chat("idle", "Name a mountain.", max_tokens=12, **GREEDY).wait()
        before = e.next_logits("idle")
        e.evict("idle")
        assert {r["name"]: r["resident"] for r in e.sessions()}["idle"] is False
        np.testing.assert_array_equal(e.next_logits("idle"), before)
        e.check("idle")
