"""fedmmkt core: interfaces, plugin system, recipes, round loop. Imports no heavy library.

Layout (``CONTRIBUTING.md``, "Architecture"; the layers are checked by ``import-linter``): the shared
layer at the top level (errors, data types, wire messages, interfaces, registry, recipe, loading),
the server side in :mod:`fedmmkt_core.server`, the client side in :mod:`fedmmkt_core.client`.
"""

from .aliases import keep_old_paths

__version__ = "0.1.0"

keep_old_paths(
    {
        "fedmmkt_core.context": "fedmmkt_core.server.context",
        "fedmmkt_core.runner": "fedmmkt_core.server.runner",
        "fedmmkt_core.clientdata": "fedmmkt_core.client.folder",
    }
)
