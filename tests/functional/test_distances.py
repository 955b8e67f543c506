"""pairwise_distances, tuple distances and masks against loops, in float64 and under autocast."""

import pytest
import reference as ref
import torch
from helpers import clusters, make_batch
from hypothesis import given
from hypothesis import strategies as st

from smse_metric import functional as smf
from smse_metric.functional.distances import gathered_distances


@pytest.mark.parametrize("distance", ["l2", "squared_l2", "cosine"])
@pytest.mark.parametrize("with_ref", [False, True])
def test_pairwise_distances_equal_loops(distance, with_ref):
    x, _, _ = make_batch(7, 3, 2, normalize=False, seed=1)
    y = make_batch(5, 3, 2, normalize=False, seed=2)[0] if with_ref else None
    d = smf.pairwise_distances(x, y, distance)
    other = x if y is None else y
    for i in range(len(x)):
        for j in range(len(other)):
            if distance == "cosine":
                want = 1 - torch.dot(x[i], other[j]) / (x[i].norm() * other[j].norm())
            else:
                want = ref.dist(x[i], other[j], squared=distance == "squared_l2")
            assert abs(float(d[i, j]) - float(want)) < 1e-9


def test_self_distance_diagonal_is_exactly_zero_in_float32():
    x = torch.randn(64, 32) * 10
    d = smf.pairwise_distances(x)
    assert torch.equal(torch.diagonal(d), torch.zeros(64))
    assert torch.equal(
        torch.diagonal(smf.pairwise_distances(x, distance="squared_l2")), torch.zeros(64)
    )


def test_euclidean_gradient_with_ref_equals_autograd_of_loops():
    x, _, _ = make_batch(5, 3, 2, normalize=False, seed=3)
    y, _, _ = make_batch(4, 3, 2, normalize=False, seed=4)
    x.requires_grad_()
    y.requires_grad_()
    w = torch.randn(5, 4, dtype=torch.float64)
    (smf.pairwise_distances(x, y) * w).sum().backward()
    gx, gy = x.grad.clone(), y.grad.clone()
    x.grad = y.grad = None
    sum(w[i, j] * ref.dist(x[i], y[j]) for i in range(5) for j in range(4)).backward()
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gy, y.grad)
    assert torch.autograd.gradcheck(lambda a, b: smf.pairwise_distances(a, b), (x, y))


@pytest.mark.parametrize(("n", "m"), [(5, 4), (150, 120)])  # direct differences, expansion
def test_cosine_gradient_against_a_reference_set(n, m):
    """Both inputs' closed-form gradients, at both sizes of the computation, against
    gradcheck and against autograd through F.normalize and a direct difference."""
    x, _, _ = make_batch(n, 3, 2, normalize=False, seed=5)
    y, _, _ = make_batch(m, 3, 2, normalize=False, seed=6)
    x, y = x.requires_grad_(), y.requires_grad_()
    w = torch.randn(n, m, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    (smf.pairwise_distances(x, y, "cosine") * w).sum().backward()
    gx, gy = x.grad.clone(), y.grad.clone()
    x.grad = y.grad = None
    xn, yn = torch.nn.functional.normalize(x, dim=1), torch.nn.functional.normalize(y, dim=1)
    (((xn[:, None] - yn[None]).square().sum(-1) / 2) * w).sum().backward()
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gy, y.grad)
    if n < 10:
        assert torch.autograd.gradcheck(lambda a, b: smf.pairwise_distances(a, b, "cosine"), (x, y))


def test_distances_under_autocast_are_float32():
    x = torch.randn(8, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d = smf.pairwise_distances(x.bfloat16())
    assert d.dtype == torch.float32


@given(
    labels=st.lists(st.integers(0, 3), min_size=1, max_size=10),
    scales=st.data(),
    with_ref=st.booleans(),
)
def test_masks_equal_loops(labels, scales, with_ref):
    y = torch.tensor(labels)
    s = torch.tensor(scales.draw(st.lists(st.integers(0, 2), min_size=len(y), max_size=len(y))))
    ry, rs = (y.flip(0), s.flip(0)) if with_ref else (None, None)
    pos, neg = smf.label_masks(y, ry)
    cross = smf.cross_scale_mask(s, rs)
    oy, os_ = (y, s) if ry is None else (ry, rs)
    for i in range(len(y)):
        for j in range(len(oy)):
            same = bool(y[i] == oy[j])
            assert bool(pos[i, j]) == (same and (with_ref or i != j))
            assert bool(neg[i, j]) == (not same)
            assert bool(cross[i, j]) == bool(s[i] != os_[j])


@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("same", [False, True])
def test_tuple_distances_by_rows_equal_by_matrix(squared, same):
    emb, _, _ = make_batch(10, 3, 2, seed=22)
    ref_emb = emb if same else make_batch(10, 3, 2, seed=23)[0]
    i, j = torch.tensor([0, 1, 2, 7]), torch.tensor([3, 4, 2, 9])
    distance = "squared_l2" if squared else "l2"
    rows = gathered_distances(emb, ref_emb, same, [(i, j)], distance)[0]  # 4 x 3 <= 100
    big = gathered_distances(emb, ref_emb, same, [(i.repeat(30), j.repeat(30))], distance)[0]
    torch.testing.assert_close(rows, big[:4])
    want = torch.stack([ref.dist(emb[a], ref_emb[b], squared) for a, b in zip(i, j, strict=True)])
    torch.testing.assert_close(rows, want)


def test_duplicate_embeddings_have_zero_gradient_between_them():
    x = torch.tensor([[1.0, 2.0], [1.0, 2.0]], dtype=torch.float64, requires_grad=True)
    d = smf.pairwise_distances(x)
    assert d.abs().max() == 0
    d.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def _direct(x, y, distance):
    """The distance by direct difference, in float64, as the reference."""
    x, y = x.double(), y.double()
    if distance == "cosine":
        x, y = torch.nn.functional.normalize(x, dim=1), torch.nn.functional.normalize(y, dim=1)
    sq = (x[:, None, :] - y[None, :, :]).square().sum(-1)
    return {"l2": sq.sqrt(), "squared_l2": sq, "cosine": sq / 2}[distance]


@given(seed=st.integers(0, 2**16), d=st.sampled_from([2, 16, 128]), with_ref=st.booleans())
@pytest.mark.parametrize("distance", ["l2", "squared_l2", "cosine"])
def test_float32_distances_of_close_points_equal_the_direct_difference(distance, seed, d, with_ref):
    """Within float32 rounding of the exact value (a few ulps), where the float32
    expansion |x|^2 + |y|^2 - 2x.y is off by ~1e-7 absolute, i.e. by 100 % and more.
    Values below the float64 accumulation's own bound (~1e-15 absolute on squares) may
    differ by that bound."""
    x, _ = clusters(seed, n=10, d=d)
    y = clusters(seed + 1, n=10, d=d)[0] if with_ref else None
    got = smf.pairwise_distances(x, y, distance).double()
    want = _direct(x, x if y is None else y, distance)
    atol = 1e-8 if distance == "l2" else 1e-15  # sqrt of the squares' bound
    torch.testing.assert_close(got, want, rtol=4 * 2**-24, atol=atol)


@pytest.mark.parametrize("distance", ["l2", "squared_l2", "cosine"])
def test_duplicates_are_exactly_zero_in_float32(distance):
    x = torch.nn.functional.normalize(torch.randn(64, 128), dim=1)
    x[10], x[40] = x[3], x[3]
    for d in (
        smf.pairwise_distances(x, None, distance),
        smf.pairwise_distances(x[:20], x, distance),
    ):
        assert d[3, 10] == 0 and d[3, 40] == 0 and d[10, 3] == 0 and d.diagonal()[:20].eq(0).all()
        assert (d[3][[i for i in range(64) if i not in (3, 10, 40)]] > 0).all()


@given(
    seed=st.integers(0, 2**16),
    n=st.integers(1, 200),
    dtype=st.sampled_from([torch.float16, torch.float32, torch.float64]),
    with_ref=st.booleans(),
)
@pytest.mark.parametrize("distance", ["l2", "squared_l2", "cosine"])
def test_distances_are_never_negative(distance, seed, n, dtype, with_ref):
    """The fused triplet losses sort distances by their bit patterns, which order as the
    values only for non-negative floats: every distance must give >= 0 (cosine too: it is
    computed as ``|x/|x| - y/|y||^2 / 2``, never as ``1 - cos``), on near-duplicates,
    opposite rows and zero rows, at both sizes of the distance computation."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(3, 16, generator=g, dtype=torch.float64)
    pick = torch.randint(0, 3, (n,), generator=g)
    sign = torch.randint(0, 2, (n, 1), generator=g) * 2 - 1
    x = base[pick] * sign * (1 + 1e-7 * torch.randn(n, 1, generator=g, dtype=torch.float64))
    x = x + 1e-7 * torch.randn(n, 16, generator=g, dtype=torch.float64)
    x[torch.rand(n, generator=g) < 0.1] = 0
    x = x.to(dtype)
    d = smf.pairwise_distances(x, x.flip(0) if with_ref else None, distance)
    assert not d.isnan().any()
    assert (d >= 0).all()


@pytest.mark.parametrize("n", [8, 200])  # direct differences, then the float64 expansion
@pytest.mark.parametrize("distance", ["l2", "squared_l2", "cosine"])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_a_non_finite_row_has_no_finite_distance_and_leaves_the_others_exact(distance, n, value):
    """The expansion's snap to 0 scales with the row norms: an infinite norm once snapped
    every distance of an infinite row to 0, so miners took it for a duplicate."""
    x = torch.nn.functional.normalize(torch.randn(n, 16, dtype=torch.float64), dim=1)
    x[5] = x[2]
    clean = smf.pairwise_distances(x, None, distance)
    x[1] = value
    d = smf.pairwise_distances(x, None, distance)
    assert not d[1].isfinite().any() and not d[:, 1].isfinite().any()
    keep = [i for i in range(n) if i != 1]
    assert torch.equal(d[keep][:, keep], clean[keep][:, keep])  # the snap of the others holds
    assert d[2, 5] == 0
