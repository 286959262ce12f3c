"""A vessel-like phantom (``phantom.vessels``): fundus-like slices with a branching vessel tree to segment.

DGSSA and the retinal-vessel literature (DRIVE, CHASEDB, HRF, STARE) train a vessel segmentor on one dataset and test
it on the others; what changes between them is the camera (illumination, contrast, resolution, field of view, noise),
not the anatomy. This phantom gives the suite that task offline: one channel (the green channel a fundus vessel
segmentor usually reads), 64×64, with the same acquisition sites as the CT phantom (:mod:`robustbench_med.data.sites`;
site A is ``phantom.vessels`` itself, ``phantom.vessels_sites`` interleaves A / B / C with a ``site`` attribute).

**Rendering** (coordinates in [−1, 1], every random number from ``default_rng([seed, split, index, 7])``):

- field of view: a disk of radius 0.95 (outside 0.02); inside, a background of 0.55 with a vignette ``× (1 − 0.25 r²)``
  and a smooth texture (±0.03);
- optic disc: a bright Gaussian spot (+0.30, σ 0.08) at (±0.45, U[−0.1, 0.1]) (left or right eye); fovea: a dark
  spot (−0.08, σ 0.12) 0.9 to the other side;
- vessel tree (:func:`vessel_tree`): four arcades from the disc (upper / lower towards the fovea at ±0.9 rad, and
  upper / lower away from it at ±1.1 rad), each a random walk of
  steps of 0.045 with heading noise N(0, 0.18) and a pull away from the fovea, width 2.0–2.6 px shrinking ×0.975 a
  step; a branch leaves with p = 0.10 a step at ±U[0.4, 0.9] rad and 0.7× width; a branch ends below 0.6 px, outside
  the disk, or after 400 segments in all;
- each vessel darkens the background by ``contrast · min(1, w / 2) · exp(−d² / (2 (w/2)²))`` (the max over
  segments, d the distance to the centre line, w the width in px; thin vessels are fainter), contrast 0.22; the mask is
  ``d ≤ max(w / 2, 0.5 px)``;
- Gaussian blur σ 0.5 px and noise; clipped and quantised to uint8. Targets: ``mask`` (0 background, 1 vessel).

**Patients**: sex F / M and age group young / middle / old, uniform (or the site's mix). Age brings a haze (lens
opacity): vessel contrast × 1.0 / 0.85 / 0.70 and noise σ 0.020 / 0.030 / 0.045 for young / middle / old, so old
patients' thin vessels are harder to segment (a fairness gap by age). Sex has no effect on the image here.

**Structural augmentation** (DGSSA's idea: train on synthetic vessel-like trees rendered into pseudo images):
:func:`pseudo_pair` renders a tree with wider parameter ranges (1–4 roots anywhere in the disk, random widths) into a
pseudo image (a random smooth background, random vessel contrast, blur and noise) and returns it with its mask.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from scipy.ndimage import gaussian_filter

from robustbench_med.data.phantom import AGE_GROUPS, SEXES, SPLIT_CODES, _grid
from robustbench_med.data.sites import SITES, Site, acquire, draw_patient

VESSEL_CLASSES = ("background", "vessel")
HAZE = {"young": 1.0, "middle": 0.85, "old": 0.70}
NOISE = {"young": 0.020, "middle": 0.030, "old": 0.045}
FOV_RADIUS, CONTRAST, MAX_SEGMENTS = 0.95, 0.22, 400


def vessel_tree(rng: np.random.Generator, roots: list[tuple[float, float, float, float]], avoid: tuple[float, float] | None,
                size: int, fov: float = FOV_RADIUS) -> list[tuple[float, float, float, float, float]]:
    """Segments ``(x0, y0, x1, y1, width_px)`` of a branching tree grown from ``roots`` = ``(x, y, heading, width)``;
    branches bend away from ``avoid`` (the fovea) and stop at the field-of-view edge."""
    step = 0.045
    stack = list(roots)
    segments: list[tuple[float, float, float, float, float]] = []
    while stack and len(segments) < MAX_SEGMENTS:
        x, y, heading, width = stack.pop()
        while width >= 0.6 and x * x + y * y < fov * fov and len(segments) < MAX_SEGMENTS:
            heading += rng.normal(0.0, 0.18)
            if avoid is not None:
                dx, dy = x - avoid[0], y - avoid[1]
                if dx * dx + dy * dy < 0.16:  # within 0.4 of the fovea: turn away from it
                    away = np.arctan2(dy, dx)
                    heading += 0.3 * np.sin(away - heading)
            nx, ny = x + step * np.cos(heading), y + step * np.sin(heading)
            segments.append((x, y, nx, ny, width))
            if rng.random() < 0.10:
                stack.append((nx, ny, heading + rng.choice([-1, 1]) * rng.uniform(0.4, 0.9), 0.7 * width))
            x, y, width = nx, ny, width * 0.975
    return segments


def render_tree(segments: list[tuple[float, float, float, float, float]], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(profile, mask): the max over segments of ``min(1, w/2)·exp(−d²/(2(w/2)²))`` and the vessel mask."""
    xx, yy = _grid(size)
    px = 2.0 / (size - 1)  # one pixel in [−1, 1] units
    profile = np.zeros((size, size), dtype=np.float32)
    mask = np.zeros((size, size), dtype=bool)
    for x0, y0, x1, y1, w in segments:
        vx, vy = x1 - x0, y1 - y0
        t = np.clip(((xx - x0) * vx + (yy - y0) * vy) / (vx * vx + vy * vy + 1e-12), 0.0, 1.0)
        d = np.hypot(xx - (x0 + t * vx), yy - (y0 + t * vy)) / px  # distance in px
        half = w / 2.0
        profile = np.maximum(profile, min(1.0, half) * np.exp(-(d * d) / (2 * half * half)))
        mask |= d <= max(half, 0.5)
    return profile, mask


def _smooth_texture(rng: np.random.Generator, size: int, res: int, amplitude: float) -> np.ndarray:
    low = rng.uniform(-1.0, 1.0, (res, res))
    return amplitude * np.kron(low, np.ones((size // res + 1, size // res + 1)))[:size, :size].astype(np.float32)


def generate_sample(index: int, split: str, seed: int = 0, size: int = 64, site: Site | None = None) -> dict[str, Any]:
    """One vessel phantom sample: image uint8 [H, W, 1], mask, sex, age group (site ``None`` or A: the reference)."""
    site = None if site == SITES["A"] else site  # site A is the reference acquisition
    rng = np.random.default_rng([seed, SPLIT_CODES[split], index, 7])
    sex, age = draw_patient(rng, site) if site is not None else (SEXES[int(rng.integers(2))], AGE_GROUPS[int(rng.integers(3))])
    scale = 1.0 / site.fov if site is not None else 1.0
    xx, yy = _grid(size)
    r2 = (xx * xx + yy * yy) / (scale * scale)
    inside = r2 < FOV_RADIUS ** 2
    side = 1.0 if rng.random() < 0.5 else -1.0
    disc = (side * 0.45 * scale, rng.uniform(-0.1, 0.1) * scale)
    fovea = (disc[0] - side * 0.9 * scale, disc[1])
    img = 0.55 * (1 - 0.25 * r2) + gaussian_filter(_smooth_texture(rng, size, 6, 0.03), 2.0)
    img += 0.30 * np.exp(-((xx - disc[0]) ** 2 + (yy - disc[1]) ** 2) / (2 * (0.08 * scale) ** 2))
    img -= 0.08 * np.exp(-((xx - fovea[0]) ** 2 + (yy - fovea[1]) ** 2) / (2 * (0.12 * scale) ** 2))
    toward = 0.0 if side < 0 else np.pi  # from the disc towards the fovea
    headings = (toward - 0.9, toward + 0.9, toward + np.pi - 1.1, toward + np.pi + 1.1)  # temporal and nasal arcades
    roots = [(disc[0], disc[1], h, rng.uniform(2.0, 2.6) * scale) for h in headings]
    segments = vessel_tree(rng, roots, fovea, size, FOV_RADIUS * scale)
    profile, mask = render_tree(segments, size)
    img = np.where(inside, img - CONTRAST * HAZE[age] * profile, 0.02).astype(np.float32)
    mask &= inside
    noise = rng.normal(0.0, NOISE[age] * (site.noise_scale if site is not None else 1.0), img.shape)
    blurred = gaussian_filter(img, 0.5)
    img = blurred + noise if site is None else acquire(blurred, site, noise)
    return {"image": (np.clip(img, 0.0, 1.0) * 255.0).round().astype(np.uint8)[..., None],
            "mask": mask.astype(np.uint8), "sex": sex, "age_group": age}


def pseudo_pair(rng: np.random.Generator, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic tree in a pseudo image (float [H, W] in [0, 1]) and its mask: DGSSA-style structural augmentation."""
    xx, yy = _grid(size)
    roots = []
    for _ in range(int(rng.integers(1, 5))):
        r, a = 0.8 * np.sqrt(rng.random()), rng.uniform(0, 2 * np.pi)
        roots.append((r * np.cos(a), r * np.sin(a), rng.uniform(0, 2 * np.pi), rng.uniform(1.2, 3.0)))
    profile, mask = render_tree(vessel_tree(rng, roots, None, size, 1.0), size)
    background = rng.uniform(0.25, 0.75) + gaussian_filter(_smooth_texture(rng, size, int(rng.integers(3, 10)), rng.uniform(0.02, 0.12)), 1.5)
    img = background - rng.uniform(0.08, 0.35) * profile
    img = gaussian_filter(img, rng.uniform(0.3, 1.0)) + rng.normal(0.0, rng.uniform(0.0, 0.05), img.shape)
    return np.clip(img, 0.0, 1.0).astype(np.float32), mask.astype(np.uint8)


def generate(split: str, n: int, seed: int = 0, size: int = 64, sites: tuple[Site | None, ...] = (None,),
             site_names: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Columns of samples ``0 … n−1``; sample ``i`` acquired at ``sites[i % len(sites)]``, with a ``site`` column
    when ``site_names`` is given."""
    if split not in SPLIT_CODES:
        raise ValueError(f"unknown split {split!r}; choose one of {tuple(SPLIT_CODES)}")
    samples = [generate_sample(i, split, seed, size, sites[i % len(sites)]) for i in range(n)]
    columns: dict[str, Any] = {k: [s[k] for s in samples] for k in samples[0]} if samples else {}
    columns["index"] = list(range(n))
    if site_names is not None:
        columns["site"] = [site_names[i % len(site_names)] for i in range(n)]
    return columns
