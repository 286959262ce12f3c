"""Leaderboard entries: schema checked on write and load, verify (re-run a sample), check (regression for CI), publish.

One tiny grid (a linear toy victim on 32 phantom images, FGSM + a 2-eps PGD sweep, undefended and behind a randomised
defence attacked with EOT) is run once per module; everything else reuses its store.
"""
import copy
import json
import math

import pytest
import torch
from torch import nn

from robustbench_med.cli import main
from robustbench_med.entries import (
    RELIABILITY_FLAGS,
    build_entries,
    dumps_entry,
    entry_path,
    headline_rows,
    is_group_column,
    load_entries,
    load_entry,
    threat_key,
    validate_entry,
    write_entry,
)
from robustbench_med.errors import ConfigError
from robustbench_med.grid import parse_grid
from robustbench_med.registry import VICTIMS
from robustbench_med.runner import run_grid
from robustbench_med.testing import assert_no_regression
from robustbench_med.gate import check_regression, compare_entries
from robustbench_med.verify import verify_entry
from robustbench_med.victim import ModelVictim, VictimCard
from robustbench_med.weights import save_weights

TOY = "toy.publishlin"
CARD = VictimCard(name=TOY, task="binary", modality="ct", input_size=(1, 64, 64), classes=("absent", "present"))


class Linear64(nn.Module):
    """A linear scorer of 64×64 images (fast to attack; its weights decide how robust it is)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64 * 64, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.fc(z.flatten(1))


def _weights(path, scale: float, bias: float) -> str:
    net = Linear64()
    with torch.no_grad():
        net.fc.weight.copy_(torch.randn(1, 64 * 64, generator=torch.Generator().manual_seed(0)) * scale)
        net.fc.bias.fill_(bias)
    save_weights(ModelVictim(net, CARD), path)
    return str(path)


def grid_dict(weights: str, name: str = "toypub") -> dict:
    return {
        "name": name, "dataset": {"name": "phantom.ct", "split": "test", "params": {"n": 32}},
        "n_examples": 32, "batch_size": 32, "seed": 0,
        "victims": [{"name": TOY, "weights": weights, "target_field": "label"}],
        "attacks": [{"name": "fgsm.linf", "params": {"eps": "8/255"}},
                    {"name": "pgd.linf", "params": {"eps": ["2/255", "8/255"], "steps": 3}}],
        "defenses": ["identity.none", {"name": "gaussian.eot", "params": {"sigma": 0.05}, "eot": 2}],
    }


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The toy tensors are tiny: a second intra-op thread only adds synchronisation (costly on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def toy(tmp_path_factory, one_thread):
    """Registers the toy victim; weights A (robust: tiny w, large bias) and B (fragile: large w); one run of A."""
    VICTIMS.add(TOY, lambda: ModelVictim(Linear64(), CARD), card=CARD)
    root = tmp_path_factory.mktemp("entries")
    robust = _weights(root / "robust.safetensors", 1e-3, 5.0)
    fragile = _weights(root / "fragile.safetensors", 5e-2, 0.0)
    store = run_grid(parse_grid(grid_dict(robust)), root / "runs" / "toypub", progress=False)
    board = root / "leaderboards"
    paths = [write_entry(e, board) for e in build_entries(store)]
    yield {"root": root, "robust": robust, "fragile": fragile, "store": store, "board": board, "paths": paths}
    VICTIMS.remove(TOY)


@pytest.fixture
def entry(toy):
    """A fresh copy of the Linf-8/255 entry (it has a worst-case row over FGSM and PGD)."""
    return copy.deepcopy(load_entry(toy["board"] / "phantom.ct" / "Linf-8_255" / f"{TOY}.json"))


def test_entries_are_written_where_their_content_says_and_round_trip(toy):
    entries = load_entries(toy["board"])
    assert sorted(e["threat"]["key"] for e in entries) == ["Linf-2_255", "Linf-8_255"]
    for e, path in zip(sorted(entries, key=lambda e: e["threat"]["key"]), sorted(toy["paths"])):
        assert entry_path(toy["board"], e) == path
        assert json.loads(path.read_text()) == e and dumps_entry(e) == path.read_text()
        assert e["weights_sha256"] and len(e["weights_sha256"]) == 64
        assert e["manifest"]["data_hash"] and e["manifest"]["grid"]["name"] == "toypub" and e["seeds"] == [0]
        assert set(e["attributes"]) == {"sex", "age_group"} and all(len(v) == e["n"] == 32 for v in e["attributes"].values())
        assert all(e["reliability"][f] is (any(f in r["flags"] for r in e["results"])) for f in RELIABILITY_FLAGS)


def test_entry_numbers_are_numbers_and_recomputable(entry):
    assert entry["threat"] == {"norm": "Linf", "eps": 8 / 255, "eps_display": "8/255", "key": "Linf-8_255"}
    done = [r for r in entry["results"] if r["status"] == "done"]
    assert len(done) == 6, "FGSM, PGD and their worst case, undefended and behind the randomised defence"
    for r in done:
        assert all(isinstance(r[k], float) for k in ("clean", "robust", "attack_success_rate"))
        lo, hi = r["robust_ci95"]
        assert 0 <= lo <= r["robust"] <= hi <= 1
        assert math.isclose(r["robust"], sum(r["per_sample"]["adv"]) / entry["n"])
        assert "robust_gap_sex" in r["groups"] and isinstance(r["groups"]["worst_group_robust_sex"], float)
    worst = [r for r in done if r["attack"].startswith("worst-case")]
    assert worst and all(len(w["components"]) == 2 for w in worst)
    assert {r["defense"] for r in headline_rows(entry)} == {"identity.none", "gaussian.eot"}
    assert all(r["attack"].startswith("worst-case") for r in headline_rows(entry))
    randomized = [r for r in done if r["defense"] == "gaussian.eot"]
    assert all("randomized" in r["flags"] for r in randomized) and entry["reliability"]["randomized"] is True


def _set(path: str, value):
    def mutate(e):
        *parents, last = path.split(".")
        node = e
        for p in parents:
            node = node[int(p)] if p.isdigit() else node[p]
        if value is KeyError:
            del node[last]
        else:
            node[int(last) if last.isdigit() else last] = value(node[int(last) if last.isdigit() else last]) if callable(value) else value
    return mutate


def _headline_index(e) -> int:
    return next(i for i, r in enumerate(e["results"])
                if r["status"] == "done" and r["defense"] == "identity.none" and r["knowledge"] == "white-box")


BAD = [
    ("results.{i}.robust", lambda v: str(v), "results[{i}].robust", "must be a number"),
    ("results.{i}.robust", 62.5, "results[{i}].robust", "not a percentage"),
    ("results.{i}.robust", lambda v: min(1.0, v + 0.25), "results[{i}].robust", "does not match"),
    ("results.{i}.robust_ci95", [0.9, 1.0], "results[{i}].robust_ci95", "does not contain"),
    ("results.{i}.groups.robust_gap_sex", "0.1", "results[{i}].groups.robust_gap_sex", "must be a number"),
    ("results.{i}.flags", ["masked_gradients"], "reliability.masked_gradients", "must be true"),
    ("results.{i}.status", "finished", "results[{i}].status", "must be one of"),
    ("threat.eps_display", "4/255", "threat.eps_display", "does not match"),
    ("threat.eps", "8/255", "threat.eps", "must be a number"),
    ("threat.key", "Linf-8/255", "threat.key", "Linf-8_255"),
    ("n", 31, "attributes.age_group", "must have 31 items"),
    ("victim", "<img src=x onerror=alert(1)>", "victim", "registry name"),
    ("weights_sha256", "abc", "weights_sha256", "sha256"),
    ("manifest", KeyError, "manifest", "is required"),
    ("manifest.data_hash", KeyError, "manifest.data_hash", "is required"),
    ("link", "javascript:alert(1)", "link", "http(s) URL"),
    ("external", {"robust": 0.1, "source": "paper", "method": "APGD-EOT"}, "external.adaptive", "is required"),
    ("schema_version", 99, "schema_version", "reads version"),
    ("surprise", 1, "<top>", "unknown key"),
]


@pytest.mark.parametrize("path,value,field,message", BAD, ids=[f"{b[0]}={b[1] if not callable(b[1]) else 'f(v)'}" for b in BAD])
def test_invalid_entries_raise_an_error_naming_the_field(entry, tmp_path, path, value, field, message):
    i = _headline_index(entry)
    _set(path.format(i=i), value)(entry)
    with pytest.raises(ConfigError) as err:
        validate_entry(entry)
    text = str(err.value)
    assert field.format(i=i) in text and message in text, text
    with pytest.raises(ConfigError):  # write refuses it and leaves nothing behind
        write_entry(entry, tmp_path)
    assert not list(tmp_path.rglob("*.json"))


def test_load_rejects_nan_and_misplaced_files(entry, tmp_path):
    path = write_entry(entry, tmp_path)
    path.write_text(path.read_text().replace('"mean_linf": ', '"mean_linf": NaN, "x": ', 1))
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_entry(path)
    write_entry(entry, tmp_path)
    moved = tmp_path / entry["dataset"] / "Linf-2_255" / path.name
    moved.parent.mkdir(parents=True, exist_ok=True)
    path.rename(moved)
    with pytest.raises(ConfigError, match="belongs at"):
        load_entries(tmp_path)


def test_external_result_and_generic_group_columns_validate(entry):
    i = _headline_index(entry)
    entry["external"] = {"robust": 0.1, "source": "adaptive attack by a third party", "method": "APGD-EOT", "adaptive": True}
    entry["results"][i]["groups"].update({"robust_accuracy[sex=F]": 0.5, "clean_worst_group[sex]": "F",
                                          "gap_change_accuracy[sex]": -0.1, "n[sex=F]": 17.0, "es_dice_sex": 0.8})
    validate_entry(entry)
    entry["results"][i]["groups"]["robust_accuracy[sex=F]"] = 1.5
    with pytest.raises(ConfigError, match=r"robust_accuracy\[sex=F\].*fraction"):
        validate_entry(entry)
    assert all(is_group_column(c) for c in ("robust_gap_sex", "worst_group_robust_age_group", "es_dice_sex",
                                            "robust_dice_fg[sex=F]", "robust_gap_dice_fg[sex]"))
    assert not any(is_group_column(c) for c in ("robust", "clean", "attack_success_rate", "flags"))
    assert threat_key("L2", 0.5) == "L2-0.5" and threat_key("Linf", 4 / 255) == "Linf-4_255"


def test_summary_fairness_columns_are_carried_generically(toy, monkeypatch):
    import robustbench_med.leaderboard as lb

    original = lb.summary_wide

    def with_fairness(store):
        df = original(store)
        df["robust_accuracy[sex=F]"] = df["robust"]
        df["es_dice_sex"] = 0.5
        df["detector_auroc"] = 0.75
        return df

    monkeypatch.setattr(lb, "summary_wide", with_fairness)
    rows = [r for e in build_entries(toy["store"]) for r in e["results"] if r["status"] == "done" and r["cell_id"]]
    assert all(r["groups"]["robust_accuracy[sex=F]"] == r["robust"] and r["groups"]["es_dice_sex"] == 0.5 for r in rows)
    assert all(r["metrics"]["detector_auroc"] == 0.75 for r in rows)


def test_verify_reproduces_the_sample_and_catches_a_tampered_score(entry, toy, tmp_path, capsys):
    report = verify_entry(toy["board"] / "phantom.ct" / "Linf-8_255" / f"{TOY}.json", n_samples=6, seed=1)
    assert report.ok, report.text()
    assert len(report.samples) == 6 and len(report.comparisons) == sum(r["status"] == "done" for r in entry["results"])
    assert all(c.mean_abs_diff == 0 and c.clean_abs_diff == 0 for c in report.comparisons), report.text()
    # forge one stored per-sample score (and its aggregates, so the entry still validates): verify must notice
    i, j = _headline_index(entry), report.samples[0]
    row = next(r for r in entry["results"] if r["cell_id"] == entry["results"][i]["cell_id"])
    row["per_sample"]["adv"][j] = 1.0 - row["per_sample"]["adv"][j]
    for r in entry["results"]:
        if r["attack"].startswith("worst-case") and row["cell_id"] in r["components"]:
            comps = [x for x in entry["results"] if x["cell_id"] in r["components"]]
            r["per_sample"]["adv"] = [min(v) for v in zip(*(c["per_sample"]["adv"] for c in comps))]
    for r in entry["results"]:
        if r["status"] == "done":
            adv, clean = r["per_sample"]["adv"], r["per_sample"]["clean"]
            r["robust"] = sum(adv) / len(adv)
            ok = [c >= 0.5 for c in clean]
            r["attack_success_rate"] = sum(o and a < 0.5 for o, a in zip(ok, adv)) / sum(ok) if any(ok) else None
            r["robust_ci95"] = [0.0, 1.0]
    path = write_entry(entry, tmp_path)
    assert main(["verify", str(path), "--samples", "6", "--seed", "1", "--tolerance", "0", "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "MISMATCH" in out and "NOT VERIFIED" in out


def test_check_passes_for_the_same_model_and_fails_on_a_regression(toy, capsys):
    same = check_regression(toy["board"])
    assert same.ok and same.deltas and all(d.worse == 0 for d in same.deltas), same.text()
    with pytest.raises(AssertionError) as err:
        assert_no_regression(baseline=toy["board"], victim=TOY, weights=toy["fragile"], margin=0.05)
    regressed = [line for line in str(err.value).splitlines() if line.endswith("REGRESSION")]
    assert any(" robust accuracy " in line for line in regressed) and any("worst_group_accuracy[sex]" in line for line in regressed)
    assert all(" clean accuracy " not in line for line in regressed), "the clean outcomes are the same"
    assert main(["check", "--baseline", str(toy["paths"][1]), "--weights", toy["fragile"], "--quiet"]) == 1
    assert "REGRESSION" in capsys.readouterr().out
    assert main(["check", "--baseline", str(toy["board"]), "--weights", str(toy["root"] / "missing.safetensors")]) == 2


def test_compare_flags_fairness_regressions_from_per_sample_outcomes(entry):
    """The gate reads the per-sample scores, not the summary numbers: breaking every robust example of one sex
    widens the sex gap and lowers its worst group significantly; editing only the summary changes nothing."""
    n = entry["n"]
    wide = {k: list(v) for k, v in entry["attributes"].items()}
    entry = copy.deepcopy(entry)
    entry["n"] = 4 * n  # four copies of the 32 examples: enough samples for a paired test to see a real change
    entry["attributes"] = {k: v * 4 for k, v in wide.items()}
    for r in entry["results"]:
        if r["per_sample"] is not None:
            r["per_sample"] = {k: v * 4 for k, v in r["per_sample"].items()}
    new = copy.deepcopy(entry)
    head = next(r for r in headline_rows(new) if r["defense"] == "identity.none")
    head["groups"]["robust_gap_age_group"] += 0.5  # summary only: ignored
    assert compare_entries(entry, new).ok and not compare_entries(entry, new).regressions
    sex = entry["attributes"]["sex"]
    target = sex[0]
    head["per_sample"]["adv"] = [0.0 if s == target else a for a, s in zip(head["per_sample"]["adv"], sex)]
    report = compare_entries(entry, new, margin=0.5, fairness_margin=0.05)
    metric = entry["metric"]
    if sum(a for a, s in zip(headline_rows(entry)[0]["per_sample"]["adv"], sex) if s == target) == 0:
        pytest.skip("the toy model has no robust example of that sex to break")
    assert {d.metric for d in report.regressions} >= {f"worst_group_{metric}[sex]"}, report.text()
    assert all(d.metric.endswith("[sex]") or d.metric.endswith("[age_group]") for d in report.regressions), report.text()
    assert compare_entries(entry, new, margin=0.5, fairness_margin=0.9).ok


def test_publish_writes_entries_and_tables_in_one_command(toy, tmp_path):
    import yaml

    grid = tmp_path / "toypub.yaml"
    grid.write_text(yaml.safe_dump(grid_dict(toy["robust"])))
    out = tmp_path / "leaderboards"
    stale = out / "phantom.ct" / "L2-0.5" / f"{TOY}.json"
    stale.parent.mkdir(parents=True)
    stale.write_text(json.dumps({"grid": "toypub"}))  # left by an earlier publish of the same grid
    assert main(["publish", str(grid), "--out", str(out), "--runs", str(toy["root"] / "runs"), "--quiet"]) == 0
    assert not stale.exists()
    assert [e["threat"]["key"] for e in load_entries(out)] == ["Linf-2_255", "Linf-8_255"]
    for name in ("README.md", "leaderboard.tex", "leaderboard.csv", "index.html"):
        assert (out / name).stat().st_size > 0
    (out / "index.html").unlink()
    assert main(["publish", "--out", str(out), "--render-only"]) == 0 and (out / "index.html").exists()
    assert main(["publish", str(tmp_path / "nope.yaml"), "--out", str(out)]) == 2


def test_publish_keeps_the_entry_with_more_samples_when_grids_overlap(toy, tmp_path, capsys):
    """The default grid's zoo models are also in the zoo grid: one publish of both keeps each victim × threat from the
    grid with more samples, says which it skipped, and a later publish of the smaller grid alone keeps it too."""
    import yaml

    small, large = tmp_path / "small.yaml", tmp_path / "large.yaml"
    small.write_text(yaml.safe_dump({**grid_dict(toy["robust"], "small"), "n_examples": 16}))
    large.write_text(yaml.safe_dump(grid_dict(toy["robust"], "large")))
    out, runs = tmp_path / "board", str(tmp_path / "runs")
    assert main(["publish", str(small), str(large), "--out", str(out), "--runs", runs, "--quiet"]) == 0
    assert {(e["grid"], e["n"]) for e in load_entries(out)} == {("large", 32)}
    assert "skipped" in capsys.readouterr().out
    assert main(["publish", str(small), "--out", str(out), "--runs", runs, "--quiet"]) == 0
    assert {(e["grid"], e["n"]) for e in load_entries(out)} == {("large", 32)}
    assert "kept" in capsys.readouterr().out


def test_verify_reruns_an_entry_under_the_protocol_it_was_made_with(entry):
    from robustbench_med.verify import subgrid

    assert entry["manifest"]["grid"]["attack_only_robust"] is True and subgrid([entry]).attack_only_robust is True
    del entry["manifest"]["grid"]["attack_only_robust"]  # an entry made before the option: every sample was attacked
    assert subgrid([entry]).attack_only_robust is False


def test_verify_with_another_weights_file_reports_the_hash_mismatch(toy):
    report = verify_entry(toy["board"] / "phantom.ct" / "Linf-8_255" / f"{TOY}.json", n_samples=2, weights=toy["fragile"])
    assert not report.ok and any("weights differ" in p and "--weights" in p for p in report.problems)
    assert main(["verify", str(toy["board"] / "phantom.ct" / "Linf-8_255" / f"{TOY}.json"), "--samples", "2",
                 "--weights", toy["robust"], "--quiet"]) == 0


def test_summarize_is_tidy_and_round_trips_to_the_wide_view(toy):
    """``summarize`` gives one row per cell × metric × group; ``wide=True`` / ``summary_wide`` the wide view, which
    the tidy frame rebuilds (every column with a value)."""
    import pandas as pd

    from robustbench_med.leaderboard import summarize, summary_wide
    from robustbench_med.results import wide_from_tidy

    tidy, wide = summarize(toy["store"], fairness_boot=20), summary_wide(toy["store"], fairness_boot=20)
    assert not tidy.duplicated(["row", "metric", "group_attr", "group"]).any()
    assert {"robust_gap_accuracy", "robust", "attack_success_rate"} <= set(tidy.metric) and "robust_gap_sex" not in set(tidy.metric)
    pd.testing.assert_frame_equal(summarize(toy["store"], fairness_boot=20, wide=True), wide)
    back = wide_from_tidy(tidy)
    cols = [c for c in wide.columns if wide[c].notna().any()]
    pd.testing.assert_frame_equal(back[cols], wide[cols], check_dtype=False)
