"""Every Numba kernel against a plain NumPy/Python reference on random inputs."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge import background as bgm
from edge import spotfinding as sfm

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = [np.uint16, np.int32, np.uint32, np.float32, np.float64]


@st.composite
def frames(draw, max_side=24):
    """Small random frame (integer-valued, so float sums are exact) with a cell map."""
    ny = draw(st.integers(1, max_side))
    nx = draw(st.integers(1, max_side))
    seed = draw(st.integers(0, 2**32 - 1))
    dtype = draw(st.sampled_from(DTYPES))
    ncell = draw(st.integers(1, 6))
    rng = np.random.default_rng(seed)
    lam = rng.uniform(0.2, 20)
    f = rng.poisson(lam, (ny, nx)).astype(np.float64)
    f[rng.random((ny, nx)) < 0.03] += rng.integers(50, 500)  # spots / hot pixels
    if np.dtype(dtype).kind in "if":
        f[rng.random((ny, nx)) < 0.05] = -1  # gap markers
    if np.dtype(dtype).kind == "f":
        f[rng.random((ny, nx)) < 0.03] = np.nan
    index = rng.integers(0, ncell, (ny, nx)).astype(np.uint16)
    index[rng.random((ny, nx)) < 0.1] = bgm.INVALID_BIN
    return f.astype(dtype), index, ncell, rng


def _hi_valid(frame):
    """The kernels' upper valid value: dtype maximum - 1 for unsigned frames."""
    return float(np.iinfo(frame.dtype).max - 1) if frame.dtype.kind == "u" else 1e300


def _valid_values(frame, lo, hi):
    f = frame.astype(np.float64)
    with np.errstate(invalid="ignore"):
        return f, (f >= lo) & (f <= hi)


@given(frames(), st.integers(1, 3))
@SETTINGS
def test_ring_moments_matches_bincount(data, row_step):
    frame, index, ncell, rng = data
    lo = rng.integers(-1, 3, ncell).astype(np.float64)
    hi = lo + rng.integers(0, 600, ncell)
    got = bgm._ring_moments(frame, index, ncell, lo, hi, row_step, 3)
    f = frame[::row_step].astype(np.float64)
    b = index[::row_step].astype(np.int64)
    ok = b < ncell
    bb, v = b[ok], f[ok]
    with np.errstate(invalid="ignore"):
        sel = (v >= lo[bb]) & (v <= hi[bb])
    ref = np.stack([
        np.bincount(bb[sel], minlength=ncell).astype(np.float64),
        np.bincount(bb[sel], weights=v[sel], minlength=ncell),
        np.bincount(bb[sel], weights=v[sel] ** 2, minlength=ncell),
    ])
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-9)


def _ref_clip(frame, index, nbins, lo_valid, hi_valid, n_iter, nsigma, row_step):
    f = frame[::row_step].astype(np.float64)
    b = index[::row_step].astype(np.int64)
    ok = b < nbins
    bb, v = b[ok], f[ok]
    lo = np.full(nbins, lo_valid)
    hi = np.full(nbins, hi_valid)
    mean = np.zeros(nbins)
    var = np.zeros(nbins)
    count = np.zeros(nbins)
    for _ in range(n_iter):
        with np.errstate(invalid="ignore"):
            sel = (v >= lo[bb]) & (v <= hi[bb])
        n = np.bincount(bb[sel], minlength=nbins).astype(np.float64)
        s1 = np.bincount(bb[sel], weights=v[sel], minlength=nbins)
        s2 = np.bincount(bb[sel], weights=v[sel] ** 2, minlength=nbins)
        moved, total = np.abs(n - count).sum(), n.sum()
        count = n
        has = n > 0
        mean[has] = s1[has] / n[has]
        var[has] = np.maximum(s2[has] / n[has] - mean[has] ** 2, 0)
        sd = np.sqrt(var)
        lo[has] = np.maximum(lo_valid, mean[has] - nsigma * sd[has])
        hi[has] = np.minimum(hi_valid, mean[has] + nsigma * sd[has])
        if moved <= 1e-3 * total:
            break
    return mean, var, count


@given(frames(), st.integers(1, 6), st.floats(1.5, 4.0), st.integers(1, 3))
@SETTINGS
def test_clip_iterations_matches_reference(data, n_iter, nsigma, row_step):
    frame, index, ncell, _ = data
    hi_valid = _hi_valid(frame)
    got = bgm._clip_iterations(frame, index, ncell, 0.0, hi_valid, n_iter, nsigma, row_step, 2)
    ref = _ref_clip(frame, index, ncell, 0.0, hi_valid, n_iter, nsigma, row_step)
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, rtol=1e-9, atol=1e-9)


def _box3(a):
    p = np.pad(a, 1)
    return sum(p[1 + di : 1 + di + a.shape[0], 1 + dj : 1 + dj + a.shape[1]]
               for di in (-1, 0, 1) for dj in (-1, 0, 1))


def _random_thresholds(index, ncell, rng):
    mean = rng.integers(0, 10, ncell).astype(np.float64)
    var = mean + rng.integers(0, 5, ncell)
    return sfm._thresholds(index, mean, var, float(rng.uniform(2, 6)), float(rng.uniform(0, 3)),
                           float(rng.uniform(0, 4)), bool(rng.integers(0, 2)))


def _ref_seeds(frame, th, lo, hi):
    ncell = len(th.mean)
    b = th.index.astype(np.int64)
    inside = b < ncell
    bc = np.minimum(b, ncell - 1)
    f, ok = _valid_values(frame, lo, hi)
    ok &= inside
    d = np.where(ok, f - th.mean[bc], 0.0)
    vv = np.where(ok, th.var[bc], 0.0)
    with np.errstate(invalid="ignore"):
        cand = inside & (f > th.peak[bc]) & (f <= hi)
    seed = cand & (_box3(d) > th.seed_sigma * np.sqrt(_box3(vv)) + th.seed_skew)
    return np.flatnonzero(seed)


@given(frames())
@SETTINGS
def test_seed_kernel_matches_box_sum_reference(data):
    frame, index, ncell, rng = data
    th = _random_thresholds(index, ncell, rng)
    hi = _hi_valid(frame)
    seeds, overflow = sfm.threshold_pixels(frame, th, lo_valid=0.0, hi_valid=hi)
    assert not overflow
    np.testing.assert_array_equal(np.sort(seeds), _ref_seeds(frame, th, 0.0, hi))


@given(frames())
@SETTINGS
def test_seed_kernel_integer_pass_equals_float_pass(data):
    # raw integer frames take an integer-only first pass; it must pick exactly
    # the pixels the float test picks, also when a threshold is an integer
    frame, index, ncell, rng = data
    if frame.dtype.kind not in "iu":
        return
    th = _random_thresholds(index, ncell, rng)
    th = sfm.Thresholds(th.index, th.mean, th.var, th.grow, np.floor(th.peak) + rng.integers(0, 2, ncell) * 0.5,
                        th.seed_sigma, th.seed_skew)
    hi = _hi_valid(frame)
    ipeak, ihi = sfm._integer_peak_table(frame, th, 0.0, hi)
    assert len(ipeak) == 1 << 16
    args = (frame, th.index, th.mean, th.var, th.peak, th.seed_sigma, th.seed_skew, 0.0, hi, 4096, 2)
    fast, _ = sfm._seed_kernel(*args, ipeak, ihi)
    slow, _ = sfm._seed_kernel(*args, sfm._NO_TABLE, 0)
    np.testing.assert_array_equal(np.sort(fast), np.sort(slow))


def test_seed_kernel_reports_overflow():
    rng = np.random.default_rng(0)
    frame = rng.poisson(1000, (20, 20)).astype(np.int32)
    index = np.zeros((20, 20), np.uint16)
    th = sfm._thresholds(index, np.array([0.0]), np.array([1.0]), 1.0, 0.0, 0.0, False)
    seeds, overflow = sfm.threshold_pixels(frame, th, max_candidates=8)
    assert overflow and 0 < len(seeds) <= 8


@given(frames(), st.integers(1, 40))
@SETTINGS
def test_seed_cap_does_not_depend_on_the_thread_count(data, cap):
    # the kernel runs 2 x threads row chunks; the cap applies per half of the
    # rows (the first seeds in row order), so 1, 2, 3 or 4 threads keep the
    # same seeds, also when the buffer overflows
    frame, index, ncell, rng = data
    th = _random_thresholds(index, ncell, rng)
    hi = _hi_valid(frame)
    want = _ref_seeds(frame, th, 0.0, hi)
    half = frame.shape[0] // 2 * frame.shape[1]  # first flat index of the second half
    first, second = want[want < half], want[want >= half]
    expect = np.concatenate([first[:cap], second[:cap]])
    for nchunks in (2, 4, 6, 8):
        got, overflow = sfm._seed_kernel(frame, th.index, th.mean, th.var, th.peak, th.seed_sigma, th.seed_skew,
                                         0.0, hi, cap, nchunks, sfm._NO_TABLE, 0)
        np.testing.assert_array_equal(got, expect)
        assert overflow == (len(first) > cap or len(second) > cap)


def _ref_label(frame, th, seeds, hi):
    ny, nx = frame.shape
    ncell = len(th.grow)
    b = th.index.astype(np.int64)
    f = frame.astype(np.float64)
    with np.errstate(invalid="ignore"):
        grow = (b < ncell) & (f > th.grow[np.minimum(b, ncell - 1)]) & (f <= hi)
    seen = np.zeros((ny, nx), bool)
    regions = []
    for s in seeds:
        i, j = divmod(int(s), nx)
        if seen[i, j]:
            continue
        seen[i, j] = True
        reg, q = [s], deque([(i, j)])
        while q:
            a, c = q.popleft()
            for ii in range(max(a - 1, 0), min(a + 2, ny)):
                for jj in range(max(c - 1, 0), min(c + 2, nx)):
                    if not seen[ii, jj] and grow[ii, jj]:
                        seen[ii, jj] = True
                        reg.append(ii * nx + jj)
                        q.append((ii, jj))
        regions.append(frozenset(reg))
    return regions


@given(frames())
@SETTINGS
def test_label_kernel_matches_bfs_reference(data):
    frame, index, ncell, rng = data
    th = _random_thresholds(index, ncell, rng)
    hi = _hi_valid(frame)
    seeds = rng.permutation(frame.size)[: rng.integers(0, frame.size + 1)]
    regions = sfm.label_regions(frame, th, seeds, hi_valid=hi)
    got = [frozenset(regions.pixels[regions.ptr[k] : regions.ptr[k + 1]].tolist()) for k in range(len(regions))]
    assert got == _ref_label(frame, th, seeds, hi)
    # the shared scratch map is left clean for the next frame
    assert not sfm._marks_for(frame.shape).any()


def _ref_measure(frame, th, regions, lo, hi, ring, min_ring, saturation):
    ny, nx = frame.shape
    f = frame.astype(np.float64)
    ncell = len(th.mean)
    member = np.zeros(ny * nx, bool)
    member[regions.pixels] = True
    member = member.reshape(ny, nx)
    b = th.index.astype(np.int64)
    with np.errstate(invalid="ignore"):
        ok = (b < ncell) & (f >= lo) & (f <= hi)
    rows = []
    for k in range(len(regions)):
        pix = regions.pixels[regions.ptr[k] : regions.ptr[k + 1]]
        yy, xx = np.divmod(pix, nx)
        v = f[yy, xx]
        y0, y1, x0, x1 = yy.min(), yy.max(), xx.min(), xx.max()
        gi, gj = np.mgrid[0:ny, 0:nx]
        cheb = np.maximum(np.maximum(y0 - gi, gi - y1), np.maximum(x0 - gj, gj - x1))
        sel = (cheb >= ring[0]) & (cheb <= ring[1]) & ok & ~member
        kmax = int(np.argmax(v))  # first maximum, as the kernel's strict '>'
        cell = b[yy[kmax], xx[kmax]]
        rn = sel.sum()
        bg = f[sel].mean() if rn >= min_ring else th.mean[cell]
        bvar = max(th.var[cell], th.mean[cell])
        dlt = v - bg
        si = dlt.sum()
        w = np.maximum(dlt, 0)
        var_i = max(si, 0) + len(v) * bvar + (len(v) ** 2 * bvar / rn if rn >= min_ring else 0)
        cx = (w * xx).sum() / w.sum() if w.sum() > 0 else 0.5 * (x0 + x1)
        cy = (w * yy).sum() / w.sum() if w.sum() > 0 else 0.5 * (y0 + y1)
        rows.append([cx, cy, si, np.sqrt(var_i) if var_i > 0 else 0, len(v), v.max(), bg,
                     float((v >= saturation).any()), v.max() - bg])
    return np.array(rows).reshape(-1, 9)


@given(frames(max_side=20), st.integers(1, 2), st.integers(2, 4))
@SETTINGS
def test_measure_kernel_matches_reference(data, inner, outer):
    frame, index, ncell, rng = data
    frame = np.where(np.isnan(frame.astype(np.float64)), 0, frame).astype(frame.dtype)
    th = _random_thresholds(index, ncell, rng)
    hi = _hi_valid(frame)
    seeds = np.flatnonzero((index.ravel() < ncell) & (frame.ravel().astype(float) >= 0))
    seeds = rng.permutation(seeds)[:10]
    regions = sfm.label_regions(frame, th, seeds, hi_valid=hi)
    sat = float(rng.integers(5, 400))
    got = sfm.measure_regions(frame, th, regions, lo_valid=0.0, hi_valid=hi, ring=(inner, outer),
                              min_ring=3, saturation=sat)
    ref = _ref_measure(frame, th, regions, 0.0, hi, (inner, outer), 3, sat)
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-9)
    assert not sfm._marks_for(frame.shape).any()


@given(frames(max_side=16), st.sampled_from([3, 5]))
@SETTINGS
def test_window_stats_match_brute_force(data, window):
    frame, _, _, rng = data
    valid = rng.random(frame.shape) > 0.1
    hi = _hi_valid(frame)
    n, s, q = bgm._integral_images(frame, valid, 0.0, hi, 2)
    ny, nx = frame.shape
    mean = np.empty((ny, nx))
    var = np.empty((ny, nx))
    cnt = np.empty((ny, nx))
    bgm._window_stats(n, s, q, window // 2, 2.0, 2, mean, var, cnt)
    f, ok = _valid_values(frame, 0.0, hi)
    ok &= valid
    h = window // 2
    for i in range(ny):
        for j in range(nx):
            sl = (slice(max(i - h, 0), i + h + 1), slice(max(j - h, 0), j + h + 1))
            v = f[sl][ok[sl]]
            assert cnt[i, j] == len(v)
            if len(v) >= 2:
                assert mean[i, j] == pytest.approx(v.mean(), rel=1e-9, abs=1e-9)
                assert var[i, j] == pytest.approx(max(v.var(ddof=1), 0), rel=1e-7, abs=1e-7)
            else:
                assert np.isnan(mean[i, j])


@given(frames(max_side=16))
@SETTINGS
def test_dispersion_signal_matches_formula(data):
    frame, _, _, rng = data
    ny, nx = frame.shape
    valid = rng.random(frame.shape) > 0.1
    mean = rng.uniform(0.1, 10, (ny, nx))
    var = mean * rng.uniform(0.5, 4, (ny, nx))
    cnt = rng.integers(0, 50, (ny, nx)).astype(np.float64)
    out = np.empty((ny, nx), bool)
    hi = _hi_valid(frame)
    bgm._dispersion_signal(frame, valid, 0.0, hi, mean, var, cnt, 6.0, 3.0, 2, out)
    f, ok = _valid_values(frame, 0.0, hi)
    with np.errstate(invalid="ignore", divide="ignore"):
        ref = (ok & valid & (cnt >= 2) & (var / mean > 1 + 6.0 * np.sqrt(2 / (cnt - 1)))
               & (f > mean + 3.0 * np.sqrt(np.maximum(var, mean))))
    np.testing.assert_array_equal(out, ref)


@given(frames())
@SETTINGS
def test_fill_maps_matches_indexing(data):
    _, index, ncell, rng = data
    bm = rng.random(ncell).astype(np.float32)
    bs = rng.random(ncell).astype(np.float32)
    m = np.empty(index.shape, np.float32)
    s = np.empty(index.shape, np.float32)
    bgm._fill_maps(index, bm, bs, 2, m, s)
    inside = index < ncell
    np.testing.assert_array_equal(m[inside], bm[index[inside]])
    np.testing.assert_array_equal(s[inside], bs[index[inside]])
    assert np.isnan(m[~inside]).all() and np.isnan(s[~inside]).all()


@given(frames(), st.integers(1, 6), st.floats(1.5, 4.0), st.integers(1, 3), st.integers(0, 200))
@SETTINGS
def test_histogram_clipping_equals_pixel_pass_clipping(data, n_iter, nsigma, row_step, offset):
    frame, index, ncell, _ = data
    if frame.dtype.kind == "f":
        frame = np.nan_to_num(frame, nan=-1).astype(np.int32)
    # an offset pushes some rings past the histogram range (exercises the fallback)
    frame = np.where(frame >= 0, frame + offset, frame).astype(frame.dtype)
    hi_valid = _hi_valid(frame)
    bins = bgm.RadialBins(index, ncell, 1.0)
    got = bgm._clip(frame, bins, 0.0, hi_valid, n_iter, nsigma, row_step)
    ref = _ref_clip(frame, index, ncell, 0.0, hi_valid, n_iter, nsigma, row_step)
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, rtol=1e-9, atol=1e-9)


def test_histogram_clipping_is_used_for_counts_and_falls_back_for_high_background():
    rng = np.random.default_rng(0)
    index = np.zeros((50, 50), np.uint16)
    low = rng.poisson(3, (50, 50)).astype(np.int32)
    low[5, 5] = 50000  # a hot pixel stays exact in the sparse list
    hist, ptr, values, complete = bgm._ring_histogram(low, index, 1, 1e300, 1, 2)
    assert complete and values.tolist() == [50000.0]
    high = rng.poisson(500, (400, 400)).astype(np.int32)  # more large values than the list holds
    index = np.zeros(high.shape, np.uint16)
    assert not bgm._ring_histogram(high, index, 1, 1e300, 1, 1)[3]
    bins = bgm.RadialBins(index, 1, 1.0)
    ref = _ref_clip(high, index, 1, 0.0, 1e300, 5, 3.0, 1)
    for g, r in zip(bgm._clip(high, bins, 0.0, 1e300, 5, 3.0, 1), ref):  # the pixel-pass fallback
        np.testing.assert_allclose(g, r, rtol=1e-9)


@SETTINGS
@given(shape=st.tuples(st.integers(1, 4), st.integers(1, 5), st.integers(1, 7)), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([np.int32, np.int64, np.float64]))
def test_chunk_helpers_match_numpy(shape, seed, dtype):
    """The serial helpers the parallel kernels use instead of array expressions."""
    parts = np.random.default_rng(seed).integers(-50, 50, shape).astype(dtype)
    out = bgm._sum_chunks(parts, np.empty(shape[1:], dtype=np.float64 if dtype == np.float64 else np.int64))
    np.testing.assert_array_equal(out, parts.sum(axis=0))
    bgm._zero(parts)
    assert not parts.any()
