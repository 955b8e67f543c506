"""The SMSE recipe on BreakHis-layout histopathology data (the ``[recipe]`` extra).

The flow of a run: ``config`` (validated TOML, presets) -> ``splits`` (patient-disjoint
train / validation / test) -> ``build`` (device, inputs, datasets, loaders, network,
losses, optimiser) -> ``training`` (epochs, selection on validation, checkpoints) ->
``evaluate`` (test kNN and head metrics, embeddings, index) -> ``report``. Beside it:
``data`` (BreakHis trees, fold files, the synthetic dataset), ``models``, ``step`` (one
step), ``checkpoint``, ``interrupt`` (Ctrl-C), ``search``, ``demo``, ``compare``,
``rundir`` and ``cli``. The library in ``smse_metric`` never imports this package.
"""

from .config import PRESETS, Config, config_to_toml, load_config

__all__ = ["PRESETS", "Config", "config_to_toml", "load_config"]
