"""What the SMSE parts add to a training step: sampler + loss + evaluation against a
plain cross-entropy step of the same backbone, batch and image size.

python -m benchmarks.bench_recipe            # resnet18, B = 32, 128 and 224 px -> results/recipe.md
python -m benchmarks.bench_recipe --quick    # 64 x 64, fewer steps
python -m benchmarks.bench_recipe --device cuda

Both loops run on the same in-memory images (no decoding, which both would share),
alternating step by step so that the machine's noise hits both alike; medians.
The SMSE step is the recipe's own ``train_step``: fused cross-scale triplet loss
(all triplets) + reinforced focal loss, indices from ``MultiScaleBatchSampler``. The
SMSE step on a GPU runs twice: eager, and as the recipe runs it there, with the losses
replayed from CUDA graphs (``run.cuda_graphs``; the overhead line is of that one). The
per-epoch evaluation (leave-one-patient-out kNN of the validation patients against
the training gallery, with the full report; the forward passes that make the
embeddings are excluded, as any validation needs them) is measured once on a
BreakHis-sized split and spread over the steps of one BreakHis epoch.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from benchmarks.bench_sampler import layout
from benchmarks.common import machine, markdown_table, write_report
from smse_metric import MultiScaleBatchSampler, ReinforcedFocalLoss, TripletMarginLoss
from smse_metric.evaluation import evaluate_embeddings
from smse_metric.recipes.histopathology.models import EmbeddingNet
from smse_metric.recipes.histopathology.step import LossGraphs, StepLoss, train_step

BATCH = 32  # 2 classes x 4 patients x 4 magnifications, as the smse presets
#: BreakHis binary: ~70 % of 7909 images train; 15 % of those validate
GALLERY, QUERIES, DIM = 4700, 830, 128


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_times(size: int, steps: int, device: torch.device) -> dict[str, float]:
    """Median seconds of a plain CE step and of the recipe's SMSE step, alternating. On
    CUDA both run as the recipe trains there: bf16 autocast, channels-last, and the
    batch's indices copied from pinned memory without blocking the host."""
    torch.manual_seed(0)
    n = 2000
    cuda = device.type == "cuda"
    fmt = torch.channels_last if cuda else torch.contiguous_format
    images = torch.rand(n, 3, size, size, device=device).contiguous(memory_format=fmt)
    labels_np, groups, scales_np = layout(n)
    labels = torch.as_tensor(labels_np % 2, device=device)
    scales = torch.as_tensor(scales_np, device=device)
    sampler = MultiScaleBatchSampler(labels_np % 2, groups, scales_np, 2, 4, seed=0)
    batches = iter(sampler)
    models = {
        k: EmbeddingNet("resnet18", embedding_dim=DIM).to(device, memory_format=fmt)
        for k in ("ce", "smse")
    }
    opts = {k: torch.optim.Adam(m.parameters(), 1e-3) for k, m in models.items()}
    ce, rfl = (
        torch.nn.CrossEntropyLoss(),
        ReinforcedFocalLoss.from_class_counts([700, 1300]).to(device),
    )
    triplet = TripletMarginLoss(1.0, distance="squared_l2", cross_scale=True)
    amp = torch.bfloat16 if cuda else None
    gen = torch.Generator().manual_seed(0)

    def on_device(idx: torch.Tensor) -> torch.Tensor:
        # as the DataLoader's pinned batches: the copy does not wait for the GPU
        return idx.pin_memory().to(device, non_blocking=True) if cuda else idx

    ce_loss, smse_loss = StepLoss(ce), StepLoss(rfl, triplet)

    def ce_step():
        idx = on_device(torch.randint(0, n, (BATCH,), generator=gen))
        train_step(
            models["ce"], images[idx], labels[idx], scales[idx], opts["ce"], ce_loss, amp_dtype=amp
        )

    def next_batch() -> list[int]:
        nonlocal batches
        try:
            return next(batches)
        except StopIteration:
            batches = iter(sampler)
            return next(batches)

    def smse_step():
        idx = on_device(torch.as_tensor(next_batch()))
        train_step(
            models["smse"],
            images[idx],
            labels[idx],
            scales[idx],
            opts["smse"],
            smse_loss,
            amp_dtype=amp,
        )

    steps_run = {"ce": ce_step, "smse": smse_step}
    if cuda:  # the recipe's default on one GPU (run.cuda_graphs): the losses replayed
        net = EmbeddingNet("resnet18", embedding_dim=DIM)
        models["graphed"] = net.to(device, memory_format=fmt)
        opts["graphed"] = torch.optim.Adam(models["graphed"].parameters(), 1e-3)
        graphs = LossGraphs(smse_loss)

        def graphed_step():
            idx = on_device(torch.as_tensor(next_batch()))
            train_step(
                models["graphed"],
                images[idx],
                labels[idx],
                scales[idx],
                opts["graphed"],
                graphs,
                amp_dtype=amp,
            )

        steps_run["graphed"] = graphed_step
    times: dict[str, list[float]] = {name: [] for name in steps_run}
    for i in range(steps + 3):
        for name, fn in steps_run.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            if i >= 3:  # warm-up
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def eval_seconds(repeats: int = 3) -> float:
    rng = np.random.default_rng(0)
    g = rng.standard_normal((GALLERY, DIM)).astype(np.float32)
    q = rng.standard_normal((QUERIES, DIM)).astype(np.float32)
    gy, qy = rng.integers(0, 2, GALLERY), rng.integers(0, 2, QUERIES)
    gg, qg = rng.integers(0, 57, GALLERY), 57 + rng.integers(0, 10, QUERIES)
    gs, qs = rng.integers(0, 4, GALLERY), rng.integers(0, 4, QUERIES)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        evaluate_embeddings(
            q, qy, qg, qs, k=5, exclude="group", gallery=(g, gy, gg, gs), ranking=False
        )
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    sizes, steps = ((64,), 8) if args.quick else ((128, 224), 30)
    ev = eval_seconds(1 if args.quick else 3)
    steps_per_epoch = -(-GALLERY // BATCH)  # every training image once (lower bound)
    ev_per_step = ev / steps_per_epoch
    rows, overheads = [], []
    for size in sizes:
        t = step_times(size, steps, device)
        # the recipe's configuration: on a GPU the losses replayed from CUDA graphs
        recipe = t.get("graphed", t["smse"])
        total = recipe + ev_per_step
        overheads.append(f"{size} px: {(total / t['ce'] - 1) * 100:+.1f} %")
        rows += [
            [f"{size} px: plain CE step (baseline)", f"{t['ce'] * 1e3:.1f}", "1.000"],
            [
                f"{size} px: SMSE step: sampler + triplet + RFL"
                + (", eager" if "graphed" in t else ""),
                f"{t['smse'] * 1e3:.1f}",
                f"{t['smse'] / t['ce']:.3f}",
            ],
        ]
        if "graphed" in t:
            rows.append(
                [
                    f"{size} px: SMSE step, losses from CUDA graphs (the recipe's)",
                    f"{recipe * 1e3:.1f}",
                    f"{recipe / t['ce']:.3f}",
                ]
            )
        rows += [
            [
                f"{size} px: evaluation per step ({ev:.2f} s / {steps_per_epoch} steps)",
                f"{ev_per_step * 1e3:.2f}",
                f"{ev_per_step / t['ce']:.3f}",
            ],
            [f"{size} px: SMSE step + evaluation", f"{total * 1e3:.1f}", f"{total / t['ce']:.3f}"],
        ]
    config = (
        "bf16 autocast, channels-last, pinned indices, losses from CUDA graphs"
        if device.type == "cuda"
        else "float32"
    )
    text = "\n".join(
        [
            "# Recipe overhead: SMSE parts vs a plain CE training step",
            "",
            f"Machine: {machine()}; device {device.type} ({config}). resnet18, batch {BATCH}, "
            f"median of {steps} alternating steps each.",
            "Command: `python -m benchmarks.bench_recipe"
            + (" --quick" if args.quick else "")
            + (" --device cuda" if device.type == "cuda" else "")
            + "`.",
            "",
            markdown_table(["what", "ms per step", "vs plain CE"], rows),
            "",
            f"Overhead of sampler + loss + evaluation: {'; '.join(overheads)} "
            "(target: at most +5 %).",
            "",
        ]
    )
    print(text)
    name = "recipe" if device.type == "cpu" else "recipe-cuda"
    return write_report(text, name + ("-quick" if args.quick else ""), args.out)


if __name__ == "__main__":
    main()
