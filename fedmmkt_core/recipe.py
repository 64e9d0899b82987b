"""Recipes: a YAML file validated into one :class:`Recipe`, every error reported with its key path.

Validation runs in stages so that all problems are collected before reporting: YAML syntax, the
recipe's own structure, then each component's ``params`` against the ``Config`` of the plugin named.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import re
import stat
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, create_model, field_validator

from .errors import PluginError, RecipeError, RecipeIssue, UserError
from .faults import FaultSpec
from .interfaces import Component, ComponentConfig
from .paths import read_regular
from .plugins import Registry, suggest
from .privacy import SoftLabelPrivacy
from .strict_yaml import StrictDumper, StrictYAMLError, load_strict

FORMAT_VERSION = 1
MAX_RECIPE_BYTES = 1024 * 1024  # a recipe is configuration: 1 MiB is far beyond any real one
MAX_RECIPE_NODES = 100_000  # YAML values after alias expansion (guards against "billion laughs")
MAX_RECIPE_DEPTH = 64  # nesting of mappings and lists
MAX_SEED = 2**32 - 1
MAX_CLIENTS = 10_000  # clients in one recipe (all groups): each is built, sampled and checkpointed
MAX_ROUND_TIMEOUT = 7 * 24 * 3600.0
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")


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


# --------------------------------------------------------------------------- loading


def load_recipe(
    path: str | Path,
    overrides: Sequence[str] = (),
    registry: Registry | None = None,
) -> Recipe:
    """Read, override and validate a recipe file; raise :class:`RecipeError` with every problem."""
    path = Path(path)
    if not os.path.lexists(path):
        raise UserError(f"recipe file not found: {path}")
    with contextlib.suppress(OSError):
        info = os.stat(path)
        if stat.S_ISREG(info.st_mode) and info.st_size > MAX_RECIPE_BYTES:
            issue = RecipeIssue("", f"the file is {info.st_size} bytes; a recipe may be at most {_LIMIT}")
            raise RecipeError([issue], str(path))
    raw = read_regular(path, "recipe file", MAX_RECIPE_BYTES)  # a FIFO, device, folder or link loop: refused
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        issue = RecipeIssue("", f"not UTF-8 text (byte {exc.start}: {raw[exc.start : exc.start + 1]!r})")
        raise RecipeError([issue], str(path)) from None
    return parse_recipe(text, base_dir=path.resolve().parent, overrides=overrides, registry=registry, source=str(path))


def parse_recipe(
    text: str,
    base_dir: Path | str = ".",
    overrides: Sequence[str] = (),
    registry: Registry | None = None,
    source: str | None = None,
) -> Recipe:
    """Validate recipe YAML text (see :func:`load_recipe`)."""
    if registry is None:
        from .plugins import get_registry

        registry = get_registry()
    if len(text) > MAX_RECIPE_BYTES:
        raise RecipeError([RecipeIssue("", f"the recipe is {len(text)} characters; the limit is {_LIMIT}")], source)
    try:
        data, node, used = load_strict(text, MAX_RECIPE_NODES, MAX_RECIPE_DEPTH)
        lines = _line_map(node)
    except StrictYAMLError as exc:
        raise RecipeError([RecipeIssue(".".join(exc.path), exc.message, exc.line)], source) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError([RecipeIssue("", f"invalid YAML: {problem}", line)], source) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(
            [RecipeIssue("", f"a recipe must be a mapping of keys, got {type(data).__name__}", 1)], source
        )

    issues: list[RecipeIssue] = []
    overridden: dict[tuple[str, ...], str] = {}
    budget = MAX_RECIPE_NODES - used  # --set values share the recipe file's limits
    for item in overrides:
        issue, budget = _apply_override(data, item, overridden, budget)
        if issue is not None:
            issues.append(issue)

    def located(path: tuple[Any, ...], message: str) -> RecipeIssue:
        key = tuple(str(p) for p in path)
        # a key under a --set value (--set 'generator={...}' then generator.params.x) comes from the --set
        origin = next((overridden[key[:end]] for end in range(len(key), 0, -1) if key[:end] in overridden), None)
        if origin is not None:
            message = f"{message} (from --set {origin})"
        return RecipeIssue(".".join(key), message, None if origin else _nearest_line(lines, key))

    issues += [located(key, f"must be a finite number (got {value})") for key, value in _non_finite(data)]
    if issues:
        raise RecipeError(_dedupe(issues), source)

    try:
        recipe = Recipe.model_validate(data, context={"base_dir": Path(base_dir)})
    except ValidationError as exc:
        issues += [located(tuple(err["loc"]), _describe(err, Recipe, err["loc"])) for err in exc.errors()]
        # Still check the plugin params we can reach, so the user sees everything at once.
        issues += _check_component_dicts(data, registry, Path(base_dir), located)
        raise RecipeError(_dedupe(issues), source) from None

    recipe._base_dir = Path(base_dir)
    recipe._registry = registry
    for path, kind, spec in recipe.components():
        issues += _validate_component(path, kind, spec, registry, Path(base_dir), located)
    if not issues:
        issues += [located(key, message) for key, message in _converted(data, recipe)]
    if not issues:
        issues += _cross_checks(recipe, registry, located)
    if issues:
        raise RecipeError(_dedupe(issues), source)
    return recipe


def _validate_component(
    path, kind, spec: ComponentSpec, registry: Registry, base_dir: Path, located
) -> list[RecipeIssue]:
    keys = tuple(path.split("."))
    try:
        registration = registry.get(kind, spec.name)
    except PluginError:
        return [located(keys + ("name",), registry.unknown_message(kind, spec.name))]
    config_cls = registration.cls.Config
    try:
        spec._config = config_cls.model_validate(spec.params, context={"base_dir": base_dir})
    except ValidationError as exc:
        return [
            located(keys + ("params",) + tuple(err["loc"]), _describe(err, config_cls, err["loc"]))
            for err in exc.errors()
        ]
    return []


def _check_component_dicts(data: dict, registry: Registry, base_dir: Path, located) -> list[RecipeIssue]:
    """Validate components from the raw dict when the recipe's structure itself failed."""
    issues: list[RecipeIssue] = []
    for path, kind in _component_paths(data):
        node = _get_path(data, path.split("."))
        if not isinstance(node, dict) or not isinstance(node.get("name"), str):
            continue
        params = node.get("params", {})
        if not isinstance(params, dict):
            continue
        spec = ComponentSpec(name=node["name"], params=params)
        issues += _validate_component(path, kind, spec, registry, base_dir, located)
    return issues


def _component_paths(data: dict) -> Iterable[tuple[str, str]]:
    yield "data.dataset", "dataset"
    yield "data.partitioner", "partitioner"
    if isinstance(data.get("data"), dict) and data["data"].get("public") is not None:
        yield "data.public", "dataset"
    for key, kind in (
        ("algorithm", "algorithm"),
        ("backend", "backend"),
        ("aggregator", "aggregator"),
        ("generator", "generator"),
    ):
        yield key, kind
    for key, kind in (("clients", "client_model"), ("alignment_losses", "alignment_loss"), ("loggers", "logger")):
        items = data.get(key)
        if isinstance(items, list):
            for i in range(len(items)):
                yield f"{key}.{i}", kind


def _cross_checks(recipe: Recipe, registry: Registry, located) -> list[RecipeIssue]:
    issues: list[RecipeIssue] = []
    algorithm_cls = registry.get("algorithm", recipe.algorithm.name).cls
    if getattr(algorithm_cls, "needs_generator", False) and recipe.generator is None:
        issues.append(located(("generator",), f"algorithm '{recipe.algorithm.name}' needs a generator section"))
    if recipe.privacy is not None and not getattr(algorithm_cls, "uploads_soft_labels", False):
        issues.append(
            located(
                ("privacy",),
                f"privacy covers uploaded soft labels, and algorithm '{recipe.algorithm.name}' uploads none "
                f"(use fedmmkt or feddf, or remove the privacy section)",
            )
        )
    if recipe.num_clients > MAX_CLIENTS:
        issues.append(
            located(
                ("clients",), f"the groups hold {recipe.num_clients} clients; a recipe may have at most {MAX_CLIENTS}"
            )
        )
    if recipe.federation.min_clients > recipe.num_clients:
        issues.append(
            located(
                ("federation", "min_clients"),
                f"min_clients is {recipe.federation.min_clients} but the recipe has only {recipe.num_clients} clients",
            )
        )
    for path, kind, spec in recipe.components():
        cls = registry.get(kind, spec.name).cls
        for issue in cls.check_recipe(recipe, path):
            keys = tuple(issue.path.split(".")) if issue.path else tuple(path.split("."))
            issues.append(located(keys, issue.message))
    issues += _capability_checks(recipe, registry, located)
    return issues


def _capability_checks(recipe: Recipe, registry: Registry, located) -> list[RecipeIssue]:
    """Every generator capability the algorithm and the alignment losses rely on, checked before round 1."""
    algorithm_cls = registry.get("algorithm", recipe.algorithm.name).cls
    if recipe.generator is None or not getattr(algorithm_cls, "needs_generator", False):
        return []
    generator = registry.get("generator", recipe.generator.name)
    provided = generator.cls.capabilities()  # type: ignore[attr-defined]
    users = [("algorithm", recipe.algorithm)]
    if getattr(algorithm_cls, "update_generator", True):  # the losses only run when the generator is fine-tuned
        users += [(f"alignment_losses.{i}", s) for i, s in enumerate(recipe.alignment_losses) if s.weight != 0]
    issues = []
    for path, spec in users:
        kind = "algorithm" if path == "algorithm" else "alignment_loss"
        label = kind.replace("_", " ")
        registration = registry.get(kind, spec.name)
        needs = recipe.build(kind, spec).generator_requirements()
        for capability, setting in needs.items():
            if capability in provided:
                continue
            keys = tuple(path.split(".")) + (tuple(setting.split(".")) if setting else ())
            why = f" (set by {path}.{setting})" if setting else ""
            has = ", ".join(sorted(provided)) or "none"
            issues.append(
                located(
                    keys,
                    f"{label} '{spec.name}' ({registration.package}) needs generator capability "
                    f"'{capability}'{why}, which generator '{recipe.generator.name}' ({generator.package}) does not "
                    f"implement (its optional capabilities: {has}); choose another generator or {label}",
                )
            )
    return issues


_LIMIT = f"{MAX_RECIPE_BYTES // 1024} KiB"


def _non_finite(data: Any, path: tuple[Any, ...] = ()) -> Iterable[tuple[tuple[Any, ...], float]]:
    """Key paths of NaN and infinite numbers (YAML's .inf / .nan): no setting means them."""
    if isinstance(data, float) and not math.isfinite(data):
        yield path, data
    elif isinstance(data, dict):
        for key, value in data.items():
            yield from _non_finite(value, path + (key,))
    elif isinstance(data, list):
        for index, value in enumerate(data):
            yield from _non_finite(value, path + (index,))


def _converted(raw: Any, validated: Any, path: tuple[Any, ...] = ()) -> Iterable[tuple[tuple[Any, ...], str]]:
    """Key paths where the schema turned a string or a boolean into a number (``"3"``, ``"inf"``, ``true``
    read as 1): a recipe states numbers as numbers, so a quoted one is refused instead of converted."""
    if isinstance(validated, bool) or validated is None:
        return
    if isinstance(validated, int | float) and isinstance(raw, str | bool):
        shown = str(raw).lower() if isinstance(raw, bool) else repr(raw if len(raw) <= 40 else raw[:40] + "...")
        if path == ("fedmmkt",):
            yield path, f"the format version must be the number {FORMAT_VERSION}, got {shown}"
        else:
            what = "the boolean" if isinstance(raw, bool) else "the string"
            hint = "" if isinstance(raw, bool) else " (write it without quotes)"
            yield path, f"expected a number, got {what} {shown}{hint}"
    elif isinstance(raw, dict) and isinstance(validated, BaseModel):
        fields = type(validated).model_fields
        for key, value in raw.items():
            if key in fields:
                yield from _converted(value, getattr(validated, key), path + (key,))
            if key == "params" and isinstance(validated, ComponentSpec) and validated._config is not None:
                yield from _converted(value, validated._config, path + (key,))
    elif isinstance(raw, dict) and isinstance(validated, dict):
        for key, value in raw.items():
            if key in validated:
                yield from _converted(value, validated[key], path + (key,))
    elif isinstance(raw, list) and isinstance(validated, list | tuple) and len(raw) == len(validated):
        for index, (value, checked) in enumerate(zip(raw, validated, strict=True)):
            yield from _converted(value, checked, path + (index,))


# --------------------------------------------------------------------------- overrides


def _apply_override(
    data: dict, item: str, overridden: dict[tuple[str, ...], str], budget: int
) -> tuple[RecipeIssue | None, int]:
    """Set one ``KEY=VALUE`` in ``data``; the value is read by the recipe's strict YAML rules and counts
    against ``budget`` (the values left under MAX_RECIPE_NODES). Returns (issue or None, budget left)."""
    shown = _shown_set(item)
    if "=" not in item:
        return RecipeIssue(shown, "--set needs KEY=VALUE, e.g. --set federation.rounds=3"), budget
    key, raw = item.split("=", 1)
    keys = [k for k in key.strip().split(".")]
    if len(key) > 1000 or len(keys) > MAX_RECIPE_DEPTH:
        return RecipeIssue(_shown_set(key), f"--set {shown}: the key is too long"), budget
    if not key.strip() or any(not k for k in keys):
        return RecipeIssue(key, f"--set {shown}: empty key"), budget
    if len(raw) > MAX_RECIPE_BYTES:
        return RecipeIssue(key, f"--set {shown}: the value is {len(raw)} characters; the limit is {_LIMIT}"), budget
    try:
        value, _node, used = load_strict(raw, budget, MAX_RECIPE_DEPTH) if raw.strip() else ("", None, 1)
    except StrictYAMLError as exc:
        where = ".".join((*keys, *exc.path))
        return RecipeIssue(where, f"--set {shown}: {exc.message}"), budget
    except yaml.YAMLError:
        value, used = raw, 1
    budget -= used
    node: Any = data
    for depth, part in enumerate(keys[:-1]):
        here = ".".join(keys[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                return RecipeIssue(here, f"--set {shown}: no list item {part} (the list has {len(node)})"), budget
            node = node[int(part)]
        elif isinstance(node, dict):
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        else:
            return RecipeIssue(here, f"--set {shown}: '{here}' is a value, not a section"), budget
    last = keys[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            return RecipeIssue(key, f"--set {shown}: no list item {last} (the list has {len(node)})"), budget
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        return RecipeIssue(key, f"--set {shown}: the parent of '{last}' is a value, not a section"), budget
    overridden[tuple(keys)] = shown
    return None, budget


def _shown_set(item: str) -> str:
    """A --set item as messages show it: at most 100 characters."""
    return item if len(item) <= 100 else item[:100] + "..."


def _get_path(data: Any, keys: Sequence[str]) -> Any:
    node = data
    for part in keys:
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return None
    return node


def _set_path(data: Any, keys: Sequence[str], value: Any) -> None:
    node = data
    for part in keys[:-1]:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if isinstance(node, list):
        node[int(keys[-1])] = value
    else:
        node[keys[-1]] = value


# --------------------------------------------------------------------------- messages


def _describe(err: dict, root_model: type[BaseModel], loc: Sequence[Any]) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        model = _model_at(root_model, loc[:-1])
        valid = sorted(model.model_fields) if model is not None else []
        hint = suggest(str(loc[-1]), valid)
        listed = f" (valid keys: {', '.join(valid)})" if valid else ""
        return f"unknown key{hint}{listed}"
    if kind == "missing":
        return "required field is missing"
    if kind == "literal_error" and tuple(loc) == ("fedmmkt",):
        return f"unsupported recipe format version {err.get('input')!r}; this fedmmkt reads version {FORMAT_VERSION}"
    message = err["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    given = err.get("input")
    if not isinstance(given, dict | list) and kind not in {"value_error"}:
        message += f" (got {given!r})"
    return message


def _model_at(model: type[BaseModel] | None, loc: Sequence[Any]) -> type[BaseModel] | None:
    for part in loc:
        if model is None:
            return None
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        model = _first_model(field.annotation)
    return model


def _first_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _first_model(arg)
        if found is not None:
            return found
    return None


def _dedupe(issues: list[RecipeIssue]) -> list[RecipeIssue]:
    seen: set[tuple[str, str]] = set()
    unique = []
    for issue in issues:
        if (issue.path, issue.message) not in seen:
            seen.add((issue.path, issue.message))
            unique.append(issue)
    return unique


# --------------------------------------------------------------------------- YAML lines


def _line_map(node: yaml.Node | None) -> dict[tuple[str, ...], int]:
    lines: dict[tuple[str, ...], int] = {}

    def walk(n: yaml.Node, path: tuple[str, ...]) -> None:
        lines.setdefault(path, n.start_mark.line + 1)
        if isinstance(n, yaml.MappingNode):
            for key_node, value_node in n.value:
                key = path + (str(key_node.value),)
                lines[key] = key_node.start_mark.line + 1
                walk(value_node, key)
        elif isinstance(n, yaml.SequenceNode):
            for i, item in enumerate(n.value):
                walk(item, path + (str(i),))

    if node is not None:
        walk(node, ())
    return lines


def _nearest_line(lines: dict[tuple[str, ...], int], key: tuple[str, ...]) -> int | None:
    for end in range(len(key), -1, -1):
        if key[:end] in lines:
            return lines[key[:end]]
    return None


# --------------------------------------------------------------------------- schema


def recipe_json_schema(registry: Registry) -> dict[str, Any]:
    """The recipe's JSON schema, with each component's ``params`` tied to its plugin's config."""

    def variants(kind: str, base: type[ComponentSpec]) -> Any:
        models = []
        for name in registry.names(kind):
            cls = registry.get(kind, name).cls
            model = create_model(
                f"{kind}:{name}",
                __base__=base,
                name=(Literal[name], ...),  # type: ignore[valid-type]
                params=(cls.Config, Field(default_factory=cls.Config)),
            )
            model.__doc__ = (cls.__doc__ or "").strip().split("\n")[0] or None
            models.append(model)
        if not models:
            return base
        return typing.Union[tuple(models)]  # noqa: UP007 - built dynamically

    fields: dict[str, Any] = {}
    for field_name, field in Recipe.model_fields.items():
        fields[field_name] = (field.annotation, field)
    section_kinds = {"algorithm": "algorithm", "backend": "backend"}
    for key, kind in section_kinds.items():
        fields[key] = (variants(kind, ComponentSpec), Recipe.model_fields[key])
    fields["aggregator"] = (variants("aggregator", ComponentSpec) | None, Recipe.model_fields["aggregator"])
    fields["generator"] = (variants("generator", ComponentSpec) | None, Recipe.model_fields["generator"])
    fields["clients"] = (list[variants("client_model", ClientGroup)], Recipe.model_fields["clients"])
    fields["alignment_losses"] = (
        list[variants("alignment_loss", WeightedComponentSpec)],
        Recipe.model_fields["alignment_losses"],
    )
    fields["loggers"] = (list[variants("logger", ComponentSpec)], Recipe.model_fields["loggers"])
    data_model = create_model(
        "DataSection",
        __base__=_Strict,
        dataset=(variants("dataset", ComponentSpec), ...),
        partitioner=(variants("partitioner", ComponentSpec), Field(default_factory=lambda: {"name": "iid"})),
    )
    fields["data"] = (data_model, ...)
    model = create_model("Recipe", __base__=_Strict, **fields)
    schema = model.model_json_schema()
    schema["title"] = "fedmmkt recipe"
    return schema


def dump_yaml(data: Any) -> str:
    return yaml.dump(copy.deepcopy(data), Dumper=StrictDumper, sort_keys=False, allow_unicode=True)
