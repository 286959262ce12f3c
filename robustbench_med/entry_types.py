"""Typed leaderboard entries: one dataclass per JSON object of ``leaderboards/<dataset>/<threat>/<victim>.json``.

The dataclasses are the single description of an entry's layout. Each field carries its meaning (``description``)
and its JSON Schema keywords (``spec(...)``); :mod:`robustbench_med.entry_schema` turns them into the published JSON
Schema (``leaderboards/schema/entry.schema.json``, draft 2020-12) and adds the checks a schema cannot express (means
recomputed from the per-sample scores, worst case = per-sample minimum, reliability flags raised).

``Entry.from_dict(d).to_dict() == d`` for every valid entry: ``from_dict`` expects a dict that passed the schema
(use :func:`robustbench_med.entries.validate_entry` first); open-ended mappings (attack parameters, package versions,
per-group columns) are carried as plain dicts. Fields marked optional are left out of the JSON when they are None.
"""
from __future__ import annotations

import copy
from functools import lru_cache
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Union, get_args, get_origin, get_type_hints

from robustbench_med.grid import ATTACK_THROUGH
from robustbench_med.registry import NAME_RE
from robustbench_med.tasks import TASKS
from robustbench_med.threat import THREAT_NORMS

KIND = "robustbench_med/leaderboard-entry"
SCHEMA_VERSION = 1
STATUSES = ("done", "invalid", "skipped")
MEAN_TOL = 1e-9
NAME_PATTERN = NAME_RE.pattern
HEX64_PATTERN = r"^[0-9a-f]{64}$"
URL_PATTERN = r"^https?://[^\s\"'<>]+$"
NUMBER_STRING_PATTERN = r"^\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*$"
FRACTION = {"minimum": 0, "maximum": 1}

# Per-group columns (``groups``): which keys hold numbers (NUMERIC), which numbers are fractions in [0, 1] (FRACTION),
# and which may not be numbers written as strings (ROBUST). A key matches exactly one pattern of GROUP_RULES, so the
# schema checks each value once.
GROUP_NUMERIC = (r"(robust_gap_|worst_group_robust_|es_dice_)"  # gaps, worst-group and equity-scaled scores
                 r"|.*\[.*=|.*=.*\["  # per-group values: n[sex=F], robust_accuracy[sex=F]
                 r"|[^\[]*(_gap_|gap_change|_ratio_|ci95|es_dice|es_iou|_ece|_difference)")  # the name before any '['
GROUP_FRACTION = r"(?!.*(gap_change|ci95))(robust_gap_|worst_group_robust_|clean_|robust_)"  # not changes, intervals
GROUP_ROBUST = r"robust_"
_NOT_A_NUMBER_STRING = {"not": {"type": "string", "pattern": NUMBER_STRING_PATTERN}}


def _when(yes: tuple[str, ...], no: tuple[str, ...]) -> str:
    """A pattern matching keys that match every regex of ``yes`` and none of ``no`` (all anchored at the start)."""
    return "^" + "".join(f"(?=(?:{r}))" for r in yes) + "".join(f"(?!(?:{r}))" for r in no)


GROUP_RULES: dict[str, dict[str, Any]] = {
    _when((GROUP_NUMERIC, GROUP_FRACTION), ()): {"type": ["number", "null"], **FRACTION},
    _when((GROUP_NUMERIC,), (GROUP_FRACTION,)): {"type": ["number", "null"]},
    _when((GROUP_ROBUST, GROUP_FRACTION), (GROUP_NUMERIC,)): {"type": ["number", "string", "null"], **FRACTION,
                                                              **_NOT_A_NUMBER_STRING},
    _when((GROUP_ROBUST,), (GROUP_NUMERIC, GROUP_FRACTION)): {"type": ["number", "string", "null"],
                                                              **_NOT_A_NUMBER_STRING},
    _when((GROUP_FRACTION,), (GROUP_NUMERIC, GROUP_ROBUST)): {"type": ["number", "string", "null"], **FRACTION},
    _when((), (GROUP_NUMERIC, GROUP_FRACTION, GROUP_ROBUST)): {"type": ["number", "string", "null"]},  # labels
}


def spec(description: str, *, optional: bool = False, **schema: Any) -> Any:
    """A dataclass field with its meaning and JSON Schema keywords (``optional``: left out of the JSON when None)."""
    meta = {"description": description, "schema": schema, "optional": optional}
    return field(default=None, metadata=meta) if optional else field(metadata=meta)


class Record:
    """Base of the entry dataclasses: ``from_dict`` / ``to_dict`` by field type; ``extra`` holds keys not named."""

    OPEN: ClassVar[bool] = False  # True: keys other than the fields are allowed and kept in ``extra``

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any:
        """The typed object of a schema-valid dict: nested objects typed, other values shared with ``data`` (not
        copied: validating a large entry stays cheap; :meth:`to_dict` returns copies)."""
        hints = _hints(cls)
        known = {f.name for f in fields(cls) if f.name != "extra"}
        kwargs = {name: _load(hints[name], data[name]) for name in known if name in data}
        if cls.OPEN:
            kwargs["extra"] = {k: v for k, v in data.items() if k not in known}
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object: fields in declaration order (optional ones only when set), then ``extra``."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "extra" or (value is None and f.metadata.get("optional")):
                continue
            out[f.name] = _dump(value)
        out.update(copy.deepcopy(getattr(self, "extra", {})))
        return out


def required_keys(cls: type[Record]) -> tuple[str, ...]:
    """The keys every JSON object of ``cls`` has (in order)."""
    return tuple(f.name for f in fields(cls) if f.name != "extra" and not f.metadata.get("optional"))


def optional_keys(cls: type[Record]) -> tuple[str, ...]:
    """The named keys a JSON object of ``cls`` may leave out (in order)."""
    return tuple(f.name for f in fields(cls) if f.metadata.get("optional"))


def _load(tp: Any, value: Any) -> Any:
    """``value`` (JSON) as type ``tp``: dataclasses built, lists of dataclasses built, anything else copied."""
    if value is None:
        return None
    inner = unwrap_optional(tp)
    if _is_record(inner):
        return inner.from_dict(value)
    if get_origin(inner) is list:
        (item,) = get_args(inner)
        return [_load(item, v) for v in value] if _is_record(item) else value
    return value


def _is_record(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, Record)


@lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    """The resolved field types of a dataclass (cached: resolving string annotations is slow)."""
    return get_type_hints(cls)


def _dump(value: Any) -> Any:
    if isinstance(value, Record):
        return value.to_dict()
    if isinstance(value, list):
        return [_dump(v) for v in value]
    return copy.deepcopy(value)


def unwrap_optional(tp: Any) -> Any:
    """``X`` of ``X | None`` (``tp`` itself otherwise)."""
    args = get_args(tp)
    if get_origin(tp) in (Union, type(int | None)) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0] if len(rest) == 1 else Union[tuple(rest)]
    return tp


@dataclass(kw_only=True)
class Threat(Record):
    """The threat model: a norm ball of radius eps (or a corruption severity)."""

    norm: str = spec("Norm of the perturbation budget, or 'corruption' for a common-corruption severity.",
                     enum=list(THREAT_NORMS))
    eps: float = spec("Radius of the ball in the norm, on the [0, 1] image scale (a severity for corruptions).",
                      minimum=0)
    eps_display: str = spec("eps as written by people ('8/255', '0.5', a severity '3'); must equal eps.", minLength=1)
    key: str = spec("Directory name derived from norm and eps, e.g. 'Linf-8_255', 'L2-0.5', 'corruption-s3'.")


@dataclass(kw_only=True)
class PerSample(Record):
    """Per-example scores of one row (one per example of the entry, in sample order)."""

    clean: list[float] = spec("Score of each example on clean input (e.g. 1/0 correct, a Dice, a landmark hit).")
    adv: list[float] = spec("Score of each example under the attack (for a worst-case row: the minimum over its "
                            "components).")


@dataclass(kw_only=True)
class ResultRow(Record):
    """One defence × attack cell of the grid (or the per-sample worst case over several attacks)."""

    cell_id: str | None = spec("Id of the grid cell in the result store; null for a derived worst-case row.",
                               minLength=1)
    defense: str = spec("Registry name of the defence ('identity.none' for none).", pattern=NAME_PATTERN)
    defense_params: dict[str, Any] = spec("Parameters of the defence.")
    attack_through: str = spec("How the attack sees the defence: 'adaptive' (through it, BPDA/EOT where needed), "
                               "'transfer' (crafted on the undefended model) or 'detach'.", enum=list(ATTACK_THROUGH))
    attack: str = spec("Registry name of the attack, or 'worst-case(<k> attacks)'.", minLength=1)
    attack_params: dict[str, Any] = spec("Parameters of the attack (eps, steps, restarts, ...).")
    knowledge: str | None = spec("What the attacker knows: 'white-box', 'black-box', 'none' (noise baselines), "
                                 "'ensemble' (a worst case).")
    components: list[str] = spec("Worst-case rows only: the cell_ids of the finished rows it is the per-sample "
                                 "minimum of.", optional=True)
    status: str = spec("'done' (numbers present), 'invalid' (the attack broke its budget: no robust number) or "
                       "'skipped' (not run; reason says why).", enum=list(STATUSES))
    reason: str = spec("Why a row was skipped or is invalid; empty otherwise.")
    n: int = spec("Number of examples the row was evaluated on (0 when skipped).", minimum=0)
    clean: float | None = spec("Mean clean score: the mean of per_sample.clean (a fraction, not a percentage).",
                               **FRACTION)
    robust: float | None = spec("Mean score under attack: the mean of per_sample.adv (robust accuracy for "
                                "classifiers).", **FRACTION)
    robust_ci95: list[float] | None = spec("95% confidence interval [low, high] of robust; contains robust.",
                                           minItems=2, maxItems=2, items=FRACTION)
    attack_success_rate: float | None = spec("Among examples scored correct on clean input (score >= the entry's "
                                             "success_threshold), the fraction the attack makes incorrect; null when "
                                             "none is correct.", **FRACTION)
    mean_linf: float | None = spec("Mean L-infinity norm of the perturbations actually applied.", minimum=0)
    mean_l2: float | None = spec("Mean L2 norm of the perturbations actually applied.", minimum=0)
    attack_seconds: float | None = spec("Wall-clock seconds the attack took.", minimum=0)
    groups: dict[str, float | str | None] = spec(
        "Fairness / per-group columns: robust_gap_<attr> (best minus worst group), worst_group_robust_<attr>, "
        "es_dice_<attr> (equity-scaled Dice), <metric>[<attr>=<group>] (a group's mean), labels such as "
        "worst_group_<attr>.", patternProperties=GROUP_RULES)
    flags: list[str] = spec("Reliability flags this row raised (e.g. masked_gradients, randomized, "
                            "invalid_budget).", items={"minLength": 1})
    per_sample: PerSample | None = spec("Per-example scores the aggregates are recomputed from; null unless done.")
    compute: dict[str, Any] = spec("Non-default compute settings the row ran with (e.g. autocast), as the runner "
                                   "records them.", optional=True)
    flag_details: dict[str, float | str | None] = spec("Evidence behind the raised flags (numbers or text).",
                                                       optional=True)
    metrics: dict[str, float | str | None] = spec("Further summary metrics of the row the schema does not name.",
                                                  optional=True)
    notes: str = spec("Free text about the row.", optional=True)


@dataclass(kw_only=True)
class Reliability(Record):
    """Entry-level reliability flags (Croce & Hein, ICML 2020): true whenever any row carries the flag."""

    OPEN: ClassVar[bool] = True
    masked_gradients: bool = spec("Some row shows signs of gradient masking (e.g. black-box or noise beats the "
                                  "gradient attack).")
    black_box_beats_white_box: bool = spec("A black-box attack found more adversarial examples than a white-box one.")
    randomized: bool = spec("The defended model's outputs are random (attacks need EOT).")
    invalid_budget: bool = spec("An attack exceeded its perturbation budget (its row is 'invalid').")
    extra: dict[str, bool] = field(default_factory=dict, metadata={"description": "Any further flag a row raised."})


RELIABILITY_FLAGS = required_keys(Reliability)  # the four flags every entry states


@dataclass(kw_only=True)
class External(Record):
    """A stronger (e.g. adaptive) evaluation of the same model by someone else."""

    robust: float = spec("Robust score found by the external evaluation (a fraction).", **FRACTION)
    source: str = spec("Who evaluated (paper, person, group).", minLength=1)
    method: str = spec("Attack used (e.g. APGD-EOT).", minLength=1)
    adaptive: bool = spec("Whether the external attack was adapted to the defence.")
    notes: str = spec("Free text.", optional=True)
    date: str = spec("When the evaluation was made.", optional=True)
    link: str = spec("Where it is published (http(s) URL).", optional=True, pattern=URL_PATTERN)


@dataclass(kw_only=True)
class ManifestGrid(Record):
    """The grid specification that produced the entry, as the runner recorded it (keys sorted)."""

    OPEN: ClassVar[bool] = True
    name: str = spec("Grid name; equals the entry's grid.")
    dataset: str = spec("Dataset registry name.")
    split: str = spec("Dataset split.")
    n_examples: int = spec("Examples per cell the grid asked for.")
    batch_size: int = spec("Batch size of the run.")
    seed: int = spec("Seed of the grid.")
    victims: list[Any] = spec("Victims of the grid.")
    attacks: list[Any] = spec("Attacks of the grid.")
    defenses: list[Any] = spec("Defences of the grid.")
    extra: dict[str, Any] = field(default_factory=dict, metadata={"description": "Further grid settings."})

    def to_dict(self) -> dict[str, Any]:
        return dict(sorted(super().to_dict().items()))


@dataclass(kw_only=True)
class Manifest(Record):
    """How the results were produced: package versions, device, seed, hashes and the grid (keys after grid sorted)."""

    OPEN: ClassVar[bool] = True
    grid: ManifestGrid = spec("The grid specification.")
    config_hash: str = spec("Hash of the grid configuration.", minLength=1)
    data_hash: str = spec("Hash of the evaluated examples.", minLength=1)
    device: str = spec("Device type the run used (cpu, cuda, ...).", minLength=1)
    seed: int = spec("Seed of the run.")
    versions: dict[str, Any] = spec("Versions of the packages that ran (torch, robustbench_med, ...).")
    extra: dict[str, Any] = field(default_factory=dict, metadata={"description": "Further run facts (platform, "
                                                                  "python, threads, memory plan, ...)."})

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        return {"grid": out.pop("grid"), **dict(sorted(out.items()))}


@dataclass(kw_only=True)
class Run(Record):
    """One run (or resumption) that wrote results of the entry."""

    run_id: str = spec("Id of the run in the result store.", minLength=1)
    started: float = spec("Start time, seconds since the epoch.")
    finished: float | None = spec("End time, seconds since the epoch; null if it did not finish.")
    config_hash: str = spec("Hash of the grid configuration the run used.", minLength=1)


@dataclass(kw_only=True)
class Entry(Record):
    """One victim under one threat model on one dataset split: every defence × attack row, with per-sample scores."""

    schema: str = spec("Kind of document.", const=KIND)
    schema_version: int = spec("Version of this layout.", const=SCHEMA_VERSION)
    dataset: str = spec("Dataset registry name.", minLength=1)
    split: str = spec("Dataset split.", minLength=1)
    grid: str = spec("Name of the grid that produced the results.", minLength=1)
    victim: str = spec("Registry name of the evaluated model.", pattern=NAME_PATTERN)
    task: str = spec("Task of the victim; fixes the metric and the success threshold.", enum=list(TASKS))
    metric: str = spec("Name of the per-sample score (accuracy, dice, ...).", minLength=1)
    threat: Threat = spec("The threat model.")
    n: int = spec("Number of evaluated examples.", minimum=1)
    seeds: list[int] = spec("Seeds of the runs.", minItems=1)
    success_threshold: float = spec("A per-sample score at or above this counts as correct (for the attack "
                                    "success rate).", **FRACTION)
    weights_sha256: str | None = spec("sha256 of the victim's weights file; null for built-in weights.",
                                      pattern=HEX64_PATTERN)
    attributes: dict[str, list[str]] = spec("Sensitive attributes (sex, age group, ...): one label per example, "
                                            "in sample order.")
    results: list[ResultRow] = spec("One row per defence × attack (plus worst-case rows).", minItems=1)
    reliability: Reliability = spec("Reliability flags raised by any row.")
    external: External | None = spec("A stronger external evaluation, or null.")
    manifest: Manifest = spec("The run manifest.")
    runs: list[Run] = spec("The runs that wrote the results.", minItems=1)
    created: str = spec("When the entry was made (ISO 8601, UTC).", minLength=1)
    generator: str = spec("Software and version that wrote the entry.", minLength=1)
    display_name: str = spec("Name shown on the leaderboard.", optional=True)
    link: str = spec("Where the model is described (http(s) URL).", optional=True, pattern=URL_PATTERN)
    notes: str = spec("Free text about the entry.", optional=True)
