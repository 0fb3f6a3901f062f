"""Measurements behind correction commands: where the beam really is, and which
detector regions read dead.

Both run only when the anomaly model raises the matching flag, so they may
cost a few milliseconds; neither is on the per-frame hot path.

Coordinates follow :mod:`edge.geometry` (``x`` column, ``y`` row, pixels).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .background import RadialStats, prepare_frame, radial_stats
from .geometry import Geometry

__all__ = ["measure_beam_center", "measure_beam_offset", "find_dead_regions"]


@njit(cache=True, nogil=True)
def _chamfer_distance(inside):
    """Chamfer (3-4) distance in pixels from each True pixel to the nearest False one.

    Two raster passes; pixels outside the array count as False.
    """
    ny, nx = inside.shape
    big = 1.0e9
    d = np.empty((ny, nx), dtype=np.float64)
    for i in range(ny):
        for j in range(nx):
            if not inside[i, j]:
                d[i, j] = 0.0
                continue
            best = big
            if i == 0 or j == 0 or j == nx - 1:
                best = 3.0
            else:
                best = min(best, d[i - 1, j] + 3.0, d[i, j - 1] + 3.0,
                           d[i - 1, j - 1] + 4.0, d[i - 1, j + 1] + 4.0)
            d[i, j] = best
    for i in range(ny - 1, -1, -1):
        for j in range(nx - 1, -1, -1):
            if d[i, j] == 0.0:
                continue
            best = d[i, j]
            if i == ny - 1 or j == 0 or j == nx - 1:
                best = min(best, 3.0)
            else:
                best = min(best, d[i + 1, j] + 3.0, d[i, j + 1] + 3.0,
                           d[i + 1, j + 1] + 4.0, d[i + 1, j - 1] + 4.0)
            d[i, j] = best
    return d / 3.0


def _box_mean(values: np.ndarray, weights: np.ndarray, half: int) -> np.ndarray:
    """Mean of ``values`` over valid (weight 1) pixels in a (2h+1)^2 box."""
    def box(a):
        c = np.cumsum(np.cumsum(np.pad(a, ((half + 1, half), (half + 1, half))), 0), 1)
        k = 2 * half + 1
        return c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]

    with np.errstate(invalid="ignore", divide="ignore"):
        return box(values * weights) / box(weights)


def _interp_nans_along_rows(a: np.ndarray) -> np.ndarray:
    out = a.copy()
    x = np.arange(a.shape[1])
    for i in range(a.shape[0]):
        row = out[i]
        bad = ~np.isfinite(row)
        if bad.any() and not bad.all():
            row[bad] = np.interp(x[bad], x[~bad], row[~bad])
    return out


def _fill_gaps(level: np.ndarray) -> np.ndarray:
    """Fill NaN (gap) pixels by linear interpolation: whole gap rows from the
    rows above and below, gap columns from their left and right."""
    filled = _interp_nans_along_rows(level.T).T  # vertical first: gap rows
    return _interp_nans_along_rows(filled)


def measure_beam_center(frame, geometry: Geometry, *, search: float = 120.0, smooth: int = 3,
                        shadow_fraction: float = 0.25, min_radius: float = 3.0) -> tuple[float, float] | None:
    """Beam position ``(x, y)`` in pixels from the beamstop shadow.

    The shadow is where the smoothed counts fall below ``shadow_fraction`` of
    the typical level around it. Its disc (not its arm, which is narrower) is
    the set of shadow pixels farthest from the shadow's edge; their centroid
    is the beam position.

    Parameters
    ----------
    frame : ndarray
        Raw frame (negative values masked).
    geometry : Geometry
        Believed beam centre and static mask.
    search : float
        Half-size in pixels of the box around the believed centre that is
        searched.
    smooth : int
        Half-size of the smoothing box (photon-counting frames hold mostly
        zeros and ones per pixel; the shadow shows only after smoothing).
    shadow_fraction : float
        Shadow threshold relative to the median smoothed level in the box.
    min_radius : float
        Smallest disc radius (pixels) accepted as a beamstop shadow.

    Returns
    -------
    (float, float) or None
        None when no shadow is found (no beam, no beamstop, too dark).
    """
    arr, msk, lo_valid, hi_valid = prepare_frame(frame, geometry=geometry)
    bx, by = geometry.beam_center
    ny, nx = arr.shape
    r0, r1 = max(int(by - search), 0), min(int(by + search) + 1, ny)
    c0, c1 = max(int(bx - search), 0), min(int(bx + search) + 1, nx)
    if r1 - r0 < 8 or c1 - c0 < 8:
        return None
    crop = arr[r0:r1, c0:c1].astype(np.float64)
    valid = geometry.valid[r0:r1, c0:c1] & np.isfinite(crop) & (crop >= lo_valid) & (crop <= hi_valid)
    w = valid.astype(np.float64)
    level = _box_mean(np.where(valid, crop, 0.0), w, smooth)
    ref = np.nanmedian(level[valid]) if valid.any() else np.nan
    if not np.isfinite(ref) or ref <= 0:
        return None
    # module gaps often run right through the beam position: bridge them by
    # interpolating the smoothed level so a shadow spanning a gap stays whole
    level = _fill_gaps(level)
    shadow = np.where(np.isfinite(level), level < shadow_fraction * ref, False)
    if not shadow.any():
        return None
    dist = _chamfer_distance(shadow)
    peak = dist.max()
    if peak < min_radius:
        return None
    core = dist >= peak - 1.0
    yy, xx = np.nonzero(core)
    cx, cy, rad = float(xx.mean()), float(yy.mean()), float(peak)
    # Refine with a circle through the shadow's true edges: shadow pixels next
    # to lit, valid pixels (not next to gaps, where the edge is unseen). The
    # arm's straight edges are trimmed as the worst-fitting points.
    seen = np.isfinite(level) & valid
    lit = seen & ~shadow
    edge = np.zeros_like(shadow)
    edge[1:, :] |= shadow[1:, :] & lit[:-1, :]
    edge[:-1, :] |= shadow[:-1, :] & lit[1:, :]
    edge[:, 1:] |= shadow[:, 1:] & lit[:, :-1]
    edge[:, :-1] |= shadow[:, :-1] & lit[:, 1:]
    ey, ex = np.nonzero(edge)
    ex, ey = ex.astype(np.float64), ey.astype(np.float64)
    near = np.abs(np.hypot(ex - cx, ey - cy) - rad) < 0.6 * rad + 2
    ex, ey = ex[near], ey[near]
    for _ in range(4):
        if len(ex) < 12:
            break
        cx, cy, rad = _fit_circle(ex, ey)
        resid = np.abs(np.hypot(ex - cx, ey - cy) - rad)
        keep = resid <= max(np.quantile(resid, 0.7), 1.0)
        ex, ey = ex[keep], ey[keep]
    return (float(cx + c0), float(cy + r0))


def measure_beam_offset(frame, geometry: Geometry, **kw) -> tuple[float, float] | None:
    """Measured beam position minus the believed one, ``(dx, dy)`` in pixels."""
    c = measure_beam_center(frame, geometry, **kw)
    if c is None:
        return None
    return (c[0] - geometry.beam_center[0], c[1] - geometry.beam_center[1])


def _fit_circle(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Algebraic (Kasa) least-squares circle: centre x, centre y, radius."""
    A = np.stack([x, y, np.ones_like(x)], axis=1)
    rhs = x * x + y * y
    (a, b, c), *_ = np.linalg.lstsq(A, rhs, rcond=None)
    cx, cy = a / 2, b / 2
    return cx, cy, float(np.sqrt(max(c + cx * cx + cy * cy, 0.0)))


#: A block of :func:`find_dead_regions` reading 0 counts as evidence only
#: when the background expects at least this many counts in it (a chance
#: of 5 %); each block pays this much of its expectation, so that groups of
#: blocks that are empty by chance, which are more likely the more shapes a
#: group can take, do not add up to a dead region on very sparse frames.
DEAD_TILE_MIN_EXPECTED = 3.0
#: When a ring's clipped mean is below this (counts/px), every ring's rate
#: is also read from its fraction of pixels reading 0 (a frame without such
#: rings skips that pass).
SPARSE_RING_MEAN = 1.0
_EXPECT_ROW_STEP = 4


def find_dead_regions(frame, geometry: Geometry, *, stats: RadialStats | None = None, tile: int = 64,
                      min_expected: float = 30.0) -> list[tuple[int, int, int, int]]:
    """Regions that read zero although the background predicts counts.

    The frame is cut into ``tile`` x ``tile`` blocks. Blocks whose valid
    pixels sum to zero although the background expects at least
    :data:`DEAD_TILE_MIN_EXPECTED` counts in each are grouped (8-connected),
    and a group is a dead region when its blocks' expected counts, less
    :data:`DEAD_TILE_MIN_EXPECTED` each, add up to ``min_expected`` (Poisson
    chance below ``exp(-min_expected)`` even after choosing the group's
    shape among all possible ones). The expected counts per pixel are the
    larger of the ring's clipped mean and ``-ln`` of the fraction of its
    pixels reading 0: on mostly-empty photon-counting frames the clipped
    mean reads 0 while the zero fraction still measures the rate (a dead
    area in the ring only lowers that estimate).

    Returns
    -------
    list of (row0, row1, col0, col1)
        Half-open pixel boxes of the groups' bounding boxes, the group
        expecting the most counts first.
    """
    arr, _, lo_valid, hi_valid = prepare_frame(frame, geometry=geometry)
    if stats is None:
        stats = radial_stats(arr, geometry=geometry)
    ny, nx = arr.shape
    nb = stats.bins.nbins
    idx = stats.bins.index
    inside = idx < nb
    f = arr.astype(np.float64)
    with np.errstate(invalid="ignore"):
        ok = inside & np.isfinite(f) & (f >= lo_valid) & (f <= hi_valid)
    # the expectation from every 4th row (x 4): rings and blocks hold
    # thousands of pixels; whether a block reads 0 is checked on every pixel
    step = _EXPECT_ROW_STEP if tile % _EXPECT_ROW_STEP == 0 else 1
    ring = np.minimum(idx[::step], nb - 1)
    ok_s = ok[::step]
    rate = np.nan_to_num(stats.mean, nan=0.0)
    if (rate < SPARSE_RING_MEAN).any():
        # rings whose clipped mean may have lost the counts: their zero fraction
        n_ring = np.bincount(ring[ok_s], minlength=nb).astype(np.float64)
        z_ring = np.bincount(ring[ok_s & (f[::step] == 0)], minlength=nb).astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            rate0 = np.where(n_ring > 0, -np.log(np.clip(z_ring / np.maximum(n_ring, 1.0), 1e-12, 1.0)), 0.0)
        rate = np.maximum(rate, rate0)
    counts = np.where(ok, f, 0.0)
    ty, tx = -(-ny // tile), -(-nx // tile)
    pad = ((0, ty * tile - ny), (0, tx * tile - nx))
    tsum = np.pad(counts, pad).reshape(ty, tile, tx, tile).sum(axis=(1, 3))
    expected = np.where(ok_s, rate[ring], 0.0)
    per_tile = tile // step
    pad_s = ((0, ty * per_tile - expected.shape[0]), (0, tx * tile - nx))
    texp = step * np.pad(expected, pad_s).reshape(ty, per_tile, tx, tile).sum(axis=(1, 3))
    empty = (tsum == 0) & (texp >= DEAD_TILE_MIN_EXPECTED)
    out = []
    seen = np.zeros_like(empty)
    for i, j in zip(*np.nonzero(empty)):
        if seen[i, j]:
            continue
        stack, members = [(i, j)], []
        seen[i, j] = True
        while stack:
            a, b = stack.pop()
            members.append((a, b))
            for da in (-1, 0, 1):
                for db in (-1, 0, 1):
                    p, q = a + da, b + db
                    if 0 <= p < ty and 0 <= q < tx and empty[p, q] and not seen[p, q]:
                        seen[p, q] = True
                        stack.append((p, q))
        e = float(sum(texp[m] for m in members))
        if e - DEAD_TILE_MIN_EXPECTED * len(members) < min_expected:
            continue
        rows = [m[0] for m in members]
        cols = [m[1] for m in members]
        out.append(((min(rows) * tile, min((max(rows) + 1) * tile, ny),
                     min(cols) * tile, min((max(cols) + 1) * tile, nx)), e))
    out.sort(key=lambda r: -r[1])
    return [box for box, _ in out]
