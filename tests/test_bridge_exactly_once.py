"""Exactly-once edge cases driven through the Python emulator on a real pty."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

import firmware_bridge as fb
from firmware_bridge.emulator import start_pty_emulator
from bridge_helpers import FAST_LIMITS, check_exactly_once, read_log, wait_until


@pytest.fixture
def emu(tmp_path):
    e = start_pty_emulator(applied_log=str(tmp_path / "applied.jsonl"),
                           link_path=str(tmp_path / "ttyEMU"))
    yield e
    e.stop()


def _send_in_thread(bridge, **kw):
    box = {}

    def run():
        try:
            box["ack"] = bridge.send("set_attenuation", level=5, **kw)
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            box["exc"] = exc

    t = threading.Thread(target=run)
    t.start()
    return t, box


def test_applied_but_ack_lost_then_reconnect_resolves_by_status_query(emu):
    with fb.connect(emu.port, limits=FAST_LIMITS, deadline=10.0) as bridge:
        emu.mute_replies = True  # the device applies, every answer is lost
        t, box = _send_in_thread(bridge)
        wait_until(lambda: len(emu.applied) == 1, what="command applied")
        emu.unplug()
        emu.mute_replies = False
        emu.replug()
        t.join(10)
        ack = box["ack"]
        stats = bridge.link_status()
    assert ack.state.attenuation == 5 and ack.state.applied_count == 1
    assert stats["status_queries"] >= 1
    assert len(emu.applied) == 1  # resolved by asking, not applied again
    check_exactly_once(emu.applied, [(ack.session, ack.seq)])


def test_lost_command_is_sent_after_status_says_not_received(emu):
    with fb.connect(emu.port, limits=FAST_LIMITS, deadline=10.0, heartbeat_interval=None,
                    watchdog_ms=5000) as bridge:
        emu.silent = True  # frames vanish before reaching the device
        t, box = _send_in_thread(bridge)
        wait_until(lambda: bridge.link_status()["transmissions"] >= 1, what="transmission")
        emu.unplug()
        emu.silent = False
        emu.replug()
        t.join(10)
        stats = bridge.link_status()
    assert box["ack"].attempts >= 2 and stats["status_queries"] >= 1
    assert len(emu.applied) == 1


def test_device_restart_mid_command_is_outcome_unknown(emu):
    with fb.connect(emu.port, limits=FAST_LIMITS, deadline=5.0) as bridge:
        emu.mute_replies = True
        t, box = _send_in_thread(bridge)
        wait_until(lambda: len(emu.applied) == 1, what="command applied")
        emu.reboot()  # fresh core, new boot id, no session, same device id
        emu.mute_replies = False
        t.join(10)
        exc = box["exc"]
        assert isinstance(exc, fb.OutcomeUnknown) and exc.applied is None
        assert "restarted" in str(exc)
        # the bridge re-handshook with the new boot and keeps working
        assert bridge.send("set_attenuation", level=6).state.attenuation == 6
    assert len(emu.applied) == 2


def test_stale_duplicate_is_not_applied(emu):
    """A delayed copy of an old command (evicted from the dedup table) is refused."""
    from firmware_bridge.framing import FrameDecoder, encode_frame
    from firmware_bridge.messages import ErrorCode, MsgType, parse_reply
    with fb.connect(emu.port, limits=FAST_LIMITS, heartbeat_interval=None) as bridge:
        first = bridge.send("set_attenuation", level=1)
        for _ in range(20):
            bridge.send("query_state")
        sess = bridge.link_status()["session"]
        old = encode_frame(MsgType.COMMAND, sess, first.seq, fb.validate("set_attenuation", level=1).payload)
        core_out = emu.core.receive(FrameDecoder().feed(old)[0], emu.core.now_ms)
        reply = [parse_reply(f.msg_type, f.session, f.seq, f.payload)
                 for f in FrameDecoder().feed(b"".join(core_out))][0]
        assert reply.msg_type == MsgType.NACK and reply.code == ErrorCode.STALE_SEQ
    assert sum(1 for r in emu.applied if r["command"] == "set_attenuation") == 1


def test_emulator_cli_over_pty(tmp_path):
    log = tmp_path / "cli.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "firmware_bridge.emulator", "pty",
                             "--applied-log", str(log), "--link", str(tmp_path / "ttyCLI"),
                             "--drop", "0.05", "--seed", "3"], stdout=subprocess.PIPE, text=True)
    try:
        port = proc.stdout.readline().strip()
        assert port == str(tmp_path / "ttyCLI")
        with fb.connect(port, limits=FAST_LIMITS, connect_timeout=10) as bridge:
            acks = [bridge.send("set_exposure", time_s=0.001 * (i + 1)) for i in range(30)]
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stdout.close()
    check_exactly_once(read_log(log), [(a.session, a.seq) for a in acks])
    assert len(read_log(log)) == 30


def test_emulator_cli_rejects_bad_probability():
    r = subprocess.run([sys.executable, "-m", "firmware_bridge.emulator", "pty", "--drop", "2"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "probability" in r.stderr
