"""Which plugin an exception came from, as one line a plugin author can act on.

A plugin's exception that reaches the round loop stops the run with :class:`PluginCrashed`: its
message names the plugin (registered name and package), the round, the phase and the exception; the
traceback goes to the run's ``log.txt``. The plugin is the innermost frame of the traceback whose
``self`` is a component (a helper function it calls is still its own code; a torch module it calls is
not a component), so a loss that raises inside the generator's ``fine_tune`` is named, not the generator.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from fedmmkt_core.errors import ClientFailure, PluginOutputError, UserError
from fedmmkt_core.interfaces import Component, Generator
from fedmmkt_core.plugins import Registry, _distribution_of
from fedmmkt_core.server.context import RoundFailed

_PHASE_ATTRIBUTE = "_fedmmkt_phase"
MAX_MESSAGE = 500


@dataclass(frozen=True)
class Culprit:
    """The component an exception came from and the method it was in."""

    kind: str
    name: str
    package: str
    method: str
    declared: frozenset[str]

    def label(self) -> str:
        return f"{self.kind.replace('_', ' ')} '{self.name}' (package '{self.package}')"


def find_culprit(exc: BaseException, registry: Registry | None = None) -> Culprit | None:
    """The innermost component in ``exc``'s traceback, or None when no component's code is on it."""
    found: Component | None = None
    method = ""
    tb: TracebackType | None = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        owner = frame.f_locals.get("self", frame.f_locals.get("cls"))
        if isinstance(owner, Component) or (isinstance(owner, type) and issubclass(owner, Component)):
            found, method = owner, frame.f_code.co_name  # type: ignore[assignment]
        tb = tb.tb_next
    if found is None:
        return None
    cls = found if isinstance(found, type) else type(found)
    name = getattr(found, "registered_name", "") or ""
    package = ""
    if registry is not None:
        for entry in registry:
            if entry.kind == cls.kind and (entry.name == name or (not name and entry.cls is cls)):
                name, package = entry.name, entry.package
                break
    if not package:
        package = _distribution_of(cls.__module__)[0]
    declared = cls.capabilities() if issubclass(cls, Generator) else frozenset()
    return Culprit(cls.kind, name or cls.__name__, package, method, declared)


def note_phase(name: str) -> None:
    """Called when a phase ends: an exception in flight is marked as raised in phase ``name`` (the
    innermost phase it went through, since that one ends first)."""
    exc = sys.exc_info()[1]
    if exc is not None and not hasattr(exc, _PHASE_ATTRIBUTE):
        try:
            setattr(exc, _PHASE_ATTRIBUTE, name)
        except (AttributeError, TypeError):
            pass


def tracking_phases(events: Callable[..., None]) -> Callable[..., None]:
    """An event sink that passes every event on and marks exceptions with the phase they left."""

    def sink(event: str, **data: Any) -> None:
        if event == "phase_end":
            note_phase(str(data.get("name", "")))
        events(event, **data)

    return sink


def is_plugin_crash(exc: BaseException) -> bool:
    """False for exceptions that keep their own handling: user errors (exit 2), OS errors with an errno
    or a path (a full disk, a missing file: exit 2 naming it), failed rounds, a plugin's bad output,
    interruptions."""
    if isinstance(exc, OSError) and (exc.errno is not None or exc.filename is not None):
        return False
    return isinstance(exc, Exception) and not isinstance(
        exc, UserError | RoundFailed | PluginOutputError | ClientFailure
    )


def crash_message(exc: BaseException, registry: Registry | None, where: str, phase: str) -> str | None:
    """The one line for a plugin's exception (see :func:`describe`), or None when ``exc`` keeps its own
    handling or no component's code raised it."""
    culprit = find_culprit(exc, registry) if is_plugin_crash(exc) else None
    return None if culprit is None else describe(exc, culprit, where, phase)


def describe(exc: BaseException, culprit: Culprit, where: str, phase: str) -> str:
    """``WHERE, phase 'PHASE': KIND 'NAME' (package 'P') raised TYPE: MESSAGE`` on one line."""
    phase = getattr(exc, _PHASE_ATTRIBUTE, None) or phase
    text = " ".join(str(exc).split())
    if len(text) > MAX_MESSAGE:
        text = text[:MAX_MESSAGE] + "..."
    raised = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    if isinstance(exc, NotImplementedError) and culprit.method in culprit.declared:
        return (
            f"{where}, phase '{phase}': {culprit.label()} declares capability '{culprit.method}' "
            f"(it overrides {culprit.method}), but its {culprit.method} raised {raised}; implement it, or "
            "remove the override so that fedmmkt validate refuses recipes that need it"
        )
    return f"{where}, phase '{phase}': {culprit.label()} raised {raised}"
