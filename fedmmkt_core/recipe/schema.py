"""The recipe's structure: :class:`Recipe`, its sections and :class:`ComponentSpec`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator

from ..faults import FaultSpec
from ..interfaces import Component, ComponentConfig
from ..paths import RecipePath
from ..plugins import Registry
from ..privacy import SoftLabelPrivacy
from .limits import MAX_CLIENTS, MAX_ROUND_TIMEOUT, MAX_SEED, RUN_NAME
from .locations import _set_path


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ComponentSpec(_Strict):
    """Selects an implementation by ``name`` and configures it with ``params``."""

    name: str = Field(description="registered name of the implementation (see `fedmmkt plugins`)")
    params: dict[str, Any] = Field(default_factory=dict, description="the implementation's own settings")
    _config: ComponentConfig | None = PrivateAttr(default=None)

    @property
    def config(self) -> ComponentConfig:
        if self._config is None:
            raise RuntimeError(f"component '{self.name}' has not been validated against its plugin")
        return self._config


class ClientGroup(ComponentSpec):
    """``count`` clients with the same client model."""

    count: int = Field(1, ge=1, le=MAX_CLIENTS, description="number of clients in this group")
    fault: FaultSpec | None = Field(None, description="make these clients misbehave (fault-injection testing)")


class WeightedComponentSpec(ComponentSpec):
    weight: float = Field(1.0, ge=0, description="weight of this loss in the sum")


class DataSection(_Strict):
    dataset: ComponentSpec = Field(description="the clients' domain: their training data, test, oracle splits")
    partitioner: ComponentSpec = Field(default_factory=lambda: ComponentSpec(name="iid"))
    public: ComponentSpec | None = Field(
        None,
        description="the server's own public dataset (generator pre-training), from another source than the "
        "clients' images; every image it loads is used; replaces the dataset's public_fraction split",
    )
    evaluate_on: Literal["test", "validation"] = Field(
        "test",
        description="the split client accuracy, CAS reference and Fréchet distance are measured on: choose "
        "defaults on 'validation', report on 'test'",
    )
    server_folder: RecipePath | None = Field(
        None,
        description="the server side's data from this folder (OUT/server, written by `fedmmkt partition`): "
        "evaluation, oracle and public splits; the server never loads the dataset (its machine need not hold "
        "the clients' images)",
    )


class FederationSection(_Strict):
    rounds: int = Field(ge=1, description="number of federated rounds")
    sample_fraction: float = Field(1.0, gt=0, le=1, description="share of clients sampled each round")
    min_clients: int = Field(1, ge=1, description="a round fails when fewer clients reply successfully")
    round_timeout: float | None = Field(
        None,
        gt=0,
        le=MAX_ROUND_TIMEOUT,
        description="seconds each exchange waits for client replies; a client still busy then is recorded "
        "as timed out and left out of the round (null = wait for every client)",
    )


class Recipe(_Strict):
    """A whole experiment."""

    fedmmkt: Literal[1] = Field(description="recipe format version")
    name: str = Field(
        "run",
        description="a name for the run (the default run directory is runs/NAME-TIME): 1-100 letters, digits, "
        "'.', '_', '+', '-', starting with a letter or digit",
    )
    seed: int = Field(
        0, ge=0, le=MAX_SEED, description="seeds data partition, client sampling, training and generation"
    )
    data: DataSection
    clients: list[ClientGroup] = Field(min_length=1, description="client groups, each with its client model")
    federation: FederationSection
    algorithm: ComponentSpec
    aggregator: ComponentSpec | None = None
    generator: ComponentSpec | None = None
    alignment_losses: list[WeightedComponentSpec] = Field(default_factory=list)
    backend: ComponentSpec = Field(default_factory=lambda: ComponentSpec(name="inprocess"))
    loggers: list[ComponentSpec] = Field(default_factory=lambda: [ComponentSpec(name="console")])
    privacy: SoftLabelPrivacy | None = Field(
        None, description="differential privacy on the uploaded soft labels (clients clip and add noise)"
    )

    _base_dir: Path = PrivateAttr(default=Path("."))
    _registry: Registry | None = PrivateAttr(default=None)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if not RUN_NAME.fullmatch(value):
            shown = value if len(value) <= 40 else value[:40] + "..."
            raise ValueError(
                f"run name {shown.encode('unicode_escape').decode('ascii')!r} is not allowed: it names a folder "
                "under runs/, so use 1-100 letters, digits, '.', '_', '+', '-', starting with a letter or digit"
            )
        return value

    @property
    def base_dir(self) -> Path:
        return self._base_dir

    @property
    def num_clients(self) -> int:
        return sum(group.count for group in self.clients)

    def client_groups(self) -> list[ClientGroup]:
        """One entry per client id (client k uses ``client_groups()[k]``)."""
        return [group for group in self.clients for _ in range(group.count)]

    def components(self) -> list[tuple[str, str, ComponentSpec]]:
        """Every (key path, kind, spec) in the recipe."""
        found: list[tuple[str, str, ComponentSpec]] = [
            ("data.dataset", "dataset", self.data.dataset),
            ("data.partitioner", "partitioner", self.data.partitioner),
        ]
        if self.data.public is not None:
            found.append(("data.public", "dataset", self.data.public))
        found += [
            ("algorithm", "algorithm", self.algorithm),
            ("backend", "backend", self.backend),
        ]
        found += [(f"clients.{i}", "client_model", c) for i, c in enumerate(self.clients)]
        if self.aggregator is not None:
            found.append(("aggregator", "aggregator", self.aggregator))
        if self.generator is not None:
            found.append(("generator", "generator", self.generator))
        found += [(f"alignment_losses.{i}", "alignment_loss", s) for i, s in enumerate(self.alignment_losses)]
        found += [(f"loggers.{i}", "logger", s) for i, s in enumerate(self.loggers)]
        return found

    def build(self, kind: str, spec: ComponentSpec) -> Component:
        """Instantiate the plugin a spec names with its validated config (cheap: no set-up)."""
        if self._registry is None:
            raise RuntimeError("recipe was not validated against a registry")
        component = self._registry.get(kind, spec.name).cls(spec.config)
        component.registered_name = spec.name
        return component

    def resolved(self) -> dict[str, Any]:
        """The recipe with every default filled in and paths made absolute (JSON-able)."""
        data = self.model_dump(mode="json")
        for path, _kind, spec in self.components():
            _set_path(data, path.split(".") + ["params"], spec.config.model_dump(mode="json"))
        return data
