"""Tiny GGUFs written with the `gguf` package, for machinery that needs an architecture the shipped
models are not: random weights, real tokenizers, loadable by llama.cpp."""

from __future__ import annotations

from pathlib import Path

import numpy as np

WORDS = ("the a an of to in is it that for on with as was he she they we you i this be are at by not or have "
         "from but what all were when there can more if no man out so said time about up its into than them only "
         "cat cats dog dogs sat mat sun moon sea ship code python function return value list file read write "
         "cache key token model embed vector search query document paris france capital city river").split()


def write_bert(path: Path, n_embd: int = 32, n_head: int = 2, n_layer: int = 2, n_ff: int = 64,
               n_ctx: int = 128, pooling: int = 1, seed: int = 0) -> Path:
    """A BERT encoder (llama.cpp's `bert` architecture, WordPiece vocabulary) pooled by `pooling`
    (1 mean, 2 cls)."""
    import gguf

    rng = np.random.default_rng(seed)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.,!?'-")
    # as llama.cpp's converter writes a WordPiece vocabulary: a word's first piece after "▁",
    # its continuations ("##x") bare
    words = ["\u2581" + w for w in WORDS] + ["\u2581" + c for c in letters]
    tokens = list(dict.fromkeys(specials + words + letters))
    n_vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), "bert")
    w.add_name("tiny-bert")
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_block_count(n_layer)
    w.add_head_count(n_head)
    w.add_layer_norm_eps(1e-12)
    w.add_causal_attention(False)
    w.add_pooling_type(gguf.PoolingType(pooling))
    w.add_tokenizer_model("bert")
    w.add_token_list(tokens)
    w.add_token_type_count(2)
    w.add_token_types([gguf.TokenType.CONTROL] * len(specials) + [gguf.TokenType.NORMAL] * (n_vocab - len(specials)))
    w.add_bos_token_id(2)
    w.add_sep_token_id(3)
    w.add_pad_token_id(0)
    w.add_unk_token_id(1)
    w.add_mask_token_id(4)
    w.add_add_bos_token(True)
    w.add_add_eos_token(True)

    def t(name: str, *shape: int, scale: float = 0.2) -> None:
        # numpy shapes are llama.cpp's reversed
        w.add_tensor(name, (rng.standard_normal(shape[::-1]) * scale).astype(np.float32))

    def ones(name: str, n: int) -> None:
        w.add_tensor(name, np.ones(n, dtype=np.float32))

    def zeros(name: str, n: int) -> None:
        w.add_tensor(name, np.zeros(n, dtype=np.float32))

    t("token_embd.weight", n_embd, n_vocab, scale=1.0)
    t("token_types.weight", n_embd, 2)
    t("position_embd.weight", n_embd, n_ctx)
    ones("token_embd_norm.weight", n_embd)
    zeros("token_embd_norm.bias", n_embd)
    for i in range(n_layer):
        for part in ("attn_q", "attn_k", "attn_v", "attn_output"):
            t(f"blk.{i}.{part}.weight", n_embd, n_embd)
            zeros(f"blk.{i}.{part}.bias", n_embd)
        ones(f"blk.{i}.attn_output_norm.weight", n_embd)
        zeros(f"blk.{i}.attn_output_norm.bias", n_embd)
        t(f"blk.{i}.ffn_up.weight", n_embd, n_ff)
        zeros(f"blk.{i}.ffn_up.bias", n_ff)
        t(f"blk.{i}.ffn_down.weight", n_ff, n_embd)
        zeros(f"blk.{i}.ffn_down.bias", n_embd)
        ones(f"blk.{i}.layer_output_norm.weight", n_embd)
        zeros(f"blk.{i}.layer_output_norm.bias", n_embd)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
