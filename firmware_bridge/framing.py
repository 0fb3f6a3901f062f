"""Binary framing: header + payload + CRC-16, COBS-encoded, 0x00-delimited.

Raw frame (before COBS), all integers little-endian::

    offset size field
    0      1    version   (PROTOCOL_VERSION)
    1      1    msg_type  (see messages.MsgType)
    2      4    session   host session id (u32)
    6      4    seq       sequence number (u32)
    10     n    payload   (0 <= n <= MAX_PAYLOAD)
    10+n   2    crc       CRC-16/CCITT-FALSE over bytes [0, 10+n)

On the wire: ``cobs(raw) + b"\\x00"``. COBS guarantees the delimiter never
appears inside a frame, so a receiver resynchronises at the next 0x00 after
any garbage. The decoder never raises on bad input; it counts and drops it.
"""

from __future__ import annotations

import binascii
import struct
from dataclasses import dataclass, field

from cobs import cobs

PROTOCOL_VERSION = 1
HEADER = struct.Struct("<BBII")
HEADER_LEN = HEADER.size  # 10
CRC_LEN = 2
MAX_PAYLOAD = 96
MAX_RAW = HEADER_LEN + MAX_PAYLOAD + CRC_LEN
# COBS adds one byte per 254 plus one; anything longer is garbage.
MAX_ENCODED = MAX_RAW + MAX_RAW // 254 + 1
DELIMITER = b"\x00"

_CRC = struct.Struct("<H")


def crc16(data: bytes) -> int:
    """CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF), computed in C by binascii."""
    return binascii.crc_hqx(data, 0xFFFF)


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded protocol frame."""

    msg_type: int
    session: int
    seq: int
    payload: bytes = b""
    version: int = PROTOCOL_VERSION


def encode_raw(msg_type: int, session: int, seq: int, payload: bytes = b"",
               version: int = PROTOCOL_VERSION) -> bytes:
    """Build the raw (un-stuffed) frame including its CRC."""
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    body = HEADER.pack(version, msg_type, session & 0xFFFFFFFF, seq & 0xFFFFFFFF) + payload
    return body + _CRC.pack(crc16(body))


def encode_frame(msg_type: int, session: int, seq: int, payload: bytes = b"",
                 version: int = PROTOCOL_VERSION) -> bytes:
    """Encode a frame ready to write: COBS(raw) followed by the 0x00 delimiter.

    Parameters
    ----------
    msg_type, session, seq : int
        Header fields.
    payload : bytes
        Message payload, at most :data:`MAX_PAYLOAD` bytes.
    version : int
        Protocol version byte (only tests change it).

    Returns
    -------
    bytes
        The encoded frame including the trailing delimiter.
    """
    return cobs.encode(encode_raw(msg_type, session, seq, payload, version)) + DELIMITER


def decode_raw(raw: bytes) -> Frame | None:
    """Check the CRC of a raw frame and parse it; ``None`` if invalid."""
    if not HEADER_LEN + CRC_LEN <= len(raw) <= MAX_RAW:
        return None  # too short, or longer than any frame the protocol allows
    body, crc = raw[:-CRC_LEN], _CRC.unpack(raw[-CRC_LEN:])[0]
    if crc16(body) != crc:
        return None
    version, msg_type, session, seq = HEADER.unpack_from(body)
    return Frame(msg_type, session, seq, bytes(body[HEADER_LEN:]), version)


@dataclass
class DecoderStats:
    """Counters kept by :class:`FrameDecoder` (bad input is counted, not raised)."""

    frames: int = 0
    cobs_errors: int = 0
    crc_errors: int = 0
    oversize: int = 0
    empty: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def errors(self) -> int:
        return self.cobs_errors + self.crc_errors + self.oversize


class FrameDecoder:
    """Incremental stream decoder: feed arbitrary byte chunks, get frames.

    Never raises on malformed input and keeps at most :data:`MAX_ENCODED`
    bytes of an unfinished frame, so garbage can neither crash nor exhaust
    memory; decoding resumes at the next delimiter.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._discarding = False  # inside an over-long run: skip to next 0x00
        self.stats = DecoderStats()

    def reset(self) -> None:
        """Forget any partial frame (e.g. after the port was reopened)."""
        self._buf.clear()
        self._discarding = False

    def feed(self, data: bytes) -> list[Frame]:
        """Consume ``data`` and return all frames completed by it."""
        frames: list[Frame] = []
        if not data:
            return frames
        parts = bytes(data).split(DELIMITER)
        # Every part but the last is terminated by a delimiter.
        for part in parts[:-1]:
            if self._discarding:
                self._discarding = False
                self._buf.clear()
                continue
            if self._buf:
                self._buf += part
                chunk = bytes(self._buf)
                self._buf.clear()
            else:
                chunk = part
            frame = self._decode_chunk(chunk)
            if frame is not None:
                frames.append(frame)
        tail = parts[-1]
        if tail and not self._discarding:
            self._buf += tail
            if len(self._buf) > MAX_ENCODED:
                self.stats.oversize += 1
                self._buf.clear()
                self._discarding = True
        return frames

    def _decode_chunk(self, chunk: bytes) -> Frame | None:
        if not chunk:
            self.stats.empty += 1  # back-to-back delimiters: harmless
            return None
        if len(chunk) > MAX_ENCODED:
            self.stats.oversize += 1
            return None
        try:
            raw = cobs.decode(chunk)
        except cobs.DecodeError:
            self.stats.cobs_errors += 1
            return None
        frame = decode_raw(raw)
        if frame is None:
            self.stats.crc_errors += 1
            return None
        self.stats.frames += 1
        return frame
