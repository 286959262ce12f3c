"""Built-in victims; importing this package registers them (``robustbench_med.victims``)."""
