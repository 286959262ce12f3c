"""The grid runner: plans cells, computes clean results once per victim × defence, attacks in batches, checks every
adversarial batch against its threat model, and stores per-sample rows so an interrupted run resumes exactly.

A *cell* is (victim, defence, attack with one parameter set, dataset split, n_examples, seed). Cells of one attack
that differ only in eps form a group. For classifiers under the grid's ``attack_only_robust`` protocol (AutoAttack's:
Croce & Hein, ICML 2020) a group runs as a *cascade*: ascending eps, each attack only on the samples still robust
(clean-misclassified samples keep a zero perturbation; a sample broken at a smaller eps keeps that valid example).
Otherwise the cells of a group are batched together when the attack takes per-sample eps (an eps sweep costs one
pass). A *unit* is a fixed run of samples for one group of cells (the grid's ``unit_size``, divided by the number of
cells for an eps batch); its rows are written in one transaction.

Results do not depend on how the work is split: units follow from the grid (never from the memory cap, the device
or the number of processes); an attack's batch-level random choices are seeded by (grid seed, victim × defence,
cell, first sample of the unit) and every sample's own stream by (…, cell, sample index), so a unit's call can be
split to fit memory (``Attack.sample_independent`` attacks on deterministic models only) without changing a draw.

A run has two phases. First the preparation: rank 0 trains missing weights; then, for every victim × defence not
finished yet, one rank (the pairs are dealt between the ranks) fits the defence (``Defense.prepare``), runs the
reliability checks and writes the clean rows, and the fitted defences reach every process in one collective
(:meth:`Defense.prepared_state`), so each defence is fitted and each clean pass computed once per run, whatever the
number of processes (the manifest's ``work`` lists both per process). Then every process computes its own units,
with no barrier between victims.

Who computes a unit follows from the plan (:mod:`robustbench_med.distributed`: a stable hash of the group's cells
plus the unit's index), never from the order of execution, and the plan is recorded in the store. At the end of
every run each process checks that its own units are all in the store and, after the final barrier, rank 0 checks
every planned (cell, sample) of the run (of its shard) and raises :class:`IncompleteRunError` if one is missing.
A run holds the store's lock (:class:`robustbench_med.store.run_lock`): a second run on the same store exits at
once naming the holder. ``n_examples`` larger than the dataset split is an error (nothing is clamped).
"""
from __future__ import annotations

import hashlib
import json
import logging
import platform
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import torch

from robustbench_med.api import create_attack, create_dataset, create_defense, create_victim
from robustbench_med.attack import Attack, check_targets, derive_seed, seeded
from robustbench_med.batching import adaptive_batch_size, is_oom
from robustbench_med.compute import effective as effective_compute
from robustbench_med.compute import precision
from robustbench_med.compute import prepare_victim as prepare_for_compute
from robustbench_med.defense import DetectorVictim, PurifiedVictim
from robustbench_med.distributed import ProcessContext, parse_shard, process_context, unit_position
from robustbench_med.errors import ConfigError, RobustBenchMedError, TaskNotSupportedError
from robustbench_med.grid import AttackSpec, DefenseSpec, Grid, VictimSpec, canonical, load_grid
from robustbench_med.log import GridProgress
from robustbench_med.registry import DEFENSES, VICTIMS
from robustbench_med.store import Store, StoreError, run_lock
from robustbench_med.tasks import get_task
from robustbench_med.tasks import predict as task_predict
from robustbench_med.threat import check_budget
from robustbench_med.victim import Victim

log = logging.getLogger(__name__)
MASKED_GRADIENT_FRACTION = 0.5
DEFAULT_EOT = 8
T = TypeVar("T")


class IncompleteRunError(RobustBenchMedError):
    """A run ended with planned (cell, sample) rows missing from its store (never silently)."""


@dataclass
class PairRun:
    """What every unit of one victim × defence works on: the model the attack sees (``view``) and the one that is
    scored (``defended``), the pair's group key (seeds, flags, clean rows), the data and the clean rows."""

    view: Victim
    defended: Victim
    group_key: str
    x_all: torch.Tensor
    y_all: torch.Tensor
    clean: dict[int, dict[str, Any]]
    attrs: list[dict[str, Any]]

    @property
    def threshold(self) -> float:
        return self.defended.spec.success_threshold


@dataclass
class CellPlan:
    cell_id: str
    spec: AttackSpec
    attack: Attack
    cascade: bool = False  # run under the attack_only_robust protocol


def _attack_label(group: Sequence[CellPlan]) -> str:
    """``pgd.linf eps=2/255,8/255``: an eps group of cells as the progress display names it."""
    eps = [str(p.spec.params["eps"]) for p in group if "eps" in p.spec.params]
    return group[0].spec.name + (f" eps={','.join(eps)}" if eps else "")


def resolve_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def short_hash(*parts: Any) -> str:
    return hashlib.sha256(canonical(parts).encode()).hexdigest()[:16]


def manifest(grid: Grid, device: torch.device, data_hash: str, context: ProcessContext | None = None) -> dict[str, Any]:
    """What produced the results: package versions, device, seed, config and data hashes (and, for several
    processes or a shard, the world size and the shard)."""
    versions = {}
    for pkg in ("robustbench_med", "torch", "torchvision", "torchattacks", "transformers", "timm", "numpy", "datasets"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "versions": versions,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "num_threads": torch.get_num_threads(),
        "seed": grid.seed,
        "config_hash": grid.config_hash(),
        "data_hash": data_hash,
        "grid": grid.as_dict(),
        **({"world_size": context.world_size} if context is not None and context.world_size > 1 else {}),
        **({"shard": context.shard_label} if context is not None and context.shards > 1 else {}),
    }


def train_missing_weights(grid: Grid, device: torch.device | str | None, progress: bool = False) -> None:
    """Train every victim of ``grid`` whose project weights are missing or stale (once, before work is shared out)."""
    for v in grid.victims:
        create_victim(v.name, weights=v.weights, train_if_missing=True, progress=progress, device=device, **v.params)


def defense_supports(name: str, task: str) -> bool:
    """Whether defence ``name`` declares ``task`` among its registry ``tasks`` (no declaration: every task), so a grid
    can list task-specific defences (F3 for LVLMs, APPLE for segmentors) beside victims of other tasks."""
    tasks = DEFENSES.get(name).meta.get("tasks")
    return not tasks or task in tasks


def target_field_for(spec: VictimSpec, victim: Victim) -> str:
    if spec.target_field:
        return spec.target_field
    recipe = VICTIMS.get(spec.name).meta.get("recipe")
    field = getattr(recipe, "target_field", None) or victim.card.extra.get("target_field")
    if not field:
        raise ConfigError(f"victim {spec.name!r}: set 'target_field' in the grid (no training recipe names one)")
    return field


def targeted_labels(victim: Victim, y: torch.Tensor) -> torch.Tensor:
    """Target labels for targeted attacks: the flipped label (binary) or the next class (multi-class)."""
    return get_task(victim.task).next_class(y, victim.card.classes)


def evaluate_batch(victim: Victim, x: torch.Tensor, y: torch.Tensor) -> tuple[dict[str, torch.Tensor], list[Any] | None]:
    """Per-sample metrics and (small) predictions of ``victim`` on ``x`` (plus ``detector_score`` for detectors)."""
    with torch.no_grad():
        if get_task(victim.task).victim_defined:
            metrics, pred = victim.evaluate(x, y), None
        else:
            out = victim(x)
            metrics = victim.metrics(out, y)
            pred = task_predict(victim.task, out)
            pred = pred.cpu().tolist() if pred[0].numel() <= 64 else None
    if isinstance(victim, DetectorVictim):
        with torch.enable_grad():  # some detectors (LID, Mahalanobis input pre-processing) need gradients
            metrics = {**metrics, **{k: v.detach() for k, v in victim.detection_scores(x).items()}}
    return metrics, pred


def _raw_output(victim: Victim, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return next(iter(victim.evaluate(x, y).values())) if get_task(victim.task).victim_defined else victim(x)


def _clean_extras(clean_row: dict[str, Any], primary: str) -> dict[str, float]:
    """Clean-input values stored beside each adversarial row: every clean metric but the primary one (that is the
    row's ``clean_score``), prefixed ``clean_`` (e.g. ``clean_detector_score`` for detection AUROC, ``clean_hd95_px``,
    ``clean_mre_px``). The primary is skipped by name: clean rows come back from the store with sorted keys, and
    skipping the first key (as this did before) dropped whichever metric sorts first instead (``assd_px`` before
    ``dice_fg``, ``mre_px`` before ``sdr@4px``, ``exact_match`` before ``label_accuracy``)."""
    return {f"clean_{k}": v for k, v in clean_row["metrics"].items() if k != primary}


def _outcomes(metrics: dict[str, torch.Tensor], pred: list[Any] | None, positions: Sequence[int]) -> list[dict[str, Any]]:
    """Per-sample outcomes (primary score, prediction, every metric) at ``positions`` of an evaluated batch."""
    values = {k: v.cpu().tolist() for k, v in metrics.items()}
    score = next(iter(values.values()))
    return [{"score": float(score[q]), "pred": pred[q] if pred is not None else None,
             "metrics": {k: float(v[q]) for k, v in values.items()}} for q in positions]


def _clean_outcome(clean_row: dict[str, Any]) -> dict[str, Any]:
    """A clean row as an outcome (the starting point of a cascade: zero perturbation)."""
    return {"score": clean_row["score"], "pred": clean_row["pred"], "metrics": clean_row["metrics"]}


def prepared_to_bytes(prepared: dict[str, dict[str, Any]]) -> bytes:
    """Fitted defences (:meth:`GridRunner.prepare`) as bytes, to send to other processes of the same run
    (:func:`robustbench_med.safe_state.dumps`)."""
    from robustbench_med.safe_state import dumps

    return dumps(prepared)


def prepared_from_bytes(data: bytes | None, device: torch.device) -> dict[str, dict[str, Any]]:
    """The inverse of :func:`prepared_to_bytes`, mapped onto ``device``: a restricted load that builds only arrays,
    scikit-learn classes and torch modules (:func:`robustbench_med.safe_state.loads`), never arbitrary code."""
    from robustbench_med.safe_state import loads

    return loads(data, device) if data else {}


class GridRunner:
    """Runs a :class:`Grid` into a :class:`Store` (resuming whatever is already there)."""

    def __init__(self, grid: Grid, store: Store, device: torch.device | None = None, progress: bool = True,
                 out_dir: Path | None = None, context: ProcessContext | None = None,
                 prepared: dict[str, dict[str, Any]] | None = None):
        self.grid, self.store, self.progress = grid, store, progress
        self._given = dict(prepared or {})  # fitted defences from a preparation run elsewhere (see prepare())
        self.ctx = context or process_context()
        self.device = self.ctx.device if self.ctx.world_size > 1 and self.ctx.device is not None else (device or resolve_device(grid.device))
        self.out_dir = out_dir or store.path.parent
        self.batch_cap = grid.batch_size  # memory cap per call (probed per victim on a GPU); never changes a result
        self._randomized = False  # whether the defended victim being evaluated draws randomness (no call is split)
        self._memory: dict[str, dict[str, int]] = {}  # victim -> cap used and calls split, for the manifest
        self._memory_key = ""
        self._compute: dict[str, Any] = {}  # the grid's compute settings that apply to the current victim
        self._visited: list[tuple[str, VictimSpec, DefenseSpec, int, int]] = []  # (group_key, victim, defence, eot, n)
        self._work: dict[str, list[str]] = {"defenses_prepared": [], "clean_passes": []}  # "victim × defence" (manifest)
        self._bar: GridProgress | None = None  # the whole-grid progress of a run (cells), see _run
        self.cells_counted = 0  # cells the whole-grid bar has counted (done, resumed or skipped)

    def run(self) -> str:
        """Run the grid (rank 0 holding the store's lock) and check that nothing planned is missing."""
        with run_lock(self.store.path) if self.ctx.is_main else nullcontext():
            return self._run()

    def _open_store(self) -> None:
        """Rank 0, before any work: the file is intact and holds this shard of the grid (or nothing yet)."""
        self.store.check_integrity()
        have, want = self.store.get_meta("shard"), self.ctx.shard_label
        if have is None:
            self.store.set_meta("shard", want)
        elif have != want and not (have == "merged" and want == "all"):
            raise StoreError(f"result store {self.store.path} holds shard {have} of a grid, not {want}; give every shard "
                             "its own --out (run --shard K/N does by default) and combine them with `robustbench-med merge`")

    def _data(self):
        """(dataset, indices, images, per-sample attributes, data hash) of the grid's evaluation samples."""
        ds = create_dataset(self.grid.dataset, split=self.grid.split, **self.grid.dataset_params)
        if self.grid.n_examples > len(ds):
            raise ConfigError(f"{self.grid.source}: field 'n_examples': {self.grid.n_examples} is larger than the "
                              f"{self.grid.split!r} split of {self.grid.dataset} ({len(ds)} samples); lower n_examples or "
                              "enlarge the split (dataset params)")
        idx = list(range(self.grid.n_examples))
        x_all = ds.images(idx)
        attrs = ds.attributes(idx)
        attr_rows = [{k: attrs[k][i] for k in attrs} for i in idx]
        return ds, idx, x_all, attr_rows, hashlib.sha256(x_all.numpy().tobytes()).hexdigest()[:16]

    def prepare(self) -> dict[str, dict[str, Any]]:
        """The preparation phase alone (see the module docstring), into this runner's store: the reliability flags and
        clean rows of every unfinished victim × defence, and the fitted defences returned (for :func:`run_grid`'s
        ``prepared``; the Ray driver runs this once and gives the result to every shard)."""
        return self._prepare_all(*self._data())

    def _run(self) -> str:
        ds, idx, x_all, attr_rows, data_hash = self._data()
        if self.ctx.is_main:
            self._open_store()
        self.ctx.barrier()
        shard = f"-shard{self.ctx.shard + 1}of{self.ctx.shards}" if self.ctx.shards > 1 else ""
        run_id = f"{self.grid.name}-{int(time.time())}{shard}-rank{self.ctx.rank}"
        self.store.start_run(run_id, self.grid.name, self.grid.config_hash(), manifest(self.grid, self.device, data_hash, self.ctx))
        prepared = self._prepare_all(ds, idx, x_all, attr_rows, data_hash)  # rank 0 also trains missing weights here
        self._bar = GridProgress(self.planned_cells(), f"grid {self.grid.name}", enabled=self.progress and self.ctx.is_main)
        try:
            for vspec in self.grid.victims:
                victim, y_all = self._load_victim(vspec, ds, idx)
                for dspec in self._defenses_for(vspec, victim):
                    self._victim_defense(vspec, victim, dspec, x_all, y_all, attr_rows, data_hash, prepared)
        finally:
            self._bar.close()
        self._raise_if_missing(self._missing("rank"), "this process")
        self.ctx.barrier()  # every rank has written its units
        if self.ctx.is_main:
            self._finalize_statuses()
            self._raise_if_missing(self._missing("shard"), "the run" if self.ctx.shards == 1 else f"shard {self.ctx.shard_label}")
        self.store.finish_run(run_id, {"memory": self._memory, "work": self._work})
        self.ctx.barrier()
        return run_id

    # whole-grid progress -----------------------------------------------------------------------------------
    def planned_cells(self) -> int:
        """The grid's cells (victims × the defences they pair with × the attack settings that apply), the total of
        the whole-grid progress bar: known before any victim is loaded (a registered victim's task from the registry;
        cells a victim's task turns out not to support are counted when they are recorded as skipped)."""
        total = 0
        for v in self.grid.victims:
            task = VICTIMS.get(v.name).meta.get("task") if v.name in VICTIMS else None
            for d in self.grid.defenses:
                if v.pairs_with(d.name) and (task is None or defense_supports(d.name, task)):
                    total += sum(spec.applies_to(v.name, d.name, d.attack_through) for spec in self.grid.attacks)
        return total

    def _running(self, where: str) -> None:
        """Name on the whole-grid progress what runs now (``victim × defence × attack``)."""
        if self._bar is not None:
            self._bar.running(where)

    def _advance(self, cells: int) -> None:
        """Count ``cells`` (done, resumed or skipped) on the whole-grid progress."""
        self.cells_counted += cells
        if self._bar is not None:
            self._bar.advance(cells)

    # completeness ------------------------------------------------------------------------------------------
    def _applicable_cells(self, vspec: VictimSpec, dspec: DefenseSpec, group_key: str, eot: int) -> list[str]:
        return [short_hash(group_key, spec.key, eot) for spec in self.grid.attacks
                if spec.applies_to(vspec.name, dspec.name, dspec.attack_through)]

    def _wanted(self, cell_id: str, n: int, scope: str) -> set[int] | None:
        """The samples of ``cell_id`` that this process (``scope='rank'``) or this shard (``'shard'``, all ranks) must
        have written, from the recorded plan; None: a sharded cell that was never planned."""
        units = self.store.units(cell_id)
        if scope == "shard" and self.ctx.shards == 1:
            return set(range(n))
        if not units:
            return set() if scope == "rank" else None
        owns = self.ctx.owns if scope == "rank" else self.ctx.shard_owns
        return {i for start, stop, pos in units if owns(pos) for i in range(start, stop)}

    def _missing(self, scope: str) -> list[tuple[str, str]]:
        """(cell or clean group, what is missing) for everything this process or shard planned in this run."""
        out = []
        for group_key, vspec, dspec, eot, n in self._visited:
            statuses = {c: self.store.cell_status(c) for c in self._applicable_cells(vspec, dspec, group_key, eot)}
            measured = [c for c, st in statuses.items() if st is None or st[0] != "skipped"]
            if not measured:  # a defence that does not support this victim: its cells are skipped, nothing is computed
                continue
            if scope == "shard" and len(self.store.clean_rows(group_key)) != n:
                out.append((f"clean {vspec.name} × {dspec.name}", f"{n - len(self.store.clean_rows(group_key))} of {n} clean rows"))
            for cell_id in measured:
                status = statuses[cell_id]
                want = None if status is None else self._wanted(cell_id, n, scope)
                if want is None:
                    out.append((cell_id, "never planned"))
                    continue
                lost = sorted(want - self.store.done_samples(cell_id))
                if lost:
                    out.append((cell_id, f"{len(lost)} samples ({_ranges(lost)})"))
        return out

    def _raise_if_missing(self, missing: list[tuple[str, str]], who: str) -> None:
        if not missing:
            return
        cells = {c["cell_id"]: c for c in self.store.cells()}

        def name(key: str) -> str:
            c = cells.get(key)
            return f"{c['victim']} / {c['defense']} / {c['attack']} {c['attack_params']}" if c else key

        shown = "; ".join(f"{name(k)}: {what}" for k, what in missing[:5])
        more = f"; and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise IncompleteRunError(f"{who} ended with planned results missing from {self.store.path}: {shown}{more}. "
                                 "Run the same command again to compute them (everything written is kept)")

    def _finalize_statuses(self) -> None:
        """Mark ``done`` every pending cell of this run whose samples are all present (ranks may finish in any order)."""
        for group_key, vspec, dspec, eot, n in self._visited:
            for cell_id in self._applicable_cells(vspec, dspec, group_key, eot):
                status = self.store.cell_status(cell_id)
                if status and status[0] == "pending" and len(self.store.done_samples(cell_id)) == n:
                    self.store.set_cell_status(cell_id, "done")

    # preparation (rank 0, once for all processes) ---------------------------------------------------------
    def _load_victim(self, vspec: VictimSpec, ds, idx: list[int]) -> tuple[Victim, torch.Tensor]:
        """The victim of ``vspec`` on the run's device and its checked targets."""
        victim = create_victim(vspec.name, weights=vspec.weights, train_if_missing=self.ctx.is_main, progress=self.progress,
                               device=self.device, **vspec.params)
        self._compute = effective_compute(self.grid.compute, victim)
        prepare_for_compute(victim, self._compute)
        self._memory.setdefault(vspec.name, {"unit_size": self.grid.unit_size, "memory_batch": self.grid.batch_size, "split_calls": 0})
        self._memory_key = vspec.name
        field = target_field_for(vspec, victim)
        y_all = ds.targets(field, idx)
        check_targets(victim, y_all, len(idx), where=f"{self.grid.source}: victim {vspec.name}, target field {field!r}")
        return victim, y_all

    def _memory_cap(self, vspec: VictimSpec, view: Victim, dspec: DefenseSpec, eot: int, x_all, y_all) -> None:
        """The memory cap for calls on ``view``: on CUDA probed on the attacked model with its defence and EOT (the
        grid's ``batch_size`` is where the search starts), elsewhere the grid's ``batch_size``. It never changes a result;
        the manifest records the smallest cap of each victim."""
        with precision(self._compute, self.device):
            self.batch_cap = adaptive_batch_size(view, self.device, self.grid.batch_size, sample=(x_all[:1].to(self.device), y_all[:1].to(self.device)),
                                                 eot=eot, tag=dspec.key + canonical(self._compute))
        mem = self._memory[vspec.name]
        mem["memory_batch"] = min(mem["memory_batch"], self.batch_cap)
        log.debug("%s × %s: at most %d samples per call (EOT %d, %s)", vspec.name, dspec.name, self.batch_cap, eot, self.device)

    def _defenses_for(self, vspec: VictimSpec, victim: Victim) -> list[DefenseSpec]:
        return [d for d in self.grid.defenses if vspec.pairs_with(d.name) and defense_supports(d.name, victim.task)]

    def _pair(self, vspec: VictimSpec, victim: Victim, dspec: DefenseSpec, n: int, data_hash: str):
        """(a fresh defence, its EOT, the victim × defence's group key)."""
        defense = create_defense(dspec.name, **dspec.params)
        eot = dspec.eot or (DEFAULT_EOT if defense.randomized and dspec.attack_through == "adaptive" else 1)
        group_key = short_hash(vspec.name, victim.card.weights_sha256, dspec.key, self.grid.dataset, self.grid.split, n, self.grid.seed, data_hash)
        return defense, eot, group_key

    def _prepare_all(self, ds, idx: list[int], x_all, attrs, data_hash) -> dict[str, dict[str, Any]]:
        """For every unfinished victim × defence, fit the defence, run the reliability checks and compute the clean
        rows, once for all processes: rank 0 first trains missing weights, then the pairs are dealt between the ranks
        (pair ``i`` to rank ``i mod W``) and the fitted defences gathered on every rank in one collective. Returns
        {group key: ``{"state": …}`` (see :meth:`Defense.prepared_state`) or ``{"skip": reason}``}."""
        if self.ctx.world_size > 1:  # one wait for the weights, not one per victim
            if self.ctx.is_main:
                train_missing_weights(self.grid, self.device, self.progress)
            self.ctx.barrier()
        prepared: dict[str, dict[str, Any]] = {}
        pair_index = 0
        for vspec in self.grid.victims:
            victim, y_all = self._load_victim(vspec, ds, idx)
            for dspec in self._defenses_for(vspec, victim):
                mine, pair_index = pair_index % self.ctx.world_size == self.ctx.rank, pair_index + 1
                if not mine:
                    continue
                defense, eot, group_key = self._pair(vspec, victim, dspec, len(x_all), data_hash)
                if group_key in self._given:  # fitted by whoever prepared the grid (the Ray driver)
                    prepared[group_key] = self._given[group_key]
                elif not self._finished(vspec, dspec, group_key, eot, len(x_all)):
                    prepared[group_key] = self._prepare_pair(vspec, victim, dspec, defense, group_key, eot, x_all, y_all, attrs)
        if self.ctx.world_size == 1:
            return prepared
        merged: dict[str, dict[str, Any]] = {}
        for rank, part in enumerate(self.ctx.gather(prepared_to_bytes(prepared))):
            merged.update(prepared if rank == self.ctx.rank else prepared_from_bytes(part, self.device))
        return merged

    def _prepare_pair(self, vspec, victim: Victim, dspec: DefenseSpec, defense, group_key: str, eot: int, x_all, y_all,
                      attrs) -> dict[str, Any]:
        """Fit ``defense`` for ``victim``, record the reliability flags and write the clean rows of the pair."""
        label = f"{vspec.name} × {dspec.name}"
        log.info("%s: preparing (defence fit, gradient checks, clean pass)", label)
        try:
            self._work["defenses_prepared"].append(label)
            defense.prepare(victim, self._train_split())
            defended = defense.wrap(victim).to(self.device).eval()
        except TaskNotSupportedError as e:  # e.g. F3 with the Q-Former source on LLaVA: its cells are skipped
            return {"skip": str(e)}
        view = self._attacked_view(victim, defended, dspec)
        self._memory_cap(vspec, view, dspec, eot, x_all, y_all)
        self._randomized = self._reliability(group_key, defended, view, x_all, y_all, defense.randomized, eot) or defense.randomized
        self._clean(defended, group_key, x_all, y_all, attrs, label)
        return {"state": defense.prepared_state()}

    # one victim × defence ---------------------------------------------------------------------------------
    def _victim_defense(self, vspec: VictimSpec, victim: Victim, dspec: DefenseSpec, x_all, y_all, attrs, data_hash,
                        prepared: dict[str, dict[str, Any]]) -> None:
        defense, eot, group_key = self._pair(vspec, victim, dspec, len(x_all), data_hash)
        self._visited.append((group_key, vspec, dspec, eot, len(x_all)))
        where, applicable = f"{vspec.name} × {dspec.name}", len(self._applicable_cells(vspec, dspec, group_key, eot))
        if self._finished(vspec, dspec, group_key, eot, len(x_all)):
            log.info("%s: resumed, every cell is in the store", where)
            self._advance(applicable)
            return  # resumed: clean rows and every cell (of this shard) are in the store; nothing is refitted
        self._running(where)
        entry = prepared.get(group_key)
        if entry is None:  # not prepared by rank 0 (a simulated rank, or a pair rank 0 found finished): fit it here
            entry = self._prepare_pair(vspec, victim, dspec, defense, group_key, eot, x_all, y_all, attrs)
        if "skip" in entry:
            log.info("%s: its cells are recorded as skipped (%s)", where, entry["skip"])
            self._plan_cells(vspec, victim, defense, dspec, group_key, eot, skip=entry["skip"])
            self._advance(applicable)
            return
        defense.load_prepared(entry["state"])
        defended = defense.wrap(victim).to(self.device).eval()
        view = self._attacked_view(victim, defended, dspec)
        self._memory_cap(vspec, view, dspec, eot, x_all, y_all)
        varies = self.store.flags().get(group_key, {}).get("randomized", (None, ""))[0]
        self._randomized = defense.randomized or bool(varies)
        clean = self._clean(defended, group_key, x_all, y_all, attrs, f"{vspec.name} × {dspec.name}")
        plans = self._plan_cells(vspec, victim, defense, dspec, group_key, eot)
        self._advance(applicable - len(plans))  # recorded as skipped (task or norm not supported)
        pair = PairRun(view, defended, group_key, x_all, y_all, clean, attrs)
        for group in self._eps_groups(plans):
            self._running(f"{where} × {_attack_label(group)}")
            self._run_group(group, pair)
            self._advance(len(group))

    def _finished(self, vspec: VictimSpec, dspec: DefenseSpec, group_key: str, eot: int, n: int) -> bool:
        """Whether previous runs completed this victim × defence (all clean rows; every applicable cell skipped or with
        all the samples this shard owns), so a resumed run skips fitting the defence (detectors, latent perturbers)
        again. Ownership does not depend on this answer (it follows from the plan)."""
        if len(self.store.clean_rows(group_key)) != n:
            return False
        for cell_id in self._applicable_cells(vspec, dspec, group_key, eot):
            status = self.store.cell_status(cell_id)
            if status is None:
                return False
            if status[0] == "skipped":
                continue
            want = self._wanted(cell_id, n, "shard")
            if want is None or not want <= self.store.done_samples(cell_id):
                return False
        return True

    def _train_split(self):
        """The training split of the grid's dataset, for defences and attacks that learn (built lazily, once)."""
        if not hasattr(self, "_train"):
            self._train = create_dataset(self.grid.dataset, split="train", **self.grid.dataset_params)
        return self._train

    def _attacked_view(self, victim: Victim, defended: Victim, dspec: DefenseSpec) -> Victim:
        if dspec.attack_through == "transfer":
            return victim
        if dspec.attack_through == "detach" and isinstance(defended, PurifiedVictim):
            return defended.with_gradient_mode("detach")
        return defended

    def _clean(self, defended: Victim, group_key: str, x_all, y_all, attrs, label: str) -> dict[int, dict[str, Any]]:
        """Clean rows of this victim × defence (computed once, then read back), with ``metrics`` decoded."""
        if len(self.store.clean_rows(group_key)) != len(x_all):
            self._work["clean_passes"].append(label)
            us, threshold, new = self.grid.unit_size, defended.spec.success_threshold, []
            for start in range(0, len(x_all), us):
                xb, yb = x_all[start : start + us].to(self.device), y_all[start : start + us].to(self.device)
                metrics, pred = self._evaluate(defended, xb, yb, derive_seed(self.grid.seed, group_key, "clean", start))
                for j, out in enumerate(_outcomes(metrics, pred, range(len(xb)))):
                    new.append({"sample_idx": start + j, "score": out["score"], "correct": int(out["score"] >= threshold),
                                "pred": out["pred"], "metrics": out["metrics"], "attrs": attrs[start + j]})
            self.store.write_clean(group_key, new)
        rows = self.store.clean_rows(group_key)
        return {i: {**r, "metrics": json.loads(r["metrics"]) if isinstance(r["metrics"], str) else dict(r["metrics"] or {})}
                for i, r in rows.items()}

    def _reliability(self, group_key: str, defended: Victim, view: Victim, x_all, y_all, randomized: bool, eot: int) -> bool:
        """AutoAttack-style checks (Croce & Hein 2020): zero input gradients, randomised outputs. Returns whether the
        outputs vary between two passes."""
        xs, ys = x_all[:16].to(self.device), y_all[:16].to(self.device)

        def zero_gradients(lo: int, hi: int) -> list[bool]:
            xb = xs[lo:hi].clone().requires_grad_(True)
            loss = view.objective(xb, ys[lo:hi]).sum()
            grad = torch.autograd.grad(loss, xb, allow_unused=True)[0] if loss.requires_grad else None
            return [True] * (hi - lo) if grad is None else (grad.flatten(1).abs().sum(1) == 0).tolist()

        def two_passes_differ(lo: int, hi: int) -> bool:
            return not torch.equal(_raw_output(defended, xs[lo:hi], ys[lo:hi]), _raw_output(defended, xs[lo:hi], ys[lo:hi]))

        with seeded(derive_seed(self.grid.seed, group_key, "grad-check"), self.device):  # checks: splitting is harmless
            zeros = [z for part in self._in_calls(len(xs), True, zero_gradients) for z in part]
        zero = sum(zeros) / max(1, len(zeros))
        self.store.set_flag(group_key, "masked_gradients", zero > MASKED_GRADIENT_FRACTION,
                            f"{zero:.0%} of checked samples have an all-zero input gradient on the attacked model")
        varies = any(self._in_calls(len(xs), True, two_passes_differ))
        self.store.set_flag(group_key, "randomized", varies, "outputs differ between two forward passes" if varies else "deterministic")
        if varies and eot == 1:
            self.store.set_flag(group_key, "randomized_without_eot", True, "randomised defence attacked without EOT")
        return varies

    def _plan_cells(self, vspec, victim, defense, dspec, group_key, eot, skip: str | None = None) -> list[CellPlan]:
        """Record the cells of one victim × defence and return those to run (``skip``: record all as skipped)."""
        plans = []
        for spec in self.grid.attacks:
            if not spec.applies_to(vspec.name, dspec.name, dspec.attack_through):
                continue
            params = dict(spec.params)
            attack = create_attack(spec.name, **params)
            if eot > 1 and "eot" not in params and attack.uses_eot:  # noise / transfer never see the defence's draws
                params["eot"] = eot
                attack = create_attack(spec.name, **params)
            cell_id = short_hash(group_key, spec.key, eot)
            cell = {
                "cell_id": cell_id, "grid": self.grid.name, "victim": vspec.name, "task": victim.task, "metric": victim.spec.metric,
                "defense": dspec.name, "defense_params": defense.params(), "attack_through": dspec.attack_through,
                "attack": spec.name, "attack_params": params, "threat": attack.threat.as_dict(), "dataset": self.grid.dataset,
                "split": self.grid.split, "n_examples": self.grid.n_examples, "seed": self.grid.seed,
                "weights_sha256": victim.card.weights_sha256, "status": "pending", "reason": "",
                "extra": {"group_key": group_key, "knowledge": attack.knowledge, "eot": attack.eot,
                          "attack_only_robust": (cascade := self._cascades(attack, victim.task, defense.kind)),
                          **({"variant": attack.variant_for(victim)} if hasattr(attack, "variant_for") else {}),
                          **({"compute": self._compute} if self._compute else {})},
            }
            try:
                if skip is not None:
                    raise TaskNotSupportedError(f"defence {dspec.name}: {skip}")
                attack.check_task(victim)
                attack.prepare(victim, self._train_split())  # attacks that learn from data (HFC statistics)
            except (TaskNotSupportedError, ConfigError) as e:
                cell["status"], cell["reason"] = "skipped", str(e)
                self.store.upsert_cell(cell)
                continue
            self.store.upsert_cell(cell)
            plans.append(CellPlan(cell_id, spec, attack, cascade))
        return plans

    def _cascades(self, attack: Attack, task: str, defense_kind: str) -> bool:
        """Whether cells of ``attack`` run under the ``attack_only_robust`` protocol: untargeted adversarial attacks on
        0/1-outcome tasks (not noise baselines; not detectors, whose AUROC needs every sample attacked)."""
        return (self.grid.attack_only_robust and get_task(task).zero_one and not attack.threat.targeted
                and attack.knowledge != "none" and defense_kind != "detector")

    def _eps_groups(self, plans: Sequence[CellPlan]) -> list[list[CellPlan]]:
        """Cells that differ only in eps, grouped (a cascade, or one batch when the attack takes per-sample eps)."""
        groups: dict[str, list[CellPlan]] = {}
        for p in plans:
            if p.cascade or p.attack.supports_eps_batch:
                key = f"{p.cascade}|{p.spec.name}" + canonical({k: v for k, v in p.spec.params.items() if k != "eps"})
            else:
                key = p.cell_id
            groups.setdefault(key, []).append(p)
        return list(groups.values())

    # one group of cells -----------------------------------------------------------------------------------
    def _run_group(self, group: list[CellPlan], pair: PairRun) -> None:
        n, k, cascade = len(pair.x_all), len(group), group[0].cascade
        chunk = self.grid.unit_size if cascade else max(1, self.grid.unit_size // k)
        done = {p.cell_id: self.store.done_samples(p.cell_id) for p in group}
        ids = [p.cell_id for p in group]
        units = [(s, min(n, s + chunk), unit_position(ids, u)) for u, s in enumerate(range(0, n, chunk))]
        if [u for u in self.store.units(ids[0])] != units or any(self.store.units(c) != units for c in ids[1:]):
            self.store.record_units(ids, units)
        starts = [s for s, stop, pos in units
                  if self.ctx.owns(pos) and any(i not in done[c] for c in ids for i in range(s, stop))]
        from tqdm.auto import tqdm

        label = f"{group[0].spec.name} ×{k} on {pair.defended.card.name}"
        unit = self._run_cascade_unit if cascade else self._run_unit
        for start in tqdm(starts, desc=label, disable=None if self.progress else True, leave=False, position=1):
            stop = min(n, start + chunk)
            seconds = unit(group, pair, start, stop, done)
            for p in group:
                self.store.add_timing(p.cell_id, seconds[p.cell_id], stop - start)
            self._advance(0)  # a heartbeat within a long group: off a terminal a log line every LOG_EVERY_SECONDS
        for p in group:
            status = self.store.cell_status(p.cell_id)
            if status and status[0] == "pending" and len(self.store.done_samples(p.cell_id)) == n:
                self.store.set_cell_status(p.cell_id, "done")

    def _run_unit(self, group: list[CellPlan], pair: PairRun, start: int, stop: int, done: dict[str, set[int]]) -> dict[str, float]:
        """All cells of ``group`` on samples ``start:stop`` in one batch (per-sample eps); returns seconds per cell
        (the cells share the unit's time)."""
        t0 = time.perf_counter()
        k, m = len(group), stop - start
        xb = pair.x_all[start:stop].to(self.device)
        xb = xb.repeat(k, *([1] * (xb.dim() - 1)))
        yb = pair.y_all[start:stop].to(self.device)
        yb = yb.repeat(k, *([1] * (yb.dim() - 1)))
        eps = torch.cat([torch.full((m,), p.attack.threat.eps) for p in group]).to(self.device, xb.dtype)
        attack = group[0].attack
        y_attack = targeted_labels(pair.defended, yb) if attack.threat.targeted else yb
        seed = derive_seed(self.grid.seed, pair.group_key, group[0].cell_id, start)
        seeds = [self._sample_seed(pair.group_key, p.cell_id, i) for p in group for i in range(start, stop)]
        x_adv = self._attack(attack, pair.view, xb, y_attack, eps if k > 1 else None, seed, seeds)
        metrics, pred = self._evaluate(pair.defended, x_adv, yb, derive_seed(seed, "eval"))
        rows, invalid = [], {}
        for c, p in enumerate(group):
            sl = slice(c * m, (c + 1) * m)
            outcomes = _outcomes(metrics, pred, range(c * m, (c + 1) * m))
            rows += self._cell_rows(p, pair, xb[sl], x_adv[sl], outcomes, start, done, invalid)
        self.store.write_unit(rows, invalid)
        share = (time.perf_counter() - t0) / k
        return {p.cell_id: share for p in group}

    def _run_cascade_unit(self, group: list[CellPlan], pair: PairRun, start: int, stop: int, done: dict[str, set[int]]) -> dict[str, float]:
        """The cells of ``group`` on samples ``start:stop`` as a cascade (``attack_only_robust``): in ascending eps,
        each attack runs only on the samples that are still robust; a sample already broken (clean-misclassified, or
        broken at a smaller eps) keeps its example, which is within every larger budget. Returns seconds per cell."""
        m, threshold = stop - start, pair.threshold
        x, y = pair.x_all[start:stop].to(self.device), pair.y_all[start:stop].to(self.device)
        x_cur = x.clone()
        state = [_clean_outcome(pair.clean[i]) for i in range(start, stop)]
        rows, invalid, seconds = [], {}, {}
        for p in sorted(group, key=lambda p: p.attack.threat.eps):
            t0 = time.perf_counter()
            alive = [j for j in range(m) if state[j]["score"] >= threshold]
            if alive:
                idx = torch.tensor(alive, device=self.device)
                seed = derive_seed(self.grid.seed, pair.group_key, p.cell_id, start)
                seeds = [self._sample_seed(pair.group_key, p.cell_id, start + j) for j in alive]
                x_adv = self._attack(p.attack, pair.view, x[idx], y[idx], None, seed, seeds)
                metrics, pred = self._evaluate(pair.defended, x_adv, y[idx], derive_seed(seed, "eval"))
                x_cur[idx] = x_adv
                for j, outcome in zip(alive, _outcomes(metrics, pred, range(len(alive)))):
                    state[j] = outcome
            rows += self._cell_rows(p, pair, x, x_cur, state, start, done, invalid)
            seconds[p.cell_id] = time.perf_counter() - t0
        self.store.write_unit(rows, invalid)
        return seconds

    # calls within a unit ----------------------------------------------------------------------------------
    def _sample_seed(self, group_key: str, cell_id: str, index: int) -> int:
        """The seed of sample ``index``'s own random stream in ``cell_id`` (independent of units and batches)."""
        return derive_seed(self.grid.seed, group_key, cell_id, "sample", index)

    def _attack(self, attack: Attack, view: Victim, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor | None,
                seed: int, seeds: list[int]) -> torch.Tensor:
        """``attack`` on one unit's batch: one call, or calls of at most the memory cap when the attack's samples are
        independent and the model deterministic (the same draws either way)."""
        split = attack.sample_independent and not self._randomized
        with precision(self._compute, self.device):
            parts = self._in_calls(len(x), split, lambda lo, hi: attack(
                view, x[lo:hi], y[lo:hi], eps=None if eps is None else eps[lo:hi], seed=seed, seeds=seeds[lo:hi]))
        return torch.cat(parts) if parts else x.clone()

    def _evaluate(self, defended: Victim, x: torch.Tensor, y: torch.Tensor, seed: int) -> tuple[dict[str, torch.Tensor], list[Any] | None]:
        """:func:`evaluate_batch` on one unit's batch, seeded (a randomised model sees the whole batch in one call; a
        deterministic one may be split to fit memory)."""
        with seeded(seed, self.device), precision(self._compute, self.device, evaluation=True):
            parts = self._in_calls(len(x), not self._randomized, lambda lo, hi: evaluate_batch(defended, x[lo:hi], y[lo:hi]))
        if len(parts) == 1:
            return parts[0]
        metrics = {k: torch.cat([m[k] for m, _ in parts]) for k in parts[0][0]}
        preds = None if any(p is None for _, p in parts) else [q for _, p in parts for q in p]
        return metrics, preds

    def _in_calls(self, n: int, splittable: bool, fn: Callable[[int, int], T]) -> list[T]:
        """``fn(lo, hi)`` over ``[0, n)``: in one call, or (``splittable``) in calls of at most the memory cap. After
        an out-of-memory error a splittable call is retried with half the cap (kept for the rest of the victim);
        one that cannot be split raises, naming the fix (a smaller ``unit_size``)."""
        while n:
            size = min(n, self.batch_cap) if splittable else n
            try:
                out = [fn(lo, min(n, lo + size)) for lo in range(0, n, size)]
            except RuntimeError as e:
                if not is_oom(e):
                    raise
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                if not splittable or size == 1:
                    raise RobustBenchMedError(
                        f"out of memory on {self.device} with a call of {size} samples that cannot be split (a "
                        "randomised model, or an attack whose samples are coupled); lower the grid's unit_size") from e
                self.batch_cap = size // 2
                mem = self._memory.get(self._memory_key, {})
                mem["memory_batch"] = min(mem.get("memory_batch", self.batch_cap), self.batch_cap)
                continue
            if size < n and self._memory_key in self._memory:
                self._memory[self._memory_key]["split_calls"] += 1
            return out
        return []

    def _cell_rows(self, p: CellPlan, pair: PairRun, x: torch.Tensor, x_adv: torch.Tensor, outcomes: list[dict[str, Any]],
                   start: int, done: dict[str, set[int]], invalid: dict[str, str]) -> list[dict[str, Any]]:
        """Budget check and per-sample rows of one cell on one unit (``outcomes``: score, pred, metrics per sample)."""
        report = check_budget(x, x_adv, p.attack.threat.norm, p.attack.threat.eps)
        broken = p.attack.violations(pair.defended, x, x_adv)
        if not report.valid or broken:
            invalid[p.cell_id] = "; ".join(filter(None, (f"budget violated: {report.reason()}" if not report.valid else "",
                                                         f"threat violated: {broken}" if broken else "")))
        if self.grid.save_adversarial:
            self._save_adv(p.cell_id, start, x_adv, x)
        rows = []
        for j, out in enumerate(outcomes):
            i = start + j
            if i in done[p.cell_id]:
                continue
            cl = pair.clean[i]
            rows.append({
                "cell_id": p.cell_id, "sample_idx": i, "clean_score": cl["score"], "adv_score": out["score"],
                "clean_correct": cl["correct"], "adv_correct": int(out["score"] >= pair.threshold), "clean_pred": cl["pred"],
                "adv_pred": out["pred"], "eps": p.attack.threat.eps,
                "linf": float(report.norms["Linf"][j]), "l2": float(report.norms["L2"][j]), "valid": int(report.valid and not broken),
                "metrics": {**out["metrics"], **_clean_extras(cl, pair.defended.spec.metric)}, "attrs": pair.attrs[i],
            })
        return rows

    def _save_adv(self, cell_id: str, start: int, x_adv: torch.Tensor, x: torch.Tensor) -> None:
        """``save_adversarial``: the unit's adversarial inputs and, beside them, its clean inputs (``x_adv``, ``x``;
        samples ``start``, ``start + 1``, ...) in ``<out>/adversarial/<cell_id>/<start>.safetensors``."""
        from safetensors.torch import save_file

        path = self.out_dir / "adversarial" / cell_id / f"{start:06d}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"x_adv": x_adv.detach().cpu().contiguous(), "x": x.detach().cpu().contiguous()}, str(path))


def shard_dir(out_dir: str | Path, shard: str | tuple[int, int] | None) -> Path:
    """Where a run writes: ``out_dir``, or ``out_dir/shard-K-of-N`` for shard K/N (each shard its own store)."""
    k, n = parse_shard(shard)
    return Path(out_dir) / f"shard-{k + 1}-of-{n}" if n > 1 else Path(out_dir)


def _move_aside(path: Path) -> Path | None:
    """Rename a store (and its WAL files) to ``<name>.damaged-<time>`` (``--fresh``); returns the new path."""
    if not path.exists():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = path.with_name(f"{path.name}.damaged-{stamp}")
    for suffix in ("-wal", "-shm"):
        side = path.with_name(path.name + suffix)
        if side.exists():
            side.rename(target.with_name(target.name + suffix))
    path.rename(target)
    return target


def run_grid(grid: Grid | str | Path, out_dir: str | Path, *, device: str | None = None, progress: bool = True,
             shard: str | tuple[int, int] | None = None, fresh: bool = False,
             prepared: dict[str, dict[str, Any]] | None = None) -> Path:
    """Run ``grid`` (a :class:`Grid` or a YAML path) into ``out_dir/results.sqlite``; returns the store path.

    ``shard='K/N'``: compute only the K-th of N parts of the grid, into ``out_dir/shard-K-of-N/results.sqlite`` (combine
    the shards with :func:`robustbench_med.merge.merge_stores`). ``fresh``: start over, moving an existing store aside
    (``results.sqlite.damaged-<time>``) instead of resuming it (the way out of a damaged store). ``prepared``: fitted
    defences from :meth:`GridRunner.prepare` (not fitted again).
    """
    if not isinstance(grid, Grid):
        grid = load_grid(grid)
    ctx = process_context()
    k, n = parse_shard(shard)
    ctx = replace(ctx, shard=k, shards=n)
    out = shard_dir(out_dir, shard)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.sqlite"
    with run_lock(path) if ctx.is_main else nullcontext():
        if fresh and ctx.is_main:
            moved = _move_aside(path)
            if moved is not None:
                log.warning("--fresh: moved the old store to %s", moved)
        ctx.barrier()
        with Store(path) as store:
            GridRunner(grid, store, resolve_device(device or grid.device), progress, out, context=ctx, prepared=prepared).run()
    return path


def _ranges(values: Sequence[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` → ``'0-2, 5, 7-8'`` (for error messages)."""
    parts, start, prev = [], None, None
    for v in values:
        if start is None:
            start = prev = v
        elif v == prev + 1:
            prev = v
        else:
            parts.append(f"{start}-{prev}" if prev != start else f"{start}")
            start = prev = v
    if start is not None:
        parts.append(f"{start}-{prev}" if prev != start else f"{start}")
    return ", ".join(parts[:8]) + (", …" if len(parts) > 8 else "")
