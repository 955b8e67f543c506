"""Naive references: plain Python loops over tiny inputs, written for clarity, not speed."""

from __future__ import annotations

import math

import numpy as np
import torch


def dist(u: torch.Tensor, v: torch.Tensor, squared: bool = False) -> torch.Tensor:
    sq = ((u - v) ** 2).sum()
    return sq if squared else sq.sqrt()


def _ref(emb, labels, ref_emb, ref_labels, scales, ref_scales):
    same = ref_emb is None
    if same:
        return emb, labels, scales, True
    return ref_emb, ref_labels, ref_scales, False


def selected(t: float, margin: float, strategy: str) -> bool:
    """PML's TripletMarginMiner rule on t = d(a,n) - d(a,p)."""
    if strategy == "easy":
        return t > margin
    ok = t <= margin
    if strategy == "hard":
        ok = ok and t <= 0
    if strategy == "semihard":
        ok = ok and t > 0
    return ok


def triplets(
    emb,
    labels,
    margin,
    strategy,
    squared=False,
    ref_emb=None,
    ref_labels=None,
    scales=None,
    ref_scales=None,
    cross_scale=False,
):
    """The set of (a, p, n) a strategy selects, by looping over all triplets."""
    ref, rlab, rsc, same = _ref(emb, labels, ref_emb, ref_labels, scales, ref_scales)
    out = set()
    with torch.no_grad():
        for a in range(len(emb)):
            pos = [p for p in range(len(ref)) if rlab[p] == labels[a] and not (same and p == a)]
            if cross_scale:
                pos = [p for p in pos if rsc[p] != scales[a]]
            neg = [n for n in range(len(ref)) if rlab[n] != labels[a]]
            if strategy == "batch_hard":
                if pos and neg:
                    hp = max(pos, key=lambda p: float(dist(emb[a], ref[p], squared)))
                    hn = min(neg, key=lambda n: float(dist(emb[a], ref[n], squared)))
                    out.add((a, hp, hn))
                continue
            for p in pos:
                for n in neg:
                    t = float(dist(emb[a], ref[n], squared) - dist(emb[a], ref[p], squared))
                    if selected(t, margin, strategy):
                        out.add((a, p, n))
    return out


def triplet_loss(
    emb,
    labels,
    margin,
    strategy,
    reduction,
    squared=False,
    ref_emb=None,
    ref_labels=None,
    scales=None,
    ref_scales=None,
    cross_scale=False,
):
    """Differentiable loss over the naive triplet selection."""
    sel = triplets(
        emb, labels, margin, strategy, squared, ref_emb, ref_labels, scales, ref_scales, cross_scale
    )
    ref = emb if ref_emb is None else ref_emb
    return _reduce_triplets(emb, ref, sorted(sel), margin, squared, reduction)


def _reduce_triplets(emb, ref, trip, margin, squared, reduction):
    terms = [
        torch.relu(dist(emb[a], ref[p], squared) - dist(emb[a], ref[n], squared) + margin)
        for a, p, n in trip
    ]
    total = torch.stack(terms).sum() if terms else (emb.sum() + ref.sum()) * 0
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / max(len(terms), 1)
    return total / max(sum(float(t.detach()) > 0 for t in terms), 1)


def triplet_loss_on(emb, ref, trip, margin, squared, reduction):
    return _reduce_triplets(
        emb, ref, list(zip(*[t.tolist() for t in trip], strict=True)), margin, squared, reduction
    )


def pairs(
    emb,
    labels,
    strategy="all",
    pos_margin=0.0,
    neg_margin=1.0,
    ref_emb=None,
    ref_labels=None,
    scales=None,
    ref_scales=None,
    cross_scale=False,
):
    ref, rlab, rsc, same = _ref(emb, labels, ref_emb, ref_labels, scales, ref_scales)
    P, N = set(), set()
    with torch.no_grad():
        for a in range(len(emb)):
            for j in range(len(ref)):
                d = float(dist(emb[a], ref[j]))
                if rlab[j] == labels[a]:
                    if (same and j == a) or (cross_scale and rsc[j] == scales[a]):
                        continue
                    if strategy == "all" or d > pos_margin:
                        P.add((a, j))
                elif strategy == "all" or d < neg_margin:
                    N.add((a, j))
    return P, N


def contrastive(
    emb,
    labels,
    margin,
    reduction,
    ref_emb=None,
    ref_labels=None,
    scales=None,
    ref_scales=None,
    cross_scale=False,
):
    P, N = pairs(
        emb,
        labels,
        "all",
        ref_emb=ref_emb,
        ref_labels=ref_labels,
        scales=scales,
        ref_scales=ref_scales,
        cross_scale=cross_scale,
    )
    ref = emb if ref_emb is None else ref_emb
    return contrastive_on(emb, ref, sorted(P), sorted(N), margin, reduction)


def contrastive_on(emb, ref, P, N, margin, reduction):
    terms = [0.5 * dist(emb[a], ref[p], squared=True) for a, p in P]
    for a, n in N:
        d = dist(emb[a], ref[n])
        terms.append(0.5 * torch.relu(margin - d) ** 2)
    total = torch.stack(terms).sum() if terms else emb.sum() * 0
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / max(len(terms), 1)
    return total / max(sum(float(t.detach()) > 0 for t in terms), 1)


def rfl(logits, target, alpha, gamma, beta=None):
    """Per-sample reinforced focal loss, straight from the formula."""
    out = []
    for i in range(len(target)):
        row = [float(v) for v in logits[i]]
        z = sum(math.exp(v - max(row)) for v in row)
        p = math.exp(row[int(target[i])] - max(row)) / z
        b = 1.0 if beta is None else float(beta[int(target[i])])
        out.append(b * alpha * (1 - p) ** gamma)
    return torch.tensor(out, dtype=torch.float64)


# --------------------------------------------------------------------------- search


def _eval_distance(a, b, distance):
    if distance == "cosine":
        return 1 - a @ b
    sq = ((a - b) ** 2).sum()
    return sq if distance == "squared_l2" else np.sqrt(sq)


def brute_neighbours(q, g, distance, k, q_groups=None, g_groups=None, self_ex=False):
    """Loop reference: distances in float64, ties by gallery index, exclusions applied."""
    q, g = q.astype(np.float64), g.astype(np.float64)
    if distance == "cosine":
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        g = g / np.linalg.norm(g, axis=1, keepdims=True)
    out = []
    for i in range(len(q)):
        cand = []
        for j in range(len(g)):
            if (self_ex and i == j) or (q_groups is not None and q_groups[i] == g_groups[j]):
                continue
            cand.append((_eval_distance(q[i], g[j], distance), j))
        cand.sort()
        out.append(cand[:k])
    return out


def brute_predict(neigh, g_labels, weights="uniform"):
    pred = []
    for row in neigh:
        votes = {}
        exact = [j for d, j in row if d <= 0]
        for d, j in row:
            w = 1.0 if weights == "uniform" else ((1.0 if j in exact else 0.0) if exact else 1 / d)
            votes[g_labels[j]] = votes.get(g_labels[j], 0.0) + w
        best = max(votes.values())
        pred.append(min(c for c, v in votes.items() if v == best))
    return np.array(pred)


def brute_self_neighbours(x, k, distance, groups=None):
    """k nearest other rows of every row (float64, ties by index), leave-one-group-out."""
    x = np.asarray(x, dtype=np.float64)
    if distance == "cosine":
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
    n = len(x)
    dist, ids = np.zeros((n, k)), np.zeros((n, k), dtype=np.int64)
    for i in range(n):
        rows = []
        for j in range(n):
            if j == i or (groups is not None and groups[j] == groups[i]):
                continue
            rows.append((_eval_distance(x[i], x[j], distance), j))
        rows.sort()
        dist[i] = [d for d, _ in rows[:k]]
        ids[i] = [j for _, j in rows[:k]]
    return dist, ids


def jitter_steps(img, aug):
    """Stain and colour jitter of [..., 3, H, W] images, one step at a time: optical
    density, each stain's concentration scaled and shifted, back to intensity, then
    brightness, contrast about the image's mean and saturation about each pixel's grey
    (the recipe's augmentation as first written)."""
    import torch

    from smse_metric.recipes.histopathology.data.breakhis import STAIN_VECTORS

    he = torch.tensor(STAIN_VECTORS, dtype=torch.float64)
    he = he / he.norm(dim=1, keepdim=True)
    he_pinv = torch.linalg.pinv(he)
    img, aug = img.double(), aug.double()
    lead = img.shape[:-3]
    scale = aug[..., 7:10].reshape(*lead, 1, 1, 3)
    shift = aug[..., 10:13].reshape(*lead, 1, 1, 3)
    bright, contrast, sat = (aug[..., i].reshape(*lead, 1, 1, 1) for i in (13, 14, 15))
    od = -torch.log(img.clamp_min(1 / 255))
    conc = od.movedim(-3, -1) @ he_pinv
    img = torch.exp(-((conc * scale + shift) @ he).movedim(-1, -3))
    img = img * bright
    mean = img.mean((-3, -2, -1), keepdim=True)
    img = (img - mean) * contrast + mean
    gray = img.mean(-3, keepdim=True)
    img = (img - gray) * sat + gray
    return img.clamp(0, 1)
