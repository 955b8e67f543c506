"""Internal: the epoch plan of `smse_metric.samplers.MultiScaleBatchSampler` (the
algorithm is described in that module's docstring): the (group, scale) cell structure,
built once from integer codes, and one epoch's global batches drawn from it."""

from __future__ import annotations

import numpy as np


class Layout:
    """Cells, visits and per-class pools of a sampler's data, and the epoch planner.

    Args:
        cls: [N] class code of each image.
        scl: [N] scale code of each image.
        grp_id: [N] group code of each image (groups keyed by (class, group id)).
        group_class: [n_groups] class code of each group.
        n_classes: number of classes.
        n_scales: number of scales.
        groups_per_class: groups of each class per batch.
        images_per_scale: images of each group at each scale.
        classes_per_batch: classes per batch.
        batch_size: images per batch.
    """

    def __init__(
        self,
        cls: np.ndarray,
        scl: np.ndarray,
        grp_id: np.ndarray,
        group_class: np.ndarray,
        n_classes: int,
        n_scales: int,
        groups_per_class: int,
        images_per_scale: int,
        classes_per_batch: int,
        batch_size: int,
    ) -> None:
        n_groups = len(group_class)
        self.n_images, self.n_classes, self.n_scales = len(cls), n_classes, n_scales
        self.groups_per_class, self.images_per_scale = groups_per_class, images_per_scale
        self.classes_per_batch, self.batch_size = classes_per_batch, batch_size
        self.group_class = group_class
        # Cells (group, scale): images sorted by cell; offsets and sizes.
        cell = grp_id * n_scales + scl
        self.cell_order = np.argsort(cell, kind="stable")
        self.cell_of_sorted = cell[self.cell_order]
        counts = np.bincount(cell, minlength=n_groups * n_scales)
        self.cell_count = counts.reshape(n_groups, n_scales)
        self.cell_start = (np.cumsum(counts) - counts).reshape(n_groups, n_scales)
        self.visits = np.ceil(self.cell_count / images_per_scale).astype(np.int64).max(1)
        self.class_groups = np.argsort(group_class, kind="stable")
        per_class = np.bincount(group_class, minlength=n_classes)
        self.class_group_start = np.cumsum(per_class) - per_class
        self.class_group_count = per_class
        # Pools for missing cells: images of a class at a scale.
        cls_scale = cls * n_scales + scl
        self.pool_order = np.argsort(cls_scale, kind="stable")
        pool_counts = np.bincount(cls_scale, minlength=n_classes * n_scales)
        self.pool_count = pool_counts.reshape(n_classes, n_scales)
        self.pool_start = (np.cumsum(pool_counts) - pool_counts).reshape(n_classes, n_scales)
        # Every class gets as many slots as the class needing most (see the module doc).
        self.rounds = max(self.own_slot_count(c) for c in range(n_classes))

    def members(self, c: int) -> np.ndarray:
        start = self.class_group_start[c]
        return self.class_groups[start : start + self.class_group_count[c]]

    def own_slot_count(self, c: int) -> int:
        """Slots of class c's rounds: sum over rounds r of ceil(#groups with > r visits / G)."""
        visits = self.visits[self.members(c)]
        active = np.bincount(visits, minlength=visits.max() + 1)[::-1].cumsum()[::-1][1:]
        return int((-(-active // self.groups_per_class)).sum())

    def class_slots(
        self, rng: np.random.Generator, c: int, n: int
    ) -> tuple[np.ndarray, np.ndarray, int]:
        """``n`` slots [n, G] of (group, visit) for class c: its rounds first (every visit
        of every group), then random slots. Visit -1 means "any visit" (a filler)."""
        G = self.groups_per_class
        members = self.members(c)
        visits = self.visits[members]
        # Entries (group, visit), by round (= visit index), random order within a round.
        entry_group = np.repeat(members, visits)
        entry_visit = np.arange(entry_group.size) - np.repeat(np.cumsum(visits) - visits, visits)
        order = np.lexsort((rng.random(entry_group.size), entry_visit))
        entry_group, entry_visit = entry_group[order], entry_visit[order]
        round_size = np.bincount(entry_visit)
        slots_per_round = -(-round_size // G)
        first_slot = np.cumsum(slots_per_round) - slots_per_round
        pos = np.arange(entry_group.size) - np.repeat(
            np.cumsum(round_size) - round_size, round_size
        )
        own = int(slots_per_round.sum())
        slot_group = np.full((max(n, own), G), -1, dtype=np.int64)
        slot_visit = np.full((max(n, own), G), -1, dtype=np.int64)
        flat = (first_slot[entry_visit] + pos // G) * G + pos % G
        slot_group.reshape(-1)[flat] = entry_group
        slot_visit.reshape(-1)[flat] = entry_visit
        slot_group, slot_visit = slot_group[:n], slot_visit[:n]
        return slot_group, slot_visit, self.fill(rng, members, slot_group)

    def fill(self, rng: np.random.Generator, members: np.ndarray, slot_group: np.ndarray) -> int:
        """Fill -1 entries with groups not yet in their slot (with replacement when the
        class has fewer groups than a slot needs). Returns how many were filled."""
        holes = slot_group < 0
        n_holes = int(holes.sum())
        if n_holes == 0:
            return 0
        G, M = self.groups_per_class, len(members)
        if M < G:
            slot_group[holes] = members[rng.integers(0, M, size=n_holes)]
            return n_holes
        rows = np.flatnonzero(holes.any(1))
        current, open_ = slot_group[rows], holes[rows]
        if M <= 4 * G:
            # Few groups: random priorities with the slot's groups pushed last; the first
            # ``need`` candidates are distinct and new to the slot.
            present = (current[:, :, None] == members[None, None, :]).any(1)
            order = np.argsort(rng.random((len(rows), M)) + 2.0 * present, axis=1)[:, :G]
            take = np.arange(G)[None, :] < open_.sum(1)[:, None]
            current[open_] = members[order][take]
        else:
            # Many groups: draw with replacement and redraw the rows that repeat a group
            # (rare, so a few vectorised rounds; O(rows * G) instead of O(rows * M)).
            draw = members[rng.integers(0, M, size=(len(rows), G))]
            while True:
                trial = np.where(open_, draw, current)
                ordered = np.sort(trial, axis=1)
                repeat = (ordered[:, 1:] == ordered[:, :-1]).any(1)
                if not repeat.any():
                    break
                redo = open_ & repeat[:, None]
                draw[redo] = members[rng.integers(0, M, size=int(redo.sum()))]
            current = trial
        slot_group[rows] = current
        return n_holes

    def batch_classes(self, rng: np.random.Generator, rounds: int) -> tuple[np.ndarray, int]:
        """[rounds * ceil(M / C), C] classes: each round every class once, shuffled; the
        round's last batch completed with other classes."""
        M, C = self.n_classes, self.classes_per_batch
        per_round = -(-M // C)
        table = np.full((rounds, per_round * C), -1, dtype=np.int64)
        table[:, :M] = np.argsort(rng.random((rounds, M)), axis=1)
        n_fill = per_round * C - M
        if n_fill:
            last = table[:, -C:]
            present = (last[:, :, None] == np.arange(M)[None, None, :]).any(1)
            cand = np.argsort(rng.random((rounds, M)) + 2.0 * present, axis=1)[:, :n_fill]
            table[:, M:] = cand
        return table.reshape(-1, C), rounds * n_fill

    def plan(
        self, seed: int, epoch: int, world_size: int, drop_last: bool
    ) -> tuple[np.ndarray, dict[str, int]]:
        """One epoch's global batches [n, batch_size] and the counts of `SamplerStats`."""
        rng = np.random.default_rng([seed, epoch])
        G, S, K = self.groups_per_class, self.n_scales, self.images_per_scale
        batch_classes, filler_slots = self.batch_classes(rng, self.rounds)

        # The k-th appearance of class c (row-major) takes the class's k-th slot.
        flat_cls = batch_classes.reshape(-1)
        order = np.argsort(flat_cls, kind="stable")
        uses = np.bincount(flat_cls, minlength=self.n_classes)
        rank_in_class = np.empty_like(order)
        rank_in_class[order] = np.arange(order.size) - np.repeat(np.cumsum(uses) - uses, uses)
        slot_group = np.empty((flat_cls.size, G), dtype=np.int64)
        slot_visit = np.empty((flat_cls.size, G), dtype=np.int64)
        filler_visits = 0
        for c in range(self.n_classes):
            g, v, filled = self.class_slots(rng, c, int(uses[c]))
            at = order[np.cumsum(uses)[c] - uses[c] : np.cumsum(uses)[c]]
            slot_group[at], slot_visit[at] = g[rank_in_class[at]], v[rank_in_class[at]]
            filler_visits += filled

        # Visit j of group g at scale s takes images j*K .. j*K+K-1 of the cell's
        # permutation, cycling where the cell is short. A filler takes a random visit.
        grp, vis = slot_group.reshape(-1), slot_visit.reshape(-1)
        vis = np.where(vis < 0, (rng.random(vis.size) * self.visits[grp]).astype(np.int64), vis)
        # A random order within each cell: cell ids are integers, so cell + U[0, 1) sorts
        # by cell first and randomly inside it.
        perm = self.cell_order[np.argsort(self.cell_of_sorted + rng.random(self.n_images))]
        g_rep = np.repeat(grp, S * K)
        s_rep = np.tile(np.repeat(np.arange(S), K), grp.size)
        step = np.repeat(vis, S * K) * K + np.tile(np.arange(K), grp.size * S)
        count = self.cell_count[g_rep, s_rep]
        # (empty cells point anywhere in range; they are replaced just below)
        at = np.minimum(
            self.cell_start[g_rep, s_rep] + step % np.maximum(count, 1), self.n_images - 1
        )
        idx = perm[at]
        missing = count == 0
        if missing.any():  # no image of this group at this scale: same class and scale
            c_m, s_m = self.group_class[g_rep[missing]], s_rep[missing]
            pick = (rng.random(c_m.size) * self.pool_count[c_m, s_m]).astype(np.int64)
            idx[missing] = self.pool_order[self.pool_start[c_m, s_m] + pick]
        batches = idx.reshape(-1, self.batch_size)[rng.permutation(len(batch_classes))]

        W, dropped, padded = world_size, 0, 0
        rem = len(batches) % W
        if rem and drop_last:
            dropped, batches = rem, batches[: len(batches) - rem]
        elif rem:
            padded = W - rem
            batches = np.concatenate([batches, batches[np.arange(padded) % len(batches)]])
        unique = int(np.count_nonzero(np.bincount(batches.reshape(-1), minlength=self.n_images)))
        stats = dict(
            batches=len(batches),
            batches_per_rank=len(batches) // W,
            images_drawn=int(batches.size),
            unique_images=unique,
            repeated_draws=int(batches.size) - unique,
            cycled_cells=int(
                ((self.cell_count > 0) & (self.cell_count < self.visits[:, None] * K)).sum()
            ),
            filler_group_visits=filler_visits,
            substituted_cells=int((self.cell_count == 0).sum()),
            filler_class_slots=filler_slots,
            dropped_batches=dropped,
            padded_batches=padded,
        )
        return batches, stats
