"""The published JSON Schema of a leaderboard entry, and the entry validator (schema first, then recomputation).

The schema (JSON Schema draft 2020-12, ``$id`` :data:`SCHEMA_ID`) is generated from the dataclasses of
:mod:`robustbench_med.entry_types` by :func:`entry_schema` and committed at ``leaderboards/schema/entry.schema.json``
(a test keeps the file equal to the generated one). Other tools validate entries with it directly; write it anywhere
with ``python -m robustbench_med.entry_schema [PATH]``.

:func:`validate_entry` checks an entry in three steps, and every error names the field
(``<source>: field 'results[3].robust': must be a fraction in [0, 1] (not a percentage), got 62.5``):

1. the kind and version (a later version has its own schema), and that every number is finite (JSON has no NaN);
2. the structure with ``jsonschema`` (Berman, https://python-jsonschema.readthedocs.io): types, required and unknown
   keys, ranges, enumerations, registry-name / sha256 / URL patterns, per-group column types;
3. what a schema cannot express, recomputed in code: ``clean``, ``robust`` and ``attack_success_rate`` equal the
   means of the stored per-sample scores, the 95% interval contains ``robust``, a worst-case row is the per-sample
   minimum of the rows it names, reliability flags are raised whenever a row carries them (Croce & Hein, ICML 2020),
   the threat key and eps display agree with eps, the attribute lists and per-sample arrays have ``n`` items.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import jsonschema
import numpy as np
from jsonschema.exceptions import ValidationError, best_match

from robustbench_med.compute import parse_compute
from robustbench_med.entries import defense_key, is_worst_case, threat_key
from robustbench_med.results import worst_case_scores
from robustbench_med.entry_types import (
    HEX64_PATTERN, KIND, MEAN_TOL, NAME_PATTERN, SCHEMA_VERSION, URL_PATTERN, Entry, Record,
    ResultRow, Threat, unwrap_optional,
)
from robustbench_med.errors import ConfigError, RobustBenchMedError
from robustbench_med.threat import parse_eps

DRAFT = "https://json-schema.org/draft/2020-12/schema"
SCHEMA_ID = f"urn:robustbench-med:leaderboard-entry:{SCHEMA_VERSION}"
SCHEMA_FILE = Path("leaderboards") / "schema" / "entry.schema.json"  # relative to the repository root
_PRIMITIVES = {str: "string", int: "integer", float: "number", bool: "boolean", type(None): "null"}
_PATTERN_HINTS = {
    NAME_PATTERN: "a registry name 'family.tag' (lower case, digits, _ -)",
    HEX64_PATTERN: "a 64-digit lower-case hex sha256 or null",
    URL_PATTERN: "an http(s) URL",
}
_TYPE_NAMES = {"number": "a number", "integer": "an integer", "string": "a string", "object": "an object",
               "array": "a list", "boolean": "true or false", "null": "null"}


# ---------------------------------------------------------------------------------------------------------------
# the schema, generated from the dataclasses


def entry_schema() -> dict[str, Any]:
    """The JSON Schema of an entry: :class:`~robustbench_med.entry_types.Entry` at the root, the others in ``$defs``."""
    defs: dict[str, Any] = {}
    root = _object_schema(Entry, defs)
    head = {"$schema": DRAFT, "$id": SCHEMA_ID, "title": "robustbench_med leaderboard entry", "type": "object"}
    return {**head, **root, "$defs": dict(sorted(defs.items()))}


def schema_text() -> str:
    """The schema as committed: two-space indented JSON, one trailing newline."""
    return json.dumps(entry_schema(), indent=2, ensure_ascii=False) + "\n"


def _object_schema(cls: type[Record], defs: dict[str, Any]) -> dict[str, Any]:
    """Properties, required keys and (for open records) the type of further keys of one dataclass."""
    hints = get_type_hints(cls)
    props, required, extra = {}, [], False
    for f in dataclasses.fields(cls):
        if f.name == "extra":
            extra = _type_schema(get_args(hints["extra"])[1], defs)
            continue
        props[f.name] = _field_schema(hints[f.name], dict(f.metadata), defs)
        if not f.metadata.get("optional"):
            required.append(f.name)
    doc = (cls.__doc__ or "").strip().split("\n\n")[0]
    return {"description": " ".join(doc.split()), "properties": props, "required": required,
            "additionalProperties": extra if cls.OPEN else False}


def _field_schema(tp: Any, meta: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """A property: its description, the schema of its type, and the keywords the field adds."""
    out = {"description": meta["description"], **_type_schema(tp, defs)}
    keywords = dict(meta.get("schema", {}))
    if "items" in keywords:
        out["items"] = {**out.get("items", {}), **keywords.pop("items")}
    if "patternProperties" in keywords:
        out.pop("additionalProperties", None)
    return {**out, **keywords}


def _type_schema(tp: Any, defs: dict[str, Any]) -> dict[str, Any]:
    """JSON Schema of a Python type: primitives, ``X | None``, ``list[X]``, ``dict[str, X]``, dataclasses, Any."""
    if tp is Any:
        return {}
    inner = unwrap_optional(tp)
    nullable = inner is not tp
    if isinstance(inner, type) and dataclasses.is_dataclass(inner):
        if inner.__name__ not in defs:
            defs[inner.__name__] = {}
            defs[inner.__name__] = _object_schema(inner, defs)
        return {"type": ["object", "null"] if nullable else "object", "$ref": f"#/$defs/{inner.__name__}"}
    origin, args = get_origin(inner), get_args(inner)
    if origin is list:
        out = {"type": "array", "items": _type_schema(args[0], defs)}
    elif origin is dict:
        out = {"type": "object"}
        if args[1] is not Any:
            out["additionalProperties"] = _type_schema(args[1], defs)
    elif origin in (Union, type(int | None)):
        out = {"type": [_PRIMITIVES[a] for a in args]}
    else:
        out = {"type": _PRIMITIVES[inner]}
    if nullable:
        out["type"] = [*(out["type"] if isinstance(out["type"], list) else [out["type"]]), "null"]
    return out


# ---------------------------------------------------------------------------------------------------------------
# validation


class _Check:
    """Errors that name the field: :class:`ConfigError` ``<source>: field '<path>': <problem>``."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, field: str, msg: str) -> ConfigError:
        return ConfigError(f"{self.source}: field '{field or '<top>'}': {msg}")


def _kind(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if not isinstance(value, (dict, list)) else type(value).__name__


def _join(field: str, key: Any) -> str:
    return f"{field}[{key}]" if isinstance(key, int) else (f"{field}.{key}" if field else str(key))


def _path(parts: Any) -> str:
    field = ""
    for key in parts:
        field = _join(field, key)
    return field


def validate_entry(entry: Any, source: str = "<entry>") -> dict[str, Any]:
    """Check ``entry`` against the schema and recompute its aggregates; return it or raise :class:`ConfigError`."""
    c = _Check(source)
    _check_header(c, entry)
    _check_finite(c, entry, "")
    error = best_match(_validator().iter_errors(entry))
    if error is not None:
        raise c.fail(*_explain(error))
    typed = Entry.from_dict(entry)
    _check_threat(c, typed.threat)
    for name, values in typed.attributes.items():
        _length(c, values, typed.n, f"attributes.{name}")
    for i, row in enumerate(typed.results):
        _check_row(c, row, f"results[{i}]", typed.n, typed.success_threshold)
    _check_components(c, entry["results"])
    _check_reliability(c, entry["reliability"], typed.results)
    if typed.manifest.grid.name != typed.grid:
        raise c.fail("manifest.grid.name", f"must be the entry's grid {typed.grid!r}, got {typed.manifest.grid.name!r}")
    return entry


@lru_cache(maxsize=1)
def _validator() -> jsonschema.protocols.Validator:
    """A draft 2020-12 validator of :func:`entry_schema` whose integers are Python ints (1.0 is not an integer).

    It leaves out one rule of the published schema, the item type of the per-sample arrays: :func:`_check_done`
    checks those values one by one while it recomputes the means, and they are two thirds of an entry's values
    (``jsonschema`` spends about 15 µs on each: 3x the time of the whole validation).
    """
    base = jsonschema.Draft202012Validator
    strict = base.TYPE_CHECKER.redefine("integer", lambda _, v: isinstance(v, int) and not isinstance(v, bool))
    schema = entry_schema()
    base.check_schema(schema)
    for scores in schema["$defs"]["PerSample"]["properties"].values():
        del scores["items"]
    return jsonschema.validators.extend(base, type_checker=strict)(schema)


def _explain(error: ValidationError) -> tuple[str, str]:
    """The field path and a plain-words problem for one ``jsonschema`` error."""
    field, rule, value = _path(error.absolute_path), error.validator, error.validator_value
    inst, schema = error.instance, error.schema
    if rule == "required":
        missing = [k for k in value if k not in inst]
        return _join(field, missing[0]), "is required" + (f" (also missing: {missing[1:]})" if missing[1:] else "")
    if rule == "additionalProperties":
        known = sorted(schema.get("properties", {}))
        return field, f"unknown key(s) {sorted(set(inst) - set(known))}; valid keys: {known}"
    if rule == "type":
        expected = [value] if isinstance(value, str) else value
        numeric = isinstance(inst, str) and {"number", "integer"} & set(expected)
        hint = " (numbers must be JSON numbers, not strings)" if numeric else ""
        return field, f"must be {' or '.join(_TYPE_NAMES[t] for t in expected)}, got {_kind(inst)}{hint}"
    if rule in ("minimum", "maximum"):
        if schema.get("minimum") == 0 and schema.get("maximum") == 1:
            return field, f"must be a fraction in [0, 1] (not a percentage), got {inst!r}"
        return field, f"must be {'>=' if rule == 'minimum' else '<='} {value}, got {inst!r}"
    if rule in ("enum", "const"):
        return field, f"must be one of {value if rule == 'enum' else [value]}, got {inst!r}"
    if rule == "pattern":
        return field, f"must be {_PATTERN_HINTS.get(value, f'a string matching {value!r}')}, got {_kind(inst)}"
    if rule in ("minItems", "maxItems"):
        exact = schema.get("minItems") == schema.get("maxItems")
        bound = "" if exact else ("at least " if rule == "minItems" else "at most ")
        return field, f"must have {bound}{value} item(s), got {len(inst)}"
    if rule == "minLength":
        return field, f"must be a non-empty string, got {_kind(inst)}"
    if rule == "not":
        return field, f"must be a number, got {_kind(inst)} (numbers must be JSON numbers, not strings)"
    return field, error.message


def _check_header(c: _Check, entry: Any) -> None:
    """An object of this kind and version (another version is read by the robustbench_med that wrote it)."""
    if not isinstance(entry, dict):
        raise c.fail("", f"must be an object, got {_kind(entry)}")
    if entry.get("schema") == KIND and entry.get("schema_version") not in (SCHEMA_VERSION, None):
        raise c.fail("schema_version", f"this version of robustbench_med reads version {SCHEMA_VERSION}, "
                                       f"got {entry['schema_version']!r}")


def _check_finite(c: _Check, value: Any, field: str) -> None:
    """No NaN or infinity anywhere (JSON cannot hold them; a dict built in Python might)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise c.fail(field, f"must be finite, got {value!r}")
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, v in items:
        _check_finite(c, v, _join(field, key))


def _check_threat(c: _Check, threat: Threat) -> None:
    """The eps display string and the derived threat key must agree with norm and eps."""
    try:
        parsed = parse_eps(threat.eps_display)
    except RobustBenchMedError:
        raise c.fail("threat.eps_display", f"must be a number or 'a/b', got {threat.eps_display!r}") from None
    if not math.isclose(parsed, threat.eps, rel_tol=1e-3, abs_tol=1e-9):
        raise c.fail("threat.eps_display", f"{threat.eps_display!r} does not match threat.eps = {threat.eps!r}")
    if threat.key != threat_key(threat.norm, threat.eps):
        expected = threat_key(threat.norm, threat.eps)
        raise c.fail("threat.key", f"must be {expected!r} for this norm and eps, got {threat.key!r}")


def _length(c: _Check, values: list[Any], n: int, field: str) -> None:
    if len(values) != n:
        raise c.fail(field, f"must have {n} items, got {len(values)}")


def _check_row(c: _Check, row: ResultRow, f: str, n: int, threshold: float) -> None:
    """The per-status rules: numbers recomputed for 'done', none for 'invalid' / 'skipped'; canonical compute."""
    if row.compute is not None:
        try:
            canonical = parse_compute(row.compute, f"{f}.compute")
        except ConfigError as e:
            raise c.fail(f"{f}.compute", str(e)) from None
        if not canonical or canonical != row.compute:
            raise c.fail(f"{f}.compute", "must be the non-default settings only (as recorded by the runner), "
                                         f"got {row.compute!r}")
    if row.status == "done":
        _check_done(c, row, f, n, threshold)
    elif row.status == "invalid":
        for key in ("robust", "robust_ci95", "attack_success_rate", "per_sample"):
            if getattr(row, key) is not None:
                raise c.fail(f"{f}.{key}", "must be null: the attack broke its budget, so the row has no robust result")
        if "invalid_budget" not in row.flags:
            raise c.fail(f"{f}.flags", "an invalid row must carry the 'invalid_budget' flag")
    else:
        for key in ("clean", "robust", "robust_ci95", "attack_success_rate", "per_sample"):
            if getattr(row, key) is not None:
                raise c.fail(f"{f}.{key}", "must be null for a skipped row")
        if not row.reason:
            raise c.fail(f"{f}.reason", "a skipped row must say why it was skipped")


def _check_done(c: _Check, row: ResultRow, f: str, n: int, threshold: float) -> None:
    """A finished row: aggregates recomputed from its per-sample scores, interval containing the mean."""
    for key in ("clean", "robust", "robust_ci95", "per_sample"):
        if getattr(row, key) is None:
            raise c.fail(f"{f}.{key}", "is required for a finished ('done') row")
    if row.n != n:
        raise c.fail(f"{f}.n", f"must equal the entry's n = {n}, got {row.n}")
    clean, adv = (_scores(c, getattr(row.per_sample, key), n, f"{f}.per_sample.{key}") for key in ("clean", "adv"))
    _same(c, row.clean, float(clean.mean()), f"{f}.clean", "the mean of per_sample.clean")
    _same(c, row.robust, float(adv.mean()), f"{f}.robust", "the mean of per_sample.adv")
    ok = clean >= threshold
    if not ok.any():
        if row.attack_success_rate is not None:
            raise c.fail(f"{f}.attack_success_rate", "must be null: no sample is correct on clean input")
    elif row.attack_success_rate is None:
        raise c.fail(f"{f}.attack_success_rate", "is required: some samples are correct on clean input")
    else:
        asr = float(((adv < threshold) & ok).sum() / ok.sum())
        _same(c, row.attack_success_rate, asr, f"{f}.attack_success_rate", "the stored per-sample outcomes")
    lo, hi = row.robust_ci95
    if not lo - MEAN_TOL <= row.robust <= hi + MEAN_TOL:
        raise c.fail(f"{f}.robust_ci95", f"[{lo}, {hi}] does not contain robust = {row.robust}")


def _scores(c: _Check, values: list[Any], n: int, field: str) -> np.ndarray:
    """Per-sample scores: n numbers (finite: checked before) as an array."""
    _length(c, values, n, field)
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            hint = " (numbers must be JSON numbers, not strings)" if isinstance(v, str) else ""
            raise c.fail(f"{field}[{i}]", f"must be a number, got {_kind(v)}{hint}")
    return np.asarray(values, dtype=float)


def _same(c: _Check, stored: float, recomputed: float, field: str, what: str) -> None:
    if abs(stored - recomputed) > 1e-7:
        raise c.fail(field, f"{stored!r} does not match {what} ({recomputed!r})")


def _check_components(c: _Check, rows: list[dict[str, Any]]) -> None:
    """Unique cell ids; a worst-case row is the per-sample minimum of the finished rows it names."""
    ids = [r["cell_id"] for r in rows if r["cell_id"] is not None]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise c.fail("results", f"duplicate cell_id(s) {dup}")
    by_id = {r["cell_id"]: r for r in rows if r["cell_id"] is not None}
    for i, row in enumerate(rows):
        f = f"results[{i}]"
        if not is_worst_case(row):
            if "components" in row:
                raise c.fail(f"{f}.components", "only worst-case rows name components")
            continue
        comps = row.get("components")
        if comps is None:
            raise c.fail(f"{f}.components", "is required for a worst-case row")
        if len(comps) < 2 or row["status"] != "done":
            raise c.fail(f"{f}.components", "a worst-case row is a finished row over at least two attacks")
        for j, cid in enumerate(comps):
            other = by_id.get(cid)
            if other is None or other["status"] != "done" or defense_key(other) != defense_key(row):
                raise c.fail(f"{f}.components[{j}]", f"{cid!r} is not a finished row of the same defence in this entry")
        adv = worst_case_scores({cid: by_id[cid]["per_sample"]["adv"] for cid in comps})
        if not np.allclose(adv, row["per_sample"]["adv"], atol=1e-12, rtol=0):
            raise c.fail(f"{f}.per_sample.adv", "is not the per-sample minimum over the component rows")


def _check_reliability(c: _Check, rel: dict[str, bool], rows: list[ResultRow]) -> None:
    """Entry-level flags are true whenever any row carries the flag."""
    for i, row in enumerate(rows):
        for flag in row.flags:
            if not rel.get(flag, False):
                raise c.fail(f"reliability.{flag}", f"must be true: results[{i}] carries the flag {flag!r}")


def main(argv: list[str] | None = None) -> int:
    """``python -m robustbench_med.entry_schema [PATH]``: print the schema, or write it to PATH."""
    args = sys.argv[1:] if argv is None else argv
    if args:
        Path(args[0]).parent.mkdir(parents=True, exist_ok=True)
        Path(args[0]).write_text(schema_text(), encoding="utf-8")
    else:
        sys.stdout.write(schema_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
