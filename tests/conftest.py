"""Test settings: hypothesis profile (HYPOTHESIS_MAX_EXAMPLES) and two torch threads.
Shared helpers live in tests/helpers.py, naive references in tests/reference.py."""

import os
import sys
from pathlib import Path

import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default",
    max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "30")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("default")

torch.set_num_threads(min(2, torch.get_num_threads()))


# `make test-core` runs the suite from outside the source tree against the installed
# wheel. The repository root goes at the END of sys.path (and so to spawned workers):
# `benchmarks` and the test modules import from it, while the installed `smse_metric`,
# found first, is the one tested.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.append(_ROOT)
