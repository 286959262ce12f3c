"""Volumes (issue #20): the volumetric phantom (``phantom.volumes``), MedicalDataset on NCDHW data, and the volume
loaders (``nifti.volumes``, ``dicom.series``) on files shipped by nibabel and pydicom plus series written here."""
import os

import numpy as np
import pytest
import torch
from scipy import ndimage

import robustbench_med as rbm
from robustbench_med.data import volumes as V
from robustbench_med.data.dataset import MedicalDataset
from robustbench_med.data.loaders import build_dataset
from robustbench_med.data.phantom import MASK_CLASSES
from robustbench_med.errors import ConfigError

D, S = 32, 48


@pytest.fixture(scope="module")
def train120():
    """120 training volumes as columns (generated once, about 0.3 s)."""
    return V.generate("train", 120)


# ------------------------------------------------------------------------------------------------- phantom
def test_volume_shapes_dtypes_and_range(train120):
    img, mask, lm = train120["image"][0], train120["mask"][0], train120["landmarks"][0]
    assert img.shape == (D, S, S, 1) and img.dtype == np.uint8
    assert mask.shape == (D, S, S) and mask.dtype == np.uint8 and lm.shape == (4, 3) and lm.dtype == np.float32
    assert len(V.VOLUME_LANDMARKS) == 4 and V.MASK_CLASSES == MASK_CLASSES
    stack = np.stack(train120["image"])
    assert stack.min() == 0 and stack.max() >= 250 and stack.std() > 20
    assert train120["index"] == list(range(120)) and set(train120["sex"]) == {"F", "M"}
    assert set(train120["age_group"]) == {"young", "middle", "old"}
    small = V.generate_volume(0, "test", size=20, depth=10)
    assert small["image"].shape == (10, 20, 20, 1) and small["mask"].shape == (10, 20, 20)


def test_same_seed_same_bytes_independent_of_n(train120):
    few = V.generate("train", 4)
    for key in ("image", "mask", "landmarks", "label", "n_lesions", "sex", "age_group"):
        for a, b in zip(few[key], train120[key][:4]):
            assert np.array_equal(a, b), key
    other_split, other_seed = V.generate_volume(0, "test"), V.generate_volume(0, "train", seed=1)
    assert not np.array_equal(other_split["image"], few["image"][0])
    assert not np.array_equal(other_seed["image"], few["image"][0])


def test_masks_labels_and_landmarks_agree(train120):
    cols = train120
    checked_types = 0
    for img, mask, label, kind, n, lm in zip(cols["image"], cols["mask"], cols["label"], cols["lesion_type"],
                                            cols["n_lesions"], cols["landmarks"]):
        assert set(np.unique(mask)) <= set(range(len(MASK_CLASSES))) and {0, 1, 2, 3, 4} <= set(np.unique(mask))
        regions = ndimage.label(mask == 5, structure=np.ones((3, 3, 3)))[1]
        assert regions == n and bool(label) == (n > 0) == (kind > 0) and n <= 2
        assert np.all(lm >= 0) and np.all(lm[:, 0] <= S - 1) and np.all(lm[:, 1] <= S - 1) and np.all(lm[:, 2] <= D - 1)
        x, y, z = np.round(lm).astype(int).T
        assert mask[z[0], y[0], x[0]] in (2, 5), "liver centroid in the liver"
        assert mask[z[1], y[1], x[1]] in (3, 5) and mask[z[2], y[2], x[2]] in (3, 5), "kidney centroids in the kidneys"
        assert mask[z[3], y[3], x[3]] == 4, "spine landmark in the spine"
        assert x[1] < x[3] < x[2] and x[0] < x[3], "liver and first kidney on the image left of the spine"
        assert z[0] < z[1] and z[0] < z[2] and abs(z[3] - (lm[1, 2] + lm[2, 2]) / 2) < 3, "liver above the kidneys"
        vol = img[..., 0].astype(float)
        assert vol[mask == 4].mean() > vol[mask > 0].mean() + 30 > vol[mask == 0].mean() + 30
        if n == 1 and (mask == 2).sum() > 0:
            lesion = mask == 5
            ring = ndimage.binary_dilation(lesion, iterations=2) & ~lesion & (mask == 2)
            if ring.sum() > 20 and ring.sum() > 2 * (ndimage.binary_dilation(lesion, iterations=2) & (mask == 3)).sum():
                assert (vol[lesion].mean() < vol[ring].mean()) == (kind == 1), "cysts hypodense, tumours hyperdense"
                checked_types += 1
    assert checked_types >= 10


def _lesion_contrast(img: np.ndarray, mask: np.ndarray) -> float:
    """|mean lesion − mean surrounding organ| (a two-voxel ring of liver / kidney around the lesions)."""
    lesion = mask == 5
    ring = ndimage.binary_dilation(lesion, iterations=2) & ~lesion & ((mask == 2) | (mask == 3))
    return abs(float(img[..., 0][lesion].mean()) - float(img[..., 0][ring].mean()))


def test_disparity_fainter_lesions_for_f_and_more_for_old(train120):
    cols = train120
    sex, age, label = np.array(cols["sex"]), np.array(cols["age_group"]), np.array(cols["label"])
    contrast = np.array([_lesion_contrast(i, m) if n else np.nan for i, m, n in
                         zip(cols["image"], cols["mask"], cols["n_lesions"])])
    f, m = np.nanmean(contrast[sex == "F"]), np.nanmean(contrast[sex == "M"])
    assert (~np.isnan(contrast[sex == "F"])).sum() >= 20 and (~np.isnan(contrast[sex == "M"])).sum() >= 20
    assert f < 0.7 * m, (f, m)
    assert label[age == "old"].mean() > label[age == "young"].mean() + 0.15
    noise = {g: np.mean([np.std(i[..., 0][ndimage.binary_erosion(msk == 2, iterations=2) & (msk == 2)])
                         for i, msk, a in zip(cols["image"], cols["mask"], age) if a == g]) for g in ("young", "old")}
    assert noise["old"] > noise["young"] * 1.3, noise


# ------------------------------------------------------------------------------------------------- dataset
def test_phantom_volumes_dataset_api(tmp_path):
    ds = rbm.create_dataset("phantom.volumes", split="test", n=6, cache_dir=tmp_path)
    assert isinstance(ds, MedicalDataset) and len(ds) == 6
    assert ds.input_size == (1, D, S, S) and ds.spatial_dims == 3
    x = ds.images()
    assert x.shape == (6, 1, D, S, S) and x.dtype == torch.float32 and 0 <= float(x.min()) and float(x.max()) <= 1
    raw = V.generate_volume(2, "test")
    assert torch.equal(x[2, 0], torch.from_numpy(raw["image"][..., 0]).float() / 255)
    assert ds.target_fields == ("mask", "label", "lesion_type", "n_lesions", "landmarks")
    assert ds.targets("mask").shape == (6, D, S, S) and ds.targets("mask").dtype == torch.long
    assert ds.targets("landmarks").shape == (6, 4, 3) and ds.targets("landmarks").dtype == torch.float32
    assert ds.targets("label").tolist() == [int((m == 5).any()) for m in ds.targets("mask")]
    assert set(ds.attributes()) == {"sex", "age_group"}
    sub = ds.subset([4, 1])
    assert sub.images().shape == (2, 1, D, S, S) and torch.equal(sub.images(), x[[4, 1]])
    assert sub.targets("n_lesions").tolist() == ds.targets("n_lesions")[[4, 1]].tolist()
    again = rbm.create_dataset("phantom.volumes", split="test", n=6, cache_dir=tmp_path)  # from the cache
    assert again.fingerprint() == ds.fingerprint() != sub.fingerprint()
    small = rbm.create_dataset("phantom.volumes", split="val", n=2, size=24, depth=12, cache_dir=tmp_path)
    assert small.input_size == (1, 12, 24, 24) and small.images().shape == (2, 1, 12, 24, 24)
    flat = rbm.create_dataset("phantom.ct", split="test", n=2, cache_dir=tmp_path)
    assert flat.spatial_dims == 2 and flat.input_size == (1, 64, 64) and flat.images().shape == (2, 1, 64, 64)


@pytest.mark.parametrize("kwargs,match", [({"split": "dev"}, "unknown split"), ({"n": 0}, "positive integer"),
                                          ({"size": 8}, "size"), ({"depth": 4}, "depth"), ({"seed": -1}, "seed")])
def test_bad_volume_dataset_arguments(tmp_path, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        rbm.create_dataset("phantom.volumes", cache_dir=tmp_path, **{"n": 2, **kwargs})


def test_default_split_sizes_and_non_uint8_volumes_are_refused(tmp_path):
    from datasets import Array4D, Dataset, Features

    from robustbench_med.data.dataset import VOLUME_SIZES

    assert VOLUME_SIZES == {"train": 160, "val": 32, "test": 64}
    assert len(rbm.create_dataset("phantom.volumes", split="val", cache_dir=tmp_path)) == 32
    hf = Dataset.from_dict({"image": [np.zeros((2, 3, 3, 1), np.float32)]},
                           features=Features({"image": Array4D((2, 3, 3, 1), "float32")}))
    with pytest.raises(ConfigError, match=r"Array4D\(\(D, H, W, C\)\)"):
        MedicalDataset(hf, "floaty", "test", (), ())
    with pytest.raises(ConfigError, match="one shape"):
        build_dataset([np.zeros((2, 3, 3, 1), np.uint8), np.zeros((2, 4, 3, 1), np.uint8)], {}, {}, "mixed", "test")


# ------------------------------------------------------------------------------------------------- NIfTI
def _nifti_data(name: str) -> str:
    from nibabel.testing import data_path

    return os.path.join(data_path, name)


def test_nifti_volumes_on_shipped_files_with_labels(tmp_path):
    import nibabel

    anat = nibabel.load(_nifti_data("anatomical.nii"))
    labels = (np.asarray(anat.get_fdata()) > np.percentile(anat.get_fdata(), 70)).astype(np.uint8)
    nibabel.save(nibabel.Nifti1Image(labels, anat.affine), str(tmp_path / "labels.nii"))
    ds = rbm.create_dataset("nifti.volumes", paths=[_nifti_data("anatomical.nii"), _nifti_data("example4d.nii.gz")],
                            shape=(16, 24, 20), attributes={"sex": ["F", "M"], "age_group": "old"})
    x = ds.images()
    assert x.shape == (2, 1, 16, 24, 20) and ds.spatial_dims == 3
    assert float(x.min()) == 0 and float(x.amax(dim=(1, 2, 3, 4)).min()) > 0.5  # antialiased: peaks blur below 1
    assert ds.attributes() == {"sex": ["F", "M"], "age_group": ["old", "old"]}
    labelled = rbm.create_dataset("nifti.volumes", paths=_nifti_data("anatomical.nii"),
                                  label_paths=tmp_path / "labels.nii")
    mask = labelled.targets("mask")
    assert labelled.input_size == (1, 32, 48, 48) and mask.shape == (1, 32, 48, 48)
    assert set(mask.unique().tolist()) == {0, 1}
    vol = anat.get_fdata()
    threshold = (np.percentile(vol, 70) - vol.min()) / (vol.max() - vol.min())  # the labels' threshold, scaled
    agreement = float(((labelled.images()[0, 0] > threshold) == (mask[0] == 1)).float().mean())
    assert agreement > 0.9, "labels aligned with the image through the axis change and resampling (1 voxel off: 0.86)"


def test_nifti_axis_convention_depth_is_the_last_axis(tmp_path):
    import nibabel

    i, j, k = np.meshgrid(np.arange(6), np.arange(7), np.arange(5), indexing="ij")
    vol = (100 * k + 10 * j + i).astype(np.float32)  # shape (6, 7, 5): k the slowest-growing depth
    nibabel.save(nibabel.Nifti1Image(vol, np.eye(4)), str(tmp_path / "ramp.nii"))
    x = rbm.create_dataset("nifti.volumes", paths=tmp_path / "ramp.nii", shape=(5, 7, 6)).images()[0, 0].numpy()
    expected = (100 * k + 10 * j + i).transpose(2, 1, 0) / vol.max()
    assert np.abs(x - expected).max() <= 0.5 / 255 + 1e-6


def test_nifti_volume_errors(tmp_path):
    import nibabel

    with pytest.raises(ConfigError, match="does not exist"):
        rbm.create_dataset("nifti.volumes", paths=tmp_path / "missing.nii")
    nibabel.save(nibabel.Nifti1Image(np.zeros((4, 4, 3), np.uint8), np.eye(4)), str(tmp_path / "small_lab.nii"))
    with pytest.raises(ConfigError, match="label volume .* has shape"):
        rbm.create_dataset("nifti.volumes", paths=_nifti_data("anatomical.nii"), label_paths=tmp_path / "small_lab.nii")
    with pytest.raises(ConfigError, match="one label file per volume"):
        rbm.create_dataset("nifti.volumes", paths=[_nifti_data("anatomical.nii")] * 2,
                           label_paths=[tmp_path / "small_lab.nii"])
    nan = np.ones((4, 4, 3), np.float32)
    nan[1, 2, 0] = np.nan
    nibabel.save(nibabel.Nifti1Image(nan, np.eye(4)), str(tmp_path / "nan.nii"))
    with pytest.raises(ConfigError, match="1 non-finite"):
        rbm.create_dataset("nifti.volumes", paths=tmp_path / "nan.nii")
    nibabel.save(nibabel.Nifti1Image(np.ones((4, 4), np.float32), np.eye(4)), str(tmp_path / "flat.nii"))
    with pytest.raises(ConfigError, match="3D"):
        rbm.create_dataset("nifti.volumes", paths=tmp_path / "flat.nii")
    with pytest.raises(ConfigError, match="three positive integers"):
        rbm.create_dataset("nifti.volumes", paths=_nifti_data("anatomical.nii"), shape=(32, 48))


# ------------------------------------------------------------------------------------------------- DICOM
def _write_slice(path, value: int, z: float | None, instance: int, rows: int = 8, cols: int = 8) -> None:
    """A CT slice (uint16, intercept −1024) of constant ``value`` plus a small in-plane ramp, at patient z ``z``."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CTImageStorage, meta.MediaStorageSOPInstanceUID, "CT"
    ds.PatientSex, ds.PatientAge, ds.InstanceNumber = "F", "070Y", instance
    if z is not None:
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [0.0, 0.0, z], [1, 0, 0, 0, 1, 0]
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.PixelData = (np.full((rows, cols), value, np.uint16) + np.arange(cols, dtype=np.uint16)).tobytes()
    ds.save_as(str(path), enforce_file_format=True)


def _series(root, positions: bool = True):
    """Five slices at z = 0, 5, …, 20 (value 1000 + 100·slice), written under shuffled file names."""
    root.mkdir()
    for name, k in zip("caebd", np.random.default_rng(0).permutation(5)):
        _write_slice(root / f"{name}.dcm", 1000 + 100 * int(k), 5.0 * int(k) if positions else None, int(k) + 1)
    return root


def test_dicom_series_sorts_slices_by_position_then_instance_number(tmp_path):
    ds = rbm.create_dataset("dicom.series", series=_series(tmp_path / "s1"), shape=(5, 8, 8))
    means = ds.images()[0, 0].mean(dim=(1, 2)).numpy()
    assert ds.input_size == (1, 5, 8, 8) and np.all(np.diff(means) < -0.1), "most superior (largest z) slice first"
    assert ds.attributes() == {"sex": ["F"], "age_group": ["old"]}
    fallback = rbm.create_dataset("dicom.series", series=_series(tmp_path / "s2", positions=False), shape=(5, 8, 8))
    assert np.all(np.diff(fallback.images()[0, 0].mean(dim=(1, 2)).numpy()) > 0.1), "InstanceNumber order"
    windowed = rbm.create_dataset("dicom.series", series=tmp_path / "s1", shape=(5, 8, 8), window=(126, 100))
    x = windowed.images()[0, 0]  # units −24 + 100·k + column; window [76, 176]: k ≥ 2 white, k = 1 in, k = 0 black
    assert float(x[0].max()) == 1.0 and float(x[4].max()) == 0.0 and 0 < float(x[3].mean()) < 1


def test_dicom_series_multiframe_and_several_volumes(tmp_path):
    from pydicom.data import get_testdata_file

    emri = get_testdata_file("emri_small.dcm")  # 10 frames of 64 × 64 MR
    ds = rbm.create_dataset("dicom.series", series=[emri, _series(tmp_path / "s")], shape=(10, 32, 32),
                            attributes={"sex": ["M", "F"]})
    x = ds.images()
    assert x.shape == (2, 1, 10, 32, 32) and ds.spatial_dims == 3 and float(x[0].std()) > 0.05
    assert ds.attributes() == {"sex": ["M", "F"]}
    assert rbm.create_dataset("dicom.series", series=emri).attributes()["age_group"] == ["unknown"]


def test_dicom_series_errors(tmp_path):
    from pydicom.data import get_testdata_file

    with pytest.raises(ConfigError, match="does not exist"):
        rbm.create_dataset("dicom.series", series=tmp_path / "missing")
    with pytest.raises(ConfigError, match="single 2D image"):
        rbm.create_dataset("dicom.series", series=get_testdata_file("CT_small.dcm"))
    bad = _series(tmp_path / "bad")
    (bad / "notes.txt").write_text("not a DICOM file")
    with pytest.raises(ConfigError, match="notes.txt"):
        rbm.create_dataset("dicom.series", series=bad)
    mixed = _series(tmp_path / "mixed")
    _write_slice(mixed / "f.dcm", 1000, 25.0, 6, rows=6)
    with pytest.raises(ConfigError, match="one size"):
        rbm.create_dataset("dicom.series", series=mixed)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no files"):
        rbm.create_dataset("dicom.series", series=tmp_path / "empty")
