"""Every figure of robustbench_med.plots is rendered (Agg) and inspected: facets, series per panel, markers for single
points, CI bands, one colour per victim across figures, legends clear of every panel, no text cut by the figure edge,
no overlapping tick labels; and the published boards' figures pass the same layout checks."""
from __future__ import annotations

import itertools
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.collections import PolyCollection  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402

from robustbench_med import plots  # noqa: E402
from robustbench_med.errors import ConfigError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1] / "leaderboards"
BOARDS = ["", "detectors", "fairness", "f3", "f3_study", "shift", "volumes", "projectors", "qava"]


# ---------------------------------------------------------------------------------------------------------------
# layout inspection


def _overlap(a, b, tol: float = 0.5) -> bool:
    return a.x0 < b.x1 - tol and b.x0 < a.x1 - tol and a.y0 < b.y1 - tol and b.y0 < a.y1 - tol


def _drawn(axis) -> list:
    """The tick labels matplotlib draws: those of ticks inside the view interval."""
    lo, hi = sorted(axis.get_view_interval())
    return [t.label1 for t in axis.get_major_ticks() if lo - 1e-9 <= t.get_loc() <= hi + 1e-9 and t.label1.get_visible()]


def layout_problems(fig) -> list[str]:
    """What a reader would trip on: a legend over a panel, text outside the figure, tick labels on top of each other."""
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    page = fig.bbox
    axes = [ax for ax in fig.axes if ax.get_visible() and ax.axison]
    problems = []
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None] + list(fig.legends)
    for leg in legends:
        box = leg.get_window_extent(r)
        problems += [f"legend overlaps panel {i}" for i, ax in enumerate(axes) if _overlap(box, ax.get_window_extent(r))]
        if box.x0 < page.x0 - 1 or box.y0 < page.y0 - 1 or box.x1 > page.x1 + 1 or box.y1 > page.y1 + 1:
            problems.append("legend outside the figure")
    texts = list(fig.texts) + [t for leg in legends for t in leg.get_texts()]
    for ax in axes:
        texts += [ax.title, ax.xaxis.label, ax.yaxis.label, *ax.texts, *_drawn(ax.xaxis), *_drawn(ax.yaxis)]
    texts = [t for t in texts if t.get_visible() and t.get_text().strip()]
    for t in texts:
        box = t.get_window_extent(r)
        if box.x0 < page.x0 - 1 or box.y0 < page.y0 - 1 or box.x1 > page.x1 + 1 or box.y1 > page.y1 + 1:
            problems.append(f"text cut by the figure edge: {t.get_text()[:40]!r}")
    for ax in axes:
        for labels in (_drawn(ax.xaxis), _drawn(ax.yaxis)):
            boxes = [t.get_window_extent(r) for t in labels if t.get_visible() and t.get_text().strip()]
            if any(_overlap(a, b) for a, b in itertools.combinations(boxes, 2)):
                problems.append(f"overlapping tick labels in {ax.get_title()[:40]!r}")
    return problems


def _series(victim, defense, pts, clean=0.9, facet=("binary", "robust accuracy", "Linf")):
    s = plots.Series(victim, defense, facet, clean=clean)
    for eps, y in pts.items():
        s.points[eps] = (y, max(0.0, y - 0.05), min(1.0, y + 0.05))
        s.display[eps] = f"{round(eps * 255)}/255" if facet[2] == "Linf" else f"{eps:g}"
    return s


def _line_colors(fig) -> dict[str, str]:
    """Legend label → colour of the labelled artist, over every panel."""
    out = {}
    for ax in fig.axes:
        handles, labels = ax.get_legend_handles_labels()
        for h, lbl in zip(handles, labels):
            line = h[0] if isinstance(h, tuple) else h
            out[lbl.replace("\n", " ")] = to_hex(line.get_color())
    return out


# ---------------------------------------------------------------------------------------------------------------
# robustness vs eps


def _series_count(ax) -> int:
    """Series drawn in a panel: legend entries (a sweep panel) or labelled rows (a single-budget dot panel)."""
    leg = ax.get_legend()
    return len(leg.get_texts()) if leg is not None else len([t for t in ax.get_yticklabels() if t.get_text()])


def test_one_panel_per_task_metric_norm_with_its_own_series():
    series = [_series("a.tiny", "identity.none", {2 / 255: 0.5, 8 / 255: 0.1}),
              _series("b.tiny", "identity.none", {2 / 255: 0.6, 8 / 255: 0.2}),
              _series("c.tiny", "identity.none", {8 / 255: 0.3}, facet=("segmentation", "robust dice_fg", "Linf")),
              _series("a.tiny", "identity.none", {0.5: 0.4}, facet=("binary", "robust accuracy", "L2")),
              _series("b.tiny", "jpeg.bpda", {0.5: 0.3}, facet=("binary", "robust accuracy", "L2"))]
    fig = plots.robustness_figure(series)
    panels = {ax.get_title().replace("\n", " "): ax for ax in fig.axes}
    assert sorted(panels) == ["binary: robust accuracy at L2 0.5", "binary: robust accuracy vs Linf eps",
                              "segmentation: robust dice_fg at Linf 8/255"]
    assert [_series_count(panels[t]) for t in sorted(panels)] == [2, 2, 1]
    assert layout_problems(fig) == []


def test_a_single_budget_is_a_dot_with_an_error_bar_and_a_sweep_is_a_line_with_a_ci_band():
    fig = plots.robustness_figure([_series("a.tiny", "identity.none", {8 / 255: 0.3}),
                                   _series("b.tiny", "identity.none", {2 / 255: 0.6, 4 / 255: 0.4, 8 / 255: 0.2})])
    ax = fig.axes[0]
    lines = {lbl: h for h, lbl in zip(*ax.get_legend_handles_labels())}
    single = lines["a.tiny / identity.none"]
    single_line = single[0] if isinstance(single, tuple) else single
    assert single_line.get_linestyle() == "None" and single_line.get_marker() not in (None, "None", "")
    sweep = lines["b.tiny / identity.none"]
    assert sweep.get_linestyle() == "-" and len(sweep.get_xdata()) == 4  # clean at eps 0 + three budgets
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 1 and to_hex(bands[0].get_facecolor()[0][:3]) == to_hex(sweep.get_color())
    assert [t.get_text() for t in ax.get_xticklabels()][0].startswith("0")  # eps 0 is the clean score
    assert layout_problems(fig) == []
    dots = plots.robustness_figure([_series("a.tiny", "identity.none", {0.5: 0.3}, facet=("binary", "robust accuracy", "L2"))])
    ax = dots.axes[0]
    assert all(line.get_linestyle() == "None" for line in ax.lines)  # no line joins clean and robust
    filled = [line for line in ax.lines if line.get_markerfacecolor() != "none" and line.get_marker() not in ("|", "_")]
    assert [line.get_xdata()[0] for line in filled] == [0.3] and ax.get_xaxis().get_label().get_text().startswith("robust accuracy")
    assert any(line.get_xdata()[0] == 0.9 for line in ax.lines if line.get_markerfacecolor() == "none")  # clean, hollow


def test_a_victim_keeps_its_colour_across_figures():
    one = plots.robustness_figure([_series("unet.phantom", "identity.none", {2 / 255: 0.5, 8 / 255: 0.1}),
                                   _series("cnn.phantom", "identity.none", {2 / 255: 0.2, 8 / 255: 0.1})])
    two = plots.robustness_figure([_series("unet.phantom", "identity.none", {4 / 255: 0.5, 8 / 255: 0.3}, facet=("seg", "robust dice", "Linf")),
                                   _series("han.tiny", "identity.none", {4 / 255: 0.1, 8 / 255: 0.0})])
    c1, c2 = _line_colors(one), _line_colors(two)
    assert c1["unet.phantom / identity.none"] == c2["unet.phantom / identity.none"] == plots.victim_style("unet.phantom").color.lower()
    assert c1["cnn.phantom / identity.none"] != c1["unet.phantom / identity.none"]
    dots = plots.robustness_figure([_series("unet.phantom", "identity.none", {8 / 255: 0.1})])
    assert {to_hex(line.get_color()) for line in dots.axes[0].lines} == {c1["unet.phantom / identity.none"]}


def test_victim_styles_are_distinct_within_a_figure_and_stable():
    names = [f"victim{i}.tiny" for i in range(60)]
    styles = plots.victim_styles(names)
    assert len(set(styles.values())) == 60
    assert len({st.color for st in plots.victim_styles(names[:20]).values()}) == 20  # up to 20 victims: 20 colours
    assert plots.victim_styles(["cnn.phantom"])["cnn.phantom"] == plots.victim_style("cnn.phantom")


def test_long_labels_are_wrapped_not_cut():
    text = "resnet18.phantom / jpeg.bpda(quality=75) [transfer] @ Linf 8/255"
    wrapped = plots.wrap_label(text, 24, max_lines=5)
    assert wrapped.replace("\n", " ") == text and max(len(x) for x in wrapped.split("\n")) <= 24
    assert plots.wrap_label("x" * 100, 10, max_lines=2).endswith("…")


def test_defence_labels_drop_what_a_family_shares():
    rows = [{"defense": "detector.svm", "defense_params": {"C": 1.0, "n_fit": 256, "attack_params": {"eps": 1}}, "attack_through": "adaptive"},
            {"defense": "detector.kd", "defense_params": {"bandwidth": "scott", "n_fit": 256}, "attack_through": "adaptive"},
            {"defense": "detector.kd", "defense_params": {"bandwidth": "silverman", "n_fit": 256}, "attack_through": "adaptive"},
            {"defense": "jpeg.bpda", "defense_params": {"quality": 75}, "attack_through": "transfer"}]
    assert sorted(plots.defense_labels(rows).values()) == ["detector.kd(bandwidth=scott)", "detector.kd(bandwidth=silverman)",
                                                           "detector.svm(C=1.0)", "jpeg.bpda(quality=75) [transfer]"]


def test_summary_frame_takes_the_worst_attack_per_eps_and_skips_noise_baselines():
    df = pd.DataFrame([
        {"victim": "v.tiny", "task": "binary", "metric": "accuracy", "defense": "identity.none", "defense_params": "{}",
         "attack_through": "adaptive", "knowledge": k, "norm": "Linf", "eps": e, "eps_display": d, "status": "done",
         "robust": rob, "robust_ci95_low": rob - 0.1, "robust_ci95_high": rob + 0.1, "clean": 0.9}
        for k, e, d, rob in [("white-box", 2 / 255, "2/255", 0.5), ("black-box", 2 / 255, "2/255", 0.4),
                             ("white-box", 8 / 255, "8/255", 0.2), ("none", 8 / 255, "8/255", 0.05)]])
    (s,) = plots.summary_series(df)
    assert {round(e * 255): p[0] for e, p in s.points.items()} == {2: 0.4, 8: 0.2} and s.clean == 0.9


# ---------------------------------------------------------------------------------------------------------------
# published boards: every figure readable


@pytest.fixture(scope="module")
def boards():
    from robustbench_med.entries import load_entries

    return {b: load_entries(ROOT / b) for b in BOARDS}


@pytest.mark.slow
@pytest.mark.parametrize("board", BOARDS)
def test_published_figures_have_no_overlap_and_no_cut_text(boards, board):
    for make in (plots.robustness_vs_eps, plots.group_gaps, plots.score_histograms):
        fig = make(boards[board])
        assert fig is not None
        assert layout_problems(fig) == [], (board, make.__name__)
        matplotlib.pyplot.close(fig)


def test_every_figure_of_a_board_draws_a_victim_in_one_colour(boards):
    entries = boards["fairness"]
    want = plots.victim_styles(e["victim"] for e in entries)["unet.phantom"].color.lower()
    eps = plots.robustness_vs_eps(entries)
    gaps = plots.group_gaps(entries)
    hist = plots.score_histograms(entries, max_panels=30)
    dots = [line for ax in eps.axes for line in ax.lines if line.get_marker() not in ("|", "_")]
    rows = [t.get_text() for t in eps.axes[0].get_yticklabels()]
    unet = [line for line in dots if rows[int(round(line.get_ydata()[0]))].startswith("unet.phantom /")]
    assert unet and {to_hex(line.get_color()) for line in unet} == {want}
    gap_rows = [t.get_text() for t in gaps.axes[0].get_yticklabels()]
    robust = [line for line in gaps.axes[0].lines if line.get_marker() not in ("|", "_") and line.get_markerfacecolor() != "none"]
    assert {to_hex(line.get_color()) for line in robust
            if any(gap_rows[int(round(y + 0.12))].startswith("unet.phantom /") for y in line.get_ydata())} == {want}
    filled = [ax.patches[1] for ax in hist.axes if ax.get_title().startswith("unet.phantom /")]
    assert filled and {to_hex(p.get_facecolor()[:3]) for p in filled} == {want}
    for fig in (eps, gaps, hist):
        matplotlib.pyplot.close(fig)


def test_detector_study_plots_auroc_and_tpr_not_robust_accuracy(boards):
    fig = plots.robustness_vs_eps(boards["detectors"])
    panels = [ax for ax in fig.axes if ax.axison]
    assert sorted(ax.get_ylabel() for ax in panels) == ["detection AUROC (worst attack)", "detection TPR at 90% TNR (worst attack)"]
    entries = boards["detectors"]
    auroc = min(r["metrics"]["detector_auroc"] for e in entries if e["victim"] == "cnn.phantom" and e["threat"]["key"] == "Linf-8_255"
                for r in e["results"] if r["defense"] == "detector.mahalanobis" and "detector_auroc" in (r.get("metrics") or {}))
    line = next(h for ax in panels if "AUROC" in ax.get_ylabel()
                for h, lbl in zip(*ax.get_legend_handles_labels()) if lbl.replace("\n", " ").startswith("cnn.phantom / detector.mahalanobis"))
    assert line.get_ydata()[-1] == pytest.approx(auroc)
    plots.png_bytes(fig)


def test_group_gaps_have_intervals_from_the_entries(boards):
    entries = boards["fairness"]
    gaps = plots.entry_gaps(entries)
    assert gaps and all(g.robust_ci is not None and g.robust_ci[0] <= g.robust + 1e-9 <= g.robust_ci[1] + 2e-9 for g in gaps)
    e = entries[0]
    from robustbench_med.entries import headline_rows

    r = headline_rows(e)[0]
    stored = r["groups"][f"robust_gap_{e['metric']}[sex]"]
    assert any(g.robust == stored and g.attribute == "sex" and g.victim == e["victim"] for g in gaps)
    fig = plots.group_gap_figure(gaps)
    assert len(fig.axes) == len({g.facet for g in gaps}) * len({g.attribute for g in gaps})
    assert all(len(ax.lines) >= 1 for ax in fig.axes)
    plots.png_bytes(fig)


def test_gap_without_a_stored_interval_is_bootstrapped_from_the_per_sample_scores(boards):
    import copy

    e = copy.deepcopy(boards["fairness"][0])
    for r in e["results"]:
        r["groups"] = {k: v for k, v in r["groups"].items() if "ci95" not in k}
    gaps = [g for g in plots.entry_gaps([e], n_boot=200) if g.attribute == "sex"]
    assert gaps and all(g.robust_ci[0] <= g.robust <= g.robust_ci[1] for g in gaps)
    from robustbench_med.entries import headline_rows

    r = headline_rows(e)[0]
    sex = np.asarray(e["attributes"]["sex"])
    adv = np.asarray(r["per_sample"]["adv"])
    expect = abs(adv[sex == "F"].mean() - adv[sex == "M"].mean())
    assert any(g.robust == pytest.approx(expect) for g in gaps)


def test_score_histograms_show_clean_and_adversarial_per_panel(boards):
    fig = plots.score_histograms(boards["qava"], max_panels=4)
    panels = [ax for ax in fig.axes if ax.axison]
    assert 1 <= len(panels) <= 4
    assert all(len(ax.patches) == 2 for ax in panels)  # clean (step) and adversarial (filled)
    heights = [p.get_path().vertices[:, 1].max() for p in panels[0].patches]
    e_n = boards["qava"][0]["n"]
    assert max(heights) <= e_n
    assert layout_problems(fig) == []


# ---------------------------------------------------------------------------------------------------------------
# per-group sweep (store group table)


def test_group_sweep_one_panel_per_victim_defence_attack_and_a_shared_legend():
    rows = [{"cell_id": f"{v}{e}", "attribute": "sex", "group": g, "n": 10, "clean": 0.9, "robust": 0.5 - e - (g == "F") * 0.1,
             "victim": v, "defense": "identity.none", "attack": "pgd.linf", "metric": "accuracy", "eps": e}
            for v in ("a.tiny", "b.tiny") for e in (2 / 255, 8 / 255) for g in ("F", "M")]
    fig = plots.group_sweep(pd.DataFrame(rows), "sex")
    panels = [ax for ax in fig.axes if ax.axison]
    assert len(panels) == 2 and all(len(ax.lines) == 2 for ax in panels) and len(fig.legends) == 1
    assert layout_problems(fig) == []
    assert plots.group_sweep(pd.DataFrame(), "sex") is None


# ---------------------------------------------------------------------------------------------------------------
# example grids


def test_example_grid_rows_are_clean_adversarial_and_the_amplified_perturbation():
    rng = np.random.default_rng(0)
    clean = rng.random((3, 1, 16, 16))
    adv = np.clip(clean + rng.uniform(-4 / 255, 4 / 255, clean.shape), 0, 1)
    fig = plots.example_grid(clean, adv, titles=["a", "b", "c"])
    assert len(fig.axes) == 9
    first, _, delta_ax = fig.axes[0], fig.axes[3], fig.axes[6]
    assert np.allclose(first.images[0].get_array(), clean[0, 0])
    assert np.asarray(delta_ax.images[0].get_array()).max() == pytest.approx(1.0)  # default: largest change shows white
    assert "|δ| ×" in delta_ax.get_ylabel()
    assert layout_problems(fig) == []
    fixed = plots.example_grid(clean, adv, amplify=10.0)
    assert np.asarray(fixed.axes[6].images[0].get_array()).max() == pytest.approx(10 * np.abs(adv[0] - clean[0]).max())
    rgb = plots.example_grid(rng.random((2, 3, 8, 8)), rng.random((2, 3, 8, 8)))
    assert rgb.axes[0].images[0].get_array().shape == (8, 8, 3)
    for bad in (dict(clean=clean, adv=adv[:2]), dict(clean=clean[0], adv=adv[0]), dict(clean=clean, adv=adv, titles=["a"]),
                dict(clean=clean, adv=adv, amplify=0)):
        with pytest.raises(ConfigError):
            plots.example_grid(**bad)


def test_attack_examples_on_phantom_samples_with_a_random_victim():
    import torch

    x, adv, titles = plots.attack_examples("cnn.phantom", "fgsm.linf", n=2, weights=None, eps=8 / 255)
    assert x.shape == adv.shape == (2, 1, 64, 64) and len(titles) == 2
    assert float((adv - x).abs().max()) <= 8 / 255 + 1e-6 and float((adv - x).abs().max()) > 0
    assert torch.all((adv >= 0) & (adv <= 1))
    fig = plots.example_grid(x, adv, titles=titles)
    assert len(fig.axes) == 6 and layout_problems(fig) == []


def test_a_budget_where_only_a_noise_baseline_ran_is_no_point_of_the_robustness_curve():
    """The published volumes board has cls3d.phantom at 8/255 with only noise.uniform (robust = clean): plotting it
    would show a robust accuracy jumping back to the clean one. PGD ran at 1, 2 and 4/255."""
    from robustbench_med.entries import load_entries

    entries = [e for e in load_entries(ROOT / "volumes") if e["victim"] == "cls3d.phantom"]
    assert {e["threat"]["eps_display"] for e in entries} == {"1/255", "2/255", "4/255", "8/255"}
    (series,) = [s for s in plots.entry_series(entries) if s.facet[1].startswith("robust")]
    assert sorted(series.display.values()) == ["1/255", "2/255", "4/255"]
    assert all(y < series.clean for y, _, _ in series.points.values())


def test_histograms_leave_out_noise_baselines_and_one_task_gaps_stack_their_attributes():
    """cls3d.phantom's largest budget (8/255) holds only noise.uniform: its histogram panel shows PGD at 4/255; the
    gap figure of one task stacks its attributes in one column (it fits half the HTML page)."""
    from robustbench_med.entries import load_entries

    entries = [e for e in load_entries(ROOT / "volumes") if e["victim"] == "cls3d.phantom"]
    fig = plots.score_histograms(entries)
    (ax,) = [a for a in fig.axes if a.has_data()]
    assert "4/255" in ax.get_title() and "8/255" not in ax.get_title()
    gaps = plots.group_gaps(entries)
    columns = {round(a.get_position().x0, 3) for a in gaps.axes}
    assert len(gaps.axes) >= 2 and len(columns) == 1
    assert not any("8/255" in t.get_text() for a in gaps.axes for t in a.get_yticklabels())  # no robust gap under noise
    assert not layout_problems(gaps)


def test_a_run_that_saves_its_adversarial_inputs_gets_example_grids(tmp_path):
    """``save_adversarial: true``: each unit's clean inputs are stored beside the adversarial ones, and the store's
    report draws clean / adversarial / amplified perturbation for each victim (its strongest attack at the largest
    budget), every perturbation inside the budget."""
    from safetensors.torch import load_file

    from robustbench_med.grid import parse_grid
    from robustbench_med.leaderboard import write_leaderboard
    from robustbench_med.runner import run_grid

    grid = parse_grid({"name": "examples", "n_examples": 6, "batch_size": 6, "save_adversarial": True,
                       "victims": [{"name": "cnn.phantom", "weights": None}],
                       "attacks": [{"name": "fgsm.linf", "params": {"eps": ["2/255", "8/255"]}}, "noise.uniform"]})
    store = run_grid(grid, tmp_path / "run", progress=False)
    saved = sorted((tmp_path / "run" / "adversarial").glob("*/000000.safetensors"))
    assert saved and all({"x", "x_adv"} <= set(load_file(str(p))) for p in saved)
    for p in saved:
        batch = load_file(str(p))
        assert float((batch["x_adv"] - batch["x"]).abs().max()) <= 8 / 255 + 1e-6
    paths = write_leaderboard(store, tmp_path / "report")
    png = paths["examples_cnn.phantom"]
    fig = plots.example_grid(*(load_file(str(saved[0]))[k][:4] for k in ("x", "x_adv")))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and len(fig.axes) == 3 * 4 and not layout_problems(fig)


def test_a_damaged_saved_example_costs_its_picture_not_the_report(tmp_path, caplog):
    import pandas as pd

    from robustbench_med.leaderboard import write_example_grids

    (tmp_path / "adv" / "c1").mkdir(parents=True)
    (tmp_path / "adv" / "c1" / "000000.safetensors").write_bytes(b"not a safetensors file")
    df = pd.DataFrame([{"cell_id": "c1", "victim": "v", "defense": "identity.none", "attack": "pgd.linf", "knowledge": "white-box",
                        "norm": "Linf", "eps": 8 / 255, "eps_display": "8/255", "status": "done", "robust": 0.1}])
    with caplog.at_level("WARNING", logger="robustbench_med"):
        assert write_example_grids(df, tmp_path / "adv", tmp_path / "out") == {}
    assert "not readable" in caplog.text
