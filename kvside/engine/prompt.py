"""Prompt assembly: the tokens that append messages (or raw text) to what a session's cache already
holds, and the template text that closes a reply. Chat templates render whole conversations;
kvside renders the difference (ChatTemplate.delta), so an earlier turn is never re-tokenized."""

from __future__ import annotations

from kvside._llama import lib
from kvside.engine.session import Message, Session
from kvside.engine.template import TemplateError
from kvside.errors import InvalidRequest


def chat_pieces(
    core, s: Session, new: list[Message], *, generation: bool, history: list[dict] | None = None,
    fresh: bool | None = None, restyled=None,
) -> list[tuple[int, list[int]]]:
    """Token pieces (message id, tokens) that append `new` (and the reply's generation prompt)
    to what the session's cache holds. `fresh`: render as for an empty session (BOS first) even
    though cells are already there (a shared prefix of the same pieces). `restyled`: what
    edits.restyle made of the held turns the template renders differently once `new` follows:
    the new messages' text, and held turns to read again first."""
    hist = s.template_history() if history is None else list(history)
    texts: list[tuple[int, str]] = []
    if s.closing:
        texts.append((s.pending_msg, s.closing))
    if restyled is not None:
        texts += restyled.reread
    if new:
        if restyled is not None:
            segs = restyled.segments
        else:
            segs = core.template.segments(hist, [m.as_template() for m in new], add_generation_prompt=False,
                                          tools=s.tools)
        if segs is None:
            raise TemplateError("this model's chat template rewrites earlier turns; kvside needs one that appends")
        texts += [(m.id, seg) for m, seg in zip(new, segs)]
        hist += [m.as_template() for m in new]
    pieces: list[tuple[int, list[int]]] = []
    if s.pending:
        pieces.append((s.pending_msg, list(s.pending)))
    if fresh is None:
        fresh = len(s.ledger) == 0 and not s.pending
    for msg_id, text in texts:
        if not text:
            continue
        tokens = core.model.tokenize(text, add_special=False, parse_special=True)
        if fresh and core.model.add_bos and not (tokens and tokens[0] == core.model.bos):
            tokens.insert(0, core.model.bos)
        fresh = False
        pieces.append((msg_id, tokens))
    if generation:
        gen = core.template.delta(hist, [], add_generation_prompt=True, tools=s.tools) or ""
        pieces.append((-1, core.model.tokenize(gen, add_special=False, parse_special=True) if gen else []))
    return pieces

def text_pieces(core, s: Session, msg_id: int, text: str) -> list[tuple[int, list[int]]]:
    pieces: list[tuple[int, list[int]]] = []
    if s.pending and not core.model.is_eog(s.pending[0]):
        pieces.append((s.pending_msg, list(s.pending)))
    fresh = len(s.ledger) == 0 and not pieces
    pieces.append((msg_id, core.model.tokenize(text, add_special=fresh, parse_special=False)))
    return pieces


def closing(core, history: list[dict], reply: Message, pending: list[int], *, raw: str | None = None,
            tools: list[dict] | None = None) -> tuple[str, bool]:
    """Template text that closes the reply after what the model wrote (`raw`, by default the
    reply's content), and whether the EOG token already sampled stands for its first part
    (then it is decoded, not re-tokenized)."""
    before = core.template.render(history, add_generation_prompt=True, tools=tools)
    after = core.template.render(history + [reply.as_template()], add_generation_prompt=False, tools=tools)
    body = reply.content if raw is None else raw
    eog = pending and core.model.is_eog(pending[0])
    turn = after[len(before) :] if after.startswith(before) else ""
    if after.startswith(before + body):
        closing = after[len(before) + len(body) :]
    elif eog and core.model.token_text(pending[0]) in turn:
        # the template writes the turn differently from the model (a tool call re-serialised,
        # reasoning dropped): what follows the turn's end-of-generation token still closes it
        eog_text = core.model.token_text(pending[0])
        return turn[turn.rfind(eog_text) + len(eog_text) :], True
    else:
        stripped = body.strip()
        j = after.rfind(stripped) if stripped else -1
        closing = after[j + len(stripped) :] if j >= len(before) else ""
    if eog:
        eog_text = core.model.token_text(pending[0])
        if closing.startswith(eog_text):
            return closing[len(eog_text) :], True
    return closing, False


# -- fill-in-the-middle ------------------------------------------------------------------------------
def has_fim(core) -> bool:
    vocab = core.model.vocab
    return min(lib.llama_vocab_fim_pre(vocab), lib.llama_vocab_fim_suf(vocab), lib.llama_vocab_fim_mid(vocab)) >= 0


FIM_BATCH = 2048  # llama-server's default n_batch, which sizes its /infill prompt


def fim_tokens(core, prefix: str, suffix: str, middle: str = "", extra: list[dict] = (), n_predict: int = 0) -> list[int]:
    """A fill-in-the-middle prompt laid out as llama-server's /infill lays it out (tools/server,
    format_prompt_infill: the repository-level pattern), so an editor gets the same prompt from
    either server: context chunks from other files first (each after the file-separator token and
    its name), then prefix and the text already typed on the line, suffix, and the middle token:

        [REP]myproject\n [SEP]name\n chunk ... [SEP]filename\n [PRE]prefix+typed [SUF]suffix [MID]

    Cut as llama-server cuts it: the last 3/4 of a batch of the prefix, the first quarter (less the
    typed text) of the suffix, the last of the chunks that fit beside them. Models without FIM
    tokens say so."""
    vocab = core.model.vocab
    ids = [lib.llama_vocab_fim_pre(vocab), lib.llama_vocab_fim_suf(vocab), lib.llama_vocab_fim_mid(vocab)]
    if min(ids) < 0:
        raise InvalidRequest(f"{core.model_name} has no fill-in-the-middle tokens; 'suffix' is not supported",
                             param="suffix")
    pre, suf, mid = ids
    rep, sep = lib.llama_vocab_fim_rep(vocab), lib.llama_vocab_fim_sep(vocab)
    text = lambda t: core.model.tokenize(t, add_special=False, parse_special=False)  # noqa: E731
    typed = core.model.tokenize(middle, add_special=False, parse_special=True) if middle else []
    context: list[int] = []
    if extra:
        if rep >= 0:
            context += [rep] + text("myproject\n")
        for chunk in extra:
            context += [sep] + text((chunk["filename"] or "tmp") + "\n") if sep >= 0 else text("\n\n--- snippet ---\n\n")
            context += text(chunk["text"])
        if sep >= 0:
            context += [sep] + text("filename\n")
    batch = min(FIM_BATCH, core.n_ctx // 2)
    head = text(prefix)
    head = head[max(0, len(head) - 3 * (batch // 4)):]
    tail = text(suffix)[:max(0, batch // 4 - (2 + len(typed)))]
    context = context[max(0, len(context) - max(0, core.n_ctx - batch - 2 * n_predict)):]
    bos = [core.model.bos] if core.model.add_bos else []
    return context + bos + [pre] + head + typed + [suf] + tail + [mid]
