"""HySparK-style victim (``victims/hyspark.py``): sparse masking hides the masked cubes from every CNN stage and from
the transformer, the masked per-cube-normalised loss, pre-training lowers it, shapes and cards of the registered pair,
the two-stage trainer's record, and sliding-window inference under PGD. Tiny configs only (the registered recipe is
trained by ``train_victim``, not here)."""
from dataclasses import replace

import pytest
import torch

import robustbench_med as rbm
from robustbench_med.registry import VICTIMS
from robustbench_med.threat import check_budget
from robustbench_med.victim import ModelVictim
from robustbench_med.victims import hyspark as H

TINY = {"widths": (4, 4, 8), "dim": 12, "depth": 1, "heads": 2}


def _encoder(seed: int = 0) -> H.HybridEncoder:
    torch.manual_seed(seed)
    return H.HybridEncoder(1, **TINY).eval()


def _masked_input(seed: int = 0, size: int = 16):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(2, 1, size, size, size, generator=g)
    keep = H.random_keep(2, (size // H.UNIT,) * 3, 0.5, g)
    return z, keep


def _hidden(keep: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return H.expand_mask(keep, f.shape[2:]).expand_as(f) == 0


def test_the_mask_is_drawn_per_token_and_expanded_bottom_up():
    keep = H.random_keep(3, (4, 4, 4), 0.6, torch.Generator().manual_seed(0))
    assert keep.shape == (3, 1, 4, 4, 4) and keep.dtype == torch.bool
    assert (keep.flatten(1).sum(1) == round(64 * 0.4)).all()  # 26 visible of 64 tokens, per sample
    assert not torch.equal(keep[0], keep[1])
    full = H.expand_mask(keep, (32, 32, 32))
    assert full.shape == (3, 1, 32, 32, 32)
    assert torch.equal(full[:, :, ::8, ::8, ::8].bool(), keep)  # each token is one 8³ cube
    assert torch.equal(full[:, :, 8:16, 16:24, 0:8].amin((2, 3, 4)), full[:, :, 8:16, 16:24, 0:8].amax((2, 3, 4)))


def test_content_of_masked_cubes_never_reaches_the_encoders_outputs():
    """Changing the voxels inside masked cubes changes no feature map, at any CNN stage or in the transformer, and
    masked positions are exactly zero at every stage (the mask pattern does not vanish), visible ones not."""
    enc = _encoder()
    z, keep = _masked_input()
    z2 = z.clone()
    hid = _hidden(keep, z)
    z2[hid] = torch.randn(int(hid.sum()), generator=torch.Generator().manual_seed(9)) * 10
    with torch.no_grad():
        a, b = enc(z, keep), enc(z2, keep)
    assert [f.shape[2] for f in a] == [16, 8, 4, 2]
    for fa, fb in zip(a, b):
        assert torch.equal(fa, fb)
        assert fa[_hidden(keep, fa)].abs().max() == 0
        assert fa[~_hidden(keep, fa)].abs().max() > 0
    with torch.no_grad():  # the same input without a mask: the hidden cubes do reach the output
        assert not torch.equal(enc(z)[-1], enc(z2)[-1])


def _inject(enc: H.HybridEncoder, keep: torch.Tensor, g: torch.Generator) -> list:
    """Forward hooks adding noise at the masked positions of every conv and norm output (what a dense convolution
    would write there, and spread to visible neighbours at the next layer)."""

    def hook(_m, _i, out):
        return out + torch.randn(out.shape, generator=g) * _hidden(keep, out)

    return [m.register_forward_hook(hook) for m in enc.modules() if isinstance(m, (torch.nn.Conv3d, H.ChannelNorm))]


def test_every_conv_and_norm_is_re_masked_like_a_sparse_convolution():
    """Noise written into the masked positions after every conv and norm layer leaves all features identical: each
    layer's visible outputs depend on visible inputs only (submanifold sparse convolution, emulated). The same noise
    in a dense forward pass of the same masked input (no re-masking, SimMIM-like) does change visible features."""
    enc = _encoder()
    z, keep = _masked_input(1)
    with torch.no_grad():
        clean = enc(z, keep)
        handles = _inject(enc, keep, torch.Generator().manual_seed(3))
        try:
            noisy = enc(z, keep)
            dense_noisy = enc(z * H.expand_mask(keep, z.shape[2:]))
        finally:
            for h in handles:
                h.remove()
        dense = enc(z * H.expand_mask(keep, z.shape[2:]))
    for fc, fn in zip(clean, noisy):
        assert torch.equal(fc, fn)
    visible = ~_hidden(keep, dense[2])
    assert not torch.allclose(dense[2][visible], dense_noisy[2][visible])


def test_the_transformer_encodes_the_visible_tokens_only():
    """MAE-style: visible-token outputs ignore whatever the masked tokens hold (a dense transformer on the same grid
    does not), and masked tokens come out as zeros for the decoder's mask tokens to fill."""
    enc = _encoder()
    g = torch.Generator().manual_seed(4)
    t = torch.randn(2, TINY["dim"], 2, 2, 2, generator=g)
    keep = H.random_keep(2, (2, 2, 2), 0.5, g)
    t2 = t + torch.randn(t.shape, generator=g) * _hidden(keep, t)
    with torch.no_grad():
        a, b = enc.transform(t, keep), enc.transform(t2, keep)
        dense_a, dense_b = enc.transform(t), enc.transform(t2)
    vis = ~_hidden(keep, a)
    assert torch.equal(a, b) and a[~vis].abs().max() == 0
    assert not torch.allclose(dense_a[vis], dense_b[vis])
    with pytest.raises(ValueError, match="same number"):
        bad = keep.clone()
        bad[0, 0, 0, 0, 0] = ~bad[0, 0, 0, 0, 0]
        enc.transform(t, bad)


def test_masked_loss_counts_masked_cubes_only_against_per_cube_normalised_targets():
    z, keep = _masked_input(5)
    pred = torch.randn(z.shape, generator=torch.Generator().manual_seed(6))
    loss = H.masked_patch_loss(pred, z, keep)
    visible = H.expand_mask(keep, z.shape[2:])
    assert H.masked_patch_loss(pred + 7 * visible, z, keep) == loss  # visible cubes do not count
    assert H.masked_patch_loss(pred + 0.5 * (1 - visible), z, keep) != loss  # masked cubes do
    assert H.masked_patch_loss(pred, 3 * z + 2, keep).item() == pytest.approx(loss.item(), rel=1e-4)  # per cube
    # a constant prediction scores the per-cube normalised variance: (n − 1) / n with the unbiased std
    n = H.UNIT ** 3
    assert H.masked_patch_loss(torch.zeros_like(z), z, keep).item() == pytest.approx((n - 1) / n, rel=1e-4)


def test_pretraining_lowers_the_masked_reconstruction_loss():
    """40 steps on 8 phantom volumes with a small encoder: the masked loss on fixed validation patches and masks
    falls below its value at initialisation and below that of predicting each cube's mean (zero after per-cube
    normalisation: what a decoder reaches by shrinking its output, without reconstructing anything). Measured on
    two threads: 1.156 at initialisation, 0.998 for the cube mean, 0.928 after."""
    train = rbm.create_dataset("phantom.volumes", split="train", n=8).images()
    val = rbm.create_dataset("phantom.volumes", split="val", n=4).images()
    norm = lambda x: (x - H.VOLUME_MEAN[0]) / H.VOLUME_STD[0]  # noqa: E731
    torch.manual_seed(0)
    enc = H.HybridEncoder(1, widths=(4, 8, 8), dim=24, depth=1, heads=2)
    recipe = H.HybridRecipe(pretrain_steps=40, pretrain_lr=5e-3)
    record = H.pretrain(enc, norm(train), recipe, torch.Generator().manual_seed(0), norm(val))
    assert record["loss_end"] < record["loss_start"]
    assert record["val_loss_end"] < 0.9 * record["val_loss_init"]
    assert record["val_loss_end"] < 0.97 * record["val_loss_cube_mean"]


def test_registered_pair_shapes_cards_and_recipes():
    victim = rbm.create_victim("hyspark.phantom", weights=None)
    card = victim.card
    assert card.input_size == (1, 32, 48, 48) and card.task == "segmentation" and len(card.classes) == 6
    assert card.extra["baseline"] == "hybrid3d.scratch" and "2408.05815" in card.paper
    assert "HySparK-style" in card.notes and "Simplified" in card.notes
    assert card.extra["sliding_window"]["roi_size"] == [32, 32, 32]
    pre, scratch = VICTIMS.get("hyspark.phantom").meta["recipe"], VICTIMS.get("hybrid3d.scratch").meta["recipe"]
    assert pre.pretrain_steps > 0 and scratch.pretrain_steps == 0 and replace(pre, pretrain_steps=0) == scratch
    control = rbm.create_victim("hybrid3d.scratch", weights=None)
    assert sum(p.numel() for p in control.net.parameters()) == sum(p.numel() for p in victim.net.parameters())
    counts = H.parameter_counts()
    assert counts["encoder"] + counts["seg_decoder"] == sum(p.numel() for p in victim.net.parameters())
    z = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        feats = victim.net.encoder(z)
        assert [tuple(f.shape[1:]) for f in feats] == [(8, 32, 32, 32), (16, 16, 16, 16), (32, 8, 8, 8), (96, 4, 4, 4)]
        assert victim.net(z).shape == (2, 6, 32, 32, 32)
        assert victim(torch.rand(1, 1, 32, 48, 48)).shape == (1, 6, 32, 48, 48)  # 4 windows, blended


def test_victim_runs_sliding_window_pgd_within_budget():
    victim = rbm.create_victim("hyspark.phantom", weights=None)
    data = rbm.create_dataset("phantom.volumes", split="val", n=2)
    x, y = data.images(), data.targets("mask")
    attack = rbm.create_attack("pgd.linf", eps=2 / 255, steps=2)
    x_adv = attack(victim, x, y)
    assert x_adv.shape == x.shape and torch.isfinite(x_adv).all()
    assert check_budget(x, x_adv, "Linf", 2 / 255).valid
    with torch.no_grad():
        assert victim.objective(x_adv, y).mean() > victim.objective(x, y).mean()


def test_trainer_records_both_stages_and_saves_current_weights(tmp_path, monkeypatch):
    """The two-stage trainer on a tiny registered copy: pre-training and fine-tuning numbers in the sidecar, weights
    that load and count as current."""
    from robustbench_med.training import is_current, train_victim
    from robustbench_med.weights import read_sidecar

    monkeypatch.setenv("ROBUSTBENCH_MED_HOME", str(tmp_path))
    name = "hyspark.testtiny"
    card = replace(H.CARDS["hyspark.phantom"], name=name)
    recipe = H.HybridRecipe(n_train=4, n_val=2, batch_size=2, steps=3, pretrain_steps=3, pretrain_batch_size=2)

    def factory():
        torch.manual_seed(0)
        return ModelVictim(H.HybridSegmenter(**TINY), card, H.VOLUME_MEAN, H.VOLUME_STD, window=H.WINDOW)

    VICTIMS.add(name, factory, card=card, recipe=recipe, trainer=H.train_hybrid, trainer_version=H.TRAINER_VERSION)
    try:
        path = train_victim(name, progress=False)
        meta = read_sidecar(path)
        assert meta["pretrain"]["steps"] == 3 and {"loss_start", "loss_end", "val_loss_init", "val_loss_end"} <= set(meta["pretrain"])
        assert meta["finetune"]["steps"] == 3 and 0 <= meta["val_metric"]["dice_fg"] <= 1
        assert meta["recipe"]["pretrain_steps"] == 3 and is_current(name, path)
        trained = rbm.create_victim(name)
        assert not torch.equal(trained.net.encoder.stem.conv.weight, factory().net.encoder.stem.conv.weight)
    finally:
        VICTIMS.remove(name)
