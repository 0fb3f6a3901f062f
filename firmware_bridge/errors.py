"""Exception hierarchy of :mod:`firmware_bridge`.

Every error raised by the package derives from :class:`BridgeError`. Each layer
has its own branch so callers can catch exactly what they care about::

    BridgeError
    ├── ConfigError              limits file / options are invalid
    ├── ValidationError          a command or its arguments are not allowed
    │   └── UnknownCommand
    ├── RateLimited              the command exceeds its rate limit
    ├── BridgeClosed             the bridge was closed
    ├── TransportError           serial port layer
    │   └── PortUnavailable      port missing, vanished, or busy
    ├── ProtocolError            framing / handshake layer (also: link thread failed)
    │   └── HandshakeError
    │       └── DeviceMismatch   another device answers behind the same port
    └── ChannelError             reliable channel: outcome of a send
        ├── CommandRejected      device answered with a NACK (``.code``)
        │   └── SafeStateActive  rejected because the device is in safe state
        └── CommandFailed        no definite ack; see ``.applied``
            ├── DeadlineExceeded device silent until the deadline
            │   └── DeviceUnreachable  ... and the port was down at the end
            └── OutcomeUnknown   device cannot tell whether it was applied
"""

from __future__ import annotations

from typing import Any


class BridgeError(Exception):
    """Base class of all errors raised by :mod:`firmware_bridge`."""


class ConfigError(BridgeError, ValueError):
    """The limits configuration or a connect option is invalid."""


class ValidationError(BridgeError, ValueError):
    """A command or one of its arguments is not allowed (nothing was sent)."""


class UnknownCommand(ValidationError):
    """The command is not in the vocabulary or not in the allowlist."""


class RateLimited(BridgeError):
    """The command exceeds its configured rate limit (nothing was sent).

    Attributes
    ----------
    retry_after : float
        Seconds after which the same command would be admitted.
    """

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class BridgeClosed(BridgeError):
    """The bridge has been closed."""


class TransportError(BridgeError):
    """Error in the serial transport layer."""


class PortUnavailable(TransportError):
    """The serial port does not exist, vanished, or is held by another process."""


class ProtocolError(BridgeError):
    """The peer does not speak the expected protocol."""


class HandshakeError(ProtocolError):
    """The handshake failed (e.g. protocol version mismatch)."""


class DeviceMismatch(HandshakeError):
    """A device with another id than the one this bridge is bound to answered the handshake.

    The bridge stops talking to the port; create a new bridge to drive the other device.

    Attributes
    ----------
    expected, found : str
        Device ids (serial numbers) of the bound and of the answering device.
    """

    def __init__(self, message: str, *, expected: str = "", found: str = "") -> None:
        super().__init__(message)
        self.expected = expected
        self.found = found


class ChannelError(BridgeError):
    """Base of the definite non-success outcomes of :meth:`Bridge.send`.

    Attributes
    ----------
    command : str or None
        Command name.
    seq : int or None
        Sequence number the command was sent with (``None`` if never sent).
    """

    def __init__(self, message: str, *, command: str | None = None,
                 seq: int | None = None) -> None:
        super().__init__(message)
        self.command = command
        self.seq = seq


class CommandRejected(ChannelError):
    """The device refused the command with a NACK; it was not applied.

    Attributes
    ----------
    code : int
        Protocol error code (see :class:`firmware_bridge.messages.ErrorCode`).
    reason : str
        Symbolic name of ``code``.
    state : Any
        Device state reported with the NACK.
    """

    def __init__(self, message: str, *, code: int, reason: str, state: Any = None,
                 command: str | None = None, seq: int | None = None) -> None:
        super().__init__(message, command=command, seq=seq)
        self.code = code
        self.reason = reason
        self.state = state


class SafeStateActive(CommandRejected):
    """Rejected because the device is in its safe state (heartbeats were lost)."""


class CommandFailed(ChannelError):
    """The command did not get a definite answer.

    Attributes
    ----------
    applied : bool or None
        ``False`` if the command certainly was not applied (e.g. never
        transmitted), ``None`` if unknown.
    """

    def __init__(self, message: str, *, command: str | None = None,
                 seq: int | None = None, applied: bool | None = None) -> None:
        super().__init__(message, command=command, seq=seq)
        self.applied = applied


class DeadlineExceeded(CommandFailed):
    """No ack or nack arrived before the deadline (silent device / lossy link)."""


class DeviceUnreachable(DeadlineExceeded, PortUnavailable):
    """The deadline passed while the serial port was unavailable."""


class OutcomeUnknown(CommandFailed):
    """The device cannot vouch for the command: it may or may not have been applied.

    Raised, never retried, when the device restarted while the command was in
    flight, when it no longer knows the command's session (another host took
    over the port and its history was pushed out), when it evicted the stored
    answer, or when the link failed for good while the command was in flight.
    ``applied`` is ``None``. Check the device state before deciding to resend.
    """
