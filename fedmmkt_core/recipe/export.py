"""Writing recipes out: the JSON schema (``fedmmkt schema``) and YAML."""

from __future__ import annotations

import copy
import typing
from typing import Any, Literal

import yaml
from pydantic import Field, create_model

from ..plugins import Registry
from ..strict_yaml import StrictDumper
from .schema import ClientGroup, ComponentSpec, Recipe, WeightedComponentSpec, _Strict


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
