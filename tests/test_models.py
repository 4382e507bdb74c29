from pathlib import Path

import numpy as np
import pytest

from kvside.engine.model import Model
from kvside.errors import ModelLoadError, ModelNotFound
from kvside.models import DEFAULT_NAME, available, fingerprint, resolve


def test_default_model_resolves_by_name_and_path():
    ref = resolve(None)
    assert ref.name == DEFAULT_NAME and ref.source == "embedded"
    assert resolve("default").path == ref.path
    assert resolve(str(ref.path)).path == ref.path
    assert any(r.name == DEFAULT_NAME for r in available())


def test_models_in_home_dir_are_listed(tmp_path, monkeypatch):
    monkeypatch.setenv("KVSIDE_HOME", str(tmp_path))
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "mine.gguf").write_bytes(b"GGUF" + bytes(60))
    assert resolve("mine").source == "home"
    assert resolve("mine.gguf").path == (tmp_path / "models" / "mine.gguf")


def test_missing_and_non_gguf(tmp_path):
    with pytest.raises(ModelNotFound):
        resolve(str(tmp_path / "nope.gguf"))
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model at all")
    with pytest.raises(ModelLoadError, match="not a GGUF"):
        Model(junk)


def test_fingerprint_is_stable_and_content_sensitive(tmp_path):
    ref = resolve(None)
    assert fingerprint(ref.path) == fingerprint(ref.path)
    copy = tmp_path / "copy.gguf"
    data = bytearray(ref.path.read_bytes())
    copy.write_bytes(data)
    assert fingerprint(copy) == fingerprint(ref.path)
    data[-1000] ^= 0xFF  # a weight byte near the end, inside a sampled chunk
    copy.write_bytes(data)
    # mtime changes with the write, so the cache does not hide the change
    assert fingerprint(copy) != fingerprint(ref.path)


def _write_gguf(path: Path, arch: str) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_unknown_architecture_is_one_clear_error(tmp_path):
    path = tmp_path / "alien.gguf"
    _write_gguf(path, "no-such-arch")
    with pytest.raises(ModelLoadError, match="could not load"):
        Model(path)


def test_the_header_walk_finds_where_the_weights_start_as_the_gguf_reader_does(tmp_path):
    """fingerprint() hashes the header and samples of the weights: the header's end is found by
    walking it, not by the gguf package's reader (seconds per vocabulary); both agree."""
    import gguf

    from kvside.models import _header_end

    ref = resolve(None).path
    assert _header_end(ref) == int(gguf.GGUFReader(str(ref), "r").data_offset)
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_custom_alignment(64)
    writer.add_array("tokenizer.ggml.tokens", ["a", "bb", "ccc"] * 100)
    writer.add_array("tokenizer.ggml.scores", [0.5] * 300)
    writer.add_string("general.name", "x" * 1000)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert _header_end(path) == int(gguf.GGUFReader(str(path), "r").data_offset)
    # damaged: cut inside the metadata, or not a GGUF at all: one clear error, never a crash
    data = path.read_bytes()
    for n, cut in enumerate((b"", data[:40], data[:700], b"GGUF" + bytes(4), b"NOPE" + data[4:])):
        bad = tmp_path / f"bad{n}.gguf"
        bad.write_bytes(cut)
        with pytest.raises(ModelLoadError, match="damaged GGUF header"):
            _header_end(bad)
