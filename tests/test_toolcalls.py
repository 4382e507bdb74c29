"""Tool-call formats on recorded model outputs of each family, whole and streamed character by
character (the streamed deltas must add up to the whole), broken outputs included; format
detection from templates; every format's grammar compiles in llama.cpp."""

import json

import pytest

from kvside.engine import toolcalls
from kvside.engine.reply import ReplyReader, ReplySpec, constraint
from kvside.engine.toolcalls import FORMATS, detect

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city"]}}}
SEARCH = {"type": "function", "function": {"name": "search", "parameters": {
    "type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}}}

# (format, model output, expected content, expected calls as (name, arguments))
RECORDED = [
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     "", [("get_weather", {"city": "Paris"})]),
    ("hermes", 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n'
     '</tool_call>\n<tool_call>\n{"name": "search", "arguments": {"q": "rain {Paris}"}}\n</tool_call>',
     "Let me check.", [("get_weather", {"city": "Paris", "days": 3}), ("search", {"q": "rain {Paris}"})]),
    # what Qwen2.5-Coder-0.5B wrote here for "weather in Paris" with tool_choice auto
    ("hermes", '```json\n{\n    "name": "get_weather",\n    "arguments": {\n        "city": "Paris"\n    }\n}\n```',
     "", [("get_weather", {"city": "Paris"})]),
    # truncated JSON: not a call, the text stays content
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par',
     '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par', []),
    # a call with broken JSON arguments is never sent as a call
    ("hermes", '<tool_call>\n{"name": "search", "arguments": {"q": oops}}\n</tool_call>',
     '<tool_call>\n{"name": "search", "arguments": {"q": oops}}\n</tool_call>', []),
    ("hermes", "Paris is sunny today.", "Paris is sunny today.", []),
    ("hermes", "Use `<tool` tags like <tool_x>.", "Use `<tool` tags like <tool_x>.", []),
    ("generic", 'Sure.\n<tool_call>\n{"name": "search", "arguments": {"q": "kv cache"}}\n</tool_call>',
     "Sure.", [("search", {"q": "kv cache"})]),
    ("qwen3_coder", "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n"
     "</parameter>\n</function>\n</tool_call>", "", [("get_weather", {"city": "Paris", "days": 3})]),
    ("qwen3_coder", "I will search.\n<tool_call>\n<function=search>\n<parameter=q>\n42\n</parameter>\n</function>\n"
     "</tool_call>", "I will search.", [("search", {"q": 42})]),
    ("qwen3_coder", "<tool_call>\n<function=search>\n<parameter=q>\nunfinished", "<tool_call>\n<function=search>\n"
     "<parameter=q>\nunfinished", []),
    ("llama3", '{"name": "get_weather", "parameters": {"city": "Paris"}}', "", [("get_weather", {"city": "Paris"})]),
    ("llama3", '<|python_tag|>{"name": "search", "parameters": {"q": "a"}}; {"name": "search", "parameters": {"q": "b"}}',
     "", [("search", {"q": "a"}), ("search", {"q": "b"})]),
    ("llama3", "The weather is fine.", "The weather is fine.", []),
    ("llama3", '{"name": "search", "parameters": {"q": "a"', '{"name": "search", "parameters": {"q": "a"', []),
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, '
     '{"name": "search", "arguments": {"q": "x"}}]', "", [("get_weather", {"city": "Paris"}), ("search", {"q": "x"})]),
    ("mistral", 'Checking. [TOOL_CALLS]get_weather[ARGS]{"city": "Oslo"}', "Checking. ",
     [("get_weather", {"city": "Oslo"})]),
    ("mistral", "No tools needed.", "No tools needed.", []),
    ("harmony", "<|channel|>analysis<|message|>The user wants weather.<|end|><|start|>assistant<|channel|>commentary "
     'to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}<|call|>', "",
     [("get_weather", {"city": "Paris"})]),
    ("harmony", "<|channel|>analysis<|message|>Easy.<|end|><|start|>assistant<|channel|>final<|message|>Hello!<|return|>",
     "Hello!", []),
]


def _calls(parsed):
    return [(c.name, json.loads(c.arguments)) for c in parsed.calls]


@pytest.mark.parametrize("fmt,text,content,calls", RECORDED)
def test_recorded_outputs_read_whole(fmt, text, content, calls):
    reader = ReplyReader(FORMATS[fmt])
    reader.feed(text)
    parsed, _ = reader.finish()
    assert parsed.content.strip() == content.strip()
    assert _calls(parsed) == calls


@pytest.mark.parametrize("fmt,text,content,calls", RECORDED)
def test_streamed_deltas_add_up_to_the_whole(fmt, text, content, calls):
    """Fed one character at a time, as tokens arrive: the content deltas join to the final
    content, each call is announced once (id and name) before its argument fragments, and the
    fragments join to arguments that parse."""
    reader = ReplyReader(FORMATS[fmt])
    deltas = []
    for ch in text:
        deltas += reader.feed(ch)
    parsed, last = reader.finish()
    deltas += last
    streamed = "".join(d.text for d in deltas if d.kind == "content")
    assert streamed.strip() == parsed.content.strip()
    announced = [d for d in deltas if d.kind == "call"]
    if not calls:
        # a truncated call may have been announced before it turned out broken; a clean text never is
        if "<" not in text and "{" not in text:
            assert announced == []
        return
    assert [d.text for d in announced] == [name for name, _ in calls]
    for i, (_, args) in enumerate(calls):
        frags = [d for d in deltas if d.index == i and d.kind in ("call", "arguments")]
        assert frags[0].kind == "call", "a call's first delta names it"
        assert len({d.call_id for d in frags}) == 1
        assert json.loads("".join(d.text for d in frags[1:])) == args


def test_reasoning_is_split_from_the_answer_streamed_and_whole():
    text = "<think>\nThe user greets me.\n</think>\n\nHello there!"
    reader = ReplyReader(None)
    deltas = []
    for ch in text:
        deltas += reader.feed(ch)
    parsed, last = reader.finish()
    deltas += last
    assert parsed.reasoning.strip() == "The user greets me."
    assert parsed.content == "Hello there!"
    assert "".join(d.text for d in deltas if d.kind == "reasoning").strip() == "The user greets me."
    assert "".join(d.text for d in deltas if d.kind == "content") == "Hello there!"
    # a template that opens the block in the generation prompt: the first words are reasoning
    opened = ReplyReader(None, think=True)
    opened.feed("Thinking.</think>Answer.")
    parsed, _ = opened.finish()
    assert (parsed.reasoning, parsed.content) == ("Thinking.", "Answer.")


TEMPLATES = {
    "hermes": "{% for m in messages %}{% if tools %}<tool_call>{% endif %}{% endfor %}",
    "qwen3_coder": "{% if tools %}<tool_call>\n<function=x>\n<parameter=y>{% endif %}",
    "llama3": "{% if tools %}<|python_tag|>{{ 'ipython' }}{% endif %}",
    "mistral": "{% if tools %}[AVAILABLE_TOOLS][TOOL_CALLS]{% endif %}",
    "harmony": "{% if tools %}<|start|>assistant<|channel|>commentary{% endif %}",
    "generic": "{% for m in messages %}<|im_start|>{{ m.role }}{% endfor %}",
}


@pytest.mark.parametrize("expected", sorted(TEMPLATES))
def test_format_is_chosen_from_the_template(expected):
    assert detect(TEMPLATES[expected]).name == expected


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_every_grammar_compiles_in_llama_cpp(engine, fmt):
    """Lazy (auto) and forced (required) grammars of each format, and response_format schemas,
    are accepted by llama.cpp's grammar parser."""
    from kvside.engine.sampling import Sampler, SamplingParams

    specs = [ReplySpec(tools=[WEATHER, SEARCH]), ReplySpec(tools=[WEATHER, SEARCH], tool_choice="required"),
             ReplySpec(tools=[WEATHER], tool_choice="get_weather", parallel=False)]

    def build(core):
        for spec in specs:
            rule = constraint(spec, FORMATS[fmt])
            sampler = Sampler(SamplingParams(), [], core.model.n_vocab, vocab=core.model.vocab, constraint=rule,
                              tokenize=core.model.tokenize)
            sampler.close()
        return True

    assert engine.call(build)


def test_schema_grammar_refuses_what_it_cannot_build():
    from kvside.errors import InvalidRequest

    with pytest.raises(InvalidRequest):
        toolcalls.schema_grammar({"$ref": "https://example.com/remote.json"})


@pytest.mark.parametrize("tools,why", [
    ("nope", "must be a list"),
    ([{"type": "function"}], "each tool"),
    ([{"type": "function", "function": {"name": "bad name!"}}], "function name"),
    ([WEATHER, WEATHER], "unique"),
    ([{"type": "function", "function": {"name": "x", "parameters": "str"}}], "parameters"),
])
def test_bad_tools_are_refused_clearly(tools, why):
    from kvside.errors import InvalidRequest

    with pytest.raises(InvalidRequest, match=why):
        toolcalls.check_tools(tools)


def test_indent_cut_follows_llama_servers_n_indent_rule():
    from kvside.engine.scheduler import indent_cut

    assert indent_cut("x + 1", 4) is None  # the first line is the cursor's: never cut
    assert indent_cut("x + 1\n    return y", 4) is None
    assert indent_cut("x + 1\n    return y\ndef g():", 4) == len("x + 1\n    return y\n")
    assert indent_cut("x + 1\n  y", 4) == len("x + 1\n  ")  # the indentation stays, the line goes
    assert indent_cut("x + 1\n\t\t\t\tz\n", 4) is None
    assert indent_cut("x + 1\n   ", 4) is None  # nothing after the indentation yet
    assert indent_cut("x\n\n", 1) == 2  # an empty line counts as indented by 0, as in llama-server


CHATML_LOOP = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
               "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
STRICT_ROLES = ("{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
                "{{ raise_exception('Only user, assistant and system roles are supported') }}{% endif %}"
                "[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")


def test_a_tool_result_is_a_tool_turn_where_a_template_without_tools_renders_that_role():
    """Templates that know nothing of tools: a generic loop renders `tool` turns as llama-server
    does (the same prompt tokens on both servers); one that refuses other roles gets the result
    as a user turn in <tool_response>; calls are Hermes markup in both."""
    from kvside.engine.template import ChatTemplate
    history = [{"role": "user", "content": "weather?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
               {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    loop = ChatTemplate(CHATML_LOOP)
    assert not loop.supports_tools and loop.renders_tool_role
    text = loop.render(history, add_generation_prompt=True, tools=[WEATHER])
    assert "<|im_start|>tool\nsunny<|im_end|>\n<|im_start|>assistant\n" in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    strict = ChatTemplate(STRICT_ROLES)
    assert not strict.renders_tool_role
    text = strict.render(history, add_generation_prompt=False, tools=[WEATHER])
    assert text.endswith("[user] <tool_response>\nsunny\n</tool_response>\n")


def _allowed(core, rule, prefix: str, candidates: list[int]) -> set[int]:
    """Which of `candidates` a constraint's grammar allows once the reply so far is `prefix` (fed to
    it token by token, as the sampler would accept them; the prefix must be one it allows)."""
    import ctypes

    import llama_cpp

    from kvside._llama import lib
    from kvside.engine.sampling import _grammar_sampler

    sampler = _grammar_sampler(core.model.vocab, rule, core.model.tokenize)
    try:
        for token in core.model.tokenize(prefix) if prefix else []:
            lib.llama_sampler_accept(sampler, token)
        data = (llama_cpp.llama_token_data * len(candidates))(*[llama_cpp.llama_token_data(c, 0.0, 0.0)
                                                                   for c in candidates])
        cur = llama_cpp.llama_token_data_array(data, len(candidates), -1, False)
        lib.llama_sampler_apply(sampler, ctypes.byref(cur))
        return {data[i].id for i in range(cur.size) if data[i].logit != float("-inf")}
    finally:
        lib.llama_sampler_free(sampler)


def test_a_forced_call_after_an_opened_think_block_comes_after_the_reasoning(engine):
    """A template whose generation prompt opens <think> (reasoning models): a forced call, or a
    JSON reply, may not start inside the reasoning, where it would be read as reasoning; the model
    reasons, closes the block, and then only the call (or the JSON) may follow, and the reply may
    not end before it."""
    spec = ReplySpec(tools=[WEATHER], tool_choice="get_weather", parallel=False)
    fmt = FORMATS["hermes"]

    def check(core):
        first = lambda text: core.model.tokenize(text)[0]  # noqa: E731
        call, word, brace, eos = first("<tool_call>"), first("Hello"), first("{"), core.model.eos
        thinking = constraint(spec, fmt, think=True)
        assert _allowed(core, thinking, "", [call, word, eos]) == {call, word}  # reasoning first, any text
        assert _allowed(core, thinking, "Let me look it up.", [word, eos]) == {word}  # no end inside it
        assert _allowed(core, thinking, "Let me look it up.</think>\n", [call, word, eos]) == {call}
        assert _allowed(core, constraint(spec, fmt), "", [call, word]) == {call}  # no think block: the call at once
        schema = ReplySpec(response_format={"type": "json_object"})
        json_after = constraint(schema, fmt, think=True)
        assert _allowed(core, json_after, "Some thought.</think>", [brace, word]) == {brace}
        return True

    assert engine.call(check)


def _stream(reader: ReplyReader, text: str) -> tuple[list, list, object]:
    """(deltas while the text arrives one character at a time, the last deltas, the whole reply)."""
    during = [d for ch in text for d in reader.feed(ch)]
    parsed, last = reader.finish()
    return during, last, parsed


def test_a_call_written_without_markup_is_announced_only_once_whole():
    """A small model writes the call as a fenced JSON object: it is a call only if it is whole and
    its arguments an object, so nothing of it streams as a call before then, and a broken one
    streams as the text it is (before, its first fragments went out as a call the client could not
    take back)."""
    fenced = '```json\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n```'
    during, last, parsed = _stream(ReplyReader(FORMATS["generic"], names={"get_weather"}), fenced)
    assert during == []
    assert [d.kind for d in last] == ["call", "arguments"] and _calls(parsed) == [("get_weather", {"city": "Paris"})]
    broken = '```json\n{"name": "get_weather", "arguments": ["Paris"]}\n```'
    during, last, parsed = _stream(ReplyReader(FORMATS["generic"], names={"get_weather"}), broken)
    assert not [d for d in during + last if d.kind in ("call", "arguments")]
    assert parsed.calls == [] and "".join(d.text for d in last if d.kind == "content") == parsed.content


@pytest.mark.parametrize("text", [
    '{"name": "ls", "arguments": {"path": "."}}',
    '<tool_call>\n{"name": "ls", "arguments": {"path": "."}}\n</tool_call>',
])
def test_a_call_to_a_function_the_request_did_not_offer_is_text(text):
    """Codex offers `shell`; a 0.5B model wrote {"name": "ls", ...}, and Codex, asked to run `ls`,
    answered "unsupported call", which the model echoed back in a loop."""
    parsed = _stream(ReplyReader(FORMATS["hermes"], names={"shell"}), text)[2]
    assert parsed.calls == [] and parsed.content.strip() == text


def test_a_property_with_only_a_description_is_any_value(engine):
    """Claude Code's tools describe some properties without a type (any JSON value, as JSON Schema
    means it); the converter refused them and the request failed with an internal error."""
    from kvside.engine.sampling import Sampler, SamplingParams

    tool = {"type": "function", "function": {"name": "run", "parameters": {
        "type": "object", "properties": {"args": {"description": "passed to the script verbatim"},
                                         "n": {"type": "integer", "description": "how many"}},
        "required": ["args"]}}}
    rule = constraint(ReplySpec(tools=[tool], tool_choice="required"), FORMATS["hermes"])

    def build(core):
        Sampler(SamplingParams(), [], core.model.n_vocab, vocab=core.model.vocab, constraint=rule,
                tokenize=core.model.tokenize).close()
        return True

    assert engine.call(build)
    call = '<tool_call>\n{"name": "run", "arguments": {"args": ["a", {"b": 1}], "n": 2}}\n</tool_call>'
    assert toolcalls.schema_grammar({"description": "any"}) and _calls(ReplyReader(FORMATS["hermes"]).finish()[0]) == []
    reader = ReplyReader(FORMATS["hermes"], names={"run"})
    reader.feed(call)
    assert _calls(reader.finish()[0]) == [("run", {"args": ["a", {"b": 1}], "n": 2})]


def _nesting(grammar: str) -> int:
    deepest = depth = 0
    for ch in grammar:
        depth += (ch == "(") - (ch == ")")
        deepest = max(deepest, depth)
    return deepest


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_a_very_long_length_bound_does_not_nest_the_grammar_past_what_llama_cpp_can_read(engine, fmt):
    """Claude Code's Workflow tool bounds a string at 524,288 characters. The grammar converter
    writes a bound as that many nested groups, and llama.cpp's parser, reading them by recursion,
    overflowed the engine thread's stack: the daemon died with a segfault on Claude Code's first
    request. A bound that long is left out; a short one still holds."""
    from kvside.engine.sampling import Sampler, SamplingParams

    tool = {"type": "function", "function": {"name": "workflow", "parameters": {
        "type": "object", "properties": {
            "script": {"type": "string", "maxLength": 524288},
            "steps": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 100000},
            "tag": {"type": "string", "maxLength": 5}},
        "required": ["script"]}}}
    rules = [constraint(ReplySpec(tools=[tool]), FORMATS[fmt]),
             constraint(ReplySpec(tools=[tool], tool_choice="required"), FORMATS[fmt])]
    for rule in rules:
        assert _nesting(rule.grammar) < 50, "a long bound became deep nesting"
    schema = toolcalls.schema_grammar({"type": "string", "maxLength": 10**7})
    assert _nesting(schema) < 50
    if fmt != "qwen3_coder":  # its parameter values are free text
        assert "(char (char (char (char (char)?)?)?)?)?" in rules[0].grammar  # maxLength 5 kept

    def build(core):
        for rule in rules:
            Sampler(SamplingParams(), [], core.model.n_vocab, vocab=core.model.vocab, constraint=rule,
                    tokenize=core.model.tokenize).close()
        return True

    assert engine.call(build)


def test_a_bare_call_to_an_offered_function_is_held_to_the_grammar_once_begun(engine):
    """Small models asked for <tool_call> markup often write the call as bare (or fenced) JSON,
    and get it wrong: Qwen2.5-Coder-0.5B under Cline wrote `{"name": "read_files", "arguments":
    ["."}}`, under simonw/llm `{"name": "llm_time", "arguments": {"properties": {}}` (unclosed):
    text, not calls. Once a reply begins a bare call to an offered function, the grammar holds
    it to that function's schema. Other JSON, and a call to a name not offered, stay free."""
    fmt = FORMATS["hermes"]
    dotted = {"type": "function", "function": {"name": "read-file.v2", "parameters": {"type": "object"}}}
    rule = constraint(ReplySpec(tools=[WEATHER, SEARCH, dotted]), fmt)

    def check(core):
        first = lambda text: core.model.tokenize(text)[0]  # noqa: E731
        quote, bracket, word, close = first('"'), first("["), first("Hello"), first("}")
        free = {quote, bracket, word, close}
        for begun in ('{"name": "get_weather", ', '{"name":"get_weather",', '```json\n{"name": "get_weather",\n  ',
                      '\n{\n  "name": "get_weather", ', '{"name": "read-file.v2", '):
            assert _allowed(core, rule, begun, list(free)) == {quote}, begun  # "arguments" comes next
        brace = first("{")
        assert _allowed(core, rule, '{"name": "get_weather", "arguments": ', list(free | {brace})) == {brace}
        for other in ('{"name": "my-package", ', 'Sure: {"name": "get_weather", ', '{"name": "get_weather_x", ',
                      '{"name": "read-fileXv2", '):  # '.' is a dot, not any character
            assert _allowed(core, rule, other, list(free)) == free, other  # not a call begun: untouched
        return True

    assert engine.call(check)
    reader = ReplyReader(fmt, names={"get_weather", "search"})
    reader.feed('```json\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n```')
    assert _calls(reader.finish()[0]) == [("get_weather", {"city": "Paris", "days": 3})]


def _stream_tokens(core, reader: ReplyReader, text: str) -> list[tuple[str, list]]:
    """Feed `text` to `reader` a token at a time, as the scheduler does: (reply so far, deltas)."""
    out, so_far = [], ""
    for token in core.model.tokenize(text):
        piece = core.model.piece(token).decode()
        so_far += piece
        reader.sampled(piece)
        out.append((so_far, reader.feed(piece)))
    return out


def test_a_bare_call_the_grammar_holds_streams_from_its_name_on(engine):
    """A bare call was held back until it was whole, so a client saw nothing of it (Qwen2.5-Coder
    0.5B under OpenCode wrote every call bare: the stream's first byte came when the call was
    done). Once the lazy grammar holds the reply, the call can only be that call: it is announced,
    and its arguments stream, from the moment the grammar took over and not before. Bare JSON the
    grammar does not hold (whitespace it does not write, a name not offered) is read only whole."""
    fmt = FORMATS["hermes"]
    rule = constraint(ReplySpec(tools=[WEATHER, SEARCH]), fmt)
    names = {"get_weather", "search"}
    call = '{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}'

    def check(core):
        free = {core.model.tokenize(w)[0] for w in ('"', "[", "Hello", "}")}
        reader = ReplyReader(fmt, names=names, triggers=rule.patterns)
        steps = _stream_tokens(core, reader, call)
        first = next(i for i, (_, deltas) in enumerate(steps) if deltas)
        assert first < len(steps) - 1, "the call came only once it was whole"
        prefix, deltas = steps[first]
        assert deltas[0].kind == "call" and deltas[0].text == "get_weather"
        assert len(_allowed(core, rule, prefix, list(free))) < len(free), "announced before the grammar held it"
        assert not any(d for _, d in steps[:first])
        parsed, last = reader.finish()
        frags = [d for _, ds in steps for d in ds if d.kind == "arguments"] + [d for d in last if d.kind == "arguments"]
        assert len(frags) > 1 and json.loads("".join(d.text for d in frags)) == {"city": "Paris", "days": 3}
        assert _calls(parsed) == [("get_weather", {"city": "Paris", "days": 3})] and parsed.content == ""

        for loose in ('{"name":  "get_weather",  "arguments": {"city": "Paris"}}',  # not the grammar's spacing
                      '{"name": "get_time", "arguments": {}}'):  # not offered
            reader = ReplyReader(fmt, names=names, triggers=rule.patterns)
            assert not any(d for _, d in _stream_tokens(core, reader, loose)), loose
            parsed, last = reader.finish()
            if "get_time" in loose:
                assert parsed.calls == [] and parsed.content == loose
            else:
                assert [d.kind for d in last][:1] == ["call"] and _calls(parsed) == [("get_weather", {"city": "Paris"})]
        return True

    assert engine.call(check)
