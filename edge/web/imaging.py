"""Frames for the browser: block-max downsampling, log encoding, PNG.

A detector frame is far larger than a screen. The page gets an 8-bit
greyscale PNG of the frame reduced by block maxima (a Bragg peak smaller than
a block still shows), in a log scale over the full count range so the browser
can re-map contrast (log or linear, black and white points) without a new
image. Value 255 marks a block with no valid pixel (module gap, bad pixels,
beamstop, regions masked during the run).
"""

from __future__ import annotations

import base64
import math
import struct
import zlib

import numpy as np

__all__ = ["MASKED", "LEVELS", "downsample_max", "encode_png_gray8", "frame_view", "resolution_rings"]

#: Pixel value of a block with no valid pixel.
MASKED = 255
#: Highest pixel value of a valid block (log-encoded counts 0..vmax -> 0..LEVELS).
LEVELS = 254

_RING_D_A = (20.0, 10.0, 6.0, 4.0, 3.0, 2.5, 2.0, 1.8, 1.6, 1.5, 1.4, 1.3, 1.2, 1.1, 1.0, 0.9, 0.8)


def downsample_max(frame: np.ndarray, valid: np.ndarray | None, factor: int) -> np.ndarray:
    """Block maxima of the valid, finite, non-negative pixels.

    Parameters
    ----------
    frame : ndarray, shape (ny, nx)
        Detector frame (any real dtype).
    valid : ndarray of bool, shape (ny, nx), optional
        True = valid pixel (e.g. ``Geometry.valid``).
    factor : int
        Block edge in pixels (>= 1); partial blocks at the edges are kept.

    Returns
    -------
    ndarray of float32, shape (ceil(ny / factor), ceil(nx / factor))
        Block maxima in counts; NaN where a block has no valid pixel.
    """
    if frame.ndim != 2:
        raise ValueError(f"frame must be 2-D, got shape {frame.shape}")
    factor = max(1, int(factor))
    ny, nx = frame.shape
    by, bx = -(-ny // factor), -(-nx // factor)
    # invalid pixels become -1 (below any count), then the block maxima are
    # taken with factor**2 strided np.maximum passes (a reshape-and-max over
    # small axes is ~10x slower); negative maxima = no valid pixel
    work = np.full((by * factor, bx * factor), -1.0, dtype=np.float32)
    sub = work[:ny, :nx]
    sub[...] = frame
    if valid is not None:
        np.copyto(sub, -1.0, where=~valid)
    if frame.dtype.kind == "f":
        np.copyto(sub, -1.0, where=~np.isfinite(sub))
    elif frame.dtype.kind == "u":  # the dtype maximum is EIGER's gap marker
        np.copyto(sub, -1.0, where=frame == np.iinfo(frame.dtype).max)
    out = work[0::factor, 0::factor].copy()
    for dy in range(factor):
        for dx in range(factor):
            if dy or dx:
                np.maximum(out, work[dy::factor, dx::factor], out=out)
    out[out < 0] = np.nan
    return out


def encode_png_gray8(img: np.ndarray, level: int = 1) -> bytes:
    """Encode a 2-D uint8 array as an 8-bit greyscale PNG (zlib, no filter; zlib releases the GIL)."""
    img = np.ascontiguousarray(img, dtype=np.uint8)
    if img.ndim != 2 or img.size == 0:
        raise ValueError(f"image must be a non-empty 2-D array, got shape {img.shape}")
    h, w = img.shape
    raw = np.empty((h, w + 1), dtype=np.uint8)
    raw[:, 0] = 0  # filter type None on every row
    raw[:, 1:] = img

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw.tobytes(), level)) + chunk(b"IEND", b""))


def resolution_rings(geometry, d_values=_RING_D_A) -> list[dict]:
    """Resolution rings that fall on the detector: ``[{"d": A, "r": px}, ...]``."""
    r_max = geometry.max_radius
    rings = []
    for d in d_values:
        r = float(geometry.radius_for_d(d))
        if math.isfinite(r) and 0 < r <= r_max:
            rings.append({"d": d, "r": round(r, 1)})
    return rings


def frame_view(frame: np.ndarray, geometry, peaks=None, *, max_size: int = 768) -> dict:
    """Everything the page draws for one frame, JSON-ready.

    Parameters
    ----------
    frame : ndarray, shape (ny, nx)
        Detector frame in counts.
    geometry : edge.Geometry
        Its geometry (mask, beam centre, resolution rings, saturation).
    peaks : edge.Peaks, optional
        Peaks found on it (positions in full-frame pixels).
    max_size : int
        Longest image edge in pixels sent to the browser.

    Returns
    -------
    dict
        ``png`` (base64 8-bit PNG: log counts 0..254, 255 = masked), ``factor``
        (pixels per image pixel), ``shape`` (full frame rows, columns),
        ``vmax`` (counts at level 254), ``beam_center`` (x, y px), ``rings``,
        ``peaks`` (``x``, ``y`` px), ``n_masked`` (fully masked blocks).
    """
    ny, nx = frame.shape
    factor = max(1, -(-max(ny, nx) // int(max_size)))
    blocks = downsample_max(frame, geometry.valid, factor)
    masked = np.isnan(blocks)
    vmax = float(geometry.saturation) if geometry.saturation else float(np.nanmax(blocks, initial=1.0))
    vmax = max(vmax, 1.0)
    with np.errstate(invalid="ignore"):
        lv = np.log1p(np.clip(blocks, 0.0, vmax)) * (LEVELS / math.log1p(vmax))
    img = np.where(masked, MASKED, np.rint(np.nan_to_num(lv))).astype(np.uint8)
    out = {
        "png": base64.b64encode(encode_png_gray8(img)).decode("ascii"),
        "factor": factor, "shape": [ny, nx], "vmax": vmax,
        "beam_center": [round(v, 2) for v in geometry.beam_center],
        "rings": resolution_rings(geometry), "n_masked": int(masked.sum()),
        "peaks": {"x": [], "y": []},
    }
    if peaks is not None and len(peaks):
        out["peaks"] = {"x": np.round(np.asarray(peaks.x, dtype=np.float64), 1).tolist(),
                        "y": np.round(np.asarray(peaks.y, dtype=np.float64), 1).tolist()}
    return out
