"""A small procedural H&E-like dataset in the exact BreakHis layout.

Images are composed in optical density (Beer-Lambert) from a hematoxylin channel
(nuclei) and an eosin channel (stroma), with per-patient stain vectors. Each subtype
has an architecture, visible at low magnification (glands, tubules, slit ducts,
nests, single files of cells, clusters floating in mucin, fronds), and nuclei with
their own size, pleomorphism, shape and chromatin texture, resolved only at high
magnification. A field at 40X covers 10x the tissue of a field at 400X, so a model
of one magnification transfers imperfectly to another.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import RecipeError
from .breakhis import MAGNIFICATIONS, STAIN_VECTORS, SUBTYPES, TUMOR_CLASSES

__all__ = ["DEFAULT_PATIENTS", "make_synthetic_breakhis"]

#: patients per subtype, shaped like BreakHis (24 benign : 58 malignant patients, DC most)
DEFAULT_PATIENTS = {"A": 2, "F": 3, "PT": 2, "TA": 2, "DC": 8, "LC": 2, "MC": 3, "PC": 2}
TREE = Path("BreaKHis_v1/histology_slides/breast")

_H, _E = np.array(STAIN_VECTORS[0]), np.array(STAIN_VECTORS[1])


@dataclass(frozen=True)
class _Morphology:
    layout: str  # glands | tubules | slits | spindle | nests | files | floating | fronds
    density: float  # structures per 10^4 tissue units^2
    radius: float  # nuclear radius, tissue units
    pleomorphism: float  # coefficient of variation of the radius
    elongation: float  # major / minor axis
    texture: float  # chromatin speckle amplitude
    darkness: float  # hematoxylin load of a nucleus
    mucin: float = 0.0  # pale, eosin-poor background fraction


_MORPHOLOGY = {
    "A": _Morphology("glands", 5.0, 1.1, 0.10, 1.15, 0.10, 1.3),
    "F": _Morphology("slits", 2.5, 1.1, 0.10, 1.3, 0.10, 1.3),
    "PT": _Morphology("spindle", 12.0, 1.0, 0.15, 2.6, 0.15, 1.3),
    "TA": _Morphology("tubules", 8.0, 1.1, 0.10, 1.1, 0.10, 1.3),
    "DC": _Morphology("nests", 3.0, 1.55, 0.35, 1.3, 0.45, 1.5),
    "LC": _Morphology("files", 5.0, 1.1, 0.12, 1.15, 0.20, 1.3),
    "MC": _Morphology("floating", 3.0, 1.35, 0.22, 1.2, 0.35, 1.45, mucin=0.45),
    "PC": _Morphology("fronds", 3.0, 1.3, 0.25, 1.6, 0.35, 1.45),
}

#: magnification -> pixels per tissue unit (a 40X field spans 10x a 400X one)
_ZOOM = {40: 0.6, 100: 1.5, 200: 3.0, 400: 6.0}


def _structures(
    rng: np.random.Generator, m: _Morphology, w: float, h: float, density: float
) -> np.ndarray:
    """Nucleus centres [n, 2] (tissue units) for a field of w x h units."""
    pad = 40.0
    n_struct = rng.poisson(4 * m.density * density * (w + 2 * pad) * (h + 2 * pad) / 1e4)
    centres = rng.uniform([-pad, -pad], [w + pad, h + pad], size=(n_struct, 2))
    # fields are chosen on the lesion, as a pathologist does: one structure in view
    centres = np.concatenate([rng.uniform([0.2 * w, 0.2 * h], [0.8 * w, 0.8 * h], (1, 2)), centres])
    pts = []
    for cx, cy in centres:
        if m.layout in ("glands", "tubules", "slits"):
            r = {"glands": 9.0, "tubules": 5.0, "slits": 14.0}[m.layout] * rng.uniform(0.7, 1.3)
            squash = 0.25 if m.layout == "slits" else rng.uniform(0.8, 1.0)
            n = int(2 * np.pi * r / 2.6)
            t = np.linspace(0, 2 * np.pi, n, endpoint=False) + rng.uniform(0, 1)
            a = rng.uniform(0, np.pi)
            x, y = r * np.cos(t), squash * r * np.sin(t)
            pts.append(
                np.stack(
                    [cx + x * np.cos(a) - y * np.sin(a), cy + x * np.sin(a) + y * np.cos(a)], 1
                )
            )
        elif m.layout == "spindle":
            pts.append(rng.normal([cx, cy], 6.0, size=(6, 2)))
        elif m.layout == "nests":
            pts.append(rng.normal([cx, cy], rng.uniform(6, 12), size=(rng.integers(25, 60), 2)))
        elif m.layout == "files":
            a, n = rng.uniform(0, np.pi), rng.integers(8, 16)
            s = np.arange(n) * 3.2
            pts.append(np.stack([cx + s * np.cos(a), cy + s * np.sin(a)], 1))
        elif m.layout == "floating":
            pts.append(rng.normal([cx, cy], 3.5, size=(rng.integers(6, 14), 2)))
        else:  # fronds: a curved stalk lined by two rows of cells
            n, a = rng.integers(10, 20), rng.uniform(0, 2 * np.pi)
            s = np.arange(n) * 2.8
            bend = a + 0.08 * s
            x, y = cx + s * np.cos(bend), cy + s * np.sin(bend)
            nx, ny = -np.sin(bend), np.cos(bend)
            pts += [
                np.stack([x + 2.2 * nx, y + 2.2 * ny], 1),
                np.stack([x - 2.2 * nx, y - 2.2 * ny], 1),
            ]
    p = np.concatenate(pts)
    return p[(p[:, 0] > -5) & (p[:, 0] < w + 5) & (p[:, 1] > -5) & (p[:, 1] < h + 5)]


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Value noise in [0, 1]: a coarse random grid, bilinearly interpolated."""
    gy, gx = cells + 1, max(2, int(cells * w / h) + 1)
    grid = rng.random((gy, gx))
    yi, xi = np.linspace(0, gy - 1, h), np.linspace(0, gx - 1, w)
    y0, x0 = np.floor(yi).astype(int).clip(0, gy - 2), np.floor(xi).astype(int).clip(0, gx - 2)
    fy, fx = (yi - y0)[:, None], (xi - x0)[None, :]
    g00, g01 = grid[y0][:, x0], grid[y0][:, x0 + 1]
    g10, g11 = grid[y0 + 1][:, x0], grid[y0 + 1][:, x0 + 1]
    return (1 - fy) * ((1 - fx) * g00 + fx * g01) + fy * ((1 - fx) * g10 + fx * g11)


def render(
    rng: np.random.Generator, subtype: str, stain: dict, magnification: int, size: tuple[int, int]
) -> np.ndarray:
    """One H x W x 3 uint8 field of a subtype at a magnification."""
    m, zoom = _MORPHOLOGY[subtype], _ZOOM[magnification] * size[0] / 128
    w, h = size
    centres = _structures(rng, m, w / zoom, h / zoom, stain["density"]) * zoom
    # scattered stromal fibroblasts: small, thin, pale, in every subtype
    n_fib = rng.poisson(stain["fibroblasts"] * (w / zoom) * (h / zoom) / 1e4)
    fib = rng.uniform([0, 0], [w, h], size=(n_fib, 2))
    hema = np.zeros((h, w))
    yy, xx = np.mgrid[0:h, 0:w]
    kinds = [(c, m.radius, m.pleomorphism, m.elongation, m.texture, m.darkness) for c in centres]
    kinds += [(c, 0.6, 0.2, 3.5, 0.0, 0.7) for c in fib]
    for (cx, cy), radius, pleo, elong, texture, dark in kinds:
        r = max(0.6, radius * zoom * max(0.3, rng.normal(1.0, pleo)))
        ra, rb = r * np.sqrt(elong), r / np.sqrt(elong)
        ang = rng.uniform(0, np.pi)
        ext = int(np.ceil(ra)) + 2
        x0, x1 = max(0, int(cx) - ext), min(w, int(cx) + ext + 1)
        y0, y1 = max(0, int(cy) - ext), min(h, int(cy) + ext + 1)
        if x0 >= x1 or y0 >= y1:
            continue
        dx, dy = xx[y0:y1, x0:x1] - cx, yy[y0:y1, x0:x1] - cy
        u = (dx * np.cos(ang) + dy * np.sin(ang)) / ra
        v = (-dx * np.sin(ang) + dy * np.cos(ang)) / rb
        inside = np.clip(1.5 * (1.0 - np.sqrt(u * u + v * v)), 0, 1)
        speckle = 1 + texture * rng.standard_normal(inside.shape) * (r > 2.5)
        hema[y0:y1, x0:x1] = np.maximum(hema[y0:y1, x0:x1], dark * inside * speckle)
    cells = max(2, int(6 / max(zoom, 0.5)))
    stroma = 0.35 + 0.45 * _smooth_noise(rng, h, w, cells)
    if m.mucin:
        pale = _smooth_noise(rng, h, w, max(2, cells // 2)) < m.mucin
        stroma = np.where(pale, 0.08, stroma)
        hema += np.where(pale, 0.06, 0.0)
    grain = 0.06 * rng.standard_normal((h, w))
    eosin = np.clip(stroma + grain, 0, None)
    od = (
        stain["h_scale"] * hema[..., None] * stain["h"]
        + stain["e_scale"] * eosin[..., None] * stain["e"]
    )
    img = 255.0 * np.exp(-od) + rng.normal(0, 2.0, (h, w, 1))
    return np.clip(img, 0, 255).astype(np.uint8)


def _patient_stain(rng: np.random.Generator) -> dict:
    def unit(v):
        return v / np.linalg.norm(v)

    return {
        "h": unit(_H + rng.normal(0, 0.05, 3)).clip(0.05) * 1.1,
        "e": unit(_E + rng.normal(0, 0.05, 3)).clip(0.02) * 0.9,
        "h_scale": rng.uniform(0.75, 1.3),
        "e_scale": rng.uniform(0.7, 1.3),
        # patients differ in cellularity as much as subtypes do
        "density": rng.uniform(0.6, 1.6),
        "fibroblasts": rng.uniform(10, 80),
    }


def make_synthetic_breakhis(
    out_dir: str | Path,
    patients_per_subtype: dict[str, int] | None = None,
    images_per_magnification: int = 4,
    image_size: tuple[int, int] = (128, 84),
    seed: int = 0,
    folds: int = 5,
) -> Path:
    """Write a synthetic BreakHis tree and a ``Folds.csv`` under ``out_dir``.

    Args:
        patients_per_subtype: {subtype code: patients}; default `DEFAULT_PATIENTS`.
        images_per_magnification: images per patient per magnification (on average;
            each patient varies by +-1, as real patients do).
        image_size: (width, height) in pixels (BreakHis is 700 x 460).
        seed: everything is drawn from ``default_rng(seed)``.
        folds: patient-disjoint ~70/30 folds written to ``out_dir/Folds.csv``.
        out_dir: directory to write: new or empty (an existing dataset is never
            added to, nor its ``Folds.csv`` replaced).

    Returns:
        ``out_dir``; the images are under ``out_dir/BreaKHis_v1/histology_slides/breast``.

    Examples:
        >>> import tempfile
        >>> root = make_synthetic_breakhis(tempfile.mkdtemp(), images_per_magnification=1,
        ...                                image_size=(32, 24))
        >>> (root / "Folds.csv").is_file()
        True
    """
    patients = dict(DEFAULT_PATIENTS if patients_per_subtype is None else patients_per_subtype)
    unknown = set(patients) - set(SUBTYPES)
    if unknown:
        raise RecipeError(f"patients_per_subtype has unknown subtypes {sorted(unknown)}")
    if any(not isinstance(n, int) or n < 1 for n in patients.values()):
        raise RecipeError(f"patients_per_subtype values must be positive ints, got {patients}")
    if images_per_magnification < 1:
        raise RecipeError("images_per_magnification must be >= 1")
    w, h = image_size
    if w < 16 or h < 16:
        raise RecipeError(f"image_size must be at least 16 x 16, got {image_size}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise RecipeError(f"seed must be an integer >= 0, got {seed!r}")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RecipeError(
            f"refusing to write the synthetic dataset into {out}: it is not a "
            "new or empty directory"
        )
    rng = np.random.default_rng(seed)
    rows: list[tuple[str, str, int]] = []  # (relative path, subtype, magnification)
    patient_of: list[str] = []
    case = 10000
    for subtype, n_patients in patients.items():
        tumor_class, folder = SUBTYPES[subtype]
        for p in range(n_patients):
            case += int(rng.integers(1, 900))
            slide = f"{case}{['', 'AB', 'CD'][p % 3]}"
            stain = _patient_stain(rng)
            patient_dir = (
                TREE
                / TUMOR_CLASSES[tumor_class == "M"]
                / "SOB"
                / folder
                / f"SOB_{tumor_class}_{subtype}_14-{slide}"
            )
            for mag in MAGNIFICATIONS:
                n = max(1, images_per_magnification + int(rng.integers(-1, 2)))
                mag_dir = out / patient_dir / f"{mag}X"
                mag_dir.mkdir(parents=True, exist_ok=True)
                for i in range(1, n + 1):
                    name = f"SOB_{tumor_class}_{subtype}-14-{slide}-{mag}-{i:03d}.png"
                    Image.fromarray(render(rng, subtype, stain, mag, (w, h))).save(mag_dir / name)
                    rows.append((str(patient_dir / f"{mag}X" / name), subtype, mag))
                    patient_of.append(slide)
    _write_folds(out / "Folds.csv", rows, patient_of, folds, rng)
    return out


def _write_folds(path: Path, rows, patient_of, folds: int, rng: np.random.Generator) -> None:
    """Kaggle format: one row per fold and image; each fold ~30% of each subtype's patients
    as test, the rest as train."""
    subtype_of = {pat: sub for (_, sub, _), pat in zip(rows, patient_of, strict=True)}
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["fold", "mag", "grp", "filename"])
        for fold in range(1, folds + 1):
            test = set()
            for sub in sorted(set(subtype_of.values())):
                pats = sorted(p for p, s in subtype_of.items() if s == sub)
                pats = [pats[i] for i in rng.permutation(len(pats))]
                test.update(pats[: max(1, round(0.3 * len(pats)))] if len(pats) > 1 else [])
            for (rel, _, mag), pat in zip(rows, patient_of, strict=True):
                writer.writerow([fold, mag, "test" if pat in test else "train", rel])
