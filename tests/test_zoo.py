"""The victim zoo: routing attention vs a dense reference, published parameter counts, shapes, gradients, training."""
import pytest
import torch

import robustbench_med as rbm
from robustbench_med.registry import VICTIMS
from robustbench_med.victims.zoo import biformer, medformer
from robustbench_med.victims.zoo.common import PointwiseConv, count_parameters, measure_flops
from robustbench_med.victims.zoo.routing import RoutingAttention

ZOO = [n for n in rbm.list_victims() if VICTIMS.get(n).factory.__module__.startswith("robustbench_med.victims.zoo")]
TINY = [n for n in ZOO if n.endswith(".tiny")]
SHORTCUT = [n for n in ZOO if n.endswith(".shortcut")]  # tiny architectures trained for the APPLE shortcut study
FULL = [n for n in ZOO if not n.endswith((".tiny", ".shortcut"))]
SEGMENTORS = [n for n in TINY if VICTIMS.get(n).meta["card"].task == "segmentation"]

# Reference parameter counts measured on the released definitions (shared/reference/models.md).
REFERENCE_PARAMS = {
    "biformer.t": 13.14e6, "biformer.s": 25.54e6, "biformer.b": 56.80e6, "braunetpp.full": 50.76e6,
    "braunet.full": 67.22e6, "dssaunet.full": 29.25e6, "mslaunet.full": 21.90e6, "wavenetsf.full": 27.84e6,
}
MEDFORMER_1000 = {
    "t": (medformer.MEDFORMER_T, 3.46e6),
    "s": (medformer.MEDFORMER_S, 13.14e6),
    "b": (medformer.MEDFORMER_B, 29.06e6),
}


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Run this file's many small-tensor ops on one thread, then restore the session's setting.

    The tiny models are dominated by per-op overhead; with 2 OpenMP threads on a loaded 2-core machine, OpenMP's active
    spin-waiting made this file about 8× slower (170 s instead of 20 s; ``OMP_WAIT_POLICY=PASSIVE`` also avoids it).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _meta_victim(name: str):
    with torch.device("meta"):
        return VICTIMS.get(name).factory()


def _images(victim, b: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.rand(b, *victim.card.input_size, generator=torch.Generator().manual_seed(seed))


# --- routing attention -------------------------------------------------------------------------------------------


def dense_reference(
    m: RoutingAttention, x: torch.Tensor, allowed: torch.Tensor | None = None, k2: int | None = None
) -> torch.Tensor:
    """Plain multi-head attention with the module's weights; optional token mask and per-query top-k2 on the logits."""
    n, h, w, c = x.shape
    q, k, v = m.qkv(x).reshape(n, h * w, 3, m.num_heads, c // m.num_heads).permute(2, 0, 3, 1, 4)
    logits = (q * m.scale) @ k.transpose(-1, -2)
    if allowed is not None:
        logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    if k2 is not None:
        logits = logits.masked_fill(logits < logits.topk(k2, -1).values[..., -1:], float("-inf"))
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(n, h, w, c)
    src = v.transpose(1, 2).reshape(n, h, w, c) if m.lepe_on == "v" else x
    return m.proj(out + m.lepe(src.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


def routed_token_mask(m: RoutingAttention, x: torch.Tensor) -> torch.Tensor:
    """Token-to-token mask of BRA routing, computed by hand: region means of Q, K and their top-k affinities."""
    n, h, w, c = x.shape
    s, (rh, rw) = m.n_win, (h // m.n_win, w // m.n_win)
    q, k, _ = m.qkv(x).chunk(3, -1)
    region = ((torch.arange(h) // rh)[:, None] * s + (torch.arange(w) // rw)[None, :]).flatten()
    q_mean = torch.stack([q.reshape(n, -1, c)[:, region == r].mean(1) for r in range(s * s)], 1)
    k_mean = torch.stack([k.reshape(n, -1, c)[:, region == r].mean(1) for r in range(s * s)], 1)
    chosen = (q_mean @ k_mean.transpose(1, 2)).topk(m.topk, -1).indices
    regions = torch.zeros(n, s * s, s * s, dtype=torch.bool).scatter_(-1, chosen, True)
    return regions[:, region][:, :, region]


@pytest.mark.parametrize("kind", ["bra", "dssa", "full"])
def test_routing_equals_dense_attention_when_topk_selects_everything(kind):
    torch.manual_seed(0)
    x = torch.randn(2, 8, 12, 16)
    opts = {
        "bra": dict(n_win=2, topk=4),
        "dssa": dict(n_win=2, topk=4, pixel_div=1),
        "full": dict(topk=None, scale="head", lepe_on="x", qkv_bias=False),
    }[kind]
    m = RoutingAttention(16, 4, **opts)
    torch.testing.assert_close(m(x), dense_reference(m, x), atol=1e-5, rtol=1e-5)


def test_routing_matches_masked_reference_for_partial_topk():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 8, 16)
    bra = RoutingAttention(16, 2, n_win=4, topk=3)
    allowed = routed_token_mask(bra, x)
    torch.testing.assert_close(bra(x), dense_reference(bra, x, allowed), atol=1e-5, rtol=1e-5)
    dssa = RoutingAttention(16, 2, n_win=4, topk=3, pixel_div=3)
    dssa.load_state_dict(bra.state_dict())
    k2 = 3 * 4 // 3  # k1 · tokens-per-region // pixel_div
    torch.testing.assert_close(dssa(x), dense_reference(dssa, x, allowed, k2), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(dssa(x), bra(x))


def test_routing_uses_the_published_scales_and_pads_odd_sizes():
    bra, full = RoutingAttention(64, 2, topk=1), RoutingAttention(64, 8, topk=None, scale="head", lepe_on="x")
    assert bra.scale == 64**-0.5 and full.scale == 8**-0.5
    x = torch.randn(1, 10, 9, 64)
    assert RoutingAttention(64, 2, n_win=4, topk=3, kv_pool=2)(x).shape == x.shape


def test_routing_gradients_reach_only_selected_regions():
    """Routing on detached features: a region's output has no gradient w.r.t. tokens of regions it did not route to."""
    torch.manual_seed(0)
    m = RoutingAttention(8, 1, n_win=2, topk=1, lepe_kernel=0)
    x = torch.randn(1, 4, 4, 8, requires_grad=True)
    m(x)[:, :2, :2].sum().backward()  # the queries of region 0 (top-left 2×2 tokens)

    def per_region(t: torch.Tensor) -> torch.Tensor:  # (4, 4) token map → (4,) region sums
        return t.reshape(2, 2, 2, 2).permute(0, 2, 1, 3).reshape(4, 4).sum(1)

    routed = per_region(routed_token_mask(m, x.detach())[0, 0].reshape(4, 4).float()) > 0
    expected = routed | (torch.arange(4) == 0)
    assert torch.equal(per_region(x.grad[0].abs().sum(-1)) > 0, expected)


def test_pointwise_conv_equals_a_1x1_convolution():
    torch.manual_seed(0)
    conv = PointwiseConv(6, 5)
    x = torch.randn(2, 6, 7, 3)
    torch.testing.assert_close(conv(x), torch.nn.functional.conv2d(x, conv.weight, conv.bias), atol=1e-5, rtol=1e-5)


def test_dssa_pixel_k_is_clamped():
    m = RoutingAttention(16, 2, topk=2, pixel_div=8, pixel_k_min=4)
    assert m.pixel_k(8) == 4 and m.pixel_k(64) == 8 and m.pixel_k(3) == 3


# --- published configurations ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMS))
def test_full_parameter_counts_match_the_reference(name):
    v = _meta_victim(name)
    n = count_parameters(v.net)
    assert abs(n - REFERENCE_PARAMS[name]) / REFERENCE_PARAMS[name] < 0.02
    assert v.card.params == n


@pytest.mark.parametrize("size", sorted(MEDFORMER_1000))
def test_medformer_with_imagenet_head_matches_the_reference(size):
    cfg, ref = MEDFORMER_1000[size]
    with torch.device("meta"):
        n = count_parameters(biformer.BiFormer(cfg, 1000))
    assert abs(n - ref) / ref < 0.02


@pytest.mark.parametrize("name", FULL + TINY + SHORTCUT)
def test_cards_record_measured_costs(name):
    v = _meta_victim(name)
    assert v.card.params == count_parameters(v.net) and v.card.flops > 0 and v.card.notes
    assert (VICTIMS.get(name).meta.get("recipe") is None) == (name in FULL)


def test_routed_victims_are_marked_for_gradient_masking_checks():
    routed = {n for n in ZOO if VICTIMS.get(n).meta["card"].extra.get("routing") in ("bra", "dssa")}
    assert routed == {n for n in ZOO if not n.startswith(("mslaunet.", "wavenetsf."))}


def test_recorded_flops_are_reproduced():
    v = _meta_victim("biformer.tiny")
    assert measure_flops(v.net, v.card.input_size) == v.card.flops


def test_full_victims_need_external_weights():
    with pytest.raises(rbm.WeightsError, match="weights=PATH"):
        rbm.create_victim("medformer.t")


# --- tiny configurations -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=TINY)
def tiny(request):
    torch.manual_seed(0)
    return rbm.create_victim(request.param, weights=None)


def test_forward_shapes_at_several_sizes(tiny):
    c = tiny.card.input_size[0]
    for h, w in ((96, 96), (32, 64)):
        out = tiny.net(torch.randn(2, c, h, w))
        if tiny.task in ("binary", "classification"):
            assert out.shape == (2, len(tiny.card.classes))
        else:
            assert out.shape == (2, len(tiny.card.classes), h, w)


def test_input_gradients_are_nonzero(tiny):
    x = _images(tiny).requires_grad_(True)
    y = rbm.create_dataset("phantom.ct", split="val", n=2).targets(
        VICTIMS.get(tiny.card.name).meta["recipe"].target_field
    )
    tiny.objective(x, y).sum().backward()
    assert (x.grad.flatten(1).abs().sum(1) > 0).all()


def test_outputs_are_deterministic_under_a_seed(tiny):
    torch.manual_seed(0)
    other = rbm.create_victim(tiny.card.name, weights=None)
    x = _images(tiny)
    assert torch.equal(tiny(x), other(x))


def test_feature_hooks_return_per_stage_activations(tiny):
    feats = tiny.features(_images(tiny))
    assert set(feats) == set(tiny.feature_layers) and len(feats) >= 4
    encoder = [feats[name] for name in tiny.feature_layers if "stages" in name or "layers" in name]
    sizes = [f.shape[-1] for f in encoder[:3]]
    assert sizes == sorted(sizes, reverse=True) and all(f.dim() == 4 for f in feats.values())


@pytest.mark.parametrize("name", SEGMENTORS)
def test_encode_decode_compose_to_forward(name):
    torch.manual_seed(0)
    v = rbm.create_victim(name, weights=None)
    x = _images(v)
    assert v.has_latent
    torch.testing.assert_close(v.decode(v.encode(x)), v(x))


def test_han_loss_includes_deep_supervision():
    torch.manual_seed(0)
    v = rbm.create_victim("han.tiny", weights=None)
    x = _images(v)
    y = rbm.create_dataset("phantom.ct", split="val", n=2).targets("landmarks")
    out = v(x)
    full_only = v.loss(out.clone(), y)
    assert (v.loss(out, y) > full_only).all()
    assert len(v.net.forward_all(v.mean.new_zeros(1, 1, 64, 64))[1]) == 2


@pytest.mark.parametrize("name", TINY)
def test_tiny_model_trains_on_the_phantom(name):
    recipe = VICTIMS.get(name).meta["recipe"]
    torch.manual_seed(0)
    v = rbm.create_victim(name, weights=None).train()
    ds = rbm.create_dataset("phantom.ct", split="train", n=16)
    x, y = ds.images(), ds.targets(recipe.target_field)
    opt = torch.optim.AdamW(v.parameters(), lr=2e-3)
    losses = []
    for _ in range(6):
        loss = v.loss(v(x), y).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
