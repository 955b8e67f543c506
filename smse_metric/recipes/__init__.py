"""Applications built on the library. The core (``smse_metric``) never imports them.

``smse_metric.recipes.histopathology`` is the SMSE recipe on BreakHis-layout data: data,
models, configuration, training, evaluation, reports, search, demo and the
``smse-metric`` command. It needs the ``[recipe]`` extra.
"""
