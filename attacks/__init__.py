"""Built-in attacks; importing this package registers them (``robustbench_med.attacks``)."""
from robustbench_med.attacks import pgd, noise, torchattacks_adapters  # noqa: E402,F401
from robustbench_med.attacks import hfc, square, transfer  # noqa: F401
from robustbench_med.attacks import lvlm_pgd, qava, projector  # noqa: F401
from robustbench_med.attacks import corruption  # noqa: F401
from robustbench_med.attacks import modality  # noqa: F401
from robustbench_med.attacks import apgd  # noqa: F401
