"""Run every benchmark, regenerating benchmarks/results/*.md: `python -m benchmarks [--quick]`."""

import sys

from benchmarks import bench_eval, bench_losses, bench_recipe, bench_sampler

if __name__ == "__main__":
    quick = ["--quick"] if "--quick" in sys.argv[1:] else []
    for bench in (bench_losses, bench_sampler, bench_eval, bench_recipe):
        bench.main(quick)
