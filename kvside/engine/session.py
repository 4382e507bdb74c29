"""A session: one conversation on one sequence of the shared KV cache."""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field

from kvside.engine.ledger import Ledger
from kvside.engine.sampling import SamplingParams
from kvside.errors import InvalidRequest

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

# Message states: a message stays in the history (templates need it to render what follows)
# even when its cells have left the cache.
MSG_LIVE = "live"
MSG_MASKED = "masked"
MSG_ROLLED = "rolled"
MSG_PRUNED = "pruned"
MSG_SUMMARIZED = "summarized"
MSG_DROPPED = "dropped"  # masked because the client stopped sending it


def check_name(name: str) -> str:
    """Session names become file names: letters, digits, '.', '_' and '-', no leading dot."""
    if not isinstance(name, str) or not NAME_RE.match(name) or ".." in name:
        raise InvalidRequest(f"invalid session name {name!r}: use letters, digits, '.', '_', '-' (max 64)")
    return name


def _arguments(text):
    try:
        value = json.loads(text) if isinstance(text, str) else text
    except ValueError:
        return text
    return value if isinstance(value, dict) else text


@dataclass
class Message:
    id: int
    role: str
    content: str
    state: str = MSG_LIVE
    pinned: bool = False
    kind: str = "chat"  # "chat", "summary", "erratum", "tool", "text"
    # OpenAI's tool calls of an assistant turn: [{"id", "type": "function", "function": {"name",
    # "arguments": JSON text}}]; the call id a tool result answers; the reasoning of a reply
    tool_calls: list | None = None
    tool_call_id: str | None = None
    reasoning: str = ""

    @classmethod
    def from_request(cls, msg_id: int, m: dict) -> "Message":
        """A client's message (OpenAI's shape, content already text) as message msg_id."""
        return cls(msg_id, m["role"], m["content"], kind="tool" if m["role"] == "tool" else "chat",
                   tool_calls=m.get("tool_calls") or None, tool_call_id=m.get("tool_call_id"),
                   reasoning=m.get("reasoning_content") or "")

    def as_template(self) -> dict:
        """The message as chat templates take it (arguments as objects, as Hugging Face's
        templates expect them)."""
        out = {"role": self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [
                {"id": c.get("id", ""), "type": "function",
                 "function": {"name": c["function"]["name"], "arguments": _arguments(c["function"]["arguments"])}}
                for c in self.tool_calls
            ]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.reasoning:
            out["reasoning_content"] = self.reasoning
        return out

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Session:
    name: str
    seq: int
    ledger: Ledger = field(default_factory=Ledger)
    messages: list[Message] = field(default_factory=list)
    # Tokens that belong to the sequence but are not decoded yet: the last sampled token of a
    # reply is emitted before it is decoded, so it waits here for the next request.
    pending: list[int] = field(default_factory=list)
    pending_msg: int = -1
    closing: str = ""  # template text that closes the last reply, appended with the next request
    defaults: SamplingParams = field(default_factory=SamplingParams)
    roll_strategy: str = "shift"
    edit_log: list[dict] = field(default_factory=list)
    created: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    busy: bool = False
    backlog: list = field(default_factory=list)
    auto_bound: bool = False  # created by request binding, which may reuse it for a later request
    temporary: bool = False  # removed when its reply ends (a daemon run with --no-reuse)
    # a text prompt's cells kept for the next text request to reuse (binding.bind_text): dropped,
    # never saved, when room is needed or the daemon stops
    text_cache: bool = False
    # The tool definitions the session's prompt was rendered with: templates put them in the
    # system turn, so they are part of the cached prefix and every later turn renders with them.
    tools: list[dict] = field(default_factory=list)
    prune_tools: int | None = None  # the tool-result policy: keep the last N when the window fills
    # context checkpoints (checkpoints.py): where this model's cache cannot go back, copies of
    # what it cannot give back, taken at message boundaries; in memory only, never saved
    checkpoints: list = field(default_factory=list)

    def next_message_id(self) -> int:
        return max((m.id for m in self.messages), default=-1) + 1

    def message(self, msg_id: int) -> Message:
        for m in self.messages:
            if m.id == msg_id:
                return m
        raise InvalidRequest(f"session {self.name} has no message {msg_id}")

    def template_history(self) -> list[dict]:
        """The conversation as the template renders what follows it: every message, its cells
        in the cache or not, but for those the client stopped sending (a template may render the
        rest otherwise without them: Gemma's folds the system prompt into whichever user turn is
        first)."""
        return [m.as_template() for m in self.messages if m.kind != "text" and m.state != MSG_DROPPED]

    def log(self, kind: str, **data) -> dict:
        entry = {"edit": kind, "time": time.time(), **data}
        self.edit_log.append(entry)
        return entry

    def summary(self) -> dict:
        return {
            "name": self.name,
            "seq": self.seq,
            "n_tokens": len(self.ledger) + len(self.pending),
            "n_cells": len(self.ledger),
            "next_pos": self.ledger.next_pos,
            "n_messages": len(self.messages),
            "busy": self.busy,
            "roll_strategy": self.roll_strategy,
            "prune_tools": self.prune_tools,
            "created": self.created,
            "last_used": self.last_used,
            "edits": len(self.edit_log),
            "checkpoints": [c.n for c in self.checkpoints],
        }
