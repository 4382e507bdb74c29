"""A generation's stream of events, read by any thread; cancellable from any thread."""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Iterator

from kvside.errors import KvsideError


@dataclass
class Event:
    # "bound" (the session chosen), "text", "reasoning", "tool_call" (a call's id and name),
    # "tool_args" (a fragment of its arguments), "notice" (e.g. an automatic roll), "done", "error"
    kind: str
    text: str = ""
    data: dict = field(default_factory=dict)


@dataclass
class Usage:
    prompt_tokens: int = 0  # tokens of the request that the model had to see
    cached_tokens: int = 0  # of those, already in the cache
    completion_tokens: int = 0

    def to_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }


@dataclass
class Completion:
    session: str
    text: str
    tokens: list[int]
    finish_reason: str  # "stop", "length", "tool_calls", "error" or "cancelled"
    usage: Usage
    t_prefill_s: float = 0.0  # request accepted to first sampled token
    t_total_s: float = 0.0
    decode_tok_s: float = 0.0
    notices: list[dict] = field(default_factory=list)
    params: dict = field(default_factory=dict)  # the sampling parameters the reply was made with
    reasoning: str = ""
    tool_calls: list[dict] = field(default_factory=list)  # OpenAI's shape
    logprobs: list[dict] | None = None  # per token, when asked for


class Stream:
    def __init__(self, session: str):
        self.session = session
        self._events: queue.Queue[Event] = queue.Queue()
        self._cancel = threading.Event()
        self._done = threading.Event()
        self.completion: Completion | None = None
        self.error: KvsideError | None = None
        # the reply's usage, set when its generation starts (the prompt's tokens and how many of
        # them were in the cache) and counted on as it decodes; a front that reports the prompt
        # before the reply ends (Anthropic's message_start) reads it here
        self.usage: Usage | None = None
        self.on_event = None  # optional callback (engine thread), e.g. to wake an asyncio loop

    # -- engine side --------------------------------------------------------------------------
    def put(self, event: Event) -> None:
        self._events.put(event)
        if self.on_event is not None:
            self.on_event(event)

    def finish(self, completion: Completion) -> None:
        self.completion = completion
        self._done.set()
        self.put(Event("done", data={"finish_reason": completion.finish_reason}))

    def fail(self, error: KvsideError) -> None:
        self.error = error
        self._done.set()
        self.put(Event("error", text=error.message, data={"error": error}))

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    # -- reader side --------------------------------------------------------------------------
    def cancel(self) -> None:
        self._cancel.set()

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        while True:
            event = self._events.get(timeout=timeout)
            yield event
            if event.kind in ("done", "error"):
                return

    def __iter__(self) -> Iterator[str]:
        """Text deltas; raises the generation's error if it failed."""
        for event in self.events():
            if event.kind == "text":
                yield event.text
            elif event.kind == "error":
                raise event.data["error"]

    def wait(self, timeout: float | None = None) -> Completion:
        if not self._done.wait(timeout):
            raise TimeoutError("generation did not finish in time")
        if self.error is not None:
            raise self.error
        assert self.completion is not None
        return self.completion

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def text(self) -> str:
        return self.wait().text

