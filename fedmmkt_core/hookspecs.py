"""pluggy hook specifications. Built-ins and third-party packages implement the same hooks.

Each hook receives ``register(name, cls)`` and calls it once per implementation it provides.
Hooks only register classes; nothing heavy may happen at import or registration time.
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

PROJECT = "fedmmkt"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

Register = Callable[[str, type], None]


@hookspec
def register_generators(register: Register) -> None:
    """Register :class:`~fedmmkt_core.interfaces.Generator` subclasses."""


@hookspec
def register_client_models(register: Register) -> None:
    """Register :class:`~fedmmkt_core.interfaces.ClientModel` subclasses."""


@hookspec
def register_aggregators(register: Register) -> None:
    """Register :class:`~fedmmkt_core.interfaces.Aggregator` subclasses."""


@hookspec
def register_alignment_losses(register: Register) -> None:
    """Register :class:`~fedmmkt_core.interfaces.AlignmentLoss` subclasses."""


@hookspec
def register_datasets(register: Register) -> None:
    """Register :class:`~fedmmkt_core.interfaces.Dataset` subclasses."""


@hookspec
def register_partitioners(register: Register) -> None:
    """Register :class:`~fedmmkt_core.interfaces.Partitioner` subclasses."""


@hookspec
def register_algorithms(register: Register) -> None:
    """Register :class:`~fedmmkt_core.interfaces.Algorithm` subclasses."""


@hookspec
def register_backends(register: Register) -> None:
    """Register :class:`~fedmmkt_core.interfaces.Backend` subclasses."""


@hookspec
def register_loggers(register: Register) -> None:
    """Register :class:`~fedmmkt_core.interfaces.Logger` subclasses."""


HOOK_KINDS: dict[str, str] = {
    "register_generators": "generator",
    "register_client_models": "client_model",
    "register_aggregators": "aggregator",
    "register_alignment_losses": "alignment_loss",
    "register_datasets": "dataset",
    "register_partitioners": "partitioner",
    "register_algorithms": "algorithm",
    "register_backends": "backend",
    "register_loggers": "logger",
}
