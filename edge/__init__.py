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

__version__ = "0.1.0"

# Numba reads NUMBA_CACHE_DIR once, when it is imported (the next import
# below): choose a writable kernel cache first, so a service user who cannot
# write the package directory still gets cached kernels (edge.deploy.cache).
from .deploy import cache as _cache  # noqa: E402

_cache.configure(_os.path.dirname(__file__), __version__)

from .background import estimate_background, local_stats, radial_stats, subtract_background  # noqa: E402
from .geometry import LAYOUTS, DetectorLayout, Geometry  # noqa: E402
from .spotfinding import Peaks, find_peaks  # noqa: E402

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


#: Frame dtypes :func:`warmup` compiles by default: what the simulator,
#: CBF (int32), Eiger (uint16/uint32) and dark-subtracted (float32) frames need.
WARMUP_DTYPES = ("int32", "uint16", "uint32", "float32")


def warmup(dtypes: "Iterable[DTypeLike]" = WARMUP_DTYPES, *, features: bool = True, extras: bool = True,
           progress: "Callable[[int, int, str], None] | None" = None, parallel: "bool | None" = None) -> None:
    """Compile (or load from Numba's on-disk cache) the hot-path kernels.

    Call once at start-up so no frame pays for compilation. The first call
    on a machine compiles (about half a minute per frame dtype on a 2-core
    x86 machine, minutes on a Raspberry Pi); later calls load the cached
    kernels in about a second. ``edge warmup`` does it at install time.

    Parameters
    ----------
    dtypes : sequence of dtype
        Frame dtypes to prepare for. Each is first mapped to its kernel
        dtype (uint8 -> uint16, int16 -> int32, float16 -> float32, ...:
        the cast every public function applies), so each kernel dtype is
        compiled once.
    features : bool
        Also the anomaly-feature kernels and the measurements the policy
        runs on flagged frames (needed when the anomaly model is used).
    extras : bool
        Also what the real-time loop does not use: :func:`subtract_background`,
        the ``method="local"`` background and dark subtraction.
    progress : callable, optional
        ``progress(step, n_steps, label)`` is called when a step starts to
        compile (never when everything loads from the cache), so a caller
        can say why the first start is slow.
    parallel : bool, optional
        On a cold cache, compile the feature kernels in a second process
        meanwhile (:mod:`edge.deploy.warm`). Default: when more than one CPU
        is available and the load average leaves one idle (on a busy
        machine a second process only adds its start-up cost).
    """
    import numpy as np
    from numba.core import event

    from ._validate import as_frame
    from .measure import find_dead_regions, measure_beam_center
    from .sim import simulate

    kernel_dtypes = list(dict.fromkeys(as_frame(np.zeros((1, 1), dtype=d)).dtype for d in dtypes))
    if parallel is None:
        cpus = len(_os.sched_getaffinity(0)) if hasattr(_os, "sched_getaffinity") else (_os.cpu_count() or 1)
        load = _os.getloadavg()[0] if hasattr(_os, "getloadavg") else 0.0
        parallel = cpus > 1 and load < cpus - 0.5
    sf = simulate(layout="1m", seed=0, n_spots=20)
    base = np.clip(sf.frame, 0, None)
    geom = sf.geometry
    # peak finding first, features after: a cold start compiles the features
    # in a second process while this one compiles the peak finding
    steps = [(f"peak finding, {dt}", lambda dt=dt: find_peaks(base.astype(dt), geometry=geom))
             for dt in kernel_dtypes]
    if extras:
        steps += [(f"background maps, {dt}", lambda dt=dt: subtract_background(base.astype(dt), geometry=geom))
                  for dt in kernel_dtypes]
        small = base[:64, :64]
        steps.append(("local background", lambda: (local_stats(small), find_peaks(small, method="local"))))
        steps.append(("dark subtraction", lambda: find_peaks(base.astype(np.int32), geometry=geom,
                                                             dark=np.zeros(base.shape, np.float32))))
    first_feature = len(steps) + 1
    if features:
        from .features import warmup as features_warmup

        steps += [(f"anomaly features, {dt}", lambda dt=dt: features_warmup((dt.type,))) for dt in kernel_dtypes]
        steps.append(("beam and fault measurements", lambda: (measure_beam_center(sf.frame, geom),
                                                             find_dead_regions(sf.frame, geom))))
    worker = None

    class _Progress(event.Listener):  # told only when Numba compiles (a cache miss)
        step = 0
        told = 0

        def on_start(self, ev):
            nonlocal worker
            if self.told == self.step:
                return
            self.told = self.step
            if progress is not None:
                progress(self.step, len(steps), steps[self.step - 1][0])
            if parallel and features and worker is None and self.step < first_feature:
                from .deploy.warm import start_feature_worker

                worker = start_feature_worker(kernel_dtypes)
                if progress is not None:
                    for k in range(first_feature, first_feature + len(kernel_dtypes)):
                        progress(k, len(steps), steps[k - 1][0] + ", in a parallel process")

        def on_end(self, ev):
            pass

    listener = _Progress()
    try:
        with event.install_listener("numba:compile", listener):
            for k, (_, run) in enumerate(steps, 1):
                if k == first_feature and worker is not None:
                    worker.communicate(timeout=3600)  # whatever it did not compile is compiled below
                listener.step = k
                run()
    finally:
        if worker is not None and worker.poll() is None:
            worker.kill()
            worker.communicate()
