"""Soak test: many commands through a faulty link with unplug/replug events.

    python -m firmware_bridge.soak --commands 10000 --corrupt 0.01 --drop 0.01 \\
        --replugs 3 [--duplicate 0.0] [--device python|c] [--json out.json]

Checks, from the device's applied-log (JSON Lines):

* commands applied twice                      -> must be 0
* acknowledged commands missing from the log   -> must be 0
* every send ended in ack / nack / failure exception (counted)

Rate limits are opened up for the soak (it measures the channel, not the
limiter); everything else uses the shipped defaults. Exit status 0 = pass.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

from .bridge import connect
from .commands import Limits
from .emulator import start_pty_emulator
from .errors import CommandFailed, CommandRejected

_FW_DIR = Path(__file__).with_name("firmware")


def _soak_limits() -> Limits:
    base = Limits.load(None)
    cmds = {n: replace(c, rate_per_second=None, burst=None) for n, c in base.commands.items()}
    return Limits(cmds, 1e9, 10**9, "soak (default limits, rate limits disabled)")


def _command(i: int) -> tuple[str, dict]:
    k = i % 8
    if k == 0:
        return "set_attenuation", {"level": i % 16}
    if k == 1:
        return "set_exposure", {"time_s": 0.001 * (1 + i % 1000)}
    if k == 2:
        return "set_gain", {"mode": ("low", "medium", "high", "auto")[i % 4]}
    if k == 3:
        return "shutter", {"open": bool(i % 2)}
    if k == 4:  # back and forth so the beam stays within the device's range
        return "recentre_beam", {"dx": 5.0 if i % 16 == 4 else -5.0, "dy": 0.5 if i % 16 == 4 else -0.5}
    if k == 5:
        return "raise_alarm", {"code": 1 + i % 1000, "text": f"soak {i}"}
    return "query_state", {}


class _CFirmware:
    def __init__(self, tmp: Path, a: argparse.Namespace, log: str) -> None:
        cc = shutil.which(os.environ.get("CC", "cc"))
        if cc is None:
            raise SystemExit("no C compiler found for --device c")
        exe = tmp / "bridge_fw"
        subprocess.run([cc, "-std=c99", "-Wall", "-Wextra", "-Werror", "-O2", "-o", str(exe),
                        str(_FW_DIR / "bridge_proto.c"), str(_FW_DIR / "host_pty.c")], check=True)
        self.port = str(tmp / "ttySOAK")
        self.proc = subprocess.Popen(
            [str(exe), "pty", "--link", self.port, "--applied-log", log, "--corrupt",
             str(a.corrupt), "--drop", str(a.drop), "--duplicate", str(a.duplicate),
             "--seed", str(a.seed)], stdout=subprocess.PIPE, text=True)
        self.proc.stdout.readline()

    def unplug(self) -> None:
        self.proc.send_signal(signal.SIGUSR1)
        while os.path.lexists(self.port):
            time.sleep(0.001)

    def replug(self) -> None:
        self.proc.send_signal(signal.SIGUSR2)
        while not os.path.exists(self.port):
            time.sleep(0.001)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(5)
        self.proc.stdout.close()


def run(a: argparse.Namespace) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="fwb-soak-"))
    log = str(tmp / "applied.jsonl")
    if a.device == "c":
        dev = _CFirmware(tmp, a, log)
    else:
        dev = start_pty_emulator(corrupt=a.corrupt, drop=a.drop, duplicate=a.duplicate,
                                 applied_log=log, link_path=str(tmp / "ttySOAK"), seed=a.seed)
    acked: list[tuple[int, int]] = []
    rtts: list[float] = []
    rejected: Counter = Counter()
    failed: Counter = Counter()
    failed_applied_unknown = 0
    replug_at = {a.commands * (k + 1) // (a.replugs + 1) for k in range(a.replugs)}
    replug_threads = []
    t0 = time.monotonic()
    try:
        with connect(dev.port, limits=_soak_limits(), deadline=a.deadline,
                     connect_timeout=10.0) as bridge:
            for i in range(a.commands):
                if i in replug_at:
                    def cycle() -> None:
                        dev.unplug()
                        time.sleep(a.unplug_time)
                        dev.replug()
                    th = threading.Thread(target=cycle)  # mid-stream, while sending
                    th.start()
                    replug_threads.append(th)
                name, args = _command(i)
                try:
                    ack = bridge.send(name, **args)
                    acked.append((ack.session, ack.seq))
                    rtts.append(ack.rtt_s)
                except CommandRejected as exc:
                    rejected[exc.reason] += 1
                except CommandFailed as exc:
                    failed[type(exc).__name__] += 1
                    failed_applied_unknown += exc.applied is None
            for th in replug_threads:
                th.join()
            stats = bridge.link_status()
    finally:
        dev.stop()
    duration = time.monotonic() - t0
    applied = [json.loads(line) for line in Path(log).read_text().splitlines() if line.strip()]
    keys = Counter((r["session"], r["seq"]) for r in applied)
    twice = sum(1 for n in keys.values() if n > 1)
    missing = sum(1 for k in acked if k not in keys)
    outcomes = len(acked) + sum(rejected.values()) + sum(failed.values())
    rtts.sort()
    q = (lambda p: rtts[min(len(rtts) - 1, int(p * len(rtts)))] * 1e3) if rtts else (lambda p: 0.0)
    result = {
        "device": a.device, "commands": a.commands, "corrupt": a.corrupt, "drop": a.drop,
        "duplicate": a.duplicate, "replugs": a.replugs,
        "acked": len(acked), "rejected": dict(rejected), "failed": dict(failed),
        "failed_with_unknown_fate": failed_applied_unknown,
        "outcomes_reported": outcomes, "applied_records": len(applied),
        "applied_twice": twice, "acked_missing_from_log": missing,
        "duration_s": round(duration, 2),
        "rtt_ms": {"p50": round(q(0.5), 3), "p99": round(q(0.99), 3),
                   "max": round(rtts[-1] * 1e3 if rtts else 0.0, 3),
                   "mean": round(statistics.fmean(rtts) * 1e3, 3) if rtts else 0.0},
        "link": {k: stats[k] for k in ("connects", "disconnects", "handshakes", "transmissions",
                                       "retransmissions", "status_queries", "stray_frames")},
    }
    result["passed"] = (twice == 0 and missing == 0 and outcomes == a.commands
                        and stats["disconnects"] >= a.replugs)
    shutil.rmtree(tmp, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m firmware_bridge.soak", description=__doc__.split("\n")[0])
    p.add_argument("--commands", type=int, default=10000)
    p.add_argument("--corrupt", type=float, default=0.01)
    p.add_argument("--drop", type=float, default=0.01)
    p.add_argument("--duplicate", type=float, default=0.0)
    p.add_argument("--replugs", type=int, default=3)
    p.add_argument("--unplug-time", type=float, default=0.2, help="seconds the cable stays out")
    p.add_argument("--deadline", type=float, default=5.0, help="per-command deadline (s)")
    p.add_argument("--device", choices=("python", "c"), default="python")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", default=None, help="write the result as JSON to this file")
    a = p.parse_args(argv)
    r = run(a)
    for k, v in r.items():
        print(f"{k:>26}: {v}")
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=2) + "\n")
    print("PASS" if r["passed"] else "FAIL")
    return 0 if r["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
