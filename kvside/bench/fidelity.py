"""Fidelity metrics of an edited cache against its reference (names from DESIGN.md):
`kl` = KL(p_ref || p_edit) in nats, `logit_cos`, `top1`, `greedy_match`, `degeneration`."""

from __future__ import annotations

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def compare(edited: np.ndarray, reference: np.ndarray) -> dict:
    """Rows are teacher-forced steps (n x vocab); row 0 is the first token after the edit."""
    e = np.atleast_2d(edited)
    r = np.atleast_2d(reference)
    assert e.shape == r.shape, f"shapes differ: {e.shape} vs {r.shape}"
    lr, le = log_softmax(r), log_softmax(e)
    kl = (np.exp(lr) * (lr - le)).sum(axis=-1)
    kl = np.maximum(kl, 0.0)  # rounding can make an exact match read -1e-17
    cos = (e * r).sum(-1) / (np.linalg.norm(e, axis=-1) * np.linalg.norm(r, axis=-1))
    return {
        "kl": float(kl.mean()),
        "kl_first": float(kl[0]),
        "kl_p99": float(np.percentile(kl, 99)),
        "kl_max": float(kl.max()),
        "logit_cos": float(cos.mean()),
        "top1": float((e.argmax(-1) == r.argmax(-1)).mean()),
        "max_abs_diff": float(np.abs(e - r).max()),
    }


def greedy_match(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def degeneration(tokens: list[int]) -> float:
    """1 - distinct 4-grams / 4-grams: near 1 for 'worked worked worked ...'."""
    grams = [tuple(tokens[i : i + 4]) for i in range(len(tokens) - 3)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0
