"""Fused triplet and pair losses vs pytorch-metric-learning: forward + backward.

Each (method, B, classes) case runs in its own process so peak memory is its
own. Ratios compare methods measured in the same run on the same machine.

    python -m benchmarks.bench_losses            # full table -> results/losses.md
    python -m benchmarks.bench_losses --quick    # smoke run, B = 256
    python -m benchmarks.bench_losses --device cuda   # B up to 16384

The floor of the sorted selections (all, semihard, hard) is `torch.cdist` and a sort of
every row, forward and backward: what any exact per-anchor selection over sorted
negatives must at least do.
"""

from __future__ import annotations

import argparse
import json

import torch

from benchmarks.common import PeakMemory, machine, markdown_table, median_ms, run_case, write_report

D = 128
MARGIN = 0.2
STRATEGIES = ("all", "semihard", "hard", "batch_hard")
# PML materialises every triplet before filtering: a B^3 byte mask plus ~60 bytes a
# triplet. Cases estimated above this are skipped and reported as such.
MEMORY_BUDGET = {"cpu": 6 * 2**30, "cuda": 40 * 2**30}


def n_triplets(b: int, classes: int) -> int:
    per_class = b // classes
    return b * (per_class - 1) * (b - per_class)


def estimated_bytes(method: str, strategy: str, b: int, classes: int) -> float:
    if method == "floor":  # distances, sorted values, int64 indices, their gradient
        return 32.0 * b * b
    if method == "ours_fused" or strategy == "batch_hard":
        return 40.0 * b * b
    if method == "pml" and strategy != "pair":
        return float(b) ** 3 + 60.0 * n_triplets(b, classes)
    if strategy == "pair":
        return 40.0 * b * b
    return 50.0 * n_triplets(b, classes)  # ours_mined: the output tuple


def _floor(e: torch.Tensor, _labels: torch.Tensor) -> torch.Tensor:
    """cdist and a sort of every row: the values carry the gradient back."""
    return torch.cdist(e, e).sort(dim=1).values.sum()


def _loss_fn(method: str, strategy: str):
    if method == "floor":
        return _floor
    if method == "pml":
        from pytorch_metric_learning import losses, miners

        if strategy == "pair":
            loss = losses.ContrastiveLoss()
            return lambda e, y: loss(e, y)
        loss = losses.TripletMarginLoss(margin=MARGIN)
        if strategy == "batch_hard":
            miner = miners.BatchHardMiner()
        else:
            miner = miners.TripletMarginMiner(margin=MARGIN, type_of_triplets=strategy)
        return lambda e, y: loss(e, y, miner(e, y))

    from smse_metric import ContrastiveLoss, TripletMarginLoss, TripletMiner

    if strategy == "pair":
        loss = ContrastiveLoss(margin=1.0)
        return lambda e, y: loss(e, y)
    if method == "ours_fused":
        loss = TripletMarginLoss(MARGIN, triplets=strategy)
        return lambda e, y: loss(e, y)
    loss = TripletMarginLoss(MARGIN)
    miner = TripletMiner(strategy, margin=MARGIN)
    return lambda e, y: loss(e, y, miner(e, y))


def case(method: str, strategy: str, b: int, classes: int, device: str, repeats: int) -> dict:
    dev = torch.device(device)
    torch.manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(b, D, device=dev), dim=1).requires_grad_()
    labels = torch.arange(b, device=dev) % classes
    fn = _loss_fn(method, strategy)

    def step():
        emb.grad = None
        fn(emb, labels).backward()

    with PeakMemory(dev) as mem:
        step()  # warm-up; its peak is every call's peak
        ms = median_ms(step, dev, repeats)
    return {"ms": ms, "peak_mib": mem.mib}


def _run(cfg: list[str]) -> dict:
    """CPU: a fresh process per case (resident-set peaks are per process). CUDA: in
    process, since the allocator's peak can be reset and CUDA start-up is slow."""
    if not cfg[4].startswith("cuda"):
        return run_case("benchmarks.bench_losses", cfg, timeout=900)
    try:
        return case(cfg[0], cfg[1], int(cfg[2]), int(cfg[3]), cfg[4], int(cfg[5]))
    except torch.cuda.OutOfMemoryError:
        return {"error": "CUDA out of memory"}
    finally:
        torch.cuda.empty_cache()


def _fmt_ms(r: dict) -> str:
    return f"{r['ms']:.1f}" if "ms" in r else "—"


def _fmt_mib(r: dict) -> str:
    return f"{r['peak_mib']:.0f}" if "peak_mib" in r else "—"


def _ratio(num: dict, den: dict, key: str) -> str:
    if key not in num or key not in den or den[key] <= 0:
        return "—"
    return f"{num[key] / den[key]:.1f}x"


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small smoke run")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="Markdown output file")
    p.add_argument("--case", nargs=6, metavar=("METHOD", "STRATEGY", "B", "C", "DEVICE", "REP"))
    args = p.parse_args(argv)
    if args.case:
        m, s, b, c, dev, rep = args.case
        print(json.dumps(case(m, s, int(b), int(c), dev, int(rep))))
        return ""

    sizes = (256,) if args.quick else (256, 512, 1024, 4096, 8192)
    if args.device.startswith("cuda") and not args.quick:
        sizes += (16384,)
    class_counts = (2,) if args.quick else (2, 8)
    budget = MEMORY_BUDGET["cuda" if args.device.startswith("cuda") else "cpu"]
    if args.device.startswith("cuda"):
        # CUDA context and cuBLAS workspace are set up once here, not in the first case.
        x = torch.randn(256, 256, device=args.device, requires_grad=True)
        (x @ x).sum().backward()
    rows, notes = [], []
    for strategy in (*STRATEGIES, "pair"):
        methods: tuple[str, ...] = ("ours_fused", "ours_mined", "pml")
        if strategy == "pair":
            methods = ("ours_fused", "pml")
        elif strategy != "batch_hard":
            methods += ("floor",)
        for classes in class_counts:
            for b in sizes:
                res = {}
                for method in methods:
                    est = estimated_bytes(method, strategy, b, classes)
                    if est > budget:
                        res[method] = {"skipped": True}
                        notes.append(
                            f"{method} {strategy} B={b} C={classes}: skipped, needs about "
                            f"{est / 2**30:.0f} GiB (budget {budget / 2**30:.0f} GiB)"
                        )
                        continue
                    rep = 5 if b <= 1024 else 3
                    if args.quick:
                        rep = 2
                    cfg = [method, strategy, str(b), str(classes), args.device, str(rep)]
                    # the floor too is measured per row, beside the case it is the
                    # floor of: one noisy measurement shared by a column misled
                    res[method] = _run(cfg)
                    if "error" in res[method]:
                        notes.append(
                            f"{method} {strategy} B={b} C={classes}: {res[method]['error']}"
                        )
                fused, mined, pml = res["ours_fused"], res.get("ours_mined", {}), res["pml"]
                floor = res.get("floor", {})
                tri = "pairs" if strategy == "pair" else f"{n_triplets(b, classes):.2e}"
                rows.append(
                    [
                        "contrastive (all pairs)" if strategy == "pair" else strategy,
                        str(b),
                        str(classes),
                        tri,
                        _fmt_ms(fused),
                        _fmt_ms(mined) if strategy != "pair" else "n/a",
                        _fmt_ms(pml),
                        _ratio(pml, fused, "ms"),
                        _fmt_ms(floor) if floor else "n/a",
                        _ratio(fused, floor, "ms") if floor else "n/a",
                        _fmt_mib(fused),
                        _fmt_mib(pml),
                        _ratio(pml, fused, "peak_mib"),
                    ]
                )
                print(" | ".join(rows[-1]), flush=True)
    header = [
        "loss",
        "B",
        "classes",
        "triplets in batch",
        "ours fused ms",
        "ours mined ms",
        "PML ms",
        "PML / fused time",
        "floor ms",
        "fused / floor time",
        "fused peak MiB",
        "PML peak MiB",
        "PML / fused memory",
    ]
    text = "\n".join(
        [
            f"# Loss benchmark ({'quick' if args.quick else 'full'}, {args.device})",
            "",
            f"Machine: {machine()}.",
            f"Forward + backward, D={D}, L2-normalised random embeddings, balanced labels, "
            f"margin {MARGIN} (contrastive: ours margin 1.0 SMSE form, PML defaults). "
            f"Median of {'2' if args.quick else '5 (3 for B > 1024)'} runs after one warm-up, "
            f"{'each case in a fresh process' if args.device == 'cpu' else 'in one process'}; "
            "peak memory is the case's high-water mark above its start "
            "(CPU: resident set; CUDA: allocator peak). "
            "PML = `TripletMarginMiner(type)` or `BatchHardMiner` + `TripletMarginLoss`, "
            "and `ContrastiveLoss` on all pairs. "
            "Ours mined = `TripletMiner` + `TripletMarginLoss`. "
            "Floor = `torch.cdist` + a sort of every row, forward and backward "
            "(all, semihard, hard).",
            "",
            f"Command: `python -m benchmarks.bench_losses{' --quick' if args.quick else ''}"
            f"{'' if args.device == 'cpu' else ' --device ' + args.device}`",
            "",
            markdown_table(header, rows),
            "",
            *(["Skipped or failed:", "", *[f"- {n}" for n in notes], ""] if notes else []),
        ]
    )
    suffix = "" if args.device == "cpu" else "-" + args.device.split(":")[0]
    return write_report(text, f"losses{'-quick' if args.quick else ''}{suffix}", args.out)


if __name__ == "__main__":
    main()
