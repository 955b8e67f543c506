"""The ``smse-metric`` command (also ``python -m smse_metric``)."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from .data import make_synthetic_breakhis, scan_breakhis
from .data.manifest import is_manifest
from .errors import RecipeError
from .results import RunMetrics
from .rundir import RunDir


def _synth(args: argparse.Namespace) -> int:
    out = make_synthetic_breakhis(
        args.out_dir,
        images_per_magnification=args.images_per_magnification,
        image_size=(args.width, args.height),
        seed=args.seed,
    )
    index = scan_breakhis(out)
    report = index.report
    print(f"wrote {report['images']} images of {report['groups']} patients to {out}")
    print("per subtype: " + ", ".join(f"{k} {v}" for k, v in report["per_subtype"].items()))
    print(f"folds: {out / 'Folds.csv'}")
    if args.manifest:
        from .data.manifest import write_manifest

        print(f"manifest: {write_manifest(index, out / 'manifest.csv', task=args.manifest)}")
    return 0


def _summary(metrics: RunMetrics, out: Path) -> None:
    from .report import format_score, results_table

    print(
        f"best epoch {metrics.best_epoch + 1} ({metrics.selected_on} {metrics.best_val_score:.3f})"
    )
    print("\n".join(results_table(metrics.test)))
    mean = format_score(metrics.test.knn.cross_magnification_mean)
    print(f"cross-magnification kNN mean: {mean}")
    print(f"wrote {out} (report: {RunDir(out).report})")


def _parse_folds(spec: str) -> list[int]:
    try:
        if "-" in spec:
            lo, hi = (int(x) for x in spec.split("-"))
            folds = list(range(lo, hi + 1))
        else:
            folds = [int(x) for x in spec.split(",")]
    except ValueError:
        folds = []
    if not folds or min(folds) < 1 or len(set(folds)) != len(folds):
        raise RecipeError(f"--folds must be a range like 1-5 or a list like 1,3: {spec!r}")
    return folds


def _train_config(args: argparse.Namespace, folds: list[int] | None):
    """The validated config of a new run (nothing is written yet)."""
    from . import load_config

    overrides: dict = {"data": {}, "model": {}, "optim": {}, "run": {}}
    for section, key, value in (
        ("data", "fold", args.fold),
        ("optim", "epochs", args.epochs),
        ("run", "device", args.device),
        ("model", "pretrained", args.pretrained),
        ("model", "weights", args.weights),
    ):
        if value is not None:
            overrides[section][key] = value
    if args.weights is not None and not Path(args.weights).is_file():
        raise RecipeError(f"--weights {args.weights} does not exist")
    if args.synthetic:
        overrides["data"]["synthetic"] = True
    elif args.data:
        data = Path(args.data)
        if is_manifest(data) and not data.is_file():
            raise RecipeError(f"--data {args.data}: no such manifest")
        if not is_manifest(data) and not data.is_dir():
            raise RecipeError(
                f"--data {args.data} is neither a directory nor a manifest (.csv, .parquet)"
            )
        overrides["data"]["path"] = str(data.resolve())
    elif not args.config:  # a config may name its data.path
        raise RecipeError(
            "give --data DIR (a BreakHis directory), --data FILE.csv (a manifest), "
            "--synthetic, or a --config that names its data.path"
        )
    return load_config(args.config or "smse-triplet", overrides)


def _train(args: argparse.Namespace) -> int:
    from .launch import launch, resume_config

    out = Path(args.out).resolve()  # a symlink names the directory it points to
    folds = _parse_folds(args.folds) if args.folds else None
    if args.resume:
        if args.config or args.data or args.synthetic:
            raise RecipeError(
                "--resume continues the run with its own config.toml and data; "
                "drop --config, --data and --synthetic"
            )
        cfg = resume_config(out, folds, args.epochs)
    else:
        cfg = _train_config(args, folds)
    result = launch(
        cfg, out, folds=folds, resume=args.resume, overwrite=args.overwrite, flag="--overwrite"
    )
    if isinstance(result, RunMetrics):  # one run, rank 0
        _summary(result, out)
    return 0


def _check_device(args: argparse.Namespace) -> None:
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise RecipeError("--device cuda: no CUDA device is available here; use --device cpu")


def _evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_run

    _check_device(args)
    metrics = evaluate_run(args.run, root=args.data, device=args.device)
    _summary(metrics, Path(args.run))
    return 0


def _search(args: argparse.Namespace) -> int:
    from .search import contact_sheet, search_run

    _check_device(args)
    sheet = Path(args.sheet) if args.sheet else RunDir(args.run).search_sheet(args.image)
    if not sheet.parent.is_dir():  # before the search, not after it
        raise RecipeError(f"--sheet {sheet}: the directory {sheet.parent} does not exist")
    found = search_run(args.run, args.image, args.k, device=args.device or "cpu", data=args.data)
    print(
        f"{'rank':>4}  {'distance':>8}  {'patient':<22} {'class':<9} {'subtype':<7} "
        f"{'mag':>4}  path"
    )
    for n in found:
        print(
            f"{n.rank:>4}  {n.distance:8.4f}  {n.patient:<22} {n.label:<9} {n.subtype:<7} "
            f"{n.magnification:>4}  {n.path}"
        )
    contact_sheet(args.image, found, sheet)
    print(f"contact sheet: {sheet}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import comparison_table, demo_table, run_demo
    from .rundir import DEMO_MARKER, check_run_dir, claim_run_dir

    if (args.pretrained or args.weights) and not args.frozen:
        raise RecipeError(
            "--pretrained and --weights choose a frozen backbone's weights: add --frozen"
        )
    out = Path(args.out)
    replace = check_run_dir(out, args.overwrite, marker=DEMO_MARKER)
    with claim_run_dir(out, replace, marker=DEMO_MARKER):
        summary = run_demo(
            out,
            epochs=args.epochs,
            seeds=args.seeds,
            device=args.device or "auto",
            frozen=args.frozen,
            pretrained=args.pretrained,
            weights=args.weights,
        )
    runs = summary["runs"]
    print()
    print("replicate 1 of", len(runs))
    print(demo_table(runs[0]))
    print()
    print(f"paired over {len(runs)} replicates (mean; difference = {'-'.join(runs[0])}):")
    print(comparison_table(summary["comparison"], runs))
    print(f"\n{summary['seconds']:.0f} s wall time; summary: {RunDir(out).summary_md}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smse-metric",
        description="Multi-scale similarity embeddings for histopathology (SMSE).",
    )
    from smse_metric._launcher import version_line

    parser.add_argument("--version", action="version", version=version_line())
    sub = parser.add_subparsers(dest="command", required=True)
    from .archive_cli import add_archive_parser

    for add in (_add_synth, _add_train, _add_evaluate, _add_search, _add_demo):
        add(sub)
    add_archive_parser(sub)
    return parser


def _add_synth(sub) -> None:
    synth = sub.add_parser(
        "synth",
        help="write the synthetic BreakHis-layout dataset",
        description="Write a procedural H&E-like dataset in the exact BreakHis layout, "
        "with a Folds.csv of 5 patient-disjoint folds.",
    )
    synth.add_argument("out_dir", help="directory to write (created if missing)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--images-per-magnification", type=int, default=4)
    synth.add_argument("--width", type=int, default=128)
    synth.add_argument("--height", type=int, default=84)
    synth.add_argument(
        "--manifest",
        choices=("subtype", "binary"),
        help="also write OUT_DIR/manifest.csv (path, label, group, scale) with the subtype "
        "or benign/malignant as the label",
    )
    synth.set_defaults(func=_synth)


def _add_train(sub) -> None:
    tr = sub.add_parser(
        "train",
        help="train a recipe preset or config file",
        description="Train, select the epoch on validation patients, evaluate on test patients.",
    )
    tr.add_argument(
        "--config",
        help="a preset (smse-triplet [default], smse-triplet-small, smse-pair, baseline-ce, "
        "smse-frozen) or a TOML file",
    )
    src = tr.add_mutually_exclusive_group()
    src.add_argument(
        "--data",
        help="a BreakHis-layout directory, or a manifest (.csv; .parquet with pyarrow) with "
        "the columns path, label, group, scale and optionally split or fold",
    )
    src.add_argument(
        "--synthetic",
        action="store_true",
        help="generate the synthetic dataset into OUT/data and train on it",
    )
    tr.add_argument("--out", required=True, help="run directory")
    which = tr.add_mutually_exclusive_group()
    which.add_argument("--fold", type=int, help="fold of the fold file (1-5)")
    which.add_argument(
        "--folds",
        metavar="SPEC",
        help="train several folds into OUT/fold<k> (1-5 or 1,3) and report mean +- std",
    )
    tr.add_argument("--epochs", type=int)
    tr.add_argument("--device", choices=("auto", "cpu", "cuda"))
    tr.add_argument(
        "--pretrained",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="download the backbone's pretrained (e.g. ImageNet) weights, or not",
    )
    tr.add_argument(
        "--weights",
        metavar="FILE",
        help="a local .safetensors / .pt backbone state dict (no download)",
    )
    how = tr.add_mutually_exclusive_group()
    how.add_argument(
        "--resume", action="store_true", help="continue the run in --out from checkpoints/last.pt"
    )
    how.add_argument("--overwrite", action="store_true", help="replace an existing run")
    tr.set_defaults(func=_train)


def _add_evaluate(sub) -> None:
    ev = sub.add_parser(
        "evaluate",
        help="re-evaluate a run's best checkpoint on its test patients",
        description="Recompute metrics.json, embeddings, report.md (and, with faiss, the "
        "FAISS index) of a run from checkpoints/best.pt.",
    )
    _add_run_arguments(ev)
    ev.set_defaults(func=_evaluate)


def _add_run_arguments(parser) -> None:
    """--run, --device, --data: the flags of the commands that read a finished run."""
    parser.add_argument("--run", required=True, help="run directory")
    parser.add_argument("--device", choices=("cpu", "cuda"))
    parser.add_argument("--data", help="the run's dataset, if it moved since training")


def _add_search(sub) -> None:
    se = sub.add_parser(
        "search",
        help="the training images most similar to an image",
        description="Embed IMAGE with the run's best checkpoint and list its nearest "
        "gallery images (path, patient, class, magnification, distance); writes a PNG "
        "contact sheet.",
    )
    _add_run_arguments(se)
    se.add_argument("image", help="an image file")
    se.add_argument("-k", type=int, default=5, help="neighbours to return (default 5)")
    se.add_argument("--sheet", help="contact sheet path (default RUN/search-<image>.png)")
    se.set_defaults(func=_search)


def _add_demo(sub) -> None:
    de = sub.add_parser(
        "demo",
        help="SMSE vs a plain classifier on the synthetic dataset (minutes, CPU)",
        description="Generate the synthetic dataset, train smse-triplet and baseline-ce on "
        "several paired replicates, and print each headline metric's mean difference, its "
        "95% confidence interval and the verdict.",
    )
    de.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    de.add_argument("--epochs", type=int, help="epochs per method (default 8)")
    de.add_argument(
        "--seeds",
        type=int,
        default=5,
        help="paired replicates (fold k and seed k for both methods; default 5)",
    )
    de.add_argument("--device", choices=("auto", "cpu", "cuda"))
    de.add_argument("--overwrite", action="store_true", help="replace an earlier demo")
    de.add_argument(
        "--frozen",
        metavar="BACKBONE",
        help="compare SMSE's heads with a linear probe on this backbone's frozen features "
        "(computed once, shared by every replicate and method)",
    )
    de.add_argument(
        "--pretrained", action="store_true", help="with --frozen: the backbone's own weights"
    )
    de.add_argument("--weights", help="with --frozen: a local weights file for the backbone")
    de.set_defaults(func=_demo)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .interrupt import TrainingInterrupted

    rank = os.environ.get("RANK")  # under torchrun: each rank's line says which it is
    where = f"smse-metric {args.command}" + (f" (rank {rank})" if rank else "")
    try:
        with warnings.catch_warnings():
            # a config file's old keys are the CLI user's to fix: shown, not ignored
            warnings.filterwarnings("default", category=DeprecationWarning, module=r".*\.toml\Z")
            return args.func(args)
    except RecipeError as e:  # the user's input, named in one line; anything else is a bug
        print(f"{where}: error: {e}", file=sys.stderr)
        return 2
    except TrainingInterrupted as e:
        if rank in (None, "0"):  # the same checkpoint on every rank: said once
            print(f"smse-metric {args.command}: {e}", file=sys.stderr)
        return 130
    except FloatingPointError as e:
        print(f"{where}: training stopped: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # the machine's side: a full disk, a read-only directory
        print(f"{where}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        if rank is None or not _timed_out(e):
            raise
        print(
            f"{where}: error: no answer from {_peers(rank)} within run.dist_timeout; it "
            f"hung, stopped or died (see its output): {_first_line(e)}",
            file=sys.stderr,
        )
        return 1


def _peers(rank: str) -> str:
    """The ranks that can have left this one waiting (torchrun's WORLD_SIZE)."""
    others = [str(r) for r in range(int(os.environ.get("WORLD_SIZE", "1"))) if str(r) != rank]
    return f"rank {others[0]}" if len(others) == 1 else f"one of ranks {', '.join(others)}"


def _timed_out(e: BaseException) -> bool:
    text = str(e).lower()
    return "timed out" in text or "timeout" in text


def _one_line(e: BaseException) -> str:
    """The error's message; a loader worker's error (torch re-raises it with the
    worker's traceback in its text) by its last line, the original message."""
    lines = [x for x in str(e).strip().splitlines() if x.strip()]
    if len(lines) > 1 and "Original Traceback" in str(e):
        return lines[-1].strip()
    return " ".join(x.strip() for x in lines) or type(e).__name__


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
