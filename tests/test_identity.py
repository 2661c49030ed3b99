"""Oracle identities (part of every cache key): a local model's is a hash of its weights' whole content, computed once
per file version; an HTTP oracle's is what its server reports (see test_http_oracle)."""

import os

from reflect_trainer import fingerprint
from reflect_trainer.oracles import oracle_identity

MIB = 1 << 20


def weights_folder(tmp_path):
    folder = tmp_path / "oracle"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").write_bytes(os.urandom(5 * MIB))
    return folder


def rewrite_middle_byte(path):
    """What merging a LoRA into a shard does: same size, other bytes in the middle, a new file in its place."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def test_identity_changes_when_a_middle_byte_of_the_weights_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    folder = weights_folder(tmp_path)
    before = oracle_identity("transformers", str(folder), quantization="nf4")
    size = (folder / "model.safetensors").stat().st_size
    rewrite_middle_byte(folder / "model.safetensors")
    assert (folder / "model.safetensors").stat().st_size == size
    after = oracle_identity("transformers", str(folder), quantization="nf4")
    assert before != after
    assert before.startswith("transformers:") and after.startswith("transformers:")


def test_each_file_version_is_hashed_once_across_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    hashed = []
    real = fingerprint._hash_content
    monkeypatch.setattr(fingerprint, "_hash_content", lambda path: hashed.append(path.name) or real(path))
    folder = weights_folder(tmp_path)
    first = fingerprint.weights_fingerprint(folder)
    assert fingerprint.weights_fingerprint(folder) == first
    assert sorted(hashed) == ["config.json", "model.safetensors"]
    monkeypatch.setattr(fingerprint, "_memo", {})  # a new process: only the file in the user's cache dir is left
    assert fingerprint.weights_fingerprint(folder) == first
    assert len(hashed) == 2 and fingerprint.hashes_file().is_file()
    rewrite_middle_byte(folder / "model.safetensors")
    assert fingerprint.weights_fingerprint(folder) != first
    assert sorted(hashed) == ["config.json", "model.safetensors", "model.safetensors"]
