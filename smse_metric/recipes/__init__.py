"""Reference recipes: the SMSE method on BreakHis-layout data."""

from .config import PRESETS, Config, config_to_toml, load_config

__all__ = ["PRESETS", "Config", "config_to_toml", "load_config"]
