"""DECTRIS Stream V1 ("legacy", SIMPLON stream ``format: legacy``, port 9999): multi-part JSON + binary.

Each V1 message is a multi-part ZeroMQ message whose first part is a JSON
object with an ``htype``:

``dheader-1.0`` (``series``, ``header_detail``)
    then, unless ``header_detail`` is ``none``, the detector configuration
    (JSON: ``x_pixels_in_detector``, ``beam_center_x``, ``detector_distance``
    in m, ``wavelength`` in A, ``x_pixel_size`` in m, ...); with ``all``, pairs
    of parts ``{"htype": "dflatfield-1.0" | "dpixelmask-1.0" |
    "dcountrate_table-1.0", "shape": [x, y], "type": ...}`` + raw data.
``dimage-1.0`` (``series``, ``frame``)
    then ``{"htype": "dimage_d-1.0", "shape": [x, y], "type", "encoding",
    "size"}``, the pixel data, and ``dconfig-1.0`` (start/stop/real time, ns).
    Encodings: ``"<"`` (raw little-endian), ``"lz4<"`` (one LZ4 block) and
    ``"bs8-lz4<"`` / ``"bs16-lz4<"`` / ``"bs32-lz4<"`` (bitshuffle + LZ4, the
    same framing as Stream V2's ``bslz4``).
``dseries_end-1.0`` (``series``)

:func:`decode_legacy` turns them into the same message maps as
:func:`.cbor.decode_message` (``type`` start / image / end, arrays as lazy
:class:`.cbor.MultiDimArray`), so the receiver treats both formats alike.
The single channel is called ``"threshold_1"``.
"""

from __future__ import annotations

import json
import re

import numpy as np

from .cbor import MessageError, MultiDimArray

__all__ = ["decode_legacy", "is_legacy"]

CHANNEL = "threshold_1"
_DTYPES = {"uint8": "u1", "uint16": "<u2", "uint32": "<u4", "int8": "i1", "int16": "<i2", "int32": "<i4",
           "float32": "<f4"}


def is_legacy(first_part) -> bool:
    """A Stream V1 message starts with a JSON object; a V2 message with CBOR (``d9 d9 f7``)."""
    return bytes(first_part[:1]) == b"{"


def _json(part, what: str) -> dict:
    try:
        obj = json.loads(bytes(part))
    except (ValueError, UnicodeDecodeError) as exc:
        raise MessageError(f"Stream V1 {what}: not JSON: {exc}", "cbor") from None
    if not isinstance(obj, dict):
        raise MessageError(f"Stream V1 {what}: JSON {type(obj).__name__}, not an object", "not_a_map")
    return obj


def _array(header: dict, data, what: str) -> MultiDimArray:
    shape, typ, enc = header.get("shape"), header.get("type"), header.get("encoding", "<")
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(v, int) and v >= 0 for v in shape)):
        raise MessageError(f"Stream V1 {what}: shape must be [x, y], got {shape!r:.40}", "array")
    if typ not in _DTYPES:
        raise MessageError(f"Stream V1 {what}: unsupported type {typ!r:.20}", "array")
    dtype = np.dtype(_DTYPES[typ])
    dims = (shape[1], shape[0])  # V1 shapes are [x, y]; arrays are (rows, columns)
    m = re.fullmatch(r"bs(8|16|32)-lz4<", enc or "")
    if enc == "<":
        compression = None
        if len(data) != dims[0] * dims[1] * dtype.itemsize:
            raise MessageError(f"Stream V1 {what}: {len(data)} bytes for {shape} {typ}", "array")
    elif m:
        if int(m.group(1)) != 8 * dtype.itemsize:
            raise MessageError(f"Stream V1 {what}: encoding {enc} does not match type {typ}", "array")
        compression = ("bslz4", dtype.itemsize)
    elif enc == "lz4<":
        compression = ("lz4-block", 0)
    else:
        raise MessageError(f"Stream V1 {what}: unknown encoding {enc!r:.20}", "array")
    return MultiDimArray(dims, dtype, bytes(data), compression)


def decode_legacy(parts: list) -> dict:
    """Decode one Stream V1 multi-part message into a Stream V2-like message map.

    Raises
    ------
    MessageError
        Malformed JSON, unknown ``htype``, missing parts or malformed arrays.
    """
    head = _json(parts[0], "message")
    htype = head.get("htype")
    if htype == "dseries_end-1.0":
        return {"type": "end", "series_id": head.get("series"), "series_unique_id": None}
    if htype == "dheader-1.0":
        msg: dict = {"type": "start", "series_id": head.get("series"), "series_unique_id": None,
                     "channels": [CHANNEL]}
        if len(parts) > 1:
            cfg = _json(parts[1], "detector configuration")
            for v1, v2 in (("x_pixels_in_detector", "image_size_x"), ("y_pixels_in_detector", "image_size_y"),
                           ("beam_center_x", "beam_center_x"), ("beam_center_y", "beam_center_y"),
                           ("detector_distance", "detector_distance"), ("wavelength", "incident_wavelength"),
                           ("photon_energy", "incident_energy"), ("x_pixel_size", "pixel_size_x"),
                           ("y_pixel_size", "pixel_size_y"), ("frame_time", "frame_time"),
                           ("count_time", "count_time"),
                           ("countrate_correction_count_cutoff", "countrate_correction_count_cutoff")):
                if v1 in cfg:
                    msg[v2] = cfg[v1]
            for i in range(2, len(parts) - 1):
                sub = bytes(parts[i][:64])
                if sub.startswith(b"{") and b"dpixelmask-1.0" in bytes(parts[i]):
                    mask_head = _json(parts[i], "pixel mask header")
                    msg["pixel_mask"] = {CHANNEL: _array(mask_head, parts[i + 1], "pixel mask")}
        return msg
    if htype == "dimage-1.0":
        if len(parts) < 3:
            raise MessageError(f"Stream V1 image: {len(parts)} parts, expected at least 3", "field")
        d = _json(parts[1], "image data header")
        if d.get("htype") != "dimage_d-1.0":
            raise MessageError(f"Stream V1 image: second part is {d.get('htype')!r:.30}, not dimage_d-1.0",
                               "field")
        msg = {"type": "image", "series_id": head.get("series"), "image_id": head.get("frame"),
               "data": {CHANNEL: _array(d, parts[2], "image")}}
        if len(parts) > 3:
            try:
                cfg = json.loads(bytes(parts[3]))
            except (ValueError, UnicodeDecodeError):
                cfg = {}
            for key in ("start_time", "stop_time", "real_time"):  # ns
                if isinstance(cfg.get(key), int):
                    msg[key] = [cfg[key], 1_000_000_000]
        return msg
    raise MessageError(f"unknown Stream V1 htype {htype!r:.40}", "unknown_type")
