"""Leave-one-out kNN evaluation vs scikit-learn and PML, N x 128 embeddings, k = 10.

Queries are the gallery; every method excludes each query from its own neighbours.
Each case runs in a fresh process (peak memory is its own) under a time limit.

    python -m benchmarks.bench_eval            # N = 10^4, 10^5, 10^6 -> results/eval.md
    python -m benchmarks.bench_eval --quick    # N = 10^4
    python -m benchmarks.bench_eval --device cuda   # the torch search on a GPU -> eval-cuda.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from benchmarks.common import PeakMemory, machine, markdown_table, run_case, write_report

D, K, CLASSES, GROUPS = 128, 10, 8, 1000
SUBSET = 10_000  # at N = 10^6 a full leave-one-out is 10^12 distances: time a query subset
TIMEOUT_S = 1800
REPEATS = 3  # median of 3 fresh processes (one at N = 10^6)


def embeddings(n: int):
    rng = np.random.default_rng(0)
    y = rng.integers(0, CLASSES, n)
    x = rng.normal(size=(n, D)).astype(np.float32)
    x[:, :CLASSES] += 2.0 * np.eye(CLASSES, dtype=np.float32)[y]
    return x, y, rng.integers(0, GROUPS, n)


def ours(x, y, g, n_queries):
    from smse_metric import evaluate_embeddings

    if n_queries == len(x):
        r = evaluate_embeddings(x, y, k=K, exclude="self", distance="l2", ranking=False)
        return r.pooled.accuracy
    # a subset of queries against the full gallery, each excluding itself (as a group)
    ids = np.arange(len(x))
    r = evaluate_embeddings(
        x[:n_queries],
        y[:n_queries],
        ids[:n_queries],
        k=K,
        exclude="group",
        distance="l2",
        ranking=False,
        gallery=(x, y, ids, None),
    )
    return r.pooled.accuracy


def sklearn(x, y, g, n_queries):
    from sklearn.neighbors import KNeighborsClassifier

    clf = KNeighborsClassifier(n_neighbors=K, algorithm="brute").fit(x, y)
    _, ids = clf.kneighbors(x[:n_queries], n_neighbors=K + 1)
    ids = np.where(ids[:, :1] == np.arange(n_queries)[:, None], ids[:, 1:], ids[:, :K])
    votes = np.zeros((n_queries, CLASSES))
    np.add.at(votes, (np.arange(n_queries)[:, None], y[ids]), 1)
    return float((votes.argmax(1) == y[:n_queries]).mean())


def pml(x, y, g, n_queries):
    import torch
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    calc = AccuracyCalculator(include=("precision_at_1",), k=K, device=torch.device("cpu"))
    return calc.get_accuracy(torch.from_numpy(x), torch.from_numpy(y))["precision_at_1"]


METHODS = {"ours": ours, "sklearn": sklearn, "pml": pml}

#: collapsed or duplicated embeddings (normal early in training): (rows, k)
TIES = {
    "all rows equal, 128-d": (lambda n: np.ones((n, D), np.float32), K),
    # small integers: float32 products are exact, so every backend sees the exact ties
    # (random floats would tie up to each backend's own rounding)
    "10 distinct rows repeated, 128-d": (
        lambda n: np.repeat(np.random.default_rng(0).integers(-3, 4, (10, D)), n // 10, 0),
        K,
    ),
    "2-D zeros": (lambda n: np.zeros((n, 2), np.float32), 1),
}


def tie_case(name: str, method: str, n: int) -> dict:
    """Leave-one-out neighbours of tied embeddings: our symmetric search, our FAISS
    path (the index search the symmetric one replaces) or PML; a digest of the ids."""
    import hashlib

    import torch

    from smse_metric.evaluation import KNNClassifier, symmetric_knn
    from smse_metric.evaluation import knn as knn_module

    make, k = TIES[name]
    x = make(n).astype(np.float32)
    t0 = time.perf_counter()
    if method == "symmetric":
        ids = symmetric_knn(x, k, "l2")[1]
    elif method == "faiss":
        knn_module.SYMMETRIC_MIN_ROWS = 10**9  # force the index search
        clf = KNNClassifier(k, "l2", backend="faiss").fit(x, np.zeros(n, dtype=int))
        ids = np.concatenate([c.ids for c in clf.kneighbors_chunks(x, exclude="self")])
    else:
        from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

        calc = AccuracyCalculator(include=("precision_at_1",), k=k, device=torch.device("cpu"))
        calc.get_accuracy(torch.from_numpy(x), torch.zeros(n))
        ids = np.zeros(0, dtype=np.int64)
    seconds = time.perf_counter() - t0
    return {"s": seconds, "ids": hashlib.sha1(ids.astype(np.int64).tobytes()).hexdigest()[:12]}


def ties_table(n: int, repeats: int) -> list[str]:
    rows = []
    for index, name in enumerate(TIES):
        res = {}
        for method in ("symmetric", "faiss", "pml"):
            cfg = [f"tie-{method}", str(n), str(index)]
            runs = [
                run_case("benchmarks.bench_eval", cfg, timeout=TIMEOUT_S) for _ in range(repeats)
            ]
            bad = [r for r in runs if "error" in r]
            res[method] = (
                bad[0]
                if bad
                else {"s": statistics.median(r["s"] for r in runs), "ids": runs[0]["ids"]}
            )
        sym, fa, pm = res["symmetric"], res["faiss"], res["pml"]

        def sec(r):
            return f"{r['s']:.2f}" if "s" in r else r["error"]

        ratio = f"{sym['s'] / fa['s']:.2f}x" if "s" in sym and "s" in fa else "—"
        same = "yes" if sym.get("ids") == fa.get("ids") and "ids" in sym else "no"
        rows.append([name, f"{n:.0e}", str(TIES[name][1]), sec(sym), sec(fa), sec(pm), ratio, same])
        print(" | ".join(rows[-1]), flush=True)
    header = [
        "embeddings",
        "N",
        "k",
        "ours symmetric s",
        "ours FAISS path s",
        "PML s",
        "symmetric / FAISS time",
        "same ids",
    ]
    return [
        "## Tied embeddings",
        "",
        "Leave-one-out on collapsed or duplicated embeddings, where every similarity ties "
        "and only the index decides: our symmetric search (`symmetric_knn`), the FAISS "
        "index search it replaces (`KNNClassifier(backend='faiss')`), and PML's "
        "`AccuracyCalculator` (precision@1) for scale. `same ids`: both of ours return "
        f"identical neighbour ids (ties by index). Median of {repeats} fresh processes.",
        "",
        markdown_table(header, rows),
        "",
    ]


def _plain_topk(x, k: int, chunk: int = 4096):
    """The plain torch reference: per chunk of queries ``x @ x.T``, the diagonal masked,
    ``topk``; squared distances from the expansion (no tie rule, no symmetry)."""
    import torch

    sq = (x * x).sum(1)
    out = []
    for s in range(0, len(x), chunk):
        d = sq[s : s + chunk, None] + sq[None] - 2 * (x[s : s + chunk] @ x.T)
        d[torch.arange(len(d)), torch.arange(s, s + len(d))] = float("inf")
        out.append(d.topk(k, dim=1, largest=False).indices)
    return torch.cat(out)


def device_table(device: str, sizes: tuple[int, ...], repeats: int) -> list[str]:
    """Leave-one-out on ``device`` with torch alone: the float32 symmetric search, the
    TF32 and bf16 candidate searches (`bounded_knn`) and plain torch ``mm`` + ``topk``
    on the same device; whether the candidate searches' ids equal the float32 search's
    there, and its ids the CPU search's (random rows, and the tied cases)."""
    import torch

    from smse_metric.evaluation import bounded_knn, symmetric_knn

    dev = torch.device(device)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def timed(fn, once: bool = False):
        times = []
        for _ in range(1 if once else repeats):
            sync()
            t0 = time.perf_counter()
            out = fn()
            sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times), out

    def differ(ids, want) -> str:
        rows = int((ids != want).any(1).sum())
        return "yes" if rows == 0 else f"no: {rows} of {len(ids)} rows"

    searches = {
        "float32": lambda x, k: symmetric_knn(x, k, "l2"),
        "tf32": lambda x, k: bounded_knn(x, k, "l2", precision="tf32"),
        "bf16": lambda x, k: bounded_knn(x, k, "l2", precision="bf16"),
    }
    cases = [(f"random, {D}-d", n, K, lambda n: embeddings(n)[0]) for n in sizes]
    cases += [(name, 10**4, k, make) for name, (make, k) in TIES.items()]
    rows = []
    for name, n, k, make in cases:
        x = torch.from_numpy(make(n).astype(np.float32)).to(dev)
        once = n >= 10**6  # one run each there, as on the CPU
        got = {m: timed(lambda x=x, k=k, fn=fn: fn(x, k), once) for m, fn in searches.items()}
        plain_s, _ = timed(lambda x=x, k=k: _plain_topk(x, k), once)
        ref = got["float32"][1][1]
        cpu = "—"  # 10^6: ~20 min on a CPU
        if n <= 10**5:
            cpu = differ(ref, symmetric_knn(x.cpu().numpy(), k, "l2")[1])
        best = min(got[m][0] for m in ("tf32", "bf16"))
        rows.append(
            [
                name,
                f"{n:.0e}",
                str(k),
                *(f"{got[m][0]:.3f}" for m in searches),
                f"{plain_s:.3f}",
                f"{best / plain_s:.2f}x",
                f"{differ(got['tf32'][1][1], ref)} / {differ(got['bf16'][1][1], ref)}",
                cpu,
            ]
        )
        print(" | ".join(rows[-1]), flush=True)
    header = [
        "embeddings",
        "N",
        "k",
        "float32 symmetric s",
        "TF32 candidates s",
        "bf16 candidates s",
        "plain mm + topk s",
        "best candidates / plain",
        "TF32 / bf16 ids = float32's",
        "float32 ids = CPU's",
    ]
    return [
        f"Leave-one-out on {device} with torch alone: `symmetric_knn` (float32, each block "
        "pair once, exact (distance, index) order), `bounded_knn` (candidates from a TF32 "
        "or bf16 product within its error bound, ranked in float32: the same exact order) "
        "against plain `mm` + `topk` in chunks of 4096 queries (no tie rule, each pair "
        f"twice). Median of {repeats} (one run at 10^6); block sizes are each search's "
        "default for this device.",
        "",
        markdown_table(header, rows),
        "",
    ]


def case(method: str, n: int, n_queries: int) -> dict:
    import torch

    x, y, g = embeddings(n)
    with PeakMemory(torch.device("cpu")) as mem:
        t0 = time.perf_counter()
        score = METHODS[method](x, y, g, n_queries)
        seconds = time.perf_counter() - t0
    return {"s": seconds, "peak_mib": mem.mib, "score": float(score)}


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument(
        "--full",
        action="store_true",
        help="at N = 10^6 run every query (about an hour here), not a subset",
    )
    p.add_argument("--device", default="cpu", help="cuda: the torch search on the GPU only")
    p.add_argument("--case", nargs=3, metavar=("METHOD", "N", "QUERIES"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device != "cpu":
        sizes = (10**4,) if args.quick else (10**4, 10**5, 10**6)
        cmd = f"python -m benchmarks.bench_eval --device {args.device}"
        cmd += " --quick" if args.quick else ""
        text = "\n".join(
            [
                f"# Evaluation on {args.device}",
                "",
                f"Machine: {machine()}.",
                f"Command: `{cmd}`",
                "",
                *device_table(args.device, sizes, 1 if args.quick else 3),
            ]
        )
        name = f"eval-{args.device.split(':')[0]}" + ("-quick" if args.quick else "")
        return write_report(text, name, args.out)
    if args.case and args.case[0].startswith("tie-"):  # tie-METHOD N CASE-INDEX
        m, n, index = args.case
        print(json.dumps(tie_case(list(TIES)[int(index)], m[4:], int(n))))
        return ""
    if args.case:
        m, n, nq = args.case
        print(json.dumps(case(m, int(n), int(nq))))
        return ""

    rows, notes = [], []
    for n in (10**4,) if args.quick else (10**4, 10**5, 10**6):
        n_queries = n if n < 10**6 or args.full else SUBSET
        res = {}
        for method in METHODS:
            if n >= 10**6 and method != "ours":
                notes.append(
                    f"{method} at N = 10^6: not run; a leave-one-out pass is 10^12 distances "
                    "(hours on this machine), and its query-subset mode differs from ours"
                )
                res[method] = {}
                continue
            cfg = [method, str(n), str(n_queries)]
            limit = 3 * TIMEOUT_S if args.full else TIMEOUT_S
            runs = [  # each in a fresh process
                run_case("benchmarks.bench_eval", cfg, timeout=limit)
                for _ in range(1 if n >= 10**6 else REPEATS)
            ]
            failed = [r for r in runs if "error" in r]
            if failed:
                res[method] = failed[0]
                notes.append(f"{method} at N = {n}: {failed[0]['error']}")
            else:
                res[method] = {key: statistics.median(r[key] for r in runs) for key in runs[0]}

        def cell(r, key, fmt):
            return fmt.format(r[key]) if key in r else "—"

        def ratio(a, b, key):
            return f"{b[key] / a[key]:.1f}x" if key in a and key in b else "—"

        o = res["ours"]
        rows.append(
            [
                f"{n:.0e}",
                f"{n_queries:.0e}",
                cell(o, "s", "{:.2f}"),
                cell(res["sklearn"], "s", "{:.2f}"),
                cell(res["pml"], "s", "{:.2f}"),
                ratio(o, res["sklearn"], "s"),
                ratio(o, res["pml"], "s"),
                cell(o, "peak_mib", "{:.0f}"),
                cell(res["sklearn"], "peak_mib", "{:.0f}"),
                cell(res["pml"], "peak_mib", "{:.0f}"),
                cell(o, "score", "{:.4f}"),
                cell(res["sklearn"], "score", "{:.4f}"),
            ]
        )
        if n >= 10**6 and "s" in o and n_queries < n:
            notes.append(
                f"ours at N = 10^6: {n_queries} queries against the full gallery took "
                f"{o['s']:.1f} s with {o['peak_mib']:.0f} MiB peak (the FAISS path: queries "
                "are not the gallery); a full leave-one-out takes the symmetric search, "
                "measured by `--full`"
            )
        print(" | ".join(rows[-1]), flush=True)
    header = [
        "N (gallery)",
        "queries",
        "ours s",
        "sklearn s",
        "PML s",
        "sklearn / ours time",
        "PML / ours time",
        "ours peak MiB",
        "sklearn peak MiB",
        "PML peak MiB",
        "ours kNN accuracy",
        "sklearn kNN accuracy",
    ]
    text = "\n".join(
        [
            f"# Evaluation benchmark{' (quick)' if args.quick else ''}",
            "",
            f"Machine: {machine()}.",
            f"N random {D}-d float32 embeddings in {CLASSES} classes, queries = gallery, "
            f"leave-one-out, k = {K}, euclidean. Ours: `evaluate_embeddings(exclude='self', "
            "distance='l2', ranking=False)` (kNN predictions, image/patient/balanced accuracy, "
            "per-class scores, precision@1, recall@k). scikit-learn: "
            "`KNeighborsClassifier(algorithm='brute').kneighbors(n_neighbors=k+1)`, self dropped, "
            "majority vote. PML: `AccuracyCalculator(include=('precision_at_1',), k=k)`. "
            f"Median of {REPEATS} runs per case (one at N = 10^6), each in a fresh process; peak "
            "memory is the resident-set high-water mark above the start of the case (inputs "
            "already built).",
            "",
            f"Command: `python -m benchmarks.bench_eval{' --quick' if args.quick else ''}"
            f"{' --full' if args.full else ''}`",
            "",
            markdown_table(header, rows),
            "",
            *(["Notes:", "", *[f"- {x}" for x in notes], ""] if notes else []),
            *(ties_table(2000, 1) if args.quick else ties_table(10**4, REPEATS)),
        ]
    )
    return write_report(text, f"eval{'-quick' if args.quick else ''}", args.out)


if __name__ == "__main__":
    main()
