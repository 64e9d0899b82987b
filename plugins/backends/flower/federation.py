"""A local Flower federation for ``fedmmkt federation up``, the tests and the benchmarks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

from fedmmkt_plugins.backends.flower.processes import (
    child_env,
    descendants,
    flwr_exe,
    free_port,
    require_flwr,
    wait_listening,
)

from fedmmkt_core.errors import UserError


class LocalFederation:
    """A SuperLink and ``num_nodes`` SuperNodes on 127.0.0.1, node k holding partition-id k.

    With ``data`` (a folder written by ``fedmmkt partition``) node k's node config names its own
    training data, ``data-root=data/client_k``, and it keeps its client state under that folder;
    without, it gets ``state-dir=workdir/state-k`` for its client state (what ``--resume`` needs).

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
    ):
        self.num_nodes = num_nodes
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

    def node_config(self, k: int) -> str:
        """Node k's ``--node-config`` (Flower's ``key=value`` pairs, strings as TOML strings)."""
        pairs = [f"partition-id={k}", f"num-partitions={self.num_nodes}"]
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
        try:
            superlink = self._spawn(
                "superlink",
                [
                    flwr_exe("flower-superlink"),
                    "--insecure",
                    "--host",
                    self.host,
                    "--port",
                    str(self.port),
                    "--disable-runtime-dependency-installation",
                ],
            )
            wait_listening(superlink, "superlink", self.host, self.port, wait_seconds, self.workdir / "superlink.log")
            for k in range(self.num_nodes):
                self.start_node(k)
        except BaseException:
            self.stop()
            raise
        return self

    def start_node(self, k: int) -> subprocess.Popen:
        node_port = free_port(self.host)
        return self._spawn(
            f"supernode-{k}",
            [
                flwr_exe("flower-supernode"),
                "--insecure",
                "--superlink",
                self.address,
                "--host",
                self.host,
                "--port",
                str(node_port),
                "--node-config",
                self.node_config(k),
            ],
        )

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
