"""Shared helpers for the firmware_bridge tests: device fixtures over real ptys.

Two interchangeable devices sit behind a pty (published as a symlink that
survives unplug/replug): the Python emulator (in-process thread) and the C
reference firmware (built with ``cc`` and run as a subprocess).
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import struct
import subprocess
import threading
import time
import tty
from pathlib import Path

import pytest

from firmware_bridge.commands import Limits
from firmware_bridge.emulator import start_pty_emulator
from firmware_bridge.framing import Frame, FrameDecoder, encode_frame
from firmware_bridge.messages import MsgType

#: HELLO payload as the spec writes it (u16 watchdog ms, u32 seq floor), independent of the
#: library so raw-frame tests exercise the devices exactly as specified.
HELLO_WIRE = struct.Struct("<HI")

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

    def __init__(self, tmp: Path, device_id: str | None = None, **faults) -> None:
        self.log_path = tmp / "applied-py.jsonl"
        if device_id is not None:
            faults["device_id"] = device_id
        self.emu = start_pty_emulator(applied_log=str(self.log_path),
                                      link_path=str(tmp / "ttyPY0"), seed=1234, **faults)
        self.port = self.emu.port

    def reboot(self) -> None:
        self.emu.reboot()

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
                 duplicate: float = 0.0, silent_after: int | None = None,
                 device_id: str | None = None) -> None:
        self.log_path = tmp / "applied-c.jsonl"
        self.port = str(tmp / "ttyC0")
        args = [str(exe), "pty", "--link", self.port, "--applied-log", str(self.log_path),
                "--corrupt", str(corrupt), "--drop", str(drop), "--duplicate", str(duplicate),
                "--seed", "1234"]
        if silent_after is not None:
            args += ["--silent-after", str(silent_after)]
        if device_id is not None:
            args += ["--device-id", device_id]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().strip()
        assert line == self.port, f"firmware printed {line!r}"

    def applied(self) -> list[dict]:
        return read_log(self.log_path)

    def reboot(self) -> None:
        """SIGHUP: new boot id, boot-time state, no sessions (same pty, same device id)."""
        self.proc.send_signal(signal.SIGHUP)

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


@pytest.fixture(scope="session")
def firmware_exe(tmp_path_factory):
    if compiler() is None:
        pytest.skip("no C compiler (cc/gcc/clang) found: cannot build the reference firmware")
    return build_firmware(tmp_path_factory.mktemp("fw"))


@pytest.fixture(params=["python-emulator", "c-firmware"])
def make_device(request, tmp_path):
    """``make_device(**faults)`` -> a PyDevice or a CDevice (both, by parametrisation)."""
    devices = []

    def make(**kw):
        if request.param == "python-emulator":
            dev = PyDevice(tmp_path, **kw)
        else:
            dev = CDevice(tmp_path, request.getfixturevalue("firmware_exe"), **kw)
        devices.append(dev)
        return dev

    make.kind = request.param
    yield make
    for d in devices:
        d.stop()


class RawHost:
    """A host that speaks raw frames on a real tty (for device-side protocol tests)."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        tty.setraw(self.fd)
        self.decoder = FrameDecoder()
        self.pending: list[Frame] = []

    def send(self, data: bytes) -> None:
        os.write(self.fd, data)

    def hello(self, session: int, seq: int = 1, floor: int = 0, watchdog_ms: int = 10000) -> Frame:
        self.send(encode_frame(MsgType.HELLO, session, seq, HELLO_WIRE.pack(watchdog_ms, floor)))
        return self.expect(lambda f: f.msg_type == MsgType.HELLO_ACK and f.seq == seq
                           and f.session == session)

    def frame(self, msg_type: int, session: int, seq: int, payload: bytes = b"") -> Frame:
        """Send one frame and return the device's answer for the same (session, seq)."""
        self.send(encode_frame(msg_type, session, seq, payload))
        return self.expect(lambda f: f.session == session and f.seq == seq
                           and f.msg_type != MsgType.TELEMETRY)

    def expect(self, pred, timeout: float = 5.0) -> Frame:
        """Next frame matching ``pred``; frames before it are kept in ``pending``."""
        end = time.monotonic() + timeout
        while True:
            for i, f in enumerate(self.pending):
                if pred(f):
                    del self.pending[i]
                    return f
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError("timed out waiting for a frame from the device")
            r, _, _ = select.select([self.fd], [], [], left)
            if r:
                try:
                    self.pending += self.decoder.feed(os.read(self.fd, 4096))
                except BlockingIOError:
                    pass

    def close(self) -> None:
        os.close(self.fd)


class Cable:
    """A relay between a host-side pty (``port``) and the device's tty.

    ``lose_replies = True`` loses every device->host byte (an answer lost on the
    wire after the device acted); :meth:`inject` puts bytes on the host's side
    as if the device had sent them.
    """

    def __init__(self, device_path: str, tmp: Path) -> None:
        self.dev = os.open(device_path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        tty.setraw(self.dev)
        self.master, slave = os.openpty()
        tty.setraw(self.master)
        tty.setraw(slave)
        self.port = str(tmp / "ttyCABLE")
        os.symlink(os.ttyname(slave), self.port)
        self._slave = slave  # kept open: the master never sees EIO between host opens
        self.lose_replies = False
        self.paused = False  # relay nothing (another host talks to the device directly)
        self._stop = False
        self._lock = threading.Lock()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def inject(self, data: bytes) -> None:
        with self._lock:
            os.write(self.master, data)

    def _run(self) -> None:
        while not self._stop:
            if self.paused:
                time.sleep(0.005)
                continue
            r, _, _ = select.select([self.dev, self.master], [], [], 0.02)
            for fd in r:
                try:
                    data = os.read(fd, 4096)
                except (BlockingIOError, OSError):
                    continue
                if fd == self.master:
                    os.write(self.dev, data)
                elif not self.lose_replies:
                    with self._lock:
                        os.write(self.master, data)

    def close(self) -> None:
        self._stop = True
        self._t.join(2)
        for fd in (self.dev, self.master, self._slave):
            os.close(fd)
        os.unlink(self.port)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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


__all__ = ["HELLO_WIRE", "firmware_exe", "make_device", "FAST_LIMITS", "PyDevice", "CDevice",
           "RawHost", "Cable", "build_firmware", "compiler", "wait_until", "read_log",
           "check_exactly_once", "cpu_seconds"]
