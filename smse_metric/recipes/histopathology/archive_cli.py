"""``smse-metric archive``: add a dataset's images with a run's model, build an index
with its measured recall, search by case, evaluate leave-one-case-out, remove a case."""

from __future__ import annotations

import argparse
from pathlib import Path

from .errors import RecipeError

__all__ = ["add_archive_parser"]

KINDS = ("exact", "ivf_flat", "ivf_pq", "hnsw")


def _add(args: argparse.Namespace) -> int:
    from .archive import add_run_images

    done = add_run_images(args.archive, args.run, args.data, args.device, args.dtype)
    r = done.result
    print(
        f"added {r.added} images to {args.archive} (rows {r.first}-{r.first + r.added - 1}); "
        f"{r.duplicates} already there skipped; {len(done.bad_images)} unreadable skipped"
        if r.added
        else f"added nothing: {r.duplicates} images already in {args.archive}, "
        f"{len(done.bad_images)} unreadable"
    )
    for path, why in done.bad_images:
        print(f"  skipped {path}: {why}")
    return 0


def _index(args: argparse.Namespace) -> int:
    from smse_metric.archive import ArchiveIndex

    from .archive import index_path, open_store

    store = open_store(args.archive)
    try:
        index = ArchiveIndex.build(
            store, args.kind, distance=args.distance, recall=args.recall, k=args.k,
            probes=args.probes, device=args.device,
        )  # fmt: skip
    except ValueError as e:
        raise RecipeError(str(e)) from e
    path = index_path(args.archive, args.kind)
    index.save(path)
    info = index.build_info
    setting = ", ".join(f"{k} {v}" for k, v in info.search.items()) or "exact"
    met = "" if info.recall >= info.target else f" (target {info.target} not reached)"
    print(
        f"{args.kind} index of {info.rows} rows: recall@{info.recall_k} {info.recall:.3f} "
        f"at {setting}{met}; {index.nbytes() / 2**20:.1f} MiB; {path}"
    )
    return 0


def _search(args: argparse.Namespace) -> int:
    from .archive import search_archive

    sheet = Path(args.sheet or Path(args.archive) / f"search-{Path(args.images[0]).stem}.png")
    if not sheet.parent.is_dir():  # before the search, not after it
        raise RecipeError(f"--sheet {sheet}: the directory {sheet.parent} does not exist")
    found = search_archive(
        args.archive, args.run, args.images, kind=args.index, k=args.k, cases=args.cases,
        exclude_case=args.exclude_case, scales=args.scales, device=args.device,
    )  # fmt: skip
    print(f"{'rank':>4}  {'case':<24} {'label':<10} {'votes':>5}  {'best d':>8}  nearest patch")
    for i, c in enumerate(found.cases, 1):
        print(
            f"{i:>4}  {c.case:<24} {c.label or '?':<10} {c.votes:>5}  {c.distance:8.4f}  "
            f"{c.patches[0].source}"
        )
    if found.suggested is None:
        print("suggested label: none (no top case has a label)")
    else:
        print(f"suggested label: {found.suggested} ({found.vote_share:.0%} of the top cases)")
    _sheet(args.images, found, sheet)
    print(f"contact sheet: {sheet}")
    return 0


def _sheet(images, found, out: Path) -> None:
    """The query and each top case's nearest patch, as the run search's contact sheet."""
    from .search import Neighbour, contact_sheet

    tiles = [
        Neighbour(i, c.distance, c.patches[0].source, c.case, c.label, f"{c.votes} votes",
                  int(c.patches[0].scale) if c.patches[0].scale.isdigit() else 0)
        for i, c in enumerate(found.cases, 1)
    ]  # fmt: skip
    contact_sheet(images[0], tiles, out)


def _evaluate(args: argparse.Namespace) -> int:
    from smse_metric.archive import evaluate_cases

    from .archive import open_index, open_store

    store = open_store(args.archive)
    rows = []
    for kind in ["exact", *([] if args.index in (None, "exact") else [args.index])]:
        index = open_index(store, args.archive, kind, args.device)
        try:
            r = evaluate_cases(index, k=args.k, cases=args.cases, per_case=args.per_case)
        except ValueError as e:
            raise RecipeError(str(e)) from e
        rows.append((kind, r))
    print(f"{'index':<10} {'cases':>6} {'patches':>8} {'case acc':>9} {'patch acc':>10}")
    for kind, r in rows:
        print(
            f"{kind:<10} {r.cases:>6} {r.patches:>8} {r.case_accuracy:9.4f} "
            f"{r.patch_accuracy:10.4f}"
        )
    if len(rows) == 2:
        gap = rows[1][1].case_accuracy - rows[0][1].case_accuracy
        print(f"approximation costs {-gap:+.4f} case accuracy against exact search")
    return 0


def _remove(args: argparse.Namespace) -> int:
    from .archive import open_store

    store = open_store(args.archive)
    try:
        n = store.remove_case(args.case)
    except ValueError as e:
        raise RecipeError(str(e)) from e
    print(f"removed case {args.case}: {n} rows are no longer found")
    return 0


EXACT_DEVICE = "where exact searches run (the recall reference, exact search): cpu"


def add_archive_parser(sub) -> None:
    """The ``archive`` command and its subcommands, on the CLI's subparsers ``sub``.

    Args:
        sub: ``argparse``'s subparsers action of the ``smse-metric`` parser.

    Examples:
        >>> p = argparse.ArgumentParser(); add_archive_parser(p.add_subparsers(dest="c"))
        >>> p.parse_args(["archive", "remove", "A", "--case", "p1"]).case
        'p1'
    """
    ar = sub.add_parser(
        "archive",
        help="similar past cases: an archive of embeddings, indexes, search by case",
        description="An archive of a run's embeddings of past cases, approximate indexes "
        "with their measured recall, and search results grouped by case.",
    )
    verbs = ar.add_subparsers(dest="verb", required=True)

    add = verbs.add_parser("add", help="embed a dataset's images and append them")
    add.add_argument("archive", help="the archive directory (made on first use)")
    add.add_argument("--run", required=True, help="the trained run whose model embeds")
    add.add_argument("--data", required=True, help="a BreakHis directory or a manifest")
    add.add_argument("--dtype", default="float16", choices=("float16", "float32"))
    add.add_argument("--device", choices=("cpu", "cuda"))
    add.set_defaults(func=_add)

    ix = verbs.add_parser("index", help="build an index and measure its recall")
    ix.add_argument("archive")
    ix.add_argument("--kind", default="ivf_flat", choices=KINDS)
    ix.add_argument("--recall", type=float, default=0.95, help="recall@k to reach (0.95)")
    ix.add_argument("-k", type=int, default=10, help="the k of recall@k (10)")
    ix.add_argument("--probes", type=int, default=1000, help="rows that measure it (1000)")
    ix.add_argument("--distance", default="l2", choices=("l2", "cosine"))
    ix.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help=EXACT_DEVICE)
    ix.set_defaults(func=_index)

    se = verbs.add_parser("search", help="the cases most like one case's images")
    se.add_argument("archive")
    se.add_argument("images", nargs="+", help="image files of one case")
    se.add_argument("--run", required=True, help="the run that built the archive")
    se.add_argument("--index", choices=KINDS, help="which index (default: the one built)")
    se.add_argument("--cases", type=int, default=5, help="cases to return (5)")
    se.add_argument("-k", type=int, default=10, help="archive patches per image (10)")
    se.add_argument("--exclude-case", help="leave this case out (the query's own)")
    se.add_argument("--scales", default="any", choices=("any", "same", "other"))
    se.add_argument("--sheet", help="contact sheet path (default ARCHIVE/search-<first image>.png)")
    se.add_argument("--device", choices=("cpu", "cuda"))
    se.set_defaults(func=_search)

    ev = verbs.add_parser("evaluate", help="leave-one-case-out accuracy, exact and indexed")
    ev.add_argument("archive")
    ev.add_argument("--index", choices=KINDS, help="the index to compare with exact search")
    ev.add_argument("--cases", type=int, default=5, help="voting cases (5)")
    ev.add_argument("-k", type=int, default=10, help="archive patches per query (10)")
    ev.add_argument("--per-case", type=int, default=16, help="query patches per case (16)")
    ev.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help=EXACT_DEVICE)
    ev.set_defaults(func=_evaluate)

    rm = verbs.add_parser("remove", help="remove a case (its rows are no longer found)")
    rm.add_argument("archive")
    rm.add_argument("--case", required=True)
    rm.set_defaults(func=_remove)
