"""Per-class, per-layer Gaussian mixtures of globally pooled features (the HFC feature model), fitted and cached.

Yao et al., "A Hierarchical Feature Constraint to Camouflage Medical Adversarial Attacks", MICCAI 2021 (released
``get_GMM.py``): for every class c and every feature layer l, a ``sklearn.mixture.BayesianGaussianMixture`` with K
full-covariance components is fitted to the global-average-pooled activations f_l(x) ∈ R^{C_l} of the training
images of class c. A component k stores its mean μ_k, the Cholesky factor L_k of its precision (Σ_k⁻¹ = L_k L_kᵀ) and
its weight π_k.

**Which layers (the hierarchy).** ``hierarchy='blocks'`` (default) uses the victim's feature layers (its 3–4 block
or stage outputs, ``Victim.feature_modules``); ``hierarchy='conv'`` uses the output of every convolution module, in
definition order, as the released code does on its CNNs (VGG16: 13 conv feature maps; ResNet-50: 48; ``network.py``).
An explicit ``layers`` list may name any of both.

Layers with more than ``max_channels`` channels are skipped (the released code skips C_l > 512). Fits are
deterministic under ``seed`` and cached as ``.npz`` (``allow_pickle=False``) plus a JSON sidecar under
``<home>/feature_stats/``, keyed by victim name, weights sha256, layers, K, seed, data fingerprint and fit options.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from robustbench_med import paths
from robustbench_med.errors import ConfigError, TaskNotSupportedError
from robustbench_med.registry import VICTIMS
from robustbench_med.tasks import get_task
from robustbench_med.tasks import predict as task_predict
from torch import nn

from robustbench_med.victim import Victim, eval_mode
from robustbench_med.weights import atomic_write_bytes

STATS_VERSION = 1
HIERARCHIES = ("blocks", "conv")


def global_pool(t: torch.Tensor) -> torch.Tensor:
    """Global average pooling of one activation: [B, C, H, W] → mean over H, W; [B, N, C] tokens → mean over N;
    [B, C] is returned as is (Yao et al. 2021 use GAP features of every CNN layer)."""
    if t.dim() == 4:
        return t.mean(dim=(2, 3))
    if t.dim() == 3:
        return t.mean(dim=1)
    if t.dim() == 2:
        return t
    raise ConfigError(f"cannot pool a feature of shape {tuple(t.shape)} (expected 2, 3 or 4 dims)")


def base_victim(victim: Victim) -> tuple[Victim, str]:
    """The innermost victim of a defence wrapper chain and the layer-name prefix the wrappers add (``'victim.'``
    per level), so statistics of the undefended model can be used through a :class:`DetectorVictim`."""
    prefix = ""
    while isinstance(getattr(victim, "victim", None), Victim):
        victim, prefix = victim.victim, prefix + "victim."
    return victim, prefix


def victim_fingerprint(victim: Victim) -> str:
    """The victim's weights sha256 from its card, or a sha256 of its state dict when it was not loaded from a file."""
    if victim.card.weights_sha256:
        return victim.card.weights_sha256
    h = hashlib.sha256()
    for name, t in sorted(victim.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def num_classes(victim: Victim) -> int:
    """Number of classes of a binary (2) or multi-class classifier; other tasks raise."""
    task = get_task(victim.task)
    if not task.single_label:
        raise TaskNotSupportedError(f"feature statistics need a binary or multi-class classifier, not a {victim.task!r} victim ({victim.card.name})")
    return task.num_classes(victim.card.classes)


def conv_modules(victim: Victim) -> dict[str, nn.Module]:
    """Every convolution module of ``victim`` (``nn.Conv1d/2d/3d`` and transposed), by name, in definition order."""
    return {name: m for name, m in victim.named_modules() if isinstance(m, nn.modules.conv._ConvNd)}


def layer_modules(victim: Victim) -> dict[str, nn.Module]:
    """The modules a feature constraint or detector may read: the feature layers, then every convolution."""
    return {**victim.feature_modules(), **{n: m for n, m in conv_modules(victim).items() if n not in victim.feature_modules()}}


def resolve_layers(victim: Victim, layers: Sequence[str] | None, hierarchy: str = "blocks") -> list[str]:
    """Validated layer names of ``victim``: ``layers`` when given, else the ``hierarchy`` (``'blocks'``: the
    feature layers; ``'conv'``: every convolution, see the module docstring)."""
    if hierarchy not in HIERARCHIES:
        raise ConfigError(f"hierarchy must be one of {HIERARCHIES}, got {hierarchy!r}")
    available = list(layer_modules(victim))
    default = list(victim.feature_modules()) if hierarchy == "blocks" else list(conv_modules(victim))
    if layers is None:
        if not default:
            what = "feature layers (feature_modules() is empty)" if hierarchy == "blocks" else "convolution modules"
            raise ConfigError(f"victim {victim.card.name!r} exposes no {what}")
        return default
    if isinstance(layers, str) or not len(layers):
        raise ConfigError(f"layers must be a non-empty list of layer names, got {layers!r}; available: {available}")
    unknown = [l for l in layers if l not in available]
    if unknown:
        raise ConfigError(f"unknown feature layers {unknown} for {victim.card.name!r}; available: {available}")
    return list(layers)


def module_activations(victim: Victim, x: torch.Tensor, names: Sequence[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The victim's output and the raw activations of the modules ``names`` (feature layers or convolutions, see
    :func:`layer_modules`) from one forward pass; gradients flow."""
    if not names:
        return victim(x), {}
    modules = layer_modules(victim)
    missing = [n for n in names if n not in modules]
    if missing:
        raise ConfigError(f"victim {victim.card.name!r} has no layers {missing}; available: {list(modules)}")
    feats: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def store(_m: Any, _inp: Any, output: Any) -> None:
            feats[name] = output[0] if isinstance(output, (tuple, list)) else output

        return store

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    try:
        out = victim(x)
    finally:
        for h in handles:
            h.remove()
    return out, feats


@torch.no_grad()
def pooled_features(victim: Victim, x: torch.Tensor, layers: Sequence[str], batch_size: int = 128) -> dict[str, torch.Tensor]:
    """Global-average-pooled activations ``{layer: [n, C_l]}`` (float64, CPU) of ``victim`` on ``x`` (eval mode)."""
    out: dict[str, list[torch.Tensor]] = {l: [] for l in layers}
    with eval_mode(victim):
        for i in range(0, len(x), batch_size):
            _, feats = module_activations(victim, x[i : i + batch_size].to(victim.device), layers)
            for l in layers:
                out[l].append(global_pool(feats[l]).double().cpu())
    return {l: torch.cat(v) for l, v in out.items()}


@dataclass(frozen=True)
class Mixture:
    """One fitted mixture: means [K, C], precision Cholesky factors [K, C, C] (Σ⁻¹ = L Lᵀ), weights [K]."""

    means: np.ndarray
    precisions_cholesky: np.ndarray
    weights: np.ndarray


@dataclass
class FeatureStats:
    """Mixtures per (class, layer) with the metadata that identifies them (see the module docstring)."""

    victim: str
    layers: tuple[str, ...]
    n_classes: int
    n_components: int
    seed: int
    meta: dict[str, Any]
    mixtures: dict[tuple[int, str], Mixture]
    _torch: dict[Any, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    def tensors(self, layer: str, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stacked ``(means [n_classes, K, C], chol [n_classes, K, C, C], log_weights [n_classes, K])`` of ``layer``."""
        key = (layer, str(device), dtype)
        if key not in self._torch:
            mix = [self.mixtures[(c, layer)] for c in range(self.n_classes)]
            mu = torch.as_tensor(np.stack([m.means for m in mix]), dtype=dtype, device=device)
            chol = torch.as_tensor(np.stack([m.precisions_cholesky for m in mix]), dtype=dtype, device=device)
            logw = torch.as_tensor(np.log(np.stack([m.weights for m in mix]).clip(1e-300)), dtype=dtype, device=device)
            self._torch[key] = (mu, chol, logw)
        return self._torch[key]

    def layer_term(self, layer: str, f: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-sample ℒ_HFC,l = (1/C_l)‖(f − μ_k*) L_k*‖² towards class ``target`` (Yao et al. 2021, ``loss_fn_``).

        k* = argmax_k [log π_k − ½‖(f − μ_k) L_k‖² + Σ log diag L_k] is chosen without gradient; the returned
        term keeps the gradient with respect to ``f`` ([B, C_l] pooled features).
        """
        mu, chol, logw = self.tensors(layer, f.device, f.dtype)
        mu_t, chol_t, logw_t = mu[target], chol[target], logw[target]  # [B, K, C], [B, K, C, C], [B, K]
        with torch.no_grad():
            d2 = _sq_mahalanobis(f.detach().unsqueeze(1), mu_t, chol_t)  # [B, K]
            logdet = torch.diagonal(chol_t, dim1=-2, dim2=-1).log().sum(-1)
            k = (logw_t - 0.5 * d2 + logdet).argmax(1)
        rows = torch.arange(len(f), device=f.device)
        d2_star = _sq_mahalanobis(f, mu_t[rows, k], chol_t[rows, k])
        return d2_star / f.shape[1]

    def hfc_term(self, feats: dict[str, torch.Tensor], target: torch.Tensor, prefix: str = "") -> torch.Tensor:
        """Per-sample Σ_l ℒ_HFC,l over the fitted layers; ``feats`` maps ``prefix + layer`` to raw activations."""
        total = None
        for layer in self.layers:
            term = self.layer_term(layer, global_pool(feats[prefix + layer]), target)
            total = term if total is None else total + term
        return total

    def save(self, path: Path) -> None:
        arrays = {}
        for (c, layer), m in self.mixtures.items():
            i = self.layers.index(layer)
            arrays[f"c{c}_l{i}_means"] = m.means
            arrays[f"c{c}_l{i}_chol"] = m.precisions_cholesky
            arrays[f"c{c}_l{i}_weights"] = m.weights
        import io

        buf = io.BytesIO()
        np.savez(buf, **arrays)
        atomic_write_bytes(path, buf.getvalue())
        info = {"victim": self.victim, "layers": list(self.layers), "n_classes": self.n_classes,
                "n_components": self.n_components, "seed": self.seed, "meta": self.meta,
                "sha256": hashlib.sha256(buf.getvalue()).hexdigest()}
        atomic_write_bytes(path.with_suffix(".json"), json.dumps(info, indent=1, sort_keys=True).encode())

    @classmethod
    def load(cls, path: Path) -> "FeatureStats":
        info = json.loads(path.with_suffix(".json").read_text())
        if hashlib.sha256(path.read_bytes()).hexdigest() != info["sha256"]:
            raise ConfigError(f"feature statistics cache {path} is corrupted (sha256 mismatch); delete it to refit")
        layers = tuple(info["layers"])
        with np.load(path, allow_pickle=False) as z:
            mixtures = {
                (c, layer): Mixture(z[f"c{c}_l{i}_means"], z[f"c{c}_l{i}_chol"], z[f"c{c}_l{i}_weights"])
                for c in range(info["n_classes"]) for i, layer in enumerate(layers)
            }
        return cls(info["victim"], layers, info["n_classes"], info["n_components"], info["seed"], info["meta"], mixtures)


def _sq_mahalanobis(f: torch.Tensor, mu: torch.Tensor, chol: torch.Tensor) -> torch.Tensor:
    """‖(f − μ) L‖² over the last dim; shapes broadcast ([..., C], [..., C], [..., C, C])."""
    diff = (f - mu).unsqueeze(-2)  # [..., 1, C]
    return (diff @ chol).squeeze(-2).pow(2).sum(-1)


def fit_mixture(feats: np.ndarray, n_components: int, seed: int, reg_covar: float, max_iter: int = 1000, n_init: int = 2) -> Mixture:
    """A ``BayesianGaussianMixture`` (full covariance) fitted to ``feats`` [n, C] under ``seed`` (Yao et al. 2021)."""
    from sklearn.mixture import BayesianGaussianMixture

    gmm = BayesianGaussianMixture(n_components=n_components, covariance_type="full", n_init=n_init, max_iter=max_iter,
                                  reg_covar=reg_covar, random_state=seed)
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gmm.fit(feats)
    return Mixture(gmm.means_.astype(np.float64), gmm.precisions_cholesky_.astype(np.float64), gmm.weights_.astype(np.float64))


def _cache_path(key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
    safe = key["victim"].replace("/", "_")
    return paths.home() / "feature_stats" / safe / f"{digest}.npz"


def _dataset(dataset: Any, split: str, n: int | None):
    if isinstance(dataset, str):
        from robustbench_med.api import create_dataset

        return create_dataset(dataset, split=split, **({"n": n} if n is not None else {}))
    if n is not None and n < len(dataset):
        return dataset.subset(range(n))
    return dataset


def _fingerprint(ds: Any) -> str:
    if hasattr(ds, "fingerprint"):
        return ds.fingerprint()
    return hashlib.sha256(ds.images().numpy().tobytes()).hexdigest()


def stats_target_field(victim: Victim, target_field: str | None) -> str | None:
    """The target field for the statistics' labels: explicit, else the victim's training recipe field."""
    if target_field:
        return target_field
    base, _ = base_victim(victim)
    if base.card.name in VICTIMS:
        recipe = VICTIMS.get(base.card.name).meta.get("recipe")
        if recipe is not None:
            return recipe.target_field
    return base.card.extra.get("target_field")


def fit_feature_stats(
    victim: Victim,
    dataset: Any = "phantom.ct",
    *,
    split: str = "train",
    n: int | None = None,
    target_field: str | None = None,
    layers: Sequence[str] | None = None,
    hierarchy: str = "blocks",
    n_components: int = 2,
    seed: int = 0,
    max_channels: int = 512,
    reg_covar: float = 1e-4,
    use_cache: bool = True,
) -> FeatureStats:
    """Fit (or load from the cache) the per-class, per-layer mixtures of ``victim``'s pooled features.

    Args:
        victim: a binary or multi-class classifier (a defence wrapper is unwrapped to the undefended model).
        dataset: a registered dataset name (built with ``split`` and ``n``) or a dataset object with
            ``images()``, ``targets(field)`` and ``fingerprint()``.
        target_field: the label field (default: the victim's training recipe field); ``'predicted'`` uses the
            victim's own predictions as class labels.
        layers: feature layer names of the undefended victim (default: those of ``hierarchy``).
        hierarchy: ``'blocks'`` (the victim's feature layers) or ``'conv'`` (every convolution; the release).
        n_components: K, the number of mixture components per class and layer.
        max_channels: layers with more channels are skipped (the released HFC code uses 512).
        reg_covar: added to every covariance diagonal (keeps dead ReLU channels from giving infinite precision).
    """
    base, _ = base_victim(victim)
    k_classes = num_classes(base)
    _check_fit_params(n_components, max_channels, reg_covar, n)
    layers = resolve_layers(base, layers, hierarchy)
    field_name = stats_target_field(base, target_field)
    if not field_name:
        raise ConfigError(f"victim {base.card.name!r}: pass target_field (no training recipe names one)")
    ds = _dataset(dataset, split, n)
    key = {"victim": base.card.name, "weights": victim_fingerprint(base), "layers": layers, "K": n_components, "seed": seed,
           "data": _fingerprint(ds), "target_field": field_name, "max_channels": max_channels, "reg_covar": reg_covar,
           "version": STATS_VERSION}
    path = _cache_path(key)
    if use_cache and path.exists() and path.with_suffix(".json").exists():
        return FeatureStats.load(path)
    stats = _fit(base, ds, field_name, layers, k_classes, key)
    if use_cache:
        stats.save(path)
    return stats


def _check_fit_params(n_components: int, max_channels: int, reg_covar: float, n: int | None) -> None:
    for name, v in (("n_components", n_components), ("max_channels", max_channels)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {v!r}")
    if not (isinstance(reg_covar, (int, float)) and math.isfinite(reg_covar) and reg_covar > 0):
        raise ConfigError(f"reg_covar must be a finite number > 0, got {reg_covar!r}")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 2):
        raise ConfigError(f"n must be an integer >= 2, got {n!r}")


def _fit(base: Victim, ds: Any, field_name: str, layers: list[str], k_classes: int, key: dict[str, Any]) -> FeatureStats:
    x = ds.images()
    feats = pooled_features(base, x, layers)
    if field_name == "predicted":
        with torch.no_grad():
            y = torch.cat([task_predict(base.task, base(x[i : i + 128].to(base.device))).cpu() for i in range(0, len(x), 128)])
    else:
        y = ds.targets(field_name).long()
    if y.dim() != 1:
        raise ConfigError(f"target field {field_name!r} is not a class index per image (shape {tuple(y.shape)})")
    kept = [l for l in layers if feats[l].shape[1] <= key["max_channels"]]
    if not kept:
        raise ConfigError(f"every layer of {layers} has more than max_channels={key['max_channels']} channels")
    mixtures = {}
    for c in range(k_classes):
        idx = (y == c).nonzero().flatten()
        if len(idx) < max(2, key["K"]):
            raise ConfigError(f"class {c} has {len(idx)} training images in field {field_name!r}; "
                              f"need at least max(2, K={key['K']}) to fit its mixture")
        for l in kept:
            mixtures[(c, l)] = fit_mixture(feats[l][idx].numpy(), key["K"], key["seed"], key["reg_covar"])
    meta = {**key, "n_images": len(x), "channels": {l: int(feats[l].shape[1]) for l in layers}, "skipped": [l for l in layers if l not in kept]}
    return FeatureStats(key["victim"], tuple(kept), k_classes, key["K"], key["seed"], meta, mixtures)
