"""A volumetric CT-like phantom (``phantom.volumes``): abdominal volumes with organ masks, lesions and 3D landmarks.

The 3D counterpart of :mod:`robustbench_med.data.phantom` (same anatomy, lesion rules, mask classes and disparity):
each sample is a volume of ``(D, H, W)`` = ``(depth, size, size)`` voxels (default 32 × 48 × 48, 1 channel, uint8)
drawn from its own generator ``default_rng([seed, split_code, index, 3])``: the same (seed, split, index) gives the
same bytes whatever ``n`` is. Axis order z (D, superior → inferior), y (H, anterior → posterior), x (W).

**Coordinates**: x, y, z each in [−1, 1] over the volume (the field of view is the same in every direction, so a
voxel is ``2 / (depth − 1)`` deep and ``2 / (size − 1)`` wide: 1.52× thicker than wide at the defaults, like thick
CT slices); shapes are defined in these coordinates, so lesions are spheres in the body and flattened in voxels.
``s`` = body scale, jitter ±0.03 on in-plane positions and ±0.05 on z positions.

| structure | shape | intensity (uint8 = 255 × value) |
|---|---|---|
| body | elliptic cylinder along z, (0.86 s, 0.70 s) at (0, U[0, 0.08]); fat rim 0.06 s | soft tissue 0.40, fat 0.30 |
| liver | ellipsoid (0.30, 0.26, 0.55)·s·U[0.93, 1.07] at (−0.36 s, −0.08 s, −0.35) (upper half) | 0.55 ± 0.03 |
| kidneys | ellipsoids (0.11, 0.15, 0.30)·s at (±0.38 s, 0.34 s, 0.40) each (lower half), minus the liver | 0.62 ± 0.03 |
| aorta | cylinder along z, radius 0.06 s at (0, 0.30 s) | 0.70 (mask class: body) |
| spine | elliptic cylinder (0.10 s, 0.09 s) at (0, 0.50 s): vertebrae, with discs 0.06 thick every 0.25 in z | bone 0.95, disc 0.45 |
| lesions | 1 or 2 (p = 0.25) separate spheres / blobs, 85 % in the liver, 15 % in a kidney, clipped to it | organ ± Δ |

A *cyst* is a hypodense sphere (organ − Δ); a *tumour* a hyperdense lobulated blob, radius
r·(1 + 0.3 sin(kα + φ)·sin β) (α azimuth, β polar angle from the z axis, k ∈ {3, 4, 5}). Liver lesions lie within
half the liver's radii of its centre and are large (r ∈ [0.11, 0.15]) or small (r ∈ [0.065, 0.09]) with p = 0.5;
kidney lesions sit at the kidney's centre, r ∈ [0.05, 0.07]; radii × s. A lesion needs ≥ 4 voxels after clipping
and stays ≥ 3 in-plane voxels (2 slices) from the other one (up to 6 placement tries each), so ``n_lesions`` is the
number of 26-connected lesion regions (a tiny blob, flattened in z, may touch its own voxels only diagonally). The
volume is blurred (3D Gaussian, σ 0.6 voxel), Gaussian noise σ_noise is added, and the result is clipped to [0, 1]
and quantised.

**Patients**: sex F / M and age group young / middle / old, uniform, with the 2D phantom's default
:class:`~robustbench_med.data.phantom.Disparity`: lesion contrast Δ = 0.30 · ``lesion_contrast[sex]`` (F 0.45, M 1.0)
· U[0.85, 1.15]; body scale s = ``body_scale[sex]`` (F 0.92, M 1.0) · U[0.95, 1.05]; P(lesion) =
``prevalence[age]`` (0.30 / 0.50 / 0.70); σ_noise = ``noise_sigma[age]`` (0.030 / 0.045 / 0.070). F lesions are
fainter (and smaller), old patients' volumes noisier, so volume models show a fairness gap as slice models do.

**Targets per volume**: ``mask`` uint8 [D, H, W] (:data:`MASK_CLASSES`: 0 background, 1 body, 2 liver, 3 kidneys,
4 spine, 5 lesion); ``label`` (lesion present); ``lesion_type`` (0 none, 1 cyst, 2 tumour; the largest lesion by
voxels); ``n_lesions``; ``landmarks`` float32 [4, 3], (x, y, z) voxel coordinates (x along W, y along H, z along D) of
:data:`VOLUME_LANDMARKS`: the liver centroid, the image-left (smaller x) and image-right kidney centroids, and the
spine's axis at the kidneys' mean centre z; ``vqa``: the answer id (into the 2D phantom's ``ANSWERS``) of each of the
12 questions of :data:`VOLUME_QUESTIONS` (two phrasings of each of the 2D bank's types, all trained and scored): lesion
present (yes / no), count (0 / 1 / 2), location (upper / lower: the largest lesion's voxel centroid in the superior or
inferior half in z), organ (liver / kidney), size (large / small: the radius range it was drawn from; kidney lesions are
small) and type (cyst / tumour) of the largest lesion, ``none`` for the last four without a lesion. The ``vqa`` column
draws no random numbers, so every other column is the bytes it was before it existed. Attributes ``sex``,
``age_group``; ``index``.

**Measured** (defaults, 32 × 48 × 48, one CPU thread): 2.2–2.5 ms a volume (``generate``, 600 volumes). On 600
train volumes (313 F / 287 M; 190 young / 181 middle / 229 old): lesion prevalence F 0.48 / M 0.50, young 0.28 /
middle 0.47 / old 0.68; mean lesion voxels (volumes with a lesion) F 41 / M 49, young 41 / middle 46 / old 46; mean
|lesion − surrounding organ| (uint8, a 2-voxel organ ring, after blur and noise) F 19.5 / M 44.6; 0 / 1 / 2 lesions
in 307 / 238 / 55 volumes, the largest a cyst in 144 and a tumour in 149, in the liver in 262 and a kidney in 31,
large in 142 and small in 151; the location answer equals the organ answer in all 600 (the liver lies in the
superior half, the kidneys in the inferior one), so it adds no information here. All 2,400 volumes of seeds 0–1 × three
splits × 400 have every landmark voxel inside its organ (or a lesion in it) and ``n_lesions`` equal to the 26-connected
lesion regions.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
from scipy.ndimage import gaussian_filter

from robustbench_med.data.phantom import ANSWERS, AGE_GROUPS, LESION_TYPES, MASK_CLASSES, SEXES, SPLIT_CODES, Disparity, Question

VOLUME_LANDMARKS = ("liver", "left_kidney", "right_kidney", "spine")
STREAM = 3  # 4th entry of a volume's generator key (the 2D phantom has none, its shortcut bias 1, the vessels 7)
LESION_DELTA, SECOND_LESION_PROB, KIDNEY_LESION_PROB, BLUR_SIGMA = 0.30, 0.25, 0.15, 0.6
MIN_LESION_VOXELS, PLACEMENT_TRIES, DISC_PERIOD, DISC_THICKNESS = 4, 6, 0.25, 0.06
__all__ = ["MASK_CLASSES", "VOLUME_LANDMARKS", "VOLUME_QUESTIONS", "generate", "generate_volume", "vqa_answers"]

# The volume VQA bank: two phrasings of each of the 2D phantom's six question types, all of them trained and scored
# (pool "volume"); answers are ids into the 2D phantom's ANSWERS. "upper" / "lower" is the superior / inferior half in z.
_VOLUME_PHRASINGS = {
    "presence": ("Is there a lesion in the volume?", "Does the scan show a lesion?"),
    "count": ("How many lesions are there?", "How many lesions does the volume contain?"),
    "location": ("Is the lesion in the upper or lower half of the volume?", "In which half of the volume is the lesion?"),
    "organ": ("Which organ contains the lesion?", "In which organ is the lesion?"),
    "size": ("Is the lesion small or large?", "What is the size of the lesion?"),
    "type": ("Is the lesion a cyst or a tumour?", "What type of lesion is present?"),
}
VOLUME_QUESTIONS: tuple[Question, ...] = tuple(
    Question(i, text, qtype, "volume")
    for i, (qtype, text) in enumerate((qtype, text) for qtype, texts in _VOLUME_PHRASINGS.items() for text in texts))
_ANSWER_ID = {a: i for i, a in enumerate(ANSWERS)}


def vqa_answers(lesions: list[dict[str, Any]], depth: int) -> list[int]:
    """Answer id (into ``ANSWERS``) of every question of :data:`VOLUME_QUESTIONS` for a volume with ``lesions`` (as
    returned by ``_draw_lesions``; the largest by voxels speaks, as for ``lesion_type``)."""
    main = max(lesions, key=lambda les: les["voxels"]) if lesions else None
    truth = {
        "presence": "yes" if lesions else "no",
        "count": str(len(lesions)),
        "location": ("upper" if main["z"] < (depth - 1) / 2 else "lower") if main else "none",
        "organ": main["organ"] if main else "none",
        "size": ("large" if main["large"] else "small") if main else "none",
        "type": main["type"] if main else "none",
    }
    return [_ANSWER_ID[truth[q.qtype]] for q in VOLUME_QUESTIONS]


@lru_cache(maxsize=8)
def _grid(depth: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Broadcastable coordinates in [−1, 1]: z [D, 1, 1], y [1, H, 1], x [1, 1, W] (read-only)."""
    z = np.linspace(-1.0, 1.0, depth, dtype=np.float32)[:, None, None]
    y = np.linspace(-1.0, 1.0, size, dtype=np.float32)[None, :, None]
    x = np.linspace(-1.0, 1.0, size, dtype=np.float32)[None, None, :]
    for a in (z, y, x):
        a.flags.writeable = False
    return z, y, x


def _ellipsoid(c: tuple[float, float, float], r: tuple[float, float, float], depth: int, size: int) -> np.ndarray:
    """Bool [D, H, W]: ((x−cx)/rx)² + ((y−cy)/ry)² + ((z−cz)/rz)² ≤ 1 (c, r given as (x, y, z))."""
    z, y, x = _grid(depth, size)
    return ((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2 <= 1.0


def _cylinder(c: tuple[float, float], r: tuple[float, float], depth: int, size: int) -> np.ndarray:
    """Bool [D, H, W]: an elliptic cylinder along z."""
    _, y, x = _grid(depth, size)
    disk = ((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 <= 1.0
    return np.broadcast_to(disk, (depth, size, size))


def _to_voxel(v: float, n: int) -> float:
    return (v + 1.0) / 2.0 * (n - 1)


def _centroid(region: np.ndarray) -> tuple[float, float, float]:
    """(x, y, z) voxel centroid of a bool [D, H, W] region."""
    zs, ys, xs = np.nonzero(region)
    return float(xs.mean()), float(ys.mean()), float(zs.mean())


def _jitter(rng: np.random.Generator, amount: float = 0.03) -> float:
    return float(rng.uniform(-amount, amount))


def _anatomy(rng: np.random.Generator, s: float, depth: int, size: int) -> dict[str, Any]:
    """Body, liver, kidneys, aorta and spine drawn into a float volume and a label mask."""
    img = np.zeros((depth, size, size), dtype=np.float32)
    mask = np.zeros((depth, size, size), dtype=np.uint8)
    bc, br = (_jitter(rng), rng.uniform(0.0, 0.08)), (0.86 * s, 0.70 * s)
    body = _cylinder(bc, br, depth, size)
    img[body], mask[body] = 0.30, 1
    img[_cylinder(bc, (br[0] - 0.06 * s, br[1] - 0.06 * s), depth, size)] = 0.40
    liver_c = (-0.36 * s + _jitter(rng), -0.08 * s + _jitter(rng), -0.35 + _jitter(rng, 0.05))
    liver_r = tuple(float(v) for v in np.array([0.30, 0.26, 0.55]) * s * rng.uniform(0.93, 1.07))
    liver = _ellipsoid(liver_c, liver_r, depth, size) & body
    liver_int = 0.55 + _jitter(rng)
    img[liver], mask[liver] = liver_int, 2
    kid_int = 0.62 + _jitter(rng)
    kidneys, kid_c = [], []
    for side in (-1, 1):
        c = (side * 0.38 * s + _jitter(rng), 0.34 * s + _jitter(rng), 0.40 + _jitter(rng, 0.05))
        region = _ellipsoid(c, (0.11 * s, 0.15 * s, 0.30 * s), depth, size) & body & ~liver
        img[region], mask[region] = kid_int, 3
        kidneys.append(region)
        kid_c.append(c)
    img[_cylinder((_jitter(rng, 0.02), 0.30 * s), (0.06 * s, 0.06 * s), depth, size) & (mask == 1)] = 0.70
    spine_c = (_jitter(rng), 0.50 * s)
    spine = _cylinder(spine_c, (0.10 * s, 0.09 * s), depth, size) & body
    z = _grid(depth, size)[0]
    disc = (z - rng.uniform(0, DISC_PERIOD)) % DISC_PERIOD < DISC_THICKNESS  # intervertebral discs
    img[spine], mask[spine] = np.where(np.broadcast_to(disc, spine.shape), 0.45, 0.95)[spine], 4
    spine_z = (kid_c[0][2] + kid_c[1][2]) / 2
    landmarks = [_centroid(liver), _centroid(kidneys[0]), _centroid(kidneys[1]),
                 (_to_voxel(spine_c[0], size), _to_voxel(spine_c[1], size), _to_voxel(spine_z, depth))]
    return {"img": img, "mask": mask, "liver": liver, "liver_c": liver_c, "liver_r": liver_r, "liver_int": liver_int,
            "kidneys": kidneys, "kid_c": kid_c, "kid_int": kid_int, "landmarks": landmarks}


def _lesion_region(rng: np.random.Generator, c: tuple[float, float, float], r: float, tumour: bool, depth: int,
                   size: int) -> np.ndarray:
    """A sphere (cyst) or a lobulated blob (tumour: r·(1 + 0.3 sin(kα + φ)·sin β)) centred at c = (x, y, z)."""
    z, y, x = _grid(depth, size)
    dx, dy, dz = x - c[0], y - c[1], z - c[2]
    rho2 = dx * dx + dy * dy
    d2 = rho2 + dz * dz
    if not tumour:
        return d2 <= r * r
    k, phase = int(rng.integers(3, 6)), rng.uniform(0, 2 * np.pi)
    sin_beta = np.sqrt(rho2 / np.maximum(d2, 1e-12))
    return d2 <= (r * (1 + 0.3 * np.sin(k * np.arctan2(dy, dx) + phase) * sin_beta)) ** 2


def _place_lesion(rng: np.random.Generator, s: float, a: dict[str, Any]) -> dict[str, Any]:
    """Organ region, centre, radius, type and base intensity of one lesion (not yet drawn)."""
    if rng.random() >= KIDNEY_LESION_PROB:
        u = rng.normal(size=3)
        offset = u / np.linalg.norm(u) * np.cbrt(rng.uniform(0, 1)) * 0.5  # uniform in half the liver's radii
        c = tuple(float(a["liver_c"][i] + offset[i] * a["liver_r"][i]) for i in range(3))
        large = bool(rng.random() < 0.5)
        r = s * (rng.uniform(0.11, 0.15) if large else rng.uniform(0.065, 0.09))
        organ, region, base = "liver", a["liver"], a["liver_int"]
    else:
        side = int(rng.integers(2))
        c, r, large = a["kid_c"][side], s * rng.uniform(0.05, 0.07), False
        organ, region, base = "kidney", a["kidneys"][side], a["kid_int"]
    kind = "cyst" if rng.random() < 0.5 else "tumour"
    return {"region": region, "c": c, "r": float(r), "type": kind, "base": base, "organ": organ, "large": large}


def _draw_lesions(rng: np.random.Generator, a: dict[str, Any], s: float, contrast: float, prevalence: float,
                  depth: int, size: int) -> list[dict[str, Any]]:
    """0–2 separate lesions drawn into ``a['img']`` / ``a['mask']``; returns their type, voxel count, organ, size
    class and centroid z (voxels)."""
    if rng.random() >= prevalence:
        return []
    count = 2 if rng.random() < SECOND_LESION_PROB else 1
    lesions: list[dict[str, Any]] = []
    taken = np.zeros((depth, size, size), dtype=bool)
    gap = 3 * 2.0 / (size - 1)  # 3 voxels in-plane (2 slices at the default depth)
    for _ in range(count * PLACEMENT_TRIES):
        if len(lesions) == count:
            break
        les = _place_lesion(rng, s, a)
        region = _lesion_region(rng, les["c"], les["r"], les["type"] == "tumour", depth, size) & les["region"]
        grown = _ellipsoid(les["c"], (1.3 * les["r"] + gap,) * 3, depth, size)
        if region.sum() < MIN_LESION_VOXELS or (grown & taken).any():
            continue
        delta = LESION_DELTA * contrast * rng.uniform(0.85, 1.15)
        a["img"][region] = les["base"] + (-delta if les["type"] == "cyst" else delta)
        a["mask"][region] = 5
        taken |= region
        lesions.append({"type": les["type"], "voxels": int(region.sum()), "organ": les["organ"], "large": les["large"],
                        "z": float(np.nonzero(region)[0].mean())})
    return lesions


def generate_volume(index: int, split: str, seed: int = 0, size: int = 48, depth: int = 32,
                    disparity: Disparity | None = None) -> dict[str, Any]:
    """One volume: image uint8 [D, H, W, 1], mask uint8 [D, H, W], landmarks float32 [4, 3] ((x, y, z) voxels),
    label, lesion_type, n_lesions, sex, age_group; deterministic in (seed, split, index)."""
    dis = disparity if disparity is not None else Disparity()
    rng = np.random.default_rng([seed, SPLIT_CODES[split], index, STREAM])
    sex, age = SEXES[int(rng.integers(2))], AGE_GROUPS[int(rng.integers(3))]
    s = dis.body_scale[sex] * rng.uniform(0.95, 1.05)
    a = _anatomy(rng, s, depth, size)
    lesions = _draw_lesions(rng, a, s, dis.lesion_contrast[sex], dis.prevalence[age], depth, size)
    noise = rng.normal(0.0, dis.noise_sigma[age], a["img"].shape).astype(np.float32)
    img = gaussian_filter(a["img"], BLUR_SIGMA) + noise
    main = max(lesions, key=lambda les: les["voxels"]) if lesions else None
    return {
        "image": (np.clip(img, 0.0, 1.0) * 255.0).round().astype(np.uint8)[..., None],
        "mask": a["mask"],
        "landmarks": np.asarray(a["landmarks"], dtype=np.float32),
        "label": int(bool(lesions)),
        "lesion_type": LESION_TYPES.index(main["type"]) if main else 0,
        "n_lesions": len(lesions),
        "sex": sex,
        "age_group": age,
        "vqa": vqa_answers(lesions, depth),
    }


def generate(split: str, n: int, seed: int = 0, size: int = 48, depth: int = 32,
             disparity: Disparity | None = None) -> dict[str, Any]:
    """Volumes ``0 … n−1`` of ``split`` as column lists (the layout of the HF dataset), with an ``index`` column."""
    if split not in SPLIT_CODES:
        raise ValueError(f"unknown split {split!r}; choose one of {tuple(SPLIT_CODES)}")
    if not isinstance(size, int) or size < 16 or not isinstance(depth, int) or depth < 8:
        raise ValueError(f"size must be an integer >= 16 and depth an integer >= 8, got {size!r}, {depth!r}")
    samples = [generate_volume(i, split, seed, size, depth, disparity) for i in range(n)]
    columns: dict[str, Any] = {k: [smp[k] for smp in samples] for k in samples[0]} if samples else {}
    columns["index"] = list(range(n))
    return columns
