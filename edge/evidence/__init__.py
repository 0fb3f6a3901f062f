"""Physical evidence behind the anomaly flags, and the confirmation step.

The anomaly model proposes flags; a flag may lead to a command only when the
frame shows the physical evidence for it. Everything is computed from what
the pipeline already has (radial statistics, peaks, anomaly features, the
beam-offset and dead-region measurements it makes for flagged frames):

* :mod:`.ice` -- per ice d-spacing, the ring's excess over the interpolated
  background, its contrast and Poisson significance;
* :mod:`.beam` -- no beam vs blank vs diffraction (background level against
  the dark level and recent frames, clear peaks, scatter structure), and the
  measured beam offset or "cannot judge";
* :mod:`.detector` -- saturated peaks and pixels, dead regions and fault
  indicators;
* :mod:`.gate` -- :class:`EvidenceGate`, the rules that turn proposals into
  confirmed flags, and :class:`Assessment` (flags, unconfirmed proposals,
  evidence with units, a readable summary).
"""

from .gate import MISSING, Assessment, EvidenceGate

__all__ = ["Assessment", "EvidenceGate", "MISSING"]
