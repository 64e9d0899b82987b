"""Measure how large a fedmmkt message can travel through a local Flower 1.41 deployment, each way.

Starts a SuperLink and one SuperNode on 127.0.0.1, submits a probe app (its ServerApp sends a
``uint8`` payload of each size to the node, the ClientApp decodes it with the toolkit's bounded
decoder and answers with a payload of the same size), and writes what went through, with times and
Flower-level bytes, to ``benchmarks/results/flower-limits.json``::

    python -m benchmarks.flower_limits --sizes-mb 1 16 64 256
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

PROBE_APP = """
import json, time
import numpy as np
from flwr.app import Message as FlowerMessage
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp
from fedmmkt_core.wire import Message
from fedmmkt_plugins.backends.flower import flower_nbytes, from_records, to_records

server_app = ServerApp()
client_app = ClientApp()


@client_app.query()
def echo(message, context):
    try:
        request = from_records(message.content)
        size = int(request.arrays["payload"].nbytes)
        payload = np.random.default_rng(1).integers(0, 256, size, dtype=np.uint8)
        reply = Message("echo", {"received": size}, {"payload": payload})
    except Exception as exc:
        reply = Message("error", {"reason": f"{type(exc).__name__}: {exc}"})
    return FlowerMessage(to_records(reply), reply_to=message)


@server_app.main()
def main(grid, context):
    config = context.run_config
    deadline = time.monotonic() + 60
    while not list(grid.get_node_ids()) and time.monotonic() < deadline:
        time.sleep(0.5)
    node = list(grid.get_node_ids())[0]
    results = []
    for mb in json.loads(config["sizes-mb"]):
        size = int(mb * 1024 * 1024)
        payload = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8)  # random: Flower dedupes equal chunks
        message = Message("probe", {}, {"payload": payload})
        outgoing = FlowerMessage(to_records(message), node, "query")
        row = {"mb": mb, "toolkit_bytes_down": message.nbytes, "flower_bytes_down": flower_nbytes(outgoing)}
        start = time.perf_counter()
        try:
            replies = list(grid.send_and_receive([outgoing], timeout=float(config["timeout"])))
            if not replies:
                row["result"] = "no reply (refused or timed out)"
            elif replies[0].has_error():
                row["result"] = f"Flower error {replies[0].error.code}: {replies[0].error.reason}"
            else:
                reply = from_records(replies[0].content)
                row["result"] = "ok" if reply.type == "echo" else reply.config.get("reason")
                row["toolkit_bytes_up"] = reply.nbytes
                row["flower_bytes_up"] = flower_nbytes(replies[0])
        except Exception as exc:
            row["result"] = f"{type(exc).__name__}: {exc}"
        row["seconds_round_trip"] = round(time.perf_counter() - start, 2)
        results.append(row)
        print(json.dumps(row), flush=True)
    with open(config["out"], "w") as handle:
        json.dump(results, handle, indent=2)
"""


def main() -> None:
    from fedmmkt_plugins.backends.flower import LocalFederation
    from fedmmkt_plugins.backends.flower.packaging import app_pyproject, stream
    from fedmmkt_plugins.backends.flower.processes import child_env, flwr_exe

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/flower-limits.json"))
    args = parser.parse_args()
    out = args.out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fedmmkt-limits-") as tmp:
        federation = LocalFederation(1, Path(tmp) / "federation")
        try:
            federation.start()
            app = Path(tmp) / "app"
            app.mkdir()
            (app / "probe_app.py").write_text(PROBE_APP, encoding="utf-8")
            config = {"sizes-mb": json.dumps(args.sizes_mb), "timeout": args.timeout, "out": str(out)}
            text = app_pyproject(config).replace("fedmmkt_plugins.backends.flower.app:", "probe_app:")
            (app / "pyproject.toml").write_text(text, encoding="utf-8")
            home = Path(tmp) / "home"
            home.mkdir()
            (home / "config.toml").write_text(
                f'[superlink]\ndefault = "local"\n\n[superlink.local]\n'
                f'address = "{federation.address}"\ninsecure = true\n',
                encoding="utf-8",
            )
            stream([flwr_exe(), "run", str(app), "local", "--stream"], child_env(home))
        finally:
            federation.stop()
    print(out.read_text() if out.exists() else "no result written")


if __name__ == "__main__":
    main()
