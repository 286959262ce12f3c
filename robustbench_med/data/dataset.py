"""``MedicalDataset``: one API over a Hugging Face ``datasets.Dataset`` split (phantom or real data).

Images are stored as uint8 ``Array3D((H, W, C))`` and returned by :meth:`MedicalDataset.images` as float NCHW in
[0, 1] (the victim input contract); volumes are stored as uint8 ``Array4D((D, H, W, C))`` and returned as float
NCDHW (:attr:`MedicalDataset.spatial_dims` is 2 or 3, :attr:`~MedicalDataset.input_size` (C, H, W) or
(C, D, H, W)). Targets and patient attributes are columns. The phantom (``phantom.ct``) is
generated once per (config, split, n) and cached with ``save_to_disk`` under
``<home>/datasets/phantom-<config hash>/<split>-<n>``: written to a temporary directory and renamed, so a crash never
leaves a half cache, and a cache that fails to load or to validate is regenerated. ``phantom.shortcut`` and
``phantom.shortcut_balanced`` are the APPLE shortcut scenario (sex in the appearance, not the anatomy; see
:mod:`robustbench_med.data.phantom`), cached the same way under their own config hash; the default world's hash does
not change. ``phantom.multiseq`` is the same patients in four MRI-like sequences (T1, T1ce, T2, FLAIR; see
:mod:`robustbench_med.data.multiseq`), for the missing-modality study. ``phantom.volumes`` is the volumetric phantom
(:mod:`robustbench_med.data.volumes`: 1 × 32 × 48 × 48 volumes, 3D masks and (x, y, z) landmarks), cached under
``volumes-<settings hash>/<split>-<n>``.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from robustbench_med import paths
from robustbench_med.data import multiseq as MS
from robustbench_med.data import phantom as P
from robustbench_med.data.sites import SITE_ORDER, SITES
from robustbench_med.errors import ConfigError
from robustbench_med.registry import register_dataset

Index = Sequence[int] | slice | torch.Tensor | np.ndarray | int | None
TARGET_DTYPES = {"label": torch.long, "lesion_type": torch.long, "n_lesions": torch.long, "findings": torch.float32,
                 "mask": torch.long, "landmarks": torch.float32, "vqa": torch.long}
DEFAULT_SIZES = {"train": 2000, "val": 400, "test": 500}


def require_finite_pixels(array: Any, what: str = "image") -> None:
    """Raise :class:`ConfigError` if ``array`` (pixel data on its way into a dataset) holds NaN or ±inf: a loader
    must not turn them silently into black pixels."""
    arr = np.asarray(array)
    if np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.complexfloating):
        bad = ~np.isfinite(arr)
        if bad.any():
            raise ConfigError(f"{what} has {int(bad.sum())} non-finite pixel value(s) (NaN or ±inf) of {arr.size}; "
                              "clean the data (e.g. numpy.nan_to_num with an explicit value) before loading it")


class MedicalDataset:
    """A dataset split with uint8 images, targets and patient attributes, backed by a ``datasets.Dataset``.

    The image tensor, each target tensor and each attribute list are read once and cached; the fingerprint is a
    sha256 over image bytes, targets and attributes (it identifies the exact data a result was computed on).

    ``extra_targets`` are columns :meth:`targets` reads like any target but that stay out of :attr:`target_fields`
    and of the fingerprint (:attr:`extra_target_fields`): targets added to a dataset after its fingerprint was in use
    (``phantom.volumes``' ``vqa``), so the weights and results that name the fingerprint stay current. Whoever trains
    on such a column must version it separately (the 3D VLM victims' ``trainer_version``).
    """

    def __init__(self, hf: Any, name: str, split: str, target_fields: Sequence[str], attribute_names: Sequence[str],
                 extra_targets: Sequence[str] = ()):
        if "image" not in hf.column_names:
            raise ConfigError(f"dataset {name!r} has no 'image' column; columns are {hf.column_names}")
        feature = hf.features["image"]
        # float pixels would be cast (NaN and [0, 1] values alike) to meaningless bytes
        if getattr(feature, "dtype", None) != "uint8" or len(getattr(feature, "shape", ())) not in (3, 4):
            raise ConfigError(f"dataset {name!r}: the 'image' column must be uint8 Array3D((H, W, C)) (images) or "
                              f"Array4D((D, H, W, C)) (volumes), got {feature}; build it with "
                              "robustbench_med.data.loaders.build_dataset (or hf.dataset), which convert images")
        self.hf = hf
        self.name = name
        self.split = split
        self.target_fields = tuple(f for f in target_fields if f in hf.column_names)
        self.attribute_names = tuple(a for a in attribute_names if a in hf.column_names)
        self.extra_target_fields = tuple(f for f in extra_targets if f in hf.column_names and f not in self.target_fields)
        self._image_cache: torch.Tensor | None = None
        self._target_cache: dict[str, torch.Tensor] = {}
        self._attr_cache: dict[str, list[str]] = {}
        self._fp: str | None = None

    def __len__(self) -> int:
        return len(self.hf)

    def __repr__(self) -> str:
        return f"MedicalDataset({self.name!r}, split={self.split!r}, n={len(self)}, input_size={self.input_size})"

    @property
    def input_size(self) -> tuple[int, ...]:
        """(C, H, W) of every image, or (C, D, H, W) of every volume."""
        *spatial, c = self.hf.features["image"].shape
        return (int(c), *(int(v) for v in spatial))

    @property
    def spatial_dims(self) -> int:
        """2 for images (NCHW), 3 for volumes (NCDHW)."""
        return len(self.hf.features["image"].shape) - 1

    def _rows(self, idx: Index) -> slice | list[int]:
        """Normalise ``idx`` (None, slice, int, list, bool mask, tensor, array) to a slice or a list of row ids."""
        if idx is None:
            return slice(None)
        if isinstance(idx, slice):
            return idx
        arr = np.asarray(idx.detach().cpu() if isinstance(idx, torch.Tensor) else idx)
        if arr.dtype == bool:
            if arr.shape != (len(self),):
                raise ConfigError(f"boolean index of shape {arr.shape} for a dataset of {len(self)} samples")
            arr = np.flatnonzero(arr)
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise ConfigError(f"indices must be integers, got dtype {arr.dtype}")
        rows = arr.reshape(-1).astype(np.int64)
        if rows.size and (rows.max() >= len(self) or rows.min() < -len(self)):
            raise ConfigError(f"index out of range for a dataset of {len(self)} samples")
        return (rows % max(len(self), 1)).tolist()

    @property
    def _images(self) -> torch.Tensor:
        if self._image_cache is None:  # datasets returns uint8 Array3D as int64 (stack.md §8): ask for uint8
            arr = self.hf.with_format("torch", columns=["image"], dtype=torch.uint8)[:]["image"]
            order = (0, 3, 1, 2) if self.spatial_dims == 2 else (0, 4, 1, 2, 3)  # channels first
            self._image_cache = torch.as_tensor(arr, dtype=torch.uint8).permute(*order).contiguous()
        return self._image_cache

    def images(self, idx: Index = None) -> torch.Tensor:
        """Float images [n, C, H, W] (volumes: [n, C, D, H, W]) in [0, 1]."""
        return self._images[self._rows(idx)].float().div_(255.0)

    def targets(self, field: str, idx: Index = None) -> torch.Tensor:
        """Target tensor of ``field`` (one of :attr:`target_fields` or :attr:`extra_target_fields`)."""
        if field not in self.target_fields and field not in self.extra_target_fields:
            raise ConfigError(f"dataset {self.name!r} has no target field {field!r}; "
                              f"valid fields: {list(self.target_fields + self.extra_target_fields)}")
        if field not in self._target_cache:
            arr = np.asarray(self.hf.with_format("numpy", columns=[field])[:][field])
            default = torch.long if np.issubdtype(arr.dtype, np.integer) else torch.float32
            self._target_cache[field] = torch.as_tensor(arr, dtype=TARGET_DTYPES.get(field, default))
        return self._target_cache[field][self._rows(idx)]

    def attributes(self, idx: Index = None) -> dict[str, list[str]]:
        """Patient attributes (e.g. ``sex``, ``age_group``) as lists of strings."""
        rows = self._rows(idx)
        out = {}
        for a in self.attribute_names:
            if a not in self._attr_cache:
                self._attr_cache[a] = [str(v) for v in self.hf.select_columns([a])[:][a]]
            col = self._attr_cache[a]
            out[a] = col[rows] if isinstance(rows, slice) else [col[i] for i in rows]
        return out

    def fingerprint(self) -> str:
        """sha256 over the image bytes, the targets and the attributes (computed once)."""
        if self._fp is None:
            h = hashlib.sha256(self.name.encode())
            h.update(str(self.input_size).encode())
            h.update(self._images.numpy().tobytes())
            for f in self.target_fields:
                h.update(f.encode())
                h.update(self.targets(f).numpy().tobytes())
            for a, values in self.attributes().items():
                h.update(a.encode())
                h.update("\x00".join(values).encode())
            self._fp = h.hexdigest()
        return self._fp

    def subset(self, indices: Index) -> "MedicalDataset":
        """A new dataset holding rows ``indices`` (in that order)."""
        rows = self._rows(indices)
        rows = list(range(len(self)))[rows] if isinstance(rows, slice) else rows
        return MedicalDataset(self.hf.select(rows), self.name, self.split, self.target_fields, self.attribute_names,
                              self.extra_target_fields)


def phantom_features(size: int, channels: int = 1, site: bool = False) -> Any:
    """The Hugging Face feature layout of the phantom (shared by the real-data loaders for image / mask); ``channels``
    4 for the multi-sequence phantom; ``site`` adds the ``site`` attribute column (``phantom.sites``)."""
    from datasets import Array2D, Array3D, Features, Value
    from datasets import Sequence as HFSequence

    return Features({
        "image": Array3D((size, size, channels), "uint8"), "mask": Array2D((size, size), "uint8"),
        "landmarks": Array2D((len(P.LANDMARKS), 2), "float32"), "label": Value("int64"),
        "lesion_type": Value("int64"), "n_lesions": Value("int64"),
        "findings": HFSequence(Value("float32"), length=len(P.FINDINGS)), "sex": Value("string"),
        "age_group": Value("string"), "vqa": HFSequence(Value("int64"), length=len(P.QUESTIONS)),
        "index": Value("int64"), **({"site": Value("string")} if site else {}),
    })


def _quiet_save(ds: Any, path: Path) -> None:
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        ds.save_to_disk(str(path))
    finally:
        if not was_disabled:
            enable_progress_bars()


def _load_valid(cache: Path, n: int) -> Any | None:
    """The cached dataset if it loads and has ``n`` readable rows, else None (the damaged cache is removed)."""
    from datasets import load_from_disk

    try:
        ds = load_from_disk(str(cache))
        if len(ds) == n and ds.with_format("numpy", columns=["image"])[n - 1]["image"].shape:
            return ds
    except Exception:  # noqa: BLE001 - any damage (truncated arrow, bad JSON) means: rebuild, never trust
        pass
    shutil.rmtree(cache, ignore_errors=True)
    return None


def cached_build(cache: Path, n: int, build: Callable[[], Any]) -> Any:
    """Load ``cache`` with ``load_from_disk``, or build the dataset and save it atomically (temp dir + rename)."""
    from datasets import load_from_disk

    if cache.exists() and (ds := _load_valid(cache, n)) is not None:
        return ds
    ds = build()
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache.parent, prefix=f".{cache.name}.tmp"))
    try:
        _quiet_save(ds, tmp)
        os.replace(tmp, cache)
    except OSError:  # another process renamed its copy first: use that one
        shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return load_from_disk(str(cache))


def phantom_config(seed: int = 0, size: int = 64, *, dataset: str = "phantom.ct", **overrides: Any) -> P.PhantomConfig:
    """A :class:`~robustbench_med.data.phantom.PhantomConfig`; bad settings raise :class:`ConfigError` naming
    ``dataset``."""
    try:
        return P.PhantomConfig(size=size, seed=seed, **overrides)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{dataset}: bad setting: {e}") from None


def split_size(name: str, split: str, n: Any, defaults: dict[str, int] | None = None) -> int:
    """``n`` checked (a positive integer; None: the split's default size in ``defaults``, else
    :data:`DEFAULT_SIZES`) after checking ``split``."""
    if split not in P.SPLIT_CODES:
        raise ConfigError(f"{name}: unknown split {split!r}; choose one of {tuple(P.SPLIT_CODES)}")
    n = (defaults or DEFAULT_SIZES)[split] if n is None else n
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
        raise ConfigError(f"{name}: n must be a positive integer, got {n!r}")
    return int(n)


def _phantom(name: str, split: str, n: int | None, config: P.PhantomConfig,
             cache_dir: str | os.PathLike[str] | None, mixed_sites: bool = False) -> MedicalDataset:
    """A phantom split generated with ``config`` (cached under ``phantom-<config hash>/<split>-<n>``); with
    ``mixed_sites``, sample ``i`` is acquired at site ``SITE_ORDER[i % 3]`` and carries a ``site`` attribute (cached
    under ``phantom-<hash>-sites``)."""
    n = split_size(name, split, n)
    root = Path(cache_dir) if cache_dir else paths.datasets_dir()
    cache = root / f"phantom-{config.config_hash()}{'-sites' if mixed_sites else ''}" / f"{split}-{n}"

    def build() -> Any:
        from datasets import Dataset

        channels = len(MS.SEQUENCES) if config.multiseq else 1
        columns = generate_mixed_sites(split, n, config) if mixed_sites else P.generate(split, n, config)
        return Dataset.from_dict(columns, features=phantom_features(config.size, channels, site=mixed_sites))

    hf = cached_build(cache, n, build)
    return MedicalDataset(hf, name, split, tuple(TARGET_DTYPES), ("sex", "age_group", "site"))


def generate_mixed_sites(split: str, n: int, config: P.PhantomConfig) -> dict[str, Any]:
    """``phantom.sites``' columns: sample ``i`` as generated at site ``SITE_ORDER[i % 3]`` (site A: the default world,
    byte-identical to ``phantom.ct``'s sample ``i``), plus the ``site`` column."""
    from dataclasses import replace

    samples = [P.generate_sample(i, split, replace(config, site=SITES[SITE_ORDER[i % len(SITE_ORDER)]])) for i in range(n)]
    columns: dict[str, Any] = {k: [smp[k] for smp in samples] for k in samples[0]} if samples else {}
    columns["index"] = list(range(n))
    columns["site"] = [SITE_ORDER[i % len(SITE_ORDER)] for i in range(n)]
    return columns


@register_dataset("phantom.ct", task="all", paper="robustbench_med procedural CT phantom (this suite)")
def phantom_ct(split: str = "test", n: int | None = None, seed: int = 0, size: int = 64,
               cache_dir: str | os.PathLike[str] | None = None, **config_overrides: Any) -> MedicalDataset:
    """The procedural CT phantom (see :mod:`robustbench_med.data.phantom`); ``n=None`` → the split's default size
    (train 2000, val 400, test 500); ``config_overrides`` are :class:`PhantomConfig` fields (``disparity`` may be
    a dict of :class:`Disparity` fields)."""
    return _phantom("phantom.ct", split, n, phantom_config(seed, size, **config_overrides), cache_dir)


def shortcut_config(seed: int = 0, size: int = 64, train_unannotated_f: float = 1.0, cue_amplitude: float = 0.05,
                    cue_period: float = 4.0, *, dataset: str = "phantom.shortcut", **overrides: Any) -> P.PhantomConfig:
    """The shortcut scenario's :class:`PhantomConfig`: sex-neutral anatomy (:meth:`Disparity.sex_neutral`) and the
    sex cue; in the train split, F patients' lesions go unannotated with probability ``train_unannotated_f``."""
    try:
        shortcut = P.Shortcut(cue_amplitude, cue_period, {"F": float(train_unannotated_f), "M": 0.0})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{dataset}: bad setting: {e}") from None
    overrides.setdefault("disparity", P.Disparity.sex_neutral())
    return phantom_config(seed, size, dataset=dataset, shortcut=shortcut, **overrides)


@register_dataset("phantom.shortcut", task="all",
                  paper="robustbench_med procedural CT phantom, shortcut scenario (sex in appearance, not anatomy)")
def phantom_shortcut(split: str = "test", n: int | None = None, seed: int = 0, size: int = 64,
                     cache_dir: str | os.PathLike[str] | None = None, train_unannotated_f: float = 1.0,
                     **config_overrides: Any) -> MedicalDataset:
    """The shortcut scenario (module docstring of :mod:`robustbench_med.data.phantom`): masks independent of sex, a
    sex-specific grating in the image, and in the **train split** F patients' lesions unannotated with probability
    ``train_unannotated_f`` (1.0: the positive control's biased training distribution). Val and test are unbiased
    and byte-identical for every ``train_unannotated_f``."""
    return _shortcut("phantom.shortcut", split, n, seed, size, cache_dir, train_unannotated_f, config_overrides)


def _shortcut(name: str, split: str, n: int | None, seed: int, size: int, cache_dir: Any, train_unannotated_f: float,
              overrides: dict[str, Any]) -> MedicalDataset:
    return _phantom(name, split, n, shortcut_config(seed, size, train_unannotated_f, dataset=name, **overrides), cache_dir)


@register_dataset("phantom.shortcut_balanced", task="all",
                  paper="robustbench_med procedural CT phantom, shortcut scenario without the annotation bias")
def phantom_shortcut_balanced(split: str = "test", n: int | None = None, seed: int = 0, size: int = 64,
                              cache_dir: str | os.PathLike[str] | None = None, **config_overrides: Any) -> MedicalDataset:
    """``phantom.shortcut`` with an unbiased train split (``train_unannotated_f = 0``): the control's training data."""
    return _shortcut("phantom.shortcut_balanced", split, n, seed, size, cache_dir, 0.0, config_overrides)


@register_dataset("phantom.multiseq", task="all",
                  paper="robustbench_med procedural phantom in four MRI-like sequences (missing-modality study)")
def phantom_multiseq(split: str = "test", n: int | None = None, seed: int = 0, size: int = 64,
                     cache_dir: str | os.PathLike[str] | None = None, **config_overrides: Any) -> MedicalDataset:
    """``phantom.ct``'s patients (same anatomy, lesions, masks, landmarks and attributes, sample by sample) imaged in
    four MRI-like sequences, channels ``t1, t1ce, t2, flair`` (:mod:`robustbench_med.data.multiseq`): no sequence
    shows every structure, so each missing subset costs differently."""
    return _phantom("phantom.multiseq", split, n, phantom_config(seed, size, dataset="phantom.multiseq", multiseq=True,
                                                                 **config_overrides), cache_dir)


def _site(name: str, key: str, split: str, n: int | None, seed: int, size: int, cache_dir: Any,
          overrides: dict[str, Any]) -> MedicalDataset:
    return _phantom(name, split, n, phantom_config(seed, size, dataset=name, site=SITES[key], **overrides), cache_dir)


@register_dataset("phantom.site_b", task="all", paper="robustbench_med procedural phantom, acquisition site B (domain shift)")
def phantom_site_b(split: str = "test", n: int | None = None, seed: int = 0, size: int = 64,
                   cache_dir: str | os.PathLike[str] | None = None, **config_overrides: Any) -> MedicalDataset:
    """The phantom world acquired at site B (:mod:`robustbench_med.data.sites`: lower gain and gamma > 1, 1.6× noise,
    1.6× coarser resolution, a wider field of view; an older, more often F population). Site A is ``phantom.ct``."""
    return _site("phantom.site_b", "B", split, n, seed, size, cache_dir, config_overrides)


@register_dataset("phantom.site_c", task="all", paper="robustbench_med procedural phantom, acquisition site C (domain shift)")
def phantom_site_c(split: str = "test", n: int | None = None, seed: int = 0, size: int = 64,
                   cache_dir: str | os.PathLike[str] | None = None, **config_overrides: Any) -> MedicalDataset:
    """The phantom world acquired at site C (:mod:`robustbench_med.data.sites`: higher gain, gamma < 1, 0.7× noise,
    a narrower field of view; a younger, more often M population)."""
    return _site("phantom.site_c", "C", split, n, seed, size, cache_dir, config_overrides)


@register_dataset("phantom.sites", task="all", paper="robustbench_med procedural phantom, sites A, B, C mixed (domain shift)")
def phantom_sites(split: str = "test", n: int | None = None, seed: int = 0, size: int = 64,
                  cache_dir: str | os.PathLike[str] | None = None, **config_overrides: Any) -> MedicalDataset:
    """Sites A, B and C in one split: sample ``i`` from site ``'ABC'[i % 3]`` with the attribute ``site``, so one grid
    evaluates a site-A model in-domain and on both unseen sites, and fairness columns break results down per site."""
    return _phantom("phantom.sites", split, n, phantom_config(seed, size, dataset="phantom.sites", **config_overrides),
                    cache_dir, mixed_sites=True)


VESSELS_VERSION = 1  # part of the vessel phantom's cache key: bump when its rendered bytes change


def _vessels(name: str, split: str, n: int | None, seed: int, size: int, cache_dir: Any, mixed_sites: bool) -> MedicalDataset:
    """A split of the vessel phantom (:mod:`robustbench_med.data.vessels`), site A or sites A / B / C interleaved."""
    import json as _json
    from dataclasses import asdict

    from robustbench_med.data import vessels as V

    n = split_size(name, split, n)
    if not isinstance(size, int) or size < 16:
        raise ConfigError(f"{name}: size must be an integer >= 16, got {size!r}")
    sites = tuple(SITES[k] for k in SITE_ORDER) if mixed_sites else (None,)
    key = _json.dumps({"v": VESSELS_VERSION, "seed": seed, "size": size,
                       "sites": [asdict(s) if s is not None else None for s in sites]}, sort_keys=True)
    root = Path(cache_dir) if cache_dir else paths.datasets_dir()
    cache = root / f"vessels-{hashlib.sha256(key.encode()).hexdigest()[:12]}" / f"{split}-{n}"

    def build() -> Any:
        from datasets import Array2D, Array3D, Dataset, Features, Value

        features = Features({"image": Array3D((size, size, 1), "uint8"), "mask": Array2D((size, size), "uint8"),
                             "sex": Value("string"), "age_group": Value("string"), "index": Value("int64"),
                             **({"site": Value("string")} if mixed_sites else {})})
        columns = V.generate(split, n, seed, size, sites, SITE_ORDER if mixed_sites else None)
        return Dataset.from_dict(columns, features=features)

    return MedicalDataset(cached_build(cache, n, build), name, split, ("mask",), ("sex", "age_group", "site"))


@register_dataset("phantom.vessels", task="segmentation",
                  paper="robustbench_med procedural fundus-like vessel phantom (site A; DGSSA-style domain shift)")
def phantom_vessels(split: str = "test", n: int | None = None, seed: int = 0, size: int = 64,
                    cache_dir: str | os.PathLike[str] | None = None) -> MedicalDataset:
    """Fundus-like slices with a branching vessel tree and its mask (``robustbench_med.data.vessels``), acquired at
    site A: the training data of the vessel segmentors."""
    return _vessels("phantom.vessels", split, n, seed, size, cache_dir, mixed_sites=False)


@register_dataset("phantom.vessels_sites", task="segmentation",
                  paper="robustbench_med procedural vessel phantom, sites A, B, C mixed (domain shift)")
def phantom_vessels_sites(split: str = "test", n: int | None = None, seed: int = 0, size: int = 64,
                          cache_dir: str | os.PathLike[str] | None = None) -> MedicalDataset:
    """The vessel phantom with sample ``i`` acquired at site ``'ABC'[i % 3]`` and the attribute ``site`` (site-A
    samples are ``phantom.vessels``' samples, byte for byte)."""
    return _vessels("phantom.vessels_sites", split, n, seed, size, cache_dir, mixed_sites=True)


VOLUMES_VERSION = 2  # part of the volume phantom's cache key: bump when its rendered bytes or columns change (2: vqa)
VOLUME_SIZES = {"train": 160, "val": 32, "test": 64}


def volume_features(depth: int, size: int, channels: int = 1) -> Any:
    """The Hugging Face feature layout of ``phantom.volumes``: image Array4D (D, H, W, C), mask Array3D (D, H, W),
    landmarks Array2D (4, 3) ((x, y, z) voxels), vqa Sequence(int64) (an answer id per volume question)."""
    from datasets import Array2D, Array3D, Array4D, Features, Value
    from datasets import Sequence as HFSequence

    from robustbench_med.data.volumes import VOLUME_LANDMARKS, VOLUME_QUESTIONS

    return Features({
        "image": Array4D((depth, size, size, channels), "uint8"), "mask": Array3D((depth, size, size), "uint8"),
        "landmarks": Array2D((len(VOLUME_LANDMARKS), 3), "float32"), "label": Value("int64"),
        "lesion_type": Value("int64"), "n_lesions": Value("int64"), "sex": Value("string"),
        "age_group": Value("string"), "vqa": HFSequence(Value("int64"), length=len(VOLUME_QUESTIONS)),
        "index": Value("int64"),
    })


@register_dataset("phantom.volumes", task="all", paper="robustbench_med procedural volumetric CT phantom (this suite)")
def phantom_volumes(split: str = "test", n: int | None = None, seed: int = 0, size: int = 48, depth: int = 32,
                    cache_dir: str | os.PathLike[str] | None = None) -> MedicalDataset:
    """The volumetric CT phantom (:mod:`robustbench_med.data.volumes`): uint8 volumes 1 × ``depth`` × ``size`` ×
    ``size`` with ``mask`` [D, H, W], ``label``, ``lesion_type``, ``n_lesions`` and ``landmarks`` [4, 3] ((x, y, z)
    voxels); the 2D phantom's disparity by sex and age. ``n=None`` → train 160, val 32, test 64. ``vqa`` [12] (the
    answer id of every question of :data:`~robustbench_med.data.volumes.VOLUME_QUESTIONS`) is an extra target: readable
    with ``targets('vqa')``, outside ``target_fields`` and the fingerprint, which are those of version 1."""
    import json as _json
    from dataclasses import asdict

    from robustbench_med.data import volumes as VOL

    name = "phantom.volumes"
    n = split_size(name, split, n, VOLUME_SIZES)
    for key, value, low in (("seed", seed, 0), ("size", size, 16), ("depth", depth, 8)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ConfigError(f"{name}: {key} must be an integer >= {low}, got {value!r}")
    seed, size, depth = int(seed), int(size), int(depth)
    settings = {"v": VOLUMES_VERSION, "seed": seed, "size": size, "depth": depth, "disparity": asdict(P.Disparity())}
    digest = hashlib.sha256(_json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    cache = (Path(cache_dir) if cache_dir else paths.datasets_dir()) / f"volumes-{digest}" / f"{split}-{n}"

    def build() -> Any:
        from datasets import Dataset

        return Dataset.from_dict(VOL.generate(split, n, seed, size, depth), features=volume_features(depth, size))

    return MedicalDataset(cached_build(cache, n, build), name, split,
                          ("mask", "label", "lesion_type", "n_lesions", "landmarks"), ("sex", "age_group"), ("vqa",))
