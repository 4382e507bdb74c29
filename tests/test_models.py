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
