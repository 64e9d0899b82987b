"""Import heavy libraries only when a component actually uses them.

Plugin modules are imported by ``fedmmkt plugins`` and recipe validation, which must stay instant and
work without torch. A plugin writes ``torch = lazy_import("torch", "pip install torch==2.13.0")`` at
module level; the real import happens on first attribute access, and a missing package becomes a
:class:`~fedmmkt_core.errors.MissingDependencyError` carrying the install hint.
"""

from __future__ import annotations

import importlib
import types
from typing import Any

from .errors import MissingDependencyError


class LazyModule(types.ModuleType):
    """A module proxy that imports the real module on first attribute access."""

    def __init__(self, name: str, hint: str):
        super().__init__(name)
        self.__dict__["_lazy_hint"] = hint
        self.__dict__["_lazy_module"] = None

    def _load(self) -> types.ModuleType:
        module = self.__dict__["_lazy_module"]
        if module is None:
            try:
                module = importlib.import_module(self.__name__)
            except ModuleNotFoundError as exc:
                top = self.__name__.split(".")[0]
                if exc.name is not None and exc.name.split(".")[0] == top:
                    raise MissingDependencyError(top, self.__dict__["_lazy_hint"]) from exc
                raise
            self.__dict__["_lazy_module"] = module
        return module

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._load(), attr)

    def __dir__(self) -> list[str]:
        return dir(self._load())


def lazy_import(name: str, hint: str = "") -> Any:
    """Return a proxy for module ``name`` that imports it on first use."""
    return LazyModule(name, hint or f"Install it with: pip install {name.split('.')[0]}")


def missing(*modules: str) -> list[str]:
    """The top-level packages of ``modules`` that are not installed (checked without importing them),
    for ``check_recipe`` to refuse a recipe before the run with an install hint."""
    import importlib.util

    return [m for m in modules if importlib.util.find_spec(m.split(".")[0]) is None]
