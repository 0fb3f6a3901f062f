"""Replay of Eiger/NeXus HDF5 acquisitions (``*_master.h5`` plus linked data files)."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..geometry import Geometry
from .base import FrameError, FrameSource, SourceError, check_frame_size

__all__ = ["EigerSource", "write_eiger_master"]


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
            raise FrameError(f"{target}: cannot read frame {k} (/entry/data/{name}[{j}]): "
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
