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
from .messages import (REPLY_HEAD, SAFE_STATE_ALLOWED, WATCHDOG_ALARM, CommandFate, CommandId,
                       ErrorCode, GainMode, MsgType, pack_hello_ack, pack_state, unpack_hello)

DEDUP_SIZE = 16
MAX_SESSIONS = 4
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


class SessionHistory:
    """What the device remembers of one host session: highest seq and stored answers."""

    __slots__ = ("highest_seq", "dedup")

    def __init__(self, floor: int = 0) -> None:
        self.highest_seq = floor
        self.dedup: OrderedDict[int, tuple[int, bytes]] = OrderedDict()


class DeviceCore:
    """Protocol state machine of the device (sessions, dedup tables, watchdog).

    Parameters
    ----------
    on_applied : callable, optional
        Called as ``on_applied(session, seq, command_name, args)`` for every
        command actually applied (never for a duplicate).
    boot_id : int, optional
        Random non-zero id by default; reported in every state block.
    name : str
        Firmware name reported in HELLO_ACK.
    device_id : str, optional
        Unique device id (serial number) reported in HELLO_ACK; stable across
        restarts of the same device. Random (``emu-XXXXXXXX``) by default.
    """

    def __init__(self, on_applied: AppliedHook | None = None, boot_id: int | None = None,
                 name: str = "python-emulator", device_id: str | None = None) -> None:
        self.instrument = Instrument()
        self.on_applied = on_applied
        self.boot_id = (secrets.randbits(32) or 1) if boot_id is None else boot_id
        self.name = name
        self.device_id = f"emu-{secrets.token_hex(4)}" if device_id is None else device_id
        self.session = 0                   # active session; 0 = no host has said hello yet
        # Histories of the last MAX_SESSIONS sessions (LRU): a takeover by another
        # host must not make the device forget what it applied for this one.
        self.sessions: OrderedDict[int, SessionHistory] = OrderedDict()
        self.watchdog_ms = DEFAULT_WATCHDOG_MS
        self.last_hb_ms: float | None = None
        self.hb_since_safe = False
        self.safe = False
        self.applied_count = 0
        self.now_ms = 0.0
        self.bad_version_frames = 0

    @property
    def highest_seq(self) -> int:
        h = self.sessions.get(self.session)
        return h.highest_seq if h else 0

    @property
    def dedup(self) -> OrderedDict:
        h = self.sessions.get(self.session)
        return h.dedup if h else OrderedDict()

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
            self.bad_version_frames += 1
            out.append(self._nack(f, ErrorCode.BAD_VERSION))
            return out
        t = f.msg_type
        if t == MsgType.HELLO:
            if f.session == 0:  # reserved ("no host"): it would disarm the watchdog
                return out
            req, floor = unpack_hello(f.payload)
            hist = self.sessions.get(f.session)
            if hist is None:
                # Unknown session (new host, or history evicted): nothing at or below
                # the host's floor may ever be applied, so a command the host may have
                # sent before is never executed by a device that cannot vouch for it.
                hist = self.sessions[f.session] = SessionHistory(floor)
                while len(self.sessions) > MAX_SESSIONS:
                    self.sessions.popitem(last=False)
            self.sessions.move_to_end(f.session)
            self.session = f.session
            self.watchdog_ms = (DEFAULT_WATCHDOG_MS if req == 0
                                else min(MAX_WATCHDOG_MS, max(MIN_WATCHDOG_MS, req)))
            self._feed()
            out.append(self._reply(MsgType.HELLO_ACK, f.seq, pack_hello_ack(
                dedup_size=DEDUP_SIZE, watchdog_ms=self.watchdog_ms, state=self.state_bytes(),
                device_id=self.device_id, name=self.name)))
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
        hist = self.sessions[self.session]
        stored = hist.dedup.get(f.seq)
        if stored is not None:  # repeat or status query: the original answer, not re-applied
            out.append(self._reply(stored[0], f.seq, stored[1]))
            return out
        if t == MsgType.STATUS_QUERY:
            fate = CommandFate.NOT_RECEIVED if f.seq > hist.highest_seq else CommandFate.UNKNOWN
            out.append(self._reply(MsgType.STATUS, f.seq, bytes([fate]) + self.state_bytes()))
            return out
        # COMMAND
        cid = f.payload[0] if f.payload else 0
        if f.seq <= hist.highest_seq:  # old, evicted or below the floor: never apply
            out.append(self._nack(f, ErrorCode.STALE_SEQ, cid))
            return out
        hist.highest_seq = f.seq
        code, args = self._execute(cid, f.payload[1:])
        if code == ErrorCode.OK:
            self.applied_count += 1
            if self.on_applied is not None:
                name = COMMAND_NAMES.get(cid, str(cid))
                self.on_applied(f.session, f.seq, name, args)
        mtype = MsgType.ACK if code == ErrorCode.OK else MsgType.NACK
        payload = REPLY_HEAD.pack(cid, code) + self.state_bytes()
        hist.dedup[f.seq] = (mtype, payload)
        while len(hist.dedup) > DEDUP_SIZE:
            hist.dedup.popitem(last=False)
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
