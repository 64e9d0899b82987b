"""The plugin manager and the registry of implementations.

Built-ins (``fedmmkt_plugins``) and third-party packages (entry-point group ``fedmmkt``) register
through the same hooks. Set ``FEDMMKT_DISABLE_PLUGIN_AUTOLOAD=1`` to skip entry points, and
``FEDMMKT_PLUGINS=module.a,module.b`` to load plugin modules by import name (handy in tests).
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import os
import re
import sys
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from types import ModuleType, SimpleNamespace

import pluggy

from . import hookspecs
from .errors import PluginError
from .interfaces import KINDS, Component

AUTOLOAD_ENV = "FEDMMKT_DISABLE_PLUGIN_AUTOLOAD"
EXTRA_PLUGINS_ENV = "FEDMMKT_PLUGINS"
BUILTIN_MODULE = "fedmmkt_plugins"


class PluginLoadWarning(UserWarning):
    """An installed plugin package could not be loaded; recipes that do not use it still work."""


@dataclass(frozen=True)
class Registration:
    """One registered implementation and where it came from."""

    kind: str
    name: str
    cls: type[Component]
    package: str
    version: str

    def as_dict(self) -> dict[str, str]:
        return {
            "kind": self.kind,
            "name": self.name,
            "class": f"{self.cls.__module__}.{self.cls.__qualname__}",
            "package": self.package,
            "version": self.version,
        }


def suggest(name: str, choices: Iterable[str]) -> str:
    """' — did you mean 'x'?' for the closest choice, or ''."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" — did you mean '{close[0]}'?" if close else ""


class Registry:
    """Implementations by kind and name."""

    def __init__(self) -> None:
        self._entries: dict[str, dict[str, Registration]] = {kind: {} for kind in KINDS}
        #: packages that failed to load: package name -> why (see :class:`PluginLoadWarning`)
        self.broken: dict[str, str] = {}
        #: packages with a misspelt hook: package -> why; their components are listed, recipes refuse them
        self.blocked: dict[str, str] = {}

    def add(self, registration: Registration) -> None:
        base = KINDS[registration.kind]
        cls = registration.cls
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise PluginError(
                f"package '{registration.package}' registered {registration.kind} '{registration.name}' as {cls!r}, "
                f"which is not a subclass of {base.__module__}.{base.__name__}"
            )
        existing = self._entries[registration.kind].get(registration.name)
        if existing is not None:
            raise PluginError(
                f"{registration.kind} '{registration.name}' is registered twice: by package '{existing.package}' "
                f"({existing.cls.__module__}.{existing.cls.__qualname__}) and by package '{registration.package}' "
                f"({cls.__module__}.{cls.__qualname__}); uninstall one of them or rename"
            )
        self._entries[registration.kind][registration.name] = registration

    def names(self, kind: str) -> list[str]:
        return sorted(self._entries[kind])

    def get(self, kind: str, name: str) -> Registration:
        """The registration, or a :class:`PluginError` listing what exists and the closest name."""
        if kind not in self._entries:
            raise PluginError(f"unknown component kind '{kind}'{suggest(kind, self._entries)}")
        try:
            return self._entries[kind][name]
        except KeyError:
            raise PluginError(self.unknown_message(kind, name)) from None

    def unknown_message(self, kind: str, name: str) -> str:
        available = self.names(kind)
        listed = ", ".join(available) if available else "none registered"
        message = f"unknown {kind.replace('_', ' ')} '{name}'{suggest(name, available)} (available: {listed})"
        for package, reason in self.broken.items():
            message += f"; installed package '{package}' failed to load and may provide it: {reason}"
        for package, reason in self.blocked.items():
            message += f"; installed package '{package}' may provide it, but {reason}"
        return message

    def blocked_message(self, registration: Registration) -> str | None:
        """Why a recipe cannot use ``registration`` (its package implements a misspelt hook), or None."""
        reason = self.blocked.get(registration.package)
        if reason is None:
            return None
        return (
            f"{registration.kind.replace('_', ' ')} '{registration.name}' is registered by package "
            f"'{registration.package}', which cannot be used: {reason}; fix the hook's name in the package "
            f"(or uninstall it: pip uninstall {registration.package})"
        )

    def __iter__(self):
        for kind in KINDS:
            yield from (self._entries[kind][n] for n in sorted(self._entries[kind]))


def _distribution_of(module_name: str) -> tuple[str, str]:
    """(distribution name, version) that provides a top-level module, best effort."""
    top = module_name.split(".")[0]
    dists = importlib.metadata.packages_distributions().get(top, [])
    for dist in dists:
        try:
            return dist, importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return top, "unknown"


class PluginManager:
    """Loads built-ins and external plugins and fills a :class:`Registry`."""

    def __init__(self, load_entry_points: bool | None = None, extra_modules: Iterable[str] | None = None):
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self._sources: dict[str, tuple[str, str]] = {}
        self._entry_points: set[str] = set()
        self.broken: dict[str, str] = {}
        self.blocked: dict[str, str] = {}
        builtin = importlib.import_module(BUILTIN_MODULE)
        self.register_module(builtin, package="fedmmkt")
        if load_entry_points is None:
            load_entry_points = os.environ.get(AUTOLOAD_ENV, "").strip().lower() not in {"1", "true", "yes"}
        if load_entry_points:
            self._load_entry_points()
        env_modules = [m.strip() for m in os.environ.get(EXTRA_PLUGINS_ENV, "").split(",") if m.strip()]
        for module_name in [*env_modules, *(extra_modules or [])]:
            self.load_module(module_name)
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"a plugin implements a hook that does not exist: {exc}{_hook_hint(exc)}") from exc
        self.registry = self._collect()

    def _load_entry_points(self) -> None:
        for dist in importlib.metadata.distributions():
            for ep in dist.entry_points:
                if ep.group != hookspecs.PROJECT:
                    continue
                name = dist.metadata["Name"]
                if self.pm.get_plugin(f"{name}:{ep.name}") is not None or self.pm.is_blocked(f"{name}:{ep.name}"):
                    continue
                try:
                    plugin = self._known_hooks_only(ep.load(), name, f"{name}:{ep.name}")
                    self._register(plugin, f"{name}:{ep.name}", (name, dist.version))
                    self.pm.check_pending()
                except Exception as exc:  # a broken third-party package must not block the others
                    self._skip_broken(name, f"{name}:{ep.name}", exc)
                    continue
                self._entry_points.add(f"{name}:{ep.name}")

    def _known_hooks_only(self, plugin: object, package: str, plugin_name: str) -> object:
        """``plugin``, or, when it implements a hook that does not exist (a misspelt name), its other hooks
        only: the package is then blocked (recipes naming its components are refused, with the name of
        the unknown hook and the closest real one) and a warning says so; other recipes run."""
        marked = [attr for attr in dir(plugin) if self.pm.parse_hookimpl_opts(plugin, attr) is not None]
        unknown = [attr for attr in marked if attr not in hookspecs.HOOK_KINDS]
        if not unknown:
            return plugin
        hooks = hookspecs.HOOK_KINDS
        reason = "; ".join(f"it implements hook '{a}', which does not exist{suggest(a, hooks)}" for a in unknown)
        self.blocked[package] = reason
        warnings.warn(
            f"plugin package '{package}' ({plugin_name}): {reason}. Recipes that use its components will not "
            f"validate until the hook's name is fixed; other recipes run",
            PluginLoadWarning,
            stacklevel=3,
        )
        return SimpleNamespace(**{attr: getattr(plugin, attr) for attr in marked if attr in hookspecs.HOOK_KINDS})

    def _skip_broken(self, package: str, plugin_name: str, exc: BaseException) -> None:
        """Leave a package that fails to load or register out, with a warning saying how to skip it."""
        plugin = self.pm.get_plugin(plugin_name)
        if plugin is not None:
            self.pm.unregister(plugin)
        self._entry_points.discard(plugin_name)
        reason = f"{type(exc).__name__}: {exc}"
        self.broken[package] = reason
        warnings.warn(
            f"plugin package '{package}' ({plugin_name}) failed to load and is skipped: {reason}. Recipes that "
            f"use it will not validate; fix or uninstall it (pip uninstall {package}), or set "
            f"{AUTOLOAD_ENV}=1 to skip every installed plugin package",
            PluginLoadWarning,
            stacklevel=3,
        )

    def load_module(self, module_name: str) -> None:
        """Load a plugin module by import name (``FEDMMKT_PLUGINS``)."""
        if module_name in sys.modules and self.pm.is_registered(sys.modules[module_name]):
            return
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise PluginError(f"could not import plugin module '{module_name}': {exc}") from exc
        self.register_module(module)

    def register_module(self, module: ModuleType | object, package: str | None = None) -> None:
        """Register an already imported plugin object (a module or any object with hookimpls)."""
        if self.pm.is_registered(module):
            return
        name = getattr(module, "__name__", type(module).__name__)
        if package is None:
            source = _distribution_of(name)
        else:
            source = (package, _version_of(package))
        self._register(module, name, source)

    def add_plugin(self, plugin: ModuleType | object, package: str) -> Registry:
        """Register a plugin object at run time (tests, notebooks) and rebuild the registry."""
        self.register_module(plugin, package=package)
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            hint = _hook_hint(exc)
            raise PluginError(f"package '{package}' implements a hook that does not exist: {exc}{hint}") from exc
        self.registry = self._collect()
        return self.registry

    def _register(self, plugin: object, name: str, source: tuple[str, str]) -> None:
        try:
            self.pm.register(plugin, name=name)
        except ValueError as exc:
            raise PluginError(f"plugin '{name}' is registered twice: {exc}") from exc
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"plugin '{name}' ({source[0]}) is invalid: {exc}") from exc
        self._sources[name] = source

    def _collect(self) -> Registry:
        for plugin_name in sorted(self._entry_points):  # a package whose hooks fail is left out, not fatal
            try:
                self._collect_from({plugin_name})
            except Exception as exc:
                self._skip_broken(self._sources[plugin_name][0], plugin_name, exc)
        registry = self._collect_from(None)
        registry.broken = dict(self.broken)
        registry.blocked = {package: reason for package, reason in self.blocked.items() if package not in self.broken}
        return registry

    def _collect_from(self, only: set[str] | None) -> Registry:
        """Call the registration hooks (of the plugins named in ``only``, or all) into a new registry."""
        registry = Registry()
        for hook_name, kind in hookspecs.HOOK_KINDS.items():
            hook = getattr(self.pm.hook, hook_name)
            for impl in hook.get_hookimpls():  # registration order: built-ins first
                plugin_name = self.pm.get_name(impl.plugin) or repr(impl.plugin)
                if only is not None and plugin_name not in only:
                    continue
                package, version = self._sources.get(plugin_name, (plugin_name, "unknown"))

                def register(name: str, cls: type, _kind: str = kind, _pkg: str = package, _ver: str = version) -> None:
                    if not isinstance(name, str) or not name:
                        raise PluginError(f"package '{_pkg}' registered a {_kind} with an empty or non-string name")
                    registry.add(Registration(_kind, name, cls, _pkg, _ver))

                impl.function(register=register)
        return registry


def _hook_hint(exc: Exception) -> str:
    """' — did you mean 'register_x'?' for pluggy's "unknown hook 'NAME'" message."""
    found = re.search(r"unknown hook '(\w+)'", str(exc))
    return suggest(found.group(1), hookspecs.HOOK_KINDS) if found else ""


def _version_of(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        from . import __version__

        return __version__ if package == "fedmmkt" else "unknown"


_default: PluginManager | None = None


def get_registry(refresh: bool = False) -> Registry:
    """The process-wide registry (built on first use)."""
    global _default
    if _default is None or refresh:
        _default = PluginManager()
    return _default.registry
