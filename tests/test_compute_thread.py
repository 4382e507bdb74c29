"""One thread runs llama.cpp's compute for every engine in a process (kvside/engine/compute.py):
libgomp keeps an OpenMP pool per computing thread, and with more pool threads than cores every
decode slows down."""

import threading

import pytest

from conftest import GREEDY
from kvside.engine import Engine, compute
from kvside.engine import core as core_module

PROMPT = "Name three colours."


@pytest.fixture
def decode_threads(monkeypatch):
    """The thread of every llama_decode an engine runs during the test."""
    seen: list[int] = []
    real = core_module.lib.llama_decode

    def spy(ctx, batch):
        seen.append(threading.get_ident())
        return real(ctx, batch)

    monkeypatch.setattr(core_module.lib, "llama_decode", spy)
    monkeypatch.setattr(compute, "_owner", None)  # engines of other tests stay out of this one's count
    return seen


def _new_engine() -> Engine:
    return Engine(n_ctx=256, max_sessions=2, n_threads=2).start()


def test_two_engines_decode_on_one_thread_and_answer_as_they_would_alone(decode_threads):
    a, b = _new_engine(), _new_engine()
    try:
        # at the same time: b's decodes run on a's thread, between a's own steps
        sa = a.chat(a.new_session(), PROMPT, max_tokens=12, **GREEDY)
        sb = b.chat(b.new_session(), PROMPT, max_tokens=12, **GREEDY)
        ta, tb = sa.wait(120).text, sb.wait(120).text
        assert ta and ta == tb
        assert len(decode_threads) >= 2 * 12
        assert len(set(decode_threads)) == 1
        assert a._thread.ident in decode_threads or b._thread.ident in decode_threads
    finally:
        a.close()
        b.close()


def test_when_the_computing_engine_closes_another_takes_over(decode_threads):
    a, b = _new_engine(), _new_engine()
    try:
        first = a.chat(a.new_session(), PROMPT, max_tokens=8, **GREEDY).wait(120).text
        assert b.chat(b.new_session(), PROMPT, max_tokens=8, **GREEDY).wait(120).text == first
        assert set(decode_threads) == {a._thread.ident}
        a.close()
        decode_threads.clear()
        assert b.chat(b.new_session(), PROMPT, max_tokens=8, **GREEDY).wait(120).text == first
        assert set(decode_threads) == {b._thread.ident}
    finally:
        a.close()
        b.close()
