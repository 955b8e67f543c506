"""Internal: input checks and constants shared by the evaluation modules (not public
API; the public names are re-exported by ``smse_metric.evaluation``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

EXCLUDE = ("none", "self", "group")
WEIGHTS = ("uniform", "distance")
DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("auto", "faiss", "torch")
#: neighbour-table entries per chunk (indices + distances: 12 bytes each)
CHUNK_ENTRIES = 1 << 24
#: leave-one-out searches of at least this many rows use the symmetric search
SYMMETRIC_MIN_ROWS = 4096


def as_float32(name: str, x: Any) -> np.ndarray:
    """[N, D] embeddings from numpy or torch (any device) as one C-contiguous float32 copy."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    arr = np.ascontiguousarray(x, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D [N, D], got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).any(1).sum())
        raise ValueError(f"{name} has {bad} rows with NaN or inf")
    return arr


def as_device_tensor(name: str, x: torch.Tensor) -> torch.Tensor:
    """[N, D] embeddings of a torch tensor as one contiguous float32 tensor on its own
    device, checked there like `as_float32` (a GPU's rows never visit the host)."""
    x = x.detach().to(dtype=torch.float32).contiguous()
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D [N, D], got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    bad = int((~torch.isfinite(x)).any(1).sum())
    if bad:
        raise ValueError(f"{name} has {bad} rows with NaN or inf")
    return x


def prepare_tensor(x: torch.Tensor, distance: str) -> torch.Tensor:
    """`prepare_vectors` for a torch tensor, on its device."""
    if distance != "cosine":
        return x
    norm = x.square().sum(1, keepdim=True).sqrt()
    return torch.where(norm > 0, x / norm.clamp_min(torch.finfo(x.dtype).tiny), 0.0)


def prepare_vectors(x: np.ndarray, distance: str) -> np.ndarray:
    """Vectors as every index stores them: L2-normalised (a copy; zero rows stay zero)
    for ``"cosine"``, unchanged for ``"l2"`` and ``"squared_l2"``."""
    if distance != "cosine":
        return x
    norm = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float32))[:, None]
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def as_ids(name: str, y: Any, n: int) -> np.ndarray:
    """[n] labels / groups / scales (ints or strings) as a numpy array."""
    if isinstance(y, torch.Tensor):
        y = y.detach().cpu().numpy()
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if len(arr) != n:
        raise ValueError(f"{name} has {len(arr)} elements but the embeddings have {n} rows")
    if arr.dtype.kind == "f":
        raise TypeError(f"{name} must hold integers or strings, got {arr.dtype}")
    return arr


def import_faiss():
    """faiss, imported where an index is built: ``import smse_metric`` must not need it."""
    try:
        import faiss
    except ImportError as e:
        raise ImportError(
            "this needs FAISS: pip install 'smse-metric[faiss]' (CPU) or 'smse-metric[gpu]' (CUDA)"
        ) from e
    return faiss


def has_faiss() -> bool:
    try:
        import_faiss()
    except ImportError:
        return False
    return True
