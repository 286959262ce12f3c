"""Adversarial-example detectors (the suite HFC is evaluated against; Yao et al., MICCAI 2021, ``adv_detectors.py``).

Every detector is a :class:`robustbench_med.defense.Detector`: ``prepare(victim, train)`` fits it, ``score(victim,
x)`` returns one score per image, higher = more likely adversarial. Fitting data, drawn from the training split with
a seeded permutation (:class:`FitData`):

- a *reference* set of clean images (class-conditional densities, LID neighbours, Mahalanobis class means);
- a disjoint *fit* set, used three times: clean images and uniform random noise within the base attack's L∞ budget
  (real noise, not clean copies) as negatives, and adversarial examples of a base attack (default ``pgd.linf`` at
  8/255) as positives (only the successful ones when there are any).

**One- and two-sided scores.** Every detector scores one-sided, as published: higher = more adversarial, so an attack
that pushes the score *below* the clean scores (HFC with a strong constraint makes features more typical than clean
ones) gets an AUROC under 0.5. Each fitted detector also keeps the median and scaled MAD of its scores on the clean fit
images, and the harness stores the two-sided score |s − median| / (1.4826·MAD)
(:meth:`robustbench_med.defense.Detector.two_sided`): a deployer who flags both tails catches such an overshoot.

Class labels are the victim's predictions, so no target field is needed. Features are global-average-pooled
activations of the victim's feature layers (:func:`robustbench_med.feature_stats.pooled_features`).

| name                  | score                                                                          | paper |
|-----------------------|--------------------------------------------------------------------------------|-------|
| ``detector.kd``       | per layer −log KDE density of the predicted class; logistic regression         | Feinman et al. 2017 |
| ``detector.lid``      | per layer MLE local intrinsic dimensionality (k = 20); logistic regression     | Ma et al., ICLR 2018 |
| ``detector.mahalanobis`` | per layer max-class −Mahalanobis (tied covariance, input pre-processing); LR | Lee et al., NeurIPS 2018 |
| ``detector.bu``       | MC-dropout predictive variance; 1-D logistic regression (learns the sign)      | Feinman et al. 2017; Gal & Ghahramani 2016 |
| ``detector.svm``      | RBF-SVM decision value on the last layer's pooled features                     | Yao et al. 2021 (SVM baseline) |
| ``detector.learned``  | small conv net per layer on the feature maps, logits averaged over layers      | Metzen et al., ICLR 2017 |
"""
from __future__ import annotations

import abc
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import numpy as np
import torch
from torch import nn

from robustbench_med.attack import seeded
from robustbench_med.defense import Detector
from robustbench_med.errors import ConfigError
from robustbench_med.feature_stats import global_pool, num_classes, pooled_features, resolve_layers, victim_fingerprint
from robustbench_med.registry import register_defense
from robustbench_med.tasks import predict as task_predict
from robustbench_med.tasks import get_task
from robustbench_med.threat import parse_eps
from robustbench_med.victim import Victim, eval_mode

_FIT_CACHE: "OrderedDict[tuple, FitData]" = OrderedDict()
_FIT_CACHE_SIZE = 4


@dataclass
class FitData:
    """Images the detectors are fitted on (all CPU tensors); labels are the victim's predictions."""

    x_ref: torch.Tensor
    y_ref: torch.Tensor
    x_clean: torch.Tensor
    x_noise: torch.Tensor
    x_adv: torch.Tensor
    y_fit: torch.Tensor

    def negatives_positives(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked fit images and their detection labels (0 = clean or noise, 1 = adversarial)."""
        x = torch.cat([self.x_clean, self.x_noise, self.x_adv])
        y = torch.cat([torch.zeros(2 * len(self.x_clean)), torch.ones(len(self.x_adv))])
        return x, y


@torch.no_grad()
def predicted_labels(victim: Victim, x: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """The victim's hard predictions (class index, or {0, 1} for binary heads) on ``x`` (CPU long tensor)."""
    out = [task_predict(victim.task, victim(x[i : i + batch_size].to(victim.device))).cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out).long()


def build_fit_data(victim: Victim, train: Any, attack: str, attack_params: dict[str, Any], n_ref: int, n_fit: int, seed: int,
                   batch_size: int = 128) -> FitData:
    """Draw reference and fit images from ``train`` and make their noise and adversarial versions (cached per victim,
    data, attack and sizes, so the detectors of one victim share one set of adversarial examples)."""
    from robustbench_med.api import create_attack

    fp = train.fingerprint() if hasattr(train, "fingerprint") else str(len(train))
    key = (victim.card.name, victim_fingerprint(victim), fp, attack, tuple(sorted((k, str(v)) for k, v in attack_params.items())), n_ref, n_fit, seed)
    if key in _FIT_CACHE:
        _FIT_CACHE.move_to_end(key)
        return _FIT_CACHE[key]
    if len(train) < n_ref + n_fit:
        raise ConfigError(f"the training split has {len(train)} images; the detectors need n_ref + n_fit = {n_ref + n_fit}")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    x_ref = train.images(order[:n_ref].tolist())
    x_clean = train.images(order[n_ref : n_ref + n_fit].tolist())
    y_ref, y_fit = predicted_labels(victim, x_ref), predicted_labels(victim, x_clean)
    atk = create_attack(attack, **attack_params)
    atk.check_task(victim)
    atk.prepare(victim, train)  # a base attack that learns from data (e.g. an HFC variant) is fitted on the same split
    if atk.threat.norm != "Linf":
        raise ConfigError(f"the detectors' base attack must be an L∞ attack (uniform noise negatives), got {atk.threat.norm}")
    eps = atk.threat.eps
    g = torch.Generator().manual_seed(seed + 1)
    x_noise = (x_clean + (torch.rand(x_clean.shape, generator=g) * 2 - 1) * eps).clamp(0, 1)
    x_adv = torch.cat([
        atk(victim, x_clean[i : i + batch_size].to(victim.device), y_fit[i : i + batch_size].to(victim.device), seed=seed + i).cpu()
        for i in range(0, len(x_clean), batch_size)
    ])
    fooled = predicted_labels(victim, x_adv) != y_fit
    if int(fooled.sum()) >= 2:
        x_adv = x_adv[fooled]
    data = FitData(x_ref, y_ref, x_clean, x_noise, x_adv, y_fit)
    _FIT_CACHE[key] = data
    while len(_FIT_CACHE) > _FIT_CACHE_SIZE:
        _FIT_CACHE.popitem(last=False)
    return data


def robust_location_scale(scores: np.ndarray) -> tuple[float, float]:
    """(median, 1.4826·MAD) of ``scores``, the clean reference of the two-sided score; the scale falls back to the
    standard deviation, then to 1, when the scores are (nearly) constant."""
    centre = float(np.median(scores))
    scale = 1.4826 * float(np.median(np.abs(scores - centre)))
    if not scale > 1e-12:
        scale = float(np.std(scores))
    return centre, scale if scale > 1e-12 else 1.0


def _positive_int(v: Any, name: str, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {v!r}")
    return v


def _positive_float(v: Any, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ConfigError(f"{name} must be a finite number > 0, got {v!r}")
    return float(v)


def _logistic() -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, class_weight="balanced"))


class FittedDetector(Detector):
    """Shared machinery: parameters, the fit data, fitted-state checks (see the module docstring).

    Args:
        attack, attack_params: the base attack whose examples are the positives (default ``pgd.linf``, 8/255).
        n_ref, n_fit: sizes of the clean reference set and of the fit set (drawn disjointly from ``train``).
        layers: feature layers (default: all of the victim's).
        seed: seed of the draw, the noise, the attack and any learned parameters.
    """

    differentiable: ClassVar[bool] = True

    def __init__(self, *, attack: str = "pgd.linf", attack_params: dict[str, Any] | None = None, n_ref: int = 512,
                 n_fit: int = 256, layers: Sequence[str] | None = None, seed: int = 0, batch_size: int = 128) -> None:
        if not isinstance(attack, str):
            raise ConfigError(f"attack must be a registered attack name, got {attack!r}")
        if attack_params is not None and not isinstance(attack_params, dict):
            raise ConfigError(f"attack_params must be a mapping, got {attack_params!r}")
        self.attack = attack
        self.attack_params = dict(attack_params) if attack_params is not None else {"eps": "8/255"}
        if "eps" in self.attack_params:
            parse_eps(self.attack_params["eps"])
        self.n_ref = _positive_int(n_ref, "n_ref", 2)
        self.n_fit = _positive_int(n_fit, "n_fit", 2)
        self.batch_size = _positive_int(batch_size, "batch_size")
        if layers is not None and (isinstance(layers, str) or not layers):
            raise ConfigError(f"layers must be a non-empty list of layer names, got {layers!r}")
        self.layers_param = list(layers) if layers is not None else None
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"seed must be an integer, got {seed!r}")
        self.seed = seed
        self._fitted_for: tuple[str, str | None] | None = None

    def params(self) -> dict[str, Any]:
        return {"attack": self.attack, "attack_params": self.attack_params, "n_ref": self.n_ref, "n_fit": self.n_fit,
                "layers": self.layers_param, "seed": self.seed, **self.extra_params()}

    def extra_params(self) -> dict[str, Any]:
        return {}

    def prepare(self, victim: Victim, train: Any) -> None:
        """Fit the detector for ``victim`` on clean + noise vs base-attack examples from ``train``."""
        num_classes(victim)  # raises for non-classifiers
        self.layers = resolve_layers(victim, self.layers_param)
        data = build_fit_data(victim, train, self.attack, self.attack_params, self.n_ref, self.n_fit, self.seed, self.batch_size)
        with seeded(self.seed):
            self.fit(victim, data)
            with eval_mode(victim):
                self.clean_reference = robust_location_scale(np.asarray(self.raw_score(victim, data.x_clean), dtype=np.float64))
        self._fitted_for = (victim.card.name, victim.card.weights_sha256)

    def score(self, victim: Victim, x: torch.Tensor) -> torch.Tensor:
        if self._fitted_for is None:
            raise ConfigError(f"detector {self.name!r} is not fitted: call prepare(victim, train) first")
        if self._fitted_for != (victim.card.name, victim.card.weights_sha256):
            raise ConfigError(f"detector {self.name!r} was fitted for {self._fitted_for[0]!r}, not {victim.card.name!r}")
        with eval_mode(victim):
            s = self.raw_score(victim, x)
        return torch.as_tensor(np.asarray(s, dtype=np.float64), dtype=torch.float32, device=x.device)

    @abc.abstractmethod
    def fit(self, victim: Victim, data: FitData) -> None:
        """Fit on ``data`` (implemented by each detector)."""

    @abc.abstractmethod
    def raw_score(self, victim: Victim, x: torch.Tensor) -> np.ndarray:
        """Per-sample scores as a numpy array (implemented by each detector)."""

    def pooled(self, victim: Victim, x: torch.Tensor) -> dict[str, np.ndarray]:
        return {l: v.numpy() for l, v in pooled_features(victim, x, self.layers, self.batch_size).items()}


class LayerScoreDetector(FittedDetector):
    """A detector with one characteristic per layer, combined by logistic regression (as in Ma et al. 2018,
    Lee et al. 2018); subclasses implement :meth:`fit_reference` and :meth:`layer_scores`."""

    def fit(self, victim: Victim, data: FitData) -> None:
        self.fit_reference(victim, data)
        x, labels = data.negatives_positives()
        self.combiner = _logistic().fit(self.layer_scores(victim, x), labels.numpy())

    def raw_score(self, victim: Victim, x: torch.Tensor) -> np.ndarray:
        return self.combiner.decision_function(self.layer_scores(victim, x))

    @abc.abstractmethod
    def fit_reference(self, victim: Victim, data: FitData) -> None:
        """Fit the clean reference model (densities, neighbours, class means)."""

    @abc.abstractmethod
    def layer_scores(self, victim: Victim, x: torch.Tensor) -> np.ndarray:
        """Per-sample, per-layer characteristics [n, n_layers]."""


class KernelDensityDetector(LayerScoreDetector):
    """Kernel density (Feinman et al., "Detecting Adversarial Samples from Artifacts", arXiv 1703.00410, 2017).

    Per class c and layer l a Gaussian ``KernelDensity`` on the z-scored pooled features of the reference images
    predicted as c; a sample's layer score is −log p_l(f_l(x) | ĉ(x)) under its predicted class ĉ. ``bandwidth``:
    a number or ``'scott'`` / ``'silverman'`` (default Scott's rule in the z-scored space).
    """

    def __init__(self, *, bandwidth: float | str = "scott", **kw: Any) -> None:
        super().__init__(**kw)
        if not (bandwidth in ("scott", "silverman") or (isinstance(bandwidth, (int, float)) and not isinstance(bandwidth, bool) and bandwidth > 0)):
            raise ConfigError(f"bandwidth must be > 0 or 'scott' / 'silverman', got {bandwidth!r}")
        self.bandwidth = bandwidth

    def extra_params(self) -> dict[str, Any]:
        return {"bandwidth": self.bandwidth}

    def fit_reference(self, victim: Victim, data: FitData) -> None:
        from sklearn.neighbors import KernelDensity

        feats = self.pooled(victim, data.x_ref)
        self.scale = {l: (f.mean(0), f.std(0) + 1e-6) for l, f in feats.items()}
        self.kde: dict[tuple[int, str], Any] = {}
        for c in range(num_classes(victim)):
            idx = (data.y_ref == c).numpy()
            if idx.sum() < 2:
                raise ConfigError(f"detector.kd: fewer than 2 reference images are predicted as class {c}")
            for l, f in feats.items():
                z = (f[idx] - self.scale[l][0]) / self.scale[l][1]
                self.kde[(c, l)] = KernelDensity(kernel="gaussian", bandwidth=self.bandwidth).fit(z)

    def layer_scores(self, victim: Victim, x: torch.Tensor) -> np.ndarray:
        feats, pred = self.pooled(victim, x), predicted_labels(victim, x, self.batch_size).numpy()
        out = np.zeros((len(x), len(self.layers)))
        for j, l in enumerate(self.layers):
            z = (feats[l] - self.scale[l][0]) / self.scale[l][1]
            for c in np.unique(pred):
                out[pred == c, j] = -self.kde[(int(c), l)].score_samples(z[pred == c])
        return out


class LIDDetector(LayerScoreDetector):
    """Local intrinsic dimensionality (Ma et al., "Characterizing Adversarial Subspaces Using Local Intrinsic
    Dimensionality", ICLR 2018): per layer the MLE LID̂(x) = −((1/k) Σ_{i≤k} log(r_i(x)/r_k(x)))⁻¹ with r_i the
    distance of f_l(x) to its i-th nearest clean reference feature; k = 20."""

    def __init__(self, *, k: int = 20, **kw: Any) -> None:
        super().__init__(**kw)
        self.k = _positive_int(k, "k", 2)
        if self.k >= self.n_ref:
            raise ConfigError(f"k must be smaller than n_ref ({self.n_ref}), got {k}")

    def extra_params(self) -> dict[str, Any]:
        return {"k": self.k}

    def fit_reference(self, victim: Victim, data: FitData) -> None:
        self.reference = {l: torch.as_tensor(f) for l, f in self.pooled(victim, data.x_ref).items()}

    def layer_scores(self, victim: Victim, x: torch.Tensor) -> np.ndarray:
        feats = self.pooled(victim, x)
        cols = []
        for l in self.layers:
            d = torch.cdist(torch.as_tensor(feats[l]), self.reference[l])
            r = d.topk(self.k, dim=1, largest=False).values.clamp_min(1e-12)
            lid = -1.0 / (r / r[:, -1:]).log().mean(1).clamp_max(-1e-12)
            cols.append(lid.numpy())
        return np.stack(cols, 1)


class MahalanobisDetector(LayerScoreDetector):
    """Mahalanobis confidence (Lee et al., "A Simple Unified Framework for Detecting Out-of-Distribution Samples
    and Adversarial Attacks", NeurIPS 2018). Per layer: class means μ_c and one tied covariance Σ
    (``EmpiricalCovariance``) of the pooled reference features; M_l(x) = max_c −(f − μ_c)ᵀ Σ⁻¹ (f − μ_c), evaluated
    after the input pre-processing x̂ = clip(x + ``magnitude``·sign ∇ₓ M_l(x)); the per-layer −M_l are combined by
    logistic regression."""

    def __init__(self, *, magnitude: float = 0.0005, **kw: Any) -> None:
        super().__init__(**kw)
        if isinstance(magnitude, bool) or not isinstance(magnitude, (int, float)) or not math.isfinite(magnitude) or magnitude < 0:
            raise ConfigError(f"magnitude must be a finite number >= 0, got {magnitude!r}")
        self.magnitude = float(magnitude)

    def extra_params(self) -> dict[str, Any]:
        return {"magnitude": self.magnitude}

    def fit_reference(self, victim: Victim, data: FitData) -> None:
        from sklearn.covariance import EmpiricalCovariance

        feats = self.pooled(victim, data.x_ref)
        y = data.y_ref.numpy()
        self.means, self.precision = {}, {}
        present = [c for c in range(num_classes(victim)) if (y == c).any()]
        for l, f in feats.items():
            mu = np.stack([f[y == c].mean(0) for c in present])
            centred = f - mu[np.searchsorted(present, y)]
            cov = EmpiricalCovariance(assume_centered=True).fit(centred)
            self.means[l] = torch.as_tensor(mu, dtype=torch.float32)
            self.precision[l] = torch.as_tensor(cov.precision_, dtype=torch.float32)

    def _confidence(self, victim: Victim, x: torch.Tensor, layer: str) -> torch.Tensor:
        f = global_pool(victim.features(x, [layer])[layer]).float()
        mu, prec = self.means[layer].to(x.device), self.precision[layer].to(x.device)
        diff = f.unsqueeze(1) - mu.unsqueeze(0)  # [B, C, D]
        d2 = torch.einsum("bcd,de,bce->bc", diff, prec, diff)
        return (-d2).amax(1)

    def layer_scores(self, victim: Victim, x: torch.Tensor) -> np.ndarray:
        cols = []
        for i in range(0, len(x), self.batch_size):
            xb = x[i : i + self.batch_size].to(victim.device)
            row = []
            for l in self.layers:
                with torch.enable_grad():
                    xg = xb.detach().clone().requires_grad_(True)
                    grad, = torch.autograd.grad(self._confidence(victim, xg, l).sum(), xg)
                x_hat = (xb + self.magnitude * grad.sign()).clamp(0, 1)
                with torch.no_grad():
                    row.append(-self._confidence(victim, x_hat, l).double().cpu())
            cols.append(torch.stack(row, 1))
        return torch.cat(cols).numpy()


class BayesianUncertaintyDetector(FittedDetector):
    """Bayesian uncertainty by Monte-Carlo dropout (Feinman et al. 2017; Gal & Ghahramani, ICML 2016): the
    variance Σ_j Var_T[p_j(x)] of the softmax output over ``passes`` stochastic forward passes with dropout on and
    batch norm in eval mode. The victim's own ``nn.Dropout`` layers are used; a victim without one gets dropout of
    rate ``p`` on the input of its last ``nn.Linear`` (MC dropout before the classifier). A 1-D logistic regression
    on log-variance, fitted on the fit set, orients the score (strong attacks can *lower* the uncertainty)."""

    def __init__(self, *, passes: int = 50, p: float = 0.1, **kw: Any) -> None:
        super().__init__(**kw)
        self.passes = _positive_int(passes, "passes", 2)
        self.p = _positive_float(p, "p")
        if self.p >= 1:
            raise ConfigError(f"p must be < 1, got {p!r}")

    def extra_params(self) -> dict[str, Any]:
        return {"passes": self.passes, "p": self.p}

    def fit(self, victim: Victim, data: FitData) -> None:
        _dropout_sites(victim)  # raises early for a victim with neither dropout nor a linear head
        x, labels = data.negatives_positives()
        self.combiner = _logistic().fit(self._log_variance(victim, x), labels.numpy())

    def raw_score(self, victim: Victim, x: torch.Tensor) -> np.ndarray:
        return self.combiner.decision_function(self._log_variance(victim, x))

    def _log_variance(self, victim: Victim, x: torch.Tensor) -> np.ndarray:
        out = []
        with seeded(self.seed):
            for i in range(0, len(x), self.batch_size):
                out.append(self._variance(victim, x[i : i + self.batch_size].to(victim.device)))
        return np.log(torch.cat(out).double().clamp_min(1e-20).numpy())[:, None]

    @torch.no_grad()
    def _variance(self, victim: Victim, x: torch.Tensor) -> torch.Tensor:
        dropouts, head = _dropout_sites(victim)
        hook = head.register_forward_pre_hook(lambda _m, inp: (nn.functional.dropout(inp[0], self.p, True),)) if head is not None else None
        for d in dropouts:
            d.train()
        try:
            probs = torch.stack([_probabilities(victim, victim(x)) for _ in range(self.passes)])
        finally:
            for d in dropouts:
                d.eval()
            if hook is not None:
                hook.remove()
        return probs.var(0, unbiased=False).sum(1).cpu()


def _dropout_sites(victim: Victim) -> tuple[list[nn.Module], nn.Module | None]:
    """The victim's dropout modules with p > 0, or (none and) its last ``nn.Linear`` to put dropout in front of."""
    dropouts = [m for m in victim.modules() if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0]
    if dropouts:
        return dropouts, None
    linears = [m for m in victim.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(f"detector.bu needs MC dropout: victim {victim.card.name!r} has neither dropout nor a linear head")
    return [], linears[-1]


def _probabilities(victim: Victim, out: torch.Tensor) -> torch.Tensor:
    return get_task(victim.task).class_logits(out).softmax(1)


class SVMDetector(FittedDetector):
    """An RBF-kernel SVM on the z-scored pooled features of the last feature layer (the SVM baseline of Yao et al.
    2021, ``SVC(probability=True)``; the decision value is used, which ranks samples identically to Platt's
    probability and is deterministic)."""

    def __init__(self, *, C: float = 1.0, **kw: Any) -> None:
        super().__init__(**kw)
        self.C = _positive_float(C, "C")

    def extra_params(self) -> dict[str, Any]:
        return {"C": self.C}

    def fit(self, victim: Victim, data: FitData) -> None:
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
        from sklearn.svm import SVC

        self.layer = self.layers[-1]
        x, labels = data.negatives_positives()
        feats = pooled_features(victim, x, [self.layer], self.batch_size)[self.layer].numpy()
        self.svm = make_pipeline(StandardScaler(), SVC(kernel="rbf", C=self.C, gamma="scale", class_weight="balanced"))
        self.svm.fit(feats, labels.numpy())

    def raw_score(self, victim: Victim, x: torch.Tensor) -> np.ndarray:
        return self.svm.decision_function(pooled_features(victim, x, [self.layer], self.batch_size)[self.layer].numpy())


class LayerNet(nn.Module):
    """The per-layer learned detector: two 3×3 convolutions (the second strided), ReLU, global pooling and a
    linear output (after Metzen et al., "On Detecting Adversarial Perturbations", ICLR 2017); token or vector
    features get a two-layer MLP on their pooled vector."""

    def __init__(self, channels: int, spatial: bool, width: int = 32):
        super().__init__()
        if spatial:
            self.body = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        else:
            self.body = nn.Sequential(nn.Linear(channels, width), nn.ReLU())
        self.out = nn.Linear(width, 1)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(f)).squeeze(1)


class LearnedDetector(FittedDetector):
    """A small learned detector per feature layer (the "DNN" detector of Yao et al. 2021: Adam, lr 1e-3), trained
    with binary cross-entropy on the per-channel standardised feature maps; the score is the mean logit over layers."""

    def __init__(self, *, epochs: int = 15, lr: float = 1e-3, width: int = 32, **kw: Any) -> None:
        super().__init__(**kw)
        self.epochs = _positive_int(epochs, "epochs")
        self.lr = _positive_float(lr, "lr")
        self.width = _positive_int(width, "width")

    def extra_params(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "lr": self.lr, "width": self.width}

    @torch.no_grad()
    def _maps(self, victim: Victim, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out: dict[str, list[torch.Tensor]] = {l: [] for l in self.layers}
        for i in range(0, len(x), self.batch_size):
            feats = victim.features(x[i : i + self.batch_size].to(victim.device), self.layers)
            for l in self.layers:
                f = feats[l].float()
                out[l].append((f.mean(1) if f.dim() == 3 else f).cpu())
        return {l: torch.cat(v) for l, v in out.items()}

    def _standardise(self, l: str, f: torch.Tensor) -> torch.Tensor:
        mu, sd = self.norm[l]
        shape = (1, -1) + (1,) * (f.dim() - 2)
        return (f - mu.view(shape)) / sd.view(shape)

    def fit(self, victim: Victim, data: FitData) -> None:
        x, labels = data.negatives_positives()
        maps = self._maps(victim, x)
        dims = (0, 2, 3)
        self.norm = {l: (m.mean(dims if m.dim() == 4 else 0), m.std(dims if m.dim() == 4 else 0) + 1e-6) for l, m in maps.items()}
        self.nets = nn.ModuleDict()
        pos_weight = torch.tensor(float((labels == 0).sum()) / max(1.0, float((labels == 1).sum())))
        for j, l in enumerate(self.layers):
            net = LayerNet(maps[l].shape[1], maps[l].dim() == 4, self.width)
            _train_layer_net(net, self._standardise(l, maps[l]), labels, pos_weight, self.epochs, self.lr, self.seed + j)
            self.nets[str(j)] = net.eval()

    @torch.no_grad()
    def raw_score(self, victim: Victim, x: torch.Tensor) -> np.ndarray:
        maps = self._maps(victim, x)
        logits = [self.nets[str(j)](self._standardise(l, maps[l])) for j, l in enumerate(self.layers)]
        return torch.stack(logits).mean(0).double().numpy()


def _train_layer_net(net: nn.Module, f: torch.Tensor, labels: torch.Tensor, pos_weight: torch.Tensor, epochs: int, lr: float, seed: int) -> None:
    """Adam + BCE on (feature map, is-adversarial) pairs, minibatches of 64, seeded."""
    with seeded(seed):
        for m in net.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
        net.train()
        for _ in range(epochs):
            order = torch.randperm(len(f))
            for i in range(0, len(f), 64):
                idx = order[i : i + 64]
                loss = loss_fn(net(f[idx]), labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        net.eval()


_META = {"kind": "detector", "knowledge": "reactive"}
register_defense("detector.kd", paper="Feinman et al., arXiv 1703.00410 (2017)", **_META)(KernelDensityDetector)
register_defense("detector.lid", paper="Ma et al., ICLR 2018", **_META)(LIDDetector)
register_defense("detector.mahalanobis", paper="Lee et al., NeurIPS 2018", **_META)(MahalanobisDetector)
register_defense("detector.bu", paper="Feinman et al. 2017; Gal & Ghahramani, ICML 2016", **_META)(BayesianUncertaintyDetector)
register_defense("detector.svm", paper="Yao et al., MICCAI 2021 (SVM baseline)", **_META)(SVMDetector)
register_defense("detector.learned", paper="Metzen et al., ICLR 2017; Yao et al., MICCAI 2021", **_META)(LearnedDetector)
