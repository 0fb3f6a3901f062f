"""The real-time loop: frames in, peaks and anomaly flags, commands out.

Threads that never wait on each other:

``acquisition``
    Iterates the frame source and puts ``(frame, meta)`` into a bounded
    :class:`DropOldestQueue`. It never blocks: when processing falls behind,
    the oldest queued frame is dropped, counted and logged.
``workers`` (``edge-worker-N``, see :func:`default_workers`)
    Each takes the oldest queued frame and runs :func:`analyse_frame` on it
    (background statistics, peak finding, anomaly features and model) with
    its own ``nogil`` Numba kernels on ``threads`` threads. Whole frames in
    parallel share no barrier, so throughput grows with cores and one
    descheduled worker delays only its own frame. With one worker this is
    the thread calling :meth:`Pipeline.run` itself.
``ordered stage`` (the thread calling :meth:`Pipeline.run`)
    Takes the analysed frames back in the order they were queued, whatever
    order the workers finish in, then the measurements a firing rule needs
    and the policy. The policy therefore sees frames in order and commands
    keep their order. Commands are handed to the command thread with a
    non-blocking put; a full command queue fails the command (reported),
    never the frame.
``commands``
    Sends each command over the bridge and waits for its definite outcome
    (ack, nack or failure). A slow, silent or unplugged device only delays
    this thread.

Every frame, drop and command outcome is one JSON line in the results file,
after the ``{"type": "run"}`` header record (given by the caller: what ran,
where, with which files and model, :func:`edge.deploy.runs.run_header`) and
before a ``summary`` record written however the run ends (source exhausted, frame
limit, :meth:`Pipeline.stop` from a SIGTERM handler, an exception).
Times are ``time.perf_counter()`` seconds; latencies are reported in ms from
the frame's ``t_source`` (frame in) to the command's first write on the port
("on the wire") and to its ack.
"""

from __future__ import annotations

import gc
import json
import os
import queue
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numba
import numpy as np

from .background import RadialStats, radial_stats
from .geometry import Geometry
from .evidence import MISSING, EvidenceGate
from .measure import find_dead_regions, measure_beam_offset
from .policy import Command, MaskRegion, Observation, Policy
from .spotfinding import Peaks, find_peaks

__all__ = ["DropOldestQueue", "FrameAnalysis", "Pipeline", "RunSummary", "analyse_frame",
           "default_workers", "percentiles"]

_STOP = object()


class DropOldestQueue:
    """Bounded FIFO whose ``put`` never blocks: when full, the oldest item goes.

    Parameters
    ----------
    maxsize : int
        Capacity (>= 1).
    on_drop : callable, optional
        Called with each dropped item (outside the lock).
    """

    def __init__(self, maxsize: int, on_drop: Callable[[Any], None] | None = None) -> None:
        if maxsize < 1:
            raise ValueError(f"queue size must be >= 1, got {maxsize}")
        self._items: deque = deque()
        self._maxsize = maxsize
        self._cv = threading.Condition()
        self._closed = False
        self._on_drop = on_drop
        self.dropped = 0
        self.high_water = 0

    def put(self, item: Any, *, block: bool = False) -> bool:
        """Append ``item``; returns True if an older item had to be dropped.

        With ``block`` (replay as fast as processing goes), wait for room
        instead of dropping.
        """
        dropped = None
        with self._cv:
            if block:
                self._cv.wait_for(lambda: len(self._items) < self._maxsize or self._closed)
            if len(self._items) >= self._maxsize:
                dropped = self._items.popleft()
                self.dropped += 1
            self._items.append(item)
            self.high_water = max(self.high_water, len(self._items))
            self._cv.notify()
        if dropped is not None and self._on_drop is not None:
            self._on_drop(dropped)
        return dropped is not None

    def get(self, timeout: float | None = None) -> Any:
        """Oldest item; ``_STOP`` once closed and drained; None on timeout."""
        with self._cv:
            if not self._cv.wait_for(lambda: self._items or self._closed, timeout):
                return None
            if self._items:
                item = self._items.popleft()
                self._cv.notify_all()  # room for a blocked put
                return item
            return _STOP

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    def __len__(self) -> int:
        with self._cv:
            return len(self._items)


def percentiles(values, qs=(50, 95, 99)) -> dict[str, float | None]:
    """``{"p50": ..., "p95": ..., "p99": ..., "max": ..., "n": ...}`` of a sequence (None if empty)."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    out: dict[str, float | None] = {f"p{q}": (float(np.percentile(v, q)) if v.size else None) for q in qs}
    out["max"] = float(v.max()) if v.size else None
    out["n"] = int(v.size)
    return out


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, else ``os.cpu_count()``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


#: Most frame workers by default: each holds a frame in flight, and the GIL
#: (Python glue between kernels) becomes the limit well before 8.
MAX_DEFAULT_WORKERS = 8


def default_workers(cores: int | None = None) -> tuple[int, int]:
    """Default ``(workers, threads)``: frame workers and Numba threads per worker.

    One single-threaded worker per core, up to :data:`MAX_DEFAULT_WORKERS`;
    beyond that the cores are shared out as threads inside each worker's
    kernels (1 core: 1 x 1; 2: 2 x 1; 8: 8 x 1; 16: 8 x 2).

    Why: whole frames in parallel share no barrier. Beside other busy
    processes each worker gets its fair share of the CPU like any busy
    thread, and a descheduled worker delays only its own frame, where a
    team of threads on one frame waits for its slowest member at every
    kernel (issue 12: a spinning 2-thread team lost 2.8x beside one busy
    loop on 2 cores and 13x beside two). Throughput also grows with the
    number of workers instead of being capped by the serial parts of a frame
    (labelling, measuring, the Python between kernels). ``--workers 1
    --threads N`` gives the lowest single-frame latency on an idle board;
    ``edge bench --contention K`` measures both side by side.

    Parameters
    ----------
    cores : int, optional
        Cores to plan for; default :func:`usable_cores`.
    """
    cores = usable_cores() if cores is None else max(1, int(cores))
    workers = min(cores, MAX_DEFAULT_WORKERS)
    return workers, max(1, cores // workers)


@dataclass
class FrameAnalysis:
    """What :func:`analyse_frame` found in one frame.

    Attributes
    ----------
    stats : RadialStats
        Clipped per-ring background statistics.
    peaks : Peaks
        Bragg peaks.
    features : ndarray or None
        Anomaly-model features (None without a model).
    probabilities : dict
        Class name -> model probability (empty without a model).
    flags : tuple of str
        Anomaly flags raised by the model.
    stages_ms : dict
        Wall time (ms) of ``background``, ``peaks``, ``features``, ``inference``.
    """

    stats: RadialStats
    peaks: Peaks
    features: np.ndarray | None
    probabilities: dict
    flags: tuple
    stages_ms: dict


def analyse_frame(frame: np.ndarray, geometry: Geometry, *, model=None,
                  peak_params: dict | None = None) -> FrameAnalysis:
    """Frame -> background statistics, peaks, anomaly features and flags.

    The one analysis path: the pipeline's workers, its priming and the
    benchmarks all call this. Thread-safe (the kernels release the GIL and
    run with the calling thread's ``numba.get_num_threads()``; the model
    serialises its interpreter).

    Parameters
    ----------
    frame : ndarray, shape (rows, columns)
        Raw frame (any dtype :func:`edge.find_peaks` takes).
    geometry : Geometry
        Detector geometry (its per-geometry tables are cached on it).
    model : AnomalyModel, optional
        Without it, no features and no flags.
    peak_params : dict, optional
        Extra keyword arguments for :func:`edge.find_peaks`.
    """
    t0 = time.perf_counter()
    stats = radial_stats(frame, geometry=geometry)
    t_bg = time.perf_counter()
    peaks = find_peaks(frame, geometry=geometry, stats=stats, **(peak_params or {}))
    t_pk = t_ft = t_inf = time.perf_counter()
    feats = None
    probs: dict[str, float] = {}
    flags: tuple[str, ...] = ()
    if model is not None:
        from .features import frame_features

        feats = frame_features(frame, geometry, stats=stats, peaks=peaks)
        t_ft = time.perf_counter()
        res = model.predict(feats)
        t_inf = time.perf_counter()
        probs, flags = res.probabilities, tuple(res.flags)
    ms = 1e3
    return FrameAnalysis(stats, peaks, feats, probs, flags,
                         {"background": (t_bg - t0) * ms, "peaks": (t_pk - t_bg) * ms,
                          "features": (t_ft - t_pk) * ms, "inference": (t_inf - t_ft) * ms})


class _InOrder:
    """Hands out results in ticket order, whatever order workers finish in.

    A worker takes a ticket with each frame (:meth:`ticket`, called in queue
    order) and always returns it with :meth:`put`, so there are no gaps.
    """

    def __init__(self, workers: int) -> None:
        self._cv = threading.Condition()
        self._done: dict[int, Any] = {}
        self._issued = 0
        self._next = 0
        self._running = workers

    def ticket(self) -> int:
        with self._cv:
            t = self._issued
            self._issued += 1
            return t

    def put(self, ticket: int, result: Any) -> None:
        with self._cv:
            self._done[ticket] = result
            self._cv.notify_all()

    def worker_done(self) -> None:
        with self._cv:
            self._running -= 1
            self._cv.notify_all()

    def get(self, timeout: float | None = None) -> Any:
        """Next result in order; None on timeout; ``_STOP`` when every worker
        has finished and every ticket was handed out."""
        with self._cv:
            ready = lambda: self._next in self._done or (self._running <= 0 and self._next >= self._issued)  # noqa: E731
            if not self._cv.wait_for(ready, timeout):
                return None
            if self._next not in self._done:
                return _STOP
            result = self._done.pop(self._next)
            self._next += 1
            return result

    def in_flight(self) -> int:
        with self._cv:
            return self._issued - self._next


@dataclass
class _Analysed:
    frame: np.ndarray
    meta: Any
    geometry: Geometry
    analysis: FrameAnalysis
    t_start: float
    t_done: float


@dataclass
class _Failed:
    meta: Any
    error: Exception


def _concurrent_kernels_safe() -> bool:
    """Whether parallel kernels may run from several threads at once.

    Numba's ``omp`` and ``tbb`` layers allow it; ``workqueue`` (the fallback
    when neither is installed) aborts the process on concurrent use, so the
    pipeline then runs one worker.
    """
    numba.get_num_threads()  # starts the threading layer
    return numba.threading_layer() in ("omp", "tbb")


@dataclass
class RunSummary:
    """Totals and latency percentiles of a run (all times in ms)."""

    frames_in: int = 0
    frames_processed: int = 0
    frames_dropped: int = 0
    commands_dropped: int = 0
    duration_s: float = 0.0
    fps: float = 0.0
    stage_ms: dict = field(default_factory=dict)
    latency_ms: dict = field(default_factory=dict)
    wire_ms: dict = field(default_factory=dict)
    ack_ms: dict = field(default_factory=dict)
    commands: dict = field(default_factory=dict)
    flags: dict = field(default_factory=dict)
    peaks: dict = field(default_factory=dict)
    errors: int = 0
    results_path: str | None = None
    series: list = field(default_factory=list)  # live stream: one record per series (edge.sources.stream)
    frames_bad: int = 0
    workers: int = 1
    threads: int = 1

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def table(self) -> str:
        """Human-readable summary (Markdown)."""
        def f(x):
            return "-" if x is None else f"{x:.2f}"

        lines = [
            f"frames in {self.frames_in}, processed {self.frames_processed}, dropped {self.frames_dropped}, "
            f"{self.fps:.1f} frames/s over {self.duration_s:.1f} s, errors {self.errors}"
            + (f" ({self.frames_bad} unreadable frames: see the results file)" if self.frames_bad else "")
            + f"; {self.workers} worker(s) x {self.threads} Numba thread(s)",
            "",
            "| stage (ms) | p50 | p95 | p99 | max |",
            "|---|---|---|---|---|",
        ]
        rows = dict(self.stage_ms)
        rows["frame in -> processed"] = self.latency_ms
        rows["frame in -> command on wire"] = self.wire_ms
        rows["frame in -> ack"] = self.ack_ms
        for name, p in rows.items():
            if p:
                lines.append(f"| {name} | {f(p.get('p50'))} | {f(p.get('p95'))} | {f(p.get('p99'))} | {f(p.get('max'))} |")
        lines += ["", "| command | outcome | count |", "|---|---|---|"]
        for key, n in sorted(self.commands.items()):
            name, _, outcome = key.partition(":")
            lines.append(f"| {name} | {outcome} | {n} |")
        if self.commands_dropped:
            lines.append(f"| (any) | dropped: command queue full | {self.commands_dropped} |")
        if self.flags:
            lines += ["", "flags raised (frames): " + ", ".join(f"{k} {v}" for k, v in sorted(self.flags.items()))]
        if self.peaks:
            lines.append(f"peaks per frame: median {self.peaks.get('median')}, max {self.peaks.get('max')}")
        for sr in self.series:
            lines.append(f"series {sr.get('series_id')}: received {sr.get('received')}, processed "
                         f"{sr.get('processed')}, dropped {sr.get('dropped')}, decode errors "
                         f"{sr.get('decode_errors')}{'' if sr.get('ended') else ' (no end message)'}"
                         + (f", never arrived {sr['missing']} of {sr.get('number_of_images')}" if sr.get("missing") else ""))
        if self.results_path:
            lines.append(f"results: {self.results_path}")
        return "\n".join(lines)


class _JsonLines:
    """Thread-safe JSON Lines writer (or a no-op without a path)."""

    def __init__(self, path: str | os.PathLike | None, tee: Callable[[dict], None] | None = None) -> None:
        self.path = None if path is None else Path(path)
        self._tee = tee
        self._fh = None
        self._lock = threading.Lock()
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "w", encoding="utf-8")

    def write(self, record: dict) -> None:
        if self._tee is not None:
            self._tee(record)
        if self._fh is None:
            return
        line = json.dumps(record, default=_json_default, separators=(",", ":"))
        with self._lock:
            self._fh.write(line + "\n")

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None


def _json_default(o: Any):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (np.ndarray, tuple, set, frozenset)):
        return list(o)
    if hasattr(o, "to_dict"):
        return o.to_dict()
    return str(o)


@dataclass
class _Pending:
    command: Command
    frame: int
    t_in: float


class Pipeline:
    """Frame source -> peaks -> anomaly model -> policy -> bridge.

    Parameters
    ----------
    source : FrameSource
        Yields ``(frame, meta)``; see :mod:`edge.sources`.
    model : AnomalyModel, optional
        The int8 anomaly classifier; None runs without flags.
    policy : Policy, optional
        Correction rules; None sends nothing.
    bridge : firmware_bridge.Bridge, optional
        Where commands go; None (or a dry-run policy) logs them only.
    results : path, optional
        JSON Lines file with one record per frame, drop and command.
    queue_size : int
        Frames buffered between acquisition and processing.
    command_queue_size : int
        Commands buffered for the bridge.
    peak_params : dict, optional
        Extra keyword arguments for :func:`edge.find_peaks`.
    on_frame : callable, optional
        Called with each frame record (dict) from the processing thread;
        keep it cheap (the CLI's status line).
    block_source : bool, optional
        Make acquisition wait for room instead of dropping. Default: wait
        for unpaced sources (file replay as fast as possible), drop for
        paced ones (a live detector cannot wait).
    measure_every : int
        Re-measure the beam offset / dead regions at most every this many
        frames while the flag persists (reuse the last value in between).
    observer : object, optional
        Watches the run without slowing it (the live web view,
        :class:`edge.web.LiveHub`): ``observer.record(rec)`` receives every
        record as it is logged (any thread) and ``observer.frame(frame, record,
        peaks, geometry)`` the processed frame; both must only store references.
    header : dict, optional
        Run description written as the first JSON line (``{"type": "run", ...}``).
    workers : int, optional
        Threads analysing whole frames in parallel; results reach the policy
        in frame order. Default from :func:`default_workers`.
    threads : int, optional
        Numba threads inside each worker's kernels (capped at
        ``NUMBA_NUM_THREADS``). Default from :func:`default_workers`.
    """

    def __init__(self, source, *, model=None, policy: Policy | None = None, bridge=None,
                 results: str | os.PathLike | None = None, queue_size: int = 4,
                 command_queue_size: int = 32, peak_params: dict | None = None,
                 on_frame: Callable[[dict], None] | None = None, block_source: bool | None = None,
                 measure_every: int = 10, observer=None, header: dict | None = None,
                 workers: int | None = None, threads: int | None = None) -> None:
        self.source = source
        w, t = default_workers()
        self.workers = w if workers is None else int(workers)
        self.threads = t if threads is None else int(threads)
        if self.workers < 1 or self.threads < 1:
            raise ValueError(f"workers and threads must be >= 1, got {self.workers} and {self.threads}")
        self.threads = min(self.threads, numba.config.NUMBA_NUM_THREADS)
        self.stop_reason: str | None = None
        self.measure_every = max(1, int(measure_every))
        self._measurements: dict[str, tuple[int, Any]] = {}
        self._gate = EvidenceGate()  # per stream: remembers recent background levels
        self._gate_geometry: Geometry | None = None  # the gate is reset when a series changes geometry
        self.block_source = (getattr(source, "rate_hz", None) is None) if block_source is None else block_source
        self.model = model
        self.policy = policy
        self.bridge = bridge
        self.peak_params = dict(peak_params or {})
        self.on_frame = on_frame
        self.observer = observer
        self._log = _JsonLines(results, tee=None if observer is None else observer.record)
        if header is not None:
            self._log.write({"type": "run", **header})
        self._frames = DropOldestQueue(queue_size, on_drop=self._frame_dropped)
        self._commands: queue.Queue = queue.Queue(maxsize=command_queue_size)
        self._outcomes: queue.SimpleQueue = queue.SimpleQueue()  # acks back to the policy
        self._stop = threading.Event()
        # replaced, never mutated: workers read a consistent snapshot
        self._masks: tuple[tuple[int, int, int, int], ...] = ()
        self._take_lock = threading.Lock()
        self._order: _InOrder | None = None
        self._workers_used = self.workers
        self._geom_cache: dict[int, Geometry] = {}
        self._lock = threading.Lock()
        # results
        self.frames_in = 0
        self.records: deque = deque(maxlen=100_000)
        self.command_records: list[dict] = []
        self.commands_dropped = 0
        self.errors = 0
        self.frames_bad = 0  # unreadable frames (also counted in errors)
        self._acq_error: BaseException | None = None
        # live stream series (sources with pop_events): processed per series, ends awaiting their frames
        self._primed: Geometry | None = None
        self._series_done: Counter = Counter()
        self._series_ends: list[dict] = []
        self.series_records: list[dict] = []

    # ------------------------------------------------------------ threads
    def _frame_dropped(self, item) -> None:
        _, meta = item
        rec = {"type": "drop", "frame": meta.index, "t_source": meta.t_source,
               "reason": "processing behind: oldest queued frame dropped"}
        if "image_id" in meta.info:
            rec.update(series_id=meta.info.get("series_id"), image_id=meta.info["image_id"])
            with self._lock:
                self._series_done[_series_key(meta.info), "dropped"] += 1
        self._log.write(rec)

    def _acquire(self) -> None:
        # A paced source is a live detector: never wait, drop the oldest. An
        # unpaced replay goes as fast as processing does (nothing to drop).
        block = self.block_source
        # a frame that cannot be read (damaged file) is one error record and
        # the stream goes on, like a frame that fails processing
        frames = self.source.frames(on_error=self._bad_frame) if hasattr(self.source, "frames") else self.source
        try:
            for frame, meta in frames:
                if self._stop.is_set():
                    break
                self.frames_in += 1
                self._frames.put((frame, meta), block=block)
        except BaseException as exc:  # reported by run(), never swallowed
            self._acq_error = exc
        finally:
            self._frames.close()

    def _bad_frame(self, exc) -> None:
        with self._lock:
            self.errors += 1
            self.frames_bad += 1
        self._log.write({"type": "error", "stage": "source", "frame": getattr(exc, "frame", None),
                         "path": getattr(exc, "path", None), "error": f"{type(exc).__name__}: {exc}"})

    def _send_commands(self) -> None:
        while True:
            item = self._commands.get()
            if item is _STOP:
                return
            self._send_one(item)

    def _send_one(self, p: _Pending) -> None:
        cmd = p.command
        rec = {"type": "command", "frame": p.frame, "name": cmd.name, "args": cmd.args, "rule": cmd.rule,
               "reason": cmd.reason}
        t_dispatch = time.perf_counter()
        rec["dispatch_ms"] = (t_dispatch - p.t_in) * 1e3
        if cmd.dry_run or self.bridge is None:
            rec["status"] = "dry_run" if cmd.dry_run else "no_device"
        else:
            try:
                ack = self.bridge.send(cmd.name, **cmd.args)
            except Exception as exc:  # every failure is recorded and reported
                rec["status"] = _failure_kind(exc)
                rec["error"] = f"{type(exc).__name__}: {exc}"
                state = getattr(exc, "state", None)
                if state is not None:
                    self._outcomes.put(state)
            else:
                now_p, now_m = time.perf_counter(), time.monotonic()
                rec["status"] = ack.status
                rec["seq"] = ack.seq
                rec["attempts"] = ack.attempts
                if ack.sent_at:
                    rec["wire_ms"] = (now_p - (now_m - ack.sent_at) - p.t_in) * 1e3
                rec["ack_ms"] = (now_p - p.t_in) * 1e3
                if ack.state is not None:
                    rec["state"] = ack.state.to_dict() if hasattr(ack.state, "to_dict") else ack.state
                    self._outcomes.put(ack.state)
        with self._lock:
            self.command_records.append(rec)
        self._log.write(rec)

    # ------------------------------------------------------------ processing
    def _geometry(self, base: Geometry) -> Geometry:
        """The source geometry with the regions masked so far (cached)."""
        masks = self._masks
        if not masks:
            return base
        key = id(base)
        g = self._geom_cache.get(key)
        if g is None or g._cache.get("n_masks") != len(masks):
            mask = base.valid.copy()
            for r0, r1, c0, c1 in masks:
                mask[r0:r1, c0:c1] = False
            g = Geometry(base.shape, base.pixel_size_mm, base.distance_mm, base.wavelength_A,
                         base.beam_center, mask=mask, saturation=base.saturation)
            g._cache["n_masks"] = len(masks)
            self._geom_cache[key] = g
        return g

    def _measured(self, key: str, index: int, needed: bool, measure: Callable[[], Any]):
        if not needed:
            return None
        last = self._measurements.get(key)
        if last is None or index - last[0] >= self.measure_every or index < last[0]:
            last = self._measurements[key] = (index, measure())
        return last[1]

    def process(self, frame: np.ndarray, meta) -> dict:
        """Process one frame in the calling thread; returns its record (also
        logged and queued commands). :meth:`run` does the same with the
        analysis spread over its workers."""
        return self._decide(self._analyse(frame, meta))

    def _analyse(self, frame: np.ndarray, meta) -> _Analysed:
        """Worker side: everything that needs no state from earlier frames."""
        t_start = time.perf_counter()
        if meta.geometry is not self._primed:  # a new series (live stream): new tables
            self._prime(meta.geometry)
        geom = self._geometry(meta.geometry)
        an = analyse_frame(frame, geom, model=self.model, peak_params=self.peak_params)
        return _Analysed(frame, meta, geom, an, t_start, time.perf_counter())

    def _decide(self, item: _Analysed) -> dict:
        """Ordered side: measurements, policy and commands for one analysed frame."""
        frame, meta, geom, an = item.frame, item.meta, item.geometry, item.analysis
        stats, peaks, probs, proposed, feats = an.stats, an.peaks, an.probabilities, an.flags, an.features
        flags: tuple[str, ...] = ()
        assessment = None
        t_inf = time.perf_counter()
        if meta.geometry is not self._gate_geometry:  # a new series: earlier background levels say nothing
            self._gate = EvidenceGate()
            self._gate_geometry = meta.geometry
        # measurements only on flagged frames, and at most every
        # `measure_every` frames (they cost milliseconds to tens of ms; a
        # drifted beam or a dead module does not change from frame to frame)
        offset = self._measured("beam_offset", meta.index, "beam_off_center" in proposed,
                                lambda: measure_beam_offset(frame, geom))
        if self.model is not None:
            # a proposal leads to a command only when the frame's evidence
            # confirms it; the gate asks for the dead regions only if needed
            assessment = self._gate(
                probs, proposed, frame, geom, stats=stats, peaks=peaks, features=feats,
                beam_offset=offset if "beam_off_center" in proposed else MISSING,
                dead_regions=lambda: self._measured("fault", meta.index, True,
                                                    lambda: find_dead_regions(frame, geom, stats=stats)))
            flags = assessment.flags
        regions = assessment.evidence.get("detector_fault", {}).get("dead_regions") if assessment else None
        fault = tuple(regions[0]) if regions and "detector_fault" in flags else None
        t_meas = time.perf_counter()
        median_snr = float(np.median(peaks.snr)) if len(peaks) else None
        actions = []
        if self.policy is not None:
            while True:
                try:
                    self.policy.on_ack(self._outcomes.get_nowait())
                except queue.Empty:
                    break
            # the policy also switches rules on by probability: a class the
            # evidence did not confirm must not reach it that way either
            gated = {c: (p if c in flags else 0.0) for c, p in probs.items()}
            obs = Observation(index=meta.index, t=meta.t_source, flags=frozenset(flags), probabilities=gated,
                              n_peaks=len(peaks), median_snr=median_snr,
                              n_saturated_peaks=int(peaks.saturated.sum()),
                              beam_offset_px=offset, fault_region=fault)
            actions = self.policy.step(obs)
        t_pol = time.perf_counter()
        act_recs = []
        for a in actions:
            if isinstance(a, MaskRegion):
                self._masks = self._masks + (tuple(int(v) for v in a.region),)
                act_recs.append({"action": "mask", "region": a.region, "rule": a.rule})
            elif isinstance(a, Command):
                act_recs.append({"action": "command", "name": a.name, "args": a.args, "rule": a.rule,
                                 "dry_run": a.dry_run})
                try:
                    self._commands.put_nowait(_Pending(a, meta.index, meta.t_source))
                except queue.Full:
                    self.commands_dropped += 1
                    rec = {"type": "command", "frame": meta.index, "name": a.name, "args": a.args,
                           "rule": a.rule, "status": "dropped", "error": "command queue full (device too slow)"}
                    with self._lock:
                        self.command_records.append(rec)
                    self._log.write(rec)
        t_end = time.perf_counter()
        bg = stats.mean[np.isfinite(stats.mean)]
        ms = 1e3
        record = {
            "type": "frame", "frame": meta.index, "t_source": meta.t_source,
            "queue_ms": (item.t_start - meta.t_source) * ms,
            # "wait": analysed, waiting for earlier frames still in other workers
            "stages_ms": {**an.stages_ms, "measure": (t_meas - t_inf) * ms, "policy": (t_pol - t_meas) * ms,
                          "wait": (t_inf - item.t_done) * ms,
                          "total": (item.t_done - item.t_start + t_end - t_inf) * ms},
            "latency_ms": (t_end - meta.t_source) * ms,
            "n_peaks": len(peaks),
            "median_snr": median_snr,
            "background": float(np.median(bg)) if bg.size else None,  # counts/pixel, median over rings
            "n_saturated_peaks": int(peaks.saturated.sum()),
            "flags": list(flags),
            "probabilities": {k: round(float(v), 4) for k, v in probs.items()},
            "actions": act_recs,
        }
        if offset is not None:
            record["beam_offset_px"] = offset
        if assessment is not None and (assessment.flags or assessment.proposed):
            record["proposed"] = list(assessment.proposed)
            record["evidence"] = assessment.evidence
            record["evidence_summary"] = assessment.summary()
        if meta.truth:
            record["truth"] = sorted(meta.truth)
        if "phase" in meta.info:
            record["phase"] = meta.info["phase"]
        if "image_id" in meta.info:  # live stream
            record["series_id"] = meta.info.get("series_id")
            record["image_id"] = meta.info["image_id"]
        if self.observer is not None:  # references only: the observer encodes on its own thread
            self.observer.frame(frame, record, peaks, geom)
        return record

    def _prime(self, geom: Geometry | None = None) -> None:
        """Build the per-geometry tables (radial bins, feature row runs) on a
        dark frame before acquisition starts, so the first real frames are not
        late by tens of ms. A source whose geometry is not known before its
        first frame is primed by that frame instead. A live stream changes
        geometry with each series: it is primed again on the new one."""
        geom = getattr(self.source, "geometry", None) if geom is None else geom
        if not isinstance(geom, Geometry) or geom is self._primed:
            return
        self._primed = geom
        g = self._geometry(geom)
        dark = np.zeros(g.shape, dtype=getattr(self.source, "dtype", None) or np.int32)
        an = analyse_frame(dark, g, model=self.model, peak_params=self.peak_params)
        if self.model is not None:
            from .evidence.ice import ring_profile

            ring_profile(dark, g, an.stats)  # the ice-band table (0.2-0.5 s on a 6M-16M detector)

    # ------------------------------------------------------------ run
    def run(self, *, max_frames: int | None = None, duration: float | None = None) -> RunSummary:
        """Run until the source ends, ``max_frames`` are processed or ``duration`` (s) passes.

        Raises
        ------
        Exception
            Whatever the source raised (e.g. :class:`edge.sources.SourceError`
            for a truncated file), after the frames before it were processed.
        """
        self._prime()
        # Everything alive now (modules, compiled kernels, the model) is moved
        # out of the collector's sight: a full collection scanning it held
        # the GIL for ~15 ms mid-run and stalled acquisition.
        gc.collect()
        gc.freeze()
        # other Python threads (acquisition, serial link) hand the GIL back
        # within 1 ms instead of the default 5 ms
        switch = sys.getswitchinterval()
        sys.setswitchinterval(min(switch, 0.001))
        workers = self._workers_used = self.workers if _concurrent_kernels_safe() else 1
        # one worker analyses in this thread (no hand-over between threads)
        self._order = _InOrder(workers) if workers > 1 else None
        acq = threading.Thread(target=self._acquire, name="edge-acquisition", daemon=True)
        cmd = threading.Thread(target=self._send_commands, name="edge-commands", daemon=True)
        pool = [threading.Thread(target=self._work, name=f"edge-worker-{k}", daemon=True)
                for k in range(workers if workers > 1 else 0)]
        # this thread's kernels (analysis with one worker, measurements) use the workers' thread count
        caller_threads = numba.get_num_threads()
        numba.set_num_threads(self.threads)
        cmd.start()
        for w in pool:
            w.start()
        t0 = time.perf_counter()
        acq.start()
        processed = 0
        try:
            while not self._stop.is_set():
                if duration is not None and time.perf_counter() - t0 >= duration:
                    break
                item = self._next_analysed(timeout=0.2)
                self._source_events()
                if item is None:
                    continue
                if item is _STOP:
                    break
                meta = item.meta
                try:
                    if isinstance(item, _Failed):
                        raise item.error
                    rec = self._decide(item)
                except Exception as exc:  # a bad frame is reported, the stream goes on
                    self.errors += 1
                    rec = {"type": "error", "frame": meta.index, "error": f"{type(exc).__name__}: {exc}"}
                    self._log.write(rec)
                    self._count_series(meta, "errors")
                    continue
                self._count_series(meta, "processed")
                processed += 1
                self.records.append(rec)
                self._log.write(rec)
                if self.on_frame is not None:
                    self.on_frame(rec)
                if max_frames is not None and processed >= max_frames:
                    break
        finally:
            self._stop.set()
            self._frames.close()  # a replay waiting for room stops waiting
            interrupt = getattr(self.source, "interrupt", None)
            if interrupt is not None:  # a live stream waits for frames: end its iteration now
                interrupt()
            acq.join(timeout=5.0)
            for w in pool:
                w.join(timeout=5.0)
            self._source_events(final=True)
            self._commands.put(_STOP)
            cmd.join(timeout=30.0)
            elapsed = time.perf_counter() - t0
            summary = self.summary(elapsed)
            end = {"type": "summary", "stop_reason": self.stop_reason, **summary.to_dict()}
            if self._acq_error is not None:
                end["source_error"] = f"{type(self._acq_error).__name__}: {self._acq_error}"
            self._log.write(end)
            self._log.close()
            numba.set_num_threads(caller_threads)
            sys.setswitchinterval(switch)
            gc.unfreeze()
        if self._acq_error is not None:
            raise self._acq_error
        return summary

    def _count_series(self, meta, outcome: str) -> None:
        if "image_id" in meta.info:
            with self._lock:
                self._series_done[_series_key(meta.info), outcome] += 1

    def _source_events(self, final: bool = False) -> None:
        """Log a live source's events (edge.sources.stream); close a series once
        all the frames it delivered are processed (or at the end of the run)."""
        pop = getattr(self.source, "pop_events", None)
        if pop is None:
            return
        for ev in pop():
            geom = ev.pop("geometry", None)
            if ev["type"] == "series_start" and isinstance(geom, Geometry):
                self._prime(geom)  # before its first image arrives
            if ev["type"] == "series_end":
                self._series_ends.append(ev)
            else:
                self._log.write(ev)
        if final:  # series still open when the run stops: close them as they stand
            ends = {_series_key(e): e for e in self._series_ends}
            written = {_series_key(r) for r in self.series_records}
            for sr in getattr(self.source, "series", lambda: [])():
                if _series_key(sr) not in ends and _series_key(sr) not in written and sr["received"]:
                    ends[_series_key(sr)] = {"type": "series_end", **sr}
            self._series_ends = list(ends.values())
        waiting = []
        for ev in self._series_ends:
            sid = _series_key(ev)
            with self._lock:
                n = {k: self._series_done[sid, k] for k in ("processed", "dropped", "errors")}
            if sum(n.values()) < ev["delivered"] and not final:
                waiting.append(ev)  # frames of this series still queued for processing
                continue
            rec = {**ev, "type": "series", "processed": n["processed"], "dropped": ev["dropped"] + n["dropped"],
                   "processing_errors": n["errors"]}
            self.series_records.append(rec)
            self._log.write(rec)
        self._series_ends = waiting

    def _next_analysed(self, timeout: float):
        """Next analysed frame in queue order (``_Analysed`` or ``_Failed``),
        None on timeout, ``_STOP`` at the end."""
        if self._order is not None:
            return self._order.get(timeout=timeout)
        item = self._frames.get(timeout=timeout)
        if item is None or item is _STOP:
            return item
        frame, meta = item
        try:
            return self._analyse(frame, meta)
        except Exception as exc:  # reported by run(), in order
            return _Failed(meta, exc)

    def _take(self):
        """Oldest queued frame with its ticket (None on timeout, ``_STOP`` at the end).

        One lock over both, so tickets follow queue order."""
        with self._take_lock:
            item = self._frames.get(timeout=0.2)
            if item is None or item is _STOP:
                return item
            return self._order.ticket(), item

    def _work(self) -> None:
        """A worker: analyse whole frames with this thread's Numba thread count."""
        numba.set_num_threads(self.threads)  # per calling thread
        try:
            while not self._stop.is_set():
                got = self._take()
                if got is None:
                    continue
                if got is _STOP:
                    return
                ticket, (frame, meta) = got
                result: Any = _Failed(meta, RuntimeError("worker stopped"))
                try:
                    result = self._analyse(frame, meta)
                except Exception as exc:  # reported in frame order by run()
                    result = _Failed(meta, exc)
                finally:
                    self._order.put(ticket, result)  # every ticket comes back: no gap stalls the order
        finally:
            self._order.worker_done()

    def stop(self, reason: str | None = None) -> None:
        """Ask :meth:`run` to finish (thread-safe; also from a signal handler).

        ``reason`` (e.g. ``"SIGTERM"``) goes into the summary record.
        """
        if reason is not None and self.stop_reason is None:
            self.stop_reason = reason
        self._stop.set()

    def summary(self, elapsed: float) -> RunSummary:
        recs = list(self.records)
        stages = {}
        for name in ("background", "peaks", "features", "inference", "measure", "policy", "wait", "total"):
            stages[name] = percentiles([r["stages_ms"].get(name) for r in recs])
        with self._lock:
            cmds = list(self.command_records)
        outcomes = Counter(f"{c['name']}:{c['status']}" for c in cmds if c.get("status") != "dropped")
        flags = Counter(f for r in recs for f in r["flags"])
        npk = [r["n_peaks"] for r in recs]
        return RunSummary(
            frames_in=self.frames_in, frames_processed=len(recs), frames_dropped=self._frames.dropped,
            commands_dropped=self.commands_dropped, duration_s=elapsed,
            fps=len(recs) / elapsed if elapsed > 0 else 0.0, stage_ms=stages,
            latency_ms=percentiles([r["latency_ms"] for r in recs]),
            wire_ms=percentiles([c.get("wire_ms") for c in cmds]),
            ack_ms=percentiles([c.get("ack_ms") for c in cmds]),
            commands=dict(outcomes), flags=dict(flags),
            peaks={"median": float(np.median(npk)) if npk else None, "max": max(npk) if npk else None},
            errors=self.errors, results_path=None if self._log.path is None else str(self._log.path),
            series=list(self.series_records), frames_bad=self.frames_bad,
            workers=self._workers_used, threads=self.threads)


def _series_key(d: dict) -> tuple:
    # a restarted detector (or edge serve) may reuse series_id: the unique id tells series apart
    return d.get("series_id"), d.get("series_unique_id")


def _failure_kind(exc: Exception) -> str:
    name = type(exc).__name__
    if name in ("ValidationError", "UnknownCommand", "RateLimited"):
        return "refused"
    if name in ("CommandRejected", "SafeStateActive"):
        return "rejected"
    return "failed"
