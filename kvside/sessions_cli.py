"""CLI commands for session files: save (export), restore (import), sessions, inspect. They work on
the files in the sessions folder and need no running engine; checking a file against the current
model needs only the model's fingerprint, not loading it."""

from __future__ import annotations

import json
import time
from pathlib import Path

from kvside import atomic, sessionfile
from kvside.engine.persist import SUFFIX
from kvside.engine.session import check_name
from kvside.errors import InvalidRequest, SessionNotFound
from kvside.home import subdir
from kvside.models import fingerprint, resolve


def sessions_dir(override: str | None = None) -> Path:
    path = Path(override) if override else subdir("sessions")
    path.mkdir(parents=True, exist_ok=True)
    return path


def stored(name: str, folder: Path) -> Path:
    path = folder / f"{check_name(name)}{SUFFIX}"
    if not path.is_file():
        raise SessionNotFound(f"no saved session named {name!r} in {folder}")
    return path


def describe(path: Path, model: str | None = None) -> dict:
    """Header summary of a session file, checked in full (checksum included)."""
    sf = sessionfile.read_header(path, verify=True)
    h = sf.header
    ref = resolve(model)
    led = h.get("ledger", {})
    states: dict[str, int] = {}
    for st in led.get("state", []):
        states[st] = states.get(st, 0) + 1
    return {
        "path": str(path),
        "name": h.get("name"),
        "format": f"{h['format']} v{h['version']}",
        "kvside_version": h.get("kvside_version"),
        "model_name": h.get("model_name"),
        "model_fingerprint": h.get("model_fingerprint"),
        "matches_model": h.get("model_fingerprint") == fingerprint(ref.path),
        "current_model": ref.name,
        "n_ctx": h.get("n_ctx"),
        "kv_types": f"{h.get('type_k')}/{h.get('type_v')}",
        "rope": h.get("rope"),
        "n_cells": h.get("n_cells"),
        "next_pos": (led.get("pos") or [-1])[-1] + 1,
        "cell_states": states,
        "messages": len(h.get("messages", [])),
        "edits": len(h.get("edit_log", [])),
        "file_bytes": path.stat().st_size,
        "state_bytes": sf.state_len,
        "checkpoints": [c.get("n") for c in h.get("checkpoints", []) if isinstance(c, dict)],
        "checkpoint_bytes": sum(sf.extra_sizes),
        "checksum": "ok" if sf.checksum_ok else "bad",
        "created": h.get("created"),
        "saved_at": h.get("saved_at"),
    }


def _copy_atomic(src: Path, dst: Path) -> None:
    try:
        atomic.copy_file(src, dst)
    except OSError as exc:
        raise sessionfile.SessionSaveError(f"could not write {dst}: {exc.strerror or exc}") from None


def export(name: str, dest: str | None, folder: Path) -> dict:
    src = stored(name, folder)
    sessionfile.read_header(src, verify=True)
    dst = Path(dest) if dest else Path.cwd() / f"{name}{SUFFIX}"
    if dst.is_dir():
        dst = dst / f"{name}{SUFFIX}"
    _copy_atomic(src, dst)
    return {"session": name, "file": str(dst), "bytes": dst.stat().st_size}


def import_file(path: str, name: str | None, folder: Path, model: str | None, force: bool) -> dict:
    info = describe(Path(path), model)
    if not info["matches_model"]:
        raise sessionfile.SessionFileError(
            f"{Path(path).name} was saved with {info['model_name']}, not {info['current_model']} (use --model)"
        )
    name = check_name(name or info["name"] or Path(path).stem)
    dst = folder / f"{name}{SUFFIX}"
    if dst.exists() and not force:
        raise InvalidRequest(f"a session named {name!r} exists already (use --as NAME or --force)")
    if name != info["name"]:
        sessionfile.rewrite(Path(path), dst, name=name)
    else:
        _copy_atomic(Path(path), dst)
    return {"session": name, "file": str(dst), "cells": info["n_cells"]}


def listing(folder: Path) -> list[dict]:
    rows = []
    for path in sorted(folder.glob(f"*{SUFFIX}")):
        if path.name.startswith("."):  # a file being written or received, not a session
            continue
        try:
            sf = sessionfile.read_header(path, verify=False)
            h = sf.header
            rows.append({"name": path.stem, "model": h.get("model_name"), "cells": h.get("n_cells"),
                         "messages": len(h.get("messages", [])), "bytes": path.stat().st_size,
                         "saved_at": h.get("saved_at")})
        except sessionfile.SessionFileError as exc:
            rows.append({"name": path.stem, "error": exc.message})
    return rows


def print_listing(rows: list[dict], as_json: bool) -> None:
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        print("no saved sessions")
    for r in rows:
        if "error" in r:
            print(f"{r['name']:<24} damaged: {r['error']}")
            continue
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["saved_at"] or 0))
        print(f"{r['name']:<24} {r['cells']:>6} cells {r['messages']:>4} msgs {r['bytes'] / 1e6:8.2f} MB  {when}  {r['model']}")
