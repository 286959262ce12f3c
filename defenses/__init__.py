"""Built-in defences; importing this package registers them (``robustbench_med.defenses``)."""
from robustbench_med.defenses import basic  # noqa: E402,F401
