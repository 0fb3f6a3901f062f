"""The confirmation step between the model's proposals and a flag that may drive hardware."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from ..background import RadialStats, prepare_frame
from ..features import FEATURE_NAMES, wide_ring_centre
from ..geometry import Geometry
from .beam import OFFSET_MIN_PX, beam_state, offset_evidence
from .detector import fault_evidence, saturation_evidence
from .ice import centred_ring_profile, ice_ring_evidence, ice_verdict, sampled_profile

__all__ = ["Assessment", "EvidenceGate", "MISSING"]

#: Sentinel: a measurement the caller did not make (the gate makes it if needed).
MISSING = object()
#: A ring this visible in the clipped (sampled) profile makes the gate read
#: the full-resolution ring profile even if the model did not propose ice.
_SUSPECT_Z, _SUSPECT_CONTRAST = 3.0, 1.03
#: Below this clipped background (counts/pixel) the clipped ring means lose
#: the counts (mostly-zero frames read 0): the beam is judged on a
#: capped (not clipped) profile of every 4th row instead.
_SPARSE_LEVEL = 0.5
#: Dead regions are looked for (a full-frame pass) when the model gives
#: ``detector_fault`` at least this probability or a tile holds this excess
#: of zero pixels over Poisson (real frames: <= 0.06; a zeroed module on a
#: real blank: 0.10) ...
_FAULT_SUSPECT_P, _FAULT_SUSPECT_ZERO_EXCESS = 0.1, 0.08
#: ... and a dead region whose centre is this far from the beam raises the
#: flag alone (near the beam a thick beamstop shadow can read zero).
_FAULT_RAISE_MIN_R_PX = 100.0
#: ... and where the clipped ring means expect this many counts: on
#: mostly-empty frames (means of 0) dead regions are found from the rings'
#: zero fractions, which a crowd of spots can inflate; there a region backs
#: a proposal but does not raise the flag alone.
_FAULT_RAISE_MIN_COUNTS = 30.0
_TILE_ZERO_EXCESS = FEATURE_NAMES.index("tile_zero_excess_max")
#: A proposed ``ice_rings`` is also confirmed by the features' wide ring-centre
#: search (rings around a beam far off the believed centre, which the
#: full-resolution evidence does not search) at this Poisson z (real frames
#: without ice: <= 8.8, the strong PILATUS hit: spots; rings around a beam
#: 80-130 px off on simulated frames: 18-230) ...
_ICE_WIDE = FEATURE_NAMES.index("ice_wide_z")
_ICE_WIDE_Z = 15.0
#: ... when its centre is this far (px) from the believed one (nearer, the
#: full-resolution profile is the better judge).
_ICE_WIDE_MIN_OFFSET_PX = 12.0
#: Ice rings measure the beam position when no shadow can be seen: their
#: wide-search centre at this z and this gain over the believed centre
#: (real frames without ice: z <= 8.8).
_RING_CENTRE_Z, _RING_CENTRE_GAIN = 20.0, 10.0
#: ``blank`` and ``no_beam`` exclude each other; when the model gives them
#: this much together without proposing either (e.g. 0.49 + 0.40 on a dark
#: frame with hot pixels), the beam verdict decides as for a proposal.
_NO_DIFFRACTION_P = 0.75
#: The features' full-resolution z of the three strongest ice lines (signed log1p).
_ICE_RING_Z = tuple(FEATURE_NAMES.index(n) for n in FEATURE_NAMES if n.startswith("ice_ring_z_") and n.endswith("A"))
_SPARSE_ROW_STEP = 4


@dataclass(frozen=True)
class Assessment:
    """Model proposals checked against physical evidence.

    Attributes
    ----------
    flags : tuple of str
        Confirmed flags (model proposal + evidence, or evidence alone for
        ``ice_rings`` and the no beam / blank choice): only these may lead to
        a command.
    proposed : tuple of str
        The model's flags (probability >= threshold).
    unconfirmed : tuple of str
        Proposals the evidence did not confirm (reported as probabilities only).
    raised : tuple of str
        Flags raised by evidence the model did not propose.
    evidence : dict
        Per class (proposed or flagged) the numbers behind the decision, with
        units in the key names; JSON-serialisable.
    """

    flags: tuple
    proposed: tuple
    unconfirmed: tuple
    raised: tuple
    evidence: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"flags": list(self.flags), "proposed": list(self.proposed), "unconfirmed": list(self.unconfirmed),
                "raised": list(self.raised), "evidence": self.evidence}

    def summary(self) -> str:
        """One readable line: why each flag was raised, why proposals were not confirmed."""
        parts = [f"{c}: {_why(c, self.evidence.get(c, {}))}" for c in self.flags]
        parts += [f"not {c} ({_why(c, self.evidence.get(c, {}))})" for c in self.unconfirmed]
        return "; ".join(parts)


def ring_centre_evidence(off: dict, wide: dict | None) -> dict:
    """Beam-offset evidence ``off`` (no shadow seen) completed by the ice rings'
    centre from :func:`edge.features.wide_ring_centre`, when it is clear
    (:data:`_RING_CENTRE_Z`, :data:`_RING_CENTRE_GAIN`)."""
    if not wide or wide["z"] < _RING_CENTRE_Z or wide["z"] - wide["z_at_believed_centre"] < _RING_CENTRE_GAIN:
        return off
    dx, dy = wide["centre_offset_px"]
    dist = float(np.hypot(dx, dy))
    verdict = "off_centre" if dist >= OFFSET_MIN_PX else "centred"
    return {**off, "verdict": verdict, "offset_px": [round(dx, 1), round(dy, 1)], "offset_abs_px": round(dist, 1),
            "measured_by": "ice-ring centre", "ring_centre_z": round(wide["z"], 1),
            "reason": f"no beamstop shadow; the ice rings are centred {dist:.0f} px from the believed centre "
                      f"(z {wide['z']:.0f})"}


def _why(cls: str, ev: dict) -> str:
    if cls == "ice_rings":
        found = [r for r in ev.get("rings", []) if r["found"]]
        if not found and ev.get("verdict") == "rings":
            dx, dy = ev.get("ring_centre_offset_px", (0.0, 0.0))
            return (f"ice lines around a ring centre ({dx:+.0f}, {dy:+.0f}) px from the believed beam centre "
                    f"(wide search, z {ev.get('wide_search_z') or 0:.0f})")
        if not found:
            return "no ring above background" if ev.get("rings") else "no ice line on the detector"
        txt = "rings at " + ", ".join(f"{r['d_A']:.2f} A (x{r['contrast']:.2f}, z {r['z']:.0f})" for r in found)
        dx, dy = ev.get("ring_centre_offset_px", (0.0, 0.0))
        return txt + (f", ring centre ({dx:+.0f}, {dy:+.0f}) px from the believed beam centre" if dx or dy else "")
    if cls in ("blank", "no_beam"):
        verdict = "" if ev.get("verdict") == cls else f"{ev.get('verdict')}: "
        return (f"{verdict}{ev.get('clear_peaks')} clear peaks, background "
                f"{ev.get('background_counts_per_px', 0):.3g} counts/px, scatter {_times(ev.get('scatter_ratio', 1))} "
                f"(z {ev.get('scatter_z', 0):.0f})")
    if cls == "beam_off_center":
        return ev.get("reason", ev.get("verdict", ""))
    if cls == "saturation":
        core = ", an overloaded spot core" if ev.get("overloaded_spot_core") else ""
        return (f"{ev.get('saturated_peaks')} saturated peaks{core}, ~{ev.get('saturated_pixels_clustered')} "
                f"clustered saturated px, largest peak {ev.get('largest_peak_px')} px")
    if cls == "detector_fault":
        regions = ev.get("dead_regions") or []
        txt = ", ".join(f"rows {r[0]}-{r[1]} cols {r[2]}-{r[3]}" for r in regions[:3])
        beyond = ", ".join(f"{k} {ev[k]}" for k in ev.get("beyond", []))
        return "; ".join(s for s in (f"dead {txt}" if txt else "", beyond) if s) or "no faulty region seen"
    return ""


class EvidenceGate:
    """Confirms the model's flags with physical evidence, frame by frame.

    Rules (documented in ``models/README.md``):

    * ``ice_rings`` needs at least one ice line found (:mod:`.ice`; in the
      full profile around the best-fitting ring centre within 12 px of the
      believed one, :func:`.ice.centred_ring_profile`) or,
      for rings around a beam further off, the features' wide ring-centre
      search (:func:`edge.features.wide_ring_centre`, +-160 px) at z >= 15
      around a centre > 12 px away; the 3.90 A line clearly found with
      another strong line agreeing raise it even when the model did not
      propose it (:func:`.ice.ice_verdict`);
    * a proposed ``no_beam`` or ``blank`` (or the two at >= 0.75 together)
      becomes the beam verdict (:func:`.beam.beam_state`): ``no_beam``,
      ``blank`` or nothing (a frame with diffraction); on a frame whose beam is confirmed off centre the
      peak count does not overrule a proposed ``blank`` (fake peaks of a
      misplaced background model);
    * ``beam_off_center`` needs a measured offset >= 25 px with enough
      counts near the beam (never on "cannot judge"); where no shadow is
      found, ice rings whose wide-search centre is clear (z >= 20, 10 above
      the believed centre's) measure the beam instead;
    * ``saturation`` needs saturated peaks or clustered saturated pixels;
    * ``detector_fault`` needs a dead region or a fault indicator beyond
      its limit (:data:`.detector.FAULT_LIMITS`); a dead region (64 px
      tiles reading 0 where >= 30 counts are expected) away from the beam
      raises it alone, except on mostly-empty frames, where only the rings'
      zero fractions give the expected counts.

    Keeps the background level of recent beam-on frames (a beam loss is a
    drop against them), so use one gate per stream.

    Parameters
    ----------
    history : int
        Beam-on frames whose median background is the reference.
    """

    def __init__(self, history: int = 50) -> None:
        self._levels: deque = deque(maxlen=max(1, int(history)))

    @property
    def recent_level(self) -> float | None:
        """Median background (counts/pixel) of the recent beam-on frames, None before any."""
        return float(np.median(self._levels)) if self._levels else None

    def __call__(self, probabilities: dict, proposed, frame: np.ndarray, geometry: Geometry, *,
                 stats: RadialStats, peaks, features: np.ndarray, beam_offset=MISSING,
                 dead_regions=MISSING) -> Assessment:
        """Assess one frame.

        Parameters
        ----------
        probabilities : dict of str -> float
            The model's probabilities (reported alongside, not re-thresholded).
        proposed : iterable of str
            The model's flags.
        frame, geometry, stats, peaks, features
            The frame and what the pipeline computed from it.
        beam_offset : (dx, dy), None, MISSING or callable
            :func:`edge.measure.measure_beam_offset` result if the caller
            measured it (None = no shadow found), or a callable returning it
            (called only if needed); MISSING: measured here when needed.
        dead_regions : list, None, MISSING or callable
            :func:`edge.measure.find_dead_regions` result, likewise.
        """
        proposed = tuple(proposed)
        ev: dict = {}
        flags: list[str] = []
        # ice: cheap check on the clipped profile every frame, the full ring
        # profile only when the model or that check suspects a ring
        ice = ice_ring_evidence(stats.mean, stats.count, geometry, bin_width=stats.bins.width)
        suspect = any(r["z"] >= _SUSPECT_Z and r["contrast"] >= _SUSPECT_CONTRAST for r in ice)
        # the features read the ring bands at full resolution: on sparse
        # frames, where the clipped means are 0, that is what shows a ring
        suspect = suspect or any(float(np.expm1(features[k])) >= _SUSPECT_Z for k in _ICE_RING_Z)
        if "ice_rings" in proposed or suspect:
            arr, _, lo, hi = prepare_frame(frame, geometry=geometry)
            mean, count, centre = centred_ring_profile(arr, geometry, stats, peaks=peaks, lo_valid=lo, hi_valid=hi)
            ice = ice_ring_evidence(mean, count, geometry, bin_width=stats.bins.width)
            profile = "full"
        else:
            profile, centre = "sampled", (0.0, 0.0)
        found = [r for r in ice if r["found"]]
        confirms, raises = ice_verdict(ice)
        # rings around a beam far off the believed centre are smeared in the
        # azimuthal profile; the features' wide ring-centre search still sees
        # them: it backs a proposal, it does not raise one
        wide, wide_z = None, float(np.expm1(features[_ICE_WIDE]))
        if "ice_rings" in proposed and not confirms and wide_z >= _ICE_WIDE_Z:
            wide = wide_ring_centre(frame, geometry, stats=stats)
        shifted = bool(wide and wide["z"] >= _ICE_WIDE_Z
                       and np.hypot(*wide["centre_offset_px"]) > _ICE_WIDE_MIN_OFFSET_PX)
        if shifted:
            centre = wide["centre_offset_px"]
        ice_ev = {"verdict": "rings" if (confirms or raises or shifted) else ("none" if ice else "cannot_judge"),
                  "profile": "wide search" if shifted else profile, "found_d_A": [r["d_A"] for r in found],
                  "ring_centre_offset_px": [round(v, 1) for v in centre],
                  "wide_search_z": round(wide["z"], 2) if wide else None,
                  "rings": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in ice]}
        confirms = confirms or shifted
        if (confirms and "ice_rings" in proposed) or raises:
            flags.append("ice_rings")
        if "ice_rings" in proposed or "ice_rings" in flags:
            ev["ice_rings"] = ice_ev
        ice_on = "ice_rings" in flags or "ice_rings" in proposed
        beam = beam_state(stats, peaks, recent_level=self.recent_level, ice=ice_on)
        # the reference for a beam loss: clipped levels of beam-on frames
        level_on = beam["background_counts_per_px"] if beam["verdict"] in ("diffraction", "blank") else None
        if "beam_off_center" in proposed:
            if beam_offset is MISSING:
                from ..measure import measure_beam_offset

                beam_offset = measure_beam_offset(frame, geometry)
            elif callable(beam_offset):
                beam_offset = beam_offset()
            off = offset_evidence(beam_offset, stats)
            if off["verdict"] == "cannot_judge" and wide_z >= _RING_CENTRE_Z:
                # no shadow to measure, but ice rings fix the beam: their centre
                wide = wide or wide_ring_centre(frame, geometry, stats=stats)
                off = ring_centre_evidence(off, wide)
            ev["beam_off_center"] = off
            if off["verdict"] == "off_centre":
                flags.append("beam_off_center")
        # no beam / blank: the beam verdict decides between them, also when
        # the model is sure there is no diffraction but split on which
        no_diffraction = (float(probabilities.get("blank", 0.0)) + float(probabilities.get("no_beam", 0.0))
                          >= _NO_DIFFRACTION_P)
        if "no_beam" in proposed or "blank" in proposed or no_diffraction:
            if beam["background_counts_per_px"] < _SPARSE_LEVEL:
                arr, _, lo, hi = prepare_frame(frame, geometry=geometry)
                prof = sampled_profile(arr, stats, row_step=_SPARSE_ROW_STEP, lo_valid=lo, hi_valid=hi)
                beam = beam_state(stats, peaks, recent_level=self.recent_level, profile=prof, ice=ice_on)
            if beam["verdict"] == "diffraction" and "beam_off_center" in flags and "blank" in proposed:
                # around a misplaced centre the background model is wrong and
                # its fake peaks pile up: the peak count proves nothing here
                beam = {**beam, "verdict": "blank", "note": "peaks found around a misplaced beam centre not counted"}
            for c in ("blank", "no_beam"):
                if c in proposed or beam["verdict"] == c:
                    ev[c] = beam
            if beam["verdict"] in ("blank", "no_beam"):
                flags.append(beam["verdict"])
        if "saturation" in proposed:
            sat = saturation_evidence(peaks, features, geometry.saturation)
            ev["saturation"] = sat
            if sat["verdict"] == "saturated":
                flags.append("saturation")
        # detector fault: a proposal needs a dead region or an indicator past
        # its limit; a dead region away from the beamstop raises it alone
        p_fault = float(probabilities.get("detector_fault", 0.0))
        suspect = (p_fault >= _FAULT_SUSPECT_P
                   or float(features[_TILE_ZERO_EXCESS]) >= _FAULT_SUSPECT_ZERO_EXCESS)
        if "detector_fault" in proposed or suspect:
            if dead_regions is MISSING:
                from ..measure import find_dead_regions

                dead_regions = find_dead_regions(frame, geometry, stats=stats)
            elif callable(dead_regions):
                dead_regions = dead_regions()
            fault = fault_evidence(features, dead_regions)
            bx, by = geometry.beam_center
            away = [b for b in fault["dead_regions"]
                    if np.hypot(0.5 * (b[2] + b[3]) - bx, 0.5 * (b[0] + b[1]) - by) > _FAULT_RAISE_MIN_R_PX
                    and _clipped_expected(b, geometry, stats) >= _FAULT_RAISE_MIN_COUNTS]
            if ("detector_fault" in proposed and fault["verdict"] == "fault") or away:
                flags.append("detector_fault")
                ev["detector_fault"] = fault
            elif "detector_fault" in proposed:
                ev["detector_fault"] = fault
        if level_on is not None:
            self._levels.append(level_on)
        order = {c: k for k, c in enumerate(probabilities)}
        flags = sorted(set(flags), key=lambda c: order.get(c, len(order)))
        return Assessment(flags=tuple(flags), proposed=proposed,
                          unconfirmed=tuple(c for c in proposed if c not in flags),
                          raised=tuple(c for c in flags if c not in proposed), evidence=ev)


def _clipped_expected(box, geometry: Geometry, stats: RadialStats) -> float:
    """Counts the clipped ring means expect on the valid pixels of a (row0, row1, col0, col1) box."""
    r0, r1, c0, c1 = box
    idx = stats.bins.index[r0:r1, c0:c1]
    inside = geometry.valid[r0:r1, c0:c1] & (idx < stats.bins.nbins)
    mean = np.nan_to_num(stats.mean, nan=0.0)
    return float(mean[idx[inside]].sum())


def _times(ratio: float) -> str:
    """A ratio for people: over the near-zero rings of a sparse frame it can be astronomically large."""
    return f"x{ratio:.2f}" if ratio < 1000 else ">x1000"
