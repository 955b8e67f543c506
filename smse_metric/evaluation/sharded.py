"""Exact k-nearest neighbours over the ranks of a ``torch.distributed`` process group.

Each rank holds a shard of the queries and a shard of the gallery. Gallery shards are
broadcast one at a time (each rank receives every other shard once and holds at most
one besides its input), every rank merges the candidates of each shard into the running
top-k of its own queries, and nothing else travels but per-image metadata (labels,
groups, scales) and the per-query results (`sharded_rounds`). Where every rank's queries
are its gallery shard (leave-one-out), the shards travel a ring instead and each pair
of rows is computed once for both (`symmetric_rounds`): half the products. The answer
is the one a single process gives for the shards concatenated in rank order: the same
arithmetic as [`TorchIndex`][smse_metric.evaluation.TorchIndex] (one product of the
same rows per entry, between row counts padded alike, so that every entry rounds alike
whatever the shard sizes), neighbour ids in the concatenated gallery, and the same
order (similarity, then index; then, like `KNNClassifier`, distance, then index).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from ._inputs import CHUNK_ENTRIES, prepare_vectors
from ._keys import EMPTY, ROWS, Rows, block_product, distances, factors
from .symmetric import BLOCK, block_candidates, merge_keys

if TYPE_CHECKING:
    from .knn import KNNClassifier, Neighbours

__all__ = ["gather_arrays", "local_vectors", "shard_layout", "sharded_rounds", "symmetric_rounds"]

#: whether a leave-one-out search of the shards themselves takes `symmetric_rounds`
#: (half the products); False keeps `sharded_rounds` (benchmarks compare the two)
RING = True


def rank_and_world(group: Any = None) -> tuple[int, int]:
    """(this rank, ranks) of ``group``; a RuntimeError without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "distributed=True needs an initialised torch.distributed process group "
            "(torch.distributed.init_process_group, as torchrun's processes do)"
        )
    return dist.get_rank(group), dist.get_world_size(group)


def _device(group: Any) -> torch.device:
    """Where collectives of ``group`` take tensors: this rank's GPU under NCCL."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_objects(obj: Any, group: Any = None) -> list[Any]:
    """Every rank's ``obj``, in rank order (``all_gather_object``).

    Args:
        obj: this rank's picklable value.
        group: the process group (None: the default one).
    """
    _, world = rank_and_world(group)
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj, group=group)
    return out


def agree(error: str | None, meta: dict[str, Any], group: Any = None) -> list[dict[str, Any]]:
    """Every rank's ``meta``, after checking on every rank that no rank failed its own
    input checks (``error``) and that the ranks agree on each key of ``meta`` (keys
    starting with ``_`` may differ; a ``None`` value is an empty shard's and agrees with
    anything). Raises the same ValueError on every rank, naming the rank and the key.

    Args:
        error: this rank's input error, or None.
        meta: this rank's settings and shapes.
        group: the process group.
    """
    items = gather_objects((error, meta), group)
    for rank, (e, _) in enumerate(items):
        if e is not None:
            raise ValueError(f"rank {rank} of the process group: {e}")
    metas = [m for _, m in items]
    for key in metas[0]:
        if key.startswith("_"):
            continue
        values = [(r, m[key]) for r, m in enumerate(metas) if m[key] is not None]
        if any(v != values[0][1] for _, v in values):
            shown = ", ".join(f"rank {r}: {v!r}" for r, v in values)
            raise ValueError(f"the ranks disagree on {key} ({shown})")
    return metas


def gather_arrays(local: np.ndarray | None, group: Any = None) -> np.ndarray | None:
    """The ranks' arrays concatenated in rank order (None where every rank has None).

    Args:
        local: this rank's [n] array (labels, groups, scales), or None.
        group: the process group.
    """
    parts = gather_objects(local, group)
    if all(p is None for p in parts):
        return None
    if any(p is None for p in parts):
        raise ValueError("some ranks give groups or scales and others do not")
    return np.concatenate(parts)


def local_vectors(name: str, x: Any) -> np.ndarray:
    """[n, D] float32 embeddings of this rank's shard; unlike a single process's, a
    shard may be empty ([0, D] or [0])."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    arr = np.ascontiguousarray(x, dtype=np.float32)
    if arr.ndim == 1 and arr.size == 0:
        return arr.reshape(0, 0)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D [N, D], got shape {arr.shape}")
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).any(1).sum())
        raise ValueError(f"{name} has {bad} rows with NaN or inf")
    return arr


def shard_layout(n_local: int, group: Any = None) -> tuple[list[int], int]:
    """(rows of every rank's shard, this rank's first global row).

    Args:
        n_local: rows of this rank's shard.
        group: the process group.
    """
    rank, _ = rank_and_world(group)
    sizes = [int(s) for s in gather_objects(int(n_local), group)]
    return sizes, sum(sizes[:rank])


def _layout(shard: np.ndarray, dim: int, group: Any) -> tuple[list[int], list[int], int]:
    """(every rank's shard rows, their first global rows and the total, the embedding
    dimension: a rank with an empty shard takes the others' or ``dim``)."""
    sizes, _ = shard_layout(len(shard), group)
    dims = {d for d in gather_objects(shard.shape[1] if len(shard) else None, group) if d}
    offsets = np.concatenate([[0], np.cumsum(sizes)]).tolist()
    return sizes, offsets, dims.pop() if dims else dim


def sharded_rounds(
    queries: np.ndarray,
    query_codes: np.ndarray | None,
    gallery: np.ndarray,
    gallery_codes: np.ndarray | None,
    width: int,
    distance: str,
    group: Any = None,
) -> Iterator[tuple[slice, np.ndarray, np.ndarray]]:
    """``(rows, dist, ids)`` for consecutive rounds of local queries (each round's
    top-k under `CHUNK_ENTRIES` keys): their ``width`` nearest items of the union of
    the ranks' gallery shards, ids in the concatenated gallery, by (similarity, index)
    and then, stably, by (distance, index); an item whose code equals the query's is
    never a neighbour (``inf`` / ``-1`` where too few remain). Every rank must run it
    to the end (a collective), with any number of rows, even none.

    Args:
        queries: [q, D] this rank's queries, as `prepare_vectors` leaves them.
        query_codes: [q] exclusion code of each query (int64), or None.
        gallery: [g, D] this rank's gallery shard, prepared alike.
        gallery_codes: [g] their codes in the same table, or None.
        width: neighbours per query (the same on every rank is not required).
        distance: ``"cosine"``, ``"l2"`` or ``"squared_l2"``.
        group: the process group.
    """
    rank, world = rank_and_world(group)
    device = _device(group)
    sizes, offsets, dim = _layout(gallery, queries.shape[1], group)
    a = factors(torch.from_numpy(queries).to(device), distance) if len(queries) else None
    qc = None if query_codes is None else torch.from_numpy(query_codes).to(device)
    width = max(width, 0)
    # rounds of queries whose running top-k stays under CHUNK_ENTRIES keys (deep
    # ranking metrics want thousands); every rank takes as many rounds as the busiest
    per_round = max(1, CHUNK_ENTRIES // max(width, 1))
    rounds = max(gather_objects(-(-len(queries) // per_round) if width else 0, group))
    for r in range(rounds):
        lo, hi = min(len(queries), r * per_round), min(len(queries), (r + 1) * per_round)
        state = torch.full((hi - lo, width), EMPTY, dtype=torch.int64, device=device)
        for src in range(world):
            n = sizes[src]
            if n == 0:
                continue
            root = src if group is None else dist.get_global_rank(group, src)
            padded = max(ROWS, -(-n // ROWS) * ROWS)  # as `Rows.padded` leaves the shard
            b = None  # the previous shard goes before the next comes: one in flight
            if src == rank:  # the root pads a copy of its shard for this broadcast only
                b = factors(torch.from_numpy(gallery).to(device), distance).padded()
            else:
                h = None if distance == "cosine" else torch.empty(padded, device=device)
                b = Rows(torch.empty(padded, dim, device=device), h)
            dist.broadcast(b.x, root, group=group)
            if b.h is not None:
                dist.broadcast(b.h, root, group=group)
            codes = None
            if gallery_codes is not None:
                codes = (
                    torch.from_numpy(gallery_codes).to(device)
                    if src == rank
                    else torch.empty(n, dtype=torch.int64, device=device)
                )
                dist.broadcast(codes, root, group=group)
            if a is None or hi == lo:
                continue
            ids = torch.arange(offsets[src], offsets[src] + n, device=device)
            for s in range(lo, hi, BLOCK):  # blocks of queries x blocks of the shard
                for t in range(0, n, BLOCK):
                    candidates = _block_candidates(
                        a.take(s, min(hi, s + BLOCK)),
                        b.take(t, t + min(BLOCK, padded - t)),
                        ids[t : t + BLOCK],
                        None if qc is None else qc[s : min(hi, s + BLOCK)],
                        None if codes is None else codes[t : t + BLOCK],
                        state[s - lo : min(hi, s + BLOCK) - lo],
                    )
                    merge_keys(state, candidates[0] + (s - lo), candidates[1])
        yield slice(lo, hi), *_ordered(state, distance)


def symmetric_rounds(
    x: np.ndarray,
    codes: np.ndarray,
    width: int,
    distance: str,
    group: Any = None,
) -> Iterator[tuple[slice, np.ndarray, np.ndarray]]:
    """`sharded_rounds` for a leave-one-out search, where every rank's queries are its
    gallery shard, at half the products: each pair of rows is computed once and serves
    both (the similarity is symmetric term by term, as in `symmetric_knn`).

    Shards travel a ring: at hop j (1 to W // 2) rank r holds shard r - j with that
    shard's running top-k, computes every entry between its own rows and the visitor's,
    and merges the row side into its own top-k and the column side into the visitor's.
    Each pair of shards meets once (W odd), or, at the last hop of an even W, twice,
    and then each rank takes half of the pair's rows; a rank's own shard it searches
    alone, upper block pairs only. A visitor's top-k goes home at the end and merges
    with the one its rank kept. The answer is `sharded_rounds`' bit for bit: the same
    products of the same rows, and the top-k of the union of the candidates under the
    one total order of (similarity, index).

    Args:
        x: [n, D] this rank's queries and gallery shard, as `prepare_vectors` leaves them.
        codes: [n] exclusion codes (global row ids for ``"self"``, group codes).
        width: neighbours per query (the same on every rank).
        distance: ``"cosine"``, ``"l2"`` or ``"squared_l2"``.
        group: the process group.
    """
    rank, world = rank_and_world(group)
    device = _device(group)
    sizes, offsets, dim = _layout(x, x.shape[1], group)
    n, offset = len(x), offsets[rank]
    own = _Shard(
        factors(torch.from_numpy(x).to(device), distance),
        torch.arange(offset, offset + n, device=device),
        torch.from_numpy(codes).to(device),
        torch.full((n, width), EMPTY, dtype=torch.int64, device=device),
    )
    _cross(own, (0, n), own, (0, n), same=True)
    # the traveller's top-k starts as the rank's own, so that its bar rejects from the
    # first block on (an empty top-k admits whole blocks); the copies merge away at home
    visitor = _Shard(own.rows, own.ids, own.codes, own.state.clone())
    hops = world // 2
    for j in range(1, hops + 1):
        src = (rank - j) % world  # the shard that arrives at this hop
        arriving = _empty_shard(sizes[src], offsets[src], dim, width, distance, device)
        _hop(visitor, arriving, (rank + 1) % world, (rank - 1) % world, group)
        visitor = arriving
        mine, theirs = (0, n), (0, sizes[src])
        if 2 * j == world:  # the pair meets twice: the lower rank's rows are split
            if rank < src:
                mine = (0, _half(n))
            else:
                theirs = (_half(sizes[src]), sizes[src])
        _cross(own, mine, visitor, theirs, same=False)
    if hops:  # every visitor's top-k goes home
        back = torch.empty_like(own.state)
        ops = []
        if len(visitor.state):
            ops.append(
                dist.P2POp(dist.isend, visitor.state, _peer((rank - hops) % world, group), group)
            )
        if n:
            ops.append(dist.P2POp(dist.irecv, back, _peer((rank + hops) % world, group), group))
        _exchange(ops)
        both = torch.cat([own.state, back], 1).sort(dim=1, descending=True).values
        both[:, 1:].masked_fill_(both[:, 1:] == both[:, :-1], EMPTY)  # each key once
        own.state = both.topk(width, dim=1).values
    d, i = _ordered(own.state, distance)
    step = max(1, CHUNK_ENTRIES // max(width, 1))
    for lo in range(0, n, step):
        yield slice(lo, min(n, lo + step)), d[lo : lo + step], i[lo : lo + step]


def _ordered(state: Tensor, distance: str) -> tuple[np.ndarray, np.ndarray]:
    """(distances, ids) of top-k keys on the host, in `KNNClassifier`'s order: distance,
    then index."""
    dd, ii = distances(state, distance)
    d, i = dd.cpu().numpy(), ii.cpu().numpy()
    order = np.lexsort((i, d))
    return np.take_along_axis(d, order, 1), np.take_along_axis(i, order, 1)


class _Shard:
    """A shard in the ring: its rows (factors), global ids, exclusion codes and the
    running top-k keys of its queries (what the rank holding it has merged)."""

    def __init__(self, rows: Rows, ids: Tensor, codes: Tensor, state: Tensor) -> None:
        self.rows, self.ids, self.codes, self.state = rows, ids, codes, state


def _half(n: int) -> int:
    """Where the lower rank of a pair that meets twice splits its rows: about half,
    at a multiple of `ROWS` (products of padded row counts round alike)."""
    return min(n, max(ROWS, n // 2 // ROWS * ROWS))


def _peer(rank: int, group: Any) -> int:
    """The global rank of ``rank`` of ``group``, as point-to-point calls take it."""
    return rank if group is None else dist.get_global_rank(group, rank)


def _exchange(ops: list) -> None:
    """Run sends and receives together (NCCL deadlocks on a lone blocking pair)."""
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()


def _empty_shard(n: int, first: int, dim: int, width: int, distance: str, device) -> _Shard:
    """Buffers for an arriving shard of ``n`` rows with global ids from ``first``."""
    h = None if distance == "cosine" else torch.empty(n, device=device)
    return _Shard(
        Rows(torch.empty(n, dim, device=device), h),
        torch.arange(first, first + n, device=device),
        torch.empty(n, dtype=torch.int64, device=device),
        torch.empty(n, width, dtype=torch.int64, device=device),
    )


def _hop(held: _Shard, arriving: _Shard, to: int, frm: int, group: Any) -> None:
    """One hop of the ring: send the shard held to rank ``to`` and receive the next
    into ``arriving``'s buffers from rank ``frm``. Empty shards travel as nothing."""

    def parts(shard: _Shard) -> list[Tensor]:
        if not len(shard.ids):
            return []
        h = [] if shard.rows.h is None else [shard.rows.h]
        return [shard.rows.x, *h, shard.codes, shard.state]

    ops = [dist.P2POp(dist.isend, t.contiguous(), _peer(to, group), group) for t in parts(held)]
    ops += [dist.P2POp(dist.irecv, t, _peer(frm, group), group) for t in parts(arriving)]
    _exchange(ops)


def _cross(a: _Shard, a_rows: tuple[int, int], b: _Shard, b_rows: tuple[int, int], same: bool):
    """Every entry between rows ``a_rows`` of ``a`` and ``b_rows`` of ``b`` once, in
    blocks: candidates for ``a``'s rows merge into ``a.state``, for ``b``'s rows into
    ``b.state``. ``same``: ``a`` is ``b``, so only block pairs on or above the diagonal
    (a diagonal block serves its rows both ways), the diagonal blocks first: they fill
    every row's top-k, so that later blocks are mostly rejected by the bar."""
    a_starts = range(a_rows[0], a_rows[1], BLOCK)
    if same:
        pairs = [(s, s) for s in a_starts] + [(s, t) for s in a_starts for t in a_starts if t > s]
    else:
        pairs = [(s, t) for s in a_starts for t in range(b_rows[0], b_rows[1], BLOCK)]
    for s, t in pairs:
        e, u = min(s + BLOCK, a_rows[1]), min(t + BLOCK, b_rows[1])
        sim = block_product(a.rows.take(s, e), b.rows.take(t, u).padded())
        sim[e - s :] = float("-inf")
        sim[:, u - t :] = float("-inf")
        rows, keys = block_candidates(sim, b.ids[t:u], a.state[s:e], a.codes[s:e], b.codes[t:u])
        merge_keys(a.state, rows + s, keys)
        if same and s == t:
            continue
        cols, keys = block_candidates(
            sim, a.ids[s:e], b.state[t:u], b.codes[t:u], a.codes[s:e], by_column=True
        )
        merge_keys(b.state, cols + t, keys)


def _block_candidates(a: Rows, b: Rows, ids, q_codes, g_codes, state):
    """(rows, keys): the candidates of a block of queries (``a``, r rows) against a
    block of gallery rows (``b``, padded rows included; ``ids`` [c] of the real ones)
    for the running top-k ``state`` [r, k]; pairs with equal codes never qualify."""
    r, c = a.x.shape[0], ids.shape[0]
    sim = block_product(a, b)  # [r padded, c padded]: the one arithmetic (`similarity`)
    sim[r:] = float("-inf")
    sim[:, c:] = float("-inf")
    return block_candidates(sim, ids, state, q_codes, g_codes)


def fit(knn: KNNClassifier, embeddings: Any, labels: Any, groups: Any, group: Any) -> KNNClassifier:
    """`KNNClassifier.fit` with ``distributed=True``: this rank's gallery shard, the
    labels and groups of every rank gathered (small), codes over the union."""
    error, emb, y = None, np.zeros((0, 0), dtype=np.float32), np.zeros(0, dtype=np.int64)
    try:
        emb = prepare_vectors(local_vectors("embeddings", embeddings), knn.distance)
        y = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels)
        if y.ndim != 1 or len(y) != len(emb):
            raise ValueError(f"labels must be [{len(emb)}], got shape {y.shape}")
        if y.dtype.kind == "f":
            raise TypeError(f"labels must hold integers or strings, got {y.dtype}")
    except (ValueError, TypeError) as e:
        error = str(e)
    meta = {
        "k": knn.k,
        "distance": knn.distance,
        "weights": knn.weights,
        "embedding dimension": emb.shape[1] if len(emb) else None,
        "label type": y.dtype.kind if error is None and len(y) else None,
        "groups given": groups is not None,
    }
    agree(error, meta, group)
    all_labels = gather_arrays(y, group)
    all_groups = gather_arrays(None if groups is None else np.asarray(groups), group)
    if all_labels is None or len(all_labels) == 0:
        raise ValueError("the gallery is empty on every rank")
    knn.sizes_, knn.offset_ = shard_layout(len(emb), group)
    knn.shard_ = emb
    knn.ntotal_ = len(all_labels)
    knn.classes_, knn.labels_ = np.unique(all_labels, return_inverse=True)
    knn.groups_ = None
    if all_groups is not None:
        knn.group_values_, knn.groups_ = np.unique(all_groups, return_inverse=True)
        knn.group_sizes_ = np.bincount(knn.groups_)
    return knn


def kneighbors(
    knn: KNNClassifier,
    queries: Any,
    query_groups: Any,
    exclude: str,
    k: int,
    extra: np.ndarray | None,
    group: Any,
) -> Iterator[Neighbours]:
    """`KNNClassifier.kneighbors_chunks` with ``distributed=True``: this rank's queries
    against the union of the gallery shards; the same checks fail on every rank."""
    from .knn import Neighbours

    error, q = None, np.zeros((0, 0), dtype=np.float32)
    n_g = knn.ntotal_
    usable = np.zeros(0, dtype=np.int64)
    q_codes = g_codes = None
    try:
        q = prepare_vectors(local_vectors("queries", queries), knn.distance)
        n_q = len(q)
        if exclude == "self" and n_q != len(knn.shard_):
            raise ValueError(
                f"exclude='self' needs each rank's queries to be its gallery shard "
                f"({len(knn.shard_)} rows), got {n_q}"
            )
        excluded = np.zeros(n_q, dtype=np.int64)
        if exclude == "self":
            excluded += 1
            q_codes = knn.offset_ + np.arange(n_q, dtype=np.int64)
            g_codes = q_codes
        elif exclude == "group":
            qg = knn.query_group_codes(query_groups, n_q)
            excluded = np.where(qg >= 0, knn.group_sizes_[np.maximum(qg, 0)], 0)
            q_codes = qg.astype(np.int64)
            lo = knn.offset_
            g_codes = np.asarray(knn.groups_)[lo : lo + len(knn.shard_)].astype(np.int64)
        usable = n_g - excluded
        if (usable < k).any():
            i = int(np.argmax(usable < k))
            raise ValueError(
                f"k={k} is larger than the usable gallery of query {i}: {n_g} items, "
                f"{excluded[i]} excluded by exclude={exclude!r}"
            )
    except ValueError as e:
        error = str(e)
    meta = {"k": k, "exclude": exclude, "query dimension": q.shape[1] if len(q) else None}
    agree(error, meta, group)
    want = k + (np.zeros(len(q), dtype=np.int64) if extra is None else extra)
    want = np.minimum(want, usable)
    width = int(want.max(initial=0))
    # a leave-one-out search of the shards themselves takes the ring at half the
    # products when every rank's queries are its shard (then k is every query's width)
    ring = (
        RING
        and extra is None
        and q_codes is not None
        and np.array_equal(q, knn.shard_)
        and np.array_equal(q_codes, g_codes)
    )
    if all(gather_objects(ring, group)):
        rounds = symmetric_rounds(q, q_codes, k, knn.distance, group)
    else:
        # streamed round by round, as one process streams its chunks: deep ranking
        # metrics never hold the whole [q, width] table
        rounds = sharded_rounds(q, q_codes, knn.shard_, g_codes, width, knn.distance, group)
    for rows, d, ids in rounds:
        valid = np.arange(width)[None, :] < want[rows, None]
        if rows.stop > rows.start:
            yield Neighbours(rows, np.where(valid, d, np.inf), np.where(valid, ids, -1))
