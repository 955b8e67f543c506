"""Reference recipes: the SMSE method on BreakHis-layout data.

``config`` holds the validated configuration and presets; ``breakhis`` the training
and evaluation (``from smse_metric.recipes.breakhis import train``).
"""

from .config import PRESETS, Config, config_to_toml, load_config

__all__ = ["PRESETS", "Config", "config_to_toml", "load_config"]
