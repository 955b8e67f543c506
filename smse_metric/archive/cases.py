"""Results by case: patch neighbours grouped into the cases (patients, slides) they come
from, a suggested label by the cases' majority vote, and leave-one-case-out evaluation.

The rule: each query patch takes its ``k`` nearest archive patches; a case's *votes* are
how many of those (query, neighbour) pairs point into it. Cases rank by votes, then by
their best (smallest) distance, then by id. The suggested label is the majority label of
the top ``cases`` cases that have a label, one vote per case; a tie goes to the label
whose cases hold more patch votes, then to the smaller label; its vote share is its
votes over the voting cases.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._checks import check_choice, positive_int
from .index import ArchiveIndex, exact_search

__all__ = [
    "CaseEvaluation",
    "CaseMatch",
    "CaseSearch",
    "PatchMatch",
    "evaluate_cases",
    "search_cases",
]

SCALE_RULES = ("any", "same", "other")


@dataclass(frozen=True)
class PatchMatch:
    """One archive patch that a query patch found.

    Attributes:
        query: which query found it (its position among the queries).
        row: the archive row.
        distance: its distance to that query.
        scale: its scale (``""`` where unknown).
        source: where it came from (an image path).

    Examples:
        >>> PatchMatch(query=0, row=7, distance=0.25, scale="40", source="a.png").row
        7
    """

    query: int
    row: int
    distance: float
    scale: str
    source: str


@dataclass(frozen=True)
class CaseMatch:
    """One archive case and the patches by which the queries reached it.

    Attributes:
        case: the case (patient / slide) id.
        label: its label (``""`` where unknown).
        votes: (query, neighbour) pairs that point into it.
        distance: the best (smallest) distance of its patches.
        patches: those patches, nearest first.

    Examples:
        >>> CaseMatch("p1", "benign", votes=3, distance=0.1, patches=()).votes
        3
    """

    case: str
    label: str
    votes: int
    distance: float
    patches: tuple[PatchMatch, ...]


@dataclass(frozen=True)
class CaseSearch:
    """The top cases for one set of query patches, and the label they suggest.

    Attributes:
        cases: the top cases, best first.
        suggested: their majority label (None where no top case has a label).
        vote_share: the suggested label's share of the voting cases (0 if None).
        excluded_case: the query's own case, left out of the search.
        votes: cases per label among the top cases.

    Examples:
        >>> CaseSearch(cases=(), suggested=None, vote_share=0.0, excluded_case=None).votes
        {}
    """

    cases: tuple[CaseMatch, ...]
    suggested: str | None
    vote_share: float
    excluded_case: str | None
    votes: dict[str, int] = field(default_factory=dict)


def _allowed(index: ArchiveIndex, exclude_case: str | None, scale: str | None) -> Any:
    store = index.store
    mask = None
    if exclude_case is not None:
        mask = store.case != str(exclude_case)
    if scale is not None:
        at = store.scale == str(scale)
        mask = at if mask is None else mask & at
    return mask


def _neighbours(
    index: ArchiveIndex,
    queries: np.ndarray,
    query_scales: np.ndarray | None,
    k: int,
    exclude_case: str | None,
    scales: str,
) -> tuple[np.ndarray, np.ndarray]:
    """[Q, k] (dist, rows) with the case and scale rules applied."""
    if scales == "any" or query_scales is None:
        return index.search(queries, k, _allowed(index, exclude_case, None))
    dist = np.full((len(queries), k), np.inf, dtype=np.float32)
    rows = np.full((len(queries), k), -1, dtype=np.int64)
    base = _allowed(index, exclude_case, None)
    for s in np.unique(query_scales):  # one search per query scale
        pick = np.flatnonzero(query_scales == s)
        mask = base
        at = index.store.scale == str(s)
        at = at if scales == "same" else ~at
        mask = at if mask is None else mask & at
        dist[pick], rows[pick] = index.search(queries[pick], k, mask)
    return dist, rows


def search_cases(
    index: ArchiveIndex,
    queries: Any,
    *,
    k: int = 10,
    cases: int = 5,
    exclude_case: Any = None,
    query_scales: Sequence[Any] | None = None,
    scales: str = "any",
) -> CaseSearch:
    """The archive cases most like a set of query patches (one image, or several images
    of one case), by the rule in this module's docstring.

    Args:
        index: an `ArchiveIndex`.
        queries: [Q, D] embeddings of the query patches.
        k: archive patches per query patch.
        cases: how many cases to return (and to vote).
        exclude_case: the query's own case id when it is in the archive (left out).
        query_scales: [Q] each query's scale (for ``scales``).
        scales: ``"any"``; ``"same"`` (only archive patches at the query's scale) or
            ``"other"`` (only at other scales: cross-magnification retrieval).

    Examples:
        >>> import tempfile
        >>> from smse_metric.archive import EmbeddingStore
        >>> store = EmbeddingStore.create(tempfile.mkdtemp() + "/a", dim=2, model="m")
        >>> x = np.array([[0, 0], [0, 1], [5, 5], [5, 6]], dtype="float32")
        >>> _ = store.add(x, cases=["a", "a", "b", "b"], sources=list("0123"),
        ...               labels=["benign", "benign", "malignant", "malignant"])
        >>> found = search_cases(ArchiveIndex.build(store, "exact"), [[5, 5.5]], k=2)
        >>> [c.case for c in found.cases], found.suggested, found.vote_share
        (['b'], 'malignant', 1.0)
    """
    k, cases = positive_int("k", k), positive_int("cases", cases)
    check_choice("scales", scales, SCALE_RULES)
    q = np.asarray(queries, dtype=np.float32)
    if q.ndim == 1:
        q = q[None, :]
    qs = None
    if query_scales is not None:
        qs = np.asarray([str(s) for s in query_scales])
        if len(qs) != len(q):
            raise ValueError(f"query_scales has {len(qs)} values for {len(q)} queries")
    elif scales != "any":
        raise ValueError(f"scales={scales!r} needs query_scales")
    excluded = None if exclude_case is None else str(exclude_case)
    dist, rows = _neighbours(index, q, qs, k, excluded, scales)
    return _group(index, dist, rows, cases, excluded)


def _group(
    index: ArchiveIndex, dist: np.ndarray, rows: np.ndarray, top: int, excluded: str | None
) -> CaseSearch:
    store = index.store
    found = rows >= 0
    qi, col = np.nonzero(found)
    r = rows[qi, col]
    case_of, label_of = store.case[r], store.label[r]
    names, inverse = np.unique(case_of, return_inverse=True)
    votes = np.bincount(inverse, minlength=len(names))
    best = np.full(len(names), np.inf)
    np.minimum.at(best, inverse, dist[qi, col])
    order = np.lexsort((names, best, -votes))[:top]
    scale_of, source_of = store.scale[r], store.source[r]
    matches = []
    for c in order:
        at = np.flatnonzero(inverse == c)
        at = at[np.lexsort((r[at], dist[qi[at], col[at]]))]
        patches = tuple(
            PatchMatch(int(qi[j]), int(r[j]), float(dist[qi[j], col[j]]), str(scale_of[j]),
                       str(source_of[j]))
            for j in at
        )  # fmt: skip
        matches.append(
            CaseMatch(str(names[c]), str(label_of[at[0]]), int(votes[c]), float(best[c]), patches)
        )
    label_votes: dict[str, int] = {}
    patch_votes: dict[str, int] = {}
    for m in matches:
        if m.label:
            label_votes[m.label] = label_votes.get(m.label, 0) + 1
            patch_votes[m.label] = patch_votes.get(m.label, 0) + m.votes
    suggested, share = None, 0.0
    if label_votes:
        suggested = min(label_votes, key=lambda lab: (-label_votes[lab], -patch_votes[lab], lab))
        share = label_votes[suggested] / sum(label_votes.values())
    return CaseSearch(tuple(matches), suggested, share, excluded, label_votes)


@dataclass(frozen=True)
class CaseEvaluation:
    """Leave-one-case-out accuracy through one index (`evaluate_cases`).

    Attributes:
        case_accuracy: the share of cases whose suggested label is their label.
        patch_accuracy: the share of query patches whose k neighbours' majority label
            is their label.
        cases: cases evaluated.
        patches: query patches searched.

    Examples:
        >>> CaseEvaluation(case_accuracy=0.9, patch_accuracy=0.8, cases=10, patches=80).cases
        10
    """

    case_accuracy: float
    patch_accuracy: float
    cases: int
    patches: int


def evaluate_cases(
    index: ArchiveIndex,
    *,
    k: int = 10,
    cases: int = 5,
    per_case: int | None = 16,
    max_cases: int | None = None,
    seed: int = 0,
) -> CaseEvaluation:
    """Leave-one-case-out evaluation of the labelled live cases of the archive: each one's
    patches (``per_case`` drawn with ``seed``; None: all) search the archive without
    the case itself; the case is right when `search_cases` suggests its label, a patch
    when the majority label of its own k neighbours is its label (ties: the smaller).

    Args:
        index: the index to evaluate (an ``"exact"`` one gives the reference).
        k: archive patches per query patch.
        cases: cases that vote.
        per_case: query patches per case, or None for all of them.
        max_cases: evaluate this many cases drawn with ``seed`` (None: every case).
        seed: the draw of cases and patches.

    Examples:
        >>> import tempfile
        >>> from smse_metric.archive import EmbeddingStore
        >>> store = EmbeddingStore.create(tempfile.mkdtemp() + "/a", dim=1, model="m")
        >>> _ = store.add([[0], [0.1], [0.2], [5], [5.1], [5.2]], cases=list("abcdef"),
        ...               sources=list("abcdef"), labels=list("xxxyyy"))
        >>> r = evaluate_cases(ArchiveIndex.build(store, "exact"), k=2, cases=2)
        >>> r.case_accuracy, r.cases
        (1.0, 6)
    """
    store = index.store
    live = store.live
    labelled = live & (store.label != "")
    all_names, codes = np.unique(store.case, return_inverse=True)
    names = np.unique(codes[labelled])
    if len(names) == 0:
        raise ValueError(f"the archive {store.root} has no labelled case to evaluate")
    rng = np.random.default_rng(seed)
    if max_cases is not None and len(names) > positive_int("max_cases", max_cases):
        names = np.sort(rng.choice(names, size=max_cases, replace=False))
    queries = []
    for c in names:
        rows = np.flatnonzero((codes == c) & labelled)
        if per_case is not None and len(rows) > per_case:
            rows = np.sort(rng.choice(rows, size=per_case, replace=False))
        queries.append(rows)
    if index.index is None:  # exact: one pass over the store, own cases masked per query
        every = np.concatenate(queries)
        allowed = np.zeros(len(store), dtype=bool)
        allowed[: index.build_info.rows] = live[: index.build_info.rows]
        exclude = (codes[every].astype(np.int64), codes.astype(np.int64))
        distance, device = index.build_info.distance, index.device
        q = store.vectors(every)
        found_all = exact_search(store, q, k, distance, allowed, exclude=exclude, device=device)
        cuts = np.cumsum([0] + [len(r) for r in queries])
    right_cases = right_patches = n_patches = 0
    for j, (c, rows) in enumerate(zip(names, queries, strict=True)):
        truth = store.label[rows[0]]
        if index.index is None:
            dist, nb = (a[cuts[j] : cuts[j + 1]] for a in found_all)
        else:  # one filtered search per case
            dist, nb = index.search(store.vectors(rows), k, codes != c)
        found = _group(index, dist, nb, cases, str(all_names[c]))
        right_cases += found.suggested == truth
        for i in range(len(rows)):  # a few patches per case: plain counting
            labels = store.label[nb[i][nb[i] >= 0]]
            labels = labels[labels != ""]
            if len(labels):
                values, counts = np.unique(labels, return_counts=True)
                right_patches += values[np.argmax(counts)] == store.label[rows[i]]
        n_patches += len(rows)
    return CaseEvaluation(
        case_accuracy=right_cases / len(names),
        patch_accuracy=right_patches / n_patches,
        cases=len(names),
        patches=n_patches,
    )
