"""``edge serve``: replay any frame source as a DECTRIS Stream V2 detector (ZeroMQ PUSH server).

A detector simulator that speaks the real protocol, for tests, demos and
dry runs of a beamline setup: it binds a PUSH socket (port 31001 like a
DCU), and for each series sends a ``start`` message (geometry, optional
pixel mask), one ``image`` message per frame of the source, paced at a
rate, then ``end``. Messages are built from the Stream V2 specification
(:mod:`.cbor`, :mod:`.codec`): self-described CBOR maps, tag-40 arrays over
RFC 8746 typed arrays, ``bslz4`` / ``lz4`` compression in tag 56500.

Like a detector, the sender never waits long for a client: an image that
cannot be handed to ZeroMQ within ``send_timeout`` (no client, or clients
that stopped reading) is counted as unsent and the series goes on.
"""

from __future__ import annotations

import datetime as _dt
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..geometry import Geometry
from .cbor import encode_message, multidim

__all__ = ["SenderStats", "serve", "to_detector_dtype", "start_message", "image_message", "end_message",
           "CHANNEL"]

#: Channel (threshold) name of the single channel the sender streams.
CHANNEL = "threshold_1"
_TIME_BASE = 1_000_000_000  # rational denominators: nanoseconds
_HC_EV_A = 12398.419843320026


@dataclass
class SenderStats:
    """What :func:`serve` sent: per series images sent and unsent (timed out)."""

    series: list = field(default_factory=list)
    sent: int = 0
    unsent: int = 0
    bytes: int = 0

    def to_dict(self) -> dict:
        return {"series": self.series, "sent": self.sent, "unsent": self.unsent, "bytes": self.bytes}


def to_detector_dtype(frame: np.ndarray, dtype="uint32") -> np.ndarray:
    """Frame as a detector sends it: unsigned counts, invalid pixels at the dtype maximum.

    Negative markers (gaps, bad pixels) and NaN become the maximum (the
    EIGER convention); counts are clipped to ``max - 1``.
    """
    dt = np.dtype(dtype)
    if frame.dtype == dt:
        return frame
    hi = np.iinfo(dt).max
    f = np.asarray(frame)
    invalid = np.isnan(f) if f.dtype.kind == "f" else (f < 0 if f.dtype.kind == "i" else None)
    out = np.clip(np.nan_to_num(f, nan=0.0) if f.dtype.kind == "f" else f, 0, hi - 1).astype(dt)
    if invalid is not None:
        out[invalid] = hi
    return out


def start_message(geometry: Geometry, *, series_id: int, series_unique_id: str, dtype="uint32",
                  number_of_images: int | None = None, frame_time: float | None = None,
                  count_time: float | None = None, pixel_mask: bool = True, compression: str | None = "bslz4",
                  user_data: Any = None) -> dict:
    """The ``start`` message of a series on ``geometry`` (SI units as the specification says)."""
    ny, nx = geometry.shape
    energy = _HC_EV_A / geometry.wavelength_A
    msg: dict[str, Any] = {
        "type": "start",
        "series_id": int(series_id),
        "series_unique_id": series_unique_id,
        "arm_date": _dt.datetime.now(_dt.timezone.utc),
        "beam_center_x": float(geometry.beam_center[0]),
        "beam_center_y": float(geometry.beam_center[1]),
        "channels": [CHANNEL],
        "count_time": float(count_time if count_time is not None else frame_time or 0.0),
        "countrate_correction_enabled": False,
        "detector_description": "xray-edge stream simulator (edge serve)",
        "detector_distance": geometry.distance_mm * 1e-3,
        "frame_time": float(frame_time or 0.0),
        "goniometer": {},
        "image_dtype": np.dtype(dtype).name,
        "image_size_x": int(nx),
        "image_size_y": int(ny),
        "incident_energy": energy,
        "incident_wavelength": geometry.wavelength_A,
        "number_of_images": int(number_of_images or 0),
        "pixel_mask_enabled": bool(pixel_mask),
        "pixel_size_x": geometry.pixel_size_mm * 1e-3,
        "pixel_size_y": geometry.pixel_size_mm * 1e-3,
        "threshold_energy": {CHANNEL: energy / 2},
        "user_data": user_data,
    }
    if geometry.saturation is not None:
        msg["saturation_value"] = int(geometry.saturation)
        msg["countrate_correction_count_cutoff"] = int(geometry.saturation)
    if pixel_mask:
        # bit 0 (gap) on every invalid pixel of the static mask
        msg["pixel_mask"] = {CHANNEL: multidim((~geometry.valid).astype(np.uint32), compression)}
    return msg


def image_message(frame_tag, *, series_id: int, series_unique_id: str, image_id: int, start_s: float,
                  exposure_s: float, user_data: Any = None) -> dict:
    """An ``image`` message around an already encoded tag-40 array (see :func:`.cbor.multidim`)."""
    t0 = int(round(start_s * _TIME_BASE))
    dt = int(round(exposure_s * _TIME_BASE))
    return {"type": "image", "series_id": int(series_id), "series_unique_id": series_unique_id,
            "image_id": int(image_id), "real_time": [dt, _TIME_BASE], "start_time": [t0, _TIME_BASE],
            "stop_time": [t0 + dt, _TIME_BASE], "data": {CHANNEL: frame_tag}, "user_data": user_data}


def end_message(*, series_id: int, series_unique_id: str) -> dict:
    return {"type": "end", "series_id": int(series_id), "series_unique_id": series_unique_id}


class _Sender:
    def __init__(self, endpoint: str, *, send_timeout: float, sndhwm: int) -> None:
        import zmq

        self.zmq = zmq
        self.ctx = zmq.Context()  # private: close() waits for its queued messages
        self.sock = self.ctx.socket(zmq.PUSH)
        self.sock.setsockopt(zmq.SNDHWM, int(sndhwm))
        self.sock.setsockopt(zmq.LINGER, 10_000)  # let queued messages (the end!) reach a reading client
        self.sock.bind(endpoint)
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLOUT)
        self.send_timeout = send_timeout

    def send(self, buf: bytes, timeout: float) -> bool:
        """Hand ``buf`` to ZeroMQ within ``timeout`` seconds; False if it would block longer."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                # copied: zero-copy would leave ZeroMQ's I/O thread reading Python memory that
                # may be freed before the lingering socket has sent it
                self.sock.send(buf, self.zmq.NOBLOCK, copy=True)
                return True
            except self.zmq.Again:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.poller.poll(max(1, int(min(left, 0.1) * 1000)))

    def close(self) -> None:
        self.sock.close()  # lingers up to 10 s for a reading client to take what is queued (the end)
        self.ctx.term()


def serve(source, *, endpoint: str = "tcp://127.0.0.1:31001", compression: str | None = "bslz4",
          pixel_mask: bool = True, dtype="uint32", n_series: int = 1, series_id: int = 1,
          send_timeout: float = 1.0, wait_client: float = 60.0, sndhwm: int = 8,
          log: Callable[[str], None] | None = None) -> SenderStats:
    """Stream ``source`` as Stream V2 series on a PUSH socket bound to ``endpoint``.

    Parameters
    ----------
    source : FrameSource
        Any :mod:`edge.sources` source; its pacing (``rate_hz``) sets the image rate.
    endpoint : str
        ZeroMQ endpoint to bind, e.g. ``"tcp://127.0.0.1:31001"`` or ``"tcp://*:31001"``.
    compression : {"bslz4", "lz4", None}
        Image (and mask) compression.
    pixel_mask : bool
        Send the geometry's mask as ``pixel_mask`` in ``start`` (as with
        ``header_detail = all`` on a DCU).
    dtype : {"uint8", "uint16", "uint32"}
        Pixel type sent (:func:`to_detector_dtype`).
    n_series : int
        Series to send, each a full pass over ``source``.
    series_id : int
        ``series_id`` of the first series (then +1 per series).
    send_timeout : float
        Seconds an image may wait for ZeroMQ before it is counted unsent.
    wait_client : float
        Seconds the ``start`` message waits for a client to connect.
    sndhwm : int
        ZeroMQ send high-water mark (images queued for a slow client).
    log : callable, optional
        Receives one progress line per series.

    Returns
    -------
    SenderStats

    Raises
    ------
    TimeoutError
        No client took the ``start`` message within ``wait_client``.
    """
    say = log or (lambda s: print(s, file=sys.stderr))
    dt = np.dtype(dtype)
    if dt.name not in ("uint8", "uint16", "uint32"):
        raise ValueError(f"dtype must be uint8, uint16 or uint32, got {dtype!r}")
    tx = _Sender(endpoint, send_timeout=send_timeout, sndhwm=sndhwm)
    stats = SenderStats()
    cache: dict[int, tuple[np.ndarray, Any]] = {}  # pooled frames repeat: encode each once
    try:
        for s in range(n_series):
            sid = series_id + s
            uid = uuid.uuid4().hex
            geom = source.geometry
            ft = source.frame_time or (1.0 / source.rate_hz if source.rate_hz else None)
            start = start_message(geom, series_id=sid, series_unique_id=uid, dtype=dt,
                                  number_of_images=source.n_frames, frame_time=ft, pixel_mask=pixel_mask,
                                  compression=compression, user_data={"source": source.name})
            if not tx.send(encode_message(start), wait_client):
                raise TimeoutError(f"no client took the start message within {wait_client} s")
            rec = {"series_id": sid, "series_unique_id": uid, "sent": 0, "unsent": [], "t0": time.time()}
            stats.series.append(rec)
            for k, (frame, meta) in enumerate(source):
                key = id(frame)
                hit = cache.get(key)
                if hit is None or hit[0] is not frame:
                    tag = multidim(to_detector_dtype(frame, dt), compression)
                    if len(cache) > 256:
                        cache.clear()
                    cache[key] = (frame, tag)
                else:
                    tag = hit[1]
                buf = encode_message(image_message(tag, series_id=sid, series_unique_id=uid, image_id=k,
                                                   start_s=k * (ft or 0.0), exposure_s=ft or 0.0))
                if tx.send(buf, send_timeout):
                    rec["sent"] += 1
                    stats.sent += 1
                    stats.bytes += len(buf)
                else:
                    rec["unsent"].append(k)
                    stats.unsent += 1
            if not tx.send(encode_message(end_message(series_id=sid, series_unique_id=uid)), wait_client):
                say(f"edge serve: series {sid}: no client took the end message within {wait_client} s")
            say(f"edge serve: series {sid}: sent {rec['sent']} images, unsent {len(rec['unsent'])}"
                + (f" (image_ids {rec['unsent'][:10]}{'...' if len(rec['unsent']) > 10 else ''}: no client "
                   f"reading within {send_timeout} s)" if rec["unsent"] else ""))
    finally:
        tx.close()
    return stats
