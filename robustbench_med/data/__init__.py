"""Datasets: the embedded phantom world (``phantom.ct``) and loaders for real data (``hf.dataset``, ``folder.csv``,
``dicom.files``, ``nifti.slices``), all returning :class:`MedicalDataset`; importing this package registers them."""
from robustbench_med.data import phantom  # noqa: F401
from robustbench_med.data import dataset as _dataset  # noqa: F401  (registers phantom.ct)
from robustbench_med.data import loaders as _loaders  # noqa: F401  (registers the real-data loaders)
from robustbench_med.data.dataset import MedicalDataset  # noqa: F401
from robustbench_med.data.phantom import ANSWERS, QUESTIONS, Disparity, PhantomConfig, Question  # noqa: F401
