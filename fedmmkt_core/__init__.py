"""fedmmkt core: interfaces, plugin system, recipes, round loop. Imports no heavy library."""

__version__ = "0.1.0"
