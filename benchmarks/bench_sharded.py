"""Leave-one-patient-out kNN evaluation sharded over gloo ranks vs one process.

N x 128 embeddings, 8 classes, 1000 patients, k = 10, euclidean, no ranking metrics,
no clustering: `evaluate_embeddings(..., exclude="group")`. Three ways, same CPU cores:
one process with 2 threads (its default: the symmetric search, each block pair once),
and 2 gloo ranks with 1 thread each (`distributed=True`, every rank holds N / 2 rows),
once with the ring that computes each pair of rows once (`symmetric_rounds`, the
default for leave-one-out) and once with the broadcast of every shard to every rank
(`sharded_rounds`: each rank multiplies its queries by the whole gallery). Each way
runs in fresh processes; time is the slowest rank's, memory each rank's resident-set
high-water mark above its start (inputs built); the traffic is what each rank receives
of the other ranks' shards (rows, half norms, group codes and, in the ring, the
travelling top-k), by construction.

    python -m benchmarks.bench_sharded           # N = 10^5 -> results/sharded.md
    python -m benchmarks.bench_sharded --quick   # N = 10^4
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import numpy as np

from benchmarks.common import machine, markdown_table, write_report

D, K, CLASSES, GROUPS = 128, 10, 8, 1000
REPEATS = 3
ROW_BYTES = (D + 1) * 4 + 8  # a gallery row in flight: vector, half norm, group code
TIMEOUT_S = 1800
RING, BROADCAST = "2 ranks x 1 thread (ring)", "2 ranks x 1 thread (broadcast)"
WAYS = {  # name -> (ranks, threads per rank, distributed, ring)
    "1 process x 2 threads (symmetric)": (1, 2, False, True),
    RING: (2, 1, True, True),
    BROADCAST: (2, 1, True, False),
}


def embeddings(n: int):
    rng = np.random.default_rng(0)
    y = rng.integers(0, CLASSES, n)
    x = rng.normal(size=(n, D)).astype(np.float32)
    x[:, :CLASSES] += 2.0 * np.eye(CLASSES, dtype=np.float32)[y]
    return x, y, rng.integers(0, GROUPS, n)


def received_bytes(n: int, world: int, ring: bool) -> int:
    """What the busiest rank receives of the others' shards (about n / world rows
    each): the broadcast pads every other shard to 32 rows; the ring passes W // 2
    shards unpadded with their top-k keys, and the rank's own top-k comes back."""
    if world == 1:
        return 0
    rows = -(-n // world)
    if not ring:
        return (world - 1) * -(-rows // 32) * 32 * ROW_BYTES
    return (world // 2) * rows * (ROW_BYTES + 8 * K) + rows * 8 * K


def _rank(n: int, rank: int, world: int, threads: int, flags: int, port: int) -> dict:
    """One rank's (or the single process's) measurement; ``flags``: 1 distributed,
    2 the ring."""
    import torch
    import torch.distributed as dist

    from benchmarks.common import PeakMemory
    from smse_metric.evaluation import evaluate_embeddings, sharded

    distributed, sharded.RING = bool(flags & 1), bool(flags & 2)

    torch.set_num_threads(threads)
    if distributed:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
        )
    x, y, g = embeddings(n)
    mine = slice(rank * n // world, (rank + 1) * n // world)
    x, y, g = x[mine].copy(), y[mine], g[mine]
    kw = {"distributed": True} if distributed else {}
    if distributed:
        dist.barrier()
    with PeakMemory(torch.device("cpu")) as mem:
        t0 = time.perf_counter()
        r = evaluate_embeddings(
            x, y, g, k=K, exclude="group", distance="l2", ranking=False, clustering=False,
            backend="torch", device="cpu", **kw,
        )  # fmt: skip
        seconds = time.perf_counter() - t0
    received = received_bytes(n, world, sharded.RING) if distributed else 0
    if distributed:
        dist.destroy_process_group()
    return {"s": seconds, "peak_mib": mem.mib, "acc": r.pooled.accuracy, "recv": received}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_way(n: int, way: str) -> dict:
    """One measurement of ``way``: its ranks as fresh processes, the slowest's time."""
    world, threads, distributed, ring = WAYS[way]
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    flags = int(distributed) + 2 * int(ring)
    case = [str(n), "RANK", str(world), str(threads), str(flags), str(port)]
    cmd = [sys.executable, "-m", "benchmarks.bench_sharded", "--case", *case]
    procs = [
        subprocess.Popen(
            [str(r) if part == "RANK" else part for part in cmd],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for r in range(world)
    ]
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            return {"error": f"timed out after {TIMEOUT_S} s"}
        if p.returncode != 0:
            return {"error": f"exit {p.returncode}: {err.strip().splitlines()[-1:]}"}
        outs.append(json.loads(out.strip().splitlines()[-1]))
    return {
        "s": max(o["s"] for o in outs),
        "peak_mib": max(o["peak_mib"] for o in outs),
        "acc": outs[0]["acc"],
        "recv": max(o["recv"] for o in outs),
    }


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--case", nargs=6, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.case:
        n, rank, world, threads, flags, port = (int(v) for v in args.case)
        print(json.dumps(_rank(n, rank, world, threads, flags, port)))
        return ""
    n = 10**4 if args.quick else 10**5
    repeats = 1 if args.quick else REPEATS
    results = {}
    for way in WAYS:
        runs = [run_way(n, way) for _ in range(repeats)]
        good = [r for r in runs if "error" not in r]
        results[way] = (
            {key: statistics.median(x[key] for x in good) for key in good[0]}
            if good
            else {"error": runs}
        )
    # memory that grows with N, apart from the fixed working set (blocks, runtime): the
    # 2-rank peak at N / 2 against N
    sharded = RING
    halves = [run_way(n // 2, sharded) for _ in range(repeats)]
    halves = [r for r in halves if "error" not in r]
    half = statistics.median(r["peak_mib"] for r in halves) if halves else float("nan")
    growth = results[sharded].get("peak_mib", float("nan")) - half
    shard_mib = (n - n // 2) / 2 * (ROW_BYTES + 8 * K) / 2**20  # rows and their top-k
    base = results["1 process x 2 threads (symmetric)"]
    flat = results[BROADCAST]
    rows = []
    for way, r in results.items():
        if "error" in r:
            rows.append([way, "error", "", "", "", "", ""])
            continue
        rows.append(
            [
                way,
                f"{r['s']:.2f}",
                f"{r['s'] / base['s']:.2f}x" if "s" in base else "-",
                f"{r['s'] / flat['s']:.2f}x" if "s" in flat else "-",
                f"{r['peak_mib']:.0f}",
                f"{r['recv'] / 2**20:.1f}",
                f"{r['acc']:.4f}",
            ]
        )
    cmd = "python -m benchmarks.bench_sharded" + (" --quick" if args.quick else "")
    text = "\n".join(
        [
            "# Sharded evaluation",
            "",
            f"Machine: {machine()}.",
            f"N = {n:.0e} x {D} float32 embeddings, {CLASSES} classes, {GROUPS} patients, "
            f"leave-one-patient-out, k = {K}, euclidean, torch search, no ranking metrics "
            f"or clustering. Median of {repeats} runs, each in fresh processes; time: the "
            "slowest rank; peak: the largest rank's resident-set high-water mark above its "
            "start; received: what one rank receives of the other ranks' shards.",
            "",
            f"Memory that grows with N: the 2-rank ring's peak is {half:.0f} MiB at N / 2 and "
            f"{results[sharded].get('peak_mib', float('nan')):.0f} MiB at N, "
            f"{growth:.1f} MiB more for {n - n // 2} more rows, of which the one shard in "
            f"flight accounts for {shard_mib:.1f} MiB (each rank's input shard is built before "
            "the measurement starts, so the embeddings a rank holds are its input and one "
            "shard in flight); the rest of the growth is the per-query results every rank "
            "gathers (labels, groups, neighbours). The remainder of the peak does not grow "
            "with N: the search's block working set and torch's and gloo's buffers.",
            "",
            f"Command: `{cmd}`",
            "",
            markdown_table(
                [
                    "way",
                    "s",
                    "/ 1 process (symmetric)",
                    "/ 2 ranks broadcast",
                    "peak MiB per rank",
                    "received MiB per rank",
                    "kNN accuracy",
                ],
                rows,
            ),
            "",
        ]
    )
    name = "sharded" + ("-quick" if args.quick else "")
    return write_report(text, name, args.out)


if __name__ == "__main__":
    main()
