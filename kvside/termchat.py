"""A plain terminal chat: type a message, read the streamed reply. Ctrl-C stops a reply;
Ctrl-D (or /quit) leaves."""

from __future__ import annotations

import sys

from kvside.errors import KvsideError


def run_terminal_chat(engine, name: str, params: dict | None = None) -> int:
    print("kvside chat: type a message; /quit or Ctrl-D leaves, Ctrl-C stops a reply.")
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if line.strip() in ("/quit", "/exit"):
            return 0
        if not line.strip():
            continue
        stream = engine.chat(name, line, **(params or {}))
        try:
            for text in stream:
                sys.stdout.write(text)
                sys.stdout.flush()
        except KeyboardInterrupt:
            stream.cancel()
        except KvsideError as exc:
            print(f"\n[error: {exc.message}]")
            continue
        try:
            done = stream.wait()
        except KvsideError as exc:
            print(f"\n[error: {exc.message}]")
            continue
        print(f"\n[{done.usage.completion_tokens} tokens, {done.decode_tok_s:.0f} tok/s, "
              f"{done.usage.cached_tokens} cached of {done.usage.prompt_tokens}]")
