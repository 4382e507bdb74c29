"""`kvside bench compose`: attach 1, 3 and 8 precompiled documents to a session and measure, in one
run, the time to first token against a prefill of the same concatenated tokens, and the fidelity of
the composed cache per strategy: an integer k recomputes the first k tokens of each block (-1 =
all), a name is an edit strategy (values:R on each block; select:F with one budget over all the
blocks; both need the native patch). The documents are attached in one call."""

from __future__ import annotations

import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from kvside.bench import corpus
from kvside.bench.fidelity import compare
from kvside.engine import Engine, compose, native

SYSTEM = "Answer questions about the documents."
QUESTION = "Summarize what these documents describe."


def _write_documents(folder: Path, n: int) -> list[Path]:
    """The first n prose fixtures, each cut to 1,400 characters (about 300 tokens)."""
    sources = corpus.documents()
    if len(sources) < n:
        raise ValueError(f"{n} documents asked for, {len(sources)} fixtures in {corpus.data_dir()}")
    paths = []
    for src in sources[:n]:
        path = folder / src.name
        path.write_text(src.read_text(encoding="utf-8")[:1400])
        paths.append(path)
    return paths


def default_strategies() -> list:
    return [0, 16, -1] + (["values:16", "select:0.15", "select:0.25"] if native.available() else [])


def measure(engine: Engine, docs: list[Path], recompute: int | str, steps: int) -> dict:
    def run(core):
        s = core.new_session(system=SYSTEM)
        ref = core.new_session()
        try:
            q = core.template.delta(s.template_history() + [{"role": "user", "content": "x"}] * len(docs),
                                    [{"role": "user", "content": QUESTION}], add_generation_prompt=True)
            question = core.model.tokenize(q, add_special=False, parse_special=True)
            t0 = time.perf_counter()
            # in one call, as a request naming its documents does (select:F ranks all their cells)
            if isinstance(recompute, str):
                compose.attach_documents(core, s, [str(d) for d in docs], strategy=recompute)
            else:
                compose.attach_documents(core, s, [str(d) for d in docs], recompute)
            core.probe(s.name, question)
            t_attach = time.perf_counter() - t0
            tokens = list(s.ledger.tok)
            t0 = time.perf_counter()
            core.prefill(ref, [(0, tokens)])
            core.probe(ref.name, question)
            t_prefill = time.perf_counter() - t0
            cont = core.greedy(ref.name, question, steps)
            forced = question + cont[:-1]
            n_q = len(question) - 1
            e = core.probe(s.name, forced, all_logits=True)[n_q:]
            r = core.probe(ref.name, forced, all_logits=True)[n_q:]
            recomputed = sum(1 for st in s.ledger.state if st == "recomputed")
            return {"documents": len(docs), "recompute": recompute, "doc_tokens": len(tokens),
                    "t_attach_s": t_attach, "t_prefill_s": t_prefill, "speedup": t_prefill / t_attach,
                    "recompute_frac": recomputed / len(tokens), **compare(e, r)}
        finally:
            core.delete_session(s.name)
            core.delete_session(ref.name)

    return engine.call(run)


@contextmanager
def compiled(model: str | None, n_docs: int, n_threads: int | None):
    """An exact engine (n_ctx 4096) with the first n_docs prose fixtures compiled, in a temporary
    KVSIDE_HOME so the blocks of a benchmark stay out of the user's store: (engine, paths)."""
    home = tempfile.mkdtemp(prefix="kvside-bench-compose-")
    old = os.environ.get("KVSIDE_HOME")
    os.environ["KVSIDE_HOME"] = home
    try:
        folder = Path(home) / "docs"
        folder.mkdir()
        docs = _write_documents(folder, n_docs)
        engine = Engine(model=model, n_ctx=4096, max_sessions=2, n_threads=n_threads, exact=True).start()
        try:
            for d in docs:
                engine.compile(str(d))
            yield engine, docs
        finally:
            engine.close()
    finally:
        if old is None:
            os.environ.pop("KVSIDE_HOME", None)
        else:
            os.environ["KVSIDE_HOME"] = old


def run(model: str | None, counts: list[int], strategies: list, steps: int, n_threads: int | None) -> dict:
    with compiled(model, max(counts), n_threads) as (engine, docs):
        rows = [measure(engine, docs[:n], k, steps) for n in counts for k in strategies]
        info = engine.info()
    return {"model": info["model_name"], "steps": steps, "results": rows}


COLUMNS = ["documents", "recompute", "doc_tokens", "t_attach_s", "t_prefill_s", "speedup", "kl", "logit_cos", "top1"]


def table(result: dict) -> str:
    lines = [f"compose: model {result['model']}, {result['steps']} teacher-forced steps; recompute -1 = whole blocks",
             " | ".join(COLUMNS)]
    for row in result["results"]:
        lines.append(" | ".join(f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in COLUMNS))
    return "\n".join(lines)
