"""MLflow tracking: the resolved recipe as params, metrics per round, the summary, PNGs as artifacts.

Needs ``pip install 'fedmmkt[mlflow]'`` (mlflow-skinny with SQLAlchemy for a local sqlite store).
The default store is ``sqlite:///mlflow.db`` next to the recipe; ``mlflow ui --backend-store-uri
sqlite:///mlflow.db`` shows it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationInfo, field_validator

from fedmmkt_core.errors import RecipeIssue
from fedmmkt_core.interfaces import ComponentConfig, Logger
from fedmmkt_core.lazy import lazy_import, missing

HINT = "Install it with: pip install 'fedmmkt[mlflow]'"
mlflow_tracking = lazy_import("mlflow.tracking", HINT)
MAX_PARAM_CHARS = 500


class MLflowConfig(ComponentConfig):
    tracking_uri: str = Field(
        "sqlite:///mlflow.db",
        description="MLflow store: sqlite:///FILE or file:FOLDER (relative paths against the recipe's folder), "
        "or a tracking server's http(s) address",
    )
    experiment: str = Field("fedmmkt", min_length=1, description="experiment the run is logged under")
    artifacts: bool = Field(True, description="upload the run directory's PNGs (sample grids, curves) at the end")

    @field_validator("tracking_uri")
    @classmethod
    def _local_paths_from_the_recipe(cls, value: str, info: ValidationInfo) -> str:
        base = Path((info.context or {}).get("base_dir", "."))
        for scheme in ("sqlite:///", "file:"):
            if value.startswith(scheme):
                rest = value[len(scheme) :]
                if rest.startswith("//"):  # file:///abs
                    rest = rest[2:]
                path = Path(rest).expanduser()
                if not path.is_absolute():
                    path = base / path
                resolved = path.resolve()
                return f"sqlite:///{resolved}" if scheme == "sqlite:///" else resolved.as_uri()
        if value.startswith(("http://", "https://", "databricks")):
            return value
        raise ValueError("tracking_uri must start with sqlite:///, file:, http:// or https://")


class MLflowLogger(Logger):
    """One MLflow run per fedmmkt run: params, per-round metrics (step = round), summary, PNG artifacts."""

    Config = MLflowConfig
    config: MLflowConfig

    @classmethod
    def check_recipe(cls, recipe: Any, path: str) -> list[RecipeIssue]:
        needed = ["mlflow"] + (["sqlalchemy", "alembic"] if _spec_uri(recipe, path).startswith("sqlite") else [])
        absent = missing(*needed)
        if absent:
            return [RecipeIssue(f"{path}.name", f"logger 'mlflow' needs {', '.join(absent)}: {HINT}")]
        return []

    def start(self, run_dir: Path, resolved_recipe: dict[str, Any]) -> None:
        cfg = self.config
        self.run_dir = Path(run_dir)
        if cfg.tracking_uri.startswith("file:"):  # MLflow 3 keeps its file store behind an opt-in
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = mlflow_tracking.MlflowClient(tracking_uri=cfg.tracking_uri)
        experiment = self.client.get_experiment_by_name(cfg.experiment)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            location = None
            if cfg.tracking_uri.startswith("sqlite:///"):  # artifacts next to the database, not in the cwd
                location = (Path(cfg.tracking_uri[len("sqlite:///") :]).parent / "mlartifacts").as_uri()
            experiment_id = self.client.create_experiment(cfg.experiment, artifact_location=location)
        self.run_id = self._existing_run(experiment_id)  # a resumed fedmmkt run continues its MLflow run
        if self.run_id is None:
            run = self.client.create_run(
                experiment_id,
                run_name=str(resolved_recipe.get("name", "run")),
                tags={"fedmmkt.run_dir": str(self.run_dir.resolve())},
            )
            self.run_id = run.info.run_id
            for key, value in sorted(_flatten(resolved_recipe).items()):
                self.client.log_param(self.run_id, key, str(value)[:MAX_PARAM_CHARS])

    def _existing_run(self, experiment_id: str) -> str | None:
        tag = str(self.run_dir.resolve()).replace("'", "\\'")
        runs = self.client.search_runs([experiment_id], filter_string=f"tags.`fedmmkt.run_dir` = '{tag}'")
        return runs[0].info.run_id if runs else None

    def log_round(self, round_index: int, metrics: dict[str, Any]) -> None:
        for key, value in metrics.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                self.client.log_metric(self.run_id, key, float(value), step=round_index + 1)

    def finish(self, summary: dict[str, Any]) -> None:
        step = int(summary.get("rounds_completed", 0))
        for key, value in summary.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                self.client.log_metric(self.run_id, f"summary.{key}", float(value), step=step)
        if self.config.artifacts:
            for png in sorted(self.run_dir.rglob("*.png")):
                folder = png.parent.relative_to(self.run_dir).as_posix()
                self.client.log_artifact(self.run_id, str(png), None if folder == "." else folder)
            summary_path = self.run_dir / "summary.json"
            if summary_path.is_file():
                self.client.log_artifact(self.run_id, str(summary_path))
        self.client.set_terminated(self.run_id)


def _spec_uri(recipe: Any, path: str) -> str:
    try:
        return str(recipe.loggers[int(path.split(".")[1])].config.tracking_uri)
    except (AttributeError, IndexError, ValueError, RuntimeError):
        return ""


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists index their items (``clients.0.name``)."""
    if isinstance(data, dict):
        items = data.items()
    elif isinstance(data, list):
        items = enumerate(data)
    else:
        return {prefix: data}
    flat: dict[str, Any] = {}
    for key, value in items:
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat
