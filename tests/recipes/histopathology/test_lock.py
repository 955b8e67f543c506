"""The run directory's lock: one writer, re-entrant in its process, never stale."""

import subprocess
import sys
import textwrap
import time

import pytest

from smse_metric.recipes.histopathology.errors import RecipeError
from smse_metric.recipes.histopathology.lock import LOCK_FILE, lock_run_dir


def test_nested_locks_in_one_process_share_the_lock(tmp_path):
    run = tmp_path / "run"
    with lock_run_dir(run), lock_run_dir(run):
        assert (run / LOCK_FILE).is_file()
    with lock_run_dir(run):  # released once the outer one ended
        pass


def test_a_lock_file_left_by_a_dead_process_does_not_block(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_FILE).write_text("pid 999999 on elsewhere\n")
    with lock_run_dir(run):
        assert "pid" in (run / LOCK_FILE).read_text()


def test_another_live_process_is_named_in_the_refusal(tmp_path):
    run = tmp_path / "run"
    ready = tmp_path / "ready"
    code = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from smse_metric.recipes.histopathology.lock import lock_run_dir
        with lock_run_dir({str(run)!r}):
            Path({str(ready)!r}).write_text("held")
            sys.stdin.read()
    """)
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() and holder.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), "the holder never took the lock"
        refusal = rf"in use by another smse-metric process \(pid {holder.pid} "
        with pytest.raises(RecipeError, match=refusal), lock_run_dir(run):
            pass
    finally:
        holder.communicate("")
    with lock_run_dir(run):  # free again once the holder ended
        pass
