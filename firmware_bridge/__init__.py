"""Reliable serial/USB bridge to the instrument electronics.

Layers (each with its own exceptions, all deriving from :class:`BridgeError`):
``transport`` (pyserial) -> ``framing`` (COBS + CRC) -> ``channel``
(handshake, retransmission, exactly-once) -> ``bridge`` (validated,
rate-limited commands). ``emulator`` and ``firmware/`` provide the device side.

Examples
--------
>>> import firmware_bridge
>>> with firmware_bridge.connect("/dev/ttyACM0") as bridge:      # doctest: +SKIP
...     ack = bridge.send("set_attenuation", level=3)
...     print(ack.state.attenuation, ack.rtt_s)
"""

from .bridge import Ack, Bridge, connect
from .commands import Limits, ValidatedCommand, validate
from .errors import (BridgeClosed, BridgeError, ChannelError, CommandFailed, CommandRejected,
                     ConfigError, DeadlineExceeded, DeviceMismatch, DeviceUnreachable,
                     HandshakeError, OutcomeUnknown, PortUnavailable, ProtocolError, RateLimited,
                     SafeStateActive, TransportError, UnknownCommand, ValidationError)
from .messages import DeviceState, ErrorCode

__all__ = [
    "Ack", "Bridge", "connect", "validate", "Limits", "ValidatedCommand", "DeviceState",
    "ErrorCode", "BridgeError", "ConfigError", "ValidationError", "UnknownCommand", "RateLimited",
    "BridgeClosed", "TransportError", "PortUnavailable", "ProtocolError", "HandshakeError",
    "DeviceMismatch", "ChannelError", "CommandRejected", "SafeStateActive", "CommandFailed",
    "DeadlineExceeded", "DeviceUnreachable", "OutcomeUnknown",
]
