"""Built-in victims; importing this package registers them (``robustbench_med.victims``)."""
from robustbench_med.victims import basic as _basic  # noqa: F401
from robustbench_med.victims import zoo as _zoo  # noqa: F401
from robustbench_med.victims import lvlm as _lvlm  # noqa: F401
from robustbench_med.victims.lvlm import projector_study as _projector_study  # noqa: F401
from robustbench_med.victims import shortcut as _shortcut  # noqa: F401
from robustbench_med.victims import multimodal as _multimodal  # noqa: F401
from robustbench_med.victims import site_shift as _site_shift  # noqa: F401
from robustbench_med.victims import volumes as _volumes  # noqa: F401
from robustbench_med.victims import hyspark as _hyspark  # noqa: F401
from robustbench_med.victims import vlm3d as _vlm3d  # noqa: F401
from robustbench_med.victims import semisup3d as _semisup3d  # noqa: F401
from robustbench_med.victims import classifier3d as _classifier3d  # noqa: F401
from robustbench_med.victims import landmark3d as _landmark3d  # noqa: F401
