"""Built-in defences; importing this package registers them (``robustbench_med.defenses``)."""
