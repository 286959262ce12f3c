"""The column registry: one Column drives Markdown, LaTeX, CSV, HTML and the terminal table; group columns are
generated per attribute; columns apply per task."""
import copy
import csv
import io

import numpy as np
import pandas as pd
import pytest

from robustbench_med import columns as C
from robustbench_med.errors import ConfigError
from robustbench_med.leaderboard import to_text
from robustbench_med.render import flat_rows, to_csv, to_html, to_latex, to_markdown
from test_render_html import synthetic_entry

KEY, HEADING = "robust_sparkle", "sparkle score"


@pytest.fixture(scope="module")
def entry():
    """A synthetic entry whose every finished row carries a new summary value (reaching the row's ``metrics``)."""
    e = copy.deepcopy(synthetic_entry("cnn.phantom", seed=5))
    for r in e["results"]:
        r["metrics"] = {KEY: 0.1234}
    return e


def _summary() -> pd.DataFrame:
    """A wide summary frame (as ``summary_wide`` returns) with the new value as one more column."""
    base = {"victim": "cnn.phantom", "task": "binary", "metric": "accuracy", "defense": "identity.none", "norm": "Linf",
            "eps": 8 / 255, "eps_display": "8/255", "status": "done", "clean": 0.9, "n": 20, "mean_linf": 0.03,
            "mean_l2": 1.0, "robust_ci95_low": 0.2, "robust_ci95_high": 0.6, "attack_success_rate": 0.5, "flags": [],
            "robust_gap_sex": 0.25}
    return pd.DataFrame([{**base, "attack": "pgd.linf", "robust": 0.4, KEY: 0.1234},
                         {**base, "attack": "fgsm.linf", "robust": 0.5, KEY: 0.5678}])


def _renderings(e) -> dict[str, str]:
    return {"markdown": to_markdown([e]), "latex": to_latex([e]), "csv": to_csv([e]), "html": to_html([e], plots=False),
            "text": to_text(_summary())}


def test_one_new_column_shows_in_all_five_renderings(entry):
    before = _renderings(entry)
    assert not any(HEADING in text for text in before.values()), "the value alone is not a displayed column"
    C.register(C.Column(KEY, HEADING, source="metrics", sort="desc"))
    try:
        after = _renderings(entry)
    finally:
        C.unregister(KEY)
    for view, text in after.items():
        assert (HEADING if view != "csv" else KEY) in text, view
        assert "0.123" in text, view
    header = next(csv.reader(io.StringIO(after["csv"])))
    assert header.count(KEY) == 1 and header.index(KEY) < header.index("robust_gap_sex")  # placed once, before the groups
    head = after["text"].splitlines()[0]
    assert head.index("ASR") < head.index(HEADING) < head.index("flags")
    assert _renderings(entry) == before  # unregistered: gone again


def test_registry_keys_are_unique_and_every_view_is_ordered():
    keys = [(c.source, c.key) for c in C.COLUMNS]
    assert len(keys) == len(set(keys))
    rows = flat_rows([synthetic_entry("cnn.phantom", seed=1)])
    md = [c.key for c in C.for_rows(rows, "markdown")]
    assert md[:8] == ["rank", "model", "defense", "attack", "clean", "robust", "ci", "asr"]
    assert md[-3:] == ["external", "flags", "n"]
    assert [c.key for c in C.csv_columns(rows)][: len(C.CSV_ORDER)] == list(C.CSV_ORDER)
    with pytest.raises(ConfigError, match="unknown view"):
        C.for_rows(rows, "pdf")
    with pytest.raises(ConfigError, match="source"):
        C.Column("x", "x", source="elsewhere")
    with pytest.raises(ConfigError, match="already registered"):
        C.register(C.Column("robust", "robust again"))


def test_group_columns_are_generated_per_attribute_and_task():
    groups = {"robust_gap_sex": 0.1, "worst_group_robust_sex": 0.4, "robust_gap_accuracy[sex]": 0.1, "worst_group_sex": "F",
              "robust_es_dice_fairseg[sex]": 0.3, "robust_es_dice_fairseg[sex*age_group]": 0.2, "gap_change_age_group": 0.05}
    seg = [{"task": "segmentation", "groups": groups}]
    cols = C.group_columns(seg)
    assert [c.key for c in cols] == ["gap_change_age_group", "worst_group_robust_sex", "robust_gap_sex", "robust_es_dice_fairseg[sex]"]
    assert [c.heading for c in cols][:2] == ["Δgap (age_group)", "worst-group robust (sex)"]
    binary = [{"task": "binary", "groups": groups}]
    assert "robust_es_dice_fairseg[sex]" not in [c.key for c in C.group_columns(binary)]  # ES-Dice: segmentation only
    assert C.group_columns([{"task": "binary", "groups": {"robust_gap_sex": None}}]) == []  # no number, no column


def test_columns_apply_per_task():
    vqa = C.column("robust_vqa_accuracy_first")
    assert vqa.tasks == ("vqa",)
    rows = [{"task": "vqa", "metrics": {"robust_vqa_accuracy_first": 0.5}}, {"task": "binary", "metrics": {}}]
    assert vqa in C.for_rows(rows, "html") and vqa not in C.for_rows(rows[1:], "html")
    assert vqa not in C.for_rows([{"task": "binary", "metrics": {"robust_vqa_accuracy_first": 0.5}}], "html")


def test_cells_format_missing_invalid_and_intervals():
    row = {"status": "invalid", "robust": None, "clean": 0.91234, "ci_low": None, "ci_high": None, "flags": [],
           "metrics": {"detector_auroc": 0.04, "detector_auroc_overshoot": 1.0}}
    assert C.column("robust").cell(row) == "INVALID"
    assert C.column("clean").cell(row) == "0.912"
    assert C.column("ci").cell(row) == "–" and C.column("ci").cell({"ci_low": 0.1, "ci_high": 0.25}) == "[0.100, 0.250]"
    assert C.column("flags").cell(row) == "–"
    assert C.column("detector_auroc").cell(row) == "0.040 (overshoot)"
    assert C.fixed3(np.float64("nan")) == "–"
