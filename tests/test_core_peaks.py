"""find_peaks / subtract_background: accuracy on simulated truth, real frames, edge cases, bad input."""

from __future__ import annotations

import numpy as np
import pytest

import edge
from edge.sim import simulate
from conftest import match_peaks


def _score(sf, peaks):
    t = sf.spots
    d_found, d_true = match_peaks(peaks.x, peaks.y, t["x"], t["y"])
    strong = (t["snr"] >= 5) & t["on_valid"]
    recall = (d_true[strong] <= 2).mean()
    precision = (d_found <= 2).mean() if len(peaks) else 1.0
    return recall, precision, np.median(d_found[d_found <= 2])


@pytest.mark.parametrize("layout,ice,seed", [
    ("1m", False, 11), ("1m", True, 12), ("4m", False, 13), ("4m", True, 14),
])
def test_recall_precision_centroid_on_simulated_truth(layout, ice, seed):
    sf = simulate(layout=layout, ice_rings=ice, seed=seed)
    peaks = edge.find_peaks(sf.frame, geometry=sf.geometry)
    recall, precision, centroid = _score(sf, peaks)
    assert recall >= 0.95, recall
    assert precision >= 0.98, precision
    assert centroid <= 0.25, centroid


def test_local_method_also_finds_spots():
    sf = simulate(layout="1m", seed=21)
    peaks = edge.find_peaks(sf.frame, geometry=sf.geometry, method="local")
    recall, precision, centroid = _score(sf, peaks)
    assert recall >= 0.9 and precision >= 0.95 and centroid <= 0.3


def test_local_background_handles_non_radial_background():
    # a gradient across the detector is invisible to rings but not to windows
    sf = simulate(layout="1m", seed=22, background=1.0)
    ny, nx = sf.frame.shape
    grad = np.random.default_rng(0).poisson(np.linspace(0, 40, nx)[None, :].repeat(ny, 0))
    frame = np.where(sf.frame >= 0, sf.frame + grad, sf.frame).astype(np.int32)
    local = edge.find_peaks(frame, geometry=sf.geometry, method="local")
    _, precision, _ = _score(sf, local)
    assert precision >= 0.95
    sub = edge.subtract_background(frame, geometry=sf.geometry, method="local")
    valid = sf.geometry.valid & (frame >= 0)
    # columns keep no trend after local subtraction
    col_means = np.nanmean(np.where(valid, sub, np.nan), axis=0)
    assert abs(np.nanmean(col_means[-100:]) - np.nanmean(col_means[:100])) < 1.0


def test_peak_fields_and_resolution_limits():
    sf = simulate(layout="1m", seed=5)
    g = sf.geometry
    p = edge.find_peaks(sf.frame, geometry=g)
    assert len(p) > 100
    for name in p.ARRAY_FIELDS:
        assert getattr(p, name).shape == (len(p),)
    assert np.all(p.npix >= 2) and np.all(p.intensity > 0) and np.all(p.snr >= 3)
    np.testing.assert_allclose(p.snr, p.intensity / p.sigma)
    bx, by = g.beam_center
    np.testing.assert_allclose(p.d, g.d_spacing(np.hypot(p.x - bx, p.y - by)))
    limited = edge.find_peaks(sf.frame, geometry=g, d_min=2.5, d_max=6.0)
    assert 0 < len(limited) < len(p)
    assert limited.d.min() >= 2.5 and limited.d.max() <= 6.0
    assert np.isnan(edge.find_peaks(sf.frame, center=g.beam_center, mask=g.mask).d).all()


def test_intensity_estimates_are_unbiased_for_bright_spots():
    sf = simulate(layout="1m", seed=8, mean_intensity=2000)
    p = edge.find_peaks(sf.frame, geometry=sf.geometry)
    t = sf.spots
    d = np.hypot(p.x[:, None] - t["x"][None], p.y[:, None] - t["y"][None])
    k = d.argmin(1)
    ok = (d.min(1) < 1) & (t["snr"][k] > 20)
    ratio = p.intensity[ok] / t["intensity"][k[ok]]
    assert 0.8 < np.median(ratio) < 1.05


def test_real_frames_sensible_counts_and_nothing_in_gaps(real_frames):
    counts = {}
    for key, (frame, geom) in real_frames.items():
        p = edge.find_peaks(frame, geometry=geom)
        counts[key] = len(p)
        # no peak centroid, and no peak pixel, falls in a gap or bad pixel
        yi, xi = np.round(p.y).astype(int), np.round(p.x).astype(int)
        assert np.all(frame[yi, xi] >= 0)
    assert counts["strong1"] >= 300 and counts["strong2"] >= 300
    assert counts["weak"] >= 50
    assert counts["blank"] <= 20
    assert counts["weak"] < min(counts["strong1"], counts["strong2"])


def test_regions_never_cross_gaps():
    # a bright blob straddling a module gap gives one peak on each side
    g = edge.Geometry.for_layout("1m")
    frame = np.random.default_rng(1).poisson(1.0, g.shape).astype(np.int32)
    frame[~g.mask] = -1
    gap_rows = np.flatnonzero(~g.mask.any(axis=1))
    r0, r1 = gap_rows[0] - 1, gap_rows[-1] + 1  # last row above, first row below
    frame[r0 - 1 : r0 + 1, 500:503] = 300
    frame[r1 : r1 + 2, 500:503] = 300
    p = edge.find_peaks(frame, geometry=g)
    near = p[np.abs(p.x - 501) < 3]
    assert len(near) == 2
    assert near.y.max() >= r1 and near.y.min() <= r0


def test_spots_at_borders_are_found():
    g = edge.Geometry.for_layout("1m")
    rng = np.random.default_rng(2)
    frame = rng.poisson(1.0, g.shape).astype(np.int32)
    frame[~g.mask] = -1
    ny, nx = g.shape
    spots = [(0, 0), (0, nx - 2), (ny - 2, 0), (ny - 2, nx - 2), (300, 0)]
    for i, j in spots:
        frame[i : i + 2, j : j + 2] = 200
    p = edge.find_peaks(frame, geometry=g)
    for i, j in spots:
        assert np.min(np.hypot(p.x - (j + 0.5), p.y - (i + 0.5))) < 0.6


@pytest.mark.parametrize("dtype", ["uint16", "uint32", "int32", "float32", "float64", "int64"])
def test_dtypes_give_the_same_peaks(dtype):
    sf = simulate(layout="1m", seed=3)
    ref = edge.find_peaks(sf.frame, geometry=sf.geometry)
    frame = sf.frame.astype(dtype)
    if np.dtype(dtype).kind == "u":
        frame[sf.frame < 0] = np.iinfo(dtype).max  # EIGER marks gaps with the maximum
    p = edge.find_peaks(frame, geometry=sf.geometry)
    assert len(p) == len(ref)
    np.testing.assert_allclose(p.x, ref.x)
    np.testing.assert_allclose(p.intensity, ref.intensity, rtol=1e-6)


def test_non_contiguous_and_big_endian_inputs():
    sf = simulate(layout="1m", seed=4)
    ref = edge.find_peaks(sf.frame, geometry=sf.geometry)
    big = np.zeros((sf.frame.shape[0], sf.frame.shape[1] * 2), np.int32)
    big[:, ::2] = sf.frame
    view = big[:, ::2]
    assert not view.flags.c_contiguous
    assert len(edge.find_peaks(view, geometry=sf.geometry)) == len(ref)
    swapped = sf.frame.astype(">i4")
    assert len(edge.find_peaks(swapped, geometry=sf.geometry)) == len(ref)
    before = sf.frame.copy()
    edge.find_peaks(sf.frame, geometry=sf.geometry)
    np.testing.assert_array_equal(sf.frame, before)  # input untouched


def test_nan_and_inf_pixels_are_masked():
    sf = simulate(layout="1m", seed=6)
    ref = edge.find_peaks(sf.frame, geometry=sf.geometry)
    f = sf.frame.astype(np.float32)
    f[f < 0] = np.nan
    rng = np.random.default_rng(0)
    idx = rng.integers(0, f.size, 2000)
    f.flat[idx[:1000]] = np.nan
    f.flat[idx[1000:]] = np.inf
    p = edge.find_peaks(f, geometry=sf.geometry)
    assert np.all(np.isfinite(p.intensity)) and np.all(np.isfinite(p.x))
    assert abs(len(p) - len(ref)) <= 0.05 * len(ref)
    sub = edge.subtract_background(f, geometry=sf.geometry)
    assert np.isfinite(sub).all()


@pytest.mark.parametrize("frame", [
    np.full((200, 300), -1, np.int32),  # all gaps
    np.full((200, 300), 7, np.int32),  # constant
    np.zeros((200, 300), np.uint16),  # empty
    np.full((200, 300), np.nan, np.float32),  # all NaN
])
def test_degenerate_frames_give_no_peaks(frame):
    p = edge.find_peaks(frame)
    assert len(p) == 0
    sub = edge.subtract_background(frame)
    assert sub.dtype == np.float32 and np.isfinite(sub).all()


def test_all_masked_by_mask_argument():
    frame = np.random.default_rng(0).poisson(5, (100, 100)).astype(np.int32)
    frame[50, 50] = 1000
    assert len(edge.find_peaks(frame, np.zeros_like(frame, bool))) == 0


def test_spot_free_poisson_frame_is_clean():
    rng = np.random.default_rng(9)
    g = edge.Geometry.for_layout("4m")
    frame = rng.poisson(0.8, g.shape).astype(np.int32)
    frame[~g.mask] = -1
    assert len(edge.find_peaks(frame, geometry=g)) <= 2


def test_isolated_hot_pixels_are_rejected():
    g = edge.Geometry.for_layout("1m")
    rng = np.random.default_rng(3)
    frame = rng.poisson(1.0, g.shape).astype(np.int32)
    frame[~g.mask] = -1
    hot = [(100, 100), (400, 800), (700, 300)]
    for i, j in hot:
        frame[i, j] = 60000
    frame[401, 800] = 8  # a noisy neighbour does not rescue a hot pixel
    assert len(edge.find_peaks(frame, geometry=g)) == 0


def test_saturated_spots_are_flagged():
    sf = simulate(layout="1m", seed=7, overload=300.0, saturation=50000)
    p = edge.find_peaks(sf.frame, geometry=sf.geometry)
    assert p.saturated.sum() > 10
    assert np.all(p.max_value[p.saturated] >= 50000)


def test_subtract_background_radial_is_centred():
    sf = simulate(layout="1m", seed=10, ice_rings=True)
    sub = edge.subtract_background(sf.frame, geometry=sf.geometry)
    assert sub.dtype == np.float32 and sub.shape == sf.frame.shape
    valid = sf.geometry.valid & (sf.frame >= 0)
    assert abs(np.median(sub[valid])) < 0.6  # ice rings and solvent ring removed
    assert np.all(sub[~valid] == 0)


def test_dark_subtraction():
    rng = np.random.default_rng(5)
    g = edge.Geometry.for_layout("1m")
    dark = rng.integers(90, 110, g.shape).astype(np.float32)
    sf = simulate(layout="1m", seed=12)
    raw = np.where(sf.frame >= 0, sf.frame + dark, -1).astype(np.int32)
    ref = edge.find_peaks(sf.frame, geometry=sf.geometry)
    p = edge.find_peaks(raw, geometry=sf.geometry, dark=dark)
    d_found, _ = match_peaks(p.x, p.y, ref.x, ref.y)
    assert abs(len(p) - len(ref)) <= 0.05 * len(ref)
    assert np.mean(d_found < 1) > 0.95


@pytest.mark.parametrize("call,match", [
    (lambda: edge.find_peaks(np.zeros((3, 4, 5))), "2-D"),
    (lambda: edge.find_peaks(np.zeros(10)), "2-D"),
    (lambda: edge.find_peaks(np.zeros((0, 5))), "empty"),
    (lambda: edge.find_peaks(np.zeros((10, 10), bool)), "unsupported dtype"),
    (lambda: edge.find_peaks(np.zeros((10, 10), complex)), "unsupported dtype"),
    (lambda: edge.find_peaks(np.array([["a"]])), "unsupported dtype"),
    (lambda: edge.find_peaks(np.zeros((10, 10)), np.ones((10, 11), bool)), "mask shape"),
    (lambda: edge.find_peaks(np.zeros((10, 10)), np.full((10, 10), 0.5)), "boolean"),
    (lambda: edge.find_peaks(np.zeros((10, 10)), geometry=edge.Geometry.for_layout("1m")), "geometry shape"),
    (lambda: edge.find_peaks(np.zeros((10, 10)), d_min=2.0), "geometry"),
    (lambda: edge.find_peaks(np.zeros((10, 10)), method="magic"), "method"),
    (lambda: edge.find_peaks(np.zeros((10, 10)), center=(np.nan, 1)), "finite"),
    (lambda: edge.find_peaks(np.zeros((10, 10)), dark=np.zeros((5, 5))), "dark shape"),
    (lambda: edge.subtract_background(np.zeros((10, 10)), method="local", window=4), "odd"),
    (lambda: edge.Geometry((10, 10), -1, 100, 1, (5, 5)), "pixel_size_mm"),
    (lambda: edge.Geometry((10, 10), 0.1, 100, 1, (5, 5), mask=np.ones((9, 9), bool)), "mask shape"),
])
def test_bad_input_raises_clear_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
