"""Loading: a recipe file or text read, overridden and validated, every problem collected."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ..errors import RecipeError, RecipeIssue, UserError
from ..paths import read_regular
from ..plugins import Registry
from ..strict_yaml import StrictYAMLError, load_strict
from .checks import _check_component_dicts, _converted, _cross_checks, _non_finite, _validate_component
from .limits import _LIMIT, MAX_RECIPE_BYTES, MAX_RECIPE_DEPTH, MAX_RECIPE_NODES
from .locations import _line_map, _nearest_line
from .messages import _dedupe, _describe
from .overrides import _apply_override
from .schema import Recipe


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
        from ..plugins import get_registry

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
