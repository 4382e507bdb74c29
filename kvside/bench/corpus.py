"""Benchmark text that ships with Python: the docstrings of standard-library modules. Real,
varied English prose, the same on every machine with the same Python, and nothing to download."""

from __future__ import annotations

import importlib

MODULES = [
    "argparse", "asyncio", "collections", "contextlib", "csv", "dataclasses", "datetime", "decimal",
    "difflib", "email", "fractions", "functools", "heapq", "http.server", "inspect", "json", "logging",
    "pathlib", "pickle", "queue", "random", "re", "shutil", "socket", "sqlite3", "statistics", "string",
    "subprocess", "tarfile", "textwrap", "threading", "typing", "unittest", "urllib.parse", "uuid",
    "zipfile",
]


def text() -> str:
    parts = []
    for name in MODULES:
        try:
            doc = importlib.import_module(name).__doc__
        except ImportError:
            continue
        if doc:
            parts.append(doc.strip())
    return "\n\n".join(parts)


def tokens(model, n: int) -> list[int]:
    """The first n tokens of the corpus (repeated if it is shorter)."""
    toks = model.tokenize(text(), add_special=True, parse_special=False)
    while len(toks) < n:
        toks += toks[1:]
    return toks[:n]
