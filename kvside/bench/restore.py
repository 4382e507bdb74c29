"""`kvside bench restore`: one session of N tokens, saved to a file; then, in the same run, the time
from file to first token (restore) against tokens to first token (re-prefill of the same tokens)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from kvside.bench import corpus
from kvside.engine import Engine, persist


def run(model: str | None, n_tokens: int, reps: int, n_threads: int | None, flash_attn: bool | None,
        exact: bool = False, reference_kernels: bool = False) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="kvside-bench-"))
    engine = Engine(model=model, n_ctx=n_tokens + 16, max_sessions=2, n_threads=n_threads,
                    sessions_dir=str(folder), flash_attn=flash_attn, exact=exact,
                    reference_kernels=reference_kernels).start()
    try:
        def measure(core) -> dict:
            tokens = corpus.tokens(core.model, n_tokens + 1)
            context, nxt = tokens[:-1], tokens[-1]
            s = core.new_session("bench")
            core.prefill(s, [(0, context)])
            original = core.probe("bench", [nxt])
            path = folder / "bench.kvs"
            saves, restores, prefills, identical = [], [], [], []
            for _ in range(reps):
                # as an idle session does: saved, gone from the cache, restored into it again
                t0 = time.perf_counter()
                persist.save(core, core.get("bench"), path)
                saves.append(time.perf_counter() - t0)
                core.delete_session("bench")
                t0 = time.perf_counter()
                r = persist.restore(core, path, "bench")
                got = core.probe(r.name, [nxt])
                restores.append(time.perf_counter() - t0)
                identical.append(bool(np.array_equal(got, original)))
                ref = core.new_session("reprefill")
                t0 = time.perf_counter()
                core.prefill(ref, [(0, context)])
                core.probe(ref.name, [nxt])
                prefills.append(time.perf_counter() - t0)
                core.delete_session(ref.name)
                core.mem.clear_seq(core.scratch_seq)
            size = path.stat().st_size
            return {"size": size, "saves": saves, "restores": restores, "prefills": prefills, "identical": identical}

        m = engine.call(measure)
        info = engine.info()
    finally:
        engine.close()
    t_restore = float(np.median(m["restores"]))
    t_reprefill = float(np.median(m["prefills"]))
    t_save = float(np.median(m["saves"]))
    mb = m["size"] / 1e6
    return {
        "model": info["model_name"],
        "n_tokens": n_tokens,
        "reps": reps,
        "flash_attn": flash_attn,
        "attention": info["attention"],
        "t_restore_s": t_restore,
        "t_reprefill_s": t_reprefill,
        "speedup": t_reprefill / t_restore,
        "file_mb": mb,
        "t_save_s": t_save,
        "save_mb_s": mb / t_save,
        "restore_mb_s": mb / t_restore,
        "logits_identical": all(m["identical"]),
    }
