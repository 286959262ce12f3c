"""ERANet-style and SWDL-Net-style semi-supervised 3D segmentors (``victims/semisup3d.py``): edge replacement cuts
only z-slabs at the ends of organ components and relabels them body, the prototype terms, the stability split and
the confidence gate of conditional self-training, the Laplacian pyramid, the two-decoder network and its difference
term, the registered cards, sliding-window gradients, and both trainers on tiny registered copies (the registered
recipes are trained by ``train_victim``, not here)."""
from dataclasses import replace

import pytest
import torch
from scipy import ndimage

import robustbench_med as rbm
from robustbench_med.registry import VICTIMS
from robustbench_med.victim import ModelVictim
from robustbench_med.victims import semisup3d as S
from robustbench_med.victims.volumes import RECIPES as VOLUME_RECIPES, _crop, monai_unet3d


@pytest.fixture(scope="module")
def patches():
    data = rbm.create_dataset("phantom.volumes", split="train", n=4)
    x, y = data.images(), data.targets("mask")
    z = (x - 0.25) / 0.25
    return _crop(z, y, torch.Generator().manual_seed(1))


def test_edge_replacement_cuts_z_slabs_at_organ_ends_only(patches):
    z, y = patches
    za, ya = S.edge_replacement(z, y, torch.Generator().manual_seed(0), fraction=0.3)
    assert za.shape == z.shape and ya.shape == y.shape
    changed = ya != y
    assert changed.any(), "some organ end must have been cut"
    assert ((y[changed] == S.LIVER) | (y[changed] == S.KIDNEYS)).all() and (ya[changed] == S.BODY).all()
    assert torch.equal(za[:, 0][~changed], z[:, 0][~changed])  # the image changes on the cut voxels only
    for b in range(len(z)):  # fill values are the same patch's body intensities
        body = set(z[b, 0][y[b] == S.BODY].tolist())
        assert set(za[b, 0][changed[b]].tolist()) <= body
    for b in range(len(z)):  # per component and z-slice: all of it cut or none (slabs at the ends, along z)
        for c in (S.LIVER, S.KIDNEYS):
            comps, n = ndimage.label((y[b] == c).numpy(), structure=torch.ones(3, 3, 3).bool().numpy())
            comps = torch.from_numpy(comps)
            for k in range(1, n + 1):
                comp = comps == k
                zs = comp.any(2).any(1).nonzero().flatten()
                cut = [bool(changed[b][d][comp[d]].all()) for d in zs.tolist()]
                none = [not bool(changed[b][d][comp[d]].any()) for d in zs.tolist()]
                assert all(a or o for a, o in zip(cut, none))
                kept = [i for i, o in enumerate(none) if o]
                if kept:  # the cut slices are a prefix and a suffix of the component's extent
                    assert all(cut[i] for i in range(kept[0])) and all(cut[i] for i in range(kept[-1] + 1, len(cut)))
                    assert all(none[i] for i in range(kept[0], kept[-1] + 1))
    z0, y0 = S.edge_replacement(z, y, torch.Generator().manual_seed(0), fraction=0.0)
    assert torch.equal(z0, z) and torch.equal(y0, y)


def test_prototype_compactness_is_zero_when_features_equal_their_prototypes():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 6, (2, 4, 4, 4), generator=g)
    vectors = torch.randn(6, 5, generator=g)
    feat = vectors[labels].movedim(-1, 1).contiguous()  # every voxel's feature = its class vector
    logits = 30.0 * torch.nn.functional.one_hot(labels, 6).movedim(-1, 1).float()
    protos = S.class_prototypes(feat, logits.softmax(1))
    present = torch.stack([torch.bincount(l.flatten(), minlength=6) > 0 for l in labels])
    assert torch.allclose(protos[present], vectors.expand(2, 6, 5)[present], atol=1e-4)
    align, compact = S.prototype_losses(feat, logits)
    assert compact.abs() < 1e-5
    _, compact_noisy = S.prototype_losses(feat + 0.5 * torch.randn(feat.shape, generator=g), logits)
    assert compact_noisy > 1e-2
    # the alignment term sends gradient to the segmentation only (the similarity target is detached)
    feat = feat.clone().requires_grad_(True)
    logits = torch.randn(logits.shape, generator=g, requires_grad=True)
    align, _ = S.prototype_losses(feat, logits)
    align.backward()
    assert feat.grad is None or feat.grad.abs().max() == 0
    assert logits.grad.abs().max() > 0


def test_feature_tap_records_the_last_decoder_features_of_the_student_only():
    net = monai_unet3d()
    with S.FeatureTap(net) as tap:
        out = net(torch.randn(1, 1, 32, 32, 32))
    assert tap.features.shape == (1, 32, 16, 16, 16) and tap.logits is out
    net(torch.randn(1, 1, 32, 32, 32))  # hooks removed
    assert tap.logits is out


def test_stability_split_keeps_volumes_whose_pseudo_labels_agree():
    g = torch.Generator().manual_seed(0)
    ref = torch.randint(0, 3, (3, 8, 8, 8), generator=g)
    later = ref.clone()
    later[1] = torch.randint(0, 3, (8, 8, 8), generator=g)  # volume 1 changes everywhere
    later[2, 0, 0, 0] = 5  # one voxel of a class absent elsewhere: Dice 0 for that class -> mean 5/6 of ~1
    reliable = S.stability_split([ref, ref, later], 6, 0.8)
    assert reliable.tolist() == [True, False, True]
    assert S.stability_split([ref, later], 6, 0.9).tolist() == [True, False, False]


def test_conditional_self_training_counts_confident_voxels_only():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 4, 4, 4, generator=g, requires_grad=True)
    labels = torch.randint(0, 6, (2, 4, 4, 4), generator=g)
    conf = torch.rand(2, 4, 4, 4, generator=g)
    loss = S.pseudo_label_loss(logits, labels, conf, 0.5)
    loss.backward()
    low = conf < 0.5
    assert logits.grad.movedim(1, -1)[low].abs().max() == 0 and logits.grad.movedim(1, -1)[~low].abs().max() > 0
    other = labels.clone()
    other[low] = (other[low] + 1) % 6  # different pseudo-labels where the teacher is unsure: same loss
    assert torch.allclose(S.pseudo_label_loss(logits, other, conf, 0.5), loss)
    ce = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    assert torch.allclose(loss, ce[~low].mean())
    assert S.pseudo_label_loss(logits, labels, conf, 2.0) == 0


def test_laplacian_pyramid_reconstructs_exactly_and_delpu_sharpens():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 16, 12, 10, generator=g)
    for levels in (1, 2):
        pyr = S.laplacian_pyramid(x, levels)
        assert len(pyr) == levels + 1 and pyr[0].shape == x.shape
        assert torch.allclose(S.laplacian_reconstruct(pyr, 1.0), x, atol=1e-5)
    sharp = S.laplacian_reconstruct(S.laplacian_pyramid(x, 1), 1.5)
    assert not torch.allclose(sharp, x, atol=1e-3)
    ref = x  # the shifted-sum blur is a depthwise Gaussian convolution
    k = S._gaussian_kernel()
    for d in range(3):
        shape, pad = [1, 1, 1, 1, 1], [0, 0, 0]
        shape[2 + d], pad[d] = 3, 1
        ref = torch.nn.functional.conv3d(ref, k.view(shape).expand(3, 1, *shape[2:]), padding=tuple(pad), groups=3)
    assert torch.allclose(S.gaussian_blur3d(x), ref, atol=1e-6)
    up = S.LaplacianUpsample3d(1.5)
    assert up(x[..., :8, :8, :8]).shape == (2, 3, 16, 16, 16)
    small = x[..., :4, :4, :4]  # below min_size: plain trilinear x2
    assert torch.equal(up(small), S._resize(small, (8, 8, 8)))


def test_swdl_network_decoders_gates_and_difference_term():
    torch.manual_seed(0)
    net = S.SWDLNet(widths=(4, 8, 8, 16)).eval()
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        out1, out2, st1, st2, sides = net.forward_train(x, n_side=1)
        assert torch.equal(net(x), out1)  # inference = the DC decoder
        assert out1.shape == out2.shape == (2, 6, 32, 32, 32) and all(s.shape == (1, 6, 32, 32, 32) for s in sides)
        feats = net.encoder(x)
        en = net.difference(st1, st2, 1e-3)
        assert [e.shape for e in en] == [f.shape for f in feats]
        assert torch.allclose(en[-1], -1e-3 * feats[-1] * torch.sigmoid(feats[-1]))  # bottleneck: x − (x + x·σ(x))
        shifted = net.encoder(x, en)
        assert torch.allclose(shifted[0] - feats[0], en[0], atol=1e-6)  # added at its own stratum
        ungated = net.delpu(feats)[0]
        assert not torch.allclose(ungated, out2)  # DelPU skips are gated by the DC stage features
    _, en_grad = S.swdl_loss(net.train(), x, torch.randint(0, 6, (1, 32, 32, 32)), 1, None, S.SWDLRecipe(), torch.ones(6))
    assert all(not e.requires_grad for e in en_grad)


@pytest.mark.parametrize("name", ["eranet.phantom", "swdlnet.phantom"])
def test_registered_victims_cards_recipes_and_sliding_window_gradient(name):
    victim = rbm.create_victim(name, weights=None)
    card = victim.card
    assert card.input_size == (1, 32, 48, 48) and card.task == "segmentation" and len(card.classes) == 6
    assert card.extra["baseline"] == "unet3d.fewlabels" and card.extra["sliding_window"]["roi_size"] == [32, 32, 32]
    assert ("2502.07331" if name.startswith("eranet") else "2506.10325") in card.paper and "-style" in card.notes
    recipe, mt = VICTIMS.get(name).meta["recipe"], VOLUME_RECIPES["unet3d.meanteacher"]
    assert (recipe.n_labelled, recipe.n_train, recipe.steps, recipe.seed, recipe.lr) == (8, 160, 600, 0, mt.lr)
    if name == "eranet.phantom":
        assert recipe.consistency == mt.consistency and recipe.batch_size == mt.batch_size
        assert sum(p.numel() for p in victim.net.parameters()) == sum(p.numel() for p in monai_unet3d().parameters())
    x = torch.rand(1, 1, 32, 48, 48, requires_grad=True)
    out = victim(x)
    assert out.shape == (1, 6, 32, 48, 48)
    out[:, 2].sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert (x.grad[..., :16] != 0).any() and (x.grad[..., 32:] != 0).any()  # both window columns reach the input


def _tiny(name, base, recipe, build, trainer, monkeypatch, tmp_path):
    from robustbench_med.training import is_current, train_victim
    from robustbench_med.weights import read_sidecar

    monkeypatch.setenv("ROBUSTBENCH_MED_HOME", str(tmp_path))
    card = replace(S.CARDS[base], name=name)

    def factory():
        torch.manual_seed(0)
        return ModelVictim(build(), card, S.VOLUME_MEAN, S.VOLUME_STD, window=S.WINDOW)

    VICTIMS.add(name, factory, card=card, recipe=recipe, trainer=trainer, trainer_version=S.TRAINER_VERSION)
    try:
        path = train_victim(name, progress=False)
        meta = read_sidecar(path)
        assert 0 <= meta["val_metric"]["dice_fg"] <= 1 and meta["train_seconds"] > 0 and meta["train_threads"] >= 1
        assert is_current(name, path)
        trained = rbm.create_victim(name)
        first = lambda v: next(iter(v.net.parameters()))  # noqa: E731
        assert not torch.equal(first(trained), first(factory()))
        return meta
    finally:
        VICTIMS.remove(name)


def test_eranet_trainer_runs_all_three_components(tmp_path, monkeypatch):
    recipe = S.EraRecipe(n_train=6, n_val=2, n_labelled=2, batch_size=2, steps=6)
    meta = _tiny("eranet.testtiny", "eranet.phantom", recipe, monai_unet3d, S.train_eranet, monkeypatch, tmp_path)
    comp = meta["components"]
    assert comp["era_patches"] > 0 and comp["era_voxels"] > 0
    assert comp["cst"]["reliable"] + comp["cst"]["unreliable"] == 4


def test_swdl_trainer_runs_its_phases(tmp_path, monkeypatch):
    recipe = S.SWDLRecipe(n_train=4, n_val=2, n_labelled=2, batch_size=1, steps=3)
    meta = _tiny("swdlnet.testtiny", "swdlnet.phantom", recipe, lambda: S.SWDLNet(widths=(4, 4, 8, 8)), S.train_swdl,
                 monkeypatch, tmp_path)
    assert meta["params_inference"] < meta["params"]
