"""A local Flower federation for ``fedmmkt federation up``, the tests and the benchmarks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

from fedmmkt_plugins.backends.flower.credentials import NodeKey, TlsFiles, write_node_key, write_tls_files
from fedmmkt_plugins.backends.flower.packaging import connection_lines, write_flwr_home
from fedmmkt_plugins.backends.flower.processes import (
    child_env,
    descendants,
    flwr_exe,
    free_port,
    require_flwr,
    wait_listening,
)

from fedmmkt_core.errors import UserError
from fedmmkt_core.rundir import atomic_write_json


class LocalFederation:
    """A SuperLink and ``num_nodes`` SuperNodes on 127.0.0.1, node k holding partition-id k.

    With ``data`` (a folder written by ``fedmmkt partition``) node k's node config names its own
    training data, ``data-root=data/client_k``, and it keeps its client state under that folder;
    without, it gets ``state-dir=workdir/state-k`` for its client state (what ``--resume`` needs).

    ``warm`` gives every node ``warm=true``: one long-lived client worker per node (see
    :mod:`.node_worker`) instead of a fresh ClientApp build per message.

    With ``tls`` the SuperLink serves HTTPS with a certificate signed by a CA written to
    ``workdir/credentials`` (:attr:`tls_files`); with ``authenticate_nodes`` it admits only SuperNodes
    whose public key was registered (``--enable-supernode-auth``): each node gets its own key pair,
    registered through Flower's Control API before it starts, and :attr:`node_ids` (also written to
    ``workdir/node_ids.json``) maps client id -> the node id Flower bound to that key, which the recipe's
    ``backend.params.node_ids`` turns into a check that no node answers for another's client.

    Every process starts in its own session (process group) and :meth:`stop` ends each group by id,
    so the ``flower-superexec`` / app processes they spawn go too. Logs go to ``workdir/*.log``.
    """

    def __init__(
        self,
        num_nodes: int,
        workdir: Path,
        port: int | None = None,
        host: str = "127.0.0.1",
        data: Path | None = None,
        tls: bool = False,
        authenticate_nodes: bool = False,
        warm: bool = True,
    ):
        self.num_nodes = num_nodes
        self.warm = warm
        self.tls = tls
        self.authenticate_nodes = authenticate_nodes
        self.tls_files: TlsFiles | None = None
        self.node_keys: dict[int, NodeKey] = {}
        self.node_ids: dict[int, int] = {}
        self.workdir = Path(workdir)
        self.host = host
        self.port = port or free_port(host)
        self.data = Path(data).resolve() if data is not None else None
        self.processes: dict[str, subprocess.Popen] = {}
        if self.data is not None:
            missing = [k for k in range(num_nodes) if not (self.data / f"client_{k}").is_dir()]
            if missing:
                raise UserError(
                    f"{self.data} has no folder for client(s) {missing}: write it with `fedmmkt partition RECIPE "
                    f"{self.data}` for a recipe with {num_nodes} clients"
                )

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def credentials(self) -> Path:
        return self.workdir / "credentials"

    def backend_params(self) -> dict[str, object]:
        """The recipe's ``backend.params`` for a deployment run on this federation."""
        params: dict[str, object] = {"superlink": self.address}
        if self.tls_files is not None:
            params["root_certificates"] = str(self.tls_files.ca_certificate.resolve())
        else:
            params["insecure"] = True
        if self.node_ids:
            params["node_ids"] = dict(self.node_ids)
        return params

    def _transport_args(self) -> list[str]:
        if self.tls_files is None:
            return ["--insecure"]
        return ["--root-certificates", str(self.tls_files.ca_certificate)]

    def node_config(self, k: int, partition_id: int | None = None) -> str:
        """Node k's ``--node-config`` (Flower's ``key=value`` pairs, strings as TOML strings)."""
        pid = k if partition_id is None else partition_id
        pairs = [f"partition-id={pid}", f"num-partitions={self.num_nodes}"]
        if self.warm:
            pairs.append("warm=true")
        if self.data is not None:
            pairs.append(f"data-root={json.dumps(str(self.data / f'client_{k}'))}")
        else:
            pairs.append(f"state-dir={json.dumps(str((self.workdir / f'state-{k}').resolve()))}")
        return " ".join(pairs)

    def _spawn(self, name: str, command: list[str]) -> subprocess.Popen:
        home = self.workdir / f"flwr-home-{name}"
        home.mkdir(parents=True, exist_ok=True)
        log_file = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        try:
            proc = subprocess.Popen(
                command, stdout=log_file, stderr=subprocess.STDOUT, env=child_env(home), start_new_session=True
            )
        finally:
            log_file.close()
        self.processes[name] = proc
        return proc

    def start(self, wait_seconds: float = 60.0) -> LocalFederation:
        require_flwr()
        self.workdir.mkdir(parents=True, exist_ok=True)
        command = [flwr_exe("flower-superlink")]
        if self.tls:
            hosts = [self.host] + (["localhost"] if self.host in ("127.0.0.1", "::1") else [])
            self.tls_files = write_tls_files(self.credentials, hosts)
            command += [
                "--ssl-ca-certfile",
                str(self.tls_files.ca_certificate),
                "--ssl-certfile",
                str(self.tls_files.server_certificate),
                "--ssl-keyfile",
                str(self.tls_files.server_key),
            ]
        else:
            command.append("--insecure")
        if self.authenticate_nodes:
            command.append("--enable-supernode-auth")
        command += ["--host", self.host, "--port", str(self.port), "--disable-runtime-dependency-installation"]
        try:
            superlink = self._spawn("superlink", command)
            wait_listening(superlink, "superlink", self.host, self.port, wait_seconds, self.workdir / "superlink.log")
            if self.authenticate_nodes:
                keys = {k: write_node_key(self.credentials, f"node-{k}") for k in range(self.num_nodes)}
                self.node_ids = self.register_keys(keys)
                self.node_keys.update(keys)
                atomic_write_json(self.workdir / "node_ids.json", {str(k): v for k, v in self.node_ids.items()})
            for k in range(self.num_nodes):
                self.start_node(k)
        except BaseException:
            self.stop()
            raise
        return self

    def register_keys(self, keys: dict[int, NodeKey], timeout: float = 120.0) -> dict[int, int]:
        """Register each public key with the SuperLink (``flwr supernode register``, all at once);
        returns key -> the node id Flower assigned to it."""
        home = self.workdir / "flwr-home-control"
        ca = self.tls_files.ca_certificate.resolve() if self.tls_files is not None else None
        write_flwr_home(home, "local", connection_lines(self.address, insecure=ca is None, root_certificates=ca))
        env = child_env(home)
        procs = {
            k: subprocess.Popen(
                [flwr_exe(), "supernode", "register", str(key.public_key), "local", "--format", "json"],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=env,
            )
            for k, key in keys.items()
        }
        node_ids: dict[int, int] = {}
        for k, proc in procs.items():
            output, _ = proc.communicate(timeout=timeout)
            start = output.find("{")
            try:
                node_ids[k] = int(json.loads(output[start:])["node-id"]) if start >= 0 else -1
            except (ValueError, KeyError, TypeError):
                node_ids[k] = -1
            if proc.returncode != 0 or node_ids[k] < 0:
                raise UserError(f"could not register {keys[k].public_key} with the SuperLink:\n{output[-2000:]}")
        return node_ids

    def start_node(self, k: int, partition_id: int | None = None, key: NodeKey | None = None) -> subprocess.Popen:
        """Start SuperNode ``k`` (log ``supernode-k.log``). ``partition_id`` makes it claim another
        client's data and ``key`` authenticate with another key pair (what the tests of a hostile or
        unregistered node use); by default it holds partition k with its own registered key."""
        node_port = free_port(self.host)
        command = [flwr_exe("flower-supernode"), *self._transport_args(), "--superlink", self.address]
        key = key or self.node_keys.get(k)
        if key is not None:
            command += ["--auth-supernode-private-key", str(key.private_key)]
        command += ["--host", self.host, "--port", str(node_port), "--node-config", self.node_config(k, partition_id)]
        return self._spawn(f"supernode-{k}", command)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to one process's whole group (e.g. ``kill('supernode-2')``)."""
        proc = self.processes[name]
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)

    def descendants(self, name: str) -> list[int]:
        """PIDs of every process ``name`` started, directly or not (its app processes, SuperExec...)."""
        return descendants(self.processes[name].pid)

    def stop(self) -> None:
        """End every process this federation started: each process group, and descendants that left it
        (the SuperLink's SuperExec starts its own session). SIGTERM first, then SIGKILL."""
        strays: set[int] = set()
        for name, proc in self.processes.items():
            if proc.poll() is None:
                strays.update(self.descendants(name))
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for proc in self.processes.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # also any app process left in the group
            except ProcessLookupError:
                pass
            proc.wait()
        for pid in strays:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def __enter__(self) -> LocalFederation:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
