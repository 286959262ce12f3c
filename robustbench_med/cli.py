"""Command line: ``robustbench-med run|train|list|leaderboard|merge|verify|check|publish`` (also ``python -m
robustbench_med``).

Every sub-command takes ``-v/--verbose`` (debug logs) and ``-q/--quiet`` (no progress display and no info logs). Logs
and progress go to stderr (:func:`robustbench_med.log.configure_logging`); the command's own output (the summary
table at the end of ``run``, reports, written paths) goes to stdout.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from robustbench_med.errors import ConfigError, RobustBenchMedError
from robustbench_med.grid import default_grid_path, grid_path as _grid_arg  # noqa: F401  (also importable from here)
from robustbench_med.log import NORMAL, QUIET, VERBOSE, configure_logging

log = logging.getLogger(__name__)


def cmd_run(args: argparse.Namespace) -> int:
    from robustbench_med.distributed import process_context
    from robustbench_med.grid import load_grid
    from robustbench_med.leaderboard import summary_wide, to_text, write_leaderboard
    from robustbench_med.runner import run_grid

    grid = load_grid(_grid_arg(args.grid))
    out = Path(args.out or Path("runs") / grid.name)
    log.info("grid '%s' (%d victims × %d attack settings × %d defences, n=%d) → %s", grid.name, len(grid.victims),
             len(grid.attacks), len(grid.defenses), grid.n_examples, out)
    if args.executor == "ray":
        if args.shard is not None or args.fresh:
            raise ConfigError("--executor ray makes its own shards and resumes them; drop --shard / --fresh")
        from robustbench_med.executors import run_ray

        store = run_ray(grid, out, tasks=args.tasks, address=args.ray_address, cpus_per_task=args.cpus_per_task,
                        gpus_per_task=args.gpus_per_task, device=args.device, progress=not args.quiet)
    else:
        store = run_grid(grid, out, device=args.device, progress=not args.quiet, shard=args.shard, fresh=args.fresh)
    if not process_context().is_main:
        return 0  # rank 0 renders the leaderboard once every rank has finished
    if args.shard is not None and store.parent != out:  # a shard holds part of the grid: merge the shards first
        print(f"shard {args.shard} written to {store}; when every shard is done: robustbench-med merge {out} {out}")
        return 0
    paths = write_leaderboard(store, out)
    print(to_text(summary_wide(store)))
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from robustbench_med.api import list_victims
    from robustbench_med.registry import VICTIMS
    from robustbench_med.training import train_victim

    names = args.names or [n for n in list_victims() if VICTIMS.get(n).meta.get("recipe") is not None]
    for name in names:
        VICTIMS.get(name)
        path = train_victim(name, force=args.force, device=args.device, progress=not args.quiet)
        print(f"{name}: {path}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from robustbench_med.registry import ATTACKS, DATASETS, DEFENSES, VICTIMS

    tables = {"victims": VICTIMS, "attacks": ATTACKS, "defenses": DEFENSES, "datasets": DATASETS}
    for kind in [args.kind] if args.kind else list(tables):
        reg = tables[kind]
        print(f"{kind}:")
        for name in reg.list(args.pattern):
            meta = reg.get(name).meta
            card = meta.get("card")
            info = f"task={card.task}" if card is not None else meta.get("paper", meta.get("kind", ""))
            print(f"  {name:32s} {info}")
    return 0


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from robustbench_med.leaderboard import summary_wide, to_text, write_leaderboard

    store = Path(args.store)
    if store.is_dir():
        store = store / "results.sqlite"
    if not store.exists():
        raise RobustBenchMedError(f"no result store at {store}")
    paths = write_leaderboard(store, args.out or store.parent)
    print(to_text(summary_wide(store)))
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from robustbench_med.leaderboard import summary_wide, to_text, write_leaderboard
    from robustbench_med.merge import merge_stores

    report = merge_stores(args.out, args.stores, allow_gaps=args.allow_gaps)
    print(report.text())
    if not report.gaps:
        paths = write_leaderboard(report.out, report.out.parent)
        print(to_text(summary_wide(report.out)))
        print("written: " + ", ".join(str(p) for p in paths.values()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="robustbench-med", description="Adversarial robustness and fairness under attack for medical imaging models.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run a grid (default: the packaged default grid on the phantom)")
    r.add_argument("grid", nargs="?", help="grid YAML file or packaged grid name (default: default)")
    r.add_argument("--out", help="output directory (default: runs/<grid name>); re-running resumes")
    r.add_argument("--device", help="cpu, cuda, cuda:1 … (default: from the grid, else auto)")
    r.add_argument("--shard", metavar="K/N", help="run only the K-th of N parts of the grid (1 <= K <= N) into "
                   "OUT/shard-K-of-N/; combine the shards with `robustbench-med merge OUT OUT`")
    r.add_argument("--fresh", action="store_true", help="start over: move an existing (e.g. damaged) store aside "
                   "as results.sqlite.damaged-<time> instead of resuming it")
    r.add_argument("--executor", choices=("local", "ray"), default="local", help="local: this process (or each process "
                   "of an `accelerate launch`); ray: one Ray task per shard on a local instance or a cluster, merged here")
    r.add_argument("--tasks", type=int, help="ray: number of shards (default: 4 per worker slot)")
    r.add_argument("--ray-address", help="ray: a running cluster ('auto', 'ray://HOST:10001'); default: a local instance")
    r.add_argument("--cpus-per-task", type=int, default=1, help="ray: CPUs of each task (default 1)")
    r.add_argument("--gpus-per-task", type=float, default=0.0, help="ray: GPUs of each task (default 0; > 0 runs on cuda)")
    r.set_defaults(func=cmd_run)
    t = sub.add_parser("train", help="train registered victims on the phantom and cache their weights")
    t.add_argument("names", nargs="*", help="victim names (default: all trainable)")
    t.add_argument("--force", action="store_true", help="retrain even if weights are cached (fixes corrupted files)")
    t.add_argument("--device")
    t.set_defaults(func=cmd_train)
    ls = sub.add_parser("list", help="list registered victims, attacks, defences or datasets")
    ls.add_argument("kind", nargs="?", choices=["victims", "attacks", "defenses", "datasets"])
    ls.add_argument("--pattern", default="*", help="shell-style filter, e.g. 'pgd.*'")
    ls.set_defaults(func=cmd_list)
    lb = sub.add_parser("leaderboard", help="render a leaderboard from a result store")
    lb.add_argument("store", help="results.sqlite or a run directory")
    lb.add_argument("--out", help="output directory (default: the store's directory)")
    lb.set_defaults(func=cmd_leaderboard)
    mg = sub.add_parser("merge", help="combine result stores (the shards of a grid, or what is readable of a damaged "
                        "store) into one; refuses other grids, weights or code versions, conflicting duplicates and gaps")
    mg.add_argument("out", help="output directory (its results.sqlite is created or merged into) or .sqlite file")
    mg.add_argument("stores", nargs="+", help="results.sqlite files or run directories (a directory's shard-K-of-N/ "
                    "stores are all taken)")
    mg.add_argument("--allow-gaps", action="store_true", help="write the merged store even if planned results are "
                    "missing (resume it with `run GRID --out OUT` to compute them)")
    mg.set_defaults(func=cmd_merge)
    from robustbench_med.cli_publish import add_subcommands; add_subcommands(sub)
    add_verbosity_flags(p)
    for command in sub.choices.values():
        add_verbosity_flags(command, default=argparse.SUPPRESS)
    for command in sub.choices.values():  # user code, on every command (it executes code: only when asked)
        command.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                             help="import MODULE first (it may register victims, attacks, defences) and let grids name "
                                  "factories in it as 'MODULE.sub:factory'; repeatable. This executes MODULE's code.")
    return p


def add_verbosity_flags(parser: argparse.ArgumentParser, default: object = False) -> None:
    """``-v/--verbose`` and ``-q/--quiet`` (mutually exclusive) on ``parser``: the main parser (``default=False``) and
    every sub-command (``default=argparse.SUPPRESS``, so a flag given before the sub-command is kept)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="store_true", default=default,
                       help="also debug logs (what runs, step by step)")
    group.add_argument("-q", "--quiet", action="store_true", default=default,
                       help="no progress bars and no info logs (warnings, errors and the command's own output only)")


def verbosity(args: argparse.Namespace) -> int:
    """:data:`~robustbench_med.log.QUIET`, ``NORMAL`` or ``VERBOSE`` from the parsed flags."""
    return QUIET if args.quiet else VERBOSE if args.verbose else NORMAL


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose and args.quiet:  # one before the sub-command, the other after it
        parser.error("argument -q/--quiet: not allowed with argument -v/--verbose")
    configure_logging(verbosity(args))
    try:
        from robustbench_med.plugins import import_modules

        import_modules(args.imports)
        return args.func(args)
    except RobustBenchMedError as e:
        print(f"robustbench-med: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
