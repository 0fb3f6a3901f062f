"""Thin serial transport over pyserial: open/resolve, read with timeout, write.

The transport knows nothing about frames. It turns every way a port can
disappear (``SerialException``, ``OSError``/EIO, hang-up) into
:class:`~firmware_bridge.errors.PortUnavailable` and never blocks longer than
the timeout it is given. Reconnect policy lives in the channel layer.
"""

from __future__ import annotations

import os
import re
import select
import threading
import time

import serial
from serial.tools import list_ports

from .errors import PortUnavailable

_VIDPID = re.compile(r"^(?:usb:)?([0-9a-fA-F]{4}):([0-9a-fA-F]{4})(?::(.+))?$")


def resolve_port(spec: str) -> str:
    """Turn a port spec into something ``serial.serial_for_url`` can open.

    Parameters
    ----------
    spec : str
        A device path (``/dev/ttyACM0``), a pyserial URL (``socket://host:1``,
        ``loop://``), ``usb:VID:PID`` / ``VID:PID`` (hex) optionally followed
        by ``:SERIAL``, or ``serial:SERIAL`` (USB serial number).

    Returns
    -------
    str
        Device path or URL.

    Raises
    ------
    PortUnavailable
        No attached USB device matches.
    """
    m = _VIDPID.match(spec)
    if m is None and not spec.startswith("serial:"):
        return spec
    ports = list(list_ports.comports())
    if m is not None:
        vid, pid, sn = int(m.group(1), 16), int(m.group(2), 16), m.group(3)
        found = [p for p in ports if p.vid == vid and p.pid == pid
                 and (sn is None or p.serial_number == sn)]
    else:
        sn = spec[len("serial:"):]
        found = [p for p in ports if p.serial_number == sn]
    if not found:
        raise PortUnavailable(f"no USB serial device matches {spec!r} "
                              f"(attached: {[p.device for p in ports] or 'none'})")
    return sorted(found, key=lambda p: p.device)[0].device


class SerialTransport:
    """One serial port, opened exclusively in raw mode.

    Parameters
    ----------
    port : str
        See :func:`resolve_port`; resolved again on every :meth:`open` so a
        re-enumerated USB device is found under its new name.
    baudrate : int
        Ignored by ptys and USB CDC-ACM, used by real UARTs.
    exclusive : bool
        Ask pyserial for an exclusive lock (``flock``) where supported.
    """

    def __init__(self, port: str, *, baudrate: int = 115200, exclusive: bool = True) -> None:
        self.port = port
        self.baudrate = baudrate
        self.exclusive = exclusive
        self.write_timeout = 2.0
        self.device: str | None = None
        self._ser: serial.SerialBase | None = None
        self._fd: int | None = None
        self._wlock = threading.Lock()

    @property
    def is_open(self) -> bool:
        return self._ser is not None

    def open(self) -> None:
        """Open the port (no-op if open). Raises :class:`PortUnavailable`."""
        if self._ser is not None:
            return
        device = resolve_port(self.port)
        kwargs = {"baudrate": self.baudrate, "timeout": 0, "write_timeout": 2.0}
        if self.exclusive and "://" not in device:
            kwargs["exclusive"] = True
        try:
            ser = serial.serial_for_url(device, **kwargs)
        except (serial.SerialException, OSError, ValueError) as exc:
            raise PortUnavailable(f"cannot open {device!r}: {exc}") from exc
        try:
            fd = ser.fileno()
        except (AttributeError, NotImplementedError, serial.SerialException, OSError):
            fd = None  # URL handlers without a file descriptor: use pyserial reads
        try:
            ser.reset_input_buffer()  # drop bytes left over from a previous session
        except (serial.SerialException, OSError) as exc:
            ser.close()
            raise PortUnavailable(f"cannot use {device!r}: {exc}") from exc
        self._ser, self._fd, self.device = ser, fd, device

    def close(self) -> None:
        """Close the port; safe to call repeatedly."""
        ser, self._ser, self._fd = self._ser, None, None
        if ser is not None:
            try:
                ser.close()
            except (serial.SerialException, OSError):
                pass

    def read(self, timeout: float) -> bytes:
        """Return available bytes, waiting at most ``timeout`` seconds (``b""`` on timeout).

        Raises
        ------
        PortUnavailable
            The port is closed or vanished (EIO, hang-up, unplug).
        """
        ser, fd = self._ser, self._fd
        if ser is None:
            raise PortUnavailable(f"port {self.port!r} is not open")
        try:
            if fd is not None:
                r, _, _ = select.select([fd], [], [], max(0.0, timeout))
                if not r:
                    return b""
                data = os.read(fd, 4096)
                if not data:  # readable but empty: hang-up
                    raise PortUnavailable(f"port {self.device!r} hung up")
                return data
            ser.timeout = max(0.0, timeout)
            return ser.read(max(1, ser.in_waiting))
        except PortUnavailable:
            raise
        except (serial.SerialException, OSError, ValueError, TypeError) as exc:
            # ValueError/TypeError: fd closed underneath us by another thread
            raise PortUnavailable(f"port {self.device!r} vanished: {exc}") from exc

    def write(self, data: bytes) -> None:
        """Write one whole frame (thread-safe). Raises :class:`PortUnavailable`."""
        with self._wlock:
            ser, fd = self._ser, self._fd
            if ser is None:
                raise PortUnavailable(f"port {self.port!r} is not open")
            try:
                if fd is not None:
                    view = memoryview(data)
                    give_up = time.monotonic() + self.write_timeout
                    while view:
                        try:
                            view = view[os.write(fd, view):]
                        except BlockingIOError:
                            # Peer not draining: wait, but never forever.
                            if time.monotonic() > give_up:
                                raise PortUnavailable(f"write to {self.device!r} timed out")
                            select.select([], [fd], [], 0.05)
                else:
                    ser.write(data)
            except PortUnavailable:
                raise
            except (serial.SerialException, OSError, ValueError, TypeError) as exc:
                raise PortUnavailable(f"port {self.device!r} vanished during write: {exc}") from exc

    def __repr__(self) -> str:
        return f"SerialTransport({self.port!r}, open={self.is_open})"
