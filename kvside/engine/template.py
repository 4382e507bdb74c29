"""Chat templates from the GGUF metadata (`tokenizer.chat_template`), rendered with Jinja in a
sandbox as Hugging Face does. kvside appends to a cache, so it renders differences: the text a new
message adds is render(history + [m]) minus render(history)."""

from __future__ import annotations

import json
import os
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from kvside.errors import InvalidRequest

# Used when a GGUF carries no template.
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class TemplateError(InvalidRequest):
    code = "template_error"


def _raise(message: str):
    raise TemplateError(f"chat template refused the messages: {message}")


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _arguments(function: dict):
    """A call's arguments as the object the tool prompt shows (clients send them as a JSON
    string; a string that is not JSON stays as it came)."""
    args = function.get("arguments")
    if isinstance(args, str):
        try:
            return json.loads(args)
        except ValueError:
            return args
    return args


def _plain_history(messages: list[dict], tools: list[dict] | None, tool_role: bool) -> list[dict]:
    """The history for a template that knows nothing of tools: kvside's own tool prompt joins
    the system prompt and calls become Hermes markup in the assistant's text. A tool result
    stays a `tool` turn where the template renders that role (a generic ChatML loop does; so
    llama-server, which hands such templates the messages as they are, reads the same tokens),
    else it becomes a user turn in Hermes' <tool_response> (templates that check roles accept
    those)."""
    from kvside.engine.toolcalls import FORMATS

    out = []
    for m in messages:
        m = dict(m)
        calls = m.pop("tool_calls", None)
        m.pop("tool_call_id", None)
        if calls:
            text = "\n".join(
                "<tool_call>\n" + json.dumps({"name": c["function"]["name"], "arguments": _arguments(c["function"])},
                                             ensure_ascii=False) + "\n</tool_call>"
                for c in calls
            )
            m["content"] = (m.get("content") or "") + ("\n" if m.get("content") else "") + text
        if m.get("role") == "tool" and not tool_role:
            m = {"role": "user", "content": "<tool_response>\n" + (m.get("content") or "") + "\n</tool_response>"}
        out.append(m)
    if tools:
        prompt = FORMATS["generic"].prompt(tools)
        if out and out[0].get("role") == "system":
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + prompt}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


class ChatTemplate:
    def __init__(self, source: str | None, *, bos_token: str = "", eos_token: str = ""):
        self.source = source or CHATML
        # whether the template renders tool definitions and calls itself
        self.supports_tools = "tools" in self.source and "tool_call" in self.source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.renders_tool_role = False
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda f: datetime.now().strftime(f)
        try:
            self._template = env.from_string(self.source)
        except jinja2.TemplateError as exc:
            raise TemplateError(f"the model's chat template does not parse: {exc}") from None
        if not self.supports_tools:
            self.renders_tool_role = self._renders_role("tool")

    def _renders_role(self, role: str) -> bool:
        """Whether the template renders a turn of `role` with its content (llama.cpp's template
        capabilities are probed the same way), instead of refusing or dropping it."""
        probe = "kvside-probe-7f3a"
        messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                    {"role": role, "content": probe}]
        try:
            text = self._template.render(messages=messages, add_generation_prompt=False,
                                         bos_token=self.bos_token, eos_token=self.eos_token)
        except Exception:  # a template that checks roles raises, in its own words
            return False
        return probe in text

    def render(self, messages: list[dict], *, add_generation_prompt: bool, tools: list[dict] | None = None) -> str:
        if not messages and not add_generation_prompt:
            return ""
        extra = {}
        if not self.supports_tools:
            messages = _plain_history(messages, tools, self.renders_tool_role)
        elif tools:
            extra["tools"] = tools
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                **extra,
            )
        except TemplateError:
            raise
        except jinja2.TemplateError as exc:
            raise TemplateError(f"chat template failed: {exc}") from None

    def delta(self, history: list[dict], new: list[dict], *, add_generation_prompt: bool,
              tools: list[dict] | None = None) -> str | None:
        """Text that `new` adds after `history`, or None when the template is not append-only
        for these messages (it rewrote earlier text)."""
        before = self.render(history, add_generation_prompt=False, tools=tools)
        after = self.render(history + new, add_generation_prompt=add_generation_prompt, tools=tools)
        if not after.startswith(before):
            return None
        return after[len(before) :]

    def segments(self, history: list[dict], new: list[dict], *, add_generation_prompt: bool,
                 tools: list[dict] | None = None) -> list[str] | None:
        """The text each of `new` adds after `history` (the last one also carries the generation
        prompt), or None when the template rewrites what `history` rendered. Templates that
        group messages (Qwen puts consecutive tool results in one user turn, closed after the
        last) are split where each prefix stops agreeing with the whole: the closing that a
        later message moves is counted with that later message."""
        full = self.render(history + new, add_generation_prompt=add_generation_prompt, tools=tools)
        before = self.render(history, add_generation_prompt=False, tools=tools)
        if not full.startswith(before):
            return None
        cuts = [len(before)]
        for i in range(1, len(new)):
            part = self.render(history + new[:i], add_generation_prompt=False, tools=tools)
            n = len(os.path.commonprefix([part, full]))
            cuts.append(max(n, cuts[-1]))
        cuts.append(len(full))
        return [full[a:b] for a, b in zip(cuts, cuts[1:])]

    def layout(self, history: list[dict], new: list[dict], *, tools: list[dict] | None = None,
               start: int | None = None) -> tuple[int, list[str]]:
        """Where `history` stops rendering the same once `new` follows it, and the text of each
        message from there on. Returns (k, texts): history[:k] renders as it did, and texts holds
        what history[k:] + new render to now, one per message. Append-only templates give
        k == len(history) (the texts are those of segments()); templates that rewrite earlier
        turns give a smaller k: Qwen3 and other reasoning models' templates show an assistant
        turn's reasoning (or an empty think block) only while no user message follows it.
        `start`: k is at most this (texts from there on are wanted whatever the template does)."""
        full = self.render(history + new, add_generation_prompt=False, tools=tools)
        k = len(history) if start is None else min(start, len(history))
        while k and not full.startswith(self.render(history[:k], add_generation_prompt=False, tools=tools)):
            k -= 1
        held = history[:k]
        rest = history[k:] + new
        cuts = [len(self.render(held, add_generation_prompt=False, tools=tools))]
        for i in range(1, len(rest)):
            part = self.render(held + rest[:i], add_generation_prompt=False, tools=tools)
            # a rewritten held turn ends where its surviving text ends; between new messages the
            # cut is where the prefix stops agreeing (a closing a later message moves goes with it)
            end = _end_in(part, full) if i <= len(history) - k else len(os.path.commonprefix([part, full]))
            cuts.append(max(end, cuts[-1]))
        cuts.append(len(full))
        return k, [full[a:b] for a, b in zip(cuts, cuts[1:])]


def _end_in(part: str, full: str) -> int:
    """Where in `full` the text of `part` ends: the end of their common prefix, or, when `full`
    rewrote part of it (a think block dropped), just after the first place past that prefix
    where the longest run of part's last characters (up to 48) appears."""
    n = len(os.path.commonprefix([part, full]))
    for size in range(min(len(part) - n, 48), 0, -1):  # the longest of its last characters that survived
        tail = part[len(part) - size:]
        j = full.find(tail, max(n - size + 1, 0))  # ending past the common prefix
        if j >= 0:
            return j + size
    return n
