"""kvside's patch to llama.cpp (native/): in-place and value-only recompute, on the real model.

These run when the patched libllama is loaded (`make test` runs the suite a second time with it,
and sets KVSIDE_REQUIRE_NATIVE=1 so they fail rather than skip if it did not load)."""

import os

import numpy as np
import pytest

from kvside.bench import corpus
from kvside.bench.fidelity import compare
from kvside.engine import Engine, kvstate, native
from kvside.errors import EditError, InvalidRequest

if not native.available():
    if os.environ.get("KVSIDE_REQUIRE_NATIVE") == "1":
        raise RuntimeError("KVSIDE_REQUIRE_NATIVE=1 but the loaded libllama has no kvside patch "
                           "(is LLAMA_CPP_LIB_PATH set to build/native-cpu/bin?)")
    pytest.skip("kvside's native patch is not loaded (make native; LLAMA_CPP_LIB_PATH)", allow_module_level=True)

from test_edits import PROBE, filled


@pytest.fixture(scope="module")
def exact():
    with Engine(n_ctx=320, max_sessions=3, n_threads=2, reference_kernels=True) as e:
        yield e


def cache(engine, name):
    """Every layer's keys and values of a session, in position order."""
    def read(core):
        kv = kvstate.parse(core.seq_state(core.get(name).seq)).by_position()
        return kv.pos, kv.k, kv.v
    return engine.call(read)


def assert_same_cache(engine, a, b, atol=0.0):
    pa, ka, va = cache(engine, a)
    pb, kb, vb = cache(engine, b)
    np.testing.assert_array_equal(pa, pb)
    for il in range(len(ka)):
        np.testing.assert_allclose(ka[il], kb[il], rtol=0, atol=atol, err_msg=f"keys of layer {il}")
        np.testing.assert_allclose(va[il], vb[il], rtol=0, atol=atol, err_msg=f"values of layer {il}")


def recompute(engine, name, idx, values_only=False):
    """Recompute the cells at ledger indices idx in place, straight through the binding."""
    def run(core):
        s = core.get(name)
        return native.recompute(core, s.seq, [s.ledger.pos[i] for i in idx], [s.ledger.tok[i] for i in idx],
                                values_only)
    return engine.call(run)


def test_doctor_reports_the_patch(exact):
    assert exact.info()["native_patch"] is True
    assert native.version() == 1


def test_inplace_recompute_of_every_position_equals_a_reprefill(exact):
    name = filled(exact)
    exact.roll(name, 100, keep=4, strategy="shift")
    n = len(exact.ledger(name))
    assert recompute(exact, name, range(n)) == n
    exact.check(name)
    ref = exact.new_session()
    tokens = exact.ledger(name).tok
    exact.call(lambda core: core.prefill(core.get(ref), [(0, tokens)]))
    # same tokens, positions and batch shapes as the prefill, layout-independent kernels: every
    # key and value is bit-identical
    assert_same_cache(exact, name, ref)
    # a probe decoded on top can still round differently: its own cells land elsewhere
    got = compare(exact.next_logits(name, PROBE, all_logits=True), exact.next_logits(ref, PROBE, all_logits=True))
    assert got["top1"] == 1.0 and got["kl"] < 0.01
    for s in (name, ref):
        exact.delete_session(s)


def test_stock_scratch_path_and_inplace_path_agree(exact):
    stock = filled(exact)
    exact.roll(stock, 100, keep=4, strategy="recompute:16")
    inplace = filled(exact)
    exact.roll(inplace, 100, keep=4, strategy="shift")
    recompute(exact, inplace, range(4, 20))
    assert exact.ledger(stock).tok == exact.ledger(inplace).tok
    assert_same_cache(exact, stock, inplace)
    for name in (stock, inplace):
        exact.delete_session(name)


def test_values_all_differs_from_shift_and_moves_toward_the_reference(exact):
    caches, logits = {}, {}
    for strategy in ("shift", "values:all"):
        name = filled(exact)
        report = exact.roll(name, 100, keep=4, strategy=strategy)
        assert "fallback" not in report
        exact.check(name)
        if strategy == "values:all":
            led = exact.ledger(name)
            assert report["recomputed"] == 136 and led.state[4:] == ["recomputed"] * 136
        logits[strategy] = exact.next_logits(name, PROBE, all_logits=True)
        caches[strategy] = cache(exact, name)
        exact.delete_session(name)
    ref = exact.new_session()
    tokens = exact_tokens(exact)
    exact.call(lambda core: core.prefill(core.get(ref), [(0, tokens)]))
    _, k_ref, v_ref = cache(exact, ref)
    exact.delete_session(ref)
    _, k_shift, v_shift = caches["shift"]
    _, k_val, v_val = caches["values:all"]
    for il in range(len(k_ref)):
        np.testing.assert_array_equal(k_val[il], k_shift[il])  # the shifted keys stay
    # the values are fresh: in every layer past the first they sit closer to the re-prefill's
    # (layer 0's value depends on the token alone, so shift already has it right)
    for il in range(1, len(v_ref)):
        assert np.abs(v_val[il] - v_ref[il]).mean() < np.abs(v_shift[il] - v_ref[il]).mean(), il
    np.testing.assert_array_equal(v_val[0], v_ref[0])
    assert np.abs(logits["values:all"] - logits["shift"]).max() > 1e-3


def exact_tokens(engine, n=240, keep=4, drop=100):
    """The tokens a filled session holds after roll(drop, keep)."""
    tokens = engine.call(lambda core: corpus.tokens(core.model, n))
    return tokens[:keep] + tokens[keep + drop:]


def test_value_only_keeps_the_keys(exact):
    name = filled(exact)
    exact.roll(name, 100, keep=4, strategy="shift")
    def keys(core):
        kv = kvstate.parse(core.seq_state(core.get(name).seq), layers={7}).by_position()
        return kv.k[7], kv.v[7]

    k0, v0 = exact.call(keys)
    recompute(exact, name, range(4, 40), values_only=True)
    k1, v1 = exact.call(keys)
    np.testing.assert_array_equal(k0, k1)
    assert np.abs(v1[4:40] - v0[4:40]).max() > 1e-3  # fresh values where recomputed
    np.testing.assert_array_equal(v1[40:], v0[40:])  # untouched elsewhere
    exact.delete_session(name)


def test_select_recomputes_the_chosen_fraction_anywhere(exact):
    name = filled(exact)
    report = exact.roll(name, 100, keep=4, strategy="select:0.25")
    assert report["strategy"] == "select:0.25" and report["recomputed"] == 34  # round(0.25 * 136)
    led = exact.ledger(name)
    assert led.state.count("recomputed") == 34
    exact.check(name)
    assert exact.chat(name, "Go on.", max_tokens=8, temperature=0.0).wait().text is not None
    exact.delete_session(name)


@pytest.mark.parametrize("strategy", ["values:16", "select:0.5"])
def test_mask_repairs_across_the_hole(exact, strategy):
    name = filled(exact)
    report = exact.mask(name, span=(60, 100), strategy=strategy)
    assert "fallback" not in report and report["recomputed"] > 0
    led = exact.ledger(name)
    assert 60 not in led.pos and led.next_pos == 240  # the hole stays: only values changed
    exact.check(name)
    exact.delete_session(name)


def test_refusals_leave_the_cache_as_it_was(exact):
    name = filled(exact, 80)
    before = exact.ledger(name).to_dict()
    def absent(core):
        native.recompute(core, core.get(name).seq, [500], [1], False)  # a position it does not hold

    with pytest.raises(EditError, match="in-place recompute failed"):
        exact.call(absent)

    def shared(core):
        s = core.get(name)
        core.mem.cp(s.seq, core.scratch_seq, 0, 10)
        try:
            native.recompute(core, s.seq, [3], [s.ledger.tok[3]], False)
        finally:
            core.mem.clear_seq(core.scratch_seq)

    with pytest.raises(EditError, match="in-place recompute failed"):
        exact.call(shared)  # a cell shared with another sequence would change both
    assert exact.ledger(name).to_dict() == before
    exact.check(name)
    with pytest.raises(InvalidRequest, match="select:F"):
        exact.roll(name, 5, strategy="select:2")
    with pytest.raises(InvalidRequest, match="needs close_gap"):
        exact.mask(name, span=(10, 20), strategy="recompute:8")
    exact.delete_session(name)


def interleave(engine, runs, gaps, decode_steps=0):
    """Three sessions: `together` takes chunks of `runs` tokens one after another (its cells in one
    block); then `other` and `spread` take turns, `other` a chunk of `gaps`, `spread` the same
    chunk `together` took (its cells in runs between other's). Then both decode `decode_steps`
    tokens one at a time. Returns the names and each chunk's and step's last logits, per session."""
    tokens = engine.call(lambda core: corpus.tokens(core.model, sum(runs) + sum(gaps) + decode_steps))
    ours, noise, steps = tokens[:sum(runs)], tokens[sum(runs):sum(runs) + sum(gaps)], tokens[sum(runs) + sum(gaps):]
    names = [engine.new_session() for _ in range(3)]

    def chunks(seq):
        at = 0
        for n in seq:
            yield at, n
            at += n

    def run(core):
        together, spread, other = (core.get(n) for n in names)
        rows = {"together": [], "spread": []}

        def feed(s, toks, key=None):
            out = core.decode_now(s.seq, toks, s.ledger.next_pos, logits="last" if key else "none")
            s.ledger.append(toks, 0)
            if key:
                rows[key].append(out)

        for at, n in chunks(runs):  # one block of cells, decoded chunk by chunk
            feed(together, ours[at:at + n], "together")
        for (at, n), (bt, m) in zip(chunks(runs), chunks(gaps)):  # the same chunks, interleaved
            feed(other, noise[bt:bt + m])
            feed(spread, ours[at:at + n], "spread")
        for tok in steps:
            feed(together, [tok], "together")
            feed(spread, [tok], "spread")
        return rows

    return names, engine.call(run)


def test_attention_over_other_sessions_cells_is_exact(exact):
    """The patch's attention steps over masked cells sixteen and four at a time. A session whose
    cells lie in runs of every length between another session's, after a third session's block,
    computes exactly what it computes with its cells together: the reference kernels sum a row's
    unmasked cells in cell order, so only a cell skipped or visited wrongly could change a bit."""
    names, rows = interleave(exact, runs=[5, 17, 3, 33, 1, 40, 2, 19, 4, 16], gaps=[21, 2, 48, 7, 16, 3, 1, 30, 64, 9])
    try:
        for i, (a, b) in enumerate(zip(rows["together"], rows["spread"])):
            np.testing.assert_array_equal(a, b, err_msg=f"chunk {i}")
        assert_same_cache(exact, names[0], names[1])
    finally:
        for name in names:
            exact.delete_session(name)


def test_a_decode_does_not_depend_on_other_sessions_cells():
    """With llama.cpp's default attention too: a decode row is split among the threads by its own
    cells, so other sessions' cells in the shared cache (here enough to make the cache 1,400 cells
    long) change nothing in it, before and after the session has the 512 cells that split it.
    Chunks stay under 64 tokens, the size from which prefill attention works in tiles of cells."""
    runs = [37, 5, 63, 1, 50, 1, 60, 29, 1, 63, 48, 1, 63, 55, 1, 1]  # 479 tokens
    gaps = [63, 2, 48, 7, 63, 3, 1, 30, 63, 9, 40, 1, 63, 21, 5, 2]
    with Engine(n_ctx=1024, max_sessions=3, n_threads=2) as engine:
        names, rows = interleave(engine, runs, gaps, decode_steps=60)  # the session reaches 539 cells
        for i, (a, b) in enumerate(zip(rows["together"], rows["spread"])):
            np.testing.assert_array_equal(a, b, err_msg=f"row {i}")
        assert_same_cache(engine, names[0], names[1])


def test_prefill_attention_over_other_sessions_tiles_is_the_same():
    """A prompt of 64 tokens or more is attended in tiles of 64 cells, and the patch visits only the
    tiles some row of each group of 64 rows sees. A session prefilled in chunks of 64 that take
    turns with another session's (its cells every other tile) gives the same logits, bit for bit,
    as the same session alone in the cache (its cells in consecutive tiles): the tiles group its
    cells the same way, and only a tile skipped or visited wrongly could change a bit."""
    logits = []
    for interleaved in (False, True):
        with Engine(n_ctx=1024, max_sessions=2, n_threads=2) as engine:
            tokens = engine.call(lambda core: corpus.tokens(core.model, 454))
            name, other = engine.new_session(), engine.new_session()
            for k in range(3):
                engine.call(lambda core: core.prefill(core.get(name), [(0, tokens[64 * k:64 * (k + 1)])]))
                if interleaved:
                    engine.call(lambda core: core.prefill(core.get(other), [(0, tokens[192 + 64 * k:256 + 64 * k])]))
            logits.append(engine.next_logits(name, tokens[384:454], all_logits=True))
    np.testing.assert_array_equal(logits[0], logits[1])
