"""The one exception type the command line turns into a one-line message and exit 2."""

from __future__ import annotations

__all__ = ["RecipeError"]


class RecipeError(ValueError):
    """A problem with what the user gave (a config key, a path, a dataset, a checkpoint)
    that the message names. Anything else the recipe raises is a bug and keeps its
    traceback. A ``ValueError``, so library callers may catch either.

    Examples:
        >>> try:
        ...     raise RecipeError("data.path /x does not exist")
        ... except ValueError as e:
        ...     print(e)
        data.path /x does not exist
    """
