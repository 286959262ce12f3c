"""The YAML grid spec: victims × attacks (with parameter lists) × defences × dataset × n_examples × seed.

Example::

    name: default
    dataset: {name: phantom.ct, split: test}
    n_examples: 128
    unit_size: 32      # samples per unit: the batch every attack sees, and what seeds and shards are cut by
    batch_size: 64     # memory cap only (never changes a result)
    seed: 0
    victims: [cnn.phantom, {name: unet.phantom}]
    attacks:
      - noise.uniform
      - {name: pgd.linf, params: {eps: [2/255, 4/255, 8/255], steps: 10}}
      - {name: square.linf, params: {eps: 8/255}, defenses: [identity.none]}   # restrict an expensive attack
      - {name: square.linf, params: {eps: 8/255}, defenses: [jpeg.bpda], attack_through: [transfer]}
    defenses:
      - identity.none
      - {name: jpeg.bpda, params: {quality: 75}}            # attacked through BPDA
      - {name: gaussian.eot, params: {sigma: 0.05}, eot: 8}  # attacked with EOT over 8 draws

``attack_only_robust`` (default ``true``) is the AutoAttack / RobustBench protocol for classifiers (Croce & Hein, ICML
2020): an attack is only run on the samples that are still classified correctly — clean-misclassified samples count
as not robust with a zero perturbation, and in an eps sweep a sample broken at a smaller eps keeps that (valid)
adversarial example at every larger eps, so only the survivors are attacked again. It applies to untargeted attacks
on classification and binary victims (not to noise baselines, detectors, segmentors, landmark detectors or LVLMs,
whose metrics need every sample attacked). Set it to ``false`` to attack every sample at every eps.

``unit_size`` fixes how the samples are cut into units (the plan: who computes what, which samples an attack sees
together, the seed of batch-level random choices); it is part of the results' identity. ``batch_size`` is a memory
cap: an attack whose samples are independent (``Attack.sample_independent``, each sample drawing from its own
seeded stream) on a deterministic model may be split into calls of at most ``batch_size`` samples, which changes no
draw (floating-point results may differ in the last bits where the device's kernels depend on the batch size);
every other attack sees whole units. A grid that sets only ``batch_size`` (written before ``unit_size`` existed)
keeps its units of ``batch_size`` samples; one that sets neither gets units of 64, as before. On a GPU the memory
probe lowers the cap, never the unit, and the effective cap of every victim is recorded in the run's manifest.
``compute`` (mixed precision, channels_last, torch.compile; :mod:`robustbench_med.compute`) is off by default and
part of the identity when set.

A list-valued attack parameter expands into one cell per value. Unknown keys, unknown names and invalid parameters
raise :class:`ConfigError` naming the file, the field and the valid choices, before any work starts.
"""
from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from robustbench_med.compute import parse_compute
from robustbench_med.errors import ConfigError, RobustBenchMedError, UnknownNameError
from robustbench_med.registry import ATTACKS, DATASETS, DEFENSES, NAME_RE, VICTIMS

DEFAULT_UNIT_SIZE = 64
TOP_KEYS = {"name", "dataset", "n_examples", "unit_size", "batch_size", "seed", "device", "victims", "attacks", "defenses", "save_adversarial", "attack_only_robust", "description", "compute"}
VICTIM_KEYS = {"name", "factory", "wrap", "weights", "target_field", "params", "defenses"}
ATTACK_KEYS = {"name", "factory", "params", "victims", "defenses", "attack_through"}
DEFENSE_KEYS = {"name", "factory", "params", "attack_through", "eot"}
WRAP_KEYS = {"task", "input_size", "classes", "mean", "std", "output", "feature_layers", "target_field", "modality", "paper", "sdr_radius", "sliding_window"}
DATASET_KEYS = {"name", "split", "params"}
ATTACK_THROUGH = ("adaptive", "transfer", "detach")


@dataclass(frozen=True)
class VictimSpec:
    """One victim; ``defenses`` optionally restricts the defences it is paired with (default: all of the grid's)."""

    name: str
    weights: str | None = "auto"
    target_field: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    defenses: tuple[str, ...] = ()
    factory: str | None = None  # user code, 'package.module:factory' (see robustbench_med.plugins)
    wrap: dict[str, Any] = field(default_factory=dict)  # how to wrap a factory's plain nn.Module (robustbench_med.wrap)

    def pairs_with(self, defense: str) -> bool:
        return not self.defenses or defense in self.defenses


@dataclass(frozen=True)
class AttackSpec:
    """One attack setting; ``victims`` / ``defenses`` / ``attack_through`` optionally restrict the cells it runs in
    (e.g. an expensive attack only crafted on the undefended model and transferred: ``attack_through: [transfer]``)."""

    name: str
    params: dict[str, Any]
    victims: tuple[str, ...] = ()
    defenses: tuple[str, ...] = ()
    through: tuple[str, ...] = ()

    def applies_to(self, victim: str, defense: str, attack_through: str = "adaptive") -> bool:
        return ((not self.victims or victim in self.victims) and (not self.defenses or defense in self.defenses)
                and (not self.through or attack_through in self.through))

    @property
    def key(self) -> str:
        return f"{self.name}{canonical(self.params)}"


@dataclass(frozen=True)
class DefenseSpec:
    name: str
    params: dict[str, Any] = field(default_factory=dict)
    attack_through: str = "adaptive"
    eot: int | None = None

    @property
    def key(self) -> str:
        return f"{self.name}{canonical(self.params)}|{self.attack_through}|eot={self.eot}"


@dataclass(frozen=True)
class Grid:
    """A validated grid spec."""

    name: str
    dataset: str
    split: str
    dataset_params: dict[str, Any]
    n_examples: int
    batch_size: int  # memory cap per call (not part of the results' identity)
    seed: int
    device: str
    victims: tuple[VictimSpec, ...]
    attacks: tuple[AttackSpec, ...]
    defenses: tuple[DefenseSpec, ...]
    save_adversarial: bool = False
    attack_only_robust: bool = True
    unit_size: int = DEFAULT_UNIT_SIZE  # samples per unit (the plan; part of the results' identity)
    compute: dict[str, Any] = field(default_factory=dict)  # autocast / channels_last / compile (robustbench_med.compute)
    source: str = "<dict>"

    def config_hash(self) -> str:
        """Hash of everything that determines the results: not the device or the memory cap. The unit size is hashed
        under its historical key ``batch_size`` (units were batches before the two were separated), so grids
        written before keep their hash."""
        payload = {k: v for k, v in self.as_dict().items() if k not in ("source", "device", "unit_size")}
        payload["batch_size"] = self.unit_size
        # fields added after entries were published are hashed only when set, so older grids keep their hash
        payload["victims"] = [{k: v for k, v in vs.items() if not (k in ("factory", "wrap") and not v)} for vs in payload["victims"]]
        if not payload["compute"]:
            del payload["compute"]
        return hashlib.sha256(canonical(payload).encode()).hexdigest()[:16]

    def as_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str, separators=(",", ":"))


def default_grid_path(name: str = "default") -> Path:
    """The packaged grid ``name`` (``robustbench_med/grids/<name>.yaml``)."""
    from importlib import resources

    return Path(str(resources.files("robustbench_med") / "grids" / f"{name}.yaml"))


def grid_path(value: str | None) -> Path:
    """A grid given on the command line: a YAML path, or a packaged grid's name (``zoo``), or None (the default)."""
    if value is None:
        return default_grid_path()
    path = Path(value)
    if not path.is_file() and (default_grid_path(value)).exists():
        return default_grid_path(value)  # a packaged grid by name, e.g. `run zoo` (even beside a folder `zoo/`)
    return path


def load_grid(path: str | Path) -> Grid:
    """Read and validate a grid YAML file."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"grid file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return parse_grid(raw, source=str(path))


def parse_grid(raw: Any, source: str = "<dict>") -> Grid:
    """Validate a grid given as a dict (e.g. from YAML)."""
    where = _Where(source)
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a grid must be a mapping, got {type(raw).__name__}")
    where.keys(raw, TOP_KEYS, "top level")
    for key in ("victims", "attacks"):
        if not raw.get(key):
            raise ConfigError(f"{source}: field '{key}' is required and must be a non-empty list")
    ds_name, split, ds_params = _dataset(raw.get("dataset", "phantom.ct"), where)
    grid = Grid(
        name=str(raw.get("name", Path(source).stem)),
        dataset=ds_name,
        split=split,
        dataset_params=ds_params,
        n_examples=where.positive_int(raw.get("n_examples", 128), "n_examples"),
        batch_size=where.positive_int(raw.get("batch_size", raw.get("unit_size", DEFAULT_UNIT_SIZE)), "batch_size"),
        unit_size=where.positive_int(raw.get("unit_size", raw.get("batch_size", DEFAULT_UNIT_SIZE)), "unit_size"),
        seed=where.int_(raw.get("seed", 0), "seed"),
        device=str(raw.get("device", "auto")),
        victims=tuple(_victim(v, i, where) for i, v in enumerate(where.list_(raw["victims"], "victims"))),
        attacks=tuple(a for i, e in enumerate(where.list_(raw["attacks"], "attacks")) for a in _attacks(e, i, where)),
        defenses=tuple(_defense(d, i, where) for i, d in enumerate(where.list_(raw.get("defenses") or ["identity.none"], "defenses"))),
        save_adversarial=bool(raw.get("save_adversarial", False)),
        attack_only_robust=where.bool_(raw.get("attack_only_robust", True), "attack_only_robust"),
        compute=parse_compute(raw.get("compute"), f"{source}: field 'compute'"),
        source=source,
    )
    _instantiate_all(grid, where)
    return grid


class _Where:
    """Error messages that name the file and field."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, field_: str, msg: str) -> ConfigError:
        return ConfigError(f"{self.source}: field '{field_}': {msg}")

    def keys(self, d: dict[str, Any], allowed: set[str], field_: str) -> None:
        unknown = sorted(set(d) - allowed)
        if unknown:
            raise self.fail(field_, f"unknown key(s) {unknown}; valid keys: {sorted(allowed)}")

    def list_(self, value: Any, field_: str) -> list[Any]:
        if not isinstance(value, list):
            raise self.fail(field_, f"must be a list, got {type(value).__name__}")
        return value

    def int_(self, value: Any, field_: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(field_, f"must be an integer, got {value!r}")
        return value

    def bool_(self, value: Any, field_: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(field_, f"must be true or false, got {value!r}")
        return value

    def positive_int(self, value: Any, field_: str) -> int:
        v = self.int_(value, field_)
        if v < 1:
            raise self.fail(field_, f"must be >= 1, got {v}")
        return v

    def name(self, registry, value: Any, field_: str) -> str:
        if not isinstance(value, str):
            raise self.fail(field_, f"must be a name string, got {value!r}")
        if value not in registry:
            raise UnknownNameError(f"{self.source}: field '{field_}': {registry.unknown_message(value)}")
        return value

    def entry(self, value: Any, allowed: set[str], field_: str) -> dict[str, Any]:
        entry = {"name": value} if isinstance(value, str) else value
        if not isinstance(entry, dict):
            raise self.fail(field_, f"must be a name or a mapping, got {value!r}")
        self.keys(entry, allowed, field_)
        params = entry.get("params", {}) or {}
        if not isinstance(params, dict):
            raise self.fail(f"{field_}.params", f"must be a mapping, got {params!r}")
        return {**entry, "params": params}


def _dataset(value: Any, where: _Where) -> tuple[str, str, dict[str, Any]]:
    entry = where.entry(value, DATASET_KEYS, "dataset")
    return where.name(DATASETS, entry.get("name"), "dataset.name"), str(entry.get("split", "test")), entry["params"]


def _user_component(registry, entry: dict[str, Any], where: _Where, field_: str, **meta: Any) -> tuple[str, str | None]:
    """(registry name, factory reference) of a grid entry; a factory (``factory: pkg.mod:fn``, or a ``name`` that is
    one) is registered under ``name`` (or a name derived from it) — only if its module is trusted (plugins)."""
    from robustbench_med.plugins import derived_name, is_factory_ref
    from robustbench_med.wrap import is_builder

    name, ref = entry.get("name"), entry.get("factory")
    if ref is None and isinstance(name, str) and ":" in name and (is_factory_ref(name) or is_builder(name)):
        name, ref = derived_name(name), name
    if ref is None:
        return where.name(registry, name, f"{field_}.name"), None
    if not (is_factory_ref(ref) or (registry is VICTIMS and is_builder(ref))):
        raise where.fail(f"{field_}.factory", f"must be 'package.module:factory' (or for a victim 'timm:NAME', "
                         f"'monai:CLASS', 'hf:FOLDER'), got {ref!r}")
    name = name or derived_name(ref)
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise where.fail(f"{field_}.name", f"must be of the form 'family.tag' (lower case), got {name!r}")
    try:
        registry.add_user(name, ref, **meta)
    except RobustBenchMedError as e:
        raise where.fail(f"{field_}.factory", str(e)) from None
    return name, ref


def _victim(value: Any, i: int, where: _Where) -> VictimSpec:
    entry = where.entry(value, VICTIM_KEYS, f"victims[{i}]")
    wrap_args = entry.get("wrap") or {}
    if not isinstance(wrap_args, dict):
        raise where.fail(f"victims[{i}].wrap", f"must be a mapping, got {wrap_args!r}")
    where.keys(wrap_args, WRAP_KEYS, f"victims[{i}].wrap")
    name, ref = _user_component(VICTIMS, entry, where, f"victims[{i}]", **({"wrap": wrap_args} if wrap_args else {}))
    if wrap_args and ref is None:
        raise where.fail(f"victims[{i}].wrap", "only a victim given by a factory ('package.module:factory') is wrapped")
    only_d = tuple(where.name(DEFENSES, d, f"victims[{i}].defenses") for d in where.list_(entry.get("defenses", []), f"victims[{i}].defenses"))
    weights = entry.get("weights", "auto")
    if weights is not None and not isinstance(weights, str):
        raise where.fail(f"victims[{i}].weights", f"must be 'auto', null or a path, got {weights!r}")
    return VictimSpec(name, weights, entry.get("target_field"), entry["params"], only_d, ref, dict(wrap_args))


def _attacks(value: Any, i: int, where: _Where) -> list[AttackSpec]:
    entry = where.entry(value, ATTACK_KEYS, f"attacks[{i}]")
    name, _ = _user_component(ATTACKS, entry, where, f"attacks[{i}]")
    params = entry["params"]
    only_v = tuple(where.name(VICTIMS, v, f"attacks[{i}].victims") for v in where.list_(entry.get("victims", []), f"attacks[{i}].victims"))
    only_d = tuple(where.name(DEFENSES, d, f"attacks[{i}].defenses") for d in where.list_(entry.get("defenses", []), f"attacks[{i}].defenses"))
    only_t = tuple(where.list_(entry.get("attack_through", []), f"attacks[{i}].attack_through"))
    bad = [t for t in only_t if t not in ATTACK_THROUGH]
    if bad:
        raise where.fail(f"attacks[{i}].attack_through", f"must be a list of {ATTACK_THROUGH}, got {bad}")
    keys = sorted(params)
    choices = [params[k] if isinstance(params[k], list) else [params[k]] for k in keys]
    return [AttackSpec(name, dict(zip(keys, combo)), only_v, only_d, only_t) for combo in itertools.product(*choices)]


def _defense(value: Any, i: int, where: _Where) -> DefenseSpec:
    entry = where.entry(value, DEFENSE_KEYS, f"defenses[{i}]")
    name, _ = _user_component(DEFENSES, entry, where, f"defenses[{i}]")
    through = entry.get("attack_through", "adaptive")
    if through not in ATTACK_THROUGH:
        raise where.fail(f"defenses[{i}].attack_through", f"must be one of {ATTACK_THROUGH}, got {through!r}")
    eot = entry.get("eot")
    if eot is not None:
        where.positive_int(eot, f"defenses[{i}].eot")
    return DefenseSpec(name, entry["params"], through, eot)


def _instantiate_all(grid: Grid, where: _Where) -> None:
    """Build every attack and defence once so invalid parameters fail before any work."""
    from robustbench_med.api import create_attack, create_defense

    for i, spec in enumerate(grid.attacks):
        try:
            create_attack(spec.name, **spec.params)
        except TypeError as e:
            raise where.fail(f"attacks ({spec.name}).params", f"{e}") from None
        except RobustBenchMedError as e:
            raise where.fail(f"attacks ({spec.name}).params", str(e)) from None
    for spec in grid.defenses:
        try:
            create_defense(spec.name, **spec.params)
        except TypeError as e:
            raise where.fail(f"defenses ({spec.name}).params", f"{e}") from None
        except RobustBenchMedError as e:
            raise where.fail(f"defenses ({spec.name}).params", str(e)) from None
