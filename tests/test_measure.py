"""Beam-centre and dead-region measurements behind correction commands."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge import radial_stats
from edge.measure import _chamfer_distance, find_dead_regions, measure_beam_center, measure_beam_offset
from edge.sim import simulate


def _ref_chamfer(inside):
    ny, nx = inside.shape
    out = np.zeros((ny, nx))
    outside = [(i, j) for i in range(-1, ny + 1) for j in range(-1, nx + 1)
               if not (0 <= i < ny and 0 <= j < nx) or not inside[i, j]]
    o = np.array(outside, dtype=float)
    for i in range(ny):
        for j in range(nx):
            if inside[i, j]:
                di = np.abs(o[:, 0] - i)
                dj = np.abs(o[:, 1] - j)
                # 3-4 chamfer metric: 4*min + 3*(max - min), in units of 3
                out[i, j] = (4 * np.minimum(di, dj) + 3 * np.abs(di - dj)).min() / 3.0
    return out


@given(st.integers(1, 14), st.integers(1, 14), st.integers(0, 2**32 - 1), st.floats(0.2, 0.95))
@settings(max_examples=40, deadline=None)
def test_chamfer_distance_matches_brute_force(ny, nx, seed, p):
    inside = np.random.default_rng(seed).random((ny, nx)) < p
    np.testing.assert_allclose(_chamfer_distance(inside), _ref_chamfer(inside))


@pytest.mark.parametrize("layout,offset", [("1m", (0, 0)), ("1m", (15, -10)), ("1m", (-30, 25)),
                                           ("4m", (40, 0)), ("4m", (-20, -20))])
def test_beam_offset_from_beamstop_shadow(layout, offset):
    sf = simulate(layout=layout, seed=3, beam_offset=offset)
    dx, dy = measure_beam_offset(sf.frame, sf.geometry)
    assert abs(dx - offset[0]) <= 3 and abs(dy - offset[1]) <= 6


def test_no_beam_gives_no_centre():
    sf = simulate(layout="1m", seed=3, flux=0)
    assert measure_beam_center(sf.frame, sf.geometry) is None


def _module_boxes(layout):
    from edge.geometry import LAYOUTS

    lay = LAYOUTS[layout]
    (mr, mc), (pr, pc), (gr, gc) = lay.modules, lay.module_shape, lay.gap
    return [(i * (pr + gr), i * (pr + gr) + pr, j * (pc + gc), j * (pc + gc) + pc)
            for i in range(mr) for j in range(mc)]


def test_dead_module_is_found_and_clean_frames_have_none():
    sf = simulate(layout="4m", seed=4, dead_modules=1)
    # the dead module reads 0 except where an independent hot pixel landed in it
    dead_modules = [b for b in _module_boxes("4m") if np.mean(sf.frame[b[0]:b[1], b[2]:b[3]] > 0) < 1e-3]
    assert len(dead_modules) == 1
    m0, m1, n0, n1 = dead_modules[0]
    boxes = find_dead_regions(sf.frame, sf.geometry)
    assert len(boxes) == 1
    r0, r1, c0, c1 = boxes[0]
    # every valid pixel of the box is in the dead module (the box may reach
    # into the masked gap), and the box covers most of the module
    in_box = np.zeros(sf.frame.shape, bool)
    in_box[r0:r1, c0:c1] = True
    in_module = np.zeros(sf.frame.shape, bool)
    in_module[m0:m1, n0:n1] = True
    assert not (in_box & sf.geometry.valid & ~in_module).any()
    assert (in_box & in_module).sum() > 0.8 * in_module.sum()
    assert find_dead_regions(simulate(layout="4m", seed=4).frame, sf.geometry) == []


def test_dead_module_on_a_mostly_empty_frame_is_found():
    """At 0.01 counts/px the clipped ring means read 0; the rings' zero
    fractions still expect ~2,500 counts in a 4M module."""
    kw = dict(layout="4m", seed=4, background=0.01, n_spots=100)
    sf = simulate(dead_modules=1, **kw)
    stats = radial_stats(sf.frame, geometry=sf.geometry)
    assert np.nanmax(stats.mean) == 0.0  # the case the zero fractions are for
    dead_modules = [b for b in _module_boxes("4m") if np.mean(sf.frame[b[0]:b[1], b[2]:b[3]] > 0) < 1e-3]
    assert len(dead_modules) == 1
    m0, m1, n0, n1 = dead_modules[0]
    boxes = find_dead_regions(sf.frame, sf.geometry, stats=stats)
    assert len(boxes) == 1
    r0, r1, c0, c1 = boxes[0]
    overlap = max(0, min(r1, m1) - max(r0, m0)) * max(0, min(c1, n1) - max(c0, n0))
    assert overlap > 0.6 * (m1 - m0) * (n1 - n0)
    assert find_dead_regions(simulate(**kw).frame, sf.geometry) == []
