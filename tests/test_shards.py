"""Shards and merge (issue #21): `run --shard K/N` writes its own store; `merge` combines stores, refusing other grids,
weights or code versions, and detecting conflicting duplicates and gaps; a sharded run merged equals one process."""
import json
import shutil
import sqlite3

import pytest
from rank_helpers import linear_victim, tiny_grid
from rank_helpers import store_contents as _everything, table as _table

from robustbench_med.errors import ConfigError
from robustbench_med.grid import parse_grid
from robustbench_med.leaderboard import summary_wide
from robustbench_med.merge import MergeError, merge_stores
from robustbench_med.runner import run_grid, shard_dir
from robustbench_med.store import StoreError

GRID = tiny_grid(name="sharded", defenses=["identity.none", {"name": "jpeg.bpda", "params": {"quality": 60}}])
SUMMARY = ["victim", "defense", "attack", "eps", "status", "n", "clean", "robust", "attack_success_rate", "mean_linf"]


@pytest.fixture(scope="module", autouse=True)
def linear():
    with linear_victim() as name:
        yield name


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return run_grid(parse_grid(GRID), tmp_path_factory.mktemp("single"), progress=False)


@pytest.fixture(scope="module")
def two_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("two")
    for k in (1, 2):
        run_grid(parse_grid(GRID), out, progress=False, shard=f"{k}/2")
    return out


@pytest.mark.parametrize("n", [1, 2, 3])
def test_sharded_run_merged_equals_a_single_process(single, tmp_path, n):
    out = tmp_path / "run"
    for k in range(1, n + 1):
        store = run_grid(parse_grid(GRID), out, progress=False, shard=f"{k}/{n}")
        assert store == shard_dir(out, f"{k}/{n}") / "results.sqlite"
        if n > 1:  # each shard holds only its part
            assert 0 < len(_table(store, "SELECT * FROM samples")) < len(_table(single, "SELECT * FROM samples"))
    report = merge_stores(out, [out])
    assert not report.gaps and report.cells == {"done": 6}
    assert _everything(report.out) == _everything(single)
    merged, ref = summary_wide(report.out)[SUMMARY], summary_wide(single)[SUMMARY]
    assert merged.equals(ref)


def test_merge_is_idempotent_and_a_rerun_shard_adds_nothing(two_shards, single):
    first = merge_stores(two_shards, [two_shards])
    rows = _everything(first.out)
    again = merge_stores(two_shards, [two_shards])  # the merged store is an input too: identical duplicates kept once
    assert _everything(again.out) == rows == _everything(single) and again.identical_duplicates > 0
    before = _table(shard_dir(two_shards, "1/2") / "results.sqlite", "SELECT COUNT(*) FROM samples")
    run_grid(parse_grid(GRID), two_shards, progress=False, shard="1/2")  # finished shard: resumes, computes nothing
    assert _table(shard_dir(two_shards, "1/2") / "results.sqlite", "SELECT COUNT(*) FROM samples") == before


def test_merge_detects_gaps_and_a_merged_partial_store_resumes(two_shards, single, tmp_path):
    one = shard_dir(two_shards, "1/2") / "results.sqlite"
    with pytest.raises(MergeError, match=r"missing.*no store of shard 2/2"):
        merge_stores(tmp_path / "partial", [one])
    assert not (tmp_path / "partial" / "results.sqlite").exists()
    report = merge_stores(tmp_path / "partial", [one], allow_gaps=True)
    assert report.gaps and report.cells.get("pending")
    run_grid(parse_grid(GRID), tmp_path / "partial", progress=False)  # computes exactly what is missing
    assert _everything(report.out)["samples"] == _everything(single)["samples"]


def _copy(src, dst):
    shutil.copy(src, dst)
    return dst


def test_merge_refuses_other_weights_code_and_differing_duplicates(two_shards, tmp_path):
    a, b = (shard_dir(two_shards, f"{k}/2") / "results.sqlite" for k in (1, 2))
    other = _copy(b, tmp_path / "weights.sqlite")
    con = sqlite3.connect(other)
    con.execute("UPDATE cells SET weights_sha256='0123456789abcdef'")
    con.commit()
    con.close()
    with pytest.raises(MergeError, match="weights sha256"):
        merge_stores(tmp_path / "w", [a, other])
    code = _copy(b, tmp_path / "code.sqlite")
    con = sqlite3.connect(code)
    for run_id, man in con.execute("SELECT run_id, manifest FROM runs").fetchall():
        man = json.loads(man)
        man["versions"]["torch"] = "0.0.1"
        con.execute("UPDATE runs SET manifest=? WHERE run_id=?", (json.dumps(man), run_id))
    con.commit()
    con.close()
    with pytest.raises(MergeError, match="version torch"):
        merge_stores(tmp_path / "c", [a, code])
    dup = _copy(a, tmp_path / "dup.sqlite")
    con = sqlite3.connect(dup)
    con.execute("UPDATE samples SET adv_score = adv_score + 0.5 WHERE sample_idx = (SELECT MIN(sample_idx) FROM samples)")
    con.commit()
    con.close()
    with pytest.raises(MergeError, match="duplicate rows differ.*adv_score"):
        merge_stores(tmp_path / "d", [a, dup, b])


def test_merge_refuses_a_store_of_another_grid(two_shards, tmp_path):
    other = run_grid(parse_grid({**GRID, "seed": 1, "defenses": ["identity.none"]}), tmp_path / "other", progress=False)
    with pytest.raises(MergeError, match="grid configurations"):
        merge_stores(tmp_path / "m", [two_shards / "shard-1-of-2", other])


@pytest.mark.parametrize("spec", ["0/2", "3/2", "1/0", "a/b", "2", "-1/3"])
def test_shard_spec_is_validated(spec, tmp_path):
    with pytest.raises(ConfigError, match="shard"):
        run_grid(parse_grid(GRID), tmp_path, progress=False, shard=spec)
    assert not any(tmp_path.iterdir()), "nothing is written for a bad --shard"


def test_a_store_holds_one_shard(two_shards, tmp_path):
    """A shard's store refuses a run of another shard (or an unsharded run): their plans would not add up."""
    from robustbench_med.distributed import ProcessContext
    from robustbench_med.runner import GridRunner
    from robustbench_med.store import Store

    db = _copy(shard_dir(two_shards, "1/2") / "results.sqlite", tmp_path / "results.sqlite")
    with Store(db) as store, pytest.raises(StoreError, match="holds shard 1/2"):
        GridRunner(parse_grid(GRID), store, progress=False, context=ProcessContext(0, 1, lambda: None, None, 0, 3)).run()


def test_cli_run_shard_and_merge(tmp_path, capsys):
    import yaml

    from robustbench_med.cli import main

    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({**GRID, "defenses": ["identity.none"], "attacks": [GRID["attacks"][1]]}))
    out = tmp_path / "runs"
    for k in (1, 2):
        assert main(["run", str(grid), "--out", str(out), "--shard", f"{k}/2", "--quiet"]) == 0
    assert "robustbench-med merge" in capsys.readouterr().out and not (out / "leaderboard.md").exists()
    assert main(["merge", str(out), str(out)]) == 0
    assert (out / "results.sqlite").exists() and (out / "leaderboard.md").exists()
    assert main(["run", str(grid), "--out", str(out), "--shard", "3/2"]) == 2
    assert "--shard K/N needs 1 <= K <= N" in capsys.readouterr().err
