"""Every cache edit on every kind of llama.cpp memory, on tiny random-weight GGUFs (tinygguf.py):
plain attention (llama, qwen2), interleaved sliding-window attention (gemma3: five of six layers
keep only the last 32 positions), a recurrent state (mamba: no cells to remove or move) and a hybrid
(lfm2: short-convolution layers with a recurrent state beside an attention layer).

What must hold on each: after every edit the ledger equals the cache and the session goes on;
with `reprefill` as the strategy an edited session's next-token logits equal a fresh prefill of the
same messages, also where the cache no longer holds what the edit went back to (a sliding window
that lost its old cells, a recurrent state that cannot give back tokens): kvside then reads the
session again from its first token, and says so in the edit log."""

from __future__ import annotations

import numpy as np
import pytest

from kvside.engine import Engine
from kvside.errors import InvalidRequest
from test_diff_binding import chat_session
from tinygguf import ARCHS, write

GREEDY = dict(temperature=0.0, repeat_penalty=1.0)
RECURRENT = ("mamba", "lfm2")
WINDOW = 32


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    return {arch: write(arch, folder / f"tiny-{arch}.gguf", window=WINDOW) for arch in ARCHS}


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request, tiny_models):
    with Engine(model=str(tiny_models[request.param]), n_ctx=512, max_sessions=3, n_threads=2, exact=True) as e:
        e.arch = request.param
        yield e


def conversation(turns: int) -> list[dict]:
    """A chat long enough that its early turns are far outside a 32-position window."""
    out = [{"role": "system", "content": "You are the assistant of the capital of France."}]
    for i in range(turns):
        out.append({"role": "user", "content": f"what is {i} and the world of Paris, hello {i}?"})
        out.append({"role": "assistant", "content": f"the capital {i} is Paris and the world is {i}."})
    return out


def probe_tokens(engine) -> list[int]:
    return engine.call(lambda core: core.model.tokenize("hello world", parse_special=False))


def test_each_family_is_recognised_and_described(tiny):
    info = tiny.info()
    assert info["model"]["architecture"] == tiny.arch
    template = info["chat_template"]["name"]
    assert template == {"llama": "gguf", "qwen2": "gguf", "gemma3": "gemma", "mamba": "chatml", "lfm2": "gguf",
                        "qwen2vl": "gguf"}[tiny.arch]
    assert info["sliding_window"] == (WINDOW if tiny.arch == "gemma3" else 0)
    assert info["recurrent"] == (tiny.arch in RECURRENT)


def test_every_edit_leaves_the_cache_equal_to_the_ledger(tiny):
    """Roll, mask, fork, evict and restore, a client's drop and a rewritten message: each leaves a
    session whose ledger equals its cache, and the session answers after it."""
    name = tiny.new_session(system="")
    try:
        history = conversation(4)
        tiny.bind_chat(history + [{"role": "user", "content": "hello"}], session=name, max_tokens=4, **GREEDY).wait()
        tiny.check(name)
        tiny.roll(name, drop=20)
        tiny.check(name)
        tiny.chat(name, "what is the capital", max_tokens=3, **GREEDY).wait()
        ids = [m["id"] for m in tiny.messages(name) if m["role"] == "user"]
        tiny.mask(name, messages=[ids[1]])
        tiny.check(name)
        child = tiny.fork(name)
        tiny.check(child)
        tiny.chat(child, "and the world", max_tokens=3, **GREEDY).wait()
        tiny.check(child)
        tiny.delete_session(child)
        tiny.evict(name)
        tiny.chat(name, "hello again", max_tokens=3, **GREEDY).wait()  # restored from its file
        tiny.check(name)
        if tiny.arch in ("gemma3", *RECURRENT):  # its own cells before the reply are not all there to force it on
            with pytest.raises(InvalidRequest, match="sliding-window|recurrent"):
                tiny.fidelity(name, tokens=3)
        else:
            assert tiny.fidelity(name, tokens=3)["kl"] >= 0
        tiny.check(name)
    finally:
        tiny.delete_session(name)


def test_a_session_holds_what_it_held_after_a_save_and_restore(tiny):
    """Evicting a session and using it again gives the same next-token logits (exact restore),
    on every family (a sliding-window cache saves only the cells still in the window, which is
    all a next token sees)."""
    name = tiny.new_session(system="")
    try:
        tiny.bind_chat(conversation(3) + [{"role": "user", "content": "hello"}], session=name, max_tokens=2,
                       **GREEDY).wait()
        probe = probe_tokens(tiny)
        before = tiny.next_logits(name, probe, all_logits=True)
        tiny.evict(name)
        after = tiny.next_logits(name, probe, all_logits=True)
        np.testing.assert_array_equal(before, after)
    finally:
        tiny.delete_session(name)


@pytest.mark.parametrize("restored", [False, True], ids=["resident", "restored"])
def test_with_reprefill_a_rewritten_turn_gives_a_fresh_prefill_on_every_family(tiny, restored):
    """The client rewrites an early user turn of a long chat: with `reprefill` as the strategy the
    session's next-token logits equal a fresh prefill of the client's messages. On a sliding-window
    cache that went through a save and restore, the cells before the rewritten turn are gone from
    the windowed layers; reading from the rewrite would attend to nothing there, so the session is
    read again from its first token (the edit log says `rebuilt`); while resident, from the context
    checkpoint before the rewritten turn."""
    name = tiny.new_session(system="")
    tiny.set_roll_strategy(name, "reprefill")
    try:
        history = conversation(4) + [{"role": "user", "content": "hello"}]
        reply = tiny.bind_chat(history, session=name, max_tokens=2, **GREEDY).wait()
        if restored:
            tiny.evict(name)
        edited = (history[:3] + [{"role": "user", "content": "what is the world of France?"}] + history[4:]
                  + [{"role": "assistant", "content": reply.text}, {"role": "user", "content": "and the world"}])
        events = []
        done = tiny.bind_chat(edited, session=name, max_tokens=1, on_event=events.append, **GREEDY).wait()
        note = next(e.data for e in events if e.kind == "bound")
        rebuilt = [n for n in done.notices if n["kind"] == "rebuilt"]
        if rebuilt:  # the client is told, and only what came back from a checkpoint counts as cached
            restored = rebuilt[0]["from_checkpoint"]
            assert done.usage.cached_tokens == restored
            assert ("from a checkpoint" if restored else "from the start") in rebuilt[0]["message"]
        assert note.get("edited_messages") or note.get("dropped_messages"), note
        tiny.check(name)
        prompt = chat_session(tiny, edited)  # the client's messages read whole
        held = tiny.ledger(name)
        n = len(tiny.ledger(prompt))
        assert held.tok[:n] == tiny.ledger(prompt).tok  # and the reply's first token after them
        tiny.delete_session(prompt)
        fresh = prefilled(tiny, held.tok)
        try:
            probe = probe_tokens(tiny)
            got, want = tiny.next_logits(name, probe, all_logits=True), tiny.next_logits(fresh, probe, all_logits=True)
            assert (got.argmax(1) == want.argmax(1)).all()
            np.testing.assert_allclose(got, want, atol=1e-2)  # batch layout rounding, nothing more
        finally:
            tiny.delete_session(fresh)
        log = [e["edit"] for e in tiny.edit_log(name)]
        if restored and tiny.arch == "gemma3":
            assert "rebuilt" in log and rebuilt, log
        if tiny.arch in ("llama", "qwen2"):
            assert "rebuilt" not in log, log  # plain attention goes on from the rewrite
    finally:
        tiny.delete_session(name)


def prefilled(engine, tokens: list[int]) -> str:
    """A session holding `tokens` read in one go at positions 0.."""
    name = engine.new_session(system="")

    def fill(core):
        s = core.get(name)
        core.decode_now(s.seq, list(tokens), 0, logits="none")
        s.ledger.append(list(tokens), s.next_message_id())

    engine.call(fill)
    return name


# -- chat templates -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vocab_only(tmp_path_factory):
    """Model objects (vocabulary only) of tiny GGUFs without a chat template, by the markers they hold."""
    from kvside.engine.model import Model

    folder = tmp_path_factory.mktemp("templates")
    made = {
        "llama3": write("llama", folder / "l3.gguf", chat_template=None, markers=["<|start_header_id|>", "<|eot_id|>",
                                                                               "<|end_header_id|>"]),
        "gemma": write("gemma3", folder / "g.gguf", chat_template=None),
        "chatml": write("llama", folder / "c.gguf", chat_template=None),
        "none": write("llama", folder / "n.gguf", chat_template=None, markers=[]),
        "own": write("llama", folder / "o.gguf"),
    }
    models = {k: Model(p, vocab_only=True) for k, p in made.items()}
    yield models
    for m in models.values():
        m.close()


def test_a_gguf_without_a_template_gets_its_familys_from_its_turn_markers(vocab_only):
    from kvside.engine import families

    for family in ("llama3", "gemma", "chatml"):
        chosen = families.choose(vocab_only[family], None)
        assert chosen.name == family and "turn markers" in chosen.why, chosen
    last = families.choose(vocab_only["none"], None)
    assert last.name == "chatml" and "not recognised" in last.why
    own = families.choose(vocab_only["own"], None)
    assert own.name == "gguf" and own.source == vocab_only["own"].chat_template


def test_the_gemma_template_folds_the_system_prompt_into_the_first_turn():
    from kvside.engine.families import GEMMA
    from kvside.engine.template import ChatTemplate

    text = ChatTemplate(GEMMA).render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                       {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}],
                                      add_generation_prompt=True)
    assert text == ("<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
                    "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n")


def test_chat_template_override_by_name_file_or_tokenizer_config(vocab_only, tmp_path):
    import json

    from kvside.engine import families

    model = vocab_only["own"]
    assert families.choose(model, "Llama3").name == "llama3"
    jinja = tmp_path / "t.jinja"
    jinja.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")
    chosen = families.choose(model, str(jinja))
    assert chosen.name == str(jinja) and chosen.source.startswith("{% for m")
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"chat_template": [{"name": "tool_use", "template": "x"},
                                                    {"name": "default", "template": "{{ messages }}"}]}))
    assert families.choose(model, str(config)).source == "{{ messages }}"
    for bad, why in (("nonsense", "neither a built-in"), (str(tmp_path / "missing.jinja"), "neither a built-in")):
        with pytest.raises(InvalidRequest, match=why):
            families.choose(model, bad)
    (tmp_path / "empty.jinja").write_text("  ")
    with pytest.raises(InvalidRequest, match="empty"):
        families.choose(model, str(tmp_path / "empty.jinja"))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(InvalidRequest, match="holds no chat_template"):
        families.choose(model, str(tmp_path / "bad.json"))


def test_doctor_says_which_template_and_why(tiny_models, tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "KVSIDE_NATIVE": "off", "KVSIDE_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "kvside.cli", "doctor", "--model", str(tiny_models["gemma3"])],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "gemma: the GGUF has none; its vocabulary has gemma's turn markers" in out.stdout
    assert "sliding window of 32" in out.stdout and "nearest of 8 context checkpoints" in out.stdout
    small = subprocess.run([sys.executable, "-m", "kvside.cli", "doctor", "--model", str(tiny_models["gemma3"]),
                            "--swa-cache", "window", "--checkpoints", "3"], env=env, capture_output=True, text=True,
                           timeout=120)
    assert small.returncode == 0, small.stderr
    assert "window's size: no shifts" in small.stdout and "nearest of 3 context checkpoints" in small.stdout
    assert any(line.split()[:2] == ["can_shift", "False"] for line in small.stdout.splitlines())
    bad = subprocess.run([sys.executable, "-m", "kvside.cli", "doctor", "--model", str(tiny_models["llama"]),
                          "--chat-template", "nope"], env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "neither a built-in template" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("strategy", ["shift", "recompute:8"])
def test_a_roll_on_a_recurrent_state_reads_the_kept_tokens_again(tiny, strategy):
    """A recurrent state cannot lose tokens from its middle (llama.cpp even says yes to such a
    removal and removes nothing): the roll falls back to reading the kept tokens again, says so,
    and the state equals a fresh read of them."""
    if tiny.arch not in RECURRENT:
        pytest.skip("recurrent memories only")
    name = tiny.new_session(system="")
    try:
        tiny.bind_chat(conversation(3) + [{"role": "user", "content": "hello"}], session=name, max_tokens=2,
                       **GREEDY).wait()
        report = tiny.roll(name, drop=20, strategy=strategy)
        assert report["fallback"] and "recurrent" in report["fallback"], report
        fresh = prefilled(tiny, tiny.ledger(name).tok)
        try:
            probe = probe_tokens(tiny)
            np.testing.assert_allclose(tiny.next_logits(name, probe, all_logits=True),
                                       tiny.next_logits(fresh, probe, all_logits=True), atol=1e-2)
        finally:
            tiny.delete_session(fresh)
    finally:
        tiny.delete_session(name)


@pytest.mark.parametrize("arch", ARCHS)
def test_eval_quick_runs_on_every_family(tiny_models, arch):
    """`kvside eval --quick` on each memory kind: every protocol runs, a re-prefill measures zero
    against itself, a recurrent state's rolls say they fell back, and composition is skipped where
    nothing can be spliced."""
    from kvside.bench import evaluate

    result = evaluate.run(str(tiny_models[arch]), True, 2)
    assert result["memory"] == {"gemma3": f"sliding window {WINDOW}", "mamba": "recurrent",
                                "lfm2": "recurrent"}.get(arch, "attention")
    rows = result["rolling"]
    assert rows and all(r["kl"] == 0.0 for r in rows if r["strategy"] == "reprefill")
    if arch == "qwen2vl":  # multi-section RoPE cannot shift: every roll reads again, nothing moves into place
        assert result["noise_floor"] is None and result["composition"] == []
        assert all(r["fallback"] for r in rows if r["strategy"] != "reprefill")
    elif arch in RECURRENT:
        assert all(r["fallback"] for r in rows if r["strategy"] != "reprefill")
        assert result["composition"] == []
    else:
        assert result["composition"] and all(r["kl"] < 1e-3 for r in result["composition"] if r["recompute"] == -1)
    assert "memory:" in evaluate.tables(result)
