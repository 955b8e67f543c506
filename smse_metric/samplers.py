"""MultiScaleBatchSampler: batches of classes x groups (patients) x scales (magnifications).

SMSE feeds images of several magnifications together so that same-class images
at different magnifications can be pulled together. BreakHis has no registered
views across magnifications, so "together" means: the images of one patient at
every magnification arrive in the same batch.

Epoch (all counts are exact and known before iterating):

1. A *visit* of group g takes ``images_per_scale`` images of g at every scale.
   Group g gets ``v_g = max_s ceil(n[g, s] / images_per_scale)`` visits, so every
   one of its images is drawn at least once; cells with fewer images cycle
   through a fresh permutation of theirs (counted as repeats).
2. Per class, visits are dealt in rounds: round r holds, in random order, every
   group with more than r visits left, cut into *slots* of ``groups_per_class``
   distinct groups. A round's last, partial slot is completed with other groups
   of the class (filler visits, counted).
3. Classes are balanced, not drawn by frequency: every class gets the same
   number of slots ``T`` (the largest class's count; smaller classes continue
   with extra rounds, counted as filler). In each of ``T`` class rounds the
   classes are shuffled and cut into batches of ``classes_per_batch``; a partial
   batch is completed with other classes (filler slots).
4. The global batch list is shuffled and dealt to ranks: rank k takes batches
   ``k, k + W, ...``. With ``drop_last`` the remainder of ``len % W`` batches is
   dropped, otherwise the list is padded with its first batches.

Everything is drawn from ``numpy.random.default_rng([seed, epoch])``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from ._checks import check_choice, nonnegative_int, positive_int
from ._sampler_plan import Layout
from .distributed import get_rank, get_world_size

__all__ = ["MultiScaleBatchSampler", "SamplerStats", "ShuffledBatchSampler"]

POLICIES = ("replace", "error")


@dataclass(frozen=True)
class SamplerStats:
    """What one epoch's plan drew. ``repeated_draws = images_drawn - unique_images``.

    Attributes:
        batches: global batches (before the rank split, after dropping or padding).
        batches_per_rank: batches each rank iterates.
        images_drawn: image slots filled, over all ranks.
        unique_images: distinct images among them.
        repeated_draws: ``images_drawn - unique_images``.
        cycled_cells: (group, scale) cells with fewer images than the group's visits need.
        filler_group_visits: group visits added to complete a slot or balance classes.
        substituted_cells: (group, scale) cells with no image, filled from the same class.
        filler_class_slots: class slots added to complete a batch.
        dropped_batches: the ``len % world_size`` batches left out with ``drop_last``.
        padded_batches: batches repeated (without ``drop_last``) so every rank gets as
            many.

    Examples:
        >>> s = MultiScaleBatchSampler([0, 0, 0, 1, 1, 1], groups=[0, 0, 1, 2, 3, 3],
        ...                            scales=[1, 2, 1, 1, 1, 2], classes_per_batch=2,
        ...                            groups_per_class=1, seed=0)
        >>> st = s.stats
        >>> st.batches, st.unique_images, st.images_drawn - st.unique_images == st.repeated_draws
        (2, 6, True)
    """

    batches: int  #: global batches (before the rank split, after drop/pad)
    batches_per_rank: int
    images_drawn: int  #: over all ranks
    unique_images: int
    repeated_draws: int
    cycled_cells: int  #: (group, scale) cells with fewer images than the group's visits need
    filler_group_visits: int  #: group visits added to complete a slot or balance classes
    substituted_cells: int  #: (group, scale) cells with no image, filled from the same class
    filler_class_slots: int  #: class slots added to complete a batch
    dropped_batches: int
    padded_batches: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def _as_array(name: str, values: Any, n: int | None) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty: nothing to sample")
    if arr.dtype.kind not in "iuUSO":
        raise TypeError(f"{name} must hold integers or strings, got dtype {arr.dtype}")
    if n is not None and len(arr) != n:
        raise ValueError(f"{name} has {len(arr)} elements but labels has {n}")
    return arr


def _n(value: np.generic) -> str:
    """A class/group/scale name as the user gave it: 1, 'DC'."""
    return repr(value.item())


def _dist_default(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if world_size is None:
        world_size = get_world_size()
    if rank is None:
        rank = get_rank()
    world_size = positive_int("world_size", world_size)
    if (
        isinstance(rank, bool)
        or not isinstance(rank, int | np.integer)
        or not 0 <= rank < world_size
    ):
        raise ValueError(f"rank must be an integer in [0, {world_size}), got {rank!r}")
    return int(rank), world_size


class _ResumableBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Epochs, positions and checkpoints shared by the batch samplers: a subclass sets
    ``seed``, ``rank``, ``world_size``, ``epoch`` and ``_position`` and defines ``__len__``."""

    seed: int
    world_size: int
    epoch: int
    _position: int

    def __len__(self) -> int:
        raise NotImplementedError  # batches per epoch on this rank: the subclass's

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration yields (as DistributedSampler)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int | np.integer) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative integer, got {epoch!r}")
        if int(epoch) != self.epoch:
            self.epoch, self._position = int(epoch), 0

    def state_dict(self, consumed: int | None = None) -> dict[str, int]:
        """Where this rank is: resume with `load_state_dict` on the same data.

        Args:
            consumed: batches of the current epoch the training loop has used. A
                ``DataLoader`` with workers draws batches ahead of the loop (up to
                ``num_workers * prefetch_factor``), so the sampler's own count of
                batches it handed out runs ahead of what was trained on; pass the
                loop's count to resume exactly where training stopped.
        """
        position = self._position if consumed is None else consumed
        if (
            isinstance(position, bool)
            or not isinstance(position, int | np.integer)
            or not (0 <= position <= len(self))
        ):
            raise ValueError(f"consumed must be an integer in [0, {len(self)}], got {position!r}")
        return {
            "epoch": self.epoch,
            "position": int(position),
            "seed": self.seed,
            "world_size": self.world_size,
            "num_batches": len(self),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a `state_dict` of a sampler over the same data and ranks."""
        mine = {"seed": self.seed, "world_size": self.world_size, "num_batches": len(self)}
        for key, value in mine.items():
            if state.get(key, value if key != "num_batches" else None) != value:
                raise ValueError(
                    f"state_dict was saved with {key}={state.get(key)!r}, this sampler has "
                    f"{value!r}"
                )
        position = state.get("position")
        if not isinstance(position, int) or not 0 <= position <= len(self):
            raise ValueError(f"state_dict position must be in [0, {len(self)}], got {position!r}")
        self.epoch, self._position = int(state["epoch"]), position


class ShuffledBatchSampler(_ResumableBatchSampler):
    """Batches of a uniform shuffle (classes come as often as they occur), the
    frequency-ordered alternative to `MultiScaleBatchSampler`, deterministic per
    ``(seed, epoch)``, sharded by rank and resumable mid-epoch like it.

    Global batch ``i`` is ``perm[i*B*W : (i+1)*B*W]`` and rank ``r`` takes its ``r``-th
    slice of ``B``; the incomplete last global batch is dropped, so every rank steps
    equally.

    Args:
        n: dataset size.
        batch_size: images per rank and batch.
        seed: seed of the shuffle.
        rank: this process's rank (default: torch.distributed's, else 0).
        world_size: ranks sharing each global batch (default: torch.distributed's, else 1).

    Examples:
        >>> s = ShuffledBatchSampler(10, batch_size=2, rank=1, world_size=2)
        >>> len(s), [len(b) for b in s]
        (2, [2, 2])
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        self.n = nonnegative_int("n", n)
        self.batch_size = positive_int("batch_size", batch_size)
        self.seed = nonnegative_int("seed", seed)
        self.rank, self.world_size = _dist_default(rank, world_size)
        self.epoch, self._position = 0, 0
        if len(self) == 0:
            raise ValueError(
                f"{n} images make no full batch of {batch_size} x {self.world_size} ranks"
            )

    def __len__(self) -> int:
        return self.n // (self.batch_size * self.world_size)

    def __iter__(self) -> Iterator[list[int]]:
        perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        b, w = self.batch_size, self.world_size
        while self._position < len(self):
            start = self._position * b * w + self.rank * b
            self._position += 1
            yield perm[start : start + b].tolist()
        self._position = 0


class MultiScaleBatchSampler(_ResumableBatchSampler):
    """Batch sampler of ``classes_per_batch`` classes x ``groups_per_class`` groups x
    every scale x ``images_per_scale`` images.

    Args:
        labels: [N] class of each image (ints or strings; list, numpy or tensor).
        groups: [N] group (patient) of each image. A group id is taken as given:
            the same id under two classes is two different groups.
        scales: [N] magnification of each image; batches hold every scale present.
        classes_per_batch: distinct classes per batch (at most the number of classes).
        groups_per_class: distinct groups of each class per batch.
        images_per_scale: images of each group at each scale.
        seed: base seed; the epoch plan comes from ``default_rng([seed, epoch])``.
        drop_last: with several ranks, drop the ``len % world_size`` trailing
            batches (True) or pad by repeating the first ones (False).
        rank: this process's rank; default ``torch.distributed``'s when initialised, else 0.
        world_size: number of ranks; default ``torch.distributed``'s, else 1.
        small_group_policy: ``"replace"`` fills what is missing (a class with too few
            groups, a group without some scale) by drawing with replacement and counts
            it in `stats`; ``"error"`` raises a ValueError naming it.

    Batch layout: ``[class][group][scale][image]`` flattened, so
    ``batch_size = classes_per_batch * groups_per_class * n_scales * images_per_scale``.

    Examples:
        >>> labels = [0] * 8 + [1] * 8
        >>> groups = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3]
        >>> scales = [40, 40, 100, 100] * 4
        >>> s = MultiScaleBatchSampler(labels, groups, scales, classes_per_batch=2,
        ...                            groups_per_class=2)
        >>> len(s), s.batch_size
        (2, 8)
    """

    def __init__(
        self,
        labels: Sequence[Any] | np.ndarray | torch.Tensor,
        groups: Sequence[Any] | np.ndarray | torch.Tensor,
        scales: Sequence[Any] | np.ndarray | torch.Tensor,
        classes_per_batch: int,
        groups_per_class: int,
        images_per_scale: int = 1,
        seed: int = 0,
        drop_last: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
        small_group_policy: str = "replace",
    ) -> None:
        lab = _as_array("labels", labels, None)
        grp = _as_array("groups", groups, len(lab))
        sc = _as_array("scales", scales, len(lab))
        self.classes_per_batch = positive_int("classes_per_batch", classes_per_batch)
        self.groups_per_class = positive_int("groups_per_class", groups_per_class)
        self.images_per_scale = positive_int("images_per_scale", images_per_scale)
        check_choice("small_group_policy", small_group_policy, POLICIES)
        self.seed = nonnegative_int("seed", seed)
        self.drop_last, self.small_group_policy = bool(drop_last), small_group_policy
        self.rank, self.world_size = _dist_default(rank, world_size)

        self.class_names, cls = np.unique(lab, return_inverse=True)
        self.scale_names, scl = np.unique(sc, return_inverse=True)
        # A group belongs to one class: key groups by (class, group id).
        grp_names, grp_inv = np.unique(grp, return_inverse=True)
        _, first, grp_id = np.unique(
            cls.astype(np.int64) * len(grp_names) + grp_inv, return_index=True, return_inverse=True
        )
        self._group_names = grp[first]
        group_class = cls[first]
        n_classes, n_scales, n_groups = len(self.class_names), len(self.scale_names), len(first)
        if self.classes_per_batch > n_classes:
            raise ValueError(
                f"classes_per_batch={self.classes_per_batch} but labels has only {n_classes} "
                f"classes"
            )
        self.n_classes, self.n_scales, self.n_groups = n_classes, n_scales, n_groups
        self.batch_size = (
            self.classes_per_batch * self.groups_per_class * n_scales * self.images_per_scale
        )

        self._layout = Layout(
            cls,
            scl,
            grp_id,
            group_class,
            n_classes,
            n_scales,
            self.groups_per_class,
            self.images_per_scale,
            self.classes_per_batch,
            self.batch_size,
        )
        self.n_images = len(lab)
        self._check_structure()
        if len(self) == 0:  # a rank with no batch would train 0 steps and say nothing
            n = self._layout.rounds * -(-n_classes // self.classes_per_batch)
            raise ValueError(
                f"an epoch makes {n} batches of {self.batch_size}, fewer than the "
                f"{self.world_size} ranks: each rank would get none (drop_last=True); use "
                "fewer ranks or smaller batches, or drop_last=False to repeat batches"
            )

        self.epoch = 0
        self._position = 0  # batches of this rank already yielded in the current epoch
        self._plan: tuple[int, np.ndarray, SamplerStats] | None = None

    # ------------------------------------------------------------------ structure

    def _check_structure(self) -> None:
        lay = self._layout
        missing_scale = lay.pool_count == 0
        if missing_scale.any():
            c, s = np.argwhere(missing_scale)[0]
            raise ValueError(
                f"class {_n(self.class_names[c])} has no image at scale {_n(self.scale_names[s])}; "
                "every class needs every scale (no policy can fill that)"
            )
        if self.small_group_policy != "error":
            return
        few = np.flatnonzero(lay.class_group_count < self.groups_per_class)
        if len(few):
            c = few[0]
            raise ValueError(
                f"class {_n(self.class_names[c])} has {lay.class_group_count[c]} groups but "
                f"groups_per_class={self.groups_per_class} (small_group_policy='error')"
            )
        empty = np.argwhere(lay.cell_count == 0)
        if len(empty):
            g, s = empty[0]
            raise ValueError(
                f"group {_n(self._group_names[g])} of class "
                f"{_n(self.class_names[lay.group_class[g]])} has no image at scale "
                f"{_n(self.scale_names[s])} (small_group_policy='error')"
            )
        short = np.argwhere((lay.cell_count < self.images_per_scale) & (lay.cell_count > 0))
        if len(short):
            g, s = short[0]
            raise ValueError(
                f"group {_n(self._group_names[g])} has {lay.cell_count[g, s]} images at scale "
                f"{_n(self.scale_names[s])} but images_per_scale={self.images_per_scale} "
                "(small_group_policy='error')"
            )

    def _epoch_plan(self) -> tuple[np.ndarray, SamplerStats]:
        if self._plan is None or self._plan[0] != self.epoch:
            batches, counts = self._layout.plan(
                self.seed, self.epoch, self.world_size, self.drop_last
            )
            self._plan = (self.epoch, batches, SamplerStats(**counts))
        return self._plan[1], self._plan[2]

    # ------------------------------------------------------------------ Sampler API

    def __len__(self) -> int:
        """Batches this rank yields in a full epoch (the same for every rank and epoch)."""
        n = self._layout.rounds * -(-self.n_classes // self.classes_per_batch)
        if self.drop_last:
            return n // self.world_size
        return -(-n // self.world_size)

    def __iter__(self) -> Iterator[list[int]]:
        batches, _ = self._epoch_plan()
        mine = batches[self.rank :: self.world_size]
        while self._position < len(mine):
            batch = mine[self._position]
            self._position += 1
            yield batch.tolist()
        self._position = 0

    @property
    def stats(self) -> SamplerStats:
        """Counts of the current epoch's plan (repeats, fillers, substitutions, drops)."""
        return self._epoch_plan()[1]
