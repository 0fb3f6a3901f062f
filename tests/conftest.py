"""Shared fixtures. Real frames live in ../shared/real_frames beside the checkout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings

# No Hypothesis deadline anywhere: an example's wall time says nothing about
# correctness, and on a busy machine (or a first call that JIT-compiles) any
# deadline fails at random. Speed is measured in benchmarks/.
settings.register_profile("edge", deadline=None)
settings.load_profile("edge")

# beside the checkout (/work/main -> /work/shared), or one level up for a git
# worktree (/work/wt/<name> -> /work/shared)
SHARED = next((p / "shared" for p in Path(__file__).resolve().parents[2:4] if (p / "shared").is_dir()),
              Path(__file__).resolve().parents[2] / "shared")
REAL_FRAMES = SHARED / "real_frames"
REAL_NAMES = {
    "strong1": "thau_3_2_0002.cbf.bz2",
    "strong2": "thau_3_2_0008.cbf.bz2",
    "weak": "thau_3_2_0014.cbf.bz2",
    "blank": "thau_3_2_0019.cbf.bz2",
}


@pytest.fixture(scope="session")
def real_frames():
    """dict name -> (frame int32, Geometry) for the four shared PILATUS frames."""
    fabio = pytest.importorskip("fabio")
    from edge import Geometry

    if not REAL_FRAMES.is_dir():
        pytest.skip(f"shared real frames not found at {REAL_FRAMES}")
    out = {}
    for key, name in REAL_NAMES.items():
        img = fabio.open(str(REAL_FRAMES / name))
        geom = Geometry.from_cbf_header(img.header["_array_data.header_contents"], img.data.shape)
        out[key] = (np.asarray(img.data), geom)
    return out


def match_peaks(px, py, tx, ty, radius=2.0):
    """Nearest-neighbour distances both ways between found (px, py) and true (tx, ty)."""
    px, py, tx, ty = (np.asarray(a, dtype=np.float64) for a in (px, py, tx, ty))
    if len(px) == 0 or len(tx) == 0:
        return np.full(len(px), np.inf), np.full(len(tx), np.inf)
    d = np.hypot(px[:, None] - tx[None, :], py[:, None] - ty[None, :])
    return d.min(axis=1), d.min(axis=0)
