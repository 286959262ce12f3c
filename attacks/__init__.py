"""Built-in attacks; importing this package registers them (``robustbench_med.attacks``)."""
