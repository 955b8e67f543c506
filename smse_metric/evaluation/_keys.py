"""Internal: the exact neighbour order shared by the symmetric search, the torch index
and the sharded search.

Both compute similarities (larger is nearer) as one product ``a @ b.T``: for
``"cosine"`` of L2-normalised rows, for ``"l2"`` / ``"squared_l2"`` of augmented rows
``[x_i, -|x_i|^2/2, 1] . [x_j, 1, -|x_j|^2/2] = -d(i, j)^2 / 2``. A (similarity, id)
pair becomes one int64 key whose descending order is (similarity descending, id
ascending), so a plain ``topk`` of keys gives the k nearest with ties broken by index.
"""

from __future__ import annotations

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


def similarity(a: Tensor, b: Tensor, n_b: int) -> Tensor:
    """[n_a, n_b] similarities ``a @ b.T`` of ``a`` [n_a, d] and the first ``n_b`` rows
    of ``b`` (already padded by `pad_rows`), in the one arithmetic every search uses."""
    return (pad_rows(a) @ b.T)[: a.shape[0], :n_b]


def factors(x: Tensor, distance: str) -> tuple[Tensor, Tensor]:
    """(a, b) with ``a[i] . b[j]`` the similarity of rows i and j of ``x`` [N, D]."""
    if distance == "cosine":
        x = torch.nn.functional.normalize(x, dim=1)
        return x, x
    half, ones = x.square().sum(1, keepdim=True) / 2, x.new_ones(x.shape[0], 1)
    return torch.cat([x, -half, ones], 1), torch.cat([x, ones, -half], 1)


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
