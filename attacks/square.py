"""Square Attack (L∞) on the victim's task objective: a gradient-free check for every task.

Andriushchenko, Croce, Flammarion, Hein, "Square Attack: a query-efficient black-box adversarial attack via random
search", ECCV 2020. ``square.linf`` / ``square.l2`` (in :mod:`.torchattacks_adapters`) run torchattacks' version,
which needs class logits and a margin loss; ``square.objective`` is the same random search re-implemented on the
victim's per-sample objective (per-pixel cross-entropy for segmentors, heatmap MSE for landmark detectors, CE / BCE
for classifiers), so segmentors and landmark detectors also get a black-box attack next to their white-box one. That
pairing is the harness's gradient-masking check: when Square beats PGD at the same budget, the white-box number is
flagged (``black_box_beats_white_box``), e.g. on the top-k routing models of the zoo.

Algorithm (L∞ version of the paper): start from vertical stripes δ = ±ε per column and channel; at query i draw one
square window of side s_i = round(√(p_i · H · W)) at a uniform position (on volumes a cube of side
round(∛(p_i · D · H · W)), the paper's square in 3D; stripes run along the last axis) and set δ inside it to a fresh ±ε per channel;
keep the candidate for the samples whose objective increased. p_i follows the paper's piecewise-halving schedule from
``p_init`` rescaled to ``n_queries`` (the paper's breakpoints are for 10,000 queries).
"""
from __future__ import annotations

from typing import ClassVar

import torch

from robustbench_med.attack import Attack
from robustbench_med.attacks.pgd import ALL_IMAGE_TASKS, _view
from robustbench_med.errors import ConfigError
from robustbench_med.registry import register_attack
from robustbench_med.victim import Victim

BREAKPOINTS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)  # of 10,000 queries (Andriushchenko et al., §3)


def square_fraction(p_init: float, i: int, n_queries: int) -> float:
    """The fraction of pixels changed at query ``i``: ``p_init`` halved at each rescaled breakpoint passed."""
    scaled = int(i / n_queries * 10_000)
    return p_init / 2 ** sum(scaled > b for b in BREAKPOINTS)


class SquareObjective(Attack):
    """L∞ Square Attack maximising the victim's per-sample objective (Andriushchenko et al., ECCV 2020).

    Args:
        n_queries: objective evaluations per sample (one more for the initial stripes).
        p_init: initial fraction of pixels per square (the paper sets it per dataset; torchattacks defaults to 0.8,
            which on 64×64 phantom slices is one 57-pixel square).
    """

    tasks: ClassVar[frozenset[str]] = ALL_IMAGE_TASKS - {"vqa"}
    knowledge: ClassVar[str] = "black-box"
    supports_eps_batch: ClassVar[bool] = True

    def __init__(self, *, n_queries: int = 500, p_init: float = 0.3, **kw) -> None:
        kw.setdefault("steps", n_queries)
        super().__init__(**kw)
        if isinstance(n_queries, bool) or not isinstance(n_queries, int) or n_queries < 1:
            raise ConfigError(f"n_queries must be an integer >= 1, got {n_queries!r}")
        if not 0.0 < float(p_init) <= 1.0:
            raise ConfigError(f"p_init must lie in (0, 1], got {p_init!r}")
        if self.threat.norm != "Linf":
            raise ConfigError(f"square.objective is the L∞ Square Attack, not {self.threat.norm}")
        self.n_queries, self.p_init = n_queries, float(p_init)

    @torch.no_grad()
    def _score(self, victim: Victim, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.objective(victim, x, y).float()

    @torch.no_grad()
    def perturb(self, victim: Victim, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        b, c, spatial = len(x), x.shape[1], tuple(x.shape[2:])
        e, ones = _view(eps, x), [1] * len(spatial)
        stripes = torch.randint(0, 2, (b, c, *ones[1:], spatial[-1]), device=x.device).to(x.dtype) * 2 - 1
        best = (x + stripes.expand_as(x) * e).clamp(0, 1)
        best_score = self._score(victim, best, y)
        for i in range(self.n_queries):
            window = random_window(b, spatial, square_fraction(self.p_init, i, self.n_queries), x.device)
            signs = torch.randint(0, 2, (b, c, *ones), device=x.device).to(x.dtype) * 2 - 1
            cand = (x + torch.where(window, signs * e, best - x)).clamp(0, 1)
            score = self._score(victim, cand, y)
            better = score > best_score
            best = torch.where(_view(better, x), cand, best)
            best_score = torch.where(better, score, best_score)
        return best


def random_window(b: int, spatial: tuple[int, ...], fraction: float, device: torch.device) -> torch.Tensor:
    """A boolean mask [b, 1, *spatial] of one square (slices) or cube (volumes) per sample covering about
    ``fraction`` of the pixels / voxels (side ``round((fraction · Π spatial)^(1/d))``), at a uniform position."""
    numel = 1
    for n in spatial:
        numel *= n
    side = max(1, min(*spatial, round((fraction * numel) ** (1.0 / len(spatial)))))
    window = torch.ones((b, 1, *spatial), dtype=torch.bool, device=device)
    for axis, n in enumerate(spatial):
        start = torch.randint(0, n - side + 1, (b,), device=device)
        shape = [1] * len(spatial)
        shape[axis] = n
        idx = torch.arange(n, device=device).view(1, 1, *shape)
        lo = start.view(b, 1, *[1] * len(spatial))
        window &= (idx >= lo) & (idx < lo + side)
    return window


@register_attack("square.objective", norm="Linf", knowledge="black-box", paper="Andriushchenko et al., ECCV 2020")
def square_objective(**kw) -> SquareObjective:
    """L∞ Square Attack (Andriushchenko et al., ECCV 2020) on the victim's objective: every image task."""
    return SquareObjective(**kw)
