"""TensorBoard event files: every scalar metric per round, and the round's sample grid as an image.

Needs ``pip install 'fedmmkt[tensorboard]'`` (tensorboard + torch's ``SummaryWriter``); then
``tensorboard --logdir RUN_DIR/tensorboard``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from fedmmkt_core.errors import RecipeIssue
from fedmmkt_core.interfaces import ComponentConfig, Logger
from fedmmkt_core.lazy import lazy_import, missing

HINT = "Install it with: pip install 'fedmmkt[tensorboard]'"
tensorboard_writer = lazy_import("torch.utils.tensorboard", HINT)


class TensorBoardConfig(ComponentConfig):
    folder: str = Field("tensorboard", description="event-file folder inside the run directory (--logdir)")
    images: bool = Field(True, description="log each round's sample grid (samples/round_NNN.png) as an image")


class TensorBoardLogger(Logger):
    """Scalars per round (step = round) and sample grids, as TensorBoard event files in the run directory."""

    Config = TensorBoardConfig
    config: TensorBoardConfig

    @classmethod
    def check_recipe(cls, recipe: Any, path: str) -> list[RecipeIssue]:
        absent = missing("tensorboard", "torch")
        if absent:
            return [RecipeIssue(f"{path}.name", f"logger 'tensorboard' needs {', '.join(absent)}: {HINT}")]
        return []

    def start(self, run_dir: Path, resolved_recipe: dict[str, Any]) -> None:
        self.run_dir = Path(run_dir)
        self.writer = tensorboard_writer.SummaryWriter(log_dir=str(self.run_dir / self.config.folder))
        self.writer.add_text("recipe", "```\n" + _yaml(resolved_recipe) + "\n```", 0)

    def log_round(self, round_index: int, metrics: dict[str, Any]) -> None:
        step = round_index + 1
        for key, value in metrics.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                self.writer.add_scalar(key, float(value), step)
        grid = self.run_dir / "samples" / f"round_{step:03d}.png"
        if self.config.images and grid.is_file():
            self.writer.add_image("samples", _read_png(grid), step, dataformats="HWC")
        self.writer.flush()

    def finish(self, summary: dict[str, Any]) -> None:
        for key, value in summary.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                self.writer.add_scalar(f"summary/{key}", float(value), int(summary.get("rounds_completed", 0)))
        self.writer.close()


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _yaml(data: dict[str, Any]) -> str:
    from fedmmkt_core.recipe import dump_yaml

    return dump_yaml(data)
