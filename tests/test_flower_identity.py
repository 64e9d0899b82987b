"""Real sites: TLS, authenticated SuperNodes, and each client id bound to its node's key.

The unit tests drive :meth:`FlowerBackend.start` with a stand-in grid and scripted ``hello`` replies;
the end-to-end test runs the smoke recipe on a loopback federation started with TLS and
``--enable-supernode-auth``, with an impostor node (registered, but bound to no client, claiming
client 0) and a node whose key was never registered.
"""

import json
import ssl
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from fedmmkt_cli.main import app
from typer.testing import CliRunner

from fedmmkt_core.errors import UserError
from fedmmkt_core.wire import Message

pytest.importorskip("flwr", reason="the flower extra is not installed")

from fedmmkt_plugins.backends.flower import FlowerBackend, FlowerConfig, LocalFederation  # noqa: E402
from fedmmkt_plugins.backends.flower.backend import NODES_FILE  # noqa: E402
from fedmmkt_plugins.backends.flower.credentials import write_node_key, write_tls_files  # noqa: E402
from test_flower import LIGHT_SERVER  # noqa: E402

SMOKE = Path(__file__).resolve().parents[1] / "examples" / "smoke.yaml"
THREE_CLIENTS = ["clients.0.count=2", "clients.1.count=1", "federation.rounds=1", *LIGHT_SERVER]


class StandInGrid:
    def __init__(self, node_ids):
        self.node_ids = list(node_ids)

    def get_node_ids(self):
        return list(self.node_ids)


def started_backend(tmp_path, monkeypatch, node_ids, claims, bound):
    """A FlowerBackend started on a grid of ``node_ids``, node n answering hello as client ``claims[n]``."""
    ctx = SimpleNamespace(
        task=SimpleNamespace(image_size=8, channels=1, class_names=[str(i) for i in range(10)]),
        clients=[SimpleNamespace(client_id=i) for i in range(3)],
        run_dir=SimpleNamespace(root=tmp_path),
        recipe=SimpleNamespace(federation=SimpleNamespace(min_clients=1)),
        rounds_completed_at_start=0,
    )
    backend = FlowerBackend(FlowerConfig(node_ids=bound, node_wait_seconds=0.01)).bind(StandInGrid(node_ids))
    asked = []

    def hello(routed, **kwargs):
        asked.extend(node for _, node in routed.values())
        return {key: Message("hello_reply", {"client_id": claims[node]}) for key, (_, node) in routed.items()}

    monkeypatch.setattr(backend, "_send", hello)
    backend.start(ctx)
    return backend, asked


def test_a_node_answering_for_another_nodes_client_is_refused(tmp_path, monkeypatch):
    bound = {0: 101, 1: 102, 2: 103}
    claims = {101: 0, 102: 0, 103: 2, 999: 1}  # 102 claims client 0 (bound to 101); 999 is bound to nothing
    backend, asked = started_backend(tmp_path, monkeypatch, [101, 102, 103, 999], claims, bound)
    assert backend.node_of == {0: 101, 2: 103}
    assert set(backend.refused) == {102, 999}
    assert "answers for client 0, which is bound to node 101" in backend.refused[102]
    assert 999 not in asked  # a node bound to no client is not even asked who it is
    record = json.loads((tmp_path / NODES_FILE).read_text())
    assert record["client_to_node"] == {"0": 101, "2": 103}
    assert set(record["refused"]) == {"102", "999"}
    # A refused node is not asked again when the backend looks for client 1's node next round.
    asked.clear()
    backend._discover_nodes()
    assert asked == []


def test_without_a_binding_two_nodes_claiming_one_client_stop_the_run(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="two SuperNodes"):
        started_backend(tmp_path, monkeypatch, [101, 102], {101: 0, 102: 0}, None)


@pytest.mark.parametrize(
    ("bound", "message"),
    [({0: 1, 5: 2}, r"client ids \[5\] are not in the recipe"), ({0: 7, 1: 7}, "two clients are bound to one node")],
)
def test_a_binding_that_cannot_hold_is_refused_before_any_node_is_asked(tmp_path, monkeypatch, bound, message):
    with pytest.raises(UserError, match=message):
        started_backend(tmp_path, monkeypatch, [1, 2], {1: 0, 2: 1}, bound)


def test_the_tls_files_form_a_chain_a_client_verifies(tmp_path):
    from cryptography import x509

    files = write_tls_files(tmp_path, ["127.0.0.1", "localhost"])
    context = ssl.create_default_context(cafile=str(files.ca_certificate))  # parses the CA
    assert context.cert_store_stats()["x509_ca"] == 1
    cert = x509.load_pem_x509_certificate(files.server_certificate.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert files.server_key.stat().st_mode & 0o077 == 0  # private keys are the owner's alone
    key = write_node_key(tmp_path, "node-0")
    assert key.private_key.stat().st_mode & 0o077 == 0
    assert key.public_key.read_text().startswith("ecdsa-sha2-nistp384 ")


def test_tls_federation_with_authenticated_nodes_runs_and_refuses_impostors(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    fed = LocalFederation(3, tmp_path / "federation", tls=True, authenticate_nodes=True)
    try:
        fed.start()
        assert sorted(fed.node_ids) == [0, 1, 2] and len(set(fed.node_ids.values())) == 3
        written = json.loads((tmp_path / "federation" / "node_ids.json").read_text())
        assert {int(k): v for k, v in written.items()} == fed.node_ids
        # An impostor: its key is registered (it authenticates), it claims client 0's partition.
        impostor_key = write_node_key(fed.credentials, "impostor")
        impostor_id = fed.register_keys({3: impostor_key})[3]
        fed.start_node(3, partition_id=0, key=impostor_key)
        # A stranger: a key the SuperLink never saw. It must not get in.
        stranger = fed.start_node(4, key=write_node_key(fed.credentials, "stranger"))
        log = tmp_path / "federation" / "supernode-3.log"
        deadline = time.monotonic() + 60
        while "SuperNode ID" not in log.read_text(errors="replace"):
            assert time.monotonic() < deadline, "the impostor never connected"
            time.sleep(0.5)

        backend = json.dumps({"name": "flower", "params": fed.backend_params()})
        assert "insecure" not in backend and "root_certificates" in backend
        args = ["run", str(SMOKE), *sum((["--set", o] for o in THREE_CLIENTS), []), "--set", f"backend={backend}"]
        result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "run")])
        assert result.exit_code == 0, result.output
        summary = json.loads((tmp_path / "run" / "summary.json").read_text())
        assert summary["rounds_completed"] == 1 and summary["client_failures"] == 0
        nodes = json.loads((tmp_path / "run" / NODES_FILE).read_text())
        assert nodes["client_to_node"] == {str(k): v for k, v in fed.node_ids.items()}
        assert list(nodes["refused"]) == [str(impostor_id)]

        deadline = time.monotonic() + 90
        while stranger.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        stranger_log = (tmp_path / "federation" / "supernode-4.log").read_text(errors="replace")
        assert "SuperNode ID" not in stranger_log, stranger_log[-2000:]
        assert stranger.returncode not in (None, 0), stranger_log[-2000:]
    finally:
        fed.stop()
