"""Live DECTRIS Stream V2 source: CBOR messages from a detector's ZeroMQ PUSH socket.

The DCU (or a Jungfraujoch-style receiver, or ``edge serve``) binds a PUSH
socket, by default on TCP port 31001; :class:`StreamSource` connects a PULL
socket. A detector never waits for us - a PULL socket that stops reading
backs up into the detector - so a *receiver thread* drains the socket as fast
as messages arrive, checks each one (CBOR structure, series, dims, sizes) and
puts images into a bounded queue that drops the *oldest image* when full.
Pixels are decompressed only when the consumer takes an image, so dropped
images cost nothing.

Series: a ``start`` message builds the :class:`~edge.geometry.Geometry` (beam
centre, distance, wavelength, pixel size, pixel mask, saturation); images are
checked against it; ``end`` closes the series. Every image is accounted for
per series: received, delivered (yielded), dropped, and errors by kind
(``SeriesStats``). Events (series start/end, drops, errors) are kept for the
consumer, which takes them with :meth:`StreamSource.pop_events` (the pipeline
writes them to its results file). Bad messages are counted, logged once per
kind and series on the ``edge.stream`` logger, and skipped: the stream goes on.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from ..geometry import Geometry
from .base import FrameMeta, FrameSource, SourceError

__all__ = ["StreamSource", "SeriesStats", "DEFAULT_PORT", "MAX_PIXELS", "parse_endpoint"]

log = logging.getLogger("edge.stream")

#: Stream V2 port of a DECTRIS DCU.
DEFAULT_PORT = 31001
#: Largest image accepted from a ``start`` message (pixels): 4x an EIGER2 16M.
MAX_PIXELS = 1 << 26
_HC_EV_A = 12398.419843320026  # h c in eV Angstrom: wavelength from energy
_IMAGE_DTYPES = {"u1", "u2", "u4", "i1", "i2", "i4", "f4", "f8"}
_DEFAULTS = {"detector_distance_mm": 100.0, "wavelength_A": 1.0, "pixel_size_mm": 0.075}


def parse_endpoint(spec: str) -> str:
    """``tcp://HOST[:PORT]`` -> ``tcp://HOST:PORT`` (default port 31001); SourceError if malformed."""
    if not spec.startswith("tcp://"):
        raise SourceError(f"stream endpoint must look like tcp://HOST:PORT, got {spec!r}")
    rest = spec[len("tcp://"):]
    host, sep, port = rest.rpartition(":") if rest.count(":") == 1 or rest.startswith("[") else (rest, "", "")
    if not sep:
        host, port = rest, str(DEFAULT_PORT)
    if not host or "/" in host:
        raise SourceError(f"stream endpoint {spec!r}: missing or invalid host")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise SourceError(f"stream endpoint {spec!r}: port must be 1-65535, got {port!r}")
    return f"tcp://{host}:{int(port)}"


@dataclass
class SeriesStats:
    """Per-series accounting: every image received is delivered, dropped or an error."""

    series_id: Any
    series_unique_id: Any = None
    number_of_images: int | None = None
    received: int = 0
    delivered: int = 0
    dropped: int = 0
    errors: Counter = field(default_factory=Counter)
    ended: bool = False
    incomplete: bool = False
    refused: str | None = None

    @property
    def decode_errors(self) -> int:
        return sum(self.errors.values())

    @property
    def missing(self) -> int:
        """Images the ``start`` message announced that never arrived (sent by
        nobody, dropped by the sender, or lost with a broken connection)."""
        if self.number_of_images is None or self.refused is not None:
            return 0
        return max(self.number_of_images - self.received, 0)

    def to_dict(self) -> dict:
        return {"series_id": self.series_id, "series_unique_id": self.series_unique_id,
                "number_of_images": self.number_of_images, "received": self.received,
                "delivered": self.delivered, "dropped": self.dropped, "decode_errors": self.decode_errors,
                "errors": dict(self.errors), "ended": self.ended, "incomplete": self.incomplete,
                "missing": self.missing, "refused": self.refused}


@dataclass
class _Series:
    stats: SeriesStats
    geometry: Geometry | None = None
    shape: tuple[int, int] | None = None
    channel: str | None = None
    frame_time: float | None = None
    count_time: float | None = None
    defaults_used: tuple[str, ...] = ()


class _ImageQueue:
    """FIFO whose ``put`` never blocks: when ``maxsize`` images wait, the oldest *image* goes.

    Series markers (start/end) are never dropped, so the consumer always sees
    series boundaries in order.
    """

    def __init__(self, maxsize: int, max_bytes: int) -> None:
        self._items: deque = deque()
        self._images = 0
        self._bytes = 0
        self._maxsize = maxsize
        self._max_bytes = max_bytes
        self._cv = threading.Condition()

    def put(self, item: tuple, *, image: bool, nbytes: int = 0) -> list:
        """Append ``item``; returns the images dropped to make room (oldest first)."""
        dropped = []
        with self._cv:
            if image:
                while self._images and (self._images >= self._maxsize or self._bytes + nbytes > self._max_bytes):
                    for i, old in enumerate(self._items):
                        if old[0] == "image":
                            dropped.append(old)
                            del self._items[i]
                            self._images -= 1
                            self._bytes -= old[-1]
                            break
            self._items.append(item)
            self._images += image
            self._bytes += nbytes
            self._cv.notify()
        return dropped

    def get(self, timeout: float) -> tuple | None:
        with self._cv:
            if not self._cv.wait_for(lambda: self._items, timeout):
                return None
            item = self._items.popleft()
            if item[0] == "image":
                self._images -= 1
                self._bytes -= item[-1]
            return item

    def __len__(self) -> int:
        with self._cv:
            return len(self._items)


class StreamSource(FrameSource):
    """Frames from a DECTRIS Stream V2 ZeroMQ PUSH socket (a DCU, Jungfraujoch, ``edge serve``).

    Parameters
    ----------
    endpoint : str
        ``tcp://HOST:PORT`` (port 31001 when omitted).
    channel : str, optional
        Image channel (threshold) to use; default the first of ``channels``
        in each ``start`` message.
    queue_size, queue_bytes : int
        Images (and their bytes as received, compressed or not) buffered
        between the receiver thread and the consumer; beyond either, the
        oldest image is dropped and counted.
    geometry : Geometry, optional
        Fallback geometry: used for images that arrive before any ``start``
        (a client that joined mid-series; without it they are counted and
        skipped) and for fields a ``start`` message lacks.
    n_frames : int, optional
        Stop after yielding this many frames.
    max_series : int, optional
        Stop after this many series have ended.
    idle_timeout : float, optional
        Stop when no message has arrived for this many seconds (None = wait
        forever; a live detector may be idle between series).
    max_pixels : int
        Refuse ``start`` messages with larger images (before allocating).
    rcvhwm : int
        ZeroMQ receive high-water mark (messages held by ZeroMQ itself).
    """

    def __init__(self, endpoint: str, *, channel: str | None = None, queue_size: int = 64,
                 queue_bytes: int = 512 << 20,
                 geometry: Geometry | None = None, n_frames: int | None = None, max_series: int | None = None,
                 idle_timeout: float | None = None, max_pixels: int = MAX_PIXELS, rcvhwm: int = 16,
                 rate_hz: float | None = None, loop: bool = False, **kw: Any) -> None:
        if rate_hz is not None:
            raise SourceError("a live stream is paced by the detector: rate_hz must be None")
        if loop:
            raise SourceError("a live stream cannot loop")
        if kw:
            raise SourceError(f"StreamSource: unexpected options {sorted(kw)}")
        super().__init__(n_frames=n_frames)
        if queue_size < 1:
            raise SourceError(f"queue_size must be >= 1, got {queue_size}")
        if geometry is not None and not isinstance(geometry, Geometry):
            raise SourceError(f"geometry must be an edge.Geometry, got {type(geometry).__name__}")
        try:
            import zmq
        except ImportError as exc:  # pragma: no cover - a declared dependency
            raise SourceError(f"the live stream needs pyzmq: {exc}") from exc
        self._zmq = zmq
        self.endpoint = parse_endpoint(endpoint)
        self.name = self.endpoint
        self.channel = channel
        self.fallback = geometry
        self.geometry = geometry  # the current series' geometry (None before the first start)
        self.max_series = max_series
        self.idle_timeout = idle_timeout
        self.max_pixels = int(max_pixels)
        self._rcvhwm = int(rcvhwm)
        self._queue = _ImageQueue(queue_size, queue_bytes)
        self._lock = threading.Lock()
        self._events: list[dict] = []
        self._series_log: list[SeriesStats] = []
        self._current: _Series | None = None
        self._orphans: SeriesStats | None = None  # images with no usable start
        self._warned: set = set()
        self._last_msg = time.monotonic()
        #: Totals over the source's life (thread-safe snapshots via :attr:`totals`).
        self._totals = Counter()
        self._stop = threading.Event()
        self._interrupted = False
        self._thread: threading.Thread | None = None
        from ..stream import codec

        codec.warmup()  # Numba decode kernels: loaded (or compiled once) now, not on the first image
        zmq = self._zmq
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.PULL)
        self._sock.setsockopt(zmq.RCVHWM, self._rcvhwm)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.RECONNECT_IVL, 100)
        self._sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        try:
            self._monitor = self._sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
            self._sock.connect(self.endpoint)
        except zmq.ZMQError as exc:
            self._sock.close(0)
            raise SourceError(f"cannot connect to {self.endpoint}: {exc}") from exc

    # ------------------------------------------------------------------ public
    @property
    def n_frames(self) -> int | None:
        return self._cap

    @property
    def totals(self) -> dict:
        """Counters over the source's life: messages, bytes, images, dropped, errors, connects..."""
        with self._lock:
            return dict(self._totals)

    def series(self) -> list[dict]:
        """Accounting of every series seen so far (oldest first), as dicts."""
        with self._lock:
            out = [s.to_dict() for s in self._series_log]
            if self._orphans is not None:
                out.append(self._orphans.to_dict())
            return out

    def pop_events(self) -> list[dict]:
        """Take the events recorded since the last call (thread-safe).

        Each is a dict with ``type``: ``"series_start"`` (with ``geometry``, a
        Geometry object, and the series fields), ``"series_end"`` (with the
        series' counts; ``delivered`` is final), ``"drop"`` (``series_id``,
        ``image_id``, ``reason``) or ``"stream_error"`` (``kind``, ``error``,
        ``series_id`` where known). ``series_start`` and ``series_end`` come
        in stream order relative to the frames yielded.
        """
        with self._lock:
            ev, self._events = self._events, []
        return ev

    def prepare(self) -> None:
        """Start the receiver thread (once; called by the first iteration).

        The socket connects when the source is opened, but nothing is read
        before frames are wanted: until then images wait in ZeroMQ's bounded
        buffers and, beyond them, on the detector side, as for any client
        that is not reading yet (e.g. still warming up its kernels).
        """
        self._check_open()
        self._interrupted = False
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._receive, name="edge-stream-receiver", daemon=True)
        self._thread.start()

    def interrupt(self) -> None:
        """End the current iteration at its next wait (thread-safe); the socket stays connected."""
        self._interrupted = True

    def close(self) -> None:
        if self._closed:
            return
        super().close()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)  # it closes the sockets
        else:
            self._close_sockets()

    def _close_sockets(self) -> None:
        self._sock.disable_monitor()
        self._monitor.close(0)
        self._sock.close(0)

    # ------------------------------------------------------------------ receiver thread
    def _receive(self) -> None:
        zmq = self._zmq
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                ready = dict(poller.poll(100))
                if self._monitor in ready:
                    self._on_monitor()
                if self._sock in ready:
                    for _ in range(1000):  # drain what is there, then look at the stop flag again
                        try:
                            frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._last_msg = time.monotonic()
                        self._handle(frames)
        except Exception as exc:  # never die silently: the consumer sees it as an event and a log line
            log.exception("stream receiver stopped: %s", exc)
            self._event({"type": "stream_error", "kind": "receiver", "error": f"{type(exc).__name__}: {exc}"})
        finally:
            self._close_sockets()

    def _on_monitor(self) -> None:
        from zmq.utils.monitor import recv_monitor_message

        zmq = self._zmq
        while True:
            try:
                ev = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if ev["event"] == zmq.EVENT_CONNECTED:
                with self._lock:
                    self._totals["connects"] += 1
                    n = self._totals["connects"]
                log.info("connected to %s%s", self.endpoint, " (reconnected)" if n > 1 else "")
                self._event({"type": "stream_connected", "endpoint": self.endpoint, "reconnect": n > 1})
            elif ev["event"] == zmq.EVENT_DISCONNECTED:
                with self._lock:
                    self._totals["disconnects"] += 1
                # between series a detector may well go away; mid-series it is worth a warning
                (log.warning if self._current is not None else log.info)(
                    "detector at %s disconnected; reconnecting automatically", self.endpoint)
                self._event({"type": "stream_disconnected", "endpoint": self.endpoint})

    def _event(self, ev: dict) -> None:
        with self._lock:
            self._events.append(ev)

    def _error(self, kind: str, message: str, series: SeriesStats | None, **extra: Any) -> None:
        sid = None if series is None else series.series_id
        with self._lock:
            self._totals["errors"] += 1
            if series is not None:
                series.errors[kind] += 1
            self._events.append({"type": "stream_error", "kind": kind, "series_id": sid, "error": message, **extra})
            first = (kind, sid) not in self._warned
            self._warned.add((kind, sid))
        if first:  # one clear line per kind and series; the counts are in the results
            log.warning("stream %s: series %s: %s (skipped; further %r errors of this series are counted "
                        "silently)", self.endpoint, sid, message, kind)

    def _handle(self, frames: list) -> None:
        from ..stream.cbor import MessageError, decode_message
        from ..stream.legacy import decode_legacy, is_legacy

        nbytes = sum(len(f.buffer) for f in frames)
        with self._lock:
            self._totals["messages"] += 1
            self._totals["bytes"] += nbytes
        cur = self._current.stats if self._current is not None else None
        try:
            if is_legacy(frames[0].buffer):  # Stream V1 (format: legacy): JSON header parts
                msg = decode_legacy([f.buffer for f in frames])
            elif len(frames) != 1:
                raise MessageError(f"{len(frames)}-part ZeroMQ message that is neither Stream V2 (one CBOR "
                                   f"message) nor Stream V1 (JSON parts)", "multipart")
            else:
                msg = decode_message(frames[0].buffer)
        except MessageError as exc:
            self._error(exc.kind, str(exc), cur)
            return
        mtype = msg["type"]
        if mtype == "start":
            self._on_start(msg)
        elif mtype == "image":
            self._on_image(msg)
        else:
            self._on_end(msg)

    # -- start ------------------------------------------------------------------
    def _on_start(self, msg: dict) -> None:
        stats = SeriesStats(msg.get("series_id"), msg.get("series_unique_id"))
        noi = msg.get("number_of_images")
        stats.number_of_images = noi if isinstance(noi, int) and not isinstance(noi, bool) else None
        if self._current is not None:  # a new arm without an end: the detector side restarted
            self._close_series(incomplete=True)
        series = _Series(stats)
        try:
            self._series_from_start(series, msg)
        except _Refused as exc:
            stats.refused = str(exc)
            with self._lock:
                self._series_log.append(stats)
            self._error(exc.kind, f"start message refused: {exc}", stats)
            self._current = series  # its images are counted against it, not processed
            return
        with self._lock:
            self._series_log.append(stats)
            self._totals["series"] += 1
        self._current = series
        log.info("series %s (%s) started: %d x %d pixels, channel %r%s", stats.series_id, stats.series_unique_id,
                 series.shape[1], series.shape[0], series.channel,
                 f"; defaults used for {', '.join(series.defaults_used)}" if series.defaults_used else "")
        self._queue.put(("start", series), image=False)

    def _series_from_start(self, series: _Series, msg: dict) -> None:
        from ..stream.cbor import MessageError

        invalid = []

        def number(key: str, *, positive: bool = True) -> float | None:
            # an unusable geometry value (e.g. a wavelength of 0 on an unconfigured DCU) is treated as
            # missing: the fallback is used and logged, and the images still flow
            v = msg.get(key)
            if v is None:
                return None
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or (positive and v <= 0):
                invalid.append(f"{key}={v!r:.20}")
                return None
            return float(v)

        nx, ny = msg.get("image_size_x"), msg.get("image_size_y")
        for key, v in (("image_size_x", nx), ("image_size_y", ny)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise _Refused(f"{key} must be a positive integer, got {v!r:.40}", "field")
        if nx * ny > self.max_pixels:
            raise _Refused(f"image size {nx} x {ny} = {nx * ny} pixels exceeds the limit of {self.max_pixels} "
                           f"(max_pixels)", "size")
        series.shape = (ny, nx)
        # image_dtype is informative: each image's typed-array tag says what its pixels are
        channels = msg.get("channels")
        if channels is not None and (not isinstance(channels, (list, tuple)) or not channels
                                     or not all(isinstance(c, str) for c in channels)):
            raise _Refused(f"channels must be a non-empty array of names, got {channels!r:.60}", "field")
        if self.channel is not None:
            if channels is not None and self.channel not in channels:
                raise _Refused(f"channel {self.channel!r} is not in this series' channels {list(channels)}",
                               "channel")
            series.channel = self.channel
        else:
            series.channel = channels[0] if channels else None
        fb = self.fallback
        used = []
        px = number("pixel_size_x")
        py = number("pixel_size_y")
        if px is not None and py is not None and not math.isclose(px, py, rel_tol=1e-6):
            log.warning("series %s: non-square pixels (%g x %g m): using the x size", series.stats.series_id, px, py)
        px = px if px is not None else py
        if px is None:
            px_mm = fb.pixel_size_mm if fb is not None else _DEFAULTS["pixel_size_mm"]
            used.append("pixel_size")
        else:
            px_mm = px * 1e3
        dist = number("detector_distance")
        if dist is None:
            dist_mm = fb.distance_mm if fb is not None else _DEFAULTS["detector_distance_mm"]
            used.append("detector_distance")
        else:
            dist_mm = dist * 1e3
        wl = number("incident_wavelength")
        if wl is None:
            energy = number("incident_energy")
            if energy is not None:
                wl = _HC_EV_A / energy
            else:
                wl = fb.wavelength_A if fb is not None else _DEFAULTS["wavelength_A"]
                used.append("incident_wavelength")
        bx, by = number("beam_center_x", positive=False), number("beam_center_y", positive=False)
        if bx is None or by is None:
            bx, by = fb.beam_center if fb is not None and fb.shape == series.shape else ((nx - 1) / 2, (ny - 1) / 2)
            used.append("beam_center")
        sat = number("saturation_value")
        if sat is None:
            sat = number("countrate_correction_count_cutoff")
        mask = None
        masks = msg.get("pixel_mask")
        if masks:
            key = series.channel if series.channel in masks else next(iter(masks))
            arr = masks[key]
            if tuple(arr.dims) != series.shape:
                raise _Refused(f"pixel_mask[{key!r}] dims {list(arr.dims)} differ from the image size "
                               f"[{ny}, {nx}] (rows, columns)", "dims")
            try:
                mask = arr.decode() == 0  # every set bit (gap, dead, cold, hot, noisy...) is invalid
            except MessageError as exc:
                raise _Refused(f"pixel_mask[{key!r}]: {exc}", "decode") from None
        elif fb is not None and fb.mask is not None and fb.shape == series.shape:
            mask = fb.mask
        try:
            series.geometry = Geometry(series.shape, px_mm, dist_mm, wl, (bx, by), mask=mask, saturation=sat)
        except ValueError as exc:
            raise _Refused(f"invalid geometry: {exc}", "field") from None
        for key in ("frame_time", "count_time"):  # informative only: never a reason to refuse a series
            v = msg.get(key)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
            setattr(series, key, float(v) if ok else None)
        series.defaults_used = tuple(used)
        if used:
            log.warning("series %s: start message lacks %s%s: using %s", series.stats.series_id, ", ".join(used),
                        f" (unusable: {', '.join(invalid)})" if invalid else "",
                        "the fallback geometry" if fb is not None else f"nominal values {_DEFAULTS}")

    # -- image ------------------------------------------------------------------
    def _orphan_stats(self) -> SeriesStats:
        with self._lock:
            if self._orphans is None:
                self._orphans = SeriesStats(None, "images without a start message")
            return self._orphans

    def _on_image(self, msg: dict) -> None:
        sid, image_id = msg.get("series_id"), msg.get("image_id")
        series = self._current
        if series is None and self.fallback is not None:
            # joined mid-series: process with the geometry given by the user
            series = self._current = _Series(SeriesStats(sid, msg.get("series_unique_id")), self.fallback,
                                             self.fallback.shape, self.channel)
            with self._lock:
                self._series_log.append(series.stats)
            log.warning("images of series %s arrive without a start message: using the fallback geometry", sid)
            self._queue.put(("start", series), image=False)
        if series is None:
            stats = self._orphan_stats()
            with self._lock:
                stats.received += 1
                self._totals["images"] += 1
            self._error("no_start", f"image {image_id} of series {sid} arrived before any start message "
                        f"(joined mid-series?); skipped until the next start", stats, image_id=image_id)
            return
        stats = series.stats
        with self._lock:
            stats.received += 1
            self._totals["images"] += 1
        if stats.refused is not None:
            self._error("refused_series", f"image {image_id}: its series' start was refused ({stats.refused})",
                        stats, image_id=image_id)
            return
        if sid != stats.series_id:
            self._error("series", f"image {image_id} has series_id {sid!r}, the open series is "
                        f"{stats.series_id!r}", stats, image_id=image_id)
            return
        if isinstance(image_id, bool) or not isinstance(image_id, int):
            self._error("field", f"image_id must be an unsigned integer, got {image_id!r:.40}", stats)
            return
        data = msg["data"]
        ch = series.channel if series.channel is not None else next(iter(data), None)
        arr = data.get(ch)
        if arr is None:
            self._error("channel", f"image {image_id} has no channel {ch!r} (has {sorted(data)})", stats,
                        image_id=image_id)
            return
        if tuple(arr.dims) != series.shape:
            self._error("dims", f"image {image_id} dims {list(arr.dims)} differ from the series' "
                        f"[{series.shape[0]}, {series.shape[1]}] (rows, columns)", stats, image_id=image_id)
            return
        if arr.dtype.kind + str(arr.dtype.itemsize) not in _IMAGE_DTYPES:
            self._error("array", f"image {image_id}: unsupported pixel type {arr.dtype}", stats,
                        image_id=image_id)
            return
        info = {"series_id": sid, "series_unique_id": stats.series_unique_id, "image_id": image_id,
                "channel": ch}
        for key in ("real_time", "start_time", "stop_time"):
            v = msg.get(key)
            if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, int) for x in v) and v[1]:
                info[f"{key}_s"] = v[0] / v[1]
        nbytes = len(arr.data)
        for dropped in self._queue.put(("image", series, arr, info, time.perf_counter(), nbytes), image=True,
                                       nbytes=nbytes):
            dstats = dropped[1].stats
            with self._lock:
                dstats.dropped += 1
                self._totals["dropped"] += 1
                first = dstats.dropped == 1
                self._events.append({"type": "drop", "series_id": dstats.series_id, "image_id": dropped[3]["image_id"],
                                     "reason": "receiver queue full: oldest image dropped (processing behind)"})
            if first:
                log.warning("stream %s: series %s: processing is behind the detector: dropping the oldest "
                            "images (counted per series)", self.endpoint, dstats.series_id)

    # -- end --------------------------------------------------------------------
    def _on_end(self, msg: dict) -> None:
        series = self._current
        sid = msg.get("series_id")
        if series is None:
            self._error("no_start", f"end of series {sid} without its start message", None)
            return
        if sid != series.stats.series_id:
            self._error("series", f"end message has series_id {sid!r}, the open series is "
                        f"{series.stats.series_id!r}", series.stats)
            return
        self._close_series(incomplete=False)

    def _close_series(self, *, incomplete: bool) -> None:
        series = self._current
        self._current = None
        if series is None:
            return
        if series.stats.refused is not None:
            return  # never started for the consumer: nothing to close there
        with self._lock:
            series.stats.incomplete = incomplete
        if incomplete:
            log.warning("series %s ended without an end message (new start: detector side restarted?)",
                        series.stats.series_id)
        if series.stats.missing:
            log.warning("series %s: %d of the %d images announced never arrived (not sent, dropped by the "
                        "sender, or lost with the connection)", series.stats.series_id, series.stats.missing,
                        series.stats.number_of_images)
        self._queue.put(("end", series), image=False)

    # ------------------------------------------------------------------ consumer side
    def __iter__(self) -> Iterator[tuple[np.ndarray, FrameMeta]]:
        from ..stream.cbor import MessageError

        self.prepare()
        k = 0
        ended = 0
        while self._cap is None or k < self._cap:
            if self._closed or self._interrupted:
                return
            item = self._queue.get(timeout=0.1)
            if item is None:
                if self._stop.is_set():
                    return
                if self.idle_timeout is not None and time.monotonic() - self._last_msg > self.idle_timeout:
                    log.info("stream %s: no message for %.1f s: stopping", self.endpoint, self.idle_timeout)
                    return
                continue
            kind, series = item[0], item[1]
            if kind == "start":
                self.geometry = series.geometry
                self.frame_time = series.frame_time
                self._event({"type": "series_start", "geometry": series.geometry,
                             **{k_: v for k_, v in series.stats.to_dict().items()
                                if k_ in ("series_id", "series_unique_id", "number_of_images")},
                             "channel": series.channel, "shape": list(series.shape),
                             "defaults_used": list(series.defaults_used)})
                continue
            if kind == "end":
                with self._lock:
                    series.stats.ended = True
                    rec = series.stats.to_dict()
                self._event({"type": "series_end", **rec})
                ended += 1
                if self.max_series is not None and ended >= self.max_series:
                    return
                continue
            _, series, arr, info, t_in, _ = item
            try:
                frame = arr.decode()
            except MessageError as exc:
                self._error(exc.kind, f"image {info['image_id']}: {exc}", series.stats, image_id=info["image_id"])
                continue
            with self._lock:
                series.stats.delivered += 1
                self.stats["emitted"] += 1
            yield frame, FrameMeta(k, t_in, series.geometry, self.name, frozenset(), info)
            k += 1

    def __repr__(self) -> str:
        return f"<StreamSource {self.endpoint!r} channel={self.channel!r} n_frames={self._cap}>"


class _Refused(Exception):
    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind
