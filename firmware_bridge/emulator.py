"""Instrument emulator: the device side of the protocol on a real serial port.

Runs :class:`~firmware_bridge.device.DeviceCore` behind a pty (or any serial
port) with fault injection, and logs every command it actually applies as
JSON Lines so exactly-once delivery can be checked from outside.

CLI::

    python -m firmware_bridge.emulator PORT [--corrupt P] [--drop P] [--duplicate P]
        [--delay S] [--silent-after N] [--applied-log FILE] [--link PATH] [--seed N]
        [--device-id ID]

``PORT`` is a serial device path / pyserial URL, or ``pty`` to create a
pseudo-terminal and print the path the host should open. Signals (as the C
firmware): SIGUSR1 unplug, SIGUSR2 replug, SIGHUP reboot, SIGTERM exit.

As a separate process, like the real device (``edge run``'s built-in
instrument, pipeline tests, benchmarks)::

    emu = spawn_pty_emulator(applied_log="applied.jsonl")
    bridge = firmware_bridge.connect(emu.port)
    emu.unplug(); emu.replug(); emu.reboot(); emu.stop()

In-process (protocol tests that inspect the device's state)::

    emu = start_pty_emulator(corrupt=0.01, drop=0.01, applied_log="applied.jsonl")
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import signal
import sys
import tempfile
import threading
import time
import tty
from dataclasses import dataclass
from typing import Any

from cobs import cobs

from .device import DeviceCore
from .framing import MAX_ENCODED, decode_raw


@dataclass
class Faults:
    """Fault injection probabilities, applied per frame in both directions."""

    corrupt: float = 0.0     # flip one bit of the frame
    drop: float = 0.0        # lose the frame
    duplicate: float = 0.0   # deliver the frame twice
    delay: float = 0.0       # seconds before each answer is written
    silent_after: int | None = None  # stop answering after N received frames
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("corrupt", "drop", "duplicate"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} probability must be in [0, 1], got {p}")
        if self.delay < 0:
            raise ValueError("delay must be >= 0")


@dataclass
class FaultCounters:
    frames_in: int = 0
    frames_out: int = 0
    corrupted_in: int = 0
    corrupted_out: int = 0
    dropped_in: int = 0
    dropped_out: int = 0
    duplicated_in: int = 0
    duplicated_out: int = 0
    bad_frames_in: int = 0
    oversize_in: int = 0


class _PtyEndpoint:
    """Master side of a pty whose slave is published under a stable symlink."""

    def __init__(self, link_path: str) -> None:
        self.link_path = link_path
        self.master = self.slave = -1
        self.slave_path = ""

    def plug(self) -> None:
        self.master, self.slave = os.openpty()
        # Raw mode now, so nothing is echoed or translated before the host opens it.
        tty.setraw(self.slave)
        tty.setraw(self.master)
        os.set_blocking(self.master, False)
        self.slave_path = os.ttyname(self.slave)
        tmp = f"{self.link_path}.{os.getpid()}.tmp"
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        os.symlink(self.slave_path, tmp)
        os.replace(tmp, self.link_path)  # atomic re-point, like udev

    def unplug(self) -> None:
        try:
            os.unlink(self.link_path)
        except FileNotFoundError:
            pass
        for fd in (self.master, self.slave):
            if fd >= 0:
                os.close(fd)
        self.master = self.slave = -1

    @property
    def plugged(self) -> bool:
        return self.master >= 0

    def fileno(self) -> int:
        return self.master

    def read(self) -> bytes:
        try:
            return os.read(self.master, 4096)
        except (BlockingIOError, InterruptedError):
            return b""
        except OSError:
            return b""  # EIO: no reader on the slave side yet

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        give_up = time.monotonic() + 1.0
        while view and time.monotonic() < give_up:
            try:
                view = view[os.write(self.master, view):]
            except BlockingIOError:
                select.select([], [self.master], [], 0.01)
            except OSError:
                return  # host side gone: the bytes are lost, as on a real wire


class _SerialEndpoint:
    """A real serial port opened with pyserial (CLI with a device path).

    A hang-up (cable pulled, host side closed, EIO) closes the port, says so
    on stderr, and the emulator reopens the same path every
    :data:`REOPEN_INTERVAL` seconds until it is back: never a silent dead
    thread, never a busy loop.
    """

    auto_reopen = True

    def __init__(self, port: str) -> None:
        self.port = self.link_path = self.slave_path = port
        self.ser: Any = None
        self.plug()  # the first open fails loudly (the CLI reports it)

    @property
    def plugged(self) -> bool:
        return self.ser is not None

    def fileno(self) -> int:
        return self.ser.fileno()

    def read(self) -> bytes:
        import serial
        try:
            return self.ser.read(4096)
        except (serial.SerialException, OSError, TypeError, AttributeError) as exc:
            self._lost(exc)
            return b""

    def write(self, data: bytes) -> None:
        import serial
        try:
            self.ser.write(data)
        except (serial.SerialException, OSError, TypeError, AttributeError) as exc:
            self._lost(exc)

    def _lost(self, exc: Exception) -> None:
        print(f"emulator: serial port {self.port} lost ({exc}); reopening every "
              f"{REOPEN_INTERVAL} s", file=sys.stderr, flush=True)
        self.unplug()

    def unplug(self) -> None:
        ser, self.ser = self.ser, None
        if ser is not None:
            try:
                ser.close()
            except Exception:  # noqa: BLE001 - closing a vanished port may fail any way
                pass

    def plug(self) -> None:
        import serial
        self.ser = serial.serial_for_url(self.port, baudrate=115200, timeout=0)


#: Seconds between attempts to reopen a serial port that hung up.
REOPEN_INTERVAL = 0.2


class EmulatorHandle:
    """A running emulator (background thread). Use :func:`start_pty_emulator`.

    Attributes
    ----------
    port : str
        Path the host opens (a symlink that survives unplug/replug).
    core : DeviceCore
        The protocol state machine (instrument state in ``core.instrument``).
    counters : FaultCounters
        Injected faults.
    """

    def __init__(self, endpoint: Any, faults: Faults, applied_log: str | None = None,
                 name: str = "python-emulator", device_id: str | None = None) -> None:
        self.faults = faults
        self.counters = FaultCounters()
        self._rng = random.Random(faults.seed)
        self._endpoint = endpoint
        self._lock = threading.Lock()
        self._applied: list[dict] = []
        self._log = open(applied_log, "a", encoding="utf-8") if applied_log else None
        self.core = DeviceCore(on_applied=self._on_applied, name=name, device_id=device_id)
        self.silent = False        # stop answering (and stop processing) frames
        self.mute_replies = False  # process frames but lose every answer
        self._rx = bytearray()
        self._wake_r, self._wake_w = os.pipe()
        self._requests: list[tuple[str, threading.Event]] = []
        self._stop = False
        #: Set if the emulator thread stopped on an unexpected error (``error`` says which).
        self.dead = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="emulator", daemon=True)
        self._thread.start()

    # -- public API ---------------------------------------------------------
    @property
    def port(self) -> str:
        return self._endpoint.link_path

    @property
    def device_path(self) -> str:
        """Current underlying tty (changes on every replug)."""
        return self._endpoint.slave_path

    @property
    def applied(self) -> list[dict]:
        """Copy of the applied-command records (same content as the JSONL log)."""
        with self._lock:
            return list(self._applied)

    @property
    def state(self) -> dict:
        """Snapshot of the simulated instrument and protocol state."""
        with self._lock:
            ins = self.core.instrument
            now = time.monotonic() * 1000
            return {"attenuation": ins.attenuation, "exposure_us": ins.exposure_us,
                    "gain": ins.gain, "shutter_open": ins.shutter_open,
                    "beam_x_nm": ins.beam_x_nm, "beam_y_nm": ins.beam_y_nm,
                    "alarm_code": ins.alarm_code, "alarm_text": ins.alarm_text,
                    "safe_state": self.core.safe, "session": self.core.session,
                    "applied_count": self.core.applied_count,
                    "heartbeat_age_ms": None if self.core.last_hb_ms is None
                    else now - self.core.last_hb_ms}

    def unplug(self) -> None:
        """Simulate pulling the cable: close the pty and remove the port path."""
        self._request("unplug")

    def replug(self) -> None:
        """Simulate plugging back in: new pty behind the same port path."""
        self._request("replug")

    @property
    def device_id(self) -> str:
        """Device id (serial number) reported in HELLO_ACK; survives :meth:`reboot`."""
        return self.core.device_id

    def reboot(self, boot_id: int | None = None) -> None:
        """Simulate a device restart: new boot id, boot-time instrument state, no sessions.

        The device id and the port stay the same.
        """
        with self._lock:
            self.core = DeviceCore(on_applied=self._on_applied, boot_id=boot_id,
                                   name=self.core.name, device_id=self.core.device_id)
            self._rx.clear()

    def stop(self) -> None:
        """Stop the emulator thread, close the port and the applied log."""
        if self._stop:
            return
        self._stop = True
        os.write(self._wake_w, b"x")
        self._thread.join(timeout=5)
        if self._endpoint.plugged:
            self._endpoint.unplug()
        os.close(self._wake_r)
        os.close(self._wake_w)
        if self._log is not None:
            self._log.close()

    def __enter__(self) -> "EmulatorHandle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- internals ----------------------------------------------------------
    def _request(self, what: str) -> None:
        done = threading.Event()
        with self._lock:
            self._requests.append((what, done))
        os.write(self._wake_w, b"x")
        if not done.wait(5):
            raise RuntimeError(f"emulator did not process {what}")

    def _on_applied(self, session: int, seq: int, command: str, args: dict) -> None:
        rec = {"session": session, "seq": seq, "command": command, "args": args,
               "time": time.time()}
        self._applied.append(rec)  # called with self._lock held (see _run)
        if self._log is not None:
            self._log.write(json.dumps(rec) + "\n")
            self._log.flush()

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - report, never die silently
            self.error = exc
            print(f"emulator: stopped by an internal error: {type(exc).__name__}: {exc}",
                  file=sys.stderr, flush=True)
            self.dead.set()

    def _loop(self) -> None:
        next_reopen = 0.0
        while not self._stop:
            ep = self._endpoint
            if not ep.plugged and getattr(ep, "auto_reopen", False) \
                    and time.monotonic() >= next_reopen:
                next_reopen = time.monotonic() + REOPEN_INTERVAL
                try:
                    ep.plug()
                    self._rx.clear()
                    print(f"emulator: serial port {ep.port} reopened", file=sys.stderr, flush=True)
                except Exception:  # noqa: BLE001 - still gone: try again later
                    pass
            fds = [self._wake_r] + ([ep.fileno()] if ep.plugged else [])
            try:
                r, _, _ = select.select(fds, [], [], 0.01)
            except (OSError, ValueError):
                r = []
            if self._wake_r in r:
                os.read(self._wake_r, 64)
                self._service_requests()
                continue
            data = ep.read() if ep.plugged and r else b""
            with self._lock:
                out = self.core.tick(time.monotonic() * 1000)
                if data:
                    out += self._handle_bytes(data)
            if out and not self.silent and not self.mute_replies:
                if self.faults.delay:
                    time.sleep(self.faults.delay)
                self._send(out)

    def _service_requests(self) -> None:
        with self._lock:
            reqs, self._requests = self._requests, []
        for what, done in reqs:
            ep = self._endpoint
            if what == "unplug" and ep.plugged:
                ep.unplug()
            elif what == "replug" and not ep.plugged:
                ep.plug()
                self._rx.clear()
            done.set()

    def _handle_bytes(self, data: bytes) -> list[bytes]:
        out: list[bytes] = []
        self._rx += data
        if b"\x00" not in data:
            if len(self._rx) > 4096:
                self._rx.clear()  # garbage without delimiters: bound memory
            return out
        *chunks, rest = bytes(self._rx).split(b"\x00")
        self._rx = bytearray(rest)
        f, c, rng = self.faults, self.counters, self._rng
        now = time.monotonic() * 1000
        for chunk in chunks:
            if not chunk:
                continue
            c.frames_in += 1
            if len(chunk) > MAX_ENCODED:  # longer than the protocol allows: never answered
                c.oversize_in += 1
                continue
            if f.silent_after is not None and c.frames_in > f.silent_after:
                self.silent = True
            if f.drop and rng.random() < f.drop:
                c.dropped_in += 1
                continue
            if f.corrupt and rng.random() < f.corrupt:
                c.corrupted_in += 1
                chunk = _flip_bit(chunk, rng)
            copies = 1
            if f.duplicate and rng.random() < f.duplicate:
                c.duplicated_in += 1
                copies = 2
            try:
                frame = decode_raw(cobs.decode(chunk))
            except cobs.DecodeError:
                frame = None
            if frame is None:
                c.bad_frames_in += 1
                continue
            if self.silent:
                continue
            for _ in range(copies):
                out += self.core.receive(frame, now)
        return out

    def _send(self, frames: list[bytes]) -> None:
        f, c, rng = self.faults, self.counters, self._rng
        buf = bytearray()
        for frame in frames:
            c.frames_out += 1
            if f.drop and rng.random() < f.drop:
                c.dropped_out += 1
                continue
            if f.corrupt and rng.random() < f.corrupt:
                c.corrupted_out += 1
                frame = _flip_bit(frame[:-1], rng) + b"\x00"
            buf += frame
            if f.duplicate and rng.random() < f.duplicate:
                c.duplicated_out += 1
                buf += frame
        if buf and self._endpoint.plugged:
            self._endpoint.write(bytes(buf))


def _flip_bit(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    i = rng.randrange(len(b))
    b[i] ^= 1 << rng.randrange(8)
    return bytes(b)


def start_pty_emulator(*, corrupt: float = 0.0, drop: float = 0.0, duplicate: float = 0.0,
                       delay: float = 0.0, silent_after: int | None = None,
                       applied_log: str | None = None, link_path: str | None = None,
                       seed: int | None = None, name: str = "python-emulator",
                       device_id: str | None = None) -> EmulatorHandle:
    """Start an emulator on a new pty in a background thread.

    Parameters
    ----------
    corrupt, drop, duplicate : float
        Per-frame fault probabilities, both directions.
    delay : float
        Seconds to wait before writing each batch of answers.
    silent_after : int, optional
        Stop answering after this many received frames.
    applied_log : str, optional
        JSON Lines file receiving one record per applied command.
    link_path : str, optional
        Symlink path to publish the pty under (default: in a new temp dir).
    seed : int, optional
        Seed of the fault RNG (reproducible runs).
    name : str
        Firmware name reported in HELLO_ACK.
    device_id : str, optional
        Device id (serial number, at most 24 UTF-8 bytes) reported in HELLO_ACK.
        Random (``emu-XXXXXXXX``) by default: a new emulator is a different device.
        Pass the same id to emulate a restart of the same device.

    Returns
    -------
    EmulatorHandle
    """
    if link_path is None:
        link_path = os.path.join(tempfile.mkdtemp(prefix="fwb-emu-"), "ttyEMU0")
    ep = _PtyEndpoint(link_path)
    ep.plug()
    return EmulatorHandle(ep, Faults(corrupt, drop, duplicate, delay, silent_after, seed),
                          applied_log, name, device_id)


class EmulatorProcess:
    """The emulator in a child process (:func:`spawn_pty_emulator`).

    A real instrument board does not share the host's CPU time or its Python
    GIL; an in-process emulator does, and on a busy host a stalled emulator
    thread reads the heartbeats that waited in the pty late, so its watchdog
    trips although the host sent them in time. Unplug, replug and reboot are
    signals to the child (SIGUSR1, SIGUSR2, SIGHUP, as for the C firmware);
    they return once the signal is sent.
    """

    def __init__(self, argv: list[str], applied_log: str | None, start_timeout: float) -> None:
        import subprocess

        self.applied_log = applied_log
        self._err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, "-m", "firmware_bridge.emulator", "pty",
                                      "--parent", str(os.getpid()), *argv],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._err)
        ready, _, _ = select.select([self.proc.stdout], [], [], start_timeout)
        line = self.proc.stdout.readline().decode(errors="replace").strip() if ready else ""
        if not line:
            self._terminate()
            self._err.seek(0)
            why = self._err.read().decode(errors="replace").strip().splitlines()
            self._close()
            raise RuntimeError(f"instrument emulator did not start within {start_timeout} s"
                               + (f": {why[-1]}" if why else ""))
        self.port = line

    @property
    def applied(self) -> list[dict]:
        """Applied-command records from the JSON Lines log (needs ``applied_log``)."""
        if self.applied_log is None:
            raise RuntimeError("spawn_pty_emulator(applied_log=...) was not given")
        try:
            with open(self.applied_log, encoding="utf-8") as fh:
                return [json.loads(line) for line in fh if line.endswith("\n")]
        except FileNotFoundError:
            return []

    def _signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def unplug(self) -> None:
        self._signal(signal.SIGUSR1)

    def replug(self) -> None:
        self._signal(signal.SIGUSR2)

    def reboot(self) -> None:
        self._signal(signal.SIGHUP)

    def stop(self) -> None:
        """Terminate the child (killed after 5 s). Idempotent."""
        self._terminate()
        self._close()

    def _terminate(self) -> None:
        import subprocess

        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def _close(self) -> None:
        for fh in (self.proc.stdout, self._err):
            fh.close()

    def __enter__(self) -> "EmulatorProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def spawn_pty_emulator(*, applied_log: str | None = None, link_path: str | None = None,
                       device_id: str | None = None, seed: int | None = None,
                       start_timeout: float = 30.0) -> EmulatorProcess:
    """Start the emulator on a new pty in its own process (as a real device).

    Parameters
    ----------
    applied_log, link_path, device_id, seed
        As for :func:`start_pty_emulator`.
    start_timeout : float
        Seconds to wait for the child to publish its pty.

    Returns
    -------
    EmulatorProcess
        ``port`` is the path the host opens. The child exits with its parent.
    """
    argv: list[str] = []
    for flag, value in (("--applied-log", applied_log), ("--link", link_path),
                        ("--device-id", device_id), ("--seed", seed)):
        if value is not None:
            argv += [flag, str(value)]
    return EmulatorProcess(argv, applied_log, start_timeout)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m firmware_bridge.emulator",
                                description="Instrument emulator (device side of firmware_bridge).")
    p.add_argument("port", help="serial port path/URL, or 'pty' to create a pseudo-terminal")
    p.add_argument("--corrupt", type=float, default=0.0, help="probability to corrupt a frame")
    p.add_argument("--drop", type=float, default=0.0, help="probability to drop a frame")
    p.add_argument("--duplicate", type=float, default=0.0, help="probability to duplicate a frame")
    p.add_argument("--delay", type=float, default=0.0, help="seconds before each answer")
    p.add_argument("--silent-after", type=int, default=None, help="go silent after N frames")
    p.add_argument("--applied-log", default=None, help="JSON Lines log of applied commands")
    p.add_argument("--link", default=None, help="symlink path for the pty (pty mode)")
    p.add_argument("--seed", type=int, default=None, help="fault RNG seed")
    p.add_argument("--device-id", default=None,
                   help="device id (serial) in HELLO_ACK, <= 24 UTF-8 bytes (default: random)")
    p.add_argument("--parent", type=int, default=None,
                   help="exit when the process with this pid is gone (spawn_pty_emulator)")
    a = p.parse_args(argv)
    if a.device_id is not None and not 0 < len(a.device_id.encode("utf-8", "replace")) <= 24:
        p.error("--device-id must be 1 to 24 UTF-8 bytes")
    try:
        faults = Faults(a.corrupt, a.drop, a.duplicate, a.delay, a.silent_after, a.seed)
    except ValueError as exc:
        p.error(str(exc))
    if a.port == "pty":
        emu = start_pty_emulator(corrupt=a.corrupt, drop=a.drop, duplicate=a.duplicate,
                                 delay=a.delay, silent_after=a.silent_after,
                                 applied_log=a.applied_log, link_path=a.link, seed=a.seed,
                                 device_id=a.device_id)
    else:
        try:
            ep = _SerialEndpoint(a.port)
        except Exception as exc:  # noqa: BLE001 - report any open failure clearly
            print(f"error: cannot open {a.port}: {exc}", file=sys.stderr)
            return 2
        emu = EmulatorHandle(ep, faults, a.applied_log, device_id=a.device_id)
    print(emu.port, flush=True)
    print(f"emulator ready on {emu.port} (tty {emu.device_path}, device id {emu.device_id}); "
          f"Ctrl-C to stop", file=sys.stderr, flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    # Same signals as the C firmware's host program (soak and tests drive both alike).
    signal.signal(signal.SIGUSR1, lambda *_: emu.unplug())
    signal.signal(signal.SIGUSR2, lambda *_: emu.replug())
    signal.signal(signal.SIGHUP, lambda *_: emu.reboot())
    try:
        while not stop.wait(0.2):
            if emu.dead.is_set():  # the thread reported why on stderr
                return 1
            if a.parent is not None and os.getppid() != a.parent:  # orphaned: the host is gone
                break
    except KeyboardInterrupt:
        pass
    finally:
        emu.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
