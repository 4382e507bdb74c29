"""`kvside eval`: how faithful each edit is against a re-prefill of the same edited tokens, and at
what cost, for any GGUF. Protocols: rolling, compaction (mask vs restart vs the full context),
composition, the K/V analysis of the public rolling-window experiments, and the noise floor.
Every comparison runs with flash attention off (EngineConfig.exact), so a re-prefill reproduces a cache bit for bit and
the harness itself measures zero for `reprefill`."""

from __future__ import annotations

import re
import time

import numpy as np

from kvside.bench import compose as bench_compose
from kvside.bench import corpus
from kvside.bench import roll as bench_roll
from kvside.bench.fidelity import compare
from kvside.engine import Engine, edits, kvstate, native, prompt
from kvside.errors import InvalidRequest

SYSTEM = "You are a helpful assistant. Read carefully and answer precisely."


def settings(quick: bool) -> dict:
    patched = native.available()  # the native strategies join when the patched libllama is loaded
    if quick:
        return {"contexts": [384], "drops": [1 / 384, 0.25, 0.75], "keeps": [0, 4, "system"],
                "strategies": ["shift", "recompute:16"] + (["values:16"] if patched else []) + ["reprefill"],
                "steps": 16, "free_run": 32,
                "docs": [1, 3], "doc_strategies": [0, -1], "kv_ctx": 256}
    return {"contexts": [512, 1024], "drops": [1 / 1024, 0.25, 0.75], "keeps": [0, 4, "system"],
            "strategies": ["shift", "recompute:16", "recompute:64"] + (["values:64", "select:0.1"] if patched else [])
            + ["reprefill"], "steps": 32, "free_run": 48,
            "docs": [1, 3, 8], "doc_strategies": [0, 16, -1] + (["select:0.25"] if patched else []), "kv_ctx": 768}


# -- 1. rolling ---------------------------------------------------------------------------------------
def rolling(engine: Engine, cfg: dict, log) -> list[dict]:
    rows = []
    system = engine.call(lambda core: core.model.tokenize(
        core.template.render([{"role": "system", "content": SYSTEM}], add_generation_prompt=False),
        add_special=core.model.add_bos, parse_special=True))
    for ctx in cfg["contexts"]:
        body = engine.call(lambda core: corpus.tokens(core.model, ctx + 1))
        for keep_spec in cfg["keeps"]:
            tokens = (system + body[1:])[: ctx + 1] if keep_spec == "system" else body
            keep = len(system) if keep_spec == "system" else keep_spec
            for frac in cfg["drops"]:
                drop = max(1, min(int(round(frac * ctx)), ctx - keep - 8))
                for strategy in cfg["strategies"]:
                    r = bench_roll.measure(engine, tokens, drop, keep, strategy, cfg["steps"], cfg["free_run"])
                    r.update(ctx=ctx, keep=keep_spec, drop=drop)
                    rows.append(r)
                    log(f"rolling ctx={ctx} keep={keep_spec} drop={drop} {strategy}: kl {r['kl']:.4f} top1 {r['top1']:.2f}")
    return rows


# -- 5. noise floor -----------------------------------------------------------------------------------
def noise_floor(engine: Engine, ctx: int, delta: int, steps: int) -> dict:
    """seq_add(+d) then seq_add(-d), each applied by a decode, against the untouched cache."""
    def run(core):
        s = core.new_session()
        try:
            tokens = corpus.tokens(core.model, ctx + 1)
            core.prefill(s, [(0, tokens[:-1])])
            child, _ = edits.fork(core, s)
            forced = [tokens[-1]] + core.greedy(s.name, [tokens[-1]], steps - 1)
            for d in (delta, -delta):
                core.mem.add(child.seq, 0, -1, d)
                child.ledger.shift(0, -1, d)
                core.probe(child.name, [tokens[-1]])  # applies the pending K-shift
            out = compare(core.probe(child.name, forced, all_logits=True), core.probe(s.name, forced, all_logits=True))
            core.delete_session(child.name)
            return dict(out, ctx=ctx, delta=delta)
        finally:
            core.delete_session(s.name)

    return engine.call(run)


# -- 2. compaction ------------------------------------------------------------------------------------
# What stands for the fact turns once they are compacted: the full context (oracle); masked, with
# nothing in their place or with the summary appended after the later turns (whose KV saw the
# facts); a re-prefill of the later turns with the summary, or without anything.
COMPACTIONS = {"oracle": None, "mask": ("mask", ""), "mask+summary": ("mask", None),
               "restart+summary": ("restart", None), "restart": ("restart", "")}


def compaction(engine: Engine, steps: int, log, chats: int | None = None) -> dict:
    """The chats in tests/data/compaction.json: facts, filler, then questions after compaction."""
    fixture = corpus.compaction()["chats"][:chats]
    results = {"chats": [], "questions": []}
    for chat in fixture:
        out = _compaction_chat(engine, chat, steps, log)
        results["chats"].append({k: out[k] for k in ("summary", "summary_source")})
        results["questions"] += out["questions"]
    qs = results["questions"]
    results["facts"] = len(qs)
    results["recall"] = {m: round(sum(q["recall"][m] for q in qs) / len(qs), 3) for m in COMPACTIONS}
    results["kl_vs_oracle"] = {m: float(np.mean([q["kl_vs_oracle"][m] for q in qs])) for m in COMPACTIONS if m != "oracle"}
    return results


def _compaction_chat(engine: Engine, chat: dict, steps: int, log) -> dict:
    greedy = dict(temperature=0.0, repeat_penalty=1.0, max_tokens=40)
    base = engine.new_session(system=SYSTEM)
    variants: dict[str, str] = {}
    try:
        for text in [f["say"] for f in chat["facts"]] + chat["filler"]:
            engine.chat(base, text, **greedy).wait()
        fact_ids = [m["id"] for m in engine.messages(base) if m["role"] != "system"][: 2 * len(chat["facts"])]
        summary, source = engine.call(lambda core: edits.write_summary(core, core.get(base), fact_ids, 96))
        log(f"compaction summary ({source}): {summary!r}")
        for mode, how in COMPACTIONS.items():
            name = engine.fork(base)
            if how is not None:
                engine.compact(name, up_to=fact_ids[-1], summary=summary if how[1] is None else how[1], mode=how[0])
            variants[mode] = name
        questions = []
        for fact in chat["facts"]:
            q = fact["ask"]
            answers, logits = {}, {}
            probes = {mode: engine.call(lambda core, n=name: _question_tokens(core, core.get(n), q))
                      for mode, name in variants.items()}
            for mode, name in variants.items():
                answers[mode] = engine.call(lambda core, n=name, p=probes[mode]: core.model.detokenize(core.greedy(n, p, 24)))
            oracle_cont = engine.call(lambda core: core.greedy(variants["oracle"], probes["oracle"], steps))
            for mode, name in variants.items():
                rows = engine.next_logits(name, probes[mode] + oracle_cont[:-1], all_logits=True)
                logits[mode] = rows[len(probes[mode]) - 1:]
            entry = {"question": q, "expect": fact["expect"],
                     "recall": {m: fact["expect"] in a.lower() for m, a in answers.items()},
                     "answers": answers,
                     "kl_vs_oracle": {m: compare(logits[m], logits["oracle"])["kl"] for m in variants if m != "oracle"}}
            questions.append(entry)
            log(f"compaction {q!r}: recall {entry['recall']}")
        return {"summary": summary, "summary_source": source, "questions": questions}
    finally:
        for name in variants.values():
            engine.delete_session(name)
        engine.delete_session(base)


def _question_tokens(core, s, question: str) -> list[int]:
    pieces = prompt.chat_pieces(core, s, [], generation=False)
    head = [t for _, toks in pieces for t in toks]
    text = core.template.delta(s.template_history(), [{"role": "user", "content": question}], add_generation_prompt=True)
    return head + core.model.tokenize(text, add_special=False, parse_special=True)


# -- 4. K/V analysis ----------------------------------------------------------------------------------
def kv_analysis(engine: Engine, ctx: int, drop: int, keep: int) -> dict:
    """Keys and values of the kept window: the suffix cache (before and after re-rotation) against a
    re-prefill of the kept tokens, per layer and per position; keys raw and with RoPE undone."""
    def run(core):
        info = core.model.info()
        if info.rope_type not in ("norm", "neox"):
            return {"skipped": f"rope type {info.rope_type}"}
        head_dim = info.n_embd // info.n_head
        base = info.rope_freq_base or 10000.0
        neox = info.rope_type == "neox"
        s = core.new_session()
        ref = core.new_session()
        try:
            tokens = corpus.tokens(core.model, ctx)
            core.prefill(s, [(0, tokens)])
            before = kvstate.parse(core.seq_state(s.seq))
            edits.roll(core, s, drop, keep, "shift")
            core.probe(s.name, [tokens[-1]])  # applies the K-shift
            after = kvstate.parse(core.seq_state(s.seq))
            core.prefill(ref, [(0, list(s.ledger.tok))])
            reference = kvstate.parse(core.seq_state(ref.seq))
        finally:
            core.delete_session(s.name)
            core.delete_session(ref.name)
        window_old = slice(keep + drop, ctx)  # the kept window in the original cache
        window_new = slice(keep, ctx - drop)
        out = {"ctx": ctx, "drop": drop, "keep": keep, "rope": info.rope_type, "layers": []}
        per_pos = {"k_raw_before": [], "k_unroped_before": [], "k_after": [], "v": []}
        for layer in range(len(reference.k)):
            kb = before.k[layer][window_old]
            ka = after.k[layer][window_new]
            kr = reference.k[layer][window_new]
            vb = before.v[layer][window_old]
            vr = reference.v[layer][window_new]
            pb, pr = before.pos[window_old], reference.pos[window_new]
            ub = kvstate.unrope(kb, pb, head_dim, base, neox)
            ur = kvstate.unrope(kr, pr, head_dim, base, neox)
            series = {"k_raw_before": kvstate.cosine_rows(kb, kr), "k_unroped_before": kvstate.cosine_rows(ub, ur),
                      "k_after": kvstate.cosine_rows(ka, kr), "v": kvstate.cosine_rows(vb, vr)}
            out["layers"].append({k: float(v.mean()) for k, v in series.items()})
            for k, v in series.items():
                per_pos[k].append(v)
        out["per_position"] = {k: np.mean(v, axis=0).tolist() for k, v in per_pos.items()}
        out["mean"] = {k: float(np.mean([l[k] for l in out["layers"]])) for k in per_pos}
        return out

    return engine.call(run)


# -- the whole eval -----------------------------------------------------------------------------------
SECTIONS = ("noise", "rolling", "kv", "compaction", "composition")


def run(model: str | None, quick: bool, n_threads: int | None, log=lambda m: None,
        only: tuple[str, ...] = SECTIONS) -> dict:
    """Every section of the eval, or those in `only`; a section left out is None in the result."""
    unknown = set(only) - set(SECTIONS)
    if unknown:
        raise InvalidRequest(f"unknown eval section(s) {', '.join(sorted(unknown))} (known: {', '.join(SECTIONS)})")
    cfg = settings(quick)
    t0 = time.perf_counter()
    n_ctx = max(cfg["contexts"]) + cfg["steps"] + cfg["free_run"] + 16
    engine = Engine(model=model, n_ctx=max(n_ctx, 1024), max_sessions=len(COMPACTIONS) + 1, n_threads=n_threads, exact=True).start()
    result = dict.fromkeys(("noise_floor", "rolling", "kv_analysis", "compaction", "composition"))
    try:
        info = engine.info()
        result.update({"model": info["model_name"], "quick": quick, "settings": cfg, "sections": list(only),
                       "memory": "recurrent" if info["recurrent"] else
                       f"sliding window {info['sliding_window']}" if info["sliding_window"] else "attention"})
        # (a cache that cannot shift has no re-rotation to measure: its edits read again)
        if "noise" in only and info["can_shift"]:
            result["noise_floor"] = noise_floor(engine, min(cfg["contexts"]), 16, cfg["steps"])
            log(f"noise floor: kl {result['noise_floor']['kl']:.2e}")
        if "rolling" in only:
            result["rolling"] = rolling(engine, cfg, log)
        if "kv" in only:
            result["kv_analysis"] = kv_analysis(engine, cfg["kv_ctx"], cfg["kv_ctx"] // 4, 4)
            log(f"kv analysis: {result['kv_analysis'].get('mean')}")
        if "compaction" in only:
            result["compaction"] = compaction(engine, cfg["steps"], log, chats=1 if quick else None)
    finally:
        engine.close()
    if "composition" in only:
        if result["memory"] == "recurrent" or not info["can_shift"]:
            result["composition"] = []  # nothing can be spliced or moved into place (compose.attach)
        else:
            result["composition"] = bench_compose.run(model, cfg["docs"], cfg["doc_strategies"], cfg["steps"],
                                                      n_threads)["results"]
    result["t_total_s"] = time.perf_counter() - t0
    return result


def tables(result: dict) -> str:
    lines = [f"kvside eval: model {result['model']}{' (quick)' if result['quick'] else ''}, "
             f"memory: {result.get('memory', 'attention')}"]
    only = result.get("sections", SECTIONS)
    nf = result["noise_floor"]
    if "noise" not in only:
        pass
    elif nf is None:
        lines.append("noise floor: none (this cache cannot shift positions: every edit that moves cells reads again)")
    else:
        lines.append(f"noise floor (seq_add +{nf['delta']} then -{nf['delta']}, ctx {nf['ctx']}): kl {nf['kl']:.3g}, "
                     f"max logit diff {nf['max_abs_diff']:.3g}, top1 {nf['top1']:.3f}")
    if result["rolling"] is not None:
        lines.append("\nrolling | ctx | keep | drop | strategy | t_edit_s | t_reprefill_s | speedup | kl | logit_cos | top1 | greedy_match | degeneration")
    for r in result["rolling"] or []:
        strategy = r["strategy"] + (" (fell back to reprefill)" if r.get("fallback") else "")
        lines.append(f"| {r['ctx']} | {r['keep']} | {r['drop']} | {strategy} | {r['t_edit_s']:.3f} | "
                     f"{r['t_reprefill_s']:.3f} | {r['speedup']:.1f} | {r['kl']:.4f} | {r['logit_cos']:.4f} | "
                     f"{r['top1']:.3f} | {r.get('greedy_match', '')} | {r.get('degeneration', 0):.3f}")
    kv = result["kv_analysis"] or {}
    if "mean" in kv:
        lines.append(f"\nK/V analysis (ctx {kv['ctx']}, drop {kv['drop']}, keep {kv['keep']}, rope {kv['rope']}), "
                     "mean cosine over layers against the re-prefill:")
        for k, v in kv["mean"].items():
            lines.append(f"  {k}: {v:.4f}")
    c = result["compaction"]
    if c is not None:
        lines.append(f"\ncompaction ({c['facts']} planted facts) | recall | kl vs full context")
        for mode, recall in c["recall"].items():
            kl = c["kl_vs_oracle"].get(mode)
            lines.append(f"| {mode} | {recall:.2f} | {'-' if kl is None else f'{kl:.3f}'}")
        lines.append("summaries: " + "; ".join(f"{ch['summary_source']}: {ch['summary'][:80]!r}" for ch in c["chats"]))
    if result["composition"] is not None:
        lines.append("\ncomposition | documents | recompute | t_attach_s | t_prefill_s | speedup | kl | logit_cos | top1")
    if result["composition"] == []:
        lines.append("| (not applicable: a recurrent state cannot take spliced blocks) |")
    for r in result["composition"] or []:
        lines.append(f"| {r['documents']} | {r['recompute']} | {r['t_attach_s']:.3f} | {r['t_prefill_s']:.3f} | "
                     f"{r['speedup']:.1f} | {r['kl']:.4f} | {r['logit_cos']:.4f} | {r['top1']:.3f}")
    return "\n".join(lines)


def comparison(results: list[dict]) -> str:
    """One table across models: per model, the noise floor, the worst roll short of a re-prefill
    (lowest top1), compaction recall per mode, and the composition without recompute."""
    modes = list(COMPACTIONS)
    lines = ["models | noise kl | worst roll (drop, strategy): kl / top1 | recall " + " / ".join(modes) +
             " | compose 3 docs, no recompute: kl / top1"]
    for r in results:
        nf = r["noise_floor"]
        rolls = [x for x in r["rolling"] or [] if x["strategy"] != "reprefill" and not x.get("fallback")]
        worst = min(rolls, key=lambda x: x["top1"]) if rolls else None
        roll = f"{worst['drop']}, {worst['strategy']}: {worst['kl']:.4f} / {worst['top1']:.3f}" if worst else "-"
        recall = " / ".join(f"{r['compaction']['recall'][m]:.2f}" for m in modes) if r["compaction"] else "-"
        plain = [x for x in r["composition"] or [] if x["documents"] == 3 and x["recompute"] in (0, "none", "0")]
        comp = f"{plain[0]['kl']:.4f} / {plain[0]['top1']:.3f}" if plain else "-"
        lines.append(f"| {r['model']} | {nf['kl']:.2e} | {roll} | {recall} | {comp}" if nf else
                     f"| {r['model']} | - | {roll} | {recall} | {comp}")
    return "\n".join(lines)


def plot(result: dict, folder) -> list[str]:
    """PNG figures: fidelity against drop size per strategy, and the K/V analysis."""
    from pathlib import Path

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from kvside.errors import KvsideError

        raise KvsideError("--plot needs matplotlib: pip install 'kvside[plot]'") from None
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    rows = result["rolling"] or []
    for keep in sorted({str(r["keep"]) for r in rows}):
        fig, ax = plt.subplots(figsize=(6, 4))
        for strategy in sorted({r["strategy"] for r in rows}):
            pts = sorted((r["drop"] / r["ctx"], r["kl"]) for r in rows if str(r["keep"]) == keep and r["strategy"] == strategy)
            if pts:
                ax.plot([p[0] for p in pts], [max(p[1], 1e-7) for p in pts], marker="o", label=strategy)
        ax.set_yscale("log")
        ax.set_xlabel("dropped fraction of the context")
        ax.set_ylabel("KL(reprefill || edited), nats")
        ax.set_title(f"rolling, keep {keep}")
        ax.legend()
        path = folder / f"rolling_keep_{re.sub(r'[^a-z0-9]', '', keep)}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path))
    kv = result["kv_analysis"] or {}
    if "layers" in kv:
        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
        for key in kv["mean"]:
            a.plot([l[key] for l in kv["layers"]], label=key)
            b.plot(kv["per_position"][key], label=key)
        a.set_xlabel("layer")
        a.set_ylabel("cosine vs re-prefill")
        b.set_xlabel("position in the kept window")
        a.legend()
        a.set_title("per layer")
        b.set_title("per position (mean over layers)")
        fig.tight_layout()
        path = folder / "kv_analysis.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path))
    return written
