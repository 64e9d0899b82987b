"""`fedmmkt report` and `fedmmkt compare` on real runs."""

from pathlib import Path

from fedmmkt_cli.main import app
from typer.testing import CliRunner

from fedmmkt_core.recipe import load_recipe
from fedmmkt_core.server.runner import Runner

SMOKE = Path(__file__).resolve().parents[1] / "examples" / "smoke.yaml"
runner = CliRunner()


def test_report_and_compare(tmp_path):
    Runner(load_recipe(SMOKE, ["federation.rounds=2"]), tmp_path / "fedmmkt").run()
    Runner(load_recipe(SMOKE, ["federation.rounds=2", "algorithm={name: local}"]), tmp_path / "local").run()
    result = runner.invoke(app, ["report", str(tmp_path / "fedmmkt")])
    assert result.exit_code == 0, result.output
    assert "client_accuracy_mean" in result.output
    png = tmp_path / "fedmmkt" / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plot = tmp_path / "cmp.png"
    result = runner.invoke(app, ["compare", str(tmp_path / "fedmmkt"), str(tmp_path / "local"), "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    assert "fedmmkt" in result.output and "local" in result.output
    assert plot.stat().st_size > 1000


def test_report_on_a_folder_that_is_not_a_run(tmp_path):
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2
    assert "not a fedmmkt run directory" in result.output
