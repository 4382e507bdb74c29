"""Where kvside keeps its files. `KVSIDE_HOME` overrides the platform's data directory
(tests point it at a temporary directory)."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs


def home() -> Path:
    override = os.environ.get("KVSIDE_HOME")
    path = Path(override) if override else Path(platformdirs.user_data_dir("kvside", appauthor=False))
    path.mkdir(parents=True, exist_ok=True)
    return path


def subdir(name: str) -> Path:
    path = home() / name
    path.mkdir(parents=True, exist_ok=True)
    return path
