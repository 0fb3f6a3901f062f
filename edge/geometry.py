"""Detector geometry: pixel grid, beam centre, distance, wavelength and mask.

Coordinate conventions (used everywhere in :mod:`edge`)
-------------------------------------------------------
* Frames are 2-D arrays indexed ``frame[row, column]`` = ``frame[y, x]``.
* Pixel *centres* sit at integer coordinates: pixel ``(y=0, x=0)`` covers
  ``-0.5 <= x < 0.5``. The beam centre ``(x, y)`` uses the same convention.
* Distances on the detector are in pixels unless a name ends in ``_mm``.
* Wavelength and resolution (d-spacing) are in Angstrom.
* The detector is flat and perpendicular to the beam.
* Masks are boolean with ``True`` = valid pixel.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

__all__ = ["Geometry", "DetectorLayout", "LAYOUTS", "layout_mask"]


@dataclass(frozen=True)
class DetectorLayout:
    """A modular detector: modules of ``module_shape`` separated by gaps.

    Parameters
    ----------
    name : str
        Layout name, e.g. ``"eiger-4m"``.
    modules : (int, int)
        Number of modules as (rows, columns).
    module_shape : (int, int)
        Pixels per module as (rows, columns).
    gap : (int, int)
        Gap width in pixels between modules as (rows, columns).
    pixel_size_mm : float
        Pixel pitch in mm.
    """

    name: str
    modules: tuple[int, int]
    module_shape: tuple[int, int] = (514, 1030)
    gap: tuple[int, int] = (37, 10)
    pixel_size_mm: float = 0.075

    @property
    def shape(self) -> tuple[int, int]:
        (mr, mc), (pr, pc), (gr, gc) = self.modules, self.module_shape, self.gap
        return (mr * pr + (mr - 1) * gr, mc * pc + (mc - 1) * gc)

    def gap_mask(self) -> np.ndarray:
        """Boolean mask, True on module pixels and False in the gaps."""
        mask = np.zeros(self.shape, dtype=bool)
        (mr, mc), (pr, pc), (gr, gc) = self.modules, self.module_shape, self.gap
        for i in range(mr):
            for j in range(mc):
                r0, c0 = i * (pr + gr), j * (pc + gc)
                mask[r0 : r0 + pr, c0 : c0 + pc] = True
        return mask


#: EIGER-like layouts from 1M (1065 x 1030) to 16M (4371 x 4150) pixels.
LAYOUTS: dict[str, DetectorLayout] = {
    "1m": DetectorLayout("eiger-1m", (2, 1)),
    "4m": DetectorLayout("eiger-4m", (4, 2)),
    "9m": DetectorLayout("eiger-9m", (6, 3)),
    "16m": DetectorLayout("eiger-16m", (8, 4)),
    "pilatus-6m": DetectorLayout("pilatus-6m", (12, 5), (195, 487), (17, 7), 0.172),
}


def layout_mask(name: str) -> np.ndarray:
    """Module-gap mask (True = valid) of a named layout in :data:`LAYOUTS`."""
    try:
        return LAYOUTS[name.lower()].gap_mask()
    except KeyError:
        raise ValueError(f"unknown detector layout {name!r}; known: {sorted(LAYOUTS)}") from None


# Plausible ranges: anything outside is a damaged or misread header (a
# metres/millimetres mix-up, a beam centre of 1e300) and would overflow or
# silently give nonsense resolutions.
_RANGES = {
    "pixel_size_mm": (1e-3, 10.0, "mm"),       # 1 um .. 1 cm
    "distance_mm": (1e-1, 1e5, "mm"),          # 0.1 mm .. 100 m
    "wavelength_A": (1e-3, 100.0, "Angstrom"),  # electrons .. soft X-rays
}
_BEAM_SPAN = 10  # beam centre within this many detector sizes of the origin


def _integer(v) -> int:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        if isinstance(v, (float, np.floating)) and float(v).is_integer():
            return int(v)
        raise TypeError(v)
    return int(v)


def _real(v, name: str) -> float:
    """A real number as float (no bool, str, complex or array)."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        if isinstance(v, np.ndarray) and v.shape == () and v.dtype.kind in "iuf":
            return float(v)
        raise ValueError(f"{name} must be a real number, got {v!r} ({type(v).__name__})")
    return float(v)


@dataclass(frozen=True, eq=False)
class Geometry:
    """Geometry of a flat detector perpendicular to the beam.

    Parameters
    ----------
    shape : (int, int)
        Frame shape as (rows, columns).
    pixel_size_mm : float
        Pixel pitch in mm (square pixels).
    distance_mm : float
        Sample-to-detector distance in mm.
    wavelength_A : float
        X-ray wavelength in Angstrom.
    beam_center : (float, float)
        Direct-beam position ``(x, y)`` in pixels (column, row).
    mask : ndarray of bool, optional
        Static mask of bad pixels and gaps, True = valid. Shape must be ``shape``.
    saturation : float, optional
        Count above which a pixel is overloaded (the detector's count cutoff).

    Notes
    -----
    Derived maps (:attr:`radius`, :attr:`resolution`) are computed on first use
    and cached on the instance, so build a Geometry once per run, not per frame.
    """

    shape: tuple[int, int]
    pixel_size_mm: float
    distance_mm: float
    wavelength_A: float
    beam_center: tuple[float, float]
    mask: np.ndarray | None = field(default=None, repr=False)
    saturation: float | None = None
    # per-instance cache of derived maps keyed by parameters (e.g. radial bins)
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            shape = tuple(_integer(s) for s in self.shape)
        except (TypeError, ValueError):
            raise ValueError(f"shape must be (rows, columns) of integers, got {self.shape!r}") from None
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(f"shape must be (rows, columns) with both >= 1, got {self.shape!r}")
        object.__setattr__(self, "shape", shape)
        for name, (lo, hi, unit) in _RANGES.items():
            value = _real(getattr(self, name), name)
            if not lo <= value <= hi:
                raise ValueError(f"{name} must be a finite number in [{lo:g}, {hi:g}] {unit}, got {value!r}")
            object.__setattr__(self, name, value)
        try:
            bc = tuple(_real(v, "beam_center") for v in self.beam_center)
        except TypeError:
            raise ValueError(f"beam_center must be (x, y) in pixels, got {self.beam_center!r}") from None
        if len(bc) != 2:
            raise ValueError(f"beam_center must be (x, y) in pixels, got {self.beam_center!r}")
        # off the detector is legitimate (an offset detector), 1e300 is not:
        # radii and angles must stay finite
        span = _BEAM_SPAN * max(shape)
        if not all(math.isfinite(v) and -span <= v <= span for v in bc):
            raise ValueError(f"beam_center must be finite (x, y) in pixels within {_BEAM_SPAN} detector sizes "
                             f"(|x|, |y| <= {span}), got {self.beam_center!r}")
        object.__setattr__(self, "beam_center", bc)
        if self.saturation is not None:
            sat = _real(self.saturation, "saturation")
            if not (math.isfinite(sat) and sat > 0):
                raise ValueError(f"saturation must be a positive finite count or None, got {self.saturation!r}")
        if self.mask is not None:
            mask = np.asarray(self.mask)
            if mask.shape != shape:
                raise ValueError(f"mask shape {mask.shape} does not match detector shape {shape}")
            if mask.dtype != bool:
                raise ValueError(f"mask must be boolean (True = valid pixel), got dtype {mask.dtype}")
            mask = np.ascontiguousarray(mask)
            mask.setflags(write=False)
            object.__setattr__(self, "mask", mask)

    # -- construction helpers -------------------------------------------------
    @classmethod
    def for_layout(
        cls,
        name: str = "4m",
        *,
        distance_mm: float = 150.0,
        wavelength_A: float = 1.0,
        beam_center: tuple[float, float] | None = None,
        saturation: float | None = None,
    ) -> "Geometry":
        """Geometry of a named layout (:data:`LAYOUTS`), beam centred by default."""
        try:
            layout = LAYOUTS[name.lower()]
        except KeyError:
            raise ValueError(f"unknown detector layout {name!r}; known: {sorted(LAYOUTS)}") from None
        ny, nx = layout.shape
        if beam_center is None:
            beam_center = ((nx - 1) / 2.0, (ny - 1) / 2.0)
        return cls(layout.shape, layout.pixel_size_mm, distance_mm, wavelength_A, beam_center,
                   mask=layout.gap_mask(), saturation=saturation)

    @classmethod
    def from_cbf_header(cls, header: str, shape: tuple[int, int],
                        mask: np.ndarray | None = None) -> "Geometry":
        """Parse a PILATUS mini-CBF header (``_array_data.header_contents``).

        Raises
        ------
        ValueError
            If a required field (pixel size, distance, wavelength, beam centre)
            is missing.
        """
        def grab(pattern: str, what: str) -> list[float]:
            m = re.search(pattern, header)
            if m is None:
                raise ValueError(f"CBF header has no {what}")
            return [float(g) for g in m.groups()]

        num = r"([-+0-9.eE]+)"
        (px,) = grab(rf"Pixel_size\s+{num}\s*m", "Pixel_size")[:1]
        (dist,) = grab(rf"Detector_distance\s+{num}\s*m", "Detector_distance")
        (wl,) = grab(rf"Wavelength\s+{num}\s*A", "Wavelength")
        bx, by = grab(rf"Beam_xy\s*\(\s*{num}\s*,\s*{num}\s*\)", "Beam_xy")
        m = re.search(rf"Count_cutoff\s+{num}", header)
        sat = float(m.group(1)) if m else None
        return cls(shape, px * 1e3, dist * 1e3, wl, (bx, by), mask=mask, saturation=sat)

    def with_beam_center(self, beam_center: tuple[float, float]) -> "Geometry":
        """Copy with another beam centre (derived maps are recomputed lazily)."""
        return Geometry(self.shape, self.pixel_size_mm, self.distance_mm, self.wavelength_A,
                        beam_center, mask=self.mask, saturation=self.saturation)

    # -- derived maps ---------------------------------------------------------
    @cached_property
    def valid(self) -> np.ndarray:
        """Static validity mask (True = valid); all True when no mask is set."""
        if self.mask is None:
            m = np.ones(self.shape, dtype=bool)
            m.setflags(write=False)
            return m
        return self.mask

    @cached_property
    def radius(self) -> np.ndarray:
        """Distance of each pixel centre from the beam centre, in pixels (float32)."""
        ny, nx = self.shape
        bx, by = self.beam_center
        y = (np.arange(ny, dtype=np.float64) - by)[:, None]
        x = (np.arange(nx, dtype=np.float64) - bx)[None, :]
        r = np.sqrt(x * x + y * y).astype(np.float32)
        r.setflags(write=False)
        return r

    def two_theta(self, radius_px: np.ndarray | float) -> np.ndarray:
        """Scattering angle 2-theta in radians at a radius in pixels."""
        return np.arctan(np.asarray(radius_px, dtype=np.float64) * self.pixel_size_mm / self.distance_mm)

    def d_spacing(self, radius_px: np.ndarray | float) -> np.ndarray:
        """Resolution d = lambda / (2 sin theta) in Angstrom (inf at the beam centre)."""
        theta = 0.5 * self.two_theta(radius_px)
        with np.errstate(divide="ignore"):
            return self.wavelength_A / (2.0 * np.sin(theta))

    def radius_for_d(self, d_A: np.ndarray | float) -> np.ndarray:
        """Inverse of :meth:`d_spacing`: radius in pixels where resolution is ``d_A``."""
        d = np.asarray(d_A, dtype=np.float64)
        s = self.wavelength_A / (2.0 * d)
        with np.errstate(invalid="ignore"):
            two_theta = 2.0 * np.arcsin(s)
        return np.tan(two_theta) * self.distance_mm / self.pixel_size_mm

    @cached_property
    def resolution(self) -> np.ndarray:
        """Resolution (d-spacing) of each pixel centre in Angstrom (float32)."""
        d = self.d_spacing(self.radius).astype(np.float32)
        d.setflags(write=False)
        return d

    @property
    def max_radius(self) -> float:
        """Largest pixel radius on the detector, in pixels."""
        ny, nx = self.shape
        bx, by = self.beam_center
        return float(np.hypot(max(bx, nx - 1 - bx), max(by, ny - 1 - by)))
