"""Exact kNN and evaluation over gloo ranks: each rank passes its shard (uneven, some
empty, patients split across ranks) and gets what one process gets for the shards
concatenated in rank order: the same neighbour ids and distances, and the same
`EvaluationReport`, field for field, on 1 to 4 ranks; bad input on one rank fails on all."""

import datetime
import os
import pickle
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import CUDA_MARKS

from smse_metric.evaluation import KNNClassifier, evaluate_embeddings

#: (name, distance, exclude, separate gallery)
CASES = [
    ("random", "cosine", "group", False),
    ("random", "l2", "self", False),
    ("ties", "squared_l2", "group", False),
    ("ties", "cosine", "none", True),
    ("random", "l2", "group", True),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data(name: str, seed: int):
    """Embeddings, labels, patients, scales: random floats, or a tie-heavy integer grid
    with duplicated rows (equal distances everywhere)."""
    rng = np.random.default_rng(seed)
    n = 97 if name == "random" else 90
    if name == "random":
        emb = rng.normal(size=(n, 6)).astype(np.float32)
    else:
        emb = rng.integers(0, 3, size=(n, 4)).astype(np.float32)
        emb[40:60] = emb[0:20]  # duplicates
        emb[60] = 0  # a zero row: cosine treats it as orthogonal to everything
    labels = rng.integers(0, 3, n)
    groups = rng.integers(0, 15, n)  # patients scattered over the shards
    scales = rng.choice([5, 10, 20], n)
    return emb, labels, groups, scales


def _cuts(n: int, world: int) -> list[int]:
    """Uneven shard boundaries, with an empty shard from 3 ranks on."""
    sizes = {1: [n], 2: [n // 3, n - n // 3], 3: [n // 2, 0, n - n // 2]}.get(
        world, [5, n // 2, 0, n - 5 - n // 2]
    )
    return np.concatenate([[0], np.cumsum(sizes)]).tolist()


def _inputs(case, world: int, rank: int | None):
    """The case's queries (and gallery) as a whole (rank None) or as one rank's shard."""
    name, distance, exclude, separate = case
    q = _data(name, 0)
    g = _data(name, 1) if separate else None

    def shard(arrays):
        cuts = _cuts(len(arrays[0]), world)
        lo, hi = (0, None) if rank is None else (cuts[rank], cuts[rank + 1])
        return tuple(a[lo:hi] for a in arrays)

    q = shard(q)
    g = None if g is None else shard(g)
    return q, g, distance, exclude


def _results(case, world: int, rank: int | None):
    (emb, labels, groups, scales), gallery, distance, exclude = _inputs(case, world, rank)
    kw = {"distributed": True} if rank is not None else {}
    report = evaluate_embeddings(
        emb, labels, groups, scales, k=4, exclude=exclude, gallery=gallery,
        distance=distance, backend="torch", device="cpu", **kw,
    )  # fmt: skip
    g_emb, g_labels, g_groups = (emb, labels, groups) if gallery is None else gallery[:3]
    knn = KNNClassifier(k=4, distance=distance, backend="torch", device="cpu", **kw)
    knn.fit(g_emb, g_labels, groups=g_groups)
    knn_exclude = "none" if gallery is not None else exclude
    extra = np.full(len(emb), 7)
    tables = list(knn.kneighbors_chunks(emb, groups, knn_exclude, extra=extra))
    dist_ = np.concatenate([np.zeros((0, 11))] + [t.dist for t in tables])
    ids = np.concatenate([np.zeros((0, 11), dtype=np.int64)] + [t.ids for t in tables])
    return report.to_dict(), dist_, ids, knn.predict(emb, groups, knn_exclude)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    if world == 3:  # many rounds of few queries, small products: the same answers
        from smse_metric.evaluation import sharded

        sharded.CHUNK_ENTRIES, sharded.BLOCK = 60, 32
    try:
        results = [_results(case, world, rank) for case in CASES]
        with open(f"{out}/{rank}.pkl", "wb") as f:
            pickle.dump(results, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_every_world_size_gives_the_single_process_answer(tmp_path, world):
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    ranks = []
    for r in range(world):
        with open(tmp_path / f"{r}.pkl", "rb") as f:
            ranks.append(pickle.load(f))
    for c, case in enumerate(CASES):
        report, dist_, ids, pred = _results(case, world, None)
        for r in range(world):  # every rank: the whole report
            assert ranks[r][c][0] == report, (case, r)
        # the neighbour tables and predictions, stitched in rank order
        assert np.array_equal(np.concatenate([ranks[r][c][2] for r in range(world)]), ids), case
        got = np.concatenate([ranks[r][c][1] for r in range(world)])
        assert np.array_equal(got, dist_), case  # bit for bit, inf included
        assert np.array_equal(np.concatenate([ranks[r][c][3] for r in range(world)]), pred)


def _bad_worker(rank: int, world: int, port: int, out: str, fault: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=5)
    )
    emb, labels, groups, _ = _data("random", 0)
    mine = slice(rank * 40, rank * 40 + 40)
    emb, labels, groups = emb[mine], labels[mine], groups[mine]
    k = 4
    if fault == "k" and rank == 1:
        k = 5
    if fault == "dim" and rank == 1:
        emb = emb[:, :5]
    if fault == "nan" and rank == 1:
        emb[3, 2] = np.nan
    if fault == "labels" and rank == 1:
        labels = labels.astype(str)
    if fault == "dies" and rank == 1:
        os._exit(3)  # a rank that dies before the collective
    try:
        evaluate_embeddings(emb, labels, groups, k=k, distributed=True, clustering=False)
        message = "no error"
    except (ValueError, RuntimeError) as e:
        message = f"{type(e).__name__}: {e}"
    with open(f"{out}/{rank}.txt", "w") as f:
        f.write(message)
    dist.destroy_process_group()


@pytest.mark.parametrize(
    ("fault", "expect"),
    [
        ("k", "the ranks disagree on k (rank 0: 4, rank 1: 5)"),
        ("dim", "the ranks disagree on embedding dimension (rank 0: 6, rank 1: 5)"),
        ("nan", "rank 1 of the process group: ValueError: embeddings has 1 rows with NaN"),
        ("labels", "the ranks disagree on label type"),
    ],
)
def test_a_mismatch_on_one_rank_is_one_error_on_every_rank(tmp_path, fault, expect):
    mp.spawn(_bad_worker, args=(2, _free_port(), str(tmp_path), fault), nprocs=2, join=True)
    for r in range(2):
        message = (tmp_path / f"{r}.txt").read_text()
        assert message.startswith("ValueError") and expect in message, (r, message)


def test_a_dead_rank_ends_the_others_with_an_error_not_a_hang(tmp_path):
    ctx, port = mp.get_context("spawn"), _free_port()
    procs = [
        ctx.Process(target=_bad_worker, args=(r, 2, port, str(tmp_path), "dies")) for r in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)  # the process group's timeout is 5 s
    alive = [p.is_alive() for p in procs]
    for p in procs:
        p.kill()
    assert alive == [False, False] and procs[1].exitcode == 3
    message = (tmp_path / "0.txt").read_text()
    assert message.startswith("RuntimeError"), message


def test_without_a_process_group_distributed_says_what_it_needs():
    with pytest.raises(RuntimeError, match=r"initialised torch\.distributed process group"):
        evaluate_embeddings(np.eye(4, dtype=np.float32), [0, 0, 1, 1], distributed=True)


BIG = [(d, e) for d in ("cosine", "l2", "squared_l2") for e in ("group", "self")]


def _big(distance: str, exclude: str, rank: int | None):
    """N = 4500 leave-one-out: one process takes the symmetric search there."""
    rng = np.random.default_rng(3)
    n = 4500
    x, y, g = (
        rng.normal(size=(n, 24)).astype(np.float32),
        rng.integers(0, 4, n),
        rng.integers(0, 300, n),
    )
    if rank is not None:
        mine = slice(0, 1900) if rank == 0 else slice(1900, n)
        x, y, g = x[mine], y[mine], g[mine]
    kw = {"distributed": True} if rank is not None else {}
    settings = {"k": 5, "exclude": exclude, "distance": distance, "backend": "torch"}
    report = evaluate_embeddings(x, y, g, ranking=False, clustering=False, **settings, **kw)
    knn = KNNClassifier(5, distance, backend="torch", **kw).fit(x, y, groups=g)
    tables = list(knn.kneighbors_chunks(x, g, exclude))
    return (
        report.to_dict(),
        np.concatenate([t.ids for t in tables]),
        np.concatenate([t.dist for t in tables]),
    )


def _big_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        with open(f"{out}/{rank}.pkl", "wb") as f:
            pickle.dump([_big(d, e, rank) for d, e in BIG], f)
    finally:
        dist.destroy_process_group()


def test_leave_one_out_at_the_symmetric_search_scale_is_the_same(tmp_path):
    """At N >= 4096 one process takes the symmetric search, which serves entry (i, j)
    and (j, i) from one product: the l2 similarity is symmetric term by term, so the
    ranks' flat products agree with it bit for bit."""
    mp.spawn(_big_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [pickle.loads((tmp_path / f"{r}.pkl").read_bytes()) for r in range(2)]
    for c, (distance, exclude) in enumerate(BIG):
        report, ids, dist_ = _big(distance, exclude, None)
        assert ranks[0][c][0] == report == ranks[1][c][0], (distance, exclude)
        assert np.array_equal(np.concatenate([r[c][1] for r in ranks]), ids)
        assert np.array_equal(np.concatenate([r[c][2] for r in ranks]), dist_), (distance, exclude)


def _ring_worker(rank: int, world: int, port: int, out: str) -> None:
    """Records the row ranges each `_cross` call covers, as global ids, and the
    leave-one-out neighbours of uneven shards (one empty from 3 ranks on)."""
    from smse_metric.evaluation import sharded

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    sharded.BLOCK = 32  # several blocks per shard
    covered, cross = [], sharded._cross

    def recording(a, a_rows, b, b_rows, same):
        if a_rows[1] > a_rows[0] and b_rows[1] > b_rows[0]:
            ids = [int(a.ids[a_rows[0]]), int(a.ids[a_rows[1] - 1]) + 1]
            covered.append((*ids, int(b.ids[b_rows[0]]), int(b.ids[b_rows[1] - 1]) + 1, same))
        cross(a, a_rows, b, b_rows, same)

    sharded._cross = recording
    try:
        emb, labels, groups, _ = _data("random", 2)
        cuts = _cuts(len(emb), world) if world < 5 else [0, 20, 20, 50, 90, 97]
        mine = slice(cuts[rank], cuts[rank + 1])
        knn = KNNClassifier(k=3, distance="l2", backend="torch", distributed=True)
        knn.fit(emb[mine], labels[mine], groups=groups[mine])
        tables = list(knn.kneighbors_chunks(emb[mine], groups[mine], "group"))
        ids = np.concatenate([np.zeros((0, 3), dtype=np.int64)] + [t.ids for t in tables])
        with open(f"{out}/{rank}.pkl", "wb") as f:
            pickle.dump((covered, ids), f)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
def test_the_ring_computes_every_pair_of_rows_once(tmp_path, world):
    """Leave-one-out over the ranks: each unordered pair of rows (and each row with
    itself) is computed by exactly one rank, once: half the products of a flat search,
    nothing missed, and the neighbours of one process."""
    mp.spawn(_ring_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    emb, labels, groups, _ = _data("random", 2)
    n = len(emb)
    times = np.zeros((n, n), dtype=np.int64)
    ids = []
    for r in range(world):
        covered, got = pickle.loads((tmp_path / f"{r}.pkl").read_bytes())
        ids.append(got)
        for a0, a1, b0, b1, same in covered:
            if same:  # the upper block pairs of one shard: a diagonal block once
                times[a0:a1, b0:b1] += 1
                if (a0, a1) != (b0, b1):
                    times[b0:b1, a0:a1] += 1
            else:
                times[a0:a1, b0:b1] += 1
                times[b0:b1, a0:a1] += 1
    assert times.min() == 1 and times.max() == 1, np.argwhere(times != 1)[:5]
    knn = KNNClassifier(k=3, distance="l2", backend="torch").fit(emb, labels, groups=groups)
    want = np.concatenate([t.ids for t in knn.kneighbors_chunks(emb, groups, "group")])
    assert np.array_equal(np.concatenate(ids), want)


def _backend_worker(rank: int, backend: str, port: int, out: str) -> None:
    """One rank of ``backend``: the evaluation (the ring's leave-one-out, then the
    broadcast's ranking neighbours) on the device the backend takes tensors on."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(backend, rank=0, world_size=1)
    try:
        emb, labels, groups, scales = _data("random", 4)
        settings = {"k": 4, "exclude": "group", "distance": "l2", "backend": "torch"}
        report = evaluate_embeddings(emb, labels, groups, scales, **settings, distributed=True)
        knn = KNNClassifier(k=4, distance="l2", backend="torch", distributed=True)
        ids = np.concatenate(
            [t.ids for t in knn.fit(emb, labels, groups).kneighbors_chunks(emb, groups, "group")]
        )
        with open(f"{out}/0.pkl", "wb") as f:
            pickle.dump((report.to_dict(), ids), f)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", ["gloo", pytest.param("nccl", marks=CUDA_MARKS)])
def test_each_backend_gives_the_single_process_answer(tmp_path, backend):
    """NCCL takes CUDA tensors: the same code on the GPU (one rank: one GPU here)."""
    mp.spawn(_backend_worker, args=(backend, _free_port(), str(tmp_path)), nprocs=1, join=True)
    report, ids = pickle.loads((tmp_path / "0.pkl").read_bytes())
    device = "cuda" if backend == "nccl" else "cpu"
    emb, labels, groups, scales = _data("random", 4)
    settings = {"k": 4, "exclude": "group", "distance": "l2", "backend": "torch"}
    want = evaluate_embeddings(emb, labels, groups, scales, **settings, device=device)
    knn = KNNClassifier(k=4, distance="l2", backend="torch", device=device)
    tables = knn.fit(emb, labels, groups).kneighbors_chunks(emb, groups, "group")
    assert report == want.to_dict()
    assert np.array_equal(ids, np.concatenate([t.ids for t in tables]))
