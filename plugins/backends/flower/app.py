"""The Flower App objects fedmmkt runs (imported by Flower's app processes only, never by the registry).

``flwr run`` names them in the app's pyproject: ``fedmmkt_plugins.backends.flower.app:server_app``
and ``fedmmkt_plugins.backends.flower.app:client_app`` (see
:func:`fedmmkt_plugins.backends.flower.packaging.app_pyproject`). The logic lives in
:mod:`~fedmmkt_plugins.backends.flower.server_app` and :mod:`~fedmmkt_plugins.backends.flower.client_app`.
"""

from __future__ import annotations

from fedmmkt_plugins.backends.flower.client_app import handle_client
from fedmmkt_plugins.backends.flower.server_app import serve
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

server_app = ServerApp()
client_app = ClientApp()


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    serve(grid, context)


@client_app.train()
def _train(message: Message, context: Context) -> Message:
    return handle_client(message, context)


@client_app.evaluate()
def _evaluate(message: Message, context: Context) -> Message:
    return handle_client(message, context)


@client_app.query()
def _query(message: Message, context: Context) -> Message:
    return handle_client(message, context)
