"""The ClientApp's handler: one SuperNode runs one client's :class:`~fedmmkt_core.client.ClientRuntime`.

Node config (``flower-supernode --node-config``):

``partition-id``   the client id K this node holds (optional with ``data-root``: read from its manifest)
``num-partitions`` the number of clients, checked against the recipe
``data-root``      this node's own data, a folder written by ``fedmmkt partition`` (its ``client_K``):
                   its training share and the shared evaluation split; the node reads only that
                   folder (its classes and geometry are checked against the server's task on the
                   first message). Without it the node loads the recipe's dataset and cuts partition K.
``state-dir``      where the node keeps its client weights between messages and runs (default:
                   ``data-root/.fedmmkt-state``); what ``fedmmkt run --resume`` needs
``warm``           ``true``: a node with a state folder hands each message to its long-lived worker
                   (:mod:`.node_worker`) instead of building the client in every ClientApp process
                   (``fedmmkt federation up`` sets it)
``client-secret``  this node's own DP randomness (see :meth:`ClientRuntime.noise_rng`)
``dp-noise-multiplier``, ``dp-delta``, ``dp-max-epsilon``
                   this site's own privacy settings and budget (also from the node's environment,
                   ``FEDMMKT_DP_*``): the client runs under the stricter of these and the recipe's
                   (:class:`~fedmmkt_core.privacy.SitePrivacy`)
``class-mean-min-images``
                   this site's least class size for class-mean feedback (also
                   ``FEDMMKT_CLASS_MEAN_MIN_IMAGES``): the client never uploads a smaller class's mean

Run config (written by :func:`~.packaging.client_run_config`): ``client-recipe``, the node's recipe
(no server settings), and ``client-privacy``, the recipe's privacy section (JSON; empty without DP),
with which the node builds its client: under DP it noises its logits, withholds everything else,
keeps its privacy ledger next to its weights (``client_K.privacy.json``, never discarded on resume)
and refuses what would leak more (see :mod:`fedmmkt_core.client`).

Client weights go to ``<state-dir>/<run key>/client_K/client_K.r<round>.safetensors``
(:class:`~fedmmkt_core.client.ClientStateStore`), the round coming with every message. The first
message of a Flower run claims the folder for that run (``owner.json``) and deletes files of rounds
at or after the round the run started from (left by an interrupted run); a ClientApp of an older run
that is still working never writes into a folder another run claimed. When the run finishes, the
ServerApp sends every node a ``release`` message and the node deletes the folder (all but the privacy
ledger, under DP); a failed or interrupted run keeps it for ``--resume``. A node with neither
``state-dir`` nor ``data-root`` keeps weights in Flower's ``context.state``, which ends with the run
(no ``--resume``). In simulation mode the client state lives in the run directory on this machine.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fedmmkt_plugins.backends.flower.codec import from_records, round_from_records, to_records, unb64
from fedmmkt_plugins.backends.flower.processes import SIM_TOKEN

from fedmmkt_core.errors import UserError
from fedmmkt_core.wire import DEFAULT_MAX_BYTES, Message

WEIGHTS_STATE = "fedmmkt.weights"  # context.state record of a node without a state folder
LEDGER_STATE = "fedmmkt.privacy-ledger"  # context.state record: its privacy ledger (JSON), under DP
STATE_FOLDER = ".fedmmkt-state"  # under data-root when no state-dir is given
RUN_KEY = re.compile(r"[A-Za-z0-9_.-]{1,100}")


def handle_client(message: Any, context: Any) -> Any:
    """Decode, run this node's ClientRuntime, encode the reply (an ``error`` message when it fails)."""
    from flwr.app import Message as FlowerMessage

    try:
        reply = _client_reply(message, context)
    except Exception as exc:  # reported to the server as this client's failure, with the reason
        reply = Message("error", {"reason": f"{type(exc).__name__}: {exc}"})
    return FlowerMessage(to_records(reply), reply_to=message)


class NodeClientState:
    """One client's weights on its node's disk for one fedmmkt run (its key), per round."""

    def __init__(self, root: Path, run_key: str, client_id: int):
        from fedmmkt_core.client import ClientStateStore

        if not RUN_KEY.fullmatch(run_key):
            raise UserError(f"run-key {run_key!r} is not a plain name")
        self.client_id = client_id
        self.folder = Path(root) / run_key / f"client_{client_id}"
        self.store = ClientStateStore(self.folder)

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold this client's folder for one message (a ClientApp of an older run may still run)."""
        with open(self.folder / ".lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _owner(self) -> str | None:
        try:
            return str(json.loads((self.folder / "owner.json").read_text(encoding="utf-8"))["flower_run"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def claim(self, flower_run: str, start_round: int) -> None:
        """The first message of a Flower run: drop what rounds >= ``start_round`` left, own the folder."""
        if self._owner() != flower_run:
            self.store.discard_from(start_round)
            (self.folder / "owner.json").write_text(json.dumps({"flower_run": flower_run}), encoding="utf-8")

    def release(self, flower_run: str) -> None:
        """The run finished: delete this client's weights for it and its folder. Its privacy ledger
        (``client_K.privacy.json``) stays: the site's record of what it spent. Nothing is deleted in a
        folder another Flower run claimed."""
        import shutil

        with self.locked():
            if self._owner() != flower_run:
                return
            kept = {f"client_{self.client_id}.privacy.json"}
            for path in self.folder.iterdir():
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.name not in kept | {".lock"}:
                    path.unlink(missing_ok=True)
        if not any(p.name in kept for p in self.folder.iterdir()):
            shutil.rmtree(self.folder, ignore_errors=True)
            try:
                self.folder.parent.rmdir()  # the run key's folder, once every client of this node left it
            except OSError:
                pass

    def load(self, round_index: int) -> dict | None:
        return self.store.load(self.client_id, up_to_round=round_index)

    def save(self, flower_run: str, round_index: int, weights: dict) -> None:
        if self._owner() != flower_run:
            return  # a newer run took over this folder: this ClientApp's work is void
        self.store.save(self.client_id, round_index, weights)
        self.store.prune(self.client_id, keep_round=round_index - 1)  # rounds before are checkpointed


def _state_root(context: Any) -> Path | None:
    node_config, run_config = context.node_config, context.run_config
    if "state-dir" in node_config:
        return Path(str(node_config["state-dir"]))
    if "data-root" in node_config:
        return Path(str(node_config["data-root"])) / STATE_FOLDER
    if os.environ.get(SIM_TOKEN) and "client-state-dir" in run_config:  # fedmmkt's own simulation, this machine
        return Path(str(run_config["client-state-dir"]))
    return None


def _client_id(node_config: Any, num_clients: int) -> int:
    if "partition-id" in node_config:
        client_id = int(node_config["partition-id"])
    elif "data-root" in node_config:
        from fedmmkt_core.client.folder import read_client_folder

        client_id = read_client_folder(Path(str(node_config["data-root"]))).client_id
    else:
        raise UserError(
            "this SuperNode has no partition-id: start it with --node-config 'partition-id=K num-partitions=N' "
            "(or data-root=FOLDER from `fedmmkt partition`)"
        )
    declared = int(node_config.get("num-partitions", num_clients))
    if declared != num_clients:
        raise UserError(f"SuperNode has num-partitions={declared}, the recipe has {num_clients} clients")
    return client_id


def _client_reply(message: Any, context: Any) -> Message:
    limit = int(context.run_config.get("max-message-bytes", DEFAULT_MAX_BYTES))
    request = from_records(message.content, limit)
    round_index, start_round = round_from_records(message.content) or (0, 0)
    root = _state_root(context)
    if root is not None and _warm(context):
        from fedmmkt_plugins.backends.flower.node_worker import worker_reply

        entry = [sys.executable, "-m", __name__, "--node-worker"]
        return worker_reply(root, request, round_index, start_round, context, limit, entry)
    return client_reply(request, round_index, start_round, context, build_factory)


def _warm(context: Any) -> bool:
    """Hand messages to the node's long-lived worker (:mod:`.node_worker`)? Where the node config says
    ``warm=true``, and never in a simulation (Ray's actors are long-lived already)."""
    if os.environ.get(SIM_TOKEN):
        return False
    return str(context.node_config.get("warm", "false")).lower() in ("true", "1", "yes")


def client_reply(request: Message, round_index: int, start_round: int, context: Any, factory: Any) -> Message:
    """This node's reply to ``request`` (the round it belongs to, the round the run started from).
    ``context`` gives ``node_config``, ``run_config``, ``run_id`` (and ``state`` for a node without a
    state folder); ``factory(recipe, context)`` builds the :class:`~fedmmkt_core.client.ClientFactory`."""
    from fedmmkt_core.recipe import parse_recipe

    recipe = parse_recipe(unb64(str(context.run_config["client-recipe"])))
    node_config = context.node_config
    client_id = _client_id(node_config, recipe.num_clients)
    if request.type == "hello" and "task" in request.config:  # a data-root folder must fit the server's task
        factory(recipe, context).check_task(_server_task(request.config["task"]))
    root = _state_root(context)
    if root is None:
        if start_round > 0:
            raise UserError(
                "cannot resume: this SuperNode keeps no client state on disk; start it with "
                "--node-config 'state-dir=FOLDER' (or data-root=FOLDER)"
            )
        if request.type == "hello":
            return Message("hello_reply", {"client_id": client_id})
        return _reply_in_memory(request, context, recipe, client_id)
    run_key = str(context.run_config.get("run-key", "default"))
    if request.type == "release":  # the run finished (a node's own state only, not a simulation's run dir)
        own = "state-dir" in node_config or "data-root" in node_config
        if own and (root / run_key / f"client_{client_id}").is_dir():
            NodeClientState(root, run_key, client_id).release(str(context.run_id))
        return Message("release_reply", {})
    state = NodeClientState(root, run_key, client_id)
    flower_run = str(context.run_id)
    with state.locked():
        state.claim(flower_run, start_round)
        if request.type == "hello":
            return Message("hello_reply", {"client_id": client_id})
        runtime = factory(recipe, context).build(client_id, ledger=state.store.ledger(client_id))
        weights = state.load(round_index)
        if weights is not None:
            runtime.model.set_weights(weights)
        reply = runtime.handle(request)
        if runtime.weights_changed:
            state.save(flower_run, round_index, runtime.model.get_weights())
    return reply


def _server_task(config: Any) -> Any:
    from fedmmkt_core.data import TaskSpec

    try:
        names = tuple(str(name) for name in config["class_names"])
        return TaskSpec(names, int(config["image_size"]), int(config["channels"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"malformed task in the server's hello ({exc})") from None


def run_privacy(run_config: Any) -> Any:
    """The recipe's privacy section as the run config carries it (None without DP)."""
    from fedmmkt_core.privacy import SoftLabelPrivacy

    text = str(run_config.get("client-privacy", ""))
    return SoftLabelPrivacy.model_validate(json.loads(unb64(text))) if text else None


def build_factory(recipe: Any, context: Any) -> Any:
    """The :class:`~fedmmkt_core.client.ClientFactory` of this node for ``recipe``."""
    from fedmmkt_core.client import ClientFactory
    from fedmmkt_core.privacy import SitePrivacy

    node_config = context.node_config
    secret = node_config.get("client-secret")  # the node's own DP randomness (see ClientRuntime.noise_rng)
    data_root = node_config.get("data-root")
    return ClientFactory(
        recipe,
        secret=str(secret) if secret is not None else None,
        data_root=Path(str(data_root)) if data_root is not None else None,
        privacy=run_privacy(context.run_config),
        site=SitePrivacy.read(node_config),  # the site's own settings: the stricter of these and the recipe's
    )


def _reply_in_memory(request: Message, context: Any, recipe: Any, client_id: int) -> Message:
    """A node without a state folder: weights in ``context.state`` for the length of the Flower run."""
    from flwr.app import Array, ArrayRecord, ConfigRecord
    from safetensors.numpy import load, save

    from fedmmkt_core.privacy import PrivacyLedger

    kept = context.state.config_records.get(LEDGER_STATE)
    ledger = PrivacyLedger(entries=json.loads(str(kept["uploads"])) if kept is not None else [])
    runtime = build_factory(recipe, context).build(client_id, ledger=ledger)
    stored = context.state.array_records.get(WEIGHTS_STATE)
    if stored is not None:
        runtime.model.set_weights(load(bytes(stored["weights"].data)))
    try:
        reply = runtime.handle(request)
    finally:  # an upload charged before a failure stays charged
        if runtime.privacy is not None:
            context.state[LEDGER_STATE] = ConfigRecord({"uploads": json.dumps(ledger.entries)})
    if runtime.weights_changed:
        blob = save(runtime.model.get_weights())
        array = Array(dtype="uint8", shape=(len(blob),), stype="safetensors", data=blob)
        context.state[WEIGHTS_STATE] = ArrayRecord(array_dict={"weights": array})
    return reply


if __name__ == "__main__" and sys.argv[1:2] == ["--node-worker"]:  # this node's warm worker (see .node_worker)
    from fedmmkt_plugins.backends.flower.node_worker import main

    main(sys.argv[2:], client_reply, build_factory)
