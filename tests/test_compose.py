"""Composable document blocks on the real model."""

import time

import pytest
from conftest import GREEDY

from kvside import sessionfile
from kvside.bench.fidelity import compare
from kvside.docwatch import DocWatcher
from kvside.engine import Engine, compose, native
from kvside.engine.compose import BLOCK_FORMAT, DocumentError
from kvside.errors import KvsideError
from kvside.sessionfile import SessionFileError

TEXT = (
    "The lighthouse at Skerry Point was built in 1871. Its lamp burned paraffin until 1954, when it was "
    "electrified. The last keeper, Ada Brennan, left in 1989; since then the light has been automatic. "
) * 4


@pytest.fixture(scope="module")
def exact():
    with Engine(n_ctx=1024, max_sessions=3, n_threads=2, exact=True) as e:
        yield e


@pytest.fixture
def doc(tmp_path, exact):
    path = tmp_path / "skerry.txt"
    path.write_text(TEXT)
    exact.compile(str(path))
    return path


def test_composed_ledger_shows_the_block(exact, doc):
    name = exact.new_session(system="Answer from the document.")
    before = len(exact.ledger(name))
    report = exact.attach(name, str(doc))
    led = exact.ledger(name)
    exact.check(name)
    composed = [p for p, st in zip(led.pos, led.state) if st == "composed"]
    assert len(composed) == report["tokens"]
    assert composed == list(range(composed[0], composed[0] + len(composed)))  # one run, where it was put
    assert composed[0] > before  # after the system prompt and the template's text before the document
    assert exact.chat(name, "When was the lighthouse built?", max_tokens=16, **GREEDY).wait().text
    exact.check(name)
    exact.delete_session(name)


def test_same_block_at_two_offsets(exact, doc):
    a = exact.new_session()
    b = exact.new_session(system="You are a careful reader of documents about lighthouses.")
    exact.chat(b, "Hello!", max_tokens=12, **GREEDY).wait()
    ra = exact.attach(a, str(doc))
    rb = exact.attach(b, str(doc))
    assert ra["first_pos"] != rb["first_pos"]
    for name in (a, b):
        exact.check(name)
        assert exact.chat(name, "Who was the last keeper?", max_tokens=12, **GREEDY).wait().text
        exact.delete_session(name)


QUESTION = "<|im_start|>user\nWho kept the light?<|im_end|>\n<|im_start|>assistant\n"


def attached_against_prefill(engine, doc, **how) -> tuple[dict, dict]:
    """Attach doc to a new session (`how`: recompute or strategy), then compare the logits of a
    question against a prefill of the same tokens. Returns the attach report and the comparison."""
    probe = engine.call(lambda core: core.model.tokenize(QUESTION))
    name = engine.new_session(system="Answer from the document.")
    report = engine.attach(name, str(doc), **how)
    engine.check(name)
    tokens = engine.ledger(name).tok
    ref = engine.new_session()
    engine.call(lambda core: core.prefill(core.get(ref), [(0, tokens)]))
    result = compare(engine.next_logits(name, probe, all_logits=True), engine.next_logits(ref, probe, all_logits=True))
    engine.delete_session(name)
    engine.delete_session(ref)
    return report, result


def test_recomputing_the_whole_block_matches_a_prefill(exact, doc):
    results = {k: attached_against_prefill(exact, doc, recompute=k)[1] for k in (0, -1)}
    whole = results[-1]
    # every block token recomputed after the shift: only batch-shape rounding remains
    assert whole["top1"] == 1.0 and whole["kl"] < 0.02 and whole["logit_cos"] > 0.999
    assert whole["kl"] <= results[0]["kl"]


@pytest.mark.skipif(not native.available(), reason="needs kvside's native patch")
def test_native_block_repairs_against_a_prefill(exact, doc):
    results = {}
    for strategy in ("shift", "values:all", "select:1"):
        report, results[strategy] = attached_against_prefill(exact, doc, strategy=strategy)
        assert report["strategy"] == strategy
    # select:1 recomputes every block token in place: only a probe's rounding remains
    assert results["select:1"]["top1"] == 1.0 and results["select:1"]["kl"] < 0.01
    assert results["select:1"]["kl"] < results["shift"]["kl"]
    # values-only keeps the block's own keys. Computed alone, the block's first key was an attention
    # sink's and recomputing only values made the block worse than a shift; computed after a chat
    # opening (compose.block_context) its keys are ordinary ones and new values do not hurt
    assert results["values:all"]["kl"] <= 1.1 * results["shift"]["kl"]


def test_blocks_computed_after_a_chat_opening_are_closer_to_a_prefill(exact, tmp_path, monkeypatch):
    """A block computed alone makes its first tokens the attention sink of every later cell of the
    block; spliced after a session, they are not one. Computed after the opening of a document
    message, the block's cells attended as they will in a session (measured: kl 0.047 -> 0.0055)."""
    path = tmp_path / "skerry-one.txt"
    path.write_text(TEXT)
    exact.compile(str(path))
    assert compose.find(str(path))[1]["recipe"] == compose.RECIPE
    in_context = attached_against_prefill(exact, path)[1]
    with monkeypatch.context() as m:  # the same block computed from position 0, nothing before it
        m.setattr(compose, "block_context", lambda core: [])
        m.setattr(compose, "RECIPE", -1)
        assert exact.compile(str(path))["reused"] is False  # another recipe's blocks are compiled again
        alone = attached_against_prefill(exact, path)[1]
    assert in_context["kl"] < 0.5 * alone["kl"]
    assert in_context["top1"] >= alone["top1"]


def test_a_block_computed_after_the_previous_blocks_tail_leaves_those_cells_out(exact, tmp_path):
    path = tmp_path / "skerry-three.txt"
    path.write_text(TEXT * 3)
    exact.compile(str(path))
    _, entry = compose.find(str(path))
    headers = [sessionfile.read_header(compose.blocks_dir() / f, fmt=BLOCK_FORMAT).header for f in entry["blocks"]]
    assert len(headers) == 2 and headers[1]["context"] == headers[0]["context"] + compose.OVERLAP
    name = exact.new_session(system="Answer from the document.")
    report = exact.attach(name, str(path))
    exact.check(name)  # the cache holds what the ledger says: no context cell came along
    led = exact.ledger(name)
    composed = [p for p, st in zip(led.pos, led.state) if st == "composed"]
    assert len(composed) == report["tokens"] == sum(len(h["tokens"]) for h in headers)
    assert composed == list(range(composed[0], composed[0] + len(composed)))
    exact.delete_session(name)


def compiled_prose(engine, folder, n: int, chars: int) -> list[str]:
    """The first n prose fixtures, cut to `chars` characters, compiled: their paths."""
    from kvside.bench import corpus

    paths = []
    for src in corpus.documents()[:n]:
        path = folder / src.name
        path.write_text(src.read_text(encoding="utf-8")[:chars])
        engine.compile(str(path))
        paths.append(str(path))
    return paths


@pytest.fixture
def three_docs(tmp_path, exact):
    return compiled_prose(exact, tmp_path, 3, 900)


def several_against_prefill(engine, docs, **how) -> tuple[list[dict], dict]:
    probe = engine.call(lambda core: core.model.tokenize(QUESTION))
    name = engine.new_session(system="Answer from the documents.")
    reports = engine.attach_documents(name, docs, **how)
    engine.check(name)
    led = engine.ledger(name)
    assert sum(st == "recomputed" for st in led.state) == sum(r["recomputed"] for r in reports)
    ref = engine.new_session()
    engine.call(lambda core: core.prefill(core.get(ref), [(0, led.tok)]))
    result = compare(engine.next_logits(name, probe, all_logits=True), engine.next_logits(ref, probe, all_logits=True))
    engine.delete_session(name)
    engine.delete_session(ref)
    return reports, result


def test_several_documents_are_spliced_in_order_each_its_own_message(exact, three_docs):
    name = exact.new_session(system="Answer from the documents.")
    exact.chat(name, "Hello!", max_tokens=6, **GREEDY).wait()  # a reply whose closing is still pending
    reports = exact.attach_documents(name, three_docs)
    exact.check(name)
    docs = [m for m in exact.messages(name) if m["kind"] == "document"]
    assert [r["message"] for r in reports] == [m["id"] for m in docs] and len(set(r["message"] for r in reports)) == 3
    assert [r["first_pos"] for r in reports] == sorted(r["first_pos"] for r in reports)
    assert all(r["recomputed"] == 0 for r in reports)
    # the cells are what reading the same messages would give, template text included
    fresh = exact.call(lambda core: core.template.render(
        [m.as_template() for m in core.get(name).messages], add_generation_prompt=False))
    tokens = exact.ledger(name).tok
    assert exact.call(lambda core: core.model.detokenize(tokens, special=True)) == fresh
    assert exact.chat(name, "Which documents did you get?", max_tokens=8, **GREEDY).wait().text
    exact.delete_session(name)


@pytest.mark.skipif(not native.available(), reason="needs kvside's native patch")
def test_select_spends_one_budget_over_several_documents(exact, three_docs):
    """select:F attaching several documents at once ranks all their cells together: F of all the
    cells are recomputed, most of them in the later documents (which missed more of what precedes
    them), and the cache comes closer to a prefill than without a repair."""
    plain, none = several_against_prefill(exact, three_docs)
    reports, repaired = several_against_prefill(exact, three_docs, strategy="select:0.3")
    total = sum(r["tokens"] for r in reports)
    # the budget covers the documents' cells and the template's few tokens after the first block
    # (decoded after stale cells, recomputed first)
    assert 0.3 * total <= sum(r["recomputed"] for r in reports) <= 0.3 * (total + 3 * 16)
    shares = [r["recomputed"] / r["tokens"] for r in reports]
    assert shares[-1] > 2 * shares[0]  # one budget per block would give each about 0.3
    assert repaired["kl"] < none["kl"]


def test_the_attach_command_takes_one_document_or_several(exact, three_docs):
    """The table behind POST /kvside/sessions/{name}/attach and the app's /attach."""
    from kvside.engine import commands
    from kvside.errors import InvalidRequest

    name = exact.new_session()
    try:
        for bad, message in [({"documents": "a.txt"}, "list of document names"), ({"documents": []}, "non-empty"),
                             ({"documents": [3]}, "non-empty list"), ({"documents": three_docs, "document": "x"}, "not both"),
                             ({}, "'document' is required")]:
            with pytest.raises(InvalidRequest, match=message):
                commands.apply(exact, name, "attach", bad)
        assert exact.ledger(name).tok == []  # nothing was attached by the refused calls
        out = commands.apply(exact, name, "attach", {"documents": three_docs[:2]})
        assert [r["document"] for r in out["attached"]] == [compose.find(d)[0] for d in three_docs[:2]]
        assert out["tokens"] == sum(r["tokens"] for r in out["attached"]) and out["recomputed"] == 0
        assert commands.apply(exact, name, "attach", {"document": three_docs[2]})["blocks"] == 1
        exact.check(name)
    finally:
        exact.delete_session(name)


def test_a_request_naming_documents_attaches_the_new_ones_once(exact, three_docs):
    """A chat request's 'documents' are spliced before its new message; sent again with one more,
    only that one is attached."""
    messages = [{"role": "system", "content": "Answer from the documents."},
                {"role": "user", "content": "What are these about?"}]
    events = []
    done = exact.bind_chat(messages, documents=three_docs[:2], max_tokens=4, on_event=events.append, **GREEDY).wait()
    note = next(e.data for e in events if e.kind == "bound")
    name = note["session"]
    assert [r["document"] for r in note["attached"]] == [compose.find(d)[0] for d in three_docs[:2]]
    exact.check(name)
    follow = messages + [{"role": "assistant", "content": done.text}, {"role": "user", "content": "And now?"}]
    events = []
    exact.bind_chat(follow, session=name, documents=three_docs, max_tokens=4, on_event=events.append, **GREEDY).wait()
    note = next(e.data for e in events if e.kind == "bound")
    assert [r["document"] for r in note["attached"]] == [compose.find(three_docs[2])[0]]
    exact.check(name)
    exact.delete_session(name)


def test_several_documents_that_do_not_fit_change_nothing(tmp_path):
    """Room for every document is made before the first is spliced; when there is none, the call
    fails whole and the session (pending reply closing included) is as it was, the turn rolled out
    to make room included."""
    with Engine(n_ctx=512, max_sessions=2, n_threads=2, exact=True) as e:
        paths = compiled_prose(e, tmp_path, 2, 1000)
        name = e.new_session(system="Answer from the documents. " * 8)
        e.chat(name, "Hello!", max_tokens=6, **GREEDY).wait()
        before = e.ledger(name).to_dict(), e.messages(name), e.call(lambda core: core.get(name).pending)
        with pytest.raises(KvsideError, match="positions left"):
            e.attach_documents(name, paths)
        assert (e.ledger(name).to_dict(), e.messages(name), e.call(lambda core: core.get(name).pending)) == before
        e.check(name)
        assert e.attach(name, paths[0])["tokens"] > 0  # one of them fits
        e.check(name)
        assert e.chat(name, "Still there?", max_tokens=4, **GREEDY).wait().text is not None
        e.check(name)


def test_block_of_another_model_is_refused(exact, doc, tmp_path):
    key, entry = compose.find(str(doc))
    path = compose.blocks_dir() / entry["blocks"][0]
    sessionfile.rewrite(path, path, fmt=BLOCK_FORMAT, model_fingerprint="f" * 64, model_name="other-model")
    name = exact.new_session()
    before = exact.ledger(name).to_dict()
    with pytest.raises(SessionFileError, match="another model"):
        exact.attach(name, str(doc))
    assert exact.ledger(name).to_dict() == before
    exact.check(name)
    exact.delete_session(name)


def test_bad_documents(exact, tmp_path):
    binary = tmp_path / "x.bin"
    binary.write_bytes(b"\x00\x01\x02")
    big = tmp_path / "big.txt"
    big.write_text("a" * (compose.MAX_BYTES + 1))
    for path, message in [(binary, "binary"), (big, "limit"), (tmp_path / "gone.txt", "not a file")]:
        with pytest.raises(DocumentError, match=message):
            exact.compile(str(path))
    with pytest.raises(DocumentError, match="no compiled document"):
        name = exact.new_session()
        try:
            exact.attach(name, "never-compiled.txt")
        finally:
            exact.delete_session(name)


def test_file_changing_during_compile_keeps_old_blocks(exact, doc, monkeypatch):
    key, entry = compose.find(str(doc))
    doc.write_text(TEXT + " One more sentence.")
    real = compose.read_document
    calls = {"n": 0}

    def changing(path, *a, **k):
        calls["n"] += 1
        text, sha = real(path, *a, **k)
        return (text, sha if calls["n"] == 1 else "0" * 64)

    monkeypatch.setattr(compose, "read_document", changing)
    with pytest.raises(DocumentError, match="changed while"):
        exact.compile(str(doc))
    monkeypatch.undo()
    assert compose.find(str(doc))[1]["blocks"] == entry["blocks"]
    assert all((compose.blocks_dir() / f).is_file() for f in entry["blocks"])


def test_watched_folder_recompiles_and_forgets(exact, tmp_path):
    folder = tmp_path / "watched"
    folder.mkdir()
    path = folder / "notes.txt"
    path.write_text("First version of the notes about tides and currents.")
    events = []
    watcher = DocWatcher(exact, folder, on_result=lambda p, r, e: events.append((p, r, e))).start()
    try:
        def wait_for(pred, timeout=60):
            t0 = time.time()
            while time.time() - t0 < timeout:
                if pred():
                    return True
                time.sleep(0.1)
            return False

        assert wait_for(lambda: compose.doc_key(path) in compose.load_index())
        first = compose.load_index()[compose.doc_key(path)]["sha256"]
        path.write_text("Second version: the notes now also cover waves and wind.")
        assert wait_for(lambda: compose.load_index().get(compose.doc_key(path), {}).get("sha256") not in (None, first))
        path.unlink()
        assert wait_for(lambda: compose.doc_key(path) not in compose.load_index())
    finally:
        watcher.stop()
    assert not [e for _, _, e in events if e is not None]
