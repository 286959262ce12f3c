"""The harness end to end: validity checks, resume after a kill, determinism, leaderboard outputs."""
import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

import robustbench_med as rbm
from robustbench_med.attacks.pgd import PGD
from robustbench_med.grid import parse_grid
from robustbench_med.leaderboard import summary_wide, write_leaderboard
from robustbench_med.registry import ATTACKS
from robustbench_med.runner import run_grid

SMALL = {
    "name": "small",
    "n_examples": 24,
    "batch_size": 8,
    "victims": ["cnn.phantom"],
    "attacks": [
        {"name": "noise.uniform", "params": {"eps": "8/255"}},
        {"name": "pgd.linf", "params": {"eps": ["2/255", "8/255"], "steps": 5}},
        {"name": "fgsm.linf", "params": {"eps": "8/255"}, "defenses": ["identity.none"]},
    ],
    "defenses": ["identity.none", {"name": "jpeg.bpda", "params": {"quality": 60}}],
}


@pytest.fixture(scope="session")
def trained_cnn():
    return rbm.create_victim("cnn.phantom", train_if_missing=True)


def _rows(store_path):
    con = sqlite3.connect(store_path)
    rows = con.execute("SELECT c.victim, c.defense, c.attack, c.attack_params, s.sample_idx, s.clean_score, s.adv_score, s.linf, s.l2, s.adv_pred "
                       "FROM samples s JOIN cells c USING (cell_id) ORDER BY 1,2,3,4,5").fetchall()
    con.close()
    return rows


def test_small_grid_runs_and_reports(trained_cnn, tmp_path):
    store = run_grid(parse_grid(SMALL), tmp_path, progress=False)
    df = summary_wide(store)
    done = df[(df.status == "done") & df.robust.notna()]
    assert len(done) >= 6
    attacked = done[done.knowledge != "none"]  # random noise may, by chance, raise accuracy; attacks may not
    assert len(attacked) >= 4 and (attacked.robust <= attacked.clean + 1e-9).all(), "robust metric must not exceed clean"
    assert (done.n == 24).all()
    pgd = done[(done.attack == "pgd.linf") & (done.defense == "identity.none")].sort_values("eps")
    assert pgd.robust.is_monotonic_decreasing, "a larger eps cannot make PGD weaker here"
    assert ((done.robust_ci95_low <= done.robust) & (done.robust <= done.robust_ci95_high)).all()
    real = done[~done.attack.str.startswith("worst-case")]  # ensemble rows carry no perturbation of their own
    assert (real.mean_linf <= real.eps + 1e-6).all()
    paths = write_leaderboard(store, tmp_path)
    for key in ("markdown", "csv", "json", "plot"):
        assert paths[key].exists() and paths[key].stat().st_size > 0
    entry = json.loads(paths["json"].read_text())
    assert entry["manifests"][0]["config_hash"] and entry["manifests"][0]["versions"]["torch"]
    assert "worst-case" in paths["markdown"].read_text()


def test_same_seed_same_results(trained_cnn, tmp_path):
    a = run_grid(parse_grid(SMALL), tmp_path / "a", progress=False)
    b = run_grid(parse_grid(SMALL), tmp_path / "b", progress=False)
    assert _rows(a) == _rows(b)


class OverBudget(PGD):
    """A deliberately broken attack: doubles the perturbation after projecting."""

    def perturb(self, victim, x, y, eps):
        x_adv = super().perturb(victim, x, y, eps)
        return (x + 2 * (x_adv - x)).clamp(0, 1)


def test_budget_violations_mark_the_cell_invalid(trained_cnn, tmp_path):
    ATTACKS.add("broken.overbudget", lambda **kw: OverBudget(norm="Linf", **kw), knowledge="white-box")
    try:
        grid = parse_grid({**SMALL, "defenses": ["identity.none"], "attacks": [
            {"name": "broken.overbudget", "params": {"eps": "4/255", "steps": 3}},
            {"name": "pgd.linf", "params": {"eps": "4/255", "steps": 3}}]})
        store = run_grid(grid, tmp_path, progress=False)
    finally:
        ATTACKS.remove("broken.overbudget")
    df = summary_wide(store)
    broken = df[df.attack == "broken.overbudget"].iloc[0]
    assert broken.status == "invalid" and "budget violated" in broken.reason
    assert "robust" not in broken or broken.robust != broken.robust  # NaN: no robustness number
    assert "invalid_budget" in broken["flags"]
    good = df[df.attack == "pgd.linf"].iloc[0]
    assert good.status == "done" and good.robust == good.robust
    write_leaderboard(store, tmp_path)
    assert "INVALID" in (tmp_path / "leaderboard.md").read_text()
    worst = df[df.attack.str.startswith("worst-case")]
    assert worst.empty, "an invalid cell must not enter the worst-case ensemble"


def test_masked_gradients_are_flagged(trained_cnn, tmp_path):
    grid = parse_grid({**SMALL, "attacks": [{"name": "pgd.linf", "params": {"eps": "8/255", "steps": 3}}],
                       "defenses": [{"name": "jpeg.bpda", "attack_through": "detach"}, {"name": "jpeg.bpda"}]})
    df = summary_wide(run_grid(grid, tmp_path, progress=False))
    naive = df[df.attack_through == "detach"].iloc[0]
    bpda = df[df.attack_through == "adaptive"].iloc[0]
    assert "masked_gradients" in naive["flags"] and "masked_gradients" not in bpda["flags"]
    assert bpda.robust <= naive.robust


def test_interrupted_run_resumes_without_loss_or_duplicates(trained_cnn, tmp_path):
    grid_path = tmp_path / "grid.yaml"
    import yaml

    grid_path.write_text(yaml.safe_dump({**SMALL, "n_examples": 48}))
    reference = run_grid(parse_grid({**SMALL, "n_examples": 48}), tmp_path / "ref", progress=False)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "robustbench_med", "run", str(grid_path), "--out", str(out), "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    db = out / "results.sqlite"
    deadline = time.time() + 120
    killed_at = 0
    while time.time() < deadline and proc.poll() is None:
        if db.exists():
            try:
                con = sqlite3.connect(db, timeout=1)
                killed_at = con.execute("SELECT COUNT(*) FROM samples").fetchone()[0]
                con.close()
            except sqlite3.Error:
                killed_at = 0
            if killed_at >= 40:
                proc.send_signal(signal.SIGKILL)
                break
        time.sleep(0.05)
    proc.wait(timeout=30)
    assert killed_at >= 40, "the run finished before it could be killed; make the grid larger"
    total = len(_rows(reference))
    assert len(_rows(db)) < total, "the kill must interrupt the run"
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=os.environ.copy())
    assert _rows(db) == _rows(reference)
    con = sqlite3.connect(db)
    n, distinct = con.execute("SELECT COUNT(*), COUNT(DISTINCT cell_id || '-' || sample_idx) FROM samples").fetchone()
    assert n == distinct == total


def test_resumed_run_does_not_refit_finished_defenses(trained_cnn, tmp_path, monkeypatch):
    """A re-run of a finished grid finds every victim × defence complete and never calls ``Defense.prepare`` again
    (detectors and latent perturbers are expensive to fit), and adds no rows."""
    from robustbench_med.defenses.basic import JPEG

    calls = []
    monkeypatch.setattr(JPEG, "prepare", lambda self, victim, train: calls.append(victim.card.name), raising=False)
    spec = {**SMALL, "n_examples": 8, "defenses": [{"name": "jpeg.bpda", "params": {"quality": 60}}]}
    store = run_grid(parse_grid(spec), tmp_path, progress=False)
    first, rows = len(calls), _rows(store)
    assert first == 1
    run_grid(parse_grid(spec), tmp_path, progress=False)
    assert len(calls) == first and _rows(store) == rows


class CountingPGD(PGD):
    """PGD that records how many samples each call attacks, and at which eps."""

    calls: list[tuple[float, int]] = []

    def perturb(self, victim, x, y, eps):
        CountingPGD.calls.append((float(eps[0]), len(x)))
        return super().perturb(victim, x, y, eps)


SWEEP = ["1/255", "2/255", "8/255"]


def _cells_by_eps(store_path) -> dict[float, dict[int, tuple]]:
    con = sqlite3.connect(store_path)
    rows = con.execute("SELECT s.eps, s.sample_idx, s.clean_correct, s.adv_correct, s.adv_score, s.linf, c.extra FROM samples s "
                       "JOIN cells c USING (cell_id) WHERE c.attack='counting.pgd'").fetchall()
    con.close()
    out: dict[float, dict[int, tuple]] = {}
    for eps, i, clean_ok, adv_ok, score, linf, extra in rows:
        out.setdefault(eps, {})[i] = (clean_ok, adv_ok, score, linf, json.loads(extra)["attack_only_robust"])
    return out


@pytest.mark.parametrize("only_robust", [True, False])
def test_attack_only_robust_cascades_an_eps_sweep(trained_cnn, tmp_path, only_robust):
    """AutoAttack's protocol: attack only samples still robust; a sample broken at a smaller eps keeps its example."""
    ATTACKS.add("counting.pgd", lambda **kw: CountingPGD(norm="Linf", **kw), knowledge="white-box")
    CountingPGD.calls = []
    try:
        grid = parse_grid({**SMALL, "n_examples": 32, "defenses": ["identity.none"], "attack_only_robust": only_robust,
                           "attacks": [{"name": "counting.pgd", "params": {"eps": SWEEP, "steps": 3}}]})
        store = run_grid(grid, tmp_path, progress=False)
    finally:
        ATTACKS.remove("counting.pgd")
    cells = _cells_by_eps(store)
    eps = sorted(cells)
    assert len(eps) == 3 and all(len(cells[e]) == 32 for e in eps)
    assert all(r[4] is only_robust for e in eps for r in cells[e].values())
    attacked = sum(n for _, n in CountingPGD.calls)
    clean_wrong = [i for i, r in cells[eps[0]].items() if not r[0]]
    assert clean_wrong, "the trained CNN must misclassify a few of 32 test images for this test to bite"
    if not only_robust:
        assert attacked == 3 * 32
        return
    alive = 32 - len(clean_wrong)
    for lo, hi in zip(eps, eps[1:]):
        alive_next = sum(r[1] for r in cells[lo].values())
        for i, r in cells[lo].items():
            if not r[1]:  # broken at the smaller eps: same example (score, perturbation) at the larger one
                assert cells[hi][i][1] == 0 and cells[hi][i][2:4] == r[2:4]
        assert alive_next <= alive
        alive = alive_next
    for i in clean_wrong:
        assert all(cells[e][i][3] == 0.0 and cells[e][i][1] == 0 for e in eps), "clean-misclassified: zero perturbation"
    expected = (32 - len(clean_wrong)) + sum(sum(r[1] for r in cells[e].values()) for e in eps[:-1])
    assert attacked == expected < 3 * 32, "each eps attacks exactly the samples still robust"
    assert all(r[3] <= e + 1e-6 for e in eps for r in cells[e].values())


def test_attack_only_robust_leaves_segmentors_and_noise_alone(tmp_path):
    grid = parse_grid({"name": "seg", "n_examples": 8, "batch_size": 8,
                       "victims": [{"name": "unet.phantom", "weights": None}, {"name": "cnn.phantom", "weights": None}],
                       "attacks": [{"name": "pgd.linf", "params": {"eps": ["2/255", "4/255"], "steps": 1}, "victims": ["unet.phantom"]},
                                   "noise.uniform"]})
    con = sqlite3.connect(run_grid(grid, tmp_path, progress=False))
    rows = con.execute("SELECT c.victim, s.linf, c.extra FROM samples s JOIN cells c USING (cell_id)").fetchall()
    assert {v for v, _, _ in rows} == {"unet.phantom", "cnn.phantom"} and len(rows) == 8 * 4
    assert all(linf > 0 for _, linf, _ in rows), "every sample of a dense task, and of a noise baseline, is perturbed"
    assert not any(json.loads(extra)["attack_only_robust"] for _, _, extra in rows)
    seg = [(json.loads(m), clean) for m, clean in con.execute(
        "SELECT s.metrics, s.clean_score FROM samples s JOIN cells c USING (cell_id) WHERE c.victim = 'unet.phantom'")]
    distances = ("hd95_px", "assd_px", "clean_hd95_px", "clean_assd_px")
    assert seg and all(set(distances) <= set(m) and all(0 <= m[k] <= math.hypot(64, 64) for k in distances)
                       and "clean_dice_fg" not in m for m, clean in seg), \
        "segmentors store every metric per sample, clean and attacked (HD95 / ASSD in pixels); the clean primary is clean_score"


def test_attack_only_robust_must_be_a_boolean():
    with pytest.raises(rbm.ConfigError, match="attack_only_robust"):
        parse_grid({**SMALL, "attack_only_robust": "yes"})


def test_the_whole_grid_progress_counts_every_planned_cell_once(trained_cnn, tmp_path):
    """The whole-grid bar's total is the grid's cells and a run (fresh or resumed) counts each exactly once."""
    from robustbench_med.runner import GridRunner
    from robustbench_med.store import Store

    attacks = SMALL["attacks"] + [{"name": "pgd.dice", "params": {"eps": "8/255", "steps": 2}}]  # skipped: a classifier
    grid = parse_grid({**SMALL, "n_examples": 8, "attacks": attacks})
    for _ in range(2):  # a fresh run, then a resumed one (every pair finished)
        with Store(tmp_path / "results.sqlite") as store:
            runner = GridRunner(grid, store, progress=False)
            runner.run()
        # noise + 2 × PGD + the skipped Dice PGD on both defences, FGSM on identity.none only
        assert runner.planned_cells() == 9 == runner.cells_counted
