"""Test settings: hypothesis profile (HYPOTHESIS_MAX_EXAMPLES) and two torch threads.
Shared helpers live in tests/helpers.py, naive references in tests/reference.py."""

import os

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
