"""The fused losses at training batch sizes: the launch-light path against the sorted
path, forward + backward, in one process, interleaved.

python -m benchmarks.bench_launch             # B = 32, 64, 128 -> results/launch.md
python -m benchmarks.bench_launch --quick     # B = 32
python -m benchmarks.bench_launch --device cuda

At B = 32 a step is a fraction of a millisecond of arithmetic, so on a GPU its cost is
the number of kernels launched: the table gives the top-level aten ops of one step
(CPU profiler; on CUDA also the kernels the GPU ran) beside the time. The sorted path
is what every batch above SMALL_BATCH takes, and what these batches took before.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from benchmarks.common import launch_counts, machine, markdown_table, write_report
from smse_metric import ContrastiveLoss, TripletMarginLoss
from smse_metric.functional import _small_batch as small_batch

D = 128
#: (name, loss): the recipe's loss first (cross-scale, squared, all triplets)
LOSSES = [
    (
        "recipe: all, squared, cross-scale",
        TripletMarginLoss(1.0, distance="squared_l2", cross_scale=True),
    ),
    ("all", TripletMarginLoss(0.2)),
    ("semihard", TripletMarginLoss(0.2, triplets="semihard")),
    ("batch-hard", TripletMarginLoss(0.2, triplets="batch_hard")),
    ("semihard, cosine", TripletMarginLoss(0.2, triplets="semihard", distance="cosine")),
    ("batch-hard, cosine", TripletMarginLoss(0.2, triplets="batch_hard", distance="cosine")),
    ("contrastive", ContrastiveLoss(0.5)),
]


def _on_path(path: str, fn: Callable[[], object]) -> Callable[[], object]:
    def run():
        saved = small_batch.SMALL_BATCH, small_batch.SMALL_BATCH_CPU
        # "small" at every size of the table, "sorted" at none
        limit = 1 << 30 if path == "small" else 0
        small_batch.SMALL_BATCH = small_batch.SMALL_BATCH_CPU = limit
        try:
            return fn()
        finally:
            small_batch.SMALL_BATCH, small_batch.SMALL_BATCH_CPU = saved

    return run


def _time_ms(
    fns: dict[str, Callable[[], object]], device: torch.device, rounds: int, min_s: float = 0.1
) -> dict[str, float]:
    """Per function the best of `rounds` medians, the functions interleaved, each
    median over at least `min_s` seconds of calls."""

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    reps = {}
    for name, fn in fns.items():
        fn()
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        reps[name] = max(5, int(min_s / max(time.perf_counter() - t0, 1e-6)))
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            times = []
            for _ in range(reps[name]):
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                times.append(time.perf_counter() - t0)
            best[name] = min(best[name], statistics.median(times) * 1e3)
    return best


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="B = 32 only, one round")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="Markdown output file")
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    sizes = (32,) if args.quick else (32, 64, 128)
    rounds = 1 if args.quick else 5
    cuda = dev.type == "cuda"
    rows = []
    for b in sizes:
        g = torch.Generator().manual_seed(b)
        emb = torch.nn.functional.normalize(torch.randn(b, D, generator=g), dim=1).to(dev)
        emb.requires_grad_()
        # 2 classes x 4 patients x 4 magnifications per 32, as the recipe's batches
        labels = (torch.arange(b) // (b // 2)).to(dev)
        scales = (torch.arange(b) % 4).to(dev)
        for name, loss in LOSSES:

            def step(loss=loss, emb=emb, labels=labels, scales=scales):
                return torch.autograd.grad(loss(emb, labels, scales=scales), emb)

            fns = {path: _on_path(path, step) for path in ("small", "sorted")}
            for fn in fns.values():
                fn()  # first calls initialise lazily
            counts = {path: launch_counts(fn, dev) for path, fn in fns.items()}
            if cuda:  # the step replayed from CUDA graphs, as the recipe runs its losses
                sample = (emb.detach().clone().requires_grad_(), labels, scales)
                graphed = torch.cuda.make_graphed_callables(
                    lambda e, y, s, loss=loss: loss(e, y, scales=s), sample
                )

                def replayed(g=graphed, e=emb, y=labels, s=scales):
                    return torch.autograd.grad(g(e, y, s), e)

                fns["graphed"] = replayed
            ms = _time_ms(fns, dev, rounds)
            row = [name, str(b)]
            for path in ("small", "sorted"):
                ops, kernels = counts[path]
                row.append(f"{ops}" + (f" / {kernels}" if cuda else ""))
            row += [
                f"{ms['small']:.3f}",
                f"{ms['sorted']:.3f}",
                f"{ms['sorted'] / ms['small']:.1f}x",
            ]
            if cuda:
                row.append(f"{ms['graphed']:.3f}")
            rows.append(row)
            print(" | ".join(row), flush=True)
    count = "top-level aten ops / CUDA kernels" if cuda else "top-level aten ops"
    header = [
        "loss",
        "B",
        f"launch-light: {count}",
        f"sorted: {count}",
        "launch-light ms",
        "sorted ms",
        "sorted / launch-light",
    ]
    if cuda:
        header.append("launch-light from CUDA graphs ms")
    cmd = "python -m benchmarks.bench_launch" + (" --quick" if args.quick else "")
    cmd += "" if args.device == "cpu" else f" --device {args.device}"
    text = "\n".join(
        [
            f"# Fused losses at training batch sizes ({args.device})",
            "",
            f"Machine: {machine()}",
            "",
            f"Command: `{cmd}`",
            "",
            f"Forward + backward of one step, D = {D}, half the batch per class, 4 "
            "magnifications; times are the best of interleaved medians (each over at least "
            "0.1 s of calls), both paths in one process. Counts are of one step, including "
            "the gradient seed autograd creates."
            + (
                " The last column replays the step "
                "(forward and backward) from CUDA graphs (`torch.cuda.make_graphed_callables`, "
                "as `LossGraphs` in the recipe): input copies and two replays."
                if cuda
                else ""
            ),
            "",
            markdown_table(header, rows),
            "",
        ]
    )
    name = "launch" + ("-quick" if args.quick else "") + ("-cuda" if cuda else "")
    return write_report(text, name, args.out)


if __name__ == "__main__":
    main()
