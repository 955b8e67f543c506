"""An append-only store of embeddings on disk: memory-mapped shards with per-row metadata.

A store is a directory::

    archive.json        dimension, dtype, the model that embedded every row, the shards
    shard-00000.npy     [n, D] vectors (float16 or float32), read memory-mapped
    shard-00000.npz     their case, label, scale, source and content key (strings)
    removed.npy         rows of removed cases (int64), absent while none is removed

``archive.json`` is written last (atomically) by every change, so a change that is cut
off leaves the store as it was before it. Rows keep their number for life: removing a
case marks its rows, and every search skips them.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["AddResult", "EmbeddingStore"]

FORMAT = 1
DTYPES = ("float16", "float32")
META = ("case", "label", "scale", "source", "key")


@dataclass(frozen=True)
class AddResult:
    """What `EmbeddingStore.add` did.

    Attributes:
        added: rows appended (numbered ``first`` on).
        duplicates: rows skipped because their key is already in the store (or
            repeated in the same call).
        first: the first new row's number.

    Examples:
        >>> AddResult(added=2, duplicates=1, first=10).added
        2
    """

    added: int
    duplicates: int
    first: int


def atomic_write(path: Path, write) -> None:
    """``write(file)`` into a temporary file beside ``path``, then rename it there."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    """An exclusive lock on the store while it changes (POSIX; elsewhere none)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(root / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _strings(name: str, values: Any, n: int) -> np.ndarray:
    arr = np.asarray(["" if v is None else str(v) for v in values], dtype=str)
    if len(arr) != n:
        raise ValueError(f"{name} has {len(arr)} values for {n} vectors")
    return arr


class EmbeddingStore:
    """Embeddings of one model, appended in shards, with each row's case (patient or
    slide), label (``""`` when unknown), scale, source and content key.

    Open an existing store with ``EmbeddingStore(path)``; make one with `create`.

    Args:
        path: the store's directory.

    Examples:
        >>> import tempfile
        >>> store = EmbeddingStore.create(tempfile.mkdtemp() + "/a", dim=2, model="m@1")
        >>> store.add(np.eye(2), cases=["c1", "c2"], sources=["x.png", "y.png"]).added
        2
        >>> len(store), store.case.tolist()
        (2, ['c1', 'c2'])
    """

    def __init__(self, path: str | Path) -> None:
        self.root = Path(path)
        self._load()

    def _load(self) -> None:
        """Read ``archive.json`` (again: another process may have changed the store)."""
        info = self.root / "archive.json"
        if not info.is_file():
            raise ValueError(f"{self.root} is not an embedding archive (no archive.json)")
        try:
            self.info = json.loads(info.read_text())
            self.dim, self.dtype = int(self.info["dim"]), str(self.info["dtype"])
            self.model = str(self.info["model"])
            self.shards: list[dict[str, Any]] = list(self.info["shards"])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{info} is damaged ({e}); the archive cannot be read") from e
        if self.info.get("format") != FORMAT:
            raise ValueError(f"{info}: archive format {self.info.get('format')}, not {FORMAT}")
        self._cache: dict[str, Any] = {}

    @classmethod
    def create(
        cls, path: str | Path, dim: int, model: str, dtype: str = "float16"
    ) -> EmbeddingStore:
        """A new, empty store in ``path`` (a new or empty directory).

        Args:
            path: the directory.
            dim: the embedding dimension.
            model: what embeds its rows (e.g. ``"resnet50@<weights digest>"``): vectors
                of another model are refused.
            dtype: ``"float16"`` (half the disk) or ``"float32"``.
        """
        root = Path(path)
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise ValueError(f"{root} exists and is not an empty directory")
        if isinstance(dim, bool) or not isinstance(dim, int | np.integer) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        if not isinstance(model, str) or not model:
            raise ValueError("model must name what embeds the archive's rows, e.g. 'name@digest'")
        root.mkdir(parents=True, exist_ok=True)
        info = {"format": FORMAT, "dim": int(dim), "dtype": dtype, "model": model, "shards": []}
        text = json.dumps(info, indent=1).encode()
        atomic_write(root / "archive.json", lambda f: f.write(text))
        return cls(root)

    def __len__(self) -> int:
        return sum(int(s["rows"]) for s in self.shards)

    def __repr__(self) -> str:
        return (
            f"EmbeddingStore({str(self.root)!r}, rows={len(self)}, live={int(self.live.sum())}, "
            f"dim={self.dim}, dtype={self.dtype}, model={self.model!r})"
        )

    # metadata, concatenated over shards and cached until the store changes
    def _meta(self, name: str) -> np.ndarray:
        if name not in self._cache:
            parts = [np.zeros(0, dtype=str)]
            for s in self.shards:
                with np.load(self.root / s["meta"], allow_pickle=False) as z:
                    parts.append(z[name])
            self._cache[name] = np.concatenate(parts)
        return self._cache[name]

    case = property(lambda self: self._meta("case"), doc="[N] each row's case id")
    label = property(lambda self: self._meta("label"), doc='[N] labels, "" where unknown')
    scale = property(lambda self: self._meta("scale"), doc='[N] scales, "" where unknown')
    source = property(lambda self: self._meta("source"), doc="[N] where each row came from")
    key = property(lambda self: self._meta("key"), doc="[N] content keys (for repeats)")

    @property
    def removed(self) -> np.ndarray:
        """[r] rows of removed cases (int64)."""
        if "removed" not in self._cache:
            f = self.root / "removed.npy"
            self._cache["removed"] = (
                np.load(f, allow_pickle=False) if f.is_file() else np.zeros(0, dtype=np.int64)
            )
        return self._cache["removed"]

    @property
    def live(self) -> np.ndarray:
        """[N] bool: rows not removed."""
        mask = np.ones(len(self), dtype=bool)
        mask[self.removed] = False
        return mask

    def _maps(self) -> list[np.ndarray]:
        if "maps" not in self._cache:
            self._cache["maps"] = [
                np.load(self.root / s["file"], mmap_mode="r", allow_pickle=False)
                for s in self.shards
            ]
        return self._cache["maps"]

    def vectors(self, rows: Any) -> np.ndarray:
        """[len(rows), D] float32 vectors of ``rows`` (any order, repeats allowed), read
        from the memory-mapped shards."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise ValueError(f"rows must lie in [0, {len(self)}), got {rows.min()}..{rows.max()}")
        out = np.empty((rows.size, self.dim), dtype=np.float32)
        starts = np.cumsum([0] + [int(s["rows"]) for s in self.shards])
        which = np.searchsorted(starts, rows.ravel(), side="right") - 1
        for s, m in enumerate(self._maps()):
            pick = np.flatnonzero(which == s)
            if pick.size:
                local = rows.ravel()[pick] - starts[s]
                order = np.argsort(local, kind="stable")  # sequential reads of the map
                out[pick[order]] = m[local[order]]
        return out.reshape(*rows.shape, self.dim)

    def chunks(self, rows: int = 1 << 18) -> Iterator[tuple[int, np.ndarray]]:
        """``(first row, [n, D] float32)`` over the whole store, ``rows`` at a time, so a
        store larger than memory is read piece by piece."""
        start = 0
        for m in self._maps():
            for lo in range(0, len(m), rows):
                part = np.array(m[lo : lo + rows], dtype=np.float32)  # a copy: writable
                yield start + lo, part
            start += len(m)

    def add(
        self,
        vectors: Any,
        cases: Sequence[Any],
        sources: Sequence[Any],
        labels: Sequence[Any] | None = None,
        scales: Sequence[Any] | None = None,
        keys: Sequence[Any] | None = None,
        model: str | None = None,
    ) -> AddResult:
        """Append ``vectors`` [n, D] as a new shard. Rows whose key (``keys``, e.g. a
        content digest of the image file; else the source) is already in the store or
        earlier in ``vectors`` are skipped and counted, not added twice.

        Args:
            vectors: [n, D] embeddings (numpy or torch).
            cases: [n] case (patient / slide) ids.
            sources: [n] where each row comes from (an image path).
            labels: [n] labels, or None (unknown).
            scales: [n] scales (magnifications), or None (unknown).
            keys: [n] content keys, or None (the sources).
            model: what embedded ``vectors``; must be the store's model when given.
        """
        if model is not None and model != self.model:
            raise ValueError(
                f"these vectors come from model {model!r}, but {self.root} holds vectors "
                f"of {self.model!r}: vectors of different models are never mixed (start a "
                "new archive for the new model)"
            )
        if hasattr(vectors, "detach"):
            vectors = vectors.detach().cpu().float().numpy()
        x = np.asarray(vectors, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"vectors must be [n, {self.dim}], got shape {x.shape}")
        if not np.isfinite(x).all():
            bad = int((~np.isfinite(x)).any(1).sum())
            raise ValueError(f"vectors has {bad} rows with NaN or inf")
        n = len(x)
        meta = {
            "case": _strings("cases", cases, n),
            "label": _strings("labels", [""] * n if labels is None else labels, n),
            "scale": _strings("scales", [""] * n if scales is None else scales, n),
            "source": _strings("sources", sources, n),
        }
        meta["key"] = meta["source"] if keys is None else _strings("keys", keys, n)
        if (meta["case"] == "").any():
            raise ValueError(f"cases has {int((meta['case'] == '').sum())} empty ids")
        with _locked(self.root):
            self._load()  # another process may have added since we opened
            _, first = np.unique(meta["key"], return_index=True)
            fresh = np.zeros(n, dtype=bool)
            fresh[first] = True
            fresh &= ~np.isin(meta["key"], self.key[self.live])
            keep = np.flatnonzero(fresh)
            start = len(self)
            if keep.size:
                name = f"shard-{len(self.shards):05d}"
                rows = x[keep].astype(self.dtype)
                atomic_write(self.root / f"{name}.npy", lambda f: np.save(f, rows))
                picked = {k: v[keep] for k, v in meta.items()}
                atomic_write(self.root / f"{name}.npz", lambda f: np.savez(f, **picked))
                shard = {"file": f"{name}.npy", "meta": f"{name}.npz", "rows": int(keep.size)}
                self.shards.append(shard)
                self._commit()
        return AddResult(added=int(keep.size), duplicates=n - int(keep.size), first=start)

    def remove_case(self, case: Any) -> int:
        """Mark every live row of ``case`` removed (searches skip them); the number of
        rows removed. A case that is not in the store is a ValueError."""
        with _locked(self.root):
            self._load()
            rows = np.flatnonzero((self.case == str(case)) & self.live)
            if rows.size == 0:
                raise ValueError(f"case {case!r} is not in the archive {self.root}")
            removed = np.union1d(self.removed, rows).astype(np.int64)
            atomic_write(self.root / "removed.npy", lambda f: np.save(f, removed))
            self._cache = {}
        return int(rows.size)

    def _commit(self) -> None:
        self.info["shards"] = self.shards
        text = json.dumps(self.info, indent=1).encode()
        atomic_write(self.root / "archive.json", lambda f: f.write(text))
        self._cache = {}
