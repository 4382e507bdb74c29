"""Chat templates from the GGUF metadata (`tokenizer.chat_template`), rendered with Jinja in a
sandbox as Hugging Face does. kvside appends to a cache, so it renders differences: the text a new
message adds is render(history + [m]) minus render(history)."""

from __future__ import annotations

import json
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


class ChatTemplate:
    def __init__(self, source: str | None, *, bos_token: str = "", eos_token: str = ""):
        self.source = source or CHATML
        self.bos_token = bos_token
        self.eos_token = eos_token
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

    def render(self, messages: list[dict], *, add_generation_prompt: bool) -> str:
        if not messages and not add_generation_prompt:
            return ""
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except TemplateError:
            raise
        except jinja2.TemplateError as exc:
            raise TemplateError(f"chat template failed: {exc}") from None

    def delta(self, history: list[dict], new: list[dict], *, add_generation_prompt: bool) -> str | None:
        """Text that `new` adds after `history`, or None when the template is not append-only
        for these messages (it rewrote earlier text)."""
        before = self.render(history, add_generation_prompt=False)
        after = self.render(history + new, add_generation_prompt=add_generation_prompt)
        if not after.startswith(before):
            return None
        return after[len(before) :]
