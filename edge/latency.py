"""The latency benchmark behind ``edge bench`` and ``benchmarks/test_bench_latency.py``.

Two measurements per detector size, both through the full pipeline (peaks,
anomaly features and model, policy, command thread, bridge) and a real pty to
the instrument emulator (in its own process, as a real device would be):

1. **Latency**: frames from memory at a fixed rate; a probe rule sends one
   ``query_state`` command per frame (harmless, allowlisted, exercises the
   same path as any correction). Reported: frame in -> processed, frame in ->
   command on the wire (first write to the port), frame in -> ack received;
   p50/p95/p99/max in ms.
2. **Highest sustained rate**: the same run at increasing rates; the highest
   rate with zero dropped frames, every frame processed, the source never
   falling behind its schedule, and the achieved input rate within 2 %.

Frames come from the simulator: a pool of 8 distinct frames pre-generated in
memory and cycled, so file reading is not part of the numbers.
"""

from __future__ import annotations

import contextlib
import json
import platform
import time
from pathlib import Path

import numba

from .pipeline import Pipeline

__all__ = ["ProbePolicy", "run_latency", "max_sustained_rate", "benchmark", "to_markdown"]


class ProbePolicy:
    """A policy that asks for one ``query_state`` per frame (latency probe)."""

    dry_run = False

    def __init__(self, every: int = 1) -> None:
        self.every = max(1, int(every))

    def on_ack(self, state) -> None:
        pass

    def step(self, obs):
        from .policy import Command

        if obs.index % self.every:
            return []
        return [Command("query_state", {}, rule="probe", reason="latency probe", index=obs.index)]


@contextlib.contextmanager
def emulated_bridge(*, in_process: bool = False, **emulator_kw):
    """A Bridge connected to the instrument emulator on a real pty.

    By default the emulator runs in its own process, as the real device is
    outside the edge computer: in-process it would compete with the
    pipeline for the GIL and skew the latency figures.
    """
    import subprocess
    import sys

    import firmware_bridge as fb

    limits = {"version": 1, "rate": {"max_per_second": 2000.0, "burst": 500}, "commands": {"query_state": {}}}
    if in_process:
        from firmware_bridge.emulator import start_pty_emulator

        emu = start_pty_emulator(**emulator_kw)
        try:
            with fb.connect(emu.port, limits=limits) as bridge:
                yield bridge, emu
        finally:
            emu.stop()
        return
    proc = subprocess.Popen([sys.executable, "-m", "firmware_bridge.emulator", "pty"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        port = proc.stdout.readline().strip()
        if not port:
            raise RuntimeError("instrument emulator did not start")
        with fb.connect(port, limits=limits) as bridge:
            yield bridge, proc
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _source(layout: str, n_frames: int, rate_hz: float | None, seed: int = 0):
    from .sources import SimulatorSource

    # a pool of distinct frames cycled from memory (preloading 300 4M frames
    # would take minutes and gigabytes)
    src = SimulatorSource(layout, n_frames=n_frames, rate_hz=rate_hz, seed=seed, pool=8)
    src.prepare()
    return src


def run_latency(layout: str = "4m", *, rate_hz: float = 50.0, n_frames: int = 300, model=None,
                bridge=None, queue_size: int = 4, source=None, observer=None) -> dict:
    """One paced run with a probe command per frame; returns the measured figures.

    ``source`` (a prepared :class:`edge.sources.SimulatorSource`) is reused
    when given: only its rate is changed.
    """
    src = source if source is not None else _source(layout, n_frames, rate_hz)
    src.rate_hz = float(rate_hz)
    pipe = Pipeline(src, model=model, policy=ProbePolicy(), bridge=bridge, queue_size=queue_size,
                    command_queue_size=max(64, n_frames), observer=observer)
    summ = pipe.run()
    t_in = [r["t_source"] for r in pipe.records]
    achieved = (len(t_in) - 1) / (max(t_in) - min(t_in)) if len(t_in) > 1 else 0.0
    return {
        "layout": layout, "rate_hz": rate_hz, "frames": n_frames,
        "processed": summ.frames_processed, "dropped": summ.frames_dropped,
        # the source re-anchors its schedule when it cannot emit on time: a
        # missed frame too, even though nothing was queued to drop
        "source_late": src.stats.get("late", 0), "source_reanchors": src.stats.get("reanchors", 0),
        "achieved_rate_hz": achieved,
        "processed_ms": summ.latency_ms, "wire_ms": summ.wire_ms, "ack_ms": summ.ack_ms,
        "stage_ms": summ.stage_ms, "commands": summ.commands,
    }


def max_sustained_rate(layout: str, rates, *, n_frames: int = 300, model=None, bridge=None,
                       source=None) -> dict:
    """Highest rate in ``rates`` (ascending) with zero drops, no schedule
    re-anchoring and an achieved input rate within 2 % of the target."""
    src = source if source is not None else _source(layout, n_frames, None)
    best = None
    tried = []
    for r in rates:
        res = run_latency(layout, rate_hz=r, n_frames=n_frames, model=model, bridge=bridge, source=src)
        ok = (res["dropped"] == 0 and res["processed"] == n_frames and res["source_reanchors"] == 0
              and res["achieved_rate_hz"] >= 0.98 * r)
        tried.append({"rate_hz": r, "dropped": res["dropped"], "processed": res["processed"],
                      "reanchors": res["source_reanchors"], "achieved_rate_hz": round(res["achieved_rate_hz"], 1),
                      "processed_p99_ms": res["processed_ms"]["p99"]})
        if not ok:
            break
        best = r
    return {"layout": layout, "max_rate_hz": best, "tried": tried}


def benchmark(layouts=("1m", "4m"), *, latency_rate: float = 50.0, n_frames: int = 300,
              rates=(25, 50, 75, 100, 125, 150, 200, 250, 300), use_model: bool = True) -> dict:
    """The full benchmark: latency at ``latency_rate`` and the highest sustained rate."""
    from . import warmup

    warmup()
    model = None
    if use_model:
        from .anomaly import AnomalyModel

        model = AnomalyModel.load(num_threads=1)
        model.warmup()
    out = {"machine": machine_info(), "latency_rate_hz": latency_rate, "frames_per_run": n_frames,
           "latency": [], "max_rate": []}
    with emulated_bridge() as (bridge, _):
        for layout in layouts:
            src = _source(layout, n_frames, latency_rate)
            out["latency"].append(run_latency(layout, rate_hz=latency_rate, n_frames=n_frames,
                                              model=model, bridge=bridge, source=src))
            out["max_rate"].append(max_sustained_rate(layout, rates, n_frames=n_frames, model=model,
                                                      bridge=bridge, source=src))
    return out


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                cpu = line.split(":", 1)[1].strip()
                break
    import os

    return {"cpu": cpu, "machine": platform.machine(), "cores": os.cpu_count(),
            "numba_threads": numba.get_num_threads(), "python": platform.python_version(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def to_markdown(result: dict) -> str:
    def f(x):
        return "-" if x is None else f"{x:.2f}"

    m = result["machine"]
    lines = [f"# edge latency benchmark", "",
             f"{m['cpu']} ({m['machine']}, {m['cores']} cores, numba threads {m['numba_threads']}), "
             f"Python {m['python']}, {m['time']}", "",
             f"Frames from memory at {result['latency_rate_hz']} Hz, {result['frames_per_run']} per run, "
             "one probe command per frame through a real pty to the instrument emulator.", "",
             "| detector | path | p50 ms | p95 ms | p99 ms | max ms | n |", "|---|---|---|---|---|---|---|"]
    for r in result["latency"]:
        for key, name in (("processed_ms", "frame in -> processed"), ("wire_ms", "frame in -> command on wire"),
                          ("ack_ms", "frame in -> ack received")):
            p = r[key]
            lines.append(f"| {r['layout']} | {name} | {f(p['p50'])} | {f(p['p95'])} | {f(p['p99'])} | "
                         f"{f(p['max'])} | {p['n']} |")
        lines.append(f"| {r['layout']} | dropped frames | {r['dropped']} of {r['frames']} "
                     f"(source late {r['source_late']}, re-anchored {r['source_reanchors']}) | | | | |")
    lines += ["", "| detector | highest rate with 0 drops (Hz) | tried |", "|---|---|---|"]
    for r in result["max_rate"]:
        tried = ", ".join(f"{t['rate_hz']} Hz: {t['dropped']} dropped, {t['reanchors']} re-anchored, "
                          f"{t['achieved_rate_hz']} Hz achieved" for t in r["tried"])
        lines.append(f"| {r['layout']} | {r['max_rate_hz']} | {tried} |")
    return "\n".join(lines) + "\n"


def write_results(result: dict, json_path: str | Path, md_path: str | Path) -> None:
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    Path(json_path).write_text(json.dumps(result, indent=2, default=float))
    Path(md_path).write_text(to_markdown(result))

