"""Results by case: grouping, votes and the suggested label against a plain loop; own
case and scale rules; leave-one-case-out evaluation, exact and approximate."""

from collections import Counter, defaultdict

import numpy as np
import pytest
from helpers import needs_faiss
from hypothesis import given, settings
from hypothesis import strategies as st

from smse_metric.archive import ArchiveIndex, EmbeddingStore, evaluate_cases, search_cases


def archive(tmp_path, n=400, cases=40, seed=0, dim=8, labels=3):
    rng = np.random.default_rng(seed)
    case = rng.integers(0, cases, n)
    label = case % labels
    centres = rng.normal(size=(labels, dim)) * 3
    x = (centres[label] + rng.normal(size=(n, dim))).astype(np.float32)
    s = EmbeddingStore.create(tmp_path / f"a{seed}", dim=dim, model="m", dtype="float32")
    s.add(x, cases=[f"c{c}" for c in case], sources=[f"{i}.png" for i in range(n)],
          labels=[f"L{v}" for v in label], scales=rng.choice([40, 100], n))  # fmt: skip
    return s, x


def naive(store, dist, rows, top):
    """The documented rule, by loops over (query, neighbour) pairs."""
    votes, best = Counter(), {}
    for qd, qr in zip(dist, rows, strict=True):
        for d, r in zip(qd, qr, strict=True):
            if r < 0:
                continue
            c = store.case[r]
            votes[c] += 1
            best[c] = min(best.get(c, np.inf), d)
    ranked = sorted(votes, key=lambda c: (-votes[c], best[c], c))[:top]
    label_of = {store.case[r]: store.label[r] for r in range(len(store))}
    per_label, patch = Counter(), Counter()
    for c in ranked:
        if label_of[c]:
            per_label[label_of[c]] += 1
            patch[label_of[c]] += votes[c]
    suggested = min(per_label, key=lambda v: (-per_label[v], -patch[v], v), default=None)
    share = per_label[suggested] / sum(per_label.values()) if suggested else 0.0
    return [(c, votes[c]) for c in ranked], suggested, share


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 500), q=st.integers(1, 6), k=st.integers(1, 12), top=st.integers(1, 6))
def test_cases_votes_and_suggestion_follow_the_rule(tmp_path_factory, seed, q, k, top):
    s, x = archive(tmp_path_factory.mktemp("c"), n=120, cases=12, seed=seed)
    index = ArchiveIndex.build(s, "exact", probes=10)
    queries = x[:q] + 0.3
    found = search_cases(index, queries, k=k, cases=top)
    dist, rows = index.search(queries, k)
    ranked, suggested, share = naive(s, dist, rows, top)
    assert [(c.case, c.votes) for c in found.cases] == ranked
    assert (found.suggested, found.vote_share) == (suggested, pytest.approx(share))
    for c in found.cases:  # its patches: every pair that points into it, nearest first
        assert len(c.patches) == c.votes
        assert all(s.case[p.row] == c.case for p in c.patches)
        assert c.distance == min(p.distance for p in c.patches)
        assert [p.distance for p in c.patches] == sorted(p.distance for p in c.patches)


def test_the_own_case_and_other_scales_are_left_out(tmp_path):
    s, x = archive(tmp_path)
    index = ArchiveIndex.build(s, "exact", probes=10)
    own = s.case[0]
    found = search_cases(index, x[:1], k=20, cases=10, exclude_case=own)
    assert own not in [c.case for c in found.cases] and found.excluded_case == own
    scales = s.scale[:5]
    for rule, same in (("same", True), ("other", False)):
        found = search_cases(index, x[:5], k=8, cases=40, query_scales=scales, scales=rule)
        for c in found.cases:
            for p in c.patches:
                assert (p.scale == scales[p.query]) == same
    with pytest.raises(ValueError, match="scales='same' needs query_scales"):
        search_cases(index, x[:1], scales="same")
    with pytest.raises(ValueError, match="scales must be one of"):
        search_cases(index, x[:1], scales="cross")


def test_unlabelled_cases_do_not_vote(tmp_path):
    s = EmbeddingStore.create(tmp_path / "u", dim=1, model="m", dtype="float32")
    s.add([[0.0], [0.1], [0.2]], cases=["u1", "u2", "a"], sources="xyz", labels=["", "", "L"])
    found = search_cases(ArchiveIndex.build(s, "exact", probes=3), [[0.0]], k=3, cases=3)
    assert [c.case for c in found.cases] == ["u1", "u2", "a"]
    assert (found.suggested, found.vote_share, found.votes) == ("L", 1.0, {"L": 1})
    found = search_cases(ArchiveIndex.build(s, "exact", probes=3), [[0.0]], k=2, cases=2)
    assert (found.suggested, found.vote_share) == (None, 0.0)


def naive_loco(store, index, k, top):
    """Leave-one-case-out by loops over cases and patches (every patch a query)."""
    right_cases = right_patches = n = 0
    by_case = defaultdict(list)
    for r in range(len(store)):
        by_case[store.case[r]].append(r)
    for c, rows in sorted(by_case.items()):
        allowed = store.case != c
        dist, nb = index.search(store.vectors(rows), k, allowed)
        _, suggested, _ = naive(store, dist, nb, top)
        right_cases += suggested == store.label[rows[0]]
        for j, r in enumerate(rows):
            votes = Counter(store.label[i] for i in nb[j] if i >= 0)
            best = min(votes, key=lambda v: (-votes[v], v))
            right_patches += best == store.label[r]
            n += 1
    return right_cases / len(by_case), right_patches / n


def test_leave_one_case_out_is_the_loop_over_cases(tmp_path):
    s, _ = archive(tmp_path, n=200, cases=20)
    index = ArchiveIndex.build(s, "exact", probes=10)
    got = evaluate_cases(index, k=5, cases=3, per_case=None)
    want = naive_loco(s, index, 5, 3)
    assert (got.case_accuracy, got.patch_accuracy) == pytest.approx(want)
    assert (got.cases, got.patches) == (20, 200)
    assert got.case_accuracy > 0.9  # well-separated labels: the rule works at all


def test_a_constant_archive_scores_chance_not_perfect(tmp_path):
    """A control: identical vectors carry no information, so the case vote is the
    majority label of the other cases, wrong for the minority cases."""
    s = EmbeddingStore.create(tmp_path / "z", dim=2, model="m", dtype="float32")
    cases = np.repeat(np.arange(10), 3)
    labels = np.where(cases < 7, "a", "b")
    s.add(np.zeros((30, 2)), cases=cases, sources=np.arange(30), labels=labels)
    r = evaluate_cases(ArchiveIndex.build(s, "exact", probes=5), k=3, cases=1, per_case=None)
    assert r.case_accuracy == pytest.approx(0.7)


@needs_faiss
@pytest.mark.parametrize("kind", ["ivf_flat", "ivf_pq", "hnsw"])
def test_an_approximate_index_scores_close_to_exact(tmp_path, kind):
    s, _ = archive(tmp_path, n=3000, cases=150, dim=16)
    exact = evaluate_cases(ArchiveIndex.build(s, "exact", probes=10), per_case=8)
    approx = ArchiveIndex.build(s, kind, recall=0.95, probes=300, pq_bytes=4)
    got = evaluate_cases(approx, per_case=8)
    assert got.patches == exact.patches == 150 * 8
    assert abs(got.case_accuracy - exact.case_accuracy) <= 0.02
    assert abs(got.patch_accuracy - exact.patch_accuracy) <= 0.02


def test_an_archive_without_labels_cannot_be_evaluated(tmp_path):
    s = EmbeddingStore.create(tmp_path / "n", dim=1, model="m")
    s.add([[0.0], [1.0]], cases="ab", sources="ab")
    with pytest.raises(ValueError, match="no labelled case"):
        evaluate_cases(ArchiveIndex.build(s, "exact", probes=2))


def test_a_tie_between_labels_goes_to_more_patch_votes_then_the_smaller_label(tmp_path):
    s = EmbeddingStore.create(tmp_path / "t", dim=1, model="m", dtype="float32")
    s.add([[0.0], [0.1], [0.2], [0.3]], cases=["b1", "b1", "a1", "c1"], sources="wxyz",
          labels=["B", "B", "A", "C"])  # fmt: skip
    index = ArchiveIndex.build(s, "exact", probes=4)
    found = search_cases(index, [[0.0]], k=3, cases=2)  # b1: 2 votes, a1: 1; one case each
    assert (found.suggested, found.vote_share) == ("B", 0.5)
    found = search_cases(index, [[0.15]], k=2, cases=2)  # one vote each: the smaller label
    assert [c.case for c in found.cases] == ["a1", "b1"] and found.suggested == "A"
