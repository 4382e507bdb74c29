"""GET /metrics: Prometheus text that counts what the daemon did, checked against requests made."""

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families



@pytest.fixture(scope="module")
def url(daemon_url):
    return daemon_url


def samples(url):
    text = httpx.get(url + "/metrics").text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(got, name, **labels):
    return got.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_requests_tokens_edits_and_sessions(url):
    before = samples(url)
    history = [{"role": "user", "content": "Name a fruit."}]
    r = httpx.post(url + "/v1/chat/completions", json={"messages": history, "max_tokens": 4, "temperature": 0},
                   timeout=120).json()
    history += [{"role": "assistant", "content": r["choices"][0]["message"]["content"]},
                {"role": "user", "content": "And a vegetable?"}]
    r2 = httpx.post(url + "/v1/chat/completions", json={"messages": history, "max_tokens": 4, "temperature": 0},
                    timeout=120).json()
    session = r2["kvside"]["session"]
    assert httpx.post(f"{url}/kvside/sessions/{session}/roll", json={"drop": 2}).status_code == 200
    assert httpx.post(url + "/v1/chat/completions", content="{}", headers={"Content-Type": "text/plain"}).status_code == 415
    after = samples(url)

    def grew(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("kvside_requests_total", route="/v1/chat/completions", status="200") == 2
    assert grew("kvside_requests_total", route="/v1/chat/completions", status="415") == 1
    assert grew("kvside_requests_total", route="/kvside/sessions/{name}/roll", status="200") == 1
    assert grew("kvside_prompt_tokens_total", kind="reused") == r2["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert grew("kvside_completion_tokens_total") == r["usage"]["completion_tokens"] + r2["usage"]["completion_tokens"]
    assert grew("kvside_edits_total", edit="roll", strategy="shift") == 1
    assert grew("kvside_time_to_first_token_seconds_count") == 2
    model = httpx.get(url + "/health").json()["model"]
    assert value(after, "kvside_sessions", model=model, where="resident") >= 1
    # the cost model learned from those decodes: a rate per token, and the roll's shift priced
    rates = [v for (name, _), v in after.items() if name == "kvside_decode_ms_per_token"]
    assert rates and all(v > 0 for v in rates)


def test_bench_latency_reads_the_daemons_time_in_llama_decode(url):
    from kvside.bench import latency

    httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi."}], "max_tokens": 2},
               timeout=120)
    assert latency._decode_seconds(url) > 0


def test_bench_latency_leaves_long_sessions_idle_before_measuring_again(url, monkeypatch):
    from kvside.bench import latency

    def resident():
        rows = httpx.get(url + "/kvside/sessions").json()["sessions"]
        return sorted(r["n_cells"] for r in rows if r["resident"])

    held = latency._idle_session(url, 0, 300)
    assert 200 <= held <= 450
    assert any(held <= n <= held + 2 for n in resident())  # kept, idle, holding its prompt and reply
    monkeypatch.setattr(latency, "_decode_once", lambda base, n: 10.0)
    out = latency.beside_idle({"kvside": url}, 1, 64, 16, prompt_tokens=120, reps=2)
    assert out["idle_sessions"] == 1 and 30 < out["idle_prompt_tokens"]["kvside"][0] < 100
    assert out["decode"]["kvside"]["tok_s_all"] == [10.0, 10.0]
    prompt = out["prompt"]["kvside"]  # read for real: a new prompt each rep, nothing cached
    assert 80 <= prompt["tokens"] <= 180 and len(prompt["ms_all"]) == 2 and prompt["ms_median"] > 0


def test_bench_latency_pairs_the_decode_rates_rep_by_rep(monkeypatch):
    """The servers take turns, the first alternating, and each rep's two rates give one ratio: a
    drift that slows both servers alike over the run does not move the paired ratios."""
    from kvside.bench import latency

    calls, speed = [], iter(range(100))
    # kvside at 0.95 of llama-server's rate, the machine slowing by 10% a call
    rate = {"kvside": 95.0, "llama-server": 100.0}

    def once(base, n_tokens):
        calls.append(base)
        return rate[base] * 0.9 ** next(speed)

    monkeypatch.setattr(latency, "_decode_once", once)
    out = latency.decode_rates({"kvside": "kvside", "llama-server": "llama-server"}, 16, reps=4)
    assert calls == ["kvside", "llama-server", "llama-server", "kvside"] * 2
    paired = out["paired_ratio"]
    # each pair is one call apart: 0.95 / 0.9 or 0.95 * 0.9, never the drift of the whole run
    assert paired["of"] == "kvside / llama-server" and len(paired["all"]) == 4
    assert sorted(paired["all"]) == pytest.approx([0.855, 0.855, 1.056, 1.056], abs=1e-3)
    assert paired["median"] == pytest.approx((0.855 + 1.056) / 2, abs=1e-3)


def test_bench_latency_servers_take_turns_leg_by_leg_on_the_same_conversations(monkeypatch):
    from kvside.bench import latency

    calls = []

    def leg(base, clients, per_client, max_tokens, offset):
        calls.append((base, clients, per_client, offset))
        rows = [{"ttft_s": 0.1, "wall_s": 0.2, "status": 200} for _ in range(clients * per_client)]
        return {"rows": rows, "wall_s": 0.2 * per_client, "decode_s": None}

    monkeypatch.setattr(latency, "_leg", leg)
    out = latency.rounds({"a": "a", "b": "b"}, requests=10, clients=4, max_tokens=8, legs=4)
    measured = [c for c in calls if c[3] != 900]  # the warm-ups aside
    firsts = [c[0] for c in measured if c[1] == 1]
    assert firsts == ["a", "b", "b", "a", "a", "b", "b", "a"]  # the first alternates
    for kind in "ab":
        mine = [c for c in measured if c[0] == kind]
        # every request once, each leg's conversations new, the same ones for both servers
        assert sum(c[2] for c in mine if c[1] == 1) == 10 and out[kind]["one_client"]["requests"] == 10
        assert out[kind]["4_clients"]["requests"] == 4 * (10 // 4 * 2)
        assert len({c[3] for c in mine}) == len(mine)
    assert sorted(c[1:] for c in measured if c[0] == "a") == sorted(c[1:] for c in measured if c[0] == "b")
