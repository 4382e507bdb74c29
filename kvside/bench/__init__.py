"""Benchmarks: commands that run kvside and its reference side by side and print JSON and a table."""

from __future__ import annotations

import json
import statistics


def print_report(result: dict, as_json: bool, rows: list[tuple[str, object]] | None = None) -> None:
    if as_json:
        print(json.dumps(result, indent=2))
        return
    rows = rows or [(k, v) for k, v in result.items() if not isinstance(v, (dict, list))]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        print(f"{key:<{width}}  {shown}")


def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0
