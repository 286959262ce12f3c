"""Common corruptions as threat models: ``corruption.<kind>``, five severities, a fixed seed per sample.

ImageNet-C (Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and
Perturbations", ICLR 2019) measures robustness to *non-adversarial* shifts: each corruption at five severities,
reported as mean corruption accuracy and corruption error relative to a baseline model (mCE). MedMNIST-C (Di Salvo,
Doerrich, Rieger & Ledig, "MedMNIST-C: Comprehensive benchmark and improved classifier robustness by simulating
realistic image corruptions", 2024) carries the idea to medical images with modality-specific corruptions. Here the
MRI/CT acquisition artefacts come from the field's libraries — TorchIO (Pérez-García, Sparks & Ourselin, "TorchIO: a
Python library for efficient loading, preprocessing, augmentation and patch-based sampling of medical images in deep
learning", Computer Methods and Programs in Biomedicine 2021) and MONAI (Cardoso et al., 2022) — called with explicit,
deterministic parameters; JPEG, pixelation and contrast use PIL and torchvision.

A corruption is an :class:`~robustbench_med.attack.Attack` with knowledge ``'none'`` and a threat model of its own
kind (``norm='corruption'``; ``eps`` holds the severity, see :mod:`robustbench_med.threat`), so it runs in the same
grid, store and leaderboard as the attacks: ``{name: corruption.motion, params: {severity: [1, 2, 3, 4, 5]}}`` is
five cells. The victim is never queried.

Severity parameters (severity 0 returns the input bit for bit; every parameter is monotone in severity):

==================  ==============================  =========================  ==================================
kind                parameter                       severities 1 → 5           built on
==================  ==============================  =========================  ==================================
``bias_field``      max abs. polynomial coefficient 0.1, 0.2, 0.3, 0.4, 0.5    ``tio.BiasField`` (order 3)
``motion``          max rotation (°) /              2, 4, 6, 8, 10 /           ``tio.Motion`` (2 movements)
                    max translation (px)            0.7, 1.4, 2.1, 2.8, 3.5
``ghosting``        ghost intensity                 0.2, 0.35, 0.5, 0.75, 1.0  ``tio.Ghosting`` (4–10 ghosts)
``spike``           spike intensity (× max |k|)     0.05, 0.1, 0.2, 0.3, 0.5   ``tio.Spike`` (1 spike)
``gibbs``           k-space truncation alpha        0.2, 0.35, 0.5, 0.65, 0.8  ``monai.transforms.GibbsNoise``
``gaussian_noise``  noise std                       0.02, 0.04, 0.06, 0.09,    ``tio.Noise``
                                                    0.12
``rician_noise``    std of each Gaussian component  0.02, 0.04, 0.06, 0.09,    ``monai.transforms.RandRicianNoise``
                                                    0.12
``blur``            Gaussian std (px)               0.5, 0.75, 1.0, 1.5, 2.0   ``tio.Blur``
``gamma``           abs. log gamma (random sign)    0.1, 0.2, 0.3, 0.45, 0.6   ``tio.Gamma``
``contrast``        contrast factor                 0.8, 0.65, 0.5, 0.35, 0.2  ``torchvision adjust_contrast``
``downsample``      down-sampling factor, one axis  1.5, 2, 3, 4, 5            ``tio.RandomAnisotropy`` (fixed)
``pixelate``        resize factor (box ↓, box ↑;    0.6, 0.5, 0.4, 0.3, 0.25   PIL ``Image.BOX``
                    ImageNet-C's)
``jpeg``            JPEG quality (ImageNet-C's)     25, 18, 15, 10, 7          PIL
==================  ==============================  =========================  ==================================

The ranges start from the libraries' random-augmentation defaults — TorchIO: bias-field coefficients ≤ 0.5 (severity
5 is the default), motion 10° / 10 mm on a ~180 mm field of view (3.5 px on the 64 px phantom: severity 5), ghosting
intensity 0.5–1, blur std ≤ 2, anisotropy 1.5–5; MONAI: Gibbs alpha in [0, 1] — and from ImageNet-C's levels for
JPEG and pixelation. Where they would not give five graded steps the levels were set from the size of the change
alone (mean |Δ| per pixel on phantom slices, 0.02–0.16 at severity 5) before any victim was evaluated on them:
log-gamma reaches 0.6 (TorchIO's ±0.3 is severity 3), spike intensity stops at 0.5 (TorchIO's 1–3 makes stripes as
bright as the slice), noise std stops at 0.12 (ImageNet-C's Gaussian noise, 0.08–0.38, is for natural photographs)
and contrast factors are milder than ImageNet-C's 0.4–0.05.

Determinism: each sample's random draws (movement, ghost count and axis, spike position, bias coefficients, noise,
gamma sign, down-sampling axis) come from a generator seeded with :func:`sample_seed` — the attack's ``seed``, the
corruption kind and the sha256 of the sample's own bytes — never from the harness's per-batch seed. A corrupted image
therefore depends only on the image, the corruption, its severity and the seed: it is the same in any batch, at any
position, for every victim and defence (a fixed corrupted test set, like ImageNet-C's), and the draws are shared
across severities (only the magnitude changes), so a higher severity is the same artefact, stronger. TorchIO sees a
2-D slice as a volume of depth 1 (``(C, H, W, 1)``, 1 mm spacing); motion rotates in plane only. Every output is
clamped to [0, 1] (noise, spikes and ghosts can leave it) and keeps the input's dtype and device. Because a corrupted
image is a function of (image, kind, severity, seed) alone, a process caches it (:data:`CACHE`, up to
``ROBUSTBENCH_MED_CORRUPTION_CACHE_MB``, default 256): a grid corrupts each test image once for all its victims.
"""
from __future__ import annotations

import hashlib
import io
import math
import os
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, ClassVar, Iterator

import numpy as np
import torch

from robustbench_med.attack import Attack, derive_seed
from robustbench_med.errors import ConfigError
from robustbench_med.registry import register_attack
from robustbench_med.threat import CORRUPTION, MAX_SEVERITY
from robustbench_med.victim import Victim
from robustbench_med.attacks.pgd import ALL_IMAGE_TASKS

Apply = Callable[[torch.Tensor, float, torch.Generator, int], torch.Tensor]


@dataclass(frozen=True)
class CorruptionKind:
    """One corruption: its parameter at severities 1–5 and the function applying it to one (C, H, W) image."""

    name: str
    parameter: str
    levels: tuple[float, ...]
    library: str
    apply: Apply


CORRUPTIONS: dict[str, CorruptionKind] = {}


def sample_seed(seed: int, kind: str, image: torch.Tensor) -> int:
    """The seed of one sample's corruption draws: attack seed, corruption kind, the image's shape and the sha256 of
    its bytes (float32, C-contiguous), so the result does not depend on the batch the image arrives in."""
    data = image.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return derive_seed("corruption", seed, kind, tuple(image.shape), hashlib.sha256(data).hexdigest())


class _Cache:
    """Corrupted images by (kind, severity, sample seed), so a grid corrupts each test image once for all its victims
    and defences instead of once per cell. Insert-only up to a byte budget (``ROBUSTBENCH_MED_CORRUPTION_CACHE_MB``,
    default 256; 0 disables): a hit returns exactly what the corruption would compute again."""

    def __init__(self) -> None:
        self.items: dict[tuple[str, int, int], torch.Tensor] = {}
        self.nbytes = 0

    @staticmethod
    def budget() -> int:
        return int(float(os.environ.get("ROBUSTBENCH_MED_CORRUPTION_CACHE_MB", "256")) * 2**20)

    def get(self, key: tuple[str, int, int]) -> torch.Tensor | None:
        return self.items.get(key)

    def put(self, key: tuple[str, int, int], value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if key not in self.items and self.nbytes + size <= self.budget():
            self.items[key] = value
            self.nbytes += size

    def clear(self) -> None:
        self.items.clear()
        self.nbytes = 0


CACHE = _Cache()


@contextmanager
def _single_threaded() -> Iterator[None]:
    """One intra-op thread for torch (and SimpleITK) while corrupting single small images: thread start-up and
    spinning dominate there, ~10× slower on a loaded 2-core machine; results are the same bit for bit."""
    threads = torch.get_num_threads()
    sitk = sys.modules.get("SimpleITK")
    sitk_threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() if sitk is not None else None
    torch.set_num_threads(1)
    if sitk is not None:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if sitk is not None and sitk_threads is not None:
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(sitk_threads)


def _uniform(g: torch.Generator, *shape: int, low: float = -1.0, high: float = 1.0) -> np.ndarray:
    return (torch.rand(*shape, generator=g, dtype=torch.float64) * (high - low) + low).numpy()


def _randint(g: torch.Generator, low: int, high: int) -> int:
    """An integer in [low, high] (inclusive)."""
    return int(torch.randint(low, high + 1, (1,), generator=g))


def _tio(transform, img: torch.Tensor) -> torch.Tensor:
    """Apply a TorchIO transform to a (C, H, W) slice seen as a (C, H, W, 1) volume with 1 mm spacing."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = transform(img.unsqueeze(-1))
    return torch.as_tensor(np.asarray(out) if not isinstance(out, torch.Tensor) else out)[..., 0].float()


def _register(name: str, parameter: str, levels: tuple[float, ...], library: str):
    if len(levels) != MAX_SEVERITY or list(levels) != sorted(levels, reverse=levels[0] > levels[-1]):
        raise ValueError(f"corruption {name}: {MAX_SEVERITY} monotone levels required, got {levels}")

    def deco(fn: Apply) -> Apply:
        CORRUPTIONS[name] = CorruptionKind(name, parameter, levels, library, fn)
        return fn

    return deco


# ---------------------------------------------------------------------------------------------------------------
# MRI / CT acquisition artefacts (TorchIO, MONAI)


@_register("bias_field", "max abs. polynomial coefficient", (0.1, 0.2, 0.3, 0.4, 0.5), "torchio.BiasField")
def _bias_field(img, level, g, seed):
    import torchio as tio

    order = 3
    n_coeff = sum(1 for i in range(order + 1) for j in range(order + 1 - i) for _ in range(order + 1 - i - j))
    coefficients = (_uniform(g, n_coeff) * level).tolist()
    return _tio(tio.BiasField(coefficients=coefficients, order=order), img)


@_register("motion", "max rotation (deg) / translation (px): 2/0.7 … 10/3.5", (1.0, 2.0, 3.0, 4.0, 5.0), "torchio.Motion")
def _motion(img, level, g, seed):
    import torchio as tio

    n = 2  # movements during the acquisition (TorchIO's RandomMotion default)
    degrees = np.zeros((n, 3))
    translation = np.zeros((n, 3))
    degrees[:, 2] = _uniform(g, n) * 2.0 * level  # in-plane rotation only (2-D slice, as TorchIO's is_2d case)
    translation[:, :2] = _uniform(g, n, 2) * 0.7 * level
    step = 1 / (n + 1)
    times = np.arange(1, n + 1) * step + _uniform(g, n) * step * 0.3
    return _tio(tio.Motion(degrees=degrees, translation=translation, times=times, image_interpolation="linear"), img)


@_register("ghosting", "ghost intensity", (0.2, 0.35, 0.5, 0.75, 1.0), "torchio.Ghosting")
def _ghosting(img, level, g, seed):
    import torchio as tio

    num_ghosts, axis = _randint(g, 4, 10), _randint(g, 0, 1)
    return _tio(tio.Ghosting(num_ghosts=num_ghosts, axis=axis, intensity=level, restore=None), img)


@_register("spike", "spike intensity (x max |k-space|)", (0.05, 0.1, 0.2, 0.3, 0.5), "torchio.Spike")
def _spike(img, level, g, seed):
    import torchio as tio

    positions = _uniform(g, 1, 3, low=0.0, high=1.0)
    return _tio(tio.Spike(spikes_positions=positions, intensity=level), img)


@_register("gibbs", "k-space truncation alpha", (0.2, 0.35, 0.5, 0.65, 0.8), "monai.transforms.GibbsNoise")
def _gibbs(img, level, g, seed):
    from monai.transforms import GibbsNoise

    out = GibbsNoise(alpha=level)(img.clone())
    return torch.as_tensor(out.as_tensor() if hasattr(out, "as_tensor") else out).float()


@_register("gaussian_noise", "noise std", (0.02, 0.04, 0.06, 0.09, 0.12), "torchio.Noise")
def _gaussian_noise(img, level, g, seed):
    import torchio as tio

    return _tio(tio.Noise(mean=0.0, std=level, seed=seed), img)


@_register("rician_noise", "std of each Gaussian component", (0.02, 0.04, 0.06, 0.09, 0.12), "monai.transforms.RandRicianNoise")
def _rician_noise(img, level, g, seed):
    from monai.transforms import RandRicianNoise

    t = RandRicianNoise(prob=1.0, mean=0.0, std=level, sample_std=False)
    t.set_random_state(seed=seed % 2**32)
    out = t(img.clone())
    return torch.as_tensor(out.as_tensor() if hasattr(out, "as_tensor") else out).float()


@_register("blur", "Gaussian std (px)", (0.5, 0.75, 1.0, 1.5, 2.0), "torchio.Blur")
def _blur(img, level, g, seed):
    import torchio as tio

    return _tio(tio.Blur(std=(level, level, 0.0)), img)


@_register("gamma", "abs. log gamma (random sign)", (0.1, 0.2, 0.3, 0.45, 0.6), "torchio.Gamma")
def _gamma(img, level, g, seed):
    import torchio as tio

    sign = 1.0 if _randint(g, 0, 1) else -1.0
    return _tio(tio.Gamma(gamma=math.exp(sign * level)), img)


@_register("downsample", "down-sampling factor along one in-plane axis", (1.5, 2.0, 3.0, 4.0, 5.0), "torchio.RandomAnisotropy")
def _downsample(img, level, g, seed):
    import torchio as tio

    axis = _randint(g, 0, 1)  # a fixed axis and a fixed factor: TorchIO's anisotropy becomes deterministic
    return _tio(tio.RandomAnisotropy(axes=(axis,), downsampling=(level, level), image_interpolation="linear"), img)


# ---------------------------------------------------------------------------------------------------------------
# generic image corruptions (torchvision, torch, PIL)


@_register("contrast", "contrast factor", (0.8, 0.65, 0.5, 0.35, 0.2), "torchvision.transforms.v2.functional.adjust_contrast")
def _contrast(img, level, g, seed):
    from torchvision.transforms.v2.functional import adjust_contrast

    if img.shape[0] in (1, 3):
        return adjust_contrast(img, level)
    return torch.stack([adjust_contrast(c[None], level)[0] for c in img])


@_register("pixelate", "resize factor (box down, box up; ImageNet-C's)", (0.6, 0.5, 0.4, 0.3, 0.25), "PIL (Image.BOX)")
def _pixelate(img, level, g, seed):
    from PIL import Image

    h, w = img.shape[-2:]
    small = (max(1, int(w * level)), max(1, int(h * level)))
    planes = [Image.fromarray(np.ascontiguousarray(c.numpy(), dtype=np.float32)).resize(small, Image.BOX).resize((w, h), Image.BOX)
              for c in img]
    return torch.from_numpy(np.stack([np.array(p, dtype=np.float32) for p in planes]))


@_register("jpeg", "JPEG quality", (25, 18, 15, 10, 7), "PIL")
def _jpeg(img, level, g, seed):
    from PIL import Image

    arr = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    planes = [arr.permute(1, 2, 0).numpy()] if arr.shape[0] == 3 else [c.numpy() for c in arr]
    out = []
    for plane in planes:
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(plane)).save(buf, format="JPEG", quality=int(level))
        out.append(np.asarray(Image.open(buf).convert("RGB" if plane.ndim == 3 else "L"), dtype=np.float32) / 255.0)
    decoded = torch.from_numpy(out[0]).permute(2, 0, 1) if arr.shape[0] == 3 else torch.from_numpy(np.stack(out))
    return decoded.float()


# ---------------------------------------------------------------------------------------------------------------
# the attack


class Corruption(Attack):
    """A common corruption at an integer severity (0 = identity … 5); see the module docstring for the table.

    Args:
        kind: the corruption (a key of :data:`CORRUPTIONS`).
        severity: 0–5 (the grid's swept parameter; a list in a grid is one cell per severity). Per-sample severities
            may also be passed as ``eps`` to ``attack(victim, x, y, eps=...)``.
        seed: seed of the per-sample draws (with each image's own bytes; see :func:`sample_seed`).
        eot: must stay 1 (a corruption never queries the victim, so there is nothing to average).
    """

    tasks: ClassVar[frozenset[str]] = ALL_IMAGE_TASKS
    spatial_dims: ClassVar[frozenset[int]] = frozenset({2})  # the corruptions are 2D image operations
    knowledge: ClassVar[str] = "none"
    sample_independent: ClassVar[bool] = True  # each image's draws are seeded by its own bytes
    uses_eot: ClassVar[bool] = False
    supports_eps_batch: ClassVar[bool] = True
    default_norm: ClassVar[str] = CORRUPTION

    def __init__(self, kind: str, *, severity: int = 3, seed: int = 0, eot: int = 1) -> None:
        if kind not in CORRUPTIONS:
            raise ConfigError(f"unknown corruption {kind!r}; choose one of {sorted(CORRUPTIONS)}")
        if isinstance(severity, bool) or not isinstance(severity, (int, float, str)):
            raise ConfigError(f"severity must be an integer in 0..{MAX_SEVERITY}, got {severity!r}")
        super().__init__(norm=CORRUPTION, eps=severity, seed=seed, eot=eot)
        self.kind = CORRUPTIONS[kind]
        self.severity = int(self.threat.eps)
        self.name = f"corruption.{kind}"

    def __repr__(self) -> str:
        return f"Corruption({self.kind.name}, severity={self.severity}, seed={self.seed})"

    def level(self, severity: int) -> float:
        """The corruption parameter at ``severity`` (1–5; see the table)."""
        return self.kind.levels[severity - 1]

    def perturb(self, victim: Victim, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        severities = eps.detach().double().cpu()
        if ((severities - severities.round()).abs() > 1e-6).any() or (severities < 0).any() or (severities > MAX_SEVERITY).any():
            raise ConfigError(f"{self.name}: severities must be integers in 0..{MAX_SEVERITY}, got {severities.unique().tolist()}")
        out = x.clone()  # severity 0: the input, bit for bit
        cpu = x.detach().to("cpu", torch.float32)
        if "SimpleITK" not in sys.modules and self.kind.library.startswith("torchio"):
            import SimpleITK  # noqa: F401  (loaded first, so that _single_threaded also holds its thread count)
        with _single_threaded():
            for i, s in enumerate(severities.round().long().tolist()):
                if s == 0:
                    continue
                seed = sample_seed(self.seed, self.kind.name, cpu[i])
                key = (self.kind.name, s, seed)
                corrupted = CACHE.get(key)
                if corrupted is None:
                    g = torch.Generator().manual_seed(seed)
                    corrupted = self.kind.apply(cpu[i].clone(), float(self.level(s)), g, seed)
                    corrupted = torch.nan_to_num(corrupted.float(), nan=0.0).clamp(0, 1)
                    CACHE.put(key, corrupted)
                out[i] = corrupted.to(out.device, out.dtype)
        return out


def _factory(kind: str):
    def make(**kw) -> Corruption:
        return Corruption(kind, **kw)

    c = CORRUPTIONS[kind]
    make.__doc__ = f"{kind}: {c.parameter} {', '.join(f'{v:g}' for v in c.levels)} at severities 1–5 ({c.library})."
    return make


for _kind in CORRUPTIONS:
    register_attack(f"corruption.{_kind}", knowledge="none", kind="corruption",
                    paper="ImageNet-C (Hendrycks & Dietterich, ICLR 2019); MedMNIST-C; TorchIO (CMPB 2021)")(_factory(_kind))
