"""Run every benchmark and regenerate benchmarks/results/*.md.

python -m benchmarks                     # full tables -> benchmarks/results/
python -m benchmarks --quick --out DIR   # smoke run (small sizes), tables -> DIR
"""

import argparse
from pathlib import Path

from benchmarks import (
    bench_archive,
    bench_data,
    bench_eval,
    bench_frozen,
    bench_launch,
    bench_losses,
    bench_recipe,
    bench_sampler,
    bench_sharded,
)

BENCHES = {
    "losses": bench_losses,
    "launch": bench_launch,
    "sampler": bench_sampler,
    "eval": bench_eval,
    "recipe": bench_recipe,
    "data": bench_data,
    "frozen": bench_frozen,
    "sharded": bench_sharded,
    "archive": bench_archive,
}


def main(argv: list[str] | None = None) -> list[Path]:
    p = argparse.ArgumentParser(description="Run every benchmark.")
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    p.add_argument("--out", type=Path, help="directory for the tables (default: results/)")
    args = p.parse_args(argv)
    written = []
    for name, bench in BENCHES.items():
        flags = ["--quick"] if args.quick else []
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            path = args.out / f"{name}{'-quick' if args.quick else ''}.md"
            flags += ["--out", str(path)]
            written.append(path)
        bench.main(flags)
    return written


if __name__ == "__main__":
    main()
