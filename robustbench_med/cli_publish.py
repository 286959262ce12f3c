"""Command line for trusted leaderboards: ``robustbench-med verify|check|publish``.

- ``verify ENTRY``: re-run a seeded sample of an entry's examples and compare with the stored numbers.
- ``check --baseline ENTRY|DIR``: evaluate a new or changed model like the baseline; exit 1 on a significant and
  material regression of robustness or of fairness under attack (:mod:`robustbench_med.gate`; usable in CI).
- ``publish [GRID ...]``: run grids, write their entries into ``<out>/<dataset>/<threat>/<victim>.json`` and render
  Markdown, LaTeX, CSV and HTML from all entries there. Without grid names it publishes every packaged study
  (:data:`PUBLISH_SETS`): the robustness leaderboard (zoo, default and LVLM grids) into ``<out>``, and the detector
  (HFC), fairness (APPLE) and F3 studies into ``<out>/detectors``, ``<out>/fairness`` and ``<out>/f3``, and the
  shift studies (missing modalities, site shift on the CT and vessel phantoms) into ``<out>/shift``, with each grid's
  study tables (``modalities.md``, ``sites.md``) in ``<out>/shift/<grid name>/``, and the volumetric study (3D
  victims through sliding-window inference) into ``<out>/volumes``, and the controlled 2D projector study (one tiny
  LLaVA, four projectors, 3 training × 3 attack seeds; ``seed_studies.md``) into ``<out>/projectors``, and QAVA's
  claims and F3 as released over training and attack seeds into ``<out>/qava`` and ``<out>/f3_study``.

When two grids of one publish produce the same victim × threat (the default grid's zoo models are also in the zoo
grid), the entry with more samples is published (the first grid on a tie) and the other is reported as skipped; an
entry that a grid not being published wrote earlier is replaced only by one with more samples.

Exit codes: 0 success, 1 not verified / regression, 2 bad input (any :class:`RobustBenchMedError`).
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from robustbench_med.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_GRIDS = ("zoo", "default", "lvlm")
PUBLISH_SETS: dict[str, tuple[str, ...]] = {"": DEFAULT_GRIDS, "detectors": ("hfc", "hfc_paper"), "fairness": ("fairness", "fairness_shortcut", "fairness_shortcut_control"), "f3": ("f3",),
                                             "shift": ("modalities", "sites", "sites_vessels"), "volumes": ("volumes",),
                                             "projectors": ("projector_study",), "qava": ("qava_study",),
                                             "f3_study": ("f3_study",)}


def cmd_verify(args: argparse.Namespace) -> int:
    """``robustbench-med verify ENTRY``: exit 0 when verified, 1 otherwise."""
    from robustbench_med.verify import verify_entry

    report = verify_entry(args.entry, n_samples=args.samples, seed=args.seed, tolerance=args.tolerance,
                          device=args.device, progress=not args.quiet, weights=args.weights)
    print(report.text(), end="")
    return 0 if report.ok else 1


def cmd_check(args: argparse.Namespace) -> int:
    """``robustbench-med check --baseline ...``: exit 0 without regression, 1 with one."""
    from robustbench_med.gate import check_regression, write_junit

    if args.weights is not None and not Path(args.weights).exists():
        raise ConfigError(f"--weights {args.weights}: no such file or folder")
    report = check_regression(args.baseline, victim=args.victim, weights=args.weights, margin=args.margin,
                              fairness_margin=args.fairness_margin, alpha=args.alpha, min_n=args.min_n,
                              device=args.device, progress=not args.quiet)
    print(report.text(), end="")
    if args.junit:
        print(f"JUnit XML: {write_junit(report, args.junit)}")
    return 0 if report.ok else 1


def _grid_paths(names: list[str] | tuple[str, ...]) -> list[Path]:
    """Grid files for ``publish``: the given names (YAML paths or packaged grid names), which must exist."""
    from robustbench_med.grid import grid_path as _grid_arg

    paths = [_grid_arg(n) for n in names]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise ConfigError(f"grid file(s) {missing} do not exist (give a YAML path or a packaged grid name)")
    return paths


def _remove_stale(out: Path, grid_name: str) -> None:
    """Delete the entries a previous publish of ``grid_name`` wrote (so a victim dropped from the grid disappears)."""
    from robustbench_med.entries import entry_files

    for path in entry_files(out):
        try:
            grid = json.loads(path.read_text()).get("grid")
        except (json.JSONDecodeError, AttributeError):
            raise ConfigError(f"{path}: not a valid entry; fix or remove it before publishing") from None
        if grid == grid_name:
            path.unlink()


def cmd_publish(args: argparse.Namespace) -> int:
    """``robustbench-med publish``: run grids, write entries, render all formats from every entry in --out."""
    out = Path(args.out)
    if args.grids:
        studies = [(out, tuple(args.grids))]
    else:
        studies = [(out / sub if sub else out, grids) for sub, grids in PUBLISH_SETS.items()]
    plans = [(root, _grid_paths(grids)) for root, grids in studies]  # every grid file checked before running any
    rendered = [_publish_study(root, paths, args) for root, paths in plans]
    if not any(rendered):
        raise ConfigError(f"no entries under {out} to render (expected <dataset>/<threat>/<victim>.json files)")
    return 0


def _publish_study(out: Path, grid_paths: list[Path], args: argparse.Namespace) -> bool:
    """Run ``grid_paths`` (unless --render-only), write their entries under ``out`` and render ``out``'s tables;
    returns whether ``out`` holds entries (and so was rendered)."""
    from robustbench_med.entries import build_entries, entry_path, load_entries, write_entry
    from robustbench_med.grid import load_grid
    from robustbench_med.render import write_rendered
    from robustbench_med.runner import run_grid

    if not args.render_only:
        grids = [load_grid(p) for p in grid_paths]  # validate every grid before running any
        chosen: dict[Path, tuple[dict, str]] = {}
        for grid in grids:
            log.info("publish: running grid %r (n=%d) into %s", grid.name, grid.n_examples, Path(args.runs) / grid.name)
            store = run_grid(grid, Path(args.runs) / grid.name, device=args.device, progress=not args.quiet)
            _write_study_tables(store, out / grid.name)
            for e in build_entries(store):
                path = entry_path(out, e)
                if path in chosen:
                    keep, drop = (chosen[path], (e, grid.name)) if chosen[path][0]["n"] >= e["n"] else ((e, grid.name), chosen[path])
                    print(f"  skipped {e['victim']} × {e['threat']['key']} of grid {drop[1]!r} (n={drop[0]['n']}): "
                          f"grid {keep[1]!r} has it with n={keep[0]['n']}")
                    chosen[path] = keep
                else:
                    chosen[path] = (e, grid.name)
        names = {g.name for g in grids}
        for g in names:
            _remove_stale(out, g)
        written = [write_entry(e, out) for path, (e, _g) in chosen.items() if not _kept_from_other_grid(path, e, names)]
        print(f"  {len(written)} entries written under {out}")
    if not (out.is_dir() and any(out.glob("*/*/*.json"))):
        return False
    paths = write_rendered(load_entries(out), out)
    _append_defense_comparisons(paths["markdown"], grid_paths, args)
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return True


def _write_study_tables(store: Path, folder: Path) -> None:
    """The study tables a grid's store supports (missing modalities, site shift, victims against their declared
    baselines, two arms across training seeds) into ``folder`` (created only when there is something to write):
    ``modalities.md`` / ``.csv``, ``sites.md`` / ``.csv``, ``baselines.md`` / ``.csv``, ``seed_studies.md`` / ``.csv``."""
    from robustbench_med import paired_metrics, seed_studies, site_metrics
    from robustbench_med.leaderboard import summary_wide
    from robustbench_med.modality_metrics import write_modality_tables
    from robustbench_med.paired_metrics import write_study_table
    from robustbench_med.store import Store

    with Store(store) as st:  # one open store: its frames are decoded once (Store.memo), each table computed once
        df = summary_wide(st, fairness_boot=0)
        has_modalities = "attack" in df and (df.attack == "modality.dropout").any()
        tables = {"sites": (site_metrics.site_table(st), site_metrics.to_markdown),
                  "baselines": (paired_metrics.baseline_table(st), paired_metrics.to_markdown),
                  "seed_studies": (seed_studies.seed_study_table(st), seed_studies.to_markdown)}
        if has_modalities or any(not table.empty for table, _ in tables.values()):
            folder.mkdir(parents=True, exist_ok=True)
            written = write_modality_tables(df, folder, st)
            for stem, (table, render) in tables.items():
                written.update(write_study_table(table, render, folder, stem))
            print("  study tables: " + ", ".join(str(p) for p in written.values()))


def _append_defense_comparisons(readme: Path, grid_paths: list[Path], args: argparse.Namespace) -> None:
    """Append the paired APPLE-vs-none comparisons of the grids' stores (``<runs>/<grid>``) to the rendered README
    (nothing for grids without APPLE cells; :func:`robustbench_med.fairness.append_defense_comparisons`)."""
    from robustbench_med.fairness import append_defense_comparisons
    from robustbench_med.grid import load_grid

    grids = [load_grid(p) for p in grid_paths]
    if not any(d.name == "apple.latent" for g in grids for d in g.defenses):
        return
    append_defense_comparisons(readme, [(f"grid `{g.name}` ({g.dataset}, {g.split}, n={g.n_examples})", Path(args.runs) / g.name)
                                        for g in grids])


def _kept_from_other_grid(path: Path, entry: dict, publishing: set[str]) -> bool:
    """Whether an existing entry at ``path``, written by a grid not being published now, has at least as many
    samples as ``entry`` (then it stays and ``entry`` is reported as skipped)."""
    if not path.exists():
        return False
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise ConfigError(f"{path}: not a valid entry; fix or remove it before publishing") from None
    if old.get("grid") in publishing or int(old.get("n", 0)) < entry["n"]:
        return False
    print(f"  kept {path} (grid {old.get('grid')!r}, n={old.get('n')}); skipped grid {entry['grid']!r}'s (n={entry['n']})")
    return True


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    """Add ``verify``, ``check`` and ``publish`` to the ``robustbench-med`` sub-command parser ``sub``."""
    from robustbench_med.gate import DEFAULT_ALPHA, DEFAULT_MARGIN, MIN_N
    from robustbench_med.verify import DEFAULT_VERIFY_TOLERANCE

    v = sub.add_parser("verify", help="re-run a seeded sample of a leaderboard entry's examples and check its numbers")
    v.add_argument("entry", help="an entry file leaderboards/<dataset>/<threat>/<victim>.json")
    v.add_argument("--samples", type=int, default=16, help="examples to re-run (default: 16)")
    v.add_argument("--seed", type=int, default=0, help="seed of the example sample (default: 0)")
    v.add_argument("--tolerance", type=float, default=DEFAULT_VERIFY_TOLERANCE,
                   help=f"allowed mean |re-run − stored| per sample, fraction (default: {DEFAULT_VERIFY_TOLERANCE})")
    v.add_argument("--weights", help="the entry's weights file (default: the entry's own, e.g. the project-trained cache); "
                   "its sha256 must match the entry's")
    v.add_argument("--device", help="cpu, cuda … (default: auto)")
    v.set_defaults(func=cmd_verify)
    c = sub.add_parser("check", help="evaluate a candidate like a baseline entry; exit 1 on a significant, material regression")
    c.add_argument("--baseline", required=True, help="an entry file or a leaderboard directory")
    c.add_argument("--victim", help="registered victim to evaluate (default: the baseline's own)")
    c.add_argument("--weights", help="weights for the victim: safetensors, weights-only torch, or a save_pretrained folder")
    c.add_argument("--margin", type=float, default=DEFAULT_MARGIN,
                   help=f"smallest drop of a score that counts as a regression, fraction (default: {DEFAULT_MARGIN})")
    c.add_argument("--fairness-margin", type=float, default=None,
                   help="the same for robust group gaps and worst-group scores (default: --margin)")
    c.add_argument("--alpha", type=float, default=DEFAULT_ALPHA,
                   help=f"family-wise significance level of the Holm-adjusted paired tests (default: {DEFAULT_ALPHA})")
    c.add_argument("--min-n", type=int, default=MIN_N, help=f"warn below this many examples (default: {MIN_N})")
    c.add_argument("--junit", metavar="FILE", help="also write the comparison as JUnit XML")
    c.add_argument("--device", help="cpu, cuda … (default: auto)")
    c.set_defaults(func=cmd_check)
    p = sub.add_parser("publish", help="run grids, write leaderboard entries and render Markdown/LaTeX/CSV/HTML")
    p.add_argument("grids", nargs="*", help="grid YAML files or packaged grid names (default: every packaged study: "
                   "zoo + default + lvlm into --out, hfc, fairness, f3, the shift and the volume studies into "
                   "--out/{detectors,fairness,f3,shift,volumes,projectors,qava,f3_study})")
    p.add_argument("--out", default="leaderboards", help="leaderboard directory (default: leaderboards/)")
    p.add_argument("--runs", default="runs", help="where the result stores go (default: runs/<grid>; re-running resumes)")
    p.add_argument("--device", help="cpu, cuda … (default: from the grid, else auto)")
    p.add_argument("--render-only", action="store_true", help="only re-render the tables from the entries in --out")
    p.set_defaults(func=cmd_publish)
