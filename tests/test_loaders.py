"""Real-data loaders on real files shipped by packages (pydicom, pydicom-data, nibabel) and files written here."""
import csv
import os

import numpy as np
import pytest
import torch
from PIL import Image

import robustbench_med as rbm
from robustbench_med.data.loaders import age_group
from robustbench_med.errors import ConfigError


def _check(ds, n, channels=1, size=64):
    x = ds.images()
    assert x.shape == (n, channels, size, size) and x.dtype == torch.float32
    assert 0 <= float(x.min()) and float(x.max()) <= 1 and float(x.std()) > 0.01


def test_dicom_ct_and_chest_xray():
    from pydicom.data import get_testdata_file

    files = [get_testdata_file("CT_small.dcm"), get_testdata_file("RG1_UNCR.dcm")]
    ds = rbm.create_dataset("dicom.files", files=files, targets={"label": [0, 1]})
    _check(ds, 2)
    assert ds.targets("label").tolist() == [0, 1]
    attrs = ds.attributes()
    assert len(attrs["sex"]) == 2 and set(attrs["age_group"]) <= {"young", "middle", "old", "unknown"}
    windowed = rbm.create_dataset("dicom.files", files=files[:1], window=(40.0, 400.0), channels=3)
    _check(windowed, 1, channels=3)


def test_nifti_slices_with_labels(tmp_path):
    import nibabel

    path = os.path.join(os.path.dirname(nibabel.__file__), "tests", "data", "anatomical.nii")
    vol = nibabel.load(path)
    labels = (np.asarray(vol.get_fdata()) > np.percentile(vol.get_fdata(), 70)).astype(np.uint8)
    lab_path = tmp_path / "labels.nii"
    nibabel.save(nibabel.Nifti1Image(labels, vol.affine), str(lab_path))
    ds = rbm.create_dataset("nifti.slices", path=path, axis=2, slices=[10, 12], label_path=lab_path, attributes={"sex": "F"})
    _check(ds, 2)
    assert ds.targets("mask").shape == (2, 64, 64) and ds.targets("mask").max() == 1
    assert ds.attributes()["sex"] == ["F", "F"]


def test_image_folder_with_csv(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 50), dtype=np.uint8)).save(tmp_path / f"img{i}.png")
        rows.append({"file": f"img{i}.png", "label": i % 2, "sex": "FM"[i % 2], "age_group": "old"})
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    ds = rbm.create_dataset("folder.csv", root=tmp_path, csv_file=tmp_path / "labels.csv")
    _check(ds, 3)
    assert ds.targets("label").tolist() == [0, 1, 0] and ds.targets("label").dtype == torch.long
    with pytest.raises(ConfigError, match="no column 'diagnosis'"):
        rbm.create_dataset("folder.csv", root=tmp_path, csv_file=tmp_path / "labels.csv", target_columns=("diagnosis",))
    (tmp_path / "img1.png").unlink()
    with pytest.raises(ConfigError, match="img1.png does not exist"):
        rbm.create_dataset("folder.csv", root=tmp_path, csv_file=tmp_path / "labels.csv")


def test_hf_local_directory_and_offline_hub_name(tmp_path):
    from datasets import Dataset

    rng = np.random.default_rng(1)
    Dataset.from_dict({"image": [rng.integers(0, 255, (32, 32), dtype=np.uint8) for _ in range(4)], "label": [0, 1, 1, 0],
                       "sex": ["F", "M", "F", "M"]}).save_to_disk(str(tmp_path / "local"))
    ds = rbm.create_dataset("hf.dataset", path=str(tmp_path / "local"), attribute_columns=("sex",))
    _check(ds, 4)
    assert ds.attributes()["sex"] == ["F", "M", "F", "M"]
    with pytest.raises(ConfigError, match="offline"):
        rbm.create_dataset("hf.dataset", path="some-org/some-medical-dataset")


def test_damaged_dicom_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"\x00" * 200)
    with pytest.raises(ConfigError, match="cannot read DICOM"):
        rbm.create_dataset("dicom.files", files=[bad])


@pytest.mark.parametrize("years,group", [(25, "young"), (40, "middle"), (64.9, "middle"), (65, "old"), (None, "unknown")])
def test_age_groups(years, group):
    assert age_group(years) == group


def test_loaded_real_data_feeds_corruptions_and_modality_threats_unchanged(tmp_path):
    """#19 item 5: package-shipped DICOM and NIfTI files, as loaded, go through a corruption and (multi-sequence
    NIfTI) through modality dropout and single-sequence PGD, on a user's 2-channel model."""
    import nibabel
    from pydicom.data import get_testdata_file

    from robustbench_med.threat import check_budget

    ct = rbm.create_dataset("dicom.files", files=[get_testdata_file("CT_small.dcm")], targets={"label": [1]})
    x = ct.images()
    blurred = rbm.create_attack("corruption.motion", severity=3)(_toy_victim(1), x, torch.zeros(1, dtype=torch.long))
    assert check_budget(x, blurred, "corruption", 3).valid and not torch.equal(blurred, x)

    path = os.path.join(os.path.dirname(nibabel.__file__), "tests", "data", "anatomical.nii")
    vol = nibabel.load(path)
    inverted = tmp_path / "t2.nii"
    nibabel.save(nibabel.Nifti1Image(vol.get_fdata().max() - vol.get_fdata(), vol.affine), str(inverted))
    ds = rbm.create_dataset("nifti.slices", path={"t1": path, "t2": inverted}, axis=2, slices=[10, 11, 12])
    _check(ds, 3, channels=2)
    x = ds.images()
    assert not torch.equal(x[:, 0], x[:, 1])
    victim = _toy_victim(2)
    y = victim.predict(x)
    dropped = rbm.create_attack("modality.dropout", drop=1)(victim, x, y)
    assert (dropped[:, 1] == 0).all() and torch.equal(dropped[:, 0], x[:, 0])
    adv = rbm.create_attack("modality.pgd", modality=0, eps="4/255", steps=2)(victim, x, y)
    assert torch.equal(adv[:, 1], x[:, 1]) and check_budget(x, adv, "Linf", 4 / 255).valid
    with pytest.raises(ConfigError, match="channels=1"):
        rbm.create_dataset("nifti.slices", path={"t1": path}, channels=3)


def _toy_victim(channels):
    from robustbench_med.victim import ModelVictim, VictimCard

    card = VictimCard(name=f"user.toy{channels}", task="classification", modality="MRI", input_size=(channels, 64, 64),
                      classes=("a", "b"))
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(channels, 4, 3, padding=1), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(4, 2))
    return ModelVictim(net, card).eval()
