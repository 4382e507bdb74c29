"""The cost model behind edit-or-read choices (kvside/engine/costs.py): rates by batch class and
cache depth learned from decodes, the K-shift priced from the decodes that applied one, and the
engine teaching it from every llama_decode it runs."""

import pytest

from kvside.bench import corpus
from kvside.engine import Engine
from kvside.engine.costs import DEPTH_STEP, SMALL_BATCH, DecodeCosts


def test_nothing_measured_counts_tokens():
    c = DecodeCosts(n_ubatch=512)
    assert c.read(100, 0) == 100 and c.shift() == 0.0 and not c.measured


def test_rates_by_batch_class_and_depth():
    c = DecodeCosts(n_ubatch=512)
    c.record(512, 0, 512 * 0.002, shifted=False)  # big batches: 2 ms a token
    c.record(8, 0, 8 * 0.006, shifted=False)  # small ones: 6 ms
    assert c.read(1024, 0) == pytest.approx(1024 * 0.002)
    assert c.read(10, 0) == pytest.approx(10 * 0.006)
    # a prompt of 540 is one big ubatch of 512 and a small one of 28
    assert c.read(540, 0) == pytest.approx(512 * 0.002 + 28 * 0.006)
    # deeper in the cache: the nearest bucket measured until the depth itself is
    assert c.read(10, 5 * DEPTH_STEP) == pytest.approx(10 * 0.006)
    c.record(8, 5 * DEPTH_STEP, 8 * 0.010, shifted=False)
    assert c.read(10, 5 * DEPTH_STEP) == pytest.approx(10 * 0.010)
    # a class never seen borrows the other's rate
    d = DecodeCosts(n_ubatch=512)
    d.record(4, 0, 4 * 0.005, shifted=False)
    assert d.read(SMALL_BATCH, 0) == pytest.approx(SMALL_BATCH * 0.005)


def test_a_decode_that_applied_a_shift_prices_the_shift_not_the_rate():
    c = DecodeCosts(n_ubatch=512)
    c.record(1, 0, 0.010, shifted=True)  # nothing known yet to subtract: no sample taken
    assert c.shift() == 0.0 and not c.measured
    c.record(1, 0, 0.010, shifted=False)
    c.record(1, 0, 0.160, shifted=True)
    assert c.shift() == pytest.approx(0.150)
    assert c.read(1, 0) == pytest.approx(0.010)  # the slow decode did not count as a rate
    c.record(512, 0, 512 * 0.010 + 2.0, shifted=True)  # a prompt chunk's noise would swamp the price
    assert c.shift() == pytest.approx(0.150)


def test_a_restore_is_priced_per_cell_from_those_measured():
    costs = DecodeCosts(512)
    assert costs.restore(1000) is None  # nothing measured: the caller falls back to its token rule
    costs.record_restore(10, 5.0)  # a tiny file is mostly fixed costs: not a rate
    assert costs.restore(1000) is None
    costs.record_restore(2000, 0.2)
    assert costs.restore(1000) == pytest.approx(0.1)
    assert costs.report()["restore_ms_per_1k_cells"] == pytest.approx(100.0)


def test_the_engine_learns_rates_and_the_shift_price_from_its_decodes():
    with Engine(n_ctx=512, max_sessions=1, n_threads=2) as e:
        def run(core):
            s = core.new_session(system="")
            tokens = corpus.tokens(core.model, 200)
            core.prefill(s, [(0, tokens[:150])])
            core.probe(s.name, tokens[150:154])
            core.mem.add(s.seq, 10, -1, 3)
            s.ledger.shift(10, -1, 3)
            core.probe(s.name, tokens[150:151])  # applies the shift
            return core.costs.report(), core.mem.shift_pending

        report, pending = e.call(run)
    assert report["ms_per_token"]["big@0"] > 0 and report["ms_per_token"]["small@0"] > 0
    assert report["shift_ms"] is not None and report["shift_ms"] >= 0
    assert pending is False  # the decode applied it: no extra decode to settle it later
