"""The cache map: the session's ledger drawn along the positions, so a user sees what the model
actually sees: live turns, masked holes, the summary, composed documents, recomputed cells, and
what rolled away at the front."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

STYLES = {
    "live": ("█", "green"),
    "summary": ("█", "magenta"),
    "composed": ("█", "cyan"),
    "recomputed": ("█", "yellow"),
    "erratum": ("█", "red"),
    "gap": ("·", "grey42"),
    "free": ("░", "grey23"),
}


def render_map(snapshot: dict, width: int) -> Text:
    """One bar of `width` characters for positions 0..n_ctx, then a legend and the removals."""
    n_ctx = max(snapshot.get("n_ctx") or snapshot.get("next_pos") or 1, 1)
    width = max(width, 10)
    per = n_ctx / width
    slots = ["free"] * width
    next_pos = snapshot.get("next_pos", 0)
    for i in range(min(width, int(next_pos / per + 0.999))):
        slots[i] = "gap"  # inside the used range but not (yet) painted by a run
    for run in snapshot.get("runs", []):
        a = int(run["p0"] / per)
        b = max(a + 1, int(run["p1"] / per + 0.5))
        for i in range(a, min(b, width)):
            if slots[i] in ("gap", "free", "live"):
                slots[i] = run["state"]
    bar = Text()
    for kind in slots:
        char, style = STYLES.get(kind, STYLES["live"])
        bar.append(char, style=style)
    bar.append(f"\n{snapshot.get('n_cells', 0)} cells, next position {next_pos} of {n_ctx}\n")
    for kind in ("live", "summary", "composed", "recomputed", "erratum", "gap"):
        char, style = STYLES[kind]
        bar.append(char, style=style)
        bar.append(f" {'masked/hole' if kind == 'gap' else kind}  ")
    removed = snapshot.get("removed", [])
    if removed:
        totals: dict[str, int] = {}
        for r in removed:
            totals[r["reason"]] = totals.get(r["reason"], 0) + r["n_tokens"]
        bar.append("\nleft the cache: " + ", ".join(f"{n} {why}" for why, n in totals.items()))
    return bar


class CacheMap(Static):
    DEFAULT_CSS = """
    CacheMap { height: auto; min-height: 4; border: round $accent; padding: 0 1; }
    """

    def __init__(self, **kwargs):
        super().__init__("", **kwargs)
        self.snapshot: dict = {}
        self.border_title = "cache map"

    def show(self, snapshot: dict) -> None:
        self.snapshot = snapshot
        self.update(render_map(snapshot, max(self.size.width - 4, 40)))

    def on_resize(self) -> None:
        if self.snapshot:
            self.update(render_map(self.snapshot, max(self.size.width - 4, 40)))
