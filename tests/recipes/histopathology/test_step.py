"""The step's loss (eager and replayed from CUDA graphs) and the optimiser step."""

import pytest
import torch
from helpers import DEVICES

from smse_metric.recipes.histopathology.step import (
    LossGraphs,
    StepLoss,
    make_step_loss,
    train_step,
)


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
    triplet = TripletMarginLoss(1.0, distance="squared_l2", cross_scale=True)
    return StepLoss(rfl, triplet, metric_weight=0.5, cls_weight=2.0)


@pytest.mark.parametrize("device", DEVICES)
def test_loss_graphs_replay_the_eager_losses_on_new_batches(device):
    """Values and gradients of the replayed losses equal the eager ones on batches that
    differ from the captured one, one capture per batch shape (CPU: eager)."""
    graphs = LossGraphs(_head_losses(device))
    for n, seed in ((32, 0), (32, 1), (32, 2), (48, 3), (32, 4)):
        args = _head_inputs(n, seed, device)
        got = graphs(*args)
        got_grads = torch.autograd.grad(got, args[:2])
        want = _head_losses(device)(*args)
        want_grads = torch.autograd.grad(want, args[:2])
        torch.testing.assert_close(got, want)
        for a, b in zip(got_grads, want_grads, strict=True):
            torch.testing.assert_close(a, b)
    assert len(graphs._graphed) == (2 if device == "cuda" else 0)
    if device == "cuda":  # a loss left on the host would copy inside the capture
        with pytest.raises(ValueError, match="cls_loss must be on cuda"):
            LossGraphs(_head_losses("cpu"))(*_head_inputs(32, 0, device))


def test_loss_graphs_refuse_what_they_cannot_capture():
    rfl = _head_losses().cls_loss
    with pytest.raises(ValueError, match="metric_loss has trainable parameters"):
        LossGraphs(StepLoss(rfl, torch.nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="cls_loss has trainable parameters"):
        LossGraphs(StepLoss(torch.nn.Linear(2, 2)))


def test_step_loss_is_the_weighted_sum_of_its_losses():
    """The step's loss, by hand: weights on the right terms, scales passed to a
    cross-scale loss only, no metric term for the baseline."""
    emb, logits, labels, scales = _head_inputs(16, 0, "cpu")
    loss = _head_losses()
    want = 2.0 * loss.cls_loss(logits, labels) + 0.5 * loss.metric_loss(emb, labels, scales=scales)
    torch.testing.assert_close(loss(emb, logits, labels, scales), want, rtol=0, atol=0)
    baseline = StepLoss(loss.cls_loss, None, metric_weight=0.5, cls_weight=2.0)
    torch.testing.assert_close(
        baseline(emb, logits, labels, scales), 2.0 * loss.cls_loss(logits, labels)
    )


def test_one_step_moves_the_weights_against_the_gradient():
    """train_step with SGD: new weights = old - lr * gradient of the step's loss."""
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 2)

    def model(x):
        return net(x), net(x)

    x, y = torch.randn(8, 4), torch.tensor([0, 1] * 4)
    loss_fn = _head_losses()
    before = net.weight.detach().clone()
    grad = torch.autograd.grad(loss_fn(*model(x), y, y % 4), net.weight)[0]
    train_step(model, x, y, y % 4, torch.optim.SGD(net.parameters(), lr=0.1), loss_fn)
    torch.testing.assert_close(net.weight.detach(), before - 0.1 * grad)


def test_graphs_only_where_they_apply():
    eager = _head_losses()
    assert make_step_loss(eager, torch.device("cpu"), cuda_graphs=True) is eager
    assert make_step_loss(eager, torch.device("cuda"), cuda_graphs=False) is eager
