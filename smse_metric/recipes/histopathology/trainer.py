"""The training loop: a `Trainer` steps the objects `build` made, keeps a `TrainState`,
checkpoints it, validates each epoch and stops early or on Ctrl-C."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel as DDP

from smse_metric.distributed import any_rank, get_world_size, is_main_process

from .build import Built
from .checkpoint import TrainState, check_resumable, load_checkpoint, save_checkpoint
from .config import Config, config_to_toml
from .data.dataset import split_records
from .errors import RecipeError
from .evaluate import evaluate_split
from .interrupt import Interrupt, TrainingInterrupted
from .results import SplitMetrics
from .rundir import RunDir
from .step import train_step

__all__ = ["Trainer"]


class Trainer:
    """Trains a built run and checkpoints it to ``out/checkpoints``.

    Args:
        cfg: the run's validated `Config`.
        built: its objects, from `build`.
        run: the run directory.
        on_step: called after every step with ``{epoch, step, loss}``.
        quiet: print nothing.

    Examples:
        What `train` does (tests/recipes/histopathology/test_training.py runs it; skipped here: it
        trains a network):

        >>> trainer = Trainer(cfg, built, RunDir("runs/a"))  # doctest: +SKIP
        >>> trainer.resume()  # doctest: +SKIP
        >>> trainer.fit().best_epoch  # doctest: +SKIP
        3
    """

    def __init__(
        self,
        cfg: Config,
        built: Built,
        run: RunDir,
        on_step: Callable[[dict], None] | None = None,
        quiet: bool = False,
    ) -> None:
        self.cfg, self.built, self.run, self.on_step = cfg, built, run, on_step
        self.state = TrainState()
        self.main, self.world = is_main_process(), get_world_size()
        self.verbose = self.main and not quiet
        self.last = run.last
        self.net = built.model
        if self.world > 1:
            if built.device.type == "cuda":
                self.net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.net)
            ids = [built.device.index] if built.device.type == "cuda" else None
            self.net = DDP(self.net, device_ids=ids)

    def checkpoint(self) -> dict:
        """What ``last.pt`` holds: weights, optimiser, schedule, scaler, RNG, the
        sampler's position and the `TrainState`."""
        b = self.built
        return {
            "model": b.model.state_dict(),
            "optimizer": b.optimizer.state_dict(),
            "scheduler": b.scheduler.state_dict() if b.scheduler is not None else {},
            "scaler": b.scaler.state_dict() if b.scaler is not None else {},
            "rng": torch.get_rng_state(),
            # what the loop used, not what the loader's workers drew ahead
            "sampler": {
                **b.loader.batch_sampler.state_dict(consumed=self.state.position),
                "epoch": self.state.epoch,
            },
            "train_state": self.state.to_dict(),
            "config": config_to_toml(self.cfg),  # what --resume must continue
        }

    def resume(self) -> None:
        """Continue from ``last.pt``: the same result as a run never interrupted."""
        b = self.built
        ckpt = load_checkpoint(self.last, b.device)
        if "config" in ckpt:
            check_resumable(ckpt["config"], self.cfg, self.run.config)
        self.state = TrainState.from_checkpoint(ckpt)
        b.model.load_state_dict(ckpt["model"])
        b.optimizer.load_state_dict(ckpt["optimizer"])
        if b.scheduler is not None:
            b.scheduler.load_state_dict(ckpt["scheduler"])
        if b.scaler is not None and ckpt.get("scaler"):
            b.scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng"].cpu())
        try:
            b.loader.batch_sampler.load_state_dict(ckpt["sampler"])
        except ValueError as e:  # the data or the ranks changed since the checkpoint
            raise RecipeError(f"{self.last} does not fit this run's sampler: {e}") from e

    def fit(self) -> TrainState:
        """Train to the last epoch or an early stop.

        Raises:
            TrainingInterrupted: after SIGINT / SIGTERM, once ``last.pt`` is written.
            FloatingPointError: on a non-finite loss; ``last.pt`` keeps the last good epoch.
        """
        with Interrupt() as interrupt:
            while self._more():
                self._epoch(interrupt)
                self._end_epoch()
                if self._more() and any_rank(interrupt.requested):
                    raise TrainingInterrupted(self.last, self.state.epoch, 0)
        return self.state

    def _more(self) -> bool:
        return not self.state.done and self.state.epoch < self.cfg.optim.epochs

    def _epoch(self, interrupt: Interrupt) -> None:
        b, st = self.built, self.state
        self.net.train()
        b.datasets.train.set_epoch(st.epoch)
        b.loader.batch_sampler.set_epoch(st.epoch)  # keeps a resumed position
        bar = _Bar(len(b.loader.batch_sampler) - st.position, f"epoch {st.epoch + 1}", self.verbose)
        t0 = time.perf_counter()
        on_device = b.datasets.train.on_device
        for batch in b.loader:
            images, labels, scales = self._inputs(batch, on_device)
            loss, stop = self._step(images, labels, scales, interrupt)
            step = st.position
            if not math.isfinite(loss):
                kept = (
                    f"{self.last} holds the last good epoch"
                    if self.last.is_file()
                    else "no epoch finished, so there is no checkpoint"
                )
                raise FloatingPointError(
                    f"non-finite loss ({loss}) at epoch {st.epoch + 1} step {step + 1}; {kept}"
                )
            st.position, st.loss_sum, st.steps = step + 1, st.loss_sum + loss, st.steps + 1
            st.seen += len(images) * self.world
            bar.update(loss, st.seen / max(time.perf_counter() - t0, 1e-9))
            if self.on_step is not None:
                self.on_step({"epoch": st.epoch, "step": step, "loss": loss})
            if stop:
                st.seconds += time.perf_counter() - t0
                bar.close()
                if self.main:
                    self._save_last()
                raise TrainingInterrupted(self.last, st.epoch, step)
        bar.close()
        st.seconds += time.perf_counter() - t0

    def _inputs(self, batch, on_device: bool) -> tuple[Tensor, Tensor, Tensor]:
        """A loader batch on the device: (images, labels, scales); with device
        augmentation the batch holds rows and records, and the images are read from the
        cache and augmented there."""
        dev = self.built.device
        if not on_device:
            images, labels, _, scales = batch
            return tuple(t.to(dev, non_blocking=True) for t in (images, labels, scales))
        _, aug, labels, _, scales = split_records(batch.to(dev, non_blocking=True))
        rows = batch[:, 0].long()  # on the host, where the cache is read
        return self.built.datasets.train.device_batch(rows, aug, dev), labels, scales

    def _step(self, images, labels, scales, interrupt: Interrupt) -> tuple[float, bool]:
        b = self.built
        if b.channels_last and images.ndim == 4:  # not cached features [B, F]
            images = images.contiguous(memory_format=torch.channels_last)
        loss = train_step(
            self.net, images, labels, scales, b.optimizer, b.loss_fn, b.amp_dtype, b.scaler
        )
        # one host sync per step: the loss for the log, and the stop flag agreed by
        # every rank (a Ctrl-C reaches ranks at different steps)
        flags = torch.stack(
            [loss.float(), torch.tensor(float(interrupt.requested), device=b.device)]
        )
        if self.world > 1:
            dist.all_reduce(flags)
            flags[0] /= self.world
        loss_value, stop = flags.tolist()
        return loss_value, bool(stop)

    def _end_epoch(self) -> None:
        """Validation on every rank (each embeds its share), rank 0's verdict shared;
        best.pt, last.pt, the next epoch."""
        b, st, cfg = self.built, self.state, self.cfg
        if b.scheduler is not None:
            b.scheduler.step()
        verdict = torch.zeros(2, dtype=torch.float64)  # the score reaches metrics.json
        if self.world > 1:  # rank 0's batch-norm statistics (the weights best.pt keeps),
            for buffer in b.model.buffers():  # as DDP's next forward would send them
                dist.broadcast(buffer, 0)
        val = evaluate_split(
            cfg, b.model, b.datasets.gallery, b.datasets.val, b.device, b.channels_last
        )
        if self.main:
            record = _epoch_record(st, val, cfg.eval.select)
            st.history.append(record)
            verdict[0], verdict[1] = float(record["val_score"] > st.best), record["val_score"]
        if self.world > 1:
            verdict = verdict.to(b.device)
            dist.broadcast(verdict, 0)
        improved, score = verdict.tolist()
        if improved:
            st.best, st.best_epoch, st.stale = score, st.epoch, 0
        else:
            st.stale += 1
            st.done = bool(cfg.optim.patience and st.stale >= cfg.optim.patience)
        finished = st.epoch
        st.start_epoch()
        if self.main:
            if st.best_epoch == finished:  # weights only: the optimiser state is in last.pt
                best = {"model": b.model.state_dict(), "train_state": st.to_dict()}
                save_checkpoint(self.run.best, best)
            self._save_last()
            if self.verbose:
                print(_epoch_line(st.history[-1], cfg, st), flush=True)

    def _save_last(self) -> None:
        # the checkpoint first, then the history written from it: a kill between the two
        # leaves a history that the next --resume rewrites, never a duplicate epoch
        save_checkpoint(self.last, self.checkpoint())
        _write_history(self.run.history, self.state.history)


class _Bar:
    """A tqdm bar on a terminal (rank 0), nothing elsewhere."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)

    def update(self, loss: float, rate: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{rate:.0f}", refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _epoch_record(st: TrainState, val: SplitMetrics, select: str) -> dict:
    knn, head = val.knn.pooled, val.head.pooled
    return {
        "epoch": st.epoch,
        "loss": st.loss_sum / max(st.steps, 1),
        "images_per_s": st.seen / max(st.seconds, 1e-9),
        "seconds": st.seconds,
        "val_score": val.predictor(select).pooled.patient_accuracy,
        "val_patient_accuracy": knn.patient_accuracy,
        "val_accuracy": knn.accuracy,
        "val_head_patient_accuracy": head.patient_accuracy,
        "val_head_accuracy": head.accuracy,
    }


def _write_history(path: Path, history: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in history))
    os.replace(tmp, path)


def _epoch_line(record: dict, cfg: Config, st: TrainState) -> str:
    return (
        f"epoch {record['epoch'] + 1}/{cfg.optim.epochs}  loss {record['loss']:.4f}  "
        f"val {cfg.eval.select} patient acc {record['val_score']:.3f} "
        f"(kNN {record['val_patient_accuracy']:.3f}, head "
        f"{record['val_head_patient_accuracy']:.3f}; best {st.best:.3f} at epoch "
        f"{st.best_epoch + 1})  {record['images_per_s']:.0f} img/s  "
        f"{record['seconds']:.1f} s"
    )
