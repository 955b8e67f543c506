"""evaluate_embeddings / evaluate_predictions: reports against brute force, devices,
galleries, bad input."""

import numpy as np
import pytest
import torch
from helpers import DEVICES, assert_close_reports, knn_data
from reference import brute_neighbours, brute_predict

from smse_metric import (
    KNNClassifier,
    TorchIndex,
    evaluate_embeddings,
    make_index,
)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("own_gallery", [True, False])
def test_torch_inputs_on_any_device_equal_numpy(device, own_gallery, monkeypatch):
    """Tensors are checked and searched on their device: every index is built from,
    and every search asked with, a tensor there (a GPU's rows never visit the host on
    the way), and the report is numpy's, per scale and across scales included."""
    emb, y, g, s = knn_data(n=80, seed=4)
    seen = []
    real_fit, real_chunks = KNNClassifier.fit, KNNClassifier.kneighbors_chunks

    def fit(self, embeddings, *a, **kw):
        seen.append(embeddings)
        return real_fit(self, embeddings, *a, **kw)

    def chunks(self, queries, *a, **kw):
        seen.append(queries)
        return real_chunks(self, queries, *a, **kw)

    monkeypatch.setattr(KNNClassifier, "fit", fit)
    monkeypatch.setattr(KNNClassifier, "kneighbors_chunks", chunks)
    x = torch.from_numpy(emb).double().to(device)
    if own_gallery:
        args, kw = (emb, y, g, s), {}
        got = evaluate_embeddings(x, torch.from_numpy(y), g, s, backend="torch")
    else:
        q, rest = slice(0, 30), slice(30, None)
        args = (emb[q], y[q], g[q], s[q])
        kw = {"gallery": (emb[rest], y[rest], g[rest], s[rest]), "exclude": "group"}
        gallery = (x[rest], y[rest], g[rest], s[rest])
        got = evaluate_embeddings(x[q], y[q], g[q], s[q], gallery=gallery, backend="torch")
    assert len(seen) == 2 + 3 * (1 + 3)  # pooled: a fit, a search; per gallery scale: 1 + 3
    assert all(isinstance(e, torch.Tensor) and e.device.type == device for e in seen)
    monkeypatch.undo()
    assert_close_reports(got.to_dict(), evaluate_embeddings(*args, **kw).to_dict())


def test_per_scale_and_cross_magnification_matrix_equal_brute_force():
    emb, y, g, s = knn_data(n=90, seed=6)
    r = evaluate_embeddings(emb, y, g, s, k=3, distance="l2")
    for name, m in r.per_scale.items():
        sel = s == int(name)
        knn = KNNClassifier(k=3, distance="l2").fit(emb, y, groups=g)
        pred = knn.predict(emb[sel], g[sel], exclude="group")
        assert m.accuracy == pytest.approx((pred == y[sel]).mean())
    for a, qa in enumerate(r.scales):
        for b, gb in enumerate(r.scales):
            q, gal = s == qa, s == gb
            neigh = brute_neighbours(emb[q], emb[gal], "l2", 3, g[q], g[gal])
            pred = brute_predict(neigh, y[gal])
            assert r.cross_magnification[a][b] == pytest.approx((pred == y[q]).mean())
    off = [r.cross_magnification[a][b] for a in range(3) for b in range(3) if a != b]
    assert r.cross_magnification_mean == pytest.approx(np.mean(off))
    assert r.to_json()  # serialisable


def test_separate_gallery_excludes_the_query_patient():
    emb, y, g, s = knn_data(n=100, seed=7)
    q, gal = slice(0, 30), slice(30, None)
    r = evaluate_embeddings(
        emb[q], y[q], g[q], s[q], k=3, distance="l2", gallery=(emb[gal], y[gal], g[gal], s[gal])
    )
    neigh = brute_neighbours(emb[q], emb[gal], "l2", 3, g[q], g[gal])
    assert r.pooled.accuracy == pytest.approx((brute_predict(neigh, y[gal]) == y[q]).mean())
    # without gallery groups nothing is excluded
    r2 = evaluate_embeddings(
        emb[q],
        y[q],
        None,
        None,
        k=3,
        distance="l2",
        gallery={"embeddings": emb[gal], "labels": y[gal]},
    )
    neigh = brute_neighbours(emb[q], emb[gal], "l2", 3)
    assert r2.pooled.accuracy == pytest.approx((brute_predict(neigh, y[gal]) == y[q]).mean())


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda e, y, g: evaluate_embeddings(e, y[:-1], g), ValueError, "labels has"),
        (lambda e, y, g: evaluate_embeddings(e, y, g[:-1]), ValueError, "groups has"),
        (lambda e, y, g: evaluate_embeddings(e, y, g, k=500), ValueError, "k=500 is larger"),
        (lambda e, y, g: evaluate_embeddings(np.where(e > 2, np.nan, e), y, g), ValueError, "NaN"),
        (
            lambda e, y, g: evaluate_embeddings(e, y, g, gallery=(e[:0], y[:0], None, None)),
            ValueError,
            "gallery embeddings is empty",
        ),
        (lambda e, y, g: evaluate_embeddings(e, y, g, exclude="patient"), ValueError, "exclude"),
        (lambda e, y, g: evaluate_embeddings(e, y.astype(float), g), TypeError, "labels"),
        (
            lambda e, y, g: evaluate_embeddings(e, y, g, gallery=(e, y, g, None), exclude="self"),
            ValueError,
            "self",
        ),
        (lambda e, y, g: KNNClassifier(k=0), ValueError, "k must be"),
        (lambda e, y, g: KNNClassifier(distance="dot"), ValueError, "distance"),
        (
            lambda e, y, g: KNNClassifier().fit(e, y).predict(e, exclude="group"),
            ValueError,
            "groups",
        ),
        pytest.param(
            lambda e, y, g: KNNClassifier(device="cuda").fit(e, y),
            ValueError,
            "GPU",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has a GPU"),
        ),
        (lambda e, y, g: KNNClassifier(backend="annoy"), ValueError, "backend"),
        (lambda e, y, g: make_index(e, index="ivf", backend="torch"), ValueError, "ivf"),
        (lambda e, y, g: TorchIndex(e).search(e[:, :3], 2), ValueError, "dimension"),
    ],
)
def test_bad_input(call, exc, match):
    emb, y, g, _ = knn_data(n=40, seed=9)
    with pytest.raises(exc, match=match):
        call(emb, y, g)
