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
profile does not. The full profile is summed per azimuthal sector, so it can
be re-centred on the ring centre that fits the ice lines best
(:func:`centred_ring_profile`): a beam a few px off the believed centre
smears a sharp ring in the plain azimuthal profile.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from ..background import RadialStats
from ..geometry import Geometry
from ..sim import ICE_D_SPACINGS

__all__ = ["ICE_LINES_A", "ice_verdict", "warmup", "RING_Z_MIN", "RING_CONTRAST_MIN", "poisson_cap", "ring_profile",
           "ring_sector_sums", "centred_ring_profile", "sampled_profile", "ice_ring_evidence"]

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
#: Azimuthal sectors of the full-resolution profile (11.25 degrees each): a
#: ring around a beam d px off the believed centre is smeared by only
#: ~0.1 d within a sector, so re-centring the sectors recovers it.
RING_SECTORS = 32
#: The ring centre is searched within this many px of the believed beam
#: centre (normal frames: the beam within ~10 px of it; larger offsets are
#: ``beam_off_center``, found by other evidence) ...
CENTRE_SEARCH_PX = 12
#: ... on a grid of this step (px), then on a 1 px grid +-2 px around the best point.
CENTRE_STEP_PX = 2
#: A re-centred profile replaces the believed centre's only when its summed
#: z of the three strongest lines (over sqrt 3) is higher by at least this
#: (the search tries ~180 centres: noise alone gains ~1.5).
CENTRE_MIN_GAIN = 2.0
#: ... and reaches this score itself (noise alone stays below ~3.5).
CENTRE_MIN_SCORE = 5.0


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
            m = w + _GAP_PX + f + 1.0 + CENTRE_SEARCH_PX + 1.0  # flanks of a re-centred ring
            out.append((r - m, r + m))
    return out


def _band_table(geometry: Geometry, stats: RadialStats) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int, int]:
    """Flat pixel indices, ring numbers and azimuthal sectors of the ice-band
    pixels, valid pixels per ring, and the span ``b0, nb`` of rings the
    bands cover (cached per geometry)."""
    key = ("ice_evidence_bands", stats.bins.nbins, stats.bins.width, geometry.beam_center, RING_SECTORS)
    tab = geometry._cache.get(key)
    if tab is None:
        width = stats.bins.width
        keep = np.zeros(stats.bins.nbins + 1, dtype=bool)
        for lo, hi in _band_reach(geometry):
            keep[int(max(lo / width, 0)):int(max(min(hi / width + 1, stats.bins.nbins), 0))] = True
        idx = stats.bins.index.ravel()
        flat = np.flatnonzero(keep[np.minimum(idx, stats.bins.nbins)])
        ring = idx[flat].astype(np.int32)
        n_pix = np.bincount(ring, minlength=stats.bins.nbins).astype(np.float64)
        bx, by = geometry.beam_center
        sect = _sectors_of(flat, int(geometry.shape[1]), float(bx), float(by), RING_SECTORS)
        used = np.flatnonzero(keep[: stats.bins.nbins])
        b0, nb = (int(used[0]), int(used[-1] - used[0] + 1)) if len(used) else (0, 0)
        tab = (flat, ring, sect, n_pix, b0, nb)
        geometry._cache[key] = tab
    return tab


@njit(cache=True, nogil=True, inline="always")
def _sector_of(dx, dy, nsect):
    """Azimuthal sector 0..nsect-1 of direction (dx, dy): equal angles from -pi (the -x axis) counter-clockwise."""
    k = int((math.atan2(dy, dx) + math.pi) * (nsect / (2.0 * math.pi)))
    return min(max(k, 0), nsect - 1)


@njit(cache=True, nogil=True)
def _sectors_of(flat, nx, bx, by, nsect):
    """Sector (uint8) of each listed pixel (flat index ``i * nx + j``) around (bx, by)."""
    out = np.empty(flat.shape[0], dtype=np.uint8)
    for k in range(flat.shape[0]):
        i = flat[k] // nx
        j = flat[k] - i * nx
        out[k] = _sector_of(j - bx, i - by, nsect)
    return out


@njit(cache=True, nogil=True)
def _capped_sector_sums(frame_flat, flat, ring, sect, cap, lo_valid, hi_valid, b0, nb, nsect):
    """Per (sector, ring ``b0 + k``) sums of ``min(value, cap[ring])`` and
    valid-pixel counts over the listed pixels; shape (nsect, nb) each."""
    s = np.zeros((nsect, nb), dtype=np.float64)
    c = np.zeros((nsect, nb), dtype=np.float64)
    for k in range(flat.shape[0]):
        v = np.float64(frame_flat[flat[k]])
        b = ring[k] - b0
        if b < 0 or b >= nb or not (v >= lo_valid and v <= hi_valid):
            continue
        q = sect[k]
        s[q, b] += min(v, cap[ring[k]])
        c[q, b] += 1.0
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


def ring_sector_sums(frame: np.ndarray, geometry: Geometry, stats: RadialStats, *, peaks=None,
                     lo_valid: float = 0.0, hi_valid: float = 1.0e300) -> tuple[np.ndarray, np.ndarray, int]:
    """Full-resolution capped sums over the ice bands, per azimuthal sector and ring.

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
    sums, counts : ndarray of float64, shape (RING_SECTORS, nb)
        Summed counts (each pixel capped, :func:`poisson_cap`) and valid
        pixels per sector (:data:`RING_SECTORS` equal angles counter-clockwise
        from the -x axis around the believed beam centre) and ring ``b0 + k``.
    b0 : int
        First ring of the span the bands cover.
    """
    flat, ring, sect, n_pix, b0, nb = _band_table(geometry, stats)
    cap = poisson_cap(stats)
    fr = np.ascontiguousarray(frame).reshape(-1)
    s, c = _capped_sector_sums(fr, flat, ring, sect, cap, float(lo_valid), float(hi_valid), b0, nb, RING_SECTORS)
    if peaks is not None and len(peaks) and nb:
        x, y, rad = _peak_discs(peaks, geometry)
        if len(x):
            nbins = int(stats.bins.nbins)
            inband = n_pix[:nbins] > 0  # only rings the band sums cover
            o = np.argsort(x, kind="stable")
            bx, by = geometry.beam_center
            s2, c2 = _disc_sums(frame, stats.bins.index, np.ascontiguousarray(x[o]), np.ascontiguousarray(y[o]),
                                np.ascontiguousarray(rad[o]), cap, inband, float(lo_valid), float(hi_valid),
                                b0, nb, float(bx), float(by), RING_SECTORS)
            s -= s2
            c -= c2
    return s, c, b0


def _full_profile(s: np.ndarray, c: np.ndarray, b0: int, nbins: int) -> tuple[np.ndarray, np.ndarray]:
    fs = np.zeros(nbins, dtype=np.float64)
    fc = np.zeros(nbins, dtype=np.float64)
    fs[b0 : b0 + len(s)] = s
    fc[b0 : b0 + len(c)] = c
    return _means(fs, fc)


def ring_profile(frame: np.ndarray, geometry: Geometry, stats: RadialStats, *, peaks=None,
                 lo_valid: float = 0.0, hi_valid: float = 1.0e300) -> tuple[np.ndarray, np.ndarray]:
    """Full-resolution ring-mean profile over the ice bands only, around the believed beam centre.

    Parameters as :func:`ring_sector_sums`.

    Returns
    -------
    mean, count : ndarray of float64, shape (nbins,)
        Mean counts per pixel (each pixel capped, :func:`poisson_cap`) and
        valid pixels per ring; 0 outside the ice bands.
    """
    s, c, b0 = ring_sector_sums(frame, geometry, stats, peaks=peaks, lo_valid=lo_valid, hi_valid=hi_valid)
    return _full_profile(s.sum(axis=0), c.sum(axis=0), b0, int(stats.bins.nbins))


def centred_ring_profile(frame: np.ndarray, geometry: Geometry, stats: RadialStats, *, peaks=None,
                         lo_valid: float = 0.0, hi_valid: float = 1.0e300,
                         search_px: float = CENTRE_SEARCH_PX) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """:func:`ring_profile` around the ring centre that best fits the ice lines.

    A beam a few px off the believed centre smears every ring in the
    azimuthal profile over +-offset px, so a sharp faint ring disappears. The
    sector profiles (:func:`ring_sector_sums`) are shifted by the offset's
    projection on each sector's direction and summed, for offsets on a grid
    within ``search_px`` of the believed centre (step
    :data:`CENTRE_STEP_PX`, then a 1 px grid +-2 px around the best point); the offset
    whose three strongest ice lines have the largest summed Poisson z wins
    if it beats the believed centre by :data:`CENTRE_MIN_GAIN` and reaches
    :data:`CENTRE_MIN_SCORE` (the search tries ~180 centres, and noise alone
    would pick one).

    Returns
    -------
    mean, count : ndarray of float64, shape (nbins,)
        As :func:`ring_profile`, around the chosen centre.
    offset : (dx, dy)
        Chosen ring centre minus believed beam centre (px; (0, 0) when the
        believed centre is kept).
    """
    s, c, b0 = ring_sector_sums(frame, geometry, stats, peaks=peaks, lo_valid=lo_valid, hi_valid=hi_valid)
    nbins = int(stats.bins.nbins)
    width = float(stats.bins.width)
    lines = np.asarray(geometry.radius_for_d(STRONG_LINES_A), dtype=np.float64)
    lines = lines[np.isfinite(lines)]
    if not s.shape[1] or not len(lines) or search_px <= 0:
        return (*_full_profile(s.sum(axis=0), c.sum(axis=0), b0, nbins), (0.0, 0.0))
    win = np.array([_windows(r) for r in lines], dtype=np.float64)
    ox, oy = _centre_search(s, c, float(b0), width, lines, win[:, 0], win[:, 1], _GAP_PX, float(search_px),
                            float(CENTRE_STEP_PX), float(CENTRE_MIN_GAIN), float(CENTRE_MIN_SCORE))
    ss, cc = _shifted_sum(s, c, b0, width, ox, oy)
    return (*_full_profile(ss, cc, b0, nbins), (float(ox), float(oy)))


@njit(cache=True, nogil=True, inline="always")
def _shift_bins(ox, oy, q, nsect, width):
    """Ring-number shift of sector ``q`` for a ring centre offset (ox, oy) px."""
    th = -math.pi + (q + 0.5) * (2.0 * math.pi / nsect)
    return int(round((ox * math.cos(th) + oy * math.sin(th)) / width))


@njit(cache=True, nogil=True)
def _shifted_sum(s, c, b0, width, ox, oy):
    """Sector sums re-centred on (ox, oy): ring k of the result sums ring
    ``k + shift(q)`` of every sector q (rings outside the span add nothing)."""
    nsect, nb = s.shape
    os_ = np.zeros(nb, dtype=np.float64)
    oc = np.zeros(nb, dtype=np.float64)
    for q in range(nsect):
        t = _shift_bins(ox, oy, q, nsect, width)
        for k in range(max(0, -t), min(nb, nb - t)):
            os_[k] += s[q, k + t]
            oc[k] += c[q, k + t]
    return os_, oc


@njit(cache=True, nogil=True)
def _lines_score(cs, cc, shifts, b0, width, lines, half, flank, gap):
    """Summed Poisson z / sqrt(lines) of the ring windows over flat flanks for one set of sector shifts."""
    nsect, nb1 = cs.shape
    tot = 0.0
    nl = 0
    for k in range(lines.shape[0]):
        r = lines[k] / width - b0  # ring number in the span, fractional
        w = half[k] / width
        g = gap / width
        f = flank[k] / width
        # windows as [lo, hi) in ring numbers: window, inner and outer flank
        edges = (int(math.ceil(r - w - 0.5)), int(math.floor(r + w - 0.5)) + 1,
                 int(math.ceil(r - w - g - f - 0.5)), int(math.ceil(r - w - g - 0.5)),
                 int(math.floor(r + w + g - 0.5)) + 1, int(math.floor(r + w + g + f - 0.5)) + 1)
        sw = 0.0
        nw = 0.0
        sf = 0.0
        nf = 0.0
        for q in range(nsect):
            t = shifts[q]
            a0 = min(max(edges[0] + t, 0), nb1 - 1)
            a1 = min(max(edges[1] + t, 0), nb1 - 1)
            f0 = min(max(edges[2] + t, 0), nb1 - 1)
            f1 = min(max(edges[3] + t, 0), nb1 - 1)
            g0 = min(max(edges[4] + t, 0), nb1 - 1)
            g1 = min(max(edges[5] + t, 0), nb1 - 1)
            sw += cs[q, a1] - cs[q, a0]
            nw += cc[q, a1] - cc[q, a0]
            sf += cs[q, f1] - cs[q, f0] + cs[q, g1] - cs[q, g0]
            nf += cc[q, f1] - cc[q, f0] + cc[q, g1] - cc[q, g0]
        if nw < 8.0 or nf < 16.0:  # too few pixels to score this line (edge of the detector)
            continue
        mu = max(sf / nf, 1e-3)
        tot += (sw - nw * mu) / math.sqrt(nw * mu * (1.0 + nw / nf))
        nl += 1
    return tot / math.sqrt(nl) if nl else 0.0


@njit(cache=True, nogil=True)
def _centre_search(s, c, b0, width, lines, half, flank, gap, search, step, min_gain, min_score):
    """Ring-centre offset (px) maximising :func:`_lines_score` (see :func:`centred_ring_profile`)."""
    nsect, nb = s.shape
    cs = np.zeros((nsect, nb + 1), dtype=np.float64)
    cc = np.zeros((nsect, nb + 1), dtype=np.float64)
    for q in range(nsect):
        for k in range(nb):
            cs[q, k + 1] = cs[q, k] + s[q, k]
            cc[q, k + 1] = cc[q, k] + c[q, k]
    shifts = np.zeros(nsect, dtype=np.int64)
    base = _lines_score(cs, cc, shifts, b0, width, lines, half, flank, gap)
    best, bx, by = base, 0.0, 0.0
    n = int(search // step)
    for pass_ in range(2):
        cx, cy = bx, by
        lo, hi, st = (-n, n + 1, step) if pass_ == 0 else (-2, 3, 1.0)
        for iy in range(lo, hi):
            for ix in range(lo, hi):
                ox = cx + ix * st
                oy = cy + iy * st
                if ox * ox + oy * oy > search * search or (ix == 0 and iy == 0):
                    continue
                for q in range(nsect):
                    shifts[q] = _shift_bins(ox, oy, q, nsect, width)
                v = _lines_score(cs, cc, shifts, b0, width, lines, half, flank, gap)
                if v > best:
                    best, bx, by = v, ox, oy
    if best < base + min_gain or best < min_score:
        return 0.0, 0.0
    return bx, by


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
def _disc_sums(frame, index, xs, ys, rads, cap, inband, lo_valid, hi_valid, b0, nb, bx, by, nsect):
    """Capped sums and counts per (sector, ring ``b0 + k``) over the union of
    discs, each pixel once (sectors as :func:`_sectors_of` around (bx, by)).
    The discs come sorted by ``xs``; a pixel is counted by the first disc (in
    that order) that holds it, so overlaps are found among the neighbours in
    x without a frame-sized mask."""
    nbins = inband.shape[0]
    s = np.zeros((nsect, nb), dtype=np.float64)
    c = np.zeros((nsect, nb), dtype=np.float64)
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
                k_ = b - b0
                if k_ < 0 or k_ >= nb:
                    continue
                q_ = _sector_of(j - bx, i - by, nsect)
                s[q_, k_] += min(v, cap[b])
                c[q_, k_] += 1.0
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
    centred_ring_profile(arr, geometry, stats, peaks=peaks, lo_valid=lo, hi_valid=hi)
    sampled_profile(arr, stats, lo_valid=lo, hi_valid=hi)
