"""Internal: the exact neighbour order shared by the symmetric search, the torch index
and the sharded search.

All compute similarities (larger is nearer) from one product ``x @ y.T``: for
``"cosine"`` of L2-normalised rows, for ``"l2"`` / ``"squared_l2"`` of the rows
themselves, less ``(|x_i|^2/2 + |y_j|^2/2)``: ``-d(i, j)^2 / 2``. Every term is the same
whichever of i and j is the query, so the symmetric search may use one entry for both.
A (similarity, id) pair becomes one int64 key whose descending order is (similarity
descending, id ascending), so a plain ``topk`` of keys gives the k nearest with ties
broken by index.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

EMPTY = torch.iinfo(torch.int64).min  #: key of an empty slot
LOW = (1 << 32) - 1
#: products are taken between row counts padded to a multiple of this: BLAS kernels
#: round an entry alike whatever the two matrices' sizes and the entry's place then
#: (not for a single row or a few columns, which take other code paths), so that the
#: flat, symmetric and sharded searches compute every similarity bit for bit alike
ROWS = 32


def pad_rows(x: Tensor) -> Tensor:
    """``x`` [n, d] with zero rows up to a positive multiple of `ROWS` (``x`` itself
    where it has one)."""
    n = x.shape[0]
    pad = max(ROWS, -(-n // ROWS) * ROWS) - n
    return torch.nn.functional.pad(x, (0, 0, 0, pad)) if pad else x


class Rows(NamedTuple):
    """Rows ready for `similarity`: ``x`` [n, D] (L2-normalised for ``"cosine"``) and,
    for ``"l2"`` / ``"squared_l2"``, ``h`` [n], half their squared norms."""

    x: Tensor
    h: Tensor | None

    def take(self, start: int, stop: int) -> Rows:
        """Rows ``start:stop``."""
        return Rows(self.x[start:stop], None if self.h is None else self.h[start:stop])

    def padded(self) -> Rows:
        """Zero rows up to a multiple of `ROWS` (`pad_rows`)."""
        h = self.h
        if h is not None:
            h = torch.nn.functional.pad(h, (0, max(ROWS, -(-len(h) // ROWS) * ROWS) - len(h)))
        return Rows(pad_rows(self.x), h)


def factors(x: Tensor, distance: str) -> Rows:
    """The rows of ``x`` [N, D] as `similarity` takes them."""
    if distance == "cosine":
        return Rows(torch.nn.functional.normalize(x, dim=1), None)
    return Rows(x, x.square().sum(1) / 2)


def block_product(a: Rows, b: Rows) -> Tensor:
    """[n_a padded, n_b] similarities of ``a``'s rows (padded here) and ``b``'s (already
    padded): one product, added to the negated half norms summed first (the same terms
    for (i, j) as for (j, i))."""
    a = a.padded()
    if a.h is None or b.h is None:
        return a.x @ b.x.T
    # one GEMM into the negated norm sums (as fast as the product alone)
    return (a.h[:, None] + b.h[None, :]).neg_().addmm_(a.x, b.x.T)


def similarity(a: Rows, b: Rows, n_b: int) -> Tensor:
    """[n_a, n_b] similarities of ``a``'s rows and the first ``n_b`` rows of ``b``
    (already padded by `Rows.padded`), in the one arithmetic every search uses."""
    return block_product(a, b)[: a.x.shape[0], :n_b]


def order_keys(values: Tensor, ids: Tensor) -> Tensor:
    """int64 keys: the float32 similarity's order-preserving int32 image in the high
    half, ``2**32 - 1 - id`` below."""
    bits = (values.float() + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)
    return bits * (1 << 32) + (LOW - ids)


def decode_keys(keys: Tensor) -> tuple[Tensor, Tensor]:
    """(similarities, ids) of keys; empty slots give (-inf, -1)."""
    bits = (keys >> 32).to(torch.int32)
    values = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).view(torch.float32)
    ids = LOW - (keys & LOW)
    empty = keys == EMPTY
    return values.masked_fill(empty, float("-inf")), ids.masked_fill(empty, -1)


def distances(keys: Tensor, distance: str) -> tuple[Tensor, Tensor]:
    """(distances, ids) of keys: ``1 - cos``, the euclidean distance or its square;
    empty slots give (inf, -1)."""
    values, ids = decode_keys(keys)
    if distance == "cosine":
        dist = 1.0 - values
    else:
        dist = (-2.0 * values).clamp_min(0)
        dist = dist if distance == "squared_l2" else dist.sqrt()
    return dist.masked_fill(ids < 0, float("inf")), ids
