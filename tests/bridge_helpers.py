"""Shared helpers for the firmware_bridge tests: device fixtures over real ptys.

Two interchangeable devices sit behind a pty (published as a symlink that
survives unplug/replug): the Python emulator (in-process thread) and the C
reference firmware (built with ``cc`` and run as a subprocess).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from firmware_bridge.commands import Limits
from firmware_bridge.emulator import start_pty_emulator

FIRMWARE_DIR = Path(__file__).resolve().parents[1] / "firmware_bridge" / "firmware"
CFLAGS = ["-std=c99", "-Wall", "-Wextra", "-Werror", "-O2"]

_default = Limits.load(None)
#: Shipped limits with the rate limits opened up (tests send bursts).
FAST_LIMITS = {
    "rate": {"max_per_second": 1e6, "burst": 1_000_000},
    "commands": {
        "set_attenuation": {"level": {"min": 0, "max": 15}},
        "set_exposure": {"time_s": {"min": 0.0001, "max": 10.0}},
        "set_gain": {},
        "shutter": {},
        "recentre_beam": {"dx": {"min": -50.0, "max": 50.0}, "dy": {"min": -50.0, "max": 50.0}},
        "raise_alarm": {"code": {"min": 1, "max": 65534}, "text": {"max_bytes": 64}},
        "query_state": {},
        "resume": {},
    },
}


def compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")


def build_firmware(out_dir: Path) -> Path:
    """Compile the reference firmware host program with the strict flags."""
    cc = compiler()
    assert cc is not None
    exe = out_dir / "bridge_fw"
    subprocess.run([cc, *CFLAGS, "-o", str(exe), str(FIRMWARE_DIR / "bridge_proto.c"),
                    str(FIRMWARE_DIR / "host_pty.c")], check=True, capture_output=True, text=True)
    return exe


def wait_until(pred, timeout: float = 5.0, what: str = "condition") -> None:
    """Poll ``pred`` (synchronisation helper, not a timing assertion)."""
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


class PyDevice:
    kind = "python-emulator"

    def __init__(self, tmp: Path, **faults) -> None:
        self.log_path = tmp / "applied-py.jsonl"
        self.emu = start_pty_emulator(applied_log=str(self.log_path),
                                      link_path=str(tmp / "ttyPY0"), seed=1234, **faults)
        self.port = self.emu.port

    def applied(self) -> list[dict]:
        return read_log(self.log_path)

    def unplug(self) -> None:
        self.emu.unplug()

    def replug(self) -> None:
        self.emu.replug()

    def stop(self) -> None:
        self.emu.stop()


class CDevice:
    kind = "c-firmware"

    def __init__(self, tmp: Path, exe: Path, corrupt: float = 0.0, drop: float = 0.0,
                 duplicate: float = 0.0, silent_after: int | None = None) -> None:
        self.log_path = tmp / "applied-c.jsonl"
        self.port = str(tmp / "ttyC0")
        args = [str(exe), "pty", "--link", self.port, "--applied-log", str(self.log_path),
                "--corrupt", str(corrupt), "--drop", str(drop), "--duplicate", str(duplicate),
                "--seed", "1234"]
        if silent_after is not None:
            args += ["--silent-after", str(silent_after)]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().strip()
        assert line == self.port, f"firmware printed {line!r}"

    def applied(self) -> list[dict]:
        return read_log(self.log_path)

    def unplug(self) -> None:
        self.proc.send_signal(signal.SIGUSR1)
        wait_until(lambda: not os.path.lexists(self.port), what="firmware unplug")

    def replug(self) -> None:
        self.proc.send_signal(signal.SIGUSR2)
        wait_until(lambda: os.path.exists(self.port), what="firmware replug")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()


def read_log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_exactly_once(applied: list[dict], acked: list[tuple[int, int]]) -> None:
    """No (session, seq) applied twice; every acked (session, seq) applied."""
    keys = [(r["session"], r["seq"]) for r in applied]
    dupes = {k for k in keys if keys.count(k) > 1} if len(keys) != len(set(keys)) else set()
    assert not dupes, f"applied twice: {sorted(dupes)[:10]}"
    missing = set(acked) - set(keys)
    assert not missing, f"acked but not applied: {sorted(missing)[:10]}"


__all__ = ["FAST_LIMITS", "PyDevice", "CDevice", "build_firmware", "compiler", "wait_until",
           "read_log", "check_exactly_once"]
