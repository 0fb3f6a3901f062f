"""``edge bench --web-clients N``: does the live view slow the loop?

The latency benchmark's run (frames from memory at a fixed rate, one probe
command per frame through a real pty to the emulator in its own process) with
no live view, then with the view serving ``N`` connected pages. Each page is a
separate process reading the event stream as a browser would (snapshot, data
updates, frame images), so only the server side shares the edge process.
The two settings alternate ``repeats`` times, so slow drift of a shared
machine hits both alike.
"""

from __future__ import annotations

import subprocess
import sys
import time

from ..latency import _source, emulated_bridge, machine_info, run_latency
from ..pipeline import percentiles
from .hub import LiveHub
from .server import WebServer

__all__ = ["web_overhead", "to_markdown", "pooled"]

# a page: read the stream until killed
_READER = ("import sys, urllib.request\n"
           "r = urllib.request.urlopen(sys.argv[1], timeout=30)\n"
           "while r.read(65536):\n"
           "    pass\n")


def _with_clients(n_clients: int, bridge, run):
    hub = LiveHub({"version": "bench"}, state=bridge.state).start()
    srv = WebServer(hub, "127.0.0.1", 0).start()
    readers = [subprocess.Popen([sys.executable, "-c", _READER, f"http://127.0.0.1:{srv.port}/events"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(n_clients)]
    try:
        t_end = time.monotonic() + 30
        while srv.clients < n_clients and time.monotonic() < t_end:
            time.sleep(0.05)
        connected = srv.clients
        cpu0, t0 = hub.cpu_s, time.monotonic()
        res = run(hub)
        time.sleep(0.25)  # the hub thread's CPU clock is read once per cycle
        res["web"] = {"clients": n_clients, "connected": connected, "still_connected": srv.clients,
                      "images_encoded": hub.image_version, "updates": hub.seq,
                      "hub_cpu_ms_per_s": 1e3 * (hub.cpu_s - cpu0) / (time.monotonic() - t0)}
        return res
    finally:
        for p in readers:
            p.terminate()
        for p in readers:
            p.wait(timeout=10)
        srv.close()
        hub.stop()


def web_overhead(layouts=("1m",), *, clients: int = 3, rate_hz: float = 50.0, n_frames: int = 500,
                 repeats: int = 3, use_model: bool = True) -> dict:
    """Frame in -> command p99 with 0 and with ``clients`` live pages, per layout.

    The settings alternate ``repeats`` times; the summary pools every frame
    of a setting (``repeats * n_frames`` samples) before taking percentiles.
    """
    from .. import warmup

    warmup()
    model = None
    if use_model:
        from ..anomaly import AnomalyModel

        model = AnomalyModel.load(num_threads=1)
        model.warmup()
    out = {"machine": machine_info(), "rate_hz": rate_hz, "frames_per_run": n_frames, "clients": clients,
           "runs": []}
    with emulated_bridge() as (bridge, _):
        for layout in layouts:
            src = _source(layout, n_frames, rate_hz)

            def run(observer=None):
                return run_latency(layout, rate_hz=rate_hz, n_frames=n_frames, model=model, bridge=bridge,
                                   source=src, observer=observer)

            for rep in range(repeats):
                for n in (0, clients):
                    res = run() if n == 0 else _with_clients(n, bridge, run)
                    res.update(repeat=rep, clients=n)
                    out["runs"].append(res)
    return out


def to_markdown(result: dict) -> str:
    def f(x):
        return "-" if x is None else f"{x:.2f}"

    m = result["machine"]
    lines = ["# edge latency with the live view", "",
             f"{m['cpu']} ({m['machine']}, {m['cores']} cores), Python {m['python']}, {m['time']}; "
             f"{result['frames_per_run']} frames at {result['rate_hz']} Hz per run", "",
             "| detector | pages | repeat | in -> wire p50 | p99 | max | in -> processed p99 | dropped | images sent "
             "| view thread CPU ms/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        w = r["wire_ms"]
        web = r.get("web", {})
        lines.append(f"| {r['layout']} | {r['clients']} | {r['repeat']} | {f(w['p50'])} | {f(w['p99'])} | "
                     f"{f(w['max'])} | {f(r['processed_ms']['p99'])} | {r['dropped']} | "
                     f"{web.get('images_encoded', '-')} | {f(web.get('hub_cpu_ms_per_s'))} |")
    lines.append("")
    for layout, s in pooled(result).items():
        b, w = s[0], s[result["clients"]]
        lines.append(f"{layout}, all frames of each setting pooled ({b['n']} / {w['n']}): frame in -> command on "
                     f"wire p50 {b['p50']:.2f} -> {w['p50']:.2f} ms ({100 * (w['p50'] / b['p50'] - 1):+.1f} %), "
                     f"p99 {b['p99']:.2f} -> {w['p99']:.2f} ms ({100 * (w['p99'] / b['p99'] - 1):+.1f} %) "
                     f"without -> with {result['clients']} pages")
    return "\n".join(lines) + "\n"


def pooled(result: dict) -> dict:
    """``{layout: {clients: percentiles of all pooled wire latencies}}`` (settings present in every repeat)."""
    by: dict = {}
    for r in result["runs"]:
        by.setdefault(r["layout"], {}).setdefault(r["clients"], []).extend(r.get("wire_samples_ms", []))
    out = {}
    for layout, d in by.items():
        if 0 in d and result["clients"] in d and d[0] and d[result["clients"]]:
            out[layout] = {n: percentiles(v) for n, v in d.items()}
    return out
