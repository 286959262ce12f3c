"""Re-implementations of published medical architectures (registered on import).

Each family registers its published full-size configuration(s) (external weights via ``weights=PATH``) and a ``tiny``
configuration trained on the phantom world: BiFormer (``biformer.t/s/b/tiny``), MedFormer (``medformer.t/s/b/tiny``,
``medformer_seg.full/tiny``), BRAU-Net++ (``braunetpp``), BRAU-Net (``braunet``), DSSAU-Net (``dssaunet``),
MSLAU-Net (``mslaunet``), HAN / HYATT-Net (``han``) and WaveNet-SF (``wavenetsf``). The routing attention shared by
the BiFormer family lives in :mod:`.routing`; :mod:`.compat` loads checkpoints of the authors' released code
(``release_compat=True`` builds the released forward where the defaults fix documented bugs of the release).
"""
from robustbench_med.victims.zoo import biformer as _biformer  # noqa: F401
from robustbench_med.victims.zoo import braunet as _braunet  # noqa: F401
from robustbench_med.victims.zoo import braunetpp as _braunetpp  # noqa: F401
from robustbench_med.victims.zoo import dssaunet as _dssaunet  # noqa: F401
from robustbench_med.victims.zoo import han as _han  # noqa: F401
from robustbench_med.victims.zoo import medformer as _medformer  # noqa: F401
from robustbench_med.victims.zoo import mslaunet as _mslaunet  # noqa: F401
from robustbench_med.victims.zoo import wavenet_sf as _wavenet_sf  # noqa: F401
