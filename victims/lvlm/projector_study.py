"""The controlled 2D projector study: one vision tower, one LM, the projector swapped (issue #16 item 4).

"The Security Threat of Compressed Projectors in Large Vision-Language Models" (arXiv 2506.00534, EMNLP 2025)
compares LVLMs whose projector compresses the vision tokens (BLIP-2's Q-Former) with LVLMs whose projector keeps
one token per patch (LLaVA's MLP). Comparing ``blip2.tiny`` with ``llava.tiny`` confounds the projector with the LM
(OPT vs Llama), the prompt, the feature space and one training run per family. Here everything but the projector is
held fixed:

* **the same model**: a tiny ``LlavaForConditionalGeneration`` (CLIP ViT tower, 64×64 input, patch 8: 64 patch
  tokens; Llama LM; :func:`~robustbench_med.victims.lvlm.configs.build_tiny`) whose ``multi_modal_projector`` is
  replaced. For a training seed, the vision tower and the LM start from the same initial weights in every arm (they
  are drawn before the projector), and the vision tower is pre-trained by the same deterministic stage 1 and then
  frozen, so all arms of a seed read the very same vision tokens;
* **the arms** (:data:`ARMS`): ``mlp64`` (LLaVA's two-layer per-patch MLP: 64 LM tokens, *uncompressed*);
  ``pooled8`` (the 8×8 patch grid average-pooled to 2×4, then the same MLP: 8 tokens, compressed without learned
  queries); ``qformer8`` / ``qformer32`` (a BLIP-2 Q-Former from ``transformers`` — learned queries,
  self-attention and cross-attention to the patches, 2 layers — with 8 or 32 queries and a linear map to the LM
  width: BLIP-2's projector);
* **the same training** (:func:`train_study_victim`): stage 1 pre-trains the vision tower (per-patch anatomy
  histograms, :func:`~robustbench_med.victims.lvlm.train.pretrain_vision`); stage 1b trains every arm's projector
  alone with a linear answer probe on its output (:func:`pretrain_projector`; BLIP-2's representation stage, given to
  every arm so the Q-Former is not the only one with a head start); stage 2 trains projector and LM on the LM loss
  (:func:`~robustbench_med.victims.lvlm.train.train_lvlm`, vision frozen);
* **three training seeds** per arm (``projstudy.<arm>``, ``_s1``, ``_s2``): cards join the study
  (``extra['study'] = 'projector2d'``, ``arm``, ``training_seed``, ``reference_arm = 'mlp64'``), so
  ``seed_studies.md`` compares each compressed arm with the per-patch MLP across seeds
  (:mod:`robustbench_med.seed_studies`).

The attacks are the project's three knowledge levels (``attacks/projector.py``): white-box LM loss, projector-only
(vision tower + projector known, the distance of the projector output) and transfer from the same arm's next seed.
What is verified from the paper: its question (do compressed projectors make an LVLM more vulnerable, by knowledge
level); what is ours: the tiny scale, the phantom VQA data, the pooled-MLP arm and the attack implementations.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from robustbench_med.errors import ConfigError
from robustbench_med.registry import register_victim
from robustbench_med.training import TrainRecipe
from robustbench_med.victim import VictimCard
from robustbench_med.victims.lvlm.configs import TinyLVLMConfig, build_tiny
from robustbench_med.victims.lvlm.models import LVLMVictim

STUDY = "projector2d"
REFERENCE_ARM = "mlp64"
TRAINING_SEEDS = (0, 1, 2)
PROJECTOR_STEPS = 300  # stage 1b, every arm
VISION_STEPS = 200  # stage 1, as the tiny families
TRAINER_VERSION = 1
PAPER = "arXiv 2506.00534 (EMNLP 2025), compressed vs uncompressed projectors; controlled re-design"


@dataclass(frozen=True)
class Arm:
    """One projector of the study: its kind (``'mlp'``, ``'pooled'``, ``'qformer'``) and output token count."""

    kind: str
    tokens: int

    @property
    def compression(self) -> str:
        return "uncompressed" if self.kind == "mlp" else "compressed"


ARMS = {"mlp64": Arm("mlp", 64), "pooled8": Arm("pooled", 8), "qformer8": Arm("qformer", 8), "qformer32": Arm("qformer", 32)}


class PooledMLPProjector(nn.Module):
    """Average-pool the patch grid to ``grid`` tokens, then LLaVA's two-layer MLP (linear, GELU, linear)."""

    def __init__(self, vision_width: int, lm_width: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.grid = grid
        self.linear_1, self.linear_2 = nn.Linear(vision_width, lm_width), nn.Linear(lm_width, lm_width)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        b, n, d = patches.shape
        side = int(round(n ** 0.5))
        if side * side != n:
            raise ConfigError(f"the pooled projector needs a square patch grid, got {n} tokens")
        grid = patches.transpose(1, 2).reshape(b, d, side, side)
        pooled = F.adaptive_avg_pool2d(grid, self.grid).flatten(2).transpose(1, 2)
        return self.linear_2(F.gelu(self.linear_1(pooled)))


class QFormerProjector(nn.Module):
    """BLIP-2's projector: learned query tokens read the patches through a ``transformers`` Q-Former
    (``Blip2QFormerModel``), then a linear map to the LM width (Li et al., ICML 2023). The queries are drawn from
    N(0, 1): BLIP-2's zero init makes every cross-attention map uniform at the start (``stack.md`` §5.6)."""

    def __init__(self, vision_width: int, lm_width: int, n_queries: int, cfg: TinyLVLMConfig) -> None:
        super().__init__()
        from transformers import Blip2QFormerConfig, Blip2QFormerModel

        qcfg = Blip2QFormerConfig(hidden_size=cfg.hidden, num_hidden_layers=cfg.qformer_layers, num_attention_heads=cfg.heads,
                                  intermediate_size=cfg.intermediate, encoder_hidden_size=vision_width,
                                  cross_attention_frequency=1, initializer_range=cfg.qformer_init_range)
        qcfg._attn_implementation = "eager"
        self.qformer = Blip2QFormerModel(qcfg)
        self.query_tokens = nn.Parameter(torch.randn(1, n_queries, cfg.hidden))
        self.language_projection = nn.Linear(cfg.hidden, lm_width)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        query = self.query_tokens.expand(len(patches), -1, -1)
        out = self.qformer(query_embeds=query, encoder_hidden_states=patches, return_dict=True)
        return self.language_projection(out.last_hidden_state)


def build_projector(arm: Arm, vision_width: int, lm_width: int, cfg: TinyLVLMConfig) -> nn.Module | None:
    """The projector module of ``arm`` (``None``: keep LLaVA's own per-patch MLP)."""
    if arm.kind == "mlp":
        return None
    if arm.kind == "pooled":
        return PooledMLPProjector(vision_width, lm_width, (2, arm.tokens // 2))
    return QFormerProjector(vision_width, lm_width, arm.tokens, cfg)


class StudyVictim(LVLMVictim):
    """A tiny LLaVA whose projector is one arm of the study (module docstring); every LVLM attack and defence
    sees it as a LLaVA-family victim with ``arm.tokens`` visual tokens."""

    def __init__(self, model: nn.Module, processor: Any, card: VictimCard, arm: Arm, **kw: Any) -> None:
        self.arm = arm
        super().__init__(model, processor, "llava", card, **kw)

    def _count_visual_tokens(self) -> int:
        return self.arm.tokens


def build_study_model(arm: Arm, cfg: TinyLVLMConfig = TinyLVLMConfig()) -> tuple[nn.Module, Any]:
    """A tiny LLaVA with ``arm``'s projector; vision tower and LM are drawn first (the same in every arm for a seed)."""
    model, processor = build_tiny("llava", cfg)
    projector = build_projector(arm, model.config.vision_config.hidden_size, model.config.text_config.hidden_size, cfg)
    if projector is not None:
        model.model.multi_modal_projector = projector
    return model, processor


# ------------------------------------------------------------------------------------------------------ training
def pretrain_projector(victim: StudyVictim, x: torch.Tensor, y: torch.Tensor, *, steps: int, lr: float,
                       batch_size: int, gen: torch.Generator) -> float:
    """Stage 1b for every arm: the projector alone (vision tower frozen) learns, through a linear probe on its
    flattened output that is discarded afterwards, to predict the answer of one question of every type (BLIP-2's
    representation stage, Li et al., ICML 2023, with an answer probe for its text losses)."""
    from robustbench_med.victims.lvlm.train import answer_probe, fit_steps

    projector = victim.model.model.multi_modal_projector
    head, per_type, n_types, n_answers = answer_probe(victim.n_visual_tokens * victim.model.config.text_config.hidden_size, x.device)

    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            patches = victim.visual_features(x[idx], None, "vision")[:, 1:]  # CLS dropped, as LLaVA's 'default'
        logits = head(projector(patches).flatten(1)).view(len(idx), n_types, n_answers)
        return F.cross_entropy(logits.flatten(0, 1), y[idx][:, per_type].flatten())

    return fit_steps(list(projector.parameters()) + list(head.parameters()), loss_of, len(x), steps=steps, lr=lr,
                     batch_size=batch_size, gen=gen, device=x.device)


def train_study_victim(victim: StudyVictim, recipe: TrainRecipe, device: str | torch.device = "cpu",
                       progress: bool = False) -> dict[str, Any]:
    """Stages 1, 1b and 2 (module docstring) with ``recipe``; returns the validation metrics and timings."""
    from robustbench_med.api import create_dataset
    from robustbench_med.victims.lvlm.train import pretrain_vision, train_lvlm

    device = torch.device(device)
    train = create_dataset(recipe.dataset, split="train", n=recipe.n_train)
    x, y, mask = (train.images().to(device), train.targets("vqa").to(device), train.targets("mask").to(device))
    victim.to(device)
    gen = torch.Generator().manual_seed(recipe.seed)
    start = time.perf_counter()
    vision_loss = pretrain_vision(victim, x, mask, steps=VISION_STEPS, lr=recipe.lr, batch_size=64, gen=gen)
    victim.vision_tower.requires_grad_(False)
    projector_loss = pretrain_projector(victim, x, y, steps=PROJECTOR_STEPS, lr=recipe.lr, batch_size=64, gen=gen)
    first = time.perf_counter() - start
    metrics = train_lvlm(victim, recipe, vision_steps=0, qformer_steps=0, freeze_vision=True, device=device, progress=progress)
    metrics.update(vision_pretrain_loss=vision_loss, projector_pretrain_loss=projector_loss,
                   train_seconds=round(first + metrics["train_seconds"], 1))
    return metrics


def registry_trainer(name: str, path: Path, device: str | torch.device | None, progress: bool) -> None:
    """The registered ``trainer`` of the study's victims: train with the recipe and write weights + sidecar."""
    from robustbench_med.victims.lvlm.train import train_and_save

    train_and_save(name, path, train_study_victim, TRAINER_VERSION, device, progress)


# -------------------------------------------------------------------------------------------------- registration
def _card(name: str, arm_name: str, seed: int, notes: str) -> VictimCard:
    from robustbench_med.data.phantom import ANSWERS

    arm = ARMS[arm_name]
    return VictimCard(
        name=name, task="vqa", modality="CT (phantom)", input_size=(1, 64, 64), classes=ANSWERS, paper=PAPER, notes=notes,
        extra={"family": "llava", "projector": arm.compression, "projector_kind": arm.kind, "visual_tokens": arm.tokens,
               "study": STUDY, "arm": arm_name, "training_seed": seed, "reference_arm": REFERENCE_ARM},
    )


NOTES = {
    "mlp64": "tiny LLaVA, per-patch two-layer MLP projector (64 visual tokens, uncompressed)",
    "pooled8": "tiny LLaVA, patch grid average-pooled to 2×4 then the two-layer MLP (8 visual tokens, compressed)",
    "qformer8": "tiny LLaVA with a BLIP-2 Q-Former projector, 8 learned queries (8 visual tokens, compressed)",
    "qformer32": "tiny LLaVA with a BLIP-2 Q-Former projector, 32 learned queries (32 visual tokens, compressed)",
}


def study_name(arm: str, seed: int) -> str:
    """The registered name of ``arm`` trained with ``seed`` (``projstudy.<arm>``, ``_s1``, ``_s2``)."""
    return f"projstudy.{arm}" + (f"_s{seed}" if seed else "")


def _register(arm_name: str) -> None:
    for seed in TRAINING_SEEDS:
        name = study_name(arm_name, seed)
        note = NOTES[arm_name] + f"; training seed {seed}; the controlled projector study"

        def factory(_name: str = name, _note: str = note, _seed: int = seed, **kw: Any) -> StudyVictim:
            model, processor = build_study_model(ARMS[arm_name])
            victim = StudyVictim(model, processor, _card(_name, arm_name, _seed, _note), ARMS[arm_name], **kw)
            victim.card = replace(victim.card, params=sum(p.numel() for p in victim.parameters()))
            return victim.eval()

        factory.__doc__ = f"{name}: {note}."
        recipe = TrainRecipe(dataset="phantom.ct", target_field="vqa", n_train=1200, n_val=300, epochs=6, batch_size=32,
                             lr=2e-3, seed=seed)
        register_victim(name, card=_card(name, arm_name, seed, note), recipe=recipe, trainer=registry_trainer,
                        trainer_version=TRAINER_VERSION, task="vqa")(factory)


for _arm in ARMS:
    _register(_arm)
