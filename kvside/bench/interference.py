"""`kvside bench interference`: how much one session's long work stalls another session's stream.

A session streams greedily while, in the same engine, another session compiles a document and a
third re-prefills its whole context. Measured: the gaps between the streaming session's tokens,
(1) with the stream alone, (2) with the long work run as jobs (a chunk between decode steps, what
kvside does), and (3) with the same work run whole on the engine thread (what it did before: the
reference). The work's own wall time is reported beside each, so the price of chunking shows too."""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

from kvside.bench import corpus, median
from kvside.engine import Engine, compose, edits
from kvside.engine.jobs import JOB_CHUNK


def run(model: str | None, doc_kb: int = 100, reprefill_tokens: int = 2048, n_ctx: int = 4096,
        threads: int | None = None) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="kvside-bench-interference-"))
    doc = folder / "document.txt"
    text = corpus.text()
    doc.write_text((text * (doc_kb * 1024 // len(text) + 1))[: doc_kb * 1024], encoding="utf-8")
    with Engine(model=model, n_ctx=n_ctx, max_sessions=3, n_threads=threads, sessions_dir=str(folder / "s")) as e:
        busy = e.new_session("rebuild")
        context = e.call(lambda core: corpus.tokens(core.model, reprefill_tokens))
        e.call(lambda core: core.prefill(core.get(busy), [(0, context)]))
        stream = e.new_session("stream")
        alone = _gaps(e, stream, lambda: time.sleep(8.0))

        def as_jobs():
            _both(lambda: e.compile(str(doc)), lambda: e.roll(busy, drop=1, keep=1, strategy="reprefill"))

        chunked = _gaps(e, stream, as_jobs, doc, fresh=True)

        def whole():
            # the same work as one engine task each: compose and edits called directly, to the end
            _both(lambda: e.call(lambda core: compose.compile_document(core, doc)),
                  lambda: e.call(lambda core: edits.roll(core, core.get(busy), 1, keep=1, strategy="reprefill")))

        blocking = _gaps(e, stream, whole, doc, fresh=True)
        n_doc = e.call(lambda core: len(core.model.tokenize(doc.read_text(), add_special=False, parse_special=False)))
        info = e.info()
    return {"model": info["model_name"], "n_threads": info["n_threads"], "doc_kb": doc_kb, "doc_tokens": n_doc,
            "reprefill_tokens": reprefill_tokens, "job_chunk_tokens": JOB_CHUNK,
            "alone": alone, "jobs": chunked, "whole": blocking}


def _both(first, second) -> None:
    """Run two blocking engine calls from two threads at once; re-raise the first failure."""
    errors: list[BaseException] = []

    def run(fn):
        try:
            fn()
        except BaseException as exc:  # reported to the caller below
            errors.append(exc)

    workers = [threading.Thread(target=run, args=(fn,)) for fn in (first, second)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if errors:
        raise errors[0]


def _gaps(engine: Engine, session: str, work, doc: Path | None = None, fresh: bool = False) -> dict:
    """Stream in `session` while `work()` runs; the gaps between tokens while it ran."""
    if fresh and doc is not None:
        compose.forget_document(doc)  # compile it again, not reuse the blocks
    stamps: list[float] = []
    stream = engine.chat(session, "Tell a long story about a lighthouse.", max_tokens=100000, ignore_eos=True,
                         temperature=0.0, on_event=lambda ev: ev.kind == "text" and stamps.append(time.perf_counter()))
    while len(stamps) < 8:  # streaming before the work starts
        time.sleep(0.01)
    t0 = time.perf_counter()
    work()
    t1 = time.perf_counter()
    stream.cancel()
    stream.wait()
    engine.delete_session(session)
    engine.new_session(session)
    during = [b - a for a, b in zip(stamps, stamps[1:]) if b > t0 and a < t1]
    return {"work_s": round(t1 - t0, 3), "tokens_during": len(during), "worst_gap_s": round(max(during, default=0), 3),
            "p50_gap_s": round(median(during), 4),
            "p99_gap_s": round(sorted(during)[int(0.99 * (len(during) - 1))], 4) if during else 0.0}


def table(result: dict) -> str:
    rows = [f"kvside bench interference: {result['model']}, {result['n_threads']} threads; a stream beside a "
            f"compile of {result['doc_kb']} KB ({result['doc_tokens']} tokens) and a re-prefill of "
            f"{result['reprefill_tokens']} tokens; jobs advance {result['job_chunk_tokens']} tokens at a time",
            f"{'run':<28} {'work s':>8} {'tokens':>7} {'worst gap s':>12} {'p50 gap s':>10} {'p99 gap s':>10}"]
    for key, label in (("alone", "stream alone (8 s)"), ("jobs", "beside the work, as jobs"),
                       ("whole", "beside the work, run whole")):
        r = result[key]
        rows.append(f"{label:<28} {r['work_s']:>8.1f} {r['tokens_during']:>7} {r['worst_gap_s']:>12.3f} "
                    f"{r['p50_gap_s']:>10.4f} {r['p99_gap_s']:>10.4f}")
    return "\n".join(rows)
