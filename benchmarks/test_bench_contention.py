"""Speed beside busy processes: the same code as ``edge bench --contention 2``.

Run: ``python -m pytest benchmarks/test_bench_contention.py --benchmark-only -s``
(about 3-5 minutes on 2 cores).

* ``test_single_frame``: background + peaks (:func:`edge.pipeline.analyse_frame`
  without the model) with the default Numba threads, beside K = 0, 1, 2
  busy-loop processes, grouped with the ``np.max`` floor over the same frame.
* ``test_contention_table``: the whole table -- unpaced throughput (0 drops),
  frame in -> command on the wire p50/p99, quiet and with K = 1, 2, for 1M
  and 4M; throughput vs cores used -- written to ``runs/contention.json`` and
  ``runs/contention.md`` and printed.

The competitor processes are started and always stopped by the benchmark.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import edge
from edge.latency import competitors, contention_benchmark, contention_markdown, write_results
from edge.pipeline import analyse_frame
from edge.sim import simulate

OUT = Path("runs") / "contention"


@pytest.fixture(scope="module", params=["1m", "4m"])
def frame(request):
    sf = simulate(layout=request.param, seed=1)
    analyse_frame(sf.frame, sf.geometry)  # compile + cache geometry maps
    return request.param, sf.frame, sf.geometry


@pytest.mark.parametrize("k", [0, 1, 2], ids=lambda k: f"K{k}")
@pytest.mark.parametrize("what", ["floor_np_max", "background_and_peaks"])
def test_single_frame(benchmark, frame, k, what):
    layout, f, g = frame
    benchmark.group = f"{layout} beside {k} busy process(es)"
    with competitors(k):
        if what == "floor_np_max":
            benchmark(np.max, f)
        else:
            res = benchmark(analyse_frame, f, g)
            assert len(res.peaks) > 100


def test_contention_table(benchmark):
    edge.warmup()
    res = benchmark.pedantic(contention_benchmark, kwargs={"max_competitors": 2}, rounds=1, iterations=1)
    write_results(res, OUT.with_suffix(".json"), OUT.with_suffix(".md"), markdown=contention_markdown)
    benchmark.extra_info.update({"rows": res["rows"], "scaling": res["scaling"]})
    print("\n" + contention_markdown(res))
    assert all(r["throughput"]["dropped"] == 0 and r["throughput"]["processed"] == r["throughput"]["frames"]
               for r in res["rows"])
