"""Frame simulator with ground truth: the embedded default frame source.

Physically plausible still frames of a crystal on a pixel-array detector:

* Bragg spots: 2-D Gaussian profiles integrated exactly over each pixel (erf
  differences), Wilson-like (exponential) intensities falling off with
  resolution, a minimum separation so the truth is unambiguous;
* background: air scatter falling with radius, a broad solvent ring near
  3.2 A, a flat floor, all scaled by flux, then Poisson noise;
* optional ice rings at the ice Ih d-spacings; module gaps (-1), known bad
  pixels (-2), unknown dead (0) and hot pixels; a beamstop disc with its arm.

Everything is reproducible from ``seed``. Layouts are EIGER-like from 1M
(1065 x 1030) to 16M (4371 x 4150), see :data:`edge.geometry.LAYOUTS`.

Anomaly knobs (used by the anomaly model's training data and by scripted
scenarios): ``flux=0`` (no beam), ``crystal=False`` (blank), ``beam_offset``
(beam away from where the geometry says), ``overload`` (spots far above the
count cutoff), ``dead_modules`` / ``hot_cluster``; ``ice_width`` and
``ice_texture`` (sharp to broad, whole or partial rings) and ``dark_counts``
for the photon-counting regime.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import math

from .geometry import LAYOUTS, Geometry

__all__ = ["SimConfig", "SimFrame", "simulate", "ICE_D_SPACINGS", "spot_snr", "background_profile"]

#: Ice Ih powder lines (Angstrom) with relative intensities.
ICE_D_SPACINGS = np.array([3.897, 3.669, 3.441, 2.671, 2.249, 2.072, 1.948, 1.918, 1.883, 1.721])
ICE_REL_INTENSITY = np.array([1.0, 0.6, 0.55, 0.25, 0.3, 0.2, 0.05, 0.15, 0.12, 0.04])


@dataclass(frozen=True)
class SimConfig:
    """Parameters of one simulated frame (all lengths in pixels unless noted).

    Attributes
    ----------
    layout : str
        Detector layout name ("1m", "4m", "9m", "16m").
    distance_mm, wavelength_A : float
        Detector distance and wavelength.
    beam_center : (float, float) or None
        Where the geometry says the beam is ``(x, y)``; default the centre.
    beam_offset : (float, float)
        True beam position minus ``beam_center`` (anomaly: beam off centre).
    flux : float
        Scales background and spots; 0 = no beam (only dark noise remains).
    crystal : bool
        False gives a blank frame (beam on, no diffraction).
    n_spots : int
        Number of Bragg spots (before the minimum-separation cull).
    spot_sigma : (float, float)
        Range of spot profile sigma in pixels.
    mean_intensity : float
        Mean spot intensity (counts) at low resolution; Wilson-like falloff.
    b_factor : float
        Resolution falloff ``exp(-b / (4 d^2))`` in A^2.
    d_min : float
        Highest resolution of spots (A).
    background : float
        Background scale (counts per pixel at the solvent ring peak).
    ice_rings : bool
        Add ice Ih rings.
    ice_strength : float
        Ice ring peak counts per pixel (strongest line).
    ice_width : float or None
        Gaussian width (px) of every ice line; None draws 1.0-2.5 px.
    ice_texture : float
        0 = whole rings (powder); > 0 = partial, textured rings: the rings'
        counts are modulated around the azimuth by ``exp(k (cos(n (phi -
        phi0)) - 1))`` with ``k = 6 * ice_texture`` and n = 1..3 (arcs),
        normalised to the same azimuthal mean, so the ring's total counts do
        not change.
    saturation : float
        Count cutoff; values are clipped to it.
    overload : float
        Multiplies spot intensities (anomaly: saturation when large).
    n_hot, n_dead, n_bad : int
        Unknown hot pixels, unknown dead pixels, known bad pixels (-2).
    beamstop_radius : float
        Beamstop shadow radius in pixels (0 = none).
    dead_modules : int
        Modules reading zero (anomaly: detector fault).
    hot_cluster : bool
        A cluster of hot pixels (anomaly: detector fault).
    min_separation : float
        Minimum distance between spot centres in pixels.
    beamstop_arm_angle : float or None
        Direction of the beamstop arm in degrees (0 = towards +x, 90 = +y);
        None = disc only.
    beamstop_offset : (float, float)
        Beamstop (shadow disc and arm origin) position minus the true beam
        position, in pixels; (0, 0) = concentric (the default).
    direct_beam : float
        Peak expected counts of a direct beam leaking past the beamstop, a
        Gaussian of sigma ``direct_beam_sigma`` px at the true beam position
        (anomaly: saturation when above ``saturation``); 0 = none.
    direct_beam_sigma : float
        Width (px) of the leaking direct beam.
    stripes : int
        Faulty readout bands (anomaly: detector fault): each is 4-16 rows or
        columns across one module, reading zero or with extra counts.
    bad_asics : int
        Faulty 256 x 256 readout chips (anomaly: detector fault), dead or hot.
    hot_saturated : int
        Isolated pixels stuck at the count cutoff (a normal detector defect).
    dark_counts : float or None
        Mean dark counts per pixel added to every frame (Poisson); None =
        0.01 on frames without beam and 0 otherwise (the original behaviour).
    dtype : str
        Output dtype ("int32" with -1/-2 markers, or "uint32"/"uint16" with
        markers mapped to the dtype maximum and 0).
    """

    layout: str = "1m"
    distance_mm: float = 120.0
    wavelength_A: float = 0.98
    beam_center: tuple[float, float] | None = None
    beam_offset: tuple[float, float] = (0.0, 0.0)
    flux: float = 1.0
    crystal: bool = True
    n_spots: int = 300
    spot_sigma: tuple[float, float] = (0.6, 1.1)
    mean_intensity: float = 400.0
    b_factor: float = 20.0
    d_min: float = 1.8
    background: float = 3.0
    ice_rings: bool = False
    ice_strength: float = 30.0
    saturation: float = 100000.0
    overload: float = 1.0
    n_hot: int = 20
    n_dead: int = 50
    n_bad: int = 100
    beamstop_radius: float = 25.0
    dead_modules: int = 0
    hot_cluster: bool = False
    min_separation: float = 8.0
    dtype: str = "int32"
    beamstop_arm_angle: float | None = 0.0
    beamstop_offset: tuple[float, float] = (0.0, 0.0)
    direct_beam: float = 0.0
    direct_beam_sigma: float = 2.0
    stripes: int = 0
    bad_asics: int = 0
    hot_saturated: int = 0
    ice_width: float | None = None
    ice_texture: float = 0.0
    dark_counts: float | None = None

    def geometry(self) -> Geometry:
        """The geometry the instrument *believes* (beam at ``beam_center``)."""
        return Geometry.for_layout(self.layout, distance_mm=self.distance_mm, wavelength_A=self.wavelength_A,
                                   beam_center=self.beam_center, saturation=self.saturation)


@dataclass
class SimFrame:
    """A simulated frame and its ground truth.

    Attributes
    ----------
    frame : ndarray
        The detector frame (counts; -1 gaps and -2 bad pixels for int32).
    geometry : Geometry
        Geometry as configured (with the module-gap mask).
    spots : dict of ndarray
        Truth per spot: ``x``, ``y`` (pixels), ``intensity`` (counts recorded
        on valid pixels), ``sigma`` (profile width, px), ``background``
        (expected counts/pixel under the spot), ``snr`` (see :func:`spot_snr`).
    expected_background : ndarray of float32
        Noise-free background counts per pixel (without dark counts).
    config : SimConfig
    fault_lost_counts : float
        Expected counts (background and spots) on the pixels that dead
        modules, dead readout bands and dead chips set to 0: how visible a
        dead-area fault is (near 0 on a nearly empty frame).
    hot_cluster_px : int
        Valid pixels the hot cluster reads on (0 without one; module gaps
        and a dead module hide it).
    """

    frame: np.ndarray
    geometry: Geometry
    spots: dict
    expected_background: np.ndarray = field(repr=False)
    config: SimConfig = field(repr=False, default_factory=SimConfig)
    fault_lost_counts: float = 0.0
    hot_cluster_px: int = 0


def spot_snr(intensity, background, sigma):
    """Signal-to-noise ratio of a Gaussian spot with optimal (profile) weighting.

    ``I / sqrt(I + B * 4 pi sigma^2)``, with ``B`` the background counts per
    pixel and ``4 pi sigma^2`` the effective pixel count of the profile.
    """
    intensity = np.asarray(intensity, dtype=np.float64)
    npix_eff = 4.0 * np.pi * np.maximum(np.asarray(sigma, dtype=np.float64), 0.5) ** 2
    return intensity / np.sqrt(np.maximum(intensity + np.asarray(background) * npix_eff, 1e-12))


_erf = np.vectorize(math.erf, otypes=[np.float64])


def _radius_map(shape, center) -> np.ndarray:
    """float32 distance (px) of every pixel centre from ``center = (x, y)``."""
    ny, nx = shape
    y = (np.arange(ny, dtype=np.float32) - np.float32(center[1]))[:, None]
    x = (np.arange(nx, dtype=np.float32) - np.float32(center[0]))[None, :]
    return np.sqrt(x * x + y * y)


def background_profile(background: float, geom: Geometry, r) -> np.ndarray:
    """Noise-free background (counts/pixel) at radii ``r`` (px) from the true beam.

    Air scatter falling with resolution, a broad solvent ring near 3.2 A and a
    flat floor, scaled so ``background`` is the solvent-ring level, times the
    ``cos^3`` obliquity falloff (no flux factor, no beamstop).
    """
    r = np.asarray(r, dtype=np.float64)
    tth = np.arctan(r * (geom.pixel_size_mm / geom.distance_mm))
    with np.errstate(divide="ignore"):
        s = 2.0 * np.sin(tth / 2.0) / geom.wavelength_A  # 1/d in 1/A, 0 at the beam
    solvent = np.exp(-0.5 * ((s - 1.0 / 3.2) / 0.06) ** 2)
    air = 0.6 * np.exp(-s / 0.08)
    floor = 0.15
    return background * (solvent + air + floor) * np.cos(tth) ** 3


#: Radial step (px) of the tabulated radial models (background, ice).
_R_STEP = 0.25


def _radial_lookup(r: np.ndarray, table: np.ndarray) -> np.ndarray:
    """``table`` (tabulated every _R_STEP px from 0) at the radii ``r``, nearest entry."""
    idx = np.empty(r.shape, np.int32)
    idx[...] = r * np.float32(1.0 / _R_STEP) + np.float32(0.5)
    return table.astype(np.float32)[idx]


def _radial_grid(r: np.ndarray) -> np.ndarray:
    return np.arange(int(float(r.max()) / _R_STEP) + 2, dtype=np.float64) * _R_STEP


def _background_model(cfg: SimConfig, geom: Geometry, r: np.ndarray) -> np.ndarray:
    # radially symmetric: tabulated on a fine radial grid and looked up (a
    # 16M frame in a fraction of the per-pixel evaluation's time)
    grid = _radial_grid(r)
    return _radial_lookup(r, background_profile(cfg.background, geom, grid))


def _ice(cfg: SimConfig, geom: Geometry, r: np.ndarray, rng, rng_x, center) -> np.ndarray:
    radii = geom.radius_for_d(ICE_D_SPACINGS)
    width = rng.uniform(1.0, 2.5)
    if cfg.ice_width is not None:
        width = float(cfg.ice_width)
    grid = _radial_grid(r)
    prof = np.zeros(grid.shape, np.float64)
    for rad, rel in zip(radii, ICE_REL_INTENSITY):
        if not np.isfinite(rad) or rad > grid[-1]:
            continue
        prof += cfg.ice_strength * rel * np.exp(-0.5 * ((grid - rad) / width) ** 2)
    out = _radial_lookup(r, prof)
    if cfg.ice_texture > 0:
        # partial rings: arcs around the azimuth, same azimuthal mean
        k = 6.0 * float(cfg.ice_texture)
        n = int(rng_x.integers(1, 4))
        phi0 = float(rng_x.uniform(0.0, 2.0 * np.pi))
        a = np.linspace(-np.pi, np.pi, 721)
        mod = np.exp(k * (np.cos(n * (a - phi0)) - 1.0))
        mod /= mod[:-1].mean()
        ny, nx = r.shape
        yy = np.arange(ny, dtype=np.float32)[:, None] - np.float32(center[1])
        xx = np.arange(nx, dtype=np.float32)[None, :] - np.float32(center[0])
        ang = np.arctan2(yy, xx)
        idx = ((ang + np.float32(np.pi)) * np.float32(720 / (2 * np.pi)) + np.float32(0.5)).astype(np.int32)
        out *= mod.astype(np.float32)[idx]
    return out


def _place_spots(cfg: SimConfig, geom: Geometry, true_center, bg, valid, rng):
    ny, nx = geom.shape
    n = cfg.n_spots
    xs = rng.uniform(4, nx - 5, n * 2)
    ys = rng.uniform(4, ny - 5, n * 2)
    r = np.hypot(xs - true_center[0], ys - true_center[1])
    d = geom.d_spacing(r)
    ok = (d >= cfg.d_min) & (r > cfg.beamstop_radius * 1.5 + 6)
    ok &= valid[np.round(ys).astype(int), np.round(xs).astype(int)]
    xs, ys, d = xs[ok], ys[ok], d[ok]
    # greedy minimum separation on a coarse grid
    cell = max(cfg.min_separation, 1.0)
    taken: dict[tuple[int, int], list[int]] = {}
    keep = []
    for k in range(len(xs)):
        if len(keep) >= n:
            break
        gx, gy = int(xs[k] // cell), int(ys[k] // cell)
        clash = False
        for ix in (gx - 1, gx, gx + 1):
            for iy in (gy - 1, gy, gy + 1):
                for m in taken.get((ix, iy), ()):
                    if (xs[m] - xs[k]) ** 2 + (ys[m] - ys[k]) ** 2 < cell * cell:
                        clash = True
        if not clash:
            taken.setdefault((gx, gy), []).append(k)
            keep.append(k)
    keep = np.array(keep, dtype=int)
    xs, ys, d = xs[keep], ys[keep], d[keep]
    sig = rng.uniform(*cfg.spot_sigma, len(xs))
    wilson = np.exp(-cfg.b_factor / (4.0 * d * d))
    inten = rng.exponential(cfg.mean_intensity, len(xs)) * wilson * cfg.flux * cfg.overload
    return xs, ys, sig, inten


def _spot_patches(shape, xs, ys, sig, inten):
    """Pixel-integrated Gaussian spots (expected counts), all spots at once.

    Returns ``rows, cols, values``: (n, 2h+1, 2h+1) patches around each spot's
    nearest pixel (h from the widest spot, 4 sigma + 1), with out-of-frame
    pixels given value 0 and clamped indices.
    """
    ny, nx = shape
    h = int(np.ceil(4 * float(np.max(sig, initial=0.5)))) + 1
    off = np.arange(-h, h + 1)
    cy, cx = np.round(ys).astype(np.int64), np.round(xs).astype(np.int64)
    rows, cols = cy[:, None] + off[None, :], cx[:, None] + off[None, :]
    edge = np.concatenate([off - 0.5, [h + 0.5]])
    k = 1.0 / (np.sqrt(2.0) * sig[:, None])
    ey = _erf((cy[:, None] + edge[None, :] - ys[:, None]) * k)
    ex = _erf((cx[:, None] + edge[None, :] - xs[:, None]) * k)
    py = np.diff(ey, axis=1) * 0.5 * ((rows >= 0) & (rows < ny))
    px = np.diff(ex, axis=1) * 0.5 * ((cols >= 0) & (cols < nx))
    vals = inten[:, None, None] * py[:, :, None] * px[:, None, :]
    rr = np.broadcast_to(np.clip(rows, 0, ny - 1)[:, :, None], vals.shape)
    cc = np.broadcast_to(np.clip(cols, 0, nx - 1)[:, None, :], vals.shape)
    return rr, cc, vals


def _render_spots(shape, patches):
    """The spots' expected counts as an image (float32)."""
    out = np.zeros(shape, np.float32)
    rr, cc, vals = patches
    np.add.at(out, (rr.ravel(), cc.ravel()), vals.ravel().astype(np.float32))
    return out


def simulate(config: SimConfig | None = None, *, seed: int = 0, **overrides) -> SimFrame:
    """Simulate one frame.

    Parameters
    ----------
    config : SimConfig, optional
        Base parameters; ``overrides`` replace fields (``simulate(layout="4m",
        ice_rings=True, seed=3)``).
    seed : int
        Seed of the random generator; same seed and config give the same frame.

    Returns
    -------
    SimFrame
    """
    cfg = replace(config or SimConfig(), **overrides)
    if cfg.layout.lower() not in LAYOUTS:
        raise ValueError(f"unknown layout {cfg.layout!r}; known: {sorted(LAYOUTS)}")
    rng = np.random.default_rng(seed)
    geom = cfg.geometry()
    ny, nx = geom.shape
    bx, by = geom.beam_center
    true_center = (bx + cfg.beam_offset[0], by + cfg.beam_offset[1])
    valid = geom.valid.copy()

    r_true = _radius_map(geom.shape, true_center)
    bg = _background_model(cfg, geom, r_true) * np.float32(cfg.flux)
    # extra anomaly knobs draw from their own stream: enabling one leaves the
    # spots, noise and defects of the frame unchanged
    rng_x = np.random.default_rng([seed, 0x5EED])
    if cfg.ice_rings and cfg.flux > 0:
        bg += _ice(cfg, geom, r_true, rng, np.random.default_rng([seed, 0x1CE]), true_center) * np.float32(cfg.flux)

    # beamstop: disc at the true beam plus an arm to the right edge
    shadow = None
    if cfg.beamstop_radius > 0:
        sx, sy = true_center
        if cfg.beamstop_offset[0] or cfg.beamstop_offset[1]:
            sx, sy = sx + cfg.beamstop_offset[0], sy + cfg.beamstop_offset[1]
        yy = np.arange(ny, dtype=np.float32)[:, None] - np.float32(sy)
        xx = np.arange(nx, dtype=np.float32)[None, :] - np.float32(sx)
        shadow = (xx * xx + yy * yy) < cfg.beamstop_radius ** 2
        arm_w = cfg.beamstop_radius * 0.35
        if cfg.beamstop_arm_angle == 0.0:
            shadow |= (np.abs(yy) < arm_w) & (xx > 0)
        elif cfg.beamstop_arm_angle is not None:
            a = np.deg2rad(cfg.beamstop_arm_angle)
            along = xx * np.float32(np.cos(a)) + yy * np.float32(np.sin(a))
            across = yy * np.float32(np.cos(a)) - xx * np.float32(np.sin(a))
            shadow |= (np.abs(across) < arm_w) & (along > 0)

    if cfg.crystal and cfg.flux > 0 and cfg.n_spots > 0:
        xs, ys, sig, inten = _place_spots(cfg, geom, true_center, bg, valid, rng)
        patches = _spot_patches(geom.shape, xs, ys, sig, inten)
        spots_img = _render_spots(geom.shape, patches)
    else:
        xs = ys = sig = inten = np.zeros(0)
        spots_img = None

    if shadow is not None:
        bg[shadow] *= 0.02
        if spots_img is not None:
            spots_img[shadow] = 0.0
    expected = bg if spots_img is None else bg + spots_img
    if cfg.direct_beam > 0 and cfg.flux > 0:
        yy = np.arange(ny, dtype=np.float32)[:, None] - np.float32(true_center[1])
        xx = np.arange(nx, dtype=np.float32)[None, :] - np.float32(true_center[0])
        s2 = np.float32(2.0 * cfg.direct_beam_sigma ** 2)
        expected = expected + np.float32(cfg.direct_beam) * np.exp(-(xx * xx + yy * yy) / s2)
    counts = rng.poisson(expected).astype(np.float64)
    # dark noise of a photon counter is nearly nil, but keep a trickle
    if cfg.dark_counts is None:
        if cfg.flux == 0:
            counts += rng.poisson(0.01, size=counts.shape)
    elif cfg.dark_counts > 0:
        counts += np.random.default_rng([seed, 0xDA4]).poisson(cfg.dark_counts, size=counts.shape)

    # truth: recorded intensity on valid pixels, background under the spot
    if len(xs):
        xi = np.clip(np.round(xs).astype(int), 0, nx - 1)
        yi = np.clip(np.round(ys).astype(int), 0, ny - 1)
        b_under = bg[yi, xi].astype(np.float64)
        # spots cut by a gap or the beamstop (disc and arm) keep only their share on sensitive pixels
        rr, cc, vals = patches
        seen = valid[rr, cc] if shadow is None else valid[rr, cc] & ~shadow[rr, cc]
        tot = vals.sum(axis=(1, 2))
        frac = np.where(tot > 0, (vals * seen).sum(axis=(1, 2)) / np.maximum(tot, 1e-300), 0.0)
        recorded = inten * frac
    else:
        b_under = np.zeros(0)
        recorded = np.zeros(0)

    # detector faults and defects
    lost = [0.0]
    dead_boxes = []
    if cfg.dead_modules:
        layout = LAYOUTS[cfg.layout.lower()]
        (mr, mc), (pr, pc), (gr, gc) = layout.modules, layout.module_shape, layout.gap
        picks = rng.choice(mr * mc, size=min(cfg.dead_modules, mr * mc), replace=False)
        for m in picks:
            i, j = divmod(int(m), mc)
            r0, c0 = i * (pr + gr), j * (pc + gc)
            box = (slice(r0, r0 + pr), slice(c0, c0 + pc))
            dead_boxes.append(box)
            lost[0] += float(expected[box][valid[box]].sum())
    cluster = None
    if cfg.hot_cluster:
        cy, cx = rng.integers(50, ny - 50), rng.integers(50, nx - 50)
        hy, hx = rng.integers(8, 30), rng.integers(8, 30)
        cluster = (slice(cy, cy + hy), slice(cx, cx + hx))
        counts[cluster] += rng.integers(200, 5000, size=(min(hy, ny - cy), min(hx, nx - cx)))
    if cfg.stripes or cfg.bad_asics:
        _readout_faults(cfg, counts, bg, rng_x, expected=expected, valid=valid, lost=lost)
    flat = counts.reshape(-1)
    vidx = np.flatnonzero(valid.reshape(-1))
    if cfg.n_dead:
        flat[rng.choice(vidx, cfg.n_dead, replace=False)] = 0
    if cfg.n_hot:
        flat[rng.choice(vidx, cfg.n_hot, replace=False)] = rng.integers(500, 50000, cfg.n_hot)
    if cfg.hot_saturated:
        flat[rng_x.choice(vidx, cfg.hot_saturated, replace=False)] = cfg.saturation
    for box in dead_boxes:  # a dead module reads 0, hot pixels included
        counts[box] = 0
    hot_cluster_px = int(np.count_nonzero(valid[cluster] & (counts[cluster] > 0))) if cluster else 0
    np.minimum(counts, cfg.saturation, out=counts)

    bad = np.zeros(ny * nx, dtype=bool)
    if cfg.n_bad:
        bad[rng.choice(vidx, cfg.n_bad, replace=False)] = True
    bad = bad.reshape(ny, nx)
    frame = _encode(counts, valid, bad, cfg.dtype)
    mask = valid & ~bad
    geom = Geometry(geom.shape, geom.pixel_size_mm, geom.distance_mm, geom.wavelength_A, geom.beam_center,
                    mask=geom.mask, saturation=cfg.saturation)
    truth = {
        "x": xs.astype(np.float64),
        "y": ys.astype(np.float64),
        "intensity": recorded.astype(np.float64),
        "sigma": sig.astype(np.float64),
        "background": b_under,
        "snr": spot_snr(recorded, b_under, sig),
        "on_valid": valid[np.clip(np.round(ys).astype(int), 0, ny - 1),
                          np.clip(np.round(xs).astype(int), 0, nx - 1)] & ~bad[
            np.clip(np.round(ys).astype(int), 0, ny - 1), np.clip(np.round(xs).astype(int), 0, nx - 1)]
        if len(xs) else np.zeros(0, bool),
    }
    del mask
    return SimFrame(frame, geom, truth, bg, cfg, fault_lost_counts=lost[0], hot_cluster_px=hot_cluster_px)


def _readout_faults(cfg: SimConfig, counts: np.ndarray, bg: np.ndarray, rng, *, expected, valid, lost) -> None:
    """Faulty readout bands and chips, in place: dead (0) or hot (extra counts).
    Expected counts on the pixels set dead are added to ``lost[0]``."""
    layout = LAYOUTS[cfg.layout.lower()]
    (mr, mc), (pr, pc), (gr, gc) = layout.modules, layout.module_shape, layout.gap
    level = float(np.mean(bg)) + 1.0  # scale hot faults to the frame's background
    for _ in range(cfg.stripes):
        i, j = divmod(int(rng.integers(mr * mc)), mc)
        r0, c0 = i * (pr + gr), j * (pc + gc)
        w = int(rng.integers(4, 17))
        if rng.random() < 0.5:  # rows across the module
            a = r0 + int(rng.integers(0, pr - w))
            sl = (slice(a, a + w), slice(c0, c0 + pc))
        else:
            a = c0 + int(rng.integers(0, pc - w))
            sl = (slice(r0, r0 + pr), slice(a, a + w))
        if rng.random() < 0.5:
            counts[sl] = 0
            lost[0] += float(expected[sl][valid[sl]].sum())
        else:
            counts[sl] += rng.poisson(level * rng.uniform(3.0, 30.0), size=counts[sl].shape)
    chip = 256
    for _ in range(cfg.bad_asics):
        i, j = divmod(int(rng.integers(mr * mc)), mc)
        r0 = i * (pr + gr) + chip * int(rng.integers(0, max(pr // chip, 1)))
        c0 = j * (pc + gc) + chip * int(rng.integers(0, max(pc // chip, 1)))
        sl = (slice(r0, r0 + chip), slice(c0, c0 + chip))
        if rng.random() < 0.5:
            counts[sl] = 0
            lost[0] += float(expected[sl][valid[sl]].sum())
        else:
            counts[sl] += rng.poisson(level * rng.uniform(2.0, 20.0), size=counts[sl].shape)


def _encode(counts, valid, bad, dtype: str) -> np.ndarray:
    if dtype == "int32":
        out = counts.astype(np.int32)
        out[~valid] = -1
        out[bad] = -2
        return out
    if dtype in ("uint32", "uint16"):
        t = np.dtype(dtype)
        out = np.minimum(counts, np.iinfo(t).max - 1).astype(t)
        out[~valid] = np.iinfo(t).max  # EIGER convention: gaps at the dtype maximum
        out[bad] = np.iinfo(t).max
        return out
    if dtype == "float32":
        out = counts.astype(np.float32)
        out[~valid | bad] = np.nan
        return out
    raise ValueError(f"unsupported dtype {dtype!r}; use int32, uint32, uint16 or float32")
