"""``python -m robustbench_med`` runs the CLI."""
import sys

from robustbench_med.cli import main

sys.exit(main())
