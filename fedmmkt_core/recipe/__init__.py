"""Recipes: a YAML file validated into one :class:`Recipe`, every error reported with its key path.

Validation runs in stages so that all problems are collected before reporting: YAML syntax, the
recipe's own structure, then each component's ``params`` against the ``Config`` of the plugin named.
"""

from __future__ import annotations

from .export import dump_yaml, recipe_json_schema
from .limits import (
    FORMAT_VERSION,
    MAX_CLIENTS,
    MAX_RECIPE_BYTES,
    MAX_RECIPE_DEPTH,
    MAX_RECIPE_NODES,
    MAX_ROUND_TIMEOUT,
    MAX_SEED,
    RUN_NAME,
)
from .parsing import load_recipe, parse_recipe
from .schema import ClientGroup, ComponentSpec, DataSection, FederationSection, Recipe, WeightedComponentSpec

__all__ = [
    "ClientGroup",
    "ComponentSpec",
    "DataSection",
    "FORMAT_VERSION",
    "FederationSection",
    "MAX_CLIENTS",
    "MAX_RECIPE_BYTES",
    "MAX_RECIPE_DEPTH",
    "MAX_RECIPE_NODES",
    "MAX_ROUND_TIMEOUT",
    "MAX_SEED",
    "RUN_NAME",
    "Recipe",
    "WeightedComponentSpec",
    "dump_yaml",
    "load_recipe",
    "parse_recipe",
    "recipe_json_schema",
]
