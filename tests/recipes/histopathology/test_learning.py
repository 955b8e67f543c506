"""Training learns: on an easy synthetic task (adenosis against mucinous carcinoma, many
patients) each method reaches a patient-level balanced accuracy that a constant or a
shuffled-label predictor cannot reach. One test body, parametrised by device."""

import numpy as np
import pytest
import torch
from helpers import DEVICES

from smse_metric import KNNClassifier
from smse_metric.recipes.histopathology import load_config
from smse_metric.recipes.histopathology.build import build_model
from smse_metric.recipes.histopathology.checkpoint import load_checkpoint
from smse_metric.recipes.histopathology.data import make_synthetic_breakhis
from smse_metric.recipes.histopathology.evaluate import embed
from smse_metric.recipes.histopathology.loaders import eval_loader, make_datasets
from smse_metric.recipes.histopathology.splits import load_splits
from smse_metric.recipes.histopathology.training import train

#: chance is 0.5 (balanced over two classes); a constant predictor scores exactly 0.5
THRESHOLD = 0.75


EASY = {
    "data": {"image_size": [32, 32], "num_workers": 0},
    "model": {"backbone": "smse-cnn", "embedding_dim": 16},
    "optim": {"epochs": 8, "patience": 0},
    "run": {"seed": 0},
}


def patient_balanced_accuracy(pred, labels, groups) -> float:
    """Mean over classes of the mean patient score (a patient's share of correctly
    classified images) of that class's patients."""
    pred, labels, groups = map(np.asarray, (pred, labels, groups))
    per_class = {}
    for g in np.unique(groups):
        rows = groups == g
        score = float(np.mean(pred[rows] == labels[rows]))
        per_class.setdefault(int(labels[rows][0]), []).append(score)
    return float(np.mean([np.mean(v) for v in per_class.values()]))


@pytest.fixture(scope="module")
def easy(tmp_path_factory):
    root = tmp_path_factory.mktemp("easy") / "data"
    return make_synthetic_breakhis(
        root, {"A": 14, "MC": 14}, images_per_magnification=3, image_size=(48, 32), seed=1
    )


def test_the_controls_fail_the_threshold(easy):
    cfg = load_config("smse-triplet", {**EASY, "data": {**EASY["data"], "path": str(easy)}})
    test = make_datasets(cfg, load_splits(cfg, easy)).test
    labels, groups = test.labels, test.groups
    assert len(np.unique(groups)) >= 8 and set(labels.tolist()) == {0, 1}
    for c in (0, 1):  # a constant model scores exactly chance
        assert patient_balanced_accuracy(np.full_like(labels, c), labels, groups) == 0.5
    rng = np.random.default_rng(0)  # a model of shuffled labels
    shuffled = [
        patient_balanced_accuracy(rng.permutation(labels), labels, groups) for _ in range(200)
    ]
    assert np.quantile(shuffled, 0.99) < THRESHOLD
    assert patient_balanced_accuracy(labels, labels, groups) == 1.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["smse-triplet", "baseline-ce"])
def test_each_method_learns_the_easy_task(easy, tmp_path, method, device):
    overrides = {
        **EASY,
        "data": {**EASY["data"], "path": str(easy)},
        "run": {**EASY["run"], "device": device},
    }
    cfg = load_config(method, overrides)
    out = tmp_path / "run"
    metrics = train(cfg, out, easy, quiet=True)
    from smse_metric.recipes.histopathology.build import resolve_inputs

    cfg = resolve_inputs(cfg)
    ds = make_datasets(cfg, load_splits(cfg, easy))
    model = build_model(cfg)
    model.load_state_dict(load_checkpoint(out / "checkpoints" / "best.pt")["model"])
    dev = torch.device(device)
    model.to(dev)
    g_emb, _ = embed(model, eval_loader(ds.gallery), dev)
    q_emb, head = embed(model, eval_loader(ds.test), dev)
    if cfg.eval.select == "knn":
        knn = KNNClassifier(k=cfg.eval.k, distance=cfg.eval.distance).fit(g_emb, ds.gallery.labels)
        pred = knn.predict(q_emb)
    else:
        pred = head.numpy()
    test = ds.test
    score = patient_balanced_accuracy(pred, test.labels, test.groups)
    assert score >= THRESHOLD, (method, device, score, metrics.best_epoch)
