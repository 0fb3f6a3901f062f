"""Device side of the protocol in pure Python (no I/O): the emulator's core.

Mirrors ``firmware/bridge_proto.c`` + the instrument handlers of
``firmware/host_pty.c`` so the two are interchangeable behind a serial port.
Feed it decoded frames and clock ticks; it returns encoded frames to write.
"""

from __future__ import annotations

import secrets
import struct
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from .commands import COMMAND_NAMES
from .framing import PROTOCOL_VERSION, Frame, encode_frame
from .messages import (HELLO, HELLO_ACK_HEAD, SAFE_STATE_ALLOWED, WATCHDOG_ALARM, CommandFate,
                       CommandId, ErrorCode, GainMode, MsgType, pack_state, REPLY_HEAD)

DEDUP_SIZE = 16
DEFAULT_WATCHDOG_MS = 1000
MIN_WATCHDOG_MS = 50
MAX_WATCHDOG_MS = 10000

# Hardware limits enforced by the device regardless of host configuration.
ATTENUATION_MAX = 15
EXPOSURE_US_MIN, EXPOSURE_US_MAX = 1, 60_000_000
BEAM_STEP_NM_MAX = 200_000        # 200 um per command
BEAM_OFFSET_NM_MAX = 1_000_000    # 1 mm total
ALARM_TEXT_MAX = 64


@dataclass
class Instrument:
    """Simulated instrument state. Boot state equals the safe values."""

    attenuation: int = ATTENUATION_MAX
    exposure_us: int = 100_000
    gain: int = GainMode.LOW
    shutter_open: bool = False
    beam_x_nm: int = 0
    beam_y_nm: int = 0
    alarm_code: int = 0
    alarm_text: str = ""

    def apply(self, cid: int, a: bytes) -> tuple[int, dict]:
        """Apply one command; return (error code, decoded args)."""
        try:
            if cid == CommandId.SET_ATTENUATION:
                (level,) = struct.unpack("<B", a)
                if level > ATTENUATION_MAX:
                    return ErrorCode.OUT_OF_RANGE, {}
                self.attenuation = level
                return ErrorCode.OK, {"level": level}
            if cid == CommandId.SET_EXPOSURE:
                (us,) = struct.unpack("<I", a)
                if not EXPOSURE_US_MIN <= us <= EXPOSURE_US_MAX:
                    return ErrorCode.OUT_OF_RANGE, {}
                self.exposure_us = us
                return ErrorCode.OK, {"exposure_us": us}
            if cid == CommandId.SET_GAIN:
                (mode,) = struct.unpack("<B", a)
                if mode > GainMode.AUTO:
                    return ErrorCode.OUT_OF_RANGE, {}
                self.gain = mode
                return ErrorCode.OK, {"mode": mode}
            if cid == CommandId.SHUTTER:
                (op,) = struct.unpack("<B", a)
                if op > 1:
                    return ErrorCode.BAD_ARGS, {}
                self.shutter_open = bool(op)
                return ErrorCode.OK, {"open": op}
            if cid == CommandId.RECENTRE_BEAM:
                dx, dy = struct.unpack("<ii", a)
                nx, ny = self.beam_x_nm + dx, self.beam_y_nm + dy
                if (abs(dx) > BEAM_STEP_NM_MAX or abs(dy) > BEAM_STEP_NM_MAX
                        or abs(nx) > BEAM_OFFSET_NM_MAX or abs(ny) > BEAM_OFFSET_NM_MAX):
                    return ErrorCode.OUT_OF_RANGE, {}
                self.beam_x_nm, self.beam_y_nm = nx, ny
                return ErrorCode.OK, {"dx_nm": dx, "dy_nm": dy}
            if cid == CommandId.RAISE_ALARM:
                code, n = struct.unpack_from("<HB", a)
                text = a[3:]
                if len(text) != n:
                    return ErrorCode.BAD_ARGS, {}
                if n > ALARM_TEXT_MAX:
                    return ErrorCode.OUT_OF_RANGE, {}
                self.alarm_code, self.alarm_text = code, text.decode("utf-8", "replace")
                return ErrorCode.OK, {"code": code, "text": self.alarm_text}
            if cid in (CommandId.QUERY_STATE, CommandId.RESUME):
                if a:
                    return ErrorCode.BAD_ARGS, {}
                return ErrorCode.OK, {}
        except struct.error:
            return ErrorCode.BAD_ARGS, {}
        return ErrorCode.UNKNOWN_COMMAND, {}

    def enter_safe_state(self) -> None:
        """Documented safe state: shutter closed, attenuation max, watchdog alarm."""
        self.shutter_open = False
        self.attenuation = ATTENUATION_MAX
        self.alarm_code = WATCHDOG_ALARM
        self.alarm_text = "heartbeat lost"


AppliedHook = Callable[[int, int, str, dict], None]


class DeviceCore:
    """Protocol state machine of the device (session, dedup table, watchdog).

    Parameters
    ----------
    on_applied : callable, optional
        Called as ``on_applied(session, seq, command_name, args)`` for every
        command actually applied (never for a duplicate).
    boot_id : int, optional
        Random by default; reported in every state block.
    name : str
        Firmware name reported in HELLO_ACK.
    """

    def __init__(self, on_applied: AppliedHook | None = None, boot_id: int | None = None,
                 name: str = "python-emulator") -> None:
        self.instrument = Instrument()
        self.on_applied = on_applied
        self.boot_id = secrets.randbits(32) if boot_id is None else boot_id
        self.name = name
        self.session = 0                   # 0 = no host has said hello yet
        self.highest_seq = 0
        self.dedup: OrderedDict[int, tuple[int, bytes]] = OrderedDict()
        self.watchdog_ms = DEFAULT_WATCHDOG_MS
        self.last_hb_ms: float | None = None
        self.hb_since_safe = False
        self.safe = False
        self.applied_count = 0
        self.now_ms = 0.0

    # -- state -------------------------------------------------------------
    def state_bytes(self) -> bytes:
        ins = self.instrument
        age = 0xFFFF if self.last_hb_ms is None else int(self.now_ms - self.last_hb_ms)
        return pack_state(shutter_open=ins.shutter_open, safe_state=self.safe,
                          alarm_active=ins.alarm_code != 0, attenuation=ins.attenuation,
                          gain=ins.gain, exposure_us=ins.exposure_us, beam_x_nm=ins.beam_x_nm,
                          beam_y_nm=ins.beam_y_nm, alarm_code=ins.alarm_code,
                          heartbeat_age_ms=max(0, age), applied_count=self.applied_count,
                          boot_id=self.boot_id)

    def _reply(self, msg_type: int, seq: int, payload: bytes, session: int | None = None) -> bytes:
        return encode_frame(msg_type, self.session if session is None else session, seq, payload)

    def _nack(self, f: Frame, code: int, cid: int = 0) -> bytes:
        return self._reply(MsgType.NACK, f.seq, REPLY_HEAD.pack(cid, code) + self.state_bytes(),
                           session=f.session)

    # -- inputs ------------------------------------------------------------
    def tick(self, now_ms: float) -> list[bytes]:
        """Advance the clock; returns an unsolicited TELEMETRY when entering safe state."""
        self.now_ms = now_ms
        if (self.session and not self.safe and self.last_hb_ms is not None
                and now_ms - self.last_hb_ms > self.watchdog_ms):
            self.safe = True
            self.hb_since_safe = False
            self.instrument.enter_safe_state()
            return [self._reply(MsgType.TELEMETRY, 0, self.state_bytes())]
        return []

    def receive(self, f: Frame, now_ms: float) -> list[bytes]:
        """Handle one CRC-valid frame; return encoded frames to send back."""
        out = self.tick(now_ms)
        if f.version != PROTOCOL_VERSION:
            out.append(self._nack(f, ErrorCode.BAD_VERSION))
            return out
        t = f.msg_type
        if t == MsgType.HELLO:
            req = HELLO.unpack_from(f.payload)[0] if len(f.payload) >= HELLO.size else 0
            if f.session != self.session:
                self.session, self.highest_seq = f.session, 0
                self.dedup.clear()
            self.watchdog_ms = (DEFAULT_WATCHDOG_MS if req == 0
                                else min(MAX_WATCHDOG_MS, max(MIN_WATCHDOG_MS, req)))
            self._feed()
            name = self.name.encode()[:32]
            out.append(self._reply(MsgType.HELLO_ACK, f.seq, HELLO_ACK_HEAD.pack(
                PROTOCOL_VERSION, DEDUP_SIZE, self.watchdog_ms) + self.state_bytes() + name))
            return out
        if t not in (MsgType.HEARTBEAT, MsgType.COMMAND, MsgType.STATUS_QUERY):
            return out  # not for the device: ignore
        if f.session != self.session or self.session == 0:
            out.append(self._nack(f, ErrorCode.BAD_SESSION, f.payload[0] if f.payload else 0))
            return out
        if t == MsgType.HEARTBEAT:
            self._feed()
            out.append(self._reply(MsgType.TELEMETRY, f.seq, self.state_bytes()))
            return out
        stored = self.dedup.get(f.seq)
        if stored is not None:  # repeat or status query: the original answer, not re-applied
            out.append(self._reply(stored[0], f.seq, stored[1]))
            return out
        if t == MsgType.STATUS_QUERY:
            fate = CommandFate.NOT_RECEIVED if f.seq > self.highest_seq else CommandFate.UNKNOWN
            out.append(self._reply(MsgType.STATUS, f.seq, bytes([fate]) + self.state_bytes()))
            return out
        # COMMAND
        cid = f.payload[0] if f.payload else 0
        if f.seq <= self.highest_seq:  # old and evicted: never apply out of order
            out.append(self._nack(f, ErrorCode.STALE_SEQ, cid))
            return out
        self.highest_seq = f.seq
        code, args = self._execute(cid, f.payload[1:])
        if code == ErrorCode.OK:
            self.applied_count += 1
            if self.on_applied is not None:
                name = COMMAND_NAMES.get(cid, str(cid))
                self.on_applied(f.session, f.seq, name, args)
        mtype = MsgType.ACK if code == ErrorCode.OK else MsgType.NACK
        payload = REPLY_HEAD.pack(cid, code) + self.state_bytes()
        self.dedup[f.seq] = (mtype, payload)
        while len(self.dedup) > DEDUP_SIZE:
            self.dedup.popitem(last=False)
        out.append(self._reply(mtype, f.seq, payload))
        return out

    def _feed(self) -> None:
        self.last_hb_ms = self.now_ms
        self.hb_since_safe = True

    def _execute(self, cid: int, args: bytes) -> tuple[int, dict]:
        if not _valid_cid(cid):
            return ErrorCode.UNKNOWN_COMMAND, {}
        if self.safe:
            closing = cid == CommandId.SHUTTER and args == b"\x00"
            if cid not in SAFE_STATE_ALLOWED and not closing:
                return ErrorCode.SAFE_STATE, {}
            if cid == CommandId.RESUME:
                fresh = (self.hb_since_safe and self.last_hb_ms is not None
                         and self.now_ms - self.last_hb_ms <= self.watchdog_ms)
                if args or not fresh:
                    return (ErrorCode.BAD_ARGS if args else ErrorCode.SAFE_STATE), {}
                self.safe = False
                self.instrument.alarm_code, self.instrument.alarm_text = 0, ""
                return ErrorCode.OK, {}
        return self.instrument.apply(cid, args)


def _valid_cid(cid: int) -> bool:
    return cid in CommandId._value2member_map_
