"""`kvside bench decode`: kvside's engine against plain llama-cpp-python (`Llama`) on the same
model, prompt and settings, in one run. Both decode greedily, past end-of-generation tokens, for the
same number of tokens; repetitions alternate so drift on the machine hits both alike."""

from __future__ import annotations

import time

from kvside.bench import median
from kvside.engine import Engine
from kvside.models import resolve

PROMPT = (
    "The history of the lighthouse begins with fires lit on hilltops to guide ships home. "
    "Over the centuries these fires became towers of stone, and the towers gained lenses, "
    "clockwork and finally electric lamps. Write a long story about a lighthouse keeper."
)


def _kvside_run(engine: Engine, n_tokens: int) -> tuple[float, float]:
    name = engine.new_session()
    try:
        stream = engine.complete(name, PROMPT, temperature=0, max_tokens=n_tokens, ignore_eos=True, repeat_penalty=1.0)
        done = stream.wait()
    finally:
        engine.delete_session(name)
    assert len(done.tokens) == n_tokens
    return done.t_prefill_s, done.decode_tok_s


def _llama_run(llm, n_tokens: int) -> tuple[float, float]:
    tokens = llm.tokenize(PROMPT.encode(), add_bos=True)
    llm.reset()
    t0 = time.perf_counter()
    t_first = 0.0
    count = 0
    for _ in llm.generate(tokens, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        count += 1
        if count == 1:
            t_first = time.perf_counter()
        if count >= n_tokens:
            break
    t_end = time.perf_counter()
    return t_first - t0, (count - 1) / (t_end - t_first)


def run(model: str | None, n_tokens: int, reps: int, n_ctx: int, n_threads: int | None) -> dict:
    from llama_cpp import Llama

    ref = resolve(model)
    engine = Engine(model=str(ref.path), n_ctx=n_ctx, max_sessions=1, n_threads=n_threads).start()
    threads = engine.info()["n_threads"]
    # `Llama` runs on the engine's thread too: a second thread computing would give the process a
    # second OpenMP pool, which slows both (kvside/engine/compute.py)
    llm = engine.call(lambda _core: Llama(model_path=str(ref.path), n_ctx=n_ctx, n_threads=threads,
                                          n_threads_batch=threads, verbose=False))
    n_prompt = len(llm.tokenize(PROMPT.encode(), add_bos=True))
    kv, lc = [], []
    try:
        for _ in range(reps):
            kv.append(_kvside_run(engine, n_tokens))
            lc.append(engine.call(lambda _core: _llama_run(llm, n_tokens)))
    finally:
        engine.call(lambda _core: llm.close())
        engine.close()
    kv_tok_s = median([r[1] for r in kv])
    lc_tok_s = median([r[1] for r in lc])
    kv_prefill = median([r[0] for r in kv])
    lc_prefill = median([r[0] for r in lc])
    return {
        "model": ref.name,
        "n_prompt": n_prompt,
        "n_tokens": n_tokens,
        "reps": reps,
        "n_threads": threads,
        "kvside_tok_s": kv_tok_s,
        "llama_cpp_python_tok_s": lc_tok_s,
        "ratio": kv_tok_s / lc_tok_s if lc_tok_s else 0.0,
        "prefill_tok_s": n_prompt / kv_prefill if kv_prefill else 0.0,
        "llama_cpp_python_prefill_tok_s": n_prompt / lc_prefill if lc_prefill else 0.0,
        "kvside_runs": [{"ttft_s": a, "tok_s": b} for a, b in kv],
        "llama_cpp_python_runs": [{"ttft_s": a, "tok_s": b} for a, b in lc],
    }
