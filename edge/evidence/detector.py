"""Saturation and detector-fault evidence: the pixels and regions concerned.

Both read numbers the pipeline already has (peaks, the anomaly features,
:func:`edge.measure.find_dead_regions` when a fault is suspected); nothing
here makes a pass over the frame.
"""

from __future__ import annotations

import numpy as np

from ..features import FEATURE_NAMES, HOT_BLOCK_PX, MIN_SAT_PEAK_PIX

__all__ = ["saturation_evidence", "fault_evidence", "FAULT_LIMITS"]

_IDX = {n: i for i, n in enumerate(FEATURE_NAMES)}

def _hot_block_px(v: float) -> float:
    """Hot-block excess in px from its feature, log2(1 + px beyond HOT_BLOCK_PX)."""
    return 2.0 ** v - 1.0 + (HOT_BLOCK_PX if v > 0 else 0.0)


def _expm1(v: float) -> float:
    return float(np.expm1(v))


#: Fault indicators (anomaly features) and the level from which each shows
#: a fault: name -> (feature, decode, limit, direction); ``decode`` turns the
#: feature into the reported value (None: as is), and the limit applies to
#: that value. Each is above every real
#: frame in ``../shared/real_frames`` (PILATUS hits reach a row zero excess
#: of 0.35: module-edge rows) and below the median of simulated faults. On
#: simulated data these indicators overlap normal frames (a beamstop arm
#: reads zero too), so for a proposed ``detector_fault`` they are a sanity
#: check, not proof; a dead region is proof.
FAULT_LIMITS = {
    "dead_area_fraction": ("dead_area_fraction", None, 0.001, 1),
    "tile_zero_excess_max": ("tile_zero_excess_max", None, 0.10, 1),
    "column_zero_excess_max": ("col_zero_excess_max", None, 0.15, 1),
    "row_zero_excess_max": ("row_zero_excess_max", None, 0.50, 1),
    # a hot block 0.41 px beyond HOT_BLOCK_PX: log2_hot_block_excess >= 0.5
    "hot_block_excess_px": ("log2_hot_block_excess", _hot_block_px, _hot_block_px(0.5), 1),
    "tile_log2_ratio_max": ("tile_ratio_max", None, 0.5, 1),
    "tile_log2_ratio_min": ("tile_ratio_min", None, -0.5, -1),
    # sparse frames (the ring means read 0): a tile's deficit / excess of
    # pixels reading > 0, Poisson z, stored as log1p(z) (real frames: <= 3.2;
    # a dead 256 px chip at 0.01 counts/px: 9)
    "tile_nonzero_deficit_z": ("tile_nonzero_deficit_z_max", _expm1, 6.0, 1),
    "tile_nonzero_excess_z": ("tile_nonzero_excess_z_max", _expm1, 8.0, 1),
    # hot readout stripes: bright fraction of a tile's part of a row, or of
    # a column within a band of half a tile's rows (real frames: <= 0.14; a
    # stripe across a module: 0.6-1; simulated frames without a fault reach
    # 0.5-0.6 on 4 % of frames: arcs of rings around a misplaced beam)
    "row_tile_bright_fraction": ("row_tile_bright_max", None, 0.5, 1),
    "column_band_bright_fraction": ("col_band_bright_max", None, 0.6, 1),
}


def saturation_evidence(peaks, features: np.ndarray, saturation: float | None) -> dict:
    """Saturated peaks (>= 4 px, so not a defective pixel) and clustered saturated pixels.

    Returns
    -------
    dict
        ``saturated_peaks``, ``saturated_pixels_clustered`` (pixels at the
        cutoff with a bright neighbour, estimated from every 4th row),
        ``overloaded_spot_core`` (>= 4 such pixels around the saturated
        peaks, read at full resolution: the model's saturation-head input),
        ``largest_peak_px``, ``where_xy`` (up to 5 saturated peaks, px),
        ``cutoff_counts`` and ``verdict`` (``saturated`` or ``none``).
    """
    f = np.asarray(features, np.float64)
    sat = np.asarray(peaks.saturated, bool) & (np.asarray(peaks.npix) >= MIN_SAT_PEAK_PIX)
    order = np.argsort(-np.asarray(peaks.npix)[sat]) if sat.any() else np.zeros(0, np.int64)
    where = [[round(float(x), 1), round(float(y), 1)]
             for x, y in zip(np.asarray(peaks.x)[sat][order][:5], np.asarray(peaks.y)[sat][order][:5])]
    clustered = int(round(10.0 ** f[_IDX["log_saturated_clustered"]] - 1.0))
    largest = int(np.max(peaks.npix)) if len(peaks) else 0
    n_sat = int(sat.sum())
    return {"verdict": "saturated" if (n_sat or clustered) else "none", "saturated_peaks": n_sat,
            "saturated_pixels_clustered": clustered,
            "overloaded_spot_core": bool(f[_IDX["overload_core"]] > 0.5),
            "largest_peak_px": largest, "where_xy": where,
            "cutoff_counts": None if saturation is None else float(saturation)}


def fault_evidence(features: np.ndarray, dead_regions: list | None) -> dict:
    """Dead regions found in the frame and the fault features beyond their limits.

    Parameters
    ----------
    features : ndarray
        The frame's anomaly features.
    dead_regions : list of (row0, row1, col0, col1) or None
        :func:`edge.measure.find_dead_regions` (None = not measured).

    Returns
    -------
    dict
        ``verdict`` (``fault`` or ``none``), ``dead_regions`` (half-open
        pixel boxes), ``beyond`` (names of the indicators past their
        limits) and every indicator's value.
    """
    f = np.asarray(features, np.float64)
    vals, beyond = {}, []
    for name, (feat, decode, limit, sign) in FAULT_LIMITS.items():
        v = float(f[_IDX[feat]])
        if decode is not None:
            v = decode(v)
        vals[name] = round(v, 4)
        if v * sign >= limit * sign:
            beyond.append(name)
    regions = [[int(v) for v in b] for b in (dead_regions or [])]
    return {"verdict": "fault" if (regions or beyond) else "none", "dead_regions": regions[:8],
            "beyond": beyond, **vals}
