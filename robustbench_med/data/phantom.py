"""The embedded default world: a procedural CT-like phantom with masks, landmarks, VQA and patient attributes.

Each sample is an axial 2D slice (default 64×64, 1 channel, uint8) drawn from its own random generator
``numpy.random.default_rng([seed, split_code, index])``: the same seed and index always give the same bytes, whatever
``n`` is requested, and the train / val / test splits (codes 0 / 1 / 2) are disjoint streams. Rendering is
vectorised per image with numpy (about 1–2 ms an image on one core).

**Anatomy** (coordinates in [−1, 1], x to the image right, y down; ``s`` = body scale, jitter ±0.03 on positions):

| structure | shape | intensity (uint8 = 255 × value) |
|---|---|---|
| body | ellipse (0.86 s, 0.70 s) at (0, U[0, 0.08]), 0.06 s subcutaneous fat rim | soft tissue 0.40, fat 0.30 |
| liver | ellipse (0.30, 0.26)·s·U[0.93, 1.07] at (−0.36 s, −0.08 s), ×1.3 if enlarged (p = 0.15) | 0.55 ± 0.03 |
| kidneys | ellipses (0.11 s, 0.15 s) at (±0.38 s, 0.34 s) | 0.62 ± 0.03 |
| aorta | circle 0.06 s at (0, 0.30 s) | 0.70 (mask class: body) |
| vertebra | ellipse (0.10 s, 0.09 s) at (0, 0.50 s) | bone 0.95 |
| lesions | 1 or 2 (p = 0.25) non-overlapping, 85 % in the liver, 15 % in a kidney, clipped to their organ | organ ± Δ |

A *cyst* is round and hypodense (organ − Δ); a *tumour* is lobulated, r(θ) = r·(1 + 0.3 sin(kθ + φ)), k ∈ {3, 4, 5},
and hyperdense (organ + Δ). Liver lesions are "large" (r ∈ [0.11, 0.15]) or "small" (r ∈ [0.065, 0.09]) with
p = 0.5; kidney lesions are small (r ∈ [0.05, 0.07]); all radii are multiplied by s. Lesions stay ≥ 3 px apart, so
``n_lesions`` is the number of connected lesion regions. The image is blurred (Gaussian, σ = ``blur_sigma`` px),
Gaussian noise of σ_noise is added, and the result is clipped to [0, 1] and quantised.

**Patient attributes and the built-in disparity** (:class:`Disparity`, every number configurable). Sex is F / M and
the age group young / middle / old, each uniform. Then

- lesion contrast Δ = ``lesion_delta`` · ``lesion_contrast[sex]`` · U[0.85, 1.15], with ``lesion_delta`` = 0.30;
- P(lesion present) = ``prevalence[age_group]``;
- σ_noise = ``noise_sigma[age_group]``;
- body scale s = ``body_scale[sex]`` · U[0.95, 1.05].

| attribute | default effect |
|---|---|
| sex F / M | lesion contrast ×0.45 / ×1.0; body scale ×0.92 / ×1.0 (organs and lesions scale with it) |
| age young / middle / old | lesion prevalence 0.30 / 0.50 / 0.70; noise σ 0.030 / 0.045 / 0.070 |

So a model trained on the phantom detects and segments lesions worse for "F" (fainter lesions) and for "old"
patients (noisier images): a real, measurable gap for the fairness metrics. ``Disparity.none()`` removes it.
Measured with the defaults on one CPU thread: ``cnn.phantom`` trained by its recipe (48 s) has test accuracy (1,500
images) F 0.885 / M 0.936 and young 0.938 / middle 0.923 / old 0.870; ``unet.phantom``'s U-Net trained 10 epochs on
1,000 images (4 min) has lesion Dice (485 test images with a lesion) F 0.746 / M 0.824 and young 0.800 /
middle 0.801 / old 0.762.

**Targets per image:** ``label`` (lesion present), ``lesion_type`` (0 none, 1 cyst, 2 tumour; the largest lesion),
``n_lesions``, ``findings`` (lesion present, more than one lesion, enlarged liver), ``mask`` (0 background, 1 body,
2 liver, 3 kidneys, 4 spine, 5 lesion), ``landmarks`` ((x, y) px of the vertebra centre, the liver centroid, the
image-left and the image-right kidney centroids), ``vqa`` (the answer id of every question in :data:`QUESTIONS`;
answers index :data:`ANSWERS`). VQA location is "upper" / "lower" after the largest lesion's centre (image half).

**The shortcut scenario** (:class:`Shortcut`, ``PhantomConfig(shortcut=Shortcut(), disparity=Disparity.sex_neutral())``;
the dataset ``phantom.shortcut``). The default world builds sex into the anatomy (body scale) and the lesion contrast,
so the ground-truth masks themselves predict sex and hiding sex from a segmentor must cost Dice. The shortcut scenario
is APPLE's setting instead (a model *uses* the attribute as a shortcut): the anatomy, lesion sizes, lesion contrast
and prevalence do not depend on sex (:meth:`Disparity.sex_neutral`; :class:`PhantomConfig` refuses a shortcut world
whose sex tables differ), while the *appearance* carries sex: a fixed-phase sinusoidal grating of amplitude
``cue_amplitude`` and period ``cue_period`` px is added inside the body after the blur (like the noise), with
horizontal stripes (varying along y) for F and vertical stripes (along x) for M. The cue draws no random numbers and
never touches the masks, so a patient's anatomy, lesions, noise and mask are the bytes of the same sample without
the cue. The positive control's training distribution is an annotation bias that the sex cue can stand in for: in the
**train split only**, each image of a patient of sex g has its lesions left unannotated with probability
``train_unannotated[g]`` (lesion pixels labelled with their organ in ``mask``; a separate random stream
``[seed, split, index, 1]``, so nothing else changes; ``label``, ``n_lesions``, ``findings`` and ``vqa`` still
describe the true lesions). The val and test splits are unbiased. A segmentor trained on the biased train split can
learn "F stripes → no lesion": a group gap that comes from the shortcut. ``phantom.shortcut`` uses amplitude 0.05,
period 4 px and ``train_unannotated`` F 1.0 / M 0.0; measured (logistic regression, 1,000 train → 400 test slices),
the mask class areas predict sex at 0.54 (majority rate 0.55; the default world: 0.93) and the pixels at 1.00. The
study built on it: ``robustbench_med/grids/fairness_shortcut.yaml``.
"""
from __future__ import annotations

import hashlib
import json
import re
import string
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
from scipy.ndimage import gaussian_filter

from robustbench_med.data.sites import SITES, Site, acquire, draw_patient

GENERATOR_VERSION = 2  # part of the cache key: bump when the rendered bytes change
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
SEXES = ("F", "M")
AGE_GROUPS = ("young", "middle", "old")
MASK_CLASSES = ("background", "body", "liver", "kidneys", "spine", "lesion")
LANDMARKS = ("spine", "liver", "left_kidney", "right_kidney")
LESION_TYPES = ("none", "cyst", "tumour")
FINDINGS = ("lesion", "multiple_lesions", "enlarged_liver")
QTYPES = ("presence", "count", "location", "organ", "size", "type")


@dataclass(frozen=True)
class Disparity:
    """How patient attributes shift appearance and prevalence (formulae in the module docstring)."""

    lesion_contrast: dict[str, float] = field(default_factory=lambda: {"F": 0.45, "M": 1.0})
    body_scale: dict[str, float] = field(default_factory=lambda: {"F": 0.92, "M": 1.0})
    prevalence: dict[str, float] = field(default_factory=lambda: {"young": 0.30, "middle": 0.50, "old": 0.70})
    noise_sigma: dict[str, float] = field(default_factory=lambda: {"young": 0.030, "middle": 0.045, "old": 0.070})

    @classmethod
    def none(cls) -> "Disparity":
        """No group effect: every group gets the mean of the default settings."""
        return cls({"F": 0.725, "M": 0.725}, {"F": 0.96, "M": 0.96}, dict.fromkeys(AGE_GROUPS, 0.5),
                   dict.fromkeys(AGE_GROUPS, 0.048))

    @classmethod
    def sex_neutral(cls) -> "Disparity":
        """Anatomy and lesions independent of sex (the shortcut scenario): every patient gets the default world's
        "M" lesion contrast (×1.0) and body scale (×1.0); the age effects (prevalence, noise) of the defaults stay,
        and age is drawn independently of sex."""
        return cls({"F": 1.0, "M": 1.0}, {"F": 1.0, "M": 1.0})

    def sex_independent(self) -> bool:
        """Whether no sex table differs between the sexes."""
        return all(len(set(getattr(self, t).values())) == 1 for t in ("lesion_contrast", "body_scale"))

    def __post_init__(self) -> None:
        for name, keys in (("lesion_contrast", SEXES), ("body_scale", SEXES), ("prevalence", AGE_GROUPS),
                           ("noise_sigma", AGE_GROUPS)):
            table = getattr(self, name)
            if set(table) != set(keys):
                raise ValueError(f"Disparity.{name} needs exactly the keys {keys}, got {tuple(table)}")
        if not all(0.0 <= p <= 1.0 for p in self.prevalence.values()):
            raise ValueError(f"Disparity.prevalence values must lie in [0, 1], got {self.prevalence}")


@dataclass(frozen=True)
class Shortcut:
    """The shortcut scenario's sex cue and training annotation bias (see the module docstring).

    ``cue_amplitude`` (intensity, 0–1 scale) and ``cue_period`` (px) of the sex-specific grating; ``train_unannotated``
    = P(an image's lesions are left unannotated in the train split | sex).
    """

    cue_amplitude: float = 0.05
    cue_period: float = 4.0
    train_unannotated: dict[str, float] = field(default_factory=lambda: {"F": 1.0, "M": 0.0})

    def __post_init__(self) -> None:
        if set(self.train_unannotated) != set(SEXES):
            raise ValueError(f"Shortcut.train_unannotated needs exactly the keys {SEXES}, got {tuple(self.train_unannotated)}")
        if not all(0.0 <= p <= 1.0 for p in self.train_unannotated.values()):
            raise ValueError(f"Shortcut.train_unannotated values must lie in [0, 1], got {self.train_unannotated}")
        if not self.cue_amplitude >= 0 or not self.cue_period >= 2:
            raise ValueError(f"Shortcut needs cue_amplitude >= 0 and cue_period >= 2 px, got {self.cue_amplitude}, {self.cue_period}")


@dataclass(frozen=True)
class PhantomConfig:
    """Generator settings; :meth:`config_hash` keys the on-disk cache."""

    size: int = 64
    seed: int = 0
    disparity: Disparity = field(default_factory=Disparity)
    lesion_delta: float = 0.30
    enlarged_liver_prob: float = 0.15
    second_lesion_prob: float = 0.25
    kidney_lesion_prob: float = 0.15
    blur_sigma: float = 0.6
    shortcut: Shortcut | None = None
    multiseq: bool = False  # four MRI-like sequences instead of the CT slice (robustbench_med.data.multiseq)
    site: Site | None = None  # an acquisition site (robustbench_med.data.sites); None and site A are the default world

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size < 16:
            raise ValueError(f"size must be an integer ≥ 16, got {self.size!r}")
        if isinstance(self.disparity, dict):
            object.__setattr__(self, "disparity", Disparity(**self.disparity))
        if isinstance(self.shortcut, dict):
            object.__setattr__(self, "shortcut", Shortcut(**self.shortcut))
        if self.shortcut is not None and not self.disparity.sex_independent():
            raise ValueError("the shortcut scenario needs anatomy independent of sex: give a disparity whose "
                             "lesion_contrast and body_scale are equal for F and M (e.g. Disparity.sex_neutral())")
        if isinstance(self.site, dict):
            object.__setattr__(self, "site", Site(**self.site))
        if self.site is not None and not isinstance(self.site, Site):
            raise ValueError(f"site must be a Site (or a dict of its fields), got {self.site!r}")
        if self.site is not None and (self.shortcut is not None or self.multiseq):
            raise ValueError("a site cannot be combined with the shortcut scenario or multi-sequence rendering")
        if self.multiseq is not False and (self.multiseq is not True or self.shortcut is not None):
            raise ValueError(f"multiseq must be True or False and cannot be combined with a shortcut, got {self.multiseq!r}")

    def acquisition_site(self) -> Site | None:
        """The site whose acquisition applies, or None for the default world (no site, or site A's reference)."""
        return None if self.site is None or self.site == SITES["A"] else self.site

    def config_hash(self) -> str:
        """12 hex digits of sha256 over the settings and :data:`GENERATOR_VERSION` (stable across runs). Without a
        shortcut (multi-sequence rendering, a site other than the reference) the ``shortcut`` (``multiseq``, ``site``)
        field is left out, so the default world's hash (and cache) predates those fields."""
        settings = asdict(self)
        if settings["shortcut"] is None:
            del settings["shortcut"]
        if not settings["multiseq"]:
            del settings["multiseq"]
        if self.acquisition_site() is None:
            del settings["site"]
        blob = json.dumps({"v": GENERATOR_VERSION, **settings}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------------------------------- VQA bank
@dataclass(frozen=True)
class Question:
    """A VQA question; ``pool`` 'seen' (training phrasings) or 'unseen' (held-out phrasings of the same ``qtype``)."""

    id: int
    text: str
    qtype: str
    pool: str


_PHRASINGS = {
    "presence": (("Is there a lesion?", "Is a lesion visible?", "Does the scan show a lesion?"),
                 ("Can you see any lesion in this image?", "Is any lesion present?", "Are there signs of a lesion?")),
    "count": (("How many lesions are there?", "How many lesions are visible?", "What is the number of lesions?"),
              ("Count the lesions in the image.", "How many lesions can be seen?",
               "What number of lesions does the scan show?")),
    "location": (("Where is the lesion located?", "In which half of the image is the lesion?", "Where is the lesion?"),
                 ("Which part of the image contains the lesion?", "Is the lesion in the upper or lower part?",
                  "Where can the lesion be found?")),
    "organ": (("Which organ contains the lesion?", "In which organ is the lesion?", "What organ has the lesion?"),
              ("The lesion is located in which organ?", "Which organ is affected by the lesion?",
               "Where, by organ, is the lesion?")),
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
# Probe questions about the image that share no type with the bank's six (all about *the lesion*): they ask about the
# organs. They have no reference answers (nothing is trained or scored on them) and use only words of the tiny LVLMs'
# closed vocabulary. A query-agnostic attack built from them never sees a question of an evaluated type
# (``pool='unrelated'`` of the QAVA attacks).
UNRELATED_QUESTIONS: tuple[str, ...] = (
    "Is there a liver?", "Is the liver visible?", "How large is the liver?", "Where is the liver located?",
    "Which part of the image contains the liver?", "Describe the liver size.", "Can you see the kidney?",
    "Is the kidney small or large?", "Where can the kidney be found?", "Which organ is in the upper part of the image?",
)
ANSWERS: tuple[str, ...] = ("no", "yes", "0", "1", "2", "upper", "lower", "none", "liver", "kidney", "small", "large",
                            "cyst", "tumour")
_ANSWER_ID = {a: i for i, a in enumerate(ANSWERS)}
_NUMBER_WORDS = {"zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def answer_text(answer_id: int) -> str:
    """The answer string of ``answer_id`` (an index into :data:`ANSWERS`)."""
    return ANSWERS[int(answer_id)]


def answer_id(text: str) -> int:
    """The id of a (free-text) answer after :func:`normalize_answer`; −1 if it is not in :data:`ANSWERS`."""
    return _ANSWER_ID.get(normalize_answer(text), -1)


def normalize_answer(text: str) -> str:
    """VQA answer normalisation (Antol et al., ICCV 2015): lower case, strip punctuation and articles, number
    words → digits, collapse white space."""
    words = _PUNCT.sub(" ", str(text).lower()).split()
    return " ".join(_NUMBER_WORDS.get(w, w) for w in words if w not in _ARTICLES)


def question_ids(pool: str | None = None, qtype: str | None = None) -> list[int]:
    """Ids of the questions of a pool ('seen' / 'unseen') and/or type."""
    return [q.id for q in QUESTIONS if (pool is None or q.pool == pool) and (qtype is None or q.qtype == qtype)]


def vqa_answers(lesions: list[dict[str, Any]]) -> list[int]:
    """Answer id of every question in :data:`QUESTIONS` for an image with ``lesions`` (the largest one speaks)."""
    main = max(lesions, key=lambda les: les["area"]) if lesions else None
    truth = {
        "presence": "yes" if lesions else "no",
        "count": str(len(lesions)),
        "location": ("upper" if main["cy"] < 0 else "lower") if main else "none",
        "organ": main["organ"] if main else "none",
        "size": ("large" if main["large"] else "small") if main else "none",
        "type": main["type"] if main else "none",
    }
    return [_ANSWER_ID[truth[q.qtype]] for q in QUESTIONS]


# ------------------------------------------------------------------------------------------------------ drawing
@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    lin = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    xx, yy = np.meshgrid(lin, lin)
    xx.flags.writeable = yy.flags.writeable = False
    return xx, yy


def _ellipse(cx: float, cy: float, rx: float, ry: float, size: int) -> np.ndarray:
    xx, yy = _grid(size)
    return ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0


def _to_px(v: np.ndarray, size: int) -> np.ndarray:
    return (np.asarray(v) + 1.0) / 2.0 * (size - 1)


def _centroid(region: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(region)
    return float(xs.mean()), float(ys.mean())


def _jitter(rng: np.random.Generator, amount: float = 0.03) -> float:
    return float(rng.uniform(-amount, amount))


def _anatomy(rng: np.random.Generator, config: PhantomConfig, sex: str) -> dict[str, Any]:
    """Draw body, liver, kidneys, aorta and vertebra into a float image and a label mask."""
    size = config.size
    site = config.acquisition_site()
    s = config.disparity.body_scale[sex] * rng.uniform(0.95, 1.05) / (site.fov if site is not None else 1.0)
    img = np.zeros((size, size), dtype=np.float32)
    mask = np.zeros((size, size), dtype=np.uint8)
    bc, br = (_jitter(rng), rng.uniform(0.0, 0.08)), (0.86 * s, 0.70 * s)
    body = _ellipse(*bc, *br, size)
    img[body], mask[body] = 0.30, 1
    img[_ellipse(*bc, br[0] - 0.06 * s, br[1] - 0.06 * s, size)] = 0.40
    enlarged = bool(rng.random() < config.enlarged_liver_prob)
    liver_c = (-0.36 * s + _jitter(rng), -0.08 * s + _jitter(rng))
    liver_r = (np.array([0.30, 0.26]) * s * (1.3 if enlarged else 1.0) * rng.uniform(0.93, 1.07)).tolist()
    liver = _ellipse(*liver_c, *liver_r, size) & body
    liver_int = 0.55 + _jitter(rng)
    img[liver], mask[liver] = liver_int, 2
    kid_int = 0.62 + _jitter(rng)
    kidneys = []
    for side in (-1, 1):
        c = (side * 0.38 * s + _jitter(rng), 0.34 * s + _jitter(rng))
        region = _ellipse(*c, 0.11 * s, 0.15 * s, size) & body & ~liver
        img[region], mask[region] = kid_int, 3
        kidneys.append(region)
    img[_ellipse(_jitter(rng, 0.02), 0.30 * s, 0.06 * s, 0.06 * s, size) & (mask == 1)] = 0.70
    spine_c = (_jitter(rng), 0.50 * s)
    spine = _ellipse(*spine_c, 0.10 * s, 0.09 * s, size) & body
    img[spine], mask[spine] = 0.95, 4
    landmarks = [tuple(_to_px(np.array(spine_c), size)), _centroid(liver), _centroid(kidneys[0]), _centroid(kidneys[1])]
    return {"s": s, "img": img, "mask": mask, "enlarged": enlarged, "liver": liver, "liver_c": liver_c,
            "liver_r": liver_r, "liver_int": liver_int, "kidneys": kidneys, "kid_int": kid_int, "landmarks": landmarks}


def _lesion_region(rng: np.random.Generator, cx: float, cy: float, r: float, tumour: bool, size: int) -> np.ndarray:
    """A round (cyst) or lobulated (tumour: r(θ) = r·(1 + 0.3 sin(kθ + φ))) lesion region."""
    xx, yy = _grid(size)
    dist = np.hypot(xx - cx, yy - cy)
    if not tumour:
        return dist <= r
    k, phase = int(rng.integers(3, 6)), rng.uniform(0, 2 * np.pi)
    return dist <= r * (1 + 0.3 * np.sin(k * np.arctan2(yy - cy, xx - cx) + phase))


def _place_lesion(rng: np.random.Generator, config: PhantomConfig, a: dict[str, Any]) -> dict[str, Any]:
    """Organ, centre, radius, type and intensity of one lesion (not yet drawn)."""
    if rng.random() >= config.kidney_lesion_prob:
        ang, rad = rng.uniform(0, 2 * np.pi), np.sqrt(rng.uniform(0, 1)) * 0.5
        cx = a["liver_c"][0] + np.cos(ang) * rad * a["liver_r"][0]
        cy = a["liver_c"][1] + np.sin(ang) * rad * a["liver_r"][1]
        large = bool(rng.random() < 0.5)
        r = a["s"] * (rng.uniform(0.11, 0.15) if large else rng.uniform(0.065, 0.09))
        organ, region, base = "liver", a["liver"], a["liver_int"]
    else:
        side = int(rng.integers(2))
        region = a["kidneys"][side]
        cx, cy = (v / (config.size - 1) * 2 - 1 for v in a["landmarks"][2 + side])
        large, r = False, a["s"] * rng.uniform(0.05, 0.07)
        organ, base = "kidney", a["kid_int"]
    kind = "cyst" if rng.random() < 0.5 else "tumour"
    return {"organ": organ, "organ_region": region, "cx": float(cx), "cy": float(cy), "r": float(r), "large": large,
            "type": kind, "base": base}


_PLACEMENT_TRIES = 6


def _draw_lesions(rng: np.random.Generator, config: PhantomConfig, a: dict[str, Any], sex: str,
                  age: str) -> list[dict[str, Any]]:
    """0–2 separate lesions (up to 6 placement tries each) drawn into ``a['img']`` / ``a['mask']``; returns their
    descriptions (organ, centre, radius, size class, type, area in px, contrast)."""
    dis, size = config.disparity, config.size
    if rng.random() >= dis.prevalence[age]:
        return []
    count = 2 if rng.random() < config.second_lesion_prob else 1
    lesions: list[dict[str, Any]] = []
    taken = np.zeros((size, size), dtype=bool)
    gap = 3 * 2.0 / (size - 1)  # lesions stay ≥ 3 px apart, so the count is the number of connected regions
    for _ in range(count * _PLACEMENT_TRIES):
        if len(lesions) == count:
            break
        les = _place_lesion(rng, config, a)
        shape = _lesion_region(rng, les["cx"], les["cy"], les["r"], les["type"] == "tumour", size)
        region = shape & les.pop("organ_region")
        grown = _ellipse(les["cx"], les["cy"], 1.3 * les["r"] + gap, 1.3 * les["r"] + gap, size)
        if region.sum() < 3 or (grown & taken).any():  # too small once clipped, or too close to the first lesion
            continue
        delta = config.lesion_delta * dis.lesion_contrast[sex] * rng.uniform(0.85, 1.15)
        a["img"][region] = les.pop("base") + (-delta if les["type"] == "cyst" else delta)
        a["mask"][region] = 5
        taken |= region
        lesions.append({**les, "area": int(region.sum()), "contrast": float(delta)})
    return lesions


def sex_cue(sex: str, body: np.ndarray, shortcut: Shortcut) -> np.ndarray:
    """The shortcut scenario's appearance cue: ``A·sin(2π·t / period)`` inside ``body`` (a bool [H, W] mask), with
    t the row index for F (horizontal stripes) and the column index for M (vertical stripes); 0 outside the body."""
    size = body.shape[0]
    t = np.arange(size, dtype=np.float32)
    wave = shortcut.cue_amplitude * np.sin(2 * np.pi * t / shortcut.cue_period)
    pattern = np.broadcast_to(wave[:, None] if sex == "F" else wave[None, :], body.shape)
    return np.where(body, pattern, 0.0).astype(np.float32)


def generate_sample(index: int, split: str, config: PhantomConfig) -> dict[str, Any]:
    """One phantom sample (image uint8 [H, W, 1], or [H, W, 4] for ``multiseq``, and all targets), deterministic in
    (seed, split, index)."""
    rng = np.random.default_rng([config.seed, SPLIT_CODES[split], index])
    site = config.acquisition_site()
    sex, age = draw_patient(rng, site) if site is not None else (SEXES[int(rng.integers(2))], AGE_GROUPS[int(rng.integers(3))])
    a = _anatomy(rng, config, sex)
    organs = a["mask"].copy() if config.shortcut is not None else None
    lesions = _draw_lesions(rng, config, a, sex, age)
    noise = rng.normal(0.0, config.disparity.noise_sigma[age] * (site.noise_scale if site is not None else 1.0), a["img"].shape)
    img = gaussian_filter(a["img"], config.blur_sigma)
    img = img + noise if site is None else acquire(img, site, noise)
    if config.shortcut is not None:
        img = img + sex_cue(sex, a["mask"] > 0, config.shortcut)
        bias = config.shortcut.train_unannotated[sex] if split == "train" else 0.0
        if lesions and bias > 0 and np.random.default_rng([config.seed, SPLIT_CODES[split], index, 1]).random() < bias:
            lesion = a["mask"] == 5
            a["mask"][lesion] = organs[lesion]  # the lesions are there, only their annotation is missing
    if config.multiseq:
        from robustbench_med.data.multiseq import render

        image = render(a, config.lesion_delta, config.blur_sigma, config.disparity.noise_sigma[age], rng)
    else:
        image = (np.clip(img, 0.0, 1.0) * 255.0).round().astype(np.uint8)[..., None]
    main = max(lesions, key=lambda les: les["area"]) if lesions else None
    return {
        "image": image,
        "mask": a["mask"],
        "landmarks": np.asarray(a["landmarks"], dtype=np.float32),
        "label": int(bool(lesions)),
        "lesion_type": LESION_TYPES.index(main["type"]) if main else 0,
        "n_lesions": len(lesions),
        "findings": [float(bool(lesions)), float(len(lesions) > 1), float(a["enlarged"])],
        "sex": sex,
        "age_group": age,
        "vqa": vqa_answers(lesions),
    }


def generate(split: str, n: int, config: PhantomConfig, start: int = 0) -> dict[str, Any]:
    """Samples ``start … start+n−1`` of ``split`` as column lists (the layout of the HF dataset)."""
    if split not in SPLIT_CODES:
        raise ValueError(f"unknown split {split!r}; choose one of {tuple(SPLIT_CODES)}")
    samples = [generate_sample(i, split, config) for i in range(start, start + n)]
    columns: dict[str, Any] = {k: [s[k] for s in samples] for k in samples[0]} if samples else {}
    columns["index"] = list(range(start, start + n))
    return columns
