"""Text prompts bound to the cells an earlier prompt left: the common prefix exactly, runs found
again after a change moved into place, the tokens between them decoded into the holes; after every
request the ledger equals the cache and holds exactly the client's prompt."""

import time

import numpy as np
import pytest

from conftest import GREEDY
from kvside.bench import corpus
from kvside.engine import Engine, textreuse
from kvside.errors import InvalidRequest

PROBE = [198, 504, 260, 1115]


def test_plan_keeps_the_prefix_and_finds_runs_again_in_order():
    held = list(range(100))
    prompt = [0, 1, 2, 900, 901] + list(range(50, 80)) + [902] + list(range(10, 40))
    p = textreuse.plan(held, prompt, min_chunk=16)
    assert p.prefix == 3
    # 50..79 is found; 10..39 comes before it in what is held, so it cannot follow it: not reused
    assert p.runs == [(0, 0, 3), (50, 5, 30)]
    assert p.reused == 33
    assert textreuse.plan(held, prompt, min_chunk=31).runs == [(0, 0, 3)]
    assert textreuse.plan(held, prompt, min_chunk=0).runs == [(0, 0, 3)]
    assert textreuse.plan([], prompt, 16).runs == []
    assert textreuse.plan(held, [], 16).runs == []


def test_plan_takes_the_longest_run_among_repeated_anchors():
    line = list(range(500, 508))
    held = line + [1] * 20 + line + list(range(600, 640))
    prompt = [7] + line + list(range(600, 640))
    p = textreuse.plan(held, prompt, min_chunk=16)
    assert p.runs == [(28, 1, 48)]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    with Engine(n_ctx=1024, max_sessions=3, n_threads=2, exact=True, reuse_repair=0,
                sessions_dir=str(tmp_path_factory.mktemp("sessions"))) as e:
        yield e


def complete(engine, tokens, reuse=True, **params):
    events = []
    stream = engine.bind_text(tokens=lambda core: list(tokens), on_event=events.append, reuse=reuse,
                              **{**GREEDY, "max_tokens": 1, **params})
    deadline = time.time() + 120
    while not stream.done and time.time() < deadline:
        time.sleep(0.01)
    assert stream.done
    errors = [e.data["error"] for e in events if e.kind == "error"]
    if errors:
        raise errors[0]
    return next(e.data for e in events if e.kind == "bound"), stream.completion


def chunks(engine):
    text = engine.call(lambda core: corpus.tokens(core.model, 600))
    bos = engine.call(lambda core: core.model.bos)
    return bos, [text[i * 100:(i + 1) * 100] for i in range(6)]


def fresh_logits(engine, tokens):
    name = engine.new_session(system="")
    try:
        engine.call(lambda core: core.prefill(core.get(name), [(0, list(tokens))]))
        return engine.next_logits(name, PROBE, all_logits=True)
    finally:
        engine.delete_session(name)


def close(got: np.ndarray, want: np.ndarray) -> None:
    """Equal up to the rounding of attention sums over another cell layout and batch split (up to
    ~0.7 on this model): the same top token wherever the reference's top two are further apart
    than that, and near in value."""
    top2 = np.sort(want, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1.0
    assert (got.argmax(1) == want.argmax(1))[clear].all()
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() > 0.995 and np.abs(got - want).max() < 1.5


def test_a_changed_prompt_reuses_its_prefix_and_moved_runs(engine):
    bos, c = chunks(engine)
    first = [bos] + c[0] + c[1] + c[2] + c[3]
    note, _ = complete(engine, first)
    assert note["cached_tokens"] == 0
    name = note["session"]
    # a chunk dropped from the middle, a new one inserted after the next, the tail kept
    second = [bos] + c[0] + c[2] + c[4][:37] + c[3]
    note, done = complete(engine, second)
    assert note["session"] == name
    assert note["prefix_tokens"] == 101
    # the prompt ends inside the last run: its last token is read again for the logits
    assert note["moved_runs"] == 2 and note["moved_tokens"] == 199
    assert note["inserted_tokens"] == 37
    assert done.usage.prompt_tokens == len(second)
    assert done.usage.cached_tokens == 300  # the inserted tokens were computed for this request
    engine.check(name)
    ledger = engine.ledger(name)
    assert ledger.tok == second and ledger.pos == list(range(len(second)))
    # the moved cells keep the KV they had after the old context; the next tokens stay close to a
    # fresh prefill's (same top token), nothing like the logits of the unedited cache
    got = engine.next_logits(name, PROBE, all_logits=True)
    want = fresh_logits(engine, second)
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.75
    stale = fresh_logits(engine, first)
    assert np.abs(got - want).mean() < np.abs(stale - want).mean()


def test_prefix_only_reuse_equals_a_fresh_prefill(engine):
    bos, c = chunks(engine)
    engine.call(lambda core: setattr(core.config, "reuse_chunk", 0))
    try:
        note, _ = complete(engine, [bos] + c[5] + c[1])
        note, _ = complete(engine, [bos] + c[5] + c[2])
        assert note["prefix_tokens"] == 101 and note["moved_runs"] == 0
        got = engine.next_logits(note["session"], PROBE, all_logits=True)
        want = fresh_logits(engine, [bos] + c[5] + c[2])
        close(got, want)
    finally:
        engine.call(lambda core: setattr(core.config, "reuse_chunk", 64))


def test_the_same_prompt_twice_reads_one_token_and_answers_the_same(engine):
    bos, c = chunks(engine)
    prompt = [bos] + c[3] + c[4]
    _, first = complete(engine, prompt, max_tokens=6)
    note, again = complete(engine, prompt, max_tokens=6)
    assert note["cached_tokens"] == len(prompt) - 1
    assert again.text == first.text


def test_each_file_keeps_its_own_cache(engine):
    bos, c = chunks(engine)
    a, b = [bos] + c[0] + c[1], [bos] + c[4] + c[5]
    na, _ = complete(engine, a)
    nb, _ = complete(engine, b)
    assert na["session"] != nb["session"]
    na2, _ = complete(engine, a + c[2][:10])
    nb2, _ = complete(engine, b + c[2][:10])
    assert (na2["session"], nb2["session"]) == (na["session"], nb["session"])
    assert na2["cached_tokens"] == len(a) and nb2["cached_tokens"] == len(b)


def test_text_caches_are_dropped_not_saved_when_room_is_needed(engine, tmp_path):
    bos, c = chunks(engine)
    for i in range(5):  # more distinct prompts than resident sessions
        complete(engine, [bos] + c[i][::-1] + c[(i + 1) % 6])
    folder = engine.call(lambda core: core.sessions_dir)
    assert not list(folder.glob("text-*"))
    assert len([s for s in engine.sessions() if s["name"].startswith("text-")]) <= 3


def test_without_reuse_every_prompt_is_read_whole_and_leaves_nothing(engine):
    bos, c = chunks(engine)
    before = {s["name"] for s in engine.sessions()}
    complete(engine, [bos] + c[0], reuse=False)
    note, done = complete(engine, [bos] + c[0], reuse=False)
    assert done.usage.cached_tokens == 0
    assert {s["name"] for s in engine.sessions()} <= before  # (making room may drop a text cache)


def test_a_prompt_over_the_window_is_refused_before_any_cache_changes(engine):
    bos, c = chunks(engine)
    note, _ = complete(engine, [bos] + c[1] + c[2])
    held = engine.ledger(note["session"]).tok
    with pytest.raises(InvalidRequest, match="window"):
        complete(engine, [bos] + c[1] * 11)
    assert engine.ledger(note["session"]).tok == held


def test_repair_computes_each_moved_runs_first_tokens_again(engine):
    bos, c = chunks(engine)
    engine.call(lambda core: setattr(core.config, "reuse_repair", 8))

    def price(core, values):  # rates under which moving the run beats reading it again (as measured
        saved = dict(core.costs.rates), core.costs.shift_s  # on an idle machine; a busy one may say not)
        core.costs.rates, core.costs.shift_s = values
        return saved

    note, _ = complete(engine, [bos] + c[2] + c[3] + c[5] + c[0][:20])
    # priced after the first prompt is read: its decodes would move the rates learned so far
    saved = engine.call(lambda core: price(core, ({(False, 0): 0.005, (True, 0): 0.0025}, 0.05)))
    try:
        second = [bos] + c[2] + c[1][:30] + c[5] + c[0][:20]
        note, done = complete(engine, second)
        assert note["moved_runs"] == 1 and note["recomputed_tokens"] == 8
        assert done.usage.cached_tokens == note["prefix_tokens"] + note["moved_tokens"] - 8
        engine.check(note["session"])
        ledger = engine.ledger(note["session"])
        assert ledger.tok == second
        start = 1 + 100 + 30
        assert ledger.state[start:start + 8] == ["recomputed"] * 8 and ledger.state[start + 8] == "live"
    finally:
        engine.call(lambda core: setattr(core.config, "reuse_repair", 0))
        engine.call(lambda core: price(core, saved))


def test_runs_are_read_again_when_moving_them_costs_more(engine):
    """The engine's measured rates decide: with a K-shift priced above reading the runs again, the
    plan keeps the exact prefix only and says so."""
    bos, c = chunks(engine)
    note, _ = complete(engine, [bos] + c[1] + c[2] + c[3] + c[4])
    second = [bos] + c[1] + c[0][:30] + c[3] + c[4]

    def price(core, shift_s):
        saved = core.costs.shift_s
        core.costs.shift_s = shift_s
        return saved

    saved = engine.call(lambda core: price(core, 1000.0))
    try:
        note, done = complete(engine, second)
    finally:
        engine.call(lambda core: price(core, saved))
    assert note.get("moves_declined") is True and note["moved_runs"] == 0
    assert note["prefix_tokens"] == 101 and done.usage.cached_tokens == 101
    engine.check(note["session"])
    close(engine.next_logits(note["session"], PROBE, all_logits=True), fresh_logits(engine, second))
