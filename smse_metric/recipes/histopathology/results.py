"""What a run measured, typed: the kNN and head reports of a split, and a run's
``metrics.json`` (which is written from, and read back into, `RunMetrics`)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from smse_metric.evaluation import EvaluationReport

from .errors import RecipeError

__all__ = ["PREDICTORS", "RunMetrics", "SplitMetrics"]

#: the two predictors a run scores: kNN over the training images, the classifier head
PREDICTORS = ("knn", "head")


@dataclasses.dataclass
class SplitMetrics:
    """The kNN and classifier-head reports of one split.

    Attributes:
        knn: kNN of the split's images against the training images.
        head: the classifier head's predictions.

    Examples:
        >>> from smse_metric.evaluation import evaluate_predictions
        >>> r = evaluate_predictions([0, 1, 1], [0, 1, 0], groups=[1, 2, 3])
        >>> SplitMetrics(knn=r, head=r).predictor("head").pooled.accuracy
        0.6666666666666666
    """

    knn: EvaluationReport
    head: EvaluationReport

    def predictor(self, name: str) -> EvaluationReport:
        """The report of ``"knn"`` or ``"head"``.

        Args:
            name: ``"knn"`` or ``"head"``.
        """
        if name not in PREDICTORS:
            raise ValueError(f"predictor must be one of {PREDICTORS}, got {name!r}")
        return getattr(self, name)

    def to_dict(self) -> dict[str, Any]:
        """``{"knn": ..., "head": ...}`` as plain data."""
        return {name: self.predictor(name).to_dict() for name in PREDICTORS}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SplitMetrics:
        """The reports `to_dict` wrote.

        Args:
            d: a dict from `to_dict`.
        """
        return cls(*(EvaluationReport.from_dict(d[name]) for name in PREDICTORS))


@dataclasses.dataclass
class RunMetrics:
    """A finished run's test results and how they were obtained: ``metrics.json``.

    Attributes:
        best_epoch: the epoch selected on validation.
        selected_on: what selected it (e.g. ``"validation knn patient accuracy"``).
        best_val_score: its validation score.
        test: the test split's reports.
        splits: images per split (``train``, ``val``, ``test``).
        data: the data scan's report.
        bad_images: ``[path, reason]`` of every unreadable image left out.

    Examples:
        >>> from smse_metric.evaluation import evaluate_predictions
        >>> r = evaluate_predictions([0, 1], [0, 1], groups=[1, 2])
        >>> m = RunMetrics(2, "validation knn patient accuracy", 0.9, SplitMetrics(r, r),
        ...                {"train": 10, "val": 2, "test": 2}, {}, [])
        >>> RunMetrics.from_dict(json.loads(json.dumps(m.to_dict()))) == m
        True
        >>> m.selected_predictor
        'knn'
    """

    best_epoch: int
    selected_on: str
    best_val_score: float
    test: SplitMetrics
    splits: dict[str, int]
    data: dict[str, Any]
    bad_images: list[list[str]]

    @property
    def selected_predictor(self) -> str:
        """``"knn"`` or ``"head"``: the predictor the epoch was selected on."""
        return "knn" if "knn" in self.selected_on else "head"

    def to_dict(self) -> dict[str, Any]:
        """Plain data, as ``metrics.json`` holds it."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {**fields, "test": self.test.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunMetrics:
        """The metrics `to_dict` wrote.

        Args:
            d: a dict from `to_dict`.
        """
        return cls(**{**d, "test": SplitMetrics.from_dict(d["test"])})

    def save(self, path: str | Path) -> None:
        """Write ``metrics.json``.

        Args:
            path: the file to write.
        """
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> RunMetrics:
        """Read a ``metrics.json`` written by `save`.

        Args:
            path: the file to read.
        """
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except FileNotFoundError as e:
            raise RecipeError(
                f"{path.parent} has no {path.name}: train or evaluate the run first"
            ) from e
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise RecipeError(
                f"{path} is not a metrics.json of this version "
                f"({type(e).__name__}: {e}); rerun `evaluate`"
            ) from e
