"""The SMSE recipe on BreakHis-layout histopathology data (the ``[recipe]`` extra).

``data`` reads BreakHis trees, fold files and the synthetic dataset; ``models`` holds the
network; ``config`` the validated TOML configuration and presets; ``training`` the
splits, training and evaluation of a run (``from
smse_metric.recipes.histopathology.training import train``); ``report``, ``search``,
``demo`` and ``cli`` what a run writes, finds and prints. The library in
``smse_metric`` never imports this package.
"""

from .config import PRESETS, Config, config_to_toml, load_config

__all__ = ["PRESETS", "Config", "config_to_toml", "load_config"]
