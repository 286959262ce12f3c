"""Loading checkpoints of the authors' released code into the zoo's re-implementations.

A :class:`KeyMap` renames the keys of a state dict saved from a released model definition to the names of the zoo
module, reshapes the 1×1-convolution projections that the zoo holds as linear maps, and leaves out the keys of
modules that the released forward pass never calls. :func:`convert_released` applies it and checks the result
against the target module (every key present, no key left over, every shape equal); :func:`load_released` reads a
file with :func:`robustbench_med.weights.read_state_dict` (safetensors, or ``torch.load(weights_only=True)``; nothing is
unpickled) and loads the converted state dict with ``strict=True``.

The released definitions and the checkpoints their READMEs publish:

=====================  ==============================================  ===========================================
zoo module             released definition (state-dict root)           published checkpoint
=====================  ==============================================  ===========================================
``BiFormer`` (BRA)     rayleizhu/BiFormer ``models/biformer.py``       ImageNet-1k T/S/B (README)
``BiFormer`` (DSSA)    XiaZunhui/MedFormer ``models/medformer.py``     none in the README
``BRAUNetPP``          Caipengzhou/BRAU-Netplusplus ``BRAUnet``        Synapse model (README, Google Drive)
``BRAUNet``            Caipengzhou/BRAU-Net ``BRAUnet``                none (the README links data only)
``MSLAUNet``           Monsoon49/MSLAU-Net ``MSLAU_net``               encoder ``best.pth`` (README; loaded by
                                                                       ``load_from`` with ``strict=False``)
``DSSAUNet``           XiaZunhui/DSSAU-Net ``DSSAU_Net``               encoder ``pretrain.pth`` (README)
``WaveNetSF``          liuliutaotao64/WaveNet-SF ``FusionModule``      pretrained models (README, Google Drive)
=====================  ==============================================  ===========================================

The forward passes of ``BRAUNetPP``, ``BRAUNet`` and ``MSLAUNet`` deviate from their releases by default (documented
fixes); released weights go into a model built with ``release_compat=True``, which computes the released forward.
The other mapped modules have no forward deviation at the published sizes. Not mapped: HAN (the release is an
mmpose 0.x fork that does not import as released, and publishes no checkpoint) and MedFormer's mmseg segmentation
model (no checkpoint published). Checkpoints of an encoder alone (MSLAU-Net,
DSSAU-Net, the BiFormer-B initialisation of BRAU-Net++) do not hold a whole model and load with ``strict=False`` into
the encoder by the authors' own ``load_from``; :func:`convert_released` with ``partial=True`` converts them.

The key lists of the released definitions are stored, as names and shapes only, under
``tests/fixtures/zoo_released/``; ``tests/test_zoo_compat.py`` checks that every one of them loads strictly.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from robustbench_med.errors import WeightsError

__all__ = ["KeyMap", "released_key_map", "convert_released", "load_released", "read_released", "released_victim"]


@dataclass(frozen=True)
class KeyMap:
    """Released key names → zoo key names.

    ``rules`` are ``(pattern, replacement)`` pairs applied in order with :func:`re.sub` to every released key;
    ``unused`` are full-match patterns of released keys whose modules the released forward never calls (they are
    dropped); ``fixed`` are full-match patterns of released keys holding fixed Haar wavelet filters, which the zoo
    module rebuilds as buffers (their values are checked, then dropped); ``source`` names the released definition. A released 1×1 convolution weight ``(out, in, 1, 1)`` whose
    zoo counterpart is a linear weight ``(out, in)`` is reshaped.
    """

    source: str
    rules: tuple[tuple[str, str | Callable[[re.Match], str]], ...]
    unused: tuple[str, ...] = ()
    fixed: tuple[str, ...] = ()

    def rename(self, key: str) -> str | None:
        """The zoo name of released ``key``, or ``None`` for a key of a never-called module or a fixed filter."""
        if any(re.fullmatch(p, key) for p in self.unused + self.fixed):
            return None
        for pattern, repl in self.rules:
            key = re.sub(pattern, repl, key)
        return key


# Renames inside a routed block shared by the BiFormer family: legacy BRA (``qkv.qkv``, ``wo``), the nchw BRA/DSSA of
# MedFormer and DSSAU-Net (1×1 convs ``qkv_linear``, ``output_linear``) and the MLP with its identity slot
# (``Linear, Identity, GELU, Linear`` → ``Linear, GELU, Linear``).
_BLOCK_RULES = (
    (r"\.attn\.qkv\.qkv\.", ".attn.qkv."),
    (r"\.attn\.wo\.", ".attn.proj."),
    (r"\.attn\.qkv_linear\.", ".attn.qkv."),
    (r"\.attn\.output_linear\.", ".attn.proj."),
    (r"\.mlp\.3\.", ".mlp.2."),
)


def _biformer_map(dssa: bool) -> KeyMap:
    source = ("XiaZunhui/MedFormer models/medformer.py (MedFormer)" if dssa
              else "rayleizhu/BiFormer models/biformer.py (BiFormer)")
    return KeyMap(source, ((r"^(downsample_layers|stages)\.", r"backbone.\1."), *_BLOCK_RULES))


def _braunetpp_map() -> KeyMap:
    rules = [(r"^bra_unet\.(downsample_layers|stages)\.", r"backbone.\1."), (r"^bra_unet\.layers_up\.0\.", "expand.")]
    for k in (1, 2, 3):  # decoder level k-1 at H/16, H/8, H/4
        rules += [(rf"^bra_unet\.layers_up\.{k}\.", f"levels.{k - 1}."),
                  (rf"^bra_unet\.concat_back_dim\.{k}\.", f"levels.{k - 1}.concat_linear."),
                  (rf"^bra_unet\.sccsa{4 - k}\.", f"levels.{k - 1}.sccsa.")]
    rules += [(r"^bra_unet\.up4\.", "final_expand."), (r"^bra_unet\.", ""), *_BLOCK_RULES]
    # The stage-4 encoder blocks are built but never called by BRAUnetSystem.forward_features.
    return KeyMap("Caipengzhou/BRAU-Netplusplus networks/bra_unet.py (BRAUnet)", tuple(rules),
                  unused=(r"bra_unet\.stages\.3\..*",))


def _braunet_map() -> KeyMap:
    rules = [(rf"^bra_unet\.patch_embed\.downsample_layers_{a}\.", f"backbone.downsample_layers.0.{b}.")
             for a, b in (("conv1", 0), ("bn1", 1), ("conv2", 3), ("bn2", 4))]
    for i in range(3):  # PatchMerging after the blocks of stage i = the downsampling layer before stage i+1
        rules += [(rf"^bra_unet\.stages\.{i}\.downsample_layer\.conv\.", f"backbone.downsample_layers.{i + 1}.0."),
                  (rf"^bra_unet\.stages\.{i}\.downsample_layer\.bn\.", f"backbone.downsample_layers.{i + 1}.1.")]
    rules += [(r"^bra_unet\.stages\.(\d)\.blocks\.", r"backbone.stages.\1."), (r"^bra_unet\.layers_up\.0\.", "expand.")]
    for k in (1, 2, 3):
        rules += [(rf"^bra_unet\.layers_up\.{k}\.", f"levels.{k - 1}."),
                  (rf"^bra_unet\.concat_back_dim\.{k}\.", f"levels.{k - 1}.concat_linear.")]
    rules += [(r"^bra_unet\.up\.", "final_expand."), (r"^bra_unet\.", ""), *_BLOCK_RULES]
    return KeyMap("Caipengzhou/BRAU-Net model/bra_unet.py (BRAUnet)", tuple(rules))


def _mslaunet_map() -> KeyMap:
    rules = [(rf"^encoder\.patch_embed{k}\.", f"patch_embeds.{k - 1}.") for k in (1, 2, 3, 4)]
    rules += [(rf"^encoder\.blocks{k}\.", f"stages.{k - 1}.") for k in (1, 2, 3, 4)]
    rules += [(r"\.mlp\.fc1\.", ".mlp.0."), (r"\.mlp\.fc2\.", ".mlp.2.")]
    rules += [(rf"\.attn\.dw_conv_{k}x{k}\.depthwise\.", f".attn.dw_convs.{i}.") for i, k in enumerate((3, 5, 7, 9))]
    # Conv_MLA: mla_p4 / p3 / p2 lift stage 2 / 3 / 4 (conv, BN, ReLU, upsample per step) → decoder.lifts.0 / 1 / 2.
    for name, i in (("p4", 0), ("p3", 1), ("p2", 2)):
        for step in range(i + 1):
            for r in (0, 1):
                rules.append((rf"^conv_mla\.mla_{name}\.{4 * step + r}\.", f"decoder.lifts.{i}.{2 * step}.{r}."))
    rules += [(rf"^conv_mla\.mla_{name}_3x3\.", f"decoder.smooth.{i}.") for i, name in enumerate(("p5", "p4", "p3", "p2"))]
    rules += [(rf"^mlahead\.head{k}\.", f"decoder.heads.{k - 2}.") for k in (2, 3, 4, 5)]
    rules += [(r"^seg\.", "decoder.seg.")]
    # The encoder's classification norm and head are never called by MSLAU_net.forward.
    return KeyMap("Monsoon49/MSLAU-Net networks/mslau_net.py (MSLAU_net)", tuple(rules),
                  unused=(r"encoder\.norm\..*", r"encoder\.head\..*"))


def _dssaunet_map() -> KeyMap:
    rules = [(r"^Encoder\.(downsample_layers|stages)\.", r"backbone.\1."), (r"^Encoder\.extra_norms\.", "stage_norms."),
             (r"^(decoder\.)?Decoder\.stages\.", "decoder."),  # one module registered under two names
             (r"^decoder\.PPMHead\.psp_modules\.", "ppm.branches."), (r"^decoder\.PPMHead\.final\.", "ppm.fuse.")]
    for k in (1, 2, 3):
        rules += [(rf"^decoder\.Conv_fuse{k}\.", f"laterals.{k - 1}."), (rf"^decoder\.Conv_fuse{k}_\.", f"post.{k - 1}.")]
    rules += [(r"^decoder\.(fuse_all|conv_x1)\.", r"\1."), (r"^cls_seg\.0\.", "cls_seg."), *_BLOCK_RULES]
    # The decoder's per-stage LayerNorms are built but never called by FPNHEAD.forward.
    return KeyMap("XiaZunhui/DSSAU-Net Mynet/DSSAU_Net.py (DSSAU_Net)", tuple(rules),
                  unused=(r"(decoder\.)?Decoder\.extra_norms\..*",))


def _wavenetsf_map() -> KeyMap:
    rules = [(r"^low_model\.conv1\.", "low.stem.0."), (r"^low_model\.bn1\.", "low.stem.1."),
             (r"^low_model\.layer(\d)\.", lambda m: f"low.layers.{int(m.group(1)) - 1}."),
             (r"^low_model\.bam(\d)\.sa\.sa\.conv_%d\.", lambda m: f"low.msw.{int(m.group(1)) - 1}.wtconv."),
             (r"^low_model\.bam(\d)\.sa\.sa\.last_conv\.", lambda m: f"low.msw.{int(m.group(1)) - 1}.last_conv."),
             (r"\.base_scales\.(\d)\.weight$", r".base_scales.\1"), (r"\.wavelet_scale\.(\d)\.weight$", r".wavelet_scales.\1"),
             (r"^high_model\.conv1\.", "high.stem.0."), (r"^high_model\.bn1\.", "high.stem.1."),
             (r"^high_model\.High_block(\d)\.", lambda m: f"high.blocks.{int(m.group(1)) - 1}."),
             (r"\.sf_fusion\.", ".ffe.")]
    rules += [(rf"(high\.blocks\.\d)\.{a}\.", rf"\1.{b}.")
              for a, b in (("conv1", "pre.0"), ("bn1", "pre.1"), ("conv2", "pre.3"), ("bn2", "pre.4"), ("conv3", "post.0"),
                           ("bn3", "post.1"))]
    rules += [(rf"\.modulate\.{a}\.", f".modulate.{b}.")
              for a, b in (("fc_low", "low.0"), ("bn_low_1", "low.1"), ("fcs.0", "low.3"), ("bn_low_2", "low.4"),
                           ("fc_high", "high.0"), ("bn_high_1", "high.1"), ("fcs.1", "high.3"), ("bn_high_2", "high.4"))]
    # FFE's lamb_l / lamb_h are never used by FFE.forward; the wavelet filters are fixed.
    return KeyMap("liuliutaotao64/WaveNet-SF model/model.py (FusionModule)", tuple(rules),
                  unused=(r".*\.sf_fusion\.lamb_[lh]",),
                  fixed=(r"wfd\.wt\.h[01]_(col|row)", r".*\.(wt|iwt)_filter"))


def released_key_map(net: nn.Module) -> KeyMap:
    """The :class:`KeyMap` from the released definition of ``net``'s architecture (a zoo module or its victim)."""
    from robustbench_med.victims.zoo.biformer import BiFormer
    from robustbench_med.victims.zoo.braunet import BRAUNet
    from robustbench_med.victims.zoo.braunetpp import BRAUNetPP
    from robustbench_med.victims.zoo.dssaunet import DSSAUNet
    from robustbench_med.victims.zoo.mslaunet import MSLAUNet
    from robustbench_med.victims.zoo.wavenet_sf import WaveNetSF

    net = getattr(net, "net", net)
    if isinstance(net, BiFormer):
        return _biformer_map(dssa=bool(net.backbone.cfg.pixel_div))
    table = {BRAUNetPP: _braunetpp_map, BRAUNet: _braunet_map, MSLAUNet: _mslaunet_map, DSSAUNet: _dssaunet_map,
             WaveNetSF: _wavenetsf_map}
    for cls, make in table.items():
        if isinstance(net, cls):
            return make()
    raise WeightsError(f"no released-checkpoint key map for {type(net).__name__}: its authors' code is not mapped "
                       "(see robustbench_med.victims.zoo.compat)")


def convert_released(net: nn.Module, state: dict[str, torch.Tensor], *, partial: bool = False,
                     key_map: KeyMap | None = None) -> dict[str, torch.Tensor]:
    """``state`` (a released state dict) renamed and reshaped for ``net``; raises :class:`WeightsError` naming the
    keys that do not fit. A leading ``module.`` (DataParallel) is stripped. With ``partial`` the converted keys may
    be a subset of ``net``'s (an encoder checkpoint); they must still all exist in ``net`` with equal shapes."""
    net = getattr(net, "net", net)
    key_map = key_map or released_key_map(net)
    target = net.state_dict()
    out: dict[str, torch.Tensor] = {}
    unknown, wrong = [], []
    for key, value in state.items():
        key = key[len("module."):] if key.startswith("module.") else key
        if any(re.fullmatch(p, key) for p in key_map.fixed):
            if not _is_haar(key, value):
                wrong.append(f"{key}: not the fixed Haar filter this module rebuilds")
            continue
        name = key_map.rename(key)
        if name is None:
            continue
        if name not in target:
            unknown.append(key)
            continue
        want = target[name].shape
        if value.shape != want:
            if value.dim() == 4 and value.shape[2:] == (1, 1) and value.shape[:2] == want:
                value = value.reshape(want)  # a released 1×1 conv held here as a linear map
            else:
                wrong.append(f"{key} {tuple(value.shape)} -> {name} {tuple(want)}")
                continue
        if name in out and not _same(out[name], value):
            wrong.append(f"{key}: a second, different tensor for {name}")
            continue
        out[name] = value
    missing = [] if partial else sorted(set(target) - set(out))
    if unknown or wrong or missing:
        raise WeightsError(
            f"state dict does not match {type(net).__name__} (released definition: {key_map.source}): "
            f"{len(unknown)} unknown keys {unknown[:5]}, {len(wrong)} mismatches {wrong[:5]}, "
            f"{len(missing)} missing keys {missing[:5]}"
        )
    return out


def _is_haar(key: str, value: torch.Tensor) -> bool:
    """Whether a released fixed filter is the orthonormal Haar one: WTConv's analysis/synthesis banks equal
    :func:`~.wavelets.haar_filters` per channel; the 1-D taps of ``pytorch_wavelets`` are ±1/√2."""
    from robustbench_med.victims.zoo.wavelets import haar_filters

    if value.is_meta:
        return True
    if key.endswith("_filter"):
        bank = haar_filters().repeat(value.shape[0] // 4, 1, 1, 1)
        return value.shape == bank.shape and torch.allclose(value.float(), bank, atol=1e-6)
    return bool(torch.allclose(value.float().abs(), torch.full_like(value.float(), 2**-0.5), atol=1e-6))


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape:
        return False
    return a.is_meta or b.is_meta or torch.equal(a, b)


def read_released(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """A released checkpoint's flat state dict: :func:`~robustbench_med.weights.read_state_dict` (safetensors or
    weights-only torch files; ``{'state_dict': …}`` unwrapped there), and for weights-only torch files that nest the
    weights under ``'model'`` (BiFormer, the ``load_from`` checkpoints) that entry."""
    from robustbench_med.weights import read_state_dict

    try:
        return read_state_dict(path)[0]
    except WeightsError as e:
        if "flat tensor state dict" not in str(e) or Path(path).suffix.lower() == ".safetensors":
            raise
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict", "net"):
        inner = state.get(key) if isinstance(state, dict) else None
        if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            return inner
    raise WeightsError(f"weights file {path} holds no flat tensor state dict (top level, 'model' or 'state_dict')")


def load_released(model: nn.Module, path: str | os.PathLike[str], *, allow_default: bool = False) -> nn.Module:
    """Load the released checkpoint at ``path`` into ``model`` (a zoo module or its victim) with ``strict=True``.

    Models whose default forward deviates from the release (``release_compat`` attribute) must be built with
    ``release_compat=True`` unless ``allow_default`` (the weights then run under the documented fixes, e.g. for
    fine-tuning). Returns ``model``.
    """
    net = getattr(model, "net", model)
    if getattr(net, "release_compat", True) is False and not allow_default:
        raise WeightsError(f"{type(net).__name__} was built without release_compat=True: released weights expect the "
                           "released forward (pass allow_default=True to load them into the default model)")
    net.load_state_dict(convert_released(net, read_released(path)), strict=True)
    return model


def _released_builds() -> dict:
    """Registered full configurations → a zero-argument builder of the module that released weights load into."""
    from functools import partial

    from robustbench_med.victims.zoo import braunet, braunetpp, mslaunet

    return {
        "braunetpp.full": partial(braunetpp.BRAUNetPP, braunetpp.BRAUNETPP_FULL, braunetpp.BRAUNETPP_DECODER, 9,
                                  release_compat=True),
        "braunet.full": partial(braunet.BRAUNet, braunet.BRAUNET_FULL, braunet.BRAUNET_DECODER, 3,
                                release_compat=True),
        "mslaunet.full": partial(mslaunet.MSLAUNet, mslaunet.MSLAUNET_FULL, 9, release_compat=True),
    }


def released_victim(name: str, path: str | os.PathLike[str] | None = None):
    """The registered victim ``name`` built to run released weights: its net in ``release_compat`` mode where the
    default forward deviates from the release (``braunetpp.full``, ``braunet.full``, ``mslaunet.full``; the other
    mapped victims are returned as registered), with the checkpoint at ``path`` loaded by :func:`load_released`."""
    from robustbench_med.registry import VICTIMS

    victim = VICTIMS.get(name).factory()
    build = _released_builds().get(name)
    if build is not None:
        victim.net = build().to(victim.mean.device)
    released_key_map(victim.net)  # refuse victims whose release is not mapped
    if path is not None:
        load_released(victim, path)
    return victim
