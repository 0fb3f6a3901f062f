"""Background estimation: radial sigma-clipped statistics and a local window estimate.

Two estimators, both ignoring masked pixels (mask False, negative values,
NaN and inf):

``"radial"`` (default)
    Mean and standard deviation per 1-pixel-wide ring around the beam
    centre, with iterative sigma clipping per ring (the peakfinder8 approach).
    Fast, robust to Bragg spots, and it follows ice rings and solvent rings.
``"local"``
    Mean and variance in a square window around each pixel from summed-area
    tables, after excluding pixels that the DIALS "dispersion" test marks as
    signal. Use it when the background is not radially symmetric.

The public entry points are :func:`radial_stats` (per-ring profile),
:func:`estimate_background` (per-pixel mean and sigma maps) and
:func:`subtract_background`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numba
import numpy as np
from numba import njit, prange

from ._validate import as_center, as_frame, as_mask, check_geometry
from .geometry import Geometry

__all__ = [
    "RadialBins",
    "RadialStats",
    "radial_bins",
    "radial_stats",
    "local_stats",
    "estimate_background",
    "subtract_background",
    "prepare_frame",
]

INVALID_BIN = np.uint16(0xFFFF)
_BIG = 1.0e300


# ---------------------------------------------------------------------------
# Radial binning (static per geometry)
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class RadialBins:
    """Ring index of every pixel.

    Attributes
    ----------
    index : ndarray of uint16, shape (rows, columns)
        Ring number of each pixel, ``INVALID_BIN`` (65535) where masked.
    nbins : int
        Number of rings.
    width : float
        Ring width in pixels.
    """

    index: np.ndarray
    nbins: int
    width: float

    @property
    def radius(self) -> np.ndarray:
        """Radius of each ring's centre line in pixels."""
        return (np.arange(self.nbins) + 0.5) * self.width


@functools.lru_cache(maxsize=8)
def _unmasked_bins(shape: tuple[int, int], center: tuple[float, float], width: float) -> RadialBins:
    ny, nx = shape
    y = (np.arange(ny, dtype=np.float32) - np.float32(center[1]))[:, None]
    x = (np.arange(nx, dtype=np.float32) - np.float32(center[0]))[None, :]
    r = np.sqrt(x * x + y * y) / np.float32(width)
    nbins = int(r.max()) + 1
    if nbins >= int(INVALID_BIN):
        raise ValueError(f"too many radial bins ({nbins}); increase bin_width")
    index = r.astype(np.uint16)
    index.setflags(write=False)
    return RadialBins(index, nbins, float(width))


def radial_bins(shape: tuple[int, int], *, center=None, geometry: Geometry | None = None,
                mask: np.ndarray | None = None, bin_width: float = 1.0) -> RadialBins:
    """Ring index per pixel, with masked pixels set to ``INVALID_BIN``.

    Cached: on the ``geometry`` instance when one is given (mask included),
    otherwise per (shape, centre, width) with an explicit ``mask`` folded in
    per call.
    """
    if bin_width <= 0:
        raise ValueError(f"bin_width must be > 0 pixels, got {bin_width}")
    if geometry is not None:
        center = geometry.beam_center if center is None else as_center(center, shape)
        key = ("bins", center, float(bin_width))
        bins = geometry._cache.get(key)
        if bins is None:
            base = _unmasked_bins(tuple(shape), center, float(bin_width))
            index = base.index
            if geometry.mask is not None:
                index = np.where(geometry.mask, index, INVALID_BIN).astype(np.uint16)
                index.setflags(write=False)
            bins = RadialBins(index, base.nbins, base.width)
            geometry._cache[key] = bins
    else:
        bins = _unmasked_bins(tuple(shape), as_center(center, shape), float(bin_width))
    if mask is not None:
        index = np.where(mask, bins.index, INVALID_BIN).astype(np.uint16)
        bins = RadialBins(index, bins.nbins, bins.width)
    return bins


# ---------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------
# In a ``parallel=True`` kernel every array expression (``np.zeros``, ``+=`` on
# arrays, slice assignment) becomes a parallel region of its own, and each
# region wakes the sleeping worker threads (GOMP_SPINCOUNT is short, see
# edge/__init__.py): tens to hundreds of microseconds each. The parallel
# kernels therefore allocate with ``np.empty``, zero their chunk inside the
# ``prange`` body with :func:`_zero` and merge chunks with :func:`_sum_chunks`
# (plain functions run serially): one parallel region per kernel call.
@njit(cache=True, nogil=True)
def _zero(a):
    """Set a C-contiguous array to 0 in place."""
    flat = a.reshape(-1)
    for k in range(flat.shape[0]):
        flat[k] = 0


@njit(cache=True, nogil=True)
def _sum_chunks(parts, out):
    """``out[...] = parts.sum(axis=0)`` for C-contiguous arrays, serially."""
    p = parts.reshape(parts.shape[0], -1)
    o = out.reshape(-1)
    for k in range(o.shape[0]):
        o[k] = 0
    for c in range(p.shape[0]):
        for k in range(o.shape[0]):
            o[k] += p[c, k]
    return out


@njit(parallel=True, cache=True, nogil=True)
def _ring_moments(frame, index, nbins, lo, hi, row_step, nchunks):
    """Count, sum and sum of squares per ring of pixels with lo[b] <= v <= hi[b].

    Only every ``row_step``-th row is read; rows are split into ``nchunks``
    independent accumulators so threads never share a counter. Along a row the
    ring index changes slowly, so sums stay in registers until it changes
    (a scatter-add per pixel would serialise on store-to-load forwarding).
    """
    ny, nx = frame.shape
    acc = np.empty((nchunks, 3, nbins), dtype=np.float64)
    nrows = (ny + row_step - 1) // row_step
    for c in prange(nchunks):
        r0 = c * nrows // nchunks
        r1 = (c + 1) * nrows // nchunks
        a = acc[c]
        _zero(a)
        for rr in range(r0, r1):
            i = rr * row_step
            cur = -1
            n = 0.0
            s1 = 0.0
            s2 = 0.0
            blo = 0.0
            bhi = 0.0
            for j in range(nx):
                b = np.int64(index[i, j])
                if b >= nbins:
                    continue
                if b != cur:
                    if cur >= 0:
                        a[0, cur] += n
                        a[1, cur] += s1
                        a[2, cur] += s2
                    cur = b
                    n = 0.0
                    s1 = 0.0
                    s2 = 0.0
                    blo = lo[b]
                    bhi = hi[b]
                v = np.float64(frame[i, j])
                if v >= blo and v <= bhi:
                    n += 1.0
                    s1 += v
                    s2 += v * v
            if cur >= 0:
                a[0, cur] += n
                a[1, cur] += s1
                a[2, cur] += s2
    return _sum_chunks(acc, np.empty((3, nbins), dtype=np.float64))


@njit(cache=True, nogil=True)
def _update_bounds(m, count, mean, var, lo, hi, lo_valid, hi_valid, nsigma):
    """One clipping update from moments ``m`` (count, sum, sum of squares per
    ring). Returns (pixels that changed side, pixels counted)."""
    nbins = count.shape[0]
    moved = 0.0
    total = 0.0
    for b in range(nbins):
        n = m[0, b]
        moved += abs(n - count[b])
        total += n
        count[b] = n
        if n > 0:
            mu = m[1, b] / n
            v = m[2, b] / n - mu * mu
            mean[b] = mu
            var[b] = v if v > 0.0 else 0.0
            s = np.sqrt(var[b])
            lo[b] = max(lo_valid, mu - nsigma * s)
            hi[b] = min(hi_valid, mu + nsigma * s)
    return moved, total


@njit(cache=True, nogil=True)
def _clip_iterations(frame, index, nbins, lo_valid, hi_valid, n_iter, nsigma, row_step, nchunks):
    """Iterative sigma clipping per ring, one pass over the sampled rows per
    iteration; stops once fewer than 0.1 % of the pixels change side."""
    lo = np.full(nbins, lo_valid, dtype=np.float64)
    hi = np.full(nbins, hi_valid, dtype=np.float64)
    mean = np.zeros(nbins, dtype=np.float64)
    var = np.zeros(nbins, dtype=np.float64)
    count = np.zeros(nbins, dtype=np.float64)
    for it in range(n_iter):
        m = _ring_moments(frame, index, nbins, lo, hi, row_step, nchunks)
        moved, total = _update_bounds(m, count, mean, var, lo, hi, lo_valid, hi_valid, nsigma)
        if moved <= 1.0e-3 * total:
            break
    return mean, var, count


HIST_BINS = 64


OVERFLOW_CAP = 1 << 16


@njit(parallel=True, cache=True, nogil=True)
def _ring_histogram(frame, index, nbins, hi_valid, row_step, nchunks):
    """Per-ring histogram of integer values 0..HIST_BINS-1 over the sampled
    rows, and the larger values (spots, hot pixels: few) as a ring-sorted
    sparse list.

    Returns ``hist (nbins, HIST_BINS)``, ``ptr (nbins + 1)``, ``values`` and
    ``complete``: False when more than ``OVERFLOW_CAP`` large values per
    chunk did not fit (a high-background frame: use the pixel passes).
    """
    ny, nx = frame.shape
    hist = np.empty((nchunks, nbins, HIST_BINS), dtype=np.int32)
    ob = np.empty((nchunks, OVERFLOW_CAP), dtype=np.int64)
    ov = np.empty((nchunks, OVERFLOW_CAP), dtype=np.float64)
    on = np.empty(nchunks, dtype=np.int64)
    full = np.empty(nchunks, dtype=np.bool_)
    nrows = (ny + row_step - 1) // row_step
    for c in prange(nchunks):
        h = hist[c]
        _zero(h)
        full[c] = False
        k = 0
        for rr in range(c * nrows // nchunks, (c + 1) * nrows // nchunks):
            i = rr * row_step
            for j in range(nx):
                b = np.int64(index[i, j])
                if b >= nbins:
                    continue
                v = np.int64(frame[i, j])
                if v < 0 or v > hi_valid:
                    continue
                if v < HIST_BINS:
                    h[b, v] += 1
                elif k < OVERFLOW_CAP:
                    ob[c, k] = b
                    ov[c, k] = np.float64(v)
                    k += 1
                else:
                    full[c] = True
        on[c] = k
    tot = _sum_chunks(hist, np.empty((nbins, HIST_BINS), dtype=np.int64))
    # counting sort of the large values by ring
    ptr = np.empty(nbins + 1, dtype=np.int64)
    _zero(ptr)
    for c in range(nchunks):
        for k in range(on[c]):
            ptr[ob[c, k] + 1] += 1
    for b in range(nbins):
        ptr[b + 1] += ptr[b]
    fill = ptr[:-1].copy()
    values = np.empty(ptr[nbins], dtype=np.float64)
    for c in range(nchunks):
        for k in range(on[c]):
            b = ob[c, k]
            values[fill[b]] = ov[c, k]
            fill[b] += 1
    return tot, ptr, values, not full.any()


@njit(cache=True, nogil=True)
def _clip_histogram(hist, ptr, values, lo_valid, hi_valid, n_iter, nsigma):
    """The same clipping as :func:`_clip_iterations`, on ring histograms plus
    the sparse list of large values (exact: no pixel pass needed)."""
    nbins = hist.shape[0]
    lo = np.full(nbins, lo_valid, dtype=np.float64)
    hi = np.full(nbins, hi_valid, dtype=np.float64)
    mean = np.zeros(nbins, dtype=np.float64)
    var = np.zeros(nbins, dtype=np.float64)
    count = np.zeros(nbins, dtype=np.float64)
    m = np.zeros((3, nbins), dtype=np.float64)
    for it in range(n_iter):
        for b in range(nbins):
            # integer v passes lo <= v <= hi  <=>  ceil(lo) <= v <= floor(hi)
            v0 = max(np.ceil(lo[b]), 0.0)
            v1 = min(np.floor(hi[b]), HIST_BINS - 1.0)
            n = 0.0
            s1 = 0.0
            s2 = 0.0
            for v in range(np.int64(v0), np.int64(v1) + 1):
                k = np.float64(hist[b, v])
                fv = np.float64(v)
                n += k
                s1 += k * fv
                s2 += k * fv * fv
            for q in range(ptr[b], ptr[b + 1]):
                fv = values[q]
                if fv >= lo[b] and fv <= hi[b]:
                    n += 1.0
                    s1 += fv
                    s2 += fv * fv
            m[0, b] = n
            m[1, b] = s1
            m[2, b] = s2
        moved, total = _update_bounds(m, count, mean, var, lo, hi, lo_valid, hi_valid, nsigma)
        if moved <= 1.0e-3 * total:
            break
    return mean, var, count


@njit(parallel=True, cache=True, nogil=True)
def _fill_maps(index, bin_mean, bin_sigma, nchunks, out_mean, out_sigma):
    ny, nx = index.shape
    nbins = bin_mean.shape[0]
    for c in prange(nchunks):
        for i in range(c * ny // nchunks, (c + 1) * ny // nchunks):
            for j in range(nx):
                b = np.int64(index[i, j])
                if b < nbins:
                    out_mean[i, j] = bin_mean[b]
                    out_sigma[i, j] = bin_sigma[b]
                else:
                    out_mean[i, j] = np.nan
                    out_sigma[i, j] = np.nan


@njit(parallel=True, cache=True, nogil=True)
def _integral_images(frame, valid, lo_valid, hi_valid, nchunks):
    """Summed-area tables (count, sum, sum of squares) of valid pixels.

    Tables are (rows+1, columns+1) float64 with a zero first row and column.
    Row prefix sums run in parallel; the column accumulation walks rows in
    order (each row depends on the previous one) but is vectorised across
    columns.
    """
    ny, nx = frame.shape
    n = np.empty((ny + 1, nx + 1), dtype=np.float64)
    s = np.empty((ny + 1, nx + 1), dtype=np.float64)
    q = np.empty((ny + 1, nx + 1), dtype=np.float64)
    _zero(n[0])
    _zero(s[0])
    _zero(q[0])
    for c in prange(nchunks):
        for i in range(c * ny // nchunks, (c + 1) * ny // nchunks):
            n[i + 1, 0] = 0.0
            s[i + 1, 0] = 0.0
            q[i + 1, 0] = 0.0
            cn = 0.0
            cs = 0.0
            cq = 0.0
            for j in range(nx):
                v = np.float64(frame[i, j])
                if valid[i, j] and v >= lo_valid and v <= hi_valid:
                    cn += 1.0
                    cs += v
                    cq += v * v
                n[i + 1, j + 1] = cn
                s[i + 1, j + 1] = cs
                q[i + 1, j + 1] = cq
    for i in range(1, ny + 1):
        for j in range(1, nx + 1):
            n[i, j] += n[i - 1, j]
            s[i, j] += s[i - 1, j]
            q[i, j] += q[i - 1, j]
    return n, s, q


@njit(parallel=True, cache=True, nogil=True)
def _window_stats(n, s, q, half, min_count, nchunks, out_mean, out_var, out_count):
    ny = n.shape[0] - 1
    nx = n.shape[1] - 1
    for c in prange(nchunks):
        for i in range(c * ny // nchunks, (c + 1) * ny // nchunks):
            i0 = max(i - half, 0)
            i1 = min(i + half + 1, ny)
            for j in range(nx):
                j0 = max(j - half, 0)
                j1 = min(j + half + 1, nx)
                cnt = n[i1, j1] - n[i0, j1] - n[i1, j0] + n[i0, j0]
                out_count[i, j] = cnt
                if cnt >= min_count:
                    sm = s[i1, j1] - s[i0, j1] - s[i1, j0] + s[i0, j0]
                    sq = q[i1, j1] - q[i0, j1] - q[i1, j0] + q[i0, j0]
                    mu = sm / cnt
                    var = (sq - sm * mu) / max(cnt - 1.0, 1.0)
                    out_mean[i, j] = mu
                    out_var[i, j] = var if var > 0.0 else 0.0
                else:
                    out_mean[i, j] = np.nan
                    out_var[i, j] = np.nan


@njit(parallel=True, cache=True, nogil=True)
def _dispersion_signal(frame, valid, lo_valid, hi_valid, mean, var, count, sigma_b, sigma_s, nchunks, out_signal):
    """DIALS dispersion test: a pixel is signal when its window is over-dispersed
    (variance/mean above the Poisson expectation) and the pixel itself is high."""
    ny, nx = frame.shape
    for c in prange(nchunks):
        for i in range(c * ny // nchunks, (c + 1) * ny // nchunks):
            for j in range(nx):
                v = np.float64(frame[i, j])
                out_signal[i, j] = False
                if not (valid[i, j] and v >= lo_valid and v <= hi_valid):
                    continue
                mu = mean[i, j]
                cnt = count[i, j]
                if not (cnt >= 2.0 and mu > 0.0):
                    continue
                disp = var[i, j] / mu
                bound_b = 1.0 + sigma_b * np.sqrt(2.0 / (cnt - 1.0))
                if disp > bound_b and v > mu + sigma_s * np.sqrt(max(var[i, j], mu)):
                    out_signal[i, j] = True


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class RadialStats:
    """Sigma-clipped background statistics per ring.

    Attributes
    ----------
    radius : ndarray, shape (nbins,)
        Ring centre radius in pixels.
    mean, sigma : ndarray of float64, shape (nbins,)
        Clipped mean and standard deviation of pixel values per ring; rings
        with too few pixels are filled from the nearest populated ring, NaN
        when no ring is populated.
    count : ndarray of float64, shape (nbins,)
        Number of sampled pixels that survived clipping.
    bins : RadialBins
        The ring index map the statistics refer to.
    """

    radius: np.ndarray
    mean: np.ndarray
    sigma: np.ndarray
    count: np.ndarray
    bins: RadialBins


def _nchunks() -> int:
    return max(1, numba.get_num_threads()) * 2


def prepare_frame(frame, mask=None, *, dark=None, geometry: Geometry | None = None):
    """Validate ``frame`` (and apply an optional dark/pedestal) for the kernels.

    Returns
    -------
    frame : ndarray
        C-contiguous array in a kernel dtype. With ``dark``, float32 with
        masked (negative raw) pixels set to NaN.
    mask : ndarray of bool or None
        Validated mask (True = valid).
    lo_valid, hi_valid : float
        Valid value range. ``lo_valid`` is 0 for raw frames (negative values
        mark gaps) and -inf-like after dark subtraction; ``hi_valid`` is the
        dtype maximum minus one for unsigned frames (EIGER marks gaps and bad
        pixels with the maximum) and +inf-like otherwise. NaN/inf are invalid.
    """
    arr = as_frame(frame)
    msk = as_mask(mask, arr.shape)
    check_geometry(geometry, arr.shape)
    hi_valid = float(np.iinfo(arr.dtype).max - 1) if arr.dtype.kind == "u" else _BIG
    if dark is None:
        return arr, msk, 0.0, hi_valid
    d = np.asarray(dark)
    if d.shape != arr.shape:
        raise ValueError(f"dark shape {d.shape} does not match frame shape {arr.shape}")
    if d.dtype.kind not in "iuf":
        raise ValueError(f"dark must be numeric, got dtype {d.dtype}")
    out = arr.astype(np.float32) - d.astype(np.float32, copy=False)
    invalid = arr < 0 if arr.dtype.kind != "u" else arr > hi_valid
    out[invalid] = np.nan  # detector gap/bad markers stay invalid after subtraction
    return out, msk, -_BIG, _BIG


def _clip(arr, bins, lo_valid, hi_valid, n_iter, nsigma, row_step):
    """Clipped ring statistics: from one histogram pass for raw integer
    frames (photon counts are small; the few large values are kept exactly),
    else one pixel pass per iteration."""
    if arr.dtype.kind in "iu" and lo_valid == 0.0:
        hist, ptr, values, complete = _ring_histogram(arr, bins.index, bins.nbins, hi_valid, row_step,
                                                      max(1, numba.get_num_threads()))
        if complete:
            return _clip_histogram(hist, ptr, values, lo_valid, hi_valid, n_iter, nsigma)
    return _clip_iterations(arr, bins.index, bins.nbins, lo_valid, hi_valid, n_iter, nsigma, row_step,
                            _nchunks())


def radial_stats(frame, mask=None, *, center=None, geometry: Geometry | None = None,
                 bin_width: float = 1.0, n_iter: int = 5, nsigma: float = 3.0,
                 row_step: int = 4, min_count: int = 8, small_ring: int = 64, dark=None,
                 _prepared: tuple | None = None) -> RadialStats:
    """Per-ring background mean and sigma with iterative sigma clipping.

    Parameters
    ----------
    frame : ndarray, shape (rows, columns)
        Integer or float frame. Negative, NaN and inf pixels are ignored.
    mask : ndarray of bool, optional
        True = valid pixel. Combined with ``geometry.mask``.
    center : (float, float), optional
        Beam centre ``(x, y)`` in pixels; default ``geometry.beam_center`` or
        the frame centre.
    geometry : Geometry, optional
        Supplies the beam centre and static mask; its ring map is cached.
    bin_width : float
        Ring width in pixels.
    n_iter : int
        Maximum clipping iterations (stops early once fewer than 0.1 % of the
        sampled pixels change side).
    nsigma : float
        Clipping half-width in standard deviations.
    row_step : int
        Read every ``row_step``-th row for the statistics (rings hold
        thousands of pixels, so a sample is enough and much faster).
    min_count : int
        Rings with fewer surviving pixels take the values of the nearest
        ring that has enough.
    small_ring : int
        Rings with fewer sampled pixels than this take the median of the
        rings within 3 of them (clipping is unreliable on small samples).
    dark : ndarray, optional
        Per-pixel dark/pedestal subtracted first.
    """
    if _prepared is None:
        arr, msk, lo_valid, hi_valid = prepare_frame(frame, mask, dark=dark, geometry=geometry)
    else:
        arr, msk, lo_valid, hi_valid = _prepared
    if n_iter < 1 or nsigma <= 0 or row_step < 1:
        raise ValueError("n_iter and row_step must be >= 1 and nsigma > 0")
    bins = radial_bins(arr.shape, center=center, geometry=geometry, mask=msk, bin_width=bin_width)
    mean, var, count = _clip(arr, bins, lo_valid, hi_valid, int(n_iter), float(nsigma), int(row_step))
    sigma = np.sqrt(var)
    mean, sigma = _robust_small_rings(mean, sigma, count, small_ring)
    good = count >= min_count
    if not good.all():
        radius = bins.radius
        if good.any():
            idx = np.flatnonzero(good)
            # nearest populated ring (not interpolation: keeps ice-ring edges sharp)
            pos = np.clip(np.searchsorted(idx, np.arange(bins.nbins)), 1, len(idx) - 1) if len(idx) > 1 else None
            if pos is None:
                nearest = np.full(bins.nbins, idx[0])
            else:
                left, right = idx[pos - 1], idx[pos]
                nearest = np.where(np.abs(radius[left] - radius) <= np.abs(radius[right] - radius), left, right)
            mean = mean[nearest]
            sigma = sigma[nearest]
        else:
            mean = np.full(bins.nbins, np.nan)
            sigma = np.full(bins.nbins, np.nan)
    return RadialStats(bins.radius, mean, sigma, count, bins)


@njit(cache=True, nogil=True)
def _neighbour_median(values, count, small_ring, half):
    """Replace values of rings with 0 < count < small_ring by the median of the
    populated rings within ``half`` of them (populated = count > 0)."""
    n = values.shape[0]
    out = values.copy()
    buf = np.empty(2 * half + 1, dtype=np.float64)
    for b in range(n):
        if not (count[b] > 0 and count[b] < small_ring):
            continue
        k = 0
        for q in range(max(b - half, 0), min(b + half + 1, n)):
            if count[q] > 0:
                buf[k] = values[q]
                k += 1
        w = np.sort(buf[:k])
        out[b] = w[k // 2] if k % 2 == 1 else 0.5 * (w[k // 2 - 1] + w[k // 2])
    return out


def _robust_small_rings(mean, sigma, count, small_ring, half=3):
    """Median of neighbouring rings for rings with few sampled pixels.

    Sigma clipping cannot reject outliers that make up a large share of a
    small sample (a spot in a short ring near the beam or a gap); neighbouring
    rings share the same smooth background.
    """
    return (_neighbour_median(mean, count, float(small_ring), half),
            _neighbour_median(sigma, count, float(small_ring), half))


def local_stats(frame, mask=None, *, window: int = 9, sigma_b: float = 3.0, sigma_s: float = 2.5,
                dilate: int = 1, min_count: int = 10, dark=None, geometry: Geometry | None = None,
                _prepared: tuple | None = None):
    """Local background mean and variance maps (DIALS dispersion approach).

    A first pass finds signal pixels with the dispersion test; a second pass
    recomputes the window statistics without them (and without masked
    pixels).

    Parameters
    ----------
    window : int
        Odd window side in pixels.
    sigma_b, sigma_s : float
        Dispersion and strong-pixel thresholds of the dispersion test that
        excludes signal from the background (lower than DIALS' spot-finding
        defaults: here a false "signal" only costs a few background samples).
    dilate : int
        Grow the signal mask by this many pixels before the second pass.
    min_count : int
        Minimum valid pixels in a window; fewer gives NaN.

    Returns
    -------
    mean, var : ndarray of float64, shape (rows, columns)
        Background mean and variance per pixel (NaN where undetermined).
    """
    if window < 3 or window % 2 == 0:
        raise ValueError(f"window must be an odd number >= 3, got {window}")
    if _prepared is None:
        arr, msk, lo_valid, hi_valid = prepare_frame(frame, mask, dark=dark, geometry=geometry)
    else:
        arr, msk, lo_valid, hi_valid = _prepared
    valid = _combined_valid(arr.shape, msk, geometry)
    half = window // 2
    nch = _nchunks()
    ny, nx = arr.shape
    mean = np.empty((ny, nx), np.float64)
    var = np.empty((ny, nx), np.float64)
    count = np.empty((ny, nx), np.float64)
    n, s, q = _integral_images(arr, valid, lo_valid, hi_valid, nch)
    _window_stats(n, s, q, half, 2.0, nch, mean, var, count)
    signal = np.empty((ny, nx), np.bool_)
    _dispersion_signal(arr, valid, lo_valid, hi_valid, mean, var, count, float(sigma_b), float(sigma_s), nch, signal)
    # spot tails just below the test would still lift the window mean: grow
    # the signal mask before excluding it
    for _ in range(int(dilate)):
        grown = signal.copy()
        grown[1:, :] |= signal[:-1, :]
        grown[:-1, :] |= signal[1:, :]
        grown[:, 1:] |= signal[:, :-1]
        grown[:, :-1] |= signal[:, 1:]
        signal = grown
    n, s, q = _integral_images(arr, valid & ~signal, lo_valid, hi_valid, nch)
    _window_stats(n, s, q, half, float(min_count), nch, mean, var, count)
    return mean, var


def _combined_valid(shape, mask, geometry) -> np.ndarray:
    valid = geometry.valid if geometry is not None else np.ones(shape, dtype=bool)
    if mask is not None:
        valid = valid & mask
    return valid


def estimate_background(frame, mask=None, *, center=None, geometry: Geometry | None = None,
                        method: str = "radial", dark=None, **params):
    """Per-pixel background mean and sigma maps (float32, NaN where masked).

    ``method`` is ``"radial"`` (see :func:`radial_stats`) or ``"local"`` (see
    :func:`local_stats`); ``params`` go to that function.
    """
    prepared = prepare_frame(frame, mask, dark=dark, geometry=geometry)
    return _background_maps(prepared, center, geometry, method, params)


def _background_maps(prepared, center, geometry, method, params):
    arr = prepared[0]
    if method == "radial":
        st = radial_stats(arr, center=center, geometry=geometry, _prepared=prepared, **params)
        mean = np.empty(arr.shape, np.float32)
        sig = np.empty(arr.shape, np.float32)
        _fill_maps(st.bins.index, st.mean.astype(np.float32), st.sigma.astype(np.float32),
                   _nchunks(), mean, sig)
        return mean, sig
    if method == "local":
        m, v = local_stats(arr, geometry=geometry, _prepared=prepared, **params)
        return m.astype(np.float32), np.sqrt(v).astype(np.float32)
    raise ValueError(f"unknown background method {method!r}; use 'radial' or 'local'")


def subtract_background(frame, mask=None, *, center=None, geometry: Geometry | None = None,
                        method: str = "radial", dark=None, **params) -> np.ndarray:
    """Background-subtracted frame as float32.

    Parameters
    ----------
    frame : ndarray, shape (rows, columns)
        Any integer or float dtype; negative, NaN and inf pixels are masked.
    mask : ndarray of bool, optional
        True = valid pixel.
    center : (float, float), optional
        Beam centre ``(x, y)`` in pixels (radial method).
    geometry : Geometry, optional
        Beam centre and static mask.
    method : {"radial", "local"}
        Background estimator, see the module docstring.
    dark : ndarray, optional
        Per-pixel dark/pedestal subtracted before everything else.

    Returns
    -------
    ndarray of float32
        ``frame - dark - background``; masked pixels are 0.
    """
    prepared = prepare_frame(frame, mask, dark=dark, geometry=geometry)
    arr, msk, lo_valid, hi_valid = prepared
    mean, _ = _background_maps(prepared, center, geometry, method, params)
    out = arr.astype(np.float32) - mean
    valid = _combined_valid(arr.shape, msk, geometry) & np.isfinite(out)
    if lo_valid == 0.0:
        valid &= arr >= 0
    if hi_valid < _BIG:
        valid &= arr <= hi_valid
    out[~valid] = 0.0
    return out
