"""The ``smse-metric`` command (also ``python -m smse_metric``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

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
