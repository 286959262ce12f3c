"""Fitted defences between processes: a restricted load (robustbench_med.safe_state) that rebuilds NumPy arrays,
scikit-learn estimators and torch modules exactly, and refuses anything that would run other code."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

from robustbench_med.errors import WeightsError
from robustbench_med.runner import prepared_from_bytes, prepared_to_bytes
from robustbench_med.safe_state import allowed_global, dumps, loads


def _fitted_estimators() -> dict[str, object]:
    from sklearn.covariance import EmpiricalCovariance
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KernelDensity
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 4)), rng.integers(0, 2, 60)
    return {"logistic": make_pipeline(StandardScaler(), LogisticRegression()).fit(x, y),
            "svm": make_pipeline(StandardScaler(), SVC(probability=True, random_state=0)).fit(x, y),
            "kde": KernelDensity(bandwidth=0.5).fit(x), "covariance": EmpiricalCovariance().fit(x)}


def test_fitted_estimators_modules_and_arrays_come_back_identical():
    from robustbench_med.defenses.apple import LatentPerturber

    torch.manual_seed(0)
    est = _fitted_estimators()
    module = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
    perturber = LatentPerturber({"z": (4, 8, 8)}, 8)
    state = {"cell": {"est": est, "module": module, "perturber": perturber, "arr": np.arange(5.0), "t": torch.ones(3),
                      "meta": {"levels": ["F", "M"], "n": 3, "span": slice(0, 4), "raw": b"\x00\x01"}}}
    back = prepared_from_bytes(prepared_to_bytes(state), torch.device("cpu"))["cell"]
    q = np.random.default_rng(1).normal(size=(10, 4))
    assert np.array_equal(back["est"]["logistic"].predict_proba(q), est["logistic"].predict_proba(q))
    assert np.array_equal(back["est"]["svm"].decision_function(q), est["svm"].decision_function(q))
    assert np.array_equal(back["est"]["kde"].score_samples(q), est["kde"].score_samples(q))  # its KD-tree came back
    assert np.array_equal(back["est"]["covariance"].mahalanobis(q), est["covariance"].mahalanobis(q))
    x = torch.rand(2, 1, 6, 6)
    assert torch.equal(back["module"](x), module(x)) and type(back["perturber"]) is LatentPerturber
    assert np.array_equal(back["arr"], np.arange(5.0)) and torch.equal(back["t"], torch.ones(3))
    assert back["meta"] == state["cell"]["meta"]
    assert prepared_from_bytes(None, torch.device("cpu")) == {}


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo robustbench_med-was-here > /dev/null",))


def _unchecked_bytes(obj: object) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.mark.parametrize("payload", [_Exploit(), {"path": __import__("pathlib").Path("/etc")}, {"f": np.load}],
                         ids=["os.system", "foreign class", "numpy function"])
def test_anything_else_is_refused_on_load_and_on_dump(payload):
    with pytest.raises(WeightsError, match="outside the safe list"):
        loads(_unchecked_bytes({"cell": payload}))
    with pytest.raises(WeightsError, match="outside the safe list"):
        dumps({"cell": payload})


def test_allowlist_takes_classes_not_functions():
    assert allowed_global("sklearn.svm._classes.SVC") is not None
    assert allowed_global("sklearn.utils.validation.check_array") is None  # a function, not a class
    assert allowed_global("torch.nn.modules.linear.Linear") is nn.Linear
    assert allowed_global("robustbench_med.defenses.detectors.LayerNet") is not None
    assert allowed_global("robustbench_med.api.create_victim") is None
    assert allowed_global("builtins.eval") is None and allowed_global("builtins.set") is set
    assert allowed_global("numpy.load") is None and allowed_global("os.system") is None
