"""Acquisition sites of the phantom world, for domain-shift evaluation (train on one site, test on another).

Models trained on one hospital's scanners fail on another's: intensity response, noise, resolution and field of view
change, and so does the patient mix. DGSSA (retinal vessel segmentation across DRIVE / CHASEDB / HRF / STARE) and the
domain-generalisation literature evaluate exactly that: train on a source site, test on unseen ones. A :class:`Site`
describes one acquisition protocol and its population; every number is configurable
(``PhantomConfig(site=Site(...))``):

| setting | meaning | A (reference) | B | C |
|---|---|---|---|---|
| ``gain``, ``offset``, ``gamma`` | intensity response ``v' = offset + gain · v^gamma`` of the noiseless blurred slice | 1, 0, 1 | 0.80, 0.10, 1.30 | 1.15, −0.05, 0.80 |
| ``noise_scale`` | × the age group's noise σ | 1.0 | 1.6 | 0.7 |
| ``resolution`` | acquisition down-sampling factor (area-averaged down, bilinear back up) | 1.0 | 1.6 | 1.0 |
| ``fov`` | field of view (the body appears ``1 / fov`` as large) | 1.0 | 1.15 | 0.90 |
| ``p_female`` | P(sex = F) | 0.50 | 0.70 | 0.35 |
| ``age_mix`` | P(young, middle, old) | 1/3 each | 0.15, 0.35, 0.50 | 0.50, 0.35, 0.15 |

**Site A is the default world**: with ``site=None`` nothing changes, so every victim trained on ``phantom.ct`` is a
site-A model, and ``phantom.ct`` is site A's data. A site other than A draws sex and age from its own mix (so the
stream of random numbers, and the patients, differ from ``phantom.ct``), scales the anatomy by ``1 / fov`` (masks and
landmarks follow), applies the intensity response to the blurred slice, then the resolution loss, then noise of
``noise_scale ×`` the age group's σ. Masks stay at full resolution (the ground truth does not degrade with the
scanner). The built-in disparity (fainter lesions for F, noisier images for old patients) holds at every site, and
B's population is older and more often F: the patients who are hardest in the default world are the majority at the
worse-imaging site, so a generalisation gap and a fairness gap compound there.

Datasets: ``phantom.site_b``, ``phantom.site_c`` (one site each) and ``phantom.sites`` (sample ``i`` from site
``SITE_ORDER[i % 3]``, with the attribute ``site``, so one grid evaluates every site and the fairness columns break
results down per site).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

AGE_GROUPS = ("young", "middle", "old")
SITE_ORDER = ("A", "B", "C")


@dataclass(frozen=True)
class Site:
    """One acquisition site (see the module docstring for the meaning of each field)."""

    name: str = "A"
    gain: float = 1.0
    offset: float = 0.0
    gamma: float = 1.0
    noise_scale: float = 1.0
    resolution: float = 1.0
    fov: float = 1.0
    p_female: float = 0.5
    age_mix: tuple[float, float, float] = field(default=(1 / 3, 1 / 3, 1 / 3))

    def __post_init__(self) -> None:
        object.__setattr__(self, "age_mix", tuple(float(p) for p in self.age_mix))
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a site needs a non-empty name, got {self.name!r}")
        for key in ("gain", "gamma", "noise_scale", "fov"):
            if not float(getattr(self, key)) > 0:
                raise ValueError(f"Site.{key} must be > 0, got {getattr(self, key)!r}")
        if not self.resolution >= 1.0:
            raise ValueError(f"Site.resolution is a down-sampling factor >= 1, got {self.resolution!r}")
        if not 0.0 <= self.p_female <= 1.0:
            raise ValueError(f"Site.p_female must lie in [0, 1], got {self.p_female!r}")
        if len(self.age_mix) != 3 or min(self.age_mix) < 0 or abs(sum(self.age_mix) - 1.0) > 1e-6:
            raise ValueError(f"Site.age_mix needs three probabilities (young, middle, old) summing to 1, got {self.age_mix}")


SITES: dict[str, Site] = {
    "A": Site("A"),
    "B": Site("B", gain=0.80, offset=0.10, gamma=1.30, noise_scale=1.6, resolution=1.6, fov=1.15, p_female=0.70,
              age_mix=(0.15, 0.35, 0.50)),
    "C": Site("C", gain=1.15, offset=-0.05, gamma=0.80, noise_scale=0.7, resolution=1.0, fov=0.90, p_female=0.35,
              age_mix=(0.50, 0.35, 0.15)),
}


def draw_patient(rng: np.random.Generator, site: Site) -> tuple[str, str]:
    """Sex and age group from the site's population mix."""
    sex = "F" if rng.random() < site.p_female else "M"
    return sex, AGE_GROUPS[int(rng.choice(3, p=np.asarray(site.age_mix)))]


def acquire(blurred: np.ndarray, site: Site, noise: np.ndarray) -> np.ndarray:
    """The site's acquisition of a noiseless blurred slice: intensity response, resolution loss, then ``noise``
    (already scaled by the caller)."""
    img = site.offset + site.gain * np.clip(blurred, 0.0, None) ** site.gamma
    if site.resolution > 1.0:
        t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None, None]
        size = img.shape[-1]
        low = F.interpolate(t, size=max(2, round(size / site.resolution)), mode="area")
        img = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)[0, 0].numpy()
    return img + noise
