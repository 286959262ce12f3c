"""Command line for trusted leaderboards: ``robustbench-med verify|check|publish``.

- ``verify ENTRY``: re-run a seeded sample of an entry's examples and compare with the stored numbers.
- ``check --baseline ENTRY|DIR``: evaluate a new or changed model like the baseline; exit 1 on a regression of
  robustness or of fairness under attack (usable in a model repository's CI).
- ``publish [GRID ...]``: run the default and zoo grids (or the given ones), write their entries into
  ``leaderboards/<dataset>/<threat>/<victim>.json`` and render Markdown, LaTeX, CSV and HTML from all entries there.

Exit codes: 0 success, 1 not verified / regression, 2 bad input (any :class:`RobustBenchMedError`).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from robustbench_med.errors import ConfigError

DEFAULT_GRIDS = ("default", "zoo")


def cmd_verify(args: argparse.Namespace) -> int:
    """``robustbench-med verify ENTRY``: exit 0 when verified, 1 otherwise."""
    from robustbench_med.verify import verify_entry

    report = verify_entry(args.entry, n_samples=args.samples, seed=args.seed, tolerance=args.tolerance,
                          device=args.device, progress=not args.quiet)
    print(report.text(), end="")
    return 0 if report.ok else 1


def cmd_check(args: argparse.Namespace) -> int:
    """``robustbench-med check --baseline ...``: exit 0 without regression, 1 with one."""
    from robustbench_med.verify import check_regression

    if args.weights is not None and not Path(args.weights).is_file():
        raise ConfigError(f"--weights {args.weights}: no such file")
    report = check_regression(args.baseline, victim=args.victim, weights=args.weights, tolerance=args.tolerance,
                              fairness_tolerance=args.fairness_tolerance, device=args.device, progress=not args.quiet)
    print(report.text(), end="")
    return 0 if report.ok else 1


def _grid_paths(names: list[str]) -> list[Path]:
    """Grid files for ``publish``: the given names / paths, or the packaged default and zoo grids that exist."""
    from robustbench_med.cli import _grid_arg, default_grid_path

    if names:
        paths = [_grid_arg(n) for n in names]
        missing = [str(p) for p in paths if not p.exists()]
        if missing:
            raise ConfigError(f"grid file(s) {missing} do not exist (give a YAML path or a packaged grid name)")
        return paths
    paths = []
    for name in DEFAULT_GRIDS:
        path = default_grid_path(name)
        if path.exists():
            paths.append(path)
        else:
            print(f"robustbench-med publish: no packaged grid {name!r}; skipping it")
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
    from robustbench_med.entries import build_entries, entry_path, load_entries, write_entry
    from robustbench_med.grid import load_grid
    from robustbench_med.render import write_rendered
    from robustbench_med.runner import run_grid

    out = Path(args.out)
    if not args.render_only:
        grids = [load_grid(p) for p in _grid_paths(args.grids)]  # validate every grid before running any
        written: dict[Path, str] = {}
        for grid in grids:
            print(f"robustbench-med publish: running grid {grid.name!r} (n={grid.n_examples}) into "
                  f"{Path(args.runs) / grid.name}", flush=True)
            store = run_grid(grid, Path(args.runs) / grid.name, device=args.device, progress=not args.quiet)
            entries = build_entries(store)
            for e in entries:
                path = entry_path(out, e)
                if path in written:
                    raise ConfigError(f"{e['victim']} × {e['threat']['key']} is produced by grids {written[path]!r} and {grid.name!r}")
                written[path] = grid.name
            _remove_stale(out, grid.name)
            for e in entries:
                write_entry(e, out)
            print(f"  {len(entries)} entries written under {out}")
    paths = write_rendered(load_entries(out), out)
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return 0


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    """Add ``verify``, ``check`` and ``publish`` to the ``robustbench-med`` sub-command parser ``sub``."""
    from robustbench_med.verify import DEFAULT_CHECK_TOLERANCE, DEFAULT_VERIFY_TOLERANCE

    v = sub.add_parser("verify", help="re-run a seeded sample of a leaderboard entry's examples and check its numbers")
    v.add_argument("entry", help="an entry file leaderboards/<dataset>/<threat>/<victim>.json")
    v.add_argument("--samples", type=int, default=16, help="examples to re-run (default: 16)")
    v.add_argument("--seed", type=int, default=0, help="seed of the example sample (default: 0)")
    v.add_argument("--tolerance", type=float, default=DEFAULT_VERIFY_TOLERANCE,
                   help=f"allowed mean |re-run − stored| per sample, fraction (default: {DEFAULT_VERIFY_TOLERANCE})")
    v.add_argument("--device", help="cpu, cuda … (default: auto)")
    v.add_argument("--quiet", action="store_true", help="no progress bars")
    v.set_defaults(func=cmd_verify)
    c = sub.add_parser("check", help="evaluate a new or changed model like a baseline entry; exit 1 on a regression")
    c.add_argument("--baseline", required=True, help="an entry file or a leaderboard directory")
    c.add_argument("--victim", help="registered victim to evaluate (default: the baseline's own)")
    c.add_argument("--weights", help="weights file for the victim (safetensors or weights-only torch)")
    c.add_argument("--tolerance", type=float, default=DEFAULT_CHECK_TOLERANCE,
                   help=f"allowed drop of the robust metric, fraction (default: {DEFAULT_CHECK_TOLERANCE})")
    c.add_argument("--fairness-tolerance", type=float, default=None,
                   help="allowed drop of a worst-group robust metric / rise of a robust gap (default: --tolerance)")
    c.add_argument("--device", help="cpu, cuda … (default: auto)")
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    c.set_defaults(func=cmd_check)
    p = sub.add_parser("publish", help="run grids, write leaderboard entries and render Markdown/LaTeX/CSV/HTML")
    p.add_argument("grids", nargs="*", help="grid YAML files or packaged grid names (default: default and zoo)")
    p.add_argument("--out", default="leaderboards", help="leaderboard directory (default: leaderboards/)")
    p.add_argument("--runs", default="runs", help="where the result stores go (default: runs/<grid>; re-running resumes)")
    p.add_argument("--device", help="cpu, cuda … (default: from the grid, else auto)")
    p.add_argument("--render-only", action="store_true", help="only re-render the tables from the entries in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_publish)
