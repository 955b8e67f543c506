"""The focal and reinforced focal losses against their formulas; gradcheck, autocast, compile."""

import pytest
import reference as ref
import torch
from hypothesis import given
from hypothesis import strategies as st

from smse_metric import FocalLoss, ReinforcedFocalLoss
from smse_metric import functional as smf


@given(
    n=st.integers(1, 8),
    c=st.integers(2, 5),
    alpha=st.floats(0.1, 4),
    gamma=st.floats(0, 3),
    weighted=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_reinforced_focal_loss_equals_formula(n, c, alpha, gamma, weighted, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g, dtype=torch.float64) * 3
    target = torch.randint(0, c, (n,), generator=g)
    beta = torch.rand(c, generator=g, dtype=torch.float64) if weighted else None
    want = ref.rfl(logits, target, alpha, gamma, beta)
    got = smf.reinforced_focal_loss(logits, target, alpha, gamma, beta, reduction="none")
    torch.testing.assert_close(got, want)
    module = ReinforcedFocalLoss(alpha, gamma, beta)
    torch.testing.assert_close(module(logits, target), want.mean().to(torch.float64))
    torch.testing.assert_close(
        ReinforcedFocalLoss(alpha, gamma, beta, reduction="sum")(logits, target), want.sum()
    )


def test_rfl_with_unit_parameters_is_one_minus_p():
    logits = torch.randn(10, 3, dtype=torch.float64)
    target = torch.randint(0, 3, (10,))
    p = torch.softmax(logits, 1)[torch.arange(10), target]
    got = smf.reinforced_focal_loss(logits, target, alpha=1.0, gamma=1.0, reduction="none")
    torch.testing.assert_close(got, 1 - p)


def test_rfl_from_class_counts_uses_one_minus_frequency():
    loss = ReinforcedFocalLoss.from_class_counts([2480, 5429], alpha=2.0, gamma=1.5)
    torch.testing.assert_close(loss.beta, torch.tensor([1 - 2480 / 7909, 1 - 5429 / 7909]))
    assert loss.alpha == 2.0 and loss.gamma == 1.5
    assert "beta" in dict(loss.named_buffers())  # moves with .to(device)


def test_rfl_is_bounded_and_suppresses_easy_samples():
    logits = torch.tensor([[10.0, -10.0], [-10.0, 10.0]], dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 0])  # first easy, second badly wrong
    loss = smf.reinforced_focal_loss(logits, target, alpha=2.0, gamma=1.5, reduction="none")
    assert 1.99 < float(loss[1].detach()) <= 2.0
    loss.sum().backward()
    assert logits.grad[0].abs().max() < 1e-10 < logits.grad[1].abs().max()


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.5])
def test_rfl_gradcheck_and_finite_at_certainty(gamma):
    logits = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 3, (6,))
    beta = torch.rand(3, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda z: smf.reinforced_focal_loss(z, target, 2.0, gamma, beta), (logits,)
    )
    sure = torch.tensor([[60.0, -60.0]], requires_grad=True)  # p == 1 in float32
    smf.reinforced_focal_loss(sure, torch.tensor([0]), gamma=gamma).backward()
    assert torch.isfinite(sure.grad).all()


def test_rfl_autocast_bfloat16_computes_in_float32():
    lin = torch.nn.Linear(4, 3)
    x = torch.randn(8, 4)
    target = torch.randint(0, 3, (8,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = lin(x)
        out = ReinforcedFocalLoss()(z, target)
    assert z.dtype == torch.bfloat16 and out.dtype == torch.float32
    torch.testing.assert_close(out, ReinforcedFocalLoss()(z.float(), target))


def test_rfl_compiles_fullgraph():
    loss = ReinforcedFocalLoss.from_class_counts([3, 7])
    logits, target = torch.randn(5, 2), torch.randint(0, 2, (5,))
    torch._dynamo.reset()
    out = torch.compile(loss, fullgraph=True, backend="eager")(logits, target)
    torch.testing.assert_close(out, loss(logits, target))


def test_focal_loss_reduces_to_cross_entropy_and_matches_formula():
    logits = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 4, (9,))
    ce = torch.nn.functional.cross_entropy(logits, target)
    torch.testing.assert_close(FocalLoss(gamma=0.0)(logits, target), ce)
    w = torch.tensor([0.5, 1.0, 2.0, 1.5])
    p = torch.softmax(logits, 1)[torch.arange(9), target]
    want = -(w.double()[target] * (1 - p) ** 2 * p.log())
    torch.testing.assert_close(FocalLoss(2.0, weight=w, reduction="none")(logits, target), want)
    assert torch.autograd.gradcheck(lambda z: FocalLoss(2.0)(z, target), (logits,))


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (
            lambda: ReinforcedFocalLoss()(torch.randn(3, 2), torch.tensor([0, 2, 1])),
            ValueError,
            "target",
        ),
        (
            lambda: ReinforcedFocalLoss()(torch.randn(3, 2), torch.tensor([0.0, 1.0, 1.0])),
            TypeError,
            "target",
        ),
        (
            lambda: ReinforcedFocalLoss()(torch.randn(3, 2), torch.tensor([0, 1])),
            ValueError,
            "target",
        ),
        (
            lambda: ReinforcedFocalLoss()(torch.randn(3), torch.tensor([0, 1, 1])),
            ValueError,
            "logits",
        ),
        (
            lambda: ReinforcedFocalLoss(beta=[0.5, 0.5, 0.5])(
                torch.randn(3, 2), torch.tensor([0, 1, 1])
            ),
            ValueError,
            "beta",
        ),
        (lambda: ReinforcedFocalLoss(beta=[0.5, -1.0]), ValueError, "beta"),
        (lambda: ReinforcedFocalLoss(gamma=-1), ValueError, "gamma"),
        (lambda: ReinforcedFocalLoss(alpha=0), ValueError, "alpha"),
        (lambda: ReinforcedFocalLoss(reduction="avg"), ValueError, "reduction"),
        (lambda: ReinforcedFocalLoss.from_class_counts([3, -1]), ValueError, "counts"),
        (
            lambda: FocalLoss(weight=[1.0])(torch.randn(3, 2), torch.tensor([0, 1, 1])),
            ValueError,
            "weight",
        ),
    ],
)
def test_classification_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
