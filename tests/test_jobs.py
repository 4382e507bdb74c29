"""Long work (compile, re-prefill, summary, restore) advances a chunk at a time between decode steps:
another session's stream keeps getting tokens while it runs, and the work's result is the same."""

import threading
import time

import pytest

from conftest import GREEDY
from kvside.bench import corpus
from kvside.engine import Engine, compose
from kvside.engine.jobs import JOB_CHUNK
from kvside.errors import EngineClosed


def stream_beside(engine, session, work):
    """Stream in `session` while work() runs; returns (work's result, tokens that arrived during it)."""
    stamps = []
    stream = engine.chat(session, "Tell a long story about the sea.", max_tokens=2000, ignore_eos=True,
                         on_event=lambda ev: ev.kind == "text" and stamps.append(time.perf_counter()), **GREEDY)
    while len(stamps) < 3:
        time.sleep(0.01)
    t0 = time.perf_counter()
    result = work()
    t1 = time.perf_counter()
    stream.cancel()
    stream.wait()
    return result, sum(1 for t in stamps if t0 < t < t1)


@pytest.fixture
def engine(tmp_path, monkeypatch):
    monkeypatch.setenv("KVSIDE_HOME", str(tmp_path))  # compiled blocks go here
    with Engine(n_ctx=1024, max_sessions=3, n_threads=2, sessions_dir=str(tmp_path / "sessions")) as e:
        yield e


def test_a_compile_runs_between_the_tokens_of_another_stream(engine, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text(corpus.text()[:5000], encoding="utf-8")
    n_tokens = engine.call(lambda core: len(core.model.tokenize(doc.read_text(), add_special=False, parse_special=False)))
    assert n_tokens > 4 * JOB_CHUNK
    s = engine.new_session()
    report, during = stream_beside(engine, s, lambda: engine.compile(str(doc)))
    assert report["tokens"] == n_tokens and not report["reused"]
    # at least one token between every two chunks of the compile (run whole, none would come)
    assert during >= n_tokens // JOB_CHUNK - 1, during
    # the blocks are what a compile with nothing else running makes
    entry = compose.load_index()[compose.doc_key(doc)]
    assert sum(len(compose.sessionfile.read_header(compose.blocks_dir() / f, fmt=compose.BLOCK_FORMAT)
                   .header["tokens"]) for f in entry["blocks"]) == n_tokens


def test_a_reprefill_runs_between_the_tokens_of_another_stream(engine):
    busy = engine.new_session()
    context = engine.call(lambda core: corpus.tokens(core.model, 700))
    engine.call(lambda core: core.prefill(core.get(busy), [(0, context)]))
    s = engine.new_session()
    report, during = stream_beside(engine, s, lambda: engine.roll(busy, drop=1, keep=699, strategy="reprefill"))
    assert report["strategy"] == "reprefill" and report["recomputed"] == 699
    assert during >= 699 // JOB_CHUNK - 1, during
    engine.check(busy)
    assert engine.ledger(busy).tok == context[:699]


def test_work_for_a_session_in_a_job_waits_for_it(engine):
    busy = engine.new_session()
    engine.call(lambda core: core.prefill(core.get(busy), [(0, corpus.tokens(core.model, 600))]))
    order = []
    roll = threading.Thread(target=lambda: order.append(("roll", engine.roll(busy, drop=1, keep=599,
                                                                                strategy="reprefill")["recomputed"])))
    roll.start()
    while not engine.call(lambda core: core.jobs.active):  # until the roll runs as a job
        time.sleep(0.005)
    order.append(("ledger", len(engine.ledger(busy))))  # queued behind the job: sees its result
    roll.join()
    assert ("ledger", 599) in order and ("roll", 599) in order


def test_closing_the_engine_stops_a_job_and_rolls_its_session_back(tmp_path):
    engine = Engine(n_ctx=1024, max_sessions=2, n_threads=2, sessions_dir=str(tmp_path), persist=True).start()
    busy = engine.new_session("busy")
    engine.chat(busy, "Remember the number 51.", max_tokens=4, **GREEDY).wait()
    tokens = engine.ledger(busy).tok
    engine.call(lambda core: core.prefill(core.get(busy), [(99, corpus.tokens(core.model, 700)[1:])]))
    before = engine.ledger(busy).tok
    errors = []
    roll = threading.Thread(target=lambda: _catch(errors, lambda: engine.roll(busy, drop=1, keep=len(tokens),
                                                                              strategy="reprefill")))
    roll.start()
    time.sleep(0.3)  # the job is under way
    engine.close()
    roll.join()
    assert errors and isinstance(errors[0], EngineClosed)
    with Engine(n_ctx=1024, max_sessions=2, n_threads=2, sessions_dir=str(tmp_path), persist=True) as again:
        assert again.ledger("busy").tok == before  # saved as it was before the stopped roll


def _catch(errors, fn):
    try:
        fn()
    except Exception as exc:  # collected for the assertion
        errors.append(exc)
