"""edge: detector-side real-time processing for X-ray area detectors.

Public API (stable): :class:`Geometry`, :func:`find_peaks` -> :class:`Peaks`,
:func:`subtract_background`, :func:`estimate_background`, :func:`radial_stats`,
:func:`local_stats`, :func:`warmup`. Submodules: ``edge.sim`` (simulator),
``edge.sources`` (frame sources), ``edge.features`` / ``edge.anomaly`` (anomaly
model), ``edge.policy`` (correction rules), ``edge.pipeline`` (real-time loop),
``edge.measure`` (beam centre, dead regions).
"""

import os as _os

# Numba's OpenMP workers sleep as soon as a parallel kernel ends instead of
# spinning (GOMP_SPINCOUNT; libgomp's default is 300000 spins). Spinning
# only pays on an idle machine: beside other busy processes a spinning
# worker burns the time slice its descheduled team mate needs, and the
# whole team waits at every kernel. Measured in issue 12 on 2 cores, 1M
# frames through the pipeline, frames/s idle / one busy neighbour / two:
# 1000000 spins 67.5 / 24.4 / 5.3; 0 spins 65.8 / 52.0 / 20.9. The
# pipeline's default workers are single-threaded and never wait for a team
# mate at all (edge.pipeline.default_workers). Set before the first
# parallel kernel loads the OpenMP runtime; the user's own setting wins.
_os.environ.setdefault("GOMP_SPINCOUNT", "0")

from .background import estimate_background, local_stats, radial_stats, subtract_background
from .geometry import LAYOUTS, DetectorLayout, Geometry
from .spotfinding import Peaks, find_peaks

__version__ = "0.1.0"

__all__ = ["Geometry", "DetectorLayout", "LAYOUTS", "Peaks", "find_peaks", "subtract_background",
           "estimate_background", "radial_stats", "local_stats", "warmup", "__version__",
           "AnomalyModel", "AnomalyResult", "frame_features", "open_source", "Policy", "Pipeline"]

# Heavier parts load on first use, so `import edge` stays light (no TFLite).
_LAZY = {
    "AnomalyModel": "anomaly", "AnomalyResult": "anomaly", "frame_features": "features",
    "open_source": "sources", "Policy": "policy", "Pipeline": "pipeline",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'edge' has no attribute {name!r}")


def warmup(dtypes=("uint16", "int32", "uint32", "float32"), *, features: bool = True) -> None:
    """Compile (or load from Numba's on-disk cache) every hot-path kernel.

    Call once at start-up so no frame pays for compilation. Covers peak
    finding for the given frame dtypes, both background methods, the
    measurements and, with ``features``, the anomaly feature kernels.
    """
    import numpy as np

    from .measure import find_dead_regions, measure_beam_center
    from .sim import simulate

    sf = simulate(layout="1m", seed=0, n_spots=20)
    base = np.clip(sf.frame, 0, None)
    for dt in dtypes:
        f = base.astype(dt)
        find_peaks(f, geometry=sf.geometry)
        subtract_background(f, geometry=sf.geometry)
    small = base[:64, :64]
    local_stats(small)
    find_peaks(small, method="local")
    find_peaks(base.astype(np.int32), geometry=sf.geometry, dark=np.zeros(base.shape, np.float32))
    measure_beam_center(sf.frame, sf.geometry)
    find_dead_regions(sf.frame, sf.geometry)
    if features:
        from .features import warmup as features_warmup

        features_warmup(tuple(np.dtype(d).type for d in dtypes))
