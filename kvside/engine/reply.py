"""What a chat reply must be and how it is read while it streams: tool calls, reasoning and
structured output.

ReplySpec is the request's side (tools, tool_choice, response_format, logprobs); `constraint`
turns it into a grammar for the sampler; ReplyReader splits the model's text as it arrives into
content, reasoning and tool calls and yields only what is new, so a client sees OpenAI's deltas:
content, then for each call its id and name once, then argument fragments.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from kvside.engine import toolcalls
from kvside.engine.toolcalls import Call, Format, Parsed
from kvside.errors import InvalidRequest

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclass
class ReplySpec:
    tools: list[dict] = field(default_factory=list)
    tool_choice: str = "auto"  # "auto", "none", "required", or a function's name
    parallel: bool = True
    response_format: dict | None = None  # {"type": "json_object"} or {"type": "json_schema", "schema": ...}
    logprobs: bool = False
    top_logprobs: int = 0
    # autocomplete's stopping rules, as llama-server's /infill has them: end at a line (after the
    # first) indented less than n_indent; end once a newline is written and t_max_predict_ms passed
    n_indent: int = 0
    t_max_predict_ms: int = 0

    @property
    def calls_allowed(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def forced(self) -> bool:
        return self.calls_allowed and self.tool_choice != "auto"

    def tools_for_choice(self) -> list[dict]:
        if self.tool_choice in ("auto", "none", "required"):
            return self.tools
        return [t for t in self.tools if t["function"]["name"] == self.tool_choice]


@dataclass
class Constraint:
    grammar: str
    lazy: bool = False
    words: list[str] = field(default_factory=list)  # text that switches a lazy grammar on
    patterns: list[str] = field(default_factory=list)  # regexes that do


def constraint(spec: ReplySpec, fmt: Format, think: bool = False) -> Constraint | None:
    """The grammar a reply follows: a tool call's syntax and its arguments' JSON schema (lazily,
    from the moment the model starts a call, unless a call is forced), or the response_format's
    JSON schema from the first token. `think`: the generation prompt opened a reasoning block, so
    a grammar that holds from the first token lets the reasoning come first and holds after it."""
    if spec.calls_allowed:
        named = spec.tool_choice not in ("auto", "required")  # a named function is called once
        tools, parallel = spec.tools_for_choice(), spec.parallel and not named
        try:
            if fmt.bare and not spec.forced:  # a lazy grammar: a bare call may begin it too
                grammar = fmt.grammar(tools, parallel, bare=True)
            else:
                grammar = fmt.grammar(tools, parallel)
        except Exception as exc:  # the converter raises AssertionError, ValueError, ... on schemas it cannot take
            raise InvalidRequest(f"cannot build a grammar from the tools' parameter schemas: {exc}",
                                 param="tools") from None
        if spec.forced:
            return Constraint(_after_thinking(grammar) if think else grammar)
        words, patterns = fmt.triggers(tools)
        return Constraint(grammar, lazy=True, words=words, patterns=patterns)
    if spec.response_format is not None:
        kind = spec.response_format.get("type")
        schema = {"type": "object"} if kind == "json_object" else spec.response_format.get("schema")
        if kind in ("json_object", "json_schema"):
            grammar = toolcalls.schema_grammar(schema)
            return Constraint(_after_thinking(grammar) if think else grammar)
    return None


# Reasoning text up to the first "</think>": any text that does not contain it.
_THINK_BODY = ('think-body ::= ( [^<] | "<" ( [^/] | "/" ( [^t] | "t" ( [^h] | "h" ( [^i] | "i" ( [^n] | "n" '
               '( [^k] | "k" [^>] ) ) ) ) ) ) )*\nthink-gap ::= [ \\t\\n]*\n')


def _after_thinking(grammar: str) -> str:
    """`grammar` behind a reasoning block the generation prompt opened: without this a forced call
    (or a JSON reply) would be written inside the reasoning, where it is neither (llama.cpp's chat
    formats for reasoning models do the same)."""
    if "\nroot ::= " not in grammar:
        return grammar
    return grammar.replace("\nroot ::= ", '\nroot ::= think-body "</think>" think-gap ', 1).rstrip("\n") + "\n" + _THINK_BODY


# -- reading a reply as it streams ---------------------------------------------------------------
@dataclass
class Delta:
    kind: str  # "content", "reasoning", "call" (index, id, name) or "arguments" (index, text)
    text: str = ""
    index: int = 0
    call_id: str = ""


class ReplyReader:
    """Feed the model's text; get what is new as Deltas. `think`: the generation prompt already
    opened a reasoning block (the model's first words are reasoning). `names`: the functions the
    request offers; a call to any other is not a call (a model writing JSON without markup names
    whatever it likes, and a client asked to run an unknown function can only fail). `triggers`:
    the lazy grammar's patterns; once the reply so far matches one, the grammar holds the rest, so
    a call begun without markup is a call and streams from there."""

    def __init__(self, fmt: Format | None, *, think: bool = False, names: set[str] | None = None,
                 triggers: list[str] | None = None):
        self.fmt = fmt
        self.think = think
        self.names = names
        self.triggers = [re.compile(p) for p in triggers or []]
        self.held_to_grammar = False
        self.sampled_text = ""
        self.text = ""
        self.sent = Parsed()
        self.ids: list[str] = []

    def _parse(self, partial: bool) -> Parsed:
        text, reasoning = self.text, ""
        opened = self.think
        if not opened and text.lstrip().startswith(THINK_OPEN):
            text, opened = text.lstrip()[len(THINK_OPEN) :], True
        elif not opened and partial and THINK_OPEN.startswith(text.lstrip()) and text.strip():
            return Parsed()
        if opened:
            j = text.find(THINK_CLOSE)
            if j < 0:
                held = toolcalls._held_prefix(text, [THINK_CLOSE]) if partial else 0
                return Parsed(reasoning=text[: len(text) - held].lstrip("\n"))
            reasoning, text = text[:j].lstrip("\n"), text[j + len(THINK_CLOSE) :].lstrip("\n")
        if self.fmt is None:
            out = Parsed(content=text)
        else:
            out = self.fmt.parse(text, partial)
        out.reasoning = reasoning + out.reasoning
        return out

    def sampled(self, text: str) -> None:
        """What one sampled token wrote, before a stop string holds any of it back: llama.cpp
        tries a lazy grammar's patterns after each token on everything the reply wrote so far,
        and so does this, to know when the grammar holds the reply."""
        if self.held_to_grammar or not self.triggers:
            return
        self.sampled_text += text
        self.held_to_grammar = any(p.fullmatch(self.sampled_text) for p in self.triggers)

    def feed(self, text: str) -> list[Delta]:
        self.text += text
        now = self._parse(partial=True)
        if now.bare and not self.held_to_grammar:
            # a call without markup that no grammar holds is told apart from JSON text only once
            # it is whole
            now = Parsed(reasoning=now.reasoning)
        return self._diff(now)

    def finish(self) -> tuple[Parsed, list[Delta]]:
        """The whole reply, and the last deltas. Calls whose arguments do not parse as a JSON
        object, or that name a function the request did not offer, are not calls: their text goes
        back into the content."""
        final = self._parse(partial=False)
        for call, raw in zip(list(final.calls), list(final.raw_calls)):
            if not call.valid() or (self.names is not None and call.name not in self.names):
                final.calls.remove(call)
                final.content += raw
        if final.calls and not final.content.strip():
            final.content = ""  # the whitespace around calls is not an answer
        deltas = self._diff(final)
        return final, deltas

    def _diff(self, now: Parsed) -> list[Delta]:
        out: list[Delta] = []
        if now.reasoning.startswith(self.sent.reasoning) and len(now.reasoning) > len(self.sent.reasoning):
            out.append(Delta("reasoning", now.reasoning[len(self.sent.reasoning) :]))
            self.sent.reasoning = now.reasoning
        if now.content.startswith(self.sent.content) and len(now.content) > len(self.sent.content):
            new = now.content[len(self.sent.content) :]
            if self.sent.content or new.strip():
                out.append(Delta("content", new))
                self.sent.content = now.content
        for i, call in enumerate(now.calls):
            if i >= len(self.sent.calls):
                self.ids.append(f"call_{uuid.uuid4().hex[:24]}")
                self.sent.calls.append(Call(call.name, ""))
                out.append(Delta("call", call.name, i, self.ids[i]))
            sent = self.sent.calls[i]
            if call.arguments.startswith(sent.arguments) and len(call.arguments) > len(sent.arguments):
                out.append(Delta("arguments", call.arguments[len(sent.arguments) :], i, self.ids[i]))
                sent.arguments = call.arguments
        return out

    def openai_calls(self, calls: list[Call]) -> list[dict]:
        """Calls in OpenAI's shape, with the ids their first deltas carried."""
        out = []
        for i, call in enumerate(calls):
            while len(self.ids) <= i:
                self.ids.append(f"call_{uuid.uuid4().hex[:24]}")
            out.append({"id": self.ids[i], "type": "function",
                        "function": {"name": call.name, "arguments": _compact(call.arguments)}})
        return out


def _compact(arguments: str) -> str:
    try:
        return json.dumps(json.loads(arguments), ensure_ascii=False)
    except ValueError:
        return arguments


def check_choice(choice, tools: list[dict]) -> str:
    """OpenAI's tool_choice: "auto", "none", "required", or {"type": "function", "function": {"name"}}."""
    if choice is None:
        return "auto"
    if isinstance(choice, str):
        if choice not in ("auto", "none", "required"):
            raise InvalidRequest("tool_choice must be 'auto', 'none', 'required' or a function", param="tool_choice")
        if choice == "required" and not tools:
            raise InvalidRequest("tool_choice 'required' needs tools", param="tool_choice")
        return choice
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(name, str):
        raise InvalidRequest("tool_choice must name a function: {'type': 'function', 'function': {'name': ...}}",
                             param="tool_choice")
    if name not in [t["function"]["name"] for t in tools]:
        raise InvalidRequest(f"tool_choice names {name!r}, which is not among the tools", param="tool_choice")
    return name
