"""Bragg-peak finding: threshold, label, measure and filter as separate steps.

The steps follow DIALS spot finding and can be called (and tested) alone:

1. :func:`threshold_pixels` - seed pixels. A pixel is a seed when it is above
   the *grow* threshold ``mean + grow_sigma * sigma`` of its background and the
   background-subtracted sum over its 3x3 neighbourhood is significant at
   ``seed_sigma`` (a cheap matched filter: spots spread over several pixels, so
   the sum beats a single-pixel test at the same false-alarm rate). Both
   thresholds carry a Cornish-Fisher term ``(k**2 - 1) / 6`` for the skew of
   Poisson counts, which matters at the low backgrounds of photon counters.
2. :func:`label_regions` - 8-connected regions grown from the seeds over pixels
   above the grow threshold. Masked pixels (and so module gaps) are never part
   of a region, so regions never cross them.
3. :func:`measure_regions` - per region: centroid, background-subtracted
   intensity with a local background ring, its sigma and SNR, peak value.
4. :func:`filter_peaks` - size, SNR, resolution and hot-pixel cuts.

:func:`find_peaks` runs all four with defaults that work on simulated EIGER
frames and real PILATUS frames alike. Coordinates follow :mod:`edge.geometry`:
``x`` is the column and ``y`` the row, pixel centres at integer coordinates.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from .background import (
    RadialStats,
    _combined_valid,
    _nchunks,
    local_stats,
    prepare_frame,
    radial_stats,
)
from .geometry import Geometry

__all__ = [
    "Peaks",
    "Regions",
    "Thresholds",
    "find_peaks",
    "threshold_pixels",
    "label_regions",
    "measure_regions",
    "filter_peaks",
    "thresholds_from_radial",
]

_BIG = 1.0e300


# ---------------------------------------------------------------------------
# Data containers
# ---------------------------------------------------------------------------
@dataclass
class Peaks:
    """Found peaks as parallel 1-D arrays (one entry per peak).

    Attributes
    ----------
    x, y : float64
        Intensity-weighted centroid: column and row, pixel centres at integers.
    intensity : float64
        Background-subtracted summed intensity (counts).
    sigma : float64
        Standard error of ``intensity`` (Poisson signal + background noise).
    snr : float64
        ``intensity / sigma``.
    npix : int32
        Pixels in the peak region.
    max_value : float64
        Highest raw pixel value in the region.
    background : float64
        Local background per pixel under the peak (counts).
    d : float64
        Resolution at the centroid in Angstrom (NaN without geometry).
    saturated : bool
        Region contains a pixel at or above the saturation count.
    n_candidates : int
        Regions before filtering (diagnostic).
    truncated : bool
        True if the candidate buffer overflowed (a pathological frame); peaks
        are then found only among the first candidates.
    """

    x: np.ndarray
    y: np.ndarray
    intensity: np.ndarray
    sigma: np.ndarray
    snr: np.ndarray
    npix: np.ndarray
    max_value: np.ndarray
    background: np.ndarray
    d: np.ndarray
    saturated: np.ndarray
    n_candidates: int = 0
    truncated: bool = False

    ARRAY_FIELDS = ("x", "y", "intensity", "sigma", "snr", "npix", "max_value", "background", "d", "saturated")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, sel) -> "Peaks":
        """Select peaks with a boolean mask, index array or slice."""
        return Peaks(**{f: np.atleast_1d(getattr(self, f)[sel]) for f in self.ARRAY_FIELDS},
                     n_candidates=self.n_candidates, truncated=self.truncated)

    def to_dict(self) -> dict[str, list]:
        """Plain lists per field (JSON-serialisable)."""
        return {f: getattr(self, f).tolist() for f in self.ARRAY_FIELDS}

    @classmethod
    def empty(cls) -> "Peaks":
        z = np.zeros(0)
        return cls(z, z, z, z, z, np.zeros(0, np.int32), z, z, z, np.zeros(0, bool))


@dataclass(frozen=True)
class Thresholds:
    """Per-background-cell thresholds used by the kernels.

    ``index`` maps each pixel to a cell (a radial ring, or the pixel itself for
    the local method); cells ``>= len(mean)`` are masked.
    """

    index: np.ndarray
    mean: np.ndarray  # float64 background mean per cell
    var: np.ndarray  # float64 background variance per cell
    grow: np.ndarray  # float64 grow threshold per cell (+inf = never)
    peak: np.ndarray  # float64 threshold a seed pixel itself must exceed
    seed_sigma: float
    seed_skew: float


@dataclass(frozen=True)
class Regions:
    """Connected regions as CSR lists of flat pixel indices (``row * ncols + col``)."""

    ptr: np.ndarray  # int64, (n + 1,)
    pixels: np.ndarray  # int64
    truncated: bool = False

    def __len__(self) -> int:
        return int(self.ptr.shape[0] - 1)


# ---------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------
@njit(parallel=True, cache=True, nogil=True)
def _seed_kernel(frame, index, mean, var, peak, seed_sigma, seed_skew, lo_valid, hi_valid, cap, nchunks,
                 ipeak, ihi):
    """Seeds (see :func:`threshold_pixels`). ``ipeak`` (int64, indexed by the
    raw cell index, masked cells = int64 max) and ``ihi`` give pass 1 an
    integer-only test for raw integer frames (about twice as fast as the float
    test); an empty ``ipeak`` selects the float test.

    ``cap`` seeds at most are kept from each half of the rows (the first in
    row order), whatever the number of chunks (an even number: the middle
    chunk boundary is then the half boundary), so the result does not depend
    on the thread count."""
    ny, nx = frame.shape
    ncell = mean.shape[0]
    use_int = ipeak.shape[0] > 0
    seeds = np.empty((nchunks, cap), dtype=np.int64)
    counts = np.empty(nchunks, dtype=np.int64)  # seeds found (also beyond cap)
    for c in prange(nchunks):  # the only parallel region (see background._zero)
        k = 0
        cols = np.empty(nx, dtype=np.int64)
        for i in range(c * ny // nchunks, (c + 1) * ny // nchunks):
            # Pass 1, branch-free so it stays cheap on every pixel: compact the
            # columns above the peak threshold (a masked cell reads the last
            # threshold and is then rejected by the cell test).
            m = 0
            if use_int:
                for j in range(nx):
                    v = np.int64(frame[i, j])
                    cols[m] = j
                    m += (v > ipeak[index[i, j]]) & (v <= ihi)
            else:
                for j in range(nx):
                    b = np.int64(index[i, j])
                    v = frame[i, j]
                    cols[m] = j
                    m += (v > peak[min(b, ncell - 1)]) & (b < ncell) & (v <= hi_valid)
            # Pass 2, sparse: significance of the 3x3 background-subtracted sum.
            for t in range(m):
                j = cols[t]
                s = 0.0
                sv = 0.0
                for ii in range(max(i - 1, 0), min(i + 2, ny)):
                    for jj in range(max(j - 1, 0), min(j + 2, nx)):
                        bb = np.int64(index[ii, jj])
                        if bb < ncell:
                            w = np.float64(frame[ii, jj])
                            if w >= lo_valid and w <= hi_valid:
                                s += w - mean[bb]
                                sv += var[bb]
                if s > seed_sigma * np.sqrt(sv) + seed_skew:
                    if k < cap:
                        seeds[c, k] = i * nx + j
                    k += 1
        counts[c] = k
    half = nchunks // 2
    total = 0
    overflow = False
    for h in range(2):
        found = 0
        for c in range(h * half, (h + 1) * half):
            found += counts[c]
        total += min(found, cap)
        overflow = overflow or found > cap
    out = np.empty(total, dtype=np.int64)
    p = 0
    for h in range(2):
        left = cap
        for c in range(h * half, (h + 1) * half):
            for k in range(min(counts[c], cap, left)):
                out[p] = seeds[c, k]
                p += 1
            left -= min(counts[c], cap, left)
    return out, overflow


@njit(cache=True, nogil=True)
def _label_kernel(frame, index, grow, hi_valid, seeds, marks, capacity):
    """Grow 8-connected regions from seeds; marks[p] = 1 for region pixels.

    The region pixel list doubles as the BFS queue. ``marks`` must be zero on
    entry; the caller clears the pixels listed in the result afterwards.
    """
    ny, nx = frame.shape
    ncell = grow.shape[0]
    pixels = np.empty(capacity, dtype=np.int64)
    ptr = np.empty(seeds.shape[0] + 1, dtype=np.int64)
    ptr[0] = 0
    nreg = 0
    n = 0
    truncated = False
    flat_marks = marks.reshape(-1)
    for s in seeds:
        if flat_marks[s] != 0:
            continue
        if n >= capacity:
            truncated = True
            break
        start = n
        flat_marks[s] = 1
        pixels[n] = s
        n += 1
        head = start
        while head < n:
            p = pixels[head]
            head += 1
            i = p // nx
            j = p - i * nx
            for ii in range(max(i - 1, 0), min(i + 2, ny)):
                for jj in range(max(j - 1, 0), min(j + 2, nx)):
                    q = ii * nx + jj
                    if flat_marks[q] != 0:
                        continue
                    b = np.int64(index[ii, jj])
                    if b >= ncell:
                        continue
                    v = np.float64(frame[ii, jj])
                    if v > grow[b] and v <= hi_valid:
                        if n >= capacity:
                            truncated = True
                            continue
                        flat_marks[q] = 1
                        pixels[n] = q
                        n += 1
        nreg += 1
        ptr[nreg] = n
    return ptr[: nreg + 1].copy(), pixels[:n].copy(), truncated


@njit(cache=True, nogil=True)
def _measure_kernel(frame, index, mean, var, lo_valid, hi_valid, ptr, pixels, marks, ring_inner, ring_outer,
                    min_ring, saturation):
    """Centroid, intensity, sigma and local background of each region.

    The background is the mean of valid, unmarked pixels in a square ring
    ``ring_inner..ring_outer`` pixels outside the region's bounding box, or the
    background model's mean when fewer than ``min_ring`` such pixels exist.
    """
    ny, nx = frame.shape
    ncell = mean.shape[0]
    nreg = ptr.shape[0] - 1
    flat_marks = marks.reshape(-1)
    out = np.empty((nreg, 9), dtype=np.float64)
    for r in range(nreg):
        a = ptr[r]
        e = ptr[r + 1]
        y0 = ny
        y1 = -1
        x0 = nx
        x1 = -1
        vmax = -_BIG
        pmax = pixels[a]
        for k in range(a, e):
            p = pixels[k]
            i = p // nx
            j = p - i * nx
            y0 = min(y0, i)
            y1 = max(y1, i)
            x0 = min(x0, j)
            x1 = max(x1, j)
            v = np.float64(frame[i, j])
            if v > vmax:
                vmax = v
                pmax = p
        # local background ring
        rs = 0.0
        rn = 0.0
        for i in range(max(y0 - ring_outer, 0), min(y1 + ring_outer + 1, ny)):
            di = max(y0 - i, i - y1)
            for j in range(max(x0 - ring_outer, 0), min(x1 + ring_outer + 1, nx)):
                dj = max(x0 - j, j - x1)
                if max(di, dj) < ring_inner:
                    continue
                if flat_marks[i * nx + j] != 0:
                    continue
                b = np.int64(index[i, j])
                if b >= ncell:
                    continue
                w = np.float64(frame[i, j])
                if w >= lo_valid and w <= hi_valid:
                    rs += w
                    rn += 1.0
        cmax = np.int64(index[pmax // nx, pmax % nx])
        model_bg = mean[cmax]
        bvar = var[cmax]
        bg = rs / rn if rn >= min_ring else model_bg
        if bvar < model_bg:  # Poisson floor for counting detectors
            bvar = model_bg
        si = 0.0
        sx = 0.0
        sy = 0.0
        sw = 0.0
        sat = 0.0
        for k in range(a, e):
            p = pixels[k]
            i = p // nx
            j = p - i * nx
            v = np.float64(frame[i, j])
            d = v - bg
            si += d
            if d > 0.0:
                sx += d * j
                sy += d * i
                sw += d
            if v >= saturation:
                sat = 1.0
        npix = np.float64(e - a)
        varI = max(si, 0.0) + npix * bvar
        if rn >= min_ring:
            varI += npix * npix * bvar / rn
        out[r, 0] = sx / sw if sw > 0.0 else 0.5 * (x0 + x1)
        out[r, 1] = sy / sw if sw > 0.0 else 0.5 * (y0 + y1)
        out[r, 2] = si
        out[r, 3] = np.sqrt(varI) if varI > 0.0 else 0.0
        out[r, 4] = npix
        out[r, 5] = vmax
        out[r, 6] = bg
        out[r, 7] = sat
        out[r, 8] = vmax - bg
    return out


@njit(cache=True, nogil=True)
def _set_marks(marks, pixels, value):
    flat = marks.reshape(-1)
    for p in pixels:
        flat[p] = value


# Zeroed scratch map per (thread, frame shape): regions mark pixels in it and
# clear exactly those pixels afterwards, so no per-frame full-size allocation.
_scratch = threading.local()


def _marks_for(shape: tuple[int, int]) -> np.ndarray:
    cache = getattr(_scratch, "maps", None)
    if cache is None:
        cache = _scratch.maps = {}
    m = cache.get(shape)
    if m is None:
        if len(cache) >= 4:
            cache.clear()
        m = cache[shape] = np.zeros(shape, dtype=np.uint8)
    return m


# ---------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------
def _skew(k: float, poisson: bool) -> float:
    return (k * k - 1.0) / 6.0 if poisson and k > 1.0 else 0.0


def thresholds_from_radial(stats: RadialStats, *, seed_sigma: float = 5.0, grow_sigma: float = 2.0,
                           peak_sigma: float = 3.0, poisson: bool = True) -> Thresholds:
    """Kernel thresholds from per-ring background statistics.

    With ``poisson`` the variance is floored at the mean (counting statistics).
    """
    mean = np.nan_to_num(stats.mean.astype(np.float64), nan=_BIG)
    var = np.nan_to_num(stats.sigma.astype(np.float64) ** 2, nan=0.0)
    if poisson:
        var = np.maximum(var, np.maximum(mean, 0.0))
    return _thresholds(stats.bins.index, mean, var, seed_sigma, grow_sigma, peak_sigma, poisson)


def _thresholds(index, mean, var, seed_sigma, grow_sigma, peak_sigma, poisson) -> Thresholds:
    sd = np.sqrt(var)
    grow = mean + grow_sigma * sd + _skew(grow_sigma, poisson)
    peak = mean + max(peak_sigma, grow_sigma) * sd + _skew(max(peak_sigma, grow_sigma), poisson)
    return Thresholds(index, mean, var, grow, peak, float(seed_sigma), _skew(seed_sigma, poisson))


def _thresholds_from_maps(mean_map, var_map, valid, *, seed_sigma, grow_sigma, peak_sigma, poisson) -> Thresholds:
    ny, nx = mean_map.shape
    ok = valid & np.isfinite(mean_map) & np.isfinite(var_map)
    size = ny * nx
    index = np.where(ok, np.arange(size, dtype=np.int64).reshape(ny, nx), size)
    mean = np.where(ok, mean_map, _BIG).astype(np.float64).ravel()
    var = np.where(ok, var_map, 0.0).astype(np.float64).ravel()
    if poisson:
        var = np.maximum(var, np.maximum(mean, 0.0))
    return _thresholds(index, mean, var, seed_sigma, grow_sigma, peak_sigma, poisson)


def threshold_pixels(frame: np.ndarray, thresholds: Thresholds, *, lo_valid: float = 0.0,
                     hi_valid: float = _BIG, max_candidates: int = 1 << 18) -> tuple[np.ndarray, bool]:
    """Seed pixels (flat indices, row-major) and whether the buffer overflowed.

    At most ``max_candidates // 2`` seeds per half of the rows (the first in
    row order), independent of the Numba thread count."""
    nch = _nchunks()  # even
    cap = max(1, int(max_candidates) // 2)
    ipeak, ihi = _integer_peak_table(frame, thresholds, lo_valid, hi_valid)
    return _seed_kernel(frame, thresholds.index, thresholds.mean, thresholds.var, thresholds.peak,
                        thresholds.seed_sigma, thresholds.seed_skew, float(lo_valid), float(hi_valid), cap, nch,
                        ipeak, ihi)


_NO_TABLE = np.zeros(0, dtype=np.int64)
_I64_MAX = np.iinfo(np.int64).max


def _integer_peak_table(frame, thresholds: Thresholds, lo_valid: float, hi_valid: float):
    """Per raw cell index, the largest integer count that does *not* pass the
    peak threshold (``v > peak`` <=> ``v > floor(peak)`` for integer ``v``);
    masked cells and non-finite thresholds never pass. Only for raw integer
    frames with a ring index (uint16) and gaps marked by negative values or
    the dtype maximum; otherwise an empty table (float test)."""
    if (frame.dtype.kind not in "iu" or frame.dtype.itemsize > 4 or lo_valid != 0.0
            or thresholds.index.dtype != np.uint16):
        return _NO_TABLE, 0
    peak = np.asarray(thresholds.peak, dtype=np.float64)
    table = np.full(1 << 16, _I64_MAX, dtype=np.int64)
    ok = np.isfinite(peak) & (peak < 2.0**62)
    table[: len(peak)][ok] = np.floor(peak[ok]).astype(np.int64)
    ihi = _I64_MAX if hi_valid >= 2.0**62 else int(math.floor(hi_valid))
    return table, ihi


def label_regions(frame: np.ndarray, thresholds: Thresholds, seeds: np.ndarray, *,
                  hi_valid: float = _BIG, max_pixels: int = 1 << 21) -> Regions:
    """8-connected regions grown from ``seeds`` over pixels above the grow threshold."""
    marks = _marks_for(frame.shape)
    ptr, pixels, truncated = _label_kernel(frame, thresholds.index, thresholds.grow, float(hi_valid),
                                           np.ascontiguousarray(seeds, dtype=np.int64), marks,
                                           int(min(max_pixels, frame.size)))
    _set_marks(marks, pixels, 0)
    return Regions(ptr, pixels, bool(truncated))


def measure_regions(frame: np.ndarray, thresholds: Thresholds, regions: Regions, *,
                    lo_valid: float = 0.0, hi_valid: float = _BIG, ring: tuple[int, int] = (2, 4), min_ring: int = 6,
                    saturation: float | None = None) -> np.ndarray:
    """Per-region measurements as an (n, 9) float64 array.

    Columns: x, y, intensity, sigma, npix, max_value, background, saturated,
    peak height above background.
    """
    marks = _marks_for(frame.shape)
    _set_marks(marks, regions.pixels, 1)
    try:
        return _measure_kernel(frame, thresholds.index, thresholds.mean, thresholds.var, float(lo_valid), float(hi_valid),
                               regions.ptr, regions.pixels, marks, int(ring[0]), int(ring[1]),
                               float(min_ring), float(saturation) if saturation is not None else np.inf)
    finally:
        _set_marks(marks, regions.pixels, 0)


def filter_peaks(measured: np.ndarray, *, geometry: Geometry | None = None, min_pix: int = 2,
                 max_pix: int = 400, min_snr: float = 0.0, hot_pixel_fraction: float = 0.9,
                 d_min: float | None = None, d_max: float | None = None,
                 n_candidates: int | None = None, truncated: bool = False) -> Peaks:
    """Apply peak-level cuts to :func:`measure_regions` output.

    Parameters
    ----------
    min_pix, max_pix : int
        Region size limits in pixels.
    min_snr : float
        Minimum integrated ``intensity / sigma``.
    hot_pixel_fraction : float
        Reject a region whose brightest pixel carries more than this fraction
        of its background-subtracted intensity: an isolated hot pixel or
        zinger, not a Bragg spot (even a sharp spot spreads over neighbours).
        Regions with a saturated pixel are exempt.
    d_min, d_max : float, optional
        Resolution limits in Angstrom (need ``geometry``): keep
        ``d_min <= d <= d_max``.
    """
    if (d_min is not None or d_max is not None) and geometry is None:
        raise ValueError("resolution limits d_min/d_max need a geometry")
    m = measured
    x, y, inten, sig, npix, vmax, bg, sat, height = (m[:, k] for k in range(9))
    keep = (npix >= min_pix) & (npix <= max_pix) & (inten > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = np.where(sig > 0, inten / sig, 0.0)
        keep &= snr >= min_snr
        keep &= (height <= hot_pixel_fraction * inten) | (sat > 0)
    if geometry is not None:
        bx, by = geometry.beam_center
        d = geometry.d_spacing(np.hypot(x - bx, y - by))
        if d_min is not None:
            keep &= d >= d_min
        if d_max is not None:
            keep &= d <= d_max
    else:
        d = np.full(len(x), np.nan)
    return Peaks(x[keep], y[keep], inten[keep], sig[keep], snr[keep], npix[keep].astype(np.int32),
                 vmax[keep], bg[keep], d[keep], sat[keep] > 0,
                 n_candidates=int(len(x) if n_candidates is None else n_candidates), truncated=truncated)


# ---------------------------------------------------------------------------
# One call
# ---------------------------------------------------------------------------
def find_peaks(frame, mask=None, *, center=None, geometry: Geometry | None = None,
               method: str = "radial", dark=None, stats: RadialStats | None = None,
               seed_sigma: float = 5.0, grow_sigma: float = 2.0, peak_sigma: float = 3.0, poisson: bool = True,
               min_pix: int = 2, max_pix: int = 400, min_snr: float = 3.0,
               hot_pixel_fraction: float = 0.9, d_min: float | None = None, d_max: float | None = None,
               ring: tuple[int, int] = (2, 4), saturation: float | None = None,
               max_candidates: int = 1 << 18, **background_params) -> Peaks:
    """Find Bragg peaks in one frame.

    Parameters
    ----------
    frame : ndarray, shape (rows, columns)
        Any integer or float dtype. Negative values (detector gap/bad-pixel
        markers), NaN and inf are treated as masked.
    mask : ndarray of bool, optional
        True = valid pixel; combined with ``geometry.mask``.
    center : (float, float), optional
        Beam centre ``(x, y)`` in pixels. Default: ``geometry.beam_center``,
        else the frame centre.
    geometry : Geometry, optional
        Beam centre, static mask, saturation and resolution per pixel.
    method : {"radial", "local"}
        Background model (see :mod:`edge.background`).
    dark : ndarray, optional
        Per-pixel dark/pedestal subtracted first.
    stats : RadialStats, optional
        Precomputed radial statistics of this frame (skips that step).
    seed_sigma : float
        Significance of the 3x3 background-subtracted sum for a seed.
    grow_sigma : float
        Per-pixel threshold (in background sigmas) for region growth.
    peak_sigma : float
        Per-pixel threshold a seed pixel itself must pass (a cheap prefilter
        before the 3x3 test; the brightest pixel of any real spot passes it).
    poisson : bool
        Counting statistics: floor the variance at the mean and add the skew
        term. Turn off for frames in arbitrary units.
    min_pix, max_pix : int
        Region size limits in pixels.
    min_snr : float
        Minimum integrated signal-to-noise ratio.
    hot_pixel_fraction : float
        See :func:`filter_peaks`.
    d_min, d_max : float, optional
        Resolution limits in Angstrom (need ``geometry``).
    ring : (int, int)
        Inner and outer distance in pixels of the local background ring
        around each region's bounding box.
    saturation : float, optional
        Overload count; default ``geometry.saturation``.
    max_candidates : int
        Seed buffer size; ``Peaks.truncated`` reports an overflow.
    **background_params
        Passed to :func:`edge.radial_stats` or :func:`edge.local_stats`.

    Returns
    -------
    Peaks

    Raises
    ------
    ValueError
        Wrong ndim, unsupported dtype, mask/geometry/dark shape mismatch,
        resolution limits without geometry, unknown method.
    """
    if (d_min is not None or d_max is not None) and geometry is None:
        raise ValueError("resolution limits d_min/d_max need a geometry")
    if seed_sigma <= 0 or grow_sigma < 0:
        raise ValueError("seed_sigma must be > 0 and grow_sigma >= 0")
    prepared = prepare_frame(frame, mask, dark=dark, geometry=geometry)
    arr, msk, lo_valid, hi_valid = prepared
    if saturation is None and geometry is not None:
        saturation = geometry.saturation
    if method == "radial":
        if stats is None:
            stats = radial_stats(arr, center=center, geometry=geometry, _prepared=prepared, **background_params)
        elif stats.bins.index.shape != arr.shape:
            raise ValueError("stats were computed for a different frame shape")
        th = thresholds_from_radial(stats, seed_sigma=seed_sigma, grow_sigma=grow_sigma, peak_sigma=peak_sigma,
                                    poisson=poisson)
    elif method == "local":
        mean_map, var_map = local_stats(arr, geometry=geometry, _prepared=prepared, **background_params)
        valid = _combined_valid(arr.shape, msk, geometry)
        th = _thresholds_from_maps(mean_map, var_map, valid, seed_sigma=seed_sigma,
                                   grow_sigma=grow_sigma, peak_sigma=peak_sigma, poisson=poisson)
    else:
        raise ValueError(f"unknown background method {method!r}; use 'radial' or 'local'")
    seeds, overflow = threshold_pixels(arr, th, lo_valid=lo_valid, hi_valid=hi_valid,
                                      max_candidates=max_candidates)
    if len(seeds) == 0:
        return Peaks.empty()
    regions = label_regions(arr, th, seeds, hi_valid=hi_valid)
    measured = measure_regions(arr, th, regions, lo_valid=lo_valid, hi_valid=hi_valid, ring=ring,
                               saturation=saturation)
    return filter_peaks(measured, geometry=geometry, min_pix=min_pix, max_pix=max_pix, min_snr=min_snr,
                        hot_pixel_fraction=hot_pixel_fraction, d_min=d_min, d_max=d_max,
                        n_candidates=len(regions), truncated=bool(overflow) or regions.truncated)
