"""Re-evaluating a finished run."""

import json

from smse_metric.recipes.histopathology.cli import main


def test_evaluate_reproduces_the_metrics(run, capsys):
    before = json.loads((run / "metrics.json").read_text())
    assert main(["evaluate", "--run", str(run)]) == 0
    assert json.loads((run / "metrics.json").read_text()) == before
    assert "| kNN | patient |" in capsys.readouterr().out
