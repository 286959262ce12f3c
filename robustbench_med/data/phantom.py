"""The embedded default world: a procedural CT-like phantom with masks, landmarks, VQA and patient attributes.

Each sample is an axial 2D slice (default 64×64, 1 channel, uint8) drawn from a per-sample random generator
``numpy.random.default_rng([seed, split_code, index])``: the same seed and index always give the same bytes, whatever
``n`` is requested, and the train/val/test splits are disjoint streams.

Anatomy (coordinates in [−1, 1], x to the image right, y down): an elliptical body (soft tissue 0.40), a liver on the
image-left (0.55; enlarged ×1.3 with probability 0.15), two kidneys low on each side (0.62), a vertebra (bone 0.95),
and 0–2 lesions: a *cyst* (round, hypodense: organ − 0.30·contrast) or a *tumour* (irregular, hyperdense: organ +
0.30·contrast), in the liver (85%) or a kidney (15%). CT-like noise: Gaussian (σ by age group) after a slight blur.

Patient attributes and the built-in disparity (:class:`Disparity`, all configurable):

| attribute | effect (default) |
|---|---|
| sex F / M | lesion contrast ×0.55 / ×1.0; body size ×0.92 / ×1.0 |
| age young / middle / old | lesion prevalence 0.30 / 0.50 / 0.70; noise σ 0.030 / 0.045 / 0.070 |

So a model trained on the phantom detects and segments lesions worse for "F" and for "old" patients: a real,
measurable gap for the fairness metrics.

Targets per image: ``label`` (lesion present), ``lesion_type`` (0 none, 1 cyst, 2 tumour; the largest lesion),
``findings`` (lesion, more than one lesion, enlarged liver), ``mask`` (0 background, 1 body, 2 liver, 3 kidneys,
4 spine, 5 lesion), ``landmarks`` ((x, y) px of spine centre, liver centroid, image-left kidney, image-right kidney),
``vqa`` (the answer id of every question in :data:`QUESTIONS`; answers index :data:`ANSWERS`).
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy.ndimage import gaussian_filter

SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
SEXES = ("F", "M")
AGE_GROUPS = ("young", "middle", "old")
MASK_CLASSES = ("background", "body", "liver", "kidneys", "spine", "lesion")
LANDMARKS = ("spine", "liver", "left_kidney", "right_kidney")
LESION_TYPES = ("none", "cyst", "tumour")
FINDINGS = ("lesion", "multiple_lesions", "enlarged_liver")


@dataclass(frozen=True)
class Disparity:
    """How patient attributes shift appearance and prevalence (see the module docstring)."""

    lesion_contrast: dict[str, float] = field(default_factory=lambda: {"F": 0.55, "M": 1.0})
    body_scale: dict[str, float] = field(default_factory=lambda: {"F": 0.92, "M": 1.0})
    prevalence: dict[str, float] = field(default_factory=lambda: {"young": 0.30, "middle": 0.50, "old": 0.70})
    noise_sigma: dict[str, float] = field(default_factory=lambda: {"young": 0.030, "middle": 0.045, "old": 0.070})


@dataclass(frozen=True)
class PhantomConfig:
    """Generator settings; :meth:`config_hash` keys the on-disk cache."""

    size: int = 64
    seed: int = 0
    disparity: Disparity = field(default_factory=Disparity)
    enlarged_liver_prob: float = 0.15
    second_lesion_prob: float = 0.25
    blur_sigma: float = 0.6

    def config_hash(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Question:
    """A VQA template: ``pool`` 'seen' or 'unseen' (disjoint phrasings of each ``qtype``)."""

    id: int
    text: str
    qtype: str
    pool: str


_PHRASINGS = {
    "presence": (("Is there a lesion?", "Is a lesion visible?", "Does the scan show a lesion?"),
                 ("Can you see any lesion in this image?", "Is any lesion present?", "Are there signs of a lesion?")),
    "count": (("How many lesions are there?", "How many lesions are visible?", "What is the number of lesions?"),
              ("Count the lesions in the image.", "How many lesions can be seen?", "What number of lesions does the scan show?")),
    "location": (("Where is the lesion located?", "In which half of the image is the lesion?", "Where is the lesion?"),
                 ("Which part of the image contains the lesion?", "Is the lesion in the upper or lower part?", "Where can the lesion be found?")),
    "organ": (("Which organ contains the lesion?", "In which organ is the lesion?", "What organ has the lesion?"),
              ("The lesion is located in which organ?", "Which organ is affected by the lesion?", "Where, by organ, is the lesion?")),
    "size": (("How large is the lesion?", "What is the size of the lesion?", "Is the lesion small or large?"),
             ("How big is the lesion?", "Describe the lesion size.", "What size is the lesion?")),
    "type": (("What kind of lesion is it?", "What type of lesion is present?", "Is the lesion a cyst or a tumour?"),
             ("Which lesion type is seen?", "How would you classify the lesion?", "What is the lesion type?")),
}
QUESTIONS: tuple[Question, ...] = tuple(
    Question(i, text, qtype, pool)
    for i, (qtype, pool, text) in enumerate(
        (qtype, pool, text)
        for qtype, (seen, unseen) in _PHRASINGS.items()
        for pool, texts in (("seen", seen), ("unseen", unseen))
        for text in texts
    )
)
ANSWERS: tuple[str, ...] = ("no", "yes", "0", "1", "2", "upper", "lower", "none", "liver", "kidney", "small", "large", "cyst", "tumour")
_ANSWER_ID = {a: i for i, a in enumerate(ANSWERS)}
_NUMBER_WORDS = {"zero": "0", "one": "1", "two": "2", "three": "3", "none": "none"}


def answer_text(answer_id: int) -> str:
    return ANSWERS[int(answer_id)]


def normalize_answer(text: str) -> str:
    """VQA answer normalisation: lower case, strip punctuation and articles, number words → digits."""
    words = re.sub(r"[^\w\s]", " ", str(text).lower()).split()
    words = [_NUMBER_WORDS.get(w, w) for w in words if w not in ("a", "an", "the")]
    return " ".join(words)


def question_ids(pool: str | None = None, qtype: str | None = None) -> list[int]:
    """Ids of the questions of a pool ('seen' / 'unseen') and/or type."""
    return [q.id for q in QUESTIONS if (pool is None or q.pool == pool) and (qtype is None or q.qtype == qtype)]


def _ellipse(xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    return ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0


def _lesion_shape(xx, yy, cx, cy, r, irregular: bool, rng: np.random.Generator) -> np.ndarray:
    """A round (cyst) or lobulated (tumour: r(θ) = r·(1 + 0.3 sin(kθ + φ))) lesion."""
    dist = np.hypot(xx - cx, yy - cy)
    if not irregular:
        return dist <= r
    theta = np.arctan2(yy - cy, xx - cx)
    k, phase = int(rng.integers(3, 6)), rng.uniform(0, 2 * np.pi)
    return dist <= r * (1 + 0.3 * np.sin(k * theta + phase))


def _to_px(v: float, size: int) -> float:
    return (v + 1) / 2 * (size - 1)


def generate_sample(index: int, split: str, config: PhantomConfig) -> dict[str, Any]:
    """One phantom sample (image uint8 [H, W, 1] and all targets), deterministic in (seed, split, index)."""
    rng = np.random.default_rng([config.seed, SPLIT_CODES[split], index])
    size, dis = config.size, config.disparity
    lin = np.linspace(-1, 1, size)
    xx, yy = np.meshgrid(lin, lin)
    sex, age = SEXES[int(rng.integers(2))], AGE_GROUPS[int(rng.integers(3))]
    scale = dis.body_scale[sex] * rng.uniform(0.95, 1.05)
    img = np.zeros((size, size))
    mask = np.zeros((size, size), dtype=np.uint8)
    body = _ellipse(xx, yy, rng.uniform(-0.03, 0.03), rng.uniform(0.0, 0.08), 0.86 * scale, 0.70 * scale)
    img[body], mask[body] = 0.40, 1
    enlarged = bool(rng.random() < config.enlarged_liver_prob)
    liver_c = (-0.36 * scale + rng.uniform(-0.03, 0.03), -0.08 * scale + rng.uniform(-0.03, 0.03))
    liver_r = np.array([0.30, 0.26]) * scale * (1.3 if enlarged else 1.0) * rng.uniform(0.93, 1.07)
    liver = _ellipse(xx, yy, *liver_c, *liver_r) & body
    img[liver], mask[liver] = 0.55 + rng.uniform(-0.03, 0.03), 2
    kid_int = 0.62 + rng.uniform(-0.03, 0.03)
    kidneys = []
    for side in (-1, 1):
        c = (side * 0.38 * scale + rng.uniform(-0.03, 0.03), 0.34 * scale + rng.uniform(-0.03, 0.03))
        region = _ellipse(xx, yy, *c, 0.11 * scale, 0.15 * scale) & body & ~liver
        img[region], mask[region] = kid_int, 3
        kidneys.append((c, region))
    spine_c = (rng.uniform(-0.03, 0.03), 0.50 * scale)
    spine = _ellipse(xx, yy, *spine_c, 0.10 * scale, 0.09 * scale)
    img[spine], mask[spine] = 0.95, 4
    lesions = _draw_lesions(rng, config, xx, yy, img, mask, sex, age, liver_c, liver_r, kidneys)
    img = gaussian_filter(img, config.blur_sigma) + rng.normal(0, dis.noise_sigma[age], img.shape)
    image = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)[..., None]
    landmarks = np.array([spine_c, liver_c, kidneys[0][0], kidneys[1][0]], dtype=np.float32)
    landmarks = np.stack([_to_px(landmarks[:, 0], size), _to_px(landmarks[:, 1], size)], 1).astype(np.float32)
    main = max(lesions, key=lambda les: les["area"]) if lesions else None
    return {
        "image": image, "mask": mask, "landmarks": landmarks,
        "label": int(bool(lesions)), "lesion_type": LESION_TYPES.index(main["type"]) if main else 0,
        "findings": [float(bool(lesions)), float(len(lesions) > 1), float(enlarged)],
        "sex": sex, "age_group": age, "n_lesions": len(lesions),
        "vqa": _answers(lesions, main),
    }


def _draw_lesions(rng, config, xx, yy, img, mask, sex, age, liver_c, liver_r, kidneys) -> list[dict[str, Any]]:
    dis = config.disparity
    lesions: list[dict[str, Any]] = []
    if rng.random() >= dis.prevalence[age]:
        return lesions
    count = 2 if rng.random() < config.second_lesion_prob else 1
    for _ in range(count):
        in_liver = rng.random() < 0.85
        if in_liver:
            organ, organ_int = "liver", 0.55
            ang, rad = rng.uniform(0, 2 * np.pi), np.sqrt(rng.uniform(0, 1)) * 0.5
            cx, cy = liver_c[0] + np.cos(ang) * rad * liver_r[0], liver_c[1] + np.sin(ang) * rad * liver_r[1]
            large = rng.random() < 0.5
            r = rng.uniform(0.11, 0.15) if large else rng.uniform(0.065, 0.09)
        else:
            organ, organ_int = "kidney", 0.62
            (cx, cy), _ = kidneys[int(rng.integers(2))]
            large = False
            r = rng.uniform(0.05, 0.07)
        kind = "cyst" if rng.random() < 0.5 else "tumour"
        region = _lesion_shape(xx, yy, cx, cy, r, kind == "tumour", rng) & (mask > 0)
        delta = 0.30 * dis.lesion_contrast[sex] * (-1 if kind == "cyst" else 1)
        img[region], mask[region] = organ_int + delta, 5
        lesions.append({"type": kind, "organ": organ, "large": large, "cy": cy, "area": int(region.sum())})
    return lesions


def _answers(lesions: list[dict[str, Any]], main: dict[str, Any] | None) -> list[int]:
    truth = {
        "presence": "yes" if lesions else "no",
        "count": str(len(lesions)),
        "location": ("upper" if main["cy"] < 0 else "lower") if main else "none",
        "organ": main["organ"] if main else "none",
        "size": ("large" if main["large"] else "small") if main else "none",
        "type": main["type"] if main else "none",
    }
    return [_ANSWER_ID[truth[q.qtype]] for q in QUESTIONS]


def generate(split: str, n: int, config: PhantomConfig, start: int = 0) -> dict[str, Any]:
    """Samples ``start … start+n−1`` of ``split`` as column lists (the layout of the HF dataset)."""
    if split not in SPLIT_CODES:
        raise ValueError(f"unknown split {split!r}; choose one of {tuple(SPLIT_CODES)}")
    samples = [generate_sample(i, split, config) for i in range(start, start + n)]
    columns = {k: [s[k] for s in samples] for k in samples[0]} if samples else {}
    columns["index"] = list(range(start, start + n))
    return columns
