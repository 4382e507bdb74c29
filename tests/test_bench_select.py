"""`kvside bench select`: the deviation arithmetic, and on the real model that its signals choose
cells whose recompute brings a composed cache closer to the prefill (native patch)."""

import os

import numpy as np
import pytest

from kvside.bench import selection
from kvside.engine import kvstate, native
from kvside.errors import InvalidRequest


def test_kv_deviation_ranks_the_cell_that_differs_first():
    rng = np.random.default_rng(1)
    pos = np.arange(6)
    k = [rng.normal(size=(6, 8)).astype(np.float32) for _ in range(3)]
    v = [rng.normal(size=(6, 8)).astype(np.float32) for _ in range(3)]
    reference = kvstate.KV(pos, k, v)
    # the edited cache lists its cells in another order, and cell at position 4 differs in layer 2
    order = np.array([3, 0, 5, 1, 4, 2])
    ek = [x[order].copy() for x in k]
    ev = [x[order].copy() for x in v]
    ek[2][4] += 0.5  # row 4 holds position 4
    edited = kvstate.KV(pos[order], ek, ev).by_position()
    dev = selection.kv_deviation(edited, reference, np.array([1, 2, 4]), [0, 1, 2])
    assert dev[0] == dev[1] == 0.0 and dev[2] > 0
    assert selection.kv_deviation(edited, reference, np.array([4]), [0, 1]).item() == 0.0  # not in those layers


@pytest.mark.skipif(not native.available() and os.environ.get("KVSIDE_REQUIRE_NATIVE") != "1",
                    reason="kvside's native patch is not loaded (make native)")
def test_recomputing_chosen_cells_brings_the_composed_cache_towards_the_prefill():
    result = selection.run(None, [1], ["true:all", "keys:global"], [0.3, 1.0], steps=6, n_threads=2)
    rows = {(r["signal"], r["budget"]): r for r in result["results"]}
    none = rows[("none", 0.0)]
    assert none["recomputed"] == 0 and none["kl"] > 0.01  # a spliced block misses the session before it
    for sig in ("true:all", "keys:global"):
        part, whole = rows[(sig, 0.3)], rows[(sig, 1.0)]
        assert part["recomputed"] == pytest.approx(0.3, abs=0.01) and whole["recomputed"] == 1.0
        assert part["kl"] < none["kl"]
        assert whole["kl"] < 0.01  # every cell recomputed: a prefill's cache up to rounding
    assert rows[("true:all", 0.3)]["kl"] < none["kl"] / 2


def test_unknown_signal_is_refused():
    if not native.available():
        with pytest.raises(InvalidRequest, match="make native"):
            selection.run(None, [1], ["keys:global"], [0.1], steps=2, n_threads=1)
    else:
        with pytest.raises(InvalidRequest, match="unknown signal"):
            selection.run(None, [1], ["keys"], [0.1], steps=2, n_threads=1)
