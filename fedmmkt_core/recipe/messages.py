"""Error messages: a pydantic error described for a recipe author, duplicates removed."""

from __future__ import annotations

import typing
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel

from ..errors import RecipeIssue
from ..plugins import suggest
from .limits import FORMAT_VERSION


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
