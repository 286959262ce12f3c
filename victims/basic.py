"""The default-world victims: small CNNs, a U-Net segmentor, a landmark U-Net and a timm ResNet-18.

They are deliberately small so the whole default grid trains and runs on a laptop CPU in minutes. All take the
phantom's 1×64×64 CT-like slices (see :mod:`robustbench_med.data.phantom`).
"""
from __future__ import annotations

import torch
from torch import nn

from robustbench_med.registry import register_victim
from robustbench_med.training import TrainRecipe
from robustbench_med.victim import ModelVictim, VictimCard

PHANTOM_INPUT = (1, 64, 64)
PHANTOM_MEAN, PHANTOM_STD = [0.25], [0.25]
SEG_CLASSES = ("background", "body", "liver", "kidneys", "spine", "lesion")


def conv_block(cin: int, cout: int) -> nn.Sequential:
    """Two 3×3 convolutions with batch norm and ReLU (the U-Net block of Ronneberger et al., MICCAI 2015)."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """Three conv blocks, global average pooling and a linear head (LeCun-style CNN classifier)."""

    def __init__(self, in_ch: int = 1, num_outputs: int = 1, width: int = 16):
        super().__init__()
        self.block1 = nn.Sequential(conv_block(in_ch, width), nn.MaxPool2d(2))
        self.block2 = nn.Sequential(conv_block(width, 2 * width), nn.MaxPool2d(2))
        self.block3 = nn.Sequential(conv_block(2 * width, 4 * width), nn.MaxPool2d(2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.1)
        self.head = nn.Linear(4 * width, num_outputs)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.block3(self.block2(self.block1(z)))
        return self.head(self.dropout(self.pool(h).flatten(1)))


class UNet(nn.Module):
    """A 3-level U-Net (Ronneberger et al., "U-Net: Convolutional Networks for Biomedical Image Segmentation",
    MICCAI 2015) with ``encode`` / ``decode`` halves so latent-space defences can sit between them."""

    def __init__(self, in_ch: int = 1, out_ch: int = 6, width: int = 16):
        super().__init__()
        w = width
        self.enc1, self.enc2, self.enc3 = conv_block(in_ch, w), conv_block(w, 2 * w), conv_block(2 * w, 4 * w)
        self.bottleneck = conv_block(4 * w, 8 * w)
        self.pool = nn.MaxPool2d(2)
        self.up3, self.dec3 = nn.ConvTranspose2d(8 * w, 4 * w, 2, stride=2), conv_block(8 * w, 4 * w)
        self.up2, self.dec2 = nn.ConvTranspose2d(4 * w, 2 * w, 2, stride=2), conv_block(4 * w, 2 * w)
        self.up1, self.dec1 = nn.ConvTranspose2d(2 * w, w, 2, stride=2), conv_block(2 * w, w)
        self.head = nn.Conv2d(w, out_ch, 1)

    def encode(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """Encoder half: the bottleneck latent ``'z'`` plus the skip features."""
        s1 = self.enc1(z)
        s2 = self.enc2(self.pool(s1))
        s3 = self.enc3(self.pool(s2))
        return {"z": self.bottleneck(self.pool(s3)), "s1": s1, "s2": s2, "s3": s3}

    def decode(self, latent: dict[str, torch.Tensor]) -> torch.Tensor:
        """Decoder half: logits from the latent dict produced by :meth:`encode`."""
        h = self.dec3(torch.cat([self.up3(latent["z"]), latent["s3"]], 1))
        h = self.dec2(torch.cat([self.up2(h), latent["s2"]], 1))
        h = self.dec1(torch.cat([self.up1(h), latent["s1"]], 1))
        return self.head(h)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(z))


def _card(name: str, task: str, classes: tuple[str, ...], paper: str, **extra) -> VictimCard:
    return VictimCard(name=name, task=task, modality="CT (phantom)", input_size=PHANTOM_INPUT, classes=classes, paper=paper, extra=extra)


CNN_CARD = _card("cnn.phantom", "binary", ("absent", "present"), "LeCun et al., Proc. IEEE 1998 (CNN); single-logit head")
FINDINGS_CARD = _card("cnn.findings", "multilabel", ("lesion", "multiple_lesions", "enlarged_liver"), "LeCun et al., Proc. IEEE 1998 (CNN)")
RESNET_CARD = _card("resnet18.phantom", "classification", ("none", "cyst", "tumour"), "He et al., CVPR 2016 (timm resnet18)")
UNET_CARD = _card("unet.phantom", "segmentation", SEG_CLASSES, "Ronneberger et al., MICCAI 2015 (U-Net)")
LANDMARK_CARD = _card("unet.landmark", "landmark", ("spine", "liver", "left_kidney", "right_kidney"), "Payer et al., MedIA 2019 (heatmap regression with a U-Net)", sdr_radius=4.0, heatmap_sigma=2.0)


@register_victim(
    "cnn.phantom",
    card=CNN_CARD,
    recipe=TrainRecipe(target_field="label", epochs=5, lr=3e-3, n_train=1000),
)
def cnn_phantom() -> ModelVictim:
    """Lesion present/absent with a single-logit (BCE) head: the binary case AutoAttack's DLR cannot handle."""
    return ModelVictim(SmallCNN(num_outputs=1), CNN_CARD, PHANTOM_MEAN, PHANTOM_STD, ("block1", "block2", "block3"))


@register_victim(
    "cnn.findings",
    card=FINDINGS_CARD,
    recipe=TrainRecipe(target_field="findings", epochs=5, lr=3e-3, n_train=1000),
)
def cnn_findings() -> ModelVictim:
    """Multi-label findings (lesion, multiple lesions, enlarged liver) with per-label sigmoid outputs."""
    return ModelVictim(SmallCNN(num_outputs=3), FINDINGS_CARD, PHANTOM_MEAN, PHANTOM_STD, ("block1", "block2", "block3"))


@register_victim(
    "resnet18.phantom",
    card=RESNET_CARD,
    recipe=TrainRecipe(target_field="lesion_type", epochs=4, lr=2e-3, n_train=1000),
)
def resnet18_phantom() -> ModelVictim:
    """timm's ResNet-18 (random init, ``pretrained=False``) classifying the lesion type (none / cyst / tumour)."""
    import timm

    net = timm.create_model("resnet18", pretrained=False, in_chans=1, num_classes=3)
    return ModelVictim(net, RESNET_CARD, PHANTOM_MEAN, PHANTOM_STD, ("layer1", "layer2", "layer3", "layer4"))


@register_victim(
    "unet.phantom",
    card=UNET_CARD,
    recipe=TrainRecipe(target_field="mask", epochs=6, lr=3e-3, n_train=600, batch_size=16),
)
def unet_phantom() -> ModelVictim:
    """A small U-Net segmenting body, liver, kidneys, spine and lesions."""
    return ModelVictim(UNet(out_ch=len(SEG_CLASSES), width=12), UNET_CARD, PHANTOM_MEAN, PHANTOM_STD, ("enc1", "enc2", "enc3", "bottleneck"))


@register_victim(
    "unet.landmark",
    card=LANDMARK_CARD,
    recipe=TrainRecipe(target_field="landmarks", epochs=15, lr=3e-3, n_train=500),
)
def unet_landmark() -> ModelVictim:
    """Landmark detection by Gaussian-heatmap regression with a small U-Net (4 landmarks)."""
    return ModelVictim(UNet(out_ch=4, width=12), LANDMARK_CARD, PHANTOM_MEAN, PHANTOM_STD, ("enc1", "enc2", "enc3", "bottleneck"))
