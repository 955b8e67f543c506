"""`python -m benchmarks --quick` (what `make bench-quick` runs) keeps working: every
benchmark runs and writes its table. No timing is asserted."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.bench_revision import CASES

ROOT = Path(__file__).resolve().parents[1]


def test_quick_benchmarks_run_and_write_tables(tmp_path):
    cmd = [sys.executable, "-m", "benchmarks", "--quick", "--out", str(tmp_path)]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    names = ("losses", "launch", "sampler", "eval", "recipe", "data", "frozen", "sharded")
    for name in (*names, "archive"):
        text = (tmp_path / f"{name}-quick.md").read_text()
        rows = [line for line in text.splitlines() if line.startswith("|")]
        assert len(rows) >= 3, name  # header, rule, at least one measured row
        assert "Machine:" in text and "Command: `python -m benchmarks." in text, name
        assert "timed out" not in text and "exit " not in text, name  # no case failed
    assert not list((ROOT / "benchmarks" / "results").glob("*-quick.md"))  # nothing leaked


def test_revision_benchmark_compares_with_a_git_revision(tmp_path):
    out = tmp_path / "ab.md"
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.bench_revision",
        "--base",
        "HEAD",
        "--sizes",
        "16",
        "--rounds",
        "1",
        "--repeats",
        "1",
        "--out",
        str(out),
    ]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ")][1:]
    assert [r.split(" | ")[0] for r in rows] == [f"| {name}" for name in CASES]
    assert all(float(r.split(" | ")[-1].rstrip(" |")) > 0 for r in rows)
    bad = subprocess.run(
        [*cmd, "--cases", "all-triplets,cosine"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "--cases: unknown case 'cosine'" in bad.stderr


def test_the_device_evaluation_table_runs_here_on_the_cpu():
    """`bench_eval --device cuda` builds its table with device_table; on CPU tensors it
    must run and find the same neighbours as the numpy search (no GPU needed)."""
    from benchmarks.bench_eval import device_table

    lines = "\n".join(device_table("cpu", (600,), 1)).splitlines()
    rows = [line for line in lines if line.startswith("| ")][1:]
    assert len(rows) == 4  # random, and the three tied cases
    assert all(r.rstrip(" |").endswith("yes") for r in rows)


def _gpu_script(tmp_path, *steps, python=sys.executable, **extra):
    env = extra | {
        "PATH": "/usr/bin:/bin",
        "PYTHON": str(python),
        "OUT": str(tmp_path / "out"),
        "RESULTS": str(tmp_path / "results"),
        "COMMIT": "abc1234",
    }
    cmd = ["bash", str(ROOT / "benchmarks" / "gpu.sh"), *steps]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the script would run")
def test_gpu_script_without_a_gpu_says_so_in_one_line(tmp_path):
    run = _gpu_script(tmp_path)
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and "CUDA GPU" in run.stderr
    assert not (tmp_path / "results").exists()


def test_gpu_script_runs_its_steps_and_names_the_commit(tmp_path):
    """A python that reports a GPU (the check is the only call faked): the CUDA tests
    run (skipped here) and their table names the commit; a benchmark that fails on this
    machine makes the run fail, step by step in the log; an unknown step is refused
    before anything runs; a step the time left cannot hold is not started."""
    fake = tmp_path / "python"
    fake.write_text(
        '#!/bin/bash\ncase "$*" in *"cuda.is_available())"*) exit 0;; esac\n'
        f'exec {sys.executable} "$@"\n'
    )
    fake.chmod(0o755)
    refused = _gpu_script(tmp_path, "tests", "nosuch", python=fake)
    assert refused.returncode == 2 and "no step named 'nosuch'" in refused.stderr
    assert not (tmp_path / "results").exists()
    run = _gpu_script(tmp_path, "tests", "launch", python=fake)
    table = (tmp_path / "results" / "tests-cuda.md").read_text()
    assert "Run at commit abc1234" in table and "skipped" in table.split("Result:")[1]
    log = (tmp_path / "out" / "gpu.log").read_text()
    assert "gpu.sh: tests: exit 0" in log
    if not torch.cuda.is_available():
        assert run.returncode == 1 and "gpu.sh: launch: exit 1" in log
    assert (tmp_path / "out" / "tests-cuda.md").read_text() == table
    late = _gpu_script(tmp_path, "launch", python=fake, TOTAL_LIMIT="5")
    assert late.returncode == 1 and "launch: not run, out of time" in late.stdout


def test_gpu_script_kills_a_step_that_ignores_its_time_limit(tmp_path):
    """A step stuck where SIGTERM cannot end it (here: ignored) is killed once its
    limit (the shortest a step may get) and the grace period have passed: exit 137."""
    fake = tmp_path / "python"
    fake.write_text(
        '#!/bin/bash\ncase "$*" in *"cuda.is_available())"*) exit 0;; '
        "*bench_launch*) trap '' TERM; exec sleep 60;; esac\n"
        f'exec {sys.executable} "$@"\n'
    )
    fake.chmod(0o755)
    run = _gpu_script(tmp_path, "launch", python=fake, STEP_LIMIT="10", GRACE="1")
    assert run.returncode == 1
    assert "gpu.sh: launch: exit 137" in (tmp_path / "out" / "gpu.log").read_text()
