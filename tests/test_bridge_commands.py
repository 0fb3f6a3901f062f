"""Vocabulary, limits configuration, rate limiting and dry-run."""

from __future__ import annotations

import os
import select

import pytest

import firmware_bridge as fb
from firmware_bridge.commands import Limits, RateLimiter
from bridge_helpers import FAST_LIMITS


def test_validate_encodes_every_command():
    assert fb.validate("set_attenuation", level=3).payload == b"\x01\x03"
    assert fb.validate("set_exposure", time_s=0.5).payload == b"\x02\x20\xa1\x07\x00"
    assert fb.validate("set_gain", mode="medium").payload == b"\x03\x01"
    assert fb.validate("open_shutter").args == {"open": True}
    assert fb.validate("close_shutter").payload == b"\x04\x00"
    assert fb.validate("recentre_beam", dx=-1.5, dy=2).args == {"dx": -1.5, "dy": 2.0}
    assert fb.validate("raise_alarm", code=9).args == {"code": 9, "text": ""}
    assert fb.validate("query_state").payload == b"\x07"


@pytest.mark.parametrize("name,args,match", [
    ("nope", {}, "unknown command"),
    ("set_attenuation", {"level": 99}, r"outside allowed range \[0, 15\]"),
    ("set_attenuation", {"lvl": 1}, "unexpected argument"),
    ("set_attenuation", {}, "missing argument 'level'"),
    ("set_exposure", {"time_s": "1"}, "must be a number"),
    ("set_exposure", {"time_s": float("inf")}, "finite"),
    ("set_gain", {"mode": "HIGH"}, "must be one of"),
    ("shutter", {"open": "yes"}, "must be a bool"),
    ("raise_alarm", {"code": 1, "text": "é" * 33}, "66 UTF-8 bytes"),
    ("raise_alarm", {"code": 1, "text": b"bytes"}, "must be a str"),
])
def test_validation_errors_are_clear(name, args, match):
    with pytest.raises(fb.ValidationError, match=match):
        fb.validate(name, **args)


def test_allowlist_disables_commands(tmp_path):
    p = tmp_path / "limits.toml"
    p.write_text('[commands.query_state]\n[commands.shutter]\nenabled = false\n')
    lim = Limits.load(p)
    assert lim.validate("query_state").name == "query_state"
    for name in ("open_shutter", "shutter", "set_attenuation"):
        with pytest.raises(fb.UnknownCommand, match="not allowed"):
            lim.validate(name, **({"open": True} if name == "shutter" else {}))


@pytest.mark.parametrize("text,match", [
    ("[commands.set_attenuation]\nlevl = { max = 3 }\n", r"unknown key\(s\) \['levl'\]"),
    ("[commands.set_attenuation]\nlevel = { maximum = 3 }\n", r"unknown key\(s\) \['maximum'\]"),
    ("[commands.launch]\n", "unknown command 'launch'"),
    ("[rates]\n", r"unknown key\(s\) \['rates'\]"),
    ("[commands.set_attenuation]\nlevel = { max = 300 }\n", "outside what the protocol can carry"),
    ("[commands.set_attenuation]\nlevel = { min = 5, max = 3 }\n", "min > max"),
    ("[commands.set_gain]\nmode = { choices = ['ludicrous'] }\n", "subset"),
    ("[rate]\nmax_per_second = -1\n", "positive"),
    ("this is = = not toml", "invalid TOML"),
])
def test_bad_config_is_a_clear_error(tmp_path, text, match):
    p = tmp_path / "limits.toml"
    p.write_text(text)
    with pytest.raises(fb.ConfigError, match=match):
        Limits.load(p)


def test_missing_config_file(tmp_path):
    with pytest.raises(fb.ConfigError, match="cannot read limits file"):
        Limits.load(tmp_path / "missing.toml")


def test_user_limits_tighten_defaults():
    lim = Limits.load({"commands": {"set_attenuation": {"level": {"min": 2, "max": 4}}}})
    assert lim.validate("set_attenuation", level=4).args == {"level": 4}
    with pytest.raises(fb.ValidationError):
        lim.validate("set_attenuation", level=5)


def test_rate_limiter_global_and_per_command():
    lim = Limits.load({"rate": {"max_per_second": 0.001, "burst": 3},
                       "commands": {"query_state": {},
                                    "recentre_beam": {"rate_per_second": 0.001, "burst": 1}}})
    rl = RateLimiter(lim)
    rl.acquire("recentre_beam")
    with pytest.raises(fb.RateLimited) as ei:
        rl.acquire("recentre_beam")  # per-command bucket empty
    assert ei.value.retry_after > 0
    rl.acquire("query_state")
    rl.acquire("query_state")  # global burst of 3 used up
    with pytest.raises(fb.RateLimited):
        rl.acquire("query_state")


def test_dry_run_validates_and_rate_limits_but_never_opens_port(tmp_path):
    master, slave = os.openpty()
    try:
        port = os.ttyname(slave)
        lim = {**FAST_LIMITS, "rate": {"max_per_second": 0.001, "burst": 2}}
        with fb.connect(port, dry_run=True, limits=lim) as bridge:
            ack = bridge.send("set_attenuation", level=3)
            assert ack.status == "dry_run" and not ack.ok and ack.args == {"level": 3}
            with pytest.raises(fb.ValidationError):
                bridge.send("set_attenuation", level=30)
            bridge.send("query_state")
            with pytest.raises(fb.RateLimited):
                bridge.send("query_state")
            assert bridge.state() is None
        r, _, _ = select.select([master], [], [], 0.2)
        assert r == []  # not a single byte reached the (real) pty
    finally:
        os.close(master)
        os.close(slave)


def test_connect_rejects_unknown_options():
    with pytest.raises(fb.ConfigError, match="unknown connect option"):
        fb.connect(None, dry_run=True, heartbeat=1)
    with pytest.raises(fb.ConfigError, match="port is required"):
        fb.connect(None)


def test_closed_bridge_refuses():
    bridge = fb.connect(None, dry_run=True)
    bridge.close()
    bridge.close()
    with pytest.raises(fb.BridgeClosed):
        bridge.send("query_state")


def test_usb_id_resolution_reports_missing_device():
    from firmware_bridge.transport import resolve_port
    assert resolve_port("/dev/ttyACM0") == "/dev/ttyACM0"
    assert resolve_port("socket://localhost:1") == "socket://localhost:1"
    with pytest.raises(fb.PortUnavailable, match="no USB serial device matches"):
        resolve_port("usb:fffe:fffd")
    with pytest.raises(fb.PortUnavailable):
        resolve_port("serial:NO-SUCH-SERIAL-0000")


def test_every_error_derives_from_bridge_error():
    for name in fb.__all__:
        obj = getattr(fb, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, fb.BridgeError), name
