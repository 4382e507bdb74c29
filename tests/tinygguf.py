"""Tiny random-weight GGUFs, one per architecture family kvside must handle, written with the
`gguf` package: llama (plain attention), qwen2 (attention with biases), gemma3 (interleaved
sliding-window attention: five of six layers see only the last `window` positions), mamba
(recurrent: no KV cells at all, one state per sequence) and lfm2 (a hybrid: short-convolution
layers with a recurrent state, and one attention layer with cells per position). They answer nonsense, quickly; what they
exercise is every cache edit's machinery on each kind of llama.cpp memory.

The vocabulary is a small SentencePiece one (bytes, single characters, a few words) with each
family's turn markers as control tokens, so chat templates render and tokenize as on a real model.
"""

from __future__ import annotations

import string
from pathlib import Path

import gguf
import numpy as np

N_EMBD, N_HEAD, N_HEAD_KV, HEAD_DIM, N_FF = 64, 4, 2, 16, 128
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
ARCHS = ("llama", "qwen2", "gemma3", "mamba", "lfm2", "qwen2vl")
LFM2_ATTENTION = (2,)  # its attention layers; the others are short convolutions
WORDS = ["the", "a", "is", "of", "and", "to", "in", "you", "what", "hello", "world", "capital", "France", "Paris",
         "user", "assistant", "system", "model", "tool", "call"]


def vocab(markers: list[str]) -> tuple[list[str], list[float], list[int]]:
    T = gguf.TokenType
    tokens, scores, types = ["<unk>", "<s>", "</s>"], [0.0, 0.0, 0.0], [T.UNKNOWN, T.CONTROL, T.CONTROL]
    for m in markers:
        tokens.append(m), scores.append(0.0), types.append(T.CONTROL)
    for b in range(256):
        tokens.append(f"<0x{b:02X}>"), scores.append(0.0), types.append(T.BYTE)
    pieces = ["\u2581"] + list(string.ascii_letters + string.digits + string.punctuation) + ["\n"]
    pieces += ["\u2581" + w for w in WORDS] + ["\u2581" + c for c in string.ascii_lowercase]
    for i, p in enumerate(dict.fromkeys(pieces)):
        tokens.append(p), scores.append(-float(i) if len(p) == 1 else 10.0 + len(p)), types.append(T.NORMAL)
    return tokens, scores, [int(t) for t in types]


def write(arch: str, path: Path, *, window: int = 32, chat_template: str | None = "auto", seed: int = 0,
          split_max_tensors: int = 0, markers: list[str] | None = None) -> Path:
    """Write a tiny `arch` model to `path` (split into parts of at most `split_max_tensors` tensors
    when that is set). chat_template "auto" gives llama and qwen2 a ChatML template and leaves
    gemma3 and mamba without one (their families are then recognised from the vocabulary)."""
    if arch not in ARCHS:
        raise ValueError(f"no tiny model for {arch}")
    rng = np.random.default_rng(seed)
    if markers is None:
        markers = {"gemma3": ["<start_of_turn>", "<end_of_turn>"]}.get(arch, ["<|im_start|>", "<|im_end|>"])
    tokens, scores, types = vocab(markers)
    n_vocab, n_layer = len(tokens), {"gemma3": 6, "lfm2": 4}.get(arch, 2)

    w = gguf.GGUFWriter(str(path), arch, split_max_tensors=split_max_tensors)
    w.add_name(f"tiny-{arch}")
    w.add_context_length(4096)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(n_layer)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    if arch == "mamba":
        w.add_feed_forward_length(0)
        w.add_head_count(0)
        w.add_ssm_conv_kernel(4)
        w.add_ssm_inner_size(2 * N_EMBD)
        w.add_ssm_state_size(16)
        w.add_ssm_time_step_rank(8)
    else:
        w.add_feed_forward_length(N_FF)
        w.add_head_count(N_HEAD)
        if arch == "lfm2":  # no KV heads: a short-convolution layer
            w.add_head_count_kv([N_HEAD_KV if i in LFM2_ATTENTION else 0 for i in range(n_layer)])
            w.add_uint32("lfm2.shortconv.l_cache", 3)
        else:
            w.add_head_count_kv(N_HEAD_KV)
        w.add_key_length(HEAD_DIM)
        w.add_value_length(HEAD_DIM)
        w.add_rope_freq_base(10000.0)
        if arch == "gemma3":
            w.add_sliding_window(window)
        if arch == "qwen2vl":  # multi-section RoPE: 4 positions per token (text repeats its position)
            w.add_rope_dimension_sections([4, 2, 2, 0])
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(tokens.index(markers[1]) if len(markers) > 1 else 2)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(False)  # as Gemma's: text cut into pieces tokenizes as the whole does
    if chat_template == "auto":
        chat_template = CHATML if arch in ("llama", "qwen2", "lfm2", "qwen2vl") else None
    if chat_template:
        w.add_chat_template(chat_template)

    def tensor(name: str, *shape: int, value: float | None = None) -> None:
        data = np.full(shape, value, np.float32) if value is not None else rng.normal(0, 0.3, shape).astype(np.float32)
        w.add_tensor(name, data)

    tensor("token_embd.weight", n_vocab, N_EMBD)
    tensor("token_embd_norm.weight" if arch == "lfm2" else "output_norm.weight", N_EMBD, value=1.0)
    for i in range(n_layer):
        b = f"blk.{i}"
        tensor(f"{b}.attn_norm.weight", N_EMBD, value=1.0)
        if arch == "mamba":
            d_inner, dt_rank, d_state = 2 * N_EMBD, 8, 16
            tensor(f"{b}.ssm_in.weight", 2 * d_inner, N_EMBD)
            tensor(f"{b}.ssm_conv1d.weight", d_inner, 4)
            tensor(f"{b}.ssm_conv1d.bias", d_inner)
            tensor(f"{b}.ssm_x.weight", dt_rank + 2 * d_state, d_inner)
            tensor(f"{b}.ssm_dt.weight", d_inner, dt_rank)
            tensor(f"{b}.ssm_dt.bias", d_inner)
            w.add_tensor(f"{b}.ssm_a", -np.tile(np.arange(1, d_state + 1, dtype=np.float32), (d_inner, 1)))
            tensor(f"{b}.ssm_d", d_inner, value=1.0)
            tensor(f"{b}.ssm_out.weight", N_EMBD, d_inner)
            continue
        if arch == "lfm2" and i not in LFM2_ATTENTION:
            tensor(f"{b}.shortconv.conv.weight", N_EMBD, 3)
            tensor(f"{b}.shortconv.in_proj.weight", 3 * N_EMBD, N_EMBD)
            tensor(f"{b}.shortconv.out_proj.weight", N_EMBD, N_EMBD)
        else:
            tensor(f"{b}.attn_q.weight", N_HEAD * HEAD_DIM, N_EMBD)
            tensor(f"{b}.attn_k.weight", N_HEAD_KV * HEAD_DIM, N_EMBD)
            tensor(f"{b}.attn_v.weight", N_HEAD_KV * HEAD_DIM, N_EMBD)
            tensor(f"{b}.attn_output.weight", N_EMBD, N_HEAD * HEAD_DIM)
        if arch == "lfm2":
            if i in LFM2_ATTENTION:
                tensor(f"{b}.attn_q_norm.weight", HEAD_DIM, value=1.0)
                tensor(f"{b}.attn_k_norm.weight", HEAD_DIM, value=1.0)
            tensor(f"{b}.ffn_norm.weight", N_EMBD, value=1.0)
            tensor(f"{b}.ffn_gate.weight", N_FF, N_EMBD)
            tensor(f"{b}.ffn_up.weight", N_FF, N_EMBD)
            tensor(f"{b}.ffn_down.weight", N_EMBD, N_FF)
            continue
        if arch in ("qwen2", "qwen2vl"):
            tensor(f"{b}.attn_q.bias", N_HEAD * HEAD_DIM)
            tensor(f"{b}.attn_k.bias", N_HEAD_KV * HEAD_DIM)
            tensor(f"{b}.attn_v.bias", N_HEAD_KV * HEAD_DIM)
        if arch == "gemma3":
            tensor(f"{b}.attn_q_norm.weight", HEAD_DIM, value=1.0)
            tensor(f"{b}.attn_k_norm.weight", HEAD_DIM, value=1.0)
            tensor(f"{b}.post_attention_norm.weight", N_EMBD, value=1.0)
            tensor(f"{b}.post_ffw_norm.weight", N_EMBD, value=1.0)
        tensor(f"{b}.ffn_norm.weight", N_EMBD, value=1.0)
        tensor(f"{b}.ffn_gate.weight", N_FF, N_EMBD)
        tensor(f"{b}.ffn_up.weight", N_FF, N_EMBD)
        tensor(f"{b}.ffn_down.weight", N_EMBD, N_FF)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


if __name__ == "__main__":  # python tests/tinygguf.py OUTDIR: one of each
    import sys

    out = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    out.mkdir(parents=True, exist_ok=True)
    for a in ARCHS:
        print(write(a, out / f"tiny-{a}.gguf"))
