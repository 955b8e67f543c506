"""Frozen backbone from cached features vs fine-tuning the same backbone: seconds per
training epoch of the recipe on the synthetic BreakHis, same backbone, input size, data
and seed (both in this process, one after the other).

python -m benchmarks.bench_frozen            # resnet18 at 96 x 96, 3 epochs each
python -m benchmarks.bench_frozen --quick    # 32 x 32, 2 epochs
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import machine, markdown_table, write_report


def run(root: Path, work: Path, size: int, epochs: int, frozen: bool) -> dict[str, float]:
    """One recipe run; its per-epoch training seconds (history) and its wall time."""
    from smse_metric.recipes.histopathology import load_config
    from smse_metric.recipes.histopathology.fit import fit_run
    from smse_metric.recipes.histopathology.inputs import resolve
    from smse_metric.recipes.histopathology.rundir import RunDir

    name = "frozen" if frozen else "finetune"
    cfg = load_config(
        "smse-triplet",
        {
            "data": {
                "path": str(root),
                "image_size": [size, size],
                "num_workers": 0,
                "cache_dir": str(work / "features"),
            },
            "model": {"backbone": "resnet18", "embedding_dim": 64, "freeze_backbone": frozen},
            "optim": {"epochs": epochs, "patience": 0},
            "run": {"device": "cpu", "amp": False},
        },
    )
    out = RunDir(work / name)
    t0 = time.perf_counter()
    fit_run(resolve(cfg, out, root), out, fold=1, quiet=True)
    wall = time.perf_counter() - t0
    history = [json.loads(line) for line in out.history.read_text().splitlines()]
    return {"epoch": statistics.median(h["seconds"] for h in history), "wall": wall}


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    size, epochs = (32, 2) if args.quick else (96, 3)
    from smse_metric.recipes.histopathology.data import make_synthetic_breakhis

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        root = make_synthetic_breakhis(
            work / "data", images_per_magnification=1, image_size=(size + 16, size + 8)
        )
        fine = run(root, work, size, epochs, frozen=False)
        frozen = run(root, work, size, epochs, frozen=True)  # builds the cache, then trains
    rows = [
        ["fine-tuning (baseline)", f"{fine['epoch']:.2f}", "1", f"{fine['wall']:.1f}"],
        [
            "frozen backbone, cached features",
            f"{frozen['epoch']:.3f}",
            f"{fine['epoch'] / frozen['epoch']:.0f}x faster",
            f"{frozen['wall']:.1f} (the backbone once per image included)",
        ],
    ]
    text = "\n".join(
        [
            "# Frozen backbone from cached features vs fine-tuning",
            "",
            f"Machine: {machine()}. resnet18 at {size} x {size}, the synthetic BreakHis "
            f"(1 image per patient and magnification), smse-triplet, {epochs} epochs, "
            "2 torch threads, no loader workers; seconds of training per epoch (median "
            "over the epochs, the run's history) and the whole run's wall time, which "
            "for the frozen run includes computing every image's features once.",
            "Command: `python -m benchmarks.bench_frozen"
            + (" --quick" if args.quick else "")
            + "`.",
            "",
            markdown_table(["training", "s per epoch", "vs fine-tuning", "run wall s"], rows),
            "",
            "Target: frozen epochs at least 20x faster than fine-tuning.",
            "",
        ]
    )
    print(text)
    return write_report(text, "frozen" + ("-quick" if args.quick else ""), args.out)


if __name__ == "__main__":
    main()
