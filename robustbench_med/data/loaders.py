"""Loaders for real data, each returning a :class:`~robustbench_med.data.dataset.MedicalDataset`.

- ``hf.dataset``: a local ``save_to_disk`` directory, a local file or folder ``datasets.load_dataset`` understands
  (parquet, csv, imagefolder …), or a Hub name (works online; offline it fails at once with a clear error).
- ``folder.csv``: an image folder plus a CSV with a file column, target columns and attribute columns.
- ``dicom.files``: DICOM files (pydicom): rescale slope/intercept, a window (centre/width) or min–max scaling;
  sex and age group read from the ``PatientSex`` / ``PatientAge`` tags when not given.
- ``nifti.slices``: 2D slices of NIfTI volumes (nibabel) along an axis, with an optional label volume as masks.

Every loader resizes to ``size`` × ``size`` (PIL, antialiased) with ``channels`` 1 or 3 and stores uint8 images in
the same Hugging Face layout as the phantom, so victims, attacks and the harness treat real and phantom data alike.
"""
from __future__ import annotations

import csv
import os
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image

from robustbench_med.data.dataset import MedicalDataset
from robustbench_med.errors import ConfigError
from robustbench_med.registry import register_dataset

AGE_GROUP_EDGES = (40, 65)  # young < 40 ≤ middle < 65 ≤ old (years)


def age_group(years: float | None) -> str:
    """Map an age in years to the phantom's groups: young (< 40), middle (40–64), old (≥ 65), or 'unknown'."""
    if years is None or not np.isfinite(years):
        return "unknown"
    return "young" if years < AGE_GROUP_EDGES[0] else "middle" if years < AGE_GROUP_EDGES[1] else "old"


def to_uint8_image(array: np.ndarray, size: int, channels: int) -> np.ndarray:
    """A 2D (H, W) or (H, W, C) float/int array scaled to [0, 255] → uint8 (size, size, channels)."""
    if channels not in (1, 3):
        raise ConfigError(f"channels must be 1 or 3, got {channels}")
    arr = np.asarray(array)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        arr = arr[..., :3]
    elif arr.ndim != 2:
        raise ConfigError(f"expected a 2D image (or H×W×3), got shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = arr.astype(np.float64)
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        arr = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo) * 255.0
        arr = np.nan_to_num(arr).round().astype(np.uint8)
    img = Image.fromarray(arr)
    img = img.convert("L" if channels == 1 else "RGB").resize((size, size), Image.BILINEAR)
    out = np.asarray(img, dtype=np.uint8)
    return out[..., None] if channels == 1 else out


def build_dataset(images: Sequence[np.ndarray], targets: dict[str, Sequence[Any]], attributes: dict[str, Sequence[str]],
                  name: str, split: str) -> MedicalDataset:
    """A :class:`MedicalDataset` from uint8 images (H, W, C) and per-sample target / attribute lists."""
    from datasets import Array2D, Array3D, Dataset, Features, Value

    if not images:
        raise ConfigError(f"{name}: no images to load")
    h, w, c = images[0].shape
    features: dict[str, Any] = {"image": Array3D((h, w, c), "uint8"), "index": Value("int64")}
    columns: dict[str, Any] = {"image": list(images), "index": list(range(len(images)))}
    for key, values in targets.items():
        arr = np.asarray(values)
        if len(arr) != len(images):
            raise ConfigError(f"{name}: target {key!r} has {len(arr)} values for {len(images)} images")
        if key == "mask":
            features[key] = Array2D(arr.shape[1:], "uint8")
            columns[key] = list(arr.astype(np.uint8))
        else:
            features[key] = Value("int64") if np.issubdtype(arr.dtype, np.integer) else Value("float32")
            columns[key] = arr.tolist()
    for key, values in attributes.items():
        features[key] = Value("string")
        columns[key] = [str(v) for v in values]
    hf = Dataset.from_dict(columns, features=Features(features))
    return MedicalDataset(hf, name, split, tuple(targets), tuple(attributes))


def _columns(rows: list[dict[str, str]], names: Iterable[str], source: str) -> dict[str, list[str]]:
    out = {}
    for n in names:
        if rows and n not in rows[0]:
            raise ConfigError(f"{source}: no column {n!r}; columns are {list(rows[0])}")
        out[n] = [r[n] for r in rows]
    return out


def _numeric(values: list[str], column: str) -> list[float] | list[int]:
    try:
        nums = [float(v) for v in values]
    except ValueError:
        raise ConfigError(f"target column {column!r} must be numeric") from None
    return [int(v) for v in nums] if all(float(v).is_integer() for v in nums) else nums


@register_dataset("folder.csv", task="any", paper="image folder + CSV of labels and attributes")
def folder_csv(root: str | os.PathLike[str], csv_file: str | os.PathLike[str], file_column: str = "file",
               target_columns: Sequence[str] = ("label",), attribute_columns: Sequence[str] = ("sex", "age_group"),
               size: int = 64, channels: int = 1, split: str = "test", n: int | None = None) -> MedicalDataset:
    """Images listed in a CSV (paths relative to ``root``) with numeric targets and string attributes."""
    root, csv_path = Path(root), Path(csv_file)
    if not csv_path.exists():
        raise ConfigError(f"CSV file {csv_path} does not exist")
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))[:n]
    files = _columns(rows, [file_column], str(csv_path))[file_column]
    images = []
    for name in files:
        path = root / name
        if not path.exists():
            raise ConfigError(f"{csv_path}: image {path} does not exist")
        images.append(to_uint8_image(np.asarray(Image.open(path)), size, channels))
    targets = {k: _numeric(v, k) for k, v in _columns(rows, target_columns, str(csv_path)).items()}
    return build_dataset(images, targets, _columns(rows, attribute_columns, str(csv_path)), "folder.csv", split)


def _dicom_age(ds: Any) -> float | None:
    m = re.match(r"^(\d{1,3})([DWMY])$", str(getattr(ds, "PatientAge", "") or ""))
    if not m:
        return None
    value, unit = int(m.group(1)), m.group(2)
    return value / {"D": 365.25, "W": 52.18, "M": 12.0, "Y": 1.0}[unit]


def dicom_pixels(ds: Any, window: tuple[float, float] | None) -> np.ndarray:
    """Pixel data in modality units (rescale slope/intercept), windowed to [0, 1] or min–max scaled."""
    arr = ds.pixel_array.astype(np.float64)
    if arr.ndim == 3 and arr.shape[-1] not in (3, 4):
        arr = arr[arr.shape[0] // 2]  # a multi-frame volume: its middle frame
    arr = arr * float(getattr(ds, "RescaleSlope", 1) or 1) + float(getattr(ds, "RescaleIntercept", 0) or 0)
    if window is not None:
        centre, width = window
        arr = np.clip((arr - (centre - width / 2)) / width, 0, 1)
    return arr


@register_dataset("dicom.files", task="any", paper="DICOM files read with pydicom")
def dicom_files(files: Sequence[str | os.PathLike[str]], size: int = 64, channels: int = 1,
                window: tuple[float, float] | None = None, targets: dict[str, Sequence[Any]] | None = None,
                attributes: dict[str, Sequence[str]] | None = None, split: str = "test") -> MedicalDataset:
    """DICOM images; ``attributes`` default to ``sex`` / ``age_group`` from the PatientSex / PatientAge tags."""
    from pydicom import dcmread

    images, sexes, ages = [], [], []
    for f in files:
        if not Path(f).exists():
            raise ConfigError(f"DICOM file {f} does not exist")
        try:
            ds = dcmread(str(f))
            pixels = dicom_pixels(ds, window)
        except Exception as e:  # pydicom raises many types on damaged files
            raise ConfigError(f"cannot read DICOM file {f}: {type(e).__name__}: {e}") from None
        images.append(to_uint8_image(pixels, size, channels))
        sexes.append(str(getattr(ds, "PatientSex", "") or "unknown"))
        ages.append(age_group(_dicom_age(ds)))
    attrs = attributes if attributes is not None else {"sex": sexes, "age_group": ages}
    return build_dataset(images, dict(targets or {}), attrs, "dicom.files", split)


@register_dataset("nifti.slices", task="any", paper="NIfTI volumes read with nibabel")
def nifti_slices(path: str | os.PathLike[str], axis: int = 2, slices: Sequence[int] | None = None,
                 label_path: str | os.PathLike[str] | None = None, size: int = 64, channels: int = 1,
                 attributes: dict[str, str] | None = None, split: str = "test") -> MedicalDataset:
    """2D slices of a NIfTI volume; a label volume of the same shape gives per-slice ``mask`` targets."""
    import nibabel

    vol = _load_nifti(nibabel, path)
    if vol.ndim == 4:
        vol = vol[..., 0]
    if vol.ndim != 3 or axis not in (0, 1, 2):
        raise ConfigError(f"{path}: need a 3D volume and axis 0–2, got shape {vol.shape} and axis {axis}")
    index = list(slices) if slices is not None else list(range(vol.shape[axis]))
    lo, hi = float(np.nanmin(vol)), float(np.nanmax(vol))
    scaled = (vol - lo) / (hi - lo) if hi > lo else np.zeros_like(vol)
    images = [to_uint8_image((np.take(scaled, i, axis=axis) * 255).astype(np.uint8), size, channels) for i in index]
    targets: dict[str, Sequence[Any]] = {}
    if label_path is not None:
        lab = _load_nifti(nibabel, label_path)
        if lab.shape[:3] != vol.shape[:3]:
            raise ConfigError(f"label volume {label_path} has shape {lab.shape}, image volume {vol.shape}")
        targets["mask"] = [np.asarray(Image.fromarray(np.take(lab, i, axis=axis).astype(np.uint8)).resize((size, size), Image.NEAREST)) for i in index]
    attrs = {k: [v] * len(images) for k, v in (attributes or {}).items()}
    return build_dataset(images, targets, attrs, "nifti.slices", split)


def _load_nifti(nibabel: Any, path: str | os.PathLike[str]) -> np.ndarray:
    if not Path(path).exists():
        raise ConfigError(f"NIfTI file {path} does not exist")
    try:
        return np.asarray(nibabel.load(str(path)).get_fdata(), dtype=np.float64)
    except Exception as e:
        raise ConfigError(f"cannot read NIfTI file {path}: {type(e).__name__}: {e}") from None


@register_dataset("hf.dataset", task="any", paper="Hugging Face datasets (local directory, data files or Hub name)")
def hf_dataset(path: str, split: str = "test", image_column: str = "image", target_columns: Sequence[str] = ("label",),
               attribute_columns: Sequence[str] = (), size: int = 64, channels: int = 1, n: int | None = None) -> MedicalDataset:
    """A Hugging Face dataset converted to the suite's layout (images resized, targets and attributes kept)."""
    hf = _open_hf(path, split)
    if n is not None:
        hf = hf.select(range(min(n, len(hf))))
    for col in (image_column, *target_columns, *attribute_columns):
        if col not in hf.column_names:
            raise ConfigError(f"hf.dataset {path!r}: no column {col!r}; columns are {hf.column_names}")
    images = [to_uint8_image(np.asarray(img), size, channels) for img in hf[image_column]]
    targets = {c: hf[c] for c in target_columns}
    attrs = {c: [str(v) for v in hf[c]] for c in attribute_columns}
    return build_dataset(images, targets, attrs, "hf.dataset", split)


def _open_hf(path: str, split: str) -> Any:
    import datasets

    local = Path(path)
    try:
        if local.is_dir() and ((local / "dataset_info.json").exists() or (local / "state.json").exists()):
            ds = datasets.load_from_disk(str(local))
            return ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        if local.exists():
            return datasets.load_dataset(str(local), split=split)
        if os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
            raise ConfigError(f"hf.dataset {path!r} is not a local path and the Hub is offline "
                              "(HF_DATASETS_OFFLINE / HF_HUB_OFFLINE): pass a local directory or data files")
        return datasets.load_dataset(path, split=split)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"cannot load hf.dataset {path!r} (split {split!r}): {type(e).__name__}: {e}") from None
