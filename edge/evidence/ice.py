"""Ice-ring evidence: per ice Ih line, the ring's excess over the interpolated background.

The radial profile (mean counts per pixel in 1-px rings around the believed
beam centre) is read at each ice d-spacing: the background under the ring is
a straight line fitted to the flanks on both sides (other ice lines left
out), the excess is the profile minus that line within the ring window, and
its Poisson significance is the summed excess over the square root of the
summed background counts (inflated by the flank fit's own uncertainty).

Two profiles serve: the sigma-clipped ring means the pipeline already has
(:func:`edge.radial_stats`, every 4th row), and, when a ring is suspected, a
full-resolution profile of the ring bands only (each pixel capped at a
Poisson-improbable level and the pixels of found peaks left out, so Bragg
spots cannot fake a ring). At low background
(0.1-1 counts/pixel) the clipped means lose most of a faint ring, the full
profile does not.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ..background import RadialStats
from ..geometry import Geometry
from ..sim import ICE_D_SPACINGS

__all__ = ["ICE_LINES_A", "ice_verdict", "warmup", "RING_Z_MIN", "RING_CONTRAST_MIN", "poisson_cap", "ring_profile", "sampled_profile",
           "ice_ring_evidence"]

#: Ice Ih lines examined (A): the six strongest that stand apart; 1.95-1.88 A
#: are a close triplet and 1.72 A is weak.
ICE_LINES_A = np.asarray(ICE_D_SPACINGS[:6], dtype=np.float64)
#: The three strongest lines: evidence alone needs one of them.
STRONG_LINES_A = ICE_LINES_A[:3]
#: A ring is found when its Poisson z reaches this ...
RING_Z_MIN = 5.0
#: ... and its contrast (ring / background over the 3 best 1-px rings) this.
#: (On the real frames without ice, z stays within +-2.5 and the contrast
#: of rings with z > 2 below 1.02.)
RING_CONTRAST_MIN = 1.05
#: Evidence alone raises ``ice_rings`` when the strongest line (3.90 A) has
#: z >= RAISE_Z and contrast >= RAISE_CONTRAST ...
RAISE_Z, RAISE_CONTRAST = 6.0, 1.10
#: ... and another of the three strongest lines agrees (z and contrast at least these).
SUPPORT_Z, SUPPORT_CONTRAST = 3.0, 1.03
#: Largest disc radius (px) left out around a peak.
_PEAK_DISC_MAX = 20.0
#: Gap (px) between the ring window and its flanks.
_GAP_PX = 2.0


def _windows(r: float) -> tuple[float, float]:
    """Half-width of the ring window and flank length (px) at radius ``r``:
    rings widen with radius (sample size, detector tilt, beam divergence)."""
    return max(3.0, 0.008 * r), max(8.0, 0.02 * r)


def _band_reach(geometry: Geometry) -> list[tuple[float, float]]:
    """Radius ranges (px) of the ice bands: each line's window and flanks."""
    out = []
    for r in np.asarray(geometry.radius_for_d(ICE_LINES_A), dtype=np.float64):
        if np.isfinite(r):
            w, f = _windows(r)
            out.append((r - w - _GAP_PX - f - 1.0, r + w + _GAP_PX + f + 1.0))
    return out


def _band_table(geometry: Geometry, stats: RadialStats) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flat pixel indices and ring numbers of the ice bands (cached per geometry)."""
    key = ("ice_evidence_bands", stats.bins.nbins, stats.bins.width, geometry.beam_center)
    tab = geometry._cache.get(key)
    if tab is None:
        width = stats.bins.width
        keep = np.zeros(stats.bins.nbins + 1, dtype=bool)
        for lo, hi in _band_reach(geometry):
            keep[int(max(lo / width, 0)):int(min(hi / width + 1, stats.bins.nbins))] = True
        idx = stats.bins.index.ravel()
        flat = np.flatnonzero(keep[np.minimum(idx, stats.bins.nbins)])
        ring = idx[flat].astype(np.int32)
        n_pix = np.bincount(ring, minlength=stats.bins.nbins).astype(np.float64)
        tab = (flat, ring, n_pix)
        geometry._cache[key] = tab
    return tab


@njit(cache=True, nogil=True)
def _capped_sums_flat(frame_flat, flat, ring, cap, lo_valid, hi_valid, nbins):
    """Per-ring sums of ``min(value, cap[ring])`` and valid-pixel counts over listed pixels."""
    s = np.zeros(nbins, dtype=np.float64)
    c = np.zeros(nbins, dtype=np.float64)
    for k in range(flat.shape[0]):
        v = np.float64(frame_flat[flat[k]])
        b = ring[k]
        if b >= nbins or not (v >= lo_valid and v <= hi_valid):
            continue
        s[b] += min(v, cap[b])
        c[b] += 1.0
    return s, c


@njit(cache=True, nogil=True)
def _capped_sums_rows(frame, index, row_step, cap, lo_valid, hi_valid, nbins):
    """Per-ring sums of ``min(value, cap[ring])`` and valid-pixel counts over every ``row_step``-th row."""
    s = np.zeros(nbins, dtype=np.float64)
    c = np.zeros(nbins, dtype=np.float64)
    for i in range(0, frame.shape[0], row_step):
        for j in range(frame.shape[1]):
            b = index[i, j]
            v = np.float64(frame[i, j])
            if b >= nbins or not (v >= lo_valid and v <= hi_valid):
                continue
            s[b] += min(v, cap[b])
            c[b] += 1.0
    return s, c


def poisson_cap(stats: RadialStats) -> np.ndarray:
    """Per-ring cap (counts) on a pixel: ``floor(mu + 4 sqrt(mu) + 1.5)`` with
    ``mu`` the clipped ring mean (or ``mu + 4 sd`` when the ring varies more
    than Poisson). Above it a pixel is a spot or a hot pixel (Poisson chance
    < 1e-4), so spots cannot lift a ring; unlike sigma clipping, the upper
    tail of low counts (ones and twos on a mostly-zero ring) is kept."""
    mu = np.maximum(np.nan_to_num(np.asarray(stats.mean, np.float64), nan=0.0), 0.0)
    sd = np.maximum(np.nan_to_num(np.asarray(stats.sigma, np.float64), nan=0.0), np.sqrt(mu))
    return np.floor(mu + 4.0 * sd + 1.5)


def _means(s: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.where(c > 0, s / np.maximum(c, 1.0), 0.0), c


def ring_profile(frame: np.ndarray, geometry: Geometry, stats: RadialStats, *, peaks=None,
                 lo_valid: float = 0.0, hi_valid: float = 1.0e300) -> tuple[np.ndarray, np.ndarray]:
    """Full-resolution ring-mean profile over the ice bands only.

    Parameters
    ----------
    frame : ndarray
        The frame in a kernel dtype (:func:`edge.background.prepare_frame`).
    geometry, stats
        The frame's geometry and radial statistics (ring map, clip levels).
    peaks : Peaks, optional
        Pixels around these peaks' centroids (a disc of their size + 2 px)
        are left out: on a mostly-zero frame a few Bragg spots on an ice
        d-spacing would otherwise make a ring.
    lo_valid, hi_valid : float
        Valid value range (outside = masked).

    Returns
    -------
    mean, count : ndarray of float64, shape (nbins,)
        Mean counts per pixel (each pixel capped, :func:`poisson_cap`) and
        valid pixels per ring; 0 outside the ice bands.
    """
    flat, ring, n_pix = _band_table(geometry, stats)
    cap = poisson_cap(stats)
    nb = int(stats.bins.nbins)
    fr = np.ascontiguousarray(frame).reshape(-1)
    s, c = _capped_sums_flat(fr, flat, ring, cap, float(lo_valid), float(hi_valid), nb)
    if peaks is not None and len(peaks):
        x, y, rad = _peak_discs(peaks, geometry)
        if len(x):
            inband = n_pix[:nb] > 0  # only rings the band sums cover
            o = np.argsort(x, kind="stable")
            s2, c2 = _disc_sums(frame, stats.bins.index, np.ascontiguousarray(x[o]), np.ascontiguousarray(y[o]),
                                np.ascontiguousarray(rad[o]), cap, inband, float(lo_valid), float(hi_valid), nb)
            s -= s2
            c -= c2
    return _means(s, c)


def _peak_discs(peaks, geometry: Geometry) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centres and radii (1.5 sqrt(npix / pi) + 3 px, at most
    :data:`_PEAK_DISC_MAX`) of the discs left out around the peaks in the ice bands."""
    bx, by = geometry.beam_center
    x, y = np.asarray(peaks.x, np.float64), np.asarray(peaks.y, np.float64)
    r = np.hypot(x - bx, y - by)
    near = np.zeros(len(x), dtype=bool)
    for lo, hi in _band_reach(geometry):
        near |= (r >= lo - _PEAK_DISC_MAX) & (r <= hi + _PEAK_DISC_MAX)
    rad = np.minimum(1.5 * np.sqrt(np.asarray(peaks.npix, np.float64)[near] / np.pi) + 3.0, _PEAK_DISC_MAX)
    return x[near], y[near], rad


@njit(cache=True, nogil=True)
def _disc_sums(frame, index, xs, ys, rads, cap, inband, lo_valid, hi_valid, nbins):
    """Capped sums and counts per ring over the union of discs, each pixel
    once. The discs come sorted by ``xs``; a pixel is counted by the first
    disc (in that order) that holds it, so overlaps are found among the
    neighbours in x without a frame-sized mask."""
    s = np.zeros(nbins, dtype=np.float64)
    c = np.zeros(nbins, dtype=np.float64)
    ny, nx = frame.shape
    rmax = 0.0
    for k in range(rads.shape[0]):
        rmax = max(rmax, rads[k])
    near = np.empty(xs.shape[0], dtype=np.int64)  # earlier discs that can overlap disc k
    for k in range(xs.shape[0]):
        x, y, r = xs[k], ys[k], rads[k]
        r2 = r * r
        m = 0
        q = k - 1
        while q >= 0 and x - xs[q] <= r + rmax:
            if abs(y - ys[q]) <= r + rads[q] and x - xs[q] <= r + rads[q]:
                near[m] = q
                m += 1
            q -= 1
        for i in range(max(int(y - r), 0), min(int(y + r) + 2, ny)):
            for j in range(max(int(x - r), 0), min(int(x + r) + 2, nx)):
                if (j - x) * (j - x) + (i - y) * (i - y) > r2:
                    continue
                seen = False
                for u in range(m):
                    q = near[u]
                    if (j - xs[q]) * (j - xs[q]) + (i - ys[q]) * (i - ys[q]) <= rads[q] * rads[q]:
                        seen = True
                        break
                if seen:
                    continue
                b = index[i, j]
                v = np.float64(frame[i, j])
                if b >= nbins or not inband[b] or not (v >= lo_valid and v <= hi_valid):
                    continue
                s[b] += min(v, cap[b])
                c[b] += 1.0
    return s, c


def sampled_profile(frame: np.ndarray, stats: RadialStats, *, row_step: int = 4, lo_valid: float = 0.0,
                    hi_valid: float = 1.0e300) -> tuple[np.ndarray, np.ndarray]:
    """Ring means over every ``row_step``-th row with each pixel capped
    (:func:`poisson_cap`) instead of clipped: on mostly-zero frames the
    clipped means read 0, these do not."""
    cap = poisson_cap(stats)
    s, c = _capped_sums_rows(frame, stats.bins.index, int(row_step), cap, float(lo_valid), float(hi_valid),
                             int(stats.bins.nbins))
    return _means(s, c)


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
        significance of the summed excess; the variance is scaled by the
        flanks' chi-square per degree of freedom when above 1),
        ``flank_overdispersion``, ``pixels`` and ``found``
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
        # flank scatter about the line beyond Poisson (spot tails, structure
        # in the background) inflates the variance: z stays honest
        bgf = np.maximum(coef[0] * (rc[flank] - r) + coef[1], 1e-6)
        chi2 = float((((mean[flank] - bgf) ** 2) * count[flank] / bgf).sum()) / max(int(flank.sum()) - 2, 1)
        over = max(1.0, chi2)
        var = float((bg * n).sum()) * (1.0 + n.sum() / count[flank].sum()) * over
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
            "contrast": contrast, "z": z, "pixels": int(n.sum()), "flank_overdispersion": over,
            "found": bool(z >= RING_Z_MIN and contrast >= RING_CONTRAST_MIN),
        })
    return out


def ice_verdict(rings: list[dict]) -> tuple[bool, bool]:
    """``(confirms, raises)`` for the per-line evidence of :func:`ice_ring_evidence`.

    ``confirms``: at least one line found (a model proposal is confirmed).
    ``raises``: the 3.90 A line at z >= :data:`RAISE_Z` with contrast >=
    :data:`RAISE_CONTRAST` and another of the three strongest lines at z >=
    :data:`SUPPORT_Z` with contrast >= :data:`SUPPORT_CONTRAST` (ice Ih's
    two strongest lines together; one bump alone is not ice).
    """
    confirms = any(r["found"] for r in rings)
    by_d = {round(r["d_A"], 3): r for r in rings}
    first = by_d.get(round(float(STRONG_LINES_A[0]), 3))
    raises = bool(first and first["z"] >= RAISE_Z and first["contrast"] >= RAISE_CONTRAST and any(
        r["z"] >= SUPPORT_Z and r["contrast"] >= SUPPORT_CONTRAST
        for d, r in by_d.items() if d != round(float(STRONG_LINES_A[0]), 3)
        and np.isclose(d, STRONG_LINES_A, atol=1e-3).any()))
    return confirms, raises


def warmup(frame: np.ndarray, geometry: Geometry) -> None:
    """Compile (or load from cache) this module's kernels for ``frame``'s dtype."""
    from ..background import prepare_frame, radial_stats
    from ..spotfinding import find_peaks

    arr, _, lo, hi = prepare_frame(frame, geometry=geometry)
    stats = radial_stats(arr, geometry=geometry)
    peaks = find_peaks(arr, geometry=geometry, stats=stats)
    ring_profile(arr, geometry, stats, peaks=peaks, lo_valid=lo, hi_valid=hi)
    sampled_profile(arr, stats, lo_valid=lo, hi_valid=hi)
