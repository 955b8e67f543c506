"""MultiScaleBatchSampler epoch generation vs PML's MPerClassSampler on the same labels.

python -m benchmarks.bench_sampler            # N = 10^4, 10^5, 10^6 -> results/sampler.md
python -m benchmarks.bench_sampler --quick    # N = 10^4
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from benchmarks.common import machine, markdown_table, run_case, write_report
from smse_metric import MultiScaleBatchSampler

CLASSES, SCALES, IMAGES_PER_GROUP = 8, 4, 100
CPB, GPC = 2, 4  # batch = 2 classes x 4 patients x 4 magnifications = 32 images
PML_TIMEOUT_S = 120  # PML's epoch grows as N^2 (a full permutation per draw)


def layout(n: int, seed: int = 0):
    """N images, 8 imbalanced classes, patients of ~100 images, 4 magnifications."""
    rng = np.random.default_rng(seed)
    weights = np.array([444, 1014, 453, 569, 3451, 626, 792, 560], dtype=float)  # BreakHis
    labels = rng.choice(CLASSES, size=n, p=weights / weights.sum())
    groups = labels * n + rng.integers(0, max(1, n // (IMAGES_PER_GROUP * CLASSES)), n)
    scales = rng.integers(0, SCALES, n)
    return labels, groups, scales


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def pml_epoch(n: int, repeats: int) -> dict:
    from pytorch_metric_learning.samplers import MPerClassSampler

    labels, _, _ = layout(n)
    pml = MPerClassSampler(labels, m=4, batch_size=CPB * GPC * SCALES, length_before_new_iter=n)
    seconds, count = timed(lambda: sum(1 for _ in pml), repeats)
    return {"s": seconds, "n": count}


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--case", nargs=2, metavar=("N", "REPEATS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.case:
        print(json.dumps(pml_epoch(int(args.case[0]), int(args.case[1]))))
        return ""

    sizes = (10**4,) if args.quick else (10**4, 10**5, 10**6)
    repeats = 3
    rows = []
    for n in sizes:
        labels, groups, scales = layout(n)
        build_s, ours = timed(
            lambda labels=labels, groups=groups, scales=scales: MultiScaleBatchSampler(
                labels, groups, scales, CPB, GPC
            ),
            repeats,
        )
        epochs = iter(range(10**6))

        def our_epoch(s=ours, epochs=epochs):
            s.set_epoch(next(epochs))  # a new plan every time
            return sum(len(b) for b in s)

        ours_s, ours_n = timed(our_epoch, repeats)
        ours_rate = ours_n / ours_s
        pml = run_case(
            "benchmarks.bench_sampler",
            [str(n), "1" if n >= 10**6 else str(repeats)],
            timeout=PML_TIMEOUT_S,
        )
        if "error" in pml:
            pml_cells = ["—", f"> {PML_TIMEOUT_S * 1e3:.0f} (stopped)", "—", "—"]
        else:
            pml_rate = pml["n"] / pml["s"]
            pml_cells = [
                f"{pml['n']}",
                f"{pml['s'] * 1e3:.1f}",
                f"{pml_rate / 1e6:.3f}",
                f"{ours_rate / pml_rate:.0f}x",
            ]
        rows.append(
            [
                f"{n:.0e}",
                f"{build_s * 1e3:.1f}",
                f"{ours_n}",
                f"{ours_s * 1e3:.1f}",
                f"{ours_rate / 1e6:.2f}",
                *pml_cells,
                f"{ours_s / ours_n * 1e9:.0f}",
            ]
        )
        print(" | ".join(rows[-1]), flush=True)
    header = [
        "N images",
        "ours: build index ms",
        "ours: indices / epoch",
        "ours: epoch ms",
        "ours: M indices/s",
        "PML: indices / epoch",
        "PML: epoch ms",
        "PML: M indices/s",
        "ours / PML rate",
        "ours: ns per index",
    ]
    text = "\n".join(
        [
            f"# Sampler benchmark{' (quick)' if args.quick else ''}",
            "",
            f"Machine: {machine()}.",
            f"Labels: {CLASSES} classes with BreakHis's imbalance, patients of about "
            f"{IMAGES_PER_GROUP} images, {SCALES} magnifications. Ours: "
            f"`MultiScaleBatchSampler(classes_per_batch={CPB}, groups_per_class={GPC})` "
            f"(batches of {CPB * GPC * SCALES}); an epoch is a fresh plan (`set_epoch`) and "
            "iterating every batch as a list. PML: "
            "`MPerClassSampler(labels, m=4, batch_size=32, length_before_new_iter=N)`"
            f", iterating one epoch in a separate process stopped after {PML_TIMEOUT_S} s. Median "
            "of 3 (PML at N = 10^6: one run). Epoch lengths differ by design (ours visits every "
            "image at least once and balances classes), so the comparison is in indices per "
            "second.",
            "",
            f"Command: `python -m benchmarks.bench_sampler{' --quick' if args.quick else ''}`",
            "",
            markdown_table(header, rows),
            "",
        ]
    )
    return write_report(text, f"sampler{'-quick' if args.quick else ''}", args.out)


if __name__ == "__main__":
    main()
