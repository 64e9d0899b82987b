"""`fedmmkt validate` rejects each kind of bad recipe with exit 2 and the offending key path."""

import textwrap
from pathlib import Path

import pytest
from fedmmkt_cli.main import app
from typer.testing import CliRunner

from fedmmkt_core.errors import RecipeError
from fedmmkt_core.recipe import load_recipe

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

VALID = """\
fedmmkt: 1
name: t
seed: 0
data:
  dataset: {name: digits}
  partitioner: {name: dirichlet, params: {alpha: 0.5}}
clients:
  - name: cnn
    count: 2
    params: {epochs: 1}
federation:
  rounds: 2
algorithm: {name: local}
"""

runner = CliRunner()


def validate(tmp_path: Path, text: str, *args: str):
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(text))
    return runner.invoke(app, ["validate", str(path), *args])


def test_valid_recipe_passes(tmp_path):
    result = validate(tmp_path, VALID)
    assert result.exit_code == 0, result.output
    assert "is valid" in " ".join(result.output.split())  # the console wraps long paths


def test_shipped_examples_validate():
    result = runner.invoke(app, ["validate", str(EXAMPLES / "smoke.yaml")])
    assert result.exit_code == 0, result.output


def test_invalid_yaml_names_the_line(tmp_path):
    result = validate(tmp_path, VALID.replace("  rounds: 2", "  rounds: [2"))
    assert result.exit_code == 2
    assert "invalid YAML" in result.output
    assert "recipe.yaml:" in result.output
    assert "Traceback" not in result.output


def test_unknown_top_level_key(tmp_path):
    result = validate(tmp_path, VALID + "roundz: 3\n")
    assert result.exit_code == 2
    assert "roundz: unknown key" in result.output
    assert "recipe.yaml:14" in result.output


def test_misspelt_component_parameter_suggests(tmp_path):
    result = validate(tmp_path, VALID.replace("{epochs: 1}", "{epocs: 1}"))
    assert result.exit_code == 2
    assert "clients.0.params.epocs: unknown key — did you mean 'epochs'?" in result.output
    assert "recipe.yaml:10" in result.output


def test_unknown_plugin_lists_choices(tmp_path):
    result = validate(tmp_path, VALID.replace("{name: dirichlet,", "{name: dirichlett,"))
    assert result.exit_code == 2
    assert "data.partitioner.name: unknown partitioner 'dirichlett' — did you mean 'dirichlet'?" in result.output
    assert "available: dirichlet, iid, shards" in result.output


def test_wrong_type(tmp_path):
    result = validate(tmp_path, VALID.replace("rounds: 2", "rounds: many"))
    assert result.exit_code == 2
    assert "federation.rounds:" in result.output
    assert "integer" in result.output


def test_missing_required_field(tmp_path):
    result = validate(tmp_path, VALID.replace("algorithm: {name: local}\n", ""))
    assert result.exit_code == 2
    assert "algorithm: required field is missing" in result.output


def test_missing_version_field(tmp_path):
    result = validate(tmp_path, VALID.replace("fedmmkt: 1\n", ""))
    assert result.exit_code == 2
    assert "fedmmkt: required field is missing" in result.output


def test_unknown_set_key(tmp_path):
    result = validate(tmp_path, VALID, "--set", "federation.roundz=3")
    assert result.exit_code == 2
    assert "federation.roundz: unknown key — did you mean 'rounds'?" in result.output
    assert "(from --set federation.roundz=3)" in result.output


def test_set_override_applies_with_yaml_types(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(VALID)
    recipe = load_recipe(path, ["federation.rounds=5", "clients.0.params.lr=0.01"])
    assert recipe.federation.rounds == 5
    assert recipe.clients[0].config.lr == pytest.approx(0.01)


def test_path_that_does_not_exist(tmp_path):
    from fedmmkt_core.hookspecs import hookimpl
    from fedmmkt_core.interfaces import ComponentConfig, Logger
    from fedmmkt_core.paths import InputPath
    from fedmmkt_core.plugins import PluginManager
    from fedmmkt_core.recipe import parse_recipe

    class NeedsFile(Logger):
        class Config(ComponentConfig):
            template: InputPath

        def log_round(self, round_index, metrics):
            pass

    class Plugin:
        @hookimpl
        def register_loggers(self, register):
            register("needs-file", NeedsFile)

    registry = PluginManager(load_entry_points=False).add_plugin(Plugin(), package="test-plugin")
    text = VALID + "loggers:\n  - {name: needs-file, params: {template: missing.txt}}\n"
    with pytest.raises(RecipeError) as info:
        parse_recipe(text, base_dir=tmp_path, registry=registry, source="r.yaml")
    message = str(info.value)
    assert "loggers.0.params.template: path does not exist" in message
    assert str(tmp_path / "missing.txt") in message
    (tmp_path / "there.txt").write_text("x")
    ok = parse_recipe(text.replace("missing.txt", "there.txt"), base_dir=tmp_path, registry=registry)
    assert ok.loggers[0].config.template == tmp_path / "there.txt"  # relative to the recipe's folder


def test_all_errors_are_collected(tmp_path):
    bad = VALID.replace("{epochs: 1}", "{epocs: 1}").replace("name: local", "name: locale") + "extra: 1\n"
    with pytest.raises(RecipeError) as info:
        path = tmp_path / "r.yaml"
        path.write_text(bad)
        load_recipe(path)
    paths = {issue.path for issue in info.value.issues}
    assert {"clients.0.params.epocs", "algorithm.name", "extra"} <= paths


def test_fedavg_rejects_mixed_architectures(tmp_path):
    mixed = VALID.replace("name: local", "name: fedavg").replace(
        "    params: {epochs: 1}\n", "    params: {epochs: 1}\n  - name: cnn\n    params: {hidden: 16}\n"
    )
    result = validate(tmp_path, mixed)
    assert result.exit_code == 2
    assert "same client model" in result.output


def test_missing_recipe_file(tmp_path):
    result = runner.invoke(app, ["validate", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2
    assert "recipe file not found" in result.output


def test_schema_lists_plugin_params():
    import json

    result = runner.invoke(app, ["schema"])
    assert result.exit_code == 0, result.output
    text = json.dumps(json.loads(result.output))
    assert "alpha" in text and "dirichlet" in text and "resident_clients" in text
