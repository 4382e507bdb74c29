"""`kvside bench fim`: an editor's autocomplete as llama.vscode drives it, replayed against kvside and
llama.cpp's llama-server --cache-reuse 256 (`make peer`) in one run. The repository is kvside's own
engine source. The trace: the cursor walks down a function, a request per keystroke pause (the line
typed so far is the `prompt`, the lines around the cursor are `input_prefix`/`input_suffix`); a ring of
context chunks from other files (`input_extra`) gains a chunk and loses its oldest every few requests;
now and then the cursor jumps to another file. Per request: latency of the whole (non-streamed)
answer, tokens read and tokens found in the cache."""

from __future__ import annotations

import random
import statistics
import subprocess
import tempfile
from pathlib import Path

import httpx

from kvside.bench.serve import PEER, _start, _stop
from kvside.models import resolve

REPO = Path(__file__).resolve().parents[1] / "engine"
REPAIR = 16  # tokens of each moved run computed again, in the repaired configuration
PREFIX_LINES, SUFFIX_LINES = 24, 12  # llama.vscode's defaults are 256 and 64: scaled to a CPU's prefill


def _files() -> dict[str, list[str]]:
    return {p.name: p.read_text().splitlines(keepends=True) for p in sorted(REPO.glob("*.py")) if p.stat().st_size > 4000}


def trace(n_requests: int, ring_chunks: int, chunk_lines: int, rotate_every: int, jump_every: int,
          seed: int = 7) -> list[dict]:
    """The request bodies, llama.vscode's /infill shape."""
    rnd = random.Random(seed)
    files = _files()
    names = list(files)

    def chunk(name: str) -> dict:
        lines = files[name]
        start = rnd.randrange(0, max(1, len(lines) - chunk_lines))
        return {"filename": name, "text": "".join(lines[start:start + chunk_lines])}

    current = names[0]
    line = PREFIX_LINES + 10
    ring = [chunk(n) for n in rnd.sample([n for n in names if n != current], ring_chunks)]
    out, typed = [], 0
    for i in range(n_requests):
        if i and i % jump_every == 0:  # the user opens another file
            current = rnd.choice([n for n in names if n != current])
            line, typed = PREFIX_LINES + 10, 0
        elif i and i % rotate_every == 0:  # a chunk from a file just seen joins the ring
            ring = ring[1:] + [chunk(rnd.choice([n for n in names if n != current]))]
        lines = files[current]
        text = lines[line % len(lines)].rstrip("\n")
        typed = min(typed + rnd.randint(2, 6), len(text))
        out.append({
            "input_extra": list(ring),
            "input_prefix": "".join(lines[max(0, line - PREFIX_LINES):line]),
            "input_suffix": text[typed:] + "\n" + "".join(lines[line + 1:line + 1 + SUFFIX_LINES]),
            "prompt": text[:typed],
            "n_predict": 8, "temperature": 0, "top_k": 40, "top_p": 0.99, "samplers": ["top_k", "top_p", "infill"],
            "cache_prompt": True, "t_max_prompt_ms": 500, "t_max_predict_ms": 1000, "n_indent": 4,
        })
        if typed >= len(text) or rnd.random() < 0.3:  # the completion taken, or Enter: the next line
            line, typed = line + 1, 0
    return out


def replay(base: str, bodies: list[dict]) -> list[dict]:
    rows = []
    with httpx.Client(timeout=600) as client:
        for i, body in enumerate(bodies):
            r = client.post(base + "/infill", json=body)
            r.raise_for_status()
            data = r.json()
            timings = data.get("timings") or {}
            rows.append({"request": i, "latency_s": r.elapsed.total_seconds(),
                         "prompt_tokens": data.get("tokens_evaluated", 0), "cached_tokens": timings.get("cache_n", 0),
                         "read_tokens": timings.get("prompt_n", 0), "content": data.get("content", "")})
    return rows


def _commit() -> str | None:
    """The commit whose engine source the trace is made of (the trace changes with the code)."""
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "."], capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() + ("+changes" if dirty else "")) or None


def _p(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def run(model: str | None, n_ctx: int, requests: int, threads: int, ring_chunks: int = 3, chunk_lines: int = 32,
        rotate_every: int = 8, jump_every: int = 25) -> dict:
    path = resolve(model).path
    bodies = trace(requests, ring_chunks, chunk_lines, rotate_every, jump_every)
    # kvside-reread: every request read whole (the reference the others' completions are held to)
    # (flags given explicitly, so a run's names say what ran whatever the defaults are)
    configs = {"kvside-repair-0": ["--reuse-repair", "0"], f"kvside-repair-{REPAIR}": ["--reuse-repair", str(REPAIR)],
               "kvside-prefix-only": ["--reuse-chunk", "0"], "kvside-reread": ["--no-reuse"]}
    if PEER.exists():
        configs["llama-server"] = []
    result: dict = {"model": path.name, "n_ctx": n_ctx, "threads": threads, "requests": requests,
                    "trace": {"ring_chunks": ring_chunks, "chunk_lines": chunk_lines, "rotate_every": rotate_every,
                              "jump_every": jump_every, "prefix_lines": PREFIX_LINES, "suffix_lines": SUFFIX_LINES,
                              "repository": "kvside/engine", "repository_commit": _commit()},
                    "runs": {}}
    if not PEER.exists():
        result["notice"] = "llama-server not built (make peer): skipped"
    for kind, extra in configs.items():
        proc, base = _start("llama-server" if kind == "llama-server" else "kvside", path, n_ctx, threads,
                            tempfile.mkdtemp(prefix="kvside-bench-fim-"), extra=extra)
        try:
            # warm the process up with a prompt the trace does not share: the trace starts cold
            replay(base, [{"input_prefix": "x = ", "input_suffix": "\n", "prompt": "", "n_predict": 1}])
            rows = replay(base, bodies)
        finally:
            _stop(proc)
        lat = [r["latency_s"] for r in rows[1:]]  # the first request reads everything in every server
        result["runs"][kind] = {
            "rows": rows, "latency_p50_s": statistics.median(lat), "latency_p95_s": _p(lat, 0.95),
            "latency_mean_s": statistics.fmean(lat),
            "cached_share": sum(r["cached_tokens"] for r in rows[1:]) / max(1, sum(r["prompt_tokens"] for r in rows[1:])),
            "read_tokens": sum(r["read_tokens"] for r in rows[1:]),
            "prompt_tokens_median": statistics.median(r["prompt_tokens"] for r in rows)}
    # fidelity: each kvside configuration's completions against those of the prompt read whole
    # (llama-server's differ by its `infill` sampler, not compared)
    reference = result["runs"]["kvside-reread"]["rows"]
    for kind, r in result["runs"].items():
        if kind.startswith("kvside") and kind != "kvside-reread":
            r["same_completion_as_reread"] = sum(a["content"] == b["content"] for a, b in zip(reference, r["rows"]))
    return result


def table(result: dict) -> str:
    runs = result["runs"]
    t = result["trace"]
    lines = [f"fim: {result['requests']} /infill requests, model {result['model']}, n_ctx {result['n_ctx']}, "
             f"{result['threads']} threads; ring of {t['ring_chunks']} chunks x {t['chunk_lines']} lines rotating every "
             f"{t['rotate_every']} requests, file jump every {t['jump_every']}",
             "server | latency p50 s | p95 s | mean s | tokens read | cached share | prompt tokens (median)"]
    for kind, r in runs.items():
        lines.append(f"{kind} | {r['latency_p50_s']:.3f} | {r['latency_p95_s']:.3f} | {r['latency_mean_s']:.3f} | "
                     f"{r['read_tokens']} | {r['cached_share']:.2f} | {r['prompt_tokens_median']:.0f}")
    for kind, r in runs.items():
        if "same_completion_as_reread" in r:
            lines.append(f"{kind}: the same completion as the prompt read whole on {r['same_completion_as_reread']} "
                         f"of {result['requests']} requests")
    if "notice" in result:
        lines.append(result["notice"])
    return "\n".join(lines)
