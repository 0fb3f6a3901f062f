"""Message types, error codes, device state and payload layouts.

All integers are little-endian. See ``firmware_bridge/README.md`` for the
protocol specification; ``firmware/bridge_proto.h`` mirrors these numbers.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import asdict, dataclass


class MsgType(enum.IntEnum):
    """Frame ``msg_type`` byte."""

    HELLO = 0x01          # host -> dev: u16 watchdog_ms (0 = device default), u32 seq floor
    HELLO_ACK = 0x02      # dev -> host: u8 proto, u8 dedup_size, u16 watchdog_ms, state,
    #                       u8 id_len, device id, name
    COMMAND = 0x10        # host -> dev: u8 command id, args
    ACK = 0x11            # dev -> host: u8 command id, u8 result (0), state
    NACK = 0x12           # dev -> host: u8 command id, u8 error code, state
    HEARTBEAT = 0x20      # host -> dev: empty
    TELEMETRY = 0x21      # dev -> host: state (reply to heartbeat, or unsolicited)
    STATUS_QUERY = 0x22   # host -> dev: header seq = command seq asked about
    STATUS = 0x23         # dev -> host: u8 CommandFate, state


class ErrorCode(enum.IntEnum):
    """NACK error codes."""

    OK = 0
    UNKNOWN_COMMAND = 1
    BAD_ARGS = 2
    OUT_OF_RANGE = 3
    SAFE_STATE = 4
    BAD_SESSION = 5
    STALE_SEQ = 6
    BAD_VERSION = 7
    INTERNAL = 8


class CommandFate(enum.IntEnum):
    """Answer to a STATUS_QUERY for a sequence number the device has no answer stored for."""

    NOT_RECEIVED = 0   # seq is newer than anything seen: safe to (re)send
    UNKNOWN = 1        # seq is old and evicted from the dedup table


class CommandId(enum.IntEnum):
    """Command identifier, first byte of a COMMAND payload."""

    SET_ATTENUATION = 0x01  # u8 level
    SET_EXPOSURE = 0x02     # u32 exposure in microseconds
    SET_GAIN = 0x03         # u8 GainMode
    SHUTTER = 0x04          # u8 open (0/1)
    RECENTRE_BEAM = 0x05    # i32 dx_nm, i32 dy_nm (relative move)
    RAISE_ALARM = 0x06      # u16 code, u8 text_len, text (UTF-8)
    QUERY_STATE = 0x07      # no args
    RESUME = 0x08           # no args: leave safe state


class GainMode(enum.IntEnum):
    LOW = 0
    MEDIUM = 1
    HIGH = 2
    AUTO = 3


#: Alarm code the device raises itself when it enters safe state.
WATCHDOG_ALARM = 0xFFFF
#: Commands the device accepts while in safe state (plus SHUTTER with open=0).
SAFE_STATE_ALLOWED = frozenset({CommandId.QUERY_STATE, CommandId.RAISE_ALARM, CommandId.RESUME})

FLAG_SHUTTER_OPEN = 0x01
FLAG_SAFE_STATE = 0x02
FLAG_ALARM = 0x04

STATE = struct.Struct("<BBBBIiiHHII")
STATE_LEN = STATE.size  # 28
#: HELLO payload: requested watchdog ms, seq floor (highest seq the host may already have
#: sent in this session; a device that does not know the session never applies a seq <= it).
HELLO = struct.Struct("<HI")
HELLO_ACK_HEAD = struct.Struct("<BBH")
#: Longest device id (unique serial, stable across reboots) and name in HELLO_ACK, bytes.
DEVICE_ID_MAX = 24
NAME_MAX = 32
REPLY_HEAD = struct.Struct("<BB")


@dataclass(frozen=True)
class DeviceState:
    """Instrument state as reported by the device.

    Attributes
    ----------
    shutter_open, safe_state, alarm_active : bool
        Status flags.
    attenuation : int
        Attenuator level (higher = more attenuation).
    gain : str
        Gain mode name (``low``, ``medium``, ``high``, ``auto``).
    exposure_s : float
        Exposure time in seconds.
    beam_x_um, beam_y_um : float
        Accumulated beam offset in micrometres.
    alarm_code : int
        Last alarm code (0 = none; 65535 = watchdog / safe state).
    heartbeat_age_ms : int
        Time since the last heartbeat (saturates at 65535).
    applied_count : int
        Number of commands applied since boot.
    boot_id : int
        Random id chosen at device boot (changes when the device restarts).
    """

    shutter_open: bool
    safe_state: bool
    alarm_active: bool
    attenuation: int
    gain: str
    exposure_s: float
    beam_x_um: float
    beam_y_um: float
    alarm_code: int
    heartbeat_age_ms: int
    applied_count: int
    boot_id: int

    def to_dict(self) -> dict:
        return asdict(self)


def pack_hello_ack(*, dedup_size: int, watchdog_ms: int, state: bytes, device_id: str,
                   name: str, proto: int = 1) -> bytes:
    """HELLO_ACK payload (device side); id and name are cut to their maximum lengths."""
    did = _cut_utf8(device_id, DEVICE_ID_MAX)
    return (HELLO_ACK_HEAD.pack(proto, dedup_size, watchdog_ms) + state + bytes([len(did)])
            + did + _cut_utf8(name, NAME_MAX))


def _cut_utf8(text: str, limit: int) -> bytes:
    return text.encode("utf-8", "replace")[:limit].decode("utf-8", "ignore").encode("utf-8")


def unpack_hello(payload: bytes) -> tuple[int, int]:
    """``(watchdog_ms, seq_floor)`` of a HELLO payload; missing fields read as 0."""
    padded = (bytes(payload) + bytes(HELLO.size))[:HELLO.size]
    return HELLO.unpack(padded)


def pack_state(*, shutter_open: bool, safe_state: bool, alarm_active: bool, attenuation: int,
               gain: int, exposure_us: int, beam_x_nm: int, beam_y_nm: int, alarm_code: int,
               heartbeat_age_ms: int, applied_count: int, boot_id: int) -> bytes:
    """Pack the 28-byte state block (device side)."""
    flags = ((FLAG_SHUTTER_OPEN if shutter_open else 0) | (FLAG_SAFE_STATE if safe_state else 0)
             | (FLAG_ALARM if alarm_active else 0))
    return STATE.pack(flags, attenuation, gain, 0, exposure_us, beam_x_nm, beam_y_nm,
                      alarm_code, min(heartbeat_age_ms, 0xFFFF), applied_count & 0xFFFFFFFF,
                      boot_id & 0xFFFFFFFF)


def unpack_state(buf: bytes, offset: int = 0) -> DeviceState:
    """Parse a state block; raises ``struct.error``/``ValueError`` if malformed."""
    (flags, att, gain, _r, exp_us, bx, by, alarm, hb_age, applied,
     boot) = STATE.unpack_from(buf, offset)
    try:
        gain_name = GainMode(gain).name.lower()
    except ValueError:
        gain_name = f"unknown({gain})"
    return DeviceState(
        shutter_open=bool(flags & FLAG_SHUTTER_OPEN), safe_state=bool(flags & FLAG_SAFE_STATE),
        alarm_active=bool(flags & FLAG_ALARM), attenuation=att, gain=gain_name,
        exposure_s=exp_us / 1e6, beam_x_um=bx / 1000.0, beam_y_um=by / 1000.0,
        alarm_code=alarm, heartbeat_age_ms=hb_age, applied_count=applied, boot_id=boot)


@dataclass(frozen=True)
class Reply:
    """A parsed ACK/NACK/STATUS/TELEMETRY/HELLO_ACK payload (host side)."""

    msg_type: int
    seq: int
    session: int
    command_id: int = 0
    code: int = 0          # error code (NACK) or CommandFate (STATUS)
    state: DeviceState | None = None
    proto: int = 0
    dedup_size: int = 0
    watchdog_ms: int = 0
    name: str = ""
    device_id: str = ""


def parse_reply(msg_type: int, session: int, seq: int, payload: bytes) -> Reply | None:
    """Parse a device->host payload; ``None`` if it is malformed or not a reply type."""
    try:
        if msg_type in (MsgType.ACK, MsgType.NACK):
            cmd, code = REPLY_HEAD.unpack_from(payload)
            return Reply(msg_type, seq, session, cmd, code, unpack_state(payload, 2))
        if msg_type == MsgType.TELEMETRY:
            return Reply(msg_type, seq, session, state=unpack_state(payload))
        if msg_type == MsgType.STATUS:
            return Reply(msg_type, seq, session, code=payload[0], state=unpack_state(payload, 1))
        if msg_type == MsgType.HELLO_ACK:
            proto, dedup, wd = HELLO_ACK_HEAD.unpack_from(payload)
            state = unpack_state(payload, HELLO_ACK_HEAD.size)
            at = HELLO_ACK_HEAD.size + STATE_LEN
            id_len = payload[at]
            if id_len > DEVICE_ID_MAX or at + 1 + id_len > len(payload):
                return None
            device_id = payload[at + 1:at + 1 + id_len].decode("utf-8", "replace")
            name = payload[at + 1 + id_len:].decode("utf-8", "replace")
            return Reply(msg_type, seq, session, state=state, proto=proto, dedup_size=dedup,
                         watchdog_ms=wd, name=name, device_id=device_id)
    except (struct.error, IndexError, ValueError):
        return None
    return None
