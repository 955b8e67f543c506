"""Exact leave-one-out k-nearest neighbours from a low-precision product.

A GPU multiplies TF32 or bf16 matrices several times faster than float32 ones. The
low-precision similarity of a pair differs from the float32 one by at most a bound that
follows from the formats alone (`error_bound`), so the low-precision product can decide
which pairs may be neighbours, and float32 need only rank those. Per block of queries:

1. each query keeps the k largest low-precision similarities seen; their k-th less the
   bound ``eps`` is at most the exact k-th similarity (k entries reach it);
2. an entry is a candidate while it reaches that k-th value less ``2 eps``: any other
   entry lies below k exact similarities and can be no neighbour (a tile of 32 entries
   whose maximum falls short is rejected whole);
3. the candidates that reach the final k-th value less ``2 eps`` are ranked by the
   float32 product every exact search computes (`similarity`, rows padded alike), ties
   by index.

So the neighbours and distances are the exact search's. Where ties crowd a block of
queries' k-th value (more candidates than `CAP` per query), that block is searched in
float32 directly. On the CPU the low-precision product is emulated (inputs rounded to
the format, then a float32 product): the same code path, which the tests hold to the
exact searches.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor

from .._checks import check_choice, resolve_distance
from ._keys import (
    EMPTY,
    Rows,
    decode_keys,
    distances,
    factors,
    order_keys,
    pad_rows,
    similarity,
)
from .symmetric import TILE, best_keys, merge_keys, self_search_rows

__all__ = ["PRECISIONS", "bounded_knn", "error_bound"]

PRECISIONS = ("tf32", "bf16")
#: unit roundoff of each format's inputs; TF32's covers a truncating conversion too
_INPUT_UNIT = {"tf32": 2.0**-10, "bf16": 2.0**-8}
#: relative error of one float32 addition in an accumulation: two units, which covers
#: tensor cores that truncate instead of rounding to nearest
_ADD_UNIT = 2.0**-22
#: candidates per query beyond which a block of queries is searched in float32 instead
CAP = 1024
#: (query rows per block, gallery rows per chunk) on the CPU; on a GPU see `_sizes`
CPU_SIZES = (2048, 8192)
_RERANK_ROWS = 1024  # queries ranked in float32 at once: [rows, their candidates' union]
_FLOOR = torch.finfo(torch.float32).min  # masked (-inf) entries never reach a bar


def error_bound(dim: int, precision: str) -> tuple[float, float]:
    """``(a, b)``: a pair's low-precision value (`low_product`) and its float32
    similarity (`similarity`, in any summation order) plus the row's shift differ by at
    most ``a |x| |y| + b (|x|^2 / 2 + |y|^2 / 2)``; ``b`` applies to L2 only.

    Each input is rounded with relative error at most ``u`` (2^-10 for TF32, 2^-8 for
    bf16), so the exact product of the rounded inputs is off by at most
    ``(2u + u^2) sum |x_d y_d| <= (2u + u^2) |x| |y|`` (Cauchy-Schwarz); the norm's
    parts in `low_factors` sum to it exactly. Each float32 accumulation of the at most
    ``dim + 3`` terms (the products, the norm or its parts) errs by at most
    ``gamma = m v / (1 - m v)`` times the sum of their magnitudes, with ``m = dim + 3``
    and ``v = 2^-22`` (two units: truncating adders too), once in each product. One more
    rounding in ``a`` and ``b``, and 1 %, are margin (the bound's own float64
    arithmetic).

    Args:
        dim: the embedding dimension D.
        precision: ``"tf32"`` or ``"bf16"``.
    """
    check_choice("precision", precision, PRECISIONS)
    u, m = _INPUT_UNIT[precision], dim + 3
    gamma = m * _ADD_UNIT / (1 - m * _ADD_UNIT)
    a = 2 * u + u * u + gamma * (1 + u) ** 2 + gamma + _ADD_UNIT * (1 + u) ** 2 * (1 + gamma)
    b = 2 * gamma + 2 * _ADD_UNIT
    return 1.01 * a, 1.01 * b


def _round_to(x: Tensor, precision: str) -> Tensor:
    """float32 ``x`` rounded to the format's significand, kept in float32."""
    if precision == "bf16":
        return x.bfloat16().float()
    # TF32 keeps 10 of float32's 23 explicit bits: round the 13 dropped ones to nearest
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


@contextmanager
def _tf32():
    """TF32 float32 products for the block, the caller's setting restored after.

    Through cuBLAS's own switch where torch has one (2.9+): torch's global getter
    raises once a caller has set TF32 through the newer per-backend settings, which
    torch's notes now recommend."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        old, tf32 = matmul.fp32_precision, "tf32"

        def put(value: str) -> None:
            matmul.fp32_precision = value

    else:  # torch < 2.9
        old, tf32 = torch.get_float32_matmul_precision(), "high"
        put = torch.set_float32_matmul_precision
    put(tf32)
    try:
        yield
    finally:
        put(old)


def low_factors(f: Rows, precision: str) -> tuple[Tensor, Tensor]:
    """(query side, gallery side), [N, K] each: the product of a query's row and a
    gallery row is the pair's low-precision similarity shifted by a constant per query,
    ``x . y`` for ``"cosine"``; for L2 ``x . y - |y|^2 / 2``, the norm entering the
    product as three more columns, ``[1, 1, 1] . [-h1, -h2, -h3]``, where ``h1 + h2 +
    h3 = |y|^2 / 2`` exactly and each part is a number of the format (so the product
    is the whole similarity, less ``|x|^2 / 2``, without a pass over the block to add
    the norms). Inputs are rounded to the format here off a GPU (emulation), cast to
    bf16 on a GPU for bf16, and left to the TF32 product's own rounding for TF32. K is
    padded to a multiple of 8 (aligned rows for the GPU's kernels)."""
    emulate = f.x.device.type != "cuda"
    x = _round_to(f.x, precision) if emulate else f.x
    q = g = x
    if f.h is not None:
        parts, rest = [], f.h
        for _ in range(3):  # 3 x 8 bits hold float32's 24 (bf16; TF32: 3 x 11)
            parts.append(_round_to(rest, precision))
            rest = rest - parts[-1]
        q = torch.cat([x, x.new_ones(len(x), 3)], 1)
        g = torch.cat([x, -torch.stack(parts, 1)], 1)
    pad = -q.shape[1] % 8
    q, g = (torch.nn.functional.pad(m, (0, pad)) for m in (q, g))
    if not emulate and precision == "bf16":
        return q.bfloat16(), g.bfloat16()
    return q.contiguous(), g.contiguous()


def low_product(a: Tensor, b: Tensor, precision: str) -> Tensor:
    """[n_a, n_b] float32 products of `low_factors` rows: TF32 or bf16 products with
    float32 sums on a GPU; off it, a float32 product of the rounded inputs (exact
    products, float32 sums: what the GPU computes, up to the order of the sums)."""
    if a.device.type != "cuda":
        return a @ b.T
    if precision == "tf32":
        with _tf32():
            return a @ b.T
    return torch.mm(a, b.T, out_dtype=torch.float32)


def _sizes(device: torch.device) -> tuple[int, int]:
    """(query rows per block, gallery rows per chunk): `CPU_SIZES` on the CPU; on a GPU
    up to 8192 x 65536, as large as a quarter of the free memory holds three float32
    [block, chunk] matrices."""
    if device.type != "cuda":
        return CPU_SIZES
    free = torch.cuda.mem_get_info(device)[0]
    block, chunk = 8192, 65536
    while block > 1024 and 3 * 4 * block * chunk > free // 4:
        block, chunk = block // 2, chunk // 2
    return block, chunk


def _round_down(x: Tensor) -> Tensor:
    """float64 ``x`` as float32 rounded towards -inf, at least the lowest finite float32
    (masked -inf entries stay below it)."""
    y = x.float()
    y = torch.where(y.double() > x, torch.nextafter(y, y.new_tensor(float("-inf"))), y)
    return y.clamp_min(_FLOOR)


class _Block:
    """One block of queries ``[s, e)`` of the (group-sorted) rows, searched against
    every chunk of them."""

    def __init__(self, search: _Search, s: int, e: int) -> None:
        self.q, self.s, self.e = search, s, e
        self.a = search.f.take(s, e)
        self.low_a = search.low_q[s:e]

    def masked(self, sim: Tensor, t: int, u: int) -> Tensor:
        """``sim`` [r, C >= u - t] with the excluded pairs and the padding at ``-inf``."""
        q, s, e = self.q, self.s, self.e
        sim[:, u - t :] = float("-inf")
        if s < u and t < e:
            sim.diagonal(s - t).fill_(float("-inf"))
        g = q.groups
        if g is not None and g[e - 1] >= g[t] and g[u - 1] >= g[s]:
            sim[:, : u - t].masked_fill_(g[s:e, None] == g[None, t:u], float("-inf"))
        return sim

    def chunks(self) -> list[tuple[int, int]]:
        """The chunks, the one holding this block's first row first: nearby rows (a
        patient's images, in dataset order) raise the bar early."""
        bounds = self.q.bounds
        first = next(i for i, (t, u) in enumerate(bounds) if t <= self.s < u)
        return bounds[first:] + bounds[:first]

    def search(self) -> Tensor:
        """[r, k] neighbour keys: by the bound where it keeps few candidates, else in
        float32."""
        found = self.candidates()
        if found is None:
            return self.exact()
        return self.rerank(*found)

    def candidates(self) -> tuple[Tensor, Tensor] | None:
        """(rows, columns) of every entry the bound cannot exclude, or None where more
        than `CAP` per query remain."""
        q, r, k = self.q, self.e - self.s, self.q.k
        state = torch.full((r, k), EMPTY, dtype=torch.int64, device=q.device)
        rows = cols = vals = q.orig[:0]
        vals = vals.float()
        slack = 2 * q.eps[self.s : self.e]  # twice the bound: the low-precision k-th's
        for t, u in self.chunks():
            sim = low_product(self.low_a, pad_rows(q.low_g[t:u]), q.precision)
            sim = self.masked(sim, t, u)
            tiles = sim.view(r, -1, TILE)
            tile_max = tiles.amax(2)
            kth = decode_keys(state[:, -1])[0]
            if bool((state[:, -1] == EMPTY).any()) and tile_max.shape[1] >= k:
                # k tiles' maxima are k entries: their k-th is a bar without a sort of sim
                kth = torch.maximum(kth, tile_max.topk(k, dim=1).values[:, -1])
            bar = _round_down(kth.double() - slack)
            admit = tile_max >= bar[:, None]
            if int(admit.sum()) > CAP * r:  # ties crowd the bar: float32 instead
                return None
            tr, tc = admit.nonzero(as_tuple=True)
            entries = tiles[tr, tc]
            j, off = (entries >= bar[tr, None]).nonzero(as_tuple=True)
            if len(j) > CAP * r:  # ties crowd the bar: float32 instead
                return None
            new_rows, new_cols = tr[j], t + tc[j] * TILE + off
            new_vals = entries[j, off]
            merge_keys(state, new_rows, order_keys(new_vals, q.orig[new_cols]))
            rows, cols = torch.cat([rows, new_rows]), torch.cat([cols, new_cols])
            vals = torch.cat([vals, new_vals])
            bar = _round_down(decode_keys(state[:, -1])[0].double() - slack)
            keep = vals >= bar[rows]  # the bar only rises: what falls below stays out
            rows, cols, vals = rows[keep], cols[keep], vals[keep]
            if len(rows) > CAP * r:
                return None
        return rows, cols

    def rerank(self, rows: Tensor, cols: Tensor) -> Tensor:
        """[r, k] keys of the candidates' k best float32 similarities, ties by index."""
        q, r, k = self.q, self.e - self.s, self.q.k
        order = torch.argsort(rows * q.n + cols)
        rows, cols = rows[order], cols[order]
        starts = torch.arange(0, r + _RERANK_ROWS, _RERANK_ROWS, device=q.device).clamp_max(r)
        cuts = torch.searchsorted(rows, starts).tolist()
        out = torch.full((r, k), EMPTY, dtype=torch.int64, device=q.device)
        for i, lo in enumerate(range(0, r, _RERANK_ROWS)):
            rr, cc = rows[cuts[i] : cuts[i + 1]] - lo, cols[cuts[i] : cuts[i + 1]]
            if len(cc) == 0:
                continue
            ucols, inv = torch.unique(cc, return_inverse=True)
            b = Rows(q.f.x[ucols], None if q.f.h is None else q.f.h[ucols]).padded()
            hi = min(r, lo + _RERANK_ROWS)
            sim = similarity(self.a.take(lo, hi), b, len(ucols))
            out[lo:hi] = _top_keys(sim, rr, inv, q.orig[ucols], k)
        return out

    def exact(self) -> Tensor:
        """[r, k] keys by float32 products of the whole chunks (crowded ties)."""
        q, r, k = self.q, self.e - self.s, self.q.k
        state = torch.full((r, k), EMPTY, dtype=torch.int64, device=q.device)
        for t, u in q.bounds:
            sim = self.masked(similarity(self.a, q.f.take(t, u).padded(), u - t), t, u)
            merge_keys(state, *best_keys(sim, q.orig[t:u], min(k, u - t)))
        return state


def _top_keys(sim: Tensor, rows: Tensor, cols: Tensor, ids: Tensor, k: int) -> Tensor:
    """[R, k] keys of each row's k best entries of ``sim`` [R, U] among its candidates
    ``(rows, cols)``, ties by ``ids`` [U]; empty slots where a row has fewer."""
    keep = torch.zeros_like(sim, dtype=torch.bool)
    keep[rows, cols] = True
    keys = order_keys(sim, ids).masked_fill_(~keep, EMPTY)
    top = keys.topk(min(k, keys.shape[1]), dim=1).values
    return torch.nn.functional.pad(top, (0, k - top.shape[1]), value=EMPTY)


class _Search:
    """The rows, in group order, with what every block needs."""

    def __init__(self, x: Tensor, k: int, distance: str, groups, precision, chunk):
        n, dev = x.shape[0], x.device
        perm = np.argsort(groups, kind="stable") if groups is not None else np.arange(n)
        self.orig = torch.from_numpy(perm.astype(np.int64)).to(dev)
        xp = x if groups is None else x[self.orig]
        self.f, self.k, self.n, self.device, self.precision = (
            factors(xp, distance),
            k,
            n,
            dev,
            precision,
        )
        self.groups = None if groups is None else torch.from_numpy(np.asarray(groups)[perm]).to(dev)
        self.low_q, self.low_g = low_factors(self.f, precision)
        a, b = error_bound(x.shape[1], precision)
        norms = self.f.x.double().norm(dim=1)
        self.eps = a * norms * norms.max()
        if self.f.h is not None:
            h = self.f.h.double()
            self.eps += b * (h + h.max())
        self.bounds = [(t, min(t + chunk, n)) for t in range(0, n, chunk)]


def bounded_knn(
    x: np.ndarray | Tensor,
    k: int,
    distance: str | None = None,
    groups: np.ndarray | None = None,
    *,
    precision: str = "tf32",
    device: str | torch.device | None = None,
    block: int | None = None,
    chunk: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest other rows of every row of ``x``, exactly, from a low-precision
    product and its error bound (see the module).

    Args:
        x: [N, D] float32 embeddings, numpy or torch on any device (a GPU's stay there);
            for ``"cosine"`` they are L2-normalised here.
        k: neighbours per row.
        distance: ``"cosine"`` (default; ``1 - cos``), ``"l2"`` or ``"squared_l2"``.
        groups: [N] group of each row; rows of a row's own group are excluded
            (leave-one-group-out). Without it only the row itself is excluded.
        precision: the candidates' product, ``"tf32"`` (default; a tighter bound) or
            ``"bf16"`` (faster products, about four times the bound); emulated off a GPU.
        device: where to search (default: where ``x`` is; numpy: the CPU).
        block: query rows per block, a multiple of 32 (default: 2048 on the CPU, up to
            8192 on a GPU).
        chunk: gallery rows per low-precision product, a multiple of 32 (default: 8192
            on the CPU, up to 65536 on a GPU).

    Returns:
        ``(dist, ids)``, two [N, k] arrays ordered by distance, then index: those of
        [`symmetric_knn`][smse_metric.evaluation.symmetric_knn] (``-1`` and ``inf``
        where a row has fewer than k others outside its group).

    Examples:
        >>> x = np.array([[0.0], [1.0], [3.0], [7.0]], dtype="float32")
        >>> dist, ids = bounded_knn(x, k=2, distance="l2", precision="bf16")
        >>> ids.tolist(), dist[:, 0].tolist()
        ([[1, 2], [0, 2], [1, 0], [2, 1]], [1.0, 1.0, 2.0, 4.0])
    """
    distance = resolve_distance(distance, "cosine")
    check_choice("precision", precision, PRECISIONS)
    x = self_search_rows(x, k, device)
    dev, n = x.device, x.shape[0]
    if groups is not None and len(groups) != n:
        raise ValueError(f"groups has {len(groups)} elements but x has {n} rows")
    default_block, default_chunk = _sizes(dev)
    block = default_block if block is None else block
    chunk = default_chunk if chunk is None else chunk
    for name, value in (("block", block), ("chunk", chunk)):
        if value < TILE or value % TILE:
            raise ValueError(f"{name} must be a positive multiple of {TILE}, got {value}")
    q = _Search(x, k, distance, groups, precision, chunk)
    state = torch.cat([_Block(q, s, min(s + block, n)).search() for s in range(0, n, block)])
    out = torch.empty_like(state)
    out[q.orig] = state  # back to the input's row order
    dist, ids = distances(out, distance)
    return dist.cpu().numpy(), ids.cpu().numpy()
