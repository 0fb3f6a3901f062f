"""Frame workers: whole frames analysed in parallel, policy and commands in
frame order, every frame accounted for. Real simulated frames of two detector
sizes (so workers finish out of order) through the real pipeline, commands
through a real pty to the instrument emulator. Nothing here depends on timing."""

from __future__ import annotations

import json
import time

import numba
import pytest

import firmware_bridge as fb
from edge.cli import main as edge_main
from edge.latency import ProbePolicy, competitors
from edge.pipeline import _STOP, Pipeline, _InOrder, analyse_frame, default_workers
from edge.sim import simulate
from edge.sources.base import FrameMeta
from firmware_bridge.emulator import spawn_pty_emulator


class RecordingProbe(ProbePolicy):
    """One ``query_state`` per frame; remembers the order frames reached it."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[int] = []

    def step(self, obs):
        self.seen.append(obs.index)
        return super().step(obs)


class MixedSource:
    """Unpaced source cycling real simulated 1M and 4M frames (4M first in
    every group of four), optionally with one frame of the wrong shape."""

    rate_hz = None

    def __init__(self, sims, n: int, bad: int | None = None) -> None:
        self.sims, self.n, self.bad = sims, n, bad
        self.geometry = sims[1].geometry

    def __iter__(self):
        for i in range(self.n):
            sf = self.sims[i % len(self.sims)]
            frame = sf.frame[:-3] if i == self.bad else sf.frame
            yield frame, FrameMeta(i, time.perf_counter(), sf.geometry, "test:mixed")


@pytest.fixture(scope="module")
def sims():
    return [simulate(layout="4m", seed=11), simulate(layout="1m", seed=12), simulate(layout="1m", seed=13),
            simulate(layout="1m", seed=14, ice_rings=True)]


@pytest.fixture(scope="module")
def reference(sims):
    """Peaks per distinct frame from analyse_frame in this thread (1 thread, like a worker)."""
    before = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        return [len(analyse_frame(s.frame, s.geometry).peaks) for s in sims]
    finally:
        numba.set_num_threads(before)


def test_in_order_hands_out_results_in_ticket_order_whatever_the_finish_order():
    order = _InOrder(workers=2)
    tickets = [order.ticket() for _ in range(5)]
    assert tickets == [0, 1, 2, 3, 4]
    for t in (3, 1, 4):
        order.put(t, f"r{t}")
    assert order.get(0) is None  # 0 not done: nothing may overtake it
    order.put(0, "r0")
    assert [order.get(0), order.get(0)] == ["r0", "r1"]
    assert order.get(0) is None  # 2 still in a worker
    order.put(2, "r2")
    assert [order.get(0), order.get(0), order.get(0)] == ["r2", "r3", "r4"]
    order.worker_done()
    assert order.get(0) is None  # one worker still running
    order.worker_done()
    assert order.get(0) is _STOP


@pytest.mark.parametrize("workers", [3, 1])
def test_workers_keep_policy_and_commands_in_frame_order(sims, reference, workers):
    n = 24
    source = MixedSource(sims, n)
    policy = RecordingProbe()
    emu = spawn_pty_emulator()
    try:
        with fb.connect(emu.port, limits={"version": 1, "rate": {"max_per_second": 1e4, "burst": 1000},
                                          "commands": {"query_state": {}}}) as bridge:
            pipe = Pipeline(source, policy=policy, bridge=bridge, workers=workers, threads=1,
                            queue_size=2, command_queue_size=n)
            summary = pipe.run()
    finally:
        emu.stop()
    assert summary.workers == workers and summary.frames_processed == n and summary.frames_dropped == 0
    assert policy.seen == list(range(n))  # the policy saw every frame, in order
    recs = list(pipe.records)
    assert [r["frame"] for r in recs] == list(range(n))
    assert [r["n_peaks"] for r in recs] == [reference[i % len(sims)] for i in range(n)]
    cmds = pipe.command_records
    assert [c["frame"] for c in cmds] == list(range(n))  # one command per frame, sent in order
    assert all(c["status"] == "ok" for c in cmds)
    seqs = [c["seq"] for c in cmds]
    assert seqs == sorted(seqs) and len(set(seqs)) == n


def test_a_bad_frame_is_reported_in_order_and_the_rest_go_on(sims, tmp_path):
    n, bad = 12, 5
    policy = RecordingProbe()
    pipe = Pipeline(MixedSource(sims, n, bad=bad), policy=policy, workers=3, threads=1,
                    results=tmp_path / "run.jsonl")
    summary = pipe.run()
    assert summary.errors == 1 and summary.frames_processed == n - 1
    assert policy.seen == [i for i in range(n) if i != bad]
    lines = [json.loads(line) for line in (tmp_path / "run.jsonl").read_text().splitlines()]
    per_frame = [(r["type"], r["frame"]) for r in lines if r["type"] in ("frame", "error")]
    assert per_frame == [("error" if i == bad else "frame", i) for i in range(n)]
    assert "shape" in next(r for r in lines if r["type"] == "error")["error"]


def test_paced_run_beside_a_busy_process_accounts_for_every_frame(tmp_path):
    # however busy the machine, every frame is processed or dropped (and
    # logged as such), never lost; how many of each is not asserted
    out = tmp_path / "r.jsonl"
    with competitors(1):
        rc = edge_main(["run", "--source", "sim", "--frames", "40", "--rate", "200", "--no-model", "--dry-run",
                        "--quiet", "--results", str(out)])
    assert rc == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    done = sorted(r["frame"] for r in lines if r["type"] in ("frame", "drop"))
    assert done == list(range(40))


def test_competitors_are_always_stopped():
    import os

    with pytest.raises(RuntimeError):
        with competitors(2) as pids:
            assert len(pids) == 2
            raise RuntimeError("benchmark failed")
    for pid in pids:  # reaped: no such process any more
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    with pytest.raises(ValueError):
        with competitors(-1):
            pass


def test_competitors_end_when_the_benchmark_is_killed(tmp_path):
    # SIGKILL (or a SIGTERM without handler) runs no cleanup: the busy
    # loops notice that their parent is gone and end by themselves
    import os
    import signal
    import subprocess
    import sys
    import time

    pidfile = tmp_path / "pids"
    code = ("import sys, time\nfrom edge.latency import competitors\n"
            "with competitors(2) as pids:\n"
            f"    open({str(pidfile)!r}, 'w').write(' '.join(map(str, pids)))\n"
            "    time.sleep(60)\n")
    bench = subprocess.Popen([sys.executable, "-c", code])
    try:
        for _ in range(600):
            if pidfile.exists() and pidfile.read_text().strip():
                break
            time.sleep(0.05)
        pids = [int(p) for p in pidfile.read_text().split()]
        assert len(pids) == 2
        for pid in pids:
            os.kill(pid, 0)  # running
        bench.send_signal(signal.SIGKILL)
        bench.wait(timeout=10)
        gone = set()
        for _ in range(200):  # 10 s; they look every few ms
            for pid in pids:
                try:
                    os.kill(pid, 0)
                    # an exited child of a dead parent is reaped by init; a
                    # zombie still answers kill(0): check its state
                    with open(f"/proc/{pid}/stat") as fh:
                        if fh.read().split(") ")[1].startswith("Z"):
                            gone.add(pid)
                except (ProcessLookupError, FileNotFoundError):
                    gone.add(pid)
            if len(gone) == len(pids):
                break
            time.sleep(0.05)
        assert gone == set(pids)
    finally:
        bench.kill()


def test_default_workers_scale_with_cores():
    assert default_workers(1) == (1, 1)
    assert default_workers(2) == (2, 1)
    assert default_workers(4) == (4, 1)
    assert default_workers(12) == (8, 1)
    assert default_workers(16) == (8, 2)


def test_cli_rejects_bad_workers_and_contention(capsys):
    assert edge_main(["run", "--workers", "0", "--no-model", "--dry-run"]) == 2
    assert "--workers" in capsys.readouterr().err
    assert edge_main(["bench", "--contention", "-1"]) == 2
    assert "--contention" in capsys.readouterr().err
    assert edge_main(["bench", "--contention", "1", "--layouts", "2m"]) == 2
    assert "2m" in capsys.readouterr().err
