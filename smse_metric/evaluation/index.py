"""Exact (or IVF) nearest-neighbour search over a gallery with FAISS, imported only when
an index is built, and `make_index`, which picks FAISS or torch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._checks import DISTANCES, check_choice, resolve_distance
from ._inputs import (
    BACKENDS,
    DEVICES,
    as_float32,
    has_faiss,
    import_faiss,
    prepare_vectors,
)
from .torch_index import TorchIndex

__all__ = ["FaissIndex", "make_index"]


def faiss_gpu_count() -> int:
    """GPUs the installed faiss can use (0 for faiss-cpu)."""
    faiss = import_faiss()
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def make_index(
    embeddings: Any,
    distance: str | None = None,
    device: str = "auto",
    index: str = "flat",
    backend: str = "auto",
    *,
    metric: str | None = None,
) -> FaissIndex | TorchIndex:
    """The search index for a gallery: one call whatever is installed.

    ``backend="auto"`` takes FAISS when it is installed and can serve the device (a
    CUDA tensor or ``device="cuda"`` needs a faiss with GPUs) or ``index="ivf"`` is
    asked for, torch otherwise; both are exact for ``index="flat"`` and order ties
    by gallery index.

    Args:
        embeddings: [G, D] gallery, numpy or torch on any device.
        distance: ``"cosine"`` (default; ``1 - cos``), ``"l2"`` (euclidean) or
            ``"squared_l2"`` (its square: the same neighbours).
        device: ``"auto"`` (where the embeddings are), ``"cpu"`` or ``"cuda"``.
        index: ``"flat"`` (exact) or ``"ivf"`` (approximate; FAISS only).
        backend: ``"auto"``, ``"faiss"`` or ``"torch"``.
        metric: the old name of ``distance``; deprecated, warns.

    Examples:
        >>> idx = make_index(np.eye(3, dtype="float32"), distance="l2", backend="torch")
        >>> idx.search(np.eye(3, dtype="float32"), k=1)[1].ravel().tolist()
        [0, 1, 2]
    """
    distance = resolve_distance(distance, "cosine", metric=metric)
    check_choice("backend", backend, BACKENDS)
    check_choice("device", device, DEVICES)
    check_choice("index", index, ("flat", "ivf"))
    if backend == "auto":
        on_cuda = isinstance(embeddings, torch.Tensor) and embeddings.is_cuda
        wants_gpu = device == "cuda" or (device == "auto" and on_cuda)
        usable = has_faiss() and (not wants_gpu or faiss_gpu_count() > 0)
        backend = "faiss" if usable or index == "ivf" else "torch"
    if backend == "faiss":
        return FaissIndex(embeddings, distance=distance, device=device, index=index)
    if index != "flat":
        raise ValueError(f"index={index!r} needs backend='faiss' (the torch backend is exact)")
    return TorchIndex(embeddings, distance=distance, device=device)


class FaissIndex:
    """Exact (or IVF) nearest-neighbour search over a gallery, hiding index and device.

    Args:
        embeddings: [G, D] gallery, numpy or torch on any device (copied once).
        distance: ``"cosine"`` (default; inner product of L2-normalised vectors,
            distance ``1 - cos``), ``"l2"`` (euclidean distance) or ``"squared_l2"``
            (its square: the same neighbours).
        device: ``"auto"`` (a GPU index when faiss has GPUs and the embeddings are a
            CUDA tensor), ``"cpu"`` or ``"cuda"``.
        index: ``"flat"`` (exact) or ``"ivf"`` (approximate, for very large galleries).
        nlist: IVF cells (default ``4 * sqrt(G)``).
        nprobe: IVF cells visited per query.
        metric: the old name of ``distance``; deprecated, warns.

    Examples:
        >>> idx = FaissIndex(np.eye(3, dtype="float32"), distance="l2")
        >>> dist, ids = idx.search(np.eye(3, dtype="float32"), k=1)
        >>> ids.ravel().tolist()
        [0, 1, 2]
    """

    def __init__(
        self,
        embeddings: Any,
        distance: str | None = None,
        device: str = "auto",
        index: str = "flat",
        nlist: int | None = None,
        nprobe: int = 16,
        *,
        metric: str | None = None,
    ) -> None:
        faiss = import_faiss()
        distance = resolve_distance(distance, "cosine", metric=metric)
        check_choice("device", device, DEVICES)
        check_choice("index", index, ("flat", "ivf"))
        on_cuda = isinstance(embeddings, torch.Tensor) and embeddings.is_cuda
        gallery = prepare_vectors(as_float32("embeddings", embeddings), distance)
        self.distance, self.ntotal, self.dim = distance, gallery.shape[0], gallery.shape[1]
        gpus = faiss_gpu_count()
        if device == "cuda" and gpus == 0:
            raise ValueError("device='cuda' but the installed faiss has no GPU support")
        self.device = (
            "cuda" if device == "cuda" or (device == "auto" and gpus and on_cuda) else "cpu"
        )
        flat = faiss.IndexFlatIP(self.dim) if distance == "cosine" else faiss.IndexFlatL2(self.dim)
        if index == "ivf":
            nlist = nlist or max(1, int(4 * np.sqrt(self.ntotal)))
            ivf_metric = faiss.METRIC_INNER_PRODUCT if distance == "cosine" else faiss.METRIC_L2
            cpu_index = faiss.IndexIVFFlat(flat, self.dim, nlist, ivf_metric)
            cpu_index.train(gallery)
            cpu_index.nprobe = nprobe
            self._quantizer = flat  # the IVF index does not own it
        else:
            cpu_index = flat
        if self.device == "cuda":
            self._resources = faiss.StandardGpuResources()
            self.index = faiss.index_cpu_to_gpu(self._resources, 0, cpu_index)
        else:
            self.index = cpu_index
        self.index.add(gallery)

    def vectors(self) -> np.ndarray:
        """[G, D] float32 view of the stored gallery (L2-normalised for ``"cosine"``);
        flat CPU indexes only."""
        faiss = import_faiss()
        if not isinstance(self.index, faiss.IndexFlat):
            raise ValueError("vectors() needs a flat CPU index")
        return (
            faiss.rev_swig_ptr(self.index.get_xb(), self.ntotal * self.dim)
            .view(np.float32)
            .reshape(self.ntotal, self.dim)
        )

    def save(self, path: str | Path) -> None:
        """Write the index with ``faiss.write_index`` (a GPU index is copied to the CPU)."""
        faiss = import_faiss()
        index = faiss.index_gpu_to_cpu(self.index) if self.device == "cuda" else self.index
        faiss.write_index(index, str(path))

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", distance: str | None = None) -> FaissIndex:
        """Read an index written by `save`. Its distance follows the index type (inner
        product: ``"cosine"``, L2: ``"l2"``); ``distance="squared_l2"`` reads an L2 index
        as squared distances, and a ``distance`` the index type cannot serve is an
        error."""
        faiss = import_faiss()
        check_choice("device", device, DEVICES)
        if distance is not None:
            check_choice("distance", distance, DISTANCES)
        if not Path(path).is_file():
            raise ValueError(f"no FAISS index at {path}")
        index = faiss.read_index(str(path))
        self = cls.__new__(cls)
        inner = index.metric_type == faiss.METRIC_INNER_PRODUCT
        stored = "cosine" if inner else "l2"
        if distance is not None and (distance == "cosine") != inner:
            raise ValueError(f"distance={distance!r}, but the index at {path} is {stored!r}")
        self.distance, self.ntotal, self.dim = distance or stored, index.ntotal, index.d
        self.device = "cpu"
        if device == "cuda":
            if faiss_gpu_count() == 0:
                raise ValueError("device='cuda' but the installed faiss has no GPU support")
            self._resources = faiss.StandardGpuResources()
            index, self.device = faiss.index_cpu_to_gpu(self._resources, 0, index), "cuda"
        self.index = index
        return self

    def search(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """k nearest gallery items of each query: distances [Q, k] (ascending) and ids [Q, k]
        (``-1`` where the gallery has fewer than k items)."""
        q = prepare_vectors(as_float32("queries", queries), self.distance)
        if q.shape[1] != self.dim:
            raise ValueError(f"queries have dimension {q.shape[1]}, the gallery {self.dim}")
        raw, ids = self.index.search(q, int(k))
        if self.distance == "cosine":
            dist = 1.0 - raw
        else:  # faiss's L2 index gives squared distances
            dist = np.maximum(raw, 0)
            dist = dist if self.distance == "squared_l2" else np.sqrt(dist)
        dist[ids < 0] = np.inf
        return dist, ids
