"""`kvside bench latency`: short chat requests, the per-request overhead an editor feels, against
llama.cpp's llama-server (`make peer`) in one run. Each request is a new ~30-token conversation
(nothing to reuse for either server), streamed, 8 tokens. One client sending one request after
another, and 8 clients at once; the servers take turns in legs of each. For kvside, the share of
the requests' wall time spent outside llama_decode comes from its /metrics
(kvside_llama_decode_seconds)."""

from __future__ import annotations

import re
import statistics
import tempfile
import threading
import time

import httpx

from kvside.bench import corpus
from kvside.bench.serve import PEER, QUESTIONS, _concurrently, _load_request, _start, _stop
from kvside.models import resolve


def _decode_seconds(base: str) -> float | None:
    try:
        text = httpx.get(base + "/metrics", timeout=30).text
    except httpx.HTTPError:
        return None
    # one series per loaded model: the daemon's time inside llama_decode is their sum
    found = re.findall(r"^kvside_llama_decode_seconds(?:\{[^}]*\})? (\S+)$", text, re.M)
    return sum(float(v) for v in found) if found else None


def _body(i: int, max_tokens: int) -> dict:
    return {"messages": [{"role": "user", "content": f"Question {i}: {QUESTIONS[i % len(QUESTIONS)]}"}],
            "max_tokens": max_tokens, "temperature": 0}


def _leg(base: str, clients: int, per_client: int, max_tokens: int, offset: int) -> dict:
    """`clients` at once, each sending `per_client` new conversations one after another: the
    requests' rows, the wall time, and the daemon's time inside llama_decode meanwhile."""
    rows: list[dict] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        for k in range(per_client):
            t0 = time.perf_counter()
            r = _load_request(base, _body(offset + c * per_client + k, max_tokens), None)
            r["wall_s"] = time.perf_counter() - t0
            with lock:
                rows.append(r)

    before = _decode_seconds(base)
    wall = _concurrently(clients, client)
    after = _decode_seconds(base)
    decode = after - before if before is not None and after is not None else None
    return {"rows": rows, "wall_s": wall, "decode_s": decode}


def _summary(clients: int, legs: list[dict]) -> dict:
    rows = [r for leg in legs for r in leg["rows"]]
    wall = sum(leg["wall_s"] for leg in legs)
    ttfts = sorted(r["ttft_s"] for r in rows if r["ttft_s"] is not None)
    out = {"clients": clients, "requests": len(rows), "errors": sum(1 for r in rows if r["status"] != 200),
           "ttft_p50_s": round(statistics.median(ttfts), 4), "ttft_p95_s": round(ttfts[int(0.95 * (len(ttfts) - 1))], 4),
           "request_p50_s": round(statistics.median(r["wall_s"] for r in rows), 4), "wall_s": round(wall, 3)}
    if all(leg["decode_s"] is not None for leg in legs):
        # one engine thread: llama_decode time against the wall time the rounds took
        decode = sum(leg["decode_s"] for leg in legs)
        out["llama_decode_s"] = round(decode, 3)
        out["share_outside_decode"] = round(1 - decode / wall, 3)
    return out


def _split(n: int, parts: int) -> list[int]:
    """n requests in at most `parts` legs of sizes differing by at most one."""
    parts = max(1, min(parts, n))
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def rounds(bases: dict[str, str], requests: int, clients: int, max_tokens: int, legs: int = 4) -> dict:
    """One client sending `requests` new conversations one after another, then `clients` at once
    sending twice as many in all, on each server. The work is cut into legs and the servers take
    turns leg by leg, the first alternating, each sent the same conversations: a 2-core machine's
    speed drifts over minutes, and servers measured one after the other were compared at
    different speeds. The wall time of a round is the sum of its legs'."""
    kinds = list(bases)
    for base in bases.values():
        _leg(base, 1, 2, max_tokens, 900)  # warm up
    per_leg = _split(requests, legs)
    many_per_leg = _split(max(1, requests // clients * 2), legs)
    legs, many_legs = len(per_leg), len(many_per_leg)
    one: dict[str, list[dict]] = {kind: [] for kind in kinds}
    many: dict[str, list[dict]] = {kind: [] for kind in kinds}
    for i in range(max(legs, many_legs)):
        order = kinds[::-1] if i % 2 else kinds
        for kind in order:
            if i < legs:
                one[kind].append(_leg(bases[kind], 1, per_leg[i], max_tokens, sum(per_leg[:i])))
        for kind in order:
            if i < many_legs:
                # each leg's conversations are new: offsets past every earlier leg's
                many[kind].append(_leg(bases[kind], clients, many_per_leg[i], max_tokens,
                                       100 + clients * sum(many_per_leg[:i])))
    return {kind: {"one_client": _summary(1, one[kind]), f"{clients}_clients": _summary(clients, many[kind])}
            for kind in kinds}


DECODE_PROMPT = "Write a long story about a lighthouse keeper and the sea."


def _decode_once(base: str, n_tokens: int) -> float:
    """One stream's generation rate as the server reports it (llama-server's /completion
    `timings.predicted_per_second`, which kvside's /completion gives the same way): n_tokens past
    any end-of-generation token."""
    r = httpx.post(base + "/completion", json={"prompt": DECODE_PROMPT, "n_predict": n_tokens, "ignore_eos": True,
                                               "temperature": 0, "cache_prompt": False}, timeout=600)
    r.raise_for_status()
    return r.json()["timings"]["predicted_per_second"]


def _take_turns(bases: dict[str, str], reps: int, measure) -> dict[str, list[float]]:
    """measure(base, rep) on each server, the servers taking turns rep by rep, the one that goes
    first alternating."""
    kinds = list(bases)
    values: dict[str, list[float]] = {kind: [] for kind in kinds}
    for rep in range(reps):
        for kind in kinds[::-1] if rep % 2 else kinds:
            values[kind].append(measure(bases[kind], rep))
    return values


def _paired(values: dict[str, list[float]]) -> dict | None:
    """With two servers, the ratio of their values rep by rep: median and quartiles."""
    if len(values) != 2:
        return None
    a, b = values
    ratios = sorted(x / y for x, y in zip(values[a], values[b]))
    q1, q2, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return {"of": f"{a} / {b}", "median": round(statistics.median(ratios), 4), "q1": round(q1, 4),
            "q3": round(q3, 4), "all": [round(x, 3) for x in ratios]}


def decode_rates(bases: dict[str, str], n_tokens: int, reps: int = 5) -> dict:
    """Each server's single-stream decode rate, the servers taking turns rep by rep, the one that
    goes first alternating (a 2-core machine's speed drifts; measured one after the other the
    ratio swung from 0.77 to 1.28). Each rep's rates are taken within seconds of each other, so
    the ratio of the two within a rep carries less of the drift than the ratio of medians: with
    two servers, the median and quartiles of those paired ratios are reported too."""
    rates = _take_turns(bases, reps, lambda base, rep: _decode_once(base, n_tokens))
    out: dict = {kind: {"tokens": n_tokens, "reps": reps, "tok_s_median": round(statistics.median(r), 2),
                        "tok_s_all": [round(x, 1) for x in r]} for kind, r in rates.items()}
    paired = _paired(rates)
    if paired:
        out["paired_ratio"] = paired
    return out


def _stretch(i: int, n_tokens: int) -> str:
    """About n_tokens of the corpus's prose, starting at a different word for each i."""
    words = corpus.text().split()
    n_words = n_tokens * 3 // 4  # about 1.3 tokens a word in English prose
    start = (i * 997) % max(1, len(words) - n_words)
    return " ".join((words * (1 + n_words // max(1, len(words)) + 1))[start:start + n_words])


def _prompt_once(base: str, i: int, n_tokens: int) -> tuple[float, int]:
    """A new prompt of about n_tokens read and one token generated, nothing cached: the server's
    `timings.prompt_ms` and the prompt's tokens."""
    r = httpx.post(base + "/completion", json={"prompt": _stretch(1000 + i, n_tokens), "n_predict": 1,
                                               "temperature": 0, "cache_prompt": False}, timeout=600)
    r.raise_for_status()
    timings = r.json()["timings"]
    return timings["prompt_ms"], timings["prompt_n"]


def prompt_times(bases: dict[str, str], n_tokens: int, reps: int = 5) -> dict:
    """Each server's time to read a new prompt of about n_tokens, taking turns as decode_rates
    does, each rep a different prompt (the same one for every server)."""
    counted: dict[str, int] = {}

    def measure(base: str, rep: int) -> float:
        ms, n = _prompt_once(base, rep, n_tokens)
        counted[base] = n
        return ms

    times = _take_turns(bases, reps, measure)
    out: dict = {kind: {"tokens": counted[bases[kind]], "reps": reps, "ms_median": round(statistics.median(t), 1),
                        "ms_all": [round(x) for x in t]} for kind, t in times.items()}
    paired = _paired(times)
    if paired:
        out["paired_ratio"] = paired
    return out


def _idle_session(base: str, i: int, n_tokens: int) -> int:
    """A session left idle holding about n_tokens: one chat request whose prompt is a stretch of
    the corpus (a different one for each i, so no two share more than the template's head) and
    whose reply is one token. Returns the prompt's tokens as the server counted them."""
    r = httpx.post(base + "/v1/chat/completions", json={"messages": [{"role": "user", "content": _stretch(i, n_tokens)}],
                                                         "max_tokens": 1, "temperature": 0}, timeout=600)
    r.raise_for_status()
    return r.json()["usage"]["prompt_tokens"]


def beside_idle(bases: dict[str, str], sessions: int, n_tokens: int, decode_tokens: int, prompt_tokens: int,
                reps: int) -> dict:
    """The single-stream decode rate and a new prompt's time once `sessions` other sessions of
    about n_tokens each sit idle in every server. kvside's sessions share one KV cache, so a batch
    attends over the cells up to the highest in use by any of them; llama-server's slots are
    separate caches."""
    held = {kind: [_idle_session(base, i, n_tokens) for i in range(sessions)] for kind, base in bases.items()}
    return {"idle_sessions": sessions, "idle_prompt_tokens": held,
            "decode": decode_rates(bases, decode_tokens, reps), "prompt": prompt_times(bases, prompt_tokens, reps)}


def measure(bases: dict[str, str], requests: int, clients: int, max_tokens: int, decode_tokens: int,
            decode_reps: int, prompt_tokens: int, idle: tuple[int, int]) -> dict:
    """Every measure of the bench on servers already up: the rounds; then, with decode_tokens,
    one stream's decode rate and a new prompt's time; then the same beside idle sessions."""
    result: dict = {"runs": rounds(bases, requests, clients, max_tokens)}
    if decode_tokens:
        result["decode"] = decode_rates(bases, decode_tokens, decode_reps)
        result["prompt"] = prompt_times(bases, prompt_tokens, decode_reps)
        if idle[0]:
            result["beside_idle"] = beside_idle(bases, *idle, decode_tokens, prompt_tokens, decode_reps)
    return result


def against(base: str, requests: int, clients: int, max_tokens: int, decode_tokens: int = 128,
            decode_reps: int = 5, prompt_tokens: int = 900, idle: tuple[int, int] = (0, 0)) -> dict:
    """The same measures against a server already running at `base` (to profile a daemon, e.g.
    under py-spy); nothing is started or stopped."""
    return {"model": base, "n_ctx": None, "threads": None, "max_tokens": max_tokens,
            **measure({base: base}, requests, clients, max_tokens, decode_tokens, decode_reps, prompt_tokens, idle)}


def run(model: str | None, n_ctx: int, threads: int, requests: int, clients: int, max_tokens: int,
        decode_tokens: int = 128, decode_reps: int = 5, prompt_tokens: int = 900,
        idle: tuple[int, int] = (0, 0)) -> dict:
    """`idle`: (sessions, tokens each) left idle in both servers before the decode and the prompt
    are measured a second time; (0, 0) skips it."""
    path = resolve(model).path
    kinds = ["kvside"] + (["llama-server"] if PEER.exists() else [])
    result: dict = {"model": path.name, "n_ctx": n_ctx, "threads": threads, "max_tokens": max_tokens, "runs": {}}
    if not PEER.exists():
        result["notice"] = "llama-server not built (make peer): skipped"
    servers = {}
    try:
        for kind in kinds:  # both up at once: each is idle while the other is measured
            servers[kind] = _start(kind, path, n_ctx, threads, tempfile.mkdtemp(prefix="kvside-bench-latency-"),
                                   sessions=clients)
        result.update(measure({kind: base for kind, (_, base) in servers.items()}, requests, clients, max_tokens,
                              decode_tokens, decode_reps, prompt_tokens, idle))
    finally:
        for proc, _ in servers.values():
            _stop(proc)
    return result


def table(result: dict) -> str:
    lines = [f"latency: new short conversations, {result['max_tokens']} tokens each, model {result['model']}, "
             f"{result['threads']} threads",
             "server | clients | requests | TTFT p50 s | TTFT p95 s | request p50 s | wall s | outside llama_decode"]
    for kind, rounds in result["runs"].items():
        for r in rounds.values():
            share = f"{r['share_outside_decode']:.0%}" if "share_outside_decode" in r else "-"
            lines.append(f"{kind} | {r['clients']} | {r['requests']} | {r['ttft_p50_s']:.3f} | {r['ttft_p95_s']:.3f} | "
                         f"{r['request_p50_s']:.3f} | {r['wall_s']:.2f} | {share}")
    lines += _decode_lines("single stream decode", result.get("decode", {}))
    lines += _prompt_lines("new prompt", result.get("prompt", {}))
    idle = result.get("beside_idle")
    if idle:
        held = ", ".join(f"{kind} {sum(n) // max(1, len(n))}" for kind, n in idle["idle_prompt_tokens"].items())
        lines.append(f"beside {idle['idle_sessions']} idle sessions (prompt tokens each: {held}):")
        lines += _decode_lines("  single stream decode", idle["decode"])
        lines += _prompt_lines("  new prompt", idle["prompt"])
    if "notice" in result:
        lines.append(result["notice"])
    return "\n".join(lines)


def _decode_lines(title: str, decode: dict) -> list[str]:
    lines = []
    rates = {k: v for k, v in decode.items() if isinstance(v, dict) and "tok_s_median" in v}
    for kind, d in rates.items():
        lines.append(f"{title}, {kind}: {d['tok_s_median']:.1f} tok/s (median of {d['reps']}, "
                     f"{d['tokens']} tokens; all: {d['tok_s_all']})")
    if "kvside" in rates and "llama-server" in rates:
        ratio = rates["kvside"]["tok_s_median"] / rates["llama-server"]["tok_s_median"]
        lines.append(f"{title}, ratio kvside / llama-server: {ratio:.3f} (ratio of medians)")
    paired = decode.get("paired_ratio")
    if paired:
        lines.append(f"{title}, ratio {paired['of']} rep by rep: median {paired['median']:.3f}, "
                     f"quartiles {paired['q1']:.3f}-{paired['q3']:.3f} ({len(paired['all'])} reps)")
    return lines


def _prompt_lines(title: str, prompt: dict) -> list[str]:
    lines = []
    for kind, d in ((k, v) for k, v in prompt.items() if isinstance(v, dict) and "ms_median" in v):
        lines.append(f"{title}, {kind}: {d['ms_median']:.0f} ms for {d['tokens']} tokens (median of {d['reps']}; "
                     f"all: {d['ms_all']})")
    paired = prompt.get("paired_ratio")
    if paired:
        lines.append(f"{title}, time {paired['of']} rep by rep: median {paired['median']:.3f}, "
                     f"quartiles {paired['q1']:.3f}-{paired['q3']:.3f} ({len(paired['all'])} reps)")
    return lines
