"""The YAML grid spec: expansion, and errors naming the file, field and valid choices."""
import pytest

from robustbench_med.errors import ConfigError, UnknownNameError
from robustbench_med.grid import load_grid, parse_grid
from robustbench_med.cli import default_grid_path

BASE = {"victims": ["cnn.phantom"], "attacks": [{"name": "pgd.linf", "params": {"eps": ["2/255", "8/255"], "steps": [5, 10]}}]}


def test_list_parameters_expand_to_cells():
    grid = parse_grid(BASE)
    assert len(grid.attacks) == 4
    assert {a.params["steps"] for a in grid.attacks} == {5, 10}
    assert grid.defenses[0].name == "identity.none"


def test_attack_entries_can_be_restricted():
    grid = parse_grid({**BASE, "attacks": [{"name": "square.linf", "victims": ["cnn.phantom"], "defenses": ["identity.none"]}]})
    spec = grid.attacks[0]
    assert spec.applies_to("cnn.phantom", "identity.none") and not spec.applies_to("cnn.phantom", "jpeg.bpda")
    with pytest.raises(UnknownNameError, match="victims"):
        parse_grid({**BASE, "attacks": [{"name": "square.linf", "victims": ["cnn.phantm"]}]})
    only = parse_grid({**BASE, "attacks": [{"name": "square.linf", "attack_through": ["transfer"]}]}).attacks[0]
    assert only.applies_to("cnn.phantom", "jpeg.bpda", "transfer") and not only.applies_to("cnn.phantom", "jpeg.bpda", "adaptive")
    with pytest.raises(ConfigError, match=r"attacks\[0\].attack_through"):
        parse_grid({**BASE, "attacks": [{"name": "square.linf", "attack_through": ["bpda"]}]})


def test_victims_can_be_restricted_to_some_defences():
    grid = parse_grid({**BASE, "victims": [{"name": "cnn.phantom", "defenses": ["identity.none"]}, "unet.phantom"]})
    assert grid.victims[0].pairs_with("identity.none") and not grid.victims[0].pairs_with("jpeg.bpda")
    assert grid.victims[1].pairs_with("jpeg.bpda")
    with pytest.raises(UnknownNameError, match=r"victims\[0\].defenses"):
        parse_grid({**BASE, "victims": [{"name": "cnn.phantom", "defenses": ["jpeg.bdpa"]}]})


@pytest.mark.parametrize("name", sorted(p.stem for p in default_grid_path().parent.glob("*.yaml")))
def test_packaged_grids_are_valid(name):
    from robustbench_med.grid import load_grid

    grid = load_grid(default_grid_path(name))
    assert grid.name == name and grid.victims and grid.attacks


def test_config_hash_is_stable_and_sensitive():
    assert parse_grid(BASE).config_hash() == parse_grid(BASE).config_hash()
    other = {**BASE, "seed": 1}
    assert parse_grid(other).config_hash() != parse_grid(BASE).config_hash()


@pytest.mark.parametrize("raw,err,match", [
    ({**BASE, "victim": ["x"]}, ConfigError, r"unknown key\(s\) \['victim'\].*valid keys"),
    ({**BASE, "victims": ["cnn.phantm"]}, UnknownNameError, r"victims\[0\]\.name.*Did you mean 'cnn.phantom'"),
    ({**BASE, "attacks": [{"name": "pgd.linf", "params": {"eps": -1}}]}, ConfigError, r"attacks \(pgd.linf\)\.params.*eps"),
    ({**BASE, "attacks": [{"name": "pgd.linf", "params": {"epz": 1}}]}, ConfigError, "epz"),
    ({**BASE, "attacks": [{"name": "pgd.linf", "extra": 1}]}, ConfigError, r"attacks\[0\].*unknown key"),
    ({**BASE, "n_examples": 0}, ConfigError, "n_examples"),
    ({**BASE, "defenses": [{"name": "jpeg.bpda", "attack_through": "sideways"}]}, ConfigError, "attack_through"),
    ({"attacks": BASE["attacks"]}, ConfigError, "victims"),
    ([1, 2], ConfigError, "mapping"),
])
def test_bad_grids_give_clear_errors(raw, err, match):
    with pytest.raises(err, match=match):
        parse_grid(raw, source="grid.yaml")


def test_bad_yaml_file_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("victims: [cnn.phantom\nattacks: {")
    with pytest.raises(ConfigError, match="broken.yaml.*not valid YAML"):
        load_grid(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_grid(tmp_path / "missing.yaml")


def test_packaged_default_grid_is_valid():
    grid = load_grid(default_grid_path())
    assert grid.name == "default" and len(grid.victims) >= 4


def test_packaged_grid_name_is_found_beside_a_folder_of_that_name(tmp_path, monkeypatch):
    from robustbench_med.cli import _grid_arg

    monkeypatch.chdir(tmp_path)
    (tmp_path / "default").mkdir()  # e.g. the output folder of an earlier `run default --out default`
    assert _grid_arg("default") == default_grid_path("default")
    (tmp_path / "mine.yaml").write_text("victims: [cnn.phantom]\n")
    assert _grid_arg("mine.yaml").resolve() == tmp_path / "mine.yaml"
