"""The frame-source interface: :class:`FrameSource`, :class:`FrameMeta`, :class:`SourceError`.

Pacing (``rate_hz``): frame ``k`` is due at ``t0 + k / rate_hz``; the source
sleeps until then, emits and stamps ``meta.t_source``. A consumer that is late
by less than one period gets the next frame at once (the schedule keeps its
average rate). One that is late by more than a period makes the source
re-anchor the schedule at the current time: frames are never emitted
back-to-back to catch up, the rate simply drops, and ``source.stats``
counts the ``late`` frames and ``reanchors``.

Frames are read (or simulated) *before* waiting for their slot, so reading
does not delay emission when it is faster than the rate. Frames from the
simulator pool and from ``preload=True`` are shared between emissions: treat
them as read-only (``copy=True`` gives each emission its own array).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from ..geometry import Geometry

__all__ = ["FrameMeta", "FrameSource", "SourceError", "FrameError", "MAX_FRAME_BYTES", "MIN_RATE_HZ", "MAX_RATE_HZ",
           "check_frame_size"]

#: Default bound on one decoded frame (bytes): sizes declared in file headers
#: are checked against it before anything is allocated. A 16M EIGER frame of
#: uint32 is 73 MB; a damaged or hostile header can declare terabytes.
MAX_FRAME_BYTES = 1 << 28  # 256 MiB
#: Paced sources emit between one frame in 1000 s and a million frames per second.
MIN_RATE_HZ, MAX_RATE_HZ = 1e-3, 1e6


class SourceError(ValueError):
    """A frame source cannot be opened or a frame cannot be read.

    Attributes
    ----------
    path : str or None
        The file concerned.
    frame : int or None
        Frame number in the source (or in the file, as the message says).
    """

    def __init__(self, message: str, *, path: str | os.PathLike | None = None, frame: int | None = None):
        super().__init__(message)
        self.path = None if path is None else os.fspath(path)
        self.frame = frame


class FrameError(SourceError):
    """One frame cannot be read (damaged or vanished file, bad chunk, other shape)
    but the source can go on with the next one.

    Iterating a source raises it; :meth:`FrameSource.frames` with ``on_error``
    reports it and continues instead (what :class:`edge.pipeline.Pipeline` does).
    """


def check_frame_size(shape, itemsize: int, max_frame_bytes: int, *, where: str, path=None,
                     frame: int | None = None) -> None:
    """Refuse a declared frame shape before allocating it.

    Raises
    ------
    SourceError
        A dimension is not a positive integer, or the frame would exceed
        ``max_frame_bytes``.
    """
    dims = tuple(shape)
    if not dims or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 1 for d in dims):
        raise SourceError(f"{where}: invalid frame dimensions {dims} (each must be an integer >= 1)",
                          path=path, frame=frame)
    nbytes = int(np.prod([int(d) for d in dims], dtype=object)) * int(itemsize)
    if nbytes > max_frame_bytes:
        raise SourceError(f"{where}: a frame of {' x '.join(str(int(d)) for d in dims)} pixels x {itemsize} bytes "
                          f"= {nbytes / 2**20:.0f} MiB exceeds max_frame_bytes = {max_frame_bytes / 2**20:.0f} MiB "
                          f"(refused before allocating; raise max_frame_bytes if the detector really is that big)",
                          path=path, frame=frame)


@dataclass
class FrameMeta:
    """What a source knows about one emitted frame.

    Attributes
    ----------
    index : int
        Frame number in the source (counts on across ``loop`` passes).
    t_source : float
        ``time.perf_counter()`` (s) when the frame was emitted: frame-in time
        for latency measurements.
    geometry : Geometry
        Detector geometry (the same object for every frame of a source).
    source : str
        Source description, e.g. ``"sim:1m"``, ``"scenario:default:1m"`` or a path.
    truth : frozenset of str
        Scenario ground truth: anomaly labels active at this frame (sim only).
    info : dict
        Extras, e.g. ``phase``, ``beam_offset_px`` (true beam minus geometry
        centre, px), ``fault_regions``, ``path``, ``frame_in_file``,
        ``exposure_s``, ``frame_time_s``.
    """

    index: int
    t_source: float
    geometry: Geometry
    source: str
    truth: frozenset[str] = frozenset()
    info: dict = field(default_factory=dict)


class FrameSource:
    """Base class: pacing, frame count, looping and the iteration protocol.

    Subclasses set :attr:`geometry`, :attr:`frame_time`, :attr:`name` (and
    :attr:`dtype` when known) and
    implement :meth:`_length` (frames in one pass, None = endless) and
    :meth:`_read` (random access to frame ``k`` of a pass).

    Parameters
    ----------
    rate_hz : float, optional
        Emit at this rate (Hz); None = as fast as the consumer takes frames.
    n_frames : int, optional
        Stop after this many frames (None = the whole source, or forever
        when ``loop`` is set or the source is endless).
    loop : bool
        Replay a finite source from the start when it ends.
    preload : bool
        Read every frame into memory before the first one is emitted.
    copy : bool
        Emit a fresh copy of each frame (the consumer may then modify it).
    max_frame_bytes : int
        Refuse frames whose header declares more bytes than this
        (:data:`MAX_FRAME_BYTES` = 256 MiB by default), before allocating.
    """

    geometry: Geometry
    frame_time: float | None = None
    name: str = "source"
    #: dtype of the frames when known before the first one (None: unknown);
    #: the start-up compiles the kernels for this dtype only.
    dtype: np.dtype | None = None

    def __init__(self, *, rate_hz: float | None = None, n_frames: int | None = None, loop: bool = False,
                 preload: bool = False, copy: bool = False, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        if rate_hz is not None:
            if isinstance(rate_hz, bool) or not isinstance(rate_hz, (int, float)) \
                    or not MIN_RATE_HZ <= rate_hz <= MAX_RATE_HZ:
                raise SourceError(f"rate_hz must be a number of frames per second in [{MIN_RATE_HZ:g}, "
                                  f"{MAX_RATE_HZ:g}], None or 'file', got {rate_hz!r}")
            rate_hz = float(rate_hz)
        if n_frames is not None and (isinstance(n_frames, bool) or not isinstance(n_frames, int) or n_frames < 0):
            raise SourceError(f"n_frames must be a non-negative integer or None, got {n_frames!r}")
        if isinstance(max_frame_bytes, bool) or not isinstance(max_frame_bytes, int) or max_frame_bytes < 1:
            raise SourceError(f"max_frame_bytes must be a positive integer, got {max_frame_bytes!r}")
        self.max_frame_bytes = max_frame_bytes
        self.rate_hz = rate_hz
        self._cap = n_frames
        self.loop = bool(loop)
        self.preload = bool(preload)
        self.copy = bool(copy)
        self._preloaded: list | None = None
        self._closed = False
        #: Pacing counters of the last iteration: frames emitted late, schedule re-anchors.
        self.stats = {"emitted": 0, "late": 0, "reanchors": 0, "bad": 0}

    # -- to implement ------------------------------------------------------------
    def _length(self) -> int | None:
        raise NotImplementedError

    def _read(self, k: int) -> tuple[np.ndarray, dict, frozenset]:
        """Frame ``k`` of one pass: ``(frame, info, truth)``; raise SourceError on failure."""
        raise NotImplementedError

    # -- public ------------------------------------------------------------------
    @property
    def n_frames(self) -> int | None:
        """Frames one iteration emits (None = endless)."""
        length = self._length()
        if length is None or (self.loop and length > 0):
            return self._cap
        return length if self._cap is None else min(self._cap, length)

    def prepare(self) -> None:
        """Do the slow start-up work now (pool simulation, preloading).

        Called automatically before the first frame; call it yourself to
        keep it out of a measured run.
        """
        self._check_open()
        if self.preload and self._preloaded is None:
            length = self._length()
            if length is None:
                length = self._cap
                if length is None:
                    raise SourceError(f"{self.name}: preload=True needs a finite source (set n_frames)")
            elif self._cap is not None and not self.loop:
                length = min(length, self._cap)
            self._preloaded = [self._read(k) for k in range(length)]

    def __iter__(self) -> Iterator[tuple[np.ndarray, FrameMeta]]:
        return self.frames()

    def frames(self, on_error: Callable[[FrameError], None] | None = None
               ) -> Iterator[tuple[np.ndarray, FrameMeta]]:
        """Iterate ``(frame, meta)``; ``iter(source)`` is ``source.frames()``.

        Parameters
        ----------
        on_error : callable, optional
            Called with each :class:`FrameError` (a frame that cannot be read;
            ``exc.frame`` is its index, ``exc.path`` its file); iteration then
            goes on with the next frame, whose index stays what it would have
            been. None: the error is raised and iteration ends.
        """
        if type(self).__iter__ is not FrameSource.__iter__:
            # a source with its own iteration (a live stream) reports its own bad frames
            return iter(self)
        return self._frames(on_error)

    def _frames(self, on_error: Callable[[FrameError], None] | None) -> Iterator[tuple[np.ndarray, FrameMeta]]:
        self.prepare()
        length = self._length()
        if length is None and self._preloaded is not None:
            length = len(self._preloaded)  # endless simulator: n_frames distinct frames were preloaded
        total = self.n_frames
        if length == 0:
            return
        period = None if self.rate_hz is None else 1.0 / self.rate_hz
        self.stats = {"emitted": 0, "late": 0, "reanchors": 0, "bad": 0}
        due = None
        k = 0
        bad_run = 0  # consecutive unreadable frames
        while total is None or k < total:
            self._check_open()
            j = k if length is None else k % length
            if self._preloaded is not None:
                frame, info, truth = self._preloaded[j]
                info = dict(info)
            else:
                try:
                    frame, info, truth = self._read(j)
                except FrameError as exc:
                    if on_error is None:
                        raise
                    exc.frame = k  # the index this frame would have had in the run
                    self.stats["bad"] += 1
                    on_error(exc)
                    bad_run += 1
                    if length is not None and self.loop and bad_run >= length:
                        raise SourceError(f"{self.name}: no readable frame in a whole pass of {length}; "
                                          f"stopping the loop") from exc
                    k += 1
                    continue
            bad_run = 0
            if self.copy:
                frame = frame.copy()
            if length is not None and self.loop:
                info["pass"] = k // length
            if period is not None:
                now = time.perf_counter()
                if due is None:
                    due = now
                elif now < due:
                    time.sleep(due - now)
                elif now - due > period:
                    # more than one period behind: drop the backlog, never burst
                    self.stats["reanchors"] += 1
                    self.stats["late"] += 1
                    due = now
                elif now > due:
                    self.stats["late"] += 1
                due += period
            t = time.perf_counter()
            self.stats["emitted"] += 1
            yield frame, FrameMeta(k, t, self.geometry, self.name, truth, info)
            k += 1

    def close(self) -> None:
        """Release files and memory; further iteration raises SourceError."""
        self._closed = True
        self._preloaded = None

    def _check_open(self) -> None:
        if self._closed:
            raise SourceError(f"{self.name}: source is closed")

    def __enter__(self) -> "FrameSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} {self.name!r} n_frames={self.n_frames} rate_hz={self.rate_hz} "
                f"frame_time={self.frame_time}>")
