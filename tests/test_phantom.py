"""The embedded phantom world: determinism, consistency of targets, built-in disparity, VQA bank, cache."""
import numpy as np
import pytest
import torch

import robustbench_med as rbm
from robustbench_med.data import phantom as P
from robustbench_med.errors import ConfigError

CFG = P.PhantomConfig()


def test_same_seed_same_bytes_independent_of_n():
    a = P.generate("test", 10, CFG)
    b = P.generate("test", 30, CFG)
    assert all(np.array_equal(x, y) for x, y in zip(a["image"], b["image"][:10]))
    c = P.generate("test", 10, P.PhantomConfig(seed=1))
    assert not all(np.array_equal(x, y) for x, y in zip(a["image"], c["image"]))
    train = P.generate("train", 10, CFG)
    assert not any(np.array_equal(x, y) for x, y in zip(a["image"], train["image"]))


def test_targets_are_consistent_with_the_image():
    cols = P.generate("train", 200, CFG)
    for img, mask, label, lm, n_les in zip(cols["image"], cols["mask"], cols["label"], cols["landmarks"], cols["n_lesions"]):
        assert ((mask == 5).any()) == bool(label) == (n_les > 0)
        sx, sy = np.round(lm[0]).astype(int)
        assert mask[sy, sx] == 4, "the spine landmark lies in the spine"
        for k in (2, 3):
            x, y = np.round(lm[k]).astype(int)
            assert mask[y, x] in (3, 5), "kidney landmarks lie in a kidney (or a kidney lesion)"
        assert img.dtype == np.uint8 and img.shape == (64, 64, 1)


def test_vqa_answers_follow_the_labels():
    cols = P.generate("val", 100, CFG)
    presence = P.question_ids("seen", "presence")[0]
    count = P.question_ids("unseen", "count")[0]
    for vqa, label, n in zip(cols["vqa"], cols["label"], cols["n_lesions"]):
        assert P.answer_text(vqa[presence]) == ("yes" if label else "no")
        assert P.answer_text(vqa[count]) == str(n)
    seen = {q.text for q in P.QUESTIONS if q.pool == "seen"}
    unseen = {q.text for q in P.QUESTIONS if q.pool == "unseen"}
    assert seen and unseen and not seen & unseen
    for qtype in ("presence", "count", "location", "organ", "size", "type"):
        assert len(P.question_ids("seen", qtype)) >= 3 and len(P.question_ids("unseen", qtype)) >= 3
    assert P.normalize_answer("The Two.") == "2"


def test_disparity_shifts_prevalence_and_contrast():
    cols = P.generate("train", 900, CFG)
    label, age, sex = np.array(cols["label"]), np.array(cols["age_group"]), np.array(cols["sex"])
    for group, p in CFG.disparity.prevalence.items():
        assert abs(label[age == group].mean() - p) < 0.08
    def lesion_contrast(s):
        vals = []
        for img, mask, sx in zip(cols["image"], cols["mask"], sex):
            if sx == s and (mask == 5).any():
                vals.append(abs(img[..., 0][mask == 5].mean() - img[..., 0][mask == 2].mean()))
        return np.mean(vals)
    assert lesion_contrast("F") < 0.8 * lesion_contrast("M")


def test_dataset_api_and_cache_roundtrip():
    ds = rbm.create_dataset("phantom.ct", split="val", n=20)
    again = rbm.create_dataset("phantom.ct", split="val", n=20)
    assert torch.equal(ds.images(), again.images()) and ds.fingerprint() == again.fingerprint()
    x = ds.images([0, 3])
    assert x.shape == (2, 1, 64, 64) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert ds.targets("mask").dtype == torch.long and ds.targets("landmarks").shape == (20, 4, 2)
    assert set(ds.attributes()) == {"sex", "age_group"}
    with pytest.raises(ConfigError, match="no target field"):
        ds.targets("diagnosis")


@pytest.mark.parametrize("kwargs", [{"split": "holdout"}, {"n": 0}, {"n": -3}, {"bogus": 1}])
def test_bad_dataset_arguments(kwargs):
    with pytest.raises(ConfigError):
        rbm.create_dataset("phantom.ct", **kwargs)


def test_corrupt_cache_is_regenerated(tmp_path):
    reference = rbm.create_dataset("phantom.ct", split="test", n=8, cache_dir=tmp_path).images()
    arrow = next(tmp_path.rglob("*.arrow"))
    arrow.unlink()  # a new file, not an in-place write: the old one may still be memory-mapped
    arrow.write_bytes(b"garbage")
    again = rbm.create_dataset("phantom.ct", split="test", n=8, cache_dir=tmp_path)
    assert torch.equal(reference, again.images())
