"""`kvside bench costs`: what llama_decode costs on this machine, the numbers behind the engine's
cost model (kvside/engine/costs.py): seconds per token for batches of 1 to 512 tokens at several
cache depths, and the price of a K-shift. Each figure is the best of `reps` runs. (The engine learns
the same rates from its own decodes as it serves; they are on /metrics.)"""

from __future__ import annotations

import time

from kvside.bench import corpus
from kvside.engine import Engine

SIZES = (1, 4, 16, 32, 63, 64, 128, 512)


def run(model: str | None, n_ctx: int, depths: list[int], reps: int, threads: int | None,
        flash_attn: bool | None = None) -> dict:
    def measure(core):
        s = core.new_session(system="")
        tokens = corpus.tokens(core.model, max(depths) + max(SIZES) + 1)
        rows = []
        try:
            for depth in depths:
                core.mem.clear_seq(s.seq)
                if depth:
                    core.decode_now(s.seq, tokens[:depth], 0, logits="none")
                for n in SIZES:
                    best = float("inf")
                    for _ in range(reps):
                        t0 = time.perf_counter()
                        core.decode_now(s.seq, tokens[depth:depth + n], depth, logits="none")
                        best = min(best, time.perf_counter() - t0)
                        core.mem.rm(s.seq, depth, -1)
                    rows.append({"depth": depth, "tokens": n, "seconds": round(best, 5),
                                 "ms_per_token": round(best * 1000 / n, 3)})
                if not depth:
                    continue
                # the K-shift: one token decoded after the session moved up by one position, against
                # the same decode without a pending shift
                shifts = []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    core.decode_now(s.seq, tokens[depth:depth + 1], depth, logits="none")
                    plain = time.perf_counter() - t0
                    core.mem.rm(s.seq, depth, -1)
                    core.mem.add(s.seq, 1, -1, 1)
                    t0 = time.perf_counter()
                    core.decode_now(s.seq, tokens[depth:depth + 1], depth + 1, logits="none")
                    shifts.append(time.perf_counter() - t0 - plain)
                    core.mem.rm(s.seq, depth + 1, -1)
                    core.mem.add(s.seq, 2, -1, -1)  # back where it was, applied by a decode not timed
                    core.decode_now(s.seq, tokens[depth:depth + 1], depth, logits="none")
                    core.mem.rm(s.seq, depth, -1)
                rows.append({"depth": depth, "kshift_ms": round(min(shifts) * 1000, 2)})
        finally:
            core.delete_session(s.name)
        return rows, core.n_cells

    with Engine(model=model, n_ctx=n_ctx, max_sessions=1, n_threads=threads, flash_attn=flash_attn) as engine:
        rows, n_cells = engine.call(measure)
        info = engine.info()
    return {"model": info["model_name"], "n_ctx": n_ctx, "cache_cells": n_cells, "threads": threads,
            "reps": reps, "attention": info["attention"], "rows": rows}


def table(result: dict) -> str:
    lines = [f"decode costs: {result['model']}, cache of {result['cache_cells']} cells, "
             f"{result.get('attention', 'llama.cpp default')}, best of {result['reps']}",
             "depth | " + " | ".join(f"{n} tok" for n in SIZES) + " | K-shift"]
    for depth in sorted({r["depth"] for r in result["rows"]}):
        rows = [r for r in result["rows"] if r["depth"] == depth]
        per = {r["tokens"]: r["ms_per_token"] for r in rows if "tokens" in r}
        shift = next((f"{r['kshift_ms']:.1f} ms" for r in rows if "kshift_ms" in r), "-")
        lines.append(f"{depth} | " + " | ".join(f"{per[n]:.2f} ms/tok" for n in SIZES) + f" | {shift}")
    return "\n".join(lines)
