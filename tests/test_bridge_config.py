"""Every mistake in arguments, connect() options and limits is a BridgeError (issue 13, 6/7/12)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import firmware_bridge as fb
from firmware_bridge.commands import VOCABULARY, Limits
from firmware_bridge.emulator import start_pty_emulator
from bridge_helpers import FAST_LIMITS

ARG_NAMES = sorted({a.name for c in VOCABULARY.values() for a in c.args} | {"command", "limits"})
values = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-10**500, 10**500), st.floats(),
    st.text(), st.binary(max_size=8), st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
    st.sampled_from(["\ud800", "a\udfffb", "low", "high", 10**400, -10**400, 2**64, 0.5]))


# ------------------------------------------------------------------------- item 6
@pytest.mark.parametrize("command,args", [
    ("set_exposure", {"time_s": 10**400}),
    ("recentre_beam", {"dx": -10**400, "dy": 0}),
    ("set_attenuation", {"level": 10**400}),
    ("raise_alarm", {"code": 1, "text": "lone \ud800 surrogate"}),
    (["set_attenuation"], {"level": 1}),
    (None, {}),
    (b"query_state", {}),
    ("set_attenuation", {"level": float("nan")}),
    ("set_attenuation", {"level": [3]}),
])
def test_bad_arguments_are_validation_errors(command, args):
    with pytest.raises(fb.ValidationError):
        fb.validate(command, **args)


@settings(max_examples=400, deadline=None)
@given(command=st.one_of(st.sampled_from(sorted(VOCABULARY)), st.text(max_size=12), values),
       args=st.dictionaries(st.sampled_from(ARG_NAMES), values, max_size=3))
def test_validate_raises_only_bridge_errors(command, args):
    try:
        vc = fb.validate(command, **{k: v for k, v in args.items() if k != "limits"})
    except fb.BridgeError:
        return
    assert isinstance(vc.payload, bytes) and len(vc.payload) <= 96


def test_send_takes_any_argument_name_without_type_error():
    with fb.connect(None, dry_run=True, limits=FAST_LIMITS) as bridge:
        for name in ("command", "self"):
            with pytest.raises(fb.ValidationError, match="unexpected argument"):
                bridge.send("query_state", **{name: 1})
        with pytest.raises(fb.ValidationError):
            bridge.validate("query_state", command=1)


# ------------------------------------------------------------------------- item 7
nan, inf = math.nan, math.inf
BAD_OPTIONS = [
    ("deadline", nan), ("deadline", inf), ("deadline", 0), ("deadline", -1), ("deadline", "2"),
    ("deadline", 1e300), ("retry_initial", nan), ("retry_initial", 0), ("retry_max", inf),
    ("retry_backoff", nan), ("retry_backoff", 0.5), ("heartbeat_interval", nan),
    ("heartbeat_interval", inf), ("heartbeat_interval", -0.1), ("heartbeat_interval", 2.0),
    ("reconnect_max", -1), ("reconnect_max", nan), ("hello_interval", 0), ("hello_interval", nan),
    ("watchdog_ms", 0.5), ("watchdog_ms", -1), ("watchdog_ms", 70000), ("watchdog_ms", True),
    ("max_attempts", "3"), ("max_attempts", 0), ("max_attempts", 2.5), ("max_attempts", True),
    ("connect_timeout", nan), ("connect_timeout", -1), ("connect_timeout", inf),
    ("baudrate", "fast"), ("baudrate", 0), ("exclusive", "no"), ("dry_run", 1),
    ("device_id", 5), ("device_id", ""), ("device_id", "x" * 25),
]


@pytest.fixture(scope="module")
def emu():
    e = start_pty_emulator()
    yield e
    e.stop()


@pytest.mark.parametrize("option,value", BAD_OPTIONS, ids=[f"{o}={v!r}" for o, v in BAD_OPTIONS])
def test_bad_connect_option_is_refused_before_anything_is_written(emu, option, value):
    before = emu.counters.frames_in
    with pytest.raises(fb.ConfigError, match=f"option {option}"):
        fb.connect(emu.port, limits=FAST_LIMITS, **{option: value})
    assert emu.counters.frames_in == before  # refused up front: nothing reached the device


@pytest.mark.parametrize("deadline", [nan, inf, 0, -1, "1"])
def test_bad_per_send_deadline_is_refused(emu, deadline):
    with fb.connect(emu.port, limits=FAST_LIMITS) as bridge:
        sent = bridge.link_status()["transmissions"]
        with pytest.raises(fb.ConfigError, match="option deadline"):
            bridge.send("query_state", deadline=deadline)
        assert bridge.link_status()["transmissions"] == sent
        assert bridge.send("query_state", deadline=2.0).ok


@pytest.mark.parametrize("port", [123, b"/dev/ttyACM0", ["/dev/ttyACM0"]])
def test_bad_port_type_is_a_config_error(port):
    with pytest.raises(fb.ConfigError, match="port"):
        fb.connect(port)


# ------------------------------------------------------------------------ item 12
@pytest.mark.parametrize("text,match", [
    ("commands = 5\n", r"\[commands\] must be a table"),
    ("commands = ['set_attenuation']\n", r"\[commands\] must be a table"),
    ("[rate]\nburst = 0.5\n", r"rate.burst must be a whole number"),
    ("[rate]\nburst = 0\n", r"rate.burst must be a whole number"),
    ("[rate]\nburst = 2.5\n", r"rate.burst must be a whole number"),
    ("[commands.recentre_beam]\nrate_per_second = 10.0\nburst = 0.5\n",
     r"commands.recentre_beam.burst must be a whole number"),
    ("version = true\n", "unsupported limits version"),
    ("rate = 3\n", r"\[rate\] must be a table"),
])
def test_bad_limits_toml_is_a_config_error(tmp_path, text, match):
    p = tmp_path / "limits.toml"
    p.write_text(text)
    with pytest.raises(fb.ConfigError, match=match):
        Limits.load(p)


@pytest.mark.parametrize("source", [5, ["a"], {1: {}}, {"commands": {3: {}}}])
def test_bad_limits_objects_are_config_errors(source):
    with pytest.raises(fb.ConfigError):
        Limits.load(source)


def test_whole_burst_is_kept():
    lim = Limits.load({"rate": {"burst": 3.0}, "commands": {
        "recentre_beam": {"rate_per_second": 1.0, "burst": 2}}})
    assert lim.burst == 3 and lim.commands["recentre_beam"].burst == 2
