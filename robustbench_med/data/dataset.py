"""``MedicalDataset``: one API over a Hugging Face ``datasets.Dataset`` split (phantom or real data).

Images are stored as uint8 ``Array3D((H, W, C))`` and returned by :meth:`MedicalDataset.images` as float NCHW in
[0, 1] (the victim input contract). Targets and patient attributes are columns. The phantom (``phantom.ct``) is
generated once per (config, split, n) and cached with ``save_to_disk`` under ``<home>/datasets`` (written to a
temporary directory and renamed, so a crash never leaves a half cache; an unreadable cache is regenerated).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from robustbench_med import paths
from robustbench_med.data import phantom as P
from robustbench_med.errors import ConfigError
from robustbench_med.registry import register_dataset

Index = Sequence[int] | slice | torch.Tensor | np.ndarray | None
TARGET_DTYPES = {"label": torch.long, "lesion_type": torch.long, "findings": torch.float32, "mask": torch.long,
                 "landmarks": torch.float32, "vqa": torch.long}


class MedicalDataset:
    """A dataset split with images, targets and patient attributes."""

    def __init__(self, hf, name: str, split: str, target_fields: Sequence[str], attribute_names: Sequence[str]):
        self.hf = hf
        self.name = name
        self.split = split
        self.target_fields = tuple(f for f in target_fields if f in hf.column_names)
        self.attribute_names = tuple(a for a in attribute_names if a in hf.column_names)

    def __len__(self) -> int:
        return len(self.hf)

    def __repr__(self) -> str:
        return f"MedicalDataset({self.name!r}, split={self.split!r}, n={len(self)}, input_size={self.input_size})"

    @property
    def input_size(self) -> tuple[int, int, int]:
        h, w, c = np.asarray(self.hf[0]["image"]).shape
        return (c, h, w)

    @cached_property
    def _images(self) -> torch.Tensor:
        arr = np.asarray(self.hf.with_format("numpy", columns=["image"])["image"], dtype=np.uint8)
        return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()

    def _rows(self, idx: Index) -> Any:
        if idx is None:
            return slice(None)
        if isinstance(idx, torch.Tensor):
            idx = idx.tolist()
        if isinstance(idx, np.ndarray):
            idx = idx.tolist()
        return idx

    def images(self, idx: Index = None) -> torch.Tensor:
        """Float images [n, C, H, W] in [0, 1]."""
        return self._images[self._rows(idx)].float() / 255.0

    def targets(self, field: str, idx: Index = None) -> torch.Tensor:
        """Target tensor of ``field`` (see ``target_fields``)."""
        if field not in self.target_fields:
            raise ConfigError(f"dataset {self.name!r} has no target field {field!r}; available: {list(self.target_fields)}")
        return self._target(field)[self._rows(idx)]

    @cached_property
    def _target_cache(self) -> dict[str, torch.Tensor]:
        return {}

    def _target(self, field: str) -> torch.Tensor:
        if field not in self._target_cache:
            arr = np.asarray(self.hf.with_format("numpy", columns=[field])[field])
            default = torch.long if np.issubdtype(arr.dtype, np.integer) else torch.float32
            self._target_cache[field] = torch.as_tensor(arr, dtype=TARGET_DTYPES.get(field, default))
        return self._target_cache[field]

    def attributes(self, idx: Index = None) -> dict[str, list[str]]:
        """Patient attributes (e.g. ``sex``, ``age_group``) as lists of strings."""
        rows = self._rows(idx)
        out = {}
        for a in self.attribute_names:
            col = self.hf[a]
            out[a] = [str(v) for v in (col[rows] if isinstance(rows, slice) else [col[i] for i in rows])]
        return out

    def fingerprint(self) -> str:
        """sha256 over image bytes and targets (identifies the exact data a result was computed on)."""
        if not hasattr(self, "_fp"):
            h = hashlib.sha256(self._images.numpy().tobytes())
            for f in self.target_fields:
                h.update(f.encode())
                h.update(self._target(f).numpy().tobytes())
            self._fp = h.hexdigest()
        return self._fp

    def subset(self, indices: Sequence[int]) -> "MedicalDataset":
        return MedicalDataset(self.hf.select(list(indices)), self.name, self.split, self.target_fields, self.attribute_names)


def phantom_features(size: int):
    from datasets import Array2D, Array3D, Features, Sequence as HFSequence, Value

    return Features({
        "image": Array3D((size, size, 1), "uint8"), "mask": Array2D((size, size), "uint8"),
        "landmarks": Array2D((len(P.LANDMARKS), 2), "float32"), "label": Value("int64"), "lesion_type": Value("int64"),
        "findings": HFSequence(Value("float32"), length=len(P.FINDINGS)), "sex": Value("string"), "age_group": Value("string"),
        "n_lesions": Value("int64"), "vqa": HFSequence(Value("int64"), length=len(P.QUESTIONS)), "index": Value("int64"),
    })


DEFAULT_SIZES = {"train": 2000, "val": 400, "test": 500}


def _build_cached(cache: Path, build):
    """Load ``cache`` with ``load_from_disk``, or build the dataset and save it atomically (temp dir + rename)."""
    from datasets import load_from_disk

    if cache.exists():
        try:
            return load_from_disk(str(cache))
        except Exception:  # a damaged cache is regenerated, never trusted
            shutil.rmtree(cache, ignore_errors=True)
    from datasets.utils import disable_progress_bars, enable_progress_bars, are_progress_bars_disabled

    ds = build()
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache.parent, prefix=f".{cache.name}."))
    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        ds.save_to_disk(str(tmp))
    finally:
        if not was_disabled:
            enable_progress_bars()
    try:
        os.replace(tmp, cache)
    except OSError:  # another process finished first: use its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return load_from_disk(str(cache))


@register_dataset("phantom.ct", task="all", paper="robustbench_med procedural CT phantom")
def phantom_ct(split: str = "test", n: int | None = None, seed: int = 0, size: int = 64, cache_dir: str | os.PathLike[str] | None = None, **overrides: Any) -> MedicalDataset:
    """The procedural CT phantom (see :mod:`robustbench_med.data.phantom`); ``n=None`` → the split's default size."""
    if split not in P.SPLIT_CODES:
        raise ConfigError(f"unknown split {split!r}; choose one of {tuple(P.SPLIT_CODES)}")
    n = DEFAULT_SIZES[split] if n is None else n
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ConfigError(f"n must be a positive integer, got {n!r}")
    if isinstance(overrides.get("disparity"), dict):
        overrides["disparity"] = P.Disparity(**overrides["disparity"])
    try:
        config = P.PhantomConfig(size=size, seed=seed, **overrides)
    except TypeError as e:
        raise ConfigError(f"phantom.ct: {e}") from None
    root = Path(cache_dir) if cache_dir else paths.datasets_dir()
    cache = root / f"phantom-{config.config_hash()}" / f"{split}-{n}"

    def build():
        from datasets import Dataset

        return Dataset.from_dict(P.generate(split, n, config), features=phantom_features(size))

    hf = _build_cached(cache, build)
    return MedicalDataset(hf, "phantom.ct", split, tuple(TARGET_DTYPES), ("sex", "age_group"))
