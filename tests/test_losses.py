"""The loss modules: gradcheck in float64, invariances, degenerate batches, dtypes and
devices, compile, bad input."""

import pytest
import reference as ref
import torch
from helpers import (
    CUDA_MARKS,
    DEVICES,
    FUSED,
    FUSED_PATHS,
    assert_same,
    fused_path,
    make_batch,
    metric_losses,
    needs_cuda,
    needs_pml,
    pml_losses,
    pml_miners,
    unit,
)
from hypothesis import given
from hypothesis import strategies as st

from benchmarks.common import launch_counts
from smse_metric import (
    ContrastiveLoss,
    FocalLoss,
    PairMiner,
    ReinforcedFocalLoss,
    TripletMarginLoss,
    TripletMiner,
)
from smse_metric import functional as smf

LOSSES = metric_losses()


def _check_degenerate(loss, emb, labels, scales, expect_zero):
    emb = emb.clone().requires_grad_()
    out = loss(emb, labels, scales=scales)
    assert out.ndim == 0 and torch.isfinite(out)
    assert out.requires_grad
    out.backward()
    assert torch.isfinite(emb.grad).all()
    if expect_zero:
        assert float(out.detach()) == 0.0
        assert torch.count_nonzero(emb.grad) == 0


@needs_pml
def test_pml_tuples_feed_our_losses_and_ours_feed_pml():
    emb, labels, _ = make_batch(32, 6, 3, seed=7)
    pml_trip = pml_miners.TripletMarginMiner(margin=0.2, type_of_triplets="semihard")(emb, labels)
    ours = TripletMarginLoss(0.2)
    assert_same(
        lambda e: ours(e, labels, pml_trip),
        lambda e: ref.triplet_loss_on(e, e, pml_trip, 0.2, False, "mean_nonzero"),
        emb,
    )
    our_trip = TripletMiner("semihard", margin=0.2)(emb, labels)
    assert_same(
        lambda e: pml_losses.TripletMarginLoss(margin=0.2)(e, labels, our_trip),
        lambda e: ours(unit(e), labels, our_trip),
        emb,
    )
    pml_pairs = pml_miners.PairMarginMiner(pos_margin=0.2, neg_margin=0.8)(emb, labels)
    closs = ContrastiveLoss(margin=0.8, reduction="sum")
    P = list(zip(pml_pairs[0].tolist(), pml_pairs[1].tolist(), strict=True))
    N = list(zip(pml_pairs[2].tolist(), pml_pairs[3].tolist(), strict=True))
    assert_same(
        lambda e: closs(e, labels, pml_pairs),
        lambda e: ref.contrastive_on(e, e, P, N, 0.8, "sum"),
        emb,
    )
    our_pairs = PairMiner("hard", pos_margin=0.2, neg_margin=0.8)(emb, labels)
    v = pml_losses.ContrastiveLoss(pos_margin=0.2, neg_margin=0.8)(emb, labels, our_pairs)
    w = pml_losses.ContrastiveLoss(pos_margin=0.2, neg_margin=0.8)(emb, labels, pml_pairs)
    torch.testing.assert_close(v, w)
    assert float(v) > 0


@pytest.mark.parametrize(
    "fn",
    [
        lambda e, y, s: smf.triplet_margin_loss(e, y, 0.5, triplets="all"),
        lambda e, y, s: smf.triplet_margin_loss(e, y, 0.5, triplets="semihard", reduction="mean"),
        lambda e, y, s: smf.triplet_margin_loss(e, y, 0.5, triplets="hard"),
        lambda e, y, s: smf.triplet_margin_loss(
            e, y, 0.5, distance="squared_l2", triplets="batch_hard"
        ),
        lambda e, y, s: smf.triplet_margin_loss(e, y, 0.5, triplets="batch_hard", reduction="mean"),
        lambda e, y, s: smf.triplet_margin_loss(e, y, 0.5, distance="squared_l2", reduction="sum"),
        lambda e, y, s: smf.triplet_margin_loss(e, y, 0.5, scales=s, cross_scale=True),
        lambda e, y, s: smf.triplet_margin_loss(e, y, 0.2, triplets="semihard", distance="cosine"),
        lambda e, y, s: smf.triplet_margin_loss(
            e, y, 0.2, triplets="batch_hard", distance="cosine"
        ),
        lambda e, y, s: smf.contrastive_loss(e, y, 1.0),
        lambda e, y, s: smf.contrastive_loss(e, y, 1.0, scales=s, cross_scale=True),
        lambda e, y, s: smf.pairwise_distances(e).sum(),
        lambda e, y, s: smf.pairwise_distances(e, distance="cosine").sum(),
    ],
)
@pytest.mark.parametrize("path", FUSED_PATHS)
def test_gradcheck_float64(fn, path):
    emb, labels, scales = make_batch(10, 4, 3, n_scales=2, seed=13)
    # rows of several lengths: cosine's gradient divides by them
    emb = (emb * torch.linspace(0.5, 2.0, 10, dtype=emb.dtype)[:, None]).requires_grad_()
    with fused_path(path):
        assert torch.autograd.gradcheck(
            lambda e: fn(e, labels, scales), (emb,), eps=1e-6, atol=1e-5
        )


@pytest.mark.parametrize("loss", LOSSES, ids=repr)
@given(seed=st.integers(0, 2**16), shift=st.floats(-5, 5))
def test_invariances(loss, seed, shift):
    emb, labels, scales = make_batch(14, 4, 3, n_scales=2, seed=seed)
    base = loss(emb, labels, scales=scales)
    perm = torch.randperm(14, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(loss(emb[perm], labels[perm], scales=scales[perm]), base)
    relabel = torch.tensor([7, -3, 11])[labels]
    torch.testing.assert_close(loss(emb, relabel, scales=scales), base)
    # euclidean distances see only differences, cosine ones only directions
    cosine = getattr(loss, "distance", None) == "cosine"
    moved = emb * (1 + abs(shift)) if cosine else emb + shift
    torch.testing.assert_close(loss(moved, labels, scales=scales), base, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("loss", LOSSES, ids=repr)
@pytest.mark.parametrize("path", FUSED_PATHS)
def test_degenerate_batches(loss, path):
    """Degenerate batches give a finite loss and gradient on both fused paths; where no
    pair or triplet exists, a zero connected to the graph."""
    with fused_path(path):
        emb, _, scales = make_batch(6, 3, 1)
        is_triplet = isinstance(loss, TripletMarginLoss)
        # one class: no negatives, so no triplet; the pair loss still pulls positives
        _check_degenerate(loss, emb, torch.zeros(6, dtype=torch.long), scales, is_triplet)
        # all labels distinct: no positives
        _check_degenerate(loss, emb, torch.arange(6), scales, is_triplet)
        # B = 1 and B = 0
        _check_degenerate(loss, emb[:1], torch.zeros(1, dtype=torch.long), scales[:1], True)
        _check_degenerate(loss, emb[:0], torch.zeros(0, dtype=torch.long), scales[:0], True)
        # duplicate embeddings, same and different labels
        dup = emb[[0, 0, 1, 1, 2, 2]]
        _check_degenerate(loss, dup, torch.tensor([0, 0, 1, 1, 0, 1]), scales, False)
        # no cross-scale positive: every positive shares its anchor's scale
        same_scale = torch.tensor([0, 0, 0, 1, 1, 1])
        lab = torch.tensor([0, 0, 0, 1, 1, 1])
        _check_degenerate(loss, emb, lab, same_scale, is_triplet and loss.cross_scale)


#: (device, autocast dtype): bfloat16 on the CPU, both half types on CUDA
AUTOCAST = [("cpu", torch.bfloat16)]
AUTOCAST += [pytest.param("cuda", t, marks=CUDA_MARKS) for t in (torch.float16, torch.bfloat16)]


@pytest.mark.parametrize(("device", "dtype"), AUTOCAST)
@pytest.mark.parametrize("loss", LOSSES, ids=repr)
def test_autocast_accumulates_in_float32(loss, device, dtype):
    emb, labels, scales = make_batch(32, 8, 3, n_scales=2, dtype=torch.float32, seed=14)
    emb, labels, scales = emb.to(device), labels.to(device), scales.to(device)
    lin = torch.nn.Linear(8, 8).to(device)
    with torch.autocast(device, dtype=dtype):
        z = lin(emb)
        assert z.dtype == dtype
        out = loss(z, labels, scales=scales)
    assert out.dtype == torch.float32
    out.backward()
    assert torch.isfinite(lin.weight.grad).all()
    expected = loss(z.detach().float(), labels, scales=scales)
    torch.testing.assert_close(out.detach(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loss", LOSSES, ids=repr)
@pytest.mark.parametrize("n", [32, 300])
def test_every_device_matches_the_cpu(loss, device, n):
    """Values and gradients on the device equal the CPU's, in float64 (where selections
    cannot flip on rounding), at a batch of 32 (the launch-light path) and of 300 (the
    sorted path, in several anchor blocks)."""
    emb, labels, scales = make_batch(n, 32, 5, n_scales=4, seed=1)

    def run(dev):
        # a fresh leaf per device: emb.to('cpu') would be emb itself
        e = emb.detach().to(dev, copy=True).requires_grad_()
        out = loss(e, labels.to(dev), scales=scales.to(dev))
        out.backward()
        return out.detach().cpu(), e.grad.cpu()

    v_cpu, g_cpu = run("cpu")
    v_dev, g_dev = run(device)
    torch.testing.assert_close(v_dev, v_cpu)
    torch.testing.assert_close(g_dev, g_cpu)


def test_float32_matches_float64():
    emb, labels, _ = make_batch(64, 16, 4, seed=15)
    for strategy in FUSED:
        loss = TripletMarginLoss(0.2, triplets=strategy)
        torch.testing.assert_close(
            loss(emb.float(), labels).double(), loss(emb, labels), rtol=1e-4, atol=1e-5
        )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loss", LOSSES, ids=repr)
@pytest.mark.parametrize("path", FUSED_PATHS)
def test_compiles_fullgraph_without_graph_break(loss, device, path):
    emb, labels, scales = make_batch(16, 4, 3, n_scales=2, dtype=torch.float32, seed=16)
    emb, labels, scales = emb.to(device), labels.to(device), scales.to(device)
    torch._dynamo.reset()
    # inductor on the GPU; on the CPU aot_eager traces the same joint forward-backward
    # graph as inductor, without needing a C++ compiler
    backend = "inductor" if device == "cuda" else "aot_eager"
    compiled = torch.compile(loss, fullgraph=True, backend=backend)
    e1 = emb.clone().requires_grad_()
    e2 = emb.clone().requires_grad_()
    with fused_path(path):
        out = compiled(e1, labels, scales=scales)
        out.backward()
        expected = loss(e2, labels, scales=scales)
        expected.backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(e1.grad, e2.grad)


# Host synchronisation exists only between a CUDA device and the host.
@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("loss", LOSSES, ids=repr)
@pytest.mark.parametrize("n", [32, 512])
def test_fused_losses_never_sync_with_the_host(loss, n):
    emb, labels, scales = make_batch(n, 64, 4, n_scales=4, dtype=torch.float32, seed=2)
    emb, labels, scales = emb.cuda().requires_grad_(), labels.cuda(), scales.cuda()
    loss(emb, labels, scales=scales).backward()  # warm-up: lazy init may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss(emb, labels, scales=scales).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_cuda
@pytest.mark.cuda
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


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda: TripletMarginLoss()(torch.randn(4), torch.arange(4)), ValueError, "embeddings"),
        (lambda: TripletMarginLoss()(torch.randn(4, 2), torch.arange(3)), ValueError, "labels"),
        (lambda: TripletMarginLoss()(torch.randn(4, 2), torch.rand(4)), TypeError, "labels"),
        (
            lambda: ContrastiveLoss()(torch.randn(4, 2), torch.arange(4).view(2, 2)),
            ValueError,
            "labels",
        ),
        (
            lambda: ContrastiveLoss()(torch.arange(8).view(4, 2), torch.arange(4)),
            TypeError,
            "embeddings",
        ),
        (lambda: TripletMarginLoss(triplets="hardest"), ValueError, "triplets"),
        (lambda: TripletMarginLoss(reduction="none"), ValueError, "reduction"),
        (lambda: ContrastiveLoss(reduction="avg"), ValueError, "reduction"),
        (
            lambda: TripletMarginLoss(cross_scale=True)(torch.randn(4, 2), torch.arange(4)),
            ValueError,
            "scales",
        ),
        (
            lambda: TripletMarginLoss()(torch.randn(4, 2), torch.arange(4), scales=torch.arange(3)),
            ValueError,
            "scales",
        ),
        (
            lambda: TripletMarginLoss()(
                torch.randn(4, 2),
                torch.arange(4),
                (torch.tensor([0]), torch.tensor([9]), torch.tensor([1])),
            ),
            ValueError,
            "indices_tuple",
        ),
        (
            lambda: TripletMarginLoss()(
                torch.randn(4, 2), torch.arange(4), (torch.tensor([0]),) * 4
            ),
            ValueError,
            "triplets",
        ),
        (
            lambda: TripletMarginLoss()(
                torch.randn(4, 2), torch.arange(4), ref_emb=torch.randn(3, 2)
            ),
            ValueError,
            "ref_labels",
        ),
        (
            lambda: TripletMarginLoss()(
                torch.randn(4, 2),
                torch.arange(4),
                ref_emb=torch.randn(3, 5),
                ref_labels=torch.arange(3),
            ),
            ValueError,
            "ref_emb",
        ),
        (
            lambda: smf.pairwise_distances(torch.randn(3, 2), distance="manhattan"),
            ValueError,
            "distance",
        ),
    ],
)
def test_bad_input_names_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


#: forward + backward of each fused loss over a batch of 32, counted on the CPU, over
#: every reduction, distance and cross-scale setting. Issue 14's target, 25, holds for
#: the contrastive loss (18-25 on torch 2.14); for the triplet losses the largest count
#: measured plus 2 for other torch versions: the float64 distances, the masks and the
#: [B, B, B] selection keep them above 25
LAUNCH_BUDGET = {"contrastive": 25, "batch_hard": 37, "all": 36, "semihard": 41, "hard": 41}
#: what cosine adds to the squared distance it is computed as: the normalisation (3
#: ops), the halving, the unit rows' and norms' casts, and 5 ops of its gradient
COSINE_OPS = 11


def _launch_cases():
    for strategy in FUSED:
        for distance in ("l2", "squared_l2", "cosine"):
            extra = COSINE_OPS if distance == "cosine" else 0
            for cross in (False, True):
                for reduction in ("mean_nonzero", "mean", "sum"):
                    loss = TripletMarginLoss(
                        0.2,
                        triplets=strategy,
                        reduction=reduction,
                        cross_scale=cross,
                        distance=distance,
                    )
                    yield strategy, extra, loss
    for cross in (False, True):
        for reduction in ("mean", "sum", "mean_nonzero"):
            yield "contrastive", 0, ContrastiveLoss(0.5, reduction, cross_scale=cross)


@pytest.mark.parametrize(("kind", "extra", "loss"), list(_launch_cases()), ids=repr)
def test_fused_losses_run_few_ops_per_training_step(kind, extra, loss):
    emb, labels, scales = make_batch(32, 128, 4, n_scales=2, dtype=torch.float32, seed=5)
    emb.requires_grad_()

    def step():
        return torch.autograd.grad(loss(emb, labels, scales=scales), emb)

    step()  # first calls initialise lazily
    assert launch_counts(step)[0] <= LAUNCH_BUDGET[kind] + extra
    with fused_path("sorted"):  # the composed path: the count can exceed the budget
        step()
        assert launch_counts(step)[0] > LAUNCH_BUDGET[kind] + extra + 10


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("loss", LOSSES, ids=repr)
def test_a_training_step_replays_from_a_cuda_graph(loss):
    """Forward and backward of a linear head and the loss, captured once and replayed on
    another batch, equal the same step run eagerly: nothing in the step syncs with the
    host or depends on the data through Python."""
    first, labels, scales = make_batch(32, 16, 4, n_scales=2, dtype=torch.float32, seed=3)
    second, labels2, scales2 = make_batch(32, 16, 4, n_scales=2, dtype=torch.float32, seed=4)
    static = [t.cuda() for t in (first, labels, scales)]
    head = torch.nn.Linear(16, 16).cuda()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as CUDA graphs need
        for _ in range(3):
            head.zero_grad(set_to_none=True)
            loss(head(static[0]), static[1], scales=static[2]).backward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    head.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        out = loss(head(static[0]), static[1], scales=static[2])
        out.backward()
    for buf, new in zip(static, (second, labels2, scales2), strict=True):
        buf.copy_(new.cuda())
    graph.replay()
    eager = torch.nn.Linear(16, 16).cuda()
    eager.load_state_dict(head.state_dict())
    want = loss(eager(second.cuda()), labels2.cuda(), scales=scales2.cuda())
    want.backward()
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(head.weight.grad, eager.weight.grad)


def _hessian_vector_product(loss, emb, labels, v):
    """(autograd's H v through create_graph, central differences of the gradient)."""
    x = emb.clone().requires_grad_()
    (g,) = torch.autograd.grad(loss(x, labels), x, create_graph=True)
    (hv,) = torch.autograd.grad((g * v).sum(), x)

    def grad_at(z):
        z = z.clone().requires_grad_()
        return torch.autograd.grad(loss(z, labels), z)[0]

    return hv, (grad_at(emb + 1e-6 * v) - grad_at(emb - 1e-6 * v)) / 2e-6


@pytest.mark.parametrize(
    ("loss", "path"),
    [
        (TripletMarginLoss(0.3, distance="cosine"), "sorted"),
        (TripletMarginLoss(0.3), "sorted"),
        (TripletMarginLoss(0.3, distance="squared_l2"), "small"),
        (TripletMarginLoss(0.3, distance="squared_l2", triplets="batch_hard"), "small"),
    ],
    ids=repr,
)
def test_second_derivatives_are_right_where_they_are_given(loss, path):
    """A gradient penalty differentiates the gradient: where the losses allow it, the
    Hessian-vector product equals central differences of the gradient (the counts are
    piecewise constant, so small steps keep them)."""
    emb, labels, _ = make_batch(12, 4, 3, seed=3, normalize=False)
    v = torch.randn(emb.shape, dtype=emb.dtype, generator=torch.Generator().manual_seed(1))
    with fused_path(path):
        hv, fd = _hessian_vector_product(loss, emb, labels, v)
    assert hv.abs().max() > 1e-3  # a real curvature, not two zeros
    torch.testing.assert_close(hv, fd, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "loss",
    [TripletMarginLoss(0.3), TripletMarginLoss(0.3, distance="cosine"), ContrastiveLoss(0.8)],
    ids=repr,
)
def test_launch_light_losses_refuse_second_derivatives_they_cannot_give(loss):
    """The launch-light path computes 1 / d and the unit rows outside autograd: rather
    than a wrong second derivative (the euclidean triplet loss's H v, for the batch of
    the test above, was off by up to 0.23 where its largest entry is 0.29), an error that
    names the way out."""
    emb, labels, _ = make_batch(12, 4, 3, seed=3, normalize=False)
    x = emb.clone().requires_grad_()
    out = loss(x, labels)
    (g,) = torch.autograd.grad(out, x)  # first derivatives are unaffected
    assert torch.isfinite(g).all()
    with pytest.raises(RuntimeError, match="second derivatives of the launch-light"):
        torch.autograd.grad(loss(x, labels), x, create_graph=True)
