"""`kvside eval --quick` as CI's smoke test: structure and sanity, no timing assertions."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kvside.engine import kvstate


def test_unrope_inverts_rope():
    rng = np.random.default_rng(0)
    for neox in (False, True):
        k = rng.standard_normal((5, 128)).astype(np.float32)
        pos = np.array([0, 3, 17, 250, 1000])
        roped = kvstate.unrope(k, -pos, 64, 10000.0, neox)  # rotating by -(-p) applies RoPE at p
        np.testing.assert_allclose(kvstate.unrope(roped, pos, 64, 10000.0, neox), k, atol=1e-4)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    kvside = str(Path(sys.executable).with_name("kvside"))
    proc = subprocess.run([kvside, "eval", "--quick", "--json", "--plot", str(out / "figs")],
                          capture_output=True, text=True, timeout=1800, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout), out


def test_reprefill_measures_zero(quick):
    """The harness check: a re-prefill edit reproduces the reference bit for bit."""
    result, _ = quick
    rows = [r for r in result["rolling"] if r["strategy"] == "reprefill"]
    assert rows
    for r in rows:
        assert r["kl"] == 0.0 and r["top1"] == 1.0 and r["max_abs_diff"] == 0.0


def test_noise_floor_is_below_the_shift_figures(quick):
    result, _ = quick
    shifts = [r["kl"] for r in result["rolling"] if r["strategy"] == "shift"]
    assert result["noise_floor"]["kl"] < float(np.median(shifts))


def test_sections_are_complete(quick):
    result, out = quick
    kv = result["kv_analysis"]
    assert set(kv["mean"]) == {"k_raw_before", "k_unroped_before", "k_after", "v"}
    # keys differ mostly by RoPE: undoing it brings them close to the re-prefill's
    assert kv["mean"]["k_unroped_before"] > kv["mean"]["k_raw_before"]
    comp = result["compaction"]
    assert set(comp["recall"]) == {"oracle", "mask", "mask+summary", "restart+summary", "restart"}
    assert comp["facts"] == 5 and comp["chats"][0]["summary"] and set(comp["kl_vs_oracle"]) == set(comp["recall"]) - {"oracle"}
    assert {r["documents"] for r in result["composition"]} == {1, 3}
    assert all(Path(f).is_file() for f in result["figures"])


def test_the_fixtures_are_the_corpus(tmp_path, monkeypatch):
    from kvside.bench import corpus
    from kvside.errors import KvsideError

    names = [p.name for p in corpus.documents()]
    assert len(names) == 8 and names == sorted(names)
    assert "Skerry Point" in corpus.text()
    facts = [f for chat in corpus.compaction()["chats"] for f in chat["facts"]]
    assert len(facts) >= 20 and any(f["expect"] == "73914" for f in facts)  # the passkey
    monkeypatch.setenv("KVSIDE_FIXTURES", str(tmp_path / "nowhere"))
    with pytest.raises(KvsideError, match="text fixtures"):
        corpus.text()


def test_one_run_compares_models_section_by_section():
    kvside = str(Path(sys.executable).with_name("kvside"))
    run = lambda *args: subprocess.run([kvside, "eval", *args], capture_output=True, text=True, timeout=600,  # noqa: E731
                                       env=dict(os.environ))
    proc = run("--only", "noise", "-m", "smollm2-135m,smollm2-135m", "--threads", "2", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout)["models"]
    assert [r["model"] for r in results] == ["smollm2-135m"] * 2
    for r in results:
        assert r["sections"] == ["noise"] and r["noise_floor"]["kl"] < 0.05
        assert r["rolling"] is None and r["compaction"] is None and r["composition"] is None
    table = run("--only", "noise", "-m", "smollm2-135m,smollm2-135m", "--threads", "2")
    assert table.returncode == 0 and "models | noise kl" in table.stdout and "rolling |" not in table.stdout
    bad = run("--only", "noise,bogus")
    assert bad.returncode != 0 and "unknown eval section(s) bogus" in bad.stderr and "Traceback" not in bad.stderr
