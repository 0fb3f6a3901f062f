"""edge: detector-side real-time processing for X-ray area detectors."""
from .geometry import Geometry, DetectorLayout, LAYOUTS
from .background import subtract_background, estimate_background, radial_stats, local_stats

__version__ = "0.1.0"
from .spotfinding import Peaks, find_peaks
