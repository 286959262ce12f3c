"""Validation at the boundary (issue #21): every rule rejects bad input where it enters, with a clear error, before
torch or SQLite can be the first to complain. One test per rule."""
import os
import sqlite3

import numpy as np
import pytest
import torch
from rank_helpers import linear_victim, tiny_grid

import robustbench_med as rbm
from robustbench_med.attack import check_targets
from robustbench_med.errors import ConfigError, ThreatModelError
from robustbench_med.grid import parse_grid
from robustbench_med.runner import run_grid
from robustbench_med.store import Store, StoreError

GRID = tiny_grid(name="valid", defenses=["identity.none"], attacks=[{"name": "fgsm.linf", "params": {"eps": "4/255"}}])


@pytest.fixture(scope="module", autouse=True)
def linear():
    with linear_victim() as name:
        yield name


# attacks: norm and name ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,norm,match", [
    ("pgd.linf", "L2", "contradicts"), ("fgsm.linf", "L2", "contradicts"), ("square.linf", "l2", "contradicts"),
    ("cw.l2", "Linf", "contradicts"), ("pgd.l2", "inf", "contradicts"),
    ("pgd.linf", "Linf", "redundant"), ("square.linf", "linf", "redundant"),
    ("hfc.bim", "L2", "is an Linf attack"), ("apgd.ce", "L7", "unknown norm"),
])
def test_a_norm_that_the_attack_name_fixes_or_contradicts_is_rejected(name, norm, match):
    with pytest.raises(ThreatModelError, match=match):
        rbm.create_attack(name, norm=norm)


def test_attacks_with_a_free_norm_take_any_valid_norm():
    assert rbm.create_attack("apgd.ce", norm="L2").threat.norm == "L2"
    assert rbm.create_attack("noise.uniform", norm="linf").threat.norm == "Linf"


def test_norm_rules_apply_in_a_grid_before_any_work():
    with pytest.raises(ConfigError, match=r"attacks \(fgsm.linf\).*contradicts"):
        parse_grid({**GRID, "attacks": [{"name": "fgsm.linf", "params": {"eps": "4/255", "norm": "L2"}}]})


def test_an_unknown_attack_parameter_is_a_config_error():
    with pytest.raises(ConfigError, match="pgd.linf"):
        rbm.create_attack("pgd.linf", epsilon=0.1)


# targets ---------------------------------------------------------------------------------------------------------
def _victim(task, classes=("a", "b", "c"), size=(1, 8, 8)):
    from robustbench_med.victim import ModelVictim, VictimCard

    return ModelVictim(torch.nn.Identity(), VictimCard(name=f"t.{task}", task=task, modality="toy", input_size=size, classes=classes))


@pytest.mark.parametrize("task,y,match", [
    ("classification", torch.zeros(4, 3, dtype=torch.long), r"shape \[n\]"),
    ("classification", torch.zeros(4), "integer class indices"),
    ("classification", torch.tensor([0, 1, 2, 3]), r"lie in \[0, 3\)"),
    ("binary", torch.tensor([0, 1, 2, 1]), "0 or 1"),
    ("multilabel", torch.zeros(4, dtype=torch.long), r"shape \[n, L\]"),
    ("multilabel", torch.zeros(4, 5), "has 3 labels"),
    ("segmentation", torch.zeros(4, 6, 6, dtype=torch.long), "like the input"),
    ("landmark", torch.zeros(4, 3, 3), r"shape \[n, L, 2\]"),
    ("landmark", torch.full((4, 3, 2), float("nan")), "NaN"),
    ("classification", torch.zeros(5, dtype=torch.long), "4 images but 5 targets"),
])
def test_targets_must_fit_the_task(task, y, match):
    with pytest.raises(ConfigError, match=match):
        check_targets(_victim(task), y, 4)


def test_good_targets_pass():
    check_targets(_victim("classification"), torch.tensor([0, 2, 1, 0]), 4)
    check_targets(_victim("multilabel"), torch.tensor([[0, 1, 1]] * 4), 4)
    check_targets(_victim("segmentation"), torch.zeros(4, 8, 8, dtype=torch.long), 4)
    check_targets(_victim("landmark"), torch.rand(4, 3, 2), 4)


def test_a_grid_whose_targets_do_not_fit_the_victim_fails_before_attacking(tmp_path):
    grid = parse_grid({**GRID, "victims": [{"name": "linear.phantom", "weights": None, "target_field": "findings"}]})
    with pytest.raises(ConfigError, match=r"target field 'findings'.*binary"):
        run_grid(grid, tmp_path, progress=False)
    assert sqlite3.connect(tmp_path / "results.sqlite").execute("SELECT COUNT(*) FROM samples").fetchone()[0] == 0


# datasets --------------------------------------------------------------------------------------------------------
def test_non_finite_pixels_are_rejected_when_a_dataset_is_loaded(tmp_path):
    from datasets import Array2D, Dataset, Features, Value

    images = np.random.default_rng(0).random((3, 16, 16)).astype(np.float32)
    images[1, 4, 4] = np.nan
    Dataset.from_dict({"image": list(images), "label": [0, 1, 0]},
                      features=Features({"image": Array2D((16, 16), "float32"), "label": Value("int64")})).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(ConfigError, match="non-finite"):
        rbm.create_dataset("hf.dataset", path=str(tmp_path / "d"), size=16)
    images[1, 4, 4] = np.inf
    from robustbench_med.data.loaders import scaled_to_uint8_image, to_uint8_image

    for convert in (to_uint8_image, scaled_to_uint8_image):
        with pytest.raises(ConfigError, match="non-finite"):
            convert(images[1], 16, 1)


def test_a_dataset_with_float_pixels_is_rejected_at_creation():
    from datasets import Array3D, Dataset, Features

    from robustbench_med.data.dataset import MedicalDataset

    hf = Dataset.from_dict({"image": [np.zeros((4, 4, 1), np.float32)]}, features=Features({"image": Array3D((4, 4, 1), "float32")}))
    with pytest.raises(ConfigError, match="must be uint8"):
        MedicalDataset(hf, "floaty", "test", (), ())


def test_n_examples_larger_than_the_split_is_an_error(tmp_path):
    grid = parse_grid({**GRID, "n_examples": 12, "dataset": {"name": "phantom.ct", "split": "test", "params": {"n": 6}}})
    with pytest.raises(ConfigError, match=r"n_examples.*12 is larger than.*6 samples"):
        run_grid(grid, tmp_path, progress=False)
    assert sqlite3.connect(tmp_path / "results.sqlite").execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 0


# the store ---------------------------------------------------------------------------------------------------------
def _store_with_rows(path):
    with Store(path) as store:
        store.start_run("r", "g", "hash", {"versions": {}, "data_hash": "d"})
        store.write_unit([{"cell_id": f"c{i}", "sample_idx": j, "metrics": {"x": "y" * 200}} for i in range(40) for j in range(20)])
        store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return path


@pytest.mark.parametrize("damage", ["truncate", "overwrite", "header"])
def test_a_damaged_store_is_one_line_naming_the_file_and_the_recovery(tmp_path, damage, capsys):
    from robustbench_med.cli import main

    db = _store_with_rows(tmp_path / "results.sqlite")
    size = db.stat().st_size
    with open(db, "r+b") as f:
        if damage == "truncate":
            f.truncate(size // 2)
        elif damage == "overwrite":
            f.seek(size // 2 - (size // 2) % 4096)
            f.write(os.urandom(4096))
        else:
            f.write(os.urandom(100))
    with pytest.raises(StoreError) as err:
        with Store(db) as store:
            store.check_integrity()
            store.samples()
    message = str(err.value)
    assert str(db) in message and "--fresh" in message and "merge" in message and "\n" not in message
    assert main(["leaderboard", str(tmp_path)]) == 2
    printed = capsys.readouterr().err.strip()
    assert printed.startswith("robustbench-med: error: result store") and "\n" not in printed


def test_merge_salvages_what_is_readable_of_a_damaged_store(tmp_path):
    from robustbench_med.merge import merge_stores

    db = _store_with_rows(tmp_path / "results.sqlite")
    size = db.stat().st_size
    with open(db, "r+b") as f:
        f.seek(size // 2 - (size // 2) % 4096)
        f.write(b"\xff" * 4096)
    report = merge_stores(tmp_path / "salvaged", [db], allow_gaps=True)
    assert report.damage and "table samples" in report.damage[0]
    assert 0 < report.rows < 800
    with Store(report.out) as store:
        store.check_integrity()
        assert len(store.samples()) == report.rows


def test_run_fresh_moves_a_damaged_store_aside_and_merge_salvages_it(tmp_path):
    out = tmp_path / "run"
    reference = run_grid(parse_grid(GRID), tmp_path / "ref", progress=False)
    db = run_grid(parse_grid(GRID), out, progress=False)
    salvage = tmp_path / "salvaged.sqlite"
    salvage.write_bytes(db.read_bytes())
    with open(db, "r+b") as f:
        f.write(os.urandom(100))  # the header: nothing is readable
    with pytest.raises(StoreError, match="damaged"):
        run_grid(parse_grid(GRID), out, progress=False)
    run_grid(parse_grid(GRID), out, progress=False, fresh=True)
    assert list(out.glob("results.sqlite.damaged-*"))
    rows = "SELECT cell_id, sample_idx, adv_score FROM samples ORDER BY 1, 2"
    assert sqlite3.connect(db).execute(rows).fetchall() == sqlite3.connect(reference).execute(rows).fetchall()
    from robustbench_med.merge import merge_stores

    report = merge_stores(tmp_path / "saved", [salvage])  # an intact copy merges back as it was
    assert sqlite3.connect(report.out).execute(rows).fetchall() == sqlite3.connect(reference).execute(rows).fetchall()


def test_a_second_run_on_the_same_store_exits_at_once_naming_the_holder(tmp_path):
    import json

    from filelock import FileLock

    from robustbench_med.store import lock_paths

    lock, owner = lock_paths(tmp_path / "results.sqlite")
    held = FileLock(str(lock))
    held.acquire()
    owner.write_text(json.dumps({"pid": 4242, "host": "elsewhere", "started": 0, "command": "robustbench-med run x"}))
    try:
        with pytest.raises(StoreError, match=r"in use by another run \(pid 4242 on elsewhere"):
            run_grid(parse_grid(GRID), tmp_path, progress=False)
    finally:
        held.release()
    run_grid(parse_grid(GRID), tmp_path, progress=False)  # released: the run proceeds
    assert not owner.exists(), "the holder's name is removed with the lock"


# devices and threads ---------------------------------------------------------------------------------------------
def test_training_honours_the_device(monkeypatch):
    from robustbench_med import training

    with pytest.raises(ConfigError, match="unknown device"):
        training.training_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            training.training_device("cuda")
    assert training.training_device("cpu").type == "cpu"
    assert training.training_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    seen = []

    class Stop(Exception):
        pass

    def fake_train(name, **kw):
        seen.append(kw.get("device"))
        raise Stop

    monkeypatch.setattr(training, "train_victim", fake_train)
    with pytest.raises(Stop):
        rbm.create_victim("cnn.phantom", train_if_missing=True, device="cpu")
    assert seen == ["cpu"], "create_victim (run --device) passes its device to training"


def test_each_rank_gets_its_share_of_the_cpu(monkeypatch):
    from robustbench_med.distributed import RANK_THREADS_ENV, pin_rank_threads

    threads = torch.get_num_threads()
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv(RANK_THREADS_ENV, raising=False)
    try:
        cores = len(affinity) if affinity else (os.cpu_count() or 1)
        assert pin_rank_threads(0, 2) == torch.get_num_threads() == max(1, cores // 2)
        if affinity and cores >= 2:
            assert len(os.sched_getaffinity(0)) == cores // 2
        monkeypatch.setenv(RANK_THREADS_ENV, "1")
        assert pin_rank_threads(1, 2) == torch.get_num_threads() == 1
        monkeypatch.setenv(RANK_THREADS_ENV, "zero")
        with pytest.raises(ConfigError, match="positive integer"):
            pin_rank_threads(0, 2)
    finally:
        torch.set_num_threads(threads)
        if affinity:
            os.sched_setaffinity(0, affinity)
