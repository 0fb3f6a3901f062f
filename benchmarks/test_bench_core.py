"""Core stage timings: background, peak finding steps and total, vs a one-pass floor.

Run: ``python -m pytest benchmarks/test_bench_core.py --benchmark-only``

Each group is one (layout, threads) pair and holds the ``floor`` (``np.max``
over the same frame, one read of every pixel), so ratios are read within one
run on one machine.
"""

from __future__ import annotations

import numba
import numpy as np
import pytest

import edge
from edge.background import radial_stats, prepare_frame
from edge.sim import simulate
from edge.spotfinding import (filter_peaks, label_regions, measure_regions, threshold_pixels,
                              thresholds_from_radial)

LAYOUTS = ["1m", "4m"]
THREADS = sorted({1, numba.config.NUMBA_NUM_THREADS})


@pytest.fixture(scope="module", params=LAYOUTS)
def frame(request):
    sf = simulate(layout=request.param, seed=1)
    edge.find_peaks(sf.frame, geometry=sf.geometry)  # compile + cache geometry maps
    return request.param, sf.frame, sf.geometry


@pytest.fixture(params=THREADS, ids=lambda n: f"{n}thr")
def threads(request):
    before = numba.get_num_threads()
    numba.set_num_threads(request.param)
    yield request.param
    numba.set_num_threads(before)


def _group(benchmark, frame, threads):
    benchmark.group = f"{frame[0]} {threads} thread(s)"


def test_floor_np_max(benchmark, frame, threads):
    _group(benchmark, frame, threads)
    benchmark(np.max, frame[1])


def test_radial_stats(benchmark, frame, threads):
    _group(benchmark, frame, threads)
    _, f, g = frame
    benchmark(radial_stats, f, geometry=g)


def test_seeds(benchmark, frame, threads):
    _group(benchmark, frame, threads)
    _, f, g = frame
    th = thresholds_from_radial(radial_stats(f, geometry=g))
    benchmark(threshold_pixels, f, th)


def test_label_measure_filter(benchmark, frame, threads):
    _group(benchmark, frame, threads)
    _, f, g = frame
    th = thresholds_from_radial(radial_stats(f, geometry=g))
    seeds, _ = threshold_pixels(f, th)

    def run():
        regions = label_regions(f, th, seeds)
        return filter_peaks(measure_regions(f, th, regions), geometry=g)

    benchmark(run)


def test_total_background_and_peaks(benchmark, frame, threads):
    _group(benchmark, frame, threads)
    _, f, g = frame
    peaks = benchmark(edge.find_peaks, f, geometry=g)
    assert len(peaks) > 100


def test_subtract_background_radial(benchmark, frame, threads):
    _group(benchmark, frame, threads)
    _, f, g = frame
    benchmark(edge.subtract_background, f, geometry=g)


def test_local_background(benchmark, frame, threads):
    _group(benchmark, frame, threads)
    _, f, g = frame
    benchmark.pedantic(edge.local_stats, args=(f,), kwargs={"geometry": g}, rounds=5, iterations=1)


def test_find_dead_regions(benchmark, frame, threads):
    """The fault measurement (run on suspect frames, at most every
    ``measure_every`` frames; NumPy, so the thread count does not apply)."""
    from edge.measure import find_dead_regions

    _group(benchmark, frame, threads)
    _, f, g = frame
    stats = radial_stats(f, geometry=g)
    benchmark(find_dead_regions, f, g, stats=stats)
