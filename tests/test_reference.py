"""A session's cache measured against a re-prefill of the tokens it holds (engine/reference.py and
POST /kvside/sessions/{name}/fidelity): zero for a cache no edit touched, above zero after an edit
kept cells computed after another context, and the session left exactly as it was."""

import httpx
import pytest

from conftest import GREEDY, LiveDaemon
from kvside.engine import Engine
from kvside.errors import InvalidRequest

SYSTEM = "You are a terse assistant; answer in a few words."
TURNS = ["Name a colour.", "Name a fruit.", "Name a planet.", "Name a river."]


@pytest.fixture(scope="module")
def exact(tmp_path_factory):
    with Engine(n_ctx=640, max_sessions=2, n_threads=2, exact=True,
                sessions_dir=str(tmp_path_factory.mktemp("sessions"))) as e:
        yield e


def conversation(engine, n: int) -> tuple[str, list[dict]]:
    history = [{"role": "system", "content": SYSTEM}]
    session = None
    for text in TURNS[:n]:
        history.append({"role": "user", "content": text})
        c = engine.bind_chat(history, max_tokens=12, **GREEDY).wait()
        session = c.session
        history.append({"role": "assistant", "content": c.text or "ok"})
    return session, history


def test_an_unedited_cache_measures_zero_and_is_left_as_it_was(exact):
    name, _ = conversation(exact, 3)
    try:
        before = exact.ledger(name)
        out = exact.fidelity(name, tokens=8)
        assert out["tokens"] >= 1 and out["position_gaps"] == 0
        # built turn by turn, read whole: the same cells up to the rounding of another batch split
        # (llama.cpp's CPU matmul rounds batches of 64 tokens and more differently; measured 2e-4)
        assert out["kl"] < 1e-3 and out["top1"] == 1.0
        after = exact.ledger(name)
        assert (after.tok, after.pos, after.msg) == (before.tok, before.pos, before.msg)
        exact.check(name)
    finally:
        exact.delete_session(name)


def test_cells_kept_across_a_dropped_exchange_differ_from_a_reprefill(exact):
    name, history = conversation(exact, 3)
    try:
        # the client drops the oldest exchange: masked, the later cells keep their KV
        trimmed = history[:1] + history[3:] + [{"role": "user", "content": TURNS[3]}]
        c = exact.bind_chat(trimmed, max_tokens=12, **GREEDY).wait()
        assert c.session == name
        out = exact.fidelity(name, tokens=8)
        assert out["position_gaps"] > 0
        assert out["kl"] > 2e-3 and 0.0 <= out["top1"] <= 1.0  # measured 7e-3, 30x the unedited
        assert "mask" in out["edits"]
        exact.check(name)
    finally:
        exact.delete_session(name)


def test_bad_requests_are_refused(exact):
    name = exact.new_session(system="")
    try:
        with pytest.raises(InvalidRequest, match="too little"):
            exact.fidelity(name)
        with pytest.raises(InvalidRequest, match="between 1 and"):
            exact.fidelity(name, tokens=0)
    finally:
        exact.delete_session(name)


def test_the_daemon_serves_it_and_does_not_count_it_as_an_edit(exact):
    live = LiveDaemon(exact)
    try:
        url = live.url
        history = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": TURNS[0]}]
        r = httpx.post(url + "/v1/chat/completions", json={"messages": history, "max_tokens": 8, "temperature": 0},
                       timeout=120).json()
        name = r["kvside"]["session"]
        out = httpx.post(f"{url}/kvside/sessions/{name}/fidelity", json={"tokens": 4}, timeout=120)
        # unedited: batch-split rounding only (2e-4 to 1e-3 by CPU), well below an edit's 7e-3
        assert out.status_code == 200 and out.json()["kl"] < 2e-3
        assert httpx.post(f"{url}/kvside/sessions/{name}/fidelity", json={"tokens": "four"}).status_code == 400
        assert httpx.post(f"{url}/kvside/sessions/nobody/fidelity", json={}).status_code == 404
        assert "fidelity" not in httpx.get(url + "/metrics").text
    finally:
        live.stop()
        for s in exact.sessions():
            exact.delete_session(s["name"])
