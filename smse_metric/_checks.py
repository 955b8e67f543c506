"""Internal: argument checks and the distance vocabulary shared by ``functional``,
``evaluation``, the losses, miners and samplers. A leaf: it imports nothing from the
package, so ``functional`` stays free of the rest of it. Not public API."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

#: The one distance vocabulary (pytorch-metric-learning's ``LpDistance()``,
#: ``LpDistance(power=2)``, ``CosineSimilarity()``): losses, miners, ``functional``,
#: evaluation, the recipe's config and the PML adapters all take these names.
DISTANCES = ("l2", "squared_l2", "cosine")

#: Names of the release before ``distance=``, accepted with a DeprecationWarning.
_OLD_DISTANCE_NAMES = {"euclidean": "l2", "squared_euclidean": "squared_l2"}


def check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    """Raise a ValueError naming ``name`` unless ``value`` is one of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def _int(name: str, value: Any, least: int, words: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < least:
        raise ValueError(f"{name} must be a {words} integer, got {value!r}")
    return int(value)


def positive_int(name: str, value: Any) -> int:
    """``value`` as an int >= 1 (numpy integers too, bools not), or a ValueError."""
    return _int(name, value, 1, "positive")


def nonnegative_int(name: str, value: Any) -> int:
    """``value`` as an int >= 0 (numpy integers too, bools not), or a ValueError."""
    return _int(name, value, 0, "non-negative")


def deprecated(old: str, new: str, stacklevel: int = 3) -> None:
    """Warn that the spelling ``old`` goes in the next release, naming ``new``."""
    warnings.warn(
        f"{old} is deprecated and will be removed in the next release; use {new}",
        DeprecationWarning,
        stacklevel=stacklevel + 1,
    )


def resolve_distance(
    distance: str | None,
    default: str,
    *,
    squared: bool | None = None,
    metric: str | None = None,
    stacklevel: int = 3,
) -> str:
    """The ``distance=`` name of a call that may use an older spelling.

    ``squared=True/False`` (losses and miners) and ``metric=`` (``functional`` and
    evaluation), as well as the old names ``"euclidean"`` / ``"squared_euclidean"``,
    still work for one release with a DeprecationWarning that names the new spelling;
    giving an old and the new spelling that disagree is a ValueError. ``stacklevel``
    points the warning at the user's call (3: the caller of the caller of this)."""
    if metric is not None:
        new = _OLD_DISTANCE_NAMES.get(metric, metric)
        deprecated(f"metric={metric!r}", f"distance={new!r}", stacklevel)
        distance = _same("metric", new, distance)
    elif distance in _OLD_DISTANCE_NAMES:
        new = _OLD_DISTANCE_NAMES[distance]
        deprecated(f"the distance name {distance!r}", repr(new), stacklevel)
        distance = new
    if squared is not None:
        new = "squared_l2" if squared else "l2"
        deprecated(f"squared={bool(squared)}", f"distance={new!r}", stacklevel)
        distance = _same("squared", new, distance)
    distance = default if distance is None else distance
    check_choice("distance", distance, DISTANCES)
    return distance


def _same(old_name: str, old: str, distance: str | None) -> str:
    if distance is not None and old != _OLD_DISTANCE_NAMES.get(distance, distance):
        raise ValueError(
            f"{old_name}= and distance= disagree ({old!r} against {distance!r}): "
            "give distance= alone"
        )
    return old
