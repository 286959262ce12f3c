"""The zoo against the authors' released code.

* Key maps: the key/shape lists of the released definitions (``tests/fixtures/zoo_released/*.json``: names and shapes
  only, taken from the released model definitions) convert and load with ``strict=True`` into ``release_compat``
  models; mismatches are refused; ``load_released`` reads weights-only files.
* Numerical equivalence: every block, skip attention, merge and head of a ``release_compat`` model is compared on the
  activations of a forward pass with a re-statement of the released forward written here from the released code
  (functional code on the module's weights, not a call of the module), at small sizes.
* HAN's released inference (flip testing, three-head average) and MedFormer-tiny's pixel selection.
"""
import json
import re
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import robustbench_med as rbm
from robustbench_med import tasks as T
from robustbench_med.errors import ConfigError, WeightsError
from robustbench_med.victims.zoo import (
    biformer,
    braunet,
    braunetpp,
    compat,
    dssaunet,
    han,
    medformer,
    mslaunet,
    wavenet_sf,
)
from robustbench_med.victims.zoo.biformer import RoutedBlock
from robustbench_med.victims.zoo.routing import RoutingAttention

FIXTURES = Path(__file__).parent / "fixtures" / "zoo_released"

# The registered full configurations, built as the released checkpoints expect them.
RELEASED_BUILDS = {
    "biformer.t": partial(biformer.BiFormer, biformer.BIFORMER_T, 1000),
    "medformer.t": partial(biformer.BiFormer, medformer.MEDFORMER_T, 7),
    "braunetpp.full": partial(braunetpp.BRAUNetPP, braunetpp.BRAUNETPP_FULL, braunetpp.BRAUNETPP_DECODER, 9,
                              release_compat=True),
    "braunet.full": partial(braunet.BRAUNet, braunet.BRAUNET_FULL, braunet.BRAUNET_DECODER, 3, release_compat=True),
    "mslaunet.full": partial(mslaunet.MSLAUNet, mslaunet.MSLAUNET_FULL, 9, release_compat=True),
    "dssaunet.full": partial(dssaunet.DSSAUNet, dssaunet.DSSAUNET_FULL, 3),
    "wavenetsf.full": partial(wavenet_sf.WaveNetSF, wavenet_sf.WAVENET_FULL, 8),
}
# Released keys of modules that the released forward never calls (documented in compat.py and the model docstrings).
LEFT_OUT = {
    "braunetpp.full": r"bra_unet\.stages\.3\..*",
    "mslaunet.full": r"encoder\.(norm|head)\..*",
    "dssaunet.full": r"(decoder\.)?Decoder\.extra_norms\..*",
    "wavenetsf.full": r".*\.sf_fusion\.lamb_[lh]|wfd\.wt\.h[01]_(col|row)|.*\.(wt|iwt)_filter",  # + fixed filters
}


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _fixture(name: str) -> dict[str, list[int]]:
    return json.loads((FIXTURES / f"{name}.json").read_text())["keys"]


# --- key maps ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(RELEASED_BUILDS))
def test_released_key_lists_load_strictly(name):
    keys = _fixture(name)
    with torch.device("meta"):
        net = RELEASED_BUILDS[name]()
        state = {k: torch.empty(shape) for k, shape in keys.items()}
    converted = compat.convert_released(net, state)
    net.load_state_dict(converted, strict=True, assign=True)
    dropped = [k for k in keys if compat.released_key_map(net).rename(k) is None]
    assert all(re.fullmatch(LEFT_OUT[name], k) for k in dropped) and bool(dropped) == (name in LEFT_OUT)


def test_key_maps_refuse_mismatching_state_dicts():
    keys = _fixture("braunetpp.full")
    with torch.device("meta"):
        net = RELEASED_BUILDS["braunetpp.full"]()
        state = {k: torch.empty(shape) for k, shape in keys.items()}
    for broken in (
        {k: v for k, v in state.items() if k != "bra_unet.sccsa1.channel_attention.0.weight"},  # missing
        {**state, "bra_unet.sccsa1.channel_attention.0.weight": torch.empty(3, 3, device="meta")},  # shape
        {**state, "bra_unet.extra.weight": torch.empty(1, device="meta")},  # unknown
    ):
        with pytest.raises(WeightsError, match="does not match BRAUNetPP"):
            compat.convert_released(net, broken)


def test_fixed_wavelet_filters_are_checked():
    keys = _fixture("wavenetsf.full")
    with torch.device("meta"):
        net = RELEASED_BUILDS["wavenetsf.full"]()
        state = {k: torch.empty(shape) for k, shape in keys.items()}
    key = "low_model.bam1.sa.sa.conv_%d.wt_filter"
    haar = wavenet_sf.haar_filters().repeat(2, 1, 1, 1)
    compat.convert_released(net, {**state, key: haar, "wfd.wt.h0_col": torch.full((1, 1, 2, 1), 2**-0.5)})
    with pytest.raises(WeightsError, match="fixed Haar filter"):
        compat.convert_released(net, {**state, key: -haar})


def _released_biformer_names(net: biformer.BiFormer, dssa: bool) -> dict[str, torch.Tensor]:
    """``net``'s state dict under the released names (legacy BiFormer or nchw MedFormer), written out by hand."""
    out = {}
    for key, value in net.state_dict().items():
        key = key.removeprefix("backbone.").replace(".mlp.2.", ".mlp.3.")
        stage = int(key.split(".")[1]) if key.startswith("stages.") else -1
        if ".attn." in key and net.backbone.cfg.topks[stage] is not None:  # BRA / DSSA (full attention keeps its names)
            if dssa:
                key = key.replace(".attn.qkv.", ".attn.qkv_linear.").replace(".attn.proj.", ".attn.output_linear.")
                value = value[:, :, None, None] if value.dim() == 2 else value
            else:
                key = key.replace(".attn.qkv.", ".attn.qkv.qkv.").replace(".attn.proj.", ".attn.wo.")
        out[key] = value
    return out


@pytest.mark.parametrize("dssa", [False, True])
def test_load_released_reads_weights_only_files(tmp_path, dssa):
    cfg = medformer.MEDFORMER_TINY if dssa else biformer.BIFORMER_TINY
    torch.manual_seed(0)
    source = biformer.BiFormer(cfg, 2).eval()
    state = _released_biformer_names(source, dssa)
    if dssa:
        from safetensors.torch import save_file

        path = tmp_path / "released.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        path = tmp_path / "released.pth"
        torch.save({"model": state, "epoch": torch.tensor(300)}, path)  # BiFormer's checkpoint layout
    torch.manual_seed(1)
    target = biformer.BiFormer(cfg, 2).eval()
    compat.load_released(target, path)
    x = torch.randn(2, 1, 64, 64)
    torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)


def test_released_victims_run_the_released_forward():
    with torch.device("meta"):
        for name in ("braunetpp.full", "braunet.full", "mslaunet.full", "dssaunet.full"):
            v = compat.released_victim(name)
            assert getattr(v.net, "release_compat", True) and v.card.name == name
        with pytest.raises(WeightsError, match="no released-checkpoint key map"):
            compat.released_victim("han.full")


def test_load_released_needs_release_compat(tmp_path):
    net = braunetpp.BRAUNetPP(braunetpp.BRAUNETPP_TINY, braunetpp.BRAUNETPP_TINY_DECODER, 6)
    with pytest.raises(WeightsError, match="release_compat"):
        compat.load_released(net, tmp_path / "missing.pth")
    with pytest.raises(WeightsError, match="no released-checkpoint key map"):
        compat.released_key_map(torch.nn.Linear(2, 2))


# --- re-statements of the released forward passes ------------------------------------------------------------------


def _ln(x, norm):
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def _bn(x, bn):
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


def _conv(x, conv, **kw):
    return F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups, **kw)


def _to_regions(t, s):
    """'n (j h) (i w) c -> n (j i) h w c'."""
    n, hh, ww, c = t.shape
    return t.reshape(n, s, hh // s, s, ww // s, c).permute(0, 1, 3, 2, 4, 5).reshape(n, s * s, hh // s, ww // s, c)


def released_bra(x, attn: RoutingAttention):
    """``bra_legacy.BiLevelRoutingAttention.forward`` (BiFormer, BRAU-Net, BRAU-Net++, HAN) on (N, H, W, C), with
    ``auto_pad`` and the optional ``ada_avgpool`` K/V downsampling."""
    n, hh, ww, c = x.shape
    s, m, d = attn.n_win, attn.num_heads, c // attn.num_heads
    x = F.pad(x, (0, 0, 0, (-ww) % s, 0, (-hh) % s))
    hp, wp = x.shape[1:3]
    h, w = hp // s, wp // s
    qkv = F.linear(x, attn.qkv.weight, attn.qkv.bias)
    q, kv = _to_regions(qkv[..., :c], s), _to_regions(qkv[..., c:], s)
    kv_img = kv.reshape(n * s * s, h, w, 2 * c).permute(0, 3, 1, 2)
    if attn.kv_pool:
        kv_img = F.adaptive_avg_pool2d(kv_img, attn.kv_pool)
    kv_pix = kv_img.flatten(2).transpose(1, 2).reshape(n, s * s, -1, 2 * c)
    q_win, k_win = q.mean([2, 3]), kv[..., :c].mean([2, 3])
    v_img = kv[..., c:].reshape(n, s, s, h, w, c).permute(0, 5, 1, 3, 2, 4).reshape(n, c, hp, wp)
    lepe = _conv(v_img, attn.lepe).permute(0, 2, 3, 1)
    scale = c**-0.5
    idx = ((q_win * scale) @ k_win.transpose(-1, -2)).topk(min(attn.topk, s * s), dim=-1).indices
    sel = torch.stack([kv_pix[b][idx[b]] for b in range(n)]).flatten(2, 3)  # (n, p², k·t, 2c)
    k_sel = sel[..., :c].unflatten(-1, (m, d)).permute(0, 1, 3, 4, 2)
    v_sel = sel[..., c:].unflatten(-1, (m, d)).permute(0, 1, 3, 2, 4)
    q_pix = q.reshape(n, s * s, h * w, m, d).permute(0, 1, 3, 2, 4)
    out = ((q_pix * scale) @ k_sel).softmax(-1) @ v_sel
    out = out.permute(0, 1, 3, 2, 4).reshape(n, s, s, h, w, c).permute(0, 1, 3, 2, 4, 5).reshape(n, hp, wp, c)
    return F.linear(out + lepe, attn.proj.weight, attn.proj.bias)[:, :hh, :ww]


def released_dssa(x, attn: RoutingAttention):
    """MedFormer's ``models/dssa.py::DSSA`` with ``dsa.dual_sparse_attention`` (nchw; k₂ = ⌊k·T/8⌋, no clamp)."""
    x = x.permute(0, 3, 1, 2)
    n, c, hh, ww = x.shape
    s, m, d = attn.n_win, attn.num_heads, c // attn.num_heads
    rh, rw = hh // s, ww // s
    q, k, v = F.conv2d(x, attn.qkv.weight[:, :, None, None], attn.qkv.bias).chunk(3, 1)
    q_r = F.avg_pool2d(q, (rh, rw), ceil_mode=True, count_include_pad=False).permute(0, 2, 3, 1).flatten(1, 2)
    k_r = F.avg_pool2d(k, (rh, rw), ceil_mode=True, count_include_pad=False).flatten(2, 3)
    idx = (q_r @ k_r).topk(attn.topk, dim=-1).indices

    def grid2seq(t):
        t = t.reshape(n, m, d, s, rh, s, rw)
        return torch.einsum("bmdhpwq->bmhwpqd", t).reshape(n, m, s * s, rh * rw, d)

    qs, ks, vs = grid2seq(q), grid2seq(k), grid2seq(v)
    kg = torch.stack([ks[b][:, idx[b]] for b in range(n)]).flatten(3, 4)
    vg = torch.stack([vs[b][:, idx[b]] for b in range(n)]).flatten(3, 4)
    a = (qs * c**-0.5) @ kg.transpose(-1, -2)
    score, index = a.topk(attn.topk * rh * rw // 8, dim=-1)
    v_sel = torch.gather(vg.unsqueeze(3).expand(-1, -1, -1, rh * rw, -1, -1), 4,
                         index.unsqueeze(-1).expand(-1, -1, -1, -1, -1, d))
    out = (score.unsqueeze(-2).softmax(-1) @ v_sel).squeeze(-2)
    out = torch.einsum("bmhwpqd->bmdhpwq", out.reshape(n, m, s, s, rh, rw, d)).reshape(n, c, hh, ww)
    out = out + _conv(v, attn.lepe)
    return F.conv2d(out, attn.proj.weight[:, :, None, None], attn.proj.bias).permute(0, 2, 3, 1)


def released_attention_lepe(x, attn: RoutingAttention):
    """``AttentionLePE.forward`` (BiFormer ``models/_common.py``; copied into the BRAU-Net(++) / MedFormer releases)."""
    n, hh, ww, c = x.shape
    m = attn.num_heads
    t = x.reshape(n, hh * ww, c)
    q, k, v = F.linear(t, attn.qkv.weight, attn.qkv.bias).reshape(n, hh * ww, 3, m, c // m).permute(2, 0, 3, 1, 4)
    lepe = _conv(x.permute(0, 3, 1, 2), attn.lepe).flatten(2).transpose(1, 2)
    a = ((q @ k.transpose(-2, -1)) * (c // m) ** -0.5).softmax(-1)
    out = (a @ v).transpose(1, 2).reshape(n, hh * ww, c) + lepe
    return F.linear(out, attn.proj.weight, attn.proj.bias).reshape(n, hh, ww, c)


def _released_attention(x, attn: RoutingAttention):
    if attn.topk is None:
        return released_attention_lepe(x, attn)
    return released_dssa(x, attn) if attn.pixel_div else released_bra(x, attn)


def _mlp(x, mlp):
    return F.linear(F.gelu(F.linear(x, mlp[0].weight, mlp[0].bias)), mlp[2].weight, mlp[2].bias)


def released_block(x, blk: RoutedBlock):
    """BiFormer / MedFormer / HAN ``Block.forward`` (pre-norm): NCHW in and out."""
    x = x + _conv(x, blk.pos_embed)
    x = x.permute(0, 2, 3, 1)
    x = x + _released_attention(_ln(x, blk.norm1), blk.attn)
    x = x + _mlp(_ln(x, blk.norm2), blk.mlp)
    return x.permute(0, 3, 1, 2)


def released_braunet_block(x, blk: RoutedBlock):
    """BRAU-Net / BRAU-Net++ ``bra_block.py::Block.forward`` on the tokens of the NCHW map ``x``: the input replaced
    by ``norm1(x)``, ``norm1`` again before the attention, ``shortcut`` unused."""
    b, c, h, w = x.shape
    t = x.flatten(2).transpose(1, 2)
    t = _ln(t, blk.norm1)
    y = t.view(b, h, w, c).permute(0, 3, 1, 2)
    y = y + _conv(y, blk.pos_embed)
    y = y.permute(0, 2, 3, 1)
    y = y + _released_attention(_ln(y, blk.norm1), blk.attn)
    y = y + _mlp(_ln(y, blk.norm2), blk.mlp)
    return y.permute(0, 3, 1, 2)


def released_sccsa(x, mod: braunetpp.SCCSA):
    """BRAU-Net++ ``SCCSA.forward``: raw (no sigmoid) per-pixel channel attention, then the 7×7 spatial gate."""
    b, c, h, w = x.shape
    ca, sa = mod.channel_attention, mod.spatial_attention
    t = x.permute(0, 2, 3, 1).reshape(b, -1, c)
    att = F.linear(F.relu(F.linear(t, ca[0].weight, ca[0].bias)), ca[2].weight, ca[2].bias)
    x = x * att.view(b, h, w, c).permute(0, 3, 1, 2)
    s = _bn(_conv(F.relu(_bn(_conv(x, sa[0]), sa[1])), sa[3]), sa[4])
    return x * s.sigmoid()


def released_patch_merging(x, merge):
    """BRAU-Net ``PatchMerging.forward`` on the tokens of ``x``: ``view(B, C, H, W)`` and ``view(B, -1, 2C)``."""
    b, c, h, w = x.shape
    t = x.flatten(2).transpose(1, 2).contiguous()
    y = _bn(_conv(t.view(b, c, h, w), merge[0]), merge[1]).contiguous()
    return y.view(b, -1, 2 * c).transpose(1, 2).reshape(b, 2 * c, h // 2, w // 2)


def released_patch_expand(x, exp, r: int):
    """Swin-Unet ``PatchExpand`` (r = 2) / ``FinalPatchExpand_X4`` (r = 4): 'b h w (p1 p2 c) -> b (h p1) (w p2) c'."""
    t = F.linear(x.permute(0, 2, 3, 1), exp.expand.weight)
    b, h, w, c = t.shape
    t = t.reshape(b, h, w, r, r, c // r**2).permute(0, 1, 3, 2, 4, 5).reshape(b, h * r, w * r, c // r**2)
    return _ln(t, exp.norm).permute(0, 3, 1, 2)


def released_linear_attention(x, mod: mslaunet.LinearAttention):
    """MSLAU-Net ``LinearAttention.forward`` on (B, C, H, W): heads merged by ``reshape`` without moving the head axis."""
    b, c, h, w = x.shape
    t = x.view(b, c, h * w).permute(0, 2, 1)
    q, k, v = F.linear(t, mod.qkv.weight).reshape(b, h * w, 3, mod.num_heads, c // mod.num_heads).permute(2, 0, 3, 1, 4)
    out = (q.softmax(-2) @ (k.softmax(-1).transpose(-2, -1) @ v)).reshape(b, h * w, c)
    return F.linear(out, mod.proj.weight, mod.proj.bias).permute(0, 2, 1).reshape(b, c, h, w)


def released_msla(tokens, mod: mslaunet.MSLA, h: int, w: int):
    """MSLAU-Net ``MSLA.forward`` on tokens (B, N, C): ``view(b, c, h, w)`` in, ``reshape(b, n, dim)`` out."""
    b, n, c = tokens.shape
    x = tokens.contiguous().view(b, c, h, w)
    g = c // 4
    outs = []
    for i, conv in enumerate(mod.dw_convs):
        part = x[:, i * g : (i + 1) * g]
        part = F.relu(_conv(part, conv) + part)
        outs.append(released_linear_attention(part, mod.linear_attention) * mod.scale_weights[i])
    return _conv(torch.cat(outs, 1), mod.final_conv).reshape(b, n, c)


def released_gfe(x, blk: mslaunet.GFE):
    """MSLAU-Net ``GFE.forward`` (NCHW in and out)."""
    x = x + _conv(x, blk.pos_embed)
    b, c, h, w = x.shape
    t = x.flatten(2).transpose(1, 2)
    t = t + released_msla(_ln(t, blk.norm1), blk.attn, h, w)
    t = t + _mlp(_ln(t, blk.norm2), blk.mlp)
    return t.transpose(1, 2).reshape(b, c, h, w)


def released_lfe(x, blk: mslaunet.LFE):
    """MSLAU-Net ``LFE.forward`` (UniFormer's CBlock)."""
    x = x + _conv(x, blk.pos_embed)
    x = x + _conv(_conv(_conv(_bn(x, blk.norm1), blk.conv1), blk.attn), blk.conv2)
    return x + _conv(F.gelu(_conv(_bn(x, blk.norm2), blk.mlp[0])), blk.mlp[2])


def released_mla_decoder(feats, dec: mslaunet.MLADecoder, size):
    """MSLAU-Net ``Conv_MLA`` + ``MLAHead`` + ``seg`` + the final interpolation."""

    def cbr(x, unit):
        return F.relu(_bn(_conv(x, unit[0]), unit[1]))

    def lift(x, seq):
        for i in range(0, len(seq), 2):
            x = F.interpolate(cbr(x, seq[i]), scale_factor=2, mode="bilinear", align_corners=True)
        return x

    uni5, uni4, uni3, uni2 = feats
    p4_plus = uni5 + lift(uni4, dec.lifts[0])
    p3_plus = p4_plus + lift(uni3, dec.lifts[1])
    p2_plus = p3_plus + lift(uni2, dec.lifts[2])
    mla = [cbr(t, dec.smooth[i]) for i, t in enumerate((uni5, p4_plus, p3_plus, p2_plus))]
    heads = [F.interpolate(cbr(t, dec.heads[i]), 2 * t.shape[-1], mode="bilinear", align_corners=True)
             for i, t in enumerate(mla)]
    return F.interpolate(_conv(torch.cat(heads, 1), dec.seg), size=size, mode="bilinear", align_corners=True)


def _inputs_of(net, types, x):
    """Every submodule of ``net`` of ``types`` with the input and output it saw in ``net(x)`` (eval mode)."""
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append((m, i[0], o))) for m in net.modules()
             if isinstance(m, types)]
    with torch.no_grad():
        net.eval()(x)
    for hk in hooks:
        hk.remove()
    return seen


def _randomise_norms(net):
    """Non-trivial BatchNorm statistics and LayerNorm affines, so that the norms' placement matters."""
    g = torch.Generator().manual_seed(0)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
        if isinstance(m, torch.nn.LayerNorm):
            m.weight.data.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
            m.bias.data.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return net


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# --- module-by-module equivalence --------------------------------------------------------------------------------


def test_braunetpp_release_compat_matches_the_released_modules():
    torch.manual_seed(0)
    net = _randomise_norms(braunetpp.BRAUNetPP(braunetpp.BRAUNETPP_TINY, braunetpp.BRAUNETPP_TINY_DECODER, 6,
                                               release_compat=True))
    seen = _inputs_of(net, (RoutedBlock, braunetpp.SCCSA, braunet.PatchExpand, braunet.FinalPatchExpand),
                      torch.randn(2, 1, 64, 64))
    kinds = {type(m).__name__ for m, _, _ in seen}
    assert kinds == {"RoutedBlock", "SCCSA", "PatchExpand", "FinalPatchExpand"} and len(seen) == 4 + 4 + 3 + 3 + 1
    for m, x, out in seen:
        if isinstance(m, RoutedBlock):
            _close(out, released_braunet_block(x, m))
        elif isinstance(m, braunetpp.SCCSA):
            _close(out, released_sccsa(x, m))
        else:
            _close(out, released_patch_expand(x, m, 2 if isinstance(m, braunet.PatchExpand) else 4))
    default = braunetpp.BRAUNetPP(braunetpp.BRAUNETPP_TINY, braunetpp.BRAUNETPP_TINY_DECODER, 6).eval()
    default.load_state_dict(net.state_dict())
    x = torch.randn(1, 1, 64, 64)
    assert not torch.allclose(default(x), net(x), atol=1e-3)  # the documented fixes change the output


def test_braunet_release_compat_matches_the_released_modules():
    torch.manual_seed(0)
    net = _randomise_norms(braunet.BRAUNet(braunet.BRAUNET_TINY, braunet.BRAUNET_TINY_DECODER, 6,
                                           release_compat=True))
    seen = _inputs_of(net, (RoutedBlock, braunet.ReleasedPatchMerging, braunet.PatchExpand), torch.randn(2, 1, 64, 64))
    assert len([m for m, _, _ in seen if isinstance(m, braunet.ReleasedPatchMerging)]) == 3
    for m, x, out in seen:
        if isinstance(m, RoutedBlock):
            _close(out, released_braunet_block(x, m))
        elif isinstance(m, braunet.ReleasedPatchMerging):
            _close(out, released_patch_merging(x, m))
        else:
            _close(out, released_patch_expand(x, m, 2))


def test_mslaunet_release_compat_matches_the_released_modules():
    torch.manual_seed(0)
    net = _randomise_norms(mslaunet.MSLAUNet(mslaunet.MSLAUNET_TINY, 6, release_compat=True))
    x = torch.randn(2, 1, 64, 64)
    seen = _inputs_of(net, (mslaunet.GFE, mslaunet.LFE, mslaunet.MLADecoder), x)
    assert len(seen) == 5 + 1
    for m, inp, out in seen:
        if isinstance(m, mslaunet.GFE):
            _close(out, released_gfe(inp, m))
        elif isinstance(m, mslaunet.LFE):
            _close(out, released_lfe(inp, m))
        else:
            _close(out, released_mla_decoder(inp, m, x.shape[-2:]))
    gfe = next(m for m, _, _ in seen if isinstance(m, mslaunet.GFE))
    fixed = mslaunet.GFE(gfe.norm1.normalized_shape[0], gfe.attn.linear_attention.num_heads, 4.0).eval()
    fixed.load_state_dict(gfe.state_dict())
    inp = next(i for m, i, _ in seen if m is gfe)
    assert not torch.allclose(fixed(inp), gfe(inp), atol=1e-3)  # the intended permutes differ from the release


@pytest.mark.parametrize("name", ["biformer", "medformer", "dssaunet", "han"])
def test_routed_models_match_the_released_blocks(name):
    torch.manual_seed(0)
    dssa_exact = replace_k_min(medformer.MEDFORMER_TINY)  # the release has no k₂ clamp
    net = {
        "biformer": lambda: biformer.BiFormer(biformer.BIFORMER_TINY, 2),
        "medformer": lambda: biformer.BiFormer(dssa_exact, 2),
        "dssaunet": lambda: dssaunet.DSSAUNet(dssa_exact, 6, 32, (1, 1, 1, 1)),
        "han": lambda: han.HAN(han.HAN_TINY, 4),
    }[name]()
    seen = _inputs_of(_randomise_norms(net), RoutedBlock, torch.randn(2, 1, 64, 64))
    assert len(seen) >= 4
    for m, x, out in seen:
        _close(out, released_block(x, m))


def released_dssaunet_head(latent, net: dssaunet.DSSAUNet):
    """DSSAU-Net ``FPNHEAD.forward`` + ``DSSAU_Net.forward`` after the encoder (decoder stages called as modules: they
    are compared block by block in ``test_routed_models_match_the_released_blocks``)."""

    def up(t, size):
        return F.interpolate(t, size=size, mode="bilinear", align_corners=True)

    def cbr(t, seq):
        return F.relu(_bn(_conv(t, seq[0]), seq[1]))

    def x2(t):
        return up(t, (t.shape[2] * 2, t.shape[3] * 2))

    feats = [latent["s1"], latent["s2"], latent["s3"], latent["z"]]
    top = feats[-1]
    ppm = [up(_conv(F.adaptive_max_pool2d(top, br[0].output_size), br[1]), top.shape[-2:]) for br in net.ppm.branches]
    x1 = net.decoder[3](cbr(torch.cat([*ppm, top], 1), net.ppm.fuse))
    x = _conv(x2(x1), net.conv_x1) + cbr(feats[-2], net.laterals[0])
    x2_ = cbr(net.decoder[2](x), net.post[0])
    x = x2(x2_) + cbr(feats[-3], net.laterals[1])
    x3 = cbr(net.decoder[1](x), net.post[1])
    x = x2(x3) + cbr(feats[-4], net.laterals[2])
    x4 = cbr(net.decoder[0](x), net.post[2])
    size = x4.shape[-2:]
    x = cbr(torch.cat([up(x1, size), up(x2_, size), up(x3, size), x4], 1), net.fuse_all)
    return _conv(up(x, (size[0] * 4, size[1] * 4)), net.cls_seg)


def test_dssaunet_head_matches_the_released_head():
    torch.manual_seed(0)
    net = _randomise_norms(dssaunet.DSSAUNet(medformer.MEDFORMER_TINY, 6, 32, (1, 1, 1, 1))).eval()
    with torch.no_grad():
        latent = net.encode(torch.randn(2, 1, 64, 64))
        _close(net.decode(latent), released_dssaunet_head(latent, net))


def released_uper_head(feats, head, size):
    """MedFormer's released ``UperHead_medformer.UPerHead`` (mmseg's UPerHead; ``ConvModule`` without norm = biased
    conv + ReLU; bilinear resizing with ``align_corners=False``; eval-mode dropout)."""

    def cr(t, unit):
        return F.relu(_conv(t, unit[0]))

    def rs(t, shape):
        return F.interpolate(t, size=tuple(shape), mode="bilinear", align_corners=False)

    top = feats[-1]
    psp = [top] + [rs(cr(F.adaptive_avg_pool2d(top, br[0].output_size), br[1]), top.shape[2:]) for br in head.ppm.branches]
    laterals = [cr(f, conv) for f, conv in zip(feats, head.lateral_convs)] + [cr(torch.cat(psp, 1), head.bottleneck)]
    for i in range(len(laterals) - 1, 0, -1):
        laterals[i - 1] = laterals[i - 1] + rs(laterals[i], laterals[i - 1].shape[2:])
    outs = [cr(laterals[i], head.fpn_convs[i]) for i in range(len(laterals) - 1)] + [laterals[-1]]
    outs = [outs[0]] + [rs(o, outs[0].shape[2:]) for o in outs[1:]]
    return rs(_conv(cr(torch.cat(outs, 1), head.fpn_bottleneck), head.conv_seg), size)


def test_medformer_seg_head_matches_the_released_head():
    torch.manual_seed(0)
    net = medformer.MedFormerSeg(replace_k_min(medformer.MEDFORMER_TINY), 6, 32).eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        latent = net.encode(x)
        feats = [latent["s1"], latent["s2"], latent["s3"], latent["z"]]
        _close(net.decode(latent), released_uper_head(feats, net.head, x.shape[-2:]))


def released_arm(x, arm: han.AttentionResidual):
    """HYATT-Net ``Hybrid_Transformer_CNN.py::BasicBlock.forward`` with its ``CBAM`` (channel gate on avg + max
    pooling, spatial gate on [mean, max]): ``relu(CBAM(BN(conv2(relu(BN(conv1 x))))) + conv4 x)``."""
    conv1, bn1, _, conv2, bn2, cbam = arm.body
    out = _bn(_conv(F.relu(_bn(_conv(x, conv1), bn1)), conv2), bn2)

    def mlp(t):
        return _conv(F.relu(_conv(t, cbam.mlp[0])), cbam.mlp[2])

    ca = (mlp(F.adaptive_avg_pool2d(out, 1)) + mlp(F.adaptive_max_pool2d(out, 1))).sigmoid()
    out = out * ca
    sa = _conv(torch.cat([out.mean(1, keepdim=True), out.max(1, keepdim=True)[0]], 1), cbam.spatial).sigmoid()
    return F.relu(out * sa + _conv(x, arm.shortcut))


def test_han_attention_residual_modules_match_the_release():
    torch.manual_seed(0)
    net = _randomise_norms(han.HAN(han.HAN_TINY, 4))
    seen = _inputs_of(net, han.AttentionResidual, torch.randn(2, 1, 64, 64))
    assert len(seen) == 4
    for m, x, out in seen:
        _close(out, released_arm(x, m))


def replace_k_min(cfg):
    from dataclasses import replace

    return replace(cfg, pixel_k_min=1)


def released_wtconv(x, mod):
    """WaveNet-SF ``MSW_SA.py::WTConv2d.forward`` (db1 filters from ``wave_conv.create_wavelet_filter``)."""
    c = x.shape[1]
    lo, hi = torch.tensor([2**-0.5, 2**-0.5]), torch.tensor([2**-0.5, -(2**-0.5)])  # db1 dec_lo, dec_hi reversed
    bank = torch.stack([lo[None] * lo[:, None], lo[None] * hi[:, None], hi[None] * lo[:, None], hi[None] * hi[:, None]])
    filters = bank[:, None].repeat(c, 1, 1, 1)
    lls, hs, shapes, cur = [], [], [], x
    for i in range(mod.levels):
        shapes.append(cur.shape)
        if cur.shape[2] % 2 or cur.shape[3] % 2:
            cur = F.pad(cur, (0, cur.shape[3] % 2, 0, cur.shape[2] % 2))
        b, _, h, w = cur.shape
        bands = F.conv2d(cur, filters, stride=2, groups=c).reshape(b, c, 4, h // 2, w // 2)
        cur = bands[:, :, 0]
        tag = _conv(bands.reshape(b, 4 * c, h // 2, w // 2), mod.wavelet_convs[i]) * mod.wavelet_scales[i]
        tag = tag.reshape(bands.shape)
        lls.append(tag[:, :, 0])
        hs.append(tag[:, :, 1:4])
    out = 0
    for i in range(mod.levels, 0, -1):
        nxt = 0
        for j in range(i - 1, -1, -1):
            bands = torch.cat([(lls[j] + nxt).unsqueeze(2), hs[j]], 2)
            b, _, _, h, w = bands.shape
            nxt = F.conv_transpose2d(bands.reshape(b, 4 * c, h, w), filters, stride=2, groups=c)
            nxt = nxt[:, :, : shapes[j][2], : shapes[j][3]]
        y = _conv(x, mod.base_convs[i - 1]) * mod.base_scales[i - 1]
        out = out + _bn(y + nxt, mod.bns[i - 1])
    return out


def released_msw_sa(x, mod: wavenet_sf.MSWSA):
    """WaveNet-SF ``MSW_SA.forward``: ``(1 + σ(SpatialAttention(x))) · x``."""
    res = torch.cat([x.max(1, keepdim=True)[0], x.mean(1, keepdim=True)], 1)
    return (1 + _conv(released_wtconv(res, mod.wtconv), mod.last_conv).sigmoid().expand_as(x)) * x


def released_ffe(x, mod: wavenet_sf.FFE):
    """WaveNet-SF ``FFE.forward``: unfold-based learned low-pass, ``Frequency_dynamic_depose``, ``Global_fusion``."""
    n, c, h, w = x.shape
    k, g = mod.k, mod.groups
    filt = _bn(_conv(x.mean((2, 3), keepdim=True), mod.conv), mod.bn)
    cols = F.unfold(F.pad(x, (k // 2,) * 4, mode="reflect"), kernel_size=k).reshape(n, g, c // g, k * k, h * w)
    filt = filt.reshape(n, g, k * k, 1).unsqueeze(2).softmax(-2)
    low = (cols * filt).sum(3).reshape(n, c, h, w)
    high = x - low

    def se(t, seq):
        return _bn(_conv(F.relu(_bn(_conv(t.mean((2, 3), keepdim=True), seq[0]), seq[1])), seq[3]), seq[4])

    z_l, z_h = se(low, mod.modulate.low), se(high, mod.modulate.high)
    fea_low, fea_high = low * z_l.softmax(1) + z_l + low, high * z_h.softmax(1) + high
    la = mod.fusion.local_att
    wei = _bn(_conv(F.relu(_bn(_conv(fea_low + fea_high, la[0]), la[1])), la[3]), la[4]).sigmoid()
    return fea_low * wei + fea_high * (1 - wei) + fea_low + fea_high


def test_wavenetsf_matches_the_released_modules():
    torch.manual_seed(0)
    net = _randomise_norms(wavenet_sf.WaveNetSF(wavenet_sf.WAVENET_TINY, 2))
    for m in net.modules():
        if isinstance(m, wavenet_sf.WTConv2d):  # move the scales off their initial values
            for p in [*m.wavelet_scales, *m.base_scales]:
                p.data.uniform_(0.5, 1.5)
    x = torch.rand(2, 1, 64, 64)
    seen = _inputs_of(net, (wavenet_sf.MSWSA, wavenet_sf.FFE), x)
    assert len(seen) == 3 + 3
    for m, inp, out in seen:
        _close(out, released_msw_sa(inp, m) if isinstance(m, wavenet_sf.MSWSA) else released_ffe(inp, m))
    ll, details = wavenet_sf.haar_split(x, wavenet_sf.haar_filters())  # pywt.dwt2(x, 'haar'): cA and cH + cV + cD
    a, b, c, d = x[..., 0::2, 0::2], x[..., 0::2, 1::2], x[..., 1::2, 0::2], x[..., 1::2, 1::2]
    _close(ll, (a + b + c + d) / 2)
    _close(details, ((a + b - c - d) + (a - b + c - d) + (a - b - c + d)) / 2)


# --- HAN's released inference and MedFormer-tiny's selection -------------------------------------------------------


def released_han_prediction(v, x):
    """``TopDown2HeadNeck.forward_test`` with ``flip_test``, ``shift_heatmap`` and ``post_process='default'``: each
    head's heatmaps averaged with the flipped-back heatmaps of the flipped image, decoded (argmax + 0.25 px towards
    the higher neighbour inside the border) and mapped to input pixels; the three heads' coordinates averaged."""
    z = (x - v.mean) / v.std
    with torch.no_grad():
        full, (quarter, half) = v.net.forward_all(z)
        full_f, (quarter_f, half_f) = v.net.forward_all(z.flip(3))
    preds = []
    for hm, hm_f in ((quarter, quarter_f), (half, half_f), (full, full_f)):
        back = hm_f.clone()
        for a, b in v.flip_pairs:
            back[:, a], back[:, b] = hm_f[:, b], hm_f[:, a]
        back = back.flip(3).clone()
        back[..., 1:] = back[..., :-1].clone()
        hm = (hm + back) * 0.5
        n, k, h, w = hm.shape
        coords = torch.zeros(n, k, 2)
        for i in range(n):
            for j in range(k):
                idx = int(hm[i, j].argmax())
                py, px = divmod(idx, w)
                c = [float(px), float(py)]
                if 1 < px < w - 1 and 1 < py < h - 1:
                    c[0] += 0.25 * float(torch.sign(hm[i, j, py, px + 1] - hm[i, j, py, px - 1]))
                    c[1] += 0.25 * float(torch.sign(hm[i, j, py + 1, px] - hm[i, j, py - 1, px]))
                coords[i, j] = torch.tensor(c)
        scale = torch.tensor([w / x.shape[-1], h / x.shape[-2]])
        preds.append((coords + 0.5) / scale - 0.5)
    return sum(preds) / 3


def test_han_predicts_as_released_by_default():
    torch.manual_seed(0)
    v = rbm.create_victim("han.tiny", weights=None).eval()
    assert v.inference == "released" and v.flip_pairs == ((2, 3),)
    x = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(v.predict(x), released_han_prediction(v, x))
    y = torch.tensor([[[10.0, 20.0]] * 4, [[30.0, 40.0]] * 4])
    err = (released_han_prediction(v, x) - y).norm(dim=-1)
    torch.testing.assert_close(v.evaluate(x, y)["mre_px"], err.mean(1))
    v.inference = "full_head"
    with torch.no_grad():
        single = T.heatmap_argmax(v.net.forward_all((x - v.mean) / v.std)[0])
    torch.testing.assert_close(v.predict(x), single)
    with pytest.raises(ConfigError):
        v.inference = "mean"


@pytest.mark.parametrize("name", ["medformer.tiny", "medformer_seg.tiny", "dssaunet.tiny"])
def test_medformer_tiny_dssa_selects_pixels(name):
    """At the 64² phantom size every DSSA layer keeps k₂ < k₁·T of its gathered tokens (k₂ = 4 of 32, 16 and 8)."""
    torch.manual_seed(0)
    v = rbm.create_victim(name, weights=None).eval()
    kept = []  # (k₂, gathered tokens k₁·T) of every DSSA call
    layers = [m for m in v.net.modules() if isinstance(m, RoutingAttention) and m.pixel_div]
    for m in layers:

        def attend(q, k, val, m=m, original=m.attend):
            kept.append((m.pixel_k(k.shape[-2]), k.shape[-2]))
            return original(q, k, val)

        m.attend = attend
    with torch.no_grad():
        v(torch.rand(1, 1, 64, 64))
    assert len(kept) == len(layers) >= 3
    assert all(k2 < total for k2, total in kept)
    assert {total for _, total in kept} >= {32, 16, 8}
