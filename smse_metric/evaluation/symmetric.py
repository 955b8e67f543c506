"""Exact leave-one-out k-nearest neighbours of a set within itself, at half the cost.

When the queries are the gallery (leave-one-out, leave-one-patient-out), the similarity
matrix is symmetric: block ``(I, J)`` of ``X @ X.T`` serves the queries of block ``I``
(its rows) and those of block ``J`` (its columns). Computing each pair of blocks once
halves the matrix products a flat index would do. Selection keeps, per query, its
current k best and their threshold (the k-th value); a block's entries can only enter
where a tile of 32 entries could beat it (its maximum with its smallest id, as a
(similarity, id) key), so almost all of the block is rejected by one tile-maximum pass,
ties included, and the few candidates are merged exactly. Where a block holds more
candidates than k per query (ties against earlier rows, early blocks), each query takes
its k best entries of the block directly: a float top-k gives its k-th similarity, and
of the entries equal to it the first in id order complete the k. Ties are broken by
index, so the result is the k smallest by ``(distance, index)``: the same rule as
[`KNNClassifier`][smse_metric.evaluation.KNNClassifier].

L2 uses ``x_i . x_j - (|x_i|^2/2 + |x_j|^2/2) = -d(i, j)^2 / 2``, symmetric in
``i, j`` term by term like the cosine similarity, so one entry serves both.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .._checks import resolve_distance
from ._keys import EMPTY, LOW, distances, factors, order_keys, similarity

__all__ = ["symmetric_knn"]

BLOCK = 2048  #: rows per block on the CPU: a [BLOCK, BLOCK] float32 block is 16 MiB
#: rows per block on a GPU, the largest whose working set fits (`default_block`): each
#: block pair costs a few host syncs and ~60 launches, so fewer, larger pairs win there
GPU_BLOCKS = (32768, 16384, 8192, 4096)
#: float32 [block, block] matrices alive at once at worst (the block, a padded or masked
#: copy, the crowded-block selection's two): the budget of `default_block`
_BLOCK_COPIES = 4
TILE = 32  #: entries per tile of the rejection pass
_NO_KEY = torch.iinfo(torch.int64).max  #: the bar of padding: admits nothing
_FLOOR = torch.finfo(torch.float32).min  # masked (-inf) entries never reach a threshold
#: the lowest key of a finite similarity: masked (-inf) entries stay below every bar
_FLOOR_KEY = int(order_keys(torch.tensor([_FLOOR]), torch.tensor([LOW])))


def _merge(state: Tensor, rows: Tensor, keys: Tensor) -> None:
    """Merge candidate keys into the running top-k keys of their rows, in place."""
    if rows.numel() == 0:
        return
    urows, inv, counts = torch.unique(rows, return_inverse=True, return_counts=True)
    order = torch.argsort(inv, stable=True)
    pos = torch.empty_like(inv)
    pos[order] = torch.arange(len(inv), device=inv.device) - (counts.cumsum(0) - counts)[inv[order]]
    dense = keys.new_full((len(urows), int(counts.max())), EMPTY)
    dense[inv, pos] = keys
    state[urows] = torch.cat([state[urows], dense], 1).topk(state.shape[1], dim=1).values


def _candidates(
    s: Tensor, ids: Tensor, bar: Tensor, k: int, by_column: bool = False
) -> tuple[Tensor, Tensor]:
    """(queries, keys): candidate keys of the entries of ``s`` [R, C] (both multiples
    of TILE) that beat their query's bar, for the row queries (``bar[r]``, ``ids`` of
    the columns) or, ``by_column``, the column queries (``bar[c]``, ``ids`` of the rows).
    A tile of TILE entries is rejected whole when even its best similarity with its
    smallest id cannot beat the bar; where more than k tiles per query remain, each
    query takes the k best keys of the block instead."""
    r, c = s.shape
    axis = 0 if by_column else 1
    if by_column:
        tiles, tile_ids = s.view(r // TILE, TILE, c), ids.view(r // TILE, TILE)
        admit = order_keys(tiles.amax(1), tile_ids.amin(1)[:, None]) > bar[None, :]
    else:
        tiles, tile_ids = s.view(r, c // TILE, TILE), ids.view(c // TILE, TILE)
        admit = order_keys(tiles.amax(2), tile_ids.amin(1)[None, :]) > bar[:, None]
    n_queries = c if by_column else r
    if admit.sum() > k * n_queries:
        return _best_keys(s, ids, k, axis)
    tr, tc = admit.nonzero(as_tuple=True)
    if by_column:
        keys = order_keys(tiles[tr, :, tc], tile_ids[tr])
        j, off = (keys > bar[tc, None]).nonzero(as_tuple=True)
        return tc[j], keys[j, off]
    keys = order_keys(tiles[tr, tc], tile_ids[tc])
    j, off = (keys > bar[tr, None]).nonzero(as_tuple=True)
    return tr[j], keys[j, off]


def _best_keys(s: Tensor, ids: Tensor, k: int, axis: int) -> tuple[Tensor, Tensor]:
    """(queries, keys): every query's k best finite entries of ``s`` by (similarity,
    smallest id), queries along ``1 - axis``, ``ids`` along ``axis``. The float top-k
    gives the k-th similarity; entries above it are in, and of the entries equal to it
    the first ones in id order fill the rest: no key is formed for the entries not
    taken, which are most of them when ties crowd a block."""
    if ids.numel() > 1 and bool((ids[1:] < ids[:-1]).any()):  # groups reorder the rows
        order = ids.argsort()
        s, ids = s.index_select(axis, order), ids[order]
    kk = min(k, s.shape[axis])
    top = s.topk(kk, dim=axis)
    kth = top.values.narrow(axis, kk - 1, 1).clamp_min(_FLOOR)
    # the entries above the k-th similarity are among the top k: no pass over s for them
    above = top.values > kth
    need = kk - above.sum(axis, keepdim=True)
    # the kk first tied positions of each query (fewer may exist: -inf, dropped below)
    place = torch.arange(s.shape[axis], device=s.device, dtype=s.dtype)
    place = -(place[:, None] if axis == 0 else place[None, :])
    first = torch.where(s == kth, place, float("-inf")).topk(kk, dim=axis)
    rank = torch.arange(kk, device=s.device)
    rank = rank[:, None] if axis == 0 else rank[None, :]
    tied = (rank < need) & (first.values > float("-inf"))
    ra, ca = above.nonzero(as_tuple=True)
    rt, ct = tied.nonzero(as_tuple=True)
    if axis == 0:  # the queries are the columns
        rows = torch.cat([top.indices[ra, ca], first.indices[rt, ct]])
        cols = torch.cat([ca, ct])
        return cols, order_keys(s[rows, cols], ids[rows])
    rows = torch.cat([ra, rt])
    cols = torch.cat([top.indices[ra, ca], first.indices[rt, ct]])
    return rows, order_keys(s[rows, cols], ids[cols])


def block_candidates(
    sim: Tensor,
    ids: Tensor,
    state: Tensor,
    q_codes: Tensor | None = None,
    g_codes: Tensor | None = None,
    by_column: bool = False,
) -> tuple[Tensor, Tensor]:
    """(queries, keys): the entries of ``sim`` [R', C'] (both multiples of `TILE`,
    padded entries ``-inf``) that may enter the running top-k ``state`` [R, k] of its
    first R rows, for columns of ``ids`` [C] (padded with the largest id), by the
    tile-maximum rejection of `symmetric_knn`; ``by_column``: of its first C columns
    (``state`` [C, k]), for rows of ``ids`` [R]. Entries whose query's ``q_codes``
    equals their gallery item's ``g_codes`` never qualify; they are dropped among the
    admitted tiles' entries only, so the block is masked whole only where ties crowd
    it."""
    n_q, k = state.shape
    axis = 0 if by_column else 1
    pad_q = sim.shape[1 - axis] - n_q
    pad_ids = torch.nn.functional.pad(ids, (0, sim.shape[axis] - ids.shape[0]), value=LOW)
    bar = _bar(state, pad_q)
    if q_codes is None or g_codes is None:
        return _candidates(sim, pad_ids, bar, k, by_column)
    tile_ids = pad_ids.view(-1, TILE)
    if by_column:
        tiles = sim.view(sim.shape[0] // TILE, TILE, sim.shape[1])
        admit = order_keys(tiles.amax(1), tile_ids.amin(1)[:, None]) > bar[None, :]
    else:
        tiles = sim.view(sim.shape[0], sim.shape[1] // TILE, TILE)
        admit = order_keys(tiles.amax(2), tile_ids.amin(1)[None, :]) > bar[:, None]
    if admit.sum() > k * sim.shape[1 - axis]:  # crowded (an empty state, ties): mask, then best
        same = q_codes[:, None] == g_codes[None, :]
        pad = sim.shape[axis] - g_codes.shape[0]
        if by_column:
            same = torch.nn.functional.pad(same.T, (0, 0, 0, pad))
            return _best_keys(sim[:, :n_q].masked_fill(same, float("-inf")), pad_ids, k, 0)
        same = torch.nn.functional.pad(same, (0, pad))
        return _best_keys(sim[:n_q].masked_fill(same, float("-inf")), pad_ids, k, 1)
    g_tiles = torch.nn.functional.pad(g_codes, (0, sim.shape[axis] - len(g_codes)), value=-1)
    g_tiles = g_tiles.view(-1, TILE)
    if by_column:
        tg, tq = admit.nonzero(as_tuple=True)
        keys = order_keys(tiles[tg, :, tq], tile_ids[tg])
    else:
        tq, tg = admit.nonzero(as_tuple=True)
        keys = order_keys(tiles[tq, tg], tile_ids[tg])
    other = q_codes[tq.clamp_max(n_q - 1), None] != g_tiles[tg]
    j, off = ((keys > bar[tq, None]) & other).nonzero(as_tuple=True)
    return tq[j], keys[j, off]


def best_keys(sim: Tensor, ids: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(rows, keys): the candidates among which every row of ``sim`` [R, C] (masked
    entries ``-inf``) finds its k best finite entries by (similarity, smallest of
    ``ids`` [C]): the entries at or above its k-th similarity, or, where ties crowd
    them, exactly its k best (`_best_keys`). No key is formed for the others."""
    tau = sim.topk(k, dim=1).values[:, -1:].clamp_min(_FLOOR)
    reach = sim >= tau  # the k best, and whatever ties with the k-th
    if reach.sum() <= 2 * k * sim.shape[0]:
        r, c = reach.nonzero(as_tuple=True)
        return r, order_keys(sim[r, c], ids[c])
    return _best_keys(sim, ids, k, 1)


def merge_keys(state: Tensor, rows: Tensor, keys: Tensor) -> None:
    """Merge candidate ``keys`` into the running top-k keys ``state`` [N, k] of
    ``rows``, in place."""
    _merge(state, rows, keys)


def default_block(device: torch.device, n: int) -> int:
    """Rows per block: `BLOCK` on the CPU; on a GPU the largest of `GPU_BLOCKS` not
    above ``n`` (rounded up to a tile) whose working set takes at most half the free
    memory, at least `BLOCK`. The neighbours do not depend on it."""
    if device.type != "cuda":
        return BLOCK
    free = torch.cuda.mem_get_info(device)[0]
    need = -(-n // TILE) * TILE
    for block in GPU_BLOCKS:
        if block <= max(need, BLOCK) and _BLOCK_COPIES * 4 * block * block <= free // 2:
            return block
    return BLOCK


def _bar(state: Tensor, pad: int) -> Tensor:
    """Each row's k-th key, at least the lowest key of a finite similarity (masked
    entries never enter), padded with the largest key (admits nothing)."""
    bar = state[:, -1].clamp_min(_FLOOR_KEY)
    return torch.cat([bar, bar.new_full((pad,), _NO_KEY)])


def self_search_rows(x: np.ndarray | Tensor, k: int, device: str | torch.device | None) -> Tensor:
    """``x`` as float32 [N, D] on ``device`` (default: where it is; numpy: the CPU) for
    a search of every row's ``k`` nearest other rows; a ValueError names a bad shape
    or ``k``."""
    if isinstance(x, torch.Tensor):
        dev = torch.device(device) if device is not None else x.device
        x = x.detach().to(dev, torch.float32)
    else:
        x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device or "cpu")
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D [N, D], got shape {tuple(x.shape)}")
    n = x.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, {n - 1}] for {n} rows, got {k}")
    return x


def symmetric_knn(
    x: np.ndarray | Tensor,
    k: int,
    distance: str | None = None,
    groups: np.ndarray | None = None,
    block: int | None = None,
    device: str | torch.device | None = None,
    *,
    metric: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest other rows of every row of ``x``, exactly.

    Args:
        x: [N, D] float32 embeddings, numpy or torch on any device; for ``"cosine"``
            they are L2-normalised here.
        k: neighbours per row; every row needs at least k usable others.
        distance: ``"cosine"`` (default; ``1 - cos``), ``"l2"`` (euclidean) or
            ``"squared_l2"`` (its square: the same neighbours).
        groups: [N] group of each row; rows of a row's own group are excluded
            (leave-one-group-out). Without it only the row itself is excluded.
        block: rows per block (a multiple of 32); default `default_block`: 2048 on
            the CPU, up to 32768 on a GPU with the memory for it.
        device: where to search (default: where ``x`` is; numpy: the CPU). Equal
            distances order by index on every device, but a GPU's float32 products
            round differently from the CPU's: neighbours one ulp apart on one device
            may tie on the other and swap (seen on an H100 at N = 10^5).
        metric: the old name of ``distance``; deprecated, warns.

    Returns:
        ``(dist, ids)``, two [N, k] arrays ordered by distance, then index.

    Examples:
        >>> x = np.array([[0.0], [1.0], [3.0], [7.0]], dtype="float32")
        >>> dist, ids = symmetric_knn(x, k=2, distance="l2")
        >>> ids.tolist(), dist[:, 0].tolist()
        ([[1, 2], [0, 2], [1, 0], [2, 1]], [1.0, 1.0, 2.0, 4.0])
        >>> symmetric_knn(x, k=1, distance="l2", groups=np.array([0, 0, 1, 1]))[1].ravel().tolist()
        [2, 2, 1, 1]
    """
    distance = resolve_distance(distance, "cosine", metric=metric)
    x = self_search_rows(x, k, device)
    dev, n = x.device, x.shape[0]
    if block is None:
        block = default_block(dev, n)
    if block < TILE or block % TILE:
        raise ValueError(f"block must be a positive multiple of {TILE}, got {block}")
    perm = np.argsort(groups, kind="stable") if groups is not None else np.arange(n)
    orig = torch.from_numpy(perm.astype(np.int64)).to(dev)
    xp = x if groups is None else x[orig]  # without groups the order is the identity
    f = factors(xp, distance)
    g = None if groups is None else torch.from_numpy(np.asarray(groups)[perm]).to(dev)
    state = torch.full((n, k), EMPTY, dtype=torch.int64, device=dev)
    bounds = [(s, min(s + block, n)) for s in range(0, n, block)]
    for s, e in bounds:  # each block against itself: the first k of every row
        sim = similarity(f.take(s, e), f.take(s, e).padded(), e - s)
        sim.fill_diagonal_(float("-inf"))
        if g is not None:
            sim.masked_fill_(g[s:e, None] == g[None, s:e], float("-inf"))
        rows, keys = best_keys(sim, orig[s:e], min(k, e - s))
        _merge(state, rows + s, keys)
    for bi, (s, e) in enumerate(bounds):
        for t, u in bounds[bi + 1 :]:
            sim = similarity(f.take(s, e), f.take(t, u).padded(), u - t)
            if g is not None and g[e - 1] >= g[t]:  # sorted groups: only edges overlap
                sim.masked_fill_(g[s:e, None] == g[None, t:u], float("-inf"))
            pad_r, pad_c = -(e - s) % TILE, -(u - t) % TILE
            if pad_r or pad_c:
                sim = torch.nn.functional.pad(sim, (0, pad_c, 0, pad_r), value=float("-inf"))
            col_ids = torch.nn.functional.pad(orig[t:u], (0, pad_c), value=LOW)
            row_ids = torch.nn.functional.pad(orig[s:e], (0, pad_r), value=LOW)
            rows, keys = _candidates(sim, col_ids, _bar(state[s:e], pad_r), k)
            _merge(state, rows + s, keys)
            cols, keys = _candidates(sim, row_ids, _bar(state[t:u], pad_c), k, by_column=True)
            _merge(state, cols + t, keys)
    out = torch.empty_like(state)
    out[orig] = state  # back to the input's row order
    dist, ids = distances(out, distance)
    return dist.cpu().numpy(), ids.cpu().numpy()
