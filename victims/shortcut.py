"""Segmentors of the APPLE shortcut study, trained by recipe on ``phantom.shortcut`` (see
:mod:`robustbench_med.data.phantom`, "The shortcut scenario").

``phantom.shortcut``'s train split is the positive control's biased training distribution: the masks are independent
of sex, the image carries sex in a grating (F horizontal, M vertical stripes), and every F lesion image has
its lesions unannotated. A segmentor trained on it can use the stripes as a shortcut ("F → no lesion"); on the
unbiased val / test splits that shortcut is a group gap against F. The architectures are those of ``unet.phantom``,
``mslaunet.tiny`` and ``dssaunet.tiny`` with their training recipes on the shortcut data (the U-Net with 1,000
images and 8 epochs instead of 600 and 6):

- ``unet.shortcut``, ``mslaunet.shortcut``, ``dssaunet.shortcut``: trained on ``phantom.shortcut`` (biased train);
- ``unet.shortcut_balanced``: the control, the same U-Net and recipe on ``phantom.shortcut_balanced`` (the same images
  with every lesion annotated): no reason to use the shortcut, so its gap should be near 0.
"""
from __future__ import annotations

from dataclasses import replace
from functools import partial

from robustbench_med.registry import register_victim
from robustbench_med.training import TrainRecipe
from robustbench_med.victim import ModelVictim, VictimCard
from robustbench_med.victims.basic import PHANTOM_INPUT, PHANTOM_MEAN, PHANTOM_STD, SEG_CLASSES, UNet
from robustbench_med.victims.zoo import common as C
from robustbench_med.victims.zoo import dssaunet as _dssa
from robustbench_med.victims.zoo import mslaunet as _msla

NOTE = ("APPLE shortcut study (positive control): trained on phantom.shortcut's train split, where sex is in the image "
        "appearance only and no F lesion is annotated.")
# unet.phantom's recipe with more data and epochs (600 → 1000 images, 6 → 8 epochs): with half of the lesions
# unannotated and lesion contrast ×0.725 (an earlier design), unet.phantom's 600 × 6 never learnt the lesion class
# (val lesion Dice 0 for both sexes, measured); the final design has contrast ×1.0 and this recipe.
UNET_RECIPE = TrainRecipe(dataset="phantom.shortcut", target_field="mask", epochs=8, lr=3e-3, n_train=1000, batch_size=16)


def _unet_card(name: str, note: str) -> VictimCard:
    return VictimCard(name=name, task="segmentation", modality="CT (phantom, shortcut scenario)", input_size=PHANTOM_INPUT,
                      classes=SEG_CLASSES, paper="Ronneberger et al., MICCAI 2015 (U-Net)", notes=note)


def _unet(card: VictimCard) -> ModelVictim:
    return ModelVictim(UNet(out_ch=len(SEG_CLASSES), width=12), card, PHANTOM_MEAN, PHANTOM_STD,
                       ("enc1", "enc2", "enc3", "bottleneck"))


UNET_CARD = _unet_card("unet.shortcut", f"unet.phantom's architecture; its recipe with 1,000 images and 8 epochs. {NOTE}")
BALANCED_CARD = _unet_card("unet.shortcut_balanced", "unet.shortcut's architecture and recipe on phantom.shortcut_balanced "
                           "(the shortcut scenario with every lesion annotated): the control of the APPLE shortcut study.")


@register_victim("unet.shortcut", card=UNET_CARD, recipe=UNET_RECIPE)
def unet_shortcut() -> ModelVictim:
    """unet.phantom's U-Net trained on the biased train split of ``phantom.shortcut`` (positive control)."""
    return _unet(UNET_CARD)


@register_victim("unet.shortcut_balanced", card=BALANCED_CARD, recipe=replace(UNET_RECIPE, dataset="phantom.shortcut_balanced"))
def unet_shortcut_balanced() -> ModelVictim:
    """The same U-Net and recipe on ``phantom.shortcut_balanced`` (no annotation bias): the control."""
    return _unet(BALANCED_CARD)


def _register_zoo() -> None:
    seg = C.SegmentationLossVictim
    for name, module, build, recipe, extra in (
        ("mslaunet.shortcut", _msla, partial(_msla.MSLAUNet, _msla.MSLAUNET_TINY, len(SEG_CLASSES)),
         C.tiny_recipe("mask", n_train=1000, epochs=4, lr=5e-3), {"loss_weights": (0.4, 0.6)}),
        ("dssaunet.shortcut", _dssa, partial(_dssa.DSSAUNet, _dssa.DSSAUNET_TINY, len(SEG_CLASSES), 32, (1, 1, 1, 1)),
         C.tiny_recipe("mask", n_train=800, epochs=4, lr=5e-3), {"loss_weights": (0.5, 0.5), "routing": "dssa"}),
    ):
        tiny = name.replace(".shortcut", ".tiny")
        card = C.tiny_card(name, "segmentation", module.PAPER, *module.COSTS[tiny],
                           f"{tiny}'s architecture and recipe. {NOTE}", **extra)
        C.register_zoo(name, card, build, C.PHANTOM_MEAN, C.PHANTOM_STD, module.LAYERS,
                       recipe=replace(recipe, dataset="phantom.shortcut"), cls=seg)


_register_zoo()
