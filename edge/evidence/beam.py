"""Beam evidence: no beam vs blank vs diffraction, and whether the beam is off centre.

*Beam on* shows in two ways that need no calibration: Bragg peaks (a
crystal diffracts only in the beam) and radially structured scatter (air,
solvent and beamstop shadow make the ring means vary with radius; the dark
counts of a photon counter, hot pixels aside, do not). A frame is judged

* ``diffraction`` with at least :data:`MIN_DIFFRACTION_PEAKS` clear peaks
  (SNR >= 5; off the ice d-spacings on a frame with ice) -- whatever the count level: fine-sliced photon-counting frames
  hold 0.001-0.01 counts/pixel and still tens to thousands of spots;
* ``no_beam`` with fewer peaks, no significant scatter structure and a
  background at or below the dark level :data:`DARK_MAX_COUNTS` (or 10x
  below the median of the recent beam-on frames);
* ``blank`` with fewer peaks and the beam on (structured scatter or a
  background above the dark level);
* ``cannot_judge`` otherwise.

Beam off centre is judged from the measured beamstop-shadow position
(:func:`edge.measure.measure_beam_offset`) and only when the counts around
the beam are high enough to see a shadow; otherwise ``cannot_judge``.
"""

from __future__ import annotations

import math

import numpy as np

from ..background import RadialStats
from ..sim import ICE_D_SPACINGS

__all__ = ["MIN_DIFFRACTION_PEAKS", "DARK_MAX_COUNTS", "OFFSET_MIN_PX", "beam_state", "offset_evidence",
           "background_level"]

#: Clear peaks (SNR >= 5) that prove diffraction, hence a beam. The training
#: data leave frames with fewer than 20 visible spots out as ambiguous; 10
#: keeps a weak crystal out of ``blank``.
MIN_DIFFRACTION_PEAKS = 10
#: SNR of a clear peak.
CLEAR_SNR = 5.0
#: On a frame with ice rings, clear peaks within this relative d-spacing of
#: an ice line do not count: the noise on a sharp ring makes "peaks" on a
#: blank frame. (Not applied without ice: the ten lines would take a third
#: of the real EIGER frame's spots.)
ICE_PEAK_REL = 0.03
#: Highest background (counts/pixel, clipped ring means) a dark frame reaches
#: (photon counters: ~0; the simulator's dark trickle is 0.01).
DARK_MAX_COUNTS = 0.02
#: A background this many times below the recent beam-on median is a beam loss.
DROP_FACTOR = 10.0
#: Scatter structure: radial bands whose means differ by this ratio ...
STRUCTURE_RATIO = 1.3
#: ... at this Poisson significance mean the beam is on.
STRUCTURE_Z = 6.0
#: Offsets (px) from here on confirm ``beam_off_center``: the class is
#: defined from 30 px (normal frames: within 10 px); the shadow-based
#: measurement includes the beamstop's own offset from the beam, 14 px on
#: the real PILATUS blank frame. Simulated off-centre frames measure >= 32 px.
OFFSET_MIN_PX = 25.0
#: The shadow search smooths over 7 x 7 px: below this many counts per box
#: around the beam a shadow cannot be told from Poisson zeros.
MIN_BOX_COUNTS = 5.0
#: ... with at least this many counts in the highest band (Poisson z means
#: little on a handful of counts).
MIN_STRUCTURE_COUNTS = 100.0
_N_BANDS = 8


def background_level(mean: np.ndarray, count: np.ndarray) -> float:
    """Pixel-weighted mean of ring means (counts/pixel)."""
    m = np.asarray(mean, np.float64)
    c = np.asarray(count, np.float64)
    ok = np.isfinite(m) & (c > 0)
    return float(np.average(m[ok], weights=c[ok])) if ok.any() else 0.0


def _structure(mean: np.ndarray, count: np.ndarray) -> tuple[float, float, float]:
    """Ratio of the highest to the lowest radial-band mean, its Poisson z
    and the counts in the highest band (bands of equal pixel count)."""
    m = np.asarray(mean, np.float64)
    c = np.asarray(count, np.float64)
    ok = np.isfinite(m) & (c > 0)
    if ok.sum() < _N_BANDS:
        return 1.0, 0.0, 0.0
    m, c = m[ok], c[ok]
    cum = np.cumsum(c)
    band = np.minimum((cum - 0.5 * c) * _N_BANDS // cum[-1], _N_BANDS - 1).astype(np.int64)
    n = np.bincount(band, c, _N_BANDS)
    s = np.bincount(band, m * c, _N_BANDS)
    good = n > 0
    bm, bn = s[good] / n[good], n[good]
    hi, lo = int(np.argmax(bm)), int(np.argmin(bm))
    ratio = (bm[hi] + 1e-9) / (bm[lo] + 1e-9)
    z = (bm[hi] - bm[lo]) / math.sqrt(max(bm[hi] / bn[hi] + bm[lo] / bn[lo], 1e-12))
    return float(ratio), float(z), float(bm[hi] * bn[hi])


def beam_state(stats: RadialStats, peaks, *, recent_level: float | None = None,
               profile: tuple[np.ndarray, np.ndarray] | None = None, ice: bool = False) -> dict:
    """No beam / blank / diffraction judgement with its numbers.

    Parameters
    ----------
    stats : RadialStats
        The frame's radial statistics.
    peaks : Peaks
        The frame's peaks.
    recent_level : float, optional
        Median background (counts/pixel) of recent beam-on frames.
    profile : (mean, count), optional
        Ring means that keep the upper tail of low counts
        (:func:`edge.evidence.ice.sampled_profile`); used instead of the
        clipped means, which read 0 on frames that are mostly zeros.

    Returns
    -------
    dict
        ``verdict`` (``diffraction``, ``blank``, ``no_beam``,
        ``cannot_judge``), ``background_counts_per_px``,
        ``dark_max_counts_per_px``, ``clear_peaks`` (off the ice rings),
        ``clear_peaks_on_ice_rings``, ``peaks``,
        ``scatter_ratio``, ``scatter_z``, ``recent_background_counts_per_px``.
    """
    mean, count = (stats.mean, stats.count) if profile is None else profile
    level = background_level(mean, count)
    ratio, z, n_hi = _structure(mean, count)
    n_clear = n_on_ice = 0
    if peaks is not None and len(peaks):
        clear = np.asarray(peaks.snr) >= CLEAR_SNR
        d = np.asarray(peaks.d, np.float64)[:, None]
        with np.errstate(invalid="ignore"):
            on_ice = (np.abs(d / ICE_D_SPACINGS[None, :] - 1.0) <= ICE_PEAK_REL).any(axis=1) & ice
        n_clear = int(np.count_nonzero(clear & ~on_ice))
        n_on_ice = int(np.count_nonzero(clear & on_ice))
    structured = ratio >= STRUCTURE_RATIO and z >= STRUCTURE_Z and n_hi >= MIN_STRUCTURE_COUNTS
    dropped = recent_level is not None and recent_level > 0 and level * DROP_FACTOR <= recent_level
    if n_clear >= MIN_DIFFRACTION_PEAKS:
        verdict = "diffraction"
    elif not structured and (level <= DARK_MAX_COUNTS or dropped):
        verdict = "no_beam"
    elif structured or level > DARK_MAX_COUNTS:
        verdict = "blank"
    else:
        verdict = "cannot_judge"
    return {"verdict": verdict, "background_counts_per_px": level,
            "profile": "clipped" if profile is None else "capped", "dark_max_counts_per_px": DARK_MAX_COUNTS,
            "clear_peaks": n_clear, "clear_peaks_on_ice_rings": n_on_ice, "peaks": int(len(peaks)) if peaks is not None else 0,
            "scatter_ratio": ratio, "scatter_z": z,
            "recent_background_counts_per_px": recent_level}


def offset_evidence(offset: tuple[float, float] | None, stats: RadialStats, *, search_px: float = 120.0) -> dict:
    """Judge a measured beam offset.

    Parameters
    ----------
    offset : (dx, dy) or None
        Measured minus believed beam position (px); None = no shadow found.
    stats : RadialStats
        Ring means around the beam give the signal available to see a shadow.
    search_px : float
        Radius around the believed centre the shadow search covers.

    Returns
    -------
    dict
        ``verdict`` (``off_centre``, ``centred``, ``cannot_judge``),
        ``offset_px`` (dx, dy) or None, ``offset_abs_px``, ``threshold_px``,
        ``level_near_beam_counts_per_px``, ``reason``.
    """
    m = np.asarray(stats.mean, np.float64)
    r = np.asarray(stats.radius, np.float64)
    near = np.isfinite(m) & (r >= 0.25 * search_px) & (r <= search_px) & (np.asarray(stats.count) > 0)
    level = float(np.median(m[near])) if near.any() else 0.0
    out = {"offset_px": None if offset is None else [round(float(offset[0]), 1), round(float(offset[1]), 1)],
           "offset_abs_px": None, "threshold_px": OFFSET_MIN_PX, "level_near_beam_counts_per_px": level}
    if level * 49.0 < MIN_BOX_COUNTS:
        return {**out, "verdict": "cannot_judge", "reason": "too few counts near the beam to see its shadow"}
    if offset is None:
        return {**out, "verdict": "cannot_judge", "reason": "no beamstop shadow found"}
    dist = float(math.hypot(*offset))
    out["offset_abs_px"] = round(dist, 1)
    if dist >= OFFSET_MIN_PX:
        return {**out, "verdict": "off_centre", "reason": f"shadow {dist:.0f} px from the believed centre"}
    return {**out, "verdict": "centred", "reason": f"shadow within {dist:.0f} px of the believed centre"}
