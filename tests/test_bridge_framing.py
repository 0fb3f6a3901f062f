"""Framing and message-layout tests, including hypothesis fuzzing of the decoder."""

from __future__ import annotations

import binascii
import random

import pytest
from cobs import cobs
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware_bridge.device import DeviceCore
from firmware_bridge.framing import (MAX_ENCODED, MAX_PAYLOAD, Frame, FrameDecoder, crc16,
                                     decode_raw, encode_frame, encode_raw)
from firmware_bridge.messages import MsgType, pack_state, parse_reply, unpack_state

frames_st = st.builds(Frame, st.integers(0, 255), st.integers(0, 2**32 - 1),
                      st.integers(0, 2**32 - 1), st.binary(max_size=MAX_PAYLOAD))


def test_crc_is_ccitt_false():
    assert crc16(b"123456789") == 0x29B1  # the standard check value


def test_encoded_frame_has_single_trailing_delimiter():
    wire = encode_frame(MsgType.COMMAND, 0xDEADBEEF, 7, b"\x00\x01\x00\x00")
    assert wire.endswith(b"\x00") and wire.count(b"\x00") == 1
    assert cobs.decode(wire[:-1])[0] == 1  # version byte first


@given(frames_st)
def test_round_trip(frame):
    wire = encode_frame(frame.msg_type, frame.session, frame.seq, frame.payload)
    assert FrameDecoder().feed(wire) == [frame]


@given(st.lists(frames_st, min_size=1, max_size=8), st.data())
def test_any_chunking_gives_same_frames(frames, data):
    wire = b"".join(encode_frame(f.msg_type, f.session, f.seq, f.payload) for f in frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=10)))
    dec, out, prev = FrameDecoder(), [], 0
    for c in cuts + [len(wire)]:
        out += dec.feed(wire[prev:c])
        prev = c
    assert out == frames


@settings(max_examples=300)
@given(st.binary(max_size=2000))
def test_random_bytes_never_raise(data):
    dec = FrameDecoder()
    for f in dec.feed(data):
        assert isinstance(f, Frame)
    assert len(dec._buf) <= MAX_ENCODED  # bounded memory


@given(frames_st, st.binary(max_size=300), st.integers(1, 40))
def test_resynchronises_after_garbage_and_truncation(frame, garbage, cut):
    wire = encode_frame(frame.msg_type, frame.session, frame.seq, frame.payload)
    truncated = wire[:max(0, len(wire) - 1 - cut)]  # frame cut short, no delimiter
    dec = FrameDecoder()
    dec.feed(garbage + truncated)
    # a delimiter ends whatever garbage came before; the next frame is intact
    assert dec.feed(b"\x00" + wire)[-1:] == [frame]


@given(frames_st, st.integers(0, 10**6))
def test_single_bit_flip_is_detected(frame, where):
    raw = bytearray(encode_raw(frame.msg_type, frame.session, frame.seq, frame.payload))
    i = where % (len(raw) * 8)
    raw[i // 8] ^= 1 << (i % 8)
    assert decode_raw(bytes(raw)) is None


def test_oversize_run_is_dropped_and_counted():
    dec = FrameDecoder()
    good = encode_frame(MsgType.ACK, 1, 1, b"x")
    assert dec.feed(b"\x01" * (MAX_ENCODED * 3)) == []
    assert dec.feed(b"\x05" * 10 + b"\x00" + good) == [Frame(MsgType.ACK, 1, 1, b"x")]
    assert dec.stats.oversize >= 1


def test_payload_too_large_is_refused():
    with pytest.raises(ValueError):
        encode_frame(MsgType.COMMAND, 1, 1, b"\x00" * (MAX_PAYLOAD + 1))


def test_state_round_trip():
    raw = pack_state(shutter_open=True, safe_state=False, alarm_active=True, attenuation=9,
                     gain=2, exposure_us=1234, beam_x_nm=-1500, beam_y_nm=250, alarm_code=3,
                     heartbeat_age_ms=70000, applied_count=5, boot_id=77)
    s = unpack_state(raw)
    assert (s.shutter_open, s.safe_state, s.alarm_active, s.attenuation, s.gain) == (
        True, False, True, 9, "high")
    assert (s.exposure_s, s.beam_x_um, s.beam_y_um, s.heartbeat_age_ms) == (0.001234, -1.5, 0.25, 0xFFFF)


@settings(max_examples=200)
@given(st.integers(0, 255), st.binary(max_size=MAX_PAYLOAD))
def test_reply_parser_never_raises(msg_type, payload):
    r = parse_reply(msg_type, 1, 1, payload)
    assert r is None or r.msg_type == msg_type


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=120), max_size=20))
def test_device_core_survives_random_valid_crc_frames(chunks):
    """Random payloads with a valid CRC reach the device core: no exception escapes."""
    core = DeviceCore()
    rng = random.Random(len(chunks))
    now = 0.0
    for c in chunks:
        t = rng.choice([1, 0x10, 0x20, 0x22, rng.randrange(256)])
        frame = Frame(t, rng.choice([0, 1, core.session]), rng.randrange(5), c[:MAX_PAYLOAD])
        now += rng.random() * 500
        for out in core.receive(frame, now):
            assert FrameDecoder().feed(out)  # every answer is a valid frame
        core.tick(now)


def test_crc_matches_binascii_reference():
    data = bytes(range(256))
    assert crc16(data) == binascii.crc_hqx(data, 0xFFFF)
