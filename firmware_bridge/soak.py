"""Soak test: many commands through a faulty link with unplug/replug events,
other hosts taking the port over and device crashes.

    python -m firmware_bridge.soak --commands 10000 --corrupt 0.01 --drop 0.01 \\
        --replugs 3 --takeovers 2 --restarts 2 [--duplicate 0.0] [--device python|c] \\
        [--json out.json]

The device runs as its own process (``python -m firmware_bridge.emulator`` or the
C firmware). Mid-run, while commands flow: the cable is pulled and put back
(``--replugs``); a second host opens the same port without an exclusive lock
and sends commands with its own session (``--takeovers``); the device is
killed with SIGKILL, an unrelated program takes its pty number, and the same
device restarts on a new pty behind the same link (``--restarts``).

Checks, from the device's applied-log (JSON Lines, both hosts, all boots):

* commands applied twice                      -> must be 0
* acknowledged commands missing from the log   -> must be 0 (both hosts)
* every send of both hosts ended in ack / nack / failure exception (counted)
* every replug and restart seen (disconnects, one boot id per restart)

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
from .errors import BridgeError, CommandFailed, CommandRejected

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


class _Device:
    """The device as its own process (Python emulator CLI or C firmware) behind a stable link.

    ``restart()`` is a crash and a cold start: ``kill -9`` (the link keeps naming the
    dead pty), an unrelated program grabs the freed pty number, then the same
    device (same id, new boot id) comes back on a new pty behind the same link.
    """

    def __init__(self, tmp: Path, a: argparse.Namespace, log: str) -> None:
        if a.device == "c":
            cc = shutil.which(os.environ.get("CC", "cc"))
            if cc is None:
                raise SystemExit("no C compiler found for --device c")
            exe = tmp / "bridge_fw"
            subprocess.run([cc, "-std=c99", "-Wall", "-Wextra", "-Werror", "-O2", "-o", str(exe),
                            str(_FW_DIR / "bridge_proto.c"), str(_FW_DIR / "host_pty.c")],
                           check=True)
            self.cmd = [str(exe)]
        else:
            self.cmd = [sys.executable, "-m", "firmware_bridge.emulator"]
        self.port = str(tmp / "ttySOAK")
        self.args = ["pty", "--link", self.port, "--applied-log", log, "--corrupt", str(a.corrupt),
                     "--drop", str(a.drop), "--duplicate", str(a.duplicate), "--seed",
                     str(a.seed), "--device-id", "soak-device-1"]
        self.squatters: list[tuple[int, int]] = []
        self.proc: subprocess.Popen | None = None
        self.ttys: list[str] = []
        self._start()

    def _start(self) -> None:
        self.proc = subprocess.Popen(self.cmd + self.args, stdout=subprocess.PIPE, text=True)
        if self.proc.stdout.readline().strip() != self.port:
            raise SystemExit(f"device did not start: {self.cmd + self.args}")
        self.ttys.append(os.path.realpath(self.port))

    def _wait_link(self, present: bool) -> None:
        end = time.monotonic() + 10
        while os.path.lexists(self.port) != present and time.monotonic() < end:
            time.sleep(0.001)

    def unplug(self) -> None:
        self.proc.send_signal(signal.SIGUSR1)
        self._wait_link(False)

    def replug(self) -> None:
        self.proc.send_signal(signal.SIGUSR2)
        self._wait_link(True)

    def restart(self, down_time: float) -> None:
        self.proc.kill()
        self.proc.wait(10)
        self.proc.stdout.close()
        # The pty number is free once the host has closed its end (it sees EIO at once);
        # then an unrelated program takes it, so the device comes back on another one.
        time.sleep(min(0.1, down_time))
        self.squatters.append(os.openpty())
        time.sleep(down_time)
        self._start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            self.proc.stdout.close()
        for m, sl in self.squatters:
            os.close(m)
            os.close(sl)


def _schedule(commands: int, n: int, phase: float) -> set[int]:
    """``n`` command indices spread over the run, shifted by ``phase`` (0..1) of a gap."""
    return {int(commands * (k + phase) / (n + 1)) + 1 for k in range(1, n + 1)} if n else set()


def _read_applied(log: str) -> tuple[list[dict], int]:
    records, torn = [], 0
    for line in Path(log).read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                torn += 1  # a line cut by kill -9 (its command was never acked)
    return records, torn


def run(a: argparse.Namespace) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="fwb-soak-"))
    log = str(tmp / "applied.jsonl")
    dev = _Device(tmp, a, log)
    acked: list[tuple[int, int]] = []
    boots: set[int] = set()
    rtts: list[float] = []
    rejected: Counter = Counter()
    failed: Counter = Counter()
    failed_applied_unknown = 0
    other = {"sent": 0, "acked": 0, "rejected": 0, "failed": 0, "connect_failed": 0}
    other_acked: list[tuple[int, int]] = []
    events: dict[int, list[str]] = {}
    for kind, n, phase in (("replug", a.replugs, 0.0), ("takeover", a.takeovers, 0.33),
                           ("restart", a.restarts, 0.66)):
        for i in _schedule(a.commands, n, phase):
            events.setdefault(min(i, a.commands - 1), []).append(kind)
    threads: list[threading.Thread] = []
    lock = threading.Lock()

    def replug() -> None:
        dev.unplug()
        time.sleep(a.unplug_time)
        dev.replug()

    def takeover() -> None:
        # Another host on the same port (no exclusive lock): its HELLO takes the
        # device's session over in the middle of the main host's traffic.
        try:
            with connect(dev.port, limits=_soak_limits(), exclusive=False, deadline=a.deadline,
                         connect_timeout=10.0) as b2:
                for j in range(a.takeover_commands):
                    with lock:
                        other["sent"] += 1
                    name, args = _command(j)
                    try:
                        ack = b2.send(name, **args)
                        with lock:
                            other["acked"] += 1
                            other_acked.append((ack.session, ack.seq))
                    except CommandRejected:
                        with lock:
                            other["rejected"] += 1
                    except CommandFailed:
                        with lock:
                            other["failed"] += 1
        except BridgeError:
            with lock:
                other["connect_failed"] += 1

    actions = {"replug": replug, "takeover": takeover,
               "restart": lambda: dev.restart(a.restart_time)}
    t0 = time.monotonic()
    try:
        with connect(dev.port, limits=_soak_limits(), deadline=a.deadline,
                     connect_timeout=10.0) as bridge:
            for i in range(a.commands):
                for kind in events.get(i, ()):
                    th = threading.Thread(target=actions[kind])  # mid-stream, while sending
                    th.start()
                    threads.append(th)
                name, args = _command(i)
                try:
                    ack = bridge.send(name, **args)
                    acked.append((ack.session, ack.seq))
                    boots.add(ack.state.boot_id)
                    rtts.append(ack.rtt_s)
                except CommandRejected as exc:
                    rejected[exc.reason] += 1
                except CommandFailed as exc:
                    failed[type(exc).__name__] += 1
                    failed_applied_unknown += exc.applied is None
            for th in threads:
                th.join()
            stats = bridge.link_status()
    finally:
        dev.stop()
    duration = time.monotonic() - t0
    applied, torn = _read_applied(log)
    keys = Counter((r["session"], r["seq"]) for r in applied)
    twice = sum(1 for n in keys.values() if n > 1)
    missing = sum(1 for k in acked + other_acked if k not in keys)
    outcomes = len(acked) + sum(rejected.values()) + sum(failed.values())
    other_outcomes = other["acked"] + other["rejected"] + other["failed"]
    rtts.sort()
    q = (lambda p: rtts[min(len(rtts) - 1, int(p * len(rtts)))] * 1e3) if rtts else (lambda p: 0.0)
    result = {
        "device": a.device, "commands": a.commands, "corrupt": a.corrupt, "drop": a.drop,
        "duplicate": a.duplicate, "replugs": a.replugs, "takeovers": a.takeovers,
        "restarts": a.restarts,
        "acked": len(acked), "rejected": dict(rejected), "failed": dict(failed),
        "failed_with_unknown_fate": failed_applied_unknown,
        "outcomes_reported": outcomes, "other_host": other,
        "applied_records": len(applied), "torn_log_lines": torn,
        "applied_twice": twice, "acked_missing_from_log": missing,
        "boots_seen": len(boots), "device_ttys": len(set(dev.ttys)),
        "duration_s": round(duration, 2),
        "rtt_ms": {"p50": round(q(0.5), 3), "p99": round(q(0.99), 3),
                   "max": round(rtts[-1] * 1e3 if rtts else 0.0, 3),
                   "mean": round(statistics.fmean(rtts) * 1e3, 3) if rtts else 0.0},
        "link": {k: stats[k] for k in ("connects", "disconnects", "handshakes", "transmissions",
                                       "retransmissions", "status_queries", "stray_frames",
                                       "reopens")},
    }
    result["passed"] = (twice == 0 and missing == 0 and outcomes == a.commands
                        and other_outcomes == other["sent"]
                        and stats["disconnects"] >= a.replugs + a.restarts
                        and len(boots) >= a.restarts + 1)
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
    p.add_argument("--takeovers", type=int, default=2,
                   help="times a second host session takes the port over mid-run")
    p.add_argument("--takeover-commands", type=int, default=20,
                   help="commands the second host sends each time")
    p.add_argument("--restarts", type=int, default=2,
                   help="times the device is killed (-9) and restarted on a new pty number")
    p.add_argument("--restart-time", type=float, default=0.3, help="seconds the device is down")
    p.add_argument("--deadline", type=float, default=5.0, help="per-command deadline (s)")
    p.add_argument("--device", choices=("python", "c"), default="python")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", default=None, help="write the result as JSON to this file")
    a = p.parse_args(argv)
    for name in ("commands", "replugs", "takeovers", "takeover_commands", "restarts"):
        if getattr(a, name) < (1 if name == "commands" else 0):
            p.error(f"--{name.replace('_', '-')} must be >= {1 if name == 'commands' else 0}")
    r = run(a)
    for k, v in r.items():
        print(f"{k:>26}: {v}")
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=2) + "\n")
    print("PASS" if r["passed"] else "FAIL")
    return 0 if r["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
