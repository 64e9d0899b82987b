"""Checks after the structure: each component's params against its plugin, then across the recipe."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from ..errors import PluginError, RecipeIssue
from ..plugins import Registry
from .limits import FORMAT_VERSION, MAX_CLIENTS
from .locations import _get_path
from .messages import _describe
from .schema import ComponentSpec, Recipe


def _validate_component(
    path, kind, spec: ComponentSpec, registry: Registry, base_dir: Path, located
) -> list[RecipeIssue]:
    keys = tuple(path.split("."))
    try:
        registration = registry.get(kind, spec.name)
    except PluginError:
        return [located(keys + ("name",), registry.unknown_message(kind, spec.name))]
    blocked = registry.blocked_message(registration)
    if blocked is not None:  # its package implements a misspelt hook
        return [located(keys + ("name",), blocked)]
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
            stub = capability in provided and _only_raises_not_implemented(getattr(generator.cls, capability))
            if capability in provided and not stub:
                continue
            keys = tuple(path.split(".")) + (tuple(setting.split(".")) if setting else ())
            why = f" (set by {path}.{setting})" if setting else ""
            has = ", ".join(sorted(provided)) or "none"
            needed = f"{label} '{spec.name}' ({registration.package}) needs generator capability '{capability}'{why}"
            if stub:
                issues.append(
                    located(
                        keys,
                        f"{needed}, which generator '{recipe.generator.name}' ({generator.package}) declares (it "
                        f"overrides {capability}) but does not implement: its {capability} only raises "
                        f"NotImplementedError; implement it or remove the override, or choose another generator",
                    )
                )
                continue
            issues.append(
                located(
                    keys,
                    f"{needed}, which generator '{recipe.generator.name}' ({generator.package}) does not "
                    f"implement (its optional capabilities: {has}); choose another generator or {label}",
                )
            )
    return issues


def _only_raises_not_implemented(method: Any) -> bool:
    """Whether a method's body (its docstring aside) is one ``raise NotImplementedError...``: a declared
    capability that is a stub. Best effort: False when the source cannot be read."""
    import ast
    import inspect
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(method)))
    except (OSError, TypeError, SyntaxError, IndentationError):
        return False
    function = tree.body[0] if tree.body else None
    if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
        return False
    body = function.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the docstring
    if len(body) != 1 or not isinstance(body[0], ast.Raise) or body[0].exc is None:
        return False
    raised = body[0].exc.func if isinstance(body[0].exc, ast.Call) else body[0].exc
    return isinstance(raised, ast.Name) and raised.id == "NotImplementedError"


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
