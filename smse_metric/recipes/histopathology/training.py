"""The SMSE recipe on BreakHis-layout data: data splits, training, evaluation.

``train(cfg, out_dir)`` fits the model of a
[`Config`][smse_metric.recipes.histopathology.Config] on the
training patients, selects the epoch on a validation split drawn from the training
patients (never on test), and evaluates the selected checkpoint on the test patients
with kNN over the training embeddings and with the classifier head.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from smse_metric.distributed import get_world_size, is_main_process

from .build import (
    amp_setup,
    build_model,
    device_of,
    make_datasets,
    make_losses,
    make_optimizer,
    num_classes,
    resolve_inputs,
    train_loader,
)
from .config import Config, config_to_toml
from .engine import (
    Interrupt,
    TrainingInterrupted,
    init_distributed,
    load_checkpoint,
    save_checkpoint,
    train_step,
)
from .evaluate import evaluate_run, evaluate_split, unreadable_images
from .rundir import RUN_MARKER
from .splits import data_root, load_splits, split_sizes

__all__ = ["TrainingInterrupted", "train"]


class _Progress:
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


def train(
    cfg: Config,
    out_dir: str | Path,
    root: str | Path | None = None,
    resume: bool = False,
    on_step: Callable[[dict], None] | None = None,
    quiet: bool = False,
) -> dict | None:
    """Train on ``root`` (a BreakHis-layout directory), write ``out_dir``, return metrics.

    Writes ``config.toml``, ``history.jsonl`` (one line per epoch),
    ``checkpoints/{last,best}.pt`` (``last`` after every epoch and on Ctrl-C) and then
    everything `evaluate_run` writes. ``resume=True`` continues from
    ``checkpoints/last.pt`` (mid-epoch after an interruption) to the same result as an
    uninterrupted run. Under ``torchrun`` it trains with DDP; only rank 0 writes and
    returns metrics (other ranks return ``None``).

    Args:
        cfg: the run's validated `Config`.
        out_dir: the run directory to write.
        root: the data directory (default: ``data.path``, or ``out_dir/data`` when synthetic).
        resume: continue from ``out_dir/checkpoints/last.pt``.
        on_step: called after every step with ``{epoch, step, loss}`` (tests, logging).
        quiet: print nothing (no split sizes, no per-epoch lines, no progress bar).

    Raises:
        TrainingInterrupted: after SIGINT / SIGTERM, once ``last.pt`` is written.
        FloatingPointError: on a non-finite loss, naming the step; ``last.pt`` keeps
            the last good epoch.

    Examples:
        Two epochs on the synthetic dataset (tests/test_recipe.py runs this path; skipped
        here because it trains a network):

        >>> from smse_metric.recipes.histopathology import load_config
        >>> cfg = load_config("smse-triplet", {"data": {"synthetic": True}, "optim": {"epochs": 2}})
        >>> metrics = train(cfg, "runs/example")  # doctest: +SKIP
        >>> metrics["test"]["knn"]["pooled"]["patient_accuracy"]  # doctest: +SKIP
        0.8...
    """
    out = Path(out_dir)
    root = data_root(cfg, out) if root is None else Path(root)
    if root.resolve() != (out / "data").resolve():  # config.toml must name the data
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=str(root.resolve())))
    cfg = resolve_inputs(cfg)
    device = device_of(cfg)
    own_group = init_distributed(device.type)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        if cfg.run.deterministic:
            torch.use_deterministic_algorithms(True)
        return _train(cfg, out, root, resume, on_step, quiet, device)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        if own_group:
            dist.destroy_process_group()


def _train(cfg, out, root, resume, on_step, quiet, device):
    main = is_main_process()
    world = get_world_size()
    ckpt_dir = out / "checkpoints"
    torch.manual_seed(cfg.run.seed)
    splits = load_splits(cfg, root)  # inputs validated before anything is written
    ds = make_datasets(cfg, splits)
    say = print if main and not quiet else (lambda *a, **k: None)
    say(f"data: {split_sizes(splits)}", flush=True)
    if main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if not (out / RUN_MARKER).is_file():
            (out / RUN_MARKER).write_text("created by smse-metric\n")
        (out / "config.toml").write_text(config_to_toml(cfg))
    model = build_model(cfg).to(device)
    channels_last = device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    metric_loss, cls_loss = make_losses(cfg, np.bincount(ds["train"].labels,
                                                     minlength=num_classes(cfg)))  # fmt: skip
    cls_loss = cls_loss.to(device)
    optimizer, scheduler = make_optimizer(cfg, model)
    amp_dtype, scaler = amp_setup(cfg, device)
    loader = train_loader(cfg, ds["train"])
    batches = loader.batch_sampler

    progress = {"epoch": 0, "position": 0, "loss_sum": 0.0, "steps": 0, "seen": 0,
                "seconds": 0.0, "best": -math.inf, "best_epoch": -1, "stale": 0,
                "done": False}  # fmt: skip
    history: list[dict] = []  # saved in last.pt: the file is rewritten from it
    if resume:
        state = load_checkpoint(ckpt_dir / "last.pt", device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"].cpu())
        progress.update(state["progress"])
        history = list(state.get("history", []))
        # the sampler resumes itself; checkpoints from before it saved its state give
        # the same position through the loop's own count
        where = {"epoch": progress["epoch"], "position": progress["position"]}
        batches.load_state_dict(state.get("sampler") or {**batches.state_dict(), **where})

    net = model
    if world > 1:
        if device.type == "cuda":
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
        net = DDP(net, device_ids=[device.index] if device.type == "cuda" else None)

    def state_dict() -> dict:
        return {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else {},
            "scaler": scaler.state_dict() if scaler is not None else {},
            "rng": torch.get_rng_state(), "progress": dict(progress), "history": list(history),
            # what the loop used, not what the loader's workers drew ahead
            "sampler": {**batches.state_dict(consumed=progress["position"]),
                        "epoch": progress["epoch"]},
        }  # fmt: skip

    def save_last() -> None:
        # the checkpoint first, then the history written from it: a kill between the
        # two leaves a history that the next --resume rewrites, never a duplicate epoch
        save_checkpoint(ckpt_dir / "last.pt", state_dict())
        _write_history(out / "history.jsonl", history)

    with Interrupt() as interrupt:
        while not progress["done"] and progress["epoch"] < cfg.optim.epochs:
            epoch = progress["epoch"]
            net.train()
            ds["train"].set_epoch(epoch)
            batches.set_epoch(epoch)  # keeps a resumed position within the same epoch
            bar = _Progress(len(batches) - progress["position"], f"epoch {epoch}",
                            main and not quiet)  # fmt: skip
            t0 = time.perf_counter()
            for images, labels, _, scales in loader:
                images, labels, scales = (t.to(device, non_blocking=True)
                                          for t in (images, labels, scales))  # fmt: skip
                if channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                loss = train_step(net, images, labels, scales, optimizer, cls_loss,
                                  metric_loss, cfg.loss.metric_weight,
                                  cfg.loss.classification_weight, amp_dtype, scaler)  # fmt: skip
                # one host sync per step: the loss for the log, and the stop flag agreed
                # by every rank (a Ctrl-C reaches ranks at different steps)
                flags = torch.stack([loss.float(), _flag(interrupt.requested, device)])
                if world > 1:
                    dist.all_reduce(flags)
                    flags[0] /= world
                loss_value, stop = flags.tolist()
                step = progress["position"]
                if not math.isfinite(loss_value):
                    raise FloatingPointError(
                        f"non-finite loss ({loss_value}) at epoch {epoch} step {step}; "
                        f"{ckpt_dir / 'last.pt'} holds the last good epoch"
                    )
                progress["position"] += 1
                progress["loss_sum"] += loss_value
                progress["steps"] += 1
                progress["seen"] += len(images) * world
                bar.update(loss_value, progress["seen"] / max(time.perf_counter() - t0, 1e-9))
                if on_step is not None:
                    on_step({"epoch": epoch, "step": step, "loss": loss_value})
                if stop:
                    progress["seconds"] += time.perf_counter() - t0
                    bar.close()
                    if main:
                        save_last()
                    raise TrainingInterrupted(ckpt_dir / "last.pt", epoch, step)
            bar.close()
            progress["seconds"] += time.perf_counter() - t0
            if scheduler is not None:
                scheduler.step()
            _end_epoch(cfg, model, ds, device, channels_last, progress, history, main)
            if main:
                if progress["best_epoch"] == epoch:  # weights only: optimiser state in last
                    save_checkpoint(ckpt_dir / "best.pt", {"model": model.state_dict(),
                                                           "progress": dict(progress)})  # fmt: skip
                save_last()
                say(_epoch_line(history[-1], cfg, progress), flush=True)
            more = not progress["done"] and progress["epoch"] < cfg.optim.epochs
            if more and _any_rank(interrupt.requested, device):
                raise TrainingInterrupted(ckpt_dir / "last.pt", epoch + 1, 0)
    if not main:
        return None
    return evaluate_run(out, root, device=device, cfg=cfg, model=model,
                        bad_images=unreadable_images(ds))  # fmt: skip


def _flag(value: bool, device: torch.device) -> torch.Tensor:
    return torch.tensor(float(value), device=device)


def _any_rank(value: bool, device: torch.device) -> bool:
    flag = _flag(value, device)
    if get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _end_epoch(cfg, model, ds, device, channels_last, progress, history, main) -> None:
    """Validation on rank 0, its verdict shared; the progress moves to the next epoch."""
    epoch = progress["epoch"]
    verdict = torch.zeros(2)
    if main:
        val = evaluate_split(cfg, model, ds["gallery"], ds["val"], device, channels_last)
        score = val[cfg.eval.select]["pooled"]["patient_accuracy"]
        record = {
            "epoch": epoch, "loss": progress["loss_sum"] / max(progress["steps"], 1),
            "images_per_s": progress["seen"] / max(progress["seconds"], 1e-9),
            "seconds": progress["seconds"],
            "val_score": score,
            "val_patient_accuracy": val["knn"]["pooled"]["patient_accuracy"],
            "val_accuracy": val["knn"]["pooled"]["accuracy"],
            "val_head_patient_accuracy": val["head"]["pooled"]["patient_accuracy"],
            "val_head_accuracy": val["head"]["pooled"]["accuracy"],
        }  # fmt: skip
        history.append(record)
        verdict[0] = float(score > progress["best"])
        verdict[1] = score
    if get_world_size() > 1:
        verdict = verdict.to(device)
        dist.broadcast(verdict, 0)
    improved, score = verdict.tolist()
    if improved:
        progress.update(best=score, best_epoch=epoch, stale=0)
    else:
        progress["stale"] += 1
        if cfg.optim.patience and progress["stale"] >= cfg.optim.patience:
            progress["done"] = True
    progress.update(epoch=epoch + 1, position=0, loss_sum=0.0, steps=0, seen=0, seconds=0.0)


def _write_history(path: Path, history: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in history))
    os.replace(tmp, path)


def _epoch_line(record: dict, cfg: Config, progress: dict) -> str:
    return (f"epoch {record['epoch'] + 1}/{cfg.optim.epochs}  loss {record['loss']:.4f}  "
            f"val {cfg.eval.select} patient acc {record['val_score']:.3f} "
            f"(kNN {record['val_patient_accuracy']:.3f}, head "
            f"{record['val_head_patient_accuracy']:.3f}; best {progress['best']:.3f} at epoch "
            f"{progress['best_epoch'] + 1})  {record['images_per_s']:.0f} img/s  "
            f"{record['seconds']:.1f} s")  # fmt: skip
