"""Case archive: every index kind against exact search on one synthetic archive.

N x 128 clustered embeddings (cases of 100 patches around a case centre, itself near
one of 8 class centres; per dimension, patches spread 0.25 around their case, cases
0.5 around their class, classes 0.3 around 0; float16 on disk) in an `EmbeddingStore`.
For each kind: build time (training and adding, then the recall measurement that picks
nprobe / efSearch at recall@10 >= 0.95 on 1000 probe rows), index memory, queries/s
over 2000 queries at the chosen setting, recall@10 on new probes, and leave-one-case-out
case- and patch-level accuracy (the same 1000 cases, 4 patches each) next to exact
search's. The exact
baseline for queries/s is FAISS's flat index over the float32 vectors in memory.
``--huge`` adds IVF-PQ at N = 1e7 (training on a sample, vectors added in chunks from
the memory-mapped store).

    python -m benchmarks.bench_archive           # N = 10^6 -> results/archive.md
    python -m benchmarks.bench_archive --huge    # and IVF-PQ at N = 10^7
    python -m benchmarks.bench_archive --demo    # a trained model -> results/archive-demo.md
    python -m benchmarks.bench_archive --quick   # N = 2 x 10^4
    python -m benchmarks.bench_archive --device cuda   # exact search on a GPU (torch)

``--device cuda`` measures exact search on the GPU (the torch arithmetic: float64
products, the running top-k on the device) against FAISS's flat index on the CPU, and
the leave-one-case-out evaluation through it, at N = 10^6 -> results/archive-cuda.md
(the approximate kinds are FAISS's CPU indexes: the CPU table has them).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import machine, markdown_table, write_report
from smse_metric.archive import ArchiveIndex, EmbeddingStore, evaluate_cases
from smse_metric.evaluation._inputs import import_faiss

D, K, CLASSES, PER_CASE = 128, 10, 8, 100
QUERIES, REPEATS = 2000, 3
EVAL_CASES, EVAL_PER_CASE = 1000, 4  # leave-one-case-out: the same cases for every index
KINDS = ("ivf_flat", "ivf_pq", "hnsw")


def fill(store: EmbeddingStore, n: int, seed: int = 0, chunk: int = 1_000_000) -> None:
    """``n`` synthetic patches: case centres near class centres, patches near them."""
    rng = np.random.default_rng(seed)
    classes = rng.normal(size=(CLASSES, D)).astype(np.float32) * 0.3
    cases = -(-n // PER_CASE)
    case_class = rng.integers(0, CLASSES, cases)
    centres = classes[case_class] + rng.normal(size=(cases, D)).astype(np.float32) * 0.5
    for lo in range(0, n, chunk):
        rows = np.arange(lo, min(n, lo + chunk))
        case = rows // PER_CASE
        x = centres[case] + rng.standard_normal((len(rows), D), dtype=np.float32) * 0.25
        store.add(x, cases=case, sources=rows, labels=case_class[case], scales=rows % 4)


def queries_per_second(search, q: np.ndarray) -> float:
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        search(q)
        times.append(time.perf_counter() - t0)
    return len(q) / statistics.median(times)


def flat_baseline(store: EmbeddingStore, q: np.ndarray) -> float:
    """Queries/s of FAISS's exact flat index (float32 vectors in memory)."""
    faiss = import_faiss()
    flat = faiss.IndexFlatL2(D)
    for _, x in store.chunks():
        flat.add(x)
    return queries_per_second(lambda v: flat.search(v, K), q)


def measure(store: EmbeddingStore, kind: str, q: np.ndarray, cases: bool, **kw) -> dict:
    t0 = time.perf_counter()
    index = ArchiveIndex.build(store, kind, recall=0.95, k=K, probes=1000, **kw)
    built = time.perf_counter() - t0
    row = {
        "build_s": built,
        "bytes": index.nbytes(),
        "qps": queries_per_second(lambda v: index.search(v, K), q),
        "setting": index.build_info.search,
        "recall": index.build_info.recall,
        "fresh": index.measure_recall(probes=1000, seed=11),
    }
    if cases:
        row["cases"] = evaluate_cases(index, k=K, cases=5, per_case=EVAL_PER_CASE,
                                      max_cases=EVAL_CASES)  # fmt: skip
    return row


def run(
    n: int, kinds: tuple[str, ...], cases: bool, workdir: Path, device: str | None = None, **kw
) -> tuple[dict, float]:
    """``device``: also exact search through the torch arithmetic there."""
    store = EmbeddingStore.create(workdir / f"archive-{n}", dim=D, model="bench@0")
    fill(store, n)
    q = store.vectors(np.random.default_rng(5).choice(n, QUERIES, replace=False)) + 0.05
    results = {"exact (FAISS flat)": {"qps": flat_baseline(store, q), "bytes": n * D * 4}}
    if cases:
        exact = ArchiveIndex.build(store, "exact", k=K, probes=10, device=device or "cpu")
        t0 = time.perf_counter()
        found = evaluate_cases(exact, k=K, cases=5, per_case=EVAL_PER_CASE, max_cases=EVAL_CASES)
        results["exact (FAISS flat)"]["cases"] = found
        if device is not None:
            results[f"exact (torch, {device})"] = {
                "eval_s": time.perf_counter() - t0,
                "qps": queries_per_second(lambda v: exact.search(v, K), q),
                "bytes": 0,
                "cases": found,
            }
    for kind in kinds:
        results[kind] = measure(store, kind, q, cases, **kw.get(kind, {}))
    return results, n * D * 4


def table(results: dict, n: int, raw_bytes: float) -> str:
    base = results["exact (FAISS flat)"]
    exact_cases = base.get("cases")
    rows = []
    for name, r in results.items():
        c = r.get("cases")
        rows.append(
            [
                f"{name}" + (f" {r['setting']}" if r.get("setting") else ""),
                f"{n:.0e}",
                f"{r['build_s']:.0f}" if "build_s" in r else "-",
                f"{r['bytes'] / 2**20:.0f} ({r['bytes'] / raw_bytes:.3f})",
                f"{r['qps']:.0f}",
                f"{r['qps'] / base['qps']:.1f}x",
                f"{r['recall']:.3f} / {r['fresh']:.3f}" if "recall" in r else "1 (exact)",
                f"{c.case_accuracy:.4f}" if c else "-",
                f"{c.case_accuracy - exact_cases.case_accuracy:+.4f}" if c and exact_cases else "-",
                f"{c.patch_accuracy:.4f}" if c else "-",
            ]
        )
    return markdown_table(
        [
            "index (search setting)",
            "N",
            "build s",
            "memory MiB (/ float32)",
            "queries/s",
            "/ flat",
            "recall@10 build / new probes",
            "case accuracy",
            "vs exact",
            "patch accuracy",
        ],
        rows,
    )


DEMO_HEADER = [
    "index",
    "search setting",
    "recall@10 build / new probes",
    "case accuracy",
    "vs exact",
    "patch accuracy",
]


def demo_archive(workdir: Path, quick: bool) -> str:
    """The archive of the synthetic dataset embedded by a trained demo model (the demo's
    smse-triplet configuration, fold 1): every index kind's recall and leave-one-case-out
    accuracy against exact search, every case evaluated with all its images."""
    from smse_metric.recipes.histopathology import load_config
    from smse_metric.recipes.histopathology.archive import add_run_images
    from smse_metric.recipes.histopathology.data import make_synthetic_breakhis
    from smse_metric.recipes.histopathology.demo import DEMO_OVERRIDES, DEMO_PATIENTS
    from smse_metric.recipes.histopathology.training import train

    per_mag = 1 if quick else 4
    root = make_synthetic_breakhis(workdir / "data", DEMO_PATIENTS, per_mag, (48, 32), seed=0)
    overrides = {key: dict(v) for key, v in DEMO_OVERRIDES.items()}
    overrides["data"].update(path=str(root), fold=1)
    overrides["run"] = {"seed": 0, "device": "cpu"}
    if quick:
        overrides["optim"]["epochs"] = 1
    train(load_config("smse-triplet", overrides), workdir / "run", root, quiet=True)
    add_run_images(workdir / "archive", workdir / "run", root, dtype="float32")
    store = EmbeddingStore(workdir / "archive")
    probes = min(1000, len(store))
    exact = evaluate_cases(ArchiveIndex.build(store, "exact", probes=10), k=K, per_case=None)
    rows = [["exact", "-", "1 (exact)", f"{exact.case_accuracy:.4f}", "+0.0000",
             f"{exact.patch_accuracy:.4f}"]]  # fmt: skip
    for kind in KINDS:
        index = ArchiveIndex.build(store, kind, recall=0.95, k=K, probes=probes)
        r = evaluate_cases(index, k=K, per_case=None)
        fresh = index.measure_recall(probes=probes, seed=11)
        rows.append(
            [
                kind,
                str(index.build_info.search),
                f"{index.build_info.recall:.3f} / {fresh:.3f}",
                f"{r.case_accuracy:.4f}",
                f"{r.case_accuracy - exact.case_accuracy:+.4f}",
                f"{r.patch_accuracy:.4f}",
            ]
        )
    return "\n".join(
        [
            f"Synthetic dataset embedded by a trained demo model: {len(store)} images, "
            f"{exact.cases} cases (patients), D = {store.dim}; every case evaluated with "
            f"all its images; recall on {probes} probe rows, drawn twice (build, new), "
            "which overlap at this size.",
            "",
            markdown_table(DEMO_HEADER, rows),
        ]
    )


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--huge", action="store_true", help="also IVF-PQ at N = 10^7")
    p.add_argument("--demo", action="store_true", help="only a trained demo model's archive")
    p.add_argument("--out", default=None)
    p.add_argument("--device", choices=("cpu", "cuda"), help="exact search there (torch) only")
    args = p.parse_args(argv)
    n = 20_000 if args.quick else 1_000_000
    workdir = Path(tempfile.mkdtemp(prefix="bench-archive-"))
    if args.demo:
        try:
            text = demo_archive(workdir / "demo", args.quick)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        head = ["# Case archive of a trained model", "", f"Machine: {machine()}.", ""]
        cmd = "python -m benchmarks.bench_archive --demo" + (" --quick" if args.quick else "")
        body = [*head, f"Command: `{cmd}`", "", text, ""]
        return write_report("\n".join(body), "archive-demo" + ("-quick" if args.quick else ""),
                            args.out)  # fmt: skip
    try:
        params = {"hnsw": {"hnsw_m": 16}}  # IVF: nlist = 4 sqrt(N), the default
        kinds = () if args.device else KINDS
        results, raw = run(n, kinds, True, workdir, args.device, **params)
        parts = [table(results, n, raw)]
        if args.device:
            took = results[f"exact (torch, {args.device})"]["eval_s"]
            parts.append(
                f"Leave-one-case-out evaluation ({EVAL_CASES} cases x {EVAL_PER_CASE} "
                f"patches against all {n:.0e} rows) through exact search on {args.device}: "
                f"{took:.1f} s."
            )
        if args.huge:
            shutil.rmtree(workdir / f"archive-{n}")
            big, big_raw = run(10_000_000, ("ivf_pq",), False, workdir,
                               ivf_pq={"nlist": 4096})  # fmt: skip
            parts.append(table(big, 10_000_000, big_raw))
        if args.quick and not args.device:  # the smoke run covers the trained model too
            parts.append(demo_archive(workdir / "demo", quick=True))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    cmd = "python -m benchmarks.bench_archive" + (
        " --quick" if args.quick else " --huge" if args.huge else ""
    )
    cmd += f" --device {args.device}" if args.device else ""
    text = "\n".join(
        [
            "# Case archive",
            "",
            f"Machine: {machine()}.",
            f"Synthetic archive: {PER_CASE} patches per case, {CLASSES} classes, D = {D} "
            "(per dimension: patches spread 0.25 around their case, cases 0.5 around "
            "their class), float16 on disk, euclidean; IVF nlist = 4 sqrt(N) (4096 at "
            "N = 1e7), HNSW M = 16. Build: training, adding and the recall "
            f"measurement that picks the search setting (the cheapest reaching recall@10 "
            f">= 0.95 on 1000 probe rows). Queries/s: {QUERIES} queries in one call, median "
            f"of {REPEATS}, the chosen setting, the same CPU threads for every index. "
            "Memory: the index's serialised size (IVF-PQ: codes, ids and codebooks; its "
            "re-ranking reads the vectors from the memory-mapped store). Case and patch "
            f"accuracy: leave-one-case-out, {EVAL_CASES} cases drawn once, {EVAL_PER_CASE} "
            "patches each, 5 voting cases, k = 10; "
            "'vs exact' is the difference from exact search's case accuracy.",
            "",
            f"Command: `{cmd}`",
            "",
            *("\n\n".join(parts).splitlines()),
            "",
        ]
    )
    name = "archive" + ("-quick" if args.quick else "") + (f"-{args.device}" if args.device else "")
    return write_report(text, name, args.out)


if __name__ == "__main__":
    main()
