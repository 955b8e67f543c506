"""The fused losses of this working tree against those of an earlier git revision, in
one process (interleaved rounds, the best of each side's medians): a regression check
that the machine's noise between two runs cannot fake or hide.

python -m benchmarks.bench_revision --base 78cd6a1   # -> history/losses-vs-78cd6a1.md
"""

from __future__ import annotations

import argparse
import importlib
import io
import math
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch

from benchmarks.common import machine, markdown_table, median_ms, write_report

ROOT = Path(__file__).resolve().parents[1]
CASES = {  # name -> keyword arguments of the functional losses
    "all-triplets": ("triplet_margin_loss", {"margin": 0.2, "triplets": "all"}),
    "semihard": ("triplet_margin_loss", {"margin": 0.2, "triplets": "semihard"}),
    "hard": ("triplet_margin_loss", {"margin": 0.2, "triplets": "hard"}),
    "batch-hard": ("triplet_margin_loss", {"margin": 0.2, "triplets": "batch_hard"}),
    "contrastive": ("contrastive_loss", {"margin": 0.5}),
    "all-triplets-cosine": (
        "triplet_margin_loss",
        {"margin": 0.2, "triplets": "all", "distance": "cosine"},
    ),
    "semihard-cosine": (
        "triplet_margin_loss",
        {"margin": 0.2, "triplets": "semihard", "distance": "cosine"},
    ),
}


def import_revision(rev: str, into: Path):
    """``smse_metric.functional`` of ``rev``, importable beside this tree's as
    ``smse_base.functional`` (the package renamed in a scratch copy)."""
    tar = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "smse_metric"], capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        t.extractall(into, filter="data")
    (into / "smse_metric").rename(into / "smse_base")
    for path in (into / "smse_base").rglob("*.py"):
        path.write_text(re.sub(r"\bsmse_metric\b", "smse_base", path.read_text()))
    sys.path.insert(0, str(into))
    return importlib.import_module("smse_base.functional")


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="git revision to compare against")
    p.add_argument("--sizes", default="256,1024,4096", help="batch sizes")
    p.add_argument("--classes", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds per side")
    p.add_argument("--repeats", type=int, default=9, help="calls per median, at least")
    p.add_argument("--cases", default=",".join(CASES), help=f"of {', '.join(CASES)}")
    p.add_argument("--out", help="table path (default: history/losses-vs-<base>.md)")
    args = p.parse_args(argv)
    cases = args.cases.split(",")
    for name in cases:
        if name not in CASES:
            p.error(f"--cases: unknown case {name!r}; choose from {', '.join(CASES)}")
    import smse_metric.functional as ours

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = import_revision(args.base, Path(tmp))
        for name in cases:
            fn, kwargs = CASES[name]
            for b in (int(s) for s in args.sizes.split(",")):
                g = torch.Generator().manual_seed(b)
                emb = torch.nn.functional.normalize(torch.randn(b, 128, generator=g), dim=1)
                emb.requires_grad_()
                labels = torch.arange(b) % args.classes

                def step(module, fn=fn, kwargs=kwargs, emb=emb, labels=labels):
                    getattr(module, fn)(emb, labels, **kwargs).backward()

                best = {"base": float("inf"), "ours": float("inf")}
                # calls per median: at least 100 ms of them, so millisecond calls are not
                # left to a handful of samples on a noisy machine
                one = median_ms(lambda: step(base), emb.device, 3)
                calls = max(args.repeats, math.ceil(100 / max(one, 1e-3)))
                for _ in range(args.rounds):
                    for side, module in (("base", base), ("ours", ours)):
                        step(module)  # warm-up
                        t = median_ms(lambda m=module: step(m), emb.device, calls)
                        best[side] = min(best[side], t)
                ratio = best["ours"] / best["base"]
                rows.append(
                    [name, str(b), f"{best['base']:.2f}", f"{best['ours']:.2f}", f"{ratio:.2f}"]
                )
                print(*rows[-1], flush=True)
    head = ["loss", "B", f"{args.base} ms", "this tree ms", "this tree / base"]
    text = (
        f"# Fused losses: this tree against {args.base}\n\n"
        f"Machine: {machine()}\n\n"
        f"Command: `python -m benchmarks.bench_revision {' '.join(argv or sys.argv[1:])}`\n\n"
        f"Forward + backward, D = 128, {args.classes} classes, L2-normalised float32 "
        f"embeddings; per side the best of {args.rounds} interleaved medians of at least "
        f"{args.repeats} calls (and at least 100 ms of calls), both sides in one "
        "process.\n\n" + markdown_table(head, rows) + "\n"
    )
    # against an earlier revision: history, beside CHANGELOG.md, not a reference table
    out = args.out or str(Path(__file__).parent / "history" / f"losses-vs-{args.base}.md")
    return write_report(text, f"losses-vs-{args.base}", out)


if __name__ == "__main__":
    main()
