"""MultiScaleBatchSampler: batch structure, coverage, determinism, ranks, resume, errors."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from smse_metric import MultiScaleBatchSampler
from smse_metric.samplers import ShuffledBatchSampler

# BreakHis v1 (shared/BREAKHIS.md): subtype -> (patients, images at 40X, 100X, 200X, 400X)
BREAKHIS = {
    "A": (4, (114, 113, 111, 106)),
    "F": (10, (253, 260, 264, 237)),
    "PT": (3, (109, 121, 108, 115)),
    "TA": (7, (149, 150, 140, 130)),
    "DC": (38, (864, 903, 896, 788)),
    "LC": (5, (156, 170, 163, 137)),
    "MC": (9, (205, 222, 196, 169)),
    "PC": (6, (145, 142, 135, 138)),
}


def breakhis_layout(seed=0):
    rng = np.random.default_rng(seed)
    labels, groups, scales = [], [], []
    for subtype, (patients, per_mag) in BREAKHIS.items():
        for mag, n in zip((40, 100, 200, 400), per_mag, strict=True):
            # every patient has every magnification; the rest spread at random
            pid = np.concatenate([np.arange(patients), rng.integers(0, patients, n - patients)])
            labels += [subtype] * n
            groups += [f"{subtype}-{p}" for p in pid]
            scales += [mag] * n
    return np.array(labels), np.array(groups), np.array(scales)


@st.composite
def layouts(draw):
    n_classes = draw(st.integers(1, 4))
    n_scales = draw(st.integers(1, 3))
    labels, groups, scales = [], [], []
    for c in range(n_classes):
        n_groups = draw(st.integers(1, 4))
        for g in range(n_groups):
            counts = [draw(st.integers(0, 3)) for _ in range(n_scales)]
            counts[0] += sum(counts) == 0  # a group has at least one image
            for s, n in enumerate(counts):
                labels += [c] * n
                groups += [f"{c}-{g}"] * n
                scales += [s * 100 + 40] * n
    # every class needs every scale somewhere
    for c in range(n_classes):
        for s in range(n_scales):
            labels.append(c)
            groups.append(f"{c}-0")
            scales.append(s * 100 + 40)
    return np.array(labels), np.array(groups), np.array(scales)


def check_structure(s: MultiScaleBatchSampler, batch, labels, groups, scales):
    C, G, S, K = s.classes_per_batch, s.groups_per_class, s.n_scales, s.images_per_scale
    b = np.asarray(batch)
    assert b.shape == (s.batch_size,) and b.min() >= 0 and b.max() < len(labels)
    b = b.reshape(C, G, S, K)
    cls = labels[b]
    assert (cls == cls[:, :1, :1, :1]).all()  # one class per class block
    assert len(set(cls[:, 0, 0, 0].tolist())) == C  # distinct classes
    assert (scales[b] == s.scale_names[None, None, :, None]).all()  # every scale, in order
    group_scales = {}
    for g, sc in zip(groups.tolist(), scales.tolist(), strict=True):
        group_scales.setdefault(g, set()).add(sc)
    for c in range(C):
        n_groups_of_class = len(set(groups[labels == cls[c, 0, 0, 0]].tolist()))
        intended = []
        for g in range(G):
            # The entry's group: the one whose images fill every scale it has; scales
            # it lacks are filled from its class at that scale.
            block = list(
                zip(
                    groups[b[c, g]].reshape(-1).tolist(),
                    scales[b[c, g]].reshape(-1).tolist(),
                    strict=True,
                )
            )
            fits = {
                h for h, _ in block if all(gg == h for gg, sc in block if sc in group_scales[h])
            }
            assert fits
            intended.append(fits)
        if n_groups_of_class >= G and all(len(f) == 1 for f in intended):
            assert len(set().union(*intended)) == G  # distinct groups


@given(
    layout=layouts(),
    cpb=st.integers(1, 3),
    gpc=st.integers(1, 3),
    k=st.integers(1, 2),
    seed=st.integers(0, 100),
)
def test_every_batch_has_the_structure_and_the_epoch_covers_every_image(layout, cpb, gpc, k, seed):
    labels, groups, scales = layout
    cpb = min(cpb, len(np.unique(labels)))
    s = MultiScaleBatchSampler(labels, groups, scales, cpb, gpc, k, seed=seed)
    batches = list(s)
    assert len(batches) == len(s) == s.stats.batches > 0
    for batch in batches:
        check_structure(s, batch, labels, groups, scales)
    seen = np.unique(np.concatenate(batches))
    assert len(seen) == len(labels) == s.stats.unique_images
    assert s.stats.images_drawn == len(batches) * s.batch_size
    assert s.stats.repeated_draws == s.stats.images_drawn - len(labels)
    # the same seed and epoch give the same plan; iterating again repeats it
    again = MultiScaleBatchSampler(labels, groups, scales, cpb, gpc, k, seed=seed)
    assert list(again) == batches == list(s)


@given(layout=layouts(), world=st.integers(1, 4), drop_last=st.booleans(), seed=st.integers(0, 50))
def test_ranks_take_disjoint_equal_slices_of_one_global_list(layout, world, drop_last, seed):
    labels, groups, scales = layout
    kw = dict(classes_per_batch=1, groups_per_class=2, seed=seed, drop_last=drop_last)
    glob = MultiScaleBatchSampler(labels, groups, scales, world_size=1, rank=0, **kw)
    n = len(glob)
    if drop_last and n < world:  # no batch for some rank: refused with the counts
        with pytest.raises(ValueError, match=f"makes {n} batches .* fewer than the {world} ranks"):
            MultiScaleBatchSampler(labels, groups, scales, world_size=world, rank=0, **kw)
        return
    per_rank = [
        list(MultiScaleBatchSampler(labels, groups, scales, world_size=world, rank=r, **kw))
        for r in range(world)
    ]
    lengths = {len(p) for p in per_rank}
    assert len(lengths) == 1
    (length,) = lengths
    assert length == (n // world if drop_last else -(-n // world))
    s0 = MultiScaleBatchSampler(labels, groups, scales, world_size=world, rank=0, **kw)
    assert len(s0) == length
    assert s0.stats.dropped_batches == (n % world if drop_last else 0)
    assert s0.stats.padded_batches == (0 if drop_last or n % world == 0 else world - n % world)
    # interleave the ranks back: the global list, truncated or padded
    merged = [per_rank[r][i] for i in range(length) for r in range(world)]
    full = list(glob)
    assert merged[: min(len(merged), n)] == full[: min(len(merged), n)]
    if not drop_last:
        assert merged[n:] == full[: len(merged) - n]


@given(layout=layouts(), stop=st.integers(0, 20), seed=st.integers(0, 50))
def test_resume_mid_epoch_yields_exactly_the_remaining_batches(layout, stop, seed):
    labels, groups, scales = layout
    s = MultiScaleBatchSampler(labels, groups, scales, 1, 2, seed=seed)
    s.set_epoch(3)
    full = list(s)
    it = iter(s)
    head = [next(it) for _ in range(min(stop, len(full)))]
    state = s.state_dict()
    fresh = MultiScaleBatchSampler(labels, groups, scales, 1, 2, seed=seed)
    fresh.load_state_dict(state)
    assert head + list(fresh) == full
    assert list(fresh) == full  # the next pass is the whole epoch again


def test_breakhis_layout_is_balanced_deterministic_and_covered():
    labels, groups, scales = breakhis_layout()
    assert len(labels) == 7909 and len(np.unique(groups)) == 82
    s = MultiScaleBatchSampler(labels, groups, scales, classes_per_batch=2, groups_per_class=2)
    batches = np.array(list(s))
    assert batches.shape == (len(s), 2 * 2 * 4)
    for batch in batches[:50]:
        check_structure(s, batch, labels, groups, scales)
    # classes are drawn uniformly: every subtype leads the same number of class blocks
    per_class = np.unique(labels[batches[:, ::8]], return_counts=True)[1]
    assert len(per_class) == 8 and per_class.min() == per_class.max()
    assert np.unique(batches).size == 7909
    # another epoch is another order; the same epoch is the same order
    s.set_epoch(1)
    other = np.array(list(s))
    assert other.shape == batches.shape and not np.array_equal(other, batches)
    s.set_epoch(0)
    assert np.array_equal(np.array(list(s)), batches)
    # patients smaller than a visit cycle are counted as repeats
    assert s.stats.repeated_draws == batches.size - 7909 > 0


def test_small_classes_use_replacement_and_count_it():
    # class 1 has one patient; with groups_per_class=2 it is drawn with replacement
    labels = [0] * 8 + [1] * 2
    groups = ["a", "a", "b", "b", "c", "c", "d", "d", "e", "e"]
    scales = [40, 100] * 5
    s = MultiScaleBatchSampler(labels, groups, scales, classes_per_batch=2, groups_per_class=2)
    batches = list(s)
    assert s.stats.filler_group_visits > 0
    for b in batches:
        blocks = [b[:4], b[4:]]  # 2 groups x 2 scales per class block
        (single,) = [blk for blk in blocks if labels[blk[0]] == 1]  # it still appears
        assert {groups[i] for i in single} == {"e"}
    with pytest.raises(ValueError, match=r"class 1 has 1 groups but groups_per_class=2"):
        MultiScaleBatchSampler(labels, groups, scales, 2, 2, small_group_policy="error")


def test_missing_scale_of_a_group_is_substituted_or_raises():
    labels = [0, 0, 0, 1, 1, 1]
    groups = ["a", "a", "b", "c", "c", "d"]
    scales = [40, 100, 40, 40, 100, 100]  # b lacks 100X, d lacks 40X
    s = MultiScaleBatchSampler(labels, groups, scales, 2, 2)
    assert s.stats.substituted_cells == 2
    for b in s:
        check_structure(s, b, np.array(labels), np.array(groups), np.array(scales))
    with pytest.raises(ValueError, match=r"group 'b' of class 0 has no image at scale 100"):
        MultiScaleBatchSampler(labels, groups, scales, 2, 2, small_group_policy="error")


def test_works_as_a_dataloader_batch_sampler_with_tensors_and_strings():
    labels = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1])
    groups = ["p1", "p1", "p2", "p2", "p3", "p3", "p4", "p4"]
    scales = np.array([40, 400] * 4)
    ds = torch.utils.data.TensorDataset(torch.arange(8), labels)
    s = MultiScaleBatchSampler(labels, groups, scales, 2, 2)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=s)
    got = [x for x, _ in loader]
    assert len(got) == len(s) and all(x.shape == (8,) for x in got)
    assert sorted(torch.cat(got).unique().tolist()) == list(range(8))


def test_default_rank_and_world_size_without_distributed():
    s = MultiScaleBatchSampler([0, 1], ["a", "b"], [40, 40], 2, 1)
    assert (s.rank, s.world_size) == (0, 1)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        (dict(classes_per_batch=3), ValueError, "classes_per_batch=3 but labels has only 2"),
        (dict(classes_per_batch=0), ValueError, "classes_per_batch"),
        (dict(groups_per_class=-1), ValueError, "groups_per_class"),
        (dict(images_per_scale=1.5), ValueError, "images_per_scale"),
        (dict(small_group_policy="skip"), ValueError, "small_group_policy"),
        (dict(rank=2, world_size=2), ValueError, "rank"),
        (dict(world_size=0), ValueError, "world_size"),
        (dict(seed=-1), ValueError, "seed"),
        (dict(groups=["a", "b"]), ValueError, "groups has 2 elements"),
        (dict(labels=[0.5, 1.5, 0.5, 1.5]), TypeError, "labels must hold integers or strings"),
        (dict(scales=[[40, 40], [40, 40]]), ValueError, "scales must be 1-D"),
        (dict(labels=[]), ValueError, "labels is empty"),
        (dict(scales=[40, 40, 40, 100]), ValueError, "class 0 has no image at scale 100"),
    ],
)
def test_bad_arguments_raise_with_the_reason(kwargs, exc, match):
    args = dict(
        labels=[0, 1, 0, 1],
        groups=["a", "b", "a", "b"],
        scales=[40, 40, 100, 100],
        classes_per_batch=2,
        groups_per_class=1,
    )
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        MultiScaleBatchSampler(**args)


def test_state_dict_from_another_configuration_is_refused():
    s = MultiScaleBatchSampler([0, 1], ["a", "b"], [40, 40], 2, 1, seed=1)
    other = MultiScaleBatchSampler([0, 1], ["a", "b"], [40, 40], 2, 1, seed=2)
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(s.state_dict())
    with pytest.raises(ValueError, match="position"):
        s.load_state_dict({**s.state_dict(), "position": 99})
    with pytest.raises(ValueError, match="epoch"):
        s.set_epoch(-1)


def test_rank_and_world_size_default_to_torch_distributed(monkeypatch):
    dist = torch.distributed
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 3)
    monkeypatch.setattr(dist, "get_rank", lambda: 2)
    labels, groups, scales = breakhis_layout()
    s = MultiScaleBatchSampler(labels, groups, scales, 2, 2)
    assert (s.rank, s.world_size) == (2, 3)
    glob = list(MultiScaleBatchSampler(labels, groups, scales, 2, 2, rank=0, world_size=1))
    assert list(s) == glob[2 : len(glob) - len(glob) % 3 : 3]


@pytest.mark.parametrize("seed", range(5))
def test_classes_with_many_groups_still_get_distinct_groups_per_slot(seed):
    rng = np.random.default_rng(seed)
    labels, groups, scales = [], [], []
    for c in range(2):
        for g in range(40):  # uneven patients, every one at both scales: fillers are needed
            for sc in (40, 400):
                k = int(rng.integers(1, 6))
                labels += [c] * k
                groups += [c * 100 + g] * k
                scales += [sc] * k
    labels, groups, scales = np.array(labels), np.array(groups), np.array(scales)
    s = MultiScaleBatchSampler(labels, groups, scales, 2, 4, seed=seed)
    assert s.stats.filler_group_visits > 0 and s.stats.substituted_cells == 0
    for batch in s:
        blocks = groups[np.asarray(batch)].reshape(2, 4, 2)
        assert (blocks == blocks[:, :, :1]).all()  # one patient per (class, group) entry
        for c in range(2):
            assert len(set(blocks[c, :, 0].tolist())) == 4  # distinct patients


class _Indices(torch.utils.data.Dataset):
    def __len__(self):
        return 10_000

    def __getitem__(self, i):
        return i


def test_resume_with_loader_workers_uses_the_consumed_count():
    """A DataLoader with workers draws batches ahead of the loop, so the sampler's own
    count runs ahead; ``state_dict(consumed=n)`` resumes exactly after batch n."""
    n = 600
    labels, groups, scales = np.arange(n) % 3, np.arange(n) % 60, (np.arange(n) // 60) % 4

    def sampler():
        return MultiScaleBatchSampler(
            labels, groups, scales, classes_per_batch=2, groups_per_class=2, seed=3
        )

    straight = [
        b.tolist()
        for b in torch.utils.data.DataLoader(_Indices(), batch_sampler=sampler(), num_workers=0)
    ]
    s = sampler()
    loader = torch.utils.data.DataLoader(
        _Indices(), batch_sampler=s, num_workers=2, prefetch_factor=2
    )
    used = []
    for batch in loader:
        used.append(batch.tolist())
        if len(used) == 10:
            break
    assert s.state_dict()["position"] > 10  # the workers' prefetch, counted as handed out
    state = s.state_dict(consumed=10)
    resumed = sampler()
    resumed.load_state_dict(state)
    rest = [
        b.tolist()
        for b in torch.utils.data.DataLoader(_Indices(), batch_sampler=resumed, num_workers=0)
    ]
    assert used + rest == straight
    with pytest.raises(ValueError, match="consumed must be an integer"):
        s.state_dict(consumed=len(s) + 1)


def test_shuffled_batches_shard_each_global_batch_across_ranks():
    """Ranks take disjoint slices of each global batch, together every index of the
    full batches once; the same (seed, epoch) gives the same batches, another epoch not."""
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
    with pytest.raises(ValueError, match=match):
        ShuffledBatchSampler(50, **{"batch_size": 4, **kwargs})
