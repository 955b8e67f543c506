"""``python -m smse_metric``: the histopathology recipe's command line."""

import sys

from ._launcher import main

sys.exit(main())
