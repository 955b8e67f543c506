"""Two gloo processes: all_gather_with_grad and a DDP step equal one process on the global
batch; the recipe's decoded cache is built by rank 0 alone, and its failure stops every
rank."""

import os
import socket
from importlib.util import find_spec

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from smse_metric import TripletMarginLoss
from smse_metric.distributed import gather_batch, get_rank, get_world_size, is_main_process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_batch():
    g = torch.Generator().manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(16, 6, generator=g), dim=1)
    labels = torch.arange(16) % 3
    scales = torch.arange(16) % 4
    return emb, labels, scales


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        emb, labels, scales = _global_batch()
        mine = slice(rank * 8, rank * 8 + 8)
        x = emb[mine].clone().requires_grad_()
        e, y, s = gather_batch(x, labels[mine], scales[mine])
        loss = TripletMarginLoss(0.3, cross_scale=True)(e, y, scales=s)
        loss.backward()
        grad = x.grad / world  # what DDP's averaging applies to parameter gradients
        torch.save(
            {
                "rank": get_rank(),
                "world": get_world_size(),
                "loss": loss.detach(),
                "grad": grad,
                "main": is_main_process(),
            },
            f"{out}/{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_two_process_gather_matches_one_process(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    emb, labels, scales = _global_batch()
    x = emb.clone().requires_grad_()
    loss = TripletMarginLoss(0.3, cross_scale=True)(x, labels, scales=scales)
    loss.backward()
    for rank in range(2):
        got = torch.load(tmp_path / f"{rank}.pt", weights_only=True)
        assert (got["rank"], got["world"], got["main"]) == (rank, 2, rank == 0)
        torch.testing.assert_close(got["loss"], loss.detach())
        torch.testing.assert_close(got["grad"], x.grad[rank * 8 : rank * 8 + 8])


def test_single_process_is_the_identity():
    x = torch.randn(3, 2, requires_grad=True)
    y = torch.arange(3)
    assert gather_batch(x, y) == (x, y)
    assert (get_rank(), get_world_size(), is_main_process()) == (0, 1, True)


class TinyNet(torch.nn.Module):
    """BatchNorm-free, so per-rank and global batches see the same forward pass."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Linear(12, 8)
        self.head = torch.nn.Linear(8, 2)

    def forward(self, x):
        emb = torch.nn.functional.normalize(self.body(x.flatten(1)), dim=1)
        return emb, self.head(emb)


def _images():
    g = torch.Generator().manual_seed(1)
    _, labels, scales = _global_batch()
    return torch.randn(16, 3, 2, 2, generator=g), labels % 2, scales


def _one_step(model, images, labels, scales):
    from smse_metric import ReinforcedFocalLoss
    from smse_metric.recipes.histopathology.step import StepLoss, train_step

    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loss_fn = StepLoss(ReinforcedFocalLoss(), TripletMarginLoss(0.5, cross_scale=True))
    loss = train_step(model, images, labels, scales, opt, loss_fn)
    return loss


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        images, labels, scales = _images()
        mine = slice(rank * 8, rank * 8 + 8)
        model = torch.nn.parallel.DistributedDataParallel(TinyNet())
        _one_step(model, images[mine], labels[mine], scales[mine])
        torch.save(model.module.state_dict(), f"{out}/{rank}.pt")
        # both ranks past DDP's last collective before either tears the group down: a
        # rank destroying it while the other's reducer still talks aborted that rank
        # ("terminate called without an active exception") in one clean-clone CI run
        del model
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(
    find_spec("timm") is None or find_spec("PIL") is None,
    reason="drives the recipe's train_step: needs the [recipe] extra",
)
def test_two_process_ddp_update_matches_one_process_on_the_global_batch(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    model = TinyNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _one_step(model, *_images())
    for rank in range(2):
        got = torch.load(tmp_path / f"{rank}.pt", weights_only=True)
        for name, value in model.state_dict().items():
            assert not torch.equal(value, before[name])  # the step changed it
            torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6)


def _cache_worker(rank: int, world: int, port: int, root: str, out: str) -> None:
    from smse_metric.recipes.histopathology import load_config
    from smse_metric.recipes.histopathology.loaders import make_datasets
    from smse_metric.recipes.histopathology.splits import load_splits

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        data = {"path": root, "image_size": [16, 16], "num_workers": 0, "cache_dir": f"{out}/c"}
        cfg = load_config(overrides={"data": data})
        ds = make_datasets(cfg, load_splits(cfg, root))
        built = [getattr(ds, name).cache.built for name in ("train", "gallery", "val", "test")]
        image = ds.gallery[0][0]
        torch.save({"built": torch.tensor(built), "image": image}, f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(find_spec("PIL") is None, reason="builds the recipe's datasets: [recipe] extra")
def test_under_ddp_rank_zero_alone_decodes_the_cache(tmp_path):
    """Every rank gets the decoded cache, but only rank 0 decodes: the others map its
    files after a barrier (before, each rank decoded every split itself)."""
    from smse_metric.recipes.histopathology.data import make_synthetic_breakhis

    root = make_synthetic_breakhis(
        tmp_path / "data", images_per_magnification=1, image_size=(32, 24)
    )
    mp.spawn(_cache_worker, args=(2, _free_port(), str(root), str(tmp_path)), nprocs=2, join=True)
    zero, one = (torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(2))
    assert zero["built"][0] and not one["built"].any()  # train; gallery may share its file
    assert torch.equal(zero["image"], one["image"])


def _failing_cache_worker(rank: int, world: int, port: int, root: str, out: str) -> None:
    import datetime

    from smse_metric.recipes.histopathology import load_config
    from smse_metric.recipes.histopathology.data.rowfile import RowFile
    from smse_metric.recipes.histopathology.loaders import make_datasets
    from smse_metric.recipes.histopathology.splits import load_splits

    def full_disk(*args, **kwargs):
        raise OSError("No space left on device")

    if rank == 0:  # rank 0 alone decodes, and fails
        RowFile.write = full_disk
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # without the failure passed on, rank 1 would wait out this timeout at the barrier
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=20)
    )
    try:
        data = {"path": root, "image_size": [16, 16], "num_workers": 0, "cache_dir": f"{out}/c"}
        cfg = load_config(overrides={"data": data})
        try:
            make_datasets(cfg, load_splits(cfg, root))
            message = "no error"
        except Exception as e:  # the test reads what each rank raised
            message = f"{type(e).__name__}: {e}"
        with open(f"{out}/{rank}.txt", "w") as f:
            f.write(message)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(find_spec("PIL") is None, reason="builds the recipe's datasets: [recipe] extra")
def test_under_ddp_a_cache_that_rank_zero_cannot_build_stops_every_rank(tmp_path):
    """Rank 0 raises its own error; the other ranks raise one naming it, at once, instead
    of waiting for the process group's timeout at the barrier."""
    from smse_metric.recipes.histopathology.data import make_synthetic_breakhis

    root = make_synthetic_breakhis(
        tmp_path / "data", images_per_magnification=1, image_size=(32, 24)
    )
    args = (2, _free_port(), str(root), str(tmp_path))
    mp.spawn(_failing_cache_worker, args=args, nprocs=2, join=True)
    zero, one = ((tmp_path / f"{r}.txt").read_text() for r in range(2))
    assert zero == "OSError: No space left on device"
    assert one.startswith("RecipeError: rank 0 could not build the decoded cache")
    assert one.endswith("OSError: No space left on device")
