"""models.load: names, paths and the errors for bad input."""

import pytest

import models
from models import registry


def test_registry_knows_smollm2():
  assert "smollm2-135m" in registry.names()
  path = registry.resolve("smollm2-135m")
  assert path.suffix == ".gguf" and path.is_file()


def test_unknown_name_lists_known_names():
  with pytest.raises(ValueError, match="unknown model name 'llama-9000'.*smollm2-135m"):
    models.load("llama-9000")


def test_missing_path(tmp_path):
  with pytest.raises(FileNotFoundError, match="path does not exist"):
    models.load(tmp_path / "nowhere.gguf")
  with pytest.raises(FileNotFoundError, match="path does not exist"):
    models.load("./nowhere/model.gguf")


def test_unrecognised_and_bad_paths(tmp_path):
  (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
  with pytest.raises(ValueError, match="is none of: GGUF file"):
    models.load(tmp_path / "weights.bin")
  (tmp_path / "bad.gguf").write_bytes(b"GGUF" + b"\xff" * 12)
  with pytest.raises(ValueError, match="not a readable GGUF file"):
    models.load(tmp_path / "bad.gguf")
