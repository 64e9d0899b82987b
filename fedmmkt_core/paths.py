"""Path types for component configs: relative paths resolve against the recipe's folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, ValidationInfo


def _base_dir(info: ValidationInfo) -> Path:
    context = info.context or {}
    return Path(context.get("base_dir", "."))


def _resolve(value: Path, info: ValidationInfo) -> Path:
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = _base_dir(info) / path
    return path.resolve()


def _existing(value: Path, info: ValidationInfo) -> Path:
    path = _resolve(value, info)
    if not path.exists():
        raise ValueError(f"path does not exist: {path}")
    return path


InputPath = Annotated[Path, AfterValidator(_existing)]
"""A file or folder that must exist (resolved against the recipe's folder)."""


def _safetensors_folder(value: Path, info: ValidationInfo) -> Path:
    path = _existing(value, info)
    if not path.is_dir():
        raise ValueError(f"{path} is not a folder saved by save_pretrained")
    if not ((path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()):
        found = ", ".join(sorted(p.name for p in path.iterdir())[:8]) or "nothing"
        raise ValueError(
            f"{path} holds no model.safetensors (found: {found}); only safetensors weights are read, never "
            "pickle files such as pytorch_model.bin: re-save the model with save_pretrained(safe_serialization=True)"
        )
    return path


PretrainedFolder = Annotated[Path, AfterValidator(_safetensors_folder)]
"""A save_pretrained folder holding safetensors weights (pickle-based weight files are refused)."""
