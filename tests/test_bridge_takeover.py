"""Exactly-once across another host's session, device restarts and a different device.

Issue 13, items 1-4: every test runs over real ptys against the Python emulator
and the C reference firmware (``make_device``), or against their CLI processes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import firmware_bridge as fb
from firmware_bridge.framing import encode_frame
from firmware_bridge.messages import CommandFate, ErrorCode, MsgType
from bridge_helpers import (FAST_LIMITS, HELLO_WIRE, Cable, RawHost,  # noqa: F401
                            check_exactly_once, firmware_exe, make_device, read_log, wait_until)

A, B = 0xA1A1A1A1, 0xB2B2B2B2


def _payload(command: str, **args) -> bytes:
    return fb.validate(command, limits=FAST_LIMITS, **args).payload


def _code(frame) -> int:
    return frame.payload[1]


def _send_in_thread(bridge, command, **args):
    box: dict = {}

    def run():
        try:
            box["ack"] = bridge.send(command, **args)
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            box["exc"] = exc

    t = threading.Thread(target=run)
    t.start()
    return t, box


# ---------------------------------------------------------------- item 1, device side
def test_device_keeps_a_sessions_history_across_a_takeover(make_device):
    dev = make_device()
    host = RawHost(dev.port)
    try:
        host.hello(A)
        first = host.frame(MsgType.COMMAND, A, 1, _payload("set_attenuation", level=3))
        assert first.msg_type == MsgType.ACK  # applied; say this ACK is lost on the wire
        host.hello(B)  # another host takes the port over and sends a command
        assert host.frame(MsgType.COMMAND, B, 1,
                          _payload("set_attenuation", level=9)).msg_type == MsgType.ACK
        host.hello(A, seq=2, floor=1)  # the first host comes back
        status = host.frame(MsgType.STATUS_QUERY, A, 1)
        assert status.msg_type == MsgType.ACK and status.payload == first.payload
        again = host.frame(MsgType.COMMAND, A, 1, _payload("set_attenuation", level=3))
        assert again.msg_type == MsgType.ACK and again.payload == first.payload
        # Four more hosts push A out of the device's history: A's fate is now
        # unknown and its old seq is refused, never applied again.
        for k in range(4):
            host.hello(0xC0000000 + k)
        host.hello(A, seq=3, floor=1)
        status = host.frame(MsgType.STATUS_QUERY, A, 1)
        assert status.msg_type == MsgType.STATUS and status.payload[0] == CommandFate.UNKNOWN
        stale = host.frame(MsgType.COMMAND, A, 1, _payload("set_attenuation", level=3))
        assert stale.msg_type == MsgType.NACK and _code(stale) == ErrorCode.STALE_SEQ
        assert host.frame(MsgType.COMMAND, A, 2,
                          _payload("set_attenuation", level=4)).msg_type == MsgType.ACK
    finally:
        host.close()
    keys = [(r["session"], r["seq"]) for r in dev.applied()]
    assert keys == [(A, 1), (B, 1), (A, 2)]


def test_unknown_session_starts_at_the_hosts_seq_floor(make_device):
    """After a restart the device never applies a seq the host may have sent before."""
    dev = make_device()
    host = RawHost(dev.port)
    try:
        host.hello(A, floor=5)
        for seq in (1, 5):
            r = host.frame(MsgType.COMMAND, A, seq, _payload("set_attenuation", level=seq))
            assert r.msg_type == MsgType.NACK and _code(r) == ErrorCode.STALE_SEQ
        assert host.frame(MsgType.STATUS_QUERY, A, 5).payload[0] == CommandFate.UNKNOWN
        assert host.frame(MsgType.STATUS_QUERY, A, 6).payload[0] == CommandFate.NOT_RECEIVED
        assert host.frame(MsgType.COMMAND, A, 6,
                          _payload("set_attenuation", level=6)).msg_type == MsgType.ACK
    finally:
        host.close()
    assert [(r["session"], r["seq"]) for r in dev.applied()] == [(A, 6)]


# ------------------------------------------------------------------ item 1, host side
def test_session_takeover_never_reports_a_second_application(make_device, tmp_path):
    """Applied, ack lost, another host says HELLO: the first host must not apply it again."""
    dev = make_device()
    cable = Cable(dev.port, tmp_path)
    try:
        with fb.connect(cable.port, limits=FAST_LIMITS, deadline=15.0) as bridge:
            bridge.send("set_attenuation", level=1)
            cable.lose_replies = True
            t, box = _send_in_thread(bridge, "set_attenuation", level=5)
            wait_until(lambda: len(dev.applied()) == 2, what="command applied")
            cable.paused = True  # the other host has the line to itself for a moment
            with fb.connect(dev.port, limits=FAST_LIMITS, exclusive=False) as other:
                other.send("set_gain", mode="high")
            cable.lose_replies = False
            cable.paused = False
            t.join(20)
            assert not t.is_alive()
            # the device remembered the first host's session: its stored ACK comes back
            ack = box.get("ack")
            assert ack is not None, box.get("exc")
            assert ack.state.attenuation == 5 and ack.state.applied_count == 2
            assert bridge.send("query_state").state.gain == "high"
    finally:
        cable.close()
    applied = dev.applied()
    assert [r["command"] for r in applied] == ["set_attenuation", "set_attenuation", "set_gain",
                                               "query_state"]
    check_exactly_once(applied, [(ack.session, ack.seq)])


# --------------------------------------------------------------------------- item 2
def test_reboot_between_check_and_retransmission_is_not_applied_twice(make_device, tmp_path):
    """Force the interleaving: the device restarts and the link re-handshakes just before a
    retransmission is written. The new boot must refuse it (seq floor)."""
    dev = make_device(device_id="race-1")
    cable = Cable(dev.port, tmp_path)
    try:
        with fb.connect(cable.port, limits=FAST_LIMITS, deadline=15.0,
                        heartbeat_interval=0.05) as bridge:
            ch = bridge._channel
            boot0 = ch.boot_id

            def hook(seq: int, attempt: int) -> None:
                if attempt == 2:  # first retransmission: the reboot check has passed
                    dev.reboot()
                    cable.lose_replies = False
                    wait_until(lambda: ch.ready and ch.boot_id != boot0, 10, "re-handshake")

            ch.before_command_write = hook
            cable.lose_replies = True
            with pytest.raises(fb.OutcomeUnknown) as ei:
                bridge.send("set_attenuation", level=5)
            assert ei.value.applied is None
            ch.before_command_write = None
            after = bridge.send("query_state")
            assert after.state.boot_id != boot0 and after.state.applied_count == 1
    finally:
        cable.close()
    applied = dev.applied()
    assert [r["command"] for r in applied] == ["set_attenuation", "query_state"]
    check_exactly_once(applied, [])


# --------------------------------------------------------------------------- item 3
def _start_device(kind: str, exe: Path | None, link: Path, log: Path, device_id: str):
    if kind == "python":
        cmd = [sys.executable, "-m", "firmware_bridge.emulator", "pty"]
    else:
        cmd = [str(exe), "pty"]
    proc = subprocess.Popen(cmd + ["--link", str(link), "--applied-log", str(log),
                                   "--device-id", device_id], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == str(link)
    return proc


def _kill(proc) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    proc.stdout.close()


@pytest.mark.parametrize("kind", ["python", "c"])
def test_a_different_device_behind_the_same_path_is_refused(kind, tmp_path, request):
    exe = request.getfixturevalue("firmware_exe") if kind == "c" else None
    link = tmp_path / "ttyLINK"
    first = _start_device(kind, exe, link, tmp_path / "a.jsonl", "serial-A")
    other = None
    try:
        with fb.connect(str(link), limits=FAST_LIMITS, heartbeat_interval=0.05) as bridge:
            assert bridge.send("set_attenuation", level=2).ok
            assert bridge.link_status()["device_id"] == "serial-A"
            _kill(first)  # kill -9: the symlink still names the dead pty
            other = _start_device(kind, exe, link, tmp_path / "b.jsonl", "serial-B")
            wait_until(lambda: bridge._channel._fatal is not None, 10, "identity check")
            with pytest.raises(fb.DeviceMismatch) as ei:
                bridge.send("set_attenuation", level=3, deadline=3.0)
            assert isinstance(ei.value, fb.HandshakeError) and isinstance(ei.value, fb.BridgeError)
            assert ei.value.expected == "serial-A" and ei.value.found == "serial-B"
            assert "serial-B" in str(ei.value) and not bridge.link_status()["ready"]
    finally:
        _kill(first)
        if other is not None:
            _kill(other)
    assert read_log(tmp_path / "b.jsonl") == []  # nothing reached the other device


@pytest.mark.parametrize("kind", ["python", "c"])
def test_expected_device_id_is_checked_at_connect(kind, tmp_path, request):
    exe = request.getfixturevalue("firmware_exe") if kind == "c" else None
    link = tmp_path / "ttyLINK"
    proc = _start_device(kind, exe, link, tmp_path / "a.jsonl", "serial-X")
    try:
        with pytest.raises(fb.DeviceMismatch):
            fb.connect(str(link), limits=FAST_LIMITS, device_id="serial-Y")
        with fb.connect(str(link), limits=FAST_LIMITS, device_id="serial-X") as bridge:
            assert bridge.send("query_state").ok
    finally:
        _kill(proc)


@pytest.mark.parametrize("kind", ["python", "c"])
def test_same_device_restarted_on_a_new_pty_number_is_followed(kind, tmp_path, request):
    """kill -9, an unrelated program grabs the freed pty, the device comes back elsewhere."""
    exe = request.getfixturevalue("firmware_exe") if kind == "c" else None
    link = tmp_path / "ttyLINK"
    log = tmp_path / "applied.jsonl"
    proc = _start_device(kind, exe, link, log, "serial-R")
    squatter = None
    acked = []
    try:
        with fb.connect(str(link), limits=FAST_LIMITS, deadline=15.0) as bridge:
            a1 = bridge.send("set_attenuation", level=2)
            acked.append((a1.session, a1.seq))
            _kill(proc)
            wait_until(lambda: bridge.link_status()["disconnects"] >= 1, 10, "hang-up seen")
            # the host has let go of the dead pty: an unrelated program usually gets its
            # number (lowest free), so the device comes back on another one
            squatter = os.openpty()
            proc = _start_device(kind, exe, link, log, "serial-R")
            a2 = bridge.send("set_attenuation", level=3)
            acked.append((a2.session, a2.seq))
            assert a2.state.boot_id != a1.state.boot_id and a2.state.applied_count == 1
    finally:
        _kill(proc)
        if squatter is not None:
            os.close(squatter[0])
            os.close(squatter[1])
    check_exactly_once(read_log(log), acked)


# --------------------------------------------------------------------------- item 4
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(version=st.integers(0, 255).filter(lambda v: v != 1), msg_type=st.integers(0, 255),
       ours=st.booleans(), seq=st.integers(0, 2**32 - 1), payload=st.binary(max_size=96))
def test_stray_frame_with_another_version_never_poisons_the_link(
        make_device, tmp_path_factory, version, msg_type, ours, seq, payload):
    dev = make_device()
    cable = Cable(dev.port, tmp_path_factory.mktemp("cable"))
    try:
        with fb.connect(cable.port, limits=FAST_LIMITS) as bridge:
            mine = bridge.link_status()["session"]
            session = mine if ours else 0x12345678
            # the stray frame, then a valid unsolicited TELEMETRY as a marker: once the
            # marker is counted, the stray frame has been handled
            marker = encode_frame(MsgType.TELEMETRY, mine, 0, bytes(28))
            tele = bridge.link_status()["telemetry"]
            cable.inject(encode_frame(msg_type, session, seq, payload, version=version) + marker)
            wait_until(lambda: bridge.link_status()["telemetry"] > tele, what="marker")
            assert bridge.send("set_attenuation", level=4).state.attenuation == 4
            assert bridge.link_status()["ready"]
            assert bridge.link_status()["bad_version_frames"] == 1
    finally:
        cable.close()
        dev.stop()


def test_hello_with_reserved_session_zero_cannot_disarm_the_watchdog(make_device):
    from firmware_bridge.messages import FLAG_SAFE_STATE
    dev = make_device()
    host = RawHost(dev.port)
    try:
        host.hello(A, watchdog_ms=100)
        host.send(encode_frame(MsgType.HELLO, 0, 7, HELLO_WIRE.pack(0, 0)))  # never answered
        # no heartbeats: the device must still fall back to its safe state and say so
        tele = host.expect(lambda f: f.msg_type == MsgType.TELEMETRY and f.seq == 0)
        assert tele.session == A and tele.payload[0] & FLAG_SAFE_STATE
        assert not any(f.msg_type == MsgType.HELLO_ACK and f.seq == 7 for f in host.pending)
    finally:
        host.close()


# ------------------------------------------- the device's session model, exhaustively
ops = st.lists(st.tuples(st.sampled_from(["hello", "command", "status"]), st.integers(1, 6),
                         st.integers(1, 10)), max_size=80)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_any_interleaving_of_hosts_never_applies_a_command_twice(ops):
    """Six hosts that follow the protocol (HELLO carries the highest seq they wrote),
    interleaved at random: a (session, seq) is applied at most once, and NOT_RECEIVED is
    only ever said about a command that was never applied."""
    from firmware_bridge.device import DeviceCore
    from firmware_bridge.framing import Frame, FrameDecoder
    applied: list[tuple[int, int]] = []
    core = DeviceCore(on_applied=lambda s, q, n, a: applied.append((s, q)), device_id="model")
    sent = {s: 0 for s in range(1, 7)}
    payload = _payload("query_state")
    for t, (kind, s, seq) in enumerate(ops):
        if kind == "hello":
            f = Frame(MsgType.HELLO, s, t, HELLO_WIRE.pack(0, sent[s]))
        elif kind == "command":
            sent[s] = max(sent[s], seq)
            f = Frame(MsgType.COMMAND, s, seq, payload)
        else:
            f = Frame(MsgType.STATUS_QUERY, s, seq)
        for out in FrameDecoder().feed(b"".join(core.receive(f, float(t)))):
            if out.msg_type == MsgType.STATUS and out.payload[0] == CommandFate.NOT_RECEIVED:
                assert (s, seq) not in applied
    assert len(applied) == len(set(applied))
