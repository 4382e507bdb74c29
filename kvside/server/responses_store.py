"""The Responses API's stored responses: the most recent MAX_STORED, by id, in memory and in the
daemon's sessions folder (responses/), so a conversation continued with `previous_response_id`
goes on across a restart, and daemons that share a sessions folder share them."""

from __future__ import annotations

import json
import re
import sys
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from kvside import atomic
from kvside.errors import KvsideError

MAX_STORED = 1024


class ResponseNotFound(KvsideError):
    status = 404
    kind = "invalid_request_error"
    code = "not_found"


RESPONSE_ID = re.compile(r"resp_[0-9a-f]{32}")


@dataclass
class Stored:
    response: dict  # the response object as it was answered
    added: list[dict]  # the chat messages this response added: its input, then its reply
    input_items: list[dict]  # its input as items with ids (GET .../input_items)
    parent: Stored | None = None  # the response it continued; kept alive by this one

    def conversation(self) -> list[dict]:
        """Every message from the first response of the chain to this one, instructions aside
        (OpenAI does not carry instructions over to a continuation)."""
        chain, at = [], self
        while at is not None:
            chain.append(at.added)
            at = at.parent
        return [m for added in reversed(chain) for m in added]


class ResponseStore:
    """The most recent stored responses by id, in memory, and each also written to `folder` (the
    daemon's sessions folder) so that a response can be continued after the daemon restarts, or
    on another daemon sharing the folder. A continued response keeps its parent object alive even
    once the parent's id is forgotten, so a chain never breaks in the middle; a file holds the
    whole conversation, so it needs no other file."""

    def __init__(self, capacity: int = MAX_STORED, folder: Path | None = None):
        self.capacity = capacity
        self.folder = folder
        self._by_id: OrderedDict[str, Stored] = OrderedDict()
        self._deleted: set[str] = set()  # deleted while their file was still being written
        self._writes = 0

    def get(self, rid: str) -> Stored:
        stored = self._by_id.get(rid) or self._read(rid)
        if stored is None:
            raise ResponseNotFound(f"no stored response with id {rid!r} (kvside keeps the last {self.capacity}, "
                                   f"and none made with 'store': false)")
        self._by_id[rid] = stored
        self._by_id.move_to_end(rid)
        self._trim()
        return stored

    def put(self, rid: str, stored: Stored) -> None:
        """Keep `stored` in memory now, and write it out: the caller runs `write` off the event
        loop (a file written with fsync is milliseconds the loop would otherwise wait)."""
        self._by_id[rid] = stored
        self._trim()

    def _trim(self) -> None:
        while len(self._by_id) > self.capacity:
            self._by_id.popitem(last=False)

    def _path(self, rid: str) -> Path | None:
        if self.folder is None or not RESPONSE_ID.fullmatch(rid):  # a name, never a path
            return None
        return self.folder / f"{rid}.json"

    def write(self, rid: str, stored: Stored) -> None:
        path = self._path(rid)
        if path is None or rid in self._deleted:
            return
        data = {"format": 1, "response": stored.response, "conversation": stored.conversation(),
                "input_items": stored.input_items}
        try:
            atomic.write_bytes(path, json.dumps(data, ensure_ascii=False).encode("utf-8"))
        except OSError as exc:  # a full disk loses the continuation after a restart, not the reply
            print(f"kvside: could not store response {rid} ({exc})", file=sys.stderr)
            return
        if rid in self._deleted:  # deleted while it was being written
            path.unlink(missing_ok=True)
        self._writes += 1
        if self._writes % 64 == 1:
            self._prune()

    def _prune(self) -> None:
        """Only the newest `capacity` files stay."""
        try:
            files = sorted(self.folder.glob("resp_*.json"), key=lambda f: f.stat().st_mtime_ns)
        except OSError:
            return
        for old in files[: max(len(files) - self.capacity, 0)]:
            old.unlink(missing_ok=True)

    def _read(self, rid: str) -> Stored | None:
        path = self._path(rid)
        if path is None or rid in self._deleted:
            return None
        try:
            data = json.loads(path.read_bytes())
            return Stored(data["response"], data["conversation"], data["input_items"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise KvsideError(f"stored response {rid} cannot be read ({type(exc).__name__}); it is left as it is "
                              f"in {path}") from None

    def delete(self, rid: str) -> None:
        self.get(rid)
        del self._by_id[rid]
        self._deleted.add(rid)
        path = self._path(rid)
        if path is not None:
            path.unlink(missing_ok=True)
