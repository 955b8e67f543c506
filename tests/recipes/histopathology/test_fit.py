"""One run from resolved inputs to its report, handing objects on (nothing read back)."""

import json

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


def test_a_frozen_backbone_run_trains_the_heads_only(tmp_path, root):
    """model.freeze_backbone: the selected weights hold the backbone the run started
    from (the seeded build), batch-norm statistics included, and other heads."""
    import torch

    from smse_metric.recipes.histopathology.checkpoint import load_checkpoint

    run = RunDir(tmp_path / "run")
    model = {**TINY["model"], "freeze_backbone": True}
    cfg = load_config("smse-triplet", {**TINY, "model": model, "optim": {"epochs": 1}})
    inputs = resolve(cfg, run, root)
    start = {k: v.clone() for k, v in inputs.new_model().state_dict().items()}
    assert fit_run(inputs, run, fold=1, quiet=True) is not None
    best = load_checkpoint(run.best)["model"]
    backbone = [k for k in start if k.startswith("backbone.")]
    assert backbone and all(torch.equal(best[k], start[k]) for k in backbone)
    assert not torch.equal(best["embed.weight"], start["embed.weight"])


def test_a_frozen_backbone_runs_once_per_image_and_view_across_epochs_and_runs(
    tmp_path, root, monkeypatch
):
    """With model.freeze_backbone the features come from one cache of the data: the
    backbone sees each image once per view over two epochs; a second run of the same
    backbone on the same images runs it not at all, nor does another fold."""
    from smse_metric.recipes.histopathology.models import EmbeddingNet

    seen = []
    real = EmbeddingNet.features

    def counting(self, x):
        seen.append(len(x))
        return real(self, x)

    monkeypatch.setattr(EmbeddingNet, "features", counting)
    data = {**TINY["data"], "cache_dir": str(tmp_path / "cache"), "feature_views": 3}
    model = {**TINY["model"], "freeze_backbone": True}
    cfg = load_config("smse-triplet", {**TINY, "data": data, "model": model})
    run = RunDir(tmp_path / "run")
    inputs = resolve(cfg, run, root)
    metrics = fit_run(inputs, run, fold=1, quiet=True)
    s = inputs.splits(1)
    assert sum(seen) == 3 * len(s.index) == 3 * int((s.train | s.val | s.test).sum())
    sizes = {k: int(getattr(s, k).sum()) for k in ("train", "val", "test")}
    assert metrics.splits == sizes and run.report.is_file()
    seen.clear()
    again = RunDir(tmp_path / "again")
    assert fit_run(resolve(cfg, again, root), again, fold=1, quiet=True) is not None
    other = RunDir(tmp_path / "fold2")
    assert fit_run(resolve(cfg, other, root), other, fold=2, quiet=True) is not None
    assert seen == []
    from smse_metric.recipes.histopathology.evaluate import evaluate_run

    # the evaluate command reads the same features: the same test scores, no forward
    assert evaluate_run(run.path).test == metrics.test and seen == []


def test_the_frozen_preset_trains_from_the_cli_on_a_small_vit(tmp_path):
    """smse-frozen with its backbone swapped for a random ViT (no download): the run's
    config.toml keeps the backbone arguments and the pooling, and evaluate reads them."""
    from smse_metric.recipes.histopathology import config_to_toml
    from smse_metric.recipes.histopathology.cli import main
    from smse_metric.recipes.histopathology.evaluate import evaluate_run

    kwargs = {"img_size": 32, "patch_size": 8, "init_values": 1e-5, "reg_tokens": 2}
    model = {
        "backbone": "vit_tiny_patch16_224",
        "pretrained": False,
        "backbone_kwargs": kwargs,
        "pool": "cls_mean",
        "embedding_dim": 16,
    }
    data = {**TINY["data"], "cache_dir": str(tmp_path / "cache"), "feature_views": 2}
    cfg = load_config("smse-frozen", {**TINY, "data": data, "model": model})
    assert cfg.model.freeze_backbone
    config = tmp_path / "frozen.toml"
    config.write_text(config_to_toml(cfg))
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--synthetic", "--out", str(out)]) == 0
    saved = load_config(out / "config.toml")
    assert saved.model.backbone_kwargs == kwargs and saved.model.pool == "cls_mean"
    metrics = RunDir(out).metrics.read_text()
    assert evaluate_run(out).to_dict()["test"] == json.loads(metrics)["test"]
