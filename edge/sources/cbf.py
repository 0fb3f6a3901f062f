"""Replay of PILATUS-style mini-CBF files (one frame per file), read with fabio."""

from __future__ import annotations

import base64
import glob as _glob
import hashlib
import os
import re
from typing import Any, Sequence

import numpy as np

from ..geometry import Geometry
from .base import FrameSource, SourceError

__all__ = ["CbfSource", "is_cbf"]

_CBF_SUFFIXES = (".cbf", ".cbf.bz2", ".cbf.gz")


def _natural_key(path: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def is_cbf(path: str) -> bool:
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
            found = [os.path.join(p, n) for n in os.listdir(p) if is_cbf(n)]
            if not found:
                raise SourceError(f"no CBF files (*.cbf, *.cbf.bz2, *.cbf.gz) in directory {p!r}", path=p)
        elif _glob.has_magic(p):
            found = [f for f in _glob.glob(p) if is_cbf(f)]
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
