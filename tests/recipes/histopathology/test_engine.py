"""Checkpoints (weights-only loading, clear errors) and the CUDA-graphed step losses."""

from pathlib import Path

import pytest
import torch
from helpers import DEVICES

from smse_metric.recipes.histopathology.cli import main
from smse_metric.recipes.histopathology.engine import LossGraphs, step_loss, train_step


@pytest.mark.parametrize(
    "content, why",
    [
        (b"", "truncated or not a torch checkpoint"),
        (None, "truncated or not a torch checkpoint"),  # the first half of a real one
        ("pickle", "objects other than tensors"),
    ],
)
def test_corrupt_or_hostile_checkpoints_give_one_clear_line(run, tmp_path, content, why, capsys):
    import pickle
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    best = copy / "checkpoints" / "best.pt"
    if content is None:
        best.write_bytes(best.read_bytes()[: best.stat().st_size // 2])
    elif content == "pickle":
        best.write_bytes(pickle.dumps({"model": Path("x")}, protocol=2))  # an arbitrary object
    else:
        best.write_bytes(content)
    assert main(["evaluate", "--run", str(copy)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(best) in err and why in err
    assert "weights_only=False" not in err


def _head_inputs(n: int, seed: int, device: str):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(n, 16, generator=g).to(device).requires_grad_()
    logits = torch.randn(n, 2, generator=g).to(device).requires_grad_()
    labels = (torch.arange(n) % 2).to(device)
    scales = (torch.arange(n) // 2 % 4).to(device)
    return emb, logits, labels, scales


def _head_losses(device: str = "cpu"):
    from smse_metric import ReinforcedFocalLoss, TripletMarginLoss

    rfl = ReinforcedFocalLoss.from_class_counts([700, 1300]).to(device)
    return rfl, TripletMarginLoss(1.0, squared=True, cross_scale=True), 0.5, 2.0


@pytest.mark.parametrize("device", DEVICES)
def test_loss_graphs_replay_the_eager_losses_on_new_batches(device):
    """Values and gradients of the replayed losses equal the eager ones on batches that
    differ from the captured one, one capture per batch shape (CPU: eager)."""
    graphs = LossGraphs(*_head_losses(device))
    for n, seed in ((32, 0), (32, 1), (32, 2), (48, 3), (32, 4)):
        args = _head_inputs(n, seed, device)
        got = graphs(*args)
        got_grads = torch.autograd.grad(got, args[:2])
        want = step_loss(*args, *_head_losses(device))
        want_grads = torch.autograd.grad(want, args[:2])
        torch.testing.assert_close(got, want)
        for a, b in zip(got_grads, want_grads, strict=True):
            torch.testing.assert_close(a, b)
    assert len(graphs._graphed) == (2 if device == "cuda" else 0)
    if device == "cuda":  # a loss left on the host would copy inside the capture
        with pytest.raises(ValueError, match="cls_loss must be on cuda"):
            LossGraphs(*_head_losses("cpu"))(*_head_inputs(32, 0, device))


def test_loss_graphs_refuse_what_they_cannot_capture():
    rfl, triplet, _, _ = _head_losses()
    with pytest.raises(ValueError, match="metric_loss has trainable parameters"):
        LossGraphs(rfl, torch.nn.Linear(2, 2))
    net = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(net.parameters(), 0.1)

    def model(x):
        return x, net(x)

    x, y = torch.randn(4, 4), torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError, match="metric_loss must be None"):
        train_step(model, x, y, y, opt, LossGraphs(rfl, None), triplet)


def test_shuffled_batches_shard_each_global_batch_across_ranks():
    """Ranks take disjoint slices of each global batch, together every index of the
    full batches once; the same (seed, epoch) gives the same batches, another epoch not."""
    from smse_metric.recipes.histopathology.engine import ShuffledBatchSampler

    ranks = [ShuffledBatchSampler(50, 4, seed=3, rank=r, world_size=3) for r in range(3)]
    assert all(len(s) == 4 for s in ranks)  # 50 // 12: the last 2 images are dropped
    batches = [list(s) for s in ranks]
    for step in range(4):
        global_batch = [i for r in range(3) for i in batches[r][step]]
        assert len(set(global_batch)) == 12
    seen = sorted(i for b in batches for batch in b for i in batch)
    assert len(seen) == 48 == len(set(seen)) and set(seen) <= set(range(50))
    assert list(ShuffledBatchSampler(50, 4, seed=3, rank=1, world_size=3)) == batches[1]
    ranks[1].set_epoch(1)
    assert list(ranks[1]) != batches[1]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"rank": 2, "world_size": 2}, r"rank must be an integer in \[0, 2\)"),
        ({"rank": -1, "world_size": 2}, "rank must be"),
        ({"world_size": 0, "rank": 0}, "world_size must be a positive integer"),
    ],
)
def test_shuffled_batches_refuse_bad_arguments(kwargs, match):
    from smse_metric.recipes.histopathology.engine import ShuffledBatchSampler

    with pytest.raises(ValueError, match=match):
        ShuffledBatchSampler(50, **{"batch_size": 4, **kwargs})
