"""The cheap deviation signal behind `select:F`: which cells an edit left most stale.

A cell is stale to the extent that, when it was computed, it attended to context that is now
different: cells a roll dropped or a mask removed, or, for a composed document block, the session
text before it that the block never saw. Which cells those are is known; how much each cell
attended to them is estimated from the cache alone, CacheBlend-style but without a forward pass:
the cell's own key stands in for its query (both are projections of the same hidden state and
carry the same RoPE rotation, so k_i . k_j keeps the relative-position structure of q_i . k_j),
a causal softmax over the cells before it gives an attention share, and the share that falls on
the changed cells, averaged over KV heads and a few layers, is the cell's deviation score.
"""

from __future__ import annotations

import numpy as np

from kvside.engine import kvstate
from kvside.errors import EditError

N_LAYERS = 4  # layers sampled for the signal: reading and scoring more costs more than it tells


def sample_layers(n_layer: int, n: int = N_LAYERS) -> list[int]:
    """Evenly spaced layers, skipping layer 0 (its input is the embedding, not the context)."""
    if n_layer <= 1:
        return [0]
    return sorted({round(x) for x in np.linspace(1, n_layer - 1, min(n, n_layer - 1))})


def attention_share(keys: np.ndarray, pos: np.ndarray, changed: np.ndarray, rows: np.ndarray,
                    head_dim: int) -> np.ndarray:
    """For each cell index in `rows`: the softmax share (keys as queries, causal, itself left
    out) that falls on cells where `changed` is true, averaged over heads. keys: (cells, heads*dim)."""
    cells, width = keys.shape
    heads = width // head_dim
    k = keys.reshape(cells, heads, head_dim)
    q = k[rows]  # (rows, heads, dim)
    out = np.zeros(len(rows), np.float64)
    future = pos[None, :] >= pos[rows][:, None]  # causal, and the cell itself
    for h in range(heads):
        scores = (q[:, h, :] @ k[:, h, :].T) / np.sqrt(head_dim)
        scores[future] = -np.inf
        top = scores.max(axis=1, keepdims=True)
        top[~np.isfinite(top)] = 0.0
        w = np.exp(scores - top)
        total = w.sum(axis=1)
        lost = w[:, changed].sum(axis=1)
        out += np.divide(lost, total, out=np.zeros_like(lost), where=total > 0)
    return out / heads


def scores(core, seq: int, changed_pos: set[int] | tuple[int, int], candidate_pos: list[int]) -> np.ndarray:
    """Deviation score of each cell of seq at `candidate_pos` given the positions that changed
    (a set, or a half-open span), from the sequence's current cache."""
    return scores_many(core, seq, [(changed_pos, candidate_pos)])[0]


def scores_many(core, seq: int, asks: list[tuple[set[int] | tuple[int, int], list[int]]]) -> list[np.ndarray]:
    """scores() for several (changed positions, candidate positions) pairs, the cache read once."""
    info = core.model.info()
    layers = sample_layers(info.n_layer)
    try:
        kv = kvstate.parse(core.seq_state(seq), layers=set(layers), values=False)
    except ValueError as exc:  # a cache kvstate cannot read (quantized KV, M-RoPE cells)
        raise EditError(f"select:F needs the cached keys, which cannot be read here: {exc}") from None
    pos = kv.pos
    where = {int(p): i for i, p in enumerate(pos)}
    out = []
    for changed_pos, candidate_pos in asks:
        if isinstance(changed_pos, tuple):
            changed = (pos >= changed_pos[0]) & (pos < changed_pos[1])
        else:
            changed = np.isin(pos, np.fromiter(changed_pos, dtype=pos.dtype))
        rows = np.array([where[p] for p in candidate_pos], dtype=np.int64)
        total = np.zeros(len(rows))
        for il in layers:
            keys = kv.k[il]
            total += attention_share(keys, pos, changed, rows, keys.shape[1] // info.n_head_kv)
        out.append(total / len(layers))
    return out


def choose(score: np.ndarray, frac: float) -> list[int]:
    """Indices of the top `frac` of scores (at least one), in increasing order."""
    n = max(1, round(frac * len(score)))
    return sorted(np.argsort(-score, kind="stable")[:n].tolist())
