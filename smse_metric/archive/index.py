"""Indexes over an `EmbeddingStore`: exact search streamed from the memory-mapped
shards, and FAISS's IVF-Flat, IVF-PQ (with exact re-ranking) and HNSW, each with its
recall@k against exact search measured at build on probe rows and stored with it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._checks import check_choice, positive_int
from ..evaluation._inputs import import_faiss, prepare_vectors
from ..evaluation.index import faiss_gpu_count
from .store import EmbeddingStore, atomic_write

__all__ = ["KINDS", "ArchiveIndex", "exact_search"]

#: Index kinds: exact (no index: streamed from the store), IVF-Flat, IVF-PQ, HNSW.
KINDS = ("exact", "ivf_flat", "ivf_pq", "hnsw")
DISTANCES = ("l2", "cosine")
#: A build is due again once the store holds this many times the rows the quantiser
#: was trained on (its cells no longer describe the data).
REBUILD_FACTOR = 4
#: the most neighbours one FAISS GPU search returns (its k limit)
GPU_K = 2048
_NPROBES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
_EFS = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 2048)


def _prepare(x: Any, distance: str) -> np.ndarray:
    """Contiguous float32 rows as every index stores them (`prepare_vectors`)."""
    return prepare_vectors(np.ascontiguousarray(x, dtype=np.float32), distance)


def exact_search(
    store: EmbeddingStore,
    queries: Any,
    k: int,
    distance: str = "l2",
    allowed: np.ndarray | None = None,
    chunk: int = 1 << 16,
    exclude: tuple[np.ndarray, np.ndarray] | None = None,
    device: str | torch.device = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """The exact k nearest rows of the store for each query, reading the store chunk by
    chunk (it need not fit in memory): ``(dist, rows)`` [Q, k], ascending, equal
    distances by row; ``inf`` / ``-1`` where fewer than k rows are allowed. Products in
    float64, so that close neighbours keep their order (float32's expansion loses
    distances below about 1e-3 of the norms); on a GPU each chunk goes to the device
    and the running top-k stays there.

    Args:
        store: the store.
        queries: [Q, D] float vectors.
        k: neighbours per query.
        distance: ``"l2"`` (euclidean) or ``"cosine"`` (``1 - cos``).
        allowed: [N] bool rows that may be returned (default: the live rows).
        chunk: rows read at a time.
        exclude: ``(query_codes [Q], row_codes [N])`` int64: a row whose code equals
            the query's is never its neighbour (leave-one-case-out in one pass).
        device: where the products run (``"cpu"``, ``"cuda"``); the answer is the
            same up to float64 rounding.

    Examples:
        >>> import tempfile
        >>> store = EmbeddingStore.create(tempfile.mkdtemp() + "/a", dim=1, model="m")
        >>> _ = store.add([[0.0], [2.0], [1.0]], cases=list("abc"), sources=list("abc"))
        >>> exact_search(store, [[0.9]], k=2)[1].tolist()
        [[2, 0]]
    """
    check_choice("distance", distance, DISTANCES)
    k = positive_int("k", k)
    dev = _device(device)
    q = torch.from_numpy(_prepare(queries, distance)).to(dev, torch.float64)
    allowed = store.live if allowed is None else np.asarray(allowed, dtype=bool)
    codes = None
    if exclude is not None:
        codes = tuple(torch.from_numpy(np.asarray(c, dtype=np.int64)).to(dev) for c in exclude)
    best_d = torch.full((len(q), k), float("inf"), dtype=torch.float64, device=dev)
    best_i = torch.full((len(q), k), -1, dtype=torch.int64, device=dev)
    qq = (q * q).sum(1)[:, None]
    # [rows, chunk] float64 products at a time: 128 MiB on the CPU, 1 GiB on a GPU
    rows = max(1, (1 << (24 if dev.type == "cpu" else 27)) // chunk)
    for start, x in store.chunks(chunk):
        ok_rows = allowed[start : start + len(x)]
        if not ok_rows.any():
            continue
        g = torch.from_numpy(_prepare(x, distance)).to(dev, torch.float64)
        ok = torch.from_numpy(ok_rows).to(dev)
        gg = (g * g).sum(1)[None, :]
        for lo in range(0, len(q), rows):
            part = slice(lo, lo + rows)
            if distance == "cosine":
                d = 1.0 - q[part] @ g.T
            else:
                d = (qq[part] + gg - 2 * q[part] @ g.T).clamp_min_(0)
            d.masked_fill_(~ok[None, :], float("inf"))
            if codes is not None:
                own = codes[0][part, None] == codes[1][None, start : start + len(x)]
                d.masked_fill_(own, float("inf"))
            take = _first_k(d, min(k, len(x)))
            dd = torch.cat([best_d[part], d.gather(1, take)], 1)
            ii = torch.cat([best_i[part], take + start], 1)
            # by distance, equal distances by row: a stable sort by row, then by distance
            by_row = ii.argsort(dim=1, stable=True)
            order = by_row.gather(1, dd.gather(1, by_row).argsort(dim=1, stable=True)[:, :k])
            best_d[part], best_i[part] = dd.gather(1, order), ii.gather(1, order)
    best_i = best_i.masked_fill(best_d.isinf(), -1)
    dist = best_d if distance == "cosine" else best_d.sqrt()
    return dist.float().cpu().numpy(), best_i.cpu().numpy()


def _set_nprobe(faiss: Any, index: Any, nprobe: int) -> None:
    """Set an IVF index's nprobe, on the CPU or a GPU (GPU indexes take no search
    parameters with a selector, so the setting goes on the index)."""
    space = faiss.GpuParameterSpace() if hasattr(faiss, "GpuParameterSpace") else None
    if space is None or not type(index).__name__.startswith("Gpu"):
        space = faiss.ParameterSpace()
    space.set_index_parameter(index, "nprobe", nprobe)


def _device(device: str | torch.device) -> torch.device:
    """``device`` as a torch device; one line where it names a GPU this machine lacks."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r}: no CUDA device is available here; use 'cpu'")
    return dev


def _first_k(d: torch.Tensor, k: int) -> torch.Tensor:
    """[R, k] column indices of each row's k smallest entries, equal values by column
    (``topk`` alone picks any of the entries tied at the k-th value)."""
    tau = d.topk(k, dim=1, largest=False).values[:, -1:]
    tied = d == tau
    need = k - (d < tau).sum(1, keepdim=True)
    keep = (d < tau) | (tied & (tied.cumsum(1, dtype=torch.int32) <= need))
    return keep.nonzero()[:, 1].view(len(d), k)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found ∩ truth| / |truth| (``-1`` entries ignored)."""
    hits = [
        len(set(f[f >= 0]) & set(t[t >= 0])) / max(1, int((t >= 0).sum()))
        for f, t in zip(found, truth, strict=True)
    ]
    return float(np.mean(hits)) if hits else 1.0


@dataclass
class Build:
    """How an index was built and what it measured (stored beside it as JSON)."""

    kind: str
    distance: str
    rows: int  #: store rows it holds (0 .. rows - 1)
    trained_rows: int  #: rows the quantiser was trained on (IVF)
    model: str  #: the store's model when built
    params: dict[str, Any]  #: nlist, pq_bytes, hnsw_m, rerank
    search: dict[str, int]  #: the chosen search setting (nprobe or ef_search)
    recall: float  #: recall@k measured at build with the chosen setting
    recall_k: int
    target: float  #: the recall asked for
    curve: list[tuple[int, float]]  #: (setting, recall) as measured
    probes: int


class ArchiveIndex:
    """A searchable index over an `EmbeddingStore`. Build one with `build`, reopen it
    with `load`; `search` returns store rows (removed rows never), `add_new` indexes
    rows appended since the build.

    Args:
        store: the store it indexes.
        info: how it was built (`build` and `load` make it).
        faiss_index: the FAISS index (None for ``"exact"``).
        device: where searches run: ``"cpu"`` or ``"cuda"``. On ``"cuda"`` exact
            searches (the ``"exact"`` kind's, and the reference of every recall
            measurement) take the torch arithmetic on the GPU, and IVF indexes a GPU copy
            where the installed faiss has GPUs (`on_gpu`); HNSW stays on the CPU.

    Examples:
        >>> import tempfile
        >>> store = EmbeddingStore.create(tempfile.mkdtemp() + "/a", dim=4, model="m")
        >>> x = np.random.default_rng(0).normal(size=(500, 4)).astype("float32")
        >>> _ = store.add(x, cases=np.arange(500) // 10, sources=np.arange(500))
        >>> index = ArchiveIndex.build(store, "ivf_flat", recall=0.9, probes=50)
        >>> index.build_info.recall >= 0.9
        True
        >>> index.search(x[:1], k=1)[1].tolist()
        [[0]]
    """

    def __init__(
        self, store: EmbeddingStore, info: Build, faiss_index: Any = None, device: str = "cpu"
    ) -> None:
        self.store, self.build_info, self.index = store, info, faiss_index
        _device(device)
        self.device = device
        self._gpu: Any = None  # the GPU copy of an IVF index, made on first search
        self._set_search(info.search)

    @property
    def on_gpu(self) -> bool:
        """Whether the FAISS index searches on a GPU (``device="cuda"``, an IVF kind and
        a faiss with GPUs); otherwise FAISS searches on the CPU."""
        return (
            self.device == "cuda"
            and self.build_info.kind in ("ivf_flat", "ivf_pq")
            and faiss_gpu_count() > 0
        )

    # -- building ------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        store: EmbeddingStore,
        kind: str = "ivf_flat",
        *,
        distance: str = "l2",
        recall: float = 0.95,
        k: int = 10,
        probes: int = 1000,
        nlist: int | None = None,
        pq_bytes: int | None = None,
        hnsw_m: int = 32,
        rerank: int = 10,
        chunk: int = 1 << 18,
        seed: int = 0,
        device: str = "cpu",
    ) -> ArchiveIndex:
        """Build an index over every row of ``store``, in chunks, then measure its
        recall@k on ``probes`` live rows against exact search (each probe's own row
        left out of both) and pick the cheapest search setting that reaches
        ``recall`` (IVF: ``nprobe``; HNSW: ``efSearch``).

        Args:
            store: the store.
            kind: ``"exact"``, ``"ivf_flat"``, ``"ivf_pq"`` or ``"hnsw"``.
            distance: ``"l2"`` or ``"cosine"``.
            recall: the recall@k to reach (0 < recall <= 1); when no setting reaches
                it the best measured one is kept and ``build_info.recall`` says so.
            k: the k of recall@k.
            probes: rows searched to measure it (none for "exact": its recall is 1).
            nlist: IVF cells (default ``4 * sqrt(N)``, at most N / 39).
            pq_bytes: IVF-PQ bytes per vector (default D / 4: 1/16 of float32).
            hnsw_m: HNSW links per node.
            rerank: IVF-PQ re-ranks ``rerank * k`` candidates on the exact vectors.
            chunk: rows added at a time.
            seed: the training sample and the probes.
            device: where exact searches run (see `ArchiveIndex`).
        """
        check_choice("kind", kind, KINDS)
        check_choice("distance", distance, DISTANCES)
        faiss = import_faiss() if kind != "exact" else None
        if not (isinstance(recall, float | int) and 0 < recall <= 1):
            raise ValueError(f"recall must be in (0, 1], got {recall!r}")
        k, probes = positive_int("k", k), positive_int("probes", probes)
        n, d = len(store), store.dim
        if n == 0:
            raise ValueError(f"the archive {store.root} is empty: add embeddings first")
        rng = np.random.default_rng(seed)
        params: dict[str, Any] = {"rerank": rerank}
        index, trained = None, 0
        if kind != "exact":
            metric = faiss.METRIC_INNER_PRODUCT if distance == "cosine" else faiss.METRIC_L2
            if kind == "hnsw":
                index = faiss.IndexHNSWFlat(d, positive_int("hnsw_m", hnsw_m), metric)
                params["hnsw_m"] = hnsw_m
            else:
                nlist = nlist or int(min(max(1, 4 * np.sqrt(n)), max(1, n // 39)))
                params["nlist"] = positive_int("nlist", nlist)
                quantizer = faiss.IndexFlat(d, metric)
                if kind == "ivf_flat":
                    index = faiss.IndexIVFFlat(quantizer, d, nlist, metric)
                else:
                    m = pq_bytes or max(1, d // 4)
                    if d % m:
                        raise ValueError(f"pq_bytes must divide the dimension {d}, got {m}")
                    params["pq_bytes"] = m
                    index = faiss.IndexIVFPQ(quantizer, d, nlist, m, 8, metric)
                index.own_fields = True
                quantizer.this.disown()
                # train on a sample (64 points per cell), never the whole archive
                want = min(n, 64 * nlist)
                sample = np.sort(rng.choice(n, size=want, replace=False))
                index.train(_prepare(store.vectors(sample), distance))
                trained = want
            for _, x in store.chunks(chunk):
                index.add(_prepare(x, distance))
        info = Build(
            kind=kind, distance=distance, rows=n, trained_rows=trained, model=store.model,
            params=params, search={}, recall=1.0, recall_k=k, target=float(recall),
            curve=[], probes=probes,
        )  # fmt: skip
        self = cls(store, info, index, device)
        if index is None:  # exact search is its own reference: recall 1 by definition
            info.curve = [(0, 1.0)]
        else:
            self._tune(rng)
        return self

    def _settings(self) -> list[dict[str, int]]:
        kind = self.build_info.kind
        if kind in ("ivf_flat", "ivf_pq"):
            nlist = self.build_info.params["nlist"]
            return [{"nprobe": p} for p in _NPROBES if p < nlist] + [{"nprobe": nlist}]
        if kind == "hnsw":
            return [{"ef_search": e} for e in _EFS if e >= self.build_info.recall_k]
        return [{}]

    def _tune(self, rng: np.random.Generator) -> None:
        info = self.build_info
        live = np.flatnonzero(self.store.live)
        rows = np.sort(rng.choice(live, size=min(info.probes, len(live)), replace=False))
        truth = self._probe_truth(rows)
        curve, chosen = [], None
        for setting in self._settings():
            self._set_search(setting)
            r = self.measure_recall(rows, truth)
            curve.append((next(iter(setting.values()), 0), r))
            if r >= info.target:
                chosen = (setting, r)
                break
        if chosen is None:  # none reached the target: the best measured
            best = int(np.argmax([r for _, r in curve]))
            chosen = (self._settings()[best], curve[best][1])
        info.search, info.recall, info.curve = chosen[0], chosen[1], curve
        self._set_search(info.search)

    def _probe_truth(self, rows: np.ndarray) -> np.ndarray:
        k = self.build_info.recall_k
        q = self.store.vectors(rows)
        _, ids = exact_search(self.store, q, k + 1, self.build_info.distance, device=self.device)
        return _drop_self(ids, rows, k)

    def measure_recall(self, rows: np.ndarray | None = None, truth: np.ndarray | None = None,
                       *, probes: int = 1000, seed: int = 1) -> float:  # fmt: skip
        """recall@k of the index (its current search setting) against exact search on
        probe ``rows`` (default: ``probes`` live rows drawn with ``seed``), each probe's
        own row left out of both.

        Args:
            rows: the probe rows, or None.
            truth: their exact neighbours [P, k] (computed when None).
            probes: how many rows to draw when ``rows`` is None.
            seed: the draw.
        """
        k = self.build_info.recall_k
        if rows is None:
            live = np.flatnonzero(self.store.live)
            rng = np.random.default_rng(seed)
            rows = np.sort(rng.choice(live, size=min(probes, len(live)), replace=False))
        if truth is None:
            truth = self._probe_truth(rows)
        _, ids = self.search(self.store.vectors(rows), k + 1)
        return recall_at_k(_drop_self(ids, rows, k), truth)

    # -- searching -----------------------------------------------------------------
    def _set_search(self, setting: dict[str, int]) -> None:
        self._setting = dict(setting)

    def search(
        self, queries: Any, k: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest indexed rows of each query: ``(dist, rows)`` [Q, k] ascending
        (``inf`` / ``-1`` where too few). Removed rows are never returned.

        Args:
            queries: [Q, D] vectors.
            k: neighbours per query.
            allowed: [N] bool: only these rows may be returned (with the live ones), or
                None.
        """
        k = positive_int("k", k)
        q = _prepare(np.asarray(queries, dtype=np.float32), self.build_info.distance)
        if q.ndim != 2 or q.shape[1] != self.store.dim:
            raise ValueError(f"queries must be [Q, {self.store.dim}], got shape {q.shape}")
        mask = self.store.live[: self.build_info.rows]
        if allowed is not None:
            mask = mask & allowed[: self.build_info.rows]
        if self.index is None:
            full = np.zeros(len(self.store), dtype=bool)
            full[: len(mask)] = mask
            distance = self.build_info.distance
            return exact_search(self.store, q, k, distance, full, device=self.device)
        faiss = import_faiss()
        fetch = k * self.build_info.params["rerank"] if self.build_info.kind == "ivf_pq" else k
        fetch = min(fetch, max(1, int(mask.sum())))
        if self.on_gpu:
            return self._rerank(q, self._post_filtered(faiss, q, fetch, mask), k)
        return self._rerank(q, self._selected(faiss, q, fetch, mask), k)

    def _selected(self, faiss: Any, q: np.ndarray, fetch: int, mask: np.ndarray) -> np.ndarray:
        """[Q, fetch] rows from the CPU index, filtered by its ID selector."""
        # faiss.contrib.torch_utils replaces `search` by one without `params`; the
        # original stays as `search_numpy`
        search = getattr(self.index, "search_numpy", self.index.search)
        _, ids = search(q, fetch, params=self._search_params(faiss, mask))
        # a filter can leave the visited cells (or graph walk) short of rows: those
        # queries search again, wider, until filled or everything is visited
        wider = dict(self._setting)
        while (short := np.flatnonzero((ids < 0).any(1))).size and self._widen(wider):
            params = self._search_params(faiss, mask, wider)
            _, ids[short] = search(q[short], fetch, params=params)
        return ids

    def _post_filtered(self, faiss: Any, q: np.ndarray, fetch: int, mask: np.ndarray):
        """[Q, fetch] rows from the GPU copy, which takes no ID selector: each query
        fetches more (doubling, up to `GPU_K`) and keeps the allowed rows in order, which
        within the same cells are the selector's answer; queries still short search the
        CPU index with the selector, which widens nprobe as `search` does."""
        if self._gpu is None:
            self._gpu = self._to_gpu(faiss, self.index)
        search = getattr(self._gpu, "search_numpy", self._gpu.search)
        _set_nprobe(faiss, self._gpu, self._setting["nprobe"])
        out = np.full((len(q), fetch), -1, dtype=np.int64)
        limit = min(GPU_K, self.build_info.rows)
        todo, rest = np.arange(len(q)), []
        if fetch > limit:  # more than one GPU search returns: all on the CPU
            todo, rest = todo[:0], [todo]
        want = min(limit, fetch if mask.all() else 4 * fetch)
        while len(todo):
            _, ids = search(q[todo], want)
            ok = (ids >= 0) & mask[np.maximum(ids, 0)]
            first = np.argsort(~ok, axis=1, kind="stable")[:, :fetch]  # allowed first, in order
            kept = np.where(np.take_along_axis(ok, first, 1), np.take_along_axis(ids, first, 1), -1)
            full = (kept >= 0).all(1)
            out[todo[full]] = kept[full]
            # the probed cells ran out (-1 returned) or a GPU search returns no more:
            # only a wider nprobe can fill these, which the CPU search does
            stuck = ~full & ((ids < 0).any(1) | (want >= limit))
            rest.append(todo[stuck])
            todo = todo[~full & ~stuck]
            want = min(limit, 2 * want)
        rest = np.concatenate(rest) if rest else np.zeros(0, dtype=np.int64)
        if len(rest):
            out[rest] = self._selected(faiss, q[rest], fetch, mask)
        return out

    @staticmethod
    def _to_gpu(faiss: Any, index: Any) -> Any:
        """A GPU copy of ``index`` (its resources kept alive with it)."""
        resources = faiss.StandardGpuResources()
        try:
            gpu = faiss.index_cpu_to_gpu(resources, 0, index)
        except RuntimeError as e:  # e.g. a PQ code size FAISS's GPU kernels lack
            raise ValueError(f"this index cannot search on the GPU ({e}); use device='cpu'") from e
        gpu.resources_ref = resources
        return gpu

    def _widen(self, setting: dict[str, int]) -> bool:
        """Double ``setting`` in place (IVF: nprobe up to nlist; HNSW: efSearch up to
        the rows); False when it cannot grow."""
        if "nprobe" in setting and setting["nprobe"] < self.build_info.params["nlist"]:
            setting["nprobe"] = min(2 * setting["nprobe"], self.build_info.params["nlist"])
            return True
        if "ef_search" in setting and setting["ef_search"] < self.build_info.rows:
            setting["ef_search"] = min(2 * setting["ef_search"], self.build_info.rows)
            return True
        return False

    def _search_params(self, faiss: Any, mask: np.ndarray, setting: dict | None = None) -> Any:
        selector = None
        if not mask.all():
            bits = np.packbits(mask, bitorder="little")
            selector = faiss.IDSelectorBitmap(len(mask), faiss.swig_ptr(bits))
            selector.bits_ref = bits  # the selector reads this buffer: keep it alive
        setting = self._setting if setting is None else setting
        if self.build_info.kind == "hnsw":
            return faiss.SearchParametersHNSW(sel=selector, efSearch=setting["ef_search"])
        if self.build_info.kind in ("ivf_flat", "ivf_pq"):
            return faiss.SearchParametersIVF(sel=selector, nprobe=setting["nprobe"])
        return faiss.SearchParameters(sel=selector)

    def _rerank(self, q: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The shortlist's distances from the stored vectors (direct differences:
        FAISS's float32 expansion loses close distances; IVF-PQ's are approximate),
        the k best kept, ties by row; in blocks of queries."""
        ok = ids >= 0
        d = np.full(ids.shape, np.inf, dtype=np.float32)
        for lo in range(0, len(q), 256):
            part = slice(lo, lo + 256)
            rows = np.where(ok[part], ids[part], 0)
            x = _prepare(self.store.vectors(rows.ravel()), self.build_info.distance)
            x = x.reshape(*rows.shape, -1)
            if self.build_info.distance == "cosine":
                d[part] = 1.0 - np.einsum("qd,qkd->qk", q[part], x)
            else:
                x -= q[part, None, :]
                d[part] = np.sqrt(np.einsum("qkd,qkd->qk", x, x))
        d[~ok] = np.inf
        order = np.lexsort((np.where(ok, ids, np.iinfo(np.int64).max), d))[:, :k]
        dist = np.take_along_axis(d, order, 1)
        rows = np.where(np.isinf(dist), -1, np.take_along_axis(ids, order, 1))
        return _pad(dist, rows, k)

    # -- growing and persisting ----------------------------------------------------
    @property
    def pending(self) -> int:
        """Rows appended to the store since the index last took rows."""
        return len(self.store) - self.build_info.rows

    @property
    def rebuild_due(self) -> bool:
        """True once the store holds `REBUILD_FACTOR` times the rows an IVF quantiser was
        trained on: its cells were learnt on too small a part of the data, so `build`
        again (appending stays correct, only slower or less accurate)."""
        t = self.build_info.trained_rows
        return bool(t) and len(self.store) > REBUILD_FACTOR * t

    def add_new(self, chunk: int = 1 << 18) -> int:
        """Index the rows appended to the store since the build (IVF lists and HNSW
        graphs take them without retraining); the number of rows added. The stored
        recall was measured before them: `measure_recall` measures it again."""
        if self.store.model != self.build_info.model:
            raise ValueError(
                f"the index was built for model {self.build_info.model!r}, the archive "
                f"now holds {self.store.model!r}: build a new index"
            )
        start = self.build_info.rows
        for first, x in self.store.chunks(chunk):
            if first + len(x) <= start:
                continue
            part = x[max(0, start - first) :]
            if self.index is not None:
                self.index.add(_prepare(part, self.build_info.distance))
        added = len(self.store) - start
        self.build_info.rows = len(self.store)
        self._gpu = None  # copied again on the next search, with the new rows
        return added

    def save(self, path: str | Path) -> None:
        """Write ``path`` (the FAISS index, none for ``"exact"``) and ``path.json``."""
        path = Path(path)
        if self.index is not None:
            faiss = import_faiss()
            atomic_write(path, lambda f: f.write(faiss.serialize_index(self.index).tobytes()))
        text = json.dumps(self.build_info.__dict__, indent=1).encode()
        atomic_write(path.with_name(path.name + ".json"), lambda f: f.write(text))

    @classmethod
    def load(cls, store: EmbeddingStore, path: str | Path, device: str = "cpu") -> ArchiveIndex:
        """Read an index written by `save`, over the store it was built on; ``device``:
        where its exact searches run (see `ArchiveIndex`)."""
        path = Path(path)
        meta = path.with_name(path.name + ".json")
        if not meta.is_file():
            raise ValueError(f"no archive index at {path} ({meta.name} is missing)")
        try:
            raw = json.loads(meta.read_text())
            raw["curve"] = [tuple(c) for c in raw["curve"]]
            info = Build(**raw)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{meta} is damaged ({e}): build the index again") from e
        if info.model != store.model:
            raise ValueError(
                f"{path} was built over vectors of {info.model!r}, but {store.root} holds "
                f"{store.model!r}: build the index again"
            )
        if info.rows > len(store):
            raise ValueError(f"{path} indexes {info.rows} rows, the archive has {len(store)}")
        index = None
        if info.kind != "exact":
            faiss = import_faiss()
            if not path.is_file():
                raise ValueError(f"no FAISS index at {path}")
            index = faiss.deserialize_index(np.fromfile(path, dtype=np.uint8))
        return cls(store, info, index, device)

    def nbytes(self) -> int:
        """Bytes the index holds in memory (its serialised size; 0 for ``"exact"``)."""
        if self.index is None:
            return 0
        return int(import_faiss().serialize_index(self.index).nbytes)


def _drop_self(ids: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """[P, k+1] neighbours without each probe's own row (the last one where absent)."""
    keep = ids != rows[:, None]
    keep[keep.sum(1) > k, -1] = False  # own row absent: drop the (k+1)-th instead
    return ids[keep].reshape(len(ids), k)


def _pad(dist: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    short = k - ids.shape[1]
    if short > 0:
        dist = np.pad(dist, ((0, 0), (0, short)), constant_values=np.inf)
        ids = np.pad(ids, ((0, 0), (0, short)), constant_values=-1)
    return dist[:, :k], ids[:, :k]
