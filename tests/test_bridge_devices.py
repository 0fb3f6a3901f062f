"""Both devices follow the spec at its edges (issue 13, item 5), over real ptys.

Over-long frames, a hung-up serial line (no busy loop, no silent death) and
alarm text that is not UTF-8 in the applied log.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tty
from pathlib import Path

import pytest
from cobs import cobs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from firmware_bridge.framing import HEADER, MAX_PAYLOAD, crc16
from firmware_bridge.messages import CommandId, MsgType
from bridge_helpers import (HELLO_WIRE, RawHost, cpu_seconds, firmware_exe,  # noqa: F401
                            make_device, wait_until)

S = 0x5E55105E


def _raw_frame(msg_type: int, session: int, seq: int, payload: bytes) -> bytes:
    """A CRC-valid frame of any length (the library refuses to build over-long ones)."""
    body = HEADER.pack(1, msg_type, session, seq) + payload
    return cobs.encode(body + crc16(body).to_bytes(2, "little")) + b"\x00"


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(extra=st.integers(1, 200), msg_type=st.sampled_from([MsgType.HELLO, MsgType.COMMAND,
                                                          MsgType.HEARTBEAT]))
def test_frames_longer_than_the_protocol_allows_are_never_answered(make_device, extra, msg_type):
    dev = make_device()
    host = RawHost(dev.port)
    try:
        host.hello(S, seq=1)
        # an over-long, CRC-valid frame, then a normal one: the first answer must be
        # for the normal one (the device answers in order)
        payload = bytes([CommandId.QUERY_STATE]) + bytes(MAX_PAYLOAD - 1 + extra)
        host.send(_raw_frame(msg_type, S, 2, payload))
        host.send(_raw_frame(MsgType.HEARTBEAT, S, 3, b""))
        reply = host.expect(lambda f: f.session == S and f.seq in (2, 3))
        assert reply.seq == 3 and reply.msg_type == MsgType.TELEMETRY
    finally:
        host.close()
        dev.stop()
    assert dev.applied() == []


# ----------------------------------------------------------------- hang-up of the line
def _device_on_path(kind: str, exe: Path | None, path: str) -> subprocess.Popen:
    cmd = ([sys.executable, "-m", "firmware_bridge.emulator", path] if kind == "python"
           else [str(exe), path])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == path
    return proc


def _new_line(link: Path) -> int:
    """A new pty whose slave is published (atomically) under ``link``; returns the master."""
    master, slave = os.openpty()
    tty.setraw(master)
    tmp = link.with_suffix(".tmp")
    os.symlink(os.ttyname(slave), tmp)
    os.replace(tmp, link)
    os.close(slave)
    return master


@pytest.mark.parametrize("kind", ["python", "c"])
def test_hung_up_line_neither_spins_nor_dies_and_is_reopened(kind, tmp_path, request):
    exe = request.getfixturevalue("firmware_exe") if kind == "c" else None
    link = tmp_path / "ttyLINE"
    master = _new_line(link)
    proc = _device_on_path(kind, exe, str(link))
    try:
        _check_hello_on_master(master)
        os.close(master)  # hang-up: the device's reads now fail (EIO / POLLHUP)
        time.sleep(0.3)
        cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
        time.sleep(1.0)
        used = cpu_seconds(proc.pid) - cpu0
        wall = time.monotonic() - t0
        # A busy loop burns ~all of the wall time; a waiting device almost none. Load on
        # the machine can only lower the figure, so this cannot fail spuriously.
        assert used < 0.1 * wall, f"{used:.2f} s CPU in {wall:.2f} s after the hang-up"
        assert proc.poll() is None, "device exited instead of waiting for the line"
        master = _new_line(link)  # the line comes back (same path, new tty)
        _check_hello_on_master(master, timeout=10.0)
    finally:
        os.close(master)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        err = proc.stderr.read()
        proc.stdout.close()
        proc.stderr.close()
    assert "hung up" in err or "lost" in err, err
    assert "reopened" in err, err


def _check_hello_on_master(master: int, timeout: float = 5.0) -> None:
    from firmware_bridge.framing import FrameDecoder, encode_frame
    import select
    dec, end = FrameDecoder(), time.monotonic() + timeout
    nxt = 0.0
    while time.monotonic() < end:
        try:  # EIO until the device has (re)opened the slave side
            if time.monotonic() >= nxt:  # repeat: the device may still be reopening the line
                os.write(master, encode_frame(MsgType.HELLO, S, 1, HELLO_WIRE.pack(0, 0)))
                nxt = time.monotonic() + 0.2
            r, _, _ = select.select([master], [], [], 0.05)
            if r and any(f.msg_type == MsgType.HELLO_ACK
                         for f in dec.feed(os.read(master, 4096))):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("device did not answer HELLO on the line")


# --------------------------------------------------------- non-UTF-8 text in the log
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.binary(max_size=64))
def test_applied_log_is_valid_json_whatever_the_alarm_bytes(make_device, text):
    dev = make_device()
    dev.log_path.write_bytes(b"")  # one record per example (the device appends)
    host = RawHost(dev.port)
    try:
        host.hello(S)
        payload = bytes([CommandId.RAISE_ALARM]) + (7).to_bytes(2, "little") + bytes([len(text)]) + text
        assert host.frame(MsgType.COMMAND, S, 1, payload).msg_type == MsgType.ACK
    finally:
        host.close()
        dev.stop()
    raw = dev.log_path.read_bytes()
    line = raw.decode("utf-8")  # strict: the log is UTF-8 text
    rec = json.loads(line)
    # same text as the Python emulator writes (invalid sequences -> one U+FFFD each)
    assert rec["args"]["text"] == text.decode("utf-8", "replace")
