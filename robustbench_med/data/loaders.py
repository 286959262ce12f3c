"""Loaders for real data, each registered as a dataset returning a :class:`~robustbench_med.data.dataset.MedicalDataset`.

- ``hf.dataset``: a local ``save_to_disk`` directory, a local data file (parquet, csv, json, arrow) or folder
  ``datasets.load_dataset`` understands (imagefolder, parquet …), or a Hub name (works online; offline it fails at
  once with a :class:`ConfigError` saying the Hub is unreachable and to pass a local path).
- ``folder.csv``: an image folder plus a CSV with a file column, target columns and attribute columns.
- ``dicom.files``: DICOM files (pydicom): rescale slope / intercept to modality units, then a window (centre, width),
  the file's own VOI window (``window="dicom"``) or min–max scaling; MONOCHROME1 is inverted; sex and age group come
  from the ``PatientSex`` / ``PatientAge`` tags unless given.
- ``nifti.slices``: 2D slices of a NIfTI volume (nibabel, imported lazily) along an axis, with an optional label
  volume of the same shape giving ``mask`` targets.
- ``nifti.volumes``: whole NIfTI volumes (one file per patient), resampled to ``shape`` = (D, H, W) and min–max
  scaled per volume; the NIfTI array (i, j, k) becomes (D, H, W) = (k, j, i) as stored (depth = the last NIfTI axis,
  the affine is not applied: reorient beforehand, e.g. ``nibabel.as_closest_canonical``, to fix the direction);
  optional label volumes give 3D ``mask`` targets.
- ``dicom.series``: DICOM series (a directory of one series' slices, or a multi-frame file) as volumes: slices
  sorted along the slice normal by ImagePositionPatient, most superior (largest patient z) first as in
  ``phantom.volumes`` (falling back to InstanceNumber, then the file name), rescaled and windowed over the whole
  volume (``dicom.files``' rules), resampled to ``shape``; sex / age group from the first slice's header.

Every 2D loader resizes to ``size`` × ``size`` (PIL, antialiased bilinear in float precision for images, nearest for
masks), converts to ``channels`` 1 (ITU-R BT.601 luma) or 3 (grey replicated), and stores uint8 images in the same
Hugging Face layout as the phantom (``image``: ``Array3D((H, W, C), "uint8")``, ``mask``: ``Array2D``, ``index``), so
victims, attacks and the harness treat real and phantom data alike. The volume loaders resample with
``scipy.ndimage.zoom`` (images: Gaussian antialiasing σ = (1/f − 1)/2 voxels along each shrunk axis, then linear;
labels: nearest) and store ``image`` as ``Array4D((D, H, W, 1), "uint8")`` and ``mask`` as ``Array3D`` like
``phantom.volumes``.
"""
from __future__ import annotations

import csv
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image

from robustbench_med import paths
from robustbench_med.data.dataset import MedicalDataset, require_finite_pixels
from robustbench_med.errors import ConfigError
from robustbench_med.registry import register_dataset

AGE_GROUP_EDGES = (40, 65)  # young < 40 ≤ middle < 65 ≤ old (years)
_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601
_DATA_FILE_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json", ".arrow": "arrow"}


def age_group(years: float | None) -> str:
    """Map an age in years to the phantom's groups: young (< 40), middle (40–64), old (≥ 65), or 'unknown'."""
    if years is None or not np.isfinite(years):
        return "unknown"
    return "young" if years < AGE_GROUP_EDGES[0] else "middle" if years < AGE_GROUP_EDGES[1] else "old"


def minmax(array: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] by the minimum and maximum (a constant image becomes 0); NaN or ±inf raise ConfigError."""
    require_finite_pixels(array)
    arr = np.asarray(array, dtype=np.float64)
    finite = arr[np.isfinite(arr)]
    if finite.size == 0:
        return np.zeros_like(arr)
    lo, hi = float(finite.min()), float(finite.max())
    return np.zeros_like(arr) if hi <= lo else np.nan_to_num((arr - lo) / (hi - lo))


def to_uint8_image(array: np.ndarray, size: int, channels: int) -> np.ndarray:
    """A 2D (H, W) or (H, W, 3|4) image → uint8 (size, size, channels).

    uint8 input is taken as is (/255); any other dtype is min–max scaled; a float array already in [0, 1] (e.g. a
    windowed DICOM) is passed through :func:`scaled_to_uint8_image` by the loaders that know its range.
    """
    arr = np.asarray(array)
    unit = arr.astype(np.float64) / 255.0 if arr.dtype == np.uint8 else minmax(arr)
    return scaled_to_uint8_image(unit, size, channels)


def scaled_to_uint8_image(unit: np.ndarray, size: int, channels: int) -> np.ndarray:
    """A float image in [0, 1], (H, W) or (H, W, 3|4) → uint8 (size, size, channels), antialiased resize."""
    if channels not in (1, 3):
        raise ConfigError(f"channels must be 1 or 3, got {channels!r}")
    if not isinstance(size, int) or size < 1:
        raise ConfigError(f"size must be a positive integer, got {size!r}")
    arr = np.asarray(unit, dtype=np.float64)
    require_finite_pixels(arr)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        arr = arr[..., :3] @ _LUMA if channels == 1 else arr[..., :3]
    elif arr.ndim != 2:
        raise ConfigError(f"expected a 2D image (H×W or H×W×3), got shape {arr.shape}")
    planes = arr[..., None] if arr.ndim == 2 else arr
    resized = np.stack([_resize_plane(planes[..., k], size) for k in range(planes.shape[-1])], -1)
    if resized.shape[-1] != channels:
        resized = np.repeat(resized, channels, axis=-1)
    return (np.clip(resized, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def _resize_plane(plane: np.ndarray, size: int) -> np.ndarray:
    img = Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32))  # mode "F"
    return np.asarray(img.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float64)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """A label map → uint8 (size, size) by nearest-neighbour resizing (labels must fit in 0–255)."""
    arr = np.asarray(mask)
    if arr.min() < 0 or arr.max() > 255:
        raise ConfigError(f"mask labels must lie in 0–255, got {arr.min()}–{arr.max()}")
    img = Image.fromarray(arr.astype(np.uint8))
    return np.asarray(img.resize((size, size), Image.Resampling.NEAREST), dtype=np.uint8)


def _target_feature(key: str, arr: np.ndarray) -> tuple[Any, list[Any]]:
    """HF feature and column values of a target: ``mask`` → Array2D (slices) or Array3D (volumes) uint8, scalars →
    Value, vectors → Sequence, matrices → Array2D float32."""
    from datasets import Array2D, Array3D, Sequence as HFSequence, Value

    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise ConfigError(f"target {key!r} must be numeric, got values like {arr.flat[0]!r}")
    integer = np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool
    if key == "mask" and arr.ndim in (3, 4):
        return (Array2D if arr.ndim == 3 else Array3D)(arr.shape[1:], "uint8"), list(arr.astype(np.uint8))
    if arr.ndim == 1:
        return Value("int64" if integer else "float32"), arr.tolist()
    if arr.ndim == 2:
        return HFSequence(Value("int64" if integer else "float32"), length=arr.shape[1]), arr.tolist()
    if arr.ndim == 3:
        return Array2D(arr.shape[1:], "float32"), list(arr.astype(np.float32))
    raise ConfigError(f"target {key!r} has {arr.ndim - 1} dimensions per sample; at most 2 are supported "
                      "(3 for a volume mask)")


def build_dataset(images: Sequence[np.ndarray], targets: dict[str, Sequence[Any]], attributes: dict[str, Sequence[Any]],
                  name: str, split: str) -> MedicalDataset:
    """A :class:`MedicalDataset` from uint8 images (H, W, C) or volumes (D, H, W, C), all of one shape, and
    per-sample target / attribute lists (a volume's ``mask`` is (D, H, W))."""
    from datasets import Array3D, Array4D, Dataset, Features, Value

    if len(images) == 0:
        raise ConfigError(f"{name}: no images to load")
    shape = tuple(images[0].shape)
    if len(shape) not in (3, 4) or any(tuple(im.shape) != shape for im in images):
        raise ConfigError(f"{name}: images must all be (H, W, C) or all (D, H, W, C) of one shape, got "
                          f"{sorted({tuple(im.shape) for im in images})}")
    array = Array3D if len(shape) == 3 else Array4D
    features: dict[str, Any] = {"image": array(shape, "uint8"), "index": Value("int64")}
    columns: dict[str, Any] = {"image": list(images), "index": list(range(len(images)))}
    for key, values in {**targets, **attributes}.items():
        if len(values) != len(images):
            raise ConfigError(f"{name}: {key!r} has {len(values)} values for {len(images)} images")
    for key, values in targets.items():
        features[key], columns[key] = _target_feature(key, np.asarray(values))
    for key, values in attributes.items():
        features[key], columns[key] = Value("string"), [str(v) for v in values]
    hf = Dataset.from_dict(columns, features=Features(features))
    return MedicalDataset(hf, name, split, tuple(targets), tuple(attributes))


# ------------------------------------------------------------------------------------------------- folder + CSV
def _columns(rows: list[dict[str, str]], names: Iterable[str], source: str) -> dict[str, list[str]]:
    out = {}
    header = list(rows[0]) if rows else []
    for n in names:
        if n not in header:
            raise ConfigError(f"{source}: no column {n!r}; columns are {header}")
        out[n] = [r[n] for r in rows]
    return out


def _numeric(values: list[str], column: str, source: str) -> list[float] | list[int]:
    try:
        nums = [float(v) for v in values]
    except ValueError:
        bad = next(v for v in values if not _is_float(v))
        raise ConfigError(f"{source}: target column {column!r} must be numeric, found {bad!r}") from None
    return [int(v) for v in nums] if all(v.is_integer() for v in nums) else nums


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _read_image(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB") if img.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV") else img)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read image {path}: {e}") from None


@register_dataset("folder.csv", task="any", paper="image folder + CSV of labels and attributes")
def folder_csv(root: str | os.PathLike[str], csv_file: str | os.PathLike[str] | None = None, file_column: str = "file",
               target_columns: Sequence[str] = ("label",), attribute_columns: Sequence[str] | None = None,
               age_column: str | None = None, size: int = 64, channels: int = 1, split: str = "test",
               n: int | None = None) -> MedicalDataset:
    """Images listed in a CSV (paths relative to ``root``; ``csv_file`` defaults to ``root/labels.csv``) with numeric
    targets and string attributes. ``attribute_columns=None`` takes whichever of ``sex`` / ``age_group`` exist;
    ``age_column`` (ages in years) adds an ``age_group`` attribute (young < 40 ≤ middle < 65 ≤ old)."""
    root = Path(root)
    csv_path = Path(csv_file) if csv_file is not None else root / "labels.csv"
    if not root.is_dir():
        raise ConfigError(f"folder.csv: image folder {root} does not exist")
    if not csv_path.is_file():
        raise ConfigError(f"folder.csv: CSV file {csv_path} does not exist")
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))[: n if n is not None else None]
    if not rows:
        raise ConfigError(f"folder.csv: {csv_path} has no rows")
    source = str(csv_path)
    if attribute_columns is None:
        attribute_columns = [c for c in ("sex", "age_group") if c in rows[0]]
    attrs: dict[str, list[Any]] = _columns(rows, attribute_columns, source)
    if age_column is not None:
        ages = _numeric(_columns(rows, [age_column], source)[age_column], age_column, source)
        attrs["age_group"] = [age_group(float(a)) for a in ages]
    targets = {k: _numeric(v, k, source) for k, v in _columns(rows, target_columns, source).items()}
    images = []
    for name in _columns(rows, [file_column], source)[file_column]:
        path = root / name
        if not path.is_file():
            raise ConfigError(f"folder.csv: image {path} does not exist (listed in {csv_path})")
        images.append(to_uint8_image(_read_image(path), size, channels))
    return build_dataset(images, targets, attrs, "folder.csv", split)


# ------------------------------------------------------------------------------------------------------- DICOM
def dicom_age(ds: Any) -> float | None:
    """PatientAge ('045Y', '006M', '012W', '020D') in years, or None if absent or malformed."""
    m = re.match(r"^(\d{1,3})([DWMY])$", str(getattr(ds, "PatientAge", "") or "").strip())
    if not m:
        return None
    return int(m.group(1)) / {"D": 365.25, "W": 52.18, "M": 12.0, "Y": 1.0}[m.group(2)]


def _first(value: Any) -> float:
    """A DICOM number that may be multi-valued (WindowCenter '40\\400'): its first value."""
    if isinstance(value, (str, bytes)):
        return float(str(value).split("\\")[0])
    try:
        return float(value[0])
    except TypeError:  # a single DSfloat / IS value
        return float(value)


def _colour(ds: Any) -> bool:
    return str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")) not in ("MONOCHROME1", "MONOCHROME2")


def _modality(ds: Any, arr: np.ndarray) -> np.ndarray:
    """Stored pixel values → modality units (rescale slope / intercept)."""
    return arr * float(getattr(ds, "RescaleSlope", 1) or 1) + float(getattr(ds, "RescaleIntercept", 0) or 0)


def dicom_pixels(ds: Any, window: tuple[float, float] | str | None = None) -> np.ndarray:
    """Pixel data in [0, 1]: modality units (rescale slope/intercept), then the window (centre, width), the file's
    own VOI window (``"dicom"``, falling back to min–max) or min–max; MONOCHROME1 inverted; multi-frame data give
    their middle frame."""
    arr = ds.pixel_array.astype(np.float64)
    if arr.ndim == (4 if _colour(ds) else 3):
        arr = arr[arr.shape[0] // 2]
    return dicom_window(_modality(ds, arr), ds, window)


def dicom_window(arr: np.ndarray, ds: Any, window: tuple[float, float] | str | None = None) -> np.ndarray:
    """Modality units (an image or a whole volume) → [0, 1] by the window (centre, width), ``ds``'s own VOI window
    (``"dicom"``, falling back to min–max) or min–max over ``arr``; MONOCHROME1 inverted."""
    if window == "dicom":
        has_tags = getattr(ds, "WindowCenter", None) is not None and getattr(ds, "WindowWidth", None) is not None
        window = (_first(ds.WindowCenter), _first(ds.WindowWidth)) if has_tags else None
    if window is None:
        unit = minmax(arr)
    elif isinstance(window, str):
        raise ConfigError(f"window must be (centre, width), 'dicom' or None, got {window!r}")
    else:
        centre, width = (float(v) for v in window)
        if width <= 0:
            raise ConfigError(f"window width must be > 0, got {width}")
        unit = np.clip((arr - (centre - width / 2)) / width, 0.0, 1.0)
    if str(getattr(ds, "PhotometricInterpretation", "")) == "MONOCHROME1":
        unit = 1.0 - unit
    return unit


def _dicom_paths(files: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[Path]:
    if isinstance(files, (str, os.PathLike)):
        root = Path(files)
        paths = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    else:
        paths = [Path(f) for f in files]
    if not paths:
        raise ConfigError(f"dicom.files: no files in {files!r}")
    return paths


@register_dataset("dicom.files", task="any", paper="DICOM files read with pydicom")
def dicom_files(files: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], size: int = 64, channels: int = 1,
                window: tuple[float, float] | str | None = None, targets: dict[str, Sequence[Any]] | None = None,
                attributes: dict[str, Sequence[str]] | None = None, split: str = "test") -> MedicalDataset:
    """DICOM images (a list of files or a folder); ``attributes`` default to ``sex`` / ``age_group`` from the
    PatientSex / PatientAge tags ('unknown' where missing)."""
    from pydicom import dcmread

    images, sexes, ages = [], [], []
    for f in _dicom_paths(files):
        if not f.is_file():
            raise ConfigError(f"dicom.files: DICOM file {f} does not exist")
        try:
            ds = dcmread(str(f))
            unit = dicom_pixels(ds, window)
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - pydicom raises many types on damaged or pixel-less files
            raise ConfigError(f"dicom.files: cannot read DICOM file {f}: {type(e).__name__}: {e}") from None
        images.append(scaled_to_uint8_image(unit, size, channels))
        sexes.append(str(getattr(ds, "PatientSex", "") or "unknown"))
        ages.append(age_group(dicom_age(ds)))
    attrs = dict(attributes) if attributes is not None else {"sex": sexes, "age_group": ages}
    return build_dataset(images, dict(targets or {}), attrs, "dicom.files", split)


# ------------------------------------------------------------------------------------------------------- NIfTI
def _load_nifti(path: str | os.PathLike[str], who: str = "nifti.slices") -> np.ndarray:
    import nibabel  # optional dependency: imported only when NIfTI data is asked for

    if not Path(path).is_file():
        raise ConfigError(f"{who}: NIfTI file {path} does not exist")
    try:
        return np.asarray(nibabel.load(str(path)).get_fdata(), dtype=np.float64)
    except Exception as e:  # noqa: BLE001 - nibabel raises several types on bad files
        raise ConfigError(f"{who}: cannot read NIfTI file {path}: {type(e).__name__}: {e}") from None


def _volume(path: str | os.PathLike[str], axis: int) -> np.ndarray:
    vol = _load_nifti(path)
    vol = vol[..., 0] if vol.ndim == 4 else vol
    if vol.ndim != 3 or axis not in (0, 1, 2):
        raise ConfigError(f"nifti.slices: need a 3D volume and axis 0–2, got shape {vol.shape} and axis {axis!r}")
    return vol


@register_dataset("nifti.slices", task="any", paper="NIfTI volumes read with nibabel")
def nifti_slices(path: str | os.PathLike[str] | Mapping[str, str | os.PathLike[str]], axis: int = 2,
                 slices: Sequence[int] | None = None, label_path: str | os.PathLike[str] | None = None, size: int = 64,
                 channels: int = 1, attributes: dict[str, str] | None = None, split: str = "test") -> MedicalDataset:
    """2D slices of a NIfTI volume (4D: first volume), min–max scaled over the whole volume; a label volume of the
    same shape gives per-slice ``mask`` targets; ``attributes`` (one value per patient) are copied to every slice.

    Multi-sequence MRI (BraTS-style ``t1``, ``t1ce``, ``t2``, ``flair`` files of one patient): give ``path`` as a
    mapping ``{sequence: file}``; each sequence becomes one channel, in the mapping's order, min–max scaled over its
    own volume (all volumes must have one shape; ``channels`` stays 1). ``modality.dropout`` / ``modality.pgd`` then
    name the sequences by channel number (or by name on a victim whose card lists them)."""
    if isinstance(path, Mapping):
        if not path or channels != 1:
            raise ConfigError("nifti.slices: a sequence mapping needs at least one {name: file} and channels=1 "
                              f"(one channel per sequence), got {len(path)} file(s) and channels={channels!r}")
        vols = [_volume(p, axis) for p in path.values()]
        if len({v.shape for v in vols}) != 1:
            raise ConfigError(f"nifti.slices: the sequences {list(path)} have different shapes {[v.shape for v in vols]}")
    else:
        vols = [_volume(path, axis)]
    vol = vols[0]
    index = list(range(vol.shape[axis])) if slices is None else [int(i) for i in slices]
    if not index or min(index) < 0 or max(index) >= vol.shape[axis]:
        raise ConfigError(f"nifti.slices: slices must lie in 0–{vol.shape[axis] - 1}, got {index}")
    scaled = [minmax(v) for v in vols]
    images = [np.concatenate([scaled_to_uint8_image(np.take(sv, i, axis=axis), size, channels) for sv in scaled], -1)
              for i in index]
    targets: dict[str, Sequence[Any]] = {}
    if label_path is not None:
        lab = _load_nifti(label_path)
        if lab.shape[:3] != vol.shape:
            raise ConfigError(f"nifti.slices: label volume {label_path} has shape {lab.shape}, "
                              f"the image volume {vol.shape}")
        targets["mask"] = [resize_mask(np.rint(np.take(lab[..., 0] if lab.ndim == 4 else lab, i, axis=axis)), size)
                           for i in index]
    attrs = {k: [v] * len(images) for k, v in (attributes or {}).items()}
    return build_dataset(images, targets, attrs, "nifti.slices", split)


# ------------------------------------------------------------------------------------------------------ volumes
def volume_shape(shape: Any, who: str) -> tuple[int, int, int]:
    """``shape`` checked: three positive integers (D, H, W)."""
    try:
        dims = tuple(int(v) for v in shape)
        ok = len(dims) == 3 and min(dims) >= 1 and all(float(v) == int(v) for v in shape)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(f"{who}: shape must be three positive integers (D, H, W), got {shape!r}")
    return dims


def resample_volume(vol: np.ndarray, shape: tuple[int, int, int], order: int) -> np.ndarray:
    """A 3D array resampled to ``shape`` with ``scipy.ndimage.zoom`` (corners aligned); ``order`` 1 (images:
    Gaussian antialiasing σ = (1/f − 1)/2 along each shrunk axis first) or 0 (labels: nearest)."""
    from scipy.ndimage import gaussian_filter, zoom

    factors = [t / s for t, s in zip(shape, vol.shape)]
    if order > 0 and min(factors) < 1:
        vol = gaussian_filter(vol, [max(0.0, (1 / f - 1) / 2) for f in factors], mode="nearest")
    out = zoom(vol, factors, order=order, mode="nearest")
    if out.shape != tuple(shape):  # zoom rounds the output shape; guard against a float off-by-one
        raise ConfigError(f"cannot resample a volume of shape {vol.shape} to {shape}")
    return out


def to_uint8_volume(unit: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """A float volume in [0, 1] (D, H, W) → uint8 (D, H, W, 1) of ``shape``."""
    require_finite_pixels(unit, "volume")
    return (np.clip(resample_volume(unit, shape, 1), 0.0, 1.0) * 255.0).round().astype(np.uint8)[..., None]


def _as_list(items: Any) -> list[Any]:
    return [items] if isinstance(items, (str, os.PathLike)) else list(items)


def _per_volume(attributes: Mapping[str, Any] | None, n: int) -> dict[str, list[str]]:
    """Attribute lists, one value per volume (a single string is given to every volume)."""
    return {k: [str(v)] * n if isinstance(v, str) else [str(x) for x in v] for k, v in (attributes or {}).items()}


def _nifti_volume(path: str | os.PathLike[str], who: str) -> np.ndarray:
    """A NIfTI file's 3D array (4D: the first volume) as (D, H, W) = (k, j, i), finite voxels checked."""
    vol = _load_nifti(path, who)
    vol = vol[..., 0] if vol.ndim == 4 else vol
    if vol.ndim != 3:
        raise ConfigError(f"{who}: {path} must hold a 3D (or 4D) volume, got an array of shape {vol.shape}")
    require_finite_pixels(vol, f"{who}: volume {path}")
    return vol.transpose(2, 1, 0)


@register_dataset("nifti.volumes", task="any", paper="NIfTI volumes read with nibabel (one per patient)")
def nifti_volumes(paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
                  label_paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
                  shape: Sequence[int] = (32, 48, 48), attributes: Mapping[str, Any] | None = None,
                  split: str = "test") -> MedicalDataset:
    """One volume per NIfTI file (4D: its first volume): array (i, j, k) → (D, H, W) = (k, j, i), min–max scaled
    per volume and resampled to ``shape``; ``label_paths`` (one per file, each of its volume's shape) give ``mask``
    targets (nearest resampling); ``attributes``: a list per attribute, one value per volume (a string: all)."""
    who = "nifti.volumes"
    files, shape = _as_list(paths), volume_shape(shape, who)
    labels = _as_list(label_paths) if label_paths is not None else None
    if not files or (labels is not None and len(labels) != len(files)):
        raise ConfigError(f"{who}: need at least one file and one label file per volume, got {len(files)} file(s) "
                          f"and {'no' if labels is None else len(labels)} label file(s)")
    images, masks = [], []
    for k, f in enumerate(files):
        vol = _nifti_volume(f, who)
        images.append(to_uint8_volume(minmax(vol), shape))
        if labels is not None:
            lab = np.rint(_nifti_volume(labels[k], who))
            if lab.shape != vol.shape:
                raise ConfigError(f"{who}: label volume {labels[k]} has shape {lab.shape[::-1]}, the image volume "
                                  f"{f} {vol.shape[::-1]} (NIfTI axis order)")
            if lab.min() < 0 or lab.max() > 255:
                raise ConfigError(f"{who}: labels in {labels[k]} must lie in 0–255, got {lab.min()}–{lab.max()}")
            masks.append(resample_volume(lab.astype(np.uint8), shape, 0))
    targets = {"mask": masks} if labels is not None else {}
    return build_dataset(images, targets, _per_volume(attributes, len(files)), who, split)


def _slice_position(ds: Any) -> float | None:
    """The slice's position along its normal (ImageOrientationPatient row × column; patient z without one)."""
    ipp = getattr(ds, "ImagePositionPatient", None)
    if ipp is None or len(ipp) != 3:
        return None
    iop = getattr(ds, "ImageOrientationPatient", None)
    normal = np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:], float)) if iop is not None and len(iop) == 6 \
        else np.array([0.0, 0.0, 1.0])
    return float(np.dot(np.asarray(ipp, float), normal))


def _sorted_slices(slices: list[Any]) -> list[Any]:
    """Slices most superior first (descending position along the normal), else by InstanceNumber, else as given."""
    positions = [_slice_position(ds) for ds in slices]
    if all(p is not None for p in positions):
        return [ds for _, ds in sorted(zip(positions, slices), key=lambda t: -t[0])]
    if all(getattr(ds, "InstanceNumber", None) is not None for ds in slices):
        return sorted(slices, key=lambda ds: int(ds.InstanceNumber))
    return slices


def _read_dicom(path: Path, who: str) -> Any:
    from pydicom import dcmread

    try:
        ds = dcmread(str(path))
        ds.pixel_array  # noqa: B018 - decode now, so a file without pixels fails here with its name
    except Exception as e:  # noqa: BLE001 - pydicom raises many types on damaged or pixel-less files
        raise ConfigError(f"{who}: cannot read DICOM file {path}: {type(e).__name__}: {e}") from None
    if _colour(ds):
        raise ConfigError(f"{who}: {path} is a colour image ({ds.PhotometricInterpretation}); "
                          "series must be monochrome")
    return ds


def dicom_volume(source: str | os.PathLike[str], who: str = "dicom.series") -> tuple[np.ndarray, Any]:
    """(modality units [D, H, W], the first slice's header) of a series directory or a multi-frame file."""
    path = Path(source)
    if not path.exists():
        raise ConfigError(f"{who}: {path} does not exist")
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")) if path.is_dir() else [path]
    if not files:
        raise ConfigError(f"{who}: no files in the series directory {path}")
    slices = [_read_dicom(f, who) for f in files]
    if len(slices) == 1:
        ds = slices[0]
        if ds.pixel_array.ndim != 3:
            raise ConfigError(f"{who}: {files[0]} is a single 2D image, not a volume: give its series directory "
                              "(or a multi-frame file)")
        return _modality(ds, ds.pixel_array.astype(np.float64)), ds
    slices = _sorted_slices(slices)
    planes = [ds.pixel_array for ds in slices]
    if len({p.shape for p in planes}) != 1 or planes[0].ndim != 2:
        raise ConfigError(f"{who}: the slices of {path} must be 2D images of one size, "
                          f"got {sorted({p.shape for p in planes})}")
    return np.stack([_modality(ds, p.astype(np.float64)) for ds, p in zip(slices, planes)]), slices[0]


@register_dataset("dicom.series", task="any",
                  paper="DICOM series (slice directories or multi-frame files) read with pydicom")
def dicom_series(series: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], shape: Sequence[int] = (32, 48, 48),
                 window: tuple[float, float] | str | None = None, attributes: Mapping[str, Any] | None = None,
                 split: str = "test") -> MedicalDataset:
    """One volume per series (a directory of one series' slice files, or a multi-frame DICOM file; a list of them
    for several): slices sorted (module docstring), modality units windowed over the whole volume like
    :func:`dicom_pixels`, resampled to ``shape``. ``attributes`` default to ``sex`` / ``age_group`` from the first
    slice's PatientSex / PatientAge ('unknown' where missing)."""
    who, shape = "dicom.series", volume_shape(shape, "dicom.series")
    sources = _as_list(series)
    if not sources:
        raise ConfigError(f"{who}: no series given")
    images, sexes, ages = [], [], []
    for src in sources:
        vol, ds = dicom_volume(src, who)
        images.append(to_uint8_volume(dicom_window(vol, ds, window), shape))
        sexes.append(str(getattr(ds, "PatientSex", "") or "unknown"))
        ages.append(age_group(dicom_age(ds)))
    attrs = _per_volume(attributes, len(images)) if attributes is not None else {"sex": sexes, "age_group": ages}
    return build_dataset(images, {}, attrs, who, split)


# ------------------------------------------------------------------------------------------ Hugging Face datasets
def _hub_offline() -> bool:
    if os.environ.get("HF_DATASETS_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return True
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return True
    import huggingface_hub.constants as hub

    return bool(getattr(hub, "HF_HUB_OFFLINE", False))


def _pick_split(ds: Any, split: str, source: str) -> Any:
    """``ds[split]`` of a DatasetDict; a dict with a single split (local files load as 'train') gives that one."""
    import datasets

    if not isinstance(ds, datasets.DatasetDict):
        return ds
    if split in ds:
        return ds[split]
    if len(ds) == 1:
        return next(iter(ds.values()))
    raise ConfigError(f"hf.dataset {source!r}: no split {split!r}; splits are {list(ds)}")


def _open_hf(path: str | os.PathLike[str], split: str) -> Any:
    """A ``datasets.Dataset`` from a save_to_disk folder, a data file / folder, or (online) a Hub name."""
    import datasets

    local = Path(path)
    source = str(path)
    cache = str(paths.datasets_dir() / "hf_cache")  # keep load_dataset's Arrow cache in the suite's home
    try:
        if local.is_dir() and ((local / "dataset_info.json").exists() or (local / "dataset_dict.json").exists()
                               or (local / "state.json").exists()):
            return _pick_split(datasets.load_from_disk(source), split, source)
        if local.is_file():
            builder = _DATA_FILE_BUILDERS.get(local.suffix.lower())
            if builder is None:
                raise ConfigError(f"hf.dataset {source!r}: unknown data file type {local.suffix!r}; "
                                  f"use one of {sorted(_DATA_FILE_BUILDERS)}")
            return _pick_split(datasets.load_dataset(builder, data_files=source, cache_dir=cache), split, source)
        if local.is_dir():
            return _pick_split(datasets.load_dataset(source, cache_dir=cache), split, source)
        if _hub_offline():
            raise ConfigError(f"hf.dataset {source!r} is not a local path and the Hugging Face Hub is unreachable "
                              "(offline: HF_DATASETS_OFFLINE / HF_HUB_OFFLINE); pass a local directory or data file")
        return _pick_split(datasets.load_dataset(source, cache_dir=cache), split, source)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises many types (FileNotFoundError, ConnectionError …)
        raise ConfigError(f"hf.dataset: cannot load {source!r} (split {split!r}): {type(e).__name__}: {e}") from None


@register_dataset("hf.dataset", task="any", paper="Hugging Face datasets (local directory, data files or Hub name)")
def hf_dataset(path: str | os.PathLike[str], split: str = "test", image_column: str = "image",
               target_columns: Sequence[str] = ("label",), attribute_columns: Sequence[str] = (), size: int = 64,
               channels: int = 1, n: int | None = None) -> MedicalDataset:
    """A Hugging Face dataset converted to the suite's layout (images resized, numeric targets and string
    attributes kept). Images may be PIL images (``Image()`` feature) or arrays (uint8 taken as is, else min–max)."""
    hf = _open_hf(path, split)
    for col in (image_column, *target_columns, *attribute_columns):
        if col not in hf.column_names:
            raise ConfigError(f"hf.dataset {str(path)!r}: no column {col!r}; columns are {hf.column_names}")
    if n is not None:
        if n <= 0:
            raise ConfigError(f"hf.dataset: n must be positive, got {n}")
        hf = hf.select(range(min(n, len(hf))))
    cols = hf.select_columns([image_column, *target_columns, *attribute_columns])[:]
    images = [to_uint8_image(np.asarray(img), size, channels) for img in cols[image_column]]
    targets = {c: cols[c] for c in target_columns}
    attrs = {c: [str(v) for v in cols[c]] for c in attribute_columns}
    return build_dataset(images, targets, attrs, "hf.dataset", split)
