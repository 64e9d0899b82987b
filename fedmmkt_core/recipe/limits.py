"""The recipe format's version and limits (sizes, counts, run names)."""

from __future__ import annotations

import re

FORMAT_VERSION = 1
MAX_RECIPE_BYTES = 1024 * 1024  # a recipe is configuration: 1 MiB is far beyond any real one
MAX_RECIPE_NODES = 100_000  # YAML values after alias expansion (guards against "billion laughs")
MAX_RECIPE_DEPTH = 64  # nesting of mappings and lists
MAX_SEED = 2**32 - 1
MAX_CLIENTS = 10_000  # clients in one recipe (all groups): each is built, sampled and checkpointed
MAX_ROUND_TIMEOUT = 7 * 24 * 3600.0
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")

_LIMIT = f"{MAX_RECIPE_BYTES // 1024} KiB"
