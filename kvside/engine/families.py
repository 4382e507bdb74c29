"""Which chat template a model gets, and why.

In order: the one the user names (`--chat-template NAME|FILE`), the GGUF's own
(`tokenizer.chat_template`), and, for a GGUF that carries none, its family's, recognised by the
special tokens its vocabulary has (the turn markers every family's fine-tuning used) and then by its
architecture. ChatML is the last resort, and says so: a model prompted in another family's format
answers with that format's fragments. The sources follow llama.cpp's built-in templates
(src/llama-chat.cpp) written as Jinja. None renders the BOS token: kvside adds it when the
vocabulary asks for one, so it is never doubled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from kvside.engine.template import CHATML
from kvside.errors import InvalidRequest

LLAMA3 = (
    "{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Gemma has no system role: a system message opens the first user turn.
GEMMA = (
    "{% if messages and messages[0]['role'] == 'system' %}{% set prefix = messages[0]['content'] | trim + '\n\n' %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (prefix if loop.first else '') + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
MISTRAL = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '[SYSTEM_PROMPT]' + message['content'] + '[/SYSTEM_PROMPT]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + '</s>' }}"
    "{% else %}{{ '[INST]' + message['content'] + '[/INST]' }}{% endif %}{% endfor %}"
)
PHI3 = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3, "gemma": GEMMA, "mistral": MISTRAL, "phi3": PHI3}

# The turn markers that give a family away, in the order they are tried.
MARKERS = [
    ("llama3", ("<|start_header_id|>", "<|eot_id|>")),
    ("gemma", ("<start_of_turn>", "<end_of_turn>")),
    ("chatml", ("<|im_start|>", "<|im_end|>")),
    ("phi3", ("<|user|>", "<|end|>")),
    ("mistral", ("[INST]", "[/INST]")),
]
ARCHITECTURES = {"gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma", "gemma3n": "gemma", "phi3": "phi3",
                 "qwen2": "chatml", "qwen3": "chatml", "qwen2moe": "chatml", "qwen3moe": "chatml"}


@dataclass(frozen=True)
class Chosen:
    source: str
    name: str  # a built-in's name, "gguf", or the file it came from
    why: str


def load_file(path: Path) -> str:
    """A Jinja template file, or a Hugging Face tokenizer_config.json that carries one."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"cannot read chat template {path}: {exc}") from None
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise InvalidRequest(f"{path} is not valid JSON: {exc}") from None
        found = data.get("chat_template") if isinstance(data, dict) else None
        if isinstance(found, list):  # named templates: the default one
            found = next((t.get("template") for t in found if isinstance(t, dict) and t.get("name") == "default"), None)
        if not isinstance(found, str) or not found.strip():
            raise InvalidRequest(f"{path} holds no chat_template")
        return found
    if not text.strip():
        raise InvalidRequest(f"chat template file {path} is empty")
    return text


def choose(model, override: str | None) -> Chosen:
    """The template for `model` (a kvside Model), with the reason."""
    if override:
        key = override.strip().lower()
        if key in TEMPLATES:
            return Chosen(TEMPLATES[key], key, "named by --chat-template")
        path = Path(override).expanduser()
        if path.is_file():
            return Chosen(load_file(path), str(path), "read from the file --chat-template names")
        raise InvalidRequest(f"--chat-template {override!r} is neither a built-in template "
                             f"({', '.join(TEMPLATES)}) nor a file")
    own = model.chat_template
    if own:
        return Chosen(own, "gguf", "the GGUF's own (tokenizer.chat_template)")
    for family, markers in MARKERS:
        if all(_is_special_token(model, m) for m in markers):
            return Chosen(TEMPLATES[family], family,
                          f"the GGUF has none; its vocabulary has {family}'s turn markers ({', '.join(markers)})")
    family = ARCHITECTURES.get(model.architecture)
    if family:
        return Chosen(TEMPLATES[family], family,
                      f"the GGUF has none; {family} is the template of its architecture ({model.architecture})")
    return Chosen(CHATML, "chatml", "the GGUF has none and its family is not recognised: ChatML, the common "
                  "default (--chat-template NAME|FILE to choose)")


def _is_special_token(model, text: str) -> bool:
    """Whether the vocabulary holds `text` as one control token (not text that happens to tokenize)."""
    tokens = model.tokenize(text, add_special=False, parse_special=True)
    if len(tokens) != 1:
        return False
    return model.token_text(tokens[0]) == text and model.piece(tokens[0], special=False) == b""
