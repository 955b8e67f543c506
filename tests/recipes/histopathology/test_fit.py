"""One run from resolved inputs to its report, handing objects on (nothing read back)."""

from recipe_helpers import TINY

from smse_metric.recipes.histopathology import load_config, results
from smse_metric.recipes.histopathology.fit import fit_run
from smse_metric.recipes.histopathology.inputs import resolve
from smse_metric.recipes.histopathology.rundir import RunDir


def test_a_run_reports_from_what_it_computed_not_from_its_files(tmp_path, root, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a file just written was read back")

    monkeypatch.setattr(results.RunMetrics, "load", refuse)
    run = RunDir(tmp_path / "run")
    cfg = load_config("smse-triplet", {**TINY, "optim": {"epochs": 1}})
    metrics = fit_run(resolve(cfg, run, root), run, fold=1, quiet=True)
    assert metrics is not None and metrics.best_epoch == 0
    assert run.report.is_file() and run.plot("projection").is_file()
    assert run.metrics.is_file() and run.gallery_embeddings.is_file()
    assert f"{metrics.test.knn.pooled.accuracy:.3f}"[:4] in run.report.read_text()
