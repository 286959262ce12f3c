"""Rendering entries: Markdown / LaTeX / CSV escaping, and the static HTML page in headless Chromium (sorting,
filters, no console errors, model names containing HTML shown as text). Entries are synthetic (no grid run)."""
import base64
import csv
import hashlib
import io
import re
import shutil
import tempfile
from pathlib import Path

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
    assert len(pngs) == 3 and all(base64.b64decode(p)[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert page.count("<tr data-task") == len(flat_rows(entries, headline_only=False))


def _browser():
    for binary in ("/usr/lib/chromium/chromium", "/usr/bin/chromium"):
        if Path(binary).exists() and Path("/usr/bin/chromedriver").exists():
            break
    else:
        pytest.skip("Chromium is absent: apt-get install -y chromium chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is absent: pip install selenium")
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="rbm_chromium_")
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-dev-shm-usage", f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts), profile


def _column(driver, heading):
    from selenium.webdriver.common.by import By

    heads = [th.text.strip() for th in driver.find_elements(By.CSS_SELECTOR, "#leaderboard thead th")]
    i = heads.index(heading)
    rows = [r for r in driver.find_elements(By.CSS_SELECTOR, "#leaderboard tbody tr") if r.is_displayed()]
    return [r.find_elements(By.TAG_NAME, "td")[i].text for r in rows]


def _click(driver, heading):
    from selenium.webdriver.common.by import By

    for th in driver.find_elements(By.CSS_SELECTOR, "#leaderboard thead th"):
        if th.text.strip().rstrip("▲▼ ").strip() == heading:
            th.find_element(By.TAG_NAME, "button").click()
            return
    raise AssertionError(f"no column {heading!r}")


def test_html_page_in_headless_chromium(entries, rendered, monkeypatch):
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must not try to download anything
    driver, profile = _browser()  # skips when Chromium, chromedriver or selenium is absent
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    page = rendered["html"]
    try:
        driver.get(page.resolve().as_uri())
        errors = [m for m in driver.get_log("browser") if m["level"] == "SEVERE"]
        assert not errors, errors
        headline = [r for r in flat_rows(entries)]
        assert len(_column(driver, "robust")) == len(headline), "headline rows only by default"
        # a model name containing HTML is shown as text, not parsed
        names = _column(driver, "model")
        assert any(n.startswith(XSS) for n in names), names
        assert not driver.find_elements(By.CSS_SELECTOR, "#leaderboard img, #leaderboard script")
        with pytest.raises(NoAlertPresentException):
            driver.switch_to.alert.text
        # clicking a column heading sorts the rows (ascending, then descending)
        _click(driver, "robust")
        values = [float(v) for v in _column(driver, "robust")]
        assert values == sorted(values) and len(set(values)) > 1
        assert driver.find_element(By.XPATH, "//th[button[text()='robust']]").get_attribute("aria-sort") == "ascending"
        _click(driver, "robust")
        assert [float(v) for v in _column(driver, "robust")] == sorted(values, reverse=True)
        _click(driver, "task")
        tasks = _column(driver, "task")
        assert tasks == sorted(tasks)
        # filters: task, threat model, and every attack instead of the headline
        Select(driver.find_element(By.ID, "filter-task")).select_by_value("classification")
        assert set(_column(driver, "task")) == {"classification"}
        Select(driver.find_element(By.ID, "filter-task")).select_by_value("")
        Select(driver.find_element(By.ID, "filter-threat")).select_by_value("Linf-2_255")
        assert set(_column(driver, "threat")) == {"Linf 2/255"}
        Select(driver.find_element(By.ID, "filter-view")).select_by_value("all")
        shown = _column(driver, "attack")
        assert len(shown) == sum(len(e["results"]) for e in entries if e["threat"]["key"] == "Linf-2_255")
        assert driver.find_element(By.ID, "row-count").text == str(len(shown))
        assert len(driver.find_elements(By.CSS_SELECTOR, "section img.plot")) == 3  # vs eps, group gaps, score histograms
        errors = [m for m in driver.get_log("browser") if m["level"] == "SEVERE"]
        assert not errors, errors
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
