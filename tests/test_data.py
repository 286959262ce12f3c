"""Data: the phantom world (determinism, target consistency, VQA, built-in disparity), MedicalDataset and its cache,
and the real-data loaders on real files shipped by pydicom, pydicom-data and nibabel plus files written here."""
import csv
import os
import time

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

import robustbench_med as rbm
from robustbench_med.data import phantom as P
from robustbench_med.data.loaders import age_group, dicom_age, dicom_pixels, minmax
from robustbench_med.errors import ConfigError, UnknownNameError

CFG = P.PhantomConfig()


@pytest.fixture(scope="module")
def train500():
    """500 training samples as columns (generated once for the module)."""
    return P.generate("train", 500, CFG)


# ------------------------------------------------------------------------------------------------ determinism
def test_same_seed_same_bytes_independent_of_n():
    small, large = P.generate("test", 10, CFG), P.generate("test", 30, CFG)
    for key in ("image", "mask", "landmarks", "vqa", "sex", "age_group"):
        assert all(np.array_equal(a, b) for a, b in zip(small[key], large[key][:10])), key
    assert P.generate("test", 5, CFG, start=7)["image"][0].tobytes() == large["image"][7].tobytes()
    other_seed = P.generate("test", 10, P.PhantomConfig(seed=1))
    assert not any(np.array_equal(a, b) for a, b in zip(small["image"], other_seed["image"]))


def test_splits_are_disjoint_streams():
    images = {s: {img.tobytes() for img in P.generate(s, 40, CFG)["image"]} for s in P.SPLIT_CODES}
    assert all(len(v) == 40 for v in images.values())
    assert not images["train"] & images["val"] and not images["train"] & images["test"]
    assert not images["val"] & images["test"]


def test_dataset_is_deterministic_through_the_registry():
    a = rbm.create_dataset("phantom.ct", split="test", n=10)
    b = rbm.create_dataset("phantom.ct", split="test", n=50)
    assert torch.equal(a.images(), b.images(slice(0, 10)))
    assert torch.equal(a.targets("mask"), b.targets("mask", list(range(10))))
    assert a.attributes() == b.attributes(torch.arange(10))
    c = rbm.create_dataset("phantom.ct", split="test", n=10, seed=3)
    assert a.fingerprint() != c.fingerprint()


# -------------------------------------------------------------------------------------- targets and the image
def test_masks_landmarks_and_labels_agree(train500):
    cols = train500
    for img, mask, label, lm, n, kind, findings in zip(cols["image"], cols["mask"], cols["label"], cols["landmarks"],
                                                       cols["n_lesions"], cols["lesion_type"], cols["findings"]):
        assert img.dtype == np.uint8 and img.shape == (64, 64, 1) and mask.shape == (64, 64)
        n_regions = ndimage.label(mask == 5, structure=np.ones((3, 3)))[1]
        assert n_regions == n and bool(label) == (n > 0) == (kind > 0), "lesion pixels exist iff label = 1"
        assert findings == [float(n > 0), float(n > 1), findings[2]]
        x, y = np.round(lm).astype(int).T
        assert mask[y[0], x[0]] == 4, "spine landmark in the vertebra"
        assert mask[y[1], x[1]] in (2, 5), "liver landmark in the liver"
        assert mask[y[2], x[2]] in (3, 5) and mask[y[3], x[3]] in (3, 5), "kidney landmarks in the kidneys"
        assert x[2] < x[0] < x[3] and x[1] < x[0], "liver and first kidney on the image left"
        body = img[..., 0][mask > 0].mean()
        assert body > img[..., 0][mask == 0].mean() + 60, "the body is brighter than the air around it"
        assert img[..., 0][mask == 4].mean() > body + 60, "bone is the brightest structure"


def test_lesion_type_and_enlarged_liver_show_in_the_image(train500):
    cols = train500
    organ_q = P.question_ids("seen", "organ")[0]
    checked = 0
    for img, mask, kind, n, vqa in zip(cols["image"], cols["mask"], cols["lesion_type"], cols["n_lesions"], cols["vqa"]):
        if n == 1 and P.answer_text(vqa[organ_q]) == "liver":
            lesion, liver = img[..., 0][mask == 5].mean(), img[..., 0][mask == 2].mean()
            assert (lesion < liver) == (kind == 1), "cysts are hypodense, tumours hyperdense"
            checked += 1
    assert checked > 100
    liver_area = np.array([(m == 2).sum() + (m == 5).sum() for m in cols["mask"]])
    enlarged = np.array([f[2] for f in cols["findings"]]) == 1
    assert 0.05 < enlarged.mean() < 0.3 and liver_area[enlarged].mean() > 1.4 * liver_area[~enlarged].mean()


# ------------------------------------------------------------------------------------------------------- VQA
def test_vqa_answers_follow_the_labels(train500):
    cols = train500
    ids = {qt: P.question_ids(None, qt) for qt in P.QTYPES}
    for vqa, label, n, kind in zip(cols["vqa"], cols["label"], cols["n_lesions"], cols["lesion_type"]):
        answers = {qt: {P.answer_text(vqa[q]) for q in qs} for qt, qs in ids.items()}
        assert all(len(a) == 1 for a in answers.values()), "every phrasing of a type has one answer"
        assert answers["presence"] == {"yes" if label else "no"}
        assert answers["count"] == {str(n)}
        assert answers["type"] == {P.LESION_TYPES[kind]}
        if not label:
            assert answers["location"] == answers["organ"] == answers["size"] == {"none"}
        else:
            assert answers["location"] <= {"upper", "lower"} and answers["organ"] <= {"liver", "kidney"}
    vqa = np.array(cols["vqa"])
    assert vqa.shape == (500, len(P.QUESTIONS)) and vqa.min() >= 0 and vqa.max() < len(P.ANSWERS)


def test_question_bank_pools_are_disjoint_and_complete():
    assert [q.id for q in P.QUESTIONS] == list(range(len(P.QUESTIONS)))
    seen = {q.text for q in P.QUESTIONS if q.pool == "seen"}
    unseen = {q.text for q in P.QUESTIONS if q.pool == "unseen"}
    assert not seen & unseen and len(seen | unseen) == len(P.QUESTIONS)
    for qtype in P.QTYPES:
        assert len(P.question_ids("seen", qtype)) >= 3 and len(P.question_ids("unseen", qtype)) >= 3
    assert len(set(P.ANSWERS)) == len(P.ANSWERS) and all(P.normalize_answer(a) == a for a in P.ANSWERS)


@pytest.mark.parametrize("text,norm", [("The Two.", "2"), ("  YES! ", "yes"), ("a Cyst", "cyst"), ("one", "1"),
                                       ("Upper, part", "upper part"), ("an enlarged liver?", "enlarged liver")])
def test_normalize_answer(text, norm):
    assert P.normalize_answer(text) == norm


def test_answer_ids_round_trip():
    assert all(P.answer_id(P.answer_text(i)) == i for i in range(len(P.ANSWERS)))
    assert P.answer_id("Two") == P.ANSWERS.index("2") and P.answer_id("maybe") == -1


# ------------------------------------------------------------------------------------------------- disparity
def test_disparity_shifts_prevalence_by_age(train500):
    label, age = np.array(train500["label"]), np.array(train500["age_group"])
    for group, p in CFG.disparity.prevalence.items():
        assert abs(label[age == group].mean() - p) < 0.12, group  # ~167 samples a group: 3 standard errors


def test_disparity_shifts_contrast_noise_and_body_size_by_group(train500):
    cols = train500
    sex, age = np.array(cols["sex"]), np.array(cols["age_group"])
    contrast, noise, body = [], [], []
    for img, mask, n in zip(cols["image"], cols["mask"], cols["n_lesions"]):
        im = img[..., 0].astype(float) / 255
        liver_core = ndimage.binary_erosion(mask == 2, iterations=2)
        contrast.append(abs(im[mask == 5].mean() - im[liver_core].mean()) if n == 1 and liver_core.any() else np.nan)
        noise.append(im[liver_core].std() if liver_core.sum() > 20 else np.nan)
        body.append((mask > 0).sum())
    contrast, noise, body = np.array(contrast), np.array(noise), np.array(body)
    ratio = np.nanmean(contrast[sex == "F"]) / np.nanmean(contrast[sex == "M"])
    expected = CFG.disparity.lesion_contrast["F"] / CFG.disparity.lesion_contrast["M"]
    assert abs(ratio - expected) < 0.15, (ratio, expected)
    sigma = {g: np.nanmean(noise[age == g]) for g in P.AGE_GROUPS}
    assert sigma["young"] < sigma["middle"] < sigma["old"]
    assert body[sex == "F"].mean() < 0.9 * body[sex == "M"].mean()


def test_disparity_can_be_switched_off():
    cols = P.generate("train", 300, P.PhantomConfig(disparity=P.Disparity.none()))
    label, age = np.array(cols["label"]), np.array(cols["age_group"])
    assert abs(label[age == "old"].mean() - label[age == "young"].mean()) < 0.2
    assert P.PhantomConfig(disparity=P.Disparity.none()).config_hash() != CFG.config_hash()
    with pytest.raises(ValueError, match="keys"):
        P.Disparity(prevalence={"young": 0.5})


# ------------------------------------------------------------------------------------- MedicalDataset and cache
def test_dataset_api():
    ds = rbm.create_dataset("phantom.ct", split="val", n=20)
    assert len(ds) == 20 and ds.input_size == (1, 64, 64) and ds.name == "phantom.ct" and ds.split == "val"
    x = ds.images()
    assert x.shape == (20, 1, 64, 64) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert torch.equal(ds.images([3, 0]), x[[3, 0]]) and torch.equal(ds.images(torch.tensor([5])), x[5:6])
    expected = {"label": ((20,), torch.long), "lesion_type": ((20,), torch.long), "findings": ((20, 3), torch.float32),
                "mask": ((20, 64, 64), torch.long), "landmarks": ((20, 4, 2), torch.float32),
                "vqa": ((20, len(P.QUESTIONS)), torch.long)}
    for field, (shape, dtype) in expected.items():
        t = ds.targets(field)
        assert tuple(t.shape) == shape and t.dtype == dtype, field
    assert set(expected) <= set(ds.target_fields) and ds.attribute_names == ("sex", "age_group")
    attrs = ds.attributes()
    assert set(attrs["sex"]) <= {"F", "M"} and set(attrs["age_group"]) <= set(P.AGE_GROUPS)
    sub = ds.subset([4, 2])
    assert torch.equal(sub.images(), x[[4, 2]]) and sub.attributes()["sex"] == [attrs["sex"][4], attrs["sex"][2]]
    assert ds.hf.features["image"].shape == (64, 64, 1) and ds.hf.num_rows == 20


def test_cache_round_trip_and_corrupt_cache(tmp_path):
    ds = rbm.create_dataset("phantom.ct", split="test", n=8, cache_dir=tmp_path)
    caches = list(tmp_path.glob("phantom-*/test-8"))
    assert len(caches) == 1 and not list(tmp_path.glob("phantom-*/.*")), "no temporary directory is left behind"
    again = rbm.create_dataset("phantom.ct", split="test", n=8, cache_dir=tmp_path)
    assert torch.equal(ds.images(), again.images()) and ds.fingerprint() == again.fingerprint()
    fresh = torch.from_numpy(np.stack(P.generate("test", 8, CFG)["image"])).permute(0, 3, 1, 2).float() / 255
    assert torch.equal(fresh, ds.images()), "the cached bytes are the generator's bytes"
    arrow = next(caches[0].glob("*.arrow"))
    arrow.unlink()  # a new file, not an in-place write: the old one may still be memory-mapped
    arrow.write_bytes(b"garbage")
    assert torch.equal(rbm.create_dataset("phantom.ct", split="test", n=8, cache_dir=tmp_path).images(), ds.images())


def test_config_overrides_change_the_world(tmp_path):
    ds = rbm.create_dataset("phantom.ct", split="test", n=4, size=32, cache_dir=tmp_path,
                            disparity={"prevalence": {"young": 1.0, "middle": 1.0, "old": 1.0},
                                       "lesion_contrast": {"F": 1.0, "M": 1.0}, "body_scale": {"F": 1.0, "M": 1.0},
                                       "noise_sigma": {"young": 0.0, "middle": 0.0, "old": 0.0}})
    assert ds.input_size == (1, 32, 32) and ds.targets("label").tolist() == [1, 1, 1, 1]
    assert ds.targets("mask").shape == (4, 32, 32)


@pytest.mark.parametrize("kwargs,match", [({"split": "holdout"}, "unknown split"), ({"n": 0}, "positive"),
                                          ({"n": -3}, "positive"), ({"n": 2.5}, "positive"), ({"bogus": 1}, "bogus"),
                                          ({"size": 4}, "size"), ({"disparity": {"prevalence": {"old": 2}}}, "keys")])
def test_bad_dataset_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        rbm.create_dataset("phantom.ct", **kwargs)


def test_unknown_names_and_fields():
    with pytest.raises(UnknownNameError, match="phantom.ct"):
        rbm.create_dataset("phantom.mri")
    ds = rbm.create_dataset("phantom.ct", split="test", n=4)
    with pytest.raises(ConfigError, match="valid fields.*label"):
        ds.targets("diagnosis")
    with pytest.raises(ConfigError, match="out of range"):
        ds.images([7])


# ------------------------------------------------------------------------------------------ real-data loaders
def _check(ds, n, channels=1, size=64):
    x = ds.images()
    assert x.shape == (n, channels, size, size) and x.dtype == torch.float32
    assert 0 <= float(x.min()) and float(x.max()) <= 1 and float(x.std()) > 0.02
    assert ds.hf.features["image"].dtype == "uint8" and len(ds.fingerprint()) == 64


def test_dicom_ct_and_chest_xray():
    from pydicom import dcmread
    from pydicom.data import get_testdata_file

    files = [get_testdata_file("CT_small.dcm"), get_testdata_file("RG1_UNCR.dcm")]
    ds = rbm.create_dataset("dicom.files", files=files, targets={"label": [0, 1]})
    _check(ds, 2)
    assert ds.targets("label").tolist() == [0, 1]
    assert ds.attributes() == {"sex": ["O", "F"], "age_group": ["young", "unknown"]}, "from PatientSex / PatientAge"
    ct = dcmread(files[0])
    hu = ct.pixel_array * float(ct.RescaleSlope) + float(ct.RescaleIntercept)
    windowed = dicom_pixels(ct, (40.0, 400.0))
    assert np.array_equal(windowed == 0, hu <= -160) and np.array_equal(windowed == 1, hu >= 240)
    cxr = dcmread(files[1])
    assert cxr.PhotometricInterpretation == "MONOCHROME1"
    assert np.allclose(dicom_pixels(cxr), 1 - minmax(cxr.pixel_array)), "MONOCHROME1 is inverted"
    rgb = rbm.create_dataset("dicom.files", files=files, window="dicom", channels=3, size=32,
                             attributes={"sex": ["M", "F"], "age_group": ["old", "old"]})
    _check(rgb, 2, channels=3, size=32)
    assert torch.equal(rgb.images()[:, 0], rgb.images()[:, 2]) and rgb.attributes()["sex"] == ["M", "F"]


def test_nifti_slices_with_labels(tmp_path):
    import nibabel

    path = os.path.join(os.path.dirname(nibabel.__file__), "tests", "data", "anatomical.nii")
    img = nibabel.load(path)
    vol = np.asarray(img.get_fdata())
    labels = (vol > np.percentile(vol, 70)).astype(np.uint8)
    nibabel.save(nibabel.Nifti1Image(labels, img.affine), str(tmp_path / "labels.nii"))
    ds = rbm.create_dataset("nifti.slices", path=path, axis=2, slices=[10, 12], label_path=tmp_path / "labels.nii",
                            attributes={"sex": "F"})
    _check(ds, 2)
    mask, x = ds.targets("mask"), ds.images()[:, 0]
    assert mask.shape == (2, 64, 64) and set(mask.unique().tolist()) == {0, 1}
    assert x[mask == 1].mean() > x[mask == 0].mean() + 0.05, "the mask follows the bright voxels"
    assert ds.attributes()["sex"] == ["F", "F"]
    assert len(rbm.create_dataset("nifti.slices", path=path, axis=0)) == vol.shape[0]
    with pytest.raises(ConfigError, match="slices"):
        rbm.create_dataset("nifti.slices", path=path, slices=[99])


def _write_folder(root, n=3):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 50), dtype=np.uint8)).save(root / f"img{i}.png")
        rows.append({"file": f"img{i}.png", "label": i % 2, "score": 0.5 * i, "sex": "FM"[i % 2], "age": 30 + 20 * i})
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return root / "labels.csv"


def test_image_folder_with_csv(tmp_path):
    table = _write_folder(tmp_path)
    ds = rbm.create_dataset("folder.csv", root=tmp_path, target_columns=("label", "score"), age_column="age")
    _check(ds, 3)
    assert ds.targets("label").tolist() == [0, 1, 0] and ds.targets("label").dtype == torch.long
    assert ds.targets("score").tolist() == [0.0, 0.5, 1.0]
    assert ds.attributes() == {"sex": ["F", "M", "F"], "age_group": ["young", "middle", "old"]}
    original = np.asarray(Image.open(tmp_path / "img0.png").resize((64, 64), Image.Resampling.BILINEAR), dtype=float)
    assert np.abs(ds.images()[0, 0].numpy() * 255 - original).mean() < 3, "pixels survive the resize"
    with pytest.raises(ConfigError, match="no column 'diagnosis'"):
        rbm.create_dataset("folder.csv", root=tmp_path, csv_file=table, target_columns=("diagnosis",))
    with pytest.raises(ConfigError, match="'sex' must be numeric"):
        rbm.create_dataset("folder.csv", root=tmp_path, target_columns=("sex",))
    with pytest.raises(ConfigError, match="does not exist"):
        rbm.create_dataset("folder.csv", root=tmp_path, csv_file=tmp_path / "missing.csv")
    (tmp_path / "img1.png").unlink()
    with pytest.raises(ConfigError, match="img1.png does not exist"):
        rbm.create_dataset("folder.csv", root=tmp_path)


def test_hf_dataset_local_directory_and_parquet(tmp_path):
    from datasets import Dataset, Features, Image as HFImage, Value

    rng = np.random.default_rng(1)
    pics = [Image.fromarray(rng.integers(0, 255, (32, 40), dtype=np.uint8)) for _ in range(4)]
    features = Features({"image": HFImage(), "label": Value("int64"), "sex": Value("string")})
    local = Dataset.from_dict({"image": pics, "label": [0, 1, 1, 0], "sex": ["F", "M", "F", "M"]}, features=features)
    local.save_to_disk(str(tmp_path / "local"))
    ds = rbm.create_dataset("hf.dataset", path=tmp_path / "local", attribute_columns=("sex",), size=32)
    _check(ds, 4, size=32)
    assert ds.attributes()["sex"] == ["F", "M", "F", "M"] and ds.targets("label").tolist() == [0, 1, 1, 0]
    reference = np.asarray(pics[1].resize((32, 32), Image.Resampling.BILINEAR), dtype=float)
    assert np.abs(ds.images()[1, 0].numpy() * 255 - reference).mean() < 3, "pixels survive the conversion"
    local.to_parquet(str(tmp_path / "data.parquet"))
    pq = rbm.create_dataset("hf.dataset", path=tmp_path / "data.parquet", n=2, channels=3)
    _check(pq, 2, channels=3)
    with pytest.raises(ConfigError, match="no column 'findings'"):
        rbm.create_dataset("hf.dataset", path=tmp_path / "local", target_columns=("findings",))


def test_hf_dataset_image_folder(tmp_path):
    rng = np.random.default_rng(2)
    for cls in ("cyst", "normal"):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (20, 30), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    ds = rbm.create_dataset("hf.dataset", path=tmp_path, split="test")  # local files load as one split: taken
    _check(ds, 4)
    assert sorted(ds.targets("label").tolist()) == [0, 0, 1, 1]


def test_hf_hub_name_fails_fast_offline():
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="Hub is unreachable.*local"):
        rbm.create_dataset("hf.dataset", path="some-org/some-medical-dataset")
    assert time.perf_counter() - start < 5


def test_damaged_dicom_and_missing_files_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"\x00" * 200)
    with pytest.raises(ConfigError, match="cannot read DICOM"):
        rbm.create_dataset("dicom.files", files=[bad])
    with pytest.raises(ConfigError, match="does not exist"):
        rbm.create_dataset("dicom.files", files=[tmp_path / "absent.dcm"])
    with pytest.raises(ConfigError, match="does not exist"):
        rbm.create_dataset("nifti.slices", path=tmp_path / "absent.nii")


@pytest.mark.parametrize("years,group", [(25, "young"), (40, "middle"), (64.9, "middle"), (65, "old"),
                                         (None, "unknown")])
def test_age_groups(years, group):
    assert age_group(years) == group


@pytest.mark.parametrize("tag,years", [("045Y", 45.0), ("006M", 0.5), ("", None), ("abc", None)])
def test_dicom_age_tag(tag, years):
    class Tags:
        PatientAge = tag

    assert dicom_age(Tags()) == years
