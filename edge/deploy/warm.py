"""Compile the anomaly-feature kernels in a second process during a cold warm-up.

Numba compiles one function at a time per process. On a cold cache,
:func:`edge.warmup` starts this worker as soon as it sees its first compile
(the peak-finding kernels): the worker compiles the feature kernels and
the ice-evidence kernels (the larger half) meanwhile, into the same on-disk
cache, and the warm-up then loads them. The two processes compile disjoint functions (these kernels
call no kernel of another module), so they never write the same
cache index; one worker compiles every dtype in turn for the same reason.

The worker needs no peak-finding kernel: it feeds the feature kernels ring
statistics and an empty peak list of the right types. Anything it does not
compile (or if it fails) is compiled by the warm-up itself afterwards.

Run as ``python -m edge.deploy.warm DTYPE [DTYPE ...]``.
"""

from __future__ import annotations

import os
import subprocess
import sys

__all__ = ["compile_features", "start_feature_worker"]


def compile_features(dtypes) -> None:
    """Compile the feature kernels for these frame dtypes without any peak-finding kernel."""
    import numpy as np

    from ..background import RadialStats, radial_bins
    from ..evidence.ice import ring_profile, sampled_profile
    from ..features import frame_features_from_parts
    from ..sim import simulate
    from ..spotfinding import Peaks

    sf = simulate(layout="1m", seed=0, n_spots=20, beamstop_radius=10.0)
    geom = sf.geometry
    bins = radial_bins(geom.shape, geometry=geom)
    n = bins.nbins
    stats = RadialStats(bins.radius, np.full(n, 2.0), np.full(n, 1.5), np.full(n, 100.0), bins)
    for dt in dtypes:
        arr = np.ascontiguousarray(np.clip(sf.frame, 0, None).astype(dt))
        hi = float(np.iinfo(arr.dtype).max - 1) if arr.dtype.kind == "u" else 1.0e300
        frame_features_from_parts(arr, geom, stats, Peaks.empty(), lo_valid=0.0, hi_valid=hi)
        ring_profile(arr, geom, stats, peaks=Peaks.empty(), lo_valid=0.0, hi_valid=hi)
        sampled_profile(arr, stats, lo_valid=0.0, hi_valid=hi)


def start_feature_worker(dtypes) -> subprocess.Popen:
    """Start ``compile_features(dtypes)`` in a child process (same package, same cache)."""
    parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PYTHONPATH"] = parent + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.Popen([sys.executable, "-m", "edge.deploy.warm", *map(str, dtypes)], cwd=parent, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


if __name__ == "__main__":
    compile_features(sys.argv[1:])
