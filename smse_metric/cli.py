"""The ``smse-metric`` command (also ``python -m smse_metric``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .data import make_synthetic_breakhis, scan_breakhis


def _synth(args: argparse.Namespace) -> int:
    out = make_synthetic_breakhis(
        args.out_dir,
        images_per_magnification=args.images_per_magnification,
        image_size=(args.width, args.height),
        seed=args.seed,
    )
    report = scan_breakhis(out).report
    print(f"wrote {report['images']} images of {report['groups']} patients to {out}")
    print("per subtype: " + ", ".join(f"{k} {v}" for k, v in report["per_subtype"].items()))
    print(f"folds: {out / 'Folds.csv'}")
    return 0


def _train(args: argparse.Namespace) -> int:
    import shutil

    from .recipes import load_config
    from .recipes.breakhis import train

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        if not args.overwrite:
            raise ValueError(f"{out} exists and is not empty; pass --overwrite to replace it")
        shutil.rmtree(out)
    overrides: dict = {"data": {}, "optim": {}, "run": {}}
    if args.synthetic:
        overrides["data"]["synthetic"] = True
    elif args.data:
        overrides["data"]["path"] = str(args.data)
    else:
        raise ValueError("give --data DIR (a BreakHis directory) or --synthetic")
    if args.fold is not None:
        overrides["data"]["fold"] = args.fold
    if args.epochs is not None:
        overrides["optim"]["epochs"] = args.epochs
    if args.device is not None:
        overrides["run"]["device"] = args.device
    cfg = load_config(args.config, overrides)
    root = Path(args.data) if args.data else out / "data"
    if args.synthetic and not args.data:
        make_synthetic_breakhis(root, seed=cfg.run.seed)
    metrics = train(cfg, out, root)
    knn, head = metrics["test"]["knn"]["pooled"], metrics["test"]["head"]["pooled"]
    print(f"best epoch {metrics['best_epoch']} (validation patient accuracy "
          f"{metrics['best_val_patient_accuracy']:.3f})")  # fmt: skip
    print(f"test kNN:  image {knn['accuracy']:.3f}  patient {knn['patient_accuracy']:.3f}")
    print(f"test head: image {head['accuracy']:.3f}  patient {head['patient_accuracy']:.3f}")
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smse-metric",
        description="Multi-scale similarity embeddings for histopathology (SMSE).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    synth = sub.add_parser(
        "synth", help="write the synthetic BreakHis-layout dataset",
        description="Write a procedural H&E-like dataset in the exact BreakHis layout, "
        "with a Folds.csv of 5 patient-disjoint folds.",
    )  # fmt: skip
    synth.add_argument("out_dir", help="directory to write (created if missing)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--images-per-magnification", type=int, default=4)
    synth.add_argument("--width", type=int, default=128)
    synth.add_argument("--height", type=int, default=84)
    synth.set_defaults(func=_synth)

    tr = sub.add_parser(
        "train", help="train a recipe preset or config file",
        description="Train, select the epoch on validation patients, evaluate on test patients.",
    )  # fmt: skip
    tr.add_argument(
        "--config", default="smse-triplet",
        help="a preset (smse-triplet, smse-pair, baseline-ce) or a TOML file",
    )  # fmt: skip
    src = tr.add_mutually_exclusive_group()
    src.add_argument("--data", help="BreakHis-layout directory")
    src.add_argument(
        "--synthetic", action="store_true",
        help="generate the synthetic dataset into OUT/data and train on it",
    )  # fmt: skip
    tr.add_argument("--out", required=True, help="run directory")
    tr.add_argument("--fold", type=int)
    tr.add_argument("--epochs", type=int)
    tr.add_argument("--device", choices=("auto", "cpu", "cuda"))
    tr.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    tr.set_defaults(func=_train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"smse-metric {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
