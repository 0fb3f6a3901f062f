"""Anomaly scenarios on top of :mod:`edge.sim`: random frames with multi-label truth.

:func:`sample_scenario` turns one integer seed into simulator overrides and
the labels they imply; :func:`make_example` simulates the frame and returns
its feature vector (:func:`edge.features.frame_features`) with the labels.
Everything is a pure function of the seed, so datasets are reproducible from
seed ranges alone (see ``models/model_card.json``).

Scenario recipe v4 (all draws from ``numpy.random.default_rng([seed, 0xA40])``):

* geometry: layout 1M (90 %) or 4M, wavelength 0.7-1.5 A, distance such that
  the inscribed detector circle reaches 1.6-3.0 A (ice lines on the
  detector); believed beam centre at the layout centre (30 %; in the module
  gap of a 1M, like the default geometry) or anywhere within +-12 % of it;
* beam: 10 % ``no_beam`` (flux 0); otherwise flux x background level
  log-uniform 1-20 counts/pixel at the solvent ring;
* normal frame: 100-1500 spots per megapixel, mean intensity 25-2000 counts
  (weak diffraction is normal), spot sigma 0.5-2.0 px, beam within
  :data:`MAX_NORMAL_OFFSET_PX` of the believed centre, a few hot / dead / bad
  pixels and 0-3 isolated pixels stuck at the count cutoff;
* beamstop: 30 % a small disc (6-25 px) without arm whose centre is up to 0.8
  radius away from the beam (as on the PILATUS frames), 15 % a concentric
  disc (10-40 px) without arm, 55 % a concentric disc with a full-length arm
  (random direction, a quarter of them at 0 degrees like the default);
* each anomaly independently with probability 0.2 (beam on), with a minimum
  severity so a labelled anomaly is visible:
  ``ice_rings`` (strongest ring peak :data:`MIN_ICE_RATIO`-8 x background),
  ``saturation`` (spots overloaded 2000-20000 x, or a direct beam 3-100 x the
  cutoff leaking past the beamstop), ``blank`` (no crystal),
  ``beam_off_center`` (:data:`MIN_OFFSET_PX`-150 px; nothing is drawn between
  the normal 10 px and 30 px), ``detector_fault`` (a dead module, a hot-pixel
  cluster, 1-3 stripes or 1-2 bad chips). With no beam only a hot cluster can
  be added;
* exclusion: frames with a crystal but fewer than :data:`MIN_VISIBLE_SPOTS`
  visible spots (truth SNR >= :data:`VISIBLE_SNR`) are neither clearly weak
  diffraction nor blank; :func:`make_dataset` leaves them out (~3 %).

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
           "make_dataset", "clustered_saturated", "visible_spots", "excluded"]

#: Anomaly classes, in model output order.
CLASSES: tuple[str, ...] = ("ice_rings", "saturation", "blank", "no_beam", "beam_off_center", "detector_fault")
#: Saturated pixels (with a bright 4-neighbour) that make a frame ``saturation``.
MIN_SATURATED = 4
P_ANOMALY = 0.2
P_NO_BEAM = 0.1
#: Believed beam centre exactly at the layout centre (default geometry).
P_CENTRED = 0.3
#: Normal frames: true beam within this many px of the believed centre.
MAX_NORMAL_OFFSET_PX = 10.0
#: ``beam_off_center`` frames: offset drawn in [MIN_OFFSET_PX, 150] px
#: (10-30 px is a deliberate gap: neither label is trained there).
MIN_OFFSET_PX = 30.0
#: ``ice_rings`` frames: strongest ring peak >= this x the background.
MIN_ICE_RATIO = 1.5
#: Frames with a crystal need at least this many visible Bragg spots
#: (simulated truth: SNR >= VISIBLE_SNR on valid pixels); frames below it are
#: neither clearly "weak diffraction" nor "blank" and are left out of the data.
MIN_VISIBLE_SPOTS = 20
VISIBLE_SNR = 5.0


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
    # believed beam centre: the layout's centre (in the module gap of a 1M,
    # like the default geometry) or anywhere within +-12 % of it
    if rng.random() < P_CENTRED:
        bx, by = (nx - 1) / 2.0, (ny - 1) / 2.0
    else:
        bx = (nx - 1) / 2.0 + rng.uniform(-0.12, 0.12) * nx
        by = (ny - 1) / 2.0 + rng.uniform(-0.12, 0.12) * ny
    sat = float(rng.choice([65000.0, 100000.0, 115897.0, 500000.0]))
    flux = _logu(rng, 0.5, 2.0)
    level = _logu(rng, 1.0, 20.0)
    sig_lo = rng.uniform(0.5, 1.1)
    off_r, off_a = rng.uniform(0.0, MAX_NORMAL_OFFSET_PX), rng.uniform(0.0, 2.0 * math.pi)
    # beamstop: concentric disc with a full-length arm (random or the default
    # 0 degrees), a disc without arm, or a small disc without arm that is not
    # concentric with the beam (as on the PILATUS frames)
    bs_kind = rng.random()
    bs_r = rng.uniform(10.0, 40.0)
    arm = float(rng.uniform(0.0, 360.0)) if rng.random() < 0.75 else 0.0
    bs_off = (0.0, 0.0)
    if bs_kind < 0.3:
        bs_r = rng.uniform(6.0, 25.0)
        arm = None
        a, m = rng.uniform(0.0, 2.0 * math.pi), rng.uniform(0.0, 0.8) * bs_r
        bs_off = (float(m * math.cos(a)), float(m * math.sin(a)))
    elif bs_kind < 0.45:
        arm = None
    # diffraction: weak crystals (few, faint spots) are normal frames too
    ov = dict(
        layout=layout, distance_mm=float(distance), wavelength_A=float(wl), beam_center=(float(bx), float(by)),
        flux=flux, background=level / flux, saturation=sat,
        n_spots=int(_logu(rng, 100.0, 1500.0) * mpix), mean_intensity=_logu(rng, 25.0, 2000.0),
        spot_sigma=(float(sig_lo), float(sig_lo + rng.uniform(0.2, 0.9))),
        b_factor=rng.uniform(10.0, 40.0), d_min=rng.uniform(1.5, 2.5),
        n_hot=int(rng.poisson(15 * mpix)), n_dead=int(rng.poisson(50 * mpix)), n_bad=int(rng.poisson(100 * mpix)),
        hot_saturated=int(rng.integers(0, 4)) if rng.random() < 0.3 else 0,
        beamstop_radius=float(bs_r), beamstop_arm_angle=arm, beamstop_offset=bs_off,
    )
    lab = {c: False for c in CLASSES}
    draws = rng.random(len(CLASSES))  # fixed number of draws keeps streams aligned
    fault_kind = int(rng.integers(0, 4))
    sat_kind = rng.random()
    ice_ratio = _logu(rng, MIN_ICE_RATIO, 8.0)
    big_off = rng.uniform(MIN_OFFSET_PX, 150.0)
    n_stripes = int(rng.integers(1, 4))
    n_asics = int(rng.integers(1, 3))
    overload = _logu(rng, 2000.0, 20000.0)
    beam_x, beam_sig = _logu(rng, 3.0, 100.0), rng.uniform(1.5, 4.0)
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
        # ring peak (strongest line) relative to the solvent-ring background
        ov["ice_strength"] = ov["background"] * ice_ratio
        lab["ice_rings"] = True
    if draws[2] < P_ANOMALY:
        ov["crystal"] = False
        lab["blank"] = True
    if draws[1] < P_ANOMALY:
        lab["saturation"] = True
        if sat_kind < 0.6 and not lab["blank"]:
            ov["overload"] = overload
        else:
            ov["direct_beam"] = sat * beam_x
            ov["direct_beam_sigma"] = beam_sig
    if draws[4] < P_ANOMALY:
        off_r = big_off
        lab["beam_off_center"] = True
    ov["beam_offset"] = (off_r * math.cos(off_a), off_r * math.sin(off_a))
    if draws[5] < P_ANOMALY:
        lab["detector_fault"] = True
        if fault_kind == 0:
            ov["dead_modules"] = 1
        elif fault_kind == 1:
            ov["hot_cluster"] = True
        elif fault_kind == 2:
            ov["stripes"] = n_stripes
        else:
            ov["bad_asics"] = n_asics
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


def visible_spots(sf: SimFrame) -> int:
    """Bragg spots of a simulated frame that are visible (truth SNR >= VISIBLE_SNR on valid pixels)."""
    t = sf.spots
    if not len(t["x"]):
        return 0
    return int(np.count_nonzero((np.asarray(t["snr"]) >= VISIBLE_SNR) & np.asarray(t["on_valid"], bool)))


def excluded(sf: SimFrame) -> bool:
    """True for frames left out of the data: a crystal in the beam but fewer
    than :data:`MIN_VISIBLE_SPOTS` visible spots (ambiguous weak/blank)."""
    c = sf.config
    return bool(c.crystal and c.flux > 0 and visible_spots(sf) < MIN_VISIBLE_SPOTS)


def make_example(seed: int, **kwargs) -> tuple[np.ndarray, np.ndarray] | None:
    """``(features, labels)`` of one scenario, with the runtime's feature path;
    None when the frame is :func:`excluded`."""
    sf, y = simulate_scenario(seed, **kwargs)
    if excluded(sf):
        return None
    stats = radial_stats(sf.frame, geometry=sf.geometry)
    peaks = find_peaks(sf.frame, geometry=sf.geometry, stats=stats)
    return frame_features(sf.frame, sf.geometry, stats=stats, peaks=peaks), y


def make_dataset(seeds, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """Stacked features (n, N_FEATURES) and labels (n, len(CLASSES)) for ``seeds``
    (:func:`excluded` frames are skipped, so n can be smaller than len(seeds))."""
    xs, ys = [], []
    for s in seeds:
        ex = make_example(int(s), **kwargs)
        if ex is None:
            continue
        xs.append(ex[0])
        ys.append(ex[1])
    return np.stack(xs), np.stack(ys)
