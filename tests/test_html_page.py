"""The HTML leaderboard page (robustbench_med.html_page): static structure, then the page in headless Chromium at
1440 and 1920 px (no sideways page scroll, nothing overlapping, sticky header, search, filters and sort order in the
URL, per-task columns, sorting within a task, the detail view) and screenshots that are stable across renders.

Screenshots are written to ``$RBM_SHOTS_DIR`` when set (for a person to look at), else to a temporary directory.
Entries are synthetic (no grid run); one Chromium serves the whole module."""
import copy
import io
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest
from test_render_html import XSS, synthetic_entry

from robustbench_med import html_page, render
from robustbench_med.render import flat_rows

WIDTHS = (1440, 1920)


@pytest.fixture(scope="module")
def entries():
    vqa_like = synthetic_entry("resnet18.phantom", task="classification", seed=5, eps=2 / 255)
    for i, r in enumerate(x for x in vqa_like["results"] if x["cell_id"]):  # a per-attack metric only this task has
        r["metrics"] = {"detector_auroc": 0.5 + 0.05 * i, "detector_tpr_at_90tnr": 0.25}
    seg = synthetic_entry("unet.phantom", task="segmentation", metric="dice_fg", eps=2 / 255, seed=4)
    for i, r in enumerate(seg["results"]):  # the equity-scaled Dice only segmentation rows carry
        r["groups"]["robust_es_dice_fairseg[sex]"] = 0.8 - 0.01 * i
    return [
        synthetic_entry("cnn.phantom", display_name=XSS, seed=1, defense_params={"note": "<script>alert(2)</script>"}),
        synthetic_entry("resnet18.phantom", task="classification", seed=2),
        synthetic_entry("cnn.phantom", eps=2 / 255, seed=3),
        seg,
        vqa_like,
    ]


@pytest.fixture(scope="module")
def page(entries, tmp_path_factory):
    path = tmp_path_factory.mktemp("page") / "index.html"
    path.write_text(html_page.to_html(entries), encoding="utf-8")
    return path


def _tables(text):
    """(task, [header keys], [data-tasks of each header]) of each table of a rendered page."""
    out = []
    for m in re.finditer(r'<table class="board" data-dataset="[^"]*" data-task="([^"]*)">(.*?)</table>', text, re.S):
        heads = re.findall(r'<th scope="col" data-key="([^"]*)" data-type="[^"]*" data-tasks="([^"]*)"', m.group(2))
        out.append((m.group(1), [k for k, _ in heads], [t.split() for _, t in heads]))
    return out


# ---------------------------------------------------------------------------------------------------------------
# the page as text


def test_render_to_html_is_the_page(entries):
    assert render.to_html(entries, plots=False) == html_page.to_html(entries, plots=False)


def test_columns_follow_the_tasks_that_have_values(entries):
    text = html_page.to_html(entries, plots=False)
    tables = _tables(text)
    assert [t for t, _, _ in tables] == ["binary", "classification", "segmentation"]  # one table per dataset x task
    keys = {t: k for t, k, _ in tables}
    assert "g:robust_es_dice_fairseg[sex]" in keys["segmentation"] and "g:robust_es_dice_fairseg[sex]" not in keys["binary"]
    assert "m:detector_auroc" in keys["classification"]
    assert "m:detector_auroc" not in keys["binary"] and "m:detector_auroc" not in keys["segmentation"]
    assert "external" not in keys["binary"]  # no entry has an external number: the column applies to no task
    for task, _, tasks in tables:
        assert all(task in t for t in tasks)
    rows = flat_rows(entries, headline_only=False)
    assert text.count("<tr tabindex") == len(rows)
    for task, k, _ in tables:  # every row has one cell per header of its table
        block = re.search(rf'data-task="{task}">.*?</table>', text, re.S).group(0)
        assert {len(re.findall(r"<td", tr)) for tr in re.findall(r"<tr tabindex.*?</tr>", block, re.S)} == {len(k)}


def test_figures_are_tagged_and_details_carry_the_manifest(entries):
    text = html_page.to_html(entries)
    figs = re.findall(r'<figure data-dataset="([^"]*)" data-task="([^"]*)" data-threat="([^"]*)" data-defense="([^"]*)">', text)
    assert sorted({f[1] for f in figs}) == ["binary", "classification", "segmentation"] and len(figs) == 9
    assert ("phantom.ct", "binary", "Linf-2_255 Linf-8_255", "identity.none jpeg.bpda") in figs
    for i, e in enumerate(entries):
        tpl = re.search(rf'<template id="entry-{i}">(.*?)</template>', text, re.S).group(1)
        assert e["weights_sha256"] in tpl and "c0ffee" in tpl and "d00d" in tpl and "torch 2.14.1" in tpl
    assert text.count('<template id="grid-') == 1  # the synthetic entries share one grid: its JSON is written once
    assert XSS not in text and "&lt;img src=x onerror=alert(1)&gt;" in text


# ---------------------------------------------------------------------------------------------------------------
# the page in headless Chromium


def _chromium():
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
                 "--disable-sync", "--no-first-run", "--disable-dev-shm-usage", "--hide-scrollbars",
                 "--force-device-scale-factor=1", f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts), profile


@pytest.fixture(scope="module")
def driver():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SE_OFFLINE", "true")  # Selenium Manager must not try to download anything
        drv, profile = _chromium()  # skips when Chromium, chromedriver or selenium is absent
    try:
        yield drv
    finally:
        drv.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    out = os.environ.get("RBM_SHOTS_DIR")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        return Path(out)
    return tmp_path_factory.mktemp("shots")


def _open(driver, url, width, height=900):
    """Load ``url`` with the viewport exactly ``width`` px wide; fail on console errors."""
    driver.set_window_size(width, height)
    inner = driver.execute_script("return window.innerWidth")
    if inner != width:
        driver.set_window_size(2 * width - inner, height)
    driver.get("about:blank")
    driver.get(url)
    assert driver.execute_script("return window.innerWidth") == width
    _no_errors(driver)


def _no_errors(driver):
    errors = [m for m in driver.get_log("browser") if m["level"] in ("SEVERE", "WARNING")]
    assert not errors, errors


def _js(driver, script, *args):
    return driver.execute_script(script, *args)


BOXES = """
var box = function (el) { var r = el.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
var out = {header: box(document.querySelector("header")), toolbar: box(document.getElementById("toolbar")),
           board: box(document.getElementById("leaderboard"))};
document.querySelectorAll("figure").forEach(function (f, i) { out["figure" + i] = box(f); });
return out;
"""


def _overlap(a, b):
    return min(a[2], b[2]) - max(a[0], b[0]) > 0.5 and min(a[3], b[3]) - max(a[1], b[1]) > 0.5


def _visible_rows(driver):
    """(task of its table, model cell text, robust data-value) of each shown row, in page order."""
    return _js(driver, """
        var out = [];
        document.querySelectorAll("table.board").forEach(function (t) {
          if (t.hidden) { return; }
          var keys = Array.prototype.map.call(t.tHead.rows[0].cells, function (th) { return th.getAttribute("data-key"); });
          t.querySelectorAll("tbody tr").forEach(function (r) {
            if (r.hidden) { return; }
            out.push([t.getAttribute("data-task"), r.cells[keys.indexOf("model")].textContent,
                      parseFloat(r.cells[keys.indexOf("robust")].getAttribute("data-value")), r.getAttribute("data-task")]);
          });
        });
        return out;""")


@pytest.mark.parametrize("width", WIDTHS)
def test_page_fits_the_window_and_nothing_overlaps(driver, page, shots, width):
    """No sideways page scroll; header, filter bar, table box and figures do not intersect; the layout uses the
    extra width (two figures a row at 1440 px, three at 1920 px); the same page gives the same pixels twice."""
    from PIL import Image

    _open(driver, page.as_uri(), width)
    assert _js(driver, "return document.scrollingElement.scrollWidth") <= width
    boxes = _js(driver, BOXES)
    names = sorted(boxes)
    assert len([n for n in names if n.startswith("figure")]) == 9
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not _overlap(boxes[a], boxes[b]), (a, b, boxes[a], boxes[b])
    assert all(box[2] <= width for box in boxes.values())
    per_row = len({round(boxes[n][1]) for n in names if n.startswith("figure")})
    assert per_row == {1440: 5, 1920: 3}[width], boxes  # 9 figures: two a row at 1440 px, three at 1920 px
    board = _js(driver, "var b = document.getElementById('leaderboard'); return [b.clientWidth, b.scrollWidth];")
    assert board[0] >= width - 60  # the table box takes the window's width (less the page margins)
    widths = _js(driver, "var o = {}; document.querySelectorAll('table.board').forEach(function (t) {"
                         " o[t.getAttribute('data-task')] = t.scrollWidth; }); return o;")
    assert widths["binary"] <= board[0], (widths, board)  # a task without extra columns fits a laptop screen
    spill = _js(driver, """
        var out = [];
        document.querySelectorAll("table.board th, table.board td").forEach(function (c) {
          var r = c.getBoundingClientRect();
          var b = c.querySelector("button") || c;
          var inner = b.getBoundingClientRect();
          if (c.scrollWidth > c.clientWidth + 1 || inner.left < r.left - 0.5 || inner.right > r.right + 0.5) {
            out.push(c.textContent);
          }
        });
        return out;""")
    assert not spill, spill  # no heading or cell text runs into its neighbour
    first = driver.get_screenshot_as_png()
    _open(driver, page.as_uri(), width)
    second = driver.get_screenshot_as_png()
    a, b = Image.open(io.BytesIO(first)), Image.open(io.BytesIO(second))
    assert a.size == b.size == (width, a.size[1]) and a.tobytes() == b.tobytes(), "the same page renders to the same pixels"
    (shots / f"synthetic_{width}.png").write_bytes(first)
    _js(driver, "window.scrollTo(0, document.getElementById('figures').getBoundingClientRect().top + window.scrollY - 10)")
    (shots / f"synthetic_{width}_figures.png").write_bytes(driver.get_screenshot_as_png())


def test_header_stays_visible_when_the_table_scrolls(driver, page):
    _open(driver, page.as_uri() + "#view=all", 1440, height=700)
    top = _js(driver, """
        var board = document.getElementById("leaderboard");
        board.scrollTop = 250;
        var th = document.querySelector('table.board thead th[data-key="robust"]');
        var row = document.querySelector("table.board tbody tr");
        return [board.getBoundingClientRect().top + board.clientTop, th.getBoundingClientRect().top,
                row.getBoundingClientRect().top, board.scrollTop];""")
    assert top[3] == 250, "the table box scrolls (it is taller than the window)"
    assert abs(top[1] - top[0]) <= 1, top  # the header row sticks at the top of the box
    assert top[2] < top[0], top  # while the first rows scrolled out of view
    _js(driver, "var b = document.getElementById('leaderboard'); b.scrollLeft = 400;")
    left = _js(driver, """var b = document.getElementById("leaderboard");
        var td = document.querySelector("table.board tbody td");
        return [b.getBoundingClientRect().left + b.clientLeft, td.getBoundingClientRect().left];""")
    assert abs(left[0] - left[1]) <= 1, left  # and the model column sticks at its left


def test_search_filters_and_sort_live_in_the_url(driver, page, entries):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    _open(driver, page.as_uri(), 1440)
    headline = flat_rows(entries)
    assert len(_visible_rows(driver)) == len(headline)
    box = driver.find_element(By.ID, "search")
    box.send_keys("resnet")
    shown = _visible_rows(driver)
    assert shown and {m for _, m, _, _ in shown} == {"resnet18.phantom"}
    assert driver.find_element(By.ID, "row-count").text == str(len(shown))
    assert not driver.find_element(By.CSS_SELECTOR, 'table.board[data-task="segmentation"]').is_displayed()
    assert not driver.find_element(By.ID, "empty").is_displayed()
    box.send_keys("zzz")  # nothing matches: say so
    assert _visible_rows(driver) == [] and driver.find_element(By.ID, "empty").is_displayed()
    assert driver.find_element(By.ID, "row-count").text == "0"
    driver.find_element(By.ID, "reset").click()
    assert len(_visible_rows(driver)) == len(headline) and "#" not in driver.current_url
    box.send_keys("resnet")
    Select(driver.find_element(By.ID, "filter-threat")).select_by_value("Linf-2_255")
    Select(driver.find_element(By.ID, "filter-view")).select_by_value("all")
    driver.find_element(By.CSS_SELECTOR, 'table.board[data-task="classification"] th[data-key="robust"] button').click()
    driver.find_element(By.CSS_SELECTOR, 'table.board[data-task="classification"] th[data-key="robust"] button').click()
    before = _visible_rows(driver)
    expected = [e for e in entries if "resnet" in e["victim"] and e["threat"]["key"] == "Linf-2_255"]
    assert len(before) == sum(len(e["results"]) for e in expected)
    assert [v for _, _, v, _ in before] == sorted((v for _, _, v, _ in before), reverse=True)
    url = driver.current_url
    assert "#" in url and "q=resnet" in url and "threat=Linf-2_255" in url and "view=all" in url and "dir=desc" in url
    figures = driver.find_elements(By.CSS_SELECTOR, "figure")
    assert {f.get_attribute("data-task") for f in figures if f.is_displayed()} == {"binary", "classification", "segmentation"}
    Select(driver.find_element(By.ID, "filter-task")).select_by_value("classification")
    assert {f.get_attribute("data-task") for f in figures if f.is_displayed()} == {"classification"}  # plots follow
    Select(driver.find_element(By.ID, "filter-defense")).select_by_value("identity.none")
    url = driver.current_url
    narrowed = _visible_rows(driver)
    assert 0 < len(narrowed) < len(before) and "defense=identity.none" in url
    before = narrowed
    driver.get("about:blank")
    driver.get(url)  # a fresh load of the URL restores search, filters and sort order
    _no_errors(driver)
    assert _visible_rows(driver) == before
    assert driver.find_element(By.ID, "search").get_attribute("value") == "resnet"
    assert Select(driver.find_element(By.ID, "filter-view")).first_selected_option.get_attribute("value") == "all"
    assert driver.find_element(By.CSS_SELECTOR, 'table.board[data-task="classification"] th[data-key="robust"]'
                               ).get_attribute("aria-sort") == "descending"
    shown = {f.get_attribute("data-task") for f in driver.find_elements(By.CSS_SELECTOR, "figure") if f.is_displayed()}
    assert shown == {"classification"}


def test_columns_per_task_and_sorting_within_a_task(driver, page):
    from selenium.webdriver.common.by import By

    _open(driver, page.as_uri() + "#view=all", 1920)
    heads = {t.get_attribute("data-task"): [th.text for th in t.find_elements(By.CSS_SELECTOR, "thead th")]
             for t in driver.find_elements(By.CSS_SELECTOR, "table.board")}
    assert "ES-Dice FairSeg (sex)" in heads["segmentation"] and "ES-Dice FairSeg (sex)" not in heads["binary"]
    assert "det. AUROC" in heads["classification"] and "det. AUROC" not in heads["binary"] + heads["segmentation"]
    before = _visible_rows(driver)
    driver.find_element(By.CSS_SELECTOR, 'table.board[data-task="binary"] th[data-key="robust"] button').click()
    after = _visible_rows(driver)
    assert sorted(after) == sorted(before)
    tasks = [t for t, _, _, _ in after]
    assert tasks == sorted(tasks, key=["binary", "classification", "segmentation"].index), "tables keep their order"
    assert all(t == row_task for t, _, _, row_task in after), "a row stays in its task's table"
    for task in set(tasks):  # each task's rows are sorted by robust, never ranked against another task's metric
        values = [v for t, _, v, _ in after if t == task]
        assert values == sorted(values) and len(set(values)) > 1
    robust_heads = driver.find_elements(By.CSS_SELECTOR, 'th[data-key="robust"]')
    assert {th.get_attribute("aria-sort") for th in robust_heads} == {"ascending"}
    driver.find_element(By.CSS_SELECTOR, 'table.board[data-task="binary"] th[data-key="model"] button').click()
    names = [m for t, m, _, _ in _visible_rows(driver) if t == "binary"]
    assert names == sorted(names, key=str.lower)
    _no_errors(driver)


def test_detail_view_shows_the_manifest_and_names_stay_text(driver, page, entries):
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By

    _open(driver, page.as_uri(), 1440)
    names = [m for _, m, _, _ in _visible_rows(driver)]
    assert any(n.startswith(XSS) for n in names), names  # a model name containing HTML is shown as text
    assert not driver.find_elements(By.CSS_SELECTOR, "table.board img, table.board script")
    row = next(r for r in driver.find_elements(By.CSS_SELECTOR, "tr[data-entry]") if r.text.startswith(XSS))
    entry = entries[int(row.get_attribute("data-entry"))]
    assert entry.get("display_name") == XSS
    row.find_elements(By.TAG_NAME, "td")[2].click()
    dialog = driver.find_element(By.ID, "detail")
    assert dialog.is_displayed() and dialog.get_attribute("open") is not None
    text = dialog.text
    assert entry["weights_sha256"] in text and "c0ffee" in text and "d00d" in text and "torch 2.14.1" in text
    assert XSS in text and not dialog.find_elements(By.CSS_SELECTOR, "img, script")
    cells = [td.text for td in row.find_elements(By.TAG_NAME, "td")]
    assert "worst-case(2 attacks)" in cells and "\nattack\nworst-case(2 attacks)\n" in text  # the clicked row's attack
    assert "\nstatus\ndone\n" in text
    dialog.find_element(By.TAG_NAME, "summary").click()  # the grid configuration, written once and cloned in
    assert '"n_examples": 20' in dialog.find_element(By.TAG_NAME, "pre").text
    url = driver.current_url
    assert "row=" in url
    driver.get("about:blank")
    driver.get(url)
    dialog = driver.find_element(By.ID, "detail")
    assert dialog.is_displayed() and entry["weights_sha256"] in dialog.text  # the URL reopens the detail view
    driver.find_element(By.ID, "detail-close").click()
    assert not dialog.is_displayed() and "row=" not in driver.current_url
    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert.text
    _no_errors(driver)


def test_unknown_url_state_is_ignored(driver, page):
    """A stale or hand-edited URL (unknown filter value, sort key or row) shows the default view, without errors; a
    changed fragment is applied without a reload."""
    _open(driver, page.as_uri() + "#task=nope&sort=nope&row=9999&q=", 1440)
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    assert Select(driver.find_element(By.ID, "filter-task")).first_selected_option.get_attribute("value") == ""
    assert not driver.find_element(By.ID, "detail").is_displayed()
    assert len(_visible_rows(driver)) > 0
    _js(driver, "location.hash = 'task=segmentation'")  # editing the fragment of an open page applies it
    assert {t for t, _, _, _ in _visible_rows(driver)} == {"segmentation"}
    _no_errors(driver)


def test_an_entry_copy_keeps_its_own_detail(entries):
    """Rows point at their own entry: two entries of one victim at different eps open different details."""
    e = copy.deepcopy(entries[2])
    e["weights_sha256"] = "f" * 64
    text = html_page.to_html([entries[0], e], plots=False)
    pairs = set(re.findall(r'<tr tabindex="0" data-entry="(\d)" data-dataset="[^"]*" data-task="[^"]*" '
                           r'data-threat="([^"]*)"', text))
    assert pairs == {("0", "Linf-8_255"), ("1", "Linf-2_255")}
    assert "f" * 64 in re.search(r'<template id="entry-1">(.*?)</template>', text, re.S).group(1)
