"""End-to-end latency: frame in -> command on the wire / ack, and the highest
frame rate sustained with no drops, for 1M and 4M frames (the same code as
``edge bench``).

Run: ``python -m pytest benchmarks/test_bench_latency.py --benchmark-only -s``

The figures are in each benchmark's ``extra_info`` (``--benchmark-json``) and
printed as a Markdown table; the benchmark time itself is one whole paced run.
"""

from __future__ import annotations

import pytest

import edge
from edge.latency import emulated_bridge, max_sustained_rate, run_latency, to_markdown, machine_info

LAYOUTS = ["1m", "4m"]


@pytest.fixture(scope="module")
def setup():
    from edge.anomaly import AnomalyModel

    edge.warmup()
    model = AnomalyModel.load(num_threads=1)
    model.warmup()
    with emulated_bridge() as (bridge, _):
        yield model, bridge


@pytest.mark.parametrize("layout", LAYOUTS)
def test_latency_frame_to_wire(benchmark, setup, layout):
    model, bridge = setup
    res = benchmark.pedantic(run_latency, args=(layout,),
                             kwargs={"rate_hz": 50.0, "n_frames": 300, "model": model, "bridge": bridge},
                             rounds=1, iterations=1)
    for key in ("processed_ms", "wire_ms", "ack_ms"):
        benchmark.extra_info[key] = res[key]
    benchmark.extra_info["dropped"] = res["dropped"]
    print("\n" + to_markdown({"machine": machine_info(), "latency_rate_hz": 50.0, "frames_per_run": 300,
                              "latency": [res], "max_rate": []}))
    assert res["wire_ms"]["n"] > 0


@pytest.mark.parametrize("layout", LAYOUTS)
def test_max_sustained_rate(benchmark, setup, layout):
    model, bridge = setup
    rates = (50, 75, 100, 125, 150, 200, 250, 300)
    res = benchmark.pedantic(max_sustained_rate, args=(layout, rates),
                             kwargs={"n_frames": 300, "model": model, "bridge": bridge},
                             rounds=1, iterations=1)
    benchmark.extra_info.update(res)
    print(f"\n{layout}: highest rate with 0 drops: {res['max_rate_hz']} Hz; tried {res['tried']}")
