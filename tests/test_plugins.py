"""The plugin manager: built-ins and entry points through the same hooks, clear errors."""

import json
import os
import subprocess
import sys
import time

import pytest

from fedmmkt_core.errors import PluginError
from fedmmkt_core.hookspecs import hookimpl
from fedmmkt_core.interfaces import Aggregator
from fedmmkt_core.plugins import PluginManager

BUILTINS = {
    ("client_model", "cnn"),
    ("aggregator", "kd"),
    ("dataset", "digits"),
    ("partitioner", "iid"),
    ("partitioner", "dirichlet"),
    ("partitioner", "shards"),
    ("algorithm", "local"),
    ("algorithm", "fedavg"),
    ("backend", "inprocess"),
    ("logger", "console"),
    ("logger", "csv"),
}


class ShadowKD(Aggregator):
    def aggregate(self, round_index, replies):
        raise NotImplementedError


def test_plugins_json_lists_builtins_and_example_without_importing_torch():
    code = (
        "import sys, io, contextlib\n"
        "from fedmmkt_cli.main import app\n"
        "buf = io.StringIO()\n"
        "with contextlib.redirect_stdout(buf):\n"
        "    try:\n"
        "        app(['plugins', '--json'])\n"
        "    except SystemExit as e:\n"
        "        assert e.code in (0, None), e.code\n"
        "print(buf.getvalue())\n"
        "print('TORCH_IMPORTED' if 'torch' in sys.modules else 'NO_TORCH')\n"
    )
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - start
    body, marker = result.stdout.rsplit("\n", 2)[0], result.stdout.strip().splitlines()[-1]
    assert marker == "NO_TORCH"
    rows = json.loads(body)
    found = {(r["kind"], r["name"]) for r in rows}
    assert BUILTINS <= found
    assert ("client_model", "softmax-regression") in found
    example = next(r for r in rows if r["name"] == "majority-vote")
    assert example["package"] == "fedmmkt-example-plugin" and example["version"] == "0.1.0"
    assert all(r["package"] == "fedmmkt" for r in rows if (r["kind"], r["name"]) in BUILTINS)
    print(f"plugins --json in a fresh interpreter: {seconds:.2f} s")


def test_autoload_can_be_turned_off():
    env = {**os.environ, "FEDMMKT_DISABLE_PLUGIN_AUTOLOAD": "1"}
    code = "from fedmmkt_core.plugins import get_registry; print(get_registry().names('aggregator'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert "majority-vote" not in out and "kd" in out
    env["FEDMMKT_PLUGINS"] = "fedmmkt_example_plugin"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert "majority-vote" in out


def test_duplicate_name_names_both_packages():
    class Shadow:
        @hookimpl
        def register_aggregators(self, register):
            register("kd", ShadowKD)

    manager = PluginManager(load_entry_points=False)
    with pytest.raises(PluginError) as info:
        manager.add_plugin(Shadow(), package="shadow-pkg")
    message = str(info.value)
    assert "aggregator 'kd' is registered twice" in message
    assert "'fedmmkt'" in message and "'shadow-pkg'" in message


def test_misspelt_hook_fails_loudly():
    class Typo:
        @hookimpl
        def register_agregators(self, register):
            register("x", ShadowKD)

    manager = PluginManager(load_entry_points=False)
    with pytest.raises(PluginError) as info:
        manager.add_plugin(Typo(), package="typo-pkg")
    assert "register_agregators" in str(info.value)


def test_registering_a_non_component_is_an_error():
    class Wrong:
        @hookimpl
        def register_aggregators(self, register):
            register("not-a-class", dict)

    with pytest.raises(PluginError, match="not a subclass"):
        PluginManager(load_entry_points=False).add_plugin(Wrong(), package="wrong-pkg")


def test_unknown_name_suggests_closest():
    registry = PluginManager(load_entry_points=False).registry
    with pytest.raises(PluginError) as info:
        registry.get("partitioner", "dirichelt")
    assert "did you mean 'dirichlet'" in str(info.value)
    assert "available: dirichlet, iid, shards" in str(info.value)


def test_core_and_plugins_import_without_heavy_libraries():
    code = (
        "import sys, fedmmkt_core.recipe, fedmmkt_core.server.runner, fedmmkt_core.testing\n"
        "import fedmmkt_plugins, fedmmkt_cli.main\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'peft', 'flwr') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_missing_dependency_has_install_hint():
    from fedmmkt_core.errors import MissingDependencyError
    from fedmmkt_core.lazy import lazy_import

    module = lazy_import("no_such_module_fedmmkt", "Install it with: pip install nothing")
    with pytest.raises(MissingDependencyError, match="pip install nothing"):
        _ = module.anything
