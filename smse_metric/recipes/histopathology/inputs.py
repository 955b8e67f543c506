"""A run's inputs, resolved once before anything is written: the config with its data
directory and the backbone's input settings filled in, the network built to ask the
backbone, and the data scanned once for every fold."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from .build import build_model, resolve_inputs
from .config import Config
from .data import BreakHisIndex
from .data.breakhis import MAGNIFICATIONS, SUBTYPES
from .errors import RecipeError
from .models import EmbeddingNet
from .rundir import RunDir
from .splits import MALIGNANT, Splits, data_root, default_positive, load_splits, scan_data

__all__ = ["Inputs", "resolve"]


@dataclasses.dataclass
class Inputs:
    """What every fold of a run shares, made once.

    Attributes:
        cfg: the validated config, ``data.path`` / ``data.cache_dir`` absolute and the
            backbone's ``mean`` / ``std`` / ``interpolation`` filled where empty.
        root: the data directory (synthetic runs: ``RUN/data``, written at the claim).
        generated: whether the run writes its data itself (synthetic: no data named).
        scanned: the data's records, once scanned (`scan_data`).

    Examples:
        >>> from smse_metric.recipes.histopathology import load_config
        >>> inputs = Inputs(load_config(overrides={"data": {"synthetic": True}}), Path("d"))
        >>> inputs.config(3).data.fold
        3
    """

    cfg: Config
    root: Path
    generated: bool = False
    # the network built to resolve the inputs, the generator after it, the scan
    _model: EmbeddingNet | None = dataclasses.field(default=None, init=False, repr=False)
    _rng: torch.Tensor | None = dataclasses.field(default=None, init=False, repr=False)
    scanned: BreakHisIndex | None = dataclasses.field(default=None, repr=False)

    def config(self, fold: int, run: RunDir | None = None) -> Config:
        """The config of fold ``fold``, as ``run``'s ``config.toml`` holds it: naming the
        data unless it is ``run``'s own (``RUN/data``)."""
        d = dataclasses.replace(self.cfg.data, fold=fold)
        if run is not None and self.root.resolve() != run.data.resolve():
            d = dataclasses.replace(d, path=str(self.root.resolve()))
        return dataclasses.replace(self.cfg, data=d)

    def splits(self, fold: int) -> Splits:
        """Fold ``fold``'s patient splits; the data is scanned on the first call only."""
        if self.scanned is None:
            self.scanned = scan_data(self.cfg.data, self.root)
        return load_splits(self.config(fold), self.root, self.scanned)

    def data_paths(self) -> list[Path]:
        """What a run directory must keep apart from (`check_data_apart`): the data
        directory; for a manifest, the manifest and every folder holding its images."""
        if self.scanned is None or not self.root.is_file():
            return [self.root]
        return [self.root, *sorted({Path(p).parent for p in self.scanned.paths})]

    def keep_model(self, model: EmbeddingNet) -> None:
        """Hand ``model``, just built from ``run.seed``, to the first `new_model` call,
        with the random generator where building it left it."""
        self._model, self._rng = model, torch.get_rng_state()

    def new_model(self) -> EmbeddingNet:
        """An untrained network seeded with ``run.seed``: the one built to resolve the
        inputs on the first call (with the generator where building it left it), a
        fresh one (the same weights) after that."""
        if self._model is not None:
            model, self._model = self._model, None
            torch.set_rng_state(self._rng)
            return model
        torch.manual_seed(self.cfg.run.seed)
        return build_model(self.cfg)


def resolve(cfg: Config, run: RunDir, root: str | Path | None = None) -> Inputs:
    """Resolve ``cfg`` for a run into ``run`` on the data ``root`` (default: the
    config's ``data.path``, or ``RUN/data`` for synthetic data): the data is scanned
    (its classes and the binary task's positive ones go into ``data.classes`` /
    ``data.positive_classes``) and the network built once, so that a bad manifest, an
    unknown backbone, a failed download or a bad ``--weights`` file fails here, before
    anything is written.

    Args:
        cfg: the validated config.
        run: the run directory.
        root: the data directory, if not the config's.

    Examples:
        >>> from smse_metric.recipes.histopathology import load_config
        >>> cfg = load_config(overrides={"data": {"synthetic": True}})
        >>> inputs = resolve(cfg, RunDir("runs/a"))
        >>> inputs.root.as_posix(), inputs.cfg.data.mean  # resnet18: ImageNet's
        ('runs/a/data', [0.485, 0.456, 0.406])
    """
    generated = root is None and cfg.data.path is None
    root = data_root(cfg.data.path, run.path) if root is None else Path(root)
    d = cfg.data
    if root.resolve() != run.data.resolve():  # config.toml must name the data
        d = dataclasses.replace(d, path=str(root.resolve()))
    if d.cache_dir is not None:  # evaluate, run from elsewhere, finds the same cache
        d = dataclasses.replace(d, cache_dir=os.path.abspath(d.cache_dir))
    index = None
    if generated:  # written at the claim: the synthetic BreakHis's classes
        classes, positive = list(SUBTYPES), MALIGNANT
        if not set(d.magnifications) <= set(MAGNIFICATIONS):
            raise RecipeError(
                f"data.magnifications: the synthetic data has {list(MAGNIFICATIONS)}, "
                f"not {d.magnifications}"
            )
    else:
        index = scan_data(d, root)
        classes = list(index.subtype_names)
        positive = d.positive_classes or default_positive(index, d.task)
    d = dataclasses.replace(d, classes=classes, positive_classes=list(positive))
    cfg = dataclasses.replace(cfg, data=d)
    torch.manual_seed(cfg.run.seed)  # the weights training starts from
    model = build_model(cfg)
    inputs = Inputs(resolve_inputs(cfg, model), root, generated, index)
    inputs.keep_model(model)
    return inputs
