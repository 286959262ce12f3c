"""The grid runner: plans cells, computes clean results once per victim × defence, attacks in batches, checks every
adversarial batch against its threat model, and stores per-sample rows so an interrupted run resumes exactly.

A *cell* is (victim, defence, attack with one parameter set, dataset split, n_examples, seed). Cells of one attack
that differ only in eps form a group. For classifiers under the grid's ``attack_only_robust`` protocol (AutoAttack's:
Croce & Hein, ICML 2020) a group runs as a *cascade*: ascending eps, each attack only on the samples still robust
(clean-misclassified samples keep a zero perturbation; a sample broken at a smaller eps keeps that valid example).
Otherwise the cells of a group are batched together when the attack takes per-sample eps (an eps sweep costs one
pass). A *unit* is one batch of samples for one group of cells; its rows are written in one transaction.
"""
from __future__ import annotations

import hashlib
import json
import platform
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

import torch

from robustbench_med.api import create_attack, create_dataset, create_defense, create_victim
from robustbench_med.attack import Attack, derive_seed, seeded
from robustbench_med.batching import adaptive_batch_size
from robustbench_med.defense import DetectorVictim, PurifiedVictim
from robustbench_med.distributed import ProcessContext, process_context
from robustbench_med.errors import ConfigError, TaskNotSupportedError
from robustbench_med.grid import AttackSpec, DefenseSpec, Grid, VictimSpec, canonical, load_grid
from robustbench_med.registry import DEFENSES, VICTIMS
from robustbench_med.store import Store
from robustbench_med.tasks import predict as task_predict
from robustbench_med.threat import check_budget
from robustbench_med.victim import Victim

MASKED_GRADIENT_FRACTION = 0.5
DEFAULT_EOT = 8
CASCADE_TASKS = frozenset({"classification", "binary"})  # tasks whose per-sample outcome is 0/1 (robust or not)


@dataclass
class CellPlan:
    cell_id: str
    spec: AttackSpec
    attack: Attack
    cascade: bool = False  # run under the attack_only_robust protocol


def resolve_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def short_hash(*parts: Any) -> str:
    return hashlib.sha256(canonical(parts).encode()).hexdigest()[:16]


def manifest(grid: Grid, device: torch.device, data_hash: str) -> dict[str, Any]:
    """What produced the results: package versions, device, seed, config and data hashes."""
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
    }


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
    if victim.task == "binary":
        return 1 - y
    if victim.task == "classification":
        return (y + 1) % len(victim.card.classes)
    raise ConfigError(f"targeted attacks need a classifier, not a {victim.task} victim")


def evaluate_batch(victim: Victim, x: torch.Tensor, y: torch.Tensor) -> tuple[dict[str, torch.Tensor], list[Any] | None]:
    """Per-sample metrics and (small) predictions of ``victim`` on ``x`` (plus ``detector_score`` for detectors)."""
    with torch.no_grad():
        if victim.task == "vqa":
            metrics, pred = victim.evaluate(x, y), None
        else:
            out = victim(x)
            metrics = victim.metrics(out, y)
            pred = task_predict(victim.task, out)
            pred = pred.cpu().tolist() if pred[0].numel() <= 64 else None
    if isinstance(victim, DetectorVictim):
        with torch.enable_grad():  # some detectors (LID, Mahalanobis input pre-processing) need gradients
            metrics = {**metrics, "detector_score": victim.detect(x).detach()}
    return metrics, pred


def _raw_output(victim: Victim, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return next(iter(victim.evaluate(x, y).values())) if victim.task == "vqa" else victim(x)


def _clean_extras(clean_row: dict[str, Any]) -> dict[str, float]:
    """Clean-input values stored beside each adversarial row: every clean metric but the primary score (which has its
    own column), prefixed ``clean_`` (e.g. ``clean_detector_score`` for detection AUROC, ``clean_vqa_accuracy_first``)."""
    return {f"clean_{k}": v for k, v in list(clean_row["metrics"].items())[1:]}


def _outcomes(metrics: dict[str, torch.Tensor], pred: list[Any] | None, positions: Sequence[int]) -> list[dict[str, Any]]:
    """Per-sample outcomes (primary score, prediction, every metric) at ``positions`` of an evaluated batch."""
    values = {k: v.cpu().tolist() for k, v in metrics.items()}
    score = next(iter(values.values()))
    return [{"score": float(score[q]), "pred": pred[q] if pred is not None else None,
             "metrics": {k: float(v[q]) for k, v in values.items()}} for q in positions]


def _clean_outcome(clean_row: dict[str, Any]) -> dict[str, Any]:
    """A clean row as an outcome (the starting point of a cascade: zero perturbation)."""
    return {"score": clean_row["score"], "pred": clean_row["pred"], "metrics": clean_row["metrics"]}


class GridRunner:
    """Runs a :class:`Grid` into a :class:`Store` (resuming whatever is already there)."""

    def __init__(self, grid: Grid, store: Store, device: torch.device | None = None, progress: bool = True,
                 out_dir: Path | None = None, context: ProcessContext | None = None):
        self.grid, self.store, self.progress = grid, store, progress
        self.ctx = context or process_context()
        self.device = self.ctx.device if self.ctx.world_size > 1 and self.ctx.device is not None else (device or resolve_device(grid.device))
        self.out_dir = out_dir or store.path.parent
        self.batch_size = grid.batch_size
        self._position = 0

    def run(self) -> str:
        ds = create_dataset(self.grid.dataset, split=self.grid.split, **self.grid.dataset_params)
        n = min(self.grid.n_examples, len(ds))
        idx = list(range(n))
        x_all = ds.images(idx)
        data_hash = hashlib.sha256(x_all.numpy().tobytes()).hexdigest()[:16]
        run_id = f"{self.grid.name}-{int(time.time())}-rank{self.ctx.rank}"
        self.store.start_run(run_id, self.grid.name, self.grid.config_hash(), manifest(self.grid, self.device, data_hash))
        attrs = ds.attributes(idx)
        attr_rows = [{k: attrs[k][i] for k in attrs} for i in range(n)]
        for vspec in self.grid.victims:
            if self.ctx.is_main:  # rank 0 trains missing weights; the others wait for them
                victim = create_victim(vspec.name, weights=vspec.weights, train_if_missing=True, progress=self.progress,
                                       device=self.device, **vspec.params)
            self.ctx.barrier()
            if not self.ctx.is_main:
                victim = create_victim(vspec.name, weights=vspec.weights, device=self.device, **vspec.params)
            self.batch_size = adaptive_batch_size(victim, self.device, self.grid.batch_size)
            y_all = ds.targets(target_field_for(vspec, victim), idx)
            for dspec in (d for d in self.grid.defenses if vspec.pairs_with(d.name) and defense_supports(d.name, victim.task)):
                self._victim_defense(vspec, victim, dspec, x_all, y_all, attr_rows, data_hash)
        self.store.finish_run(run_id)
        self.ctx.barrier()
        return run_id

    # one victim × defence ---------------------------------------------------------------------------------
    def _victim_defense(self, vspec: VictimSpec, victim: Victim, dspec: DefenseSpec, x_all, y_all, attrs, data_hash) -> None:
        defense = create_defense(dspec.name, **dspec.params)
        eot = dspec.eot or (DEFAULT_EOT if defense.randomized and dspec.attack_through == "adaptive" else 1)
        group_key = short_hash(vspec.name, victim.card.weights_sha256, dspec.key, self.grid.dataset, self.grid.split, len(x_all), self.grid.seed, data_hash)
        if self._finished(vspec, dspec, group_key, eot, len(x_all)):
            return  # resumed: clean rows and every cell of this victim × defence are final; nothing is refitted
        try:
            defense.prepare(victim, self._train_split())
            defended = defense.wrap(victim).to(self.device).eval()
        except TaskNotSupportedError as e:  # e.g. F3 with the Q-Former source on LLaVA: its cells are skipped
            self._plan_cells(vspec, victim, defense, dspec, group_key, eot, skip=str(e))
            return
        view = self._attacked_view(victim, defended, dspec)
        clean = self._clean(defended, group_key, x_all, y_all, attrs)
        self._reliability(group_key, defended, view, x_all, y_all, defense.randomized, eot)
        plans = self._plan_cells(vspec, victim, defense, dspec, group_key, eot)
        for group in self._eps_groups(plans):
            self._run_group(group, group[0].cascade, view, defended, group_key, x_all, y_all, clean, attrs)

    def _finished(self, vspec: VictimSpec, dspec: DefenseSpec, group_key: str, eot: int, n: int) -> bool:
        """Whether a previous run completed this victim × defence (all clean rows, every applicable cell final), so a
        resumed run skips fitting the defence (detectors, latent perturbers) again."""
        if len(self.store.clean_rows(group_key)) != n:
            return False
        for spec in self.grid.attacks:
            if spec.applies_to(vspec.name, dspec.name, dspec.attack_through):
                status = self.store.cell_status(short_hash(group_key, spec.key, eot))
                if status is None or status[0] not in ("done", "invalid", "skipped"):
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

    def _clean(self, defended: Victim, group_key: str, x_all, y_all, attrs) -> dict[int, dict[str, Any]]:
        """Clean rows of this victim × defence (computed once, then read back), with ``metrics`` decoded."""
        if len(self.store.clean_rows(group_key)) != len(x_all):
            bs, threshold, new = self.batch_size, defended.spec.success_threshold, []
            for start in range(0, len(x_all), bs):
                xb, yb = x_all[start : start + bs].to(self.device), y_all[start : start + bs].to(self.device)
                with seeded(derive_seed(self.grid.seed, group_key, "clean", start), self.device):
                    metrics, pred = evaluate_batch(defended, xb, yb)
                for j, out in enumerate(_outcomes(metrics, pred, range(len(xb)))):
                    new.append({"sample_idx": start + j, "score": out["score"], "correct": int(out["score"] >= threshold),
                                "pred": out["pred"], "metrics": out["metrics"], "attrs": attrs[start + j]})
            self.store.write_clean(group_key, new)
        rows = self.store.clean_rows(group_key)
        return {i: {**r, "metrics": json.loads(r["metrics"]) if isinstance(r["metrics"], str) else dict(r["metrics"] or {})}
                for i, r in rows.items()}

    def _reliability(self, group_key: str, defended: Victim, view: Victim, x_all, y_all, randomized: bool, eot: int) -> None:
        """AutoAttack-style checks (Croce & Hein 2020): zero input gradients, randomised outputs."""
        xb = x_all[:16].to(self.device).clone().requires_grad_(True)
        yb = y_all[:16].to(self.device)
        with seeded(derive_seed(self.grid.seed, group_key, "grad-check"), self.device):
            loss = view.objective(xb, yb).sum()
            grad = torch.autograd.grad(loss, xb, allow_unused=True)[0] if loss.requires_grad else None
        zero = 1.0 if grad is None else float((grad.flatten(1).abs().sum(1) == 0).float().mean())
        self.store.set_flag(group_key, "masked_gradients", zero > MASKED_GRADIENT_FRACTION,
                            f"{zero:.0%} of checked samples have an all-zero input gradient on the attacked model")
        varies = not torch.equal(_raw_output(defended, xb.detach(), yb), _raw_output(defended, xb.detach(), yb))
        self.store.set_flag(group_key, "randomized", varies, "outputs differ between two forward passes" if varies else "deterministic")
        if varies and eot == 1:
            self.store.set_flag(group_key, "randomized_without_eot", True, "randomised defence attacked without EOT")

    def _plan_cells(self, vspec, victim, defense, dspec, group_key, eot, skip: str | None = None) -> list[CellPlan]:
        """Record the cells of one victim × defence and return those to run (``skip``: record all as skipped)."""
        plans = []
        for spec in self.grid.attacks:
            if not spec.applies_to(vspec.name, dspec.name, dspec.attack_through):
                continue
            params = dict(spec.params)
            if eot > 1 and "eot" not in params:
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
                          **({"variant": attack.variant_for(victim)} if hasattr(attack, "variant_for") else {})},
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
        return (self.grid.attack_only_robust and task in CASCADE_TASKS and not attack.threat.targeted
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
    def _run_group(self, group: list[CellPlan], cascade: bool, view, defended, group_key, x_all, y_all, clean, attrs) -> None:
        n, k = len(x_all), len(group)
        chunk = self.batch_size if cascade else max(1, self.batch_size // k)
        done = {p.cell_id: self.store.done_samples(p.cell_id) for p in group}
        starts = []
        for s in range(0, n, chunk):
            self._position += 1
            if self.ctx.owns(self._position) and any(i not in done[p.cell_id] for p in group for i in range(s, min(n, s + chunk))):
                starts.append(s)
        from tqdm.auto import tqdm

        label = f"{group[0].spec.name} ×{k} on {defended.card.name}"
        unit = self._run_cascade_unit if cascade else self._run_unit
        for start in tqdm(starts, desc=label, disable=not self.progress, leave=False):
            stop = min(n, start + chunk)
            seconds = unit(group, view, defended, group_key, x_all, y_all, clean, attrs, start, stop, done)
            for p in group:
                self.store.add_timing(p.cell_id, seconds[p.cell_id], stop - start)
        for p in group:
            status = self.store.cell_status(p.cell_id)
            if status and status[0] == "pending" and len(self.store.done_samples(p.cell_id)) == n:
                self.store.set_cell_status(p.cell_id, "done")

    def _run_unit(self, group, view, defended, group_key, x_all, y_all, clean, attrs, start, stop, done) -> dict[str, float]:
        """All cells of ``group`` on samples ``start:stop`` in one batch (per-sample eps); returns seconds per cell
        (the cells share the unit's time)."""
        t0 = time.perf_counter()
        k, m = len(group), stop - start
        xb = x_all[start:stop].to(self.device).repeat(k, 1, 1, 1)
        yb = y_all[start:stop].to(self.device)
        yb = yb.repeat(k, *([1] * (yb.dim() - 1)))
        eps = torch.cat([torch.full((m,), p.attack.threat.eps) for p in group]).to(self.device, xb.dtype)
        attack = group[0].attack
        y_attack = targeted_labels(defended, yb) if attack.threat.targeted else yb
        seed = derive_seed(self.grid.seed, group_key, group[0].cell_id, start)
        x_adv = attack(view, xb, y_attack, eps=eps if k > 1 else None, seed=seed)
        with seeded(derive_seed(seed, "eval"), self.device):
            metrics, pred = evaluate_batch(defended, x_adv, yb)
        rows, invalid = [], {}
        for c, p in enumerate(group):
            sl = slice(c * m, (c + 1) * m)
            outcomes = _outcomes(metrics, pred, range(c * m, (c + 1) * m))
            rows += self._cell_rows(p, xb[sl], x_adv[sl], outcomes, defended.spec.success_threshold, start, done, clean, attrs, invalid)
        self.store.write_unit(rows, invalid)
        share = (time.perf_counter() - t0) / k
        return {p.cell_id: share for p in group}

    def _run_cascade_unit(self, group, view, defended, group_key, x_all, y_all, clean, attrs, start, stop, done) -> dict[str, float]:
        """The cells of ``group`` on samples ``start:stop`` as a cascade (``attack_only_robust``): in ascending eps,
        each attack runs only on the samples that are still robust; a sample already broken (clean-misclassified, or
        broken at a smaller eps) keeps its example, which is within every larger budget. Returns seconds per cell."""
        m, threshold = stop - start, defended.spec.success_threshold
        x, y = x_all[start:stop].to(self.device), y_all[start:stop].to(self.device)
        x_cur = x.clone()
        state = [_clean_outcome(clean[i]) for i in range(start, stop)]
        rows, invalid, seconds = [], {}, {}
        for p in sorted(group, key=lambda p: p.attack.threat.eps):
            t0 = time.perf_counter()
            alive = [j for j in range(m) if state[j]["score"] >= threshold]
            if alive:
                idx = torch.tensor(alive, device=self.device)
                seed = derive_seed(self.grid.seed, group_key, p.cell_id, start)
                x_adv = p.attack(view, x[idx], y[idx], seed=seed)
                with seeded(derive_seed(seed, "eval"), self.device):
                    metrics, pred = evaluate_batch(defended, x_adv, y[idx])
                x_cur[idx] = x_adv
                for j, outcome in zip(alive, _outcomes(metrics, pred, range(len(alive)))):
                    state[j] = outcome
            rows += self._cell_rows(p, x, x_cur, state, threshold, start, done, clean, attrs, invalid)
            seconds[p.cell_id] = time.perf_counter() - t0
        self.store.write_unit(rows, invalid)
        return seconds

    def _cell_rows(self, p: CellPlan, x, x_adv, outcomes: list[dict[str, Any]], threshold: float, start: int, done,
                   clean, attrs, invalid: dict[str, str]) -> list[dict[str, Any]]:
        """Budget check and per-sample rows of one cell on one unit (``outcomes``: score, pred, metrics per sample)."""
        report = check_budget(x, x_adv, p.attack.threat.norm, p.attack.threat.eps)
        if not report.valid:
            invalid[p.cell_id] = f"budget violated: {report.reason()}"
        if self.grid.save_adversarial:
            self._save_adv(p.cell_id, start, x_adv)
        rows = []
        for j, out in enumerate(outcomes):
            i = start + j
            if i in done[p.cell_id]:
                continue
            cl = clean[i]
            rows.append({
                "cell_id": p.cell_id, "sample_idx": i, "clean_score": cl["score"], "adv_score": out["score"],
                "clean_correct": cl["correct"], "adv_correct": int(out["score"] >= threshold), "clean_pred": cl["pred"],
                "adv_pred": out["pred"], "eps": p.attack.threat.eps,
                "linf": float(report.norms["Linf"][j]), "l2": float(report.norms["L2"][j]), "valid": int(report.valid),
                "metrics": {**out["metrics"], **_clean_extras(cl)}, "attrs": attrs[i],
            })
        return rows

    def _save_adv(self, cell_id: str, start: int, x_adv: torch.Tensor) -> None:
        from safetensors.torch import save_file

        path = self.out_dir / "adversarial" / cell_id / f"{start:06d}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"x_adv": x_adv.detach().cpu().contiguous()}, str(path))


def run_grid(grid: Grid | str | Path, out_dir: str | Path, *, device: str | None = None, progress: bool = True) -> Path:
    """Run ``grid`` (a :class:`Grid` or a YAML path) into ``out_dir/results.sqlite``; returns the store path."""
    if not isinstance(grid, Grid):
        grid = load_grid(grid)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with Store(out / "results.sqlite") as store:
        GridRunner(grid, store, resolve_device(device or grid.device), progress, out).run()
    return out / "results.sqlite"
