"""Internal: the ``smse-metric`` console script. It answers ``--version`` from the library
alone and, where the ``[recipe]`` extra is missing, says so in one line instead of a
traceback; everything else is the recipe's command line."""

from __future__ import annotations

import platform
import sys
from collections.abc import Sequence

#: the modules of the [recipe] extra the command line imports
RECIPE_MODULES = ("timm", "PIL", "matplotlib", "tqdm")


def version_line() -> str:
    """``smse-metric X (torch Y, Python Z)``, as ``smse-metric --version`` prints it."""
    import torch

    from . import __version__

    return (
        f"smse-metric {__version__} (torch {torch.__version__}, Python {platform.python_version()})"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["--version"]:
        print(version_line())
        return 0
    try:
        from .recipes.histopathology.cli import main as recipe_main
    except ModuleNotFoundError as e:
        if e.name not in RECIPE_MODULES:
            raise
        print(
            f"smse-metric: the command line needs the [recipe] extra ({e.name} is missing): "
            "pip install 'smse-metric[recipe]'",
            file=sys.stderr,
        )
        return 2
    return recipe_main(args)
