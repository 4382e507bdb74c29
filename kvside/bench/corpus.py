"""The text every evaluation and benchmark reads: the fixtures in tests/data (written for
kvside), so every machine measures the same words and nothing is downloaded. KVSIDE_FIXTURES
points elsewhere."""

from __future__ import annotations

import json
import os
from pathlib import Path

from kvside.errors import KvsideError


def data_dir() -> Path:
    override = os.environ.get("KVSIDE_FIXTURES")
    folder = Path(override) if override else Path(__file__).resolve().parents[2] / "tests" / "data"
    if not (folder / "prose").is_dir():
        raise KvsideError(f"the text fixtures are not at {folder} (kvside eval and bench need a source "
                          "checkout, or KVSIDE_FIXTURES set to a folder with prose/ and compaction.json)")
    return folder


def documents() -> list[Path]:
    """The prose passages, in order."""
    return sorted((data_dir() / "prose").glob("*.txt"))


def text() -> str:
    return "\n\n".join(p.read_text(encoding="utf-8").strip() for p in documents())


def tokens(model, n: int) -> list[int]:
    """The first n tokens of the corpus (repeated if it is shorter)."""
    toks = model.tokenize(text(), add_special=True, parse_special=False)
    while len(toks) < n:
        toks += toks[1:]
    return toks[:n]


def compaction() -> dict:
    return json.loads((data_dir() / "compaction.json").read_text(encoding="utf-8"))
