"""The training data path at BreakHis's native 700 x 460 PNGs: images per second per CPU
core from PNG, from the decoded cache, and with augmentation moved to the device.

python -m benchmarks.bench_data                 # 224 px -> results/data.md
python -m benchmarks.bench_data --quick         # 64 px, fewer images
python -m benchmarks.bench_data --device cuda   # the loader against the model

Per core: one process, one torch thread, no loader workers, the training transform of
the recipe (crop, resize, flips, rotations, stain and colour jitter) on synthetic
BreakHis images written at 700 x 460. The last table runs the recipe's loader with its
default workers; on a GPU against resnet18's training step (bf16 autocast,
channels-last) at the same size: the recipe is loader-bound where the loader is slower.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import machine, markdown_table, write_report
from smse_metric.recipes.histopathology.config import DataConfig
from smse_metric.recipes.histopathology.data import make_synthetic_breakhis, scan_breakhis
from smse_metric.recipes.histopathology.data.dataset import (
    BreakHisDataset,
    collate_records,
    split_records,
)

NATIVE = (700, 460)  # BreakHis, width x height


def _rate(fn, n: int, rounds: int) -> float:
    """Items per second of ``fn(i)`` over ``n`` items: the best of ``rounds`` passes."""
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for i in range(n):
            fn(i)
        best = min(best, time.perf_counter() - t0)
    return n / best


PNG = "PNG: decode, then augment as the cache does (the default)"


def per_core(root: Path, size: int, n: int, rounds: int, cache_dir: Path) -> list[list[str]]:
    index = scan_breakhis(root)
    kw = dict(size=(size, size), seed=0)
    png = BreakHisDataset(index, "train", **kw)
    t0 = time.perf_counter()
    cached = BreakHisDataset(index, "train", cache_dir=cache_dir, **kw)
    build_s = time.perf_counter() - t0
    device = BreakHisDataset(index, "train", cache_dir=cache_dir, augment_on="device", **kw)
    n = min(n, len(png))
    rates = {
        PNG: _rate(png.__getitem__, n, rounds),
        "cache, augmented on the worker (crop and resize in uint8, jitter in float)": _rate(
            cached.__getitem__, n, rounds
        ),
        "cache + device augmentation: the record (the worker's part)": _rate(
            device.__getitem__, n, rounds
        ),
    }
    b = min(32, len(device))
    rows, aug = split_records(collate_records([device[i] for i in range(b)]))[:2]
    images = device.cache.gather(rows)
    rates[f"... gathering batches of {b} from the cache (the main process's part)"] = b * _rate(
        lambda _: device.cache.gather(rows), 20, rounds
    )
    rates[f"... augmenting batches of {b} (the device's part, on this CPU)"] = b * _rate(
        lambda _: device.device_transform(images, aug), 5, rounds
    )
    base = rates[PNG]
    rows = [[name, f"{r:.0f}", f"{r / base:.1f}x"] for name, r in rates.items()]
    per_image = build_s / len(cached) * 1e3
    rows.append([f"building the cache ({len(cached)} images, once)", f"{1e3 / per_image:.0f}", "—"])
    rows.append(_opening(device.cache, index, cache_dir, kw["size"]))
    return rows


def _opening(cache, index, cache_dir: Path, size) -> list[str]:
    """A built cache opened as a new process opens it: the content digest of every
    image file (the key) and of the cache file itself, with no remembered digest."""
    from smse_metric.recipes.histopathology.data import rowfile

    best = float("inf")
    for _ in range(3):
        rowfile._digests.clear()  # noqa: SLF001 - a new process remembers none
        t0 = time.perf_counter()
        BreakHisDataset(index, "train", size=size, seed=0, cache_dir=cache_dir)
        best = min(best, time.perf_counter() - t0)
    return [
        f"opening the built cache ({len(cache)} images: content digests, checks)",
        f"{len(cache) / best:.0f}",
        "—",
    ]


def read_cost(cache, b: int, rounds: int) -> list[list[str]]:
    """Batches of ``b`` rows read three ways, paired passes alternating, medians: the
    cache's `gather` on its memory map without the length check (the reference: the
    cache before), with it (an ``fstat`` per batch, which turns a file truncated in use
    into an error naming it instead of SIGBUS), and ``os.pread`` per row into the same
    batch (which could never raise SIGBUS: the alternative not taken)."""
    import copy

    import numpy as np

    mapped = np.memmap(cache.path, dtype=np.uint8, mode="r", shape=cache.shape)
    unchecked = copy.copy(cache)
    unchecked.rows = copy.copy(cache.rows)
    unchecked.rows.mapped = lambda: mapped  # the same gather, no length check
    rows = np.random.default_rng(0).permutation(len(cache))[:b]
    fd = os.open(cache.path, os.O_RDONLY)
    size = mapped[0].nbytes

    def pread(_):
        out = torch.empty((len(rows), *cache.shape[1:]), dtype=torch.uint8).numpy()
        for j, r in enumerate(rows):
            os.preadv(fd, [memoryview(out[j]).cast("B")], int(r) * size)

    ways = {
        "memory map, no length check (the reference)": lambda _: unchecked.gather(rows),
        "memory map + length check (the cache)": lambda _: cache.gather(rows),
        "os.pread per row (not taken)": pread,
    }
    rates = {name: [] for name in ways}
    for _ in range(rounds):
        for name, fn in ways.items():
            rates[name].append(b * _rate(fn, 20, 1))
    os.close(fd)
    ref = float(np.median(rates["memory map, no length check (the reference)"]))
    out = []
    for name, r in rates.items():
        med = float(np.median(r))
        out.append([f"{name}, batches of {b}", f"{med:.0f}", f"{med / ref:.2f}x"])
    return out


def _loader_rate(
    ds: BreakHisDataset, workers: int, steps: int, dev: torch.device, rounds: int = 3
) -> float:
    """Training images/s that a loader with ``workers`` delivers to ``dev``, the best of
    ``rounds`` windows of ``steps`` batches of 32: persistent workers cycle the (small)
    synthetic split, and the first batch is not timed (worker start-up). Device
    augmentation's batches are gathered from the cache and, on a GPU, augmented there."""
    cuda, b = dev.type == "cuda", min(32, len(ds))  # --quick's split holds 22 images
    collate = collate_records if ds.on_device else None  # as the recipe's train_loader
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=b,
        shuffle=True,
        num_workers=workers,
        pin_memory=cuda,
        drop_last=True,
        collate_fn=collate,
        persistent_workers=workers > 0,
    )

    def batches():
        while True:
            yield from loader

    def take(n: int) -> None:
        for _ in range(n):
            batch = next(it)
            if not ds.on_device:
                continue
            rows, aug = split_records(batch)[:2]
            if cuda:
                ds.device_batch(rows, aug, dev)
            else:  # the CPU's augmentation is compute, not feeding: gather only
                ds.cache.gather(rows)
        if cuda:
            torch.cuda.synchronize()

    it, best = batches(), 0.0
    take(1)
    for _ in range(rounds):
        t0 = time.perf_counter()
        take(steps)
        best = max(best, b * steps / (time.perf_counter() - t0))
    return best


def _model_rate(size: int, steps: int) -> float:
    """resnet18 training images/s at ``size`` px on the GPU (bf16, channels-last)."""
    from smse_metric.recipes.histopathology.models import EmbeddingNet

    dev = torch.device("cuda")
    net = EmbeddingNet("resnet18", embedding_dim=128).to(dev, memory_format=torch.channels_last)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    x = torch.rand(32, 3, size, size, device=dev).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (32,), device=dev)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, logits = net(x)
            loss = torch.nn.functional.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return 32 * steps / (time.perf_counter() - t0)


def feed(root: Path, size: int, cache_dir: Path, steps: int, device: str) -> list[list[str]]:
    """The loader with the recipe's default workers; on a GPU against the model."""
    dev = torch.device(device)
    workers = DataConfig().num_workers
    index = scan_breakhis(root)
    rows, model_rate = [], None
    if dev.type == "cuda":
        model_rate = _model_rate(size, steps)
        rows.append(["resnet18 training step (bf16, channels-last)", f"{model_rate:.0f}", "—"])
        print(" | ".join(rows[0]), flush=True)
    on_device = {"cache_dir": cache_dir, "augment_on": "device"}
    # device augmentation leaves the workers little to do: the main process alone is
    # measured too, since on few cores the workers' hand-over can cost more than it saves
    for name, kw, n in (
        ("PNG", {}, workers),
        ("cache", {"cache_dir": cache_dir}, workers),
        ("cache + device augmentation", on_device, workers),
        ("cache + device augmentation", on_device, 0),
    ):
        ds = BreakHisDataset(index, "train", size=(size, size), seed=0, **kw)
        rate = _loader_rate(ds, n, steps, dev)
        rows.append([f"loader, {name}, {n} workers", f"{rate:.0f}"])
        if model_rate is not None:
            rows[-1].append("loader-bound" if rate < model_rate else "not loader-bound")
        print(" | ".join(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="64 px, 16 images")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="Markdown output file")
    args = p.parse_args(argv)
    size, n, rounds = (64, 16, 1) if args.quick else (224, 64, 3)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = make_synthetic_breakhis(
            Path(tmp) / "data",
            {"A": 1, "DC": 1},
            images_per_magnification=8 if not args.quick else 2,
            image_size=NATIVE,
            seed=0,
        )
        rows = per_core(root, size, n, rounds, Path(tmp) / "cache")
        print(markdown_table(["path", "images/s per core", "vs PNG"], rows), flush=True)
        index = scan_breakhis(root)
        opened = BreakHisDataset(
            index, "train", size=(size, size), seed=0, cache_dir=Path(tmp) / "cache"
        ).cache
        reads = read_cost(opened, min(32, len(opened)), 5 if args.quick else 15)
        print(markdown_table(["cache reads", "images/s", "vs the map"], reads), flush=True)
        torch.set_num_threads(os.cpu_count() or 1)
        steps = 20 if args.quick else 60
        loaders = feed(root, size, Path(tmp) / "cache", steps, args.device)
    cuda = args.device.startswith("cuda")
    cmd = "python -m benchmarks.bench_data" + (" --quick" if args.quick else "")
    cmd += "" if args.device == "cpu" else f" --device {args.device}"
    parts = [
        f"# Data path at {NATIVE[0]} x {NATIVE[1]} PNGs, {size} px training images",
        "",
        f"Machine: {machine()}",
        "",
        f"Command: `{cmd}`",
        "",
        "Images per second on one core (one process, one torch thread, no workers), the "
        "best of the passes over the same images; ratios against the PNG path.",
        "",
        markdown_table(["path", "images/s per core", "vs PNG"], rows),
        "",
        "Reading cached rows: a plain memory map (the cache before), the cache's map "
        "with its length check (a file truncated in use raises an error naming it, not "
        "SIGBUS), and `os.pread` per row; paired passes alternating, medians:",
        "",
        markdown_table(["cache reads", "images/s", "vs the map"], reads),
        "",
    ]
    parts += [
        "## Loader against the model on this GPU" if cuda else "## Loader on this CPU",
        "",
        "Training images/s delivered with the recipe's default workers (and, for device "
        "augmentation, by the main process alone), the best of 3 windows of "
        f"{steps} batches; "
        + (
            "device augmentation's batches pinned, copied to the GPU and augmented there."
            if cuda
            else "device augmentation's batches gathered from the cache (what a "
            "GPU would receive), not augmented."
        ),
        "",
        markdown_table(["", "images/s", "verdict"][: len(loaders[-1])], loaders),
        "",
    ]
    name = "data" + ("-quick" if args.quick else "") + ("-cuda" if cuda else "")
    return write_report("\n".join(parts), name, args.out)


if __name__ == "__main__":
    main()
