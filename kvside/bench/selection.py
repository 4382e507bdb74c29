"""`kvside bench select`: which cells of a composed cache are worth recomputing, and how far a
perfect choice gets at a given budget.

Documents are attached without repair, then a fraction of their cells is recomputed in place
(native patch), chosen by one signal:

- `random`: any cells (the baseline a signal must beat);
- `keys:block`: the key-share signal of `select:F` (deviation.py), each block spending its own
  budget, as `attach(strategy="select:F")` does;
- `keys:global`: the same signal, one ranking over all blocks;
- `true:L1`: the cells' real KV deviation at layer 1 against a prefill of the same tokens, which is
  what CacheBlend's forward pass of the first layers measures;
- `true:L1-3`, `true:all`: the real deviation summed over layers 1-3 / every layer. `true:all`
  knows every cell's error exactly: no signal that ranks cells by their KV deviation can choose
  better, so it bounds what selective recompute of that many cells can reach.

The `true:` signals read the reference's cache; they measure, they are not a repair kvside can
run (it would need the prefill it avoids). Fidelity: the prefill's answer to a question after the
documents, teacher-forced on both caches (bench compose's measure).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kvside.bench import compose as bench_compose
from kvside.bench.fidelity import compare
from kvside.engine import Engine, compose, deviation, edits, kvstate, native
from kvside.engine.ledger import COMPOSED
from kvside.errors import InvalidRequest

SIGNALS = ("random", "keys:block", "keys:global", "true:L1", "true:L1-3", "true:all")


def _true_layers(signal: str, n_layer: int) -> list[int]:
    return {"true:L1": [1], "true:L1-3": [1, 2, 3], "true:all": list(range(n_layer))}[signal]


def kv_deviation(edited: kvstate.KV, reference: kvstate.KV, positions: np.ndarray, layers: list[int]) -> np.ndarray:
    """Per position: the squared error of the cell's key and value relative to the reference's
    norm, summed over `layers` (both KVs by position)."""
    ie, ir = np.searchsorted(edited.pos, positions), np.searchsorted(reference.pos, positions)
    out = np.zeros(len(positions))
    for il in layers:
        err = ((edited.k[il][ie] - reference.k[il][ir]) ** 2).sum(1) + ((edited.v[il][ie] - reference.v[il][ir]) ** 2).sum(1)
        norm = (reference.k[il][ir] ** 2).sum(1) + (reference.v[il][ir] ** 2).sum(1)
        out += err / np.maximum(norm, 1e-12)
    return out


def choose(core, s, ref, blocks: list[list[int]], signal: str, budget: float) -> list[int]:
    """Ledger indices of the cells to recompute. `blocks`: the ledger indices of each block."""
    cells = [i for b in blocks for i in b]
    n = max(1, round(budget * len(cells)))
    if signal == "random":
        return sorted(np.random.default_rng(0).choice(cells, n, replace=False).tolist())
    if signal.startswith("keys:"):
        # a block's stale context is everything before it after the sink
        asks = [((edits.SINK, s.ledger.pos[b[0]]), [s.ledger.pos[i] for i in b]) for b in blocks]
        per_block = deviation.scores_many(core, s.seq, asks)
        if signal == "keys:block":
            return [b[o] for b, sc in zip(blocks, per_block) for o in deviation.choose(sc, budget)]
        score = np.concatenate(per_block)
    else:
        layers = _true_layers(signal, core.model.info().n_layer)
        edited = kvstate.parse(core.seq_state(s.seq), layers=set(layers)).by_position()
        reference = kvstate.parse(core.seq_state(ref.seq), layers=set(layers)).by_position()
        score = kv_deviation(edited, reference, np.array([s.ledger.pos[i] for i in cells]), layers)
    return sorted(cells[j] for j in np.argsort(-score, kind="stable")[:n])


def measure(engine: Engine, docs: list[Path], signal: str, budget: float, steps: int) -> dict:
    def run(core):
        s = core.new_session(system=bench_compose.SYSTEM)
        ref = core.new_session()
        try:
            q = core.template.delta(s.template_history() + [{"role": "user", "content": "x"}] * len(docs),
                                    [{"role": "user", "content": bench_compose.QUESTION}], add_generation_prompt=True)
            question = core.model.tokenize(q, add_special=False, parse_special=True)
            blocks: list[list[int]] = []
            for d in docs:
                i0 = len(s.ledger)
                compose.attach(core, s, str(d), 0)
                _, entry = compose.find(str(d))
                composed = [i for i in range(i0, len(s.ledger)) if s.ledger.state[i] == COMPOSED]
                for sf in compose.load_blocks(core, entry):
                    k = len(sf.header["tokens"])
                    blocks.append(composed[:k])
                    composed = composed[k:]
            core.prefill(ref, [(0, list(s.ledger.tok))])
            chosen = choose(core, s, ref, blocks, signal, budget) if budget > 0 else []
            if chosen:
                native.recompute(core, s.seq, [s.ledger.pos[i] for i in chosen],
                                 [s.ledger.tok[i] for i in chosen], values_only=False)
            core.probe(ref.name, question)
            forced = question + core.greedy(ref.name, question, steps)[:-1]
            n_q = len(question) - 1
            fid = compare(core.probe(s.name, forced, all_logits=True)[n_q:],
                          core.probe(ref.name, forced, all_logits=True)[n_q:])
            chosen_set = set(chosen)
            n_cells = sum(len(b) for b in blocks)
            return {"documents": len(docs), "signal": signal, "budget": budget, "doc_tokens": n_cells,
                    "recomputed": len(chosen) / n_cells,
                    "per_block": [round(sum(i in chosen_set for i in b) / len(b), 3) for b in blocks],
                    "kl": fid["kl"], "kl_first": fid["kl_first"], "kl_max": fid["kl_max"], "top1": fid["top1"]}
        finally:
            core.delete_session(s.name)
            core.delete_session(ref.name)

    return engine.call(run)


def run(model: str | None, counts: list[int], signals: list[str], budgets: list[float], steps: int,
        n_threads: int | None) -> dict:
    if not native.available():
        raise InvalidRequest("bench select recomputes cells in place: it needs the patched libllama (make native)")
    for sig in signals:
        if sig not in SIGNALS:
            raise InvalidRequest(f"unknown signal {sig!r} (one of {', '.join(SIGNALS)})")
    with bench_compose.compiled(model, max(counts), n_threads) as (engine, docs):
        rows = [measure(engine, docs[:n], "none", 0.0, steps) for n in counts]
        rows += [measure(engine, docs[:n], sig, b, steps) for n in counts for b in budgets for sig in signals]
        info = engine.info()
    rows.sort(key=lambda r: (r["documents"], r["budget"]))
    return {"model": info["model_name"], "steps": steps, "results": rows}


COLUMNS = ["documents", "signal", "budget", "recomputed", "kl", "kl_first", "top1"]


def table(result: dict) -> str:
    lines = [f"select: model {result['model']}, {result['steps']} teacher-forced steps; "
             "true:* signals read the prefill's cache (a bound, not a repair)", " | ".join(COLUMNS)]
    for row in result["results"]:
        lines.append(" | ".join(f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in COLUMNS))
    return "\n".join(lines)
