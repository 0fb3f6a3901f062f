"""Ice-ring evidence: per ice Ih line, the ring's excess over the interpolated background.

The radial profile (mean counts per pixel in 1-px rings around the believed
beam centre) is read at each ice d-spacing: the background under the ring is
a straight line fitted to the flanks on both sides (other ice lines left
out), the excess is the profile minus that line within the ring window, and
its Poisson significance is the summed excess over the square root of the
summed background counts (inflated by the flank fit's own uncertainty).

Two profiles serve: the sigma-clipped ring means the pipeline already has
(:func:`edge.radial_stats`, every 4th row), and, when a ring is suspected, a
full-resolution profile of the ring bands only (pixels winsorised at the
ring's mean + 5 sd, so Bragg spots cannot fake a ring). At low background
(0.1-1 counts/pixel) the clipped means lose most of a faint ring, the full
profile does not.
"""

from __future__ import annotations

import numpy as np

from ..background import RadialStats
from ..geometry import Geometry
from ..sim import ICE_D_SPACINGS

__all__ = ["ICE_LINES_A", "RING_Z_MIN", "RING_CONTRAST_MIN", "ring_profile", "winsorised_profile",
           "ice_ring_evidence"]

#: Ice Ih lines examined (A): the six strongest that stand apart; 1.95-1.88 A
#: are a close triplet and 1.72 A is weak.
ICE_LINES_A = np.asarray(ICE_D_SPACINGS[:6], dtype=np.float64)
#: The three strongest lines: evidence alone needs one of them.
STRONG_LINES_A = ICE_LINES_A[:3]
#: A ring is found when its Poisson z reaches this ...
RING_Z_MIN = 8.0
#: ... and its contrast (ring / background over the 3 best 1-px rings) this.
RING_CONTRAST_MIN = 1.10
#: Gap (px) between the ring window and its flanks.
_GAP_PX = 2.0


def _windows(r: float) -> tuple[float, float]:
    """Half-width of the ring window and flank length (px) at radius ``r``:
    rings widen with radius (sample size, detector tilt, beam divergence)."""
    return max(3.0, 0.008 * r), max(8.0, 0.02 * r)


def _band_table(geometry: Geometry, stats: RadialStats) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flat pixel indices and ring numbers of the ice bands (cached per geometry)."""
    key = ("ice_evidence_bands", stats.bins.nbins, stats.bins.width, geometry.beam_center)
    tab = geometry._cache.get(key)
    if tab is None:
        width = stats.bins.width
        radii = np.asarray(geometry.radius_for_d(ICE_LINES_A), dtype=np.float64) / width
        keep = np.zeros(stats.bins.nbins + 1, dtype=bool)
        for r in radii[np.isfinite(radii)]:
            w, f = _windows(r * width)
            reach = (w + _GAP_PX + f) / width + 1
            lo, hi = int(max(r - reach, 0)), int(min(r + reach + 1, stats.bins.nbins))
            keep[lo:hi] = True
        idx = stats.bins.index.ravel()
        flat = np.flatnonzero(keep[np.minimum(idx, stats.bins.nbins)])
        ring = idx[flat].astype(np.int64)
        n_pix = np.bincount(ring, minlength=stats.bins.nbins).astype(np.float64)
        tab = (flat, ring, n_pix)
        geometry._cache[key] = tab
    return tab


def ring_profile(frame: np.ndarray, geometry: Geometry, stats: RadialStats, *,
                 lo_valid: float = 0.0, hi_valid: float = 1.0e300) -> tuple[np.ndarray, np.ndarray]:
    """Full-resolution ring-mean profile over the ice bands only.

    Parameters
    ----------
    frame : ndarray
        The frame in a kernel dtype (:func:`edge.background.prepare_frame`).
    geometry, stats
        The frame's geometry and radial statistics (ring map, clip levels).
    lo_valid, hi_valid : float
        Valid value range (outside = masked).

    Returns
    -------
    mean, count : ndarray of float64, shape (nbins,)
        Mean counts per pixel (winsorised at the ring's mean + 5 sd + 2) and
        valid pixels per ring; 0 outside the ice bands.
    """
    flat, ring, _ = _band_table(geometry, stats)
    return winsorised_profile(frame.ravel()[flat], ring, stats, lo_valid=lo_valid, hi_valid=hi_valid)


def winsorised_profile(values: np.ndarray, rings: np.ndarray, stats: RadialStats, *,
                       lo_valid: float = 0.0, hi_valid: float = 1.0e300) -> tuple[np.ndarray, np.ndarray]:
    """Ring means of ``values`` (pixels of ring ``rings``), each pixel capped at
    its ring's clipped mean + 5 sd + 2 counts (spots and hot pixels cannot
    lift a ring; unlike clipping, the upper tail of low counts is kept).

    Returns
    -------
    mean, count : ndarray of float64, shape (nbins,)
        Mean counts per pixel (0 where no pixel) and valid pixels per ring.
    """
    nb = stats.bins.nbins
    v = values.astype(np.float64)
    ok = (rings < nb) & (v >= lo_valid) & (v <= hi_valid)
    mu = np.nan_to_num(np.asarray(stats.mean, np.float64), nan=0.0)
    sd = np.maximum(np.nan_to_num(np.asarray(stats.sigma, np.float64), nan=0.0), np.sqrt(np.maximum(mu, 0.0)))
    cap = mu + 5.0 * sd + 2.0
    rk = rings[ok].astype(np.intp)
    s = np.bincount(rk, np.minimum(v[ok], cap[rk]), minlength=nb)
    c = np.bincount(rk, minlength=nb).astype(np.float64)
    return np.where(c > 0, s / np.maximum(c, 1.0), 0.0), c


def ice_ring_evidence(mean: np.ndarray, count: np.ndarray, geometry: Geometry, *,
                      bin_width: float = 1.0) -> list[dict]:
    """Per ice line: background, excess, contrast and Poisson z of the ring.

    Parameters
    ----------
    mean, count : ndarray, shape (nbins,)
        Ring-mean profile (counts/pixel) and the pixels behind each ring mean.
    geometry : Geometry
        Wavelength, distance and pixel size place the lines.
    bin_width : float
        Ring width of the profile in pixels.

    Returns
    -------
    list of dict
        One per line of :data:`ICE_LINES_A` on the detector, with ``d_A``,
        ``radius_px``, ``background_counts_per_px`` (interpolated under the
        ring), ``excess_counts_per_px`` (mean over the window), ``contrast``
        (ring / background over the 3 best rings), ``z`` (Poisson
        significance of the summed excess), ``pixels`` and ``found``
        (``z >= RING_Z_MIN`` and ``contrast >= RING_CONTRAST_MIN``). Lines
        off the detector or without flanks are left out.
    """
    mean = np.asarray(mean, np.float64)
    count = np.asarray(count, np.float64)
    rc = (np.arange(len(mean)) + 0.5) * bin_width
    all_r = np.asarray(geometry.radius_for_d(ICE_D_SPACINGS), dtype=np.float64)
    out = []
    for d, r in zip(ICE_LINES_A, np.asarray(geometry.radius_for_d(ICE_LINES_A), dtype=np.float64)):
        if not np.isfinite(r):
            continue
        w, f = _windows(r)
        dist = np.abs(rc - r)
        win = (dist <= w) & (count > 0)
        flank = (dist > w + _GAP_PX) & (dist <= w + _GAP_PX + f) & (count > 0)
        for other in all_r[np.isfinite(all_r)]:
            if abs(other - r) > 0.5:
                flank &= np.abs(rc - other) > w + _GAP_PX
        # both flanks needed: a one-sided fit extrapolates
        if win.sum() < 3 or (flank & (rc < r)).sum() < 3 or (flank & (rc > r)).sum() < 3:
            continue
        sw = np.sqrt(count[flank])
        a = np.stack([rc[flank] - r, np.ones(int(flank.sum()))], axis=1)
        coef, *_ = np.linalg.lstsq(a * sw[:, None], mean[flank] * sw, rcond=None)
        bg = np.maximum(coef[0] * (rc[win] - r) + coef[1], 1e-6)
        n = count[win]
        exc = mean[win] - bg
        var = float((bg * n).sum()) * (1.0 + n.sum() / count[flank].sum())
        z = float((exc * n).sum() / np.sqrt(var))
        # contrast over the 3 adjacent rings with the most excess (a sharp
        # ring is 1-3 px wide; one ring alone is noisy at low counts)
        obs3 = np.convolve(mean[win] * n, np.ones(3), "valid")
        exp3 = np.convolve(bg * n, np.ones(3), "valid")
        contrast = float(np.max(obs3 / np.maximum(exp3, 1e-12)))
        out.append({
            "d_A": round(float(d), 3), "radius_px": round(float(r), 1),
            "background_counts_per_px": float(np.average(bg, weights=n)),
            "excess_counts_per_px": float(np.average(exc, weights=n)),
            "contrast": contrast, "z": z, "pixels": int(n.sum()),
            "found": bool(z >= RING_Z_MIN and contrast >= RING_CONTRAST_MIN),
        })
    return out
