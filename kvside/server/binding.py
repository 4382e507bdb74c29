"""Automatic session binding: editors send the whole message array on every request, and drop the
oldest turns from the front when their window fills. Match the array against what resident
sessions hold, reuse the longest match, and turn a dropped front into a suffix-cache edit (the
dropped messages' cells go, the later cells move down) instead of a re-prefill."""

from __future__ import annotations

from dataclasses import dataclass


def _key(m: dict) -> tuple[str, str]:
    return (m.get("role", ""), (m.get("content") or "").strip())


@dataclass
class Match:
    session: str
    keep_head: int  # leading messages kept (the system prompt)
    dropped: list[int]  # message ids the client no longer sends
    reused: int  # messages reused
    new: list[dict]  # messages to append


def best_match(sessions: dict[str, list[dict]], incoming: list[dict]) -> Match | None:
    """sessions: name -> the session's chat messages (id, role, content, state) in order, rolled
    ones included (the client may still send what the cache already let go).
    The incoming array must be held[:a] + held[b:] + new, with a in {0, 1} (the system prompt)."""
    want = [_key(m) for m in incoming]
    best: Match | None = None
    for name, held in sessions.items():
        have = [_key(m) for m in held]
        for a in (1, 0):
            if a > len(have) or want[:a] != have[:a]:
                continue
            for b in range(a, len(have) + 1):
                tail = have[b:]
                n = len(tail)
                if a + n > len(want) or want[a : a + n] != tail:
                    continue
                if a + n == len(want):
                    continue  # nothing new to answer
                reused = a + n
                if best is None or reused > best.reused:
                    gone = [m["id"] for m in held[a:b] if m.get("state", "live") == "live"]
                    best = Match(name, a, gone, reused, incoming[a + n :])
                break  # the smallest b (fewest drops) is best for this head
    if best is not None and best.reused == 0:
        return None
    return best
