"""Composable document blocks: a document's KV is computed once, stored with its tokens, the model
fingerprint and a content hash, and spliced into any session at any offset by shifting it there
(RoPE repositioning) instead of prefilling it again.

Each block is computed after a short context that is dropped before the splice: the chat's opening
of a document message (its first token is the attention sink every real session has) and the last
tokens of the block before it. Computed alone, a block's first tokens become its sink; spliced
after a session they no longer are one, and every later cell of the block had attended to them:
that was most of a single spliced block's error; what remains with several is their missing view
of each other (docs/results.md, Composition).

Files: $KVSIDE_HOME/blocks/<sha>-<i>.kvb (one per chunk, the session-file layout with format
'kvside-block') and index.json (document path -> content hash and block files), replaced
atomically only once every new block is written: the old blocks stay valid until then.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvside import atomic, sessionfile
from kvside.engine import prompt
from kvside.engine.jobs import JOB_CHUNK, finish
from kvside.engine.ledger import COMPOSED
from kvside.engine.session import Message, Session
from kvside.engine.state import set_seq_state
from kvside.engine.template import TemplateError
from kvside.errors import InvalidRequest, KvsideError
from kvside.home import subdir
from kvside.sessionfile import SessionFileError

BLOCK_FORMAT = "kvside-block"
MAX_BYTES = 1024 * 1024
BLOCK_TOKENS = 512
OVERLAP = 32  # tokens of the previous block a block is computed after (then dropped)
# Bumped when how blocks are computed changes: blocks compiled otherwise are compiled again.
RECIPE = 2
SENTINEL = "\x00kvside-document\x00"


class DocumentError(InvalidRequest):
    code = "bad_document"


def blocks_dir() -> Path:
    return subdir("blocks")


def _index_path() -> Path:
    return blocks_dir() / "index.json"


def load_index() -> dict:
    """The compiled documents. No index yet is an empty one; a damaged one is an error (reading it
    as empty would make every document look uncompiled and the next compile would drop it)."""
    path = _index_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise DocumentError(f"cannot read the document index {path}: {exc.strerror or exc}") from None
    try:
        index = json.loads(text)
    except ValueError as exc:
        index = exc
    if not isinstance(index, dict) or not all(isinstance(e, dict) for e in index.values()):
        raise DocumentError(f"the document index {path} is damaged; remove it and compile the documents again")
    return index


def _save_index(index: dict) -> None:
    try:
        atomic.write_bytes(_index_path(), json.dumps(index, indent=1).encode())
    except OSError as exc:
        raise DocumentError(f"cannot write the document index: {exc.strerror or exc}") from None


def read_document(path: Path, max_bytes: int = MAX_BYTES) -> tuple[str, str]:
    """(text, sha256) of a text file, or DocumentError saying why not."""
    try:
        if not path.is_file():
            raise DocumentError(f"{path} is not a file")
        size = path.stat().st_size
        if size > max_bytes:
            raise DocumentError(f"{path.name} is {size} bytes, over the {max_bytes}-byte limit")
        data = path.read_bytes()
    except OSError as exc:
        raise DocumentError(f"cannot read {path}: {exc.strerror}") from None
    if b"\x00" in data:
        raise DocumentError(f"{path.name} looks binary")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise DocumentError(f"{path.name} is not UTF-8 text") from None
    if not text.strip():
        raise DocumentError(f"{path.name} is empty")
    return text, hashlib.sha256(data).hexdigest()


def doc_key(path: Path) -> str:
    return str(Path(path).resolve())


# -- compile (engine thread) -----------------------------------------------------------------------
def compile_document(core, path: Path, block_tokens: int = BLOCK_TOKENS, progress=None) -> dict:
    """Compute and store the blocks of one document; reuse them when content and model match."""
    return finish(compile_steps(core, path, block_tokens, progress, seq=core.scratch_seq, chunk=core.n_batch))


def compile_steps(core, path: Path, block_tokens: int = BLOCK_TOKENS, progress=None, seq: int | None = None,
                  chunk: int = JOB_CHUNK):
    """compile_document as a job: the blocks are computed in sequence `seq` (default: the job
    sequence), `chunk` tokens at a time."""
    path = Path(path)
    key = doc_key(path)
    text, sha = read_document(path)
    index = load_index()
    entry = index.get(key)
    fp = core.model.fingerprint
    if entry and entry["sha256"] == sha and entry["fingerprint"] == fp and entry.get("recipe") == RECIPE and \
            all((blocks_dir() / f).is_file() for f in entry["blocks"]):
        return {"document": key, "reused": True, "blocks": len(entry["blocks"]), "tokens": entry["tokens"]}
    tokens = core.model.tokenize(text, add_special=False, parse_special=False)
    opening = block_context(core)
    size = min(block_tokens, core.n_ctx - 1 - len(opening) - OVERLAP)
    if size < 1:
        raise DocumentError(f"a context of {core.n_ctx} tokens is too small to compile documents in")
    chunks = [tokens[i : i + size] for i in range(0, len(tokens), size)]
    files: list[str] = []
    seq = core.job_seq if seq is None else seq
    t0 = time.perf_counter()
    try:
        for i, block in enumerate(chunks):
            if i:
                yield
            context = opening + (chunks[i - 1][-OVERLAP:] if i else [])
            core.mem.clear_seq(seq)
            yield from core.decode_steps(seq, context + block, 0, chunk)
            state = core.seq_state(seq)
            name = f"{sha[:16]}-{fp[:8]}-{i}.kvb"
            # the state holds the context's cells too (positions 0..context-1): attach drops them
            header = {"document": key, "name": path.name, "sha256": sha, "chunk": i, "n_chunks": len(chunks),
                      "tokens": block, "context": len(context), "model_fingerprint": fp,
                      "model_name": core.model_name, "type_k": core.type_k, "type_v": core.type_v}
            sessionfile.write(blocks_dir() / name, header, state, fmt=BLOCK_FORMAT)
            files.append(name)
            if progress:
                progress(i + 1, len(chunks))
    finally:
        core.mem.clear_seq(seq)
    _, sha_after = read_document(path)
    if sha_after != sha:  # the file changed while it was compiled: keep the old blocks
        for f in files:
            if not entry or f not in entry["blocks"]:
                (blocks_dir() / f).unlink(missing_ok=True)
        raise DocumentError(f"{path.name} changed while it was compiled; try again")
    index = load_index()
    old = index.get(key, {}).get("blocks", [])
    index[key] = {"sha256": sha, "fingerprint": fp, "blocks": files, "tokens": len(tokens),
                  "name": path.name, "compiled": time.time(), "recipe": RECIPE}
    _save_index(index)
    for f in old:
        if f not in files:
            (blocks_dir() / f).unlink(missing_ok=True)
    return {"document": key, "reused": False, "blocks": len(files), "tokens": len(tokens),
            "t_compile_s": time.perf_counter() - t0}


def block_context(core) -> list[int]:
    """What every block is computed after: the template's opening of a user message that holds a
    document (with the BOS where the model has one), up to where the document's text begins."""
    try:
        text = core.template.render([{"role": "user", "content": "Document:\n" + SENTINEL}],
                                    add_generation_prompt=False)
    except TemplateError:  # a template that cannot render a lone user message: a plain opening
        text = ""
    head = text.split(SENTINEL, 1)[0] if SENTINEL in text else ""
    tokens = core.model.tokenize(head, add_special=core.model.add_bos, parse_special=True)
    return tokens or core.model.tokenize("Document:\n", add_special=core.model.add_bos, parse_special=False)


def forget_document(path: Path) -> bool:
    index = load_index()
    entry = index.pop(doc_key(path), None)
    if entry is None:
        return False
    _save_index(index)
    for f in entry["blocks"]:
        (blocks_dir() / f).unlink(missing_ok=True)
    return True


def find(name: str) -> tuple[str, dict]:
    """A compiled document by path or by file name."""
    index = load_index()
    key = doc_key(Path(name)) if os.sep in name or Path(name).exists() else None
    if key and key in index:
        return key, index[key]
    matches = [(k, v) for k, v in index.items() if v.get("name") == name or Path(k).name == name]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise DocumentError(f"several documents are named {name!r}; give the path")
    raise DocumentError(f"no compiled document {name!r} (kvside compile PATH)")


# -- attach (engine thread) ------------------------------------------------------------------------
def load_blocks(core, entry: dict) -> list[sessionfile.SessionFile]:
    """Every block of a document, checked (format, checksum, model) before anything is attached."""
    out = []
    for f in entry["blocks"]:
        sf = sessionfile.read_header(blocks_dir() / f, verify=True, fmt=BLOCK_FORMAT)
        h = sf.header
        if h.get("model_fingerprint") != core.model.fingerprint:
            raise SessionFileError(f"block {f} was compiled for another model ({h.get('model_name')})")
        if h.get("type_k") != core.type_k or h.get("type_v") != core.type_v:
            raise SessionFileError(f"block {f} has KV types {h.get('type_k')}/{h.get('type_v')}")
        out.append(sf)
    return out


def attach(core, s: Session, name: str, recompute: int = 0, strategy: str | None = None) -> dict:
    """Append a compiled document to the session without prefilling it (attach_documents for one)."""
    return attach_documents(core, s, [name], recompute, strategy)[0]


def attach_documents(core, s: Session, names: list[str], recompute: int = 0, strategy: str | None = None) -> list[dict]:
    """Append compiled documents to the session without prefilling them: each block is loaded
    into the scratch sequence, shifted to the session's next positions and handed over. In a chat
    each document becomes a user message; only the template's text around it is decoded.
    `recompute`: recompute the first k tokens of each block exactly (EPIC-style), -1 for all.
    `strategy` instead: how the blocks are repaired (edits.Strategy: recompute:R, values:R,
    values:all, select:F). select:F spends one budget, F of all the blocks' cells, by one ranking
    over every block of the call, each block's stale context being everything before it: cells of
    later documents miss more context and get more of it (kvside bench select: at 15% for three
    documents kl 0.070 against 0.089 per block on SmolLM2, 0.043 against 0.069 on Qwen).
    Returns a report per document; on failure the session is as before."""
    from kvside.engine import edits

    if s.busy:
        raise KvsideError(f"session {s.name!r} is generating")
    if strategy is not None and recompute:
        raise InvalidRequest("give either recompute or strategy, not both")
    if not names:
        raise InvalidRequest("no document to attach")
    strat = edits.Strategy.parse(strategy) if strategy is not None else None
    if strat is not None and strat.name == "reprefill":
        raise InvalidRequest("reprefill is not a composition strategy (prefill the text instead)")
    if core.recurrent:  # nothing to splice: the state after the document depends on all of it
        raise InvalidRequest("this model keeps a recurrent state, not cells per position: a compiled document "
                             "cannot be spliced into it (send the document's text instead)")
    if not core.mem.can_shift():  # a block is moved to its place by a RoPE shift
        raise InvalidRequest("this model's cache cannot shift positions (multi-section RoPE, or a sliding window "
                             "sized to the window): a compiled document cannot be moved into place (send the "
                             "document's text instead)")
    prefix_pieces = prompt.chat_pieces(core, s, [], generation=False)  # pending tokens and the last reply's closing
    plans = _plan(core, s, names, bos=len(s.ledger) == 0 and not any(toks for _, toks in prefix_pieces))
    need = sum(len(toks) for _, toks in prefix_pieces) + sum(p.need for p in plans)
    # room for every document at once, made before anything is spliced: a roll for the second
    # document must not take the first one out again
    edits.auto_roll(core, s, need + 1, protect=set())
    core.room_check(s, need)
    start_cells, start_msgs = len(s.ledger), len(s.messages)
    pending = s.pending, s.pending_msg, s.closing
    reports, spans = [], []  # spans: per document, the ledger ranges of its blocks
    try:
        for k, plan in enumerate(plans):
            report, doc_spans = _splice(core, s, plan, prefix_pieces if k == 0 else [], recompute, strat)
            reports.append(report)
            spans.append(doc_spans)
        if strat is not None and strat.needs_scores:
            _select_over_all(core, s, strat, reports, spans)
    except KvsideError:
        core.mem.clear_seq(core.scratch_seq)
        # undo: drop whatever this call added, the session is as before
        first = s.ledger.pos[start_cells] if len(s.ledger) > start_cells else s.ledger.next_pos
        core.mem.rm(s.seq, first, -1)
        s.ledger.truncate(first)
        del s.messages[start_msgs:]
        s.pending, s.pending_msg, s.closing = pending
        raise
    for report in reports:
        s.log("attach", **report)
    return reports


def _select_over_all(core, s: Session, strat, reports: list[dict], spans: list[list[tuple[int, int]]]) -> None:
    """select:F over every block of the call, by one ranking: each block's cells scored against
    everything before it, F of all of them recomputed in place, in one batch. The template's few
    tokens after the first block (a document's closing, the next one's opening) were decoded
    after stale cells: they are recomputed first, out of the same budget (so select:1 leaves
    nothing stale)."""
    from kvside.engine import deviation, edits

    t0 = time.perf_counter()
    led = s.ledger
    flat = [r for doc in spans for r in doc]
    score = deviation.scores_many(core, s.seq, [((edits.SINK, led.pos[i0]), led.pos[i0:i1]) for i0, i1 in flat])
    cells = [i for i0, i1 in flat for i in range(i0, i1)]
    # the template's tokens after the first block are always among them, inside the budget
    template = [i for i in range(flat[0][0], len(led)) if led.state[i] != COMPOSED]
    n = max(0, round(strat.frac * (len(cells) + len(template))) - len(template))
    chosen = {cells[j] for j in np.argsort(-np.concatenate(score), kind="stable")[:n]} | set(template)
    first = flat[0][0]
    edits.repair(core, s, first, len(led), strat, sorted(i - first for i in chosen))
    took = time.perf_counter() - t0
    # each document's count runs to the next one's first block (that one's opening counts here)
    bounds = [doc[0][0] for doc in spans[1:]] + [len(led)]
    lo = first
    for report, hi in zip(reports, bounds):
        mine = sum(1 for i in chosen if lo <= i < hi)
        report["recomputed"] = mine
        report["t_attach_s"] += took * mine / len(chosen)
        lo = hi


@dataclass
class _Plan:
    key: str
    blocks: list  # the block files, checked
    label: str
    msg_id: int
    head: list[int]  # the template's tokens before the document's text
    tail: list[int]  # and after it

    @property
    def need(self) -> int:
        return len(self.head) + sum(len(b.header["tokens"]) for b in self.blocks) + len(self.tail)


def _plan(core, s: Session, names: list[str], bos: bool) -> list[_Plan]:
    """Every document found and its blocks checked, and the template's text around each, before
    anything changes. `bos`: the first document's text opens the session's cache."""
    history = s.template_history()
    plans = []
    for k, name in enumerate(names):
        key, entry = find(name)
        blocks = load_blocks(core, entry)
        label = f"Document {entry.get('name', Path(key).name)}:\n"
        turn = {"role": "user", "content": label + SENTINEL}
        seg = core.template.delta(history, [turn], add_generation_prompt=False, tools=s.tools) or ""
        if SENTINEL not in seg:
            raise DocumentError("this model's chat template does not keep the document text as given")
        before, after = seg.split(SENTINEL, 1)
        head = core.model.tokenize(before, add_special=bos and k == 0 and core.model.add_bos, parse_special=True)
        tail = core.model.tokenize(after, add_special=False, parse_special=True)
        plans.append(_Plan(key, blocks, label, s.next_message_id() + k, head, tail))
        history.append(turn)
    return plans


def _splice(core, s: Session, plan: _Plan, prefix_pieces: list, recompute: int, strat) -> tuple[dict, list]:
    """Splice one document's blocks after the session's cells, with the template's text around
    them (and, for the first, the session's pending tokens); repair each block now unless the
    strategy ranks cells over all blocks (select), which the caller does once every document is
    in place. Returns the report and the blocks' ledger ranges. On failure the caller undoes what
    this added."""
    from kvside.engine import edits

    prefix = [t for _, toks in prefix_pieces for t in toks]
    prefix_msgs = [m for m, toks in prefix_pieces for _ in toks]
    head, tail, blocks = plan.head, plan.tail, plan.blocks
    n_doc = sum(len(b.header["tokens"]) for b in blocks)
    t0 = time.perf_counter()
    start_cells = len(s.ledger)
    scratch = core.scratch_seq
    recomputed = 0
    spans = []
    start = s.ledger.next_pos
    core.decode_now(s.seq, prefix + head, start, logits="none")
    for tok, m in zip(prefix, prefix_msgs):
        s.ledger.append([tok], m)
    s.ledger.append(head, plan.msg_id)
    for sf in blocks:
        toks = sf.header["tokens"]
        p0 = s.ledger.next_pos
        core.mem.clear_seq(scratch)
        set_seq_state(core.ctx, scratch, sessionfile.read_state(sf))
        core.mem.state_restored(scratch)
        context = sf.header.get("context", 0)
        if context:  # the cells the block was computed after are not part of it
            core.mem.rm(scratch, 0, context)
        core.mem.add(scratch, context, -1, p0 - context)  # RoPE repositioning: the block now starts at p0
        # on a sliding window the block's state holds only its last cells in the windowed
        # layers: the session's floor rises past the block's missing ones, except for the
        # recompute of its first tokens, which attends to the session's cells before it and
        # to the tokens it recomputes
        block_floor = core.mem.floor.get(scratch)
        core.mem.cp(scratch, s.seq, p0, p0 + len(toks), floor=False)
        core.mem.clear_seq(scratch)
        i0 = len(s.ledger)
        s.ledger.append(toks, plan.msg_id, COMPOSED)
        spans.append((i0, len(s.ledger)))
        if strat is None:
            k = len(toks) if recompute < 0 else min(recompute, len(toks))
            if k:
                recomputed += edits._recompute_window(core, s, i0, k)
            core.mem.lift_floor(s.seq, None if k == len(toks) else block_floor)
        else:
            core.mem.lift_floor(s.seq, block_floor)
            if not strat.needs_scores:
                recomputed += edits.repair(core, s, i0, len(s.ledger), strat)
    p = s.ledger.next_pos
    core.decode_now(s.seq, tail, p, logits="none")
    s.ledger.append(tail, plan.msg_id)
    text = "".join(core.model.detokenize(b.header["tokens"]) for b in blocks)
    s.messages.append(Message(plan.msg_id, "user", plan.label + text, kind="document"))
    s.pending, s.pending_msg, s.closing = [], -1, ""
    report = {"document": plan.key, "blocks": len(blocks), "tokens": n_doc, "recomputed": recomputed,
              "strategy": str(strat) if strat is not None else f"recompute:{recompute}",
              "message": plan.msg_id, "first_pos": s.ledger.pos[start_cells], "t_attach_s": time.perf_counter() - t0}
    return report, spans
