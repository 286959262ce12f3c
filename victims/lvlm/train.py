"""Training the tiny LVLMs on the phantom VQA bank (teacher-forced LM loss of the reference answers).

Every step draws a batch of training images and, per image, ``questions_per_image`` questions uniformly from the
whole bank (both phrasing pools, so the model can answer every question); the loss is the LM cross-entropy of the
answer tokens and EOS (Li et al., ICML 2023 and Liu et al., NeurIPS 2023 train their LVLMs with the same
next-token objective). AdamW with a one-cycle schedule, deterministic under the recipe's seed.

:func:`registry_trainer` is the ``trainer`` registered with the tiny victims (``robustbench_med.training`` dispatches
to it): it trains, reports the clean VQA accuracy next to the majority-answer baseline, and writes the safetensors
weights (with a sidecar) plus a ``save_pretrained`` directory (model, processor and tokenizer) beside them.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from robustbench_med.training import TrainRecipe
from robustbench_med.victims.lvlm.models import LVLMVictim, vqa_bank


VISION_STEPS = 200  # stage-1 steps of the registered recipes
TRAINER_VERSION = 2  # bump when the loop or the tiny models' initialisation changes (cached weights retrain)


def majority_answers(y_train: torch.Tensor) -> torch.Tensor:
    """The most frequent training answer of every question [Q] (the majority-answer baseline)."""
    return torch.stack([torch.bincount(col, minlength=len(vqa_bank()[1])).argmax() for col in y_train.long().t()])


def majority_accuracy(victim: LVLMVictim, y_train: torch.Tensor, y_eval: torch.Tensor) -> float:
    """Accuracy of always answering each question's majority answer, on ``victim``'s evaluation questions."""
    q = victim.evaluation_questions(y_eval)
    guess = majority_answers(y_train)[q]
    return float((guess == y_eval.long().gather(1, q)).float().mean())


@torch.no_grad()
def vqa_accuracy(victim: LVLMVictim, x: torch.Tensor, y: torch.Tensor, batch_size: int = 64) -> float:
    """Mean clean ``vqa_accuracy`` of ``victim`` on images ``x`` (evaluation questions of each image)."""
    victim.eval()
    scores = [victim.evaluate(x[i:i + batch_size], y[i:i + batch_size])["vqa_accuracy"] for i in range(0, len(x), batch_size)]
    return float(torch.cat(scores).mean())


def patch_targets(mask: torch.Tensor, patch: int, n_classes: int = 6) -> torch.Tensor:
    """Per-patch class histograms [B, P, K] of a segmentation mask (the dense vision pre-training target)."""
    onehot = F.one_hot(mask.long(), n_classes).permute(0, 3, 1, 2).float()
    return F.avg_pool2d(onehot, patch).flatten(2).transpose(1, 2)


def fit_steps(params: list[nn.Parameter], loss_of: Any, n: int, *, steps: int, lr: float, batch_size: int,
              gen: torch.Generator, device: torch.device) -> float:
    """``steps`` AdamW steps (one-cycle schedule) of ``loss_of(idx)`` on random mini-batches ``idx`` of ``range(n)``
    drawn from ``gen``; the last loss. The loop of every pre-training stage (vision tower, Q-Former, projector)."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    loss = torch.zeros(())
    for _ in range(steps):
        idx = torch.randint(0, n, (batch_size,), generator=gen).to(device)
        loss = loss_of(idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return float(loss.detach())


def pretrain_vision(victim: LVLMVictim, x: torch.Tensor, mask: torch.Tensor, *, steps: int, lr: float,
                    batch_size: int, gen: torch.Generator) -> float:
    """Stage 1: pre-train the vision tower to predict each patch's anatomy histogram (a linear probe head that is
    discarded afterwards), standing in for the pre-trained vision encoders real LVLMs start from."""
    patch = victim.model.config.vision_config.patch_size * x.shape[-1] // victim.image_size
    tower = victim.vision_tower
    head = nn.Linear(tower.config.hidden_size, 6).to(x.device)
    n_patches = victim.image_size ** 2 // victim.model.config.vision_config.patch_size ** 2

    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        feats = victim.visual_features(x[idx], None, "vision")[:, -n_patches:]
        return -(patch_targets(mask[idx], patch) * head(feats).log_softmax(-1)).sum(-1).mean()

    return fit_steps(list(tower.parameters()) + list(head.parameters()), loss_of, len(x), steps=steps, lr=lr,
                     batch_size=batch_size, gen=gen, device=x.device)


def answer_probe(width: int, device: torch.device) -> tuple[nn.Linear, torch.Tensor, int, int]:
    """A linear probe from ``width`` features to the answer of one question of every type (the representation
    stages' head, discarded afterwards): the head, those questions' ids, the number of types and of answers."""
    bank, answers = vqa_bank()
    types = sorted({q.qtype for q in bank})
    per_type = torch.tensor([next(q.id for q in bank if q.qtype == t) for t in types], device=device)
    return nn.Linear(width, len(types) * len(answers)).to(device), per_type, len(types), len(answers)


def pretrain_qformer(victim: LVLMVictim, x: torch.Tensor, y: torch.Tensor, *, steps: int, lr: float,
                     batch_size: int, gen: torch.Generator) -> float:
    """Stage 1b (BLIP-2 / InstructBLIP): representation learning of the Q-Former with the vision tower frozen.

    BLIP-2 (Li et al., ICML 2023) first trains the Q-Former alone, with text supervision, to extract the visual
    features the text needs, and only then connects it to the LM. Here a linear probe on the (instruction-free)
    query outputs predicts the answer of every question type (the probe is discarded afterwards). Without this
    stage the tiny Q-Former's output hardly depends on the image (the learned queries dominate the residual
    stream) and the LM settles in the answer priors.
    """
    width = victim.n_visual_tokens * victim.model.config.qformer_config.hidden_size
    head, per_type, n_types, n_answers = answer_probe(width, x.device)

    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            embeds = victim.visual_features(x[idx], None, "vision")
        query = victim._instructblip_qformer(embeds, None) if victim.family == "instructblip" else _blip2_qformer(victim, embeds)
        logits = head(query.flatten(1)).view(len(idx), n_types, n_answers)
        return F.cross_entropy(logits.flatten(0, 1), y[idx][:, per_type].flatten())

    params = list(victim.model.qformer.parameters()) + [victim.model.query_tokens] + list(head.parameters())
    return fit_steps(params, loss_of, len(x), steps=steps, lr=lr, batch_size=batch_size, gen=gen, device=x.device)


def _blip2_qformer(victim: LVLMVictim, embeds: torch.Tensor) -> torch.Tensor:
    """BLIP-2's Q-Former query output for given vision-tower tokens."""
    query = victim.model.query_tokens.expand(len(embeds), -1, -1)
    out = victim.model.qformer(query_embeds=query, encoder_hidden_states=embeds, return_dict=True)
    return out.last_hidden_state


def _batches(n: int, batch_size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless shuffled mini-batches of ``range(n)`` (one fresh permutation per epoch)."""
    while True:
        order = torch.randperm(n, generator=gen)
        yield from (order[i:i + batch_size] for i in range(0, n, batch_size))


def _lr_factor(step: int, grounding_steps: int, main_steps: int, warmup: int = 20) -> float:
    """Linear warm-up, constant through the grounding phase, cosine decay to 10 % over the main phase."""
    if step < warmup:
        return (step + 1) / warmup
    if step < grounding_steps:
        return 1.0
    progress = min(1.0, (step - grounding_steps) / max(1, main_steps))
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))


def train_lvlm(
    victim: LVLMVictim,
    recipe: TrainRecipe,
    *,
    questions_per_image: int = 2,
    vision_steps: int = 200,
    qformer_steps: int = 300,
    grounding_steps: int = 100,
    grounding_mix: float = 0.25,
    freeze_vision: bool = True,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict[str, Any]:
    """Train ``victim`` in place with ``recipe`` on the phantom VQA bank; return validation metrics and timing.

    Stage 1 (:func:`pretrain_vision`, ``vision_steps``) pre-trains the vision tower, then (BLIP-2 / InstructBLIP)
    :func:`pretrain_qformer` the Q-Former (``qformer_steps``). Stage 2 trains the projector
    and LM (and the vision tower unless ``freeze_vision``) on the LM loss: a grounding phase of ``grounding_steps``
    on the presence questions only, then ``recipe.epochs`` epochs on the whole bank in which each question is still
    a presence question with probability ``grounding_mix``. Without the grounding phase the tiny models often settle
    in the answer priors (the question alone predicts half the answers) and never learn to read the visual tokens;
    without the mix they partly forget it.
    """
    from robustbench_med.api import create_dataset
    from robustbench_med.training import _progress

    device = torch.device(device)
    train = create_dataset(recipe.dataset, split="train", n=recipe.n_train)
    val = create_dataset(recipe.dataset, split="val", n=recipe.n_val)
    x, y = train.images().to(device), train.targets("vqa").to(device)
    victim.to(device)
    gen = torch.Generator().manual_seed(recipe.seed)
    start = time.perf_counter()
    vision_loss = pretrain_vision(victim, x, train.targets("mask").to(device), steps=vision_steps, lr=recipe.lr,
                                  batch_size=64, gen=gen) if vision_steps else None
    tower = victim.vision_tower
    qformer_loss = None
    if victim.has_qformer and qformer_steps:
        qformer_loss = pretrain_qformer(victim, x, y, steps=qformer_steps, lr=recipe.lr, batch_size=64, gen=gen)
    tower.requires_grad_(not freeze_vision)
    opt = torch.optim.AdamW([p for p in victim.parameters() if p.requires_grad], lr=recipe.lr, weight_decay=recipe.weight_decay)
    main_steps = recipe.epochs * ((len(x) + recipe.batch_size - 1) // recipe.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: _lr_factor(t, grounding_steps, main_steps))
    all_q = torch.arange(len(vqa_bank()[0]))
    grounding_q = torch.tensor([q.id for q in vqa_bank()[0] if q.qtype == "presence"])
    bar = _progress(grounding_steps + main_steps, f"train {victim.card.name}", progress)
    batches = _batches(len(x), recipe.batch_size, gen)
    victim.train()
    loss = torch.zeros(())
    for step in range(grounding_steps + main_steps):
        idx = next(batches).to(device)
        q = all_q[torch.randint(0, len(all_q), (len(idx), questions_per_image), generator=gen)]
        mix = 1.0 if step < grounding_steps else grounding_mix
        ground = torch.rand(q.shape, generator=gen) < mix
        q = torch.where(ground, grounding_q[torch.randint(0, len(grounding_q), q.shape, generator=gen)], q).to(device)
        loss = victim.lm_loss(x[idx], y[idx], q).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.update(1)
    bar.close()
    seconds = time.perf_counter() - start
    tower.requires_grad_(True)
    victim.eval()
    xv, yv = val.images().to(device), val.targets("vqa").to(device)
    return {
        "val_vqa_accuracy": vqa_accuracy(victim, xv, yv),
        "val_majority_accuracy": majority_accuracy(victim, y.cpu(), yv.cpu()),
        "train_seconds": round(seconds, 1),
        "final_loss": round(float(loss.detach()), 4),
        "vision_pretrain_loss": vision_loss,
        "qformer_pretrain_loss": qformer_loss,
        "train_fingerprint": train.fingerprint(),
    }


def registry_trainer(name: str, path: Path, device: str | torch.device | None, progress: bool) -> None:
    """The ``trainer`` of the tiny LVLM victims: train with the registered recipe and save to ``path``."""
    from robustbench_med.api import create_victim
    from robustbench_med.training import recipe_for
    from robustbench_med.weights import save_weights

    recipe = recipe_for(name)
    torch.manual_seed(recipe.seed)
    victim = create_victim(name, weights=None)
    metrics = train_lvlm(victim, recipe, vision_steps=VISION_STEPS, device=device or "cpu", progress=progress)
    meta = {"victim": name, "recipe": asdict(recipe), "val_metric": {"vqa_accuracy": metrics["val_vqa_accuracy"]},
            **metrics, "torch": torch.__version__, "trainer_version": TRAINER_VERSION}
    save_weights(victim, path, meta)
    victim.save_pretrained(str(hf_dir(path)))


def train_and_save(name: str, path: Path, train_fn: Any, trainer_version: int, device: str | torch.device | None,
                   progress: bool) -> None:
    """A registered VQA victim's ``trainer`` body: build ``name`` untrained, train it with its recipe
    (``train_fn(victim, recipe, device=..., progress=...)`` → metrics with ``val_vqa_accuracy``) and write its weights
    and sidecar (recipe, metrics, trainer version, thread count, torch version) to ``path``."""
    from robustbench_med.training import recipe_for
    from robustbench_med.weights import save_weights
    from robustbench_med.wrap import build_victim

    recipe = recipe_for(name)
    torch.manual_seed(recipe.seed)
    victim = build_victim(name)
    metrics = train_fn(victim, recipe, device=device or "cpu", progress=progress)
    meta = {"victim": name, "recipe": asdict(recipe), "val_metric": {"vqa_accuracy": metrics["val_vqa_accuracy"]},
            **metrics, "trainer_version": trainer_version, "train_threads": torch.get_num_threads(),
            "torch": torch.__version__}
    save_weights(victim, path, meta)


def hf_dir(weights_file: str | Path) -> Path:
    """The ``save_pretrained`` directory written beside a tiny victim's safetensors file."""
    p = Path(weights_file)
    return p.with_name(p.name.removesuffix(".safetensors") + ".hf")
