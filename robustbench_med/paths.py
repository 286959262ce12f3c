"""Where robustbench_med keeps its cache (weights, datasets): ``$ROBUSTBENCH_MED_HOME`` or ``~/.cache/robustbench_med``."""
from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    root = os.environ.get("ROBUSTBENCH_MED_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "robustbench_med")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def weights_dir() -> Path:
    path = home() / "weights"
    path.mkdir(parents=True, exist_ok=True)
    return path


def datasets_dir() -> Path:
    path = home() / "datasets"
    path.mkdir(parents=True, exist_ok=True)
    return path
