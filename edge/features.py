"""Frame summary features for the anomaly model (Numba kernels).

One model serves every detector size, so the frame is reduced to a fixed,
geometry-normalised vector of :data:`N_FEATURES` float32 values:

* a polar grid (:data:`RADIAL_EDGES_PX` x :data:`N_SECTORS` azimuthal
  sectors around the *believed* beam centre) of ``log2`` observed / expected
  mean counts, where "expected" is the frame's own sigma-clipped ring mean
  (:func:`edge.background.radial_stats`). A radially symmetric frame centred
  where the geometry says gives zeros; a beam elsewhere, a dead module or a
  hot cluster does not. Inner edges are in pixels because beamstop sizes and
  beam-centre errors are pixel quantities, not fractions of the detector;
* the first azimuthal harmonic of each grid ring (rotation-invariant);
* a coarse :data:`N_TILES` x :data:`N_TILES` tile grid over the frame
  (module-like regions) summarised by order statistics: excess of zero pixels
  over the Poisson expectation (dead regions), observed / expected counts
  (hot regions) and the fraction of bright pixels;
* the most deviant column and row (summed clipped z-scores): stripes;
* frame scalars: count level, zero fraction, saturated pixels (all, and those
  with a bright neighbour, which excludes isolated defective pixels), peak
  density per megapixel, saturated peaks;
* ice-ring contrast of the ring-mean profile at the ice Ih d-spacings;
* a wide ring-centre search: 1-px profiles in 64 azimuthal sectors (every
  4th row, the ring band around the strongest lines) in which the ice lines
  are looked for around every ring centre within :data:`ICE_SHIFT_PX` of the
  believed one (:func:`wide_ring_centre`), so rings around a beam far off
  the believed centre are still seen (the best centre's Poisson z, its gain
  over the believed centre and its distance);
* dead area (fraction of the valid area in tiles reading mostly zero), the
  largest excess of exact zeros in a column and in one tile's part of a
  sampled row (dead readout lines span a module, not the frame), the largest
  peak's pixel count and the number of very large peaks (a leaking beam),
  and the longest run of bright pixels in a sampled row;
* hot blocks: the longest run of unsaturated pixels far above their ring
  (:data:`HOT_SIGMA`) whose pixels one sampled row up are as hot, i.e. a
  2-D cluster rather than a spot's edge or a ring, beyond
  :data:`HOT_BLOCK_PX`;
* clear peaks (SNR >= 5): their absolute number (a crystal gives tens or
  more at any detector size), very strong ones, and what separates Bragg
  spots from fakes of a wrong background model: median size, sharpness
  (brightest pixel / intensity), diffuse fraction, azimuthal clustering
  around the believed centre and the fraction on ice d-spacings;
* photons on mostly-empty frames: the fraction of pixels reading > 0, its
  radial unevenness, and per tile the Poisson z of that count against what
  the frame's nonzero fraction at each radius predicts (dead or hot regions
  where the clipped ring means read 0);
* ice rings at full resolution: the Poisson z of each strong ice line in the
  profile of the ice bands (:mod:`edge.evidence.ice`, the evidence gate's
  own numbers);
* hot readout stripes: the largest fraction of bright pixels in one tile's
  part of a sampled row and in one column within a row band of tiles.
* an overloaded spot core (0/1): >= :data:`MIN_OVERLOAD_PIXELS` pixels at
  the cutoff with a 4-neighbour at a quarter of it, read at full resolution
  in boxes around the saturated peaks (:func:`overload_count`). The anomaly
  model's members do not read it; only its saturation head does
  (``models/train.py``).

The per-pixel work is one pass (:func:`_accumulate`) over every
``row_step``-th row plus full resolution within :data:`INNER_FULL_PX` of the
beam centre, walking runs of constant (grid cell, tile) precomputed per
geometry (:func:`_row_segments`), a pass over the same rows for the
nonzero counts per (tile, radial bin), one over the ring band for the
sector profiles and a gather of the ice-band pixels;
everything else works on a few thousand numbers. Call
:func:`warmup` once at start-up so nothing compiles in the hot path.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import njit, prange

from .background import RadialStats, _sum_chunks, _zero, prepare_frame, radial_stats
from .geometry import Geometry
from .sim import ICE_D_SPACINGS

__all__ = [
    "FEATURE_NAMES",
    "N_FEATURES",
    "FeatureError",
    "frame_features",
    "frame_features_from_parts",
    "wide_ring_centre",
    "overload_count",
    "warmup",
    "RADIAL_EDGES_PX",
    "N_SECTORS",
    "N_TILES",
]

#: Outer edges (pixels from the believed beam centre) of the polar-grid rings;
#: the last ring runs to the detector edge.
RADIAL_EDGES_PX = np.array([30.0, 60.0, 120.0, 240.0, 480.0], dtype=np.float64)
N_RINGS = len(RADIAL_EDGES_PX) + 1
N_SECTORS = 8
N_TILES = 8
#: Rows within this many pixels of the beam centre are read at full
#: resolution for the polar grid (the inner cells are small).
INNER_FULL_PX = 64
#: Ice lines used for the ring-contrast features (strongest six).
ICE_LINES_A = np.asarray(ICE_D_SPACINGS[:6], dtype=np.float64)
#: Per-pixel z-scores are clipped to this before summing along rows/columns,
#: so Bragg spots cannot fake a stripe.
Z_CLIP = 5.0
#: A pixel is "bright" above mean + BRIGHT_SIGMA * sigma of its ring.
BRIGHT_SIGMA = 5.0
#: Saturated peaks count only with at least this many pixels.
MIN_SAT_PEAK_PIX = 4
#: Wide ring-centre search: the strongest ICE_SECTOR_LINES lines are looked
#: for in per-sector 1-px profiles around the believed centre; a ring of
#: radius R centred on a beam o = (ox, oy) px away crosses the sector's ray
#: (unit direction u) at ``o.u + sqrt(R^2 - |o x u|^2)``, so one 2-D search
#: over centres within ICE_SHIFT_PX finds rings around a beam far off the
#: believed centre (the full-resolution ice evidence only searches 12 px).
ICE_SECTOR_LINES = 3
ICE_SHIFT_PX = 160
#: Row sampling step of the features' per-pixel passes (default).
ROW_STEP = 4
#: Row step of the sector profiles.
ICE_ROW_STEP = 4
#: Azimuthal sectors of the wide search (5.625 degrees each: a ring centre d
#: px off smears a ring by at most ~0.1 d within a sector, ~0.005 d in the
#: sectors along the offset).
N_ICE_SECTORS = 64
#: Coarse grid step of the wide search (px): each coarse point takes each
#: line's best within +-step/2 in every other sector, then a 1-px search in
#: all sectors refines it (a coarser grid misses sharp rings).
ICE_SEARCH_STEP_PX = 6
#: Counts in the sector profiles are clipped to ring mean + this * sigma (spots).
ICE_Z_CLIP = 3.0
#: Column parts (sampled pixels) with fewer valid pixels do not count for
#: the hot-stripe fraction (a 1M's band holds ~16 sampled rows).
MIN_BAND_COL_PX = 12
#: Peaks with at least this many pixels count as "large" (hot clusters, a
#: leaking beam; Bragg spots, even overloaded ones, stay well below).
LARGE_PEAK_NPIX = 200
#: A run of at least this many adjacent bright pixels in a row is "long"
#: (Bragg spots are narrower; hot clusters are 8-30 px wide).
LONG_RUN_PX = 10
#: Hot-cluster pixels: at least mu + max(HOT_SIGMA sd, HOT_MIN_COUNTS) and not
#: saturated (simulated clusters add 200-5000 counts per pixel).
HOT_SIGMA = 20.0
HOT_MIN_COUNTS = 50.0
#: Hot-block runs (hot pixels whose pixels one sampled row up are hot too)
#: count only beyond this many pixels: strong Bragg spots on the real PILATUS
#: frames reach 6 px, simulated hot clusters are 8-30 px wide.
HOT_BLOCK_PX = 7
#: Clear-peak counts are capped here (see frame_features).
CLEAR_PEAKS_CAP = 100
#: A clear peak within this relative d-spacing of an ice line counts as on the ring.
ICE_PEAK_REL = 0.015
#: A tile counts as dead area when its zero-pixel excess exceeds this.
DEAD_TILE_EXCESS = 0.5
#: Offset (counts/pixel) in log ratios: keeps dark frames at 0 instead of noise.
LOG_EPS = 0.1
#: Overloaded spot core: at least this many pixels at/above the cutoff with a
#: 4-neighbour at/above a quarter of it, read at full resolution around the
#: saturated peaks (the rule of the simulated ``saturation`` label).
MIN_OVERLOAD_PIXELS = 4
#: Half-size (px) of the box read around a saturated peak's centroid:
#: floor(sqrt(npix)) + 2, at most this.
OVERLOAD_BOX_MAX = 24

_T_N, _T_SUMV, _T_SUMMU, _T_ZERO, _T_EZERO, _T_BRIGHT, _T_SAT, _T_SATC = range(8)
_N_TILE_STATS = 8


def _names() -> tuple[str, ...]:
    n = [f"grid_r{r}_s{s}" for r in range(N_RINGS) for s in range(N_SECTORS)]
    n += [f"harmonic1_r{r}" for r in range(N_RINGS)]
    n += ["tile_zero_excess_max", "tile_zero_excess_mean", "tile_zero_excess_min",
          "tile_ratio_max", "tile_ratio_min", "tile_ratio_std",
          "tile_bright_max", "tile_bright_median"]
    n += ["col_z_max", "col_z_min", "row_z_max", "row_z_min"]
    n += ["log_mean_counts", "log_expected_counts", "zero_fraction", "zero_excess",
          "log_bright_fraction", "log_saturated_fraction", "log_saturated_clustered",
          "log_peak_density", "log_strong_peak_density", "log_saturated_peaks", "saturated_peak_fraction"]
    n += [f"ice_contrast_{d:.3f}A" for d in ICE_LINES_A]
    n += ["ice_significance_max", "ice_lines_visible"]
    n += ["ice_wide_z", "ice_wide_gain", "ice_wide_log_offset_px", "dead_area_fraction"]
    n += ["col_zero_excess_max", "row_zero_excess_max", "log_peak_npix_max", "log_large_peaks"]
    n += ["log2_bright_run_max", "log_rows_long_bright_run"]
    n += ["log2_hot_block_excess"]
    n += ["log_clear_peaks", "log_very_strong_peaks", "clear_peak_log_npix_median", "clear_peak_sharpness_median",
          "clear_peak_diffuse_fraction", "clear_peak_azimuth_r1", "clear_peak_ice_fraction"]
    n += ["log_nonzero_fraction", "nonzero_tile_contrast", "tile_nonzero_deficit_z_max", "tile_nonzero_excess_z_max"]
    n += [f"ice_ring_z_{d:.3f}A" for d in ICE_LINES_A[:3]]
    n += ["ice_ring_z_weak_lines_max", "ice_ring_log2_contrast_max"]
    n += ["row_tile_bright_max", "col_band_bright_max"]
    n += ["overload_core"]
    return tuple(n)


#: Names of the feature vector entries, in order.
FEATURE_NAMES: tuple[str, ...] = _names()
N_FEATURES = len(FEATURE_NAMES)


class FeatureError(ValueError):
    """Input that features cannot be computed from (shape, dtype, NaN, geometry)."""


# ---------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------
@njit(cache=True, nogil=True, inline="always")
def _sector(dx, dy):
    """Octant 0..7 of the direction (dx, dy), counter-clockwise from +x."""
    if dy >= 0.0:
        if dx >= 0.0:
            return 0 if dx >= dy else 1
        return 2 if -dx < dy else 3
    if dx < 0.0:
        return 4 if -dx >= -dy else 5
    return 6 if dx < -dy else 7


@njit(cache=True, nogil=True)
def _row_segments(index, nbins, rbin_ring, tile_edges, bx, by, row_step):
    """Runs of constant (polar-grid cell, tile) along every sampled row.

    Computed once per geometry, so the per-frame pass (:func:`_accumulate`)
    adds each run to its grid cell and tile without per-pixel cell lookups.
    Masked pixels join the run they lie in (the frame pass skips them).

    Returns
    -------
    seg : int32 (n_segments, 4)  -- first column, end column, grid cell, tile
    row_ptr : int64 (n_sampled_rows + 1,)  -- segments of sampled row k are
        ``seg[row_ptr[k]:row_ptr[k + 1]]``
    """
    ny, nx = index.shape
    n_tiles = tile_edges.shape[0] - 1
    n_rows = (ny + row_step - 1) // row_step
    cap = n_rows * 64 + 16
    seg = np.empty((cap, 4), dtype=np.int32)
    row_ptr = np.zeros(n_rows + 1, dtype=np.int64)
    ns = 0
    for k in range(n_rows):
        i = k * row_step
        trow = (i * n_tiles // ny) * n_tiles
        dy = i - by
        for tc in range(n_tiles):
            j = tile_edges[tc]
            j_end = tile_edges[tc + 1]
            start = j
            cell = -1
            while j < j_end:
                b = np.int64(index[i, j])
                if b < nbins:
                    c = rbin_ring[b] * 8 + _sector(j - bx, dy)
                    if cell < 0:
                        cell = c
                    elif c != cell:
                        if ns == seg.shape[0]:
                            seg = np.concatenate((seg, np.empty_like(seg)))
                        seg[ns, 0] = start
                        seg[ns, 1] = j
                        seg[ns, 2] = cell
                        seg[ns, 3] = trow + tc
                        ns += 1
                        start = j
                        cell = c
                j += 1
            if j_end > start:
                if ns == seg.shape[0]:
                    seg = np.concatenate((seg, np.empty_like(seg)))
                seg[ns, 0] = start
                seg[ns, 1] = j_end
                seg[ns, 2] = max(cell, 0)  # an all-masked run adds nothing
                seg[ns, 3] = trow + tc
                ns += 1
        row_ptr[k + 1] = ns
    return seg[:ns].copy(), row_ptr


@njit(cache=True, nogil=True, inline="always")
def _hot(v, hot_thr, sat):
    """Far above the ring's level but not saturated (hot-cluster pixel)."""
    return v >= hot_thr and (sat <= 0.0 or v < sat)


@njit(parallel=True, cache=True, nogil=True)
def _accumulate(frame, index, ring_tab, rbin_ring, n_rings, seg, row_ptr, n_tiles, bx, by,
                lo_valid, hi_valid, sat, row_step, inner, nchunks):
    """One pass over the frame: polar grid, tile, column and row sums.

    Parameters
    ----------
    frame : 2-D array (rows, columns), any kernel dtype
    index : uint16 (rows, columns)
        Ring of each pixel, >= len(ring_tab) where masked.
    ring_tab : float64 (nbins, 5)
        Per ring: expected counts ``mu``, clip level ``mu + 5 sd``, ``1 / sd``,
        Poisson P(0), hot-pixel level (see :func:`_ring_table`).
    rbin_ring : int64 (nbins,)
        Polar-grid ring (< n_rings) of each 1-px ring.
    seg, row_ptr : from :func:`_row_segments` (same ``row_step``)
    n_tiles : int
        Tiles per side.
    bx, by : float
        Believed beam centre (px).
    lo_valid, hi_valid : float
        Valid value range; others are masked markers.
    sat : float
        Count cutoff (<= 0 disables the saturation counts).
    row_step, inner : int
        Row sampling step; full-resolution half-width around the centre (px).

    Returns
    -------
    grid : float64 (3, rings * 8)   -- n, sum of clipped values, sum of expected
    tiles : float64 (8, tiles**2)   -- see the _T_* indices (sampled rows)
    cols : float64 (3, columns)     -- n, sum of clipped z, zero pixels - expected (sampled rows)
    rows : float64 (6, rows)        -- per sampled row: n, sum of clipped z, largest zero excess
                                       fraction of a tile's part of the row (>= 32 px), longest
                                       run of bright pixels in adjacent columns, longest run of
                                       hot pixels whose pixel one sampled row up is hot too,
                                       largest bright fraction of a tile's part of the row (>= 32 px)
    band_cols : int32 (2, 2 * n_tiles * columns) -- per (band of half a tile's rows, column):
                                       n, bright pixels (sampled rows; a readout stripe spans
                                       a module, not the frame, and half-tile bands let one
                                       fall mostly in one band)

    Notes
    -----
    Sums stay in registers for a whole run of :func:`_row_segments` (a
    scatter-add per pixel serialises on store-to-load forwarding).
    """
    ny, nx = frame.shape
    nbins = ring_tab.shape[0]
    grid_cells = n_rings * 8
    # np.empty + _zero per chunk: one parallel region per call (see background._zero)
    grid_c = np.empty((nchunks, 3, grid_cells), dtype=np.float64)
    tiles_c = np.empty((nchunks, 8, n_tiles * n_tiles), dtype=np.float64)
    cols_c = np.empty((nchunks, 3, nx), dtype=np.float64)
    hot_c = np.empty((nchunks, nx), dtype=np.uint8)
    bcols_c = np.empty((nchunks, 2, 2 * n_tiles * nx), dtype=np.int32)
    rows = np.empty((6, ny), dtype=np.float64)
    sat_c = sat / 4.0
    jin0 = max(0, int(math.floor(bx - inner)))
    jin1 = min(nx, int(math.ceil(bx + inner)) + 1)
    for c in prange(nchunks):
        g = grid_c[c]
        t = tiles_c[c]
        cl = cols_c[c]
        hot_up = hot_c[c]
        bc = bcols_c[c]
        _zero(g)
        _zero(t)
        _zero(cl)
        _zero(hot_up)
        _zero(bc)
        i0 = c * ny // nchunks
        i1 = (c + 1) * ny // nchunks
        for k in range(6):
            for i in range(i0, i1):
                rows[k, i] = 0.0
        # hot flags of the sampled row above this chunk (runs cross chunk edges)
        ip = ((i0 - 1) // row_step) * row_step if i0 > 0 else -1
        if ip >= 0 and i0 < i1:
            for j in range(nx):
                b = np.int64(index[ip, j])
                if b < nbins:
                    v = np.float64(frame[ip, j])
                    if v >= lo_valid and v <= hi_valid and _hot(v, ring_tab[b, 4], sat):
                        hot_up[j] = 1
        for i in range(i0, i1):
            dy = i - by
            if (i % row_step) != 0:
                if abs(dy) >= inner:
                    continue
                # full resolution near the beam: polar grid only
                cur = -1
                gn = 0.0
                gv = 0.0
                gm = 0.0
                for j in range(jin0, jin1):
                    b = np.int64(index[i, j])
                    if b >= nbins:
                        continue
                    v = np.float64(frame[i, j])
                    if not (v >= lo_valid and v <= hi_valid):
                        continue
                    mu = ring_tab[b, 0]
                    cell = rbin_ring[b] * 8 + _sector(j - bx, dy)
                    if cell != cur:
                        if cur >= 0:
                            g[0, cur] += gn
                            g[1, cur] += gv
                            g[2, cur] += gm
                        cur = cell
                        gn = 0.0
                        gv = 0.0
                        gm = 0.0
                    gn += 1.0
                    gv += min(v, ring_tab[b, 1])
                    gm += mu
                if cur >= 0:
                    g[0, cur] += gn
                    g[1, cur] += gv
                    g[2, cur] += gm
                continue
            k = i // row_step
            band = (i * 2 * n_tiles // ny) * nx
            rn = 0.0
            rz = 0.0
            zx_max = 0.0
            br_max = 0.0
            run = 0.0
            run_max = 0.0
            last_b = -2
            hrun = 0.0
            hrun_max = 0.0
            last_h = -2
            tk = -1
            tn = 0.0
            tz = 0.0
            tb = 0.0
            for s in range(row_ptr[k], row_ptr[k + 1]):
                j0 = seg[s, 0]
                j1 = seg[s, 1]
                cell = seg[s, 2]
                if seg[s, 3] != tk:
                    if tn >= 32.0:
                        zx_max = max(zx_max, tz / tn)
                        br_max = max(br_max, tb / tn)
                    tk = seg[s, 3]
                    tn = 0.0
                    tz = 0.0
                    tb = 0.0
                gn = 0.0
                gv = 0.0
                gm = 0.0
                sz = 0.0
                s_zero = 0.0
                s_e = 0.0
                s_b = 0.0
                for j in range(j0, j1):
                    b = np.int64(index[i, j])
                    if b >= nbins:
                        hot_up[j] = 0
                        continue
                    v = np.float64(frame[i, j])
                    if not (v >= lo_valid and v <= hi_valid):
                        hot_up[j] = 0
                        continue
                    mu = ring_tab[b, 0]
                    cap = ring_tab[b, 1]
                    e = ring_tab[b, 3]
                    # clipped value: hot pixels and spots must not dominate a mean
                    vc = min(v, cap)
                    z = max((vc - mu) * ring_tab[b, 2], -5.0)
                    zero = 1.0 if v == 0.0 else 0.0
                    gn += 1.0
                    gv += vc
                    gm += mu
                    sz += z
                    s_zero += zero
                    s_e += e
                    cl[0, j] += 1.0
                    cl[1, j] += z
                    cl[2, j] += zero - e
                    bc[0, band + j] += 1
                    if v >= cap:
                        t[_T_BRIGHT, seg[s, 3]] += 1.0
                        bc[1, band + j] += 1
                        s_b += 1.0
                        # run of bright pixels in adjacent columns (masked pixels break it)
                        run = run + 1.0 if j == last_b + 1 else 1.0
                        last_b = j
                        run_max = max(run_max, run)
                        hot = _hot(v, ring_tab[b, 4], sat)
                        if hot and hot_up[j] != 0:
                            # hot here and one sampled row up: a 2-D block, not a spot's edge
                            hrun = hrun + 1.0 if j == last_h + 1 else 1.0
                            last_h = j
                            hrun_max = max(hrun_max, hrun)
                        hot_up[j] = 1 if hot else 0
                    else:
                        hot_up[j] = 0
                    if sat > 0.0 and v >= sat:
                        t[_T_SAT, seg[s, 3]] += 1.0
                        # a saturated pixel with a bright 4-neighbour is part of an
                        # overloaded spot or beam, not an isolated defective pixel
                        nb = -1.0
                        if j > 0:
                            nb = max(nb, np.float64(frame[i, j - 1]))
                        if j + 1 < nx:
                            nb = max(nb, np.float64(frame[i, j + 1]))
                        if i > 0:
                            nb = max(nb, np.float64(frame[i - 1, j]))
                        if i + 1 < ny:
                            nb = max(nb, np.float64(frame[i + 1, j]))
                        if nb >= sat_c and nb <= hi_valid:
                            t[_T_SATC, seg[s, 3]] += 1.0
                g[0, cell] += gn
                g[1, cell] += gv
                g[2, cell] += gm
                tt = seg[s, 3]
                t[_T_N, tt] += gn
                t[_T_SUMV, tt] += gv
                t[_T_SUMMU, tt] += gm
                t[_T_ZERO, tt] += s_zero
                t[_T_EZERO, tt] += s_e
                rn += gn
                rz += sz
                tn += gn
                tz += s_zero - s_e
                tb += s_b
            if tn >= 32.0:
                zx_max = max(zx_max, tz / tn)
                br_max = max(br_max, tb / tn)
            rows[0, i] = rn
            rows[1, i] = rz
            rows[2, i] = zx_max
            rows[3, i] = run_max
            rows[4, i] = hrun_max
            rows[5, i] = br_max
    grid = _sum_chunks(grid_c, np.empty((3, grid_cells), dtype=np.float64))
    tiles = _sum_chunks(tiles_c, np.empty((8, n_tiles * n_tiles), dtype=np.float64))
    cols = _sum_chunks(cols_c, np.empty((3, nx), dtype=np.float64))
    band_cols = _sum_chunks(bcols_c, np.empty((2, 2 * n_tiles * nx), dtype=np.int32))
    return grid, tiles, cols, rows, band_cols


@njit(cache=True, nogil=True)
def _ring_contrast(profile, line_radius, half_width, flank_in, flank_out):
    """Contrast of narrow rings in a 1-px ring-mean profile.

    For each line radius (px; NaN or outside the profile = not visible):
    ``peak`` = max of the profile within ``half_width`` of the line, ``base``
    = median of the flanks ``flank_in..flank_out`` px away on both sides,
    ``noise`` = the flanks' median absolute deviation.

    Returns
    -------
    contrast : float64 (lines,)
        ``(peak - base) / (base + 0.1)``; 0 where not visible.
    significance : float64 (lines,)
        ``(peak - base) / (1.4826 * MAD + 0.01)``; 0 where not visible.
    visible : bool (lines,)
    """
    n = profile.shape[0]
    m = line_radius.shape[0]
    contrast = np.zeros(m, dtype=np.float64)
    signif = np.zeros(m, dtype=np.float64)
    visible = np.zeros(m, dtype=np.bool_)
    buf = np.empty(4 * flank_out + 4, dtype=np.float64)
    for k in range(m):
        r = line_radius[k]
        reach = max(flank_out, half_width)
        if not (r == r) or r - reach < 1.0 or r + reach >= n - 1:
            continue
        rc = int(r + 0.5)
        peak = -1.0e300
        for q in range(rc - half_width, rc + half_width + 1):
            if profile[q] > peak:
                peak = profile[q]
        nb = 0
        for q in range(rc - flank_out, rc - flank_in + 1):
            buf[nb] = profile[q]
            nb += 1
        for q in range(rc + flank_in, rc + flank_out + 1):
            buf[nb] = profile[q]
            nb += 1
        fl = np.sort(buf[:nb])
        base = fl[nb // 2]
        dev = np.sort(np.abs(fl - base))
        mad = dev[nb // 2]
        visible[k] = True
        contrast[k] = (peak - base) / (abs(base) + 0.1)
        signif[k] = (peak - base) / (1.4826 * mad + 0.01)
    return contrast, signif, visible


#: tan of k * 5.625 degrees, k = 1..7: the sector boundaries within an octant
_TAN64 = np.tan(np.arange(1, 8) * (math.pi / 32.0))


@njit(cache=True, nogil=True, inline="always")
def _octant_sub(t):
    """Sub-sector 0..7 (5.625 degrees each) of the angle atan(t), 0 <= t <= 1."""
    q = 0
    for k in range(7):
        if t >= _TAN64[k]:
            q = k + 1
    return q


@njit(cache=True, nogil=True, inline="always")
def _sector64(dx, dy):
    """Sector 0..63 (5.625 degrees each) of the direction (dx, dy), counter-clockwise from +x."""
    ax = abs(dx)
    ay = abs(dy)
    if ay <= ax:
        q = _octant_sub(ay / ax) if ax > 0.0 else 0
    else:
        q = 15 - _octant_sub(ax / ay)
    if dy >= 0.0:
        return q if dx >= 0.0 else 31 - q
    return 32 + q if dx < 0.0 else 63 - q


#: cot of k * 5.625 degrees, k = 0..64 (inf where sin is 0): the sector boundaries along a row
with np.errstate(divide="ignore"):
    _COT64 = np.where(np.arange(65) % 32 == 0, np.inf,
                      np.cos(np.arange(65) * (math.pi / 32.0)) / np.sin(np.arange(65) * (math.pi / 32.0)))


@njit(cache=True, nogil=True, inline="always")
def _sector_end(s, dy):
    """dx (px from the centre) at which a row at ``dy`` leaves sector ``s`` going to +x.

    Along a row the angle falls (dy > 0) or rises (dy < 0) monotonically, so
    the sector changes only at these columns."""
    if dy > 0.0:
        return dy * _COT64[s] if s > 0 else np.inf
    if dy < 0.0:
        return dy * _COT64[s + 1] if s < 63 else np.inf
    return 0.0 if s != 0 else np.inf


@njit(parallel=True, cache=True, nogil=True)
def _sector_profiles(frame, index, mu_ring, sd_ring, bx, by, b_lo, b_hi, width, lo_valid, hi_valid,
                     row_step, nchunks):
    """Per-sector (:data:`N_ICE_SECTORS`) 1-px ring profiles of clipped counts over rings ``b_lo..b_hi-1``.

    Only sampled rows (``i % row_step == 0``) and only the columns whose
    radius can fall in the ring band are read; the sector is tracked along
    each row (:func:`_sector_end`), not computed per pixel.

    Returns
    -------
    acc : float64 (2, N_ICE_SECTORS * (b_hi - b_lo))  -- n, sum of counts clipped to mean + ICE_Z_CLIP sigma
    """
    ny, nx = frame.shape
    nbins = mu_ring.shape[0]
    nb = b_hi - b_lo
    acc_c = np.empty((nchunks, 2, N_ICE_SECTORS * nb), dtype=np.float64)
    cap = np.empty(max(nb, 0), dtype=np.float64)
    for b in range(b_lo, b_hi):
        cap[b - b_lo] = mu_ring[b] + ICE_Z_CLIP * sd_ring[b] if b < nbins else 0.0
    hi_b = min(b_hi, nbins)
    r_lo = b_lo * width - 1.0
    r_hi = b_hi * width + 1.0
    for c in prange(nchunks):
        a = acc_c[c]
        _zero(a)
        for i in range(c * ny // nchunks, (c + 1) * ny // nchunks):
            if (i % row_step) != 0:
                continue
            dy = i - by
            if abs(dy) >= r_hi:
                continue
            xo = math.sqrt(r_hi * r_hi - dy * dy)
            xi = math.sqrt(r_lo * r_lo - dy * dy) if abs(dy) < r_lo else 0.0
            for side in range(2):
                if side == 0:
                    j0 = max(0, int(math.floor(bx - xo)))
                    j1 = min(nx, int(math.ceil(bx - xi)) + 1)
                else:
                    j0 = max(0, int(math.floor(bx + xi)), int(math.ceil(bx - xi)) + 1)
                    j1 = min(nx, int(math.ceil(bx + xo)) + 1)
                if j0 >= j1:
                    continue
                sec = _sector64(j0 - bx, dy)
                end = _sector_end(sec, dy)
                for j in range(j0, j1):
                    dx = j - bx
                    while dx >= end:
                        sec = sec - 1 if dy > 0.0 else (sec + 1 if dy < 0.0 else 0)
                        end = _sector_end(sec, dy)
                    b = np.int64(index[i, j])
                    if b < b_lo or b >= hi_b:
                        continue
                    v = np.float64(frame[i, j])
                    if not (v >= lo_valid and v <= hi_valid):
                        continue
                    key = sec * nb + (b - b_lo)
                    a[0, key] += 1.0
                    a[1, key] += min(v, cap[b - b_lo])
    return _sum_chunks(acc_c, np.empty((2, N_ICE_SECTORS * nb), dtype=np.float64))


#: Radial bins (equal width in ring number) of the tile nonzero-pixel expectation.
N_NZ_RBINS = 32
#: Relative systematic error of that expectation (flat field, shadows).
NZ_SYSTEMATIC = 0.05


@njit(parallel=True, cache=True, nogil=True)
def _tile_radial_nonzero(frame, rbmap, n_rb, tile_col, n_tiles, lo_valid, hi_valid, row_step, nchunks):
    """Valid pixels and pixels reading > 0 per (tile, radial bin) over every ``row_step``-th row.

    ``rbmap[i, j]`` is pixel (i, j)'s radial bin (>= ``n_rb``: outside the
    geometry's valid area); tile ``t = (i * n_tiles // ny) * n_tiles + k``
    with column tile ``k`` for ``tile_col[k] <= j < tile_col[k + 1]``.

    Returns
    -------
    acc : int64 (n_tiles * n_tiles, n_rb, 2)  -- valid pixels, pixels > 0
    """
    ny, nx = frame.shape
    nr1 = n_rb + 1  # slot n_rb collects the invalid pixels: no branch in the loop
    size = n_tiles * n_tiles * nr1 * 2
    acc_c = np.empty((nchunks, size), dtype=np.int64)
    for c in prange(nchunks):
        a = acc_c[c]
        _zero(a)
        for i in range(c * ny // nchunks, (c + 1) * ny // nchunks):
            if (i % row_step) != 0:
                continue
            trow = (i * n_tiles // ny) * n_tiles
            row = frame[i]
            rbr = rbmap[i]
            for k in range(n_tiles):
                base = (trow + k) * nr1 * 2
                for j in range(tile_col[k], tile_col[k + 1]):
                    r = min(np.int64(rbr[j]), n_rb)
                    v = row[j]
                    ok = (v >= lo_valid) & (v <= hi_valid)
                    q = base + 2 * (r if ok else n_rb)
                    a[q] += 1
                    a[q + 1] += v > 0
    out = _sum_chunks(acc_c, np.empty(size, dtype=np.int64))
    return out.reshape(n_tiles * n_tiles, nr1, 2)[:, :n_rb, :]

@njit(cache=True, nogil=True)
def _sector_line_sig(acc, nb, flank_in, flank_out):
    """Per-sector significance of a narrow ring at each bin of the sector profiles.

    ``acc`` from :func:`_sector_profiles`. The significance of a ring at bin
    ``r`` is (mean of bins r-1..r+1 - mean of the flanks ``flank_in..flank_out``
    bins away on both sides) / Poisson noise of that 3-bin mean at the flank
    level; it is undefined where either has fewer than 8 pixels.

    Returns
    -------
    sig : float64 (N_ICE_SECTORS, nb)
        0 where undefined.
    defined : float64 (N_ICE_SECTORS, nb)
        1 where ``sig`` is defined, else 0 (terms of a centre's score).
    """
    ns = acc.shape[1] // nb
    sig = np.zeros((ns, nb))
    defined = np.zeros((ns, nb))
    cn = np.zeros(nb + 1)
    cz = np.zeros(nb + 1)
    for s in range(ns):
        for r in range(nb):
            cn[r + 1] = cn[r] + acc[0, s * nb + r]
            cz[r + 1] = cz[r] + acc[1, s * nb + r]
        for r in range(flank_out, nb - flank_out):
            n3 = cn[r + 2] - cn[r - 1]
            if n3 < 8.0:
                continue
            nf = (cn[r - flank_in + 1] - cn[r - flank_out]) + (cn[r + flank_out + 1] - cn[r + flank_in])
            if nf < 8.0:
                continue
            z3 = (cz[r + 2] - cz[r - 1]) / n3
            zf = ((cz[r - flank_in + 1] - cz[r - flank_out]) + (cz[r + flank_out + 1] - cz[r + flank_in])) / nf
            sig[s, r] = (z3 - zf) * math.sqrt(n3 / max(zf, 0.25))
            defined[s, r] = 1.0
    return sig, defined


@njit(cache=True, nogil=True, inline="always")
def _centre_score(tab, cnt, line_rad, b_lo, ux, uy, ox, oy, sstep):
    """Summed line significance / sqrt(terms) of ring centre (ox, oy) (bins), every ``sstep``-th sector.

    Around a centre o, a ring of radius R crosses the ray from the believed
    centre along u at rho = o.u + sqrt(R^2 - |o x u|^2)."""
    ns, nb = tab.shape
    nl = line_rad.shape[0]
    oo = ox * ox + oy * oy
    t_sum = 0.0
    c_sum = 0.0
    for s in range(0, ns, sstep):
        p = ox * ux[s] + oy * uy[s]
        q2 = oo - p * p
        for k in range(nl):
            d = line_rad[k] * line_rad[k] - q2
            if d <= 0.0:
                continue
            r = int(math.floor(p + math.sqrt(d) - b_lo + 0.5))
            if 0 <= r < nb:
                t_sum += tab[s, r]
                c_sum += cnt[s, r]
    return t_sum / math.sqrt(c_sum) if c_sum > 0.0 else 0.0


@njit(cache=True, nogil=True)
def _ice_centre_search(tab, cnt, line_rad, b_lo, ux, uy, shift, step):
    """Ring centre within ``shift`` bins of the believed one that best fits the ice lines.

    ``tab``, ``cnt`` (significance and where it is defined, from
    :func:`_sector_line_sig`) cover rings ``b_lo..``; the
    lines have radii ``line_rad`` (bins) around the true beam. The score of a
    centre is the sum over sectors (unit directions (ux, uy)) and lines of
    ``tab`` where the line crosses the sector's ray (:func:`_centre_score`),
    divided by sqrt(number of terms): a Poisson z. Centres are tried on a
    grid of ``step`` bins in every other sector, each term taking its best
    within +-step/2 bins, then on a 1-bin grid in all sectors around the best.

    Returns
    -------
    best, ox, oy, at_believed : float
        Best score and its centre (bins), and the score of (0, 0).
    """
    ns, nb = tab.shape
    half = step // 2
    # coarse tables (every other sector): the best within +-half bins, a
    # term only where the significance is defined; running max over blocks of the window
    # (van Herk / Gil-Werman) on the row padded with -inf by half each side
    ctab = np.zeros((ns, nb))
    ccnt = np.zeros((ns, nb))
    w = 2 * half + 1
    npad = nb + 2 * half
    fwd = np.empty(npad)
    bwd = np.empty(npad)
    for s in range(0, ns, 2):
        for i in range(npad):
            r = i - half
            v = tab[s, r] if 0 <= r < nb and cnt[s, r] > 0.0 else -np.inf
            fwd[i] = v if i % w == 0 else max(fwd[i - 1], v)
        for i in range(npad - 1, -1, -1):
            r = i - half
            v = tab[s, r] if 0 <= r < nb and cnt[s, r] > 0.0 else -np.inf
            bwd[i] = v if (i % w == w - 1 or i == npad - 1) else max(bwd[i + 1], v)
        for r in range(nb):
            m = max(bwd[r], fwd[r + 2 * half])
            if m > -np.inf:
                ctab[s, r] = m
                ccnt[s, r] = 1.0
    at0 = _centre_score(tab, cnt, line_rad, b_lo, ux, uy, 0.0, 0.0, 1)
    best_c = -1.0e300
    cx = 0
    cy = 0
    n = shift // step
    for iy in range(-n, n + 1):
        for ix in range(-n, n + 1):
            ox = ix * step
            oy = iy * step
            if ox * ox + oy * oy > shift * shift:
                continue
            v = _centre_score(ctab, ccnt, line_rad, b_lo, ux, uy, float(ox), float(oy), 2)
            if v > best_c:
                best_c = v
                cx = ox
                cy = oy
    best = at0
    bx = 0.0
    by = 0.0
    for oy in range(cy - half - 1, cy + half + 2):
        for ox in range(cx - half - 1, cx + half + 2):
            if ox * ox + oy * oy > shift * shift:
                continue
            v = _centre_score(tab, cnt, line_rad, b_lo, ux, uy, float(ox), float(oy), 1)
            if v > best:
                best = v
                bx = float(ox)
                by = float(oy)
    return best, bx, by, at0


#: Unit direction of each wide-search sector's middle.
_SECTOR_UX = np.cos((np.arange(N_ICE_SECTORS) + 0.5) * (2.0 * math.pi / N_ICE_SECTORS))
_SECTOR_UY = np.sin((np.arange(N_ICE_SECTORS) + 0.5) * (2.0 * math.pi / N_ICE_SECTORS))


@njit(cache=True, nogil=True)
def _overload_count(frame, index, nbins, cx, cy, half, sat, lo_valid, hi_valid):
    """Pixels >= ``sat`` with a valid 4-neighbour >= ``sat / 4`` inside the boxes
    ``cy +- half`` (rows) x ``cx +- half`` (columns), each pixel counted once
    where boxes overlap. Masked (index >= nbins) and out-of-range pixels never
    count, neither as the pixel nor as its neighbour."""
    ny, nx = frame.shape
    sat_c = sat / 4.0
    n = 0
    for k in range(cx.shape[0]):
        i0 = max(cy[k] - half[k], 0)
        i1 = min(cy[k] + half[k] + 1, ny)
        j0 = max(cx[k] - half[k], 0)
        j1 = min(cx[k] + half[k] + 1, nx)
        for i in range(i0, i1):
            for j in range(j0, j1):
                if np.int64(index[i, j]) >= nbins:
                    continue
                v = np.float64(frame[i, j])
                if not (v >= sat and v >= lo_valid and v <= hi_valid):
                    continue
                bright = False
                for d in range(4):
                    ii = i + (1 if d == 0 else (-1 if d == 1 else 0))
                    jj = j + (1 if d == 2 else (-1 if d == 3 else 0))
                    if ii < 0 or ii >= ny or jj < 0 or jj >= nx or np.int64(index[ii, jj]) >= nbins:
                        continue
                    w = np.float64(frame[ii, jj])
                    if w >= sat_c and w >= lo_valid and w <= hi_valid:
                        bright = True
                        break
                if not bright:
                    continue
                seen = False  # already counted in an earlier box
                for q in range(k):
                    if abs(i - cy[q]) <= half[q] and abs(j - cx[q]) <= half[q]:
                        seen = True
                        break
                if not seen:
                    n += 1
    return n


def overload_count(frame: np.ndarray, index: np.ndarray, nbins: int, peaks, saturation: float, *,
                   lo_valid: float = 0.0, hi_valid: float = 1.0e300) -> int:
    """Overloaded pixels of the saturated peaks, at full resolution.

    Around every peak whose brightest pixel reaches ``saturation``, a box of
    centroid +- min(floor(sqrt(npix)) + 2, :data:`OVERLOAD_BOX_MAX`) px is
    read; a pixel counts when it is >= ``saturation`` and a 4-neighbour is >=
    ``saturation / 4`` (both valid: ``index < nbins`` and within
    ``lo_valid..hi_valid``). Overlapping boxes count a pixel once. The main
    pass reads every 4th row and sees about a quarter of these pixels.

    Parameters
    ----------
    frame : ndarray, shape (rows, columns)
        Kernel-dtype frame (see :func:`frame_features`).
    index : ndarray, shape (rows, columns)
        Radial bin per pixel; ``index >= nbins`` is masked.
    nbins : int
        Number of radial bins.
    peaks : Peaks or None
        :func:`edge.find_peaks` result (centroid ``x`` column, ``y`` row, px).
    saturation : float
        Count cutoff; <= 0 gives 0.
    lo_valid, hi_valid : float
        Valid value range (see :func:`edge.background.prepare_frame`).

    Returns
    -------
    int
    """
    if peaks is None or len(peaks) == 0 or not saturation or saturation <= 0:
        return 0
    top = np.asarray(peaks.max_value, np.float64) >= saturation
    if not top.any():
        return 0
    cx = np.floor(np.asarray(peaks.x, np.float64)[top] + 0.5).astype(np.int64)
    cy = np.floor(np.asarray(peaks.y, np.float64)[top] + 0.5).astype(np.int64)
    half = np.minimum(np.floor(np.sqrt(np.asarray(peaks.npix, np.float64)[top])).astype(np.int64) + 2,
                      OVERLOAD_BOX_MAX)
    return int(_overload_count(frame, index, np.int64(nbins), cx, cy, half, float(saturation), float(lo_valid),
                               float(hi_valid)))


# ---------------------------------------------------------------------------
# Per-geometry tables (cached on the Geometry instance)
# ---------------------------------------------------------------------------
def _tile_edges(n: int) -> np.ndarray:
    """First index of each of the :data:`N_TILES` tiles along an axis of ``n`` pixels, and ``n``."""
    return np.array([(k * n + N_TILES - 1) // N_TILES for k in range(N_TILES + 1)], dtype=np.int64)


def _tables(geometry: Geometry, stats: RadialStats, row_step: int):
    key = ("anomaly_features", stats.bins.nbins, stats.bins.width, geometry.beam_center, int(row_step))
    tab = geometry._cache.get(key)
    if tab is None:
        radius = stats.bins.radius
        rbin = np.searchsorted(RADIAL_EDGES_PX, radius, side="right").astype(np.int64)
        ny, nx = geometry.shape
        tile_col = _tile_edges(nx)
        bx, by = geometry.beam_center
        seg, row_ptr = _row_segments(stats.bins.index, int(stats.bins.nbins), rbin, tile_col,
                                     float(bx), float(by), int(row_step))
        line_r = np.asarray(geometry.radius_for_d(ICE_LINES_A), dtype=np.float64) / stats.bins.width
        # ring band of the wide ring-centre search (strongest lines +- shift + flanks)
        lr = line_r[:ICE_SECTOR_LINES]
        lr = lr[np.isfinite(lr)]
        reach = (ICE_SHIFT_PX + 30.0) / stats.bins.width
        if len(lr):
            b_lo = int(max(lr.min() - reach, 0))
            b_hi = int(min(lr.max() + reach + 1, stats.bins.nbins))
        else:
            b_lo = b_hi = 0
        band = (b_lo, max(b_hi, b_lo), (lr - b_lo).astype(np.float64))
        tab = (rbin, (seg, row_ptr), line_r, band)
        geometry._cache[key] = tab
    return tab


def _ring_table(stats: RadialStats) -> np.ndarray:
    """Per-ring constants of :func:`_accumulate`: mu, mu + 5 sd, 1 / sd, P(0), hot level."""
    mu = np.nan_to_num(np.asarray(stats.mean, dtype=np.float64), nan=0.0)
    mu = np.maximum(mu, 0.0)
    sig = np.nan_to_num(np.asarray(stats.sigma, dtype=np.float64), nan=0.0)
    # Poisson floor: the clipped sigma underestimates the noise of low counts
    sd = np.maximum(np.maximum(sig, np.sqrt(mu)), 0.5)
    tab = np.empty((len(mu), 5), dtype=np.float64)
    tab[:, 0] = mu
    tab[:, 1] = mu + BRIGHT_SIGMA * sd
    tab[:, 2] = 1.0 / sd
    tab[:, 3] = np.exp(-mu)
    tab[:, 4] = mu + np.maximum(HOT_SIGMA * sd, HOT_MIN_COUNTS)
    return tab


def _nchunks() -> int:
    return max(1, numba.get_num_threads()) * 2


#: Largest fraction of geometry-valid pixels that may be NaN/inf (float frames
#: mark single bad pixels with NaN; more than this is a broken frame).
MAX_NAN_FRACTION = 0.01


def _check_finite(arr: np.ndarray, index: np.ndarray, nbins: int) -> None:
    if arr.dtype.kind != "f":
        return
    bad = ~np.isfinite(arr)
    if bad.all():
        raise FeatureError("frame is all NaN/inf")
    valid = index < nbins
    n_bad = int(np.count_nonzero(bad & valid))
    if n_bad > MAX_NAN_FRACTION * max(int(np.count_nonzero(valid)), 1):
        raise FeatureError(f"frame has NaN/inf on {n_bad} pixels the geometry says are valid "
                           f"(more than {MAX_NAN_FRACTION:.0%}); mask them in the geometry")


def _wide_ring_search(arr, geometry: Geometry, stats: RadialStats, tab: np.ndarray, band, lo_valid: float,
                      hi_valid: float) -> tuple[float, float, float, float] | None:
    """:func:`wide_ring_centre` on a kernel-dtype frame with its ring table and
    band (from :func:`_tables`): best score, centre (px), score at the
    believed centre; None without a ring band."""
    b_lo, b_hi, line_off = band
    if b_hi - b_lo <= 60 or not len(line_off):
        return None
    width = float(stats.bins.width)
    bx, by = geometry.beam_center
    acc = _sector_profiles(arr, stats.bins.index, tab[:, 0], 1.0 / tab[:, 2], float(bx), float(by), int(b_lo),
                           int(b_hi), width, float(lo_valid), float(hi_valid), int(ICE_ROW_STEP), _nchunks())
    sig, defined = _sector_line_sig(acc, int(b_hi - b_lo), max(int(round(6 / width)), 2),
                                    max(int(round(20 / width)), 4))
    best, ox, oy, at0 = _ice_centre_search(sig, defined, line_off + b_lo, float(b_lo), _SECTOR_UX, _SECTOR_UY,
                                           int(round(ICE_SHIFT_PX / width)),
                                           max(int(round(ICE_SEARCH_STEP_PX / width)), 2))
    return float(best), float(ox * width), float(oy * width), float(at0)


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------
def frame_features(frame: np.ndarray, geometry: Geometry, *, stats: RadialStats | None = None,
                   peaks=None, row_step: int = ROW_STEP) -> np.ndarray:
    """Anomaly-model input vector of one frame.

    Parameters
    ----------
    frame : ndarray, shape (rows, columns)
        Raw counts, any integer or float dtype. Negative values are detector
        gap/bad-pixel markers (masked); unsigned frames use the dtype maximum.
    geometry : Geometry
        Believed beam centre, distance, wavelength, mask and saturation
        (count cutoff). Without a saturation the saturation features are 0.
    stats : RadialStats, optional
        :func:`edge.radial_stats` of this frame; computed when omitted
        (about 1 ms per megapixel).
    peaks : Peaks, optional
        :func:`edge.find_peaks` result of this frame; computed when omitted.
    row_step : int
        Read every ``row_step``-th row for the tile/stripe/scalar sums. The
        model was trained with the default; keep it.

    Returns
    -------
    ndarray of float32, shape (N_FEATURES,)
        See :data:`FEATURE_NAMES`.

    Raises
    ------
    FeatureError
        Frame not 2-D or of an unsupported dtype, shape not matching the
        geometry, all NaN/inf or NaN/inf on more than :data:`MAX_NAN_FRACTION`
        of the geometry-valid pixels (isolated NaN are masked pixels), missing
        geometry.
    """
    if not isinstance(geometry, Geometry):
        raise FeatureError(f"geometry must be an edge.Geometry, got {type(geometry).__name__}")
    try:
        prepared = prepare_frame(frame, None, geometry=geometry)
    except ValueError as exc:
        raise FeatureError(str(exc)) from None
    arr = prepared[0]
    if stats is None:
        stats = radial_stats(arr, geometry=geometry, _prepared=prepared)
    elif stats.bins.index.shape != arr.shape:
        raise FeatureError(f"stats were computed for shape {stats.bins.index.shape}, frame is {arr.shape}")
    _check_finite(arr, stats.bins.index, stats.bins.nbins)
    if peaks is None:
        from .spotfinding import find_peaks

        peaks = find_peaks(arr, geometry=geometry, stats=stats)
    return frame_features_from_parts(arr, geometry, stats, peaks, lo_valid=prepared[2], hi_valid=prepared[3],
                                     row_step=row_step)


def _radial_groups(tile_ids: np.ndarray, shape: tuple[int, int], bx: float, by: float) -> np.ndarray:
    """Four equal groups of tiles (0 = nearest) by the distance of their centre from the beam."""
    ny, nx = shape
    rad = np.hypot((tile_ids // N_TILES + 0.5) * ny / N_TILES - by, (tile_ids % N_TILES + 0.5) * nx / N_TILES - bx)
    return np.argsort(np.argsort(rad, kind="stable"), kind="stable") * 4 // len(tile_ids)


def _rb_map(geometry: Geometry, stats: RadialStats) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel radial bin of :func:`_tile_radial_nonzero` (uint8; 255 outside
    the valid area) and the column-tile edges, cached per geometry."""
    key = ("anomaly_nonzero_rb", stats.bins.nbins, stats.bins.width, geometry.beam_center)
    tab = geometry._cache.get(key)
    if tab is None:
        nbins = int(stats.bins.nbins)
        idx = stats.bins.index
        rb = (np.arange(nbins, dtype=np.int64) * N_NZ_RBINS) // max(nbins, 1)
        rbmap = np.where(idx < nbins, rb[np.minimum(idx, max(nbins - 1, 0))], 255).astype(np.uint8)
        nx = geometry.shape[1]
        tile_col = _tile_edges(nx)
        tab = (rbmap, tile_col)
        geometry._cache[key] = tab
    return tab


def _tile_nonzero_z(arr, geometry: Geometry, stats: RadialStats, lo_valid: float, hi_valid: float,
                    row_step: int) -> np.ndarray:
    """Poisson z, per tile, of its count of pixels reading > 0 against the
    count expected from the frame's own nonzero fraction at each radius
    (:data:`N_NZ_RBINS` radial bins over all tiles, so beamstop shadow and
    scatter fall-off are in the expectation), with a relative systematic
    error :data:`NZ_SYSTEMATIC` added to the Poisson variance; tiles with
    < 16 sampled pixels are left out."""
    rbmap, tile_col = _rb_map(geometry, stats)
    acc = _tile_radial_nonzero(arr, rbmap, N_NZ_RBINS, tile_col, N_TILES, float(lo_valid), float(hi_valid),
                               int(row_step), _nchunks()).astype(np.float64)
    n, c = acc[:, :, 0], acc[:, :, 1]
    p = c.sum(axis=0) / np.maximum(n.sum(axis=0), 1.0)
    e = n @ p
    nt = n.sum(axis=1)
    ok = nt >= 16
    # 5 % systematic on top of Poisson: real detectors' flat-field and shadow
    # structure stays below it; on sparse frames Poisson dominates
    return (c.sum(axis=1)[ok] - e[ok]) / np.sqrt(e[ok] + 1.0 + (NZ_SYSTEMATIC * e[ok]) ** 2)


def _signed_log(z: float) -> float:
    return math.copysign(math.log1p(abs(z)), z)


def _ice_ring_z(arr, geometry: Geometry, stats: RadialStats, peaks, lo_valid: float, hi_valid: float) -> list[float]:
    """Full-resolution ice-ring evidence (around the best-fitting ring centre,
    :func:`edge.evidence.ice.centred_ring_profile`) as five numbers: signed log1p of the
    Poisson z of the three strongest lines and the largest of the weaker
    ones, and log2 of the largest contrast among lines with z >= 3 (0 if
    none or no line on the detector)."""
    from .evidence.ice import centred_ring_profile, ice_ring_evidence  # imports this module: not at the top

    mean, count, _ = centred_ring_profile(arr, geometry, stats, peaks=peaks, lo_valid=lo_valid, hi_valid=hi_valid)
    rings = {round(r["d_A"], 3): r for r in ice_ring_evidence(mean, count, geometry, bin_width=stats.bins.width)}
    z = [rings[round(float(d), 3)]["z"] if round(float(d), 3) in rings else 0.0 for d in ICE_LINES_A]
    weak = max(z[3:]) if len(z) > 3 else 0.0
    con = [r["contrast"] for r in rings.values() if r["z"] >= 3.0]
    z3 = [float(np.clip(v, -50.0, 1.0e4)) for v in z[:3]]
    return [_signed_log(v) for v in z3] + [_signed_log(float(np.clip(weak, -50.0, 1.0e4))),
                                          float(np.clip(np.log2(max(con)), 0.0, 4.0)) if con else 0.0]


def frame_features_from_parts(arr: np.ndarray, geometry: Geometry, stats: RadialStats, peaks, *,
                              lo_valid: float = 0.0, hi_valid: float = 1.0e300,
                              row_step: int = ROW_STEP) -> np.ndarray:
    """:func:`frame_features` for an already validated kernel-dtype frame (no checks)."""
    rbin, (seg, row_ptr), line_r, (b_lo, b_hi, line_off) = _tables(geometry, stats, row_step)
    tab = _ring_table(stats)
    mu = tab[:, 0]
    sd = 1.0 / tab[:, 2]
    sat = float(geometry.saturation) if geometry.saturation else 0.0
    bx, by = geometry.beam_center
    grid, tiles, cols, rows, band_cols = _accumulate(arr, stats.bins.index, tab, rbin, N_RINGS, seg, row_ptr, N_TILES,
                                          float(bx), float(by), float(lo_valid), float(hi_valid), sat,
                                          int(row_step), int(INNER_FULL_PX), _nchunks())
    out = np.zeros(N_FEATURES, dtype=np.float64)
    k = 0
    # polar grid
    n, sv, smu = grid
    nn = np.maximum(n, 1.0)
    ratio = np.where(n > 0, np.log2((sv / nn + LOG_EPS) / (smu / nn + LOG_EPS)), 0.0)
    ratio = np.clip(ratio, -8.0, 8.0).reshape(N_RINGS, N_SECTORS)
    out[k : k + N_RINGS * N_SECTORS] = ratio.ravel()
    k += N_RINGS * N_SECTORS
    ang = np.exp(2j * np.pi * (np.arange(N_SECTORS) + 0.5) / N_SECTORS)
    out[k : k + N_RINGS] = np.abs(ratio @ ang) * (2.0 / N_SECTORS)
    k += N_RINGS
    # tiles
    tn = tiles[_T_N]
    ok = tn >= 16
    if ok.any():
        t = tiles[:, ok]
        tnn = t[_T_N]
        zx = (t[_T_ZERO] - t[_T_EZERO]) / tnn
        tr = np.log2((t[_T_SUMV] / tnn + LOG_EPS) / (t[_T_SUMMU] / tnn + LOG_EPS))
        tb = np.log10(t[_T_BRIGHT] / tnn + 1e-5)
        out[k : k + 8] = [zx.max(), zx.mean(), zx.min(), tr.max(), tr.min(), tr.std(), tb.max(), np.median(tb)]
    k += 8
    # stripes
    for acc in (cols, rows):
        good = acc[0] >= 16
        if good.any():
            zc = acc[1, good] / np.sqrt(acc[0, good])
            out[k] = np.log1p(max(zc.max(), 0.0))
            out[k + 1] = -np.log1p(max(-zc.min(), 0.0))
        k += 2
    # scalars
    ntot = tn.sum()
    tot = tiles.sum(axis=1)
    if ntot > 0:
        mean_v = tot[_T_SUMV] / ntot
        mean_mu = tot[_T_SUMMU] / ntot
        zero_frac = tot[_T_ZERO] / ntot
        out[k : k + 7] = [
            np.log10(mean_v + 0.01),
            np.log10(mean_mu + 0.01),
            zero_frac,
            zero_frac - tot[_T_EZERO] / ntot,
            np.log10(tot[_T_BRIGHT] / ntot + 1e-6),
            np.log10(tot[_T_SAT] / ntot + 1e-7),
            np.log10(1.0 + tot[_T_SATC] * row_step),
        ]
    k += 7
    # peaks: density per megapixel of (estimated) valid area
    n_sampled_rows = len(range(0, arr.shape[0], row_step))
    mpix = max(ntot * arr.shape[0] / max(n_sampled_rows, 1), 1.0) / 1.0e6
    npk = len(peaks) if peaks is not None else 0
    if npk:
        strong = int(np.count_nonzero(np.asarray(peaks.snr) >= 10.0))
        # an overloaded spot saturates a core of several pixels; one or two
        # saturated pixels in a "peak" are a defective pixel and its neighbour
        nsat = int(np.count_nonzero(np.asarray(peaks.saturated) & (np.asarray(peaks.npix) >= MIN_SAT_PEAK_PIX)))
    else:
        strong = nsat = 0
    out[k : k + 4] = [np.log10(1.0 + npk / mpix), np.log10(1.0 + strong / mpix), np.log10(1.0 + nsat),
                      nsat / (npk + 10.0)]
    k += 4
    # ice rings from the clipped ring means
    nl = len(ICE_LINES_A)
    contrast, signif, visible = _ring_contrast(mu, line_r, 3, 8, 24)
    out[k : k + nl] = np.clip(contrast, -2.0, 20.0)
    k += nl
    out[k] = np.log1p(max(signif.max(), 0.0)) if visible.any() else 0.0
    out[k + 1] = visible.mean()
    k += 2
    # wide ring-centre search (rings around a beam far off the believed
    # centre): best score, its gain over the believed centre, distance (px)
    wide = _wide_ring_search(arr, geometry, stats, tab, (b_lo, b_hi, line_off), lo_valid, hi_valid)
    if wide is not None:
        best, ox, oy, at0 = wide
        out[k : k + 3] = [np.log1p(max(best, 0.0)), np.log1p(max(best - at0, 0.0)), np.log1p(math.hypot(ox, oy))]
    k += 3
    # fraction of the (sampled) valid area in tiles that read mostly zero
    if ok.any() and ntot > 0:
        out[k] = float(tn[ok][zx > DEAD_TILE_EXCESS].sum() / ntot)
    k += 1
    # dead readout lines: excess of exact zeros over Poisson in a column, and
    # in a tile's part of a sampled row (a stripe spans one module, not the frame)
    good = cols[0] >= 64
    if good.any():
        out[k] = float((cols[2, good] / cols[0, good]).max())
    out[k + 1] = float(rows[2].max()) if rows.shape[1] else 0.0
    k += 2
    # hot clusters and other large connected "peaks" (Bragg spots are small)
    if npk:
        npix = np.asarray(peaks.npix)
        out[k] = np.log10(1.0 + float(npix.max()))
        out[k + 1] = np.log10(1.0 + float(np.count_nonzero(npix >= LARGE_PEAK_NPIX)))
    k += 2
    # hot clusters too large for the peak finder: long runs of bright pixels
    out[k] = np.log2(1.0 + rows[3].max()) if rows.shape[1] else 0.0
    out[k + 1] = np.log10(1.0 + float(np.count_nonzero(rows[3] >= LONG_RUN_PX)))
    k += 2
    # hot clusters: 2-D blocks of unsaturated pixels far above their ring,
    # counted only beyond what the largest real Bragg spots reach
    out[k] = np.log2(1.0 + max(rows[4].max() - HOT_BLOCK_PX, 0.0)) if rows.shape[1] else 0.0
    k += 1
    # absolute counts of clear peaks (a crystal gives tens or more at any size)
    # and their shape: Bragg spots are sharp, background mismatch gives diffuse blobs
    if npk:
        snr = np.asarray(peaks.snr)
        clear = snr >= 5.0
        npix = np.asarray(peaks.npix)
        # capped: beyond CLEAR_PEAKS_CAP the count says nothing about blank
        # frames and only grows with the detector size
        out[k] = np.log10(1.0 + float(min(np.count_nonzero(clear), CLEAR_PEAKS_CAP)))
        out[k + 1] = np.log10(1.0 + float(min(np.count_nonzero(snr >= 20.0), CLEAR_PEAKS_CAP)))
        if clear.any():
            inten = np.asarray(peaks.intensity)[clear]
            top = (np.asarray(peaks.max_value) - np.asarray(peaks.background))[clear]
            out[k + 2] = float(np.median(np.log10(npix[clear])))
            out[k + 3] = float(np.median(np.clip(top / np.maximum(inten, 1e-9), 0.0, 1.0)))
            out[k + 4] = float(np.mean(npix[clear] >= 50))
            # fakes pile up on one side of a misplaced beam and on ice rings;
            # Bragg spots spread around the centre and across resolution
            phi = np.arctan2(np.asarray(peaks.y)[clear] - by, np.asarray(peaks.x)[clear] - bx)
            out[k + 5] = float(np.hypot(np.cos(phi).mean(), np.sin(phi).mean()))
            d = np.asarray(peaks.d)[clear]
            near_ice = np.abs(d[:, None] / ICE_LINES_A[None, :] - 1.0).min(axis=1) < ICE_PEAK_REL
            out[k + 6] = float(np.mean(near_ice))
    k += 7
    # photons on mostly-empty frames, where the ring means read 0: the
    # fraction of sampled pixels reading > 0 (a hot pixel counts once), and
    # how unevenly it falls on four groups of tiles by distance from the beam
    # (chi-square, 3 degrees of freedom; the two busiest tiles left out: a hot
    # cluster is not scatter). Scatter from a beam changes with radius; dark
    # counts are uniform.
    if ok.any():
        nz, nt = t[_T_N] - t[_T_ZERO], t[_T_N]
        out[k] = np.log10(nz.sum() / nt.sum() + 1e-6)
        keep = np.argsort(nz / nt, kind="stable")
        keep = keep[:-2] if len(keep) > 8 else keep
        grp = _radial_groups(np.flatnonzero(ok)[keep], arr.shape, bx, by)
        n_g = np.bincount(grp, nt[keep], 4)
        c_g = np.bincount(grp, nz[keep], 4)
        p0 = c_g.sum() / n_g.sum()
        g = n_g > 0
        chi2 = np.sum((c_g[g] - n_g[g] * p0) ** 2 / (n_g[g] * p0 * (1.0 - p0) + 1e-12))
        out[k + 1] = np.log1p(chi2)
        # a dead or hot region on a sparse frame: the deficit / excess of
        # pixels reading > 0 in a tile, in Poisson sigmas, against what the
        # frame's nonzero fraction at each radius predicts (the zero-excess
        # features compare with the clipped ring means, which read 0 there)
        z_t = _tile_nonzero_z(arr, geometry, stats, lo_valid, hi_valid, row_step)
        if len(z_t):
            out[k + 2] = np.log1p(max(-z_t.min(), 0.0))
            out[k + 3] = np.log1p(max(z_t.max(), 0.0))
    k += 4
    # ice rings at full resolution: the Poisson z of each line's excess over
    # its flanks in the profile of the ring bands (the evidence gate's own
    # numbers, edge.evidence.ice); every 4th row would halve a faint ring's z
    out[k : k + 5] = _ice_ring_z(arr, geometry, stats, peaks, lo_valid, hi_valid)
    k += 5
    # hot readout stripes: the largest fraction of bright pixels in a tile's
    # part of a sampled row, and in a column within a band of half a tile's
    # rows (Bragg spots fill neither; a stripe across a module, >= 195 rows,
    # fills >= 60 % of some band of <= 2 x 195 / 2.5 rows)
    out[k] = float(rows[5].max()) if rows.shape[1] else 0.0
    good = band_cols[0] >= MIN_BAND_COL_PX
    if good.any():
        out[k + 1] = float((band_cols[1, good] / band_cols[0, good]).max())
    k += 2
    # overloaded spot cores at full resolution, as a 0/1 indicator of the
    # label's rule: the sampled rows see ~1 in 4 of these pixels, and as a
    # count the network did not make the 3-vs-4 cut (one pixel was within
    # the training input noise)
    n_over = overload_count(arr, stats.bins.index, stats.bins.nbins, peaks, sat, lo_valid=lo_valid,
                            hi_valid=hi_valid)
    out[k] = 1.0 if n_over >= MIN_OVERLOAD_PIXELS else 0.0
    k += 1
    assert k == N_FEATURES
    return out.astype(np.float32)


def wide_ring_centre(frame: np.ndarray, geometry: Geometry, *, stats: RadialStats | None = None) -> dict | None:
    """Ring centre within :data:`ICE_SHIFT_PX` of the believed beam centre that
    best fits the three strongest ice lines (the features' wide search).

    Parameters
    ----------
    frame : 2-D array (rows, columns), counts
    geometry : Geometry
    stats : RadialStats, optional
        Radial statistics of ``frame`` (computed if omitted).

    Returns
    -------
    dict or None
        ``z`` (Poisson z of the lines around the best centre), ``z_at_believed_centre``,
        ``centre_offset_px`` ((dx, dy) from the believed centre, px; +x = columns,
        +y = rows); None when the ice lines are not on the detector.
    """
    arr, _, lo, hi = prepare_frame(frame, geometry=geometry)
    if stats is None:
        stats = radial_stats(arr, geometry=geometry)
    # the ring band does not depend on the row step: the features' tables (cached) serve
    wide = _wide_ring_search(arr, geometry, stats, _ring_table(stats), _tables(geometry, stats, ROW_STEP)[3], lo, hi)
    if wide is None:
        return None
    best, ox, oy, at0 = wide
    return {"z": best, "z_at_believed_centre": at0, "centre_offset_px": (ox, oy)}


def warmup(dtypes=(np.int32, np.uint16, np.uint32, np.float32)) -> None:
    """Compile (or load from cache) the kernels for the common frame dtypes."""
    from .sim import simulate

    from .evidence.ice import warmup as evidence_warmup  # imports this module: not at the top

    sf = simulate(layout="1m", seed=0, n_spots=20, beamstop_radius=10.0)
    base = sf.frame
    for dt in dtypes:
        f = np.clip(base, 0, None).astype(dt)
        frame_features(f, sf.geometry)
        evidence_warmup(f, sf.geometry)
