"""Read keys and values out of a llama.cpp sequence state (llama_state_seq_get_data), for the K/V
analysis and the deviation signal of `select:F`. Layout: magic and seq id (llama-context.cpp), then (llama-kv-cache.cpp, state_write) n_stream; per stream: cell_count, then per cell
pos, n_seq_id and seq ids; then v_trans, n_layer, per layer K rows (type, row size, data), then V
per layer, row-major or transposed. Only f16 and f32 caches are read."""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

_DTYPES = {0: np.float32, 1: np.float16}


@dataclass
class KV:
    pos: np.ndarray  # (cells,)
    k: list[np.ndarray]  # per layer (cells, n_embd_k)
    v: list[np.ndarray]  # per layer (cells, n_embd_v)

    def by_position(self) -> KV:
        """The same cells in position order (a state lists them in cell order, which edits shuffle);
        layers that were not read stay empty."""
        order = np.argsort(self.pos, kind="stable")

        def pick(layers: list[np.ndarray]) -> list[np.ndarray]:
            return [x[order] if len(x) else x for x in layers]

        return KV(self.pos[order], pick(self.k), pick(self.v))


def parse(blob, has_cell_ext: bool = False, layers: set[int] | None = None, values: bool = True) -> KV:
    """Keys and values per layer as float32. `layers`: only those layers' keys (and values) are
    converted, the others are empty arrays; `values=False` skips the values."""
    buf = memoryview(blob).cast("B")
    off = 0

    def take(fmt: str):
        nonlocal off
        vals = struct.unpack_from(fmt, buf, off)
        off += struct.calcsize(fmt)
        return vals

    magic, _seq = take("<Ii")  # llama_context writes its io magic and the source sequence first
    if magic != 0xAF143CD8:
        raise ValueError("not a llama.cpp sequence state")
    (n_stream,) = take("<I")
    pos_all: list[int] = []
    ks: list[list[np.ndarray]] = []
    vs: list[list[np.ndarray]] = []
    for _ in range(n_stream):
        (cells,) = take("<I")
        if cells == 0:
            continue
        pos = []
        for _ in range(cells):
            p, n_seq = take("<iI")
            if has_cell_ext:
                raise ValueError("caches with cell extensions (M-RoPE) are not read")
            off += 4 * n_seq
            pos.append(p)
        v_trans, n_layer = take("<II")
        k_layers, v_layers = [], []
        def wanted(il: int, kind_ok: bool = True) -> bool:
            return kind_ok and (layers is None or il in layers)

        for il in range(n_layer):
            k_type, row = take("<iQ")
            dtype = _DTYPES.get(k_type)
            if dtype is None:
                raise ValueError(f"K cache type {k_type} is not f16/f32")
            n = row // np.dtype(dtype).itemsize
            if wanted(il):
                k_layers.append(np.frombuffer(buf, dtype, cells * n, off).reshape(cells, n).astype(np.float32))
            else:
                k_layers.append(np.empty((0, n), np.float32))
            off += cells * row
        if not values:
            pos_all += pos
            ks.append(k_layers)
            vs.append([])
            break
        for _ in range(n_layer):
            if not v_trans:
                v_type, row = take("<iQ")
                dtype = _DTYPES[v_type]
                n = row // np.dtype(dtype).itemsize
                v_layers.append(np.frombuffer(buf, dtype, cells * n, off).reshape(cells, n).astype(np.float32))
                off += cells * row
            else:
                v_type, size_el, n_embd = take("<iII")
                dtype = _DTYPES[v_type]
                v_layers.append(np.frombuffer(buf, dtype, cells * n_embd, off).reshape(n_embd, cells).T.astype(np.float32))
                off += cells * n_embd * size_el
        pos_all += pos
        ks.append(k_layers)
        vs.append(v_layers)
    if len(ks) != 1:
        raise ValueError("expected the sequence in one stream")
    return KV(np.array(pos_all), ks[0], vs[0])


def unrope(k: np.ndarray, pos: np.ndarray, head_dim: int, base: float, neox: bool) -> np.ndarray:
    """Rotate each key back by its position: the key before RoPE. NORM pairs adjacent dims
    (2i, 2i+1), NEOX pairs (i, i + head_dim/2), as llama.cpp does."""
    cells, width = k.shape
    heads = k.reshape(cells, width // head_dim, head_dim).astype(np.float64)
    half = head_dim // 2
    theta = base ** (-np.arange(half) * 2.0 / head_dim)
    ang = -pos[:, None].astype(np.float64) * theta[None, :]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    if neox:
        a, b = heads[..., :half], heads[..., half:]
    else:
        a, b = heads[..., 0::2], heads[..., 1::2]
    ra, rb = a * cos - b * sin, a * sin + b * cos
    out = np.empty_like(heads)
    if neox:
        out[..., :half], out[..., half:] = ra, rb
    else:
        out[..., 0::2], out[..., 1::2] = ra, rb
    return out.reshape(cells, width).astype(np.float32)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)
