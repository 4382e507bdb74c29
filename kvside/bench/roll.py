"""`kvside bench roll`: roll a full context with each strategy and measure, in one run, the time
from the edit request to the first token against a re-prefill of the same edited tokens, and the
fidelity of the edited cache (teacher-forced on the reference's greedy continuation)."""

from __future__ import annotations

import time

from kvside.bench import corpus
from kvside.bench.fidelity import compare, degeneration, greedy_match
from kvside.engine import Engine, edits, native

STOCK_STRATEGIES = ["shift", "recompute:16", "recompute:64", "recompute:256", "reprefill"]
# with the native patch: the same budgets as value-only recomputes, and fractions chosen by the
# deviation signal, for the fidelity/cost curve
NATIVE_STRATEGIES = ["values:16", "values:64", "values:256", "values:all", "select:0.05", "select:0.2", "select:0.5"]


def default_strategies() -> list[str]:
    return STOCK_STRATEGIES + (NATIVE_STRATEGIES if native.available() else [])


def measure(engine: Engine, tokens: list[int], drop: int, keep: int, strategy: str, steps: int,
            free_run: int = 0) -> dict:
    """One strategy: tokens[:-1] fill the cache, tokens[-1] is the first token after the edit.

    The reference runs first, alone in an empty cache; then the edit, in the cache emptied again.
    llama.cpp sizes its attention kernels by the extent of used cells, so only this order lets a
    `reprefill` edit reproduce the reference bit for bit (the harness's own check)."""
    context, nxt = tokens[:-1], tokens[-1]
    kept = context[:keep] + context[keep + drop :]

    def run(core):
        assert not core.sessions, "measure needs an empty cache"
        ref = core.new_session()
        try:
            t0 = time.perf_counter()
            core.prefill(ref, [(0, kept)])
            core.probe(ref.name, [nxt])
            t_ref = time.perf_counter() - t0
            cont = core.greedy(ref.name, [nxt], steps)
            forced = [nxt] + cont[:-1]
            reference = core.probe(ref.name, forced, all_logits=True)
            theirs = core.greedy(ref.name, [nxt], free_run) if free_run else []
        finally:
            core.delete_session(ref.name)
        s = core.new_session()
        try:
            core.prefill(s, [(0, context)])
            t0 = time.perf_counter()
            report = edits.roll(core, s, drop, keep, strategy)
            core.probe(s.name, [nxt])
            t_edit = time.perf_counter() - t0
            assert s.ledger.tok == kept, "the roll kept other tokens than expected"
            fid = compare(core.probe(s.name, forced, all_logits=True), reference)
            if free_run:
                mine = core.greedy(s.name, [nxt], free_run)
                fid["greedy_match"] = greedy_match(mine, theirs)
                fid["degeneration"] = degeneration(mine)
                fid["degeneration_ref"] = degeneration(theirs)
            return {
                "strategy": strategy,
                "t_edit_s": t_edit,
                "t_reprefill_s": t_ref,
                "speedup": t_ref / t_edit if t_edit else 0.0,
                **fid,
                "recompute_frac": report["recomputed"] / max(len(s.ledger), 1),
                "dropped": report["dropped"],
                "n_cells": len(s.ledger),
                "fallback": report.get("fallback"),
            }
        finally:
            core.delete_session(s.name)

    return engine.call(run)


def run(model: str | None, ctx: int, drop: int, keep: int, strategies: list[str], steps: int,
        n_threads: int | None) -> dict:
    # flash attention off: a re-prefill then reproduces a cache bit for bit, so the figures
    # below carry no layout noise (see EngineConfig.exact)
    engine = Engine(model=model, n_ctx=ctx + steps + 8, max_sessions=2, n_threads=n_threads, exact=True).start()
    try:
        tokens = engine.call(lambda core: corpus.tokens(core.model, ctx + 1))
        rows = [measure(engine, tokens, drop, keep, s, steps) for s in strategies]
        info = engine.info()
    finally:
        engine.close()
    return {"model": info["model_name"], "ctx": ctx, "drop": drop, "keep": keep, "steps": steps,
            "n_threads": info["n_threads"], "native_patch": info["native_patch"], "attention": info["attention"],
            "results": rows}


COLUMNS = ["strategy", "t_edit_s", "t_reprefill_s", "speedup", "kl", "kl_first", "logit_cos", "top1", "recompute_frac"]


def table(result: dict) -> str:
    lines = [f"roll: ctx {result['ctx']}, drop {result['drop']}, keep {result['keep']}, "
             f"{result['steps']} teacher-forced steps, model {result['model']}, attention {result['attention']}"]
    lines.append(" | ".join(COLUMNS))
    for row in result["results"]:
        cells = [f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in COLUMNS]
        lines.append(" | ".join(cells))
    return "\n".join(lines)


COLORS = {"shift": "tab:red", "recompute": "tab:blue", "values": "tab:purple", "select": "tab:green"}


def plot(results: list[dict], path) -> str:
    """The fidelity/cost curve: kl and top-1 against the recomputed fraction and the edit time, one
    line per strategy family, for one or more `run` results."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(11, 3.6 * len(results)), squeeze=False)
    for (ax_frac, ax_time), result in zip(axes, results):
        families: dict[str, list[dict]] = {}
        for row in result["results"]:
            if row["strategy"] != "reprefill":  # the reference itself: kl exactly 0, off a log axis
                families.setdefault(row["strategy"].split(":")[0], []).append(row)
        for family, rows in sorted(families.items()):
            rows = sorted(rows, key=lambda r: r["recompute_frac"])
            kl = [r["kl"] for r in rows]
            style = dict(marker="o", label=family, color=COLORS.get(family))
            ax_frac.plot([r["recompute_frac"] for r in rows], kl, **style)
            ax_time.plot([r["t_edit_s"] for r in rows], kl, **style)
        title = f"ctx {result['ctx']}, drop {result['drop']}, keep {result['keep']}"
        for ax, xlabel in ((ax_frac, "recomputed fraction of the kept cells"), (ax_time, "edit to first token, s")):
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("kl vs re-prefill (nats)")
            ax.set_title(title)
            ax.legend(fontsize=8)
        ax_time.set_xscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
