"""The Flower backend: the same recipe on a real Flower federation (deployment) or Flower's simulation engine.

The round loop runs inside Flower's ServerApp (:mod:`fedmmkt_plugins.backends.flower.app`), which owns the
generator; every SuperNode runs one client (``partition-id``, or its own ``data-root`` folder, in its
node config) with the same :class:`~fedmmkt_core.client.ClientRuntime` as the in-process backend.

What travels is the toolkit's :class:`~fedmmkt_core.wire.Message` unchanged (:mod:`.codec`). Client
weights stay on the node, on its disk per run and round, so ``fedmmkt run --resume`` works on Flower.

Modules, by responsibility (none imports flwr at module level, so the registry stays cheap):

``codec``       Message <-> Flower records; Flower-level byte counts
``backend``     :class:`FlowerBackend` (the registered ``flower`` backend) and its config: server side
``server_app``  the ServerApp's main: a Runner with the backend bound to the ServerApp's grid
``client_app``  the ClientApp's handler: node config, per-node data, client state on the node's disk
``node_worker`` ``warm=true``: one long-lived client worker per node, the ClientApp its messenger
``packaging``   the app folder and run config ``flwr run`` submits; deployment and simulation launch
``processes``   executables, environment, ports, finding and ending every process a run started
``federation``  :class:`LocalFederation`: a SuperLink and SuperNodes on 127.0.0.1 (optionally TLS and
                authenticated nodes)
``credentials`` a TLS CA and server certificate, and SuperNode key pairs
"""

from fedmmkt_plugins.backends.flower.backend import NODES_FILE, WIRE_FILE, FlowerBackend, FlowerConfig
from fedmmkt_plugins.backends.flower.codec import flower_nbytes, from_records, to_records
from fedmmkt_plugins.backends.flower.federation import LocalFederation
from fedmmkt_plugins.backends.flower.processes import SIM_TOKEN, free_port, processes_with_token, require_flwr
from fedmmkt_plugins.backends.flower.runlock import STATUS_FILE

__all__ = [
    "NODES_FILE",
    "SIM_TOKEN",
    "STATUS_FILE",
    "WIRE_FILE",
    "FlowerBackend",
    "FlowerConfig",
    "LocalFederation",
    "flower_nbytes",
    "free_port",
    "from_records",
    "processes_with_token",
    "require_flwr",
    "to_records",
]
