"""Anomaly scenarios on top of :mod:`edge.sim`: random frames with multi-label truth.

:func:`sample_scenario` turns one integer seed into simulator overrides and
the labels they imply; :func:`make_example` simulates the frame and returns
its feature vector (:func:`edge.features.frame_features`) with the labels.
Everything is a pure function of the seed, so datasets are reproducible from
seed ranges alone (see ``models/model_card.json``).

Scenario recipe (all draws from ``numpy.random.default_rng([seed, 0xA40])``):

* geometry: layout 1M (90 %) or 4M, wavelength 0.7-1.5 A, distance such that
  the inscribed detector circle reaches 1.6-3.0 A (ice lines on the
  detector), believed beam centre within +-12 % of the middle on a module;
* beam: 10 % ``no_beam`` (flux 0); otherwise flux x background level
  log-uniform 1-20 counts/pixel at the solvent ring;
* normal frame: 40-1500 spots per megapixel, mean intensity 150-2000
  counts, beam within 6 px of the believed centre, beamstop 10-40 px with an
  arm at a random angle (or none), a few hot / dead / bad pixels and 0-3
  isolated pixels stuck at the count cutoff;
* each anomaly independently with probability 0.2 (beam on):
  ``ice_rings`` (ring peak 0.4-8 x background), ``saturation`` (spots
  overloaded 2000-20000 x, or a direct beam 3-100 x the cutoff leaking past
  the beamstop), ``blank`` (no crystal), ``beam_off_center`` (25-150 px),
  ``detector_fault`` (a dead module, a hot-pixel cluster, 1-3 stripes or
  1-2 bad chips). With no beam only a hot cluster can be added.

The ``saturation`` label is taken from the simulated frame itself: at least
:data:`MIN_SATURATED` saturated pixels that have a bright neighbour.
"""

from __future__ import annotations

import math

import numpy as np

from .background import radial_stats
from .features import frame_features
from .geometry import LAYOUTS
from .sim import SimConfig, SimFrame, simulate
from .spotfinding import find_peaks

__all__ = ["CLASSES", "MIN_SATURATED", "sample_scenario", "simulate_scenario", "make_example",
           "make_dataset", "clustered_saturated"]

#: Anomaly classes, in model output order.
CLASSES: tuple[str, ...] = ("ice_rings", "saturation", "blank", "no_beam", "beam_off_center", "detector_fault")
#: Saturated pixels (with a bright 4-neighbour) that make a frame ``saturation``.
MIN_SATURATED = 4
P_ANOMALY = 0.2
P_NO_BEAM = 0.1


def _logu(rng, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def sample_scenario(seed: int, *, p_4m: float = 0.1) -> tuple[dict, dict]:
    """Simulator overrides and intended labels for one seed.

    Returns
    -------
    overrides : dict
        Keyword arguments for :func:`edge.sim.simulate` (without ``seed``).
    intended : dict
        Class name -> bool as generated (``saturation`` is re-checked on the
        frame by :func:`simulate_scenario`).
    """
    rng = np.random.default_rng([int(seed), 0xA40])
    layout = "4m" if rng.random() < p_4m else "1m"
    lay = LAYOUTS[layout]
    ny, nx = lay.shape
    mpix = ny * nx / 1e6
    wl = rng.uniform(0.7, 1.5)
    d_edge = rng.uniform(1.6, 3.0)
    r_edge_mm = 0.5 * min(ny, nx) * lay.pixel_size_mm
    distance = r_edge_mm / math.tan(2.0 * math.asin(wl / (2.0 * d_edge)))
    mask = lay.gap_mask()
    while True:  # believed beam centre on a module, so a leaking beam is seen
        bx = (nx - 1) / 2.0 + rng.uniform(-0.12, 0.12) * nx
        by = (ny - 1) / 2.0 + rng.uniform(-0.12, 0.12) * ny
        if mask[max(int(by) - 8, 0) : int(by) + 9, max(int(bx) - 8, 0) : int(bx) + 9].all():
            break
    sat = float(rng.choice([65000.0, 100000.0, 115897.0, 500000.0]))
    flux = _logu(rng, 0.5, 2.0)
    level = _logu(rng, 1.0, 20.0)
    sig_lo = rng.uniform(0.5, 0.8)
    off_r, off_a = rng.uniform(0.0, 6.0), rng.uniform(0.0, 2.0 * math.pi)
    ov = dict(
        layout=layout, distance_mm=float(distance), wavelength_A=float(wl), beam_center=(float(bx), float(by)),
        flux=flux, background=level / flux, saturation=sat,
        n_spots=int(_logu(rng, 40.0, 1500.0) * mpix), mean_intensity=_logu(rng, 150.0, 2000.0),
        spot_sigma=(float(sig_lo), float(sig_lo + rng.uniform(0.2, 0.6))),
        b_factor=rng.uniform(10.0, 40.0), d_min=rng.uniform(1.5, 2.5),
        n_hot=int(rng.poisson(15 * mpix)), n_dead=int(rng.poisson(50 * mpix)), n_bad=int(rng.poisson(100 * mpix)),
        hot_saturated=int(rng.integers(0, 4)) if rng.random() < 0.3 else 0,
        beamstop_radius=rng.uniform(10.0, 40.0),
        beamstop_arm_angle=None if rng.random() < 0.3 else float(rng.uniform(0.0, 360.0)),
    )
    lab = {c: False for c in CLASSES}
    draws = rng.random(len(CLASSES))  # fixed number of draws keeps streams aligned
    fault_kind = int(rng.integers(0, 4))
    sat_kind = rng.random()
    if rng.random() < P_NO_BEAM:
        ov["flux"] = 0.0
        lab["no_beam"] = True
        if draws[5] < P_ANOMALY:
            ov["hot_cluster"] = True
            lab["detector_fault"] = True
        ov["beam_offset"] = (off_r * math.cos(off_a), off_r * math.sin(off_a))
        return ov, lab
    if draws[0] < P_ANOMALY:
        ov["ice_rings"] = True
        ov["ice_strength"] = ov["background"] * _logu(rng, 0.4, 8.0)
        lab["ice_rings"] = True
    if draws[2] < P_ANOMALY:
        ov["crystal"] = False
        lab["blank"] = True
    if draws[1] < P_ANOMALY:
        lab["saturation"] = True
        if sat_kind < 0.6 and not lab["blank"]:
            ov["overload"] = _logu(rng, 2000.0, 20000.0)
        else:
            ov["direct_beam"] = sat * _logu(rng, 3.0, 100.0)
            ov["direct_beam_sigma"] = rng.uniform(1.5, 4.0)
    if draws[4] < P_ANOMALY:
        off_r = rng.uniform(25.0, 150.0)
        lab["beam_off_center"] = True
    ov["beam_offset"] = (off_r * math.cos(off_a), off_r * math.sin(off_a))
    if draws[5] < P_ANOMALY:
        lab["detector_fault"] = True
        if fault_kind == 0:
            ov["dead_modules"] = 1
        elif fault_kind == 1:
            ov["hot_cluster"] = True
        elif fault_kind == 2:
            ov["stripes"] = int(rng.integers(1, 4))
        else:
            ov["bad_asics"] = int(rng.integers(1, 3))
    return ov, lab


def clustered_saturated(frame: np.ndarray, saturation: float) -> int:
    """Pixels at/above ``saturation`` with a 4-neighbour at/above ``saturation / 4`` (full resolution)."""
    s = np.asarray(frame) >= saturation
    if not s.any():
        return 0
    b = np.asarray(frame) >= saturation / 4.0
    nb = np.zeros_like(b)
    nb[1:, :] |= b[:-1, :]
    nb[:-1, :] |= b[1:, :]
    nb[:, 1:] |= b[:, :-1]
    nb[:, :-1] |= b[:, 1:]
    return int(np.count_nonzero(s & nb))


def simulate_scenario(seed: int, **kwargs) -> tuple[SimFrame, np.ndarray]:
    """Simulated frame and its label vector (float32, :data:`CLASSES` order)."""
    ov, lab = sample_scenario(seed, **kwargs)
    sf = simulate(SimConfig(), seed=int(seed), **ov)
    if ov.get("flux", 1.0) > 0:
        lab["saturation"] = clustered_saturated(sf.frame, sf.config.saturation) >= MIN_SATURATED
    return sf, np.array([lab[c] for c in CLASSES], dtype=np.float32)


def make_example(seed: int, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """``(features, labels)`` of one scenario, with the runtime's feature path."""
    sf, y = simulate_scenario(seed, **kwargs)
    stats = radial_stats(sf.frame, geometry=sf.geometry)
    peaks = find_peaks(sf.frame, geometry=sf.geometry, stats=stats)
    return frame_features(sf.frame, sf.geometry, stats=stats, peaks=peaks), y


def make_dataset(seeds, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """Stacked features (n, N_FEATURES) and labels (n, len(CLASSES)) for ``seeds``."""
    xs, ys = [], []
    for s in seeds:
        x, y = make_example(int(s), **kwargs)
        xs.append(x)
        ys.append(y)
    return np.stack(xs), np.stack(ys)
