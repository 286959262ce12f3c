"""Typed entries and the published JSON Schema: generated from the dataclasses, committed, valid for every published
entry, and (with the recomputation checks in code) rejecting malformed entries with an error that names the field."""
import copy
import json
import math
from pathlib import Path

import jsonschema
import pytest

from robustbench_med import entries
from robustbench_med.entry_schema import SCHEMA_FILE, SCHEMA_ID, entry_schema, main, schema_text, validate_entry
from robustbench_med.entry_types import GROUP_RULES, Entry, ResultRow
from robustbench_med.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = sorted(p for p in (ROOT / "leaderboards").rglob("*.json") if p.parent.name != "schema")
# done, skipped and worst-case rows; row 1: gaussian.eot × pgd.linf (no worst case over it), row 6 skipped,
# row 7: identity.none × pgd.linf, a component of the worst-case row 12
SAMPLE = ROOT / "leaderboards" / "phantom.ct" / "Linf-8_255" / "resnet18.phantom.json"


@pytest.fixture(scope="module")
def published_schema() -> dict:
    return json.loads((ROOT / SCHEMA_FILE).read_text())


@pytest.fixture
def sample() -> dict:
    return json.loads(SAMPLE.read_text())


def test_committed_schema_is_the_one_generated_from_the_dataclasses(published_schema):
    assert (ROOT / SCHEMA_FILE).read_text() == schema_text(), \
        "regenerate with: python -m robustbench_med.entry_schema leaderboards/schema/entry.schema.json"
    jsonschema.Draft202012Validator.check_schema(published_schema)
    assert published_schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert published_schema["$id"] == SCHEMA_ID


def _properties(schema: dict, path: str = ""):
    for name, prop in schema.get("properties", {}).items():
        yield f"{path}.{name}", prop
    for name, sub in schema.get("$defs", {}).items():
        yield from _properties(sub, name)


def test_every_field_is_described_and_required_keys_follow_the_dataclasses(published_schema):
    props = list(_properties(published_schema))
    assert len(props) > 60 and all(p.get("description", "").strip() for _, p in props), \
        [name for name, p in props if not p.get("description")]
    row = published_schema["$defs"]["ResultRow"]
    assert row["required"] == list(entries.ROW_REQUIRED) and set(row["properties"]) == set(entries.ROW_REQUIRED) | set(entries.ROW_OPTIONAL)
    assert published_schema["required"] == list(entries.TOP_REQUIRED)
    assert row["additionalProperties"] is False and published_schema["$defs"]["Manifest"]["additionalProperties"] == {}


def test_every_published_entry_validates_and_round_trips_exactly(published_schema):
    plain = jsonschema.Draft202012Validator(published_schema)  # what another tool sees: the committed file only
    one_per_dataset = set({p.parent.parent: p for p in PUBLISHED}.values())  # (all of them: ~4 s more)
    assert len(PUBLISHED) > 100 and len(one_per_dataset) > 8
    for path in PUBLISHED:
        text = path.read_text()
        data = json.loads(text)
        assert validate_entry(data, str(path)) is data
        if path in one_per_dataset:
            assert not list(plain.iter_errors(data)), path
        typed = Entry.from_dict(data)
        again = typed.to_dict()
        assert again == data and entries.dumps_entry(again) == text, path


def test_typed_entry_gives_attribute_access_and_copies_on_the_way_out(sample):
    typed = Entry.from_dict(sample)
    assert isinstance(typed.results[0], ResultRow) and typed.threat.key == "Linf-8_255" == sample["threat"]["key"]
    worst = typed.results[12]
    assert worst.attack.startswith("worst-case") and len(worst.components) == 5 and worst.compute is None
    assert worst.robust == pytest.approx(sum(worst.per_sample.adv) / typed.n)
    assert typed.reliability.randomized is True and typed.manifest.grid.name == typed.grid and typed.external is None
    out = typed.to_dict()
    out["results"][0]["per_sample"]["adv"][0] = 99.0
    assert typed.results[0].per_sample.adv[0] != 99.0, "to_dict returns a copy"
    assert "components" not in out["results"][0] and "display_name" not in out, "unset optional keys stay absent"


def _mutate(path: str, value):
    def apply(e):
        *parents, last = path.split(".")
        node = e
        for p in parents:
            node = node[int(p)] if p.isdigit() else node[p]
        key = int(last) if last.isdigit() else last
        if value is KeyError:
            del node[key]
        else:
            node[key] = value(node[key]) if callable(value) else value
    return apply


def _break_worst_case(e):
    """Raise one score of the worst-case row above its components' minimum, aggregates kept consistent."""
    row = e["results"][12]
    j = row["per_sample"]["adv"].index(0.0)
    row["per_sample"]["adv"][j] = 1.0
    row["robust"] = sum(row["per_sample"]["adv"]) / e["n"]
    row["robust_ci95"] = [0.0, 1.0]
    ok = [c >= 0.5 for c in row["per_sample"]["clean"]]
    row["attack_success_rate"] = sum(o and a < 0.5 for o, a in zip(ok, row["per_sample"]["adv"])) / sum(ok)


# (name, mutation, field named in the error, words of the error, does the committed schema alone reject it?)
MALFORMED = [
    ("missing field", _mutate("n", KeyError), "'n'", "is required", True),
    ("missing row field", _mutate("results.1.reason", KeyError), "results[1].reason", "is required", True),
    ("missing nested", _mutate("manifest.grid.victims", KeyError), "manifest.grid.victims", "is required", True),
    ("wrong type", _mutate("results.1.flags", "randomized"), "results[1].flags", "must be a list", True),
    ("null where required", _mutate("threat.eps", None), "threat.eps", "must be a number", True),
    ("integer as float", _mutate("n", 64.0), "'n'", "must be an integer", False),
    ("NaN", _mutate("results.1.mean_linf", math.nan), "results[1].mean_linf", "must be finite", False),
    ("infinity in a group", _mutate("results.1.groups.n[sex=F]", math.inf), "groups.n[sex=F]", "must be finite", False),
    ("number as string", _mutate("results.1.robust", str), "results[1].robust", "JSON numbers, not strings", True),
    ("group number as string", _mutate("results.1.groups.robust_accuracy[sex=F]", str),
     "results[1].groups.robust_accuracy[sex=F]", "must be a number", True),
    ("per-sample string", _mutate("results.1.per_sample.adv.3", str), "results[1].per_sample.adv[3]",
     "JSON numbers, not strings", True),
    ("percentage", _mutate("results.1.clean", 87.5), "results[1].clean", "not a percentage", True),
    ("group percentage", _mutate("results.1.groups.robust_accuracy[sex=F]", 50.0),
     "results[1].groups.robust_accuracy[sex=F]", "fraction", True),
    ("unknown status", _mutate("results.1.status", "finished"), "results[1].status", "must be one of", True),
    ("unknown key", _mutate("results.1.surprise", 1), "results[1]", "unknown key(s) ['surprise']", True),
    ("interval length", _mutate("results.1.robust_ci95", [0.1, 0.2, 0.3]), "results[1].robust_ci95", "2 item(s)", True),
    ("bad victim name", _mutate("victim", "<img src=x>"), "'victim'", "registry name", True),
    ("bad sha256", _mutate("weights_sha256", "abc"), "weights_sha256", "sha256", True),
    ("later version", _mutate("schema_version", 2), "schema_version", "reads version 1", True),
    ("external incomplete", _mutate("external", {"robust": 0.1, "source": "x", "method": "APGD"}),
     "external.adaptive", "is required", True),
    ("external link", _mutate("external", {"robust": 0.1, "source": "x", "method": "APGD", "adaptive": True,
                                           "link": "javascript:alert(1)"}), "external.link", "http(s) URL", True),
    ("per-sample length", _mutate("results.1.per_sample.adv", lambda v: v[:-1]), "results[1].per_sample.adv",
     "must have 64 items, got 63", False),
    ("attribute length", _mutate("attributes.sex", lambda v: v[:-1]), "attributes.sex", "must have 64 items", False),
    ("tampered mean", _mutate("results.1.robust", lambda v: v + 0.1 if v < 0.9 else v - 0.1), "results[1].robust",
     "does not match the mean of per_sample.adv", False),
    ("tampered clean mean", _mutate("results.1.clean", lambda v: v / 2), "results[1].clean", "does not match", False),
    ("interval misses mean", _mutate("results.1.robust_ci95", [0.99, 1.0]), "results[1].robust_ci95", "does not contain", False),
    ("worst case not the minimum", _break_worst_case, "results[12].per_sample.adv", "per-sample minimum", False),
    ("flag not raised", _mutate("results.1.flags", ["masked_gradients", "randomized"]), "reliability.masked_gradients",
     "must be true", False),
    ("skipped row with a number", _mutate("results.6.robust", 0.5), "results[6].robust", "must be null for a skipped row", False),
    ("threat key", _mutate("threat.key", "Linf-8/255"), "threat.key", "'Linf-8_255'", False),
    ("eps display", _mutate("threat.eps_display", "4/255"), "threat.eps_display", "does not match", False),
    ("manifest grid", _mutate("manifest.grid.name", "other"), "manifest.grid.name", "must be the entry's grid", False),
]


@pytest.mark.parametrize("mutate,field,words,structural", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_entries_fail_with_the_field_and_the_problem(sample, published_schema, mutate, field, words, structural):
    assert not list(jsonschema.Draft202012Validator(published_schema).iter_errors(sample))
    mutate(sample)
    with pytest.raises(ConfigError) as err:
        validate_entry(sample, source="lb.json")
    text = str(err.value)
    assert text.startswith("lb.json: field ") and field in text and words in text, text
    with pytest.raises(ConfigError, match=r"field"):
        entries.validate_entry(copy.deepcopy(sample))  # the public name, same checks
    # the committed schema alone catches the structural mistakes; the recomputation checks live in code
    assert jsonschema.Draft202012Validator(published_schema).is_valid(sample) is not structural


def test_each_group_key_meets_exactly_one_rule(sample):
    import re

    keys = {k for r in sample["results"] for k in r["groups"]} | {"clean_worst_group[sex]", "worst_group_sex", "x"}
    for key in keys:
        assert sum(bool(re.search(p, key)) for p in GROUP_RULES) == 1, key


def test_schema_command_prints_or_writes_the_schema(tmp_path, capsys):
    assert main([]) == 0 and capsys.readouterr().out == schema_text()
    assert main([str(tmp_path / "s" / "entry.schema.json")]) == 0
    assert json.loads((tmp_path / "s" / "entry.schema.json").read_text()) == entry_schema()
