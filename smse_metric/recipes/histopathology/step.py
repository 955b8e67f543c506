"""One training step on the global batch: the step's loss (`StepLoss`, eager, or replayed
from CUDA graphs by `LossGraphs`) and the optimiser step (`train_step`).

Kept apart from the trainer (what to train and when to stop) so that the distributed
test can drive `train_step` with any ``(embeddings, logits)`` model.
"""

from __future__ import annotations

import inspect
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from smse_metric.distributed import gather_batch, get_world_size

from .errors import RecipeError

__all__ = ["LossFn", "LossGraphs", "StepLoss", "make_step_loss", "train_step"]


class LossFn(Protocol):
    """``(embeddings, logits, labels, scales) -> scalar loss``: what `train_step` calls.

    Examples:
        >>> from smse_metric import ReinforcedFocalLoss
        >>> loss_fn: LossFn = StepLoss(ReinforcedFocalLoss())
    """

    def __call__(self, emb: Tensor, logits: Tensor, labels: Tensor, scales: Tensor) -> Tensor: ...


class StepLoss:
    """``cls_weight * cls_loss(logits) + metric_weight * metric_loss(global batch)`` in
    float32: the classification loss on this rank's batch, the metric loss on every
    rank's embeddings ([`gather_batch`][smse_metric.distributed.gather_batch]).

    Args:
        cls_loss: classification loss on the logits (e.g. `ReinforcedFocalLoss`).
        metric_loss: metric loss on the gathered embeddings, or None (a plain classifier).
        metric_weight: weight of the metric loss.
        cls_weight: weight of the classification loss.

    Examples:
        >>> from smse_metric import ReinforcedFocalLoss, TripletMarginLoss
        >>> loss = StepLoss(ReinforcedFocalLoss(), TripletMarginLoss(0.2), metric_weight=0.5)
        >>> labels = torch.tensor([0, 0, 1, 1])
        >>> loss(torch.randn(4, 8), torch.randn(4, 2), labels, torch.zeros(4)).shape
        torch.Size([])
    """

    def __init__(
        self,
        cls_loss: nn.Module,
        metric_loss: nn.Module | None = None,
        metric_weight: float = 1.0,
        cls_weight: float = 1.0,
    ) -> None:
        self.cls_loss, self.metric_loss = cls_loss, metric_loss
        self.metric_weight, self.cls_weight = float(metric_weight), float(cls_weight)

    def __call__(self, emb: Tensor, logits: Tensor, labels: Tensor, scales: Tensor) -> Tensor:
        loss = self.cls_weight * self.cls_loss(logits.float(), labels)
        if self.metric_loss is not None:
            g_emb, g_labels, g_scales = gather_batch(emb.float(), labels, scales)
            # scales mean nothing to a loss without a cross-scale term
            cross = getattr(self.metric_loss, "cross_scale", True)
            loss = loss + self.metric_weight * self.metric_loss(
                g_emb, g_labels, scales=g_scales if cross else None
            )
        return loss

    def modules(self) -> tuple[nn.Module, ...]:
        """The loss modules (for checks and ``.to(device)``)."""
        return (self.cls_loss,) if self.metric_loss is None else (self.cls_loss, self.metric_loss)


# the loader's pin-memory thread allocates while the step captures: only this thread's
# calls may be checked against the capture (the option is absent from older torch)
_THREAD_LOCAL = (
    {"capture_error_mode": "thread_local"}
    if "capture_error_mode" in inspect.signature(torch.cuda.make_graphed_callables).parameters
    else {}
)


class LossGraphs:
    """A `StepLoss`, forward and backward, replayed from CUDA graphs: one capture per
    input shape (``torch.cuda.make_graphed_callables``), then each step is a copy of its
    inputs and two replays instead of ~100 small launches, which on a GPU cost more than
    the losses' arithmetic at a batch of 32.

    Single process only (a distributed step all-gathers the embeddings, which is not
    captured); the losses must not sync with the host (the library's do not). The
    graphs' memory stays reserved for their shapes. CPU tensors run the loss eagerly.

    Args:
        loss: the step's loss; its modules have no trainable parameters.

    Examples:
        >>> from smse_metric import ReinforcedFocalLoss
        >>> graphs = LossGraphs(StepLoss(ReinforcedFocalLoss()))
        >>> logits = torch.randn(4, 2, requires_grad=True)
        >>> graphs(torch.randn(4, 8), logits, torch.tensor([0, 1, 0, 1]), torch.zeros(4)).shape
        torch.Size([])
    """

    def __init__(self, loss: StepLoss) -> None:
        if get_world_size() > 1:
            raise RecipeError("LossGraphs runs in a single process: DDP all-gathers in the loss")
        for name, module in zip(("cls_loss", "metric_loss"), loss.modules(), strict=False):
            if any(p.requires_grad for p in module.parameters()):
                # the graphs differentiate with respect to their inputs alone
                raise ValueError(f"{name} has trainable parameters: LossGraphs cannot train them")
        self.loss = loss
        self._graphed: dict[tuple, Any] = {}

    def __call__(self, emb: Tensor, logits: Tensor, labels: Tensor, scales: Tensor) -> Tensor:
        args = (emb, logits, labels, scales)
        if not emb.is_cuda:
            return self.loss(*args)
        key = tuple((tuple(t.shape), t.dtype, t.device, t.requires_grad) for t in args)
        graphed = self._graphed.get(key)
        if graphed is None:  # captured on a copy of this first batch
            for name, module in zip(("cls_loss", "metric_loss"), self.loss.modules(), strict=False):
                for b in module.buffers():
                    if b.device != emb.device:  # a host copy per call cannot be captured
                        raise ValueError(
                            f"{name} must be on {emb.device}, its buffers are on {b.device}: "
                            "move it there first"
                        )
            sample = tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in args)
            graphed = torch.cuda.make_graphed_callables(
                self.loss, sample, allow_unused_input=True, **_THREAD_LOCAL
            )
            self._graphed[key] = graphed
        # the replay's output lives in the graph's memory: the next replay overwrites it
        return graphed(*args).clone()


def make_step_loss(loss: StepLoss, device: torch.device, cuda_graphs: bool) -> LossFn:
    """The step's loss as the trainer calls it: replayed from CUDA graphs where they
    apply (``run.cuda_graphs`` on one CUDA process), else eager.

    Args:
        loss: the eager loss.
        device: where the run trains.
        cuda_graphs: whether the config asks for graphs.

    Examples:
        >>> from smse_metric import ReinforcedFocalLoss
        >>> eager = StepLoss(ReinforcedFocalLoss())
        >>> make_step_loss(eager, torch.device("cpu"), cuda_graphs=True) is eager
        True
    """
    if cuda_graphs and device.type == "cuda" and get_world_size() == 1:
        return LossGraphs(loss)
    return loss


def train_step(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    scales: Tensor,
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFn,
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
        loss_fn: the step's loss, a `StepLoss` or its `LossGraphs`.
        amp_dtype: autocast dtype (``torch.bfloat16`` / ``float16``), or None for none.
        scaler: a ``GradScaler`` for float16, or None.

    Examples:
        >>> from smse_metric import ReinforcedFocalLoss, TripletMarginLoss
        >>> from smse_metric.recipes.histopathology.models import EmbeddingNet
        >>> net = EmbeddingNet(embedding_dim=8)
        >>> opt = torch.optim.Adam(net.parameters())
        >>> x, y, s = torch.randn(8, 3, 32, 32), torch.arange(8) % 2, torch.arange(8) % 4
        >>> loss_fn = StepLoss(ReinforcedFocalLoss(), TripletMarginLoss(0.2))
        >>> loss = train_step(net, x, y, s, opt, loss_fn)
        >>> loss.shape, loss.requires_grad
        (torch.Size([]), False)
    """
    with torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        emb, logits = model(images)
    loss = loss_fn(emb, logits, labels, scales)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return loss.detach()
