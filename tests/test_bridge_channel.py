"""Behavioural tests of the bridge against both devices over real ptys.

Every test taking ``make_device`` runs against the Python emulator and the
C reference firmware (built with ``cc -std=c99 -Wall -Wextra -Werror``).
"""

from __future__ import annotations

import threading
import time

import pytest

import firmware_bridge as fb
from bridge_helpers import (FAST_LIMITS, check_exactly_once, firmware_exe,  # noqa: F401
                            make_device, wait_until)


def connect(dev, **opts):
    opts.setdefault("limits", FAST_LIMITS)
    return fb.connect(dev.port, **opts)


ALL_COMMANDS = [
    ("set_attenuation", {"level": 7}, lambda s: s.attenuation == 7),
    ("set_exposure", {"time_s": 0.25}, lambda s: s.exposure_s == 0.25),
    ("set_gain", {"mode": "high"}, lambda s: s.gain == "high"),
    ("shutter", {"open": True}, lambda s: s.shutter_open),
    ("close_shutter", {}, lambda s: not s.shutter_open),
    ("open_shutter", {}, lambda s: s.shutter_open),
    ("recentre_beam", {"dx": 12.5, "dy": -3.25}, lambda s: (s.beam_x_um, s.beam_y_um) == (12.5, -3.25)),
    ("raise_alarm", {"code": 42, "text": "détecteur chaud"}, lambda s: s.alarm_active and s.alarm_code == 42),
    ("query_state", {}, lambda s: s.attenuation == 7 and s.gain == "high"),
    ("resume", {}, lambda s: not s.safe_state),
]


def test_round_trip_every_command(make_device):
    dev = make_device()
    acked = []
    with connect(dev) as bridge:
        for i, (name, args, check) in enumerate(ALL_COMMANDS, start=1):
            ack = bridge.send(name, **args)
            assert isinstance(ack, fb.Ack) and ack.ok and ack.command == name
            assert ack.seq == i and ack.attempts == 1 and ack.rtt_s > 0
            assert check(ack.state), (name, ack.state)
            assert ack.state.applied_count == i
            acked.append((ack.session, ack.seq))
        assert bridge.link_status()["device_name"] == make_device.kind
    applied = dev.applied()
    assert [r["command"] for r in applied] == [
        "set_attenuation", "set_exposure", "set_gain", "shutter", "shutter", "shutter",
        "recentre_beam", "raise_alarm", "query_state", "resume"]
    assert applied[1]["args"] == {"exposure_us": 250000}
    assert applied[6]["args"] == {"dx_nm": 12500, "dy_nm": -3250}
    assert applied[7]["args"] == {"code": 42, "text": "détecteur chaud"}
    check_exactly_once(applied, acked)


def test_state_is_refreshed_by_heartbeats(make_device):
    dev = make_device()
    with connect(dev, heartbeat_interval=0.02) as bridge:
        bridge.send("set_attenuation", level=2)
        first = bridge.link_status()["telemetry"]
        wait_until(lambda: bridge.link_status()["telemetry"] >= first + 3, what="telemetry")
        assert bridge.state().attenuation == 2
        assert bridge.state(refresh=True).attenuation == 2


def test_invalid_args_never_reach_the_device(make_device):
    dev = make_device()
    with connect(dev, heartbeat_interval=None) as bridge:
        bridge.send("set_attenuation", level=1)
        sent_before = bridge.link_status()["transmissions"]
        bad = [("set_attenuation", {"level": 16}), ("set_attenuation", {"level": 1.5}),
               ("set_attenuation", {"level": True}), ("set_attenuation", {}),
               ("set_exposure", {"time_s": float("nan")}), ("set_exposure", {"time_s": 11}),
               ("set_gain", {"mode": "turbo"}), ("shutter", {"open": 1}),
               ("recentre_beam", {"dx": 51, "dy": 0}), ("recentre_beam", {"dx": 1}),
               ("raise_alarm", {"code": 65535}), ("raise_alarm", {"code": 1, "text": "x" * 65}),
               ("query_state", {"verbose": True}), ("self_destruct", {})]
        for name, args in bad:
            with pytest.raises(fb.ValidationError):
                bridge.send(name, **args)
        assert bridge.link_status()["transmissions"] == sent_before
        assert bridge.send("query_state").state.attenuation == 1
    assert [r["command"] for r in dev.applied()] == ["set_attenuation", "query_state"]
    if make_device.kind == "python-emulator":
        # device saw: hello, 2 commands; nothing from the rejected ones
        assert dev.emu.counters.frames_in == 3


def test_device_enforces_its_own_hard_limits(make_device):
    """Host limits wider than the hardware: the device NACKs, nothing applied."""
    dev = make_device()
    wide = {**FAST_LIMITS, "commands": {**FAST_LIMITS["commands"],
                                        "set_attenuation": {"level": {"min": 0, "max": 255}}}}
    with connect(dev, limits=wide) as bridge:
        with pytest.raises(fb.CommandRejected) as ei:
            bridge.send("set_attenuation", level=200)
        assert ei.value.code == fb.ErrorCode.OUT_OF_RANGE and ei.value.reason == "OUT_OF_RANGE"
        assert ei.value.state.attenuation == 15
        # the same seq is not retried; the next command works
        assert bridge.send("set_attenuation", level=4).state.attenuation == 4
    assert [r["args"] for r in dev.applied()] == [{"level": 4}]


@pytest.mark.parametrize("faults", [
    {"corrupt": 0.08}, {"drop": 0.08}, {"duplicate": 0.3},
    {"corrupt": 0.03, "drop": 0.03, "duplicate": 0.1}], ids=["corrupt", "drop", "duplicate", "mixed"])
def test_faults_both_directions_exactly_once(make_device, faults):
    dev = make_device(**faults)
    acked = []
    with connect(dev, retry_initial=0.02, retry_max=0.1, deadline=5.0,
                 connect_timeout=5.0) as bridge:
        for i in range(150):
            ack = bridge.send("set_attenuation", level=i % 16)
            assert ack.state.attenuation == i % 16
            acked.append((ack.session, ack.seq))
        stats = bridge.link_status()
    applied = dev.applied()
    check_exactly_once(applied, acked)
    assert len(applied) == 150
    if "duplicate" not in faults or len(faults) > 1:
        assert stats["retransmissions"] > 0  # the faults really happened


def test_silent_device_fails_clearly(make_device):
    dev = make_device(silent_after=4)  # hello + 3 commands, then nothing
    with connect(dev, deadline=0.4, heartbeat_interval=None) as bridge:
        for _ in range(3):
            bridge.send("query_state")
        with pytest.raises(fb.DeadlineExceeded) as ei:
            bridge.send("set_attenuation", level=3)
        err = ei.value
        assert isinstance(err, fb.CommandFailed) and isinstance(err, fb.BridgeError)
        assert err.seq == 4 and err.command == "set_attenuation" and err.applied is None
        assert "no answer" in str(err) and "attempt" in str(err)
        # bridge is still usable, and fails again just as clearly (not a hang)
        with pytest.raises(fb.DeadlineExceeded):
            bridge.send("query_state", deadline=0.2)


def test_connect_to_silent_device_times_out(make_device):
    dev = make_device(silent_after=0)
    with pytest.raises(fb.DeadlineExceeded, match="did not answer the handshake"):
        connect(dev, connect_timeout=0.3)


def test_missing_port_is_reported(tmp_path):
    with pytest.raises(fb.PortUnavailable, match="cannot open"):
        fb.connect(str(tmp_path / "ttyNOPE"), connect_timeout=0.2)
    bridge = fb.connect(str(tmp_path / "ttyNOPE"), connect_timeout=None, limits=FAST_LIMITS)
    try:
        with pytest.raises(fb.DeviceUnreachable) as ei:
            bridge.send("query_state", deadline=0.2)
        assert ei.value.applied is False and "never sent" in str(ei.value)
    finally:
        bridge.close()


def test_unplug_and_replug_mid_stream(make_device):
    dev = make_device()
    acked, errors = [], []
    stop = threading.Event()
    with connect(dev, deadline=10.0) as bridge:
        def sender():
            i = 0
            while not stop.is_set():
                try:
                    ack = bridge.send("set_attenuation", level=i % 16)
                    acked.append((ack.session, ack.seq))
                except fb.CommandFailed as exc:
                    errors.append(exc)
                i += 1

        t = threading.Thread(target=sender)
        t.start()
        for _ in range(3):
            wait_until(lambda n=len(acked): len(acked) > n + 20, what="progress")
            dev.unplug()
            time.sleep(0.05)
            dev.replug()
        wait_until(lambda n=len(acked): len(acked) > n + 20, what="progress after replug")
        stop.set()
        t.join(15)
        stats = bridge.link_status()
    assert not errors, errors
    assert stats["disconnects"] >= 3 and stats["handshakes"] >= 4
    check_exactly_once(dev.applied(), acked)


def test_port_gone_longer_than_deadline_then_back(make_device):
    dev = make_device()
    with connect(dev, heartbeat_interval=None, watchdog_ms=5000) as bridge:
        bridge.send("set_attenuation", level=1)
        dev.unplug()
        with pytest.raises(fb.DeviceUnreachable) as ei:
            bridge.send("set_attenuation", level=2, deadline=0.3)
        assert isinstance(ei.value, fb.PortUnavailable) and "unavailable" in str(ei.value)
        dev.replug()
        assert bridge.send("set_attenuation", level=3, deadline=3.0).state.attenuation == 3
    levels = [r["args"]["level"] for r in dev.applied()]
    assert levels[0] == 1 and levels[-1] == 3 and len(levels) in (2, 3)


def test_watchdog_safe_state_and_resume(make_device):
    dev = make_device()
    with connect(dev, heartbeat_interval=None, watchdog_ms=100) as bridge:
        bridge.send("open_shutter")
        bridge.send("set_attenuation", level=0)
        # no heartbeats: the device must fall back to its safe state and say so
        wait_until(lambda: bridge.state() is not None and bridge.state().safe_state,
                   what="safe-state telemetry")
        st = bridge.state()
        assert not st.shutter_open and st.attenuation == 15 and st.alarm_code == 0xFFFF
        with pytest.raises(fb.SafeStateActive) as ei:
            bridge.send("open_shutter")
        assert ei.value.code == fb.ErrorCode.SAFE_STATE and ei.value.state.safe_state
        bridge.send("close_shutter")  # allowed in safe state
        bridge.send("query_state")
        with pytest.raises(fb.SafeStateActive):
            bridge.resume()  # heartbeats are still missing
    with connect(dev, watchdog_ms=1000, heartbeat_interval=0.02) as bridge:
        wait_until(lambda: bridge.link_status()["telemetry"] >= 2, what="heartbeats")
        ack = bridge.resume()
        assert not ack.state.safe_state and ack.state.alarm_code == 0
        assert bridge.send("open_shutter").state.shutter_open


def test_concurrent_senders_are_serialised(make_device):
    dev = make_device()
    results: list = []
    with connect(dev) as bridge:
        def worker(k):
            for i in range(40):
                results.append(bridge.send("raise_alarm", code=k + 1, text=f"{k}-{i}"))

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    seqs = sorted(a.seq for a in results)
    assert seqs == list(range(1, 161))
    check_exactly_once(dev.applied(), [(a.session, a.seq) for a in results])


def test_new_session_after_reconnect_of_host(make_device):
    """A new Bridge picks a new session; old seq numbers cannot collide."""
    dev = make_device()
    with connect(dev) as b1:
        a1 = b1.send("set_attenuation", level=1)
    with connect(dev) as b2:
        a2 = b2.send("set_attenuation", level=2)
    assert a1.seq == a2.seq == 1 and a1.session != a2.session
    assert len(dev.applied()) == 2


def test_garbage_on_the_line_is_survived(make_device):
    import os
    import random
    dev = make_device()
    with connect(dev, heartbeat_interval=None) as bridge:
        rng = random.Random(5)
        fd = os.open(dev.port, os.O_WRONLY | os.O_NOCTTY)  # a second writer on the host side
        try:
            os.write(fd, bytes(rng.randrange(256) for _ in range(3000)))
        finally:
            os.close(fd)
        assert bridge.send("set_gain", mode="auto").state.gain == "auto"
    assert len(dev.applied()) == 1
