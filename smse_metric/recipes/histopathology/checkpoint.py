"""Checkpoints of a run: the `TrainState` beside the weights, written atomically and
read back with ``torch.load(weights_only=True)``."""

from __future__ import annotations

import dataclasses
import math
import os
import pickle
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from .config import Config, toml_value, upgrade_keys
from .errors import RecipeError

__all__ = ["RESUMABLE", "TrainState", "check_resumable", "load_checkpoint", "save_checkpoint"]


@dataclasses.dataclass
class TrainState:
    """Where a training run stands. ``last.pt`` holds it under ``"train_state"`` beside
    the weights, optimiser, schedule, scaler, RNG and sampler states; ``best.pt`` beside
    the selected weights.

    Attributes:
        epoch: the epoch under way (epochs finished so far).
        position: batches of that epoch done.
        loss_sum: summed loss of those batches.
        steps: those batches, counted for the mean loss.
        seen: images of those batches, over all ranks.
        seconds: training time of the epoch so far.
        best: best validation score so far (``-inf`` before the first).
        best_epoch: the epoch that scored it (-1 before the first).
        stale: epochs since it improved (early stopping).
        done: whether early stopping ended the run.
        history: one record per finished epoch (``history.jsonl`` is written from it).

    Examples:
        >>> state = TrainState(epoch=2, best=0.8, best_epoch=1)
        >>> TrainState.from_checkpoint({"train_state": state.to_dict()}) == state
        True
    """

    epoch: int = 0
    position: int = 0
    loss_sum: float = 0.0
    steps: int = 0
    seen: int = 0
    seconds: float = 0.0
    best: float = -math.inf
    best_epoch: int = -1
    stale: int = 0
    done: bool = False
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain numbers and lists, as ``torch.load(weights_only=True)`` reads them."""
        return dataclasses.asdict(self)

    @classmethod
    def from_checkpoint(cls, checkpoint: dict[str, Any]) -> TrainState:
        """The state a checkpoint holds.

        Args:
            checkpoint: a dict read by `load_checkpoint`.
        """
        raw = checkpoint.get("train_state")
        if not isinstance(raw, dict):
            raise RecipeError(
                "the checkpoint has no training state (not a run's last.pt or best.pt)"
            )
        try:
            return cls(**raw)
        except TypeError as e:  # a field this version does not know
            raise RecipeError(f"the checkpoint's training state does not fit: {e}") from e

    def start_epoch(self) -> None:
        """Move to the next epoch: its counters start from zero."""
        self.epoch += 1
        self.position = self.steps = self.seen = 0
        self.loss_sum = self.seconds = 0.0


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic write (temp file + rename); ``state`` holds tensors, numbers, strings and
    containers only, so ``torch.load(weights_only=True)`` reads it.

    Args:
        path: the checkpoint file to write.
        state: tensors, numbers, strings and containers of them.

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> path = Path(tempfile.mkdtemp()) / "last.pt"
        >>> save_checkpoint(path, {"model": torch.nn.Linear(2, 2).state_dict(), "step": 1})
        >>> load_checkpoint(path)["step"]  # torch.load(weights_only=True)
        1
    """
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch reports a full disk as a RuntimeError
        tmp.unlink(missing_ok=True)  # its space is what a retry needs
        free = shutil.disk_usage(path.parent).free if path.parent.is_dir() else 0
        raise OSError(
            f"cannot write {path} ({free / 2**20:.0f} MiB free on its disk): "
            f"{str(e).splitlines()[0][:200]}"
        ) from e


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict:
    """Read a checkpoint with ``torch.load(weights_only=True)`` onto ``device``.

    Args:
        path: the checkpoint file.
        device: where to map its tensors.

    Examples:
        >>> load_checkpoint("no/such/file.pt")
        Traceback (most recent call last):
        ...
        smse_metric.recipes.histopathology.errors.RecipeError: no checkpoint at no/such/file.pt
    """
    if not Path(path).is_file():
        raise RecipeError(f"no checkpoint at {path}")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise RecipeError(
            f"cannot load {path} onto {device}: no CUDA device is available here; use --device cpu"
        )
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refused an object: never load it
        raise RecipeError(
            f"{path} holds objects other than tensors and plain data; "
            "it is not a checkpoint of smse-metric"
        ) from e
    except Exception as e:  # the unpickler's errors on a foreign file vary (IndexError ...)
        raise RecipeError(
            f"{path} is truncated or not a torch checkpoint ({type(e).__name__})"
        ) from e
    if not isinstance(state, dict) or "model" not in state:
        raise RecipeError(f"{path} is not a checkpoint of smse-metric (no model weights)")
    return state


#: keys a resumed run may change: more epochs, and where or how it runs (device, data
#: moved, cache, loader workers, process-group timeout); any other change would make the
#: resumed run another training than the checkpoint's
RESUMABLE = (
    "optim.epochs",
    "run.device",
    "run.dist_timeout",
    "data.path",
    "data.cache_dir",
    "data.num_workers",
)


def _shown(v: Any) -> str:
    return "(unset)" if v is None else toml_value(v)


def check_resumable(saved: str, cfg: Config, where: str | Path = "config.toml") -> None:
    """Refuse to resume when ``cfg`` differs from the checkpoint's config (``saved``, as
    `config_to_toml` wrote it) in a key outside `RESUMABLE`, naming each changed key.

    Args:
        saved: the checkpoint's config as TOML.
        cfg: the config the resumed run would use.
        where: the file named in the message.

    Examples:
        >>> from smse_metric.recipes.histopathology.config import config_to_toml, load_config
        >>> old = load_config("smse-pair", {"data": {"synthetic": True}})
        >>> new = load_config("smse-pair", {"data": {"synthetic": True}, "optim": {"lr": 0.01}})
        >>> try:
        ...     check_resumable(config_to_toml(old), new)
        ... except RecipeError as e:
        ...     print(str(e).split(";")[0])
        config.toml changed since the checkpoint: optim.lr 0.001 -> 0.01
    """
    before = upgrade_keys(tomllib.loads(saved), None)
    changed = []
    for section, values in cfg.to_dict().items():
        for key, value in values.items():
            name = f"{section}.{key}"
            old = before.get(section, {}).get(key)
            if name not in RESUMABLE and old != value:
                changed.append(f"{name} {_shown(old)} -> {_shown(value)}")
    if changed:
        raise RecipeError(
            f"{where} changed since the checkpoint: {', '.join(changed)}; --resume continues "
            "the same training: restore these keys or train a new run (only "
            f"{', '.join(RESUMABLE)} may change)"
        )
