"""The client side of the trust boundary: one client's private data and model, answering messages.

Nothing here is imported by the server side (:mod:`fedmmkt_core.server`); the two meet only through
the shared layer (wire messages, data types, the recipe, the interfaces). ``import-linter`` checks it
(``pyproject.toml``).

* :mod:`~fedmmkt_core.client.runtime`: :class:`ClientRuntime` (a client answering messages, its DP
  noise drawn here) and :class:`ClientStateStore` (its state between rounds);
* :mod:`~fedmmkt_core.client.factory`: :class:`ClientFactory`, client ``k`` built from a recipe with
  only client ``k``'s data, and :func:`write_partition` (``fedmmkt partition``);
* :mod:`~fedmmkt_core.client.folder`: one client's data as a folder of its own.
"""

from fedmmkt_core.client.factory import ClientFactory, write_partition
from fedmmkt_core.client.folder import ClientFolder, read_client_folder, write_client_folder
from fedmmkt_core.client.runtime import CLIENT_SECRET_ENV, ClientRuntime, ClientStateStore

__all__ = [
    "CLIENT_SECRET_ENV",
    "ClientFactory",
    "ClientFolder",
    "ClientRuntime",
    "ClientStateStore",
    "read_client_folder",
    "write_client_folder",
    "write_partition",
]
