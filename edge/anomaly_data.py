"""Anomaly scenarios on top of :mod:`edge.sim`: random frames with multi-label truth.

:func:`sample_scenario` turns one integer seed into simulator overrides and
the labels they imply; :func:`make_example` simulates the frame and returns
its feature vector (:func:`edge.features.frame_features`) with the labels.
Everything is a pure function of the seed, so datasets are reproducible from
seed ranges alone (see ``models/model_card.json``).

Scenario recipe v6, unchanged in data recipes v7 and v13 (they change the features;
all draws from ``numpy.random.default_rng([seed, 0xA40])``):

* geometry: layout EIGER 1M (65 %), 4M (15 %), 9M (5 %), 16M (4 %) or
  PILATUS 6M (11 %, 172 um pixels, 12 x 5 modules; the large layouts are
  expensive to simulate), wavelength 0.7-1.5 A,
  distance such that the inscribed detector circle reaches 1.6-3.0 A (ice
  lines on the detector); believed beam centre at the layout centre (30 %;
  in the module gap of a 1M, like the default geometry) or anywhere within
  +-12 % of it;
* beam: 10 % ``no_beam`` (flux 0); otherwise the background at the solvent
  ring is log-uniform 0.001-100 counts/pixel (exposure x transmission
  scaling: at the low end almost every pixel reads 0, like fine-sliced
  photon-counting data); dark counts 0 (half of the frames) or log-uniform
  1e-4-0.01 counts/pixel on every frame;
* normal frame: 50-2500 x sqrt(Mpix) spots (a few dozen to thousands), mean
  intensity = background x a crystal strength log-uniform 10-30000, kept
  within 20-5000 counts (weak and sparse diffraction is normal), spot sigma
  0.5-2.0 px, beam within :data:`MAX_NORMAL_OFFSET_PX` of the believed
  centre, a few hot / dead / bad pixels and 0-3 isolated pixels stuck at
  the count cutoff;
* beamstop: 30 % a small disc (6-25 px) without arm whose centre is up to 0.8
  radius away from the beam (as on the PILATUS frames), 15 % a concentric
  disc (10-40 px) without arm, 55 % a concentric disc with a full-length arm
  (random direction, a quarter of them at 0 degrees like the default);
* each anomaly independently with probability 0.2 (beam on), with a minimum
  severity so a labelled anomaly is visible (decidable from the photons):
  ``ice_rings``: the 3.90 A line peaks at 1.2-8 x the background under it
  (at least :data:`ICE_MIN_Z` Poisson sigma over the whole ring, so faint
  rings only on frames with enough counts), Gaussian width 0.8-8 px (sharp
  to broad), whole (65 %) or partial, textured arcs (35 %);
  ``saturation``: spots whose mean is 0.3-5 x the count cutoff, or a direct
  beam 3-100 x the cutoff leaking past the beamstop; ``blank``: no crystal;
  ``beam_off_center``: :data:`MIN_OFFSET_PX`-150 px (nothing is drawn
  between the normal 10 px and 30 px), only on frames with at least
  :data:`OFFSET_MIN_COUNTS` expected counts/pixel near the beam (a shadow
  can be measured; on sparser frames the beam stays normal);
  ``detector_fault``: a dead module, a hot-pixel cluster, 1-3 stripes or 1-2
  bad chips. With no beam only a hot cluster can be added;
* exclusion (:func:`excluded`, ~10 %): frames a crystallographer could not
  label from the photons: a crystal with fewer than
  :data:`MIN_VISIBLE_SPOTS` visible spots (truth SNR >= :data:`VISIBLE_SNR`:
  neither clearly weak diffraction nor blank); a blank frame whose scattered
  photons cannot be told from the dark counts (:func:`scatter_decidable`);
  a dead area that would have received fewer than :data:`MIN_LOST_COUNTS`
  counts (a dead module on an empty frame reads 0 either way); a hot cluster
  on fewer than :data:`MIN_HOT_CLUSTER_PX` valid pixels (in a module gap or
  a dead module: not there to see).

Labels ``no_beam`` / ``blank`` (physically decidable): ``no_beam`` = no
photons from the beam (flux 0: dark counts, hot pixels and detector faults
only); ``blank`` = beam on and scattered photons clearly above the dark
level (:func:`scatter_decidable`), but no crystal; a frame with at least
:data:`MIN_VISIBLE_SPOTS` visible Bragg spots is diffraction (neither flag),
however low its background.

The ``saturation`` label is taken from the simulated frame itself: at least
:data:`MIN_SATURATED` saturated pixels that have a bright neighbour.
"""

from __future__ import annotations

import math

import numpy as np

from .background import radial_stats
from .features import frame_features
from .geometry import LAYOUTS, Geometry
from .sim import ICE_D_SPACINGS, SimConfig, SimFrame, background_profile, simulate
from .spotfinding import find_peaks

__all__ = ["CLASSES", "MIN_SATURATED", "sample_scenario", "simulate_scenario", "make_example",
           "make_dataset", "clustered_saturated", "visible_spots", "excluded", "scatter_decidable", "LAYOUT_SHARES"]

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
#: ``ice_rings`` frames: the 3.90 A line peaks at >= this x the background under it ...
MIN_ICE_RATIO = 1.2
MAX_ICE_RATIO = 8.0
#: ... and its summed excess is >= this many Poisson sigma of the background under the ring.
ICE_MIN_Z = 10.0
#: Layouts (edge.geometry.LAYOUTS) and their shares of the frames.
LAYOUT_SHARES = {"1m": 0.65, "4m": 0.15, "pilatus-6m": 0.11, "9m": 0.05, "16m": 0.04}
#: Background (counts/pixel at the solvent ring) of beam-on frames: log-uniform in this range.
LEVEL_RANGE = (0.001, 100.0)
#: ``beam_off_center`` is drawn only where the expected background near the
#: beam (60-120 px) reaches this (counts/pixel): the evidence needs >= 5 counts
#: per 7x7 px box to measure a shadow.
OFFSET_MIN_COUNTS = 0.2
#: A blank frame's scattered photons (expected, valid pixels) must reach
#: this and SCATTER_MIN_Z sigma of the dark counts (see scatter_decidable).
MIN_SCATTER_PHOTONS = 1000.0
SCATTER_MIN_Z = 10.0
#: A dead area must have been expected to receive this many counts.
MIN_LOST_COUNTS = 50.0
#: A hot cluster must read on at least this many valid pixels (one inside a
#: module gap or a dead module is not there to see).
MIN_HOT_CLUSTER_PX = 32
#: Frames with a crystal need at least this many visible Bragg spots
#: (simulated truth: SNR >= VISIBLE_SNR on valid pixels); frames below it are
#: neither clearly "weak diffraction" nor "blank" and are left out of the data.
MIN_VISIBLE_SPOTS = 20
VISIBLE_SNR = 5.0


def _logu(rng, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def sample_scenario(seed: int) -> tuple[dict, dict]:
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
    names = list(LAYOUT_SHARES)
    cum = np.cumsum([LAYOUT_SHARES[k] for k in names])
    layout = names[min(int(np.searchsorted(cum, rng.random() * cum[-1], side="right")), len(names) - 1)]
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
    level = _logu(rng, *LEVEL_RANGE)
    dark = _logu(rng, 1e-4, 0.01) if rng.random() < 0.5 else 0.0
    strength = _logu(rng, 10.0, 30000.0)
    mean_int = min(max(level * strength, 20.0), 5000.0)
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
    # diffraction: weak and sparse crystals (few, faint spots) are normal frames too
    ov = dict(
        layout=layout, distance_mm=float(distance), wavelength_A=float(wl), beam_center=(float(bx), float(by)),
        flux=flux, background=level / flux, saturation=sat, dark_counts=float(dark),
        n_spots=int(_logu(rng, 50.0, 2500.0) * math.sqrt(mpix)), mean_intensity=mean_int / flux,
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
    ice_u = rng.random()
    ice_width = _logu(rng, 0.8, 8.0)
    ice_texture = float(rng.uniform(0.3, 1.0)) if rng.random() < 0.35 else 0.0
    big_off = rng.uniform(MIN_OFFSET_PX, 150.0)
    n_stripes = int(rng.integers(1, 4))
    n_asics = int(rng.integers(1, 3))
    overload_x = _logu(rng, 0.3, 5.0)
    beam_x, beam_sig = _logu(rng, 3.0, 100.0), rng.uniform(1.5, 4.0)
    if rng.random() < P_NO_BEAM:
        ov["flux"] = 0.0
        lab["no_beam"] = True
        if draws[5] < P_ANOMALY:
            ov["hot_cluster"] = True
            lab["detector_fault"] = True
        ov["beam_offset"] = (off_r * math.cos(off_a), off_r * math.sin(off_a))
        return ov, lab
    geom = Geometry.for_layout(layout, distance_mm=float(distance), wavelength_A=float(wl), beam_center=(bx, by))
    if draws[0] < P_ANOMALY:
        # the 3.90 A line's peak over the background under it, at least
        # ICE_MIN_Z sigma when summed over the ring (faint rings need counts)
        r_ice = float(geom.radius_for_d(ICE_D_SPACINGS[0]))
        b_ice = float(background_profile(level, geom, r_ice))
        n_eff = 2.0 * math.pi * r_ice * ice_width * math.sqrt(2.0 * math.pi)
        lo = max(MIN_ICE_RATIO, 1.0 + ICE_MIN_Z / math.sqrt(max(b_ice * n_eff, 1e-12)))
        ratio = math.exp(math.log(lo) + ice_u * math.log(max(MAX_ICE_RATIO / lo, 1.5)))
        ov.update(ice_rings=True, ice_strength=(ratio - 1.0) * b_ice / flux, ice_width=float(ice_width),
                  ice_texture=ice_texture)
        lab["ice_rings"] = True
    if draws[2] < P_ANOMALY:
        ov["crystal"] = False
        lab["blank"] = True
    if draws[1] < P_ANOMALY:
        lab["saturation"] = True
        if sat_kind < 0.6 and not lab["blank"]:
            ov["overload"] = max(overload_x * sat / mean_int, 1.0)
        else:
            ov["direct_beam"] = sat * beam_x
            ov["direct_beam_sigma"] = beam_sig
    near = float(np.mean(background_profile(level, geom, np.array([60.0, 90.0, 120.0]))))
    if draws[4] < P_ANOMALY and near >= OFFSET_MIN_COUNTS:
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


def simulate_scenario(seed: int) -> tuple[SimFrame, np.ndarray]:
    """Simulated frame and its label vector (float32, :data:`CLASSES` order)."""
    ov, lab = sample_scenario(seed)
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


def scatter_decidable(sf: SimFrame) -> bool:
    """True when a beam-on frame's scattered photons can be told from the dark
    counts: expected scattered photons on valid pixels >= :data:`MIN_SCATTER_PHOTONS`
    and >= :data:`SCATTER_MIN_Z` x the Poisson sigma of the frame's dark counts."""
    c = sf.config
    if c.flux <= 0:
        return False
    valid = sf.geometry.valid
    photons = float(sf.expected_background[valid].sum(dtype=np.float64))
    dark = (c.dark_counts or 0.0) * float(np.count_nonzero(valid))
    return photons >= MIN_SCATTER_PHOTONS and photons >= SCATTER_MIN_Z * math.sqrt(dark)


def excluded(sf: SimFrame) -> bool:
    """True for frames left out of the data because their label cannot be
    decided from the photons: a crystal in the beam but fewer than
    :data:`MIN_VISIBLE_SPOTS` visible spots (ambiguous weak/blank), a blank
    frame whose scatter cannot be told from the dark counts (ambiguous
    blank/no beam), a dead area that would have received fewer than
    :data:`MIN_LOST_COUNTS` counts (ambiguous fault/no fault)."""
    c = sf.config
    if c.flux > 0:
        if c.crystal and visible_spots(sf) < MIN_VISIBLE_SPOTS:
            return True
        if not c.crystal and not scatter_decidable(sf):
            return True
    if c.hot_cluster and sf.hot_cluster_px < MIN_HOT_CLUSTER_PX:
        return True
    # lost counts are 0 without a dead area (hot stripes and chips lose nothing)
    dead = c.dead_modules or c.stripes or c.bad_asics
    return bool(dead and 0.0 < sf.fault_lost_counts < MIN_LOST_COUNTS)


def make_example(seed: int) -> tuple[np.ndarray, np.ndarray] | None:
    """``(features, labels)`` of one scenario, with the runtime's feature path;
    None when the frame is :func:`excluded`."""
    sf, y = simulate_scenario(seed)
    if excluded(sf):
        return None
    stats = radial_stats(sf.frame, geometry=sf.geometry)
    peaks = find_peaks(sf.frame, geometry=sf.geometry, stats=stats)
    return frame_features(sf.frame, sf.geometry, stats=stats, peaks=peaks), y


def make_dataset(seeds) -> tuple[np.ndarray, np.ndarray]:
    """Stacked features (n, N_FEATURES) and labels (n, len(CLASSES)) for ``seeds``
    (:func:`excluded` frames are skipped, so n can be smaller than len(seeds))."""
    xs, ys = [], []
    for s in seeds:
        ex = make_example(int(s))
        if ex is None:
            continue
        xs.append(ex[0])
        ys.append(ex[1])
    return np.stack(xs), np.stack(ys)
