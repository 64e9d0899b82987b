"""`fedmmkt report` and `fedmmkt compare` on real runs."""

import json
import re
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
    assert "loss_weighted-denoising" in result.output  # the generator's own metric, below the table
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


def test_report_shows_a_plugins_own_metrics(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.resolved.yaml").write_text("fedmmkt: 1\n")
    rows = [
        {"round": 1, "client_accuracy_mean": 0.5, "my_plugin_score": 0.125, "notes": "text", "client_accuracy": {}},
        {"round": 2, "client_accuracy_mean": 0.75, "my_plugin_score": 0.375, "only_now": 7},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = runner.invoke(app, ["report", str(run), "--no-plot"], terminal_width=200)
    assert result.exit_code == 0, result.output
    last = result.output.split("other metrics")[1]  # below the fixed columns: the last round's own metrics
    assert re.search(r"my_plugin_score\s.*0\.375", last) and re.search(r"only_now\s.*7", last)
    assert "0.125" not in result.output and "notes" not in result.output  # the last round only; numbers only
    result = runner.invoke(app, ["report", str(run), "--no-plot", "--all"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "other metrics" not in result.output
    assert "my_plugin_score" in result.output and "0.125" in result.output and "0.375" in result.output
