"""Old import paths that keep working after a module moved (e.g. ``fedmmkt_core.runner``).

A third-party package written against an earlier layout imports the module at its old name and gets
the module itself (same object, so ``isinstance`` and monkeypatching behave), with a
``DeprecationWarning`` naming the new path.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from collections.abc import Mapping, Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self) -> None:
        self.moved: dict[str, str] = {}

    def find_spec(
        self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname in self.moved:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec: ModuleSpec) -> None:
        return None  # the default module, replaced in exec_module

    def exec_module(self, module: ModuleType) -> None:
        new = self.moved[module.__name__]
        warnings.warn(f"{module.__name__} moved to {new}; import it from there", DeprecationWarning, stacklevel=2)
        # the import system returns what sys.modules holds under the old name once this returns
        sys.modules[module.__name__] = importlib.import_module(new)


_FINDER = _MovedModules()


def keep_old_paths(moved: Mapping[str, str]) -> None:
    """Make every old module name in ``moved`` import the module now at its new name."""
    _FINDER.moved.update(moved)
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)  # before the path finders, which would load a second copy
