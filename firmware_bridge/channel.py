"""Reliable command channel: handshake, retransmission, exactly-once resolution.

One background *link thread* owns the port: it (re)opens it, performs the
HELLO handshake, sends heartbeats, reads and dispatches every frame. Callers
of :meth:`ReliableChannel.request` (serialised: one command in flight) write
their COMMAND frame and wait for its answer.

Exactly-once scheme
-------------------
* The host picks a random 32-bit session id; sequence numbers restart at 1
  per session, so frames of different host sessions never collide.
* The device stores the answer of the last ``dedup_size`` commands by seq and
  answers a repeat with the stored answer, without applying it again; a seq
  at or below the highest seen and no longer stored is refused (STALE_SEQ).
* A plain timeout leads to retransmission of the identical frame (safe by
  the rule above) with exponential backoff until the deadline.
* Every HELLO carries the host's *seq floor* (the highest seq it may already
  have sent). A device that does not know the session (it restarted, or
  another host's sessions pushed this one out of its history) starts it at
  that floor and never applies a seq at or below it. So no retransmission can
  be applied by a device that cannot vouch for it, whatever the timing of a
  reboot and the retransmission write.
* After a reconnect (new handshake) a command that was already transmitted
  is first resolved with STATUS_QUERY: the stored answer comes back if it was
  applied, NOT_RECEIVED means it is safe to send, anything else (device
  rebooted, answer evicted, session forgotten) ends the send with
  :class:`OutcomeUnknown`.
* The device id in HELLO_ACK is pinned at the first handshake (or given by
  the caller); a different device behind the same path is refused with
  :class:`DeviceMismatch` and the link stops talking to it.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from .errors import (BridgeClosed, BridgeError, CommandRejected, DeadlineExceeded,
                     DeviceMismatch, DeviceUnreachable, HandshakeError, OutcomeUnknown,
                     PortUnavailable, ProtocolError, SafeStateActive)
from .framing import PROTOCOL_VERSION, Frame, FrameDecoder, encode_frame
from .messages import (HELLO, CommandFate, DeviceState, ErrorCode, MsgType, Reply,
                       parse_reply)
from .transport import SerialTransport


@dataclass
class ChannelStats:
    """Counters for diagnostics (read without locking; values are approximate)."""

    connects: int = 0
    disconnects: int = 0
    handshakes: int = 0
    commands: int = 0
    transmissions: int = 0
    retransmissions: int = 0
    status_queries: int = 0
    heartbeats: int = 0
    telemetry: int = 0
    stray_frames: int = 0
    bad_version_frames: int = 0
    reopens: int = 0
    last_error: str = ""
    decoder: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ChannelOptions:
    """Timing options of the reliable channel (seconds unless noted)."""

    retry_initial: float = 0.05     # first retransmission timeout
    retry_backoff: float = 2.0      # multiplier per retransmission
    retry_max: float = 0.5          # cap of the retransmission timeout
    hello_interval: float = 0.1     # handshake retry period
    reconnect_min: float = 0.02     # first wait before re-opening a vanished port
    reconnect_max: float = 0.5      # cap of that wait
    heartbeat_interval: float | None = 0.1  # None disables heartbeats
    watchdog_ms: int = 0            # watchdog asked from the device (0 = its default)
    device_id: str | None = None    # expected device id (None: pin the first one seen)


class ReliableChannel:
    """Protocol layer between :class:`SerialTransport` and :class:`~firmware_bridge.Bridge`.

    Parameters
    ----------
    transport : SerialTransport
        Unopened transport; the link thread opens and reopens it.
    options : ChannelOptions
        Timing.
    """

    def __init__(self, transport: SerialTransport, options: ChannelOptions | None = None) -> None:
        self.transport = transport
        self.opts = options or ChannelOptions()
        self.session = secrets.randbits(32) or 1
        self.stats = ChannelStats()
        self.device_name = ""
        self.device_id = self.opts.device_id or ""
        self.dedup_size = 0
        self.watchdog_ms = 0
        self._decoder = FrameDecoder()
        self._cv = threading.Condition()
        self._send_lock = threading.Lock()
        self._seq = 0
        self._sent_seq = 0  # highest seq that may be on the wire (the HELLO seq floor)
        self._hb_seq = 0
        self._hello_seq = 0
        self._link_up = False
        self._ready = False
        self._broken = False
        self._epoch = 0
        self._boot_id: int | None = None
        self._fatal: BridgeError | None = None  # sticky: every send raises it
        #: Test hook: called as ``hook(seq, attempt)`` just before a COMMAND frame is
        #: written (lets tests force the reboot/retransmission interleaving).
        self.before_command_write: Callable[[int, int], None] | None = None
        self._waiting: set[int] = set()
        self._replies: dict[int, Reply] = {}
        self._state: DeviceState | None = None
        self._state_time = 0.0
        self._closed = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="firmware-bridge-link", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public
    @property
    def ready(self) -> bool:
        """True while the port is open and the handshake is done."""
        return self._ready

    @property
    def link_up(self) -> bool:
        return self._link_up

    @property
    def last_state(self) -> tuple[DeviceState | None, float]:
        """Last device state seen and its ``time.monotonic()`` timestamp."""
        return self._state, self._state_time

    def wait_ready(self, timeout: float) -> bool:
        """Block until handshaked, closed, or ``timeout``; return readiness."""
        with self._cv:
            self._cv.wait_for(lambda: self._ready or self._closed or self._fatal,
                              timeout)
            if self._fatal is not None:
                raise self._fatal
            return self._ready

    @property
    def boot_id(self) -> int | None:
        """Boot id of the device at the last handshake."""
        return self._boot_id

    def request(self, payload: bytes, *, command: str, deadline: float,
                max_attempts: int | None = None) -> tuple[Reply, int, int, float]:
        """Send one COMMAND and return ``(ack, seq, attempts, t_first)``.

        ``t_first`` is the ``time.monotonic()`` of the first transmission (the
        command on the wire); the round trip is ``time.monotonic() - t_first``.

        Raises
        ------
        CommandRejected, SafeStateActive
            The device answered NACK (not applied).
        DeadlineExceeded, DeviceUnreachable, OutcomeUnknown
            No definite answer; see the exception's ``applied`` attribute.
        BridgeClosed
            The channel was closed while waiting.
        """
        with self._send_lock:
            self._seq += 1
            seq = self._seq
            frame = encode_frame(MsgType.COMMAND, self.session, seq, payload)
            hook = self.before_command_write
            t_end = time.monotonic() + deadline
            rto = self.opts.retry_initial
            transmitted = False
            sent_epoch = sent_boot = None
            attempts = 0
            t_first = 0.0
            self.stats.commands += 1
            with self._cv:
                self._waiting.add(seq)
                self._replies.pop(seq, None)
            try:
                while True:
                    with self._cv:
                        ok = self._cv.wait_for(
                            lambda: self._ready or self._closed or self._fatal,
                            max(0.0, t_end - time.monotonic()))
                        epoch, boot = self._epoch, self._boot_id
                        reply = self._replies.pop(seq, None)
                    if self._closed:
                        raise BridgeClosed(f"bridge closed while sending {command!r} (seq {seq})")
                    if self._fatal is not None:
                        if transmitted:
                            raise OutcomeUnknown(
                                f"{command} (seq {seq}): link failed while the command was in "
                                f"flight ({self._fatal}); it may or may not have been applied",
                                command=command, seq=seq, applied=None) from self._fatal
                        raise self._fatal
                    if reply is not None:
                        result = self._conclude(reply, command, seq)
                        if result is not None:
                            return result, seq, attempts, t_first
                    if not ok:
                        raise self._failure(command, seq, transmitted, attempts, deadline)
                    if transmitted and boot != sent_boot:
                        raise OutcomeUnknown(
                            f"{command} (seq {seq}): device restarted while the command was in "
                            f"flight; it may or may not have been applied before the restart",
                            command=command, seq=seq, applied=None)
                    if transmitted and epoch != sent_epoch:
                        # Reconnected: ask before resending, answer decides.
                        self.stats.status_queries += 1
                        self._write(encode_frame(MsgType.STATUS_QUERY, self.session, seq))
                        sent_epoch = epoch  # resolved on this link unless it drops again
                    else:
                        if transmitted:
                            self.stats.retransmissions += 1
                        else:
                            t_first = time.monotonic()
                        self._sent_seq = seq  # before the write: the floor must cover it
                        if hook is not None:
                            hook(seq, attempts + 1)
                        self._write(frame)
                        transmitted, sent_epoch, sent_boot = True, epoch, boot
                        attempts += 1
                        self.stats.transmissions += 1
                    wait = min(rto, t_end - time.monotonic())
                    with self._cv:
                        self._cv.wait_for(lambda: seq in self._replies or self._closed
                                          or self._epoch != epoch or not self._ready,
                                          max(0.0, wait))
                        reply = self._replies.pop(seq, None)
                    if reply is not None:
                        result = self._conclude(reply, command, seq)
                        if result is not None:
                            return result, seq, attempts, t_first
                        continue  # STATUS NOT_RECEIVED: send now
                    if time.monotonic() >= t_end or (max_attempts and attempts >= max_attempts):
                        raise self._failure(command, seq, transmitted, attempts, deadline)
                    rto = min(rto * self.opts.retry_backoff, self.opts.retry_max)
            finally:
                with self._cv:
                    self._waiting.discard(seq)
                    self._replies.pop(seq, None)

    def close(self) -> None:
        """Stop the link thread and close the port (idempotent)."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=2.0)
        self.transport.close()

    # ----------------------------------------------------------------- helpers
    def _conclude(self, reply: Reply, command: str, seq: int) -> Reply | None:
        """Map a reply to return / raise; ``None`` means 'send the command now'."""
        if reply.msg_type == MsgType.ACK:
            return reply
        if reply.msg_type == MsgType.STATUS:
            if reply.code == CommandFate.NOT_RECEIVED:
                return None
            raise OutcomeUnknown(f"{command} (seq {seq}): device no longer remembers this "
                                 f"command; it may or may not have been applied",
                                 command=command, seq=seq, applied=None)
        code = reply.code
        if code == ErrorCode.STALE_SEQ:
            raise OutcomeUnknown(f"{command} (seq {seq}): device refused it as stale (it restarted, "
                                 f"forgot this session, or evicted the answer); it may or may not "
                                 f"have been applied before", command=command, seq=seq,
                                 applied=None)
        try:
            reason = ErrorCode(code).name
        except ValueError:
            reason = f"ERROR_{code}"
        cls = SafeStateActive if code == ErrorCode.SAFE_STATE else CommandRejected
        hint = " (device is in safe state: restore heartbeats, then send 'resume')" \
            if cls is SafeStateActive else ""
        raise cls(f"device rejected {command} (seq {seq}): {reason}{hint}", code=code,
                  reason=reason, state=reply.state, command=command, seq=seq)

    def _failure(self, command: str, seq: int, transmitted: bool, attempts: int,
                 deadline: float) -> Exception:
        applied = None if transmitted else False
        fate = "it may have been applied" if transmitted else "it was never sent"
        if not self._link_up:
            return DeviceUnreachable(
                f"{command} (seq {seq}) failed: port {self.transport.port!r} unavailable for the "
                f"whole {deadline:.3g} s deadline ({self.stats.last_error or 'not open'}); {fate}",
                command=command, seq=seq, applied=applied)
        if not self._ready:
            return DeadlineExceeded(
                f"{command} (seq {seq}) failed: device on {self.transport.port!r} did not answer "
                f"the handshake within {deadline:.3g} s ({self.handshake_hint()}); {fate}",
                command=command, seq=seq, applied=applied)
        return DeadlineExceeded(
            f"{command} (seq {seq}) failed: no answer after {attempts} attempt(s) in "
            f"{deadline:.3g} s; {fate}", command=command, seq=seq, applied=applied)

    def handshake_hint(self) -> str:
        """Why a handshake may not have completed (for error messages)."""
        if self.stats.bad_version_frames:
            return (f"silent device? {self.stats.bad_version_frames} frame(s) with another "
                    f"protocol version than {PROTOCOL_VERSION} were dropped")
        return "silent device?"

    def _write(self, data: bytes) -> bool:
        try:
            self.transport.write(data)
            return True
        except PortUnavailable as exc:
            # Only the link thread closes the port; flag it so it does.
            self.stats.last_error = str(exc)
            self._broken = True
            return False

    # ------------------------------------------------------------- link thread
    def _run(self) -> None:
        try:
            self._link_loop()
        except BaseException as exc:  # noqa: BLE001 - never die silently: every send reports it
            with self._cv:
                self._fatal = ProtocolError(f"link thread failed: {type(exc).__name__}: {exc}")
                self._ready = self._link_up = False
                self._cv.notify_all()
            self.transport.close()
        self.stats.decoder = vars(self._decoder.stats)

    def _path_moved(self) -> bool:
        """True if the port path now names another tty than the one open (device re-plugged)."""
        dev = self.transport.device
        if not dev or "://" in dev or not os.path.exists(self.transport.port):
            return False
        try:
            return os.path.realpath(self.transport.port) != self._opened_real
        except OSError:
            return False

    def _link_loop(self) -> None:
        backoff = self.opts.reconnect_min
        next_hello = next_hb = next_path_check = 0.0
        self._opened_real = ""
        while not self._stop.is_set() and self._fatal is None:
            if not self.transport.is_open:
                try:
                    self.transport.open()
                except PortUnavailable as exc:
                    self.stats.last_error = str(exc)
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, self.opts.reconnect_max)
                    continue
                backoff = self.opts.reconnect_min
                try:
                    self._opened_real = os.path.realpath(self.transport.device or "")
                except OSError:
                    self._opened_real = ""
                self._decoder.reset()
                self._broken = False
                self.stats.connects += 1
                with self._cv:
                    self._link_up = True
                    self._ready = False
                    self._cv.notify_all()
                next_hello = 0.0
            now = time.monotonic()
            if not self._ready and now >= next_path_check:
                # A device restarted on a new pty re-points the link path; the old tty
                # may be reused by an unrelated program that never answers.
                next_path_check = now + 0.25
                if self._path_moved():
                    self.stats.reopens += 1
                    self.transport.close()
                    with self._cv:
                        self._link_up = False
                        self._cv.notify_all()
                    continue
            if not self._ready and now >= next_hello:
                self._hello_seq += 1
                # seq floor: every seq written so far may have been applied already
                self._write(encode_frame(MsgType.HELLO, self.session, self._hello_seq,
                                         HELLO.pack(self.opts.watchdog_ms, self._sent_seq)))
                next_hello = now + self.opts.hello_interval
            hb = self.opts.heartbeat_interval
            if self._ready and hb and now >= next_hb:
                self._hb_seq += 1
                self.stats.heartbeats += 1
                self._write(encode_frame(MsgType.HEARTBEAT, self.session, self._hb_seq))
                next_hb = now + hb
            timeout = 0.05
            if not self._ready:
                timeout = min(timeout, max(0.0, next_hello - now))
            elif hb:
                timeout = min(timeout, max(0.0, next_hb - now))
            try:
                if self._broken:
                    raise PortUnavailable(self.stats.last_error or "write failed")
                data = self.transport.read(timeout)
            except PortUnavailable as exc:
                self.stats.last_error = str(exc)
                # not ready before the disconnect is counted: whoever sees the
                # count must not find the dead link still ready and send on it
                with self._cv:
                    self._link_up = self._ready = False
                    self.stats.disconnects += 1
                    self._cv.notify_all()
                self.transport.close()
                continue
            if data:
                for frame in self._decoder.feed(data):
                    self._dispatch(frame)
                    if self._fatal is not None:
                        break
        if self._fatal is not None:
            self.transport.close()  # stop talking to a device we must not drive
            with self._cv:
                self._link_up = self._ready = False
                self._cv.notify_all()

    def _dispatch(self, f: Frame) -> None:
        if f.version != PROTOCOL_VERSION:
            # A stray frame must not poison a healthy link: drop and count it. A
            # device that really speaks another version never completes the handshake,
            # and the failure message names these frames.
            self.stats.bad_version_frames += 1
            return
        reply = parse_reply(f.msg_type, f.session, f.seq, f.payload)
        if reply is None or f.session != self.session:
            self.stats.stray_frames += 1  # malformed, or from another host session
            return
        if reply.msg_type == MsgType.NACK and reply.code == ErrorCode.BAD_VERSION:
            self.stats.bad_version_frames += 1  # answer to a frame we never sent
            return
        if reply.state is not None:
            self._state, self._state_time = reply.state, time.monotonic()
        t = reply.msg_type
        if t == MsgType.HELLO_ACK:
            if reply.proto != PROTOCOL_VERSION:
                with self._cv:
                    self._fatal = HandshakeError(
                        f"device protocol {reply.proto} != host protocol {PROTOCOL_VERSION}")
                    self._cv.notify_all()
                return
            with self._cv:
                if self.device_id and reply.device_id != self.device_id:
                    self._fatal = DeviceMismatch(
                        f"refusing device {reply.device_id!r} ({reply.name!r}) on "
                        f"{self.transport.port!r} ({self.transport.device}): this bridge is bound "
                        f"to device {self.device_id!r}; not sending anything to it",
                        expected=self.device_id, found=reply.device_id)
                    self._cv.notify_all()
                    return
                if not self._ready:
                    self.device_id = reply.device_id
                    self.device_name, self.dedup_size = reply.name, reply.dedup_size
                    self.watchdog_ms = reply.watchdog_ms
                    self._boot_id = reply.state.boot_id if reply.state else None
                    self._ready = True
                    self._epoch += 1
                    self.stats.handshakes += 1
                    self._cv.notify_all()
            return
        if t == MsgType.TELEMETRY:
            self.stats.telemetry += 1
            return
        if t == MsgType.NACK and reply.code == ErrorCode.BAD_SESSION:
            # The device forgot our session (restart): handshake again.
            with self._cv:
                self._ready = False
                self._cv.notify_all()
            return
        with self._cv:
            if f.seq in self._waiting:
                old = self._replies.get(f.seq)
                # A late STATUS must not hide an ACK/NACK for the same seq.
                if old is None or old.msg_type == MsgType.STATUS:
                    self._replies[f.seq] = reply
                    self._cv.notify_all()
            else:
                self.stats.stray_frames += 1  # duplicate / late answer
