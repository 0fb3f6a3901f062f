"""Replay of PILATUS-style mini-CBF files (one frame per file), read with fabio."""

from __future__ import annotations

import base64
import bz2
import glob as _glob
import gzip
import hashlib
import io
import lzma
import math
import os
import re
import stat
import zlib
from typing import Any, Sequence

import numpy as np

from ..geometry import Geometry
from .base import FrameError, FrameSource, SourceError, check_frame_size

__all__ = ["CbfSource", "is_cbf"]

_CBF_SUFFIXES = (".cbf", ".cbf.bz2", ".cbf.gz")
_SECTION = b"--CIF-BINARY-FORMAT-SECTION--"
_STARTER = b"\x0c\x1a\x04\xd5"  # start of the binary data (CBF spec)
# fabio looks for the binary section in the first 16 blocks of 512 bytes only
_HEADER_WINDOW = 16 * 512
_HEAD_BYTES = 1 << 16  # read first: CIF header, binary section header, start of the data
# element types fabio reads (fabio.cbfimage.DATA_TYPES): name -> numpy dtype
_ELEMENT_TYPES = {
    "signed 8-bit integer": np.int8, "signed 16-bit integer": np.int16, "signed 32-bit integer": np.int32,
    "signed 64-bit integer": np.int64, "unsigned 8-bit integer": np.uint8, "unsigned 16-bit integer": np.uint16,
    "unsigned 32-bit integer": np.uint32, "unsigned 64-bit integer": np.uint64,
}


def _natural_key(path: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def is_cbf(path: str) -> bool:
    return path.lower().endswith(_CBF_SUFFIXES)


def _header_number(header: str, key: str) -> float | None:
    m = re.search(rf"{key}\s+([-+0-9.eE]+)", header)
    try:
        value = float(m.group(1)) if m else None
    except ValueError:  # "e", "1e5e5": a damaged header
        return None
    return value if value is None or math.isfinite(value) else None


def _header_text(header: dict) -> str:
    """``_array_data.header_contents`` as text (fabio gives bytes when it is not ASCII)."""
    text = header.get("_array_data.header_contents", "")
    return text.decode("latin-1") if isinstance(text, (bytes, bytearray)) else str(text)


class CbfSource(FrameSource):
    """Replay PILATUS-style mini-CBF files (one frame per file), via fabio.

    Geometry comes from the first readable file's header
    (:meth:`Geometry.from_cbf_header`); its static mask is the set of pixels
    that are negative in that frame (-1 gaps, -2 bad pixels).
    ``frame_time`` is the header's ``Exposure_period`` (s).

    Every file is read once and checked before fabio parses it: a regular
    file; the binary section marker, its MIME header up to the blank line,
    the binary start marker and all ``X-Binary-Size`` bytes present (fabio
    alone loops forever on a file cut inside that header, which is what a
    file still being written looks like); ``x-CBF_BYTE_OFFSET`` (the only
    compression fabio decodes); an element type fabio reads (int8/16/32/64,
    uint8/16/32/64, returned as that dtype); dimensions >= 1 within
    ``max_frame_bytes``, element count and ``Content-MD5``. A file that fails
    raises :class:`FrameError` (a :class:`SourceError`) naming the file, the
    frame and the reason, never a silently short or zero-filled frame;
    :meth:`frames` with ``on_error`` goes on with the next file instead.

    Parameters
    ----------
    paths : path, directory, glob or sequence of paths
        CBF files (``.cbf``, ``.cbf.bz2``, ``.cbf.gz``); directories and globs
        are expanded and sorted naturally (``img_2`` before ``img_10``); a
        sequence is replayed in the given order.
    verify_checksum : bool
        Check ``Content-MD5`` when the header has one (~10 ms per 6M frame).
    **kw
        :class:`FrameSource` options (``rate_hz``, ``n_frames``, ``loop``, ``preload``, ``copy``,
        ``max_frame_bytes``).
    """

    def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike], *, verify_checksum: bool = True,
                 **kw: Any) -> None:
        super().__init__(**kw)
        self.paths = _expand_cbf(paths)
        self.verify_checksum = verify_checksum
        # geometry from the first readable file; unreadable ones before it
        # fail again when their turn comes (one error record each in a run)
        first_error: FrameError | None = None
        for k in range(len(self.paths)):
            try:
                first, header = self._decode(k)
                break
            except FrameError as exc:
                first_error = first_error or exc
        else:
            raise first_error
        text = _header_text(header)
        try:
            self.geometry = Geometry.from_cbf_header(text, first.shape, mask=first >= 0)
        except ValueError as exc:
            raise SourceError(f"{self.paths[k]}: cannot get the geometry from the CBF header: {exc}",
                              path=self.paths[k], frame=k) from exc
        self.frame_time = _header_number(text, "Exposure_period")
        self.dtype = first.dtype
        self.name = self.paths[0] if len(self.paths) == 1 else f"{os.path.dirname(self.paths[0]) or '.'} " \
                                                               f"({len(self.paths)} CBF files)"

    def _length(self) -> int:
        return len(self.paths)

    def _decode(self, k: int) -> tuple[np.ndarray, dict]:
        from fabio.cbfimage import CbfImage

        path = self.paths[k]
        where = f"{path} (frame {k})"
        # Read the file once and check the whole layout on these bytes before
        # fabio sees them: fabio loops forever on a file cut inside its binary
        # section header (a file still being written looks like that).
        blob = _read_limited(path, 2 * self.max_frame_bytes, where=where, frame=k)
        mime = _check_layout(blob, where=where, path=path, frame=k)
        nx, ny, n, size, dtype = _binary_format(mime, self.max_frame_bytes, where=where, path=path, frame=k)
        start = blob.index(_STARTER, blob.index(_SECTION)) + len(_STARTER)
        try:
            img = CbfImage()
            # the CIF header only (_array_data.header_contents): fabio need not copy the data
            img.read(io.BytesIO(blob[:start]), only_raw=True)
            header = img.header
        except Exception as exc:  # fabio raises many types on damaged headers
            raise FrameError(f"{where}: cannot read the CBF header (corrupt or not a CBF file): "
                             f"{type(exc).__name__}: {exc}", path=path, frame=k) from exc
        raw = blob[start:start + size]
        if self.verify_checksum and "Content-MD5" in mime:
            got = base64.b64encode(hashlib.md5(raw).digest()).decode()
            if got != mime["Content-MD5"]:
                raise FrameError(f"{where}: corrupt CBF: Content-MD5 mismatch (header "
                                 f"{mime['Content-MD5']}, data {got})", path=path, frame=k)
        data = _decode_byte_offset(raw, n, dtype, where=where, path=path, frame=k)
        return data.reshape(ny, nx), header

    def _read(self, k: int) -> tuple[np.ndarray, dict, frozenset]:
        frame, header = self._decode(k)
        if frame.shape != self.geometry.shape:
            raise FrameError(f"{self.paths[k]} (frame {k}): frame shape {frame.shape} differs from the first "
                             f"file's {self.geometry.shape} (another detector? one run replays one detector)",
                             path=self.paths[k], frame=k)
        text = _header_text(header)
        info = {"path": self.paths[k], "frame_in_file": 0,
                "exposure_s": _header_number(text, "Exposure_time"),
                "frame_time_s": _header_number(text, "Exposure_period")}
        return frame, info, frozenset()


def _expand_cbf(paths) -> list[str]:
    """Files to replay. Named files must exist now; what a directory or glob
    lists is read when its turn comes (a file that vanished or is not a
    regular file is then one bad frame, not the end of the replay)."""
    named = True
    if isinstance(paths, (str, os.PathLike)):
        p = os.fspath(paths)
        if os.path.isdir(p):
            found = [os.path.join(p, n) for n in os.listdir(p) if is_cbf(n)]
            if not found:
                raise SourceError(f"no CBF files (*.cbf, *.cbf.bz2, *.cbf.gz) in directory {p!r}", path=p)
            named = False
        elif _glob.has_magic(p):
            found = [f for f in _glob.glob(p) if is_cbf(f)]
            if not found:
                raise SourceError(f"no CBF files match {p!r}", path=p)
            named = False
        else:
            found = [p]
        found.sort(key=_natural_key)
    else:  # an explicit list keeps the caller's order
        found = [os.fspath(x) for x in paths]
        if not found:
            raise SourceError("empty list of CBF files")
    for f in found if named else ():
        if not os.path.exists(f):
            raise SourceError(f"CBF file not found: {f!r}", path=f)
        if not os.path.isfile(f):
            raise SourceError(f"{f!r} is not a regular file (a directory, FIFO or device?)", path=f)
    return found


def _read_limited(path: str, max_binary: int, *, where: str, frame: int) -> bytes:
    """The file's (decompressed) bytes up to the end of its binary data.

    Reads the header first and then only the declared ``X-Binary-Size``
    (refused above ``max_binary`` before reading it). Compression is
    recognised by its magic bytes (bzip2, gzip, xz), not the name. Only a
    regular file is read (a FIFO or a device would block or never end).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # O_NONBLOCK: a FIFO must not block the open
    except FileNotFoundError as exc:
        raise FrameError(f"{where}: file not found (removed during the replay?)", path=path, frame=frame) from exc
    except OSError as exc:
        raise FrameError(f"{where}: cannot open: {exc.strerror or exc}", path=path, frame=frame) from exc
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise FrameError(f"{where}: not a regular file (a FIFO or a device?): refused", path=path, frame=frame)
        try:
            magic = fh.read(6)
            fh.seek(0)
            if magic.startswith(b"BZh"):
                stream = bz2.BZ2File(fh)
            elif magic.startswith(b"\x1f\x8b"):
                stream = gzip.GzipFile(fileobj=fh)
            elif magic.startswith(b"\xfd7zXZ"):
                stream = lzma.LZMAFile(fh)
            else:
                stream = fh
            blob = stream.read(_HEAD_BYTES)
            sec = blob.find(_SECTION, 0, _HEADER_WINDOW + len(_SECTION))
            start = blob.find(_STARTER, sec) if sec >= 0 else -1
            m = re.search(rb"X-Binary-Size:[ \t]*(\d+)", blob[sec:start]) if start >= 0 else None
            if m is None:
                return blob  # _check_layout says what is wrong
            size = int(m.group(1))
            if size > max_binary:
                raise FrameError(f"{where}: X-Binary-Size {size} bytes exceeds what a frame within max_frame_bytes "
                                 f"can take ({max_binary}): refused before reading", path=path, frame=frame)
            need = start + len(_STARTER) + size - len(blob)
            if need > 0:
                blob += stream.read(need)
            return blob
        except (EOFError, OSError, zlib.error, lzma.LZMAError) as exc:  # truncated or corrupt compressed stream
            raise FrameError(f"{where}: cannot read CBF (truncated or corrupt compressed file): "
                             f"{type(exc).__name__}: {exc}", path=path, frame=frame) from exc


def _check_layout(blob: bytes, *, where: str, path: str, frame: int) -> dict[str, str]:
    """Check that the binary section is complete; return its MIME header fields.

    The CBF layout: CIF text, ``--CIF-BINARY-FORMAT-SECTION--``, MIME header
    lines, a blank line, the start marker 0C 1A 04 D5, ``X-Binary-Size``
    bytes of data. With the start marker and all the data present, fabio's
    parser terminates.
    """
    def refuse(why: str) -> FrameError:
        return FrameError(f"{where}: cannot read CBF (truncated or not a CBF file): {why}", path=path, frame=frame)

    sec = blob.find(_SECTION, 0, _HEADER_WINDOW + len(_SECTION))
    if sec < 0 or sec + len(_SECTION) > _HEADER_WINDOW:
        if b"_array_data" not in blob[:_HEADER_WINDOW]:
            raise refuse("no CIF header")
        raise refuse(f"no {_SECTION.decode()} marker in the first {_HEADER_WINDOW} bytes")
    body = sec + len(_SECTION)
    start = blob.find(_STARTER, body)
    if start < 0:
        raise refuse(f"the file ends inside the binary section header ({len(blob)} bytes, no binary start marker)")
    head = blob[body:start]
    text = head.decode("latin-1")
    mime: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            mime[key.strip()] = value.strip(' "\t;')
    # a MIME parameter of Content-Type, on its own line or not
    m = re.search(r'conversions\s*=\s*"?([^";\s]*)', text)
    mime["conversions"] = m.group(1) if m else ""
    try:
        size = int(mime["X-Binary-Size"])
    except (KeyError, ValueError):
        raise refuse(f"X-Binary-Size missing or not an integer ({mime.get('X-Binary-Size')!r})") from None
    if size < 0:
        raise refuse(f"negative X-Binary-Size {size}")
    have = len(blob) - start - len(_STARTER)
    if have < size:
        raise FrameError(f"{where}: truncated CBF: {have} of {size} binary bytes present", path=path, frame=frame)
    return mime


def _binary_format(mime: dict[str, str], max_frame_bytes: int, *, where: str, path: str, frame: int):
    """``(nx, ny, n, size, dtype)`` from the binary section header, all checked."""
    conv = mime.get("conversions", "")
    if conv != "x-CBF_BYTE_OFFSET":
        raise FrameError(f"{where}: unsupported CBF compression {conv!r}: fabio (and so this reader) decodes "
                         f"x-CBF_BYTE_OFFSET only (convert with CBFlib's cbf2cbf or DIALS' dials.export)",
                         path=path, frame=frame)
    etype = mime.get("X-Binary-Element-Type", "signed 32-bit integer")
    if etype not in _ELEMENT_TYPES:
        raise FrameError(f"{where}: unsupported CBF element type {etype!r}; known: {sorted(_ELEMENT_TYPES)}",
                         path=path, frame=frame)
    dtype = np.dtype(_ELEMENT_TYPES[etype])
    dims = []
    for key in ("X-Binary-Size-Fastest-Dimension", "X-Binary-Size-Second-Dimension"):
        try:
            dims.append(int(mime[key]))
        except (KeyError, ValueError):
            raise FrameError(f"{where}: {key} missing or not an integer ({mime.get(key)!r})",
                             path=path, frame=frame) from None
    third = mime.get("X-Binary-Size-Third-Dimension", "1")
    if third.strip() not in ("1", ""):
        raise FrameError(f"{where}: X-Binary-Size-Third-Dimension = {third}: multi-frame CBFs are not supported",
                         path=path, frame=frame)
    nx, ny = dims
    check_frame_size((ny, nx), dtype.itemsize, max_frame_bytes, where=where, path=path, frame=frame)
    n = nx * ny
    declared = mime.get("X-Binary-Number-of-Elements")
    if declared is not None and declared != str(n):
        raise FrameError(f"{where}: corrupt CBF: X-Binary-Number-of-Elements {declared} != {ny} x {nx}",
                         path=path, frame=frame)
    size = int(mime["X-Binary-Size"])
    if n > size:  # byte offset takes at least one byte per element
        raise FrameError(f"{where}: corrupt CBF: {ny} x {nx} elements cannot fit in {size} binary bytes",
                         path=path, frame=frame)
    return nx, ny, n, size, dtype


def _decode_byte_offset(raw: bytes, n: int, dtype: np.dtype, *, where: str, path: str, frame: int) -> np.ndarray:
    """Decode exactly ``n`` byte-offset elements of ``dtype`` (fabio's decoder)."""
    from fabio.compression import decByteOffset

    wide = dtype != np.int32
    try:
        # one element more than declared exposes trailing data
        data = np.asarray(decByteOffset(raw, size=n + 1, dtype="int64" if wide else "int32"))
    except Exception as exc:
        raise FrameError(f"{where}: corrupt CBF: byte-offset data do not decode: {type(exc).__name__}: {exc}",
                         path=path, frame=frame) from exc
    if len(data) != n:
        got = f"more than {n}" if len(data) > n else f"only {len(data)}"
        raise FrameError(f"{where}: corrupt CBF: {got} elements decoded, the header declares {n}",
                         path=path, frame=frame)
    if wide:
        # writers (CBFlib, fabio) take differences modulo the element width:
        # wrap-around on the cast is the format, not an error
        data = data.astype(dtype)
    return np.ascontiguousarray(data)
