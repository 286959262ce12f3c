"""Rendering entries: Markdown / LaTeX / CSV escaping, and the static HTML page as text (self-contained, escaped,
pinned by its Content-Security-Policy). The page in headless Chromium: tests/test_html_page.py. Entries are
synthetic (no grid run)."""
import base64
import csv
import hashlib
import io
import re

import numpy as np
import pytest

from robustbench_med.entries import KIND, SCHEMA_VERSION, threat_key, validate_entry, worst_case_group_stats
from robustbench_med.leaderboard import mean_ci
from robustbench_med.render import flat_rows, to_csv, to_latex, to_markdown, write_rendered
from robustbench_med.threat import eps_display

XSS = "<img src=x onerror=alert(1)>"
N = 20
SEX = ["F", "M"] * (N // 2)
AGE = (["young", "middle", "old"] * N)[:N]


def _row(cell_id, defense, attack, knowledge, clean, adv, params=None, defense_params=None):
    clean, adv = np.asarray(clean, float), np.asarray(adv, float)
    lo, hi = mean_ci(adv)
    ok = clean >= 0.5
    attrs = {i: {"sex": SEX[i], "age_group": AGE[i]} for i in range(N)}
    return {
        "cell_id": cell_id, "defense": defense, "defense_params": defense_params or {}, "attack_through": "adaptive",
        "attack": attack, "attack_params": params or {}, "knowledge": knowledge, "status": "done", "reason": "", "n": N,
        "clean": float(clean.mean()), "robust": float(adv.mean()), "robust_ci95": [lo, hi],
        "attack_success_rate": float(((adv < 0.5) & ok).sum() / ok.sum()) if ok.any() else None, "mean_linf": 0.03, "mean_l2": 1.0,
        "attack_seconds": 0.5, "groups": worst_case_group_stats(adv, attrs, N), "flags": [],
        "per_sample": {"clean": clean.tolist(), "adv": adv.tolist()},
    }


def synthetic_entry(victim, task="binary", metric="accuracy", eps=8 / 255, seed=0, display_name=None, defense_params=None):
    """A valid entry: noise, FGSM and PGD rows plus their worst case, undefended and behind a 'note' defence."""
    rng = np.random.default_rng(seed)
    clean = (rng.random(N) < 0.9).astype(float)
    results = []
    for d, dp in (("identity.none", {}), ("jpeg.bpda", defense_params or {"quality": 75})):
        fgsm = clean * (rng.random(N) < 0.6)
        pgd = clean * (rng.random(N) < 0.5)
        results += [_row(f"{victim}-{d}-noise-{seed}", d, "noise.uniform", "none", clean, clean, {"eps": eps_display(eps)}, dp),
                    _row(f"{victim}-{d}-fgsm-{seed}", d, "fgsm.linf", "white-box", clean, fgsm, {"eps": eps_display(eps)}, dp),
                    _row(f"{victim}-{d}-pgd-{seed}", d, "pgd.linf", "white-box", clean, pgd, {"eps": eps_display(eps), "steps": 10}, dp)]
        worst = _row(None, d, "worst-case(2 attacks)", "ensemble", clean, np.minimum(fgsm, pgd), {}, dp)
        worst["components"] = [f"{victim}-{d}-fgsm-{seed}", f"{victim}-{d}-pgd-{seed}"]
        results.append(worst)
    entry = {
        "schema": KIND, "schema_version": SCHEMA_VERSION, "dataset": "phantom.ct", "split": "test", "grid": "synthetic",
        "victim": victim, "task": task, "metric": metric,
        "threat": {"norm": "Linf", "eps": eps, "eps_display": eps_display(eps), "key": threat_key("Linf", eps)},
        "n": N, "seeds": [0], "success_threshold": 0.5, "weights_sha256": hashlib.sha256(victim.encode()).hexdigest(),
        "attributes": {"sex": SEX, "age_group": AGE}, "results": results,
        "reliability": {"masked_gradients": False, "black_box_beats_white_box": False, "randomized": False, "invalid_budget": False},
        "external": None,
        "manifest": {"versions": {"torch": "2.14.1"}, "seed": 0, "config_hash": "c0ffee", "data_hash": "d00d", "device": "cpu",
                     "grid": {"name": "synthetic", "dataset": "phantom.ct", "split": "test", "n_examples": N, "batch_size": 8,
                              "seed": 0, "victims": [], "attacks": [], "defenses": []}},
        "runs": [{"run_id": "synthetic-0", "started": 0.0, "finished": 1.0, "config_hash": "c0ffee"}],
        "created": "2026-11-22T00:00:00+00:00", "generator": "robustbench_med test",
    }
    if display_name:
        entry["display_name"] = display_name
    return validate_entry(entry)


@pytest.fixture(scope="module")
def entries():
    return [
        synthetic_entry("cnn.phantom", display_name=XSS, seed=1, defense_params={"note": "<script>alert(2)</script>"}),
        synthetic_entry("resnet18.phantom", task="classification", seed=2),
        synthetic_entry("cnn.phantom", eps=2 / 255, seed=3),
        synthetic_entry("unet.phantom", task="segmentation", metric="dice_fg", eps=2 / 255, seed=4),
    ]


@pytest.fixture(scope="module")
def rendered(entries, tmp_path_factory):
    """The four formats written once: README.md, leaderboard.tex, leaderboard.csv, index.html."""
    return write_rendered(entries, tmp_path_factory.mktemp("rendered"))


def test_text_formats_escape_names(entries):
    md = to_markdown(entries)
    assert "<img" not in md and "<script" not in md and "&lt;img src=x onerror=alert(1)&gt;" in md
    for block in re.findall(r"(?:^\|.*\n)+", md, re.M):  # every table row has as many cells as its header
        assert len({len(re.findall(r"(?<!\\)\|", line)) for line in block.splitlines()}) == 1, block
    tex = to_latex(entries)
    assert "\\textless{}img src=x onerror=alert(1)\\textgreater{}" in tex and "<img" not in tex
    assert tex.count("\\begin{tabular}") == tex.count("\\end{tabular}") == 4  # one per dataset × threat × task
    rows = list(csv.DictReader(io.StringIO(to_csv(entries))))
    assert len(rows) == sum(len(e["results"]) for e in entries)
    assert {r["model"] for r in rows} >= {XSS, "resnet18.phantom"}  # CSV keeps the text as is (it is not markup)
    assert all(float(r["robust"]) <= 1 for r in rows) and "robust_gap_sex" in rows[0]


def test_per_attack_metrics_are_shown_for_every_attack(entries):
    """Detector AUROC / TPR@90%TNR (and VQA per-question accuracy) are per attack: the Markdown gets a per-attack
    table with them, the HTML and CSV a column each."""
    import copy

    from robustbench_med.render import to_html

    e = copy.deepcopy(entries[1])
    for i, r in enumerate(x for x in e["results"] if x["cell_id"]):
        r["metrics"] = {"detector_auroc": 0.5 + 0.1 * i, "detector_tpr_at_90tnr": 0.25}
    md = to_markdown([e])
    assert "det. AUROC" in md and "TPR@90%TNR" in md and "0.700" in md and "Per attack:" in md
    assert "robust (attacked q)" not in md
    assert to_markdown([entries[1]]).count("Per attack:") == 0
    assert "det. AUROC" in to_html([e], plots=False)
    rows = list(csv.DictReader(io.StringIO(to_csv([e]))))
    assert {r["detector_tpr_at_90tnr"] for r in rows} == {"0.25", ""}  # worst-case rows carry no detector metric


def test_html_is_self_contained_and_escaped(entries, rendered):
    page = rendered["html"].read_text()
    assert XSS not in page and "<script>alert" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page), "no external resources"
    assert page.count("<script") == 1 and page.count("<style") == 1 and "<link rel=\"stylesheet\"" not in page
    csp = re.search(r'Content-Security-Policy" content="([^"]+)"', page).group(1)
    script = re.search(r"<script>(.*)</script>", page, re.S).group(1)
    style = re.search(r"<style>(.*)</style>", page, re.S).group(1)
    for text in (script, style):
        assert "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'" in csp.replace("&#x27;", "'")
    pngs = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    tasks = {(e["dataset"], e["task"]) for e in entries}  # three plots per dataset x task
    assert len(pngs) == 3 * len(tasks) and all(base64.b64decode(p)[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert page.count("<tr tabindex") == len(flat_rows(entries, headline_only=False))
