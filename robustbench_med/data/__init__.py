"""Datasets: the embedded phantom world and loaders for real data (registered on import)."""
from robustbench_med.data import dataset as _dataset  # noqa: F401
from robustbench_med.data.dataset import MedicalDataset  # noqa: F401
from robustbench_med.data import loaders as _loaders  # noqa: F401
