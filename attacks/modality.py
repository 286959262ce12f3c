"""Missing and attacked modalities: ``modality.dropout`` (sequences not acquired) and ``modality.pgd`` (an Lp attack
that may touch one sequence only), for multi-channel victims such as those of ``phantom.multiseq``.

The missing-modality protocol of incomplete multi-modal segmentation (HeMIS, Havaei et al., MICCAI 2016; RFNet, Ding
et al., ICCV 2021; mmFormer, Zhang et al., MICCAI 2022; DMAF-Net, Lan et al., arXiv 2506.11691) evaluates a model on
every non-empty subset of the sequences, a missing one being zero-filled. ``modality.dropout`` is that shift as a
threat model: no eps ball, a fixed set of dropped sequences. It is of the *corruption* kind
(:mod:`robustbench_med.threat`): its ``eps`` is the severity, here the number of dropped sequences, so the grid, store
and leaderboard group it like the common corruptions (entries keyed ``corruption-s<k>``), and
:mod:`robustbench_med.modality_metrics` reports every subset, the mean and the worst over subsets. A grid lists one
cell per subset: ``{name: modality.dropout, params: {drop: [t1, t1ce, t1+t2, …]}}``.

``modality.pgd`` asks the adversarial question for one sequence: an attacker who can alter one acquisition (one
scanner protocol, one upload) but not the others. It is PGD (Madry et al., ICLR 2018) with the perturbation masked to
that channel at the random start and after every step; masking a perturbation never increases its Lp norm, so the
iterate stays in the ball.

Both check their own contract beyond the Lp budget (:meth:`~robustbench_med.attack.Attack.violations`): channels
outside the threat are unchanged bit for bit, and a dropped channel is exactly zero. Sequence names (``t1``, ``t1ce``,
``t2``, ``flair`` …) are resolved against the victim card's ``extra['modalities']``; channel numbers work for any
multi-channel victim.
"""
from __future__ import annotations

from typing import Any, ClassVar, Sequence

import torch

from robustbench_med.attack import Attack
from robustbench_med.errors import ConfigError
from robustbench_med.registry import register_attack
from robustbench_med.threat import CORRUPTION
from robustbench_med.victim import Victim
from robustbench_med.attacks.pgd import ALL_IMAGE_TASKS, PGD

Channel = str | int
IMAGE_TASKS = ALL_IMAGE_TASKS - {"vqa"}  # an LVLM's channels are colours, not acquisitions


def parse_channels(value: Any, what: str) -> tuple[Channel, ...]:
    """``'t1+flair'``, ``'t1'``, ``2``, ``['t1', 3]`` → a tuple of lower-case names / channel numbers (no repeats)."""
    items = value.split("+") if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else [value]
    out: list[Channel] = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (str, int)) or (isinstance(item, int) and item < 0):
            raise ConfigError(f"{what}: a sequence is a name or a channel number >= 0, got {item!r}")
        item = item.strip().lower() if isinstance(item, str) else item
        if item == "" or item in out:
            raise ConfigError(f"{what}: empty or repeated sequence in {value!r}")
        out.append(item)
    if not out:
        raise ConfigError(f"{what}: name at least one sequence")
    return tuple(out)


def resolve_channels(victim: Victim, channels: Sequence[Channel], what: str) -> list[int]:
    """Channel numbers of ``channels`` on ``victim`` (names looked up in its card's ``extra['modalities']``)."""
    names = tuple(str(m).lower() for m in victim.card.extra.get("modalities", ()))
    n = victim.card.input_size[0]
    out = []
    for c in channels:
        if isinstance(c, int):
            if c >= n:
                raise ConfigError(f"{what}: channel {c} out of range for {victim.card.name} ({n} channels)")
            out.append(c)
        elif c in names:
            out.append(names.index(c))
        else:
            raise ConfigError(f"{what}: {victim.card.name} has no sequence {c!r}; its sequences are {names or 'unnamed'} "
                              f"(or give channel numbers 0..{n - 1})")
    return out


def _changed_outside(x: torch.Tensor, x_adv: torch.Tensor, allowed: Sequence[int]) -> int:
    other = [c for c in range(x.shape[1]) if c not in allowed]
    return int((x_adv[:, other] != x[:, other]).flatten(1).any(1).sum()) if other else 0


class ModalityDropout(Attack):
    """Drop sequences (zero their channels): the missing-modality threat of incomplete multi-modal segmentation.

    Args:
        drop: the sequences not acquired (``'t1+t2'``, a name, a channel number, or a list; default channel 0); at
            least one must stay, so a single-channel victim is refused.
        seed, eot: unused (the threat is deterministic and never queries the victim); eot must stay 1.
    """

    tasks: ClassVar[frozenset[str]] = IMAGE_TASKS
    knowledge: ClassVar[str] = "none"
    uses_eot: ClassVar[bool] = False
    sample_independent: ClassVar[bool] = True
    default_norm: ClassVar[str] = CORRUPTION
    name = "modality.dropout"

    def __init__(self, *, drop: Any = 0, seed: int = 0, eot: int = 1) -> None:
        self.drop = parse_channels(drop, self.name)
        super().__init__(norm=CORRUPTION, eps=len(self.drop), seed=seed, eot=eot)

    def __repr__(self) -> str:
        return f"ModalityDropout(drop={'+'.join(map(str, self.drop))})"

    def _dropped(self, victim: Victim) -> list[int]:
        idx = resolve_channels(victim, self.drop, self.name)
        if len(idx) >= victim.card.input_size[0]:
            raise ConfigError(f"{self.name}: dropping {'+'.join(map(str, self.drop))} leaves {victim.card.name} no sequence")
        return idx

    def perturb(self, victim: Victim, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        out[:, self._dropped(victim)] = 0
        return out

    def violations(self, victim: Victim, x: torch.Tensor, x_adv: torch.Tensor) -> str:
        dropped = self._dropped(victim)
        bad = [f"{_changed_outside(x, x_adv, dropped)} samples changed a kept sequence"] if _changed_outside(x, x_adv, dropped) else []
        nonzero = int((x_adv[:, dropped] != 0).flatten(1).any(1).sum())
        return "; ".join(bad + ([f"{nonzero} samples have a dropped sequence that is not zero"] if nonzero else []))


class ModalityPGD(PGD):
    """PGD whose perturbation is confined to one (or a few) sequences; the others are left bit-identical.

    Args:
        modality: the sequence(s) the attacker controls (``'t1ce'``, a channel number, ``'t1+t2'``; default channel 0).
        eps, steps, step_size, restarts, eot, seed: as for ``pgd.linf`` (the threat is L∞).
    """

    name = "modality.pgd"
    tasks: ClassVar[frozenset[str]] = IMAGE_TASKS

    def __init__(self, *, modality: Any = 0, **kw: Any) -> None:
        self.modality = parse_channels(modality, self.name)
        super().__init__(**kw)

    def __repr__(self) -> str:
        return f"ModalityPGD({'+'.join(map(str, self.modality))}, {self.threat})"

    def perturb(self, victim: Victim, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros(1, x.shape[1], 1, 1, dtype=x.dtype, device=x.device)
        mask[:, resolve_channels(victim, self.modality, self.name)] = 1
        self._mask = mask
        try:
            return super().perturb(victim, x, y, eps)
        finally:
            del self._mask

    def restrict(self, x: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
        return torch.where(self._mask.bool(), x_adv, x)

    def violations(self, victim: Victim, x: torch.Tensor, x_adv: torch.Tensor) -> str:
        n = _changed_outside(x, x_adv, resolve_channels(victim, self.modality, self.name))
        return f"{n} samples changed a sequence outside {'+'.join(map(str, self.modality))}" if n else ""


@register_attack("modality.dropout", knowledge="none", kind="corruption",
                 paper="Missing-modality protocol (HeMIS, MICCAI 2016; RFNet, ICCV 2021; DMAF-Net, arXiv 2506.11691)")
def modality_dropout(**kw: Any) -> ModalityDropout:
    """Zero-fill the named sequences (missing modalities); severity = how many are dropped."""
    return ModalityDropout(**kw)


@register_attack("modality.pgd", norm="Linf", knowledge="white-box", paper="Madry et al., ICLR 2018; one sequence only")
def modality_pgd(**kw: Any) -> ModalityPGD:
    """L∞ PGD on one sequence of a multi-channel victim; the other sequences stay untouched."""
    kw.setdefault("norm", "Linf")
    return ModalityPGD(**kw)
