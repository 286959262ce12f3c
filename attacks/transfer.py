"""Transfer attack: PGD crafted on a surrogate victim, evaluated on the target victim.

Papernot, McDaniel, Goodfellow, "Transferability in Machine Learning: from Phenomena to Black-Box Attacks using
Adversarial Samples", arXiv 1605.07277 (2016); the check recommended against gradient masking by Athalye, Carlini,
Wagner, ICML 2018 and Carlini et al., "On Evaluating Adversarial Robustness" (2019): if examples crafted on a *dense*
surrogate (a plain CNN / U-Net without top-k routing or other non-smooth components) hurt the target more than the
target's own white-box gradients do, the white-box number is unreliable. The harness flags such cells
(``black_box_beats_white_box``: the attack's knowledge is ``'transfer'``).

The surrogate is a registered victim of the same task and label space (``surrogate``: its name; ``weights``: as in
:func:`robustbench_med.create_victim`, ``'auto'`` trains it with its recipe if missing). It sees the same inputs and
targets; the target victim is only evaluated by the harness.
"""
from __future__ import annotations

from typing import Any

import torch

from robustbench_med.attacks.pgd import PGD
from robustbench_med.errors import ConfigError, TaskNotSupportedError
from robustbench_med.registry import register_attack
from robustbench_med.victim import Victim


class TransferPGD(PGD):
    """L∞ / L2 PGD on a surrogate victim (knowledge ``'transfer'``; Papernot et al. 2016).

    Args:
        surrogate: registered victim name of the surrogate (e.g. ``'unet.phantom'`` for segmentors).
        surrogate_weights: weights of the surrogate (``'auto'``: cached or trained by its recipe).
        surrogate_params: keyword arguments of the surrogate's factory.
    """

    knowledge = "transfer"
    uses_eot = False  # the victim (and its randomised defence) is never queried

    def __init__(self, *, surrogate: str, surrogate_weights: str | None = "auto",
                 surrogate_params: dict[str, Any] | None = None, **kw: Any) -> None:
        super().__init__(**kw)
        from robustbench_med.registry import VICTIMS

        VICTIMS.get(surrogate)  # unknown names fail at construction, with suggestions
        if surrogate_params is not None and not isinstance(surrogate_params, dict):
            raise ConfigError(f"surrogate_params must be a mapping, got {surrogate_params!r}")
        self.surrogate_name, self.surrogate_weights = surrogate, surrogate_weights
        self.surrogate_params = dict(surrogate_params or {})
        self._surrogate: Victim | None = None

    def surrogate(self, device: torch.device) -> Victim:
        """The surrogate victim on ``device`` (built, and trained if missing, on first use)."""
        if self._surrogate is None:
            from robustbench_med.api import create_victim

            self._surrogate = create_victim(self.surrogate_name, weights=self.surrogate_weights, train_if_missing=True,
                                            progress=False, **self.surrogate_params).eval()
        return self._surrogate.to(device)

    def perturb(self, victim: Victim, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        source = self.surrogate(x.device)
        if source.task != victim.task:
            raise TaskNotSupportedError(f"surrogate {self.surrogate_name} solves {source.task!r}, the victim "
                                        f"{victim.card.name} solves {victim.task!r}")
        if source.card.input_size != victim.card.input_size:
            raise TaskNotSupportedError(f"surrogate {self.surrogate_name} takes inputs {source.card.input_size}, the victim "
                                        f"{victim.card.name} {victim.card.input_size}: choose a surrogate of the same input size")
        return super().perturb(source, x, y, eps)


@register_attack("transfer.pgd", norm="Linf", knowledge="transfer", paper="Papernot et al., arXiv 1605.07277")
def transfer_pgd(**kw: Any) -> TransferPGD:
    """PGD crafted on a dense surrogate victim and evaluated on the target (Papernot et al. 2016)."""
    return TransferPGD(**kw)
