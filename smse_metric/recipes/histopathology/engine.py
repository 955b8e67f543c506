"""The training machinery of the recipe: one step on the global batch, batch
samplers that resume mid-epoch, checkpoints, Ctrl-C, DDP set-up and embedding.

Kept apart from the trainer (what to train and when to stop) so that the distributed
test can drive `train_step` with any ``(embeddings, logits)`` model.
"""

from __future__ import annotations

import dataclasses
import datetime
import inspect
import math
import os
import pickle
import shutil
import signal
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from smse_metric.distributed import gather_batch, get_rank, get_world_size

from .errors import RecipeError

__all__ = [
    "LossGraphs",
    "TrainState",
    "TrainingInterrupted",
    "any_rank",
    "embed",
    "load_checkpoint",
    "save_checkpoint",
    "train_step",
]


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


class TrainingInterrupted(Exception):
    """Raised after Ctrl-C (SIGINT / SIGTERM) once the checkpoint is written.

    Args:
        checkpoint: the ``last.pt`` written before stopping.
        epoch: the epoch interrupted, from 0 (the message counts from 1, as the
            per-epoch lines do).
        step: the step of that epoch reached, from 0 (the message counts from 1).

    Examples:
        >>> from pathlib import Path
        >>> e = TrainingInterrupted(Path("runs/a/checkpoints/last.pt"), epoch=3, step=17)
        >>> str(e).split(";")[0]
        'interrupted at epoch 4 step 18'
    """

    def __init__(self, checkpoint: Path, epoch: int, step: int) -> None:
        super().__init__(
            f"interrupted at epoch {epoch + 1} step {step + 1}; checkpoint saved to "
            f"{checkpoint}; continue with --resume"
        )
        self.checkpoint, self.epoch, self.step = checkpoint, epoch, step


class Interrupt:
    """Turns the first SIGINT / SIGTERM into a flag the loop polls between steps; a
    second SIGINT interrupts at once. Installs nothing outside the main thread."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> Interrupt:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _count(name: str, value: Any) -> int:
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class ShuffledBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Frequency-ordered batches (a uniform shuffle, so classes come as often as they
    occur), deterministic per ``(seed, epoch)`` and sharded by rank: global batch ``i``
    is ``perm[i*B*W : (i+1)*B*W]`` and rank ``r`` takes its ``r``-th slice of ``B``.
    The incomplete last global batch is dropped (so every rank steps equally)."""

    def __init__(self, n: int, batch_size: int, seed: int = 0, rank=None, world_size=None):
        self.n, self.seed, self.epoch = int(n), int(seed), 0
        self.batch_size = _count("batch_size", batch_size)
        self._position = 0  # batches of this epoch handed out
        self.world_size = _count(
            "world_size", get_world_size() if world_size is None else world_size
        )
        self.rank = get_rank() if rank is None else rank
        if not _is_int(self.rank) or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be an integer in [0, {self.world_size}), got {rank!r}")
        self.rank = int(self.rank)
        if len(self) == 0:
            raise RecipeError(
                f"{n} images make no full batch of {batch_size} x {self.world_size} ranks"
            )

    def __len__(self) -> int:
        return self.n // (self.batch_size * self.world_size)

    def set_epoch(self, epoch: int) -> None:
        if int(epoch) != self.epoch:
            self.epoch, self._position = int(epoch), 0

    def __iter__(self) -> Iterator[list[int]]:
        perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        b, w = self.batch_size, self.world_size
        while self._position < len(self):
            start = self._position * b * w + self.rank * b
            self._position += 1
            yield perm[start : start + b].tolist()
        self._position = 0

    def state_dict(self, consumed: int | None = None) -> dict[str, int]:
        """``{"epoch", "position", "num_batches"}``; ``consumed`` as in
        `MultiScaleBatchSampler.state_dict`."""
        position = self._position if consumed is None else int(consumed)
        if not 0 <= position <= len(self):
            raise ValueError(f"consumed must be in [0, {len(self)}], got {position}")
        return {"epoch": self.epoch, "position": position, "num_batches": len(self)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("num_batches") != len(self):
            raise RecipeError(
                f"the checkpoint's sampler had {state.get('num_batches')} batches "
                f"per epoch, this data makes {len(self)}"
            )
        self.epoch, self._position = int(state["epoch"]), int(state["position"])


def init_distributed(device_type: str, timeout_s: float = 300.0) -> bool:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA), whose
    collectives give up after ``timeout_s`` (``run.dist_timeout``; torch's default is 30
    minutes of silence); returns whether this call created it (and should destroy it)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(
        "nccl" if device_type == "cuda" else "gloo", timeout=datetime.timedelta(seconds=timeout_s)
    )
    return True


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is set on this or any other rank of the process group (a failure,
    an interrupt): every rank learns it, so none waits in a collective for a rank that
    has left (without a group: the flag itself).

    Args:
        flag: this rank's flag.

    Examples:
        >>> any_rank(False), any_rank(True)  # one process
        (False, True)
    """
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    flag = torch.tensor([float(flag)])
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def step_loss(
    emb: Tensor,
    logits: Tensor,
    labels: Tensor,
    scales: Tensor,
    cls_loss: nn.Module,
    metric_loss: nn.Module | None,
    metric_weight: float = 1.0,
    cls_weight: float = 1.0,
) -> Tensor:
    """``cls_weight * cls_loss(logits) + metric_weight * metric_loss(global batch)``,
    in float32 (the losses of `train_step`)."""
    loss = cls_weight * cls_loss(logits.float(), labels)
    if metric_loss is not None:
        g_emb, g_labels, g_scales = gather_batch(emb.float(), labels, scales)
        cross = getattr(metric_loss, "cross_scale", True)  # scales mean nothing without it
        loss = loss + metric_weight * metric_loss(
            g_emb, g_labels, scales=g_scales if cross else None
        )
    return loss


# the loader's pin-memory thread allocates while the step captures: only this thread's
# calls may be checked against the capture (the option is absent from older torch)
_THREAD_LOCAL = (
    {"capture_error_mode": "thread_local"}
    if "capture_error_mode" in inspect.signature(torch.cuda.make_graphed_callables).parameters
    else {}
)


class LossGraphs:
    """A training step's losses (`step_loss`), forward and backward, replayed from CUDA
    graphs: one capture per input shape (``torch.cuda.make_graphed_callables``), then
    each step is a copy of its inputs and two replays instead of ~100 small launches,
    which on a GPU cost more than the losses' arithmetic at a batch of 32.

    Single process only (a distributed step all-gathers the embeddings, which is not
    captured); the losses must not sync with the host (the library's do not). The
    graphs' memory stays reserved for their shapes. CPU tensors run the losses eagerly.

    Args:
        cls_loss: classification loss on the logits, on the batch's device.
        metric_loss: metric loss on the embeddings, or None; no trainable parameters.
        metric_weight: weight of the metric loss.
        cls_weight: weight of the classification loss.

    Examples:
        >>> from smse_metric import ReinforcedFocalLoss
        >>> graphs = LossGraphs(ReinforcedFocalLoss(), None)
        >>> logits = torch.randn(4, 2, requires_grad=True)
        >>> graphs(torch.randn(4, 8), logits, torch.tensor([0, 1, 0, 1]), torch.zeros(4)).shape
        torch.Size([])
    """

    def __init__(
        self,
        cls_loss: nn.Module,
        metric_loss: nn.Module | None,
        metric_weight: float = 1.0,
        cls_weight: float = 1.0,
    ) -> None:
        if get_world_size() > 1:
            raise RecipeError("LossGraphs runs in a single process: DDP all-gathers in the loss")
        for name, loss in (("cls_loss", cls_loss), ("metric_loss", metric_loss)):
            if loss is not None and any(p.requires_grad for p in loss.parameters()):
                # the graphs differentiate with respect to their inputs alone
                raise ValueError(f"{name} has trainable parameters: LossGraphs cannot train them")
        self.losses = (cls_loss, metric_loss, metric_weight, cls_weight)
        self._graphed: dict[tuple, Any] = {}

    def _eager(self, emb: Tensor, logits: Tensor, labels: Tensor, scales: Tensor) -> Tensor:
        return step_loss(emb, logits, labels, scales, *self.losses)

    def __call__(self, emb: Tensor, logits: Tensor, labels: Tensor, scales: Tensor) -> Tensor:
        args = (emb, logits, labels, scales)
        if not emb.is_cuda:
            return self._eager(*args)
        key = tuple((tuple(t.shape), t.dtype, t.device, t.requires_grad) for t in args)
        graphed = self._graphed.get(key)
        if graphed is None:  # captured on a copy of this first batch
            for name, loss in zip(("cls_loss", "metric_loss"), self.losses[:2], strict=True):
                for b in () if loss is None else loss.buffers():
                    if b.device != emb.device:  # a host copy per call cannot be captured
                        raise ValueError(
                            f"{name} must be on {emb.device}, its buffers are "
                            f"on {b.device}: move it there first"
                        )
            sample = tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in args)
            graphed = torch.cuda.make_graphed_callables(
                self._eager, sample, allow_unused_input=True, **_THREAD_LOCAL
            )
            self._graphed[key] = graphed
        # the replay's output lives in the graph's memory: the next replay overwrites it
        return graphed(*args).clone()


def train_step(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    scales: Tensor,
    optimizer: torch.optim.Optimizer,
    cls_loss: nn.Module | LossGraphs,
    metric_loss: nn.Module | None = None,
    metric_weight: float = 1.0,
    cls_weight: float = 1.0,
    amp_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> Tensor:
    """One optimiser step; returns the loss (detached, on the device, no host sync).

    The classification loss is the mean over this rank's batch (DDP averages its
    gradient over ranks); the metric loss sees the global batch through
    [`gather_batch`][smse_metric.distributed.gather_batch], so every rank mines over every
    rank's embeddings and the summed gradient is that of the global loss.

    Args:
        model: a network returning ``(embeddings, logits)`` (DDP-wrapped or not).
        images: [B, 3, H, W] this rank's batch.
        labels: [B] class labels.
        scales: [B] magnification ids.
        optimizer: the optimiser to step.
        cls_loss: classification loss on the logits (e.g. `ReinforcedFocalLoss`), or a
            `LossGraphs` that holds both losses and their weights (then
            ``metric_loss`` must be None and the weights are its own).
        metric_loss: metric loss on the gathered embeddings, or None.
        metric_weight: weight of the metric loss.
        cls_weight: weight of the classification loss.
        amp_dtype: autocast dtype (``torch.bfloat16`` / ``float16``), or None for none.
        scaler: a ``GradScaler`` for float16, or None.

    Examples:
        >>> from smse_metric import ReinforcedFocalLoss, TripletMarginLoss
        >>> from smse_metric.recipes.histopathology.models import EmbeddingNet
        >>> net = EmbeddingNet(embedding_dim=8)
        >>> opt = torch.optim.Adam(net.parameters())
        >>> x, y, s = torch.randn(8, 3, 32, 32), torch.arange(8) % 2, torch.arange(8) % 4
        >>> loss = train_step(net, x, y, s, opt, ReinforcedFocalLoss(), TripletMarginLoss(0.2))
        >>> loss.shape, loss.requires_grad
        (torch.Size([]), False)
    """
    with torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        emb, logits = model(images)
    if isinstance(cls_loss, LossGraphs):
        if metric_loss is not None:
            raise ValueError("metric_loss must be None with LossGraphs (it holds the losses)")
        loss = cls_loss(emb, logits, labels, scales)
    else:
        loss = step_loss(
            emb, logits, labels, scales, cls_loss, metric_loss, metric_weight, cls_weight
        )
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return loss.detach()


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
        >>> save_checkpoint(path, {"model": nn.Linear(2, 2).state_dict(), "step": 1})
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


@torch.no_grad()
def embed(
    model: nn.Module, loader: Iterable, device: torch.device, channels_last: bool = False
) -> tuple[Tensor, Tensor]:
    """Embeddings [N, D] (float32, CPU) and head predictions [N] of a loader, in order.

    Args:
        model: a network returning ``(embeddings, logits)``.
        loader: batches whose first item is the images.
        device: where to run the network.
        channels_last: feed images in channels-last memory format.

    Examples:
        >>> from smse_metric.recipes.histopathology.models import EmbeddingNet
        >>> data = torch.utils.data.TensorDataset(torch.randn(5, 3, 16, 16))
        >>> emb, pred = embed(EmbeddingNet(embedding_dim=8), torch.utils.data.DataLoader(data),
        ...                   torch.device("cpu"))
        >>> emb.shape, pred.shape
        (torch.Size([5, 8]), torch.Size([5]))
    """
    model.eval()
    embs, preds = [], []
    for images, *_ in loader:
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        emb, logits = model(images)
        embs.append(emb.float().cpu())
        preds.append(logits.argmax(1).cpu())
    if not embs:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    return torch.cat(embs), torch.cat(preds)
