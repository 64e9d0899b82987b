"""``--set KEY=VALUE`` overrides applied to the recipe data before validation."""

from __future__ import annotations

from typing import Any

import yaml

from ..errors import RecipeIssue
from ..strict_yaml import StrictYAMLError, load_strict
from .limits import _LIMIT, MAX_RECIPE_BYTES, MAX_RECIPE_DEPTH


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
