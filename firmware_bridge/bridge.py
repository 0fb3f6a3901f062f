"""Friendly API: :func:`connect` returns a thread-safe :class:`Bridge`."""

from __future__ import annotations

import math
import numbers
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

from .channel import ChannelOptions, ReliableChannel
from .commands import Limits, RateLimiter, ValidatedCommand
from .errors import BridgeClosed, ConfigError, DeadlineExceeded, DeviceUnreachable
from .messages import DEVICE_ID_MAX
from .messages import DeviceState
from .transport import SerialTransport


@dataclass(frozen=True)
class Ack:
    """Definite success of :meth:`Bridge.send`.

    Attributes
    ----------
    seq : int
        Sequence number within the bridge's session (0 for dry runs).
    command : str
        Command name as passed to ``send``.
    args : dict
        Validated, normalised arguments.
    status : str
        ``"ok"`` or ``"dry_run"``.
    state : DeviceState or None
        Device state right after applying the command (last known for dry runs).
    rtt_s : float
        Seconds from the first transmission to the ack.
    attempts : int
        Number of transmissions of the command frame.
    session : int
        Host session id.
    sent_at : float
        ``time.monotonic()`` when the command frame was first written to the
        port (the command on the wire); 0 for dry runs.
    """

    seq: int
    command: str
    args: dict
    status: str
    state: DeviceState | None
    rtt_s: float = 0.0
    attempts: int = 0
    session: int = 0
    sent_at: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class Bridge:
    """Connection to the instrument electronics. Create with :func:`connect`.

    All methods are thread-safe: commands are serialised (one in flight),
    heartbeats and reconnects run in a background thread.
    """

    def __init__(self, port: str | None, *, limits: Any = None, dry_run: bool = False,
                 deadline: float = 2.0, max_attempts: int | None = None,
                 connect_timeout: float | None = 2.0, baudrate: int = 115200,
                 exclusive: bool = True, retry_initial: float = 0.05,
                 retry_backoff: float = 2.0, retry_max: float = 0.5,
                 heartbeat_interval: float | None = 0.1, watchdog_ms: int = 0,
                 hello_interval: float = 0.1, reconnect_max: float = 0.5,
                 device_id: str | None = None) -> None:
        # Every option is checked before anything is opened or written.
        dry_run = _flag(dry_run, "dry_run")
        exclusive = _flag(exclusive, "exclusive")
        deadline = _seconds(deadline, "deadline")
        connect_timeout = _seconds(connect_timeout, "connect_timeout", none_ok=True, zero_ok=True)
        retry_initial = _seconds(retry_initial, "retry_initial", hi=_MAX_PERIOD)
        retry_max = _seconds(retry_max, "retry_max", hi=_MAX_PERIOD)
        retry_backoff = _number(retry_backoff, "retry_backoff", 1.0, 100.0)
        if retry_initial > retry_max:
            raise ConfigError(f"option retry_initial ({retry_initial}) must not exceed "
                              f"retry_max ({retry_max})")
        heartbeat_interval = _seconds(heartbeat_interval, "heartbeat_interval", none_ok=True,
                                      hi=_MAX_PERIOD)
        hello_interval = _seconds(hello_interval, "hello_interval", hi=_MAX_PERIOD)
        reconnect_max = _seconds(reconnect_max, "reconnect_max", hi=_MAX_PERIOD)
        watchdog_ms = _integer(watchdog_ms, "watchdog_ms", 0, 0xFFFF)
        baudrate = _integer(baudrate, "baudrate", 1, 100_000_000)
        if max_attempts is not None:
            max_attempts = _integer(max_attempts, "max_attempts", 1, 10**9)
        if device_id is not None and (not isinstance(device_id, str) or not 0 < len(
                device_id.encode("utf-8", "replace")) <= DEVICE_ID_MAX):
            raise ConfigError(f"option device_id must be a str of 1 to {DEVICE_ID_MAX} UTF-8 "
                              f"bytes or None, got {device_id!r}")
        if heartbeat_interval is not None:
            # The device clamps the watchdog to 50..10000 ms (0 = its default, 1000 ms).
            wd = 1000 if watchdog_ms == 0 else min(10000, max(50, watchdog_ms))
            if heartbeat_interval * 1000 >= wd:
                raise ConfigError(f"option heartbeat_interval ({heartbeat_interval} s) must be "
                                  f"shorter than the device watchdog ({wd} ms), or the device "
                                  f"falls into its safe state between heartbeats")
        self.limits = Limits.load(limits)
        self.dry_run = dry_run
        self.deadline = deadline
        self.max_attempts = max_attempts
        self._rate = RateLimiter(self.limits)
        self._closed = False
        self._lock = threading.Lock()
        self.port = port
        self._channel: ReliableChannel | None = None
        if dry_run:
            return  # never opens the port, never writes
        if port is None:
            raise ConfigError("a port is required unless dry_run=True")
        opts = ChannelOptions(retry_initial=retry_initial, retry_backoff=retry_backoff,
                              retry_max=retry_max, hello_interval=hello_interval,
                              reconnect_min=min(0.02, reconnect_max), reconnect_max=reconnect_max,
                              heartbeat_interval=heartbeat_interval, watchdog_ms=watchdog_ms,
                              device_id=device_id)
        self._channel = ReliableChannel(SerialTransport(port, baudrate=baudrate,
                                                        exclusive=exclusive), opts)
        if connect_timeout:
            try:
                ready = self._channel.wait_ready(connect_timeout)
            except BaseException:
                self._channel.close()
                raise
            if not ready:
                up, err = self._channel.link_up, self._channel.stats.last_error
                self._channel.close()
                if not up:
                    raise DeviceUnreachable(f"cannot open {port!r} within {connect_timeout} s: "
                                            f"{err or 'unknown error'}", applied=False)
                raise DeadlineExceeded(f"device on {port!r} did not answer the handshake "
                                       f"within {connect_timeout} s "
                                       f"({self._channel.handshake_hint()})", applied=False)

    # ---------------------------------------------------------------- commands
    def validate(self, command: str, /, **args: Any) -> ValidatedCommand:
        """Validate against this bridge's limits without sending or rate-limiting."""
        return self.limits.validate(command, **args)

    def send(self, command: str, /, *, deadline: float | None = None, **args: Any) -> Ack:
        """Send one command and wait for its definite outcome.

        Parameters
        ----------
        command : str
            Vocabulary name, e.g. ``"set_attenuation"``.
        deadline : float, optional
            Overrides the bridge's per-command deadline (seconds, finite, > 0;
            ``ConfigError`` otherwise).
        **args
            Command arguments, e.g. ``level=3``.

        Returns
        -------
        Ack
            The device acknowledged and applied the command exactly once.

        Raises
        ------
        ValidationError, UnknownCommand, RateLimited
            Refused before anything was written.
        CommandRejected
            The device answered NACK (``.code``); not applied.
        CommandFailed
            ``DeadlineExceeded``/``DeviceUnreachable``/``OutcomeUnknown``.
        DeviceMismatch
            Another device answers behind the port (nothing sent to it).
        BridgeClosed
            The bridge is closed.
        """
        if self._closed:
            raise BridgeClosed("bridge is closed")
        if deadline is not None:
            deadline = _seconds(deadline, "deadline")
        vc = self.limits.validate(command, **args)
        self._rate.acquire(vc.wire_name)
        if self._channel is None:
            return Ack(0, command, vc.args, "dry_run", None)
        reply, seq, attempts, t_first = self._channel.request(
            vc.payload, command=command, deadline=self.deadline if deadline is None else deadline,
            max_attempts=self.max_attempts)
        rtt = time.monotonic() - t_first
        return Ack(seq, command, vc.args, "ok", reply.state, rtt, attempts, self._channel.session, t_first)

    def state(self, refresh: bool = False) -> DeviceState | None:
        """Device state: the latest telemetry, or a fresh ``query_state`` if ``refresh``.

        Heartbeat replies refresh the cached state every ``heartbeat_interval``.
        Returns ``None`` in dry-run mode or before any state was received.
        """
        if self._channel is None:
            return None
        if refresh:
            return self.send("query_state").state
        return self._channel.last_state[0]

    def resume(self) -> Ack:
        """Leave the device's safe state (heartbeats must be flowing again)."""
        return self.send("resume")

    def link_status(self) -> dict:
        """Diagnostics: link/handshake flags, session, counters, last error."""
        ch = self._channel
        if ch is None:
            return {"dry_run": True}
        st, t = ch.last_state
        return {"port": self.port, "device": ch.transport.device, "link_up": ch.link_up,
                "ready": ch.ready, "session": ch.session, "device_name": ch.device_name,
                "device_id": ch.device_id, "boot_id": ch.boot_id,
                "watchdog_ms": ch.watchdog_ms, "state_age_s": time.monotonic() - t if st else None,
                **{k: v for k, v in vars(ch.stats).items() if k != "decoder"}}

    # --------------------------------------------------------------- lifecycle
    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stop heartbeats, close the port. Idempotent.

        Note that the device enters its safe state once heartbeats stop.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._channel is not None:
            self._channel.close()

    def __enter__(self) -> "Bridge":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Bridge port={self.port!r} dry_run={self.dry_run} closed={self._closed}>"


def connect(port_or_url: str | os.PathLike | None, **options: Any) -> Bridge:
    """Open a :class:`Bridge` to the device.

    Parameters
    ----------
    port_or_url : str or None
        Device path (``/dev/ttyACM0``), pyserial URL, ``usb:VID:PID[:SERIAL]``
        or ``serial:SERIAL``. May be ``None`` with ``dry_run=True``.
    **options
        ``limits`` (path or dict; default shipped ``limits.toml``),
        ``dry_run`` (validate + rate-limit, never open or write),
        ``deadline`` (per-send, s, default 2.0), ``max_attempts``,
        ``connect_timeout`` (wait for handshake, s, default 2.0; ``None`` = don't wait),
        ``retry_initial``/``retry_backoff``/``retry_max`` (retransmission timing),
        ``heartbeat_interval`` (s, default 0.1; ``None`` = no heartbeats),
        ``watchdog_ms`` (ask the device for this watchdog; 0 = device default),
        ``baudrate``, ``exclusive``, ``hello_interval``, ``reconnect_max``,
        ``device_id`` (refuse any other device; default: bind to the first one
        that answers). Every option is checked up front: wrong type, NaN/inf or
        out of range raises :class:`ConfigError` naming it.

    Returns
    -------
    Bridge
        Use as a context manager.

    Raises
    ------
    ConfigError
        Bad options or limits.
    DeviceUnreachable, DeadlineExceeded, HandshakeError, DeviceMismatch
        Could not reach the device within ``connect_timeout``.
    """
    if port_or_url is not None and not isinstance(port_or_url, (str, os.PathLike)):
        raise ConfigError(f"port must be a str or path, got {type(port_or_url).__name__}")
    try:
        port = None if port_or_url is None else os.fspath(port_or_url)
    except TypeError as exc:
        raise ConfigError(f"port must be a str path or URL: {exc}") from exc
    if isinstance(port, bytes):
        raise ConfigError("port must be a str path or URL, not bytes")
    unknown = set(options) - _OPTIONS
    if unknown:
        raise ConfigError(f"unknown connect option(s) {sorted(unknown)}; known: {sorted(_OPTIONS)}")
    return Bridge(port, **options)


_OPTIONS = {"limits", "dry_run", "deadline", "max_attempts", "connect_timeout", "baudrate",
            "exclusive", "retry_initial", "retry_backoff", "retry_max", "heartbeat_interval",
            "watchdog_ms", "hello_interval", "reconnect_max", "device_id"}
#: Upper bound of any wait (s): well below threading.TIMEOUT_MAX, far above any sane use.
_MAX_WAIT = 86400.0
#: Upper bound of periodic timings (retransmission, heartbeat, hello, reconnect), s.
_MAX_PERIOD = 60.0


def _number(v: Any, name: str, lo: float, hi: float) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise ConfigError(f"option {name} must be a number, got {v!r}")
    try:
        f = float(v)
    except (OverflowError, ValueError, TypeError) as exc:
        raise ConfigError(f"option {name} must be a finite number, got {v!r}") from exc
    if not math.isfinite(f) or not lo <= f <= hi:
        raise ConfigError(f"option {name} must be a finite number in [{lo:g}, {hi:g}], got {v!r}")
    return f


def _seconds(v: Any, name: str, *, none_ok: bool = False, zero_ok: bool = False,
             hi: float = _MAX_WAIT) -> float | None:
    if v is None and none_ok:
        return None
    f = _number(v, name, 0.0, hi)
    if f == 0 and not zero_ok:
        raise ConfigError(f"option {name} must be > 0 s, got {v!r}")
    return f


def _integer(v: Any, name: str, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise ConfigError(f"option {name} must be an integer, got {v!r}")
    i = int(v)
    if not lo <= i <= hi:
        raise ConfigError(f"option {name} must be in [{lo}, {hi}], got {v!r}")
    return i


def _flag(v: Any, name: str) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(f"option {name} must be True or False, got {v!r}")
    return v
