"""Tool-call formats: how each model family writes a call, how to constrain it with a grammar,
and how to read it back, from a whole reply or from a reply still streaming.

A format is chosen from the chat template (the template is what taught the model its syntax).
Every parser works on the text so far and is prefix-stable: content it returns never shrinks as
more text arrives (a possible start of a call is held back until it is decided), and a call's
arguments text only grows. The streaming layer (reply.py) sends the differences.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from llama_cpp.llama_grammar import SchemaConverter

from kvside.errors import InvalidRequest


@dataclass
class Call:
    name: str
    arguments: str  # JSON text; partial while the call is still being written
    complete: bool = False

    def valid(self) -> bool:
        if not self.complete:
            return False
        try:
            return isinstance(json.loads(self.arguments), dict)
        except ValueError:
            return False


@dataclass
class Parsed:
    content: str = ""
    reasoning: str = ""
    calls: list[Call] = field(default_factory=list)
    raw_calls: list[str] = field(default_factory=list)  # each call's own text (for invalid ones)
    bare: bool = False  # the reply read as one call written without markup: a guess until it is whole


# -- JSON scanning -------------------------------------------------------------------------------
def json_value_end(text: str, i: int) -> int | None:
    """End index of the JSON value starting at text[i] (after whitespace), or None while it is
    incomplete. Strings and nesting are tracked; the value is not validated."""
    n = len(text)
    while i < n and text[i] in " \t\r\n":
        i += 1
    if i >= n:
        return None
    c = text[i]
    if c == '"':
        j = i + 1
        while j < n:
            if text[j] == "\\":
                j += 2
                continue
            if text[j] == '"':
                return j + 1
            j += 1
        return None
    if c in "{[":
        depth, j, in_str = 0, i, False
        while j < n:
            ch = text[j]
            if in_str:
                if ch == "\\":
                    j += 2
                    continue
                if ch == '"':
                    in_str = False
            elif ch == '"':
                in_str = True
            elif ch in "{[":
                depth += 1
            elif ch in "}]":
                depth -= 1
                if depth == 0:
                    return j + 1
            j += 1
        return None
    m = re.compile(r"-?[0-9.eE+\-]+|true|false|null").match(text, i)
    if m and m.end() < n:
        return m.end()
    return None


def _held_prefix(text: str, markers: list[str]) -> int:
    """Length of the longest suffix of `text` that could grow into one of `markers`."""
    hold = 0
    for mark in markers:
        for k in range(min(len(mark) - 1, len(text)), 0, -1):
            if text.endswith(mark[:k]):
                hold = max(hold, k)
                break
    return hold


_NAME_RE = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')


def _json_call(body: str) -> Call | None:
    """A call written as {"name": ..., "arguments": {...}} (name first, as the grammar writes it;
    a whole object in another key order is read at the end)."""
    m = _NAME_RE.match(body.lstrip())
    if m is None:
        try:
            obj = json.loads(body)
        except ValueError:
            return None
        if isinstance(obj, dict) and isinstance(obj.get("name"), str):
            args = obj.get("arguments", obj.get("parameters", {}))
            if isinstance(args, str):
                return Call(obj["name"], args, True)
            return Call(obj["name"], json.dumps(args, ensure_ascii=False), True)
        return None
    start = len(body) - len(body.lstrip()) + m.end()
    end = json_value_end(body, start)
    args = body[start:end] if end is not None else body[start:].rstrip()
    args = args.strip()
    return Call(json.loads(f'"{m.group(1)}"'), args, end is not None)


# Small models asked for <tool_call> markup often write the call as a bare JSON object, or in a
# ```json fence, as the whole reply. Read those too, as llama-server's Hermes parser does.
_BARE_FORMS = ('{"name":', '```json{"name":', '```{"name":')


def _bare_call(text: str, partial: bool) -> Parsed | None:
    """The reply as one bare call, None when it is not one; an empty Parsed while undecided."""
    squeezed = re.sub(r"\s+", "", text[:64])
    if not squeezed:
        return Parsed() if partial else None
    if not any(squeezed.startswith(f) for f in _BARE_FORMS):
        if partial and any(f.startswith(squeezed) for f in _BARE_FORMS):
            return Parsed()  # could still become one
        return None
    i = text.index("{")
    end = json_value_end(text, i)
    call = _json_call(text[i : end if end is not None else len(text)])
    if call is None:
        return Parsed() if partial and end is None else None
    rest = text[end:] if end is not None else ""
    if rest.strip() not in ("", "```"):
        return None if not partial else Parsed(calls=[call], raw_calls=[text], bare=True)
    call.complete = end is not None
    return Parsed(calls=[call], raw_calls=[text], bare=True)


# The grammar's whitespace between JSON tokens (`space` in _format), as a regex.
_SPACE = r"(?: |\n[ \t]{0,20})?"


def _bare_trigger(tools: list[dict]) -> str:
    """A reply that begins a bare (or ```json fenced) call to an offered function: from there the
    grammar holds, so the call comes out whole and valid (a 0.5B model asked for <tool_call>
    markup often writes `{"name": "read_files", "arguments": ["."}}` instead, which is text). It
    matches only at the end of the call's name and its comma, the whole reply so far, in the
    grammar's own whitespace: so the text it hands over is always text the grammar accepts, and a
    reply with other JSON (a package.json begins {"name": too) is not touched, as llama-server's
    trigger names the functions too."""
    # names are letters, digits, '_', '-' and '.' (check_tools): only '.' means more in a regex
    names = "|".join(fn["name"].replace(".", r"\.") for fn in _functions(tools))
    return (rf'^\s*((?:```(?:json)?\n)?\{{{_SPACE}"name"{_SPACE}:{_SPACE}"(?:{names})",{_SPACE}"?)$')


# -- formats -------------------------------------------------------------------------------------
class Format:
    """Hermes / Qwen2.5: <tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>."""

    name = "hermes"
    start = "<tool_call>"
    end = "</tool_call>"
    bare = True  # a call written without markup is read, and constrained once begun (_bare_trigger)

    # parsing
    def parse(self, text: str, partial: bool) -> Parsed:
        bare = _bare_call(text, partial)
        if bare is not None:
            return bare
        out = Parsed()
        i = 0
        while True:
            j = text.find(self.start, i)
            if j < 0:
                tail = text[i:]
                if partial:
                    tail = tail[: len(tail) - _held_prefix(tail, [self.start])]
                out.content += tail
                return out
            out.content += text[i:j]
            k = text.find(self.end, j)
            body = text[j + len(self.start) : k if k >= 0 else len(text)]
            call = self.read_call(body)
            if call is not None and k < 0:
                call.complete = False
            raw = text[j : k + len(self.end) if k >= 0 else len(text)]
            if call is None and not partial:
                out.content += raw
            elif call is not None:
                out.calls.append(call)
                out.raw_calls.append(raw)
            if k < 0:
                return out
            i = k + len(self.end)

    def read_call(self, body: str) -> Call | None:
        return _json_call(body)

    # constraining
    def call_rule(self, conv: SchemaConverter, tools: list[dict]) -> str:
        conv.visit(_calls_schema(tools, "arguments"), "call")
        return f'"{self.start}" ws call ws "{self.end}"'

    def triggers(self, tools: list[dict]) -> tuple[list[str], list[str]]:
        """What switches a lazy grammar on: (literal words, regex patterns). A word that is one
        token of the vocabulary triggers on that token, so what the grammar is handed first is
        exactly its first symbol. A pattern hands the grammar the text from its first group on,
        which it must accept (llama.cpp aborts the process on text its grammar rejects)."""
        return [self.start], [_bare_trigger(tools)] if self.bare else []

    def grammar(self, tools: list[dict], parallel: bool, bare: bool = False) -> str:
        """The calls' grammar; `bare`: also one call without markup, as _bare_trigger starts it."""
        conv = _converter()
        one = self.call_rule(conv, tools)
        many = f" (ws {one})*" if parallel else ""
        alone = ' | ("```json\\n" | "```\\n") call "```" | call' if bare else ""
        return _format(conv) + f"\nroot ::= {one}{many}{alone}\n"


class Generic(Format):
    """For templates that know nothing of tools: kvside describes the tools in the system prompt
    and asks for Hermes-style markup, the syntax most small models have seen."""

    name = "generic"

    def prompt(self, tools: list[dict]) -> str:
        lines = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        return (
            "You can call these functions:\n" + lines + "\n\nTo call one, reply with\n"
            '<tool_call>\n{"name": "<function name>", "arguments": {<arguments as JSON>}}\n</tool_call>'
        )


class Llama3(Format):
    """Llama 3.x: the reply is {"name": ..., "parameters": {...}} (optionally after <|python_tag|>),
    several calls separated by ';'."""

    name = "llama3"
    bare = False
    start = "<|python_tag|>"

    def parse(self, text: str, partial: bool) -> Parsed:
        body = text[len(self.start) :] if text.lstrip().startswith(self.start) else text
        stripped = body.lstrip()
        if not stripped.startswith("{"):
            if partial and (not stripped or self.start.startswith(text.lstrip())):
                return Parsed()
            return Parsed(content=text)
        out = Parsed()
        i = len(body) - len(stripped)
        while i < len(body):
            end = json_value_end(body, i)
            call = _json_call(body[i : end if end is not None else len(body)])
            if call is None:
                if partial and end is None:
                    return out
                return Parsed(content=text) if not partial else out
            call.complete = end is not None
            out.calls.append(call)
            out.raw_calls.append(body[i:end])
            if end is None:
                return out
            rest = body[end:]
            m = re.match(r"\s*;?\s*", rest)
            i = end + m.end()
        return out

    def call_rule(self, conv, tools):
        conv.visit(_calls_schema(tools, "parameters"), "call")
        return "call"

    def grammar(self, tools, parallel):
        conv = _converter()
        one = self.call_rule(conv, tools)
        many = ' (ws ";" ws call)*' if parallel else ""
        return _format(conv) + f'\nroot ::= ("{self.start}" ws)? {one}{many}\n'

    def triggers(self, tools):
        return [self.start], [r'^\s*(\{)\s*"name"\s*:[\s\S]*$']


class Mistral(Format):
    """Mistral: [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...] (v0.3) or, in newer
    templates, [TOOL_CALLS]name[ARGS]{...}."""

    name = "mistral"
    bare = False
    start = "[TOOL_CALLS]"

    def parse(self, text, partial):
        j = text.find(self.start)
        if j < 0:
            held = _held_prefix(text, [self.start]) if partial else 0
            return Parsed(content=text[: len(text) - held])
        out = Parsed(content=text[:j])
        body = text[j + len(self.start) :]
        if "[ARGS]" in body or (partial and not body.lstrip().startswith("[")):
            for part in body.split(self.start):
                name, sep, args = part.partition("[ARGS]")
                if not sep:
                    continue
                end = json_value_end(args, 0)
                out.calls.append(Call(name.strip(), args[:end].strip() if end else args.strip(), end is not None))
                out.raw_calls.append(self.start + part)
            return out
        stripped = body.lstrip()
        i = len(body) - len(stripped) + 1  # after '['
        while True:
            while i < len(body) and body[i] in " ,\n":
                i += 1
            if i >= len(body) or body[i] == "]":
                return out
            end = json_value_end(body, i)
            call = _json_call(body[i : end if end is not None else len(body)])
            if call is None:
                if not partial:
                    out.content += text[j:]
                return out
            call.complete = end is not None
            out.calls.append(call)
            out.raw_calls.append(body[i:end])
            if end is None:
                return out
            i = end

    def grammar(self, tools, parallel):
        conv = _converter()
        conv.visit(_calls_schema(tools, "arguments"), "call")
        many = ' (ws "," ws call)*' if parallel else ""
        return _format(conv) + f'\nroot ::= "{self.start}" ws "[" ws call{many} ws "]"\n'

    def triggers(self, tools):
        return [self.start], []


class Qwen3Coder(Format):
    """Qwen3-Coder: <tool_call>\\n<function=NAME>\\n<parameter=KEY>\\nVALUE\\n</parameter>\\n...
    </function>\\n</tool_call>. Values are text; those that read as JSON (numbers, objects,
    booleans) are taken as JSON, as the template renders non-strings with tojson."""

    name = "qwen3_coder"
    bare = False

    def read_call(self, body):
        m = re.match(r"\s*<function=([^>\n]+)>", body)
        if m is None:
            return None
        params = []
        for p in re.finditer(r"<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>", body[m.end() :], re.S):
            value = p.group(2)
            try:
                parsed = json.loads(value)
                if isinstance(parsed, str):
                    parsed = value
            except ValueError:
                parsed = value
            params.append(f"{json.dumps(p.group(1).strip())}: {json.dumps(parsed, ensure_ascii=False)}")
        done = "</function>" in body[m.end() :]
        args = "{" + ", ".join(params) + ("}" if done else "")
        return Call(m.group(1).strip(), args, done)

    def grammar(self, tools, parallel):
        alts = []
        for t in _functions(tools):
            keys = list((t.get("parameters") or {}).get("properties", {}))
            param = (
                '("<parameter=" (' + " | ".join(json.dumps(k) for k in keys) + ') ">\\n" pvalue "\\n</parameter>\\n")*'
                if keys else ""
            )
            alts.append(f'"<function={t["name"]}>\\n" {param} "</function>"'.replace("  ", " "))
        one = '"<tool_call>" ws (' + " | ".join(alts) + ') ws "</tool_call>"'
        many = f" (ws {one})*" if parallel else ""
        return f'pvalue ::= ([^<] | "<" [^/])*\nws ::= [ \\t\\n]*\nroot ::= {one}{many}\n'


class Harmony(Format):
    """gpt-oss (harmony): messages on channels. analysis is reasoning, final is the answer, and a
    commentary message addressed to=functions.NAME is a call whose body is the arguments."""

    name = "harmony"
    bare = False
    start = "<|channel|>"
    _ENDS = ["<|end|>", "<|call|>", "<|return|>", "<|start|>"]

    _MSG = re.compile(
        r"(?:<\|start\|>assistant)?(?P<head>(?:\s*to=functions\.[\w.-]+)?\s*<\|channel\|>[^<]*(?:<\|constrain\|>[^<]*)?)"
        r"<\|message\|>(?P<body>.*?)(?P<end><\|end\|>|<\|call\|>|<\|return\|>|$)",
        re.S,
    )

    def parse(self, text, partial):
        out = Parsed()
        for m in self._MSG.finditer(text):
            head, body = m.group("head"), m.group("body")
            to = re.search(r"to=functions\.([\w.-]+)", head)
            channel = re.search(r"<\|channel\|>\s*(\w+)", head)
            channel = channel.group(1) if channel else ""
            if partial and not m.group("end"):
                body = body[: len(body) - _held_prefix(body, self._ENDS)]
            if to:
                end = json_value_end(body, 0)
                args = body[:end].strip() if end is not None else body.strip()
                out.calls.append(Call(to.group(1), args, end is not None))
                out.raw_calls.append(m.group(0))
            elif channel == "analysis":
                out.reasoning += body
            else:
                out.content += body
            if not m.group("end") and m.end() >= len(text):
                break
        if not out.calls and not out.content and not out.reasoning and "<|message|>" not in text:
            if not partial:
                out.content = text
        return out

    def grammar(self, tools, parallel):
        conv = _converter()
        alts = []
        for t in _functions(tools):
            rule = conv.visit(_plain(t.get("parameters") or {"type": "object"}), f"args-{t['name']}")
            alts.append(f'"{t["name"]}" [^<]* "<|message|>" {rule}')
        return _format(conv) + "\nroot ::= \"to=functions.\" (" + " | ".join(alts) + ")\n"

    def triggers(self, tools):
        return ["to=functions."], []


FORMATS = {f.name: f for f in (Format(), Generic(), Llama3(), Mistral(), Qwen3Coder(), Harmony())}


def detect(template_source: str | None) -> Format:
    """The tool-call format a chat template teaches its model."""
    src = template_source or ""
    if "tools" not in src:
        return FORMATS["generic"]
    if "<|channel|>" in src and "<|start|>" in src:
        return FORMATS["harmony"]
    if "<function=" in src and "<parameter=" in src:
        return FORMATS["qwen3_coder"]
    if "<tool_call>" in src:
        return FORMATS["hermes"]
    if "[TOOL_CALLS]" in src:
        return FORMATS["mistral"]
    if "<|python_tag|>" in src or ("ipython" in src and "parameters" in src):
        return FORMATS["llama3"]
    return FORMATS["generic"]


# -- tool definitions ----------------------------------------------------------------------------
def _functions(tools: list[dict]) -> list[dict]:
    return [t["function"] for t in tools]


def check_tools(tools) -> list[dict]:
    """OpenAI's tools array, checked: [{"type": "function", "function": {"name", "parameters"?}}]."""
    if not isinstance(tools, list):
        raise InvalidRequest("'tools' must be a list", param="tools")
    out = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(fn, dict):
            raise InvalidRequest("each tool must be {'type': 'function', 'function': {...}}", param=f"tools[{i}]")
        name = fn.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
            raise InvalidRequest("a function name must be 1-64 letters, digits, '_', '.' or '-'",
                                 param=f"tools[{i}].function.name")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise InvalidRequest("'parameters' must be a JSON schema object", param=f"tools[{i}].function.parameters")
        out.append({"type": "function", "function": fn})
    names = [t["function"]["name"] for t in out]
    if len(set(names)) != len(names):
        raise InvalidRequest("tool names must be unique", param="tools")
    return out


def _converter() -> SchemaConverter:
    return SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)


def _format(conv: SchemaConverter) -> str:
    """The converter's rules, with JSON whitespace as models write it (newlines and indents,
    not only one optional space) and `ws` for the glue between markup and JSON."""
    rules = conv.format_grammar().replace('space ::= " "?', 'space ::= | " " | "\\n" [ \\t]{0,20}')
    return rules + "\nws ::= [ \\t\\n]*"


# keys that describe a value without constraining it; the grammar converter takes none of them alone
_ANNOTATIONS = frozenset({"description", "title", "examples", "default", "$comment", "deprecated", "readOnly",
                          "writeOnly", "$schema", "$id"})
_ANY = {"type": ["string", "number", "boolean", "object", "array", "null"]}
# The converter writes a length bound of n as n nested groups, and llama.cpp's grammar parser reads
# nesting by recursion: Claude Code's Workflow tool bounds a string at 524,288 characters, and parsing
# its grammar overflowed the engine thread's stack and killed the daemon. A bound past this one says
# nothing a call needs, so the grammar leaves it out (the call is still parsed and checked as JSON).
_LONGEST_BOUND = 1000
_BOUNDS = frozenset({"minLength", "maxLength", "minItems", "maxItems"})


def _plain(schema):
    """A JSON schema as the grammar converter can take it: annotations and very long length bounds
    dropped, and a schema that says nothing of its value but a description (tools' schemas often
    have such properties) is any value, as JSON Schema means it."""
    if isinstance(schema, list):
        return [_plain(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in _ANNOTATIONS or (key in _BOUNDS and isinstance(value, int) and value > _LONGEST_BOUND):
            continue
        if key in ("properties", "$defs", "definitions", "patternProperties") and isinstance(value, dict):
            out[key] = {name: _plain(s) for name, s in value.items()}
        elif key in ("items", "additionalProperties", "not", "anyOf", "oneOf", "allOf", "prefixItems"):
            out[key] = _plain(value)
        else:
            out[key] = value
    return out or dict(_ANY)


def _calls_schema(tools: list[dict], args_key: str) -> dict:
    alts = []
    for fn in _functions(tools):
        params = _plain(fn.get("parameters") or {"type": "object"})
        alts.append({
            "type": "object",
            "properties": {"name": {"const": fn["name"]}, args_key: {"type": "object"} if params == _ANY else params},
            "required": ["name", args_key],
        })
    return alts[0] if len(alts) == 1 else {"anyOf": alts}


def schema_grammar(schema: dict) -> str:
    """GBNF for one JSON value following `schema` (response_format)."""
    conv = _converter()
    try:
        schema = conv.resolve_refs(_plain(schema), "request")
        conv.visit(schema, "")
    except Exception as exc:  # the converter raises ValueError, KeyError, ... on schemas it cannot take
        raise InvalidRequest(f"cannot build a grammar from this JSON schema: {exc}", param="response_format") from None
    return _format(conv)
