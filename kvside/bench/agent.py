"""`kvside bench agent`: an agent loop past the window, three ways.

Each round the "agent" gets a tool result of a few hundred tokens (build-log filler with one fact
planted at its end: a record's access code) and answers briefly; the client resends the whole
history every round, as agents do. Once the history outgrows n_ctx:
- prune: kvside with --prune-tools keep_last=K masks old tool results' cells and closes the hole;
- roll: kvside without the policy rolls whole oldest turns (suffix caching);
- reprefill: what a runtime without cache edits does: the client drops the oldest rounds (system
  prompt and task kept) and the server prefills the trimmed history from scratch every round.
Measured per round: time to first token and cached tokens; at the end, recall: the model is asked
for the codes planted in the last R tool results (each question on a fork, so questions do not
see each other)."""

from __future__ import annotations

import random
import time

from kvside.bench import corpus, median
from kvside.engine import Engine

SYSTEM = "You are a build agent. Read each tool result carefully; answer in one short sentence."
TASK = "Check the build logs one by one and remember every record's access code."
GREEDY = {"temperature": 0.0, "repeat_penalty": 1.0}


def _tool_outputs(model, rounds: int, tool_tokens: int, seed: int) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    words = corpus.text().split()
    outputs, codes = [], []
    for i in range(rounds):
        code = f"{rng.randrange(1000, 10000)}"
        fact = f"\nRecord {i}: the access code is {code}."
        start = rng.randrange(0, max(len(words) - 4 * tool_tokens, 1))
        filler = ""
        for n in range(tool_tokens // 2, 4 * tool_tokens, 8):
            filler = " ".join(words[start : start + n])
            if len(model.tokenize(filler + fact, add_special=False, parse_special=False)) >= tool_tokens:
                break
        outputs.append(f"build log {i}:\n{filler}{fact}")
        codes.append(code)
    return outputs, codes


def _question(i: int) -> dict:
    return {"role": "user", "content": f"What is the access code of record {i}? Reply with the number only."}


def _fits(engine: Engine, messages: list[dict], budget: int) -> list[dict]:
    """The re-prefill client: drop the oldest rounds (keeping system prompt and task) until the
    rendered history fits `budget` tokens."""
    head, rest = messages[:2], messages[2:]

    def size(msgs):
        return engine.call(lambda core: len(core.model.tokenize(
            core.template.render(msgs, add_generation_prompt=True), add_special=False, parse_special=True)))

    while rest and size(head + rest) > budget:
        rest = rest[2:]
    return head + rest


def _run_mode(mode: str, model, n_ctx: int, threads, outputs: list[str], codes: list[str], keep: int,
              recall_last: int, max_tokens: int) -> dict:
    with Engine(model=model, n_ctx=n_ctx, max_sessions=2, n_threads=threads,
                prune_tools=keep if mode == "prune" else None) as e:
        history = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": TASK}]
        turns = []
        name = e.new_session("agent")
        for out in outputs:
            if mode == "reprefill":
                sent = _fits(e, history, n_ctx - max_tokens - 1)
                t0 = time.perf_counter()
                c = e.bind_chat(sent, reuse=False, max_tokens=max_tokens, **GREEDY).wait()
            else:
                t0 = time.perf_counter()
                c = e.bind_chat(history, session=name, max_tokens=max_tokens, **GREEDY).wait()
            turns.append({"ttft_s": round(c.t_prefill_s, 4), "wall_s": round(time.perf_counter() - t0, 3),
                          "prompt_tokens": c.usage.prompt_tokens, "cached_tokens": c.usage.cached_tokens,
                          "edits": [n["kind"] for n in c.notices]})
            history += [{"role": "assistant", "content": c.text or "Noted."},
                        {"role": "tool", "content": out}]
        hits = []
        for i in range(len(codes) - recall_last, len(codes)):
            asked = history + [_question(i)]
            if mode == "reprefill":
                c = e.bind_chat(_fits(e, asked, n_ctx - 16), reuse=False, max_tokens=12, **GREEDY).wait()
            else:
                fork = e.fork(name)
                c = e.bind_chat(asked, session=fork, max_tokens=12, **GREEDY).wait()
                e.delete_session(fork)
            hits.append(codes[i] in c.text)
    full = [t for t in turns if t["edits"] or t["prompt_tokens"] + max_tokens >= n_ctx * 0.9] or turns
    late = turns[len(turns) // 2 :]
    return {"turns": turns, "late_ttft_median_s": round(median([t["ttft_s"] for t in late]), 4),
            "late_cached_median": median([t["cached_tokens"] for t in late]),
            "first_edit_turn": next((i for i, t in enumerate(turns) if t["edits"]), None),
            "ttft_when_full_median_s": round(median([t["ttft_s"] for t in full]), 4),
            "recall": sum(hits) / len(hits) if hits else 0.0, "recall_hits": hits}


def run(model: str | None, rounds: int = 12, tool_tokens: int = 300, n_ctx: int = 2048, keep: int = 2,
        recall_last: int = 3, threads: int | None = None, max_tokens: int = 16, seed: int = 7,
        modes: tuple[str, ...] = ("prune", "roll", "reprefill")) -> dict:
    with Engine(model=model, n_ctx=256, max_sessions=1, n_threads=threads) as probe:
        outputs, codes = probe.call(lambda core: _tool_outputs(core.model, rounds, tool_tokens, seed))
        info = probe.info()
    result = {"model": info["model_name"], "n_threads": info["n_threads"], "n_ctx": n_ctx, "rounds": rounds,
              "tool_tokens": tool_tokens, "keep_last": keep, "recall_last": min(recall_last, rounds)}
    for mode in modes:
        result[mode] = _run_mode(mode, model, n_ctx, threads, outputs, codes, keep, min(recall_last, rounds),
                                 max_tokens)
    return result


def table(result: dict) -> str:
    rows = [f"kvside bench agent: {result['model']}, {result['n_threads']} threads, n_ctx {result['n_ctx']}, "
            f"{result['rounds']} rounds of ~{result['tool_tokens']}-token tool results; recall of the codes in "
            f"the last {result['recall_last']} results",
            f"{'mode':<11} {'late TTFT s':>12} {'TTFT full s':>12} {'late cached':>12} {'1st edit':>9} {'recall':>7}"]
    for mode in ("prune", "roll", "reprefill"):
        if mode in result:
            r = result[mode]
            first = "-" if r["first_edit_turn"] is None else str(r["first_edit_turn"])
            rows.append(f"{mode:<11} {r['late_ttft_median_s']:>12.3f} {r['ttft_when_full_median_s']:>12.3f} "
                        f"{r['late_cached_median']:>12.0f} {first:>9} {r['recall']:>7.2f}")
    return "\n".join(rows)
