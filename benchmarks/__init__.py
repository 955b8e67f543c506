"""Speed and memory benchmarks, measured as ratios against baselines in the same run."""
