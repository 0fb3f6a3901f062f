"""Anomaly-model benchmarks: feature extraction (1M, 4M, given stats) and inference latency.

Run: ``.venv/bin/python -m pytest benchmarks/test_bench_anomaly.py --benchmark-only -s``.
Targets (2-core board): features <= 3 ms for a 4M frame with precomputed
radial stats and peaks; inference p99 <= 1 ms with one interpreter thread.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from edge import find_peaks, radial_stats
from edge.anomaly import AnomalyModel
from edge.features import frame_features, warmup
from edge.sim import simulate


@pytest.fixture(scope="module", autouse=True)
def _warm():
    warmup(dtypes=(np.int32,))


@pytest.mark.parametrize("layout", ["1m", "4m"])
def test_bench_features(benchmark, layout):
    sf = simulate(layout=layout, seed=7, beam_center=None)
    stats = radial_stats(sf.frame, geometry=sf.geometry)
    peaks = find_peaks(sf.frame, geometry=sf.geometry, stats=stats)
    frame_features(sf.frame, sf.geometry, stats=stats, peaks=peaks)  # tables cached on the geometry
    benchmark.extra_info["layout"] = layout
    f = benchmark(frame_features, sf.frame, sf.geometry, stats=stats, peaks=peaks)
    assert f.shape[0] > 0


def test_bench_inference_1_thread(benchmark):
    model = AnomalyModel.load(num_threads=1)
    rng = np.random.default_rng(0)
    mean = np.asarray(model.card["input"]["mean"], np.float32)
    std = np.asarray(model.card["input"]["std"], np.float32)
    feats = (mean + std * rng.standard_normal((256, len(mean)))).astype(np.float32)
    for f in feats[:32]:
        model.predict(f)
    lat = np.empty(2000)
    for k in range(len(lat)):
        t0 = time.perf_counter()
        model.predict(feats[k % len(feats)])
        lat[k] = time.perf_counter() - t0
    p50, p99 = np.percentile(lat, [50, 99]) * 1e6
    benchmark.extra_info.update({"p50_us": round(p50, 1), "p99_us": round(p99, 1)})
    print(f"\nanomaly inference, 1 thread: p50 {p50:.1f} us, p99 {p99:.1f} us")
    benchmark(model.predict, feats[0])
