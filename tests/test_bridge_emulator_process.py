"""The emulator in its own process (spawn_pty_emulator), as edge run and the pipeline tests use it."""

import time

import firmware_bridge as fb
from firmware_bridge.emulator import spawn_pty_emulator


def test_spawned_emulator_applies_survives_replug_and_stops(tmp_path):
    log = tmp_path / "applied.jsonl"
    emu = spawn_pty_emulator(applied_log=str(log), device_id="spawn-test")
    try:
        with fb.connect(emu.port, deadline=5.0) as bridge:
            ack = bridge.send("set_attenuation", level=3)
            assert ack.state.attenuation == 3
            assert bridge.link_status()["device_id"] == "spawn-test"
            emu.unplug()
            time.sleep(0.3)
            emu.replug()
            ack = bridge.send("set_attenuation", level=5)  # reconnects to the same device
            assert ack.state.attenuation == 5
        applied = emu.applied
        assert [a["args"]["level"] for a in applied if a["command"] == "set_attenuation"] == [3, 5]
    finally:
        emu.stop()
    assert emu.proc.returncode is not None  # the child is gone
    emu.stop()  # idempotent


def test_spawn_failure_is_reported(tmp_path):
    bad = tmp_path / "no" / "such" / "dir" / "tty"
    try:
        spawn_pty_emulator(link_path=str(bad), start_timeout=20)
    except RuntimeError as exc:
        assert "did not start" in str(exc)
    else:
        raise AssertionError("a pty link in a missing directory must fail to start")
