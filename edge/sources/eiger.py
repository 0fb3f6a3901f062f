"""Replay of Eiger/NeXus HDF5 acquisitions (``*_master.h5`` plus linked data files)."""

from __future__ import annotations

import math
import os
import re
import stat
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
# pixel types the kernels take (edge._validate); complex, bool, strings are refused at open
_PIXEL_TYPES = {np.dtype(t) for t in (np.uint8, np.uint16, np.uint32, np.uint64, np.int8, np.int16, np.int32,
                                      np.int64, np.float16, np.float32, np.float64)}


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
    ``count_time`` (s; None when absent). Each header value must be one real
    number, and the geometry must be plausible (:class:`Geometry`).

    Refused at open with :class:`SourceError` naming the file and the dataset,
    before anything is allocated or a data file is opened: a missing or
    malformed field (a string, an array, a soft-link loop), a missing data
    file, an external link (or a chain of them) to anything but a regular
    file (a FIFO or a device would block HDF5 for ever), frames larger than
    ``max_frame_bytes``, and pixel types the kernels do not take (complex,
    bool, strings). A frame that fails to read or decompress raises
    :class:`FrameError` naming the file, the dataset and the frame.

    Parameters
    ----------
    master : path
        The master file.
    **kw
        :class:`FrameSource` options (``rate_hz``, ``n_frames``, ``loop``, ``preload``, ``copy``,
        ``max_frame_bytes``).
    """

    def __init__(self, master: str | os.PathLike, **kw: Any) -> None:
        super().__init__(**kw)
        h5py = _import_h5()
        self.path = os.fspath(master)
        if not os.path.exists(self.path):
            raise SourceError(f"Eiger master file not found: {self.path!r}", path=self.path)
        _check_regular(self.path, f"Eiger master file {self.path}")
        try:
            self._file = h5py.File(self.path, "r")
        except Exception as exc:  # OSError, and others on damaged files
            raise SourceError(f"{self.path}: cannot open HDF5 master file: {exc}", path=self.path) from exc
        try:
            self._datasets = self._open_datasets()
            self.geometry, self.frame_time, self.count_time = self._geometry()
        except SourceError:
            self._file.close()
            raise
        except Exception as exc:  # h5py raises many types on damaged or hostile files
            self._file.close()
            raise SourceError(f"{self.path}: cannot read the Eiger master file: {type(exc).__name__}: {exc}",
                              path=self.path) from exc
        except BaseException:
            self._file.close()
            raise
        self._starts = np.cumsum([0] + [len(d) for _, d in self._datasets])
        self.dtype = self._datasets[0][1].dtype if self._datasets else None
        self.name = self.path

    # -- metadata ----------------------------------------------------------------
    def _field(self, path: str, *, required: bool = True, units: Mapping[str, float] | None = None,
               default_unit: str | None = None) -> float | None:
        """A single real number from the master file (None if absent and not required)."""
        where = f"{self.path}: {path}"
        try:
            if path not in self._file:
                if required:
                    raise SourceError(f"{self.path}: required field {path} is missing", path=self.path)
                return None
            ds = self._file[path]
            if not hasattr(ds, "dtype") or not hasattr(ds, "shape"):
                raise SourceError(f"{where} must be a dataset holding one number, got {type(ds).__name__}",
                                  path=self.path)
            if ds.dtype.kind not in "iuf" or ds.size != 1:
                raise SourceError(f"{where} must hold one real number, got dtype {ds.dtype} with shape {ds.shape}",
                                  path=self.path)
            value = float(np.asarray(ds[()]).reshape(-1)[0])
            unit = ds.attrs.get("units", default_unit) if units is not None else None
        except SourceError:
            raise
        except Exception as exc:  # soft-link loops, damaged objects
            raise SourceError(f"{where}: cannot read: {type(exc).__name__}: {exc}", path=self.path) from exc
        if units is None:
            return value
        if isinstance(unit, np.ndarray) and unit.size == 1:
            unit = unit.reshape(-1)[0]
        if isinstance(unit, bytes):
            unit = unit.decode("utf-8", "replace")
        scale = units.get(str(unit).strip().lower())
        if scale is None:
            raise SourceError(f"{where} has unsupported units {unit!r} (known: {sorted(units)})", path=self.path)
        return value * scale

    def _geometry(self) -> tuple[Geometry, float | None, float | None]:
        px = self._field(f"{_DET}/x_pixel_size", units=_LENGTH_UNITS, default_unit="m")
        py = self._field(f"{_DET}/y_pixel_size", required=False, units=_LENGTH_UNITS, default_unit="m")
        if py is not None and not math.isclose(px, py, rel_tol=1e-6):
            raise SourceError(f"{self.path}: non-square pixels ({px} x {py} mm) are not supported", path=self.path)
        dist = self._field(f"{_DET}/detector_distance", units=_LENGTH_UNITS, default_unit="m")
        wl = self._field("/entry/instrument/beam/incident_wavelength", units=_WAVE_UNITS, default_unit="angstrom")
        bx = self._field(f"{_DET}/beam_center_x")
        by = self._field(f"{_DET}/beam_center_y")
        ft = self._field(f"{_DET}/frame_time", required=False)
        ct = self._field(f"{_DET}/count_time", required=False)
        for name, t in (("frame_time", ft), ("count_time", ct)):
            if t is not None and not (math.isfinite(t) and 0 < t <= 3600):
                raise SourceError(f"{self.path}: {_DET}/{name} must be in (0, 3600] s, got {t!r}", path=self.path)
        cutoff = self._field(f"{_SPEC}/countrate_correction_count_cutoff", required=False)
        shape = tuple(int(n) for n in self._datasets[0][1].shape[1:])
        mask = self._pixel_mask(shape)
        try:
            geom = Geometry(shape, px, dist, wl, (bx, by), mask=mask, saturation=cutoff)
        except ValueError as exc:
            raise SourceError(f"{self.path}: invalid geometry: {exc}", path=self.path) from exc
        return geom, ft, ct

    def _pixel_mask(self, shape: tuple[int, int]) -> np.ndarray | None:
        """``detectorSpecific/pixel_mask`` as True = valid, shape checked before reading it."""
        path = f"{_SPEC}/pixel_mask"
        try:
            if path not in self._file:
                return None
            ds = self._file[path]
            if not hasattr(ds, "dtype") or ds.dtype.kind not in "iub" or tuple(ds.shape) != shape:
                raise SourceError(f"{self.path}: {path} must be an integer array of the frame shape {shape}, got "
                                  f"{getattr(ds, 'dtype', type(ds).__name__)} {getattr(ds, 'shape', '')}",
                                  path=self.path)
            return np.asarray(ds[()]) == 0
        except SourceError:
            raise
        except Exception as exc:
            raise SourceError(f"{self.path}: {path}: cannot read: {type(exc).__name__}: {exc}",
                              path=self.path) from exc

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
        """The file holding ``/entry/data/<name>`` (the external link's file, or the master)."""
        link = self._file["/entry/data"].get(name, getlink=True)
        fn = getattr(link, "filename", None)
        if not fn:
            return self.path
        return fn if os.path.isabs(fn) else os.path.join(os.path.dirname(self.path), fn)

    def _dataset(self, name: str, frame0: int):
        h5py = _import_h5()
        try:
            link = self._file["/entry/data"].get(name, getlink=True)
            target = self._link_target(name)
        except Exception as exc:
            raise SourceError(f"{self.path}: /entry/data/{name}: cannot read the link: {type(exc).__name__}: {exc}",
                              path=self.path, frame=frame0) from exc
        if isinstance(link, h5py.ExternalLink):
            # HDF5 would open a FIFO or a device and wait forever: check the
            # whole chain of external links before h5py follows it
            _check_external(self.path, link, f"{self.path}: /entry/data/{name} (frames from {frame0})")
        try:
            ds = self._file["/entry/data"][name]
        except Exception as exc:  # KeyError, OSError; RuntimeError on soft-link loops
            why = "missing" if not os.path.exists(target) else "unreadable (truncated or corrupt?)"
            raise SourceError(f"{self.path}: /entry/data/{name} (frames from {frame0}) -> data file {target} is "
                              f"{why}: {exc}", path=target, frame=frame0) from exc
        if not isinstance(ds, h5py.Dataset) or ds.ndim != 3:
            raise SourceError(f"{target}: /entry/data/{name} must be a 3-D dataset (frames, rows, columns), got "
                              f"{getattr(ds, 'shape', type(ds).__name__)}", path=target, frame=frame0)
        if np.dtype(ds.dtype).newbyteorder("=") not in _PIXEL_TYPES:
            raise SourceError(f"{target}: /entry/data/{name} has pixel type {ds.dtype}; expected an integer or "
                              f"float type (uint8/16/32/64, int8/16/32/64, float16/32/64)", path=target, frame=frame0)
        check_frame_size(ds.shape[1:], ds.dtype.itemsize, self.max_frame_bytes,
                         where=f"{target}: /entry/data/{name}", path=target, frame=frame0)
        return ds

    def _open_datasets(self) -> list[tuple[str, Any]]:
        out, start = [], 0
        for name in self._names():
            ds = self._dataset(name, start)
            if out and tuple(ds.shape[1:]) != tuple(out[0][1].shape[1:]):
                raise SourceError(f"{self._link_target(name)}: frames of /entry/data/{name} are {ds.shape[1:]}, "
                                  f"expected {out[0][1].shape[1:]}", path=self._link_target(name), frame=start)
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


def _check_external(parent: str, link, what: str, depth: int = 0) -> None:
    """Every file an external link (and the links it leads to) may open is a regular file."""
    h5py = _import_h5()
    if depth > 8:
        raise SourceError(f"{what}: more than 8 nested external links", path=parent)
    fn = link.filename
    candidates = [fn] if os.path.isabs(fn) else [os.path.join(os.path.dirname(parent), fn), fn]
    for target in dict.fromkeys(candidates):
        if os.path.lexists(target):
            _check_regular(target, f"{what} -> data file {target}")
            try:
                with h5py.File(target, "r") as f:
                    nxt = f.get(link.path, getlink=True)
            except Exception:  # unreadable: reported when the dataset is opened
                continue
            if isinstance(nxt, h5py.ExternalLink):
                _check_external(target, nxt, f"{what} -> {target}:{link.path}", depth + 1)


def _check_regular(path: str, what: str) -> None:
    """Refuse anything but a regular file (a FIFO or a device would block the open)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise SourceError(f"{what}: cannot stat: {exc.strerror or exc}", path=path) from exc
    if not stat.S_ISREG(mode):
        kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a directory" if stat.S_ISDIR(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "not a regular file")
        raise SourceError(f"{what} is {kind}, not a regular file: refused", path=path)


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
