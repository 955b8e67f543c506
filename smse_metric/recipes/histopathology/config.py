"""The recipe's configuration: TOML sections mapped onto validated dataclasses.

Unknown sections or keys and values of the wrong type or outside their choices
raise a ValueError that names the key (``loss.margin``). Presets live in
``recipes/configs/*.toml`` and are loaded by name: ``load_config("smse-triplet")``.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from smse_metric.evaluation._inputs import EXCLUDE
from smse_metric.functional import DISTANCES, FUSED_TRIPLETS

from .data.augment import INTERPOLATIONS
from .data.manifest import COLUMNS, OPTIONAL_COLUMNS
from .errors import RecipeError
from .factories import CLASSIFICATION_LOSSES, METRIC_DISTANCES, METRIC_LOSSES, OPTIMIZERS, SCHEDULES
from .models import POOLS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = [
    "PRESETS",
    "Config",
    "config_to_toml",
    "load_config",
    "preset_path",
    "toml_value",
]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
PRESETS = ("smse-triplet", "smse-triplet-small", "smse-pair", "baseline-ce", "smse-frozen")


@dataclass
class DataConfig:
    #: a BreakHis directory or a manifest (.csv, .parquet); None with synthetic = true
    path: str | None = None
    synthetic: bool = False
    task: str = field(default="binary", metadata={"choices": ("binary", "subtype")})
    #: the scales (magnifications) to use; empty: every scale of the data
    magnifications: list[int] = field(default_factory=list)
    #: a manifest's own names of our columns, e.g. {path = "file", group = "slide_id"}
    columns: dict[str, str] = field(default_factory=dict)
    #: a manifest row whose file is missing: "error", or "skip" (counted and listed)
    missing_files: str = field(default="error", metadata={"choices": ("error", "skip")})
    #: the data's classes (the subtype task's labels, in order); empty: from the data,
    #: written to the run's config.toml when it starts
    classes: list[str] = field(default_factory=list)
    #: the binary task's label 1: these classes (BreakHis: the malignant subtypes; a
    #: two-class manifest: its second class); empty: that default, written when it starts
    positive_classes: list[str] = field(default_factory=list)
    group_by: str = field(default="slide", metadata={"choices": ("slide", "case")})
    fold: int = 1
    #: Folds.csv or dsfold{fold}.txt ({fold} is replaced); default: <path>/Folds.csv,
    #: else <path>/dsfold<fold>.txt, else a stratified patient split
    folds_file: str | None = None
    val_fraction: float = 0.15  #: of the training patients, for model selection
    #: validation patients drawn per class (at least this many, stratified by class)
    min_val_patients_per_class: int = 2
    #: too few patients for that minimum: "error" refuses the run, "warn" goes on
    small_validation: str = field(default="error", metadata={"choices": ("error", "warn")})
    test_fraction: float = 0.3  #: used only without a fold file
    image_size: list[int] = field(default_factory=lambda: [224, 224])
    num_workers: int = 2
    skip_bad_images: bool = True  #: leave unreadable files out, list them in the report
    #: input normalisation; empty: the backbone's own data config (timm pretrained_cfg),
    #: resolved when the run starts and written to the run's config.toml
    mean: list[float] | None = None
    std: list[float] | None = None
    interpolation: str | None = field(default=None, metadata={"choices": INTERPOLATIONS})
    #: decoded-image cache: every image once as uint8 at the training size plus the crop
    #: margin, memory-mapped from a file in this directory (built on first use, rebuilt
    #: when the files change); empty: decode every image each time
    cache_dir: str | None = None
    #: "worker": the loader's workers augment; "device" (needs cache_dir): they send the
    #: drawn augmentation, and whole batches are read from the cache and augmented on the
    #: model's device
    augment_on: str = field(default="worker", metadata={"choices": ("worker", "device")})
    #: with model.freeze_backbone: fixed views (flips, rotations) of each training image
    #: whose features are cached; an epoch draws one per image (1: the images as they are)
    feature_views: int = 1
    #: larger images (width x height, from the file's header) are unreadable: refused
    #: before decoding, skipped and listed like any unreadable image
    max_image_pixels: int = 89_478_485


@dataclass
class SamplerConfig:
    kind: str = field(default="multiscale", metadata={"choices": ("multiscale", "frequency")})
    classes_per_batch: int = 2
    groups_per_class: int = 4
    images_per_scale: int = 1
    batch_size: int = 32  #: for kind = "frequency"


@dataclass
class ModelConfig:
    backbone: str = "resnet18"
    pretrained: bool = False
    weights: str | None = None
    embedding_dim: int = 128
    normalize: bool = True
    #: train the embedding and classifier heads only: the backbone keeps its weights and
    #: normalisation statistics (eval mode) and runs without autograd
    freeze_backbone: bool = False
    #: more arguments of timm.create_model, e.g. {init_values = 1e-5} (UNI); a string
    #: for a *_layer argument names a class of timm.layers or torch.nn; empty: the
    #: model card's for the foundation models of models.FOUNDATION_MODELS, else none
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    #: "backbone": its pooled output; "cls_mean": a vision transformer's class token
    #: next to the mean of its patch tokens (Virchow's tile embedding); empty: the
    #: foundation model's (models.FOUNDATION_MODELS), else "backbone"
    pool: str | None = field(default=None, metadata={"choices": POOLS})


@dataclass
class LossConfig:
    metric: str = field(default="triplet", metadata={"choices": tuple(METRIC_LOSSES)})
    triplets: str = field(default="all", metadata={"choices": FUSED_TRIPLETS})
    cross_scale: bool = True
    margin: float = 1.0
    #: the metric loss's distance; empty: its own (triplet: "squared_l2", SMSE's form;
    #: pair: "l2", the only one it is defined on)
    distance: str | None = field(default=None, metadata={"choices": DISTANCES})
    classification: str = field(default="rfl", metadata={"choices": tuple(CLASSIFICATION_LOSSES)})
    alpha: float = 2.0
    gamma: float = 1.5
    beta_from_counts: bool = True
    metric_weight: float = 1.0
    classification_weight: float = 1.0


@dataclass
class OptimConfig:
    name: str = field(default="adam", metadata={"choices": tuple(OPTIMIZERS)})
    lr: float = 1e-3
    weight_decay: float = 0.0
    schedule: str = field(default="step", metadata={"choices": tuple(SCHEDULES)})
    step_size: int = 8
    step_gamma: float = 0.1
    epochs: int = 40
    patience: int = 10  #: early stopping on validation patient accuracy (0: off)


@dataclass
class RunConfig:
    seed: int = 0
    device: str = field(default="auto", metadata={"choices": ("auto", "cpu", "cuda")})
    amp: bool = True
    #: on one GPU, replay the step's losses from CUDA graphs (`step.LossGraphs`)
    cuda_graphs: bool = True
    deterministic: bool = False
    #: seconds a rank waits in a collective (torchrun) before it stops with an error
    dist_timeout: float = 300.0


@dataclass
class EvalConfig:
    k: int = 5
    exclude: str = field(default="group", metadata={"choices": EXCLUDE})
    distance: str = field(default="cosine", metadata={"choices": DISTANCES})
    #: model selection on validation patient accuracy of kNN or of the classifier head
    select: str = field(default="knn", metadata={"choices": ("knn", "head")})


@dataclass
class Config:
    """A recipe's whole configuration: one dataclass per TOML section.

    Attributes:
        data: ``[data]``: dataset, task, magnifications, split, image size, normalisation.
        sampler: ``[sampler]``: multi-scale or frequency batches and their shape.
        model: ``[model]``: backbone, pretrained weights, embedding size.
        loss: ``[loss]``: metric loss, selection, margin, classification loss, weights.
        optim: ``[optim]``: optimiser, learning rate, schedule, epochs, early stopping.
        run: ``[run]``: seed, device, mixed precision, determinism.
        eval: ``[eval]``: kNN k, exclusion, distance, and the predictor selected on.

    Examples:
        >>> cfg = Config()  # every default; load_config() validates
        >>> cfg.loss.metric, cfg.sampler.kind, cfg.optim.lr
        ('triplet', 'multiscale', 0.001)
        >>> cfg.to_dict()["eval"]["exclude"]
        'group'
    """

    data: DataConfig = field(default_factory=DataConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)


MANIFEST_COLUMNS = COLUMNS + OPTIONAL_COLUMNS
#: integer keys with a lower bound, and number keys that must be positive
_AT_LEAST = {
    "data.fold": 1,
    "data.num_workers": 0,
    "sampler.classes_per_batch": 1,
    "sampler.groups_per_class": 1,
    "sampler.images_per_scale": 1,
    "sampler.batch_size": 1,
    "model.embedding_dim": 1,
    "optim.step_size": 1,
    "optim.epochs": 1,
    "optim.patience": 0,
    "eval.k": 1,
    "data.min_val_patients_per_class": 0,
    "data.max_image_pixels": 1,
    "data.feature_views": 1,
}
_POSITIVE = {"optim.lr", "loss.alpha", "optim.step_gamma", "run.dist_timeout"}


def _check_value(key: str, value: Any, hint: Any, meta: dict) -> Any:
    origin, args = get_origin(hint), get_args(hint)
    if value is None:
        if type(None) in args:
            return None
        raise RecipeError(f"{key} must not be empty")
    if args and type(None) in args:  # Optional[X]
        hint = next(a for a in args if a is not type(None))
        origin, args = get_origin(hint), get_args(hint)
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{key} must be a list, got {value!r}")
        return [_check_value(f"{key}[{i}]", v, args[0], {}) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{key} must be a table, got {value!r}")
        return {k: _check_value(f"{key}.{k}", v, args[1], {}) for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{key} must be true or false, got {value!r}")
    elif hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{key} must be an integer, got {value!r}")
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise RecipeError(f"{key} must be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise RecipeError(f"{key} must be a finite number, got {value!r}")
    elif hint is str and not isinstance(value, str):
        raise RecipeError(f"{key} must be a string, got {value!r}")
    if "choices" in meta and value not in meta["choices"]:
        raise RecipeError(f"{key} must be one of {list(meta['choices'])}, got {value!r}")
    if key in _AT_LEAST and value < _AT_LEAST[key]:
        raise RecipeError(f"{key} must be at least {_AT_LEAST[key]}, got {value!r}")
    if key in _POSITIVE and value <= 0:
        raise RecipeError(f"{key} must be positive, got {value!r}")
    return value


def _build(cls, values: dict, prefix: str):
    hints = get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    unknown = set(values) - set(known)
    if unknown:
        raise RecipeError(f"unknown key {prefix}{sorted(unknown)[0]} (known: {sorted(known)})")
    kwargs = {
        name: _check_value(f"{prefix}{name}", values[name], hints[name], dict(known[name].metadata))
        for name in values
    }
    return cls(**kwargs)


def _validate(cfg: Config) -> None:
    mags = cfg.data.magnifications
    if len(set(mags)) != len(mags) or min(mags, default=1) < 0:
        raise RecipeError(f"data.magnifications must be distinct non-negative integers: {mags}")
    for name in ("classes", "positive_classes"):
        values = getattr(cfg.data, name)
        if len(set(values)) != len(values) or "" in values:
            raise RecipeError(f"data.{name} must be distinct non-empty names: {values}")
    for key in cfg.data.columns:
        if key not in MANIFEST_COLUMNS:
            raise RecipeError(
                f"data.columns.{key}: not a manifest column (ours: {', '.join(MANIFEST_COLUMNS)})"
            )
    if len(cfg.data.image_size) != 2 or min(cfg.data.image_size) < 16:
        raise RecipeError(f"data.image_size must be [height, width], >= 16: {cfg.data.image_size}")
    for key in ("val_fraction", "test_fraction"):
        if not 0 <= getattr(cfg.data, key) < 1:
            raise RecipeError(f"data.{key} must be in [0, 1)")
    for key in ("mean", "std"):
        v = getattr(cfg.data, key)
        if v is not None and len(v) != 3:
            raise RecipeError(f"data.{key} must hold 3 values (R, G, B), got {v}")
    if (cfg.data.mean is None) != (cfg.data.std is None):
        raise RecipeError("data.mean and data.std must be given together")
    if cfg.data.augment_on == "device" and cfg.data.cache_dir is None:
        raise RecipeError('data.augment_on = "device" reads its images from data.cache_dir: set it')
    if cfg.data.feature_views > 8:
        raise RecipeError(f"data.feature_views must be at most 8, got {cfg.data.feature_views}")
    if cfg.data.std is not None and min(cfg.data.std) <= 0:
        raise RecipeError(f"data.std must be positive, got {cfg.data.std}")
    usable = METRIC_DISTANCES[cfg.loss.metric]
    if cfg.loss.distance is not None and cfg.loss.distance not in usable:
        raise RecipeError(
            f"loss.distance = {cfg.loss.distance!r} has no {cfg.loss.metric} loss: "
            f"use one of {list(usable)} or leave it empty"
        )
    if cfg.data.path is None and not cfg.data.synthetic:
        raise RecipeError(
            "data.path is empty: give a BreakHis directory or a manifest, or set data.synthetic"
        )


#: keys of the previous release -> (new key, new value of an old value, the old type)
_RENAMED = {
    ("loss", "squared"): ("distance", lambda v: "squared_l2" if v else "l2", bool),
    ("eval", "metric"): ("distance", lambda v: v, str),
}


def upgrade_keys(raw: dict, where: str | None) -> dict:
    """``raw`` with the previous release's keys under their new names. Each old key
    warns with a DeprecationWarning: attributed to the TOML file ``where``, or to the
    caller of `load_config` for ``where="overrides"``; ``None`` is silent. An old and a
    new key that disagree are an error."""
    for (section, old), (new, convert, kind) in _RENAMED.items():
        values = raw.get(section)
        if not isinstance(values, dict) or old not in values:
            continue
        value = values.pop(old)
        if not isinstance(value, kind):
            raise RecipeError(f"{section}.{old} must be a {kind.__name__}, got {value!r}")
        value = convert(value)
        if values.get(new, value) != value:
            raise RecipeError(
                f"{section}.{old} and {section}.{new} disagree ({value!r} against "
                f"{values[new]!r}): give {section}.{new} alone"
            )
        values[new] = value
        if where is not None:
            message = (
                f"config key {section}.{old} is deprecated and will be removed in the next "
                f"release; use {section}.{new} = {toml_value(value)}"
            )
            if where == "overrides":  # 1: here, 2: load_config, 3: its caller
                warnings.warn(message, DeprecationWarning, stacklevel=3)
            else:
                warnings.warn_explicit(message, DeprecationWarning, where, 0)
    return raw


def load_config(source: str | Path | None = None, overrides: dict | None = None) -> Config:
    """A validated `Config` from a preset name, a TOML file, or defaults.

    ``overrides`` are nested dicts applied on top (``{"optim": {"epochs": 2}}``).

    Args:
        source: a preset name (``PRESETS``), a TOML file, or None for the defaults.
        overrides: nested dicts applied on top (``{"optim": {"epochs": 2}}``).

    Examples:
        >>> cfg = load_config("smse-pair", {"optim": {"epochs": 3}, "data": {"synthetic": True}})
        >>> cfg.loss.metric, cfg.optim.epochs
        ('pair', 3)
        >>> load_config("smse-pair", {"loss": {"margn": 1.0}, "data": {"synthetic": True}})
        ... # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        smse_metric.recipes.histopathology.errors.RecipeError: unknown key loss.margn (known: [...])
    """
    raw: dict = {}
    if source is not None:
        path = preset_path(str(source)) if str(source) in PRESETS else Path(source)
        if not path.is_file():
            raise RecipeError(f"config {source!r} is neither a preset {list(PRESETS)} nor a file")
        with open(path, "rb") as f:
            try:
                raw = tomllib.load(f)
            except tomllib.TOMLDecodeError as e:
                raise RecipeError(f"{path} is not valid TOML: {e}") from e
    upgrade_keys(raw, str(path) if source is not None else None)
    for section, values in (overrides or {}).items():
        raw.setdefault(section, {}).update(values)
    upgrade_keys(raw, "overrides")
    sections = [f.name for f in fields(Config)]
    unknown = set(raw) - set(sections)
    if unknown:
        raise RecipeError(f"unknown section [{sorted(unknown)[0]}] (known: {sorted(sections)})")
    parts = {}
    for name in sections:
        values = raw.get(name, {})
        if not isinstance(values, dict):
            raise RecipeError(f"[{name}] must be a table")
        parts[name] = _build(get_type_hints(Config)[name], values, f"{name}.")
    cfg = Config(**parts)
    _validate(cfg)
    return cfg


def preset_path(name: str) -> Path:
    return CONFIG_DIR / f"{name}.toml"


def toml_value(v: Any) -> str:
    """A value as TOML text (``None`` has none: leave its key out).

    Args:
        v: a bool, number, string, or a list or table of those.

    Examples:
        >>> toml_value([224, 224]), toml_value("squared_l2"), toml_value(True)
        ('[224, 224]', '"squared_l2"', 'true')
    """
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        pairs = (f"{toml_value(str(k))} = {toml_value(x)}" for k, x in v.items())
        return "{" + ", ".join(pairs) + "}"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def config_to_toml(cfg: Config) -> str:
    """The resolved config as TOML (``None`` values are left out: they are defaults).

    Args:
        cfg: a validated `Config`.

    Examples:
        >>> cfg = load_config("baseline-ce", {"data": {"synthetic": True}})
        >>> text = config_to_toml(cfg)
        >>> text.splitlines()[0], 'classification = "ce"' in text
        ('[data]', True)
    """
    lines = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in values.items() if v is not None]
        lines.append("")
    return "\n".join(lines)
