"""Frame sources: simulator, scripted scenarios, mini-CBF and Eiger/NeXus replay.

Every source yields ``(frame, meta)`` pairs through one interface,
:class:`FrameSource`; :func:`open_source` builds one from a spec string::

    with open_source("scenario:1m", rate_hz=100) as src:
        for frame, meta in src:
            ...   # meta.index, meta.t_source, meta.geometry, meta.truth, meta.info

Specs: ``"sim"`` / ``"sim:4m"`` (endless clean frames), ``"scenario"`` /
``"scenario:4m"`` / ``"scenario:FILE.toml"`` (scripted run with ground
truth, :mod:`edge.scenario`), a ``.cbf`` / ``.cbf.bz2`` / ``.cbf.gz`` file, a
directory or glob of them, or an Eiger/NeXus ``*_master.h5`` file.

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

import glob as _glob
import hashlib
import base64
import math
import os
import re
import time
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from .geometry import LAYOUTS, Geometry
from .scenario import Scenario, default_scenario
from .sim import SimConfig, simulate

__all__ = [
    "FrameMeta",
    "FrameSource",
    "SimulatorSource",
    "CbfSource",
    "EigerSource",
    "SourceError",
    "open_source",
    "write_eiger_master",
]

_CBF_SUFFIXES = (".cbf", ".cbf.bz2", ".cbf.gz")


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

    Subclasses set :attr:`geometry`, :attr:`frame_time` and :attr:`name` and
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
    """

    geometry: Geometry
    frame_time: float | None = None
    name: str = "source"

    def __init__(self, *, rate_hz: float | None = None, n_frames: int | None = None, loop: bool = False,
                 preload: bool = False, copy: bool = False) -> None:
        if rate_hz is not None:
            if isinstance(rate_hz, bool) or not isinstance(rate_hz, (int, float)) \
                    or not math.isfinite(rate_hz) or rate_hz <= 0:
                raise SourceError(f"rate_hz must be a positive number of frames per second, None or 'file', "
                                  f"got {rate_hz!r}")
            rate_hz = float(rate_hz)
        if n_frames is not None and (isinstance(n_frames, bool) or not isinstance(n_frames, int) or n_frames < 0):
            raise SourceError(f"n_frames must be a non-negative integer or None, got {n_frames!r}")
        self.rate_hz = rate_hz
        self._cap = n_frames
        self.loop = bool(loop)
        self.preload = bool(preload)
        self.copy = bool(copy)
        self._preloaded: list | None = None
        self._closed = False
        #: Pacing counters of the last iteration: frames emitted late, schedule re-anchors.
        self.stats = {"emitted": 0, "late": 0, "reanchors": 0}

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
        self.prepare()
        length = self._length()
        if length is None and self._preloaded is not None:
            length = len(self._preloaded)  # endless simulator: n_frames distinct frames were preloaded
        total = self.n_frames
        if length == 0:
            return
        period = None if self.rate_hz is None else 1.0 / self.rate_hz
        self.stats = {"emitted": 0, "late": 0, "reanchors": 0}
        due = None
        k = 0
        while total is None or k < total:
            self._check_open()
            j = k if length is None else k % length
            if self._preloaded is not None:
                frame, info, truth = self._preloaded[j]
                info = dict(info)
            else:
                frame, info, truth = self._read(j)
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


# =============================================================================
# Simulator
# =============================================================================
def _derived_seed(*parts: int) -> int:
    """A deterministic 32-bit seed from integers (``simulate`` needs an int)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


def _config_key(overrides: Mapping[str, Any]) -> tuple:
    return tuple(sorted(overrides.items()))


class SimulatorSource(FrameSource):
    """Simulated frames (:mod:`edge.sim`), clean or following a :class:`Scenario`.

    Simulating one frame costs ~80 ms at 1M and ~0.4 s at 4M, far too slow to
    stream, so the source pre-simulates a *pool* of ``pool`` distinct frames
    (distinct seeds) per simulator configuration - one for clean frames and one
    per distinct phase of the scenario - and cycles through it: frame ``k`` of
    a configuration uses pool slot ``k % pool``. Start-up cost is
    ``pool x configurations`` simulations (default scenario: 8 configurations,
    32 frames, ~3 s and ~140 MB at 1M; ~14 s and ~570 MB at 4M), after which
    frames stream at memory speed. ``preload=True`` instead simulates every
    frame individually (all distinct; needs a finite ``n_frames`` or scenario).

    Parameters
    ----------
    layout : str
        Detector layout (:data:`edge.geometry.LAYOUTS`), e.g. ``"1m"``, ``"4m"``.
    n_frames : int, optional
        Frames to emit; default endless without a scenario, else the scenario length.
    rate_hz : float, optional
        Emission rate (Hz), None = as fast as possible.
    seed : int
        Base seed; pool seeds derive from it, the configuration and the slot.
    scenario : Scenario, mapping, path or "default", optional
        Scripted anomalies with ground truth (:mod:`edge.scenario`).
    pool : int
        Distinct frames per configuration.
    preload : bool
        Simulate every emitted frame individually before the first emission.
    loop : bool
        Replay the scenario from the start when it ends.
    copy : bool
        Emit copies instead of the shared pool arrays.
    config : SimConfig, optional
        Base simulator configuration; ``**sim`` overrides its fields.
    max_memory_bytes : int
        Refuse pools/preloads whose frames would exceed this (default 4 GiB).
    """

    def __init__(self, layout: str = "1m", n_frames: int | None = None, rate_hz: float | None = None, *,
                 seed: int = 0, scenario: Scenario | Mapping | str | os.PathLike | None = None, pool: int = 4,
                 preload: bool = False, loop: bool = False, copy: bool = False, config: SimConfig | None = None,
                 max_memory_bytes: int = 4 << 30, **sim: Any) -> None:
        super().__init__(rate_hz=rate_hz, n_frames=n_frames, loop=loop, preload=preload, copy=copy)
        if not isinstance(layout, str) or layout.lower() not in LAYOUTS:
            raise SourceError(f"unknown simulator layout {layout!r}; known: {sorted(LAYOUTS)}")
        if isinstance(pool, bool) or not isinstance(pool, int) or pool < 1:
            raise SourceError(f"pool must be a positive integer, got {pool!r}")
        try:
            self.config = replace(config or SimConfig(), **sim, layout=layout.lower())
        except TypeError as exc:
            raise SourceError(f"bad simulator option: {exc}") from None
        if isinstance(scenario, str) and scenario == "default":
            scenario = default_scenario()
        elif isinstance(scenario, Mapping):
            scenario = Scenario.from_dict(scenario)
        elif isinstance(scenario, (str, os.PathLike)):
            scenario = Scenario.from_toml(scenario)
        self.scenario: Scenario | None = scenario
        self.seed = int(seed)
        self.pool = pool
        self.max_memory_bytes = int(max_memory_bytes)
        self.geometry = self.config.geometry()
        # the pool frames carry the per-frame mask (bad pixels) as -2 markers;
        # the geometry keeps the static gap mask and the count cutoff
        self.geometry = Geometry(self.geometry.shape, self.geometry.pixel_size_mm, self.geometry.distance_mm,
                                 self.geometry.wavelength_A, self.geometry.beam_center, mask=self.geometry.mask,
                                 saturation=self.config.saturation)
        self.frame_time = None
        kind = "sim" if scenario is None else f"scenario:{scenario.name}"
        self.name = f"{kind}:{self.config.layout}"
        self._pools: dict[tuple, list[tuple[np.ndarray, dict]]] = {}

    def _length(self) -> int | None:
        return None if self.scenario is None else self.scenario.n_frames

    def _overrides(self, k: int) -> tuple[dict, Any]:
        if self.scenario is None:
            return {}, None
        return self.scenario.overrides_at(k), self.scenario.phase_at(k)

    def _simulate(self, overrides: dict, seed: int) -> tuple[np.ndarray, dict]:
        sf = simulate(self.config, seed=seed, **overrides)
        info = {"seed": seed, "beam_offset_px": tuple(sf.config.beam_offset)}
        if sf.config.dead_modules:
            info["fault_regions"] = _dead_modules(sf.frame, self.config.layout)
        return sf.frame, info

    def _frames_needed(self) -> int:
        length = self._length()
        if self.preload:
            if length is None:
                return self._cap or 0
            return length if (self._cap is None or self.loop) else min(length, self._cap)
        n_configs = 1 if self.scenario is None else len({_config_key(self.scenario.overrides_at(k))
                                                         for k in self._scripted_range()})
        return n_configs * self.pool

    def _scripted_range(self) -> range:
        n = self.scenario.n_frames
        return range(n if (self._cap is None or self.loop) else min(n, self._cap))

    def prepare(self) -> None:
        self._check_open()
        need = self._frames_needed() * int(np.prod(self.geometry.shape)) * np.dtype(self.config.dtype).itemsize
        if need > self.max_memory_bytes:
            raise SourceError(f"{self.name}: the simulated frames would need {need / 2**20:.0f} MiB, more than "
                              f"max_memory_bytes={self.max_memory_bytes / 2**20:.0f} MiB; use a smaller pool, "
                              f"fewer frames or no preload")
        if self.preload:
            return super().prepare()
        keys = [_config_key({})] if self.scenario is None else \
            sorted({_config_key(self.scenario.overrides_at(k)) for k in self._scripted_range()}, key=repr)
        for key in keys:
            if key in self._pools:
                continue
            tag = zlib.crc32(repr(key).encode())  # stable across runs (unlike hash())
            self._pools[key] = [self._simulate(dict(key), _derived_seed(self.seed, tag, slot))
                                for slot in range(self.pool)]

    def _read(self, k: int) -> tuple[np.ndarray, dict, frozenset]:
        overrides, phase = self._overrides(k)
        if self.preload:
            frame, info = self._simulate(overrides, _derived_seed(self.seed, 0xF4A3E, k))
            slot = None
        else:
            entries = self._pools[_config_key(overrides)]
            slot = k % self.pool
            frame, info = entries[slot]
            info = dict(info)
        info["pool_slot"] = slot
        if self.scenario is not None:
            info["phase"] = phase.name if phase is not None else "clean"
            info["scenario_frame"] = k
        truth = phase.labels if phase is not None else frozenset()
        return frame, info, truth

    def close(self) -> None:
        super().close()
        self._pools.clear()


def _dead_modules(frame: np.ndarray, layout: str) -> list[tuple[int, int, int, int]]:
    """Modules reading (almost) all zero, as ``(row0, row1, col0, col1)`` half-open boxes.

    Hot pixels are scattered after the module dies, so allow a few nonzero ones.
    """
    lay = LAYOUTS[layout.lower()]
    (mr, mc), (pr, pc), (gr, gc) = lay.modules, lay.module_shape, lay.gap
    out = []
    for i in range(mr):
        for j in range(mc):
            r0, c0 = i * (pr + gr), j * (pc + gc)
            block = frame[r0:r0 + pr, c0:c0 + pc]
            if np.count_nonzero(block > 0) < 0.01 * block.size:
                out.append((r0, r0 + pr, c0, c0 + pc))
    return out


# =============================================================================
# mini-CBF
# =============================================================================
def _natural_key(path: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def _is_cbf(path: str) -> bool:
    return path.lower().endswith(_CBF_SUFFIXES)


def _header_number(header: str, key: str) -> float | None:
    m = re.search(rf"{key}\s+([-+0-9.eE]+)", header)
    return float(m.group(1)) if m else None


class CbfSource(FrameSource):
    """Replay PILATUS-style mini-CBF files (one frame per file), via fabio.

    Geometry comes from the first file's header
    (:meth:`Geometry.from_cbf_header`); its static mask is the set of pixels
    that are negative in the first frame (-1 gaps, -2 bad pixels).
    ``frame_time`` is the header's ``Exposure_period`` (s). Every frame is
    checked against its header: binary size, element count, dimensions and
    ``Content-MD5``; a truncated or corrupt file raises :class:`SourceError`
    naming the file and the frame, never a silently short or zero-filled frame.

    Parameters
    ----------
    paths : path, directory, glob or sequence of paths
        CBF files (``.cbf``, ``.cbf.bz2``, ``.cbf.gz``); directories and globs
        are expanded and sorted naturally (``img_2`` before ``img_10``); a
        sequence is replayed in the given order.
    verify_checksum : bool
        Check ``Content-MD5`` when the header has one (~10 ms per 6M frame).
    **kw
        :class:`FrameSource` options (``rate_hz``, ``n_frames``, ``loop``, ``preload``, ``copy``).
    """

    def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike], *, verify_checksum: bool = True,
                 **kw: Any) -> None:
        super().__init__(**kw)
        self.paths = _expand_cbf(paths)
        self.verify_checksum = verify_checksum
        first, header = self._decode(0)
        text = header.get("_array_data.header_contents", "")
        try:
            self.geometry = Geometry.from_cbf_header(text, first.shape, mask=first >= 0)
        except ValueError as exc:
            raise SourceError(f"{self.paths[0]}: cannot get the geometry from the CBF header: {exc}",
                              path=self.paths[0], frame=0) from exc
        self.frame_time = _header_number(text, "Exposure_period")
        self.name = self.paths[0] if len(self.paths) == 1 else f"{os.path.dirname(self.paths[0]) or '.'} " \
                                                               f"({len(self.paths)} CBF files)"

    def _length(self) -> int:
        return len(self.paths)

    def _decode(self, k: int) -> tuple[np.ndarray, dict]:
        from fabio.cbfimage import DATA_TYPES, CbfImage
        from fabio.compression import decByteOffset

        path = self.paths[k]
        where = f"{path} (frame {k})"
        try:
            img = CbfImage()
            raw = img.read(path, only_raw=True)  # header parsed, binary section undecoded
            header = img.header
            if header.get("conversions") != "x-CBF_BYTE_OFFSET":
                raise SourceError(f"{where}: unsupported CBF compression {header.get('conversions')!r}",
                                  path=path, frame=k)
            nx = int(header["X-Binary-Size-Fastest-Dimension"])
            ny = int(header["X-Binary-Size-Second-Dimension"])
            size = int(header["X-Binary-Size"])
            if len(raw) < size:
                raise SourceError(f"{where}: truncated CBF: {len(raw)} of {size} binary bytes present",
                                  path=path, frame=k)
            raw = raw[:size]
            if self.verify_checksum and "Content-MD5" in header:
                got = base64.b64encode(hashlib.md5(raw).digest()).decode()
                if got != header["Content-MD5"].strip():
                    raise SourceError(f"{where}: corrupt CBF: Content-MD5 mismatch (header "
                                      f"{header['Content-MD5']}, data {got})", path=path, frame=k)
            etype = header.get("X-Binary-Element-Type", "signed 32-bit integer")
            if etype not in DATA_TYPES:
                raise SourceError(f"{where}: unsupported CBF element type {etype!r}", path=path, frame=k)
            dtype = np.dtype(DATA_TYPES[etype])
            data = decByteOffset(raw, size=nx * ny, dtype=dtype)
            n = int(header.get("X-Binary-Number-of-Elements", nx * ny))
            if len(data) != nx * ny or n != nx * ny:
                raise SourceError(f"{where}: corrupt CBF: {len(data)} elements decoded, header says {n} "
                                  f"= {ny} x {nx}", path=path, frame=k)
        except SourceError:
            raise
        except FileNotFoundError as exc:
            raise SourceError(f"{where}: file not found", path=path, frame=k) from exc
        except Exception as exc:  # fabio/bz2 raise many types on damaged files
            raise SourceError(f"{where}: cannot read CBF (truncated, corrupt or not a CBF file): "
                              f"{type(exc).__name__}: {exc}",
                              path=path, frame=k) from exc
        return np.ascontiguousarray(data.reshape(ny, nx)), header

    def _read(self, k: int) -> tuple[np.ndarray, dict, frozenset]:
        frame, header = self._decode(k)
        if frame.shape != self.geometry.shape:
            raise SourceError(f"{self.paths[k]} (frame {k}): shape {frame.shape} differs from the first "
                              f"file's {self.geometry.shape}", path=self.paths[k], frame=k)
        text = header.get("_array_data.header_contents", "")
        info = {"path": self.paths[k], "frame_in_file": 0,
                "exposure_s": _header_number(text, "Exposure_time"),
                "frame_time_s": _header_number(text, "Exposure_period")}
        return frame, info, frozenset()


def _expand_cbf(paths) -> list[str]:
    if isinstance(paths, (str, os.PathLike)):
        p = os.fspath(paths)
        if os.path.isdir(p):
            found = [os.path.join(p, n) for n in os.listdir(p) if _is_cbf(n)]
            if not found:
                raise SourceError(f"no CBF files (*.cbf, *.cbf.bz2, *.cbf.gz) in directory {p!r}", path=p)
        elif _glob.has_magic(p):
            found = [f for f in _glob.glob(p) if _is_cbf(f)]
            if not found:
                raise SourceError(f"no CBF files match {p!r}", path=p)
        else:
            found = [p]
        found.sort(key=_natural_key)
    else:  # an explicit list keeps the caller's order
        found = [os.fspath(x) for x in paths]
        if not found:
            raise SourceError("empty list of CBF files")
    for f in found:
        if not os.path.isfile(f):
            raise SourceError(f"CBF file not found: {f!r}", path=f)
    return found


# =============================================================================
# Eiger / NeXus HDF5
# =============================================================================
_DET = "/entry/instrument/detector"
_SPEC = _DET + "/detectorSpecific"
_LENGTH_UNITS = {"m": 1e3, "meter": 1e3, "metre": 1e3, "mm": 1.0, "millimeter": 1.0, "um": 1e-3,
                 "micron": 1e-3, "µm": 1e-3}
_WAVE_UNITS = {"angstrom": 1.0, "a": 1.0, "å": 1.0, "nm": 10.0, "m": 1e10}


def _import_h5():
    import h5py
    import hdf5plugin  # noqa: F401  (registers the bitshuffle/LZ4 filters with HDF5)
    return h5py


class EigerSource(FrameSource):
    """Replay an Eiger/NeXus acquisition: ``*_master.h5`` plus linked data files.

    Data are the ``/entry/data/data_NNNNNN`` datasets of the master file
    (usually external links to ``*_data_NNNNNN.h5``), in name order; any HDF5
    filter registered by ``hdf5plugin`` (bitshuffle-LZ4, LZ4, ...) is read.

    Geometry from ``/entry/instrument/detector``: ``x_pixel_size`` (and
    ``y_pixel_size``, must match), ``detector_distance`` (lengths in metres
    unless a ``units`` attribute says otherwise), ``beam_center_x/y`` (px),
    ``/entry/instrument/beam/incident_wavelength`` (Angstrom unless
    ``units``). Optional: ``detectorSpecific/pixel_mask`` (nonzero = bad; the
    mask is all-valid when absent), ``detectorSpecific/countrate_correction_
    count_cutoff`` (saturation; None when absent), ``frame_time`` and
    ``count_time`` (s; None when absent). A missing required field, a missing
    data file, or a frame that fails to read or decompress raises
    :class:`SourceError` naming the file, the dataset and the frame.

    Parameters
    ----------
    master : path
        The master file.
    **kw
        :class:`FrameSource` options (``rate_hz``, ``n_frames``, ``loop``, ``preload``, ``copy``).
    """

    def __init__(self, master: str | os.PathLike, **kw: Any) -> None:
        super().__init__(**kw)
        h5py = _import_h5()
        self.path = os.fspath(master)
        if not os.path.isfile(self.path):
            raise SourceError(f"Eiger master file not found: {self.path!r}", path=self.path)
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as exc:
            raise SourceError(f"{self.path}: cannot open HDF5 master file: {exc}", path=self.path) from exc
        try:
            self.geometry, self.frame_time, self.count_time = self._geometry()
            self._datasets = self._open_datasets()
        except BaseException:
            self._file.close()
            raise
        self._starts = np.cumsum([0] + [len(d) for _, d in self._datasets])
        self.name = self.path

    # -- metadata ----------------------------------------------------------------
    def _field(self, path: str, *, required: bool = True, units: Mapping[str, float] | None = None,
               default_unit: str | None = None):
        if path not in self._file:
            if required:
                raise SourceError(f"{self.path}: required field {path} is missing", path=self.path)
            return None
        ds = self._file[path]
        value = ds[()]
        if units is None:
            return value
        unit = ds.attrs.get("units", default_unit)
        if isinstance(unit, bytes):
            unit = unit.decode()
        scale = units.get(str(unit).strip().lower())
        if scale is None:
            raise SourceError(f"{self.path}: {path} has unsupported units {unit!r} "
                              f"(known: {sorted(units)})", path=self.path)
        return float(value) * scale

    def _geometry(self) -> tuple[Geometry, float | None, float | None]:
        px = self._field(f"{_DET}/x_pixel_size", units=_LENGTH_UNITS, default_unit="m")
        py = self._field(f"{_DET}/y_pixel_size", required=False, units=_LENGTH_UNITS, default_unit="m")
        if py is not None and not math.isclose(px, py, rel_tol=1e-6):
            raise SourceError(f"{self.path}: non-square pixels ({px} x {py} mm) are not supported", path=self.path)
        dist = self._field(f"{_DET}/detector_distance", units=_LENGTH_UNITS, default_unit="m")
        wl = self._field("/entry/instrument/beam/incident_wavelength", units=_WAVE_UNITS, default_unit="angstrom")
        bx = float(self._field(f"{_DET}/beam_center_x"))
        by = float(self._field(f"{_DET}/beam_center_y"))
        ft = self._field(f"{_DET}/frame_time", required=False)
        ct = self._field(f"{_DET}/count_time", required=False)
        cutoff = self._field(f"{_SPEC}/countrate_correction_count_cutoff", required=False)
        pm = self._field(f"{_SPEC}/pixel_mask", required=False)
        first = self._first_dataset()
        shape = tuple(first.shape[1:])
        mask = None
        if pm is not None:
            pm = np.asarray(pm)
            if pm.shape != shape:
                raise SourceError(f"{self.path}: pixel_mask shape {pm.shape} differs from the frame shape {shape}",
                                  path=self.path)
            mask = pm == 0
        try:
            geom = Geometry(shape, px, dist, wl, (bx, by), mask=mask,
                            saturation=None if cutoff is None else float(cutoff))
        except ValueError as exc:
            raise SourceError(f"{self.path}: invalid geometry: {exc}", path=self.path) from exc
        return geom, None if ft is None else float(ft), None if ct is None else float(ct)

    def _names(self) -> list[str]:
        if "/entry/data" not in self._file:
            raise SourceError(f"{self.path}: no /entry/data group", path=self.path)
        grp = self._file["/entry/data"]
        names = sorted(n for n in grp.keys() if re.fullmatch(r"data_\d+", n))
        if not names and "data" in grp:
            names = ["data"]  # single-file NeXus
        if not names:
            raise SourceError(f"{self.path}: /entry/data has no data_NNNNNN datasets", path=self.path)
        return names

    def _link_target(self, name: str) -> str:
        link = self._file["/entry/data"].get(name, getlink=True)
        fn = getattr(link, "filename", None)
        return os.path.join(os.path.dirname(self.path), fn) if fn else self.path

    def _dataset(self, name: str, frame0: int):
        target = self._link_target(name)
        try:
            ds = self._file["/entry/data"][name]
        except (KeyError, OSError) as exc:
            why = "missing" if not os.path.exists(target) else "unreadable (truncated or corrupt?)"
            raise SourceError(f"{self.path}: /entry/data/{name} (frames from {frame0}) -> data file {target} is "
                              f"{why}: {exc}", path=target, frame=frame0) from exc
        if ds.ndim != 3:
            raise SourceError(f"{target}: /entry/data/{name} must be 3-D (frames, rows, columns), got shape "
                              f"{ds.shape}", path=target, frame=frame0)
        return ds

    def _first_dataset(self):
        return self._dataset(self._names()[0], 0)

    def _open_datasets(self) -> list[tuple[str, Any]]:
        out, start = [], 0
        for name in self._names():
            ds = self._dataset(name, start)
            if tuple(ds.shape[1:]) != self.geometry.shape:
                raise SourceError(f"{self._link_target(name)}: frames of /entry/data/{name} are {ds.shape[1:]}, "
                                  f"expected {self.geometry.shape}", path=self._link_target(name), frame=start)
            out.append((name, ds))
            start += len(ds)
        return out

    # -- frames ------------------------------------------------------------------
    def _length(self) -> int:
        return int(self._starts[-1])

    def _read(self, k: int) -> tuple[np.ndarray, dict, frozenset]:
        d = int(np.searchsorted(self._starts, k, side="right") - 1)
        name, ds = self._datasets[d]
        j = k - int(self._starts[d])
        try:
            frame = ds[j]
        except Exception as exc:  # h5py raises OSError/ValueError/RuntimeError on damaged chunks
            target = self._link_target(name)
            raise SourceError(f"{target}: cannot read frame {k} (/entry/data/{name}[{j}]): "
                              f"{type(exc).__name__}: {exc}", path=target, frame=k) from exc
        info = {"path": self.path, "dataset": name, "frame_in_file": j,
                "exposure_s": self.count_time, "frame_time_s": self.frame_time}
        return np.ascontiguousarray(frame), info, frozenset()

    def close(self) -> None:
        super().close()
        try:
            self._file.close()
        except Exception:  # already closed
            pass


def write_eiger_master(path: str | os.PathLike, frames: np.ndarray | Sequence[np.ndarray], geometry: Geometry, *,
                       frames_per_file: int = 100, compression: str | None = "bitshuffle-lz4",
                       frame_time: float | None = None, count_time: float | None = None) -> Path:
    """Write an Eiger-style master file and linked data files (tests, examples).

    Parameters
    ----------
    path : path
        Master file name, ending in ``_master.h5``; data files are written
        beside it as ``<prefix>_data_000001.h5``, ... with one dataset
        ``/entry/data/data`` each, linked from ``/entry/data/data_000001``, ...
    frames : ndarray (n, rows, columns) or sequence of 2-D arrays
        Frames (any integer dtype; Eiger writes uint16/uint32).
    geometry : Geometry
        Written to ``/entry/instrument``; its mask becomes ``pixel_mask``
        (1 = bad) and its saturation ``countrate_correction_count_cutoff``.
    frames_per_file : int
        Frames per data file.
    compression : {"bitshuffle-lz4", "gzip", None}
        Chunk filter; one chunk per frame, like the detector writes.
    frame_time, count_time : float, optional
        Seconds per frame and exposure per frame.

    Returns
    -------
    Path
        The master file path.
    """
    h5py = _import_h5()
    import hdf5plugin

    path = Path(path)
    if not path.name.endswith("_master.h5"):
        raise ValueError(f"Eiger master file name must end in '_master.h5', got {path.name!r}")
    frames = np.asarray(frames)
    if frames.ndim != 3 or frames.shape[1:] != geometry.shape:
        raise ValueError(f"frames must be (n, {geometry.shape[0]}, {geometry.shape[1]}), got {frames.shape}")
    if compression == "bitshuffle-lz4":
        comp = dict(hdf5plugin.Bitshuffle(cname="lz4"))
    elif compression == "gzip":
        comp = {"compression": "gzip"}
    elif compression is None:
        comp = {}
    else:
        raise ValueError(f"compression must be 'bitshuffle-lz4', 'gzip' or None, got {compression!r}")
    prefix = path.name[: -len("_master.h5")]
    with h5py.File(path, "w") as m:
        entry = m.create_group("entry")
        entry.attrs["NX_class"] = "NXentry"
        det = m.create_group(_DET)
        det.attrs["NX_class"] = "NXdetector"

        def put(grp, name, value, units=None):
            ds = grp.create_dataset(name, data=value)
            if units:
                ds.attrs["units"] = units

        put(det, "x_pixel_size", geometry.pixel_size_mm * 1e-3, "m")
        put(det, "y_pixel_size", geometry.pixel_size_mm * 1e-3, "m")
        put(det, "detector_distance", geometry.distance_mm * 1e-3, "m")
        put(det, "beam_center_x", geometry.beam_center[0], "pixel")
        put(det, "beam_center_y", geometry.beam_center[1], "pixel")
        if frame_time is not None:
            put(det, "frame_time", float(frame_time), "s")
        if count_time is not None:
            put(det, "count_time", float(count_time), "s")
        put(m.create_group("/entry/instrument/beam"), "incident_wavelength", geometry.wavelength_A, "angstrom")
        spec = m.create_group(_SPEC)
        if geometry.mask is not None:
            spec.create_dataset("pixel_mask", data=(~geometry.mask).astype(np.uint32), **comp)
        if geometry.saturation is not None:
            put(spec, "countrate_correction_count_cutoff", int(geometry.saturation))
        data = m.create_group("/entry/data")
        for f, i0 in enumerate(range(0, len(frames), frames_per_file), start=1):
            name = f"{prefix}_data_{f:06d}.h5"
            block = frames[i0:i0 + frames_per_file]
            with h5py.File(path.parent / name, "w") as d:
                ds = d.create_dataset("/entry/data/data", data=block, chunks=(1, *block.shape[1:]), **comp)
                ds.attrs["image_nr_low"] = i0 + 1
                ds.attrs["image_nr_high"] = i0 + len(block)
            data[f"data_{f:06d}"] = h5py.ExternalLink(name, "/entry/data/data")
    return path


# =============================================================================
# Spec parsing
# =============================================================================
def open_source(spec: str | os.PathLike, *, rate_hz: float | str | None = None, n_frames: int | None = None,
                loop: bool = False, **kw: Any) -> FrameSource:
    """Open a frame source from a spec string.

    Parameters
    ----------
    spec : str or path
        ``"sim"``, ``"sim:<layout>"``, ``"scenario"``, ``"scenario:<layout>"``,
        ``"scenario:<file.toml>"``, a ``.cbf``/``.cbf.bz2``/``.cbf.gz`` file, a
        directory or glob of CBF files, or an Eiger ``*_master.h5`` / ``.nxs``.
    rate_hz : float, "file" or None
        Emission rate in Hz; ``"file"`` = ``1 / frame_time`` of the file
        (CBF ``Exposure_period``, Eiger ``frame_time``); None = unpaced.
    n_frames : int, optional
        Stop after this many frames.
    loop : bool
        Replay finite sources from the start.
    **kw
        Passed to the source class (e.g. ``seed``, ``pool``, ``preload``,
        ``layout``, ``scenario`` for the simulator; ``copy``).

    Raises
    ------
    SourceError
        Unknown spec, missing file, no frame time for ``rate_hz="file"``,
        or a source that cannot be opened.
    """
    s = os.fspath(spec)
    if not isinstance(s, str) or not s:
        raise SourceError(f"empty or invalid source spec {spec!r}")
    file_rate = isinstance(rate_hz, str)
    if file_rate and rate_hz != "file":
        raise SourceError(f"rate_hz must be a number, None or 'file', got {rate_hz!r}")
    common = {"rate_hz": None if file_rate else rate_hz, "n_frames": n_frames, "loop": loop}
    head, _, arg = s.partition(":")
    if head in ("sim", "scenario") and not os.path.exists(s):
        layout = kw.pop("layout", "1m")
        scenario = kw.pop("scenario", "default" if head == "scenario" else None)
        if arg:
            if arg.lower().endswith(".toml"):
                if head != "scenario":
                    raise SourceError(f"source spec {s!r}: a scenario file needs 'scenario:FILE.toml'")
                scenario = arg
            elif arg.lower() in LAYOUTS:
                layout = arg
            else:
                raise SourceError(f"source spec {s!r}: unknown layout {arg!r}; known: {sorted(LAYOUTS)} "
                                  f"(or a scenario .toml file)")
        src: FrameSource = SimulatorSource(layout, scenario=scenario, **common, **kw)
    elif s.endswith(("_master.h5", ".nxs")) or (s.endswith((".h5", ".hdf5")) and os.path.isfile(s)):
        src = EigerSource(s, **common, **kw)
    elif _is_cbf(s) or os.path.isdir(s) or _glob.has_magic(s):
        src = CbfSource(s, **common, **kw)
    elif not os.path.exists(s):
        raise SourceError(f"source {s!r} not found: expected 'sim[:layout]', 'scenario[:layout|:file.toml]', "
                          f"a CBF file/directory/glob or an Eiger *_master.h5 file", path=s)
    else:
        raise SourceError(f"unrecognised source {s!r}: expected a .cbf/.cbf.bz2/.cbf.gz file, a directory or "
                          f"glob of them, or an Eiger *_master.h5 file", path=s)
    if file_rate:
        if not src.frame_time or src.frame_time <= 0:
            src.close()
            raise SourceError(f"rate_hz='file' but {src.name} has no frame time "
                              f"(CBF Exposure_period / Eiger frame_time)", path=s)
        src.rate_hz = 1.0 / src.frame_time
    return src
