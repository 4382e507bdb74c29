"""Edits asked for by name with JSON arguments: the daemon's POST /kvside/sessions/{name}/{edit}
and the chat app's slash commands go through this one table, which checks every argument's type
before the engine sees it. Session files are named here, never pathed (see Engine.save_as)."""

from __future__ import annotations

from typing import Any, Callable

from kvside.errors import InvalidRequest

_MISSING = object()


def _get(args: dict, key: str, types: tuple, default: Any = _MISSING, what: str = "") -> Any:
    value = args.get(key, default)
    if value is _MISSING or (value is None and default is _MISSING):
        raise InvalidRequest(f"'{key}' is required", param=key)
    if value is None or value is default:
        return value
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        raise InvalidRequest(f"'{key}' must be {what}", param=key)
    return value


def _int(args: dict, key: str, default: Any = _MISSING, lo: int = -(2**31), hi: int = 2**31 - 1) -> Any:
    value = _get(args, key, (int,), default, "an integer")
    if isinstance(value, int) and not lo <= value <= hi:
        raise InvalidRequest(f"'{key}' must be between {lo} and {hi}", param=key)
    return value


def _str(args: dict, key: str, default: Any = _MISSING) -> Any:
    return _get(args, key, (str,), default, "a string")


def _bool(args: dict, key: str) -> bool:
    return bool(_get(args, key, (bool,), False, "true or false"))


def _ints(args: dict, key: str) -> list[int] | None:
    value = _get(args, key, (list,), None, "a list of integers")
    if value is not None and not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise InvalidRequest(f"'{key}' must be a list of integers", param=key)
    return value


def _span(args: dict) -> tuple[int, int] | None:
    value = _ints(args, "span")
    if value is None:
        return None
    if len(value) != 2:
        raise InvalidRequest("'span' must be [p0, p1]", param="span")
    return value[0], value[1]


def _save(engine, name: str, args: dict) -> dict:
    if "path" in args:
        raise InvalidRequest("sessions are saved by name ('as'), never to a path; export to a file with "
                             "`kvside save NAME FILE`", param="path")
    return engine.save_as(name, _str(args, "as", None))


def _strategy(engine, name: str, args: dict) -> dict:
    strategy = _str(args, "strategy")
    engine.set_roll_strategy(name, strategy)
    return {"strategy": strategy}


def _policy(engine, name: str, args: dict) -> dict:
    if "prune_tools" not in args:
        raise InvalidRequest("'prune_tools' is required (a count of tool results to keep, or null for off)",
                             param="prune_tools")
    keep = _int(args, "prune_tools", None, lo=0)
    engine.set_prune_tools(name, keep)
    return {"prune_tools": keep}


def _attach(engine, name: str, args: dict) -> dict:
    """One document ('document') or several at once ('documents': select:F ranks all their cells)."""
    recompute, strategy = _int(args, "recompute", 0, lo=-1), _str(args, "strategy", None)
    if "documents" not in args:
        return engine.attach(name, _str(args, "document"), recompute, strategy)
    if "document" in args:
        raise InvalidRequest("give 'document' or 'documents', not both", param="documents")
    docs = _get(args, "documents", (list,), what="a list of document names")
    if not docs or not all(isinstance(d, str) and d for d in docs):
        raise InvalidRequest("'documents' must be a non-empty list of document names", param="documents")
    reports = engine.attach_documents(name, docs, recompute, strategy)
    return {"attached": reports, "tokens": sum(r["tokens"] for r in reports),
            "recomputed": sum(r["recomputed"] for r in reports)}


EDITS: dict[str, Callable[[Any, str, dict], Any]] = {
    "roll": lambda e, n, a: e.roll(n, _int(a, "drop", lo=0), _int(a, "keep", None, lo=0), _str(a, "strategy", None),
                                   _bool(a, "boundary")),
    "mask": lambda e, n, a: e.mask(n, _ints(a, "messages"), _span(a), _bool(a, "close_gap"),
                                   _str(a, "strategy", None) or "shift"),
    "compact": lambda e, n, a: e.compact(n, _int(a, "up_to"), _str(a, "summary", None), _str(a, "mode", None) or "mask"),
    "prune": lambda e, n, a: e.prune(n, _str(a, "kind", None) or "tool", _int(a, "keep_last", 1, lo=0)),
    "erratum": lambda e, n, a: e.erratum(n, _str(a, "text")),
    "fork": lambda e, n, a: {"session": e.fork(n, _str(a, "name", None))},
    "save": _save,
    "strategy": _strategy,
    "policy": _policy,
    "attach": _attach,
    # not an edit: the cache measured against a re-prefill of its tokens (engine/reference.py)
    "fidelity": lambda e, n, a: e.fidelity(n, _int(a, "tokens", None, lo=1, hi=256) or 64),
}
MEASUREMENTS = {"fidelity"}  # leave the session as it was: not counted as edits


def apply(engine, name: str, edit: str, args: Any) -> Any:
    """Run edit `edit` on session `name` with `args` (a JSON object)."""
    if edit not in EDITS:
        raise InvalidRequest(f"unknown edit {edit!r} (one of: {', '.join(EDITS)})")
    if not isinstance(args, dict):
        raise InvalidRequest("the arguments must be a JSON object")
    return EDITS[edit](engine, name, args)
