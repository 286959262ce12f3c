"""The multi-sequence phantom (``phantom.multiseq``): the CT phantom's patients imaged in four MRI-like sequences.

Multi-modal MRI segmentation (BraTS: T1, T1ce, T2, FLAIR; MyoPS: bSSFP, LGE, T2) is where missing modalities happen
in the clinic: a sequence is not acquired, is corrupted by motion, or fails quality control. DMAF-Net (Lan, Li, Xia &
Zhang, "DMAF-Net: An Effective Modality Rebalancing Framework for Incomplete Multi-Modal Medical Image Segmentation",
arXiv 2506.11691) and its predecessors (HeMIS, RFNet, mmFormer) evaluate a model on every subset of the available
sequences. This module gives the suite such data without a download.

**Same patients as** ``phantom.ct``: sample ``i`` of a split draws its anatomy, lesions, attributes and mask from the
same random stream as ``phantom.ct``'s sample ``i`` (:func:`robustbench_med.data.phantom.generate_sample`), so masks,
landmarks, labels and attributes are identical; only the image differs. Each pixel's *tissue* is read back from the
CT rendering (fat rim, soft tissue, aorta, liver, kidney, spine, cyst, tumour) and given a sequence-specific
intensity from :data:`INTENSITY` (a stylised abdominal MRI: fat bright on T1, fluid bright on T2 and suppressed on
FLAIR, enhancing tissue bright on T1ce, flowing blood dark except after contrast). A lesion keeps its CT contrast
factor ``f = |Δ_CT| / lesion_delta`` (sex × U[0.85, 1.15]; the default world's disparity): in every sequence its
intensity is ``organ + f · (lesion − organ)`` with the table's full-contrast lesion value, so F patients' lesions are
fainter in every sequence, as in the CT world. Liver and kidney keep their per-patient intensity jitter.

| tissue | T1 | T1ce | T2 | FLAIR |
|---|---|---|---|---|
| fat rim | 0.80 | 0.75 | 0.60 | 0.55 |
| soft tissue | 0.40 | 0.45 | 0.35 | 0.35 |
| aorta | 0.08 | 0.90 | 0.10 | 0.10 |
| liver | 0.55 | 0.60 | 0.30 | 0.35 |
| kidney | 0.40 | 0.80 | 0.60 | 0.45 |
| spine | 0.65 | 0.70 | 0.40 | 0.40 |
| cyst | 0.15 | 0.15 | 0.95 | 0.20 |
| tumour | 0.45 | 0.90 | 0.60 | 0.75 |

So no sequence shows everything: a cyst is dark on T1 / T1ce and bright on T2 but nearly iso on FLAIR in the liver
(0.20 vs 0.35); a tumour is iso on T1 (0.45 vs 0.55), bright on T1ce and FLAIR; kidney and liver are nearly iso on
T1. Losing sequences therefore costs lesion and organ Dice in a way that depends on which ones are lost, which is
what a missing-modality study measures. Each channel is blurred like the CT image (σ = ``blur_sigma``) and gets its
own Gaussian noise of the age group's σ (drawn after the CT noise from the sample's stream), then clipped and
quantised to uint8. Images are ``[H, W, 4]`` in the order :data:`SEQUENCES`.

A **missing sequence** is an all-zero channel (the zero-filling convention of the BraTS missing-modality literature):
:mod:`robustbench_med.attacks.modality` drops sequences that way, and the victims of
:mod:`robustbench_med.victims.multimodal` read an all-zero channel as "not acquired". No rendered channel is ever all
zero (the body is always in the field of view).
"""
from __future__ import annotations

from typing import Any

import numpy as np
from scipy.ndimage import gaussian_filter

SEQUENCES = ("t1", "t1ce", "t2", "flair")
TISSUES = ("background", "fat", "soft", "aorta", "liver", "kidney", "spine", "cyst", "tumour")
INTENSITY: dict[str, tuple[float, ...]] = {  # per tissue of TISSUES[1:], in the order of SEQUENCES
    "fat": (0.80, 0.75, 0.60, 0.55),
    "soft": (0.40, 0.45, 0.35, 0.35),
    "aorta": (0.08, 0.90, 0.10, 0.10),
    "liver": (0.55, 0.60, 0.30, 0.35),
    "kidney": (0.40, 0.80, 0.60, 0.45),
    "spine": (0.65, 0.70, 0.40, 0.40),
    "cyst": (0.15, 0.15, 0.95, 0.20),
    "tumour": (0.45, 0.90, 0.60, 0.75),
}
# the CT phantom's nominal liver / kidney intensities: a patient's jitter is its offset from these
CT_LIVER, CT_KIDNEY = 0.55, 0.62


def sequence_index(name: str | int) -> int:
    """The channel of sequence ``name`` (``'t1'`` … ``'flair'``, case-insensitive) or of a channel number."""
    if isinstance(name, (int, np.integer)) and not isinstance(name, bool):
        if not 0 <= int(name) < len(SEQUENCES):
            raise ValueError(f"sequence channel {name} out of range 0..{len(SEQUENCES) - 1}")
        return int(name)
    key = str(name).strip().lower()
    if key not in SEQUENCES:
        raise ValueError(f"unknown sequence {name!r}; choose from {SEQUENCES}")
    return SEQUENCES.index(key)


def render(a: dict[str, Any], lesion_delta: float, blur_sigma: float, noise_sigma: float,
           rng: np.random.Generator) -> np.ndarray:
    """The four sequences of one patient as uint8 ``[H, W, 4]``.

    ``a`` is :func:`robustbench_med.data.phantom._anatomy`'s output *after* the lesions were drawn into it (``img``
    holds the noiseless CT rendering, ``mask`` the labels); the tissues are read back from them (see the module
    docstring)."""
    ct, mask = a["img"], a["mask"]
    liver_j, kid_j = a["liver_int"] - CT_LIVER, a["kid_int"] - CT_KIDNEY
    regions = {
        "fat": (mask == 1) & np.isclose(ct, 0.30), "soft": (mask == 1) & np.isclose(ct, 0.40),
        "aorta": (mask == 1) & np.isclose(ct, 0.70), "liver": mask == 2, "kidney": mask == 3, "spine": mask == 4,
    }
    lesion = mask == 5
    in_liver = lesion & a["liver"]
    base_ct = np.where(in_liver, a["liver_int"], a["kid_int"])
    factor = np.abs(ct - base_ct) / lesion_delta  # the lesion's contrast factor (sex × U[0.85, 1.15])
    cyst = lesion & (ct < base_ct)
    channels = []
    for s in range(len(SEQUENCES)):
        img = np.zeros_like(ct)
        for tissue, region in regions.items():
            jitter = liver_j if tissue == "liver" else kid_j if tissue == "kidney" else 0.0
            img[region] = INTENSITY[tissue][s] + jitter
        organ = np.where(in_liver, INTENSITY["liver"][s] + liver_j, INTENSITY["kidney"][s] + kid_j)
        full = np.where(cyst, INTENSITY["cyst"][s], INTENSITY["tumour"][s])
        img[lesion] = (organ + factor * (full - organ))[lesion]
        channels.append(gaussian_filter(img, blur_sigma) + rng.normal(0.0, noise_sigma, img.shape))
    out = np.clip(np.stack(channels, -1), 0.0, 1.0)
    return (out * 255.0).round().astype(np.uint8)
