"""Built-in defences; importing this package registers them (``robustbench_med.defenses``)."""
from robustbench_med.defenses import basic  # noqa: E402,F401
from robustbench_med.defenses import apple  # noqa: F401
from robustbench_med.defenses import detectors  # noqa: F401
from robustbench_med.defenses import f3  # noqa: F401
from robustbench_med.defenses import squeeze  # noqa: F401
