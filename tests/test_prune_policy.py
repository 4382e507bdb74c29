"""The agent policy: when the window fills, old tool results lose their cells (the last N stay)
before any whole turn is rolled away; the system prompt and the calls around the results keep
their cache, and the reply says what was done."""

import pytest

from conftest import GREEDY
from kvside.engine.session import MSG_LIVE, MSG_PRUNED

TOOL_OUTPUT = " ".join(f"line {i}: value={i * 7} status=ok;" for i in range(14))  # about 110 tokens


def agent_loop(engine, name: str, rounds: int) -> list:
    history = [{"role": "system", "content": "You are a coding agent."},
               {"role": "user", "content": "Inspect the build logs and report."}]
    completions = []
    for i in range(rounds):
        c = engine.bind_chat(history, session=name, max_tokens=4, **GREEDY).wait()
        completions.append(c)
        history += [{"role": "assistant", "content": c.text or "Reading."},
                    {"role": "tool", "content": f"log {i}: {TOOL_OUTPUT}"}]
    return completions


def messages_of(engine, name):
    return engine.call(lambda core: [(m.role, m.kind, m.state, bool(core.sessions[name].ledger.positions_of({m.id})))
                                     for m in core.sessions[name].messages])


def test_prune_policy_masks_old_tool_results_instead_of_rolling_turns(engine):
    name = engine.new_session("agent-prune")
    engine.set_prune_tools(name, 1)
    try:
        completions = agent_loop(engine, name, 7)
        notices = [n for c in completions for n in c.notices]
        assert notices and all(n["kind"] == "prune" for n in notices), notices
        assert "tool results" in notices[0]["message"]
        msgs = messages_of(engine, name)
        tools = [m for m in msgs if m[1] == "tool"]
        assert tools[-1][2] == MSG_LIVE and tools[-1][3], "the last tool result keeps its cells"
        assert any(state == MSG_PRUNED and not cells for _, _, state, cells in tools)
        # nothing but tool results lost its cells: the system prompt, the task and every reply stay
        assert all(state == MSG_LIVE and cells for role, kind, state, cells in msgs if kind != "tool")
    finally:
        engine.delete_session(name)


def test_without_the_policy_whole_turns_roll(engine):
    name = engine.new_session("agent-roll")
    try:
        completions = agent_loop(engine, name, 7)
        notices = [n for c in completions for n in c.notices]
        assert notices and all(n["kind"] == "roll" for n in notices)
        msgs = messages_of(engine, name)
        assert any(kind == "chat" and role in ("user", "assistant") and not cells for role, kind, _, cells in msgs)
    finally:
        engine.delete_session(name)


def test_policy_is_set_per_session_through_the_edit_table(engine):
    from kvside.engine import commands
    from kvside.errors import InvalidRequest

    name = engine.new_session()
    try:
        assert commands.apply(engine, name, "policy", {"prune_tools": 2}) == {"prune_tools": 2}
        assert engine.call(lambda core: core.sessions[name].prune_tools) == 2
        commands.apply(engine, name, "policy", {"prune_tools": None})
        assert engine.call(lambda core: core.sessions[name].prune_tools) is None
        with pytest.raises(InvalidRequest):
            commands.apply(engine, name, "policy", {"prune_tools": -1})
        with pytest.raises(InvalidRequest):
            commands.apply(engine, name, "policy", {})
    finally:
        engine.delete_session(name)


def test_bench_agent_runs_the_three_ways_side_by_side():
    """`kvside bench agent` at toy size: the prune run edits by pruning, the roll run by rolling,
    the re-prefill run reuses nothing; recall is measured for each."""
    from kvside.bench import agent

    result = agent.run(None, rounds=5, tool_tokens=64, n_ctx=256, keep=0, recall_last=1, threads=2, max_tokens=4)
    kinds = {mode: {k for t in result[mode]["turns"] for k in t["edits"]} for mode in ("prune", "roll", "reprefill")}
    assert "prune" in kinds["prune"]  # at this toy size some turns roll too, when pruning is not enough
    assert kinds["roll"] == {"roll"} and kinds["reprefill"] == set()
    assert all(t["cached_tokens"] == 0 for t in result["reprefill"]["turns"])
    assert result["prune"]["late_cached_median"] > 0
    assert all(0.0 <= result[m]["recall"] <= 1.0 and len(result[m]["recall_hits"]) == 1 for m in kinds)
    assert "prune" in agent.table(result)


def test_tools_calls_and_policy_survive_save_and_restore(engine, tmp_path):
    """A session file keeps the tool definitions, the calls and results, and the policy; the
    restored session answers the next turn from its cache."""
    from kvside.engine.reply import ReplySpec

    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {
        "type": "object", "properties": {"key": {"type": "string"}}, "required": ["key"]}}}]
    name = engine.new_session("tools-saved")
    engine.set_prune_tools(name, 3)
    history = [{"role": "user", "content": "Look up the key alpha."}]
    c = engine.bind_chat(history, session=name, reply=ReplySpec(tools=tools, tool_choice="required", parallel=False),
                         max_tokens=60, **GREEDY).wait()
    assert c.finish_reason == "tool_calls"
    path = tmp_path / "tools.kvs"
    engine.save(name, str(path))
    engine.delete_session(name)
    restored = engine.restore(str(path), "tools-restored")
    try:
        facts = engine.call(lambda core: (core.sessions[restored].tools, core.sessions[restored].prune_tools,
                                          core.sessions[restored].messages[-1].tool_calls))
        assert facts == (tools, 3, c.tool_calls)
        history += [{"role": "assistant", "content": None, "tool_calls": c.tool_calls},
                    {"role": "tool", "tool_call_id": c.tool_calls[0]["id"], "content": "alpha=42"}]
        after = engine.bind_chat(history, session=restored, reply=ReplySpec(tools=tools), max_tokens=4,
                                 **GREEDY).wait()
        assert after.usage.cached_tokens >= c.usage.prompt_tokens
    finally:
        engine.delete_session(restored)
