"""Input checking shared by the public functions: one place, one set of messages."""

from __future__ import annotations

import os
import sys

import numpy as np

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 (JetPack 6)
    import tomli as tomllib

# Kernel dtypes: every accepted input is viewed or cast to one of these, so
# Numba compiles a bounded set of specialisations (see edge.warmup).
_CAST = {
    np.dtype(np.uint8): np.uint16,
    np.dtype(np.int8): np.int32,
    np.dtype(np.int16): np.int32,
    np.dtype(np.uint16): np.uint16,
    np.dtype(np.int32): np.int32,
    np.dtype(np.uint32): np.uint32,
    np.dtype(np.int64): np.int64,
    np.dtype(np.uint64): np.float64,
    np.dtype(np.float16): np.float32,
    np.dtype(np.float32): np.float32,
    np.dtype(np.float64): np.float64,
}
KERNEL_DTYPES = (np.uint16, np.int32, np.uint32, np.int64, np.float32, np.float64)


def as_frame(frame, *, name: str = "frame") -> np.ndarray:
    """Return ``frame`` as a C-contiguous 2-D array of a kernel dtype.

    Non-native byte order and non-contiguous views are copied; the caller's
    array is never modified.

    Raises
    ------
    ValueError
        Not 2-D, empty, or of an unsupported dtype (bool, complex, object...).
    """
    arr = np.asarray(frame)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (rows, columns), got {arr.ndim}-D with shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape})")
    key = arr.dtype.newbyteorder("=") if arr.dtype.byteorder not in ("=", "|") else arr.dtype
    target = _CAST.get(np.dtype(key))
    if target is None:
        raise ValueError(
            f"{name} has unsupported dtype {arr.dtype}; use an integer or float dtype "
            f"(uint8/16/32, int8/16/32/64, float16/32/64)"
        )
    return np.ascontiguousarray(arr, dtype=target)


def as_mask(mask, shape: tuple[int, int], *, name: str = "mask") -> np.ndarray | None:
    """Return ``mask`` as a C-contiguous bool array of ``shape`` (True = valid), or None."""
    if mask is None:
        return None
    arr = np.asarray(mask)
    if arr.shape != tuple(shape):
        raise ValueError(f"{name} shape {arr.shape} does not match frame shape {tuple(shape)}")
    if arr.dtype != bool:
        if arr.dtype.kind in "iu" and np.isin(arr, (0, 1)).all():
            arr = arr.astype(bool)
        else:
            raise ValueError(f"{name} must be boolean with True = valid pixel, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr)


def as_center(center, shape: tuple[int, int]) -> tuple[float, float]:
    """Validate a beam centre ``(x, y)`` in pixels; default: the frame centre."""
    if center is None:
        return ((shape[1] - 1) / 2.0, (shape[0] - 1) / 2.0)
    try:
        x, y = (float(v) for v in center)
    except (TypeError, ValueError):
        raise ValueError(f"center must be (x, y) in pixels, got {center!r}") from None
    if not (np.isfinite(x) and np.isfinite(y)):
        raise ValueError(f"center must be finite, got {center!r}")
    return (x, y)


def check_geometry(geometry, shape: tuple[int, int]) -> None:
    if geometry is not None and tuple(geometry.shape) != tuple(shape):
        raise ValueError(f"geometry shape {geometry.shape} does not match frame shape {tuple(shape)}")


def parse_toml(text: str, where: str, error: type[Exception]) -> dict:
    """Parse TOML ``text`` read from ``where``; a syntax error is one ``error`` naming it."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{where}: invalid TOML: {exc}") from None


def read_toml(path: str | os.PathLike, error: type[Exception], what: str) -> dict:
    """Read and parse a TOML file; every failure is one ``error`` that names
    the file and says what it is (``what``, e.g. ``"site file"``)."""
    where = os.fspath(path)
    try:
        with open(where, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise error(f"{what} not found: {where}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"cannot read {what} {where}: {exc}") from None
    return parse_toml(text, where, error)
