"""The house rules a newcomer relies on: small files, every package shipped, old import paths kept."""

from __future__ import annotations

import importlib
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
INSTALLED_AS = {"fedmmkt_core": "fedmmkt_core", "plugins": "fedmmkt_plugins", "cli": "fedmmkt_cli"}
MAX_LINES = 500


def test_no_source_file_is_over_500_lines():
    long = {
        str(path.relative_to(ROOT)): count
        for folder in ("fedmmkt_core", "plugins")
        for path in (ROOT / folder).rglob("*.py")
        if (count := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert long == {}


def test_every_package_folder_is_in_the_wheel():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    listed = set(config["tool"]["setuptools"]["packages"])
    found = {
        ".".join([INSTALLED_AS[init.relative_to(ROOT).parts[0]], *init.relative_to(ROOT).parts[1:-1]])
        for folder in INSTALLED_AS
        for init in (ROOT / folder).rglob("__init__.py")
    }
    assert found - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
    assert listed - found == set()


@pytest.mark.parametrize(
    "old, new, name",
    [
        ("fedmmkt_core.runner", "fedmmkt_core.server.runner", "Runner"),
        ("fedmmkt_core.context", "fedmmkt_core.server.context", "ServerContext"),
        ("fedmmkt_core.clientdata", "fedmmkt_core.client.folder", "read_client_folder"),
        ("fedmmkt_plugins.algorithm_fedmmkt", "fedmmkt_plugins.algorithms.fedmmkt", "FedMMKT"),
        ("fedmmkt_plugins.torch_classifier", "fedmmkt_plugins.clients.torch_classifier", "hf_classifier_module"),
        ("fedmmkt_plugins.generator_sd_lora", "fedmmkt_plugins.generators.sd_lora", "SDLoraGenerator"),
        ("fedmmkt_plugins.flower.codec", "fedmmkt_plugins.backends.flower.codec", "to_records"),
    ],
)
def test_an_old_import_path_gives_the_same_module_with_a_deprecation_warning(old, new, name):
    # a fresh interpreter, so the old name is imported for the first time
    code = (
        "import warnings, importlib\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        f"    old = importlib.import_module({old!r})\n"
        f"new = importlib.import_module({new!r})\n"
        f"assert old is new and getattr(old, {name!r}) is getattr(new, {name!r})\n"
        f"assert any(issubclass(w.category, DeprecationWarning) and {new!r} in str(w.message) for w in caught)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_new_paths_import_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in ("fedmmkt_core.server.runner", "fedmmkt_core.client", "fedmmkt_plugins.algorithms.fedmmkt"):
            importlib.import_module(name)
