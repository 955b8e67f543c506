"""CUDA: same results as the CPU, no host synchronisation in the fused losses, autocast.

Skipped (with the reason) where no CUDA device exists; the GPU check script runs it.
"""

import pytest
import torch
from conftest import make_batch, metric_losses

from smse_metric import (
    FocalLoss,
    PairMiner,
    ReinforcedFocalLoss,
    TripletMarginLoss,
    TripletMiner,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

METRIC_LOSSES = metric_losses()


def _grad(loss, emb, labels, scales):
    emb = emb.clone().requires_grad_()
    out = loss(emb, labels, scales=scales)
    out.backward()
    return out.detach(), emb.grad


@pytest.mark.parametrize("loss", METRIC_LOSSES, ids=repr)
def test_cuda_equals_cpu(loss):
    emb, labels, scales = make_batch(300, 32, 5, n_scales=4, seed=1)
    v_cpu, g_cpu = _grad(loss, emb, labels, scales)
    v_gpu, g_gpu = _grad(loss.cuda(), emb.cuda(), labels.cuda(), scales.cuda())
    torch.testing.assert_close(v_gpu.cpu(), v_cpu)
    torch.testing.assert_close(g_gpu.cpu(), g_cpu)


@pytest.mark.parametrize("loss", METRIC_LOSSES, ids=repr)
def test_fused_losses_never_sync_with_the_host(loss):
    emb, labels, scales = make_batch(512, 64, 4, n_scales=4, dtype=torch.float32, seed=2)
    emb, labels, scales = emb.cuda().requires_grad_(), labels.cuda(), scales.cuda()
    loss(emb, labels, scales=scales).backward()  # warm-up: lazy init may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss(emb, labels, scales=scales).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_classification_losses_never_sync_with_the_host():
    logits = torch.randn(256, 2, device="cuda", requires_grad=True)
    target = torch.randint(0, 2, (256,), device="cuda")
    rfl = ReinforcedFocalLoss.from_class_counts([2480, 5429]).cuda()
    rfl(logits, target).backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        rfl(logits, target).backward()
        FocalLoss()(logits, target).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("loss", METRIC_LOSSES, ids=repr)
def test_autocast_accumulates_in_float32(loss, dtype):
    emb, labels, scales = make_batch(128, 32, 4, n_scales=2, dtype=torch.float32, seed=3)
    lin = torch.nn.Linear(32, 32).cuda()
    x, labels, scales = emb.cuda(), labels.cuda(), scales.cuda()
    with torch.autocast("cuda", dtype=dtype):
        z = lin(x)
        out = loss(z, labels, scales=scales)
    assert z.dtype == dtype and out.dtype == torch.float32
    out.backward()
    assert torch.isfinite(lin.weight.grad).all()
    torch.testing.assert_close(out, loss(z.detach().float(), labels, scales=scales))


@pytest.mark.parametrize("strategy", ["all", "semihard", "hard", "easy", "batch_hard"])
def test_cuda_miners_equal_cpu(strategy):
    emb, labels, scales = make_batch(200, 16, 4, n_scales=3, seed=4)
    miner = TripletMiner(strategy, margin=0.2, cross_scale=True, chunk_size=64)
    cpu = set(zip(*[t.tolist() for t in miner(emb, labels, scales)], strict=True))
    gpu_out = miner(emb.cuda(), labels.cuda(), scales.cuda())
    assert all(t.is_cuda for t in gpu_out)
    assert set(zip(*[t.tolist() for t in gpu_out], strict=True)) == cpu
    pm = PairMiner("hard", 0.3, 0.9)
    assert [t.tolist() for t in pm(emb.cuda(), labels.cuda())] == [
        t.tolist() for t in pm(emb, labels)
    ]


def test_inductor_compiles_the_fused_triplet_loss():
    emb, labels, _ = make_batch(256, 32, 4, dtype=torch.float32, seed=5)
    loss = TripletMarginLoss(0.2, triplets="semihard")
    emb, labels = emb.cuda(), labels.cuda()
    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True)
    torch.testing.assert_close(compiled(emb, labels), loss(emb, labels))


def test_recipe_trains_on_cuda_with_amp_and_channels_last(tmp_path):
    import json

    from smse_metric.recipes.histopathology import load_config
    from smse_metric.recipes.histopathology.data import make_synthetic_breakhis
    from smse_metric.recipes.histopathology.evaluate import evaluate_run
    from smse_metric.recipes.histopathology.training import train

    root = make_synthetic_breakhis(tmp_path / "data", images_per_magnification=2,
                                   image_size=(40, 28))  # fmt: skip
    cfg = load_config("smse-triplet", {
        "data": {"synthetic": True, "image_size": [32, 32], "num_workers": 0},
        "sampler": {"groups_per_class": 2}, "optim": {"epochs": 1},
        "run": {"device": "cuda", "amp": True},
    })  # fmt: skip
    metrics = train(cfg, tmp_path / "run", root, quiet=True)
    assert 0 <= metrics.test.knn.pooled.patient_accuracy <= 1
    history = json.loads((tmp_path / "run" / "history.jsonl").read_text().splitlines()[0])
    assert history["loss"] == history["loss"]  # finite under autocast (NaN != NaN)
    # a GPU run is re-evaluated on the CPU from its weights-only checkpoint
    again = evaluate_run(tmp_path / "run", device="cpu")
    assert again.splits == metrics.splits
    assert again.test.knn.pooled.n == metrics.test.knn.pooled.n
