"""What a failed llama_decode means, as kvside's typed errors."""

from __future__ import annotations

from kvside._llama import recent_log
from kvside.errors import CacheFull, DecodeError, KvsideError


def decode_error(rc: int) -> KvsideError:
    """llama_decode's return code: 1 means no cells were free for the batch, 2 aborted."""
    if rc == 1:
        return CacheFull("no free cells in the KV cache for this batch")
    if rc == 2:
        return DecodeError("decoding was aborted")
    return DecodeError(f"llama_decode failed ({rc}): {recent_log(2)}")
