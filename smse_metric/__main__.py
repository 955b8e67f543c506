"""``python -m smse_metric``: the histopathology recipe's command line."""

import sys

from .recipes.histopathology.cli import main

sys.exit(main())
